"""One training loop for every stage (MOHAWK 1-3, hybrid KD, SFT, training a teacher from scratch).

A *task* says what is trained and how the loss is computed (`thinkfast.distill.stages`); this loop owns the rest:
AdamW, warmup then cosine / WSD / constant learning rate, gradient accumulation and clipping, bf16 autocast on
GPU, a token budget, a progress bar, a JSONL log, atomic checkpoints and exact resume, NaN stops, and data
parallelism under torchrun.

Loss normalisation: a task returns masked *sums*; the loop divides by the number of counted positions in the
whole global batch (every process draws the same global batch, so each knows that number without talking).
Gradients are then summed across processes, which gives exactly the gradient of the global token mean: the
same curve for 1 process x 2 micro-batches as for 2 processes x 1.

Data parallelism: under torchrun (WORLD_SIZE > 1) the student is replicated and its gradients are all-reduced
once per optimizer step in flat buckets (gloo on CPU, NCCL on GPU). This is DDP without the wrapper, so stages
that run parts of a model (MOHAWK 1-2 call single layers) need no special casing.

Checkpoint folder (written to a temporary name, then renamed): model.safetensors (the whole task model),
optimizer.pt (AdamW state, read back with weights_only=True), rng.pt, state.json (step, tokens, data position,
run fingerprint). A finished stage keeps model + state.json with "done": true.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import pickle
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Protocol

import torch
import torch.nn as nn

from ..errors import CheckpointError, ConfigError, ThinkfastError, option
from ..utils import atomic_dir, atomic_write_json, atomic_write_text, progress_bar

SCHEDULES = ("cosine", "wsd", "constant")
PRECISIONS = ("auto", "fp32", "bf16")


class TrainingDiverged(ThinkfastError):
    """A non-finite loss or gradient: the run stopped; the last good checkpoint is kept."""


@dataclass
class TrainConfig:
    tokens: int = 1_000_000  # budget: optimizer steps = tokens // (batch_size * tokens per row: seq_len when packed)
    batch_size: int = 8  # rows per optimizer step, across all processes
    micro_batch_size: int | None = None  # rows per forward/backward on one process (default: its whole share)
    seq_len: int = 512
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # final learning rate as a fraction of lr
    schedule: str = "cosine"  # cosine | wsd (warmup, stable, decay) | constant (after warmup)
    warmup: float = 0.05  # fraction of steps (< 1) or a number of steps (>= 1)
    decay: float = 0.2  # wsd: fraction of steps spent decaying
    weight_decay: float = 0.1  # on matrices only (not norms, biases, SSM decay parameters)
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables
    log_every: int = 10
    ckpt_every: int = 200  # steps; 0 = only when the stage ends
    eval_every: int = 0  # steps between held-out evaluations (0: only when the stage ends); needs eval data
    eval_rows: int = 64  # held-out rows each evaluation reads (the same rows every time)
    seed: int = 0
    precision: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | fp32 | bf16 (GPU only)
    device: str | None = None  # default: cuda:LOCAL_RANK when available, else cpu

    def validate(self, where: str = "train") -> None:
        for name in ("tokens", "batch_size", "micro_batch_size", "seq_len", "log_every", "ckpt_every", "eval_every",
                     "eval_rows", "seed"):  # from Python, 1.5 rows failed later, oddly, and 2.0 as a TypeError
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
                raise ConfigError(f"{where}: {name}={value!r} must be a whole number")
        if self.tokens <= 0:
            raise ConfigError(f"{where}: token budget {self.tokens} must be positive (e.g. {option('--tokens 2M', 'tokens=2_000_000')})")
        for name in ("batch_size", "seq_len", "log_every", "eval_rows"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{where}: {name}={getattr(self, name)} must be positive")
        if self.micro_batch_size is not None and self.micro_batch_size <= 0:
            raise ConfigError(f"{where}: micro_batch_size={self.micro_batch_size} must be positive")
        if self.micro_batch_size is not None and self.micro_batch_size > self.batch_size:
            raise ConfigError(f"{where}: micro_batch_size={self.micro_batch_size} is larger than batch_size="
                              f"{self.batch_size}; lower it, or leave it out to run each process's whole share at once")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"{where}: lr={self.lr} must be a positive number")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"{where}: schedule {self.schedule!r}; use one of {', '.join(SCHEDULES)}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"{where}: precision {self.precision!r}; use one of {', '.join(PRECISIONS)}")
        for name in ("ckpt_every", "eval_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{where}: {name}={getattr(self, name)} must be >= 0")
        if self.seed < 0:
            raise ConfigError(f"{where}: seed={self.seed} must be >= 0")
        # nan passes every `< 0` test, so each check states what a valid value satisfies
        for name in ("min_lr_ratio", "decay"):
            if not (0 <= getattr(self, name) <= 1):
                raise ConfigError(f"{where}: {name}={getattr(self, name)} must be between 0 and 1")
        for name in ("beta1", "beta2"):
            if not (0 <= getattr(self, name) < 1):
                raise ConfigError(f"{where}: {name}={getattr(self, name)} must be at least 0 and below 1")
        for name in ("warmup", "weight_decay", "grad_clip"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ConfigError(f"{where}: {name}={value} must be a finite number >= 0")

    @property
    def total_steps(self) -> int:
        return self.steps_for(self.seq_len)

    def steps_for(self, row_tokens: float) -> int:
        """Optimizer steps of the budget when one row counts `row_tokens` tokens (seq_len for packed rows, the
        mean example length for one-example rows)."""
        return max(1, int(self.tokens // (self.batch_size * max(1.0, row_tokens))))

    def replace(self, **kw) -> "TrainConfig":
        names = {f.name for f in fields(self)}
        return TrainConfig(**{**asdict(self), **{k: v for k, v in kw.items() if k in names}})


def lr_at(step: int, cfg: TrainConfig, total: int | None = None) -> float:
    """Learning rate for optimizer step `step` (0-based)."""
    total = cfg.total_steps if total is None else total
    warm = int(cfg.warmup if cfg.warmup >= 1 else round(cfg.warmup * total))
    lo = cfg.lr * cfg.min_lr_ratio
    if step < warm:
        return cfg.lr * (step + 1) / warm
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "cosine":
        frac = (step - warm) / max(1, total - warm - 1)
        return lo + (cfg.lr - lo) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
    decay_steps = max(1, int(round(cfg.decay * total)))  # wsd
    start = total - decay_steps
    if step < start:
        return cfg.lr
    frac = (step - start + 1) / decay_steps
    return cfg.lr + (lo - cfg.lr) * min(1.0, frac)


class Task(Protocol):
    """What one stage trains. Losses are masked sums; `count` is the number of positions they average over."""

    name: str
    model: nn.Module  # saved in checkpoints

    def to(self, device: torch.device) -> "Task": ...

    def trainable(self) -> list[tuple[str, nn.Parameter]]: ...

    def count(self, batch: dict) -> int: ...

    def loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...


@dataclass
class TrainResult:
    steps: int
    tokens: int
    loss: float | None  # mean loss over the last logging window
    history: list[dict] = field(default_factory=list)  # every logged record of this run
    resumed_from: int = 0
    skipped: bool = False  # the stage was already finished (resume)
    evals: list[dict] = field(default_factory=list)  # held-out evaluations of this run ({"step", "eval_loss", ...})

    @property
    def eval_loss(self) -> float | None:
        """The last held-out loss (None without eval data)."""
        return self.evals[-1]["eval_loss"] if self.evals else None


# ---------------------------------------------------------------- distributed


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def dist_info() -> DistInfo:
    """Rank and world size from torchrun's environment; initialises the process group on first use."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def barrier() -> None:
    """Wait for every process (no-op without torchrun)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def pick_device(cfg: TrainConfig, info: DistInfo) -> torch.device:
    if cfg.device:
        dev = torch.device(cfg.device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device {cfg.device!r}: no CUDA device here; use " + option("--device cpu", "device='cpu'"))
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda", info.local_rank)
    return torch.device("cpu")


def uses_bf16(cfg: TrainConfig, device: torch.device, name: str) -> bool:
    """Whether training runs under bf16 autocast; refused where it cannot (a CPU)."""
    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    if use_bf16 and device.type != "cuda":
        raise ConfigError(f"{name}: precision bf16 needs a GPU (autocast is GPU-only here); use "
                          + option("--precision fp32", "precision='fp32'"))
    return use_bf16


def all_reduce_(tensors: list[torch.Tensor], bucket_bytes: int = 32 << 20) -> None:
    """Sum tensors in place across processes, a few flat buckets at a time."""
    import torch.distributed as dist

    bucket: list[torch.Tensor] = []
    size = 0

    def flush():
        if not bucket:
            return
        flat = torch.cat([t.reshape(-1) for t in bucket])
        dist.all_reduce(flat)
        offset = 0
        for t in bucket:
            n = t.numel()
            t.copy_(flat[offset:offset + n].view_as(t))
            offset += n
        bucket.clear()

    for t in tensors:
        if bucket and (t.dtype != bucket[0].dtype or size + t.numel() * t.element_size() > bucket_bytes):
            flush()
            size = 0
        bucket.append(t)
        size += t.numel() * t.element_size()
    flush()


# ---------------------------------------------------------------- checkpoints


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def read_checkpoint_state(ckpt_dir: Path) -> dict | None:
    path = Path(ckpt_dir) / "state.json"
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: unreadable ({e}); the checkpoint is damaged, remove {ckpt_dir} to restart") from None
    wrong = _state_problem(state)
    if wrong:
        raise CheckpointError(f"{path}: {wrong}; the checkpoint is damaged, remove {ckpt_dir} to restart")
    return state


def _state_problem(state) -> str | None:
    """What makes a state.json unusable (valid JSON of another shape), or None."""
    if not isinstance(state, dict):
        return "not a JSON object"
    for key in ("step", "tokens"):
        if not isinstance(state.get(key), int) or isinstance(state.get(key), bool) or state[key] < 0:
            return f"{key} is {json.dumps(state.get(key))}, not a count"
    if not state.get("done") and not isinstance(state.get("data"), dict):
        return "no data position"
    return None


def save_checkpoint(ckpt_dir: Path, model: nn.Module, optimizer, state: dict) -> None:
    from safetensors.torch import save_model

    with atomic_dir(ckpt_dir) as tmp:
        save_model(model, str(tmp / "model.safetensors"))
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(_rng_state(), tmp / "rng.pt")
        atomic_write_json(tmp / "state.json", state)


def load_model_weights(model: nn.Module, ckpt_dir: Path) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    path = Path(ckpt_dir) / "model.safetensors"
    try:
        load_model(model, str(path), strict=True, device=str(next(model.parameters()).device))
    except (SafetensorError, FileNotFoundError) as e:
        # a cut or missing file (a full disk, a copy stopped half-way): no settings would make it load
        raise CheckpointError(f"{path}: damaged or incomplete ({str(e).splitlines()[0][:200]}); delete {ckpt_dir} and "
                              "resume to run this stage again, or choose a new --out") from None
    except Exception as e:
        raise CheckpointError(f"{path}: does not fit this model ({str(e).splitlines()[0][:200]}); resume with the same model settings") from None


_UNSET = object()  # a setting one fingerprint has and the other lacks


def setting_changes(saved, now, limit: int = 3) -> str:
    """The settings two run fingerprints differ in, each with both values: 'sft seq_len was 256, now 300'.
    Stages are named by their label; the nesting words (stages, stage, train) are left out."""
    found: list[str] = []

    def show(v, other) -> str:
        """The value, and where long: the part around its first difference from `other` (two long data specs
        cut at one place looked the same)."""
        text = "unset" if v is _UNSET else json.dumps(v)
        if len(text) <= 80:
            return text
        theirs = "" if other is _UNSET else json.dumps(other)
        at = next((i for i, (x, y) in enumerate(zip(text, theirs)) if x != y), min(len(text), len(theirs)))
        start = max(0, min(at - 30, len(text) - 77))
        return ("..." if start else "") + text[start:start + 77] + ("..." if start + 77 < len(text) else "")

    def labels(stages) -> str:
        return ",".join(str(x.get("name") or x.get("kind")) for x in stages)

    def walk(a, b, path: list[str]) -> None:
        if a == b:
            return
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b), key=str):
                walk(a.get(k, _UNSET), b.get(k, _UNSET), path if k in ("stages", "stage", "train") else path + [str(k)])
            return
        if isinstance(a, list) and isinstance(b, list) and all(isinstance(x, dict) and "kind" in x for x in a + b):
            if len(a) != len(b) or labels(a) != labels(b):  # stages added, removed or reordered: say which
                found.append(f"stages were {labels(a)}, now {labels(b)}")
                return
            for x, y in zip(a, b):  # stage lists, stage by stage
                walk(x, y, path + [str(y.get("name") or y.get("kind"))])
            return
        name = " ".join(path) or "settings"
        if path and path[-1] in ("weights_digest", "weights_sampled"):  # a digest's value means nothing to the reader
            what = f"{' '.join(path[:-1]) or 'model'} weights differ (another model of the same shape)"
            if what not in found:
                found.append(what)
        else:
            found.append(f"{name} was {show(a, b)}, now {show(b, a)}")

    walk(saved, now, [])
    more = len(found) - limit
    if not found:
        return "none found"
    return "; ".join(found[:limit]) + (f"; and {more} more" if more > 0 else "")


def check_fingerprint(state: dict, fingerprint: dict | None, where: Path) -> None:
    if fingerprint is None:
        return
    saved = state.get("fingerprint")
    if saved != fingerprint:
        raise CheckpointError(
            f"{where} holds a checkpoint of another run (settings differ: {setting_changes(saved or {}, fingerprint)}); "
            "resume with the same settings, or choose a new --out"
        )


def _truncate_log(log_path: Path, stage: str, step: int) -> None:
    """Drop this stage's records after `step` (written by a run killed after its last checkpoint)."""
    if not log_path.is_file():
        return
    keep = []
    for line in log_path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by the kill
        if rec.get("stage") == stage and rec.get("step", 0) > step:
            continue
        keep.append(line)
    atomic_write_text(log_path, "".join(x + "\n" for x in keep))


# ---------------------------------------------------------------- the loop


def _param_groups(named: list[tuple[str, nn.Parameter]], weight_decay: float):
    decay, no_decay = [], []
    for name, p in named:
        # matrices decay; vectors (norms, biases, dt_bias, A_log, D), conv kernels and Mamba-1's (channel, state)
        # A_log do not
        (decay if p.ndim >= 2 and "conv1d" not in name and not name.endswith("A_log") else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _to(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _micro_batches(batch: dict, rows: int) -> list[dict]:
    n = batch["input_ids"].shape[0]
    out = []
    for i in range(0, n, rows):
        mb = {k: v[i:i + rows] for k, v in batch.items()}
        used = int(mb["real"].any(0).nonzero().max()) + 1 if mb["real"].any() else 1
        out.append({k: v[:, :used] for k, v in mb.items()})  # cut this micro-batch's trailing pads
    return out


ProgressArg = bool | Callable[[dict], None]


def held_out_batch(eval_data, rows: int) -> dict:
    """The first `rows` rows of `eval_data` (a DataMix) in its seeded order, none twice: the same rows at
    every evaluation, whatever the training has drawn."""
    eval_data.state = eval_data.initial_state()
    return eval_data.next_batch(max(1, min(rows, sum(len(s) for s in eval_data.sources))))


def evaluate(task: Task, batch: dict, rows: int, device, autocast=nullcontext) -> dict:
    """The task's loss on `batch` without gradients, averaged as training averages it (per counted position)."""
    n_count = max(1, task.count(batch))
    total, parts = 0.0, {}
    with torch.no_grad():
        for mb in _micro_batches(batch, rows):
            with autocast():
                l_sum, p = task.loss(_to(mb, device))
            total += float(l_sum)
            for k, v in p.items():
                parts[k] = parts.get(k, 0.0) + float(v)
    out = {"eval_loss": total / n_count}
    out.update({f"eval_{k}": v / n_count for k, v in sorted(parts.items())})
    return out


def no_bar(record: dict) -> None:
    """A `progress` value for "no bar, but still the stage's budget line" (the CLI's --no-progress)."""


def budget_line(name: str, cfg: TrainConfig, row_tokens: float, total: int, start: int = 0) -> str:
    """'kd: 150,000 tokens -> 73 steps of 2,048 tokens (149,504 trained)': the budget is spent in whole steps
    (rounded down, at least one), so say what the run will really train."""
    per_step = int(round(cfg.batch_size * row_tokens))  # as the loop counts them
    approx = "" if float(row_tokens).is_integer() else "~"  # one-example rows: their mean length
    line = (f"{name}: {cfg.tokens:,} tokens -> {total:,} step{'s' if total != 1 else ''} of {approx}{per_step:,} tokens "
            f"({approx}{total * per_step:,} trained)")
    return line + (f"; resuming at step {start:,}" if start else "")


def train(
    task: Task,
    data,
    cfg: TrainConfig,
    ckpt_dir: str | os.PathLike | None = None,
    log_path: str | os.PathLike | None = None,
    resume: bool = False,
    progress: ProgressArg = True,
    fingerprint: dict | None = None,
    callback: Callable[[int, dict], None] | None = None,
    eval_data=None,
) -> TrainResult:
    """Train `task` on batches from `data` (a DataMix) for cfg.tokens tokens.

    ckpt_dir: checkpoints go here (None: no checkpoints, no resume). log_path: JSONL records are appended here.
    resume: continue from ckpt_dir's checkpoint (model, optimizer, schedule, RNG, data position); without it an
    existing checkpoint is refused rather than overwritten. progress: True for a tqdm bar, False for silence, or
    a function called with every logged record (no bar); unless False, the stage starts with one line saying
    how many steps and tokens the budget gives. callback(step, record): called after every optimizer step.
    eval_data: held-out rows (a DataMix); the task's loss on cfg.eval_rows of them is logged every
    cfg.eval_every steps and when the stage ends, as records with "eval_loss" (and "eval_<part>") instead of "loss".
    """
    name = task.name
    cfg.validate(name)
    info = dist_info()
    device = pick_device(cfg, info)
    if cfg.batch_size % info.world:
        raise ConfigError(f"{name}: batch_size={cfg.batch_size} must be divisible by the {info.world} processes")
    share = cfg.batch_size // info.world
    micro = min(cfg.micro_batch_size or share, share)
    use_bf16 = uses_bf16(cfg, device, name)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_bf16 else nullcontext

    ckpt_dir = Path(ckpt_dir) if ckpt_dir is not None else None
    log_path = Path(log_path) if log_path is not None else None
    row_tokens = getattr(data, "row_tokens", cfg.seq_len)
    total = cfg.steps_for(row_tokens)
    state = read_checkpoint_state(ckpt_dir) if ckpt_dir is not None else None
    if state is not None and not resume:
        raise CheckpointError(f"{ckpt_dir} already holds a checkpoint; pass {option('--resume', 'resume=True')} to "
                              f"continue it, or choose a new {option('--out', 'folder')}")
    if state is not None:
        check_fingerprint(state, fingerprint, ckpt_dir)

    if progress is not False and info.main and not (state is not None and state.get("done")):
        line = budget_line(name, cfg, row_tokens, total, int(state["step"]) if state is not None else 0)
        if cfg.weight_decay and not getattr(task, "weight_decay_applies", True):
            line += "; no weight decay (its loss reads only part of the matrices it trains)"
        print(line, file=sys.stderr)

    task.to(device)
    if state is not None and state.get("done"):
        load_model_weights(task.model, ckpt_dir)
        return TrainResult(state["step"], state["tokens"], state.get("loss"), [], state["step"], skipped=True)

    named = task.trainable()
    if not named:
        raise ConfigError(f"{name}: nothing to train (every parameter is frozen)")
    opt_kwargs = {"fused": True} if device.type == "cuda" else {"foreach": True}
    weight_decay = cfg.weight_decay if getattr(task, "weight_decay_applies", True) else 0.0
    optimizer = torch.optim.AdamW(
        _param_groups(named, weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), **opt_kwargs
    )
    params = [p for _, p in named]

    torch.manual_seed(cfg.seed + info.rank)
    step, tokens = 0, 0
    if state is not None:
        load_model_weights(task.model, ckpt_dir)
        for file, restore in (("optimizer.pt", lambda f: optimizer.load_state_dict(torch.load(f, map_location=device, weights_only=True))),
                              ("rng.pt", lambda f: _set_rng_state(torch.load(f, weights_only=True)))):
            try:
                restore(ckpt_dir / file)
            except (OSError, RuntimeError, ValueError, KeyError, EOFError, pickle.UnpicklingError) as e:
                why = " ".join(str(e).split())[:200] or type(e).__name__  # torch's messages run over several lines
                raise CheckpointError(f"{ckpt_dir / file}: damaged or incomplete ({why}); delete {ckpt_dir} and resume to "
                                      "run this stage again, or choose a new --out") from None
        data.load_state_dict(state["data"])
        step, tokens = int(state["step"]), int(state["tokens"])
    if log_path is not None and info.main:
        # records of this stage past the checkpoint (or all of them, when a killed run left no checkpoint)
        _truncate_log(log_path, name, step)
    resumed_from = step

    use_bar = progress is True and info.main
    bar = None
    postfix: dict[str, str] = {}  # the bar's values: the last logged loss and throughput, the last held-out loss
    if use_bar:
        bar = progress_bar(total, name, "step", initial=step)
    log_file = open(log_path, "a") if (log_path is not None and info.main) else None

    history: list[dict] = []
    evals: list[dict] = []
    if eval_data is not None and eval_data is data:
        raise ConfigError(f"{name}: the held-out data is the training data itself; give other examples to evaluate on")
    eval_batch = held_out_batch(eval_data, cfg.eval_rows) if eval_data is not None else None

    def log_eval() -> None:
        record = {"stage": name, "step": step, "tokens": tokens, **evaluate(task, eval_batch, micro, device, autocast),
                  "eval_rows": int(eval_batch["input_ids"].shape[0])}
        evals.append(record)
        if bar is not None:  # an evaluation right after a log record (the last step) must show, not the one before
            postfix["eval"] = f"{record['eval_loss']:.4g}"
            bar.set_postfix(**postfix, refresh=False)
        if log_file is not None:
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()
        if progress is not False and info.main:
            line = f"{name}: step {step:,}, held-out loss {record['eval_loss']:.4g} ({record['eval_rows']} rows)"
            if bar is not None:
                bar.write(line, file=sys.stderr)
            else:
                print(line, file=sys.stderr)
        if callable(progress) and info.main:
            progress(record)

    win_loss, win_steps, win_real, win_parts = 0.0, 0, 0, {}
    if state is not None and state.get("window"):
        w = state["window"]
        win_loss, win_steps, win_real, win_parts = w["loss"], w["steps"], w["real"], dict(w["parts"])
    t_win = time.perf_counter()
    last_loss = None
    last_good = resumed_from if state is not None else None

    def checkpoint_state(done: bool = False) -> dict:
        # the open logging window travels too, so a resumed run logs the same averages
        window = {"loss": win_loss, "steps": win_steps, "real": win_real, "parts": win_parts}
        return {"stage": name, "step": step, "tokens": tokens, "total_steps": total, "done": done,
                "loss": last_loss, "data": data.state_dict(), "window": window, "fingerprint": fingerprint}

    try:
        while step < total:
            lr = lr_at(step, cfg, total)
            for g in optimizer.param_groups:
                g["lr"] = lr
            batch = data.next_batch(cfg.batch_size)  # the global batch, identical on every process
            n_count = max(1, task.count(batch))
            mine = {k: v[info.rank * share:(info.rank + 1) * share] for k, v in batch.items()}
            loss_sum = torch.zeros((), device=device)
            parts_sum: dict[str, torch.Tensor] = {}
            for mb in _micro_batches(mine, micro):
                mb = _to(mb, device)
                with autocast():
                    l_sum, parts = task.loss(mb)
                (l_sum / n_count).backward()
                loss_sum += l_sum.detach().float()
                for k, v in parts.items():
                    parts_sum[k] = parts_sum.get(k, 0) + v.detach().float()
            stats = torch.stack([loss_sum] + [parts_sum[k] for k in sorted(parts_sum)])
            if info.world > 1:
                all_reduce_([p.grad for p in params if p.grad is not None])
                all_reduce_([stats])
            stats = (stats / n_count).tolist()
            loss_val = stats[0]
            parts_val = dict(zip(sorted(parts_sum), stats[1:]))
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"), foreach=True))
            if not math.isfinite(loss_val) or not math.isfinite(grad_norm):
                what = "loss" if not math.isfinite(loss_val) else "gradient norm"
                value = loss_val if what == "loss" else grad_norm
                kept = f"the last good checkpoint (step {last_good}) is kept in {ckpt_dir}" if last_good is not None else "no checkpoint was written yet"
                raise TrainingDiverged(
                    f"{name}: {what} became {value} at step {step + 1}; stopped before updating, {kept}. "
                    "Re-run the same command with --resume and a lower --lr (or a --grad-clip), or check the data"
                )
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens += int(round(cfg.batch_size * row_tokens))
            last_loss = loss_val
            win_loss += loss_val
            win_steps += 1
            win_real += int(batch["real"].sum())
            for k, v in parts_val.items():
                win_parts[k] = win_parts.get(k, 0.0) + v

            if step % cfg.log_every == 0 or step == total or step == 1:
                elapsed = time.perf_counter() - t_win
                record = {"stage": name, "step": step, "tokens": tokens, "loss": win_loss / win_steps,
                          "step_loss": loss_val, "lr": lr, "grad_norm": grad_norm,
                          "tok_s": win_real / max(elapsed, 1e-9)}
                record.update({k: v / win_steps for k, v in win_parts.items()})
                history.append(record)
                if log_file is not None:
                    log_file.write(json.dumps(record) + "\n")
                    log_file.flush()
                if bar is not None:
                    postfix.update(loss=f"{record['loss']:.4g}", tok_s=f"{record['tok_s']:.0f}")
                    bar.set_postfix(**postfix, refresh=False)
                if callable(progress) and info.main:
                    progress(record)
                win_loss, win_steps, win_real, win_parts = 0.0, 0, 0, {}
                t_win = time.perf_counter()
            if eval_batch is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or step == total):
                t_eval = time.perf_counter()
                log_eval()
                t_win += time.perf_counter() - t_eval  # the training throughput leaves the evaluation out
            if bar is not None:
                bar.update(1)
            if ckpt_dir is not None and cfg.ckpt_every and step % cfg.ckpt_every == 0 and step < total:
                if info.main:
                    save_checkpoint(ckpt_dir, task.model, optimizer, checkpoint_state())
                last_good = step
            if callback is not None:
                callback(step, history[-1] if history else {})
        if ckpt_dir is not None and info.main:
            save_checkpoint(ckpt_dir, task.model, None, checkpoint_state(done=True))
    finally:
        if bar is not None:
            bar.close()
        if log_file is not None:
            log_file.close()
    final = history[-1]["loss"] if history else last_loss
    return TrainResult(step, tokens, final, history, resumed_from, evals=evals)
