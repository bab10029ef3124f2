"""`thinkfast demo`: the paper's experiment end to end at laptop scale, on the embedded teacher.

    teacher (shipped) -> Llamba student by MOHAWK 1-3 (forward KL) -> hybrid student by hidden-state alignment -> SFT of both
    -> n samples per held-out problem for all three in the same engine -> grade -> outcome reward model
    trained on a training split -> report (coverage, majority, Best-of-N against k and against seconds)

Every step writes its outputs under `--out` and is recorded in `demo.json` when it finishes; re-running the
same command skips finished steps and resumes the interrupted one (training from its last checkpoint, sampling
from the samples already written). A folder holding a demo with other settings is refused, never mixed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .embedded import PROMPT_STYLE, TEACHER_SPEC, embedded_teacher_dir, sums_spec
from .errors import CheckpointError, ConfigError, ThinkfastError, option
from .utils import HeldLock, atomic_dir, atomic_write_json, clear_leftovers, disk_space_line, folder_bytes, is_leftover

STEPS = ("data", "teacher", "llamba", "hybrid", "sample", "reward", "report")
# the demo's peak disk use over its teacher's weights: copies of each model, every stage's checkpoint and the one
# being written beside it (weights and Adam's moments), samples, the reward model (embedded teacher: 96.5 MiB at
# the peak, 86 MiB at the end, benchmarks/demo_disk.md; asked: 128 MiB)
DISK_PER_TEACHER_BYTE = 20
MODELS = ("teacher", "llamba", "hybrid")
FROM_LLAMBA = object()  # the hybrid's attention layers: where the Llamba's stage 2 fitted worst
OVERLAP_MIN_TOKENS = 50_000  # the Llamba's stages after `hidden` run beside the hybrid from this many tokens (auto)
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
               "chat_template.jinja", "special_tokens_map.json")
# seed ranges of reasoning-gym's basic_arithmetic (item i uses seed + i): disjoint from the teacher's [1000, 151000)
DISTILL_SEED, RM_SEED, HELDOUT_SEED = 200_000, 600_000, 900_000
EVAL_SEED = 800_000  # worked solutions whose teacher-forced loss each distillation stage logs when it ends

# learning rates: KD from a sweep (8 x 1024-token rows: 2e-3 / 1e-3 / 5e-4 / 2.5e-4 -> KL 0.71 / 0.31 / 0.24 / 0.31;
# 1-row steps: 5e-4 and 2.5e-4 end level); SFT gently, with a long warmup: a fresh Adam's first steps move every
# weight by ~lr
DISTILL_LR = {"matrix": 3e-3, "hidden": 2e-3, "kd": 5e-4, "sft": 1e-4}
DISTILL_WARMUP = {"matrix": 0.05, "hidden": 0.05, "kd": 0.1, "sft": 0.3}


@dataclass
class DemoSettings:
    # held-out problems (x n samples x 3 models: the sampling step's cost, ~6 s per problem here); 40, not 24:
    # at 24 one problem a student never solves moves its coverage by 0.042, more than the fixed-time claims'
    # margins; 48 took the whole demo to 13.8 minutes, too near the 15-minute target on a slow day
    problems: int = 40
    n: int = 32  # samples per problem and model
    temperature: float = 1.3  # the embedded teacher solves 93% at 1.0; 1.3 leaves it room to scale with k
    top_p: float = 1.0
    max_new_tokens: int = 1200
    # rows decoded together, for every model: on 2 CPU threads larger batches spread each step's overhead over
    # more rows, most for the students (benchmarks/demo_batch.md, seconds per sample, batch 64 / 128 / 256:
    # teacher 0.126 / 0.118 / 0.101, hybrid 0.079 / 0.071 / 0.056, Llamba 0.036 / 0.027 / 0.024)
    batch_size: int = 256
    seed: int = 0
    distill_examples: int = 20_000  # problems in the distillation split (more than the budgets below consume)
    # MOHAWK stage 3 (kd) 300k -> 150k tokens: the (discrete) Llamba solved nothing at either (first 48 held-out problems,
    # greedy / T=1.0 / T=1.3: 0.000 / 0.000 / 0.000 and 0.000 / 0.013 / 0.000, benchmarks/distill_recipe.md), and
    # the minute goes to the reward model reading whole chains, within the 15-minute target
    llamba_tokens: dict = field(default_factory=lambda: {"matrix": 24_000, "hidden": 150_000, "kd": 150_000, "sft": 40_000})
    # the Llamba's mixers in Mamba-2's parameterisation (dt-scaled input, SiLU conv, gated RMSNorm) rather than
    # Llamba's discrete one: from the same attention init it fits stage 1 at 0.11 against 0.54 and stage 2 at 1.73
    # against 2.52, and solves more (first 48 held-out problems, greedy / T=1.3, this recipe: 0.050 / 0.013
    # against 0.000 / 0.003; with SFT 900k instead of KD: 0.100 / 0.084 against 0.050 / 0.016;
    # benchmarks/distill_recipe.md). Layer 3 aligns worst either way, so the hybrid keeps its attention there
    llamba_ssm_param: str = "mamba2"
    # the hybrid: hidden-state alignment to the teacher, then SFT; no end-to-end KD stage: at these budgets KD
    # tokens bought less than SFT tokens (benchmarks/distill_recipe.md: one example per row, hidden 200k then
    # 300k of KD or SFT, T=1.3: 0.115 vs 0.292), the over-trained teacher being nearly one-hot on these
    # solutions while each KD step also pays a teacher forward. SFT tokens, measured at T=1.3 on the first 24
    # held-out problems (teacher 0.50): 300k 0.292, 600k 0.417, 900k 0.573, 1.2M 0.604. Hidden 200k -> 400k
    # (then SFT 900k; first 48 held-out problems, greedy / T=1.3): 0.917 / 0.562 -> 1.000 / 0.620
    hybrid_tokens: dict = field(default_factory=lambda: {"hidden": 400_000, "sft": 900_000})
    # forward KL for any KD stage (the Llamba's MOHAWK stage 3): at these budgets reverse KL (MambaInLlama's
    # choice) stalled (hybrid, after 100k hidden + 200k kd tokens, CE on worked solutions 1.72 vs 0.28 forward)
    kd_loss: str = "forward_kl"
    # one worked example per row and per optimizer step, never cut: packed 512-token rows (the previous recipe)
    # truncated the 35% of examples longer than 512 tokens, so the students never saw how a long sum ends, and
    # rows began mid-solution with the question out of sight (hybrid, hidden 200k + SFT 300k tokens, first 24
    # held-out problems: greedy 0.458 -> 0.583, T=1.0 0.365 -> 0.510, T=1.3 0.250 -> 0.292); with rows this
    # short, many small steps beat few large ones (packed: 8 x 1024-token rows per step, KD loss 0.145; 1 x 512, 0.028)
    pack: bool = False
    seq_len: int = 1280  # holds the longest worked example (8 terms of 3 digits: ~1,150 tokens)
    matrix_seq_len: int = 512  # stage 1 materialises L x L matrices per head: shorter rows, same tokens per step
    distill_batch: int = 1
    rm_problems: int = 16  # training-split problems sampled for the reward model
    rm_samples: int = 4  # samples per problem and model
    # whole chains: the reward model's likelihood features must see every token (prompt + max_new_tokens + the end of
    # turn). Held-out ranking AUC, teacher's samples: 0.93 whole, 0.67 on a 192-token tail (benchmarks/orm_features.md)
    rm_max_len: int = 1400
    # reward-model problems of at most this many terms (None: the held-out mix): --quick's 160 tokens cut every
    # longer chain short, so all its reward-model samples were wrong and no reward model was ever trained
    rm_max_terms: int | None = None
    wall_target_seconds: float = 900.0  # the whole demo, first run on a fresh 2-core machine (--quick: 180)
    teacher: str | None = None  # a thinkfast all-attention folder; default the embedded teacher
    compile: str = "auto"

    @classmethod
    def quick_settings(cls) -> "DemoSettings":
        """A smoke run of the whole pipeline in a few minutes: tiny budgets, no quality claims."""
        return cls(problems=4, n=4, max_new_tokens=160, distill_examples=200,
                   llamba_tokens={"matrix": 4096, "hidden": 4096, "kd": 8192, "sft": 4096},
                   hybrid_tokens={"hidden": 4096, "sft": 8192}, distill_batch=4, rm_problems=4, rm_samples=2,
                   rm_max_len=192, rm_max_terms=2, wall_target_seconds=180.0)

    def sampling_arguments(self, data_spec: str, n: int | None = None) -> dict:
        """The arguments every model's `sample_interleaved` job shares in the demo (data, sampling settings, prompt
        style, grader): benchmarks that re-sample a demo's problems take them from here, so they sample as it did."""
        from .data.prompts import PromptStyle
        from .engine.sampling import SamplingParams
        from .eval.grading import grade_many

        params = SamplingParams(temperature=self.temperature, top_p=self.top_p, max_new_tokens=self.max_new_tokens)
        return dict(data_spec=data_spec, n=self.n if n is None else n, params=params, seed=self.seed,
                    batch_size=self.batch_size, device="cpu", dtype="float32", style=PromptStyle(**PROMPT_STYLE),
                    grade_fn=grade_many, compile=self.compile)

    def fingerprint(self) -> str:
        settings = dataclasses.asdict(self)
        if settings["rm_max_terms"] is None:  # runs from before the setting resume
            del settings["rm_max_terms"]
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def distill_stages(s: DemoSettings, budgets: dict) -> list:
    """The demo's distillation recipe: one StageConfig per (stage, tokens) of `budgets`, in order."""
    from .distill.stages import StageConfig
    from .distill.trainer import TrainConfig

    common = dict(batch_size=s.distill_batch, seq_len=s.seq_len, log_every=10, ckpt_every=100, seed=s.seed,
                  weight_decay=0.0)
    stages = []
    for stage, tokens in budgets.items():
        extra = {"loss": s.kd_loss} if stage == "kd" else {}
        train = TrainConfig(tokens=tokens, lr=DISTILL_LR[stage], warmup=DISTILL_WARMUP[stage], **common)
        if stage == "matrix" and s.matrix_seq_len < s.seq_len:
            train = dataclasses.replace(train, seq_len=s.matrix_seq_len,
                                        batch_size=s.distill_batch * s.seq_len // s.matrix_seq_len)
        stages.append(StageConfig(stage, train, **extra))
    return stages


class Demo:
    def __init__(self, out: str | os.PathLike, settings: DemoSettings, progress: bool = True, log=print,
                 overlap: str = "auto"):
        self.out = Path(out)
        self.s = settings
        self.progress = progress
        self.log = log
        if overlap not in ("auto", "on", "off"):
            raise ConfigError(f"demo: overlap={overlap!r}; use auto, on or off")
        self.overlap = overlap  # the Llamba's last stages beside the hybrid (`overlap_threads`); same weights either way
        self.steps = STEPS  # the steps this run goes to
        self.tail_process = None  # the Llamba's second process, while the students train side by side
        self.state_path = self.out / "demo.json"
        self.state = self._open()
        self._tokenizer = None
        self._trained: set[str] | None = None  # questions some model of the run trained on
        self._eval_problems: list | None = None
        self.examples: dict = {}  # the distillation split, read and tokenised once for both students

    # ------------------------------------------------------------------ run bookkeeping

    def _open(self) -> dict:
        if self.state_path.is_file():
            try:
                state = json.loads(self.state_path.read_text())
            except json.JSONDecodeError:
                raise CheckpointError(f"{self.state_path} is damaged; choose a new {option('--out', 'out')}") from None
            if state.get("fingerprint") != self.s.fingerprint():
                raise CheckpointError(
                    f"{self.out} holds a demo run with other settings; re-run it with the same "
                    f"{option('flags', 'settings')} to continue, or choose a new {option('--out', 'out')}"
                )
            return state
        if self.out.exists() and any(not is_leftover(p) for p in self.out.iterdir()):  # a killed first write is none
            raise CheckpointError(f"{self.out} is not empty and holds no demo run; choose a new {option('--out', 'out')}")
        # a new run's record is written by its first step (`run`), after the disk check: a refused run leaves
        # nothing behind that a re-run with other flags would be refused for
        return {"fingerprint": self.s.fingerprint(), "settings": dataclasses.asdict(self.s), "done": [],
                "wall_seconds": 0.0, "step_seconds": {}}

    def _finish_step(self, step: str, seconds: float, **extra) -> None:
        self.state["done"].append(step)
        self.state.setdefault("environment", {})[step] = environment()
        self.state["step_seconds"][step] = round(self.state["step_seconds"].get(step, 0.0) + seconds, 2)
        self.state.update(extra)
        atomic_write_json(self.state_path, self.state)

    def _charge(self, seconds: float) -> None:
        self.state["wall_seconds"] = round(self.state["wall_seconds"] + seconds, 2)
        atomic_write_json(self.state_path, self.state)

    def run(self, until: str | None = None) -> dict | None:
        """Run (or continue) every step, or the steps up to `until`; returns the metrics (None before the report)."""
        if until is not None and until not in STEPS:
            raise ConfigError(f"demo: until={until!r} is not a step; use one of {', '.join(STEPS)}")
        steps = self.steps = STEPS[: STEPS.index(until) + 1] if until is not None else STEPS
        self.out.parent.mkdir(parents=True, exist_ok=True)
        # two demos on one --out would train, sample and log into the same files: the second is refused
        with HeldLock.beside(self.out, "let it finish, or choose another " + option("--out", "out")):
            return self._run_steps(steps)

    def _run_steps(self, steps: list[str]) -> dict | None:
        clear_leftovers(self.out, deep=True)  # what an earlier run's killed writes left (checkpoints, plots)
        if any(step not in self.state["done"] for step in steps):
            self.check_disk_space()
        if not self.state_path.is_file():
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.state_path, self.state)
        done_before = set(self.state["done"])
        for i, step in enumerate(steps, 1):
            if step in self.state["done"]:
                if step in done_before:  # not one an earlier step of this run finished beside itself
                    self.log(f"[{i}/{len(STEPS)}] {step}: done in an earlier run, skipped")
                continue
            self.log(f"[{i}/{len(STEPS)}] {step}: {STEP_TITLES[step]}")
            t0 = time.perf_counter()
            try:
                getattr(self, f"step_{step}")()
            finally:
                self._charge(time.perf_counter() - t0)
            if step not in self.state["done"]:
                self._finish_step(step, time.perf_counter() - t0)
        return json.loads((self.out / "metrics.json").read_text()) if "report" in self.state["done"] else None

    def check_disk_space(self) -> None:
        """Refuse before any step, not at a checkpoint ten minutes in, when --out's disk cannot take the run."""
        teacher = (Path(self.s.teacher) if self.s.teacher else embedded_teacher_dir()) / "model.safetensors"
        weights = teacher.stat().st_size if teacher.is_file() else 0  # no weights: the teacher step says so
        need = DISK_PER_TEACHER_BYTE * weights - folder_bytes(self.out)
        line = disk_space_line(self.out, need, "the demo")
        if line:
            raise ConfigError(f"{line} (models, checkpoints, samples); free some space or choose another {option('--out', 'out')}, "
                              "then re-run the same command")

    # ------------------------------------------------------------------ paths and shared pieces

    def model_dir(self, name: str) -> Path:
        return self.out / "models" / name

    def samples_path(self, name: str) -> Path:
        return self.out / "samples" / f"{name}.jsonl"

    @property
    def dataset_spec(self) -> str:
        return f"jsonl:{self.out / 'data' / 'heldout.jsonl'}?question=question&answer=answer&id=id&kind=number"

    @property
    def rm_spec(self) -> str:
        return f"jsonl:{self.out / 'data' / 'rm_train.jsonl'}?question=question&answer=answer&id=id&kind=number"

    @property
    def distill_spec(self) -> str:
        return sums_spec(self.s.distill_examples, DISTILL_SEED)

    @property
    def eval_rows(self) -> int:
        """Held-out worked solutions each stage is scored on: 64 (a few seconds per stage), 8 in a --quick run."""
        return min(64, max(8, self.s.distill_examples // 100))

    def eval_data(self):
        from .data.packing import DataConfig

        return DataConfig(specs=[self.eval_problems()], instruction=PROMPT_STYLE["instruction"],
                          seed=self.s.seed, pack=self.s.pack)

    def eval_problems(self) -> list:
        """The held-out worked solutions: fresh ones, minus any question a model of this run trained on."""
        from .data import load_problems

        if self._eval_problems is None:
            seen = self.trained_questions()
            fresh = [p for p in load_problems(sums_spec(self.eval_rows * 4, EVAL_SEED)) if p.question not in seen]
            self._eval_problems = fresh[: self.eval_rows]
        return self._eval_problems

    def tokenizer(self):
        from transformers import AutoTokenizer

        if self._tokenizer is None:  # one object: the students' shared examples cache is keyed by it
            self._tokenizer = AutoTokenizer.from_pretrained(self.model_dir("teacher"))
        return self._tokenizer

    def teacher_model(self):
        from .models import ThinkfastForCausalLM

        return ThinkfastForCausalLM.from_pretrained(self.model_dir("teacher"), dtype=torch.float32)

    # ------------------------------------------------------------------ steps

    def step_data(self) -> None:
        """Held-out and reward-model problems: fresh seeds, minus any question that occurs in a training split."""
        from .data import load_problems

        seen = self.trained_questions()
        heldout = [p for p in load_problems(sums_spec(self.s.problems * 4, HELDOUT_SEED)) if p.question not in seen]
        heldout = heldout[: self.s.problems]
        seen |= {p.question for p in heldout}
        short = self.s.rm_max_terms
        pool = load_problems(sums_spec(self.s.rm_problems * (4 if short is None else 64), RM_SEED))
        rm = [p for p in pool if p.question not in seen and (short is None or p.meta.get("num_terms", 0) <= short)]
        rm = rm[: self.s.rm_problems]
        if len(heldout) < self.s.problems or len(rm) < self.s.rm_problems:
            raise ConfigError("too few unseen problems for the held-out or reward-model split; lower "
                              + option("--problems", "problems"))
        with atomic_dir(self.out / "data") as d:
            for name, probs in (("heldout.jsonl", heldout), ("rm_train.jsonl", rm)):
                with open(d / name, "w") as f:
                    for p in probs:
                        f.write(json.dumps({"id": p.id, "question": p.question, "answer": p.answer,
                                            "terms": p.meta.get("num_terms"), "digits": p.meta.get("num_digits")}) + "\n")
        self.log(f"  {len(heldout)} held-out problems ({self.dataset_spec}), {len(rm)} reward-model training problems")

    def trained_questions(self) -> set[str]:
        """Every question a model of this run trained on: the distillation split, the embedded teacher's recipe
        data (a `--teacher` from `train-teacher --recipe tiny-teacher` trained on it too) and the data specs a
        `--teacher` run folder's run.json names."""
        from .data.sources import load_questions

        if self._trained is None:
            specs = [self.distill_spec, TEACHER_SPEC, *self.teacher_data_specs()]
            self._trained = set().union(*(load_questions(spec) for spec in dict.fromkeys(specs)))
        return self._trained

    def teacher_data_specs(self) -> list[str]:
        if self.s.teacher is None:
            return []
        try:
            run = json.loads((Path(self.s.teacher) / "run.json").read_text())
            specs = [spec for spec in run["data"]["specs"] if isinstance(spec, str)]
        except (OSError, ValueError, KeyError, TypeError):
            self.log(f"  note: {self.s.teacher} has no readable run.json naming its training data; held-out "
                     "problems are checked against the embedded teacher's data and the distillation split only")
            return []
        from .data import parse_spec

        readable = []
        for spec in specs:
            try:
                parse_spec(spec)
                readable.append(spec)
            except ThinkfastError:
                self.log(f"  note: the teacher's training data {spec!r} cannot be read here; not checked for overlap")
        return readable

    def step_teacher(self) -> None:
        src = Path(self.s.teacher) if self.s.teacher else embedded_teacher_dir()
        from .models import ThinkfastForCausalLM

        model = ThinkfastForCausalLM.from_pretrained(src, dtype=torch.float32)
        if model.config.role != "teacher":
            raise ConfigError(f"{option('--teacher', 'teacher')} {src}: a thinkfast {model.config.role}, not an all-attention teacher")
        with atomic_dir(self.model_dir("teacher")) as d:
            for name in MODEL_FILES:
                if (src / name).is_file():
                    shutil.copy2(src / name, d / name)
        n = sum(p.numel() for p in model.parameters())
        self.log(f"  teacher: {n / 1e6:.2f}M parameters, {model.config.n_layers} layers, "
                 f"{model.config.n_heads} heads / {model.config.n_kv_heads} KV heads")

    def hybrid_attention_layers(self) -> list[int] | None:
        """Keep attention where a Mamba mixer imitates it worst: the layers with the largest final stage-2
        (hidden-state alignment) loss in the Llamba run, a quarter of them. None (the default spread) when the
        Llamba run logged no stage 2."""
        from .models.transfer import default_hybrid_layers

        log_path = self.out / "work" / "llamba" / "train_log.jsonl"
        last = None
        if log_path.is_file():
            for line in log_path.read_text().splitlines():
                row = json.loads(line)
                if row.get("stage") == "hidden" and "eval_loss" not in row:  # a training record, not a held-out one
                    last = row
        if last is None:
            return None
        losses = {int(k[len("layer"):]): v for k, v in last.items() if k.startswith("layer")}
        n_keep = len(default_hybrid_layers(len(losses)))
        return sorted(sorted(losses, key=losses.get, reverse=True)[:n_keep])

    def _distill(self, name: str, kind: str, budgets: dict, stop_after: str | None = None, callback=None,
                 attn_layers=FROM_LLAMBA) -> None:
        from .data.packing import DataConfig
        from .distill.stages import distill
        from .models import from_teacher

        s = self.s
        # each stage ends by scoring its own loss on held-out worked solutions (the report's held-out losses)
        stages = [dataclasses.replace(st, train=dataclasses.replace(st.train, eval_rows=self.eval_rows))
                  for st in distill_stages(s, budgets)]
        data = DataConfig(specs=[self.distill_spec], instruction=PROMPT_STYLE["instruction"], seed=s.seed, pack=s.pack)
        work = self.out / "work" / name
        if attn_layers is FROM_LLAMBA:
            attn_layers = self.hybrid_attention_layers() if kind == "hybrid" else None
        teacher = self.teacher_model()
        student = from_teacher(teacher, kind=kind, attn_layers=attn_layers,
                               ssm_param=s.llamba_ssm_param if kind == "llamba" else None)
        student = distill(teacher, student, data, stages, tokenizer=self.tokenizer(), out_dir=work,
                          resume=True, progress=self.progress, examples_cache=self.examples, eval_data=self.eval_data(),
                          stop_after=stop_after, callback=callback)
        if stop_after is not None and stop_after != stages[-1].label:
            return  # the later stages continue from the checkpoints in `work`
        with atomic_dir(self.model_dir(name)) as d:
            for f in MODEL_FILES:
                if (work / f).is_file():
                    shutil.copy2(work / f, d / f)
        cfg = student.config
        self.log(f"  {name}: attention at layers {cfg.attn_layers or 'none'}, {cfg.ssm_param} SSM; "
                 f"log in {work / 'train_log.jsonl'}")

    def overlap_threads(self) -> tuple[int, int] | None:
        """(threads for the hybrid, threads for the Llamba's last stages) when they run side by side, else None.

        The hybrid needs only the Llamba's stage 2 (its attention layers come from it), so the Llamba's later
        stages can run in a second process beside it. On a CPU that pays: one training row per step is too small a
        GEMM to keep two threads busy (2 cores: 97 ms per hybrid step on both, 150 ms on one, and two such runs side
        by side each keep their 150 ms). Here thread counts do not change the weights (a test checks every weight
        against the one-after-the-other run). `auto` leaves short stages (--quick) in one process: the second
        one spends ~10 s starting (imports, re-reading the distillation split) before it trains."""
        threads = torch.get_num_threads()
        names = list(self.s.llamba_tokens)
        if (self.overlap == "off" or threads < 2 or torch.cuda.is_available() or "hidden" not in names
                or "hybrid" not in self.steps
                or names[-1] == "hidden" or "llamba" in self.state["done"] or "hybrid" in self.state["done"]):
            return None
        later_tokens = sum(list(self.s.llamba_tokens.values())[names.index("hidden") + 1:])
        if self.overlap == "auto" and later_tokens < OVERLAP_MIN_TOKENS:
            return None
        return threads - threads // 2, threads // 2

    def step_llamba(self) -> None:
        split = self.overlap_threads()
        if split is None:
            self._distill("llamba", "llamba", self.s.llamba_tokens)
            return
        t0 = time.perf_counter()
        self._distill("llamba", "llamba", self.s.llamba_tokens, stop_after="hidden")
        self._hybrid_beside_llamba(*split, llamba_started=t0)

    def _hybrid_beside_llamba(self, hybrid_threads: int, llamba_threads: int, llamba_started: float) -> None:
        """The Llamba's stages after `hidden` in a second Python process, the hybrid here; each thread count restored
        to this process when the other process ends. Finishes both steps; a failure of either stops both
        (their checkpoints stay: re-running continues them)."""
        import subprocess
        import sys

        threads = torch.get_num_threads()
        stages = list(self.s.llamba_tokens)
        later = stages[stages.index("hidden") + 1:]
        self.log(f"  llamba: stages {', '.join(later)} continue in a second process ({llamba_threads} of "
                 f"{threads} threads) beside the hybrid")
        attn_layers = self.hybrid_attention_layers()  # read before the second process appends to the same log
        # a fresh interpreter, not multiprocessing: a forked one would inherit this process's thread pools, and a
        # spawned one re-runs the caller's script when it lacks an `if __name__ == "__main__"` guard
        child = self.tail_process = subprocess.Popen(
            [sys.executable, "-c", "import sys; from thinkfast.demo import llamba_tail_main; sys.exit(llamba_tail_main())",
             str(self.out), str(llamba_threads), str(os.getpid())], stdout=subprocess.PIPE, text=True,
            start_new_session=True)  # Ctrl-C reaches this process only, which stops the other in `finally`
        tail_started, tail_seconds = time.perf_counter(), None

        def child_finished() -> None:
            nonlocal tail_seconds
            said = child.communicate()[0].strip()
            tail_seconds = time.perf_counter() - tail_started
            if child.returncode != 0 or said:
                try:
                    failure = json.loads(said.splitlines()[-1])
                except (IndexError, ValueError):
                    failure = {"error": "ThinkfastError", "message": (
                        f"the Llamba's second process ended (exit code {child.returncode}) before its last stages "
                        "did; re-run the same command to continue them")}
                raise _child_error(failure["error"], failure["message"])
            # the Llamba's step: from its start to its end, so it overlaps the hybrid's
            self._finish_step("llamba", time.perf_counter() - llamba_started)
            torch.set_num_threads(threads)

        def watch(step: int, record: dict) -> None:
            if tail_seconds is None and child.poll() is not None:
                child_finished()

        try:
            torch.set_num_threads(hybrid_threads)
            self.log(f"[{STEPS.index('hybrid') + 1}/{len(STEPS)}] hybrid: {STEP_TITLES['hybrid']}")
            h0 = time.perf_counter()
            self._distill("hybrid", "hybrid", self.s.hybrid_tokens, callback=watch, attn_layers=attn_layers)
            hybrid_seconds = time.perf_counter() - h0
            if tail_seconds is None:
                child_finished()
        finally:
            torch.set_num_threads(threads)
            if child.poll() is None:
                child.terminate()  # its checkpoints stay: a re-run continues them
                child.wait()
        self.examples.clear()
        self.log(f"  llamba: stages {', '.join(later)} took {tail_seconds:.0f} s beside the hybrid; "
                 f"log in {self.out / 'work' / 'llamba' / 'train_log.jsonl'}")
        self._finish_step("hybrid", hybrid_seconds)

    def step_hybrid(self) -> None:
        self._distill("hybrid", "hybrid", self.s.hybrid_tokens)
        self.examples.clear()  # the last run on them

    def _sample(self, outs: dict[str, Path], spec: str, n: int) -> None:
        """Sample every model in `outs` (name -> samples file) on `spec`, the models taking turns (so that a drift
        in the machine's speed reaches each of them alike, not the one that happens to run last)."""
        from .engine.run import sample_interleaved

        common = self.s.sampling_arguments(spec, n)
        jobs = [dict(model_spec=str(self.model_dir(name)), out=out, name=name) for name, out in outs.items()]
        for name, summary in zip(outs, sample_interleaved(jobs, common, progress=self.progress)):
            if summary.stats is not None:
                st = summary.stats
                self.log(f"  {name}: {summary.written} samples, {st.gen_tokens:,} tokens, {st.tokens_per_second:,.0f} tok/s")

    def step_sample(self) -> None:
        self._sample({name: self.samples_path(name) for name in MODELS}, self.dataset_spec, self.s.n)

    def step_reward(self) -> None:
        from .eval.reward import ORMConfig
        from .eval.scoring import score_files, train_reward_model

        rm_samples = [self.out / "work" / "rm-samples" / f"{name}.jsonl" for name in MODELS]
        self._sample(dict(zip(MODELS, rm_samples)), self.rm_spec, self.s.rm_samples)
        from .eval.samples import read_samples

        labels = {s.correct for s in read_samples(rm_samples).samples if s.correct is not None}
        if labels != {True, False}:
            # a verifier needs right and wrong completions; without one, BoN is left out of the report
            self.state["reward_note"] = (f"no reward model: the {len(rm_samples)} training-split sample files hold only "
                                         f"{'correct' if labels == {True} else 'wrong'} completions; Best-of-N is not reported")
            self.log(f"  {self.state['reward_note']}")
            return
        rm_dir = self.out / "reward_model"
        if not (rm_dir / "reward_config.json").is_file():
            train_reward_model(rm_samples, str(self.model_dir("teacher")), rm_dir, data=self.rm_spec,
                               orm=ORMConfig(max_len=self.s.rm_max_len, question_tokens=96), log=self._indent)
        score_files([self.samples_path(m) for m in MODELS], reward_model=rm_dir, data=self.dataset_spec, log=self._indent)

    def _indent(self, msg: str) -> None:
        self.log(f"  {msg}")

    def step_report(self) -> None:
        from .eval.report import build_report

        paths = [self.samples_path(m) for m in MODELS]
        title = "thinkfast demo: embedded teacher vs its Llamba and hybrid students"
        # the demo holds DIR.lock already (`run`): the report's own lock there would refuse this very process
        metrics = build_report(paths, self.out, dataset=self.dataset_spec, wall_seconds=None, plots=False, lock=False)
        wall = self.state["wall_seconds"]
        claims = check_claims(metrics, paths) + [wall_claim(wall, self.s.wall_target_seconds)]
        notes = summary_notes(metrics, claims, wall)
        held_out = self.held_out_losses()
        if held_out:
            notes.append(held_out_note(held_out))
        if self.state.get("reward_note"):
            notes.append(self.state["reward_note"] + ".")
        envs = {**self.state.get("environment", {}), "report": environment()}
        mixed = mixed_environment_note(envs)
        if mixed:
            notes.append(mixed)
        metrics = build_report(paths, self.out, dataset=self.dataset_spec, wall_seconds=wall, summary_notes=notes, title=title,
                               group_by="terms", lock=False)
        metrics["claims"] = claims
        metrics["demo"] = {"settings": dataclasses.asdict(self.s), "step_seconds": self.state["step_seconds"], "environment": envs,
                           "models": {m: str(self.model_dir(m)) for m in MODELS}, "held_out_loss": held_out}
        atomic_write_json(self.out / "metrics.json", metrics)
        for line in notes:
            self.log(f"  {line}")

    def held_out_losses(self) -> dict:
        """Each student's loss on the held-out worked solutions at the end of each of its stages (from its
        train_log.jsonl; each stage's own loss: matrix/hidden alignment, KL, or CE), and the teacher's CE on the same
        rows, which the students' SFT CE compares with. Empty for runs from before the stages logged it."""
        students = {}
        for name in ("llamba", "hybrid"):
            log_path = self.out / "work" / name / "train_log.jsonl"
            if log_path.is_file():
                rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
                losses = {r["stage"]: r["eval_loss"] for r in rows if "eval_loss" in r}  # the last per stage
                if losses:
                    students[name] = losses
        if not students:
            return {}
        return {"rows": self.eval_rows, "spec": sums_spec(self.eval_rows * 4, EVAL_SEED),
                "selection": f"the first {self.eval_rows} whose question no model of the run trained on",
                "teacher_sft": self.teacher_held_out_ce(), **students}

    def teacher_held_out_ce(self) -> float:
        from .data.packing import build_data
        from .distill.stages import SFTTask
        from .distill.trainer import evaluate, held_out_batch

        rows = build_data(self.eval_data(), self.tokenizer(), self.s.seq_len, warn_cut=False)
        batch = held_out_batch(rows, self.eval_rows)
        return evaluate(SFTTask(self.teacher_model().eval()), batch, 8, "cpu")["eval_loss"]


def llamba_tail_main(argv: list[str] | None = None) -> int:
    """A second process's entry (`Demo._hybrid_beside_llamba`): argv [out, threads]. Trains the Llamba's stages
    after `hidden` from their checkpoints, with the settings recorded in `out/demo.json`. Prints nothing on
    success; on failure one JSON line {"error": class name, "message": one line} on stdout, exit code 1."""
    import logging
    import sys

    from .commands.demo import _quiet_hf
    from .errors import ThinkfastError, command_line

    out, threads, *first = argv if argv is not None else sys.argv[1:]
    parent = int(first[0]) if first else os.getppid()  # the first process's pid, as it started this one
    if first and not die_with_parent(parent):
        return 130  # the first process was killed while this one started: nothing to do
    report, sys.stdout = sys.stdout, sys.stderr  # stdout carries the one result line; nothing else may fill its pipe
    torch.set_num_threads(int(threads))
    _quiet_hf()  # as the CLI does: no weight-loading bars or warnings
    logging.getLogger("thinkfast").setLevel(logging.ERROR)  # the first process printed these warnings already

    def fail(error: str, message: str) -> int:
        print(json.dumps({"error": error, "message": message}), file=report, flush=True)
        return 1

    try:
        state_path = Path(out) / "demo.json"
        try:
            settings = DemoSettings(**json.loads(state_path.read_text())["settings"])
        except (OSError, ValueError, KeyError, TypeError):
            return fail("CheckpointError", f"{state_path} is damaged; choose a new --out")
        with command_line():  # its messages reach the user of `thinkfast demo`
            Demo(out, settings, progress=False, log=lambda msg: None)._distill(
                "llamba", "llamba", settings.llamba_tokens, callback=stop_when_orphaned(parent))
    except KeyboardInterrupt:
        return 130  # stopped by stop_when_orphaned: the first process is gone
    except ThinkfastError as e:
        return fail(type(e).__name__, str(e))
    except Exception as e:  # noqa: BLE001 - carried to the first process, which prints it in one line
        return fail("ThinkfastError", f"the Llamba's last stages failed: {type(e).__name__}: {e}")
    finally:
        sys.stdout = report
    return 0


def die_with_parent(parent: int) -> bool:
    """Linux: the kernel ends this process (SIGTERM) as soon as the first one dies, killed outright or not (a
    check per training step came up to ~13 s late). False when `parent` is already gone."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass  # no prctl: the per-step check below still stops it
    return os.getppid() == parent


def stop_when_orphaned(parent: int):
    """A training callback that stops the second process once the first one is gone (killed outright, it could
    not stop it), so that a re-run never has two processes writing the same checkpoints."""
    def check(step: int, record: dict) -> None:
        if os.getppid() != parent:
            raise KeyboardInterrupt
    return check


def _child_error(class_name: str, message: str) -> Exception:
    """The error the second process reported, as the same thinkfast error class (ThinkfastError for any other name)."""
    from . import errors

    cls = getattr(errors, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, errors.ThinkfastError)):
        cls = errors.ThinkfastError
    return cls(message)


def held_out_note(held: dict) -> str:
    parts = [f"{name} " + ", ".join(f"{stage} {loss:.4g}" for stage, loss in held[name].items())
             for name in ("llamba", "hybrid") if name in held]
    return (f"Held-out loss at the end of each stage ({held['rows']} worked solutions no model of the run trained on; each stage's "
            f"own loss): {'; '.join(parts)}. The teacher's CE on the same solutions: {held['teacher_sft']:.4g} "
            "(to compare with the students' sft CE).")


STEP_TITLES = {
    "data": "held-out and training splits (reasoning-gym sums, overlap with training dropped)",
    "teacher": "the embedded teacher (a small Llama trained on worked solutions)",
    "llamba": "Llamba student: MOHAWK stages 1-3 (matrix, hidden, forward KL), then SFT",
    "hybrid": "hybrid student (attention kept in a quarter of the layers, where Mamba imitated it worst): "
              "hidden-state alignment to the teacher, then SFT",
    "sample": "sampling every model on the held-out problems in the same engine, the models taking turns, grading as it goes",
    "reward": "outcome reward model: sample a training split, train the verifier, score every sample",
    "report": "metrics, plots and report",
}


# ---------------------------------------------------------------------- the claims, checked on the measurements


def _curves_at(by_model: dict, model: str, k: int) -> dict:
    """pass@k and maj@k of `model` at any k (not only powers of two): dataset means ("pass", "maj") and the
    per-problem values ("per_problem": {problem id: (pass, maj)}) the paired intervals resample.
    by_model: `read_samples(paths).by_model()`."""
    from .eval.metrics import dataset_curves
    from .eval.report import _problem_samples

    problems = {pid: _problem_samples(samples, model) for pid, samples in by_model[model].items()}
    curves = dataset_curves(problems, [k], n_boot=10)
    per = zip(curves["pass_at_k"]["per_problem"][:, 0], curves["maj_at_k"]["per_problem"][:, 0])
    return {"pass": float(curves["pass_at_k"]["mean"][0]), "maj": float(curves["maj_at_k"]["mean"][0]),
            "per_problem": dict(zip(problems, per))}


CLAIM_CI_LEVEL = 0.95
CLAIM_BOOTSTRAP = 2000


def paired_margin(student: dict, teacher: dict, metric: int, scale: float = 1.0) -> dict:
    """How far a student's per-problem value (index `metric` of its (pass, maj) pair) lies above `scale` x the
    teacher's, on the problems both have: the mean margin and its percentile bootstrap interval, problems
    resampled in pairs, so a claim decided by a handful of problems says so."""
    from .eval.metrics import bootstrap_ci

    common = [p for p in student if p in teacher]
    diff = np.array([student[p][metric] - scale * teacher[p][metric] for p in common])
    lo, hi = bootstrap_ci(diff, CLAIM_BOOTSTRAP, seed=0, level=CLAIM_CI_LEVEL)
    return {"margin": float(diff.mean()), "margin_ci": [float(lo), float(hi)], "problems": len(common)}


def check_claims(metrics: dict, paths) -> list[dict]:
    """The demo issue's targets, each with what was measured and whether it held."""
    models = metrics["models"]
    t = models.get("teacher")
    if t is None:
        return []
    n = max(int(k) for k in t["pass_at_k"])
    p1 = t["pass_at_k"]["1"]
    from .eval.samples import read_samples

    by_model = read_samples(paths).by_model()  # read once: every claim below resamples the same files
    teacher_at_1 = _curves_at(by_model, "teacher", 1)["per_problem"]
    claims = [
        {"claim": "teacher pass@1 between 0.3 and 0.85", "measured": p1, "held": 0.3 <= p1 <= 0.85},
        {"claim": f"teacher pass@{n} >= pass@1 + 0.15", "measured": t["pass_at_k"][str(n)],
         "held": t["pass_at_k"][str(n)] >= p1 + 0.15},
    ]
    for name, ratio in (("llamba", 0.8), ("hybrid", 0.9)):
        if name in models:
            m1 = models[name]["pass_at_k"]["1"]
            margin = paired_margin(_curves_at(by_model, name, 1)["per_problem"], teacher_at_1, 0, ratio)
            claims.append({"claim": f"{name} pass@1 >= {ratio} x teacher's", "measured": m1,
                           "target": ratio * p1, "held": m1 >= ratio * p1, **margin})
    for name in ("llamba", "hybrid"):
        if name in models:
            r = models[name]["seconds_per_sample"] / t["seconds_per_sample"]
            claims.append({"claim": f"{name} seconds per sample <= 0.7 x teacher's", "measured": r, "held": r <= 0.7})
    k_teacher = min(8, n)
    budget = k_teacher * t["seconds_per_sample"]
    teacher_at = _curves_at(by_model, "teacher", k_teacher)
    best = None
    for name in ("llamba", "hybrid"):
        if name not in models:
            continue
        k = max(1, min(n, int(budget // models[name]["seconds_per_sample"])))
        at = _curves_at(by_model, name, k)
        if best is None or (at["pass"], at["maj"]) > (best[2]["pass"], best[2]["maj"]):
            best = (name, k, at)
    if best is not None:
        name, k, at = best
        claims.append({"claim": f"at the teacher's time for {k_teacher} samples ({budget:.2f} s/problem), the best student "
                                f"({name}, {k} samples) covers >= teacher pass@{k_teacher}",
                       "measured": at["pass"], "target": teacher_at["pass"], "held": at["pass"] >= teacher_at["pass"],
                       **paired_margin(at["per_problem"], teacher_at["per_problem"], 0)})
        claims.append({"claim": f"... and its majority vote >= teacher maj@{k_teacher}",
                       "measured": at["maj"], "target": teacher_at["maj"], "held": at["maj"] >= teacher_at["maj"],
                       **paired_margin(at["per_problem"], teacher_at["per_problem"], 1)})
    return claims


def wall_claim(wall: float, target: float) -> dict:
    """The wall-time target, in minutes: the seconds the demo's steps took, summed over resumed runs."""
    return {"claim": f"whole demo within {target / 60:g} minutes wall", "measured": wall / 60,
            "target": target / 60, "held": wall <= target}


def summary_notes(metrics: dict, claims: list[dict], wall: float) -> list[str]:
    models = metrics["models"]
    lines = []
    if "teacher" in models:
        t = models["teacher"]
        for name in ("llamba", "hybrid"):
            if name in models:
                m = models[name]
                lines.append(
                    f"{name}: pass@1 {m['pass_at_k']['1']:.3f} vs the teacher's {t['pass_at_k']['1']:.3f} "
                    f"({m['pass_at_k']['1'] / max(t['pass_at_k']['1'], 1e-9):.2f}x), at "
                    f"{m['seconds_per_sample'] / t['seconds_per_sample']:.2f}x the teacher's seconds per sample."
                )
    scored = [name for name in MODELS if models.get(name, {}).get("bon_at_k")]
    if scored:  # how much the verifier adds over voting, at the k of the fixed-time claims
        ks = models[scored[0]]["bon_at_k"]
        k = "8" if "8" in ks else max(ks, key=int)
        lines.append(f"Best-of-{k} with the reward model (weighted; majority vote): " + "; ".join(
            f"{name} {models[name]['bon_at_k'][k]:.3f} ({models[name]['weighted_bon_at_k'][k]:.3f}; "
            f"{models[name]['maj_at_k'][k]:.3f})" for name in scored) + ".")
    held = [c for c in claims if c["held"]]
    lines.append(f"{len(held)} of {len(claims)} targets held (whole demo: {wall / 60:.1f} minutes wall).")
    for c in claims:
        target = f" (target {c['target']:.3f})" if "target" in c else ""
        if "margin_ci" in c:
            lo, hi = c["margin_ci"]
            side = ("above the target" if lo > 0 else "below the target" if hi < 0
                    else f"the interval spans zero: {c['problems']} problems cannot settle it")
            target = (f" (target {c['target']:.3f}; margin {_signed(c['margin'])}, {CLAIM_CI_LEVEL:.0%} paired bootstrap "
                      f"interval over {c['problems']} problems [{_signed(lo)}, {_signed(hi)}]: {side})")
        lines.append(f"{'held' if c['held'] else 'DID NOT HOLD'}: {c['claim']}: measured {c['measured']:.3f}{target}.")
    return lines


def environment() -> dict:
    """What a step's numbers depend on besides the settings: the libraries, and the CPU's kernels (the order fp32
    sums run in: runs repeat exactly only where all of these are the same)."""
    import transformers

    from . import __version__
    from .engine.run import hardware_string

    return {"thinkfast": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "cpu": hardware_string("cpu", threads=False)}


def mixed_environment_note(envs: dict[str, dict]) -> str | None:
    """A report line when a resumed run's steps ran under different libraries or CPUs; None when they all agree."""
    groups: dict[str, tuple[dict, list[str]]] = {}  # one entry per distinct environment, with its steps
    for step, env in envs.items():
        groups.setdefault(json.dumps(env, sort_keys=True), (env, []))[1].append(step)
    if len(groups) < 2:
        return None
    names = {k for env in envs.values() for k in env}
    differing = sorted(k for k in names if len({str(env.get(k)) for env in envs.values()}) > 1)
    parts = [", ".join(steps) + ": " + ", ".join(f"{k} {env.get(k)}" for k in differing) for env, steps in groups.values()]
    return ("The steps of this run ran under different environments (" + "; ".join(parts) + "): a resumed run mixes "
            "them, so its numbers need not repeat on either.")


def _signed(x: float) -> str:
    """+0.012; a bound that 3 decimals would show as -0.000 keeps its sign readable (-2.2e-04): which side of
    zero it lies on is what settles a claim."""
    return f"{x:+.3f}" if x == 0 or abs(x) >= 5e-4 else f"{x:+.1e}"


def run_demo(out, quick: bool = False, progress: bool = True, log=print, overlap: str = "auto", **overrides) -> dict:
    settings = DemoSettings.quick_settings() if quick else DemoSettings()
    for k, v in overrides.items():
        if v is not None:
            if not hasattr(settings, k):
                raise ConfigError(f"demo: unknown setting {k}")
            setattr(settings, k, v)
    return Demo(out, settings, progress, log, overlap=overlap).run()
