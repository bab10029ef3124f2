"""The batched sampling engine: one engine for the teacher (all attention), hybrids and pure Mamba students.

    engine = Engine(model, tokenizer, batch_size=64)
    for c in engine.generate([(pid, prompt_ids), ...], n=32, params=SamplingParams(temperature=0.8), seed=0):
        c.problem_id, c.sample_idx, c.text, c.finish_reason, c.gen_tokens, c.seconds

How it works:
  - static per-slot state (KV cache for attention layers, conv + SSM state for Mamba layers), allocated once
    for `batch_size` slots; the decode loop allocates no state;
  - each prompt is prefilled once and its state forked into the slots of its N samples; prompts run shortest
    first, and neighbours in that queue share a left-padded prefill batch (`_Run._prefill_for`);
  - continuous batching: a finished sample's slot takes the next pending (problem, sample) at once; when
    nothing is pending, live samples are packed into the leading rows so the step runs on live rows only;
  - the step (`decode.DecodeStep`) attends over the positions in use only, in blocks of rows kept ordered by
    context (a finished sample's row is refilled at the end of the order; see `_Run._sink_holes`); compiled, it fuses the SSM update
    (GPU) or the whole step (CPU, `decode.CompiledStep`); on GPU it is replayed from CUDA graphs;
  - time accounting: every interval of the engine's wall time is charged to the samples it served (a decode
    step split evenly among the rows it stepped, a prefill among the prompt's forks), so the samples' seconds
    add up to the engine's wall time. This is the report's time axis.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch

from ..errors import ConfigError, ThinkfastError, option
from ..models.model import ModelState, ThinkfastLM
from ..models.teacher import LLAMA_TYPES
from ..utils import whole_number
from .decode import (CompiledStep, CudaGraphStep, DecodeStep, compile_ssm_update, engine_state, ssm_update_,
                     ssm_update_functional)
from .sampling import NOT_FINITE, SamplingParams, sample_seed, sample_tokens, sample_uniforms

log = logging.getLogger(__name__)

# rows per attention block in the eager step (benchmarks/demo_rowgroup.md: at batch 256 and the demo's context
# spread, one attention layer takes 2.7-4.9 ms in ordered blocks of 32 against 7.0-11.0 ms over the longest row;
# blocks of 16 pay more per call, 64 read more)
ROW_GROUP = 32

# end-of-turn markers of common chat templates: generation stops at these as at EOS
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end_of_turn|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")


@dataclass
class Completion:
    problem_id: str
    sample_idx: int
    seed: int
    tokens: list[int]  # generated ids, the stop token included when one ended it
    text: str | None  # decoded completion without the stop token / stop string; None without a tokenizer
    finish_reason: str  # eos | stop | length
    prompt_tokens: int
    seconds: float  # this sample's share of the engine's wall time

    @property
    def gen_tokens(self) -> int:
        return len(self.tokens)


@dataclass
class EngineStats:
    wall_seconds: float = 0.0  # engine time (clock paused while the caller holds a yielded batch)
    prefill_seconds: float = 0.0
    prompts: int = 0
    prefill_batches: int = 0
    samples: int = 0
    gen_tokens: int = 0
    steps: int = 0

    @property
    def tokens_per_second(self) -> float:
        return self.gen_tokens / self.wall_seconds if self.wall_seconds > 0 else 0.0


@dataclass
class _Request:
    problem_id: str
    prompt: list[int]
    todo: list[int]  # sample indices to generate
    queue: deque | None = None  # those not yet placed in a slot


@dataclass
class _Prefill:
    state: ModelState  # the prefilled group's state: row `row` is this prompt, left-padded by `pad` positions
    row: int
    pad: int
    logits: torch.Tensor  # (V,) next-token logits after the prompt
    share: float  # prefill seconds charged to each fork
    left: int  # forks not yet placed


class _Slot:
    __slots__ = ("req", "sample_idx", "seed", "tokens", "seconds", "limit")

    def __init__(self, req: _Request, sample_idx: int, seed: int, limit: int, seconds: float):
        self.req, self.sample_idx, self.seed, self.limit, self.seconds = req, sample_idx, seed, limit, seconds
        self.tokens: list[int] = []


def as_lm(model) -> ThinkfastLM:
    """ThinkfastLM from a ThinkfastLM, a ThinkfastForCausalLM, or an HF Llama-family model (converted,
    kind="teacher")."""
    if isinstance(model, ThinkfastLM):
        return model
    lm = getattr(model, "lm", None)
    if isinstance(lm, ThinkfastLM):
        return lm
    if getattr(getattr(model, "config", None), "model_type", None) in LLAMA_TYPES:
        from ..models.transfer import from_teacher

        return from_teacher(model, kind="teacher", share_weights=True).lm
    raise ConfigError(f"the engine runs thinkfast models or HF Llama-family models, not {type(model).__name__}")


def model_role(lm: ThinkfastLM) -> str:
    n_attn = len(lm.cfg.attn_layers)
    return "teacher" if n_attn == lm.cfg.n_layers else "llamba" if n_attn == 0 else "hybrid"


def stop_token_ids(tokenizer, model=None) -> set[int]:
    """EOS of the tokenizer and of the model config, plus the chat template's end-of-turn token."""
    ids: set[int] = set()

    def add(x):
        if isinstance(x, int):
            ids.add(x)
        elif isinstance(x, (list, tuple)):
            ids.update(i for i in x if isinstance(i, int))

    if tokenizer is not None:
        add(getattr(tokenizer, "eos_token_id", None))
        if getattr(tokenizer, "chat_template", None):
            vocab = tokenizer.get_vocab()
            for tok in END_OF_TURN_TOKENS:
                if tok in vocab and tok in (tokenizer.chat_template or ""):
                    ids.add(vocab[tok])
    for cfg in (getattr(model, "config", None), getattr(model, "generation_config", None)):
        if cfg is not None:
            add(getattr(cfg, "eos_token_id", None))
    return ids


SSM_STATE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def special_token_ids(tokenizer, texts) -> set[int]:
    """The ids of the stop strings that are a special token's text (`<|im_end|>`, `</s>`): the text is decoded
    without special tokens, where such a string never shows (lm-eval's `until` lists hold them)."""
    if tokenizer is None or not texts:
        return set()
    special = set(getattr(tokenizer, "all_special_tokens", None) or [])
    special |= {str(t) for t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values()
                if getattr(t, "special", False)}
    ids = set()
    for text in texts:
        if text in special:
            found = tokenizer.convert_tokens_to_ids(text)
            if isinstance(found, int) and found >= 0:
                ids.add(found)
    return ids


def parse_ssm_state_dtype(value: str | torch.dtype | None) -> torch.dtype:
    """None -> fp32; a name in SSM_STATE_DTYPES (or bf16 / fp16 / fp32) or one of their torch dtypes."""
    if value is None:
        return torch.float32
    aliases = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
    dtype = value if isinstance(value, torch.dtype) else SSM_STATE_DTYPES.get(aliases.get(value, value))
    if dtype not in SSM_STATE_DTYPES.values():
        raise ConfigError(f"SSM state dtype {value!r}: use one of {', '.join(SSM_STATE_DTYPES)}")
    return dtype


def slot_bytes(cfg, max_len: int, dtype: torch.dtype, ssm_dtype: torch.dtype = torch.float32) -> int:
    """Decode-state bytes of one slot: KV cache for attention layers, conv + SSM state for Mamba layers."""
    es = torch.empty((), dtype=dtype).element_size()
    ssm_es = torch.empty((), dtype=ssm_dtype).element_size()
    total = 0
    for i in range(cfg.n_layers):
        if cfg.is_attention(i):
            total += 2 * cfg.n_kv_heads * max_len * cfg.hd * es
        else:
            total += cfg.ssm_conv_dim * (cfg.d_conv - 1) * es + cfg.n_ssm_heads * cfg.ssm_hd * cfg.n_state * ssm_es
    return total


def available_memory(device: torch.device) -> int | None:
    if device.type == "cuda":  # what the driver has free, plus what PyTorch holds cached but unused
        return torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return system_memory("available")  # None: the state is allocated without this check


def system_memory(which: str = "available") -> int | None:
    """The machine's "total" or "available" memory in bytes: /proc/meminfo, else (macOS) psutil, which comes with
    accelerate and asks the kernel (free + inactive pages there); None where neither answers."""
    key = {"total": "MemTotal:", "available": "MemAvailable:"}[which]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil

        return int(getattr(psutil.virtual_memory(), which))
    except Exception:  # noqa: BLE001  no psutil or no answer
        return None


def _gib(b: float) -> str:
    return f"{b / 2**30:.2f} GiB"


class DecodeStateTooLarge(ThinkfastError):
    """The decode state does not fit: `problem`, then `advice` in sample's terms; `fit` is a batch size that would
    (callers with other settings, such as bench's --configs, word their own advice from it)."""

    def __init__(self, problem: str, advice: str, fit: int):
        super().__init__(f"{problem}; {advice}")
        self.problem, self.fit = problem, fit


class Engine:
    """Batched sampler over static per-slot state. See the module docstring.

    model: ThinkfastLM, ThinkfastForCausalLM or an HF Llama model. tokenizer: an HF tokenizer (for texts,
    EOS and stop strings), or None for token ids only. max_len: positions per slot (prompt + generation);
    None sizes the state at the first `generate` call. device/dtype: where and in what precision to run; the
    model is moved/cast in place when they differ from its own. compile: torch.compile the SSM update (GPU: a
    fused single pass) or the whole decode step (CPU: tens of seconds to compile, ~1.2-1.5x faster steps after),
    when the state is allocated, outside every sample's clock; "auto" = on GPU only. cuda_graphs: replay decode
    steps from CUDA graphs ("auto" = on GPU). row_group: rows per attention block in an eager step, the rows kept
    ordered by context so that each block reads only as many positions as its longest row (None: every row attends
    over the batch's longest context). ssm_state_dtype: the Mamba layers' SSM state (default fp32; bf16 or fp16
    halve what each step reads and writes there, the update itself still in fp32, rounded once per step).
    """

    def __init__(self, model, tokenizer=None, max_len: int | None = None, batch_size: int = 64, device=None, dtype=None,
                 stop_ids: Iterable[int] | None = None, compile="auto", cuda_graphs="auto", memory_fraction: float = 0.9,
                 row_group: int | None = ROW_GROUP, ssm_state_dtype: str | torch.dtype | None = None):
        if not whole_number(batch_size) or batch_size < 1:
            raise ConfigError(f"batch size {batch_size!r}: use a whole number, at least 1")
        self.ssm_dtype = parse_ssm_state_dtype(ssm_state_dtype)
        self.model = model
        self.lm = as_lm(model)
        p = self.lm.embed.weight
        self.device = torch.device(device) if device is not None else p.device
        self.dtype = dtype if dtype is not None else p.dtype
        if p.device != self.device or p.dtype != self.dtype:
            self.lm.to(device=self.device, dtype=self.dtype)
        self.lm.eval()
        self.cfg = self.lm.cfg
        self.role = model_role(self.lm)
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.memory_fraction = memory_fraction
        self.limit = int(self.cfg.max_position_embeddings)
        self.stop_ids = set(stop_ids) if stop_ids is not None else stop_token_ids(tokenizer, model)
        self._stop_token_ids: set[int] = set()  # a run's stop strings that are special tokens (generate_batches)
        on_gpu = self.device.type == "cuda"
        # padded prompt tokens prefilled in one batch: bounds the prefill's transient memory; on a CPU, batches
        # past ~2k tokens ran slower per token (benchmarks/mixed_prefill.md)
        self.prefill_tokens = 4096 if on_gpu else 1024
        self.use_compile = on_gpu if compile == "auto" else bool(compile)
        self.use_graphs = on_gpu if cuda_graphs == "auto" else bool(cuda_graphs) and on_gpu
        if row_group is not None and row_group < 1:
            raise ConfigError(f"row_group {row_group}: use at least 1, or None to attend over all rows at once")
        self.row_group_request = row_group
        self.row_group: int | None = None  # set with the step: only an eager step with attention uses blocks
        self.state: ModelState | None = None
        self.max_len = 0
        self.stats = EngineStats()
        if max_len is not None:
            self._allocate(max_len)

    # ------------------------------------------------------------------ state

    def _allocate(self, max_len: int) -> None:
        if max_len < 2:
            raise ConfigError(f"max_len {max_len}: need room for a prompt and at least one generated token")
        max_len = min(int(max_len), self.limit)
        per_slot = slot_bytes(self.cfg, max_len, self.dtype, self.ssm_dtype)
        need = per_slot * self.batch_size
        old = self.state.nbytes() if self.state is not None else 0
        # the old state and its step are given back before measuring: CUDA graphs hold memory pools of their own,
        # freed only with the step, which a free-memory figure taken before would count as taken
        self.state = None
        self._step = None
        free = available_memory(self.device)
        if free is not None and self.device.type != "cuda":
            free += old  # memory freed on a CPU need not show as available at once
        if free is not None and need > self.memory_fraction * free:
            fit = max(1, int(self.memory_fraction * free // max(per_slot, 1)))
            raise DecodeStateTooLarge(
                f"batch size {self.batch_size} needs {_gib(need)} of decode state ({per_slot / 2**20:.1f} MiB per slot at "
                f"{max_len} positions) but only {_gib(free)} is free on {self.device}",
                f"use {option('--batch-size ', 'batch_size=')}{fit} or fewer {option('--max-new-tokens', 'max_new_tokens')}",
                fit)
        try:
            self.state = engine_state(self.lm, self.batch_size, max_len, self.device, self.dtype, self.ssm_dtype)
        except (torch.OutOfMemoryError, RuntimeError) as e:
            if "memory" not in str(e).lower():
                raise
            self.state = None
            fit = max(1, self.batch_size // 2)
            raise DecodeStateTooLarge(
                f"batch size {self.batch_size} does not fit in memory on {self.device} ({_gib(need)} of decode state)",
                f"try {option('--batch-size ', 'batch_size=')}{fit}", fit) from None
        self.max_len = max_len
        B, dev = self.batch_size, self.device
        self.tok = torch.zeros(B, dtype=torch.long, device=dev)  # next token to feed, per row
        self.pos = torch.zeros(B, dtype=torch.long, device=dev)  # its position
        self.logits = torch.zeros(B, self.cfg.vocab_size, dtype=torch.float32, device=dev)
        group = self.row_group_request if self.cfg.attn_layers else None
        if self.use_compile and self.device.type == "cpu":
            step = CompiledStep(DecodeStep(self.lm, self.state, ssm_update_functional))
        else:
            step = DecodeStep(self.lm, self.state, compile_ssm_update() if self.use_compile else None, row_group=group)
        if self.use_graphs:
            try:
                graphs = CudaGraphStep(step, B)
                graphs.capture_all()
                step = graphs
            except Exception as e:  # keep sampling, without graphs
                log.warning("CUDA graph capture failed (%s); decoding without graphs", e)
                self.use_graphs = False
                step.row_group = group
        self._step = step
        self.row_group = step.row_group if isinstance(step, DecodeStep) else None
        if self.use_compile and not self.use_graphs:
            self._compile_now()

    def _compile_now(self) -> None:
        """Compile the step here, before any sample's clock runs, as CUDA graphs are captured here: compiling is a
        one-time cost of the engine, not of the samples whose first step would pay it. One step over two blank
        rows at context 2 (not 1, which torch.compile would specialise), then the state is cleared."""
        n = min(2, self.batch_size)
        try:
            with torch.inference_mode():  # the mode the sampling loop runs in: the compiled graph guards on it
                self._step(self.tok[:n], self.pos[:n], 2)
        except Exception as e:  # torch.compile is lazy: a broken toolchain shows here, not where it was asked for
            if not isinstance(self._step, DecodeStep) or self._step.ssm_update is ssm_update_:
                raise
            log.warning("the compiled SSM update failed (%s); using the eager one", str(e).splitlines()[0][:200])
            self._step.ssm_update = ssm_update_
            self.use_compile = False
        for cache in self.state.caches:
            for t in vars(cache).values():
                t.zero_()

    def ensure_capacity(self, max_len: int) -> None:
        """Size the state for `max_len` positions (reallocated only when it must grow)."""
        if self.state is None or min(max_len, self.limit) > self.max_len:
            self._allocate(max_len)

    # ------------------------------------------------------------------ pieces of the loop

    def _prefill(self, prompts: list[list[int]]) -> tuple[ModelState, torch.Tensor]:
        """Prefill prompts together, shorter ones left-padded to the longest: (state with a row per prompt,
        (G, V) next-token logits). Pads are masked: attention never reads them, Mamba layers skip them (no
        input, no decay), and positions count from each prompt's first token; a row's KV entries sit after
        its pads, which `copy_rows_(offset=pad)` skips."""
        G, T = len(prompts), max(len(p) for p in prompts)
        pre = self.lm.allocate_state(G, T, self.device, self.dtype)
        x = torch.zeros(G, T, dtype=torch.long)
        mask = torch.zeros(G, T, dtype=torch.long)
        for g, p in enumerate(prompts):
            x[g, T - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[g, T - len(p):] = 1
        padded = bool((mask == 0).any())
        out = self.lm(x.to(self.device), attention_mask=mask.to(self.device) if padded else None, state=pre,
                      compute_logits=False)
        return pre, self.lm.logits(out.last_hidden[:, -1]).float()

    def _text(self, tokens: list[int], finish: str) -> str | None:
        if self.tokenizer is None:
            return None
        body = tokens[:-1] if finish == "eos" else tokens
        return self.tokenizer.decode(body, skip_special_tokens=True)

    def _check(self, slot: _Slot, tok: int, params: SamplingParams) -> str | None:
        """Append `tok` to the slot; the finish reason if that ended the sample."""
        if tok == NOT_FINITE:
            raise ThinkfastError(
                f"the model's logits hold NaN or inf (problem {slot.req.problem_id}, sample {slot.sample_idx}, after "
                f"{len(slot.tokens)} generated tokens): it overflows in {str(self.dtype).removeprefix('torch.')}; "
                f"sample in float32 ({option('--dtype float32', 'dtype=torch.float32')}) or check the checkpoint's weights")
        slot.tokens.append(tok)
        if tok in self.stop_ids and not params.ignore_eos:
            return "eos"
        if tok in self._stop_token_ids:  # a stop string that is one special token, which decoding leaves out
            return "stop"
        if params.stop and self.tokenizer is not None:
            tail = self.tokenizer.decode(slot.tokens[-self._stop_window:], skip_special_tokens=True)
            if any(s in tail for s in params.stop):
                return "stop"
        if len(slot.tokens) >= slot.limit:
            return "length"
        return None

    def _finish(self, slot: _Slot, reason: str, params: SamplingParams) -> Completion:
        text = self._text(slot.tokens, reason)
        if reason == "stop" and text is not None:
            cut = min((i for i in (text.find(s) for s in params.stop) if i >= 0), default=len(text))
            text = text[:cut]
        self.stats.samples += 1
        return Completion(slot.req.problem_id, slot.sample_idx, slot.seed, slot.tokens, text, reason, len(slot.req.prompt), slot.seconds)

    # ------------------------------------------------------------------ the loop

    def generate(self, prompts, n: int = 1, params: SamplingParams | None = None, seed: int = 0,
                 only: dict[str, Iterable[int]] | None = None, progress: Callable[[EngineStats], None] | None = None) -> Iterator[Completion]:
        """Yield finished samples, in the order they finish. See `generate_batches`."""
        for batch in self.generate_batches(prompts, n, params, seed, only, progress):
            yield from batch

    def check_prompt(self, pid, ids) -> list[int]:
        """A prompt's token ids as ints, refused in one line when the model cannot take them."""
        try:
            ids = [int(t) for t in ids]
        except (TypeError, ValueError):
            raise ConfigError(f"problem {pid}: the prompt is not a list of token ids") from None
        if not ids:
            raise ConfigError(f"problem {pid}: empty prompt; it needs at least one token (e.g. BOS)")
        if len(ids) >= self.limit:
            raise ConfigError(
                f"problem {pid}: prompt has {len(ids)} tokens but the model's limit is {self.limit} positions; "
                "shorten it (fewer few-shot examples, a shorter system prompt) or use a longer-context model"
            )
        bad = [t for t in ids if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise ConfigError(f"problem {pid}: token id {bad[0]} is outside the model's vocabulary of {self.cfg.vocab_size}; tokenizer and model do not match")
        return ids

    def generate_batches(self, prompts, n: int = 1, params: SamplingParams | None = None, seed: int = 0,
                         only: dict[str, Iterable[int]] | None = None,
                         progress: Callable[[EngineStats], None] | None = None,
                         yield_every: float | None = None) -> Iterator[list[Completion]]:
        """Sample `n` completions for each (problem_id, prompt_ids); yield them in batches as they finish.

        only: problem_id -> the sample indices to generate (resume); default all of range(n).
        Sample i of problem p uses the seed `sample_seed(seed, p, i)`: the same sample whatever the batch.
        The engine's clock stops while the caller holds a batch, so grading and writing are not charged.
        yield_every: also yield (an empty list) after this many engine seconds without a yield, so that a caller
        can take turns between engines at a bounded interval (`sample_interleaved`).
        """
        if yield_every is not None and not yield_every > 0:
            raise ConfigError(f"yield_every={yield_every}: use a positive number of seconds, or None")
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise ConfigError(f"params={type(params).__name__}: give a SamplingParams (SamplingParams(temperature=...))")
        params = SamplingParams(**params.to_dict())  # checked again: a field set after it was made (p.top_p = 0)
        if not whole_number(n) or n < 1:
            raise ConfigError(f"n={n!r}: ask for at least 1 sample per problem (a whole number)")
        if not whole_number(seed) or seed < 0:
            raise ConfigError(f"seed={seed!r}: use a whole number, 0 or more")
        if params.stop and self.tokenizer is None:
            raise ConfigError("stop strings need a tokenizer to read the text; give the engine one or drop the stop strings")
        requests, seen = [], set()
        for item in prompts:
            if not (isinstance(item, (tuple, list)) and len(item) == 2) or isinstance(item[1], str):
                raise ConfigError(f"prompt {str(item)[:60]!r}: give (problem_id, token_ids) pairs; encode the text with "
                                  "the model's tokenizer first")
            pid, ids = item
            if isinstance(ids, Mapping):  # a tokenizer's BatchEncoding ({"input_ids": ..., "attention_mask": ...})
                raise ConfigError(f"problem {pid}: the prompt is a tokenizer's output (a mapping); give its "
                                  "input_ids, a list of token ids")
            if str(pid) in seen:
                raise ConfigError(f"problem id {pid!r} occurs twice; samples are keyed by (problem id, sample index)")
            seen.add(str(pid))
            ids = self.check_prompt(pid, ids)
            todo = sorted(set(int(i) for i in only.get(str(pid), ()))) if only is not None else list(range(n))
            if todo:
                requests.append(_Request(str(pid), ids, todo))
        if not requests:
            return
        longest = max(len(r.prompt) for r in requests)
        self.ensure_capacity(longest + params.max_new_tokens)
        self._stop_token_ids = special_token_ids(self.tokenizer, params.stop)
        # tokens decoded to look for a stop: a byte-level token can hold one UTF-8 byte of it
        self._stop_window = 2 * max((len(s.encode()) for s in params.stop), default=1) + 4
        self.stats = EngineStats()
        yield from self._loop(requests, params, int(seed), progress, yield_every)

    def _loop(self, requests: list[_Request], params: SamplingParams, seed: int, progress,
              yield_every: float | None = None) -> Iterator[list[Completion]]:
        run = _Run(self, requests, params, seed)
        yielded_at = 0.0  # engine seconds at the last yield
        while True:
            with torch.inference_mode():
                done = run.advance()
            if progress is not None:
                progress(self.stats)
                run.resume_clock()
            if done or (yield_every is not None and self.stats.wall_seconds - yielded_at >= yield_every
                        and not run.finished):
                yielded_at = self.stats.wall_seconds
                yield done
                run.resume_clock()  # the caller's time is not the engine's
            if run.finished:
                return


class _Run:
    """One `generate` call: the pending queue, the slots, and the clock that charges time to samples."""

    def __init__(self, engine: Engine, requests: list[_Request], params: SamplingParams, seed: int):
        self.e, self.params, self.seed = engine, params, seed
        B, dev = engine.batch_size, engine.device
        for r in requests:
            r.queue = deque(r.todo)
        # shortest prompts first, so that prompts of like lengths are neighbours and share prefills with few pads
        # (each sample's tokens depend only on its seed, not on when it runs)
        self.pending = deque(sorted(requests, key=lambda r: len(r.prompt)))  # requests with samples not yet placed
        self.prefills: dict[int, _Prefill] = {}
        self.slots: list[_Slot | None] = [None] * B
        # a sample draws at most max_len - its prompt tokens, however large max_new_tokens is (a prefix of its stream)
        self.draws = min(params.max_new_tokens, engine.max_len)
        self.uniforms = torch.zeros(B, self.draws, dtype=torch.float64, device=dev)
        self.gen_idx = torch.zeros(B, dtype=torch.long, device=dev)  # uniforms column of each row's next token
        self.alive = torch.zeros(B, dtype=torch.long, device=dev)
        self.compact = not engine.use_graphs  # graphs replay all B rows: free rows just idle there
        self.ordered = self.compact and engine.row_group is not None  # rows kept ordered by context (see _sink_holes)
        self.rows = 0  # rows [0, rows) are stepped
        self.started = False
        self.finished = False
        self.clock = time.perf_counter()
        self.orphan = 0.0  # time not yet charged to anyone: goes to the next charge

    # -------------------------------------------------------------- time

    def lap(self) -> float:
        now = time.perf_counter()
        dt, self.clock = now - self.clock, now
        self.e.stats.wall_seconds += dt
        return dt

    def resume_clock(self) -> None:
        self.clock = time.perf_counter()

    def charge(self, rows, dt: float) -> None:
        live = [self.slots[r] for r in rows if self.slots[r] is not None]
        if not live:
            self.orphan += dt
            return
        share = (dt + self.orphan) / len(live)
        self.orphan = 0.0
        for s in live:
            s.seconds += share

    # -------------------------------------------------------------- slots

    MAX_PAD_FRACTION = 0.25  # a prompt of another length joins a prefill while pads stay under this share of it

    def _prefill_for(self, req: _Request) -> _Prefill:
        """The prompt's prefill. The prompts queued right behind it join the same batch while the batch keeps
        under the engine's `prefill_tokens` and MAX_PAD_FRACTION and their samples fit in one batch of rows:
        those not placed now keep their prefilled state until rows free up, so that a queue of one-sample
        prompts is prefilled many at a time, not one per finished sample."""
        if id(req) not in self.prefills:
            group, forks = [req], len(req.queue)
            longest = real = len(req.prompt)
            for other in itertools.islice(self.pending, 1, None):
                n = len(other.prompt)
                padded = (len(group) + 1) * max(longest, n)
                if (padded > self.e.prefill_tokens or padded - real - n > self.MAX_PAD_FRACTION * padded
                        or forks + len(other.queue) > self.e.batch_size):
                    break
                group.append(other)
                forks += len(other.queue)
                longest, real = max(longest, n), real + n
            self.orphan += self.lap()
            state, logits = self.e._prefill([r.prompt for r in group])
            if logits.is_cuda:  # the kernels were only launched: their time belongs to this prefill
                torch.cuda.synchronize(logits.device)
            dt = self.lap()
            st = self.e.stats
            st.prefill_seconds += dt
            st.prompts += len(group)
            st.prefill_batches += 1
            for g, r in enumerate(group):
                self.prefills[id(r)] = _Prefill(state, g, longest - len(r.prompt), logits[g], dt / forks, len(r.queue))
        return self.prefills[id(req)]

    def place(self, free: list[int]) -> list[Completion]:
        """Fill free rows from the pending queue: fork the prompt's state, sample each sample's first token.

        A sample that ends on its first token is finished at once and its row reused.
        """
        e, params, dev = self.e, self.params, self.e.device
        done: list[Completion] = []
        free = deque(sorted(free))
        while free and self.pending:
            req = self.pending[0]
            pre = self._prefill_for(req)
            take = []
            while free and req.queue:
                take.append((free.popleft(), req.queue.popleft()))
            if not req.queue:
                self.pending.popleft()
            pre.left -= len(take)
            if pre.left == 0:
                del self.prefills[id(req)]
            rows = [r for r, _ in take]
            rows_t = torch.tensor(rows, dtype=torch.long, device=dev)
            T = len(req.prompt)
            e.state.copy_rows_(rows_t, pre.state, torch.full((len(rows),), pre.row, dtype=torch.long, device=dev), T,
                               offset=pre.pad)
            limit = min(params.max_new_tokens, e.max_len - T)
            new = []
            for r, j in take:
                self.slots[r] = _Slot(req, j, sample_seed(self.seed, req.problem_id, j), limit, pre.share)
                new.append(self.slots[r])
            self.uniforms[rows_t] = torch.stack([sample_uniforms(s.seed, self.draws) for s in new]).to(dev)
            first = sample_tokens(pre.logits.expand(len(rows), -1), self.uniforms[rows_t, 0], params).tolist()
            e.stats.gen_tokens += len(rows)
            ended = []
            for r, t in zip(rows, first):
                reason = e._check(self.slots[r], t, params)
                if reason is not None:
                    ended.append((r, reason))
            e.tok[rows_t] = torch.tensor(first, dtype=torch.long, device=dev)
            e.pos[rows_t] = T
            self.gen_idx[rows_t] = 1
            self.alive[rows_t] = 1
            self.charge(rows, self.lap())
            for r, reason in ended:
                done.append(e._finish(self.slots[r], reason, params))
                self._free(r)
                free.append(r)
        return done

    def _free(self, r: int) -> None:
        self.slots[r] = None
        self.alive[r] = 0
        self.e.pos[r] = 0  # a free row that is still stepped (CUDA graphs) writes harmlessly at position 0
        self.gen_idx[r] = 0

    def _move_rows(self, dst: list[int], src: list[int]) -> None:
        """Rows `dst` take the samples of rows `src` (state, next token, position, uniforms); `src` rows end free.
        A chain (each source the next destination) moves in one go: every source is read before any write."""
        e, dev = self.e, self.e.device
        d = torch.tensor(dst, dtype=torch.long, device=dev)
        m = torch.tensor(src, dtype=torch.long, device=dev)
        length = max(len(self.slots[r].req.prompt) + len(self.slots[r].tokens) for r in src)
        e.state.copy_rows_(d, e.state, m, length)
        for t in (e.tok, e.pos, self.gen_idx, self.alive, self.uniforms):
            t[d] = t[m]
        moved = [self.slots[r] for r in src]
        for r in src:
            self.slots[r] = None
        for r, slot in zip(dst, moved):
            self.slots[r] = slot
        left = sorted(set(src) - set(dst))
        if left:
            f = torch.tensor(left, dtype=torch.long, device=dev)
            for t in (e.pos, self.gen_idx, self.alive):
                t[f] = 0
        self.charge(dst, self.lap())

    def _pack(self) -> None:
        """Move live rows into the holes below them so that rows [0, live) are the live ones."""
        live = [r for r, s in enumerate(self.slots) if s is not None]
        k = len(live)
        holes = [r for r in range(k) if self.slots[r] is None]
        if holes:
            self._move_rows(holes, [r for r in live if r >= k])
        self.rows = k

    def _sink_holes(self) -> None:
        """Move every free row to the end of the stepped rows, keeping the rows ordered by context block by
        block (every row of a block of `row_group` rows at least as long as any row of the next block): a
        hole takes the longest row of the next block, whose row the longest of the block after takes, and so on;
        the last live row fills the last hole. New samples then enter at the end, the shortest, so each
        block's attention reads about as far as its own rows need (the demo's sampling wastes ~2x without)."""
        g = self.e.row_group
        ctx = [len(s.req.prompt) + len(s.tokens) if s is not None else None for s in self.slots[:self.rows]]
        while True:
            live = [r for r, c in enumerate(ctx) if c is not None]
            end = live[-1] + 1 if live else 0
            hole = next((r for r in range(end) if ctx[r] is None), None)
            if hole is None:
                return
            dst, src = [], []
            while True:  # down the blocks: each hole takes the longest row of the next block with a live row
                after = [r for r in range((hole // g + 1) * g, end) if ctx[r] is not None]
                if not after:
                    break
                block = after[0] // g
                j = max((r for r in after if r // g == block), key=lambda r: ctx[r])
                dst.append(hole), src.append(j)
                ctx[hole], ctx[j], hole = ctx[j], None, j
            last = max(r for r in range(end) if ctx[r] is not None)
            if last > hole:
                dst.append(hole), src.append(last)
                ctx[hole], ctx[last] = ctx[last], None
            self._move_rows(dst, src)

    # -------------------------------------------------------------- one iteration

    def advance(self) -> list[Completion]:
        e, params = self.e, self.params
        if not self.started:
            self.started = True
            done = self.place(list(range(e.batch_size)))
            self._set_rows()
            return done
        n = self.rows
        slots = self.slots
        live = [r for r in range(n) if slots[r] is not None]
        kv_len = max(len(slots[r].req.prompt) + len(slots[r].tokens) for r in live)  # last fed position + 1
        e.logits[:n] = e._step(e.tok[:n], e.pos[:n], kv_len)
        e.stats.steps += 1
        self.charge(range(n), self.lap())

        u = self.uniforms[:n].gather(1, self.gen_idx[:n, None])[:, 0]
        new = sample_tokens(e.logits[:n], u, params)
        toks = new.tolist()
        e.stats.gen_tokens += len(live)
        ended = []
        for r in live:
            reason = e._check(slots[r], toks[r], params)
            if reason is not None:
                ended.append((r, reason))
        e.tok[:n] = new.clamp_min(0)  # a finished row's stale logits never feed NOT_FINITE into the next step
        e.pos[:n] += self.alive[:n]
        self.gen_idx[:n] += self.alive[:n]
        self.charge(range(n), self.lap())

        done = []
        for r, reason in ended:
            done.append(e._finish(slots[r], reason, params))
            self._free(r)
        if ended:
            if self.ordered:
                self._sink_holes()
            done += self.place([r for r in range(self.rows) if slots[r] is None])
            self._set_rows()
        return done

    def _set_rows(self) -> None:
        if not self.compact:
            self.rows = self.e.batch_size
        elif self.pending:  # nothing to pack while refills keep every row busy
            self.rows = max(self.rows, 1 + max((r for r, s in enumerate(self.slots) if s is not None), default=-1))
        else:
            self._pack()
        if not self.pending and all(s is None for s in self.slots):
            self.finished = True
