"""`thinkfast sample` as a library function: problems -> prompts -> engine -> graded samples file.

Grading is a callback (`grade_fn(predictions, golds, kinds) -> results with .correct/.answer/.error`): the
engine never imports the evaluation code; the command passes `thinkfast.eval.grading.grade_many`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

import torch

from ..data import Problem, load_problems
from ..data.prompts import PLAIN_STOP, PromptStyle, declared_style, has_chat_template, render_prompt
from ..data.sources import empty_spec_hint
from ..errors import CheckpointError, ConfigError, ThinkfastError, option
from ..models.teacher import has_chat_template_files
from ..utils import check_device, parse_dtype, whole_number
from .engine import Engine, EngineStats, model_role, parse_ssm_state_dtype
from .samples_file import SamplesWriter, part_files
from .sampling import SamplingParams

log = logging.getLogger(__name__)

GradeFn = Callable[[list[str], list[str], list[str]], list]


# ---------------------------------------------------------------------------------------------- models


def load_for_sampling(spec: str, device=None, dtype: torch.dtype = torch.float32):
    """(ThinkfastForCausalLM, tokenizer, name) from a thinkfast checkpoint folder (any role), an HF Llama-family
    folder (Llama, Mistral, Qwen2, Qwen3), a .gguf file or a hub id. Llama-family teachers are converted to
    all-attention thinkfast models, so the teacher and its students run in the same engine."""
    from ..models.teacher import load_thinkfast

    model, tok = load_thinkfast(spec, dtype=dtype, device=device, where=option("--model", "model"))
    if tok is None:
        raise CheckpointError(f"{option('--model', 'model')} {spec}: no tokenizer found beside the weights; save one there "
                              f"(tokenizer.save_pretrained), or write the model with its teacher's: thinkfast convert {spec} "
                              "--tokenizer TEACHER --out DIR")
    return model, tok, default_model_name(spec)


def default_model_name(spec: str) -> str:
    """What a model is called when no --name is given: a .gguf file's stem, else the folder's name (a hub id's
    last part)."""
    path = Path(spec)
    if path.suffix.lower() == ".gguf":
        return path.stem
    return (path.resolve().name if path.exists() else path.name) or str(spec)


def encode_prompt(tokenizer, text: str, templated: bool) -> list[int]:
    """A chat template writes its own special tokens (BOS included); a plain prompt gets the tokenizer's defaults.
    Not verbose: a prompt past the tokenizer's model_max_length is refused by the run itself, in one line, and
    transformers' own warning about it would come first."""
    return list(tokenizer(text, add_special_tokens=not templated, verbose=False)["input_ids"])


def hardware_string(device, threads: bool = True) -> str:
    """The GPU's name, or the CPU's with the thread count (unless `threads` is False) and its kernels' instruction set."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = _cpu_name()
    n = torch.get_num_threads()
    detail = (f"{n} thread{'' if n == 1 else 's'}" if threads else "") + _cpu_kernels()
    return f"{cpu} ({detail.removeprefix(', ')})" if detail else cpu


def _cpu_name() -> str:
    """The CPU's model name: /proc/cpuinfo on Linux, sysctl on macOS (where platform.processor() says only "arm"
    or "i386"), else the machine type."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        try:
            said = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, timeout=5)
            if said.returncode == 0 and said.stdout.strip():
                return said.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine()


def _cpu_kernels() -> str:
    """", AVX512" etc.: the instruction set PyTorch's CPU kernels were picked for. The CPU's name does not say it
    (one "AMD EPYC" has AVX2, another AVX-512), and it decides the order fp32 GEMMs sum in: trained weights, and so
    samples, repeat exactly only between hosts where it is the same."""
    try:
        level = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        return ""
    return f", {level}" if level and level != "DEFAULT" else ""


def dist_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) when not launched by it."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


# ---------------------------------------------------------------------------------------------- sampling


@dataclass
class SampleSummary:
    out: Path
    written: int  # samples written by this call (this rank)
    skipped: int  # already in the file
    total: int  # samples the configuration asks for (this rank's share)
    config: str
    stats: EngineStats | None
    wall_seconds: float


WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth")


def _file_fingerprint(path: Path, h, whole_below: int = 64 * 2**20, blocks: int = 32, block: int = 2**16) -> None:
    """Feed `path`'s size and content into the hash `h`: all of it when small, else evenly spaced blocks (a few MB
    read from a multi-GB checkpoint; any retraining changes them)."""
    size = path.stat().st_size
    h.update(f"{path.name}\0{size}\0".encode())
    with path.open("rb") as f:
        if size <= whole_below:
            for chunk in iter(lambda: f.read(2**20), b""):
                h.update(chunk)
            return
        for i in range(blocks):
            f.seek((size - block) * i // (blocks - 1))
            h.update(f.read(block))


def model_fingerprint(model_spec: str) -> str:
    """What identifies the model a samples file was drawn from: a hash of its weight files (and config) when the
    spec is a local folder or file, so that moving the folder keeps a file resumable and retraining into the same
    folder does not; the spec itself otherwise (a hub id)."""
    path = Path(model_spec)
    if not path.exists():
        return str(model_spec)
    files = [path] if path.is_file() else sorted(
        p for p in path.iterdir() if p.is_file() and (p.suffix in WEIGHT_SUFFIXES or p.name == "config.json"))
    h = hashlib.sha256()
    for f in files:
        _file_fingerprint(f, h)
    return "weights:" + h.hexdigest()[:16]


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, ensure_ascii=False).encode()).hexdigest()[:16]


def problems_fingerprint(problems: list[Problem]) -> dict:
    """What identifies the problems a samples file answers: their number, a hash of their ids, and a hash of
    everything that shapes a prompt or its grading (id, question, gold answer, kind). Sorted by id, since samples
    are keyed by problem id and seeded per (problem, index): the path they were read from, and their order, do
    not change a sample."""
    rows = sorted([p.id, p.question, p.answer, p.kind] for p in problems)
    return {"problems": len(rows), "ids": _digest([r[0] for r in rows]), "content": _digest(rows)}


def sample_config(model_spec: str, problems: list[Problem], n: int, params: SamplingParams, seed: int,
                  style: PromptStyle, dtype: torch.dtype = torch.float32,
                  ssm_dtype: torch.dtype = torch.float32) -> dict:
    """What the samples depend on; its hash tags every line of the file. The model and the problems count by
    content, not by path. The precision is part of it (a bf16 run draws other samples than an fp32 one from the
    same seeds), the SSM state's too; the batch size is not (per-sample seeds)."""
    few_shot = style.few_shot or []
    config = {
        "model": model_fingerprint(model_spec), "data": problems_fingerprint(problems), "n": n,
        "temperature": float(params.temperature), "top_p": float(params.top_p), "top_k": int(params.top_k),
        "min_p": float(params.min_p), "max_new_tokens": int(params.max_new_tokens), "stop": list(params.stop),
        "ignore_eos": bool(params.ignore_eos),  # samples that run past their end are other samples
        # an empty system prompt renders as none: one configuration
        "prompt": {"instruction": style.instruction, "system": style.system or None, "chat": style.chat,
                   "few_shot": [p.id for p in few_shot],
                   # the examples' text is in every prompt: an edited example is another configuration
                   "few_shot_content": _digest([[p.id, p.question, p.answer, p.kind, p.solution] for p in few_shot])
                   if few_shot else None},
        "seed": seed, "dtype": str(dtype).removeprefix("torch."),
    }
    if ssm_dtype != torch.float32:  # only when set: files from before the option keep their hash and resume
        config["ssm_state_dtype"] = str(ssm_dtype).removeprefix("torch.")
    if style.template_kwargs:  # likewise
        config["prompt"]["template_kwargs"] = dict(sorted(style.template_kwargs.items()))
    if few_shot and style.instruction == "auto" and len({p.kind == "math" for p in [*few_shot, *problems]}) > 1:
        # examples of another kind show the question's format (they showed their own before): other prompts
        config["prompt"]["few_shot_format"] = "question's"
    return config


class _SamplingJob:
    """One model's part of a sampling run: its samples file, what is left to draw and, once started, its engine.

    Built in three phases, so that several jobs can be checked before any model loads and then take turns:
    __init__ checks the request and the file (nothing loads), `start` loads the model, `batches` draws and writes.
    """

    def __init__(self, model_spec: str, data_spec: str, out, n: int, params: SamplingParams, seed: int = 0,
                 batch_size: int = 64, device=None, dtype: str | torch.dtype | None = "auto",
                 style: PromptStyle | None = None, grade_fn: GradeFn | None = None, name: str | None = None,
                 compile="auto", problems: list[Problem] | None = None,
                 ssm_state_dtype: str | torch.dtype | None = None, default_stop: bool = True):
        self.t0 = time.perf_counter()
        if not whole_number(n) or n < 1:
            raise ConfigError(f"{option('--n ', 'n=')}{n!r}: ask for at least 1 sample per problem (a whole number)")
        if not whole_number(batch_size) or batch_size < 1:
            raise ConfigError(f"{option('--batch-size ', 'batch_size=')}{batch_size!r}: use a whole number, at least 1")
        if not whole_number(seed) or seed < 0:  # recorded in the file's configuration as given
            raise ConfigError(f"{option('--seed ', 'seed=')}{seed!r}: use a whole number, 0 or more")
        # as `thinkfast sample`: the prompts the checkpoint declares it was trained on, else the auto instruction
        self.style = style or declared_style(model_spec)
        # a plain Question/Answer prompt invites the next question: stop there, as lm-eval's gsm8k does
        self.plain = not (self.style.chat and has_chat_template_files(model_spec))
        if self.plain and self.style.chat and self.style.template_kwargs:
            raise ConfigError(f"{option('--model', 'model')} {model_spec}: its tokenizer has no chat template, so "
                              f"{option('--chat-template-kwargs', 'template_kwargs')} would go unused (its prompts are "
                              "plain Question/Answer blocks); drop them")
        if default_stop and self.plain and PLAIN_STOP not in params.stop:
            params = replace(params, stop=[*params.stop, PLAIN_STOP])
        self.rank, self.world, local_rank = dist_env()
        if self.world > 1:
            _join_process_group()
        if device is None:
            device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(check_device(str(device)))
        if self.device.type == "cuda" and self.device.index is not None:
            torch.cuda.set_device(self.device)  # a torchrun rank's own GPU for every kernel and stream made later
        self.dtype = dtype if isinstance(dtype, torch.dtype) else parse_dtype(dtype, self.device)
        self.ssm_dtype = parse_ssm_state_dtype(ssm_state_dtype)

        if problems is None:
            problems = load_problems(data_spec)
        if not problems:
            raise ConfigError(f"data spec {data_spec!r} names no problems; {empty_spec_hint(data_spec)}")
        ids = [p.id for p in problems]
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise ConfigError(f"data spec {data_spec!r}: problem id {dup!r} occurs twice; samples are keyed by problem id")

        self.model_spec, self.out, self.n, self.params, self.seed = model_spec, out, n, params, seed
        self.batch_size, self.grade_fn, self.compile = batch_size, grade_fn, compile
        self.writer = SamplesWriter(out, sample_config(model_spec, problems, n, params, seed, self.style, self.dtype,
                                                       self.ssm_dtype),
                                    self.rank, self.world)
        self.writer.lock()  # before reading: a live run's half-written last line is not a crash's to cut
        try:
            done = self.writer.done()  # refuses a file of another configuration before any work
            # a sharded run that crashed before merging has only its part files: they name the model and timing too
            first = next((r for r in map(_first_record, [out, *part_files(Path(out))]) if r), {}) if done else {}
            written_as, self.written_on = first.get("model"), first.get("hardware")
            self.written_with = {k: first[k] for k in ("batch_size", "compiled") if k in first}
            if written_as is not None:
                if name is not None and name != written_as:
                    raise ConfigError(f"{out} holds the samples of model {written_as!r}; resume with "
                                      f"{option('--name ' + written_as, f'name={written_as!r}')} (or none), or write "
                                      f"{name!r} to another {option('--out', 'out file')}")
                name = written_as  # a moved checkpoint folder resumes under the name its samples already carry
        except BaseException:
            self.writer.release()
            raise
        self.name = name
        self.problems = problems
        self.mine = problems[self.rank::self.world]
        todo = {p.id: [j for j in range(n) if (p.id, j) not in done] for p in self.mine}
        self.todo = {k: v for k, v in todo.items() if v}
        self.total = len(self.mine) * n
        self.skipped = self.total - sum(len(v) for v in self.todo.values())
        self.written = 0
        self.engine: Engine | None = None
        self.bar = None

    def start(self, progress: bool = True, bar_position: int | None = None) -> None:
        """Load the model and build its engine and prompts (nothing to do when every sample is already there)."""
        if not self.todo:
            return
        model, tokenizer, default_name = load_for_sampling(self.model_spec, self.device, self.dtype)
        self.name = self.name or default_name
        self.role = model_role(model.lm)
        templated = self.style.chat and has_chat_template(tokenizer)
        if templated == self.plain:  # the files said otherwise: the default stop was decided on a wrong guess
            log.warning("note: %s's tokenizer %s a chat template, which its files did not show; the default stop "
                        "string was set for %s prompts", self.model_spec, "has" if templated else "has no",
                        "plain" if self.plain else "templated")
        self.prompts, self.by_id = [], {}
        for p in self.mine:
            if p.id in self.todo:
                self.prompts.append((p.id, encode_prompt(tokenizer, render_prompt(p, tokenizer, self.style), templated)))
                self.by_id[p.id] = p
        self.engine = Engine(model, tokenizer, batch_size=self.batch_size, device=self.device, dtype=self.dtype,
                             compile=self.compile, ssm_state_dtype=self.ssm_dtype)
        if self.world > 1:  # every rank refuses what any rank would, before any of them writes a sample
            for p in self.problems:
                if p.id not in self.by_id:
                    self.engine.check_prompt(p.id, encode_prompt(tokenizer, render_prompt(p, tokenizer, self.style), templated))
        self.hardware = hardware_string(self.device)
        if self.skipped and self.written_on and self.written_on != self.hardware:
            log.warning("note: %s holds samples timed on %r and this run is %r; seconds are comparable only on one "
                        "machine and thread count, so `thinkfast report` will refuse the mix (unless "
                        "--allow-mixed-hardware): stop now and resume as before (the same device and --threads), or "
                        "sample into a new file", self.out, self.written_on, self.hardware)
        now = self.timed_with()
        changed = {k: (v, now[k]) for k, v in self.written_with.items() if now.get(k) != v}
        if self.skipped and changed:
            log.warning("note: %s holds samples timed with %s; this run differs, so its seconds per sample mix two "
                        "speeds, and `thinkfast report` says so: resume with the same settings, or sample into a new "
                        "file", self.out, ", ".join(f"{k} {a} (now {b})" for k, (a, b) in changed.items()))
        desc = self.name + (f" rank {self.rank}" if self.world > 1 else "")
        self.bar = _progress_bar(sum(len(v) for v in self.todo.values()), desc, progress and self.rank == 0,
                                 position=bar_position)

    def timed_with(self) -> dict:
        """The engine settings a sample's seconds depend on, recorded on each line beside the hardware."""
        return {"batch_size": self.engine.batch_size, "compiled": bool(self.engine.use_compile)}

    def engine_seconds(self) -> float:
        return self.engine.stats.wall_seconds if self.engine is not None else 0.0

    def _show_rate(self) -> None:
        # the summary's figure: generated tokens / engine seconds (prefill included, grading and writing not)
        self.bar.set_postfix_str(f"{self.engine.stats.tokens_per_second:,.0f} tok/s engine", refresh=False)

    def batches(self, yield_every: float | None = None) -> Iterator[int]:
        """Draw, grade and write the samples left; yields the number written after each engine batch (0 after a
        turn of `yield_every` engine seconds that finished none)."""
        if self.engine is None:
            return
        shown_at = [0.0]  # engine seconds at the last rate shown

        def on_step(st: EngineStats):
            if self.bar is not None and st.wall_seconds - shown_at[0] >= 0.5:
                shown_at[0] = st.wall_seconds
                self._show_rate()

        try:
            for batch in self.engine.generate_batches(self.prompts, self.n, self.params, self.seed, only=self.todo,
                                                      progress=on_step, yield_every=yield_every):
                if batch:
                    texts = [c.text or "" for c in batch]
                    probs = [self.by_id[c.problem_id] for c in batch]
                    grades = (self.grade_fn(texts, [p.answer for p in probs], [p.kind for p in probs])
                              if self.grade_fn else [None] * len(batch))
                    timed = self.timed_with()  # a compile that failed falls back to eager: as it ran
                    self.writer.append([_record(c, p, g, self.name, self.role, self.hardware, self.writer.config, timed)
                                        for c, p, g in zip(batch, probs, grades)])
                    self.written += len(batch)
                    if self.bar is not None:
                        self.bar.update(len(batch))
                yield len(batch)
        finally:
            self.close_bar()

    def close_bar(self) -> None:
        if self.bar is not None:
            if self.engine.stats.gen_tokens:
                self._show_rate()  # the bar's last word is the summary's rate, not one from steps before
            self.bar.close()
            self.bar = None

    def finish(self) -> SampleSummary:
        """Merge torchrun's part files (all ranks done) and sum up."""
        if self.world > 1:
            _barrier()
            if self.rank == 0:
                self.writer.merge_parts()
        elif part_files(self.writer.out):  # parts of a sharded run that crashed, resumed by one process: they count as done
            self.writer.merge_parts()
        stats = self.engine.stats if self.engine is not None else None
        return SampleSummary(Path(self.out), self.written, self.skipped, self.total, self.writer.config, stats,
                             time.perf_counter() - self.t0)


def sample_to_file(
    model_spec: str,
    data_spec: str,
    out,
    n: int,
    params: SamplingParams,
    seed: int = 0,
    batch_size: int = 64,
    device=None,
    dtype: str | torch.dtype | None = "auto",
    style: PromptStyle | None = None,
    grade_fn: GradeFn | None = None,
    name: str | None = None,
    compile="auto",
    progress: bool = True,
    problems: list[Problem] | None = None,
    ssm_state_dtype: str | torch.dtype | None = None,
    default_stop: bool = True,
) -> SampleSummary:
    """Sample n completions per problem into the samples file `out`, resuming whatever is already there.

    With torchrun each rank takes every world_size-th problem, writes its own part file, and rank 0 merges the
    parts into `out` once all ranks are done. ssm_state_dtype: the Mamba layers' SSM state in the engine
    (None or "float32", "bfloat16", "float16"; see `Engine`). style: by default, as `thinkfast sample`, the prompt
    instruction the checkpoint declares (`prompt_style` in its config.json), else "auto". grade_fn: None leaves
    `correct` null; `thinkfast.eval.grading.grade_many` grades as `thinkfast sample` does. default_stop: plain
    `Question: ... Answer:` prompts (no chat template, or chat off) also stop at the next `Question:` (PLAIN_STOP).
    """
    job = _SamplingJob(model_spec, data_spec, out, n, params, seed, batch_size, device, dtype, style, grade_fn, name,
                       compile, problems, ssm_state_dtype, default_stop)
    try:
        job.start(progress)
        for _ in job.batches():
            pass
        return job.finish()
    finally:
        job.writer.release()


def sample_interleaved(jobs: list[dict], common: dict, turn_seconds: float = 1.0,
                       progress: bool = True) -> list[SampleSummary]:
    """Sample several models' files as `sample_to_file` would, taking turns: each engine runs for about
    `turn_seconds` of its own time, then the next.

    Why: seconds per sample are compared between models, and a shared machine's speed drifts by tens of percent
    over minutes; models sampled one after another carry that drift into their ratio, models taking turns share
    it. Each engine's clock runs only during its own turns, and the samples are those `sample_to_file` draws
    (seeded per sample). jobs: per-model keyword arguments of `sample_to_file` (model_spec, out, name, ...);
    common: the arguments they share (data_spec, n, params, ...). Every file is checked before any model loads.
    """
    if not turn_seconds > 0:
        raise ConfigError(f"turn_seconds={turn_seconds}: use a positive number of seconds")
    common = dict(common)
    if "progress" in common:  # one bar per model either way: sample_to_file's flag, given with the rest
        progress = common.pop("progress")
    if any("progress" in job for job in jobs):
        raise ConfigError("progress is one setting for all the models here: pass sample_interleaved(..., progress=...)")
    if common.get("problems") is None and "data_spec" in common and not any("data_spec" in job for job in jobs):
        common = {**common, "problems": load_problems(common["data_spec"])}  # read (or generated) once for all
    outs = [Path((common | job).get("out", "")).resolve() for job in jobs]
    if len(set(outs)) != len(outs):
        raise ConfigError("two models would write the same samples file; give each its own out")
    runs: list[_SamplingJob] = []
    try:
        for job in jobs:
            runs.append(_SamplingJob(**{**common, **job}))
        return _take_turns(runs, turn_seconds, progress)
    finally:
        for r in runs:
            r.writer.release()


def _take_turns(runs: list["_SamplingJob"], turn_seconds: float, progress: bool) -> list[SampleSummary]:
    for i, r in enumerate(runs):
        r.start(progress, bar_position=i)
    turns = {i: r.batches(turn_seconds) for i, r in enumerate(runs)}
    try:
        while turns:
            for i, t in list(turns.items()):
                # a turn lasts turn_seconds of this engine's time: switching at every finished batch (nearly every
                # step late in a run) would make each engine re-read its weights and state from memory each step
                start = runs[i].engine_seconds()
                for _ in t:
                    if runs[i].engine_seconds() - start >= turn_seconds:
                        break
                else:
                    del turns[i]
    finally:
        for t in turns.values():
            t.close()  # an interrupted run: each bar closes, what was written stays
    return [r.finish() for r in runs]


def _first_record(out) -> dict:
    """A samples file's first record ({} when it has none)."""
    try:
        with open(out, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    record = json.loads(line)
                    return record if isinstance(record, dict) else {}
    except (OSError, ValueError):
        return {}
    return {}


def _record(c, problem: Problem, grade, name: str, role: str, hardware: str, config: str, timed: dict) -> dict:
    return {
        "problem_id": c.problem_id, "sample_idx": c.sample_idx, "model": name, "role": role,
        "completion": c.text if c.text is not None else "",
        "answer": getattr(grade, "answer", None), "gold": problem.answer, "kind": problem.kind,
        "correct": getattr(grade, "correct", None), "grade_error": getattr(grade, "error", None), "reward": None,
        "gen_tokens": c.gen_tokens, "prompt_tokens": c.prompt_tokens, "seconds": round(c.seconds, 6), "seed": c.seed,
        "finish_reason": c.finish_reason, "hardware": hardware, "config": config,
        **timed,  # how it was timed (batch size, compiled step): not part of the configuration, as the hardware
    }


def _progress_bar(total: int, desc: str, enabled: bool, position: int | None = None):
    if not enabled:
        return None
    from ..utils import progress_bar

    return progress_bar(total, desc, "sample", **({} if position is None else {"position": position}))


def _join_process_group() -> None:
    """Join torchrun's ranks (gloo) at the start, while torchrun's rendezvous store is there: joined only at the
    end, ranks whose torchrun was killed waited for its store for days. A long timeout: the last barrier waits for
    the slowest rank, which may sample for hours."""
    import datetime

    import torch.distributed as dist

    if not dist.is_initialized():
        try:
            dist.init_process_group("gloo", timeout=datetime.timedelta(days=7))
        except Exception as e:
            raise ThinkfastError(f"torchrun rendezvous failed ({str(e).splitlines()[0][:200]}); check MASTER_ADDR/MASTER_PORT") from None


def _barrier() -> None:
    """Wait for every torchrun rank."""
    import torch.distributed as dist

    _join_process_group()
    dist.barrier()
