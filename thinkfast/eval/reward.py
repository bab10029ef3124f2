"""Reward models for Best-of-N: a trainable outcome reward model (ORM) and a process reward model (PRM) wrapper.

ORM. A scalar head on a small LM backbone (a thinkfast checkpoint, or any Llama-family checkpoint, with its
tokenizer) reads "question + completion + end of turn" and predicts P(correct), trained with class-balanced
binary cross-entropy on completions labelled by our grader. What the head reads (`features`):
- "likelihood" (default): the mean and the minimum log-probability the backbone's own LM head gives the
  completion's tokens, its end of turn included. A sampled chain of thought usually goes wrong at one unlikely
  token (a slip that temperature let through, or a stop in the middle of a number), which this flags;
- "pooled": two pooled vectors of the final hidden states, the *last token's* (where a causal model has seen
  everything) and the *mean over the completion's tokens*;
- "both".
On the demo (a few hundred training completions, 2,560 held-out ones) the two likelihood numbers rank completions
with AUC 0.93-0.94 and the pooled states with 0.60-0.63 (`benchmarks/orm_features.md`): the pooled states need far
more than a few hundred examples. One score per completion, because the label is one outcome per completion; a per-token
value head (Cobbe et al. 2021) needs more data still.

Cost decides the default: about a minute of a 2-core CPU for a few hundred completions and a ~5M-parameter
backbone buys roughly one forward pass over the data, so by default the backbone is frozen (`train_layers=0`):
one pass extracts the pooled features, and the head is a logistic regression fitted on them (standardised,
L2-regularised, full batch) in well under a second. With `train_layers=N` the top N blocks are fine-tuned with the
head; the frozen lower blocks still run once (their outputs are cached) and each epoch costs only the top blocks.

PRM. `ProcessRewardModel` wraps RLHFlow/Llama3.1-8B-PRM-Deepseek-Data (or any chat LM trained the same way):
the completion is split into steps on blank lines; the conversation is user(question + step 1), assistant("+"),
user(step 2), assistant("+"), ...; the score of step i is P("+") / (P("+") + P("-")) at the position where the
i-th assistant turn's "+" is predicted. All steps come from one forward pass. Step scores aggregate by
last / min / mean / product.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import CheckpointError, ConfigError, DataError, ThinkfastError, option
from ..utils import atomic_dir, check_out_path, wrong_field_type

ORM_CONFIG = "reward_config.json"
HEAD_FILE = "head.safetensors"
AGGREGATIONS = ("last", "min", "mean", "product")
LIKELIHOOD_FEATURES = 2  # mean and min log-probability of the completion's tokens
FEATURE_SETS = ("likelihood", "pooled", "both")
RESYNC_TOKENS = 16  # after a cut in the middle of a completion, tokens left out of the likelihood: they lack context
LOGIT_CHUNK = 1024  # positions per LM-head product: (chunk x vocab) floats at a time, even for 128k vocabularies


# ----------------------------------------------------------------------------------------------- backbone


def load_backbone(path, device=None, dtype=torch.float32):
    """(ThinkfastForCausalLM, tokenizer) from a thinkfast or Llama-family checkpoint folder (or GGUF file)."""
    from ..models.teacher import load_thinkfast

    if not Path(path).exists():
        raise CheckpointError(f"backbone {path} does not exist; point {option('--backbone', 'backbone')} at a checkpoint folder (a student or teacher)")
    model, tokenizer = load_thinkfast(str(path), dtype=dtype, device=device or "cpu", where="backbone")
    if tokenizer is None:
        raise CheckpointError(f"backbone {path}: no tokenizer found beside the weights; save the tokenizer into that folder")
    return model, tokenizer


def question_text(question: str | None, tokenizer) -> str:
    """How the ORM sees the question: the backbone's chat template (user turn, assistant turn opened) when it
    has one, else a plain 'Question: ... Answer:' header."""
    if not question:
        return ""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)
    return f"Question: {question}\nAnswer: "


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


@dataclass
class ORMConfig:
    max_len: int = 1024  # tokens per example: the question's head + the completion's tail (where the answer is)
    question_tokens: int = 256  # at most this many tokens of question
    train_layers: int = 0  # top blocks fine-tuned with the head (0: frozen backbone, logistic head)
    uses_question: bool = True
    features: str = "likelihood"  # what the head reads: one of FEATURE_SETS
    # without a question, BOS leads the completion so its first token is scored (an empty completion was scored
    # as perfectly likely); reward models trained before this read without it
    lead_token: bool = True
    stats: dict = field(default_factory=dict)

    @property
    def reads_likelihood(self) -> bool:
        return self.features in ("likelihood", "both")

    @property
    def reads_pooled(self) -> bool:
        return self.features in ("pooled", "both")


@dataclass
class Encoded:
    ids: list[int]
    start: int  # index of the first completion token
    scored_from: int  # first token in the likelihood features (after start when the completion was cut)


def check_reward_model_out(out_dir, flag: str = "out_dir") -> None:
    """A reward model replaces its whole folder: only an empty one, a new one or an earlier reward model's."""
    check_out_path(out_dir, flag, marker=ORM_CONFIG)


class OutcomeRewardModel(nn.Module):
    def __init__(self, backbone, tokenizer, cfg: ORMConfig):
        super().__init__()
        self.backbone = backbone  # ThinkfastForCausalLM
        self.tokenizer = tokenizer
        self.cfg = cfg
        if cfg.features not in FEATURE_SETS:
            raise ConfigError(f"reward model features {cfg.features!r}: use one of {', '.join(FEATURE_SETS)}")
        d = backbone.lm.cfg.d_model
        # on [last token ; mean over the completion] and/or [mean log-prob ; min log-prob]
        self.head = nn.Linear((2 * d if cfg.reads_pooled else 0) + (LIKELIHOOD_FEATURES if cfg.reads_likelihood else 0), 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        n = backbone.lm.cfg.n_layers
        if not 0 <= cfg.train_layers <= n:
            raise ConfigError(f"{option('--train-layers ', 'train_layers=')}{cfg.train_layers}: the backbone has {n} layers; use 0..{n}")
        if cfg.train_layers and not cfg.reads_pooled:
            raise ConfigError(f"train_layers={cfg.train_layers} fine-tunes blocks under the pooled features, which "
                              f"features={cfg.features!r} does not read; use features 'both' or 'pooled', or train_layers 0")
        self.split = n - cfg.train_layers  # blocks [0, split) are frozen

    @property
    def identity(self) -> str:
        """What `score` records beside each reward (`reward_model`), so rewards of two models never mix unseen: a
        hash of the settings, the head and (evenly spaced values of) every backbone tensor, the same in memory,
        saved, loaded or moved."""
        import hashlib

        h = hashlib.sha256(json.dumps({k: v for k, v in asdict(self.cfg).items() if k != "stats"}, sort_keys=True).encode())
        for name, v in [*self.head.state_dict().items(), *self.backbone.state_dict().items()]:
            flat = v.detach().reshape(-1)
            picked = flat[torch.linspace(0, flat.numel() - 1, min(flat.numel(), 4096), device=flat.device).long()]
            h.update(f"{name}{tuple(v.shape)}".encode())
            h.update(picked.float().cpu().numpy().tobytes())
        return "orm:" + h.hexdigest()[:16]

    @property
    def device(self):
        return self.head.weight.device

    def encode(self, question: str | None, completion: str) -> Encoded:
        # a model trained on completions alone reads them alone: a question in front changes every feature
        q = self._question_ids(question) if self.cfg.uses_question else []
        if not q and self.cfg.lead_token:  # something to predict the first token from: it is scored too
            lead = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.tokenizer.eos_token_id
            q = [lead if lead is not None else 0]
        c = _ids(self.tokenizer, completion)
        eos = self.tokenizer.eos_token_id
        if self.cfg.reads_likelihood and c and eos is not None:
            c.append(eos)  # the end of the turn is scored too: a chain cut short ends on an unlikely stop
        keep = max(1, self.cfg.max_len - len(q))
        cut = len(c) > keep
        c = c[max(0, len(c) - keep):] if c else [self.tokenizer.eos_token_id or 0]
        # after a cut the first tokens are predicted without their context; skip them unless nothing would be left
        scored_from = len(q) + (min(RESYNC_TOKENS, len(c) - 1) if cut else 0)
        return Encoded(q + c, len(q), scored_from)

    def _question_ids(self, question: str | None) -> list[int]:
        """The templated question within question_tokens: a long question loses the end of its text, never the
        template's close of the user turn and opening of the answer, which the completion follows."""
        if not question or self.cfg.question_tokens == 0:
            return []
        ids = _ids(self.tokenizer, question_text(question, self.tokenizer))
        over = len(ids) - self.cfg.question_tokens
        if over <= 0:
            return ids
        content = _ids(self.tokenizer, question)
        shorter = self.tokenizer.decode(content[: max(1, len(content) - over - 1)])  # one more: a merge at the cut
        return _ids(self.tokenizer, question_text(shorter, self.tokenizer))[-self.cfg.question_tokens:]

    def _rope(self, T: int, B: int):
        pos = torch.arange(T, device=self.device).expand(B, T)
        return self.backbone.lm.rotary(pos)

    def lower(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Frozen part: embeddings and blocks [0, split). (B, T) -> (B, T, D). Right padding needs no mask:
        the model is causal, so pads after a sequence never reach its real tokens."""
        lm = self.backbone.lm
        rope = self._rope(input_ids.shape[1], input_ids.shape[0])
        h = lm.embed(input_ids)
        for layer in lm.layers[: self.split]:
            h = layer(h, rope)
        return h

    def features(self, h: torch.Tensor, start: torch.Tensor, last: torch.Tensor, ids: torch.Tensor | None = None,
                 scored_from: torch.Tensor | None = None) -> torch.Tensor:
        """Blocks [split, n) and the final norm, then the configured features. h (B, T, D) -> (B, head.in_features) fp32."""
        lm = self.backbone.lm
        rope = self._rope(h.shape[1], h.shape[0])
        for layer in lm.layers[self.split:]:
            h = layer(h, rope)
        h = lm.norm(h)
        out = []
        if self.cfg.reads_pooled:
            hf = h.float()
            t = torch.arange(h.shape[1], device=h.device)
            span = ((t[None, :] >= start[:, None]) & (t[None, :] <= last[:, None])).float()  # (B, T) completion tokens
            mean = (hf * span[..., None]).sum(1) / span.sum(1, keepdim=True).clamp(min=1)
            out += [hf[torch.arange(h.shape[0], device=h.device), last], mean]
        if self.cfg.reads_likelihood:
            if ids is None:
                raise ConfigError("this reward model reads the completion's likelihood; pass the token ids to features()")
            out.append(self.likelihood(h.detach(), ids, start if scored_from is None else scored_from, last))
        return torch.cat(out, dim=-1)

    @torch.no_grad()
    def likelihood(self, h: torch.Tensor, ids: torch.Tensor, first: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """(B, 2): mean and min log-prob of tokens first..last, each predicted from the final hidden state before it.
        The vocabulary-wide products run on the scored positions only, LOGIT_CHUNK at a time."""
        lm = self.backbone.lm
        out = torch.zeros(h.shape[0], LIKELIHOOD_FEATURES, device=h.device)
        for row in range(h.shape[0]):
            lo, hi = max(int(first[row]), 1), int(last[row])
            if hi < lo:  # a completion of one token right after nothing: no prediction to score
                continue
            logps = []
            for a in range(lo, hi + 1, LOGIT_CHUNK):
                b = min(a + LOGIT_CHUNK, hi + 1)
                logits = lm.logits(h[row, a - 1: b - 1]).float()
                target = ids[row, a:b]
                logps.append(logits.gather(1, target[:, None])[:, 0] - torch.logsumexp(logits, dim=-1))
            lp = torch.cat(logps)
            out[row, 0], out[row, 1] = lp.mean(), lp.min()
        return out

    def trainable_parameters(self) -> list[nn.Parameter]:
        lm = self.backbone.lm
        blocks = [p for layer in lm.layers[self.split:] for p in layer.parameters()]
        return [*blocks, *(lm.norm.parameters() if blocks else []), *self.head.parameters()]

    def _pad(self, encs: list[Encoded]):
        T = max(len(e.ids) for e in encs)
        ids = torch.zeros(len(encs), T, dtype=torch.long)
        for i, e in enumerate(encs):
            ids[i, : len(e.ids)] = torch.tensor(e.ids)
        start = torch.tensor([e.start for e in encs])
        last = torch.tensor([len(e.ids) - 1 for e in encs])
        scored_from = torch.tensor([e.scored_from for e in encs])
        return ids.to(self.device), start.to(self.device), last.to(self.device), scored_from.to(self.device)

    @torch.no_grad()
    def pooled(self, encs: list[Encoded], batch_size: int = 16, progress=None) -> torch.Tensor:
        """Features of every example with the current weights: (N, head.in_features)."""
        out = torch.zeros(len(encs), self.head.in_features)
        for batch in _length_batches([len(e.ids) for e in encs], batch_size):
            ids, start, last, scored_from = self._pad([encs[i] for i in batch])
            out[batch] = self.features(self.lower(ids), start, last, ids, scored_from).cpu()
            if progress is not None:
                progress.update(len(batch))
        return out

    @torch.no_grad()
    def score_encoded(self, encs: list[Encoded], batch_size: int = 16, progress=None) -> np.ndarray:
        self.eval()
        feats = self.pooled(encs, batch_size, progress).to(self.device)
        return torch.sigmoid(self.head(feats).squeeze(-1)).double().cpu().numpy()

    def score(self, questions: list[str | None], completions: list[str], batch_size: int = 16, progress=None) -> np.ndarray:
        """P(correct) for each (question, completion)."""
        questions, completions = _paired_texts(questions, completions)
        return self.score_encoded([self.encode(q, c) for q, c in zip(questions, completions)], batch_size, progress)

    # ---- files

    def save(self, out_dir) -> None:
        from safetensors.torch import save_file

        check_reward_model_out(out_dir)
        with atomic_dir(out_dir) as tmp:
            self.backbone.save_pretrained(tmp / "backbone", safe_serialization=True)
            self.tokenizer.save_pretrained(tmp / "backbone")
            save_file({k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()}, str(tmp / HEAD_FILE))
            (tmp / ORM_CONFIG).write_text(json.dumps({"type": "orm", **asdict(self.cfg)}, indent=2) + "\n")

    @classmethod
    def load(cls, path, device=None) -> "OutcomeRewardModel":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = Path(path)
        cfg_path = path / ORM_CONFIG
        if not cfg_path.is_file():
            raise CheckpointError(f"{path}: no {ORM_CONFIG}; is this a folder written by `thinkfast train-rm`?")
        try:
            raw = json.loads(cfg_path.read_text())
        except json.JSONDecodeError:
            raise CheckpointError(f"{cfg_path}: not valid JSON; retrain the reward model with `thinkfast train-rm`") from None
        if not isinstance(raw, dict) or raw.pop("type", None) != "orm":
            raise CheckpointError(f"{cfg_path}: not an outcome reward model")
        raw.setdefault("features", "pooled")  # folders written before the likelihood features existed
        raw.setdefault("lead_token", False)  # and before a completion without a question was led by BOS
        cfg = _checked_config(raw, cfg_path)  # before the backbone loads, and before a bad value fails mid-scoring
        if not (path / "backbone").is_dir():  # score has no --backbone: the folder itself is incomplete
            raise CheckpointError(f"{path}: the reward model's backbone/ folder is missing; restore it, or retrain the "
                                  "reward model with `thinkfast train-rm`")
        backbone, tokenizer = load_backbone(path / "backbone", device)
        try:
            orm = cls(backbone, tokenizer, cfg)
        except ConfigError as e:  # settings that do not fit this backbone: name the file they came from
            raise CheckpointError(f"{cfg_path}: {e}") from None
        try:
            orm.head.load_state_dict(load_file(str(path / HEAD_FILE)))
        except FileNotFoundError:
            raise CheckpointError(f"{path / HEAD_FILE} is missing; retrain the reward model with `thinkfast train-rm`") from None
        except (OSError, RuntimeError, SafetensorError) as e:  # cut short, overwritten, or a head of another shape
            raise CheckpointError(f"{path / HEAD_FILE} is damaged or incomplete ({str(e).splitlines()[0][:200]}); "
                                  "retrain the reward model with `thinkfast train-rm`") from None
        return orm.to(device or "cpu").eval()


def _checked_config(raw: dict, where: Path) -> ORMConfig:
    """ORMConfig from a reward_config.json, each value checked: a hand-edited one would otherwise fail deep in
    encoding or loading, as a traceback."""
    fix = "fix that value or retrain the reward model with `thinkfast train-rm`"
    known = {f for f in ORMConfig.__dataclass_fields__}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise CheckpointError(f"{where}: unknown key {unknown[0]!r} (a reward model has {', '.join(sorted(known))}); {fix}")
    cfg = ORMConfig(**raw)
    wrong = wrong_field_type(cfg)
    if wrong:
        raise CheckpointError(f"{where}: {wrong}; {fix}")
    for key, low in (("max_len", 1), ("question_tokens", 0), ("train_layers", 0)):
        if getattr(cfg, key) < low:
            raise CheckpointError(f"{where}: {key}={getattr(cfg, key)} must be at least {low}; {fix}")
    if cfg.features not in FEATURE_SETS:
        raise CheckpointError(f"{where}: features={cfg.features!r} must be one of {', '.join(FEATURE_SETS)}; {fix}")
    return cfg


def _length_batches(lengths: list[int], batch_size: int, rng: np.random.Generator | None = None) -> list[list[int]]:
    """Indices grouped by similar length (little padding); batch order shuffled when `rng` is given."""
    order = np.argsort(lengths, kind="stable")
    batches = [order[i: i + batch_size].tolist() for i in range(0, len(order), batch_size)]
    if rng is not None:
        rng.shuffle(batches)
    return batches


def auc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """Area under the ROC curve: P(a correct completion outscores a wrong one), ties counting half."""
    scores, labels = np.asarray(scores), np.asarray(labels, dtype=bool)
    pos, neg = scores[labels], scores[~labels]
    if len(pos) == 0 or len(neg) == 0:
        return None
    return float((pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean())


MIN_VAL_PROBLEMS = 10  # fewer problems than this: all of them train, and no validation AUC is reported


@dataclass
class ORMTraining:
    epochs: int = 4  # passes when blocks are fine-tuned (train_layers > 0)
    lr: float = 1e-3  # head learning rate when blocks are fine-tuned; the blocks use lr * block_lr_scale
    block_lr_scale: float = 0.1
    head_steps: int = 300  # full-batch steps of the logistic head on frozen features (train_layers = 0)
    head_lr: float = 0.05
    l2: float = 1e-2  # L2 penalty on the head weights (standardised features), against overfitting a few hundred examples
    batch_size: int = 16
    val_fraction: float = 0.1  # of problems, held out for the reported validation AUC
    seed: int = 0
    cache_limit_bytes: int = 2 << 30  # cache the frozen blocks' outputs when they fit


def _balanced_weights(y: np.ndarray) -> np.ndarray:
    """Each class carries half of the loss, whatever the fraction of correct completions."""
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    return np.where(y, len(y) / (2 * n_pos), len(y) / (2 * n_neg))


@contextlib.contextmanager
def _one_thread():
    """Tiny tensors gain nothing from threads, and on a busy machine the thread hand-offs cost 5x the work."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _fit_head(orm: OutcomeRewardModel, X: torch.Tensor, y: np.ndarray, train: ORMTraining) -> list[dict]:
    """Logistic regression on frozen features, then folded into `orm.head` (standardisation included)."""
    with _one_thread():
        return _fit_head_steps(orm, X, y, train)


def _fit_head_steps(orm: OutcomeRewardModel, X: torch.Tensor, y: np.ndarray, train: ORMTraining) -> list[dict]:
    mu, sd = X.mean(0), X.std(0).clamp(min=1e-6)
    Z = (X - mu) / sd
    w = torch.zeros(X.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    target = torch.tensor(y, dtype=torch.float32)
    weight = torch.tensor(_balanced_weights(y), dtype=torch.float32)
    opt = torch.optim.Adam([w, b], lr=train.head_lr)
    history = []
    for step in range(train.head_steps):
        loss = F.binary_cross_entropy_with_logits(Z @ w + b, target, weight=weight) + train.l2 * (w * w).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step + 1 == train.head_steps or (step + 1) % 100 == 0:
            history.append({"step": step + 1, "train_loss": float(loss.detach())})
    with torch.no_grad():  # head(x) = w . (x - mu) / sd + b
        orm.head.weight.copy_((w / sd).to(orm.head.weight)[None, :])
        orm.head.bias.copy_((b - (w * mu / sd).sum()).to(orm.head.bias).reshape(1))
    return history


def _paired_texts(questions, completions) -> tuple[list, list]:
    """One question per completion (a single string is one text, not its characters)."""
    if isinstance(questions, str) or isinstance(completions, str):
        raise ConfigError("score() takes lists: questions=[...] and completions=[...], one question per completion")
    questions, completions = list(questions), list(completions)
    if len(questions) != len(completions):
        raise ConfigError(f"{len(questions)} questions for {len(completions)} completions; give one question (or None) "
                          "per completion")
    return questions, completions


def check_labels(labels) -> np.ndarray:
    """The labels as a bool array; refuses one-class data (cheap: callers check before loading a backbone)."""
    labels = list(labels)
    bad = [x for x in labels if not isinstance(x, (bool, np.bool_, int, np.integer)) or x not in (0, 1)]
    if bad:
        raise DataError(f"label {bad[0]!r}: labels are True (correct) or False (wrong); leave ungraded completions out")
    y = np.array(labels, dtype=bool)
    if y.all() or not y.any():
        raise DataError(f"all {len(y)} graded completions are {'correct' if y.all() else 'wrong'}; a verifier needs both kinds "
                        "to learn from: add samples of the other kind (more problems, more samples per problem, or another model)")
    return y


def train_orm(questions: list[str | None], completions: list[str], labels: list[bool], problem_ids: list[str], backbone,
              tokenizer, cfg: ORMConfig | None = None, train: ORMTraining | None = None, log=print) -> OutcomeRewardModel:
    """Fit an ORM on graded completions. Returns the model with `cfg.stats` filled (sizes, time, validation AUC)."""
    cfg = cfg or ORMConfig()
    train = train or ORMTraining()
    y = check_labels(labels)
    if not len(questions) == len(completions) == len(y) == len(problem_ids):
        raise ConfigError(f"train_orm: {len(questions)} questions, {len(completions)} completions, {len(y)} labels and "
                          f"{len(problem_ids)} problem ids; give one of each per completion")
    torch.manual_seed(train.seed)
    orm = OutcomeRewardModel(backbone, tokenizer, cfg).to(next(backbone.parameters()).device)
    for p in orm.backbone.parameters():
        p.requires_grad_(False)
    encs = [orm.encode(q, c) for q, c in zip(questions, completions)]

    # hold out whole problems, chosen by a hash of the id (stable across runs and files)
    unique = sorted(set(problem_ids))
    n_val = int(len(unique) * train.val_fraction) if len(unique) >= MIN_VAL_PROBLEMS else 0
    val_problems = set(sorted(unique, key=lambda p: zlib.crc32(p.encode()))[:n_val])
    is_val = np.array([p in val_problems for p in problem_ids])
    tr, va = np.nonzero(~is_val)[0], np.nonzero(is_val)[0]
    # why there is no validation AUC, when there is none: said, not silently dropped
    if train.val_fraction == 0:
        no_val = "val_fraction is 0"
    elif len(unique) < MIN_VAL_PROBLEMS:
        no_val = f"{len(unique)} problems; holding some out needs at least {MIN_VAL_PROBLEMS}"
    elif n_val == 0:
        no_val = f"val_fraction {train.val_fraction} of {len(unique)} problems is less than one problem"
    else:
        no_val = None
    if n_val and (y[tr].all() or not y[tr].any()):
        tr, va = np.arange(len(y)), np.array([], dtype=int)
        val_problems = set()
        no_val = "holding problems out would leave only right or only wrong completions to train on"
    elif n_val and (y[va].all() or not y[va].any()):
        no_val = "the held-out problems' completions are all right or all wrong, so they cannot be ranked"
    t0 = time.perf_counter()

    def validate(entry: dict) -> dict:
        if len(va):
            s = orm.score_encoded([encs[i] for i in va], train.batch_size)
            entry["val_auc"] = auc(s, y[va])
        return entry

    if cfg.train_layers == 0:
        X = orm.pooled(encs, train.batch_size)  # the one forward pass over the data
        history = _fit_head(orm, X[tr], y[tr], train)
        if len(va):
            s = torch.sigmoid(orm.head(X[va].to(orm.device)).squeeze(-1)).detach().cpu().numpy()
            history[-1]["val_auc"] = auc(s, y[va])
        log(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in history[-1].items()))
    else:
        history = _fine_tune(orm, encs, y, tr, train, validate, log)
    for p in orm.parameters():
        p.requires_grad_(False)
    orm.eval()
    cfg.stats = {"train_examples": int(len(tr)), "train_correct": int(y[tr].sum()), "val_examples": int(len(va)),
                 "val_problems": len(val_problems), "seconds": round(time.perf_counter() - t0, 2), "history": history}
    if no_val:
        cfg.stats["no_validation"] = no_val
    return orm


def _fine_tune(orm: OutcomeRewardModel, encs: list[Encoded], y: np.ndarray, tr: np.ndarray, train: ORMTraining, validate, log) -> list[dict]:
    """Top blocks + head by minibatch AdamW; the frozen blocks' outputs are computed once when they fit."""
    for p in orm.trainable_parameters():
        p.requires_grad_(True)
    d = orm.backbone.lm.cfg.d_model
    use_cache = orm.split > 0 and sum(len(encs[i].ids) for i in tr) * d * 4 <= train.cache_limit_bytes
    cache: dict[int, torch.Tensor] = {}
    if use_cache:
        with torch.no_grad():
            for batch in _length_batches([len(encs[i].ids) for i in tr], train.batch_size):
                idx = [int(tr[j]) for j in batch]
                ids, _, _, _ = orm._pad([encs[i] for i in idx])
                h = orm.lower(ids)
                for row, i in enumerate(idx):
                    cache[i] = h[row, : len(encs[i].ids)].clone()
    head = list(orm.head.parameters())
    blocks = [p for p in orm.trainable_parameters() if all(p is not q for q in head)]
    opt = torch.optim.AdamW([{"params": head, "lr": train.lr}, {"params": blocks, "lr": train.lr * train.block_lr_scale}], weight_decay=0.0)
    rng = np.random.default_rng(train.seed)
    target = torch.tensor(y, dtype=torch.float32)
    weight = torch.zeros(len(y), dtype=torch.float32)
    weight[tr] = torch.tensor(_balanced_weights(y[tr]), dtype=torch.float32)
    history = []
    for epoch in range(train.epochs):
        orm.train()
        total, count = 0.0, 0
        for batch in _length_batches([len(encs[i].ids) for i in tr], train.batch_size, rng):
            idx = [int(tr[j]) for j in batch]
            ids, start, last, scored_from = orm._pad([encs[i] for i in idx])
            if use_cache:
                h = torch.zeros(len(idx), ids.shape[1], d, device=orm.device, dtype=cache[idx[0]].dtype)
                for row, i in enumerate(idx):
                    h[row, : len(encs[i].ids)] = cache[i]
            else:
                with torch.no_grad():
                    h = orm.lower(ids)
            logits = orm.head(orm.features(h, start, last, ids, scored_from)).squeeze(-1)
            loss = F.binary_cross_entropy_with_logits(logits, target[idx].to(logits.device), weight=weight[idx].to(logits.device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
        entry = validate({"epoch": epoch + 1, "train_loss": total / max(count, 1)})
        history.append(entry)
        log(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in entry.items()))
    return history


# ----------------------------------------------------------------------------------------------- PRM

def split_steps(completion: str) -> list[str]:
    """Steps of a chain of thought: paragraphs separated by blank lines (at least one, possibly empty)."""
    steps = [s.strip() for s in re.split(r"\n\s*\n", completion.strip()) if s.strip()]
    return steps or [completion.strip()]


def aggregate(step_scores, how: str) -> float:
    if how not in AGGREGATIONS:
        raise ConfigError(f"step-score aggregation {how!r}: use one of {', '.join(AGGREGATIONS)}")
    s = np.asarray(step_scores, dtype=np.float64)
    return float({"last": lambda: s[-1], "min": s.min, "mean": s.mean, "product": s.prod}[how]())


def _template_ids(tokenizer, messages, add_generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    if hasattr(out, "keys"):  # transformers 5 may return a BatchEncoding
        out = out["input_ids"]
    return list(out)


class ProcessRewardModel:
    """RLHFlow-style PRM: P("+") of the assistant turn after each step."""

    def __init__(self, model, tokenizer, aggregation: str = "min", plus: str = "+", minus: str = "-"):
        aggregate([1.0], aggregation)  # validate early
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError("the PRM's tokenizer has no chat template; the RLHFlow PRM needs its Llama-3.1 chat template")
        self.model, self.tokenizer, self.aggregation = model.eval(), tokenizer, aggregation
        self.plus_id = _ids(tokenizer, plus)[-1]
        self.minus_id = _ids(tokenizer, minus)[-1]
        if self.plus_id == self.minus_id:
            raise ConfigError(f"the PRM's tokenizer maps {plus!r} and {minus!r} to the same token")
        self.source = getattr(model, "name_or_path", None) or type(model).__name__

    @property
    def identity(self) -> str:
        """Recorded beside each reward, as OutcomeRewardModel.identity: the checkpoint and the aggregation."""
        return f"prm:{Path(str(self.source)).name or self.source}:{self.aggregation}"

    @classmethod
    def from_pretrained(cls, name_or_dir: str, aggregation: str = "min", device=None, dtype=None, trust_remote_code: bool = False):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from ..models.teacher import hub_kwargs

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = dtype or (torch.bfloat16 if str(device).startswith("cuda") else torch.float32)
        hub = {} if Path(name_or_dir).exists() else hub_kwargs(name_or_dir, "PRM")  # offline and not cached: fail at once
        try:
            tok = AutoTokenizer.from_pretrained(name_or_dir, trust_remote_code=trust_remote_code, **hub)
            model = AutoModelForCausalLM.from_pretrained(name_or_dir, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code,
                                                         **hub)
        except OSError as e:
            raise CheckpointError(f"PRM {name_or_dir}: could not load ({str(e).splitlines()[0][:200]}); check the path or hub id (network?)") from None
        except (ValueError, KeyError) as e:  # a folder that holds no model (a train-rm folder, a report)
            hint = (f"; it is a `thinkfast train-rm` folder: pass it as {option('--reward-model', 'reward_model')}"
                    if (Path(name_or_dir) / ORM_CONFIG).is_file() else "; point it at a PRM checkpoint folder or hub id")
            raise CheckpointError(f"PRM {name_or_dir}: not a model folder ({str(e).splitlines()[0][:120]}){hint}") from None
        return cls(model.to(device), tok, aggregation)

    def conversation(self, question: str, steps: list[str]) -> list[dict]:
        msgs = []
        for i, step in enumerate(steps):
            msgs.append({"role": "user", "content": f"{question} {step}" if i == 0 else step})
            msgs.append({"role": "assistant", "content": "+"})
        return msgs

    def positions(self, question: str, steps: list[str]) -> tuple[list[int], list[int]]:
        """Token ids of the whole conversation and, per step, the index whose logits predict that step's "+"."""
        msgs = self.conversation(question, steps)
        full = _template_ids(self.tokenizer, msgs, False)
        where = []
        for i in range(len(steps)):
            prefix = _template_ids(self.tokenizer, msgs[: 2 * i + 1], True)
            L = len(prefix)
            if full[:L] != prefix or L >= len(full) or full[L] != self.plus_id:
                raise ThinkfastError("the PRM's chat template does not render the conversation as a prefix of itself "
                                     "followed by '+'; this wrapper expects RLHFlow's Llama-3.1 format")
            where.append(L - 1)
        return full, where

    @torch.no_grad()
    def step_scores_many(self, questions: list[str], completions: list[str], batch_size: int = 4, progress=None) -> list[list[float]]:
        device = next(self.model.parameters()).device
        encoded = [self.positions(q, split_steps(c)) for q, c in zip(questions, completions)]
        out: list[list[float] | None] = [None] * len(encoded)
        for batch in _length_batches([len(e[0]) for e in encoded], batch_size):
            T = max(len(encoded[i][0]) for i in batch)
            ids = torch.zeros(len(batch), T, dtype=torch.long)
            mask = torch.zeros(len(batch), T, dtype=torch.long)
            for row, i in enumerate(batch):
                seq = encoded[i][0]
                ids[row, : len(seq)] = torch.tensor(seq)
                mask[row, : len(seq)] = 1
            pm = self._plus_minus_logits(ids.to(device), mask.to(device), [encoded[i][1] for i in batch])
            for row, i in enumerate(batch):
                out[i] = pm[row].softmax(-1)[:, 0].cpu().tolist()
            if progress is not None:
                progress.update(len(batch))
        return out  # type: ignore[return-value]

    def _plus_minus_logits(self, ids, mask, where: list[list[int]]) -> list[torch.Tensor]:
        """Per row, (steps, 2) logits of "+" and "-" at the given positions. With an HF causal LM, only those
        positions go through the head: a (B, T, 128k) logits tensor of an 8B Llama would not fit."""
        decoder, head = getattr(self.model, "model", None), getattr(self.model, "lm_head", None)
        if decoder is not None and head is not None:
            hidden = decoder(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, T, D)
            rows = torch.cat([torch.full((len(w),), r, dtype=torch.long) for r, w in enumerate(where)])
            cols = torch.cat([torch.tensor(w, dtype=torch.long) for w in where])
            picked = head(hidden[rows.to(ids.device), cols.to(ids.device)])[:, [self.plus_id, self.minus_id]].float()
        else:
            logits = self.model(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
            picked = torch.cat([logits[r, w][:, [self.plus_id, self.minus_id]].float() for r, w in enumerate(where)])
        return list(picked.split([len(w) for w in where]))

    def step_scores(self, question: str, completion: str) -> list[float]:
        return self.step_scores_many([question], [completion])[0]

    def score(self, questions: list[str], completions: list[str], batch_size: int = 4, progress=None) -> np.ndarray:
        questions, completions = _paired_texts(questions, completions)
        return np.array([aggregate(s, self.aggregation) for s in self.step_scores_many(questions, completions, batch_size, progress)])
