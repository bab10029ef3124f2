"""The stages: MOHAWK 1-3 (Llamba), hybrid KD (MambaInLlama), SFT; and `distill` / `sft`, which run them.

  matrix  MOHAWK stage 1. Each student Mamba mixer gets the teacher's hidden state at its layer (one teacher
          pass per batch, all layers at once) and its materialised mixing matrix is pulled towards the
          teacher's softmax attention matrix (Frobenius). Only the mixers train.
  hidden  MOHAWK stage 2. Same inputs; each student block's output is pulled towards the teacher's block
          output (L2). Mixers train (and the MLPs with `train_mlp`).
  kd      End-to-end distillation on the teacher's token distributions: forward KL (MOHAWK stage 3, the
          Llamba default), reverse KL (MambaInLlama, the hybrid default) or soft CE, optionally + CE on the
          worked solutions; parameter groups can stay frozen (`freeze=["mlp"]`).
  sft     Cross entropy on worked solutions, prompt tokens masked; for students and teachers alike, and for a
          randomly initialised model trained from scratch.

`distill(teacher, student, data, stages, ...)` runs a list of stages with resumable checkpoints and writes a
`save_pretrained` folder; `sft(model, data, train, ...)` is the one-stage version. Both take already-loaded
models; the CLI (`thinkfast distill`, `thinkfast sft`) is glue over them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from ..data.packing import IGNORE, DataConfig, DataMix, PackedRows, build_data, warn_cut_examples
from ..data.prompts import has_chat_template
from ..errors import CheckpointError, ConfigError, option
from ..models import ThinkfastForCausalLM, from_teacher
from ..utils import (HeldLock, atomic_write_json, clear_leftovers, disk_space_line, failed_writes_as_os_errors, folder_bytes,
                     is_leftover, usual_permissions)
from .losses import KL_KINDS, hidden_loss, matrix_loss, vocab_loss
from .trainer import (ProgressArg, TrainConfig, TrainResult, barrier, dist_info, pick_device, setting_changes, train,
                      uses_bf16)

log = logging.getLogger(__name__)

STAGE_KINDS = ("matrix", "hidden", "kd", "sft")
FREEZE_GROUPS = ("embed", "norm", "mlp", "attn", "mamba")
POSITIONS = ("all", "completion")
# settings a resumed run may change without becoming "another run": where and how fast it runs, and the two
# knobs one turns after a divergence (a lower learning rate, a tighter clip)
RESUME_MAY_CHANGE = ("log_every", "ckpt_every", "device", "precision", "micro_batch_size", "lr", "grad_clip",
                     "eval_every", "eval_rows")


@dataclass
class StageConfig:
    kind: str  # matrix | hidden | kd | sft
    train: TrainConfig = field(default_factory=TrainConfig)
    layers: list[int] | None = None  # matrix / hidden: Mamba layers to train (default all of them)
    train_mlp: bool = False  # hidden: the MLPs train too
    loss: str | None = None  # kd: forward_kl | reverse_kl | soft_ce (default forward_kl for llamba, reverse_kl for hybrid)
    ce_weight: float = 0.0  # kd: + ce_weight x CE on the worked solutions ("KL+CE")
    temperature: float = 1.0  # kd
    positions: str = "all"  # kd: distil on all real tokens, or on completion tokens only
    freeze: list[str] = field(default_factory=list)  # kd / sft: groups kept frozen: embed norm mlp attn mamba
    chunk_tokens: int | None = None  # positions per vocabulary chunk (default: ~256 MiB of fp32 logits)
    data: DataConfig | None = None  # this stage's data instead of the run's
    name: str | None = None  # folder and log name (default: the kind)

    @property
    def label(self) -> str:
        return self.name or self.kind

    def validate(self, student_cfg=None) -> None:
        where = f"stage {self.label}"
        if self.kind not in STAGE_KINDS:
            raise ConfigError(f"{where}: unknown stage {self.kind!r}; use one of {', '.join(STAGE_KINDS)}")
        self.train.validate(where)
        if self.loss is not None and self.loss not in KL_KINDS:
            raise ConfigError(f"{where}: loss {self.loss!r}; use one of {', '.join(KL_KINDS)}")
        if self.positions not in POSITIONS:
            raise ConfigError(f"{where}: positions {self.positions!r}; use one of {', '.join(POSITIONS)}")
        bad = [g for g in self.freeze if g not in FREEZE_GROUPS]
        if bad:
            raise ConfigError(f"{where}: cannot freeze {bad}; groups are {', '.join(FREEZE_GROUPS)}")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ConfigError(f"{where}: temperature {self.temperature} must be a finite number > 0")
        if not (self.ce_weight >= 0 and math.isfinite(self.ce_weight)):
            raise ConfigError(f"{where}: ce_weight {self.ce_weight} must be a finite number >= 0")
        if self.chunk_tokens is not None and self.chunk_tokens < 1:
            raise ConfigError(f"{where}: chunk_tokens={self.chunk_tokens} must be at least 1 ({option('--tokens-per-chunk', 'chunk_tokens')})")
        if student_cfg is not None and self.kind in ("matrix", "hidden"):
            mamba = set(student_cfg.mamba_layers)
            if not mamba:
                raise ConfigError(f"{where}: the student has no Mamba layers to align")
            bad = [i for i in (self.layers or []) if i not in mamba]
            if bad:
                raise ConfigError(f"{where}: layers {bad} are not Mamba layers of the student (Mamba layers: {sorted(mamba)})")

    def fingerprint(self) -> dict:
        d = asdict(self)
        d["train"] = {k: v for k, v in d["train"].items() if k not in RESUME_MAY_CHANGE}
        if self.data is not None:
            d["data"] = _data_fingerprint(self.data)
        return d


def _data_fingerprint(cfg: DataConfig) -> dict:
    d = {k: v for k, v in asdict(cfg).items() if k != "specs"}
    if not d.get("group_by_length"):  # runs from before the option resume as they are
        d.pop("group_by_length", None)
    if d.get("chat") is None:  # unset (as the model declares) fingerprints as the old default, so older runs resume
        d["chat"] = True
    d["specs"] = cfg.describe()
    return d


# ---------------------------------------------------------------- models


def as_teacher_model(teacher) -> ThinkfastForCausalLM:
    """Any teacher (thinkfast all-attention model, HF Llama, path) as a frozen thinkfast all-attention model."""
    if isinstance(teacher, ThinkfastForCausalLM):
        if teacher.config.role != "teacher":
            raise ConfigError(f"the teacher is a thinkfast {teacher.config.role} model; a teacher has attention in every layer")
        model = teacher
    else:
        model = from_teacher(teacher, kind="teacher", share_weights=True)  # frozen: its tensors can be the teacher's
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def check_compatible(teacher_cfg, student_cfg, kind: str) -> None:
    """Refuse a teacher/student pair a stage cannot work with, naming the first mismatch."""
    keys = ["vocab_size"]
    if kind in ("matrix", "hidden"):
        keys += ["d_model", "n_layers", "n_heads", "head_dim_", "rope_theta"]
    for k in keys:
        a = teacher_cfg.hd if k == "head_dim_" else getattr(teacher_cfg, k)
        b = student_cfg.hd if k == "head_dim_" else getattr(student_cfg, k)
        if a != b:
            name = "head size" if k == "head_dim_" else k
            raise ConfigError(
                f"teacher and student configs differ: {name} {a} vs {b}; build the student from this teacher "
                "(thinkfast.models.from_teacher or --student llamba|hybrid)"
            )


def _group_of(name: str, lm) -> str | None:
    parts = name.split(".")
    if parts[0] in ("embed", "lm_head"):
        return "embed"
    if parts[0] == "norm":
        return "norm"
    if parts[0] == "layers":
        i = int(parts[1])
        if parts[2] in ("input_norm", "mlp_norm"):
            return "norm"
        if parts[2] == "mlp":
            return "mlp"
        if parts[2] == "mixer":
            return "attn" if lm.layers[i].is_attention else "mamba"
    return None


def set_trainable(student: ThinkfastForCausalLM, predicate) -> list[tuple[str, nn.Parameter]]:
    """requires_grad on the student's parameters that `predicate(name)` selects, off elsewhere."""
    out = []
    for name, p in student.lm.named_parameters():
        on = bool(predicate(name))
        p.requires_grad_(on)
        if on:
            out.append((name, p))
    return out


def _fsdp2():
    """(fully_shard, FSDPModule): public in torch.distributed.fsdp from torch 2.6, under _composable before."""
    try:
        from torch.distributed.fsdp import FSDPModule, fully_shard
    except ImportError:
        from torch.distributed._composable.fsdp import FSDPModule, fully_shard
    return fully_shard, FSDPModule


def fsdp_runs_on_cpu() -> bool:
    """FSDP2 on CPU tensors (gloo), as measured here: torch 2.4 and 2.5 make CUDA streams ("FSDP requires CUDA
    for streams"), 2.6 calls a CUDA-only `Stream.record_event`, 2.7 runs."""
    return torch.__version__ >= "2.7"


@contextlib.contextmanager
def gathered(module: nn.Module):
    """Full parameters of an FSDP-sharded module inside the block (no-op for an ordinary module)."""
    if _is_fsdp(module):
        module.unshard()
        try:
            yield
        finally:
            module.reshard()
    else:
        yield


def layer_inputs(lm, input_ids: torch.Tensor, upto: int):
    """Run blocks 0..upto-1: returns ([h_0 .. h_upto] with h_i the input of block i, rope)."""
    T = input_ids.shape[1]
    positions = torch.arange(T, device=input_ids.device).expand(input_ids.shape[0], T)
    rope = lm.rotary(positions)
    with gathered(lm):
        h = lm.embed(input_ids)
    hs = [h]
    for i in range(upto):
        h = lm.layers[i](h, rope)
        hs.append(h)
    return hs, rope


# ---------------------------------------------------------------- tasks


class _Task:
    name = "task"
    weight_decay_applies = True

    def __init__(self, teacher: ThinkfastForCausalLM | None, student: ThinkfastForCausalLM):
        self.teacher = teacher
        self.model = student
        self._trainable: list[tuple[str, nn.Parameter]] = []

    def to(self, device):
        self.model.to(device)
        if self.teacher is not None and not _is_fsdp(self.teacher.lm):
            self.teacher.to(device)
        self.model.train()
        return self

    def trainable(self):
        return self._trainable


def _is_fsdp(module) -> bool:
    return isinstance(module, _fsdp2()[1])


class AlignTask(_Task):
    """MOHAWK stages 1 (matrix orientation) and 2 (hidden-state alignment) over many layers at once."""

    def __init__(self, teacher, student, kind: str, layers: list[int] | None = None, train_mlp: bool = False, name=None):
        super().__init__(teacher, student)
        self.kind = kind
        self.name = name or kind
        cfg = student.model_config
        self.layers = sorted(layers) if layers else cfg.mamba_layers
        chosen = set(self.layers)

        def pick(n):
            parts = n.split(".")
            if parts[0] != "layers" or int(parts[1]) not in chosen:
                return False
            return parts[2] == "mixer" or (kind == "hidden" and train_mlp and parts[2] in ("mlp", "mlp_norm"))

        self._trainable = set_trainable(student, pick)
        # the mixing matrix reads only in_proj's B, C and dt rows: decoupled weight decay would shrink the x and z
        # rows (copied from the teacher's V) with nothing optimising them
        self.weight_decay_applies = kind != "matrix"

    def count(self, batch) -> int:
        return int(batch["real"].sum())

    def loss(self, batch):
        ids, mask = batch["input_ids"], batch["real"]
        t_lm, s_lm = self.teacher.lm, self.model.lm
        with torch.no_grad():
            hs, rope = layer_inputs(t_lm, ids, max(self.layers) + 1)
        total = None
        parts = {}
        s_dtype = s_lm.embed.weight.dtype  # a student in another precision than its teacher reads its inputs in its own
        for i in self.layers:
            h_in = hs[i]
            if self.kind == "matrix":
                with torch.no_grad(), gathered(t_lm.layers[i]):
                    A = t_lm.layers[i].mixer.matrix(t_lm.layers[i].input_norm(h_in), rope)  # (B, H, T, T)
                    u = s_lm.layers[i].input_norm(h_in.to(s_dtype))  # the norm is frozen here: no graph needed
                M = s_lm.layers[i].mixer.matrix(u, rope)
                l = matrix_loss(A, M, mask, reduction="sum")
            else:
                out = s_lm.layers[i](h_in.to(s_dtype), rope)
                l = hidden_loss(hs[i + 1], out, mask, reduction="sum")
            parts[f"layer{i}"] = l.detach()
            total = l if total is None else total + l
        # mean over layers keeps the scale independent of depth; parts log each layer's own loss
        return total / len(self.layers), parts


class KDTask(_Task):
    """End-to-end distillation on the teacher's token distributions (MOHAWK stage 3, hybrid KD, KL+CE)."""

    def __init__(self, teacher, student, loss: str = "forward_kl", ce_weight: float = 0.0, temperature: float = 1.0,
                 positions: str = "all", freeze=(), chunk_tokens=None, name="kd"):
        super().__init__(teacher, student)
        self.name, self.kind, self.ce_weight, self.temperature = name, loss, ce_weight, temperature
        self.positions, self.chunk_tokens = positions, chunk_tokens
        self._ce_scale: float | None = None  # set by count() for the whole batch
        frozen = set(freeze)
        lm = student.lm
        self._trainable = set_trainable(student, lambda n: _group_of(n, lm) not in frozen)

    def _mask(self, batch):
        return batch["real"] if self.positions == "all" else batch["targets"] != IGNORE

    def count(self, batch) -> int:
        """Positions the KL averages over. The trainer calls it with each whole batch before its micro-batches'
        losses: the CE term is scaled here so that it averages over the solution tokens it is computed on (as
        SFT's and HF's labels loss do), not over every counted position."""
        n = int(self._mask(batch).sum())
        self._ce_scale = n / max(1, int((batch["targets"] != IGNORE).sum()))
        return n

    def loss(self, batch):
        ids = batch["input_ids"]
        s_out = self.model.lm(ids, compute_logits=False)
        t_lm = self.teacher.lm
        with torch.no_grad():
            t_out = t_lm(ids, compute_logits=False)
        with gathered(t_lm):
            w_t = t_lm.head_weight.detach()
            if _is_fsdp(t_lm):
                w_t = w_t.clone()  # the gathered storage is freed on reshard; chunk recompute needs it later
        scale = 1.0
        if self.ce_weight:  # CE per solution token once the trainer divides by count() (else this batch's own ratio)
            scale = self._ce_scale if self._ce_scale is not None else (
                int(self._mask(batch).sum()) / max(1, int((batch["targets"] != IGNORE).sum())))
        loss, parts = vocab_loss(
            s_out.last_hidden, self.model.lm.head_weight, self._mask(batch), t_out.last_hidden, w_t,
            batch["targets"], self.kind, self.temperature, self.ce_weight * scale, self.chunk_tokens, reduction="sum",
        )
        return loss, {**parts, "ce": parts["ce"] * scale}


class SFTTask(_Task):
    """Cross entropy on the trained targets (worked solutions; prompts masked unless the data trains them)."""

    def __init__(self, model, freeze=(), chunk_tokens=None, name="sft"):
        super().__init__(None, model)
        self.name, self.chunk_tokens = name, chunk_tokens
        frozen = set(freeze)
        lm = model.lm
        self._trainable = set_trainable(model, lambda n: _group_of(n, lm) not in frozen)

    def count(self, batch) -> int:
        return int((batch["targets"] != IGNORE).sum())

    def loss(self, batch):
        out = self.model.lm(batch["input_ids"], compute_logits=False)
        mask = batch["targets"] != IGNORE
        loss, parts = vocab_loss(out.last_hidden, self.model.lm.head_weight, mask, targets=batch["targets"],
                                 kind=None, ce_weight=1.0, chunk_tokens=self.chunk_tokens, reduction="sum")
        return loss, {}


def warn_if_half_precision(model, what: str) -> None:
    """Training updates smaller than a bf16/fp16 weight's precision are lost; the CLI trains fp32 weights (and
    `TrainConfig(bf16=True)` autocasts the compute), so a half-precision model from Python gets a warning."""
    dtype = next((p.dtype for p in model.parameters() if p.dtype in (torch.bfloat16, torch.float16)), None)
    if dtype is not None:
        log.warning("the %s's weights are %s: AdamW updates below their precision are lost; train a float32 copy "
                    "(model.float(); TrainConfig(bf16=True) still computes in bf16 on a GPU)", what,
                    str(dtype).removeprefix("torch."))


def check_stages_can_run(stages: list[StageConfig], student: ThinkfastForCausalLM) -> None:
    """What `train` would refuse only when a stage starts (after earlier stages trained, and the run folder was
    written, so that fixing the setting no longer resumes it): bf16 without a GPU, a stage with nothing to train, a
    batch the processes cannot share."""
    info = dist_info()
    lm = student.lm
    for stage in stages:
        uses_bf16(stage.train, pick_device(stage.train, info), stage.label)
        if stage.train.batch_size % info.world:  # each process takes an equal share of every batch
            raise ConfigError(f"stage {stage.label}: batch_size={stage.train.batch_size} must be divisible by the "
                              f"{info.world} processes; give {option('--batch-size', 'batch_size')} a multiple of "
                              f"{info.world}, or launch fewer processes")
        frozen = set(stage.freeze)
        if stage.kind in ("kd", "sft") and all(_group_of(n, lm) in frozen for n, _ in lm.named_parameters()):
            raise ConfigError(f"stage {stage.label}: nothing to train (every parameter is frozen: "
                              f"{option('--freeze', 'freeze')} {','.join(stage.freeze)}); freeze fewer groups")


def make_task(stage: StageConfig, teacher, student):
    if stage.kind in ("matrix", "hidden"):
        return AlignTask(teacher, student, stage.kind, stage.layers, stage.train_mlp, stage.label)
    if stage.kind == "kd":
        loss = stage.loss or ("forward_kl" if student.config.role == "llamba" else "reverse_kl")
        return KDTask(teacher, student, loss, stage.ce_weight, stage.temperature, stage.positions, stage.freeze,
                      stage.chunk_tokens, stage.label)
    return SFTTask(student, stage.freeze, stage.chunk_tokens, stage.label)


# ---------------------------------------------------------------- running stages


def declared_prompt_settings(model) -> dict:
    """The prompt settings a model's config declares (`prompt_style`), as `thinkfast sample` reads them."""
    style = getattr(getattr(model, "config", None), "prompt_style", None)
    return dict(style) if isinstance(style, dict) else {}


def _declare_trained_instruction(model, source: "_DataSource", stages: list[StageConfig], declared: dict) -> None:
    """A model trained on other prompts than it declares says so in its config, so that `thinkfast sample` prompts
    it as it was trained (the last stage's prompts: SFT's, where it has one)."""
    cfg = source._config(stages[-1])
    if not isinstance(cfg, DataConfig):
        return
    style = dict(getattr(model.config, "prompt_style", None) or {})
    if cfg.instruction != (declared.get("instruction") or "auto"):
        style["instruction"] = cfg.instruction
    style.pop("chat", None)  # chat and its template variables as the last stage trained them (chat is the default)
    style.pop("template_kwargs", None)
    if not cfg.chat:
        if has_chat_template(source.tokenizer):  # without a template every prompt is plain anyway
            style["chat"] = False
    elif cfg.template_kwargs:
        style["template_kwargs"] = dict(cfg.template_kwargs)
    if style != (getattr(model.config, "prompt_style", None) or {}):
        model.config.prompt_style = style


def _as_data_config(data) -> DataConfig | DataMix:
    if isinstance(data, (DataConfig, DataMix)):
        return data
    if isinstance(data, str):
        return DataConfig(specs=[data])
    if isinstance(data, (list, tuple)):
        return DataConfig(specs=list(data))
    raise ConfigError(f"data: expected a DataConfig, a DataMix, a spec string or a list of specs, got {type(data).__name__}")


# a cut example costs the alignment stages only positions; KD and SFT never learn how it ends
CUT_MATTERS = ("kd", "sft")


class _DataSource:
    """Packs data per stage (each stage may use its own row length), tokenising each spec once.
    `per_stage=False` (held-out data) ignores the stages' own data and packs the same data for every stage."""

    def __init__(self, data, tokenizer, per_stage: bool = True, cache: dict | None = None, declared: dict | None = None):
        self.declared = declared or {}  # the prompt settings of a DataConfig that sets none (the model's prompt_style)
        self.default = _as_data_config(data)
        self.tokenizer = tokenizer
        self.per_stage = per_stage
        self.cache: dict = {} if cache is None else cache
        self.built: dict[int, DataMix] = {}

    def _config(self, stage: StageConfig):
        cfg = (stage.data if self.per_stage else None) or self.default
        if isinstance(cfg, DataConfig):  # unset prompt settings: the prompts the model was trained on
            cfg = cfg.with_declared(self.declared, check=True)
        return cfg

    def prepare(self, stages: list[StageConfig]) -> None:
        """Read, tokenise and pack every stage's data up front: a bad spec fails before anything is written.

        Cut examples are reported once per source and row length, naming every stage that shares them (kd and
        sft on the same data used to print the same line twice)."""
        cut: dict[tuple, tuple[PackedRows, list[str]]] = {}
        for stage in stages:
            self.built[id(stage)] = mix = self.for_stage(stage, warn=False)
            if stage.kind in CUT_MATTERS and not isinstance(self._config(stage), DataMix):
                for rows in mix.sources:
                    if rows.n_truncated:
                        cut.setdefault((rows.name, rows.seq_len, rows.n_truncated), (rows, []))[1].append(stage.label)
        for rows, labels in cut.values():
            if self.per_stage:
                warn_cut_examples(rows, ", ".join(labels))
            else:
                warn_cut_examples(rows, "held-out, " + ", ".join(labels), lost="not evaluated")
        for stage in stages:  # rows whose prompt fills them leave SFT no target: left out, never trained as loss 0
            if stage.kind == "sft":
                self.built[id(stage)] = _rows_with_targets(self.built[id(stage)], stage, "held-out" if not self.per_stage else "")

    def for_stage(self, stage: StageConfig, warn: bool = True) -> DataMix:
        if id(stage) in self.built:
            return self.built[id(stage)]
        cfg = self._config(stage)
        if isinstance(cfg, DataMix):
            return cfg
        # held-out rows are read in their plain shuffled order: grouped, the first rows would share one length
        return build_data(cfg, self.tokenizer, stage.train.seq_len, self.cache, warn_cut=warn and stage.kind in CUT_MATTERS,
                          batch_size=stage.train.batch_size if self.per_stage else 0)

    def describe(self, stage: StageConfig):
        cfg = self._config(stage)
        return {"mix": cfg.summary()} if isinstance(cfg, DataMix) else _data_fingerprint(cfg)


def _rows_with_targets(mix: DataMix, stage: StageConfig, what: str = "") -> DataMix:
    """`mix` without the rows that hold no solution token within seq_len (a prompt that fills its row, a cut
    example): an SFT step on them logs a loss of 0 and trains nothing. A source left with none is refused."""
    sources, left_out, total = [], 0, 0
    label = f"{stage.label} ({what})" if what else stage.label
    for rows in mix.sources:
        keep = (rows.targets != IGNORE).any(1)
        if not bool(keep.any()):
            raise ConfigError(f"{label}: no example{f' of {rows.name}' if rows.name else ''} has a solution token within "
                              f"seq_len {rows.seq_len} (the prompts fill the rows); raise --seq-len")
        left_out, total = left_out + int((~keep).sum()), total + len(rows)
        sources.append(rows if bool(keep.all()) else
                       PackedRows(rows.input_ids[keep], rows.targets[keep], rows.real[keep], rows.n_examples,
                                  rows.n_truncated, rows.name, rows.packed))
    if not left_out:
        return mix
    log.warning("%s: %s of %s rows hold no solution token within seq_len %d (their prompts fill them); they are left "
                "out (raise --seq-len to train them)", label, f"{left_out:,}", f"{total:,}", mix.seq_len)
    return DataMix(sources, mix.weights.tolist(), seed=mix.seed, group=mix.group)


def _held_out(eval_data, tokenizer, stages: list[StageConfig], declared: dict | None = None) -> _DataSource | None:
    """Held-out data packed for every stage up front, so a bad spec fails before anything is written."""
    if eval_data is None:
        return None
    held_out = _DataSource(eval_data, tokenizer, per_stage=False, declared=declared)
    held_out.prepare(stages)
    return held_out


def _prepare_out(out_dir: Path, run: dict, resume: bool) -> None:
    """Refuse to mix runs: a new run needs an empty or absent folder; --resume needs the same settings.

    Every process checks before any process writes (barriers), so rank 0's run.json never fails rank 1's check.
    """
    dist_info()
    barrier()
    _check_out_dir(out_dir, run, resume)
    barrier()
    if dist_info().main:
        clear_leftovers(out_dir, deep=True)  # what killed writes left (temporary checkpoints: GBs on a real model)
        if not (out_dir / "run.json").is_file():
            atomic_write_json(out_dir / "run.json", run)


def run_disk_bytes(model: nn.Module, n_stages: int) -> int:
    """What a run writes at its peak: each stage keeps its final weights, the running stage's checkpoint (weights
    and Adam's two moments) is written beside the previous one before replacing it, and the final model."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    moments = sum(2 * p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return (n_stages + 1) * weights + 2 * (weights + moments)


def warn_if_disk_short(out_dir: Path, model: nn.Module, n_stages: int) -> None:
    """A warning at the start rather than a failed checkpoint later: the run still starts (the estimate is rough)."""
    if not dist_info().main:
        return
    line = disk_space_line(out_dir, run_disk_bytes(model, n_stages) - folder_bytes(out_dir), "this run")
    if line:
        log.warning("%s (checkpoints and the final model); free some space or choose another --out, or it stops "
                    "at the first checkpoint that does not fit", line)


def _check_out_dir(out_dir: Path, run: dict, resume: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():  # the CLI checks --out first; from Python this was a bare OSError
        raise ConfigError(f"{out_dir} is a file, not a folder; give out_dir a new or empty folder")
    marker = out_dir / "run.json"
    if marker.is_file():
        try:
            saved = json.loads(marker.read_text())
        except json.JSONDecodeError:
            raise CheckpointError(f"{marker} is damaged; choose a new {option('--out', 'out_dir')}") from None
        theirs, ours = (saved.get("command") if isinstance(saved, dict) else None), run.get("command")
        if theirs and ours and theirs != ours:  # another command's run: --resume could never continue it
            raise CheckpointError(f"{out_dir} holds a `thinkfast {theirs}` run, not a `thinkfast {ours}` one; choose a new {option('--out', 'out_dir')}")
        if not resume:
            raise CheckpointError(f"{out_dir} already holds a run; pass {option('--resume', 'resume=True')} to continue it, "
                                  f"or choose a new {option('--out', 'out_dir')}")
        if _started_before_sampled_digest(saved, run):  # such a run compares its embeddings' digest only
            run = {**run, "teacher": {k: v for k, v in run["teacher"].items() if k != "weights_sampled"}}
        if saved != run:
            raise CheckpointError(
                f"{out_dir} holds a run with other settings ({setting_changes(saved, run)}); resume with the same "
                f"settings, or choose a new {option('--out', 'out_dir')}"
            )
        return
    if out_dir.exists() and any(not is_leftover(p) for p in out_dir.iterdir()):  # a killed first write is no run
        raise CheckpointError(f"{out_dir} is not empty and holds no thinkfast run; choose a new {option('--out', 'out_dir')}")


def _started_before_sampled_digest(saved, run: dict) -> bool:
    teacher = saved.get("teacher") if isinstance(saved, dict) else None
    return isinstance(teacher, dict) and "weights_sampled" not in teacher and "weights_sampled" in run.get("teacher", {})


def save_final(model: ThinkfastForCausalLM, out_dir: Path, tokenizer=None) -> None:
    """save_pretrained (+ tokenizer) into out_dir, each file written under a temporary name, then renamed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".final.tmp-", dir=out_dir))
    try:
        with failed_writes_as_os_errors(out_dir):
            model.save_pretrained(tmp, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
        usual_permissions(tmp)
        for f in tmp.iterdir():
            os.replace(f, out_dir / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _model_fingerprint(model: ThinkfastForCausalLM, weights: bool = False) -> dict:
    d = model.model_config.to_dict()
    if weights:  # cheap digests, so resuming against another teacher of the same shape is caught
        w = model.lm.embed.weight.detach().reshape(-1)[:4096].float()
        w = w.double().cpu()
        d["weights_digest"] = f"{float((w * torch.arange(1, w.numel() + 1, dtype=torch.float64)).sum()):.6g}"
        d["weights_sampled"] = _sampled_weights_digest(model)
    return d


def _sampled_weights_digest(model: nn.Module, per_tensor: int = 256) -> str:
    """A hash of `per_tensor` evenly spaced values of every parameter: a fine-tune that left the embeddings as they
    were (frozen, or a merged LoRA) changes it, where the embeddings' first values alone did not."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        flat = p.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // per_tensor)][:per_tensor].float().cpu()
        h.update(name.encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def run_stages(
    teacher: ThinkfastForCausalLM | None,
    student: ThinkfastForCausalLM,
    source: _DataSource,
    stages: list[StageConfig],
    out_dir: Path | None,
    resume: bool,
    progress: ProgressArg,
    callback=None,
    held_out: _DataSource | None = None,
    stop_after: str | None = None,
) -> list[TrainResult]:
    results = []
    for k, stage in enumerate(stages):
        stage_dir = out_dir / "stages" / f"{k + 1:02d}-{stage.label}" if out_dir is not None else None
        if teacher is not None:
            check_compatible(teacher.model_config, student.model_config, stage.kind)
        task = make_task(stage, teacher, student)
        data = source.for_stage(stage)
        fp = {"stage": stage.fingerprint(), "data": source.describe(stage), "student": _model_fingerprint(student)}
        res = train(
            task, data, stage.train,
            ckpt_dir=stage_dir / "ckpt" if stage_dir is not None else None,
            log_path=out_dir / "train_log.jsonl" if out_dir is not None else None,
            resume=resume, progress=progress, fingerprint=json.loads(json.dumps(fp)), callback=callback,
            eval_data=held_out.for_stage(stage) if held_out is not None else None,
        )
        results.append(res)
        if stage.label == stop_after:
            break
    return results


def shard_teacher(teacher: ThinkfastForCausalLM, device: torch.device) -> None:
    """FSDP for a teacher too large for one device: blocks and the rest sharded across the processes.

    Only the teacher is sharded (it only runs forward); the student stays replicated. The stages gather a
    sharded module's weights explicitly (`gathered`) where they use it outside its forward.
    """
    fully_shard = _fsdp2()[0]
    if dist_info().world <= 1:
        raise ConfigError("--fsdp-teacher shards the teacher across processes: launch with torchrun --nproc_per_node N")
    if device.type != "cuda" and not fsdp_runs_on_cpu():
        raise ConfigError(f"--fsdp-teacher on a CPU needs torch 2.7 or newer (this is torch {torch.__version__}, whose "
                          "FSDP needs CUDA); upgrade torch, or drop --fsdp-teacher")
    teacher.to(device)
    for block in teacher.lm.layers:
        fully_shard(block)
    fully_shard(teacher.lm)
    with torch.no_grad():  # FSDP initialises lazily from the first forward: make the root run first
        teacher.lm(torch.zeros(1, 1, dtype=torch.long, device=device), compute_logits=False)


def distill(
    teacher,
    student,
    data,
    stages: list[StageConfig],
    tokenizer=None,
    out_dir: str | os.PathLike | None = None,
    resume: bool = False,
    progress: ProgressArg = True,
    attn_layers: list[int] | None = None,
    fsdp_teacher: bool = False,
    callback=None,
    eval_data=None,
    examples_cache: dict | None = None,
    stop_after: str | None = None,
) -> ThinkfastForCausalLM:
    """Distil `teacher` into `student` through `stages`, in order.

    teacher: a thinkfast all-attention model, an HF Llama model or a path (converted once to thinkfast's
    all-attention model). student: a ThinkfastForCausalLM, or "llamba" / "hybrid" to build one from the teacher
    (`attn_layers` for the hybrid). data: a DataConfig, a list of data specs, or a ready DataMix; each stage may
    carry its own. out_dir: checkpoints per stage (`stages/NN-kind/ckpt`), `train_log.jsonl`, `run.json`, and
    at the end the student as a save_pretrained folder (+ tokenizer). resume: continue a killed run in out_dir.
    callback(step, record): called after every optimizer step of every stage (record: the last log record).
    eval_data: held-out examples (same forms as data, one set for every stage): each stage logs its own loss on
    them (`TrainConfig.eval_every`, `eval_rows`) as `eval_loss` records in train_log.jsonl.
    examples_cache: a dict kept across calls, so that runs on the same data specs (with the same tokenizer
    object) read and tokenise them once (the demo's two students); by default each call reads its own.
    stop_after: a stage's label: return once it has finished, leaving the later stages to a call with the same
    arguments and resume=True (possibly in another process); nothing final is saved.
    Returns the trained student (on the training device, in eval mode).
    """
    if not stages:
        raise ConfigError("no stages: give at least one of matrix, hidden, kd, sft")
    if stop_after is not None:
        if stop_after not in [s.label for s in stages]:
            raise ConfigError(f"stop_after={stop_after!r} names no stage; the stages are {[s.label for s in stages]}")
        if out_dir is None:
            raise ConfigError("stop_after needs an out_dir: the later stages resume from its checkpoints")
    t_model = as_teacher_model(teacher)
    if isinstance(student, str):
        # fp32 master weights, as the CLI trains (a bf16 teacher's copy would round most AdamW updates away)
        student = from_teacher(t_model, kind=student, attn_layers=attn_layers).float()
    if not isinstance(student, ThinkfastForCausalLM):
        raise ConfigError(f"student: expected a ThinkfastForCausalLM or 'llamba' / 'hybrid', got {type(student).__name__}")
    warn_if_half_precision(student, "student")
    for s in stages:
        s.validate(student.model_config)
        if s.kind != "sft":
            check_compatible(t_model.model_config, student.model_config, s.kind)
    labels = [s.label for s in stages]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"stages {labels}: give repeated kinds distinct names (StageConfig(name=...)); logs and checkpoints are keyed by name")
    declared = declared_prompt_settings(t_model)  # a DataConfig's unset prompt settings: the teacher's prompts
    source = _DataSource(data, tokenizer, cache=examples_cache, declared=declared)
    out = Path(out_dir) if out_dir is not None else None
    with run_lock(out):
        return _distill(t_model, student, source, stages, tokenizer, out, resume, progress, fsdp_teacher, callback,
                        eval_data, stop_after, declared)


def run_lock(out: Path | None):
    """One run at a time in a run folder (`<out>.lock` beside it, held by the main process): two would both
    write its log and checkpoints (a second `--resume` of a killed run, two demos on one --out)."""
    if out is None or int(os.environ.get("RANK", "0") or 0) > 0:
        return contextlib.nullcontext()
    out.parent.mkdir(parents=True, exist_ok=True)
    return HeldLock.beside(out, "let it finish, or choose another " + option("--out", "out_dir"))


def _distill(t_model, student, source, stages, tokenizer, out, resume, progress, fsdp_teacher, callback, eval_data,
             stop_after, declared) -> ThinkfastForCausalLM:
    check_stages_can_run(stages, student)
    if out is not None:  # the run's record needs only the data's description, not the data
        run = json.loads(json.dumps({
            "command": "distill",
            "teacher": _model_fingerprint(t_model, weights=True),
            "student": _model_fingerprint(student),
            "stages": [s.fingerprint() for s in stages],
            "data": source.describe(StageConfig("kd")),
        }))
        _check_out_dir(out, run, resume)  # before the data is read and tokenised (minutes for a large set)
    source.prepare(stages)
    held_out = _held_out(eval_data, tokenizer, stages, declared)
    if out is not None:
        _prepare_out(out, run, resume)
        warn_if_disk_short(out, student, len(stages))
    if fsdp_teacher:
        shard_teacher(t_model, pick_device(stages[0].train, dist_info()))
    results = run_stages(t_model, student, source, stages, out, resume, progress, callback, held_out, stop_after)
    student.eval()
    _declare_trained_instruction(student, source, stages, declared)
    if out is not None and dist_info().main and len(results) == len(stages):
        save_final(student, out, tokenizer)
    return student


def sft(
    model,
    data,
    train_cfg: TrainConfig | None = None,
    tokenizer=None,
    out_dir: str | os.PathLike | None = None,
    resume: bool = False,
    progress: ProgressArg = True,
    freeze: list[str] | tuple = (),
    name: str = "sft",
    callback=None,
    eval_data=None,
    chunk_tokens: int | None = None,
) -> ThinkfastForCausalLM:
    """Supervised fine-tuning (CE on worked solutions, prompts masked) of any thinkfast model, or an HF Llama
    (converted to thinkfast's all-attention model). Also trains a randomly initialised model from scratch.
    out_dir: `stages/01-sft/ckpt`, `train_log.jsonl`, `run.json` and the final save_pretrained folder.
    eval_data: held-out examples whose loss is logged as in `distill`. chunk_tokens: positions per vocabulary chunk
    in the CE (default: ~256 MiB of fp32 logits)."""
    if not isinstance(model, ThinkfastForCausalLM):
        model = from_teacher(model, kind="teacher")
    stage = StageConfig("sft", train=train_cfg or TrainConfig(), freeze=list(freeze), chunk_tokens=chunk_tokens, name=name)
    stage.validate(model.model_config)
    warn_if_half_precision(model, "model")
    declared = declared_prompt_settings(model)
    source = _DataSource(data, tokenizer, declared=declared)
    out = Path(out_dir) if out_dir is not None else None
    with run_lock(out):
        return _sft(model, stage, source, tokenizer, out, resume, progress, callback, eval_data, declared)


def _sft(model, stage, source, tokenizer, out, resume, progress, callback, eval_data, declared) -> ThinkfastForCausalLM:
    check_stages_can_run([stage], model)
    if out is not None:
        run = json.loads(json.dumps({"command": "sft", "model": _model_fingerprint(model),
                                     "stages": [stage.fingerprint()], "data": source.describe(stage)}))
        _check_out_dir(out, run, resume)  # before the data is read and tokenised (train-teacher: 150k examples)
    source.prepare([stage])
    held_out = _held_out(eval_data, tokenizer, [stage], declared)
    if out is not None:
        _prepare_out(out, run, resume)
        warn_if_disk_short(out, model, 1)
    run_stages(None, model, source, [stage], out, resume, progress, callback, held_out)
    model.eval()
    _declare_trained_instruction(model, source, [stage], declared)
    if out is not None and dist_info().main:
        save_final(model, out, tokenizer)
    return model
