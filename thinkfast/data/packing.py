"""Tokenisation and packing: problems or text -> fixed-length training rows with loss targets; weighted mixing.

A row is three (T,) tensors:
  input_ids  token ids, right-padded with `pad_id`
  targets    the next token to predict at each position, or IGNORE (-100) where nothing is trained there
             (prompt tokens, padding, the boundary between two packed examples)
  real       True on real (non-pad) tokens
Right padding only: with causal mixers the pads sit after every real token and change nothing before them, so
no attention mask is needed and the SSM state never sees a pad.

Examples are rendered with the tokenizer's chat template when it has one (`thinkfast.data.prompts`), the prompt
and the worked solution tokenised separately so the split is exact; `text:` sources train on the whole text.
`pack=True` places whole examples one after another in a row until the next does not fit (greedy, in shuffled
order); `pack=False` gives each example a row of its own, so every row starts at a prompt, as sampling does. An
example longer than the row is truncated (its end, the final answer included, is never trained): choose a
`seq_len` that holds the longest example.

`DataMix` draws rows from several sources with weights. The rows of a batch are a pure function of the mix's
seed and a small state dict (rows drawn so far, per-source cursor), which checkpoints save: a resumed run sees
the same batches as an uninterrupted one, and every process of a data-parallel run draws the same global batch.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from ..errors import ConfigError, DataError, option
from .prompts import PromptStyle, render_example
from .sources import Problem, load_problems, parse_spec

IGNORE = -100
log = logging.getLogger(__name__)


@dataclass
class Example:
    ids: list[int]
    n_prompt: int  # the first n_prompt tokens are context: their next-token predictions are not trained
    source: str = ""


@dataclass
class DataConfig:
    """What to train on. `specs` are data spec strings (DESIGN.md) or lists of Problems."""

    specs: list = field(default_factory=list)
    weights: list[float] | None = None  # relative, one per spec; default equal
    pack: bool = True
    instruction: str | None = None  # PromptStyle instruction: auto | boxed | hash | none | literal text (None: what
    # the teacher, or the model `sft` trains, declares in its config's prompt_style, else auto)
    chat: bool | None = None  # use the tokenizer's chat template when it has one (None: unless the model declares
    # `chat: false`, with the template variables it declares)
    template_kwargs: dict | None = None  # variables for the chat template (Qwen3: {"enable_thinking": false})
    train_prompt: bool = False  # also train next-token targets on prompt tokens (CE); KD stages choose separately
    seed: int = 0
    group_by_length: bool = False  # one-example rows: batches of rows of similar length (less padding)

    def describe(self) -> list[str]:
        return [s if isinstance(s, str) else f"<{len(s)} problems>" for s in self.specs]

    def with_declared(self, declared: dict | None, check: bool = False) -> "DataConfig":
        """A copy whose unset prompt settings (None) are those a model declares in its config (`prompt_style`):
        its instruction, else auto; its template unless it declares `chat: false`, with its template variables.
        `check`: refuse template variables given for a model that declares it trained without the template."""
        declared = declared if isinstance(declared, dict) else {}
        instruction = self.instruction if self.instruction is not None else declared.get("instruction") or "auto"
        chat, template_kwargs = self.chat, self.template_kwargs
        if chat is None:
            chat = declared.get("chat", True) is not False
            if check and template_kwargs and not chat:  # the variables would go unused in silence
                raise ConfigError(
                    "the model declares it was trained without its chat template (prompt_style chat: false in its "
                    f"config.json), so {option('--chat-template-kwargs', 'template_kwargs')} would go unused; add "
                    f"{option('--chat', 'chat=True')} to train through the template")
            if chat and template_kwargs is None:
                template_kwargs = declared.get("template_kwargs") or None
        return replace(self, instruction=instruction, chat=chat, template_kwargs=template_kwargs)


# ---------------------------------------------------------------- tokenisation


def _encode_batch(tokenizer, texts: list[str], add_special_tokens: bool, chunk: int = 4096) -> list[list[int]]:
    # in slices: a fast tokenizer's per-text encodings (offsets, token strings) cost far more than the ids
    out: list[list[int]] = []
    for i in range(0, len(texts), chunk):
        out += tokenizer(texts[i:i + chunk], add_special_tokens=add_special_tokens)["input_ids"]
    return out


def _is_text_source(spec) -> bool:
    return isinstance(spec, str) and parse_spec(spec).scheme == "text"


def encode_problems(
    problems: list[Problem], tokenizer, style: PromptStyle | None = None, text: bool = False, source: str = ""
) -> list[Example]:
    """Problems -> Examples (prompt ids + completion ids). `text=True`: each problem's solution is a plain document."""
    if tokenizer is None:
        raise DataError("tokenising data needs a tokenizer; give the teacher's (or "
                        + option("--tokenizer DIR", "the tokenizer argument") + ")")
    eos = getattr(tokenizer, "eos_token_id", None)
    if text:
        ids = _encode_batch(tokenizer, [p.solution or "" for p in problems], add_special_tokens=True)
        return [Example(x + ([eos] if eos is not None else []), 0, source) for x in ids]
    style = style or PromptStyle()
    prompts, completions = [], []
    for p in problems:
        if p.solution is None:  # no worked solution: the final answer alone is the completion
            p = Problem(p.id, p.question, p.answer, p.kind, "", p.meta)
        prompt, completion = render_example(p, tokenizer, style)
        prompts.append(prompt)
        completions.append(completion)
    # a chat template writes its own special tokens (BOS included); plain prompts get the tokenizer's defaults,
    # as a sampler calling tokenizer(prompt) would
    templated = style.chat and bool(getattr(tokenizer, "chat_template", None))
    p_ids = _encode_batch(tokenizer, prompts, add_special_tokens=not templated)
    c_ids = _encode_batch(tokenizer, completions, add_special_tokens=False)
    return [Example(p + c, len(p), source) for p, c in zip(p_ids, c_ids)]


def load_examples(spec, tokenizer, style: PromptStyle | None = None) -> list[Example]:
    """A data spec string (or a list of Problems) -> Examples."""
    if isinstance(spec, str):
        problems = load_problems(spec)
        name = spec
    else:
        problems, name = list(spec), f"<{len(spec)} problems>"
    if not problems:
        raise DataError(f"data spec {name!r}: no problems or documents in it; check the file and offset/limit")
    return encode_problems(problems, tokenizer, style, text=_is_text_source(spec), source=name)


# ---------------------------------------------------------------- packing


@dataclass
class PackedRows:
    input_ids: torch.Tensor  # (N, T) int32 (half the memory of int64; batches come out int64)
    targets: torch.Tensor  # (N, T) int32, IGNORE where untrained
    real: torch.Tensor  # (N, T) bool
    n_examples: int = 0
    n_truncated: int = 0
    name: str = ""
    packed: bool = True  # False: one example per row (rows then hold far fewer real tokens than seq_len)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    @property
    def row_tokens(self) -> float:
        """Tokens a row counts for in a token budget: seq_len for packed rows, the mean real tokens of a row for
        one-example rows (whose trailing pads a batch of them drops)."""
        return float(self.seq_len) if self.packed else float(self.real.sum()) / max(1, len(self))


def pack_examples(
    examples: list[Example], seq_len: int, pad_id: int = 0, pack: bool = True, train_prompt: bool = False,
    seed: int = 0, name: str = "",
) -> PackedRows:
    """Examples -> rows of `seq_len` tokens (whole examples, greedy, in a seeded shuffled order)."""
    if seq_len < 2:
        raise DataError(f"seq_len={seq_len}: rows need at least 2 tokens")
    if not examples:
        raise DataError(f"{name or 'data'}: no examples to pack")
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    rows: list[list[tuple[list[int], int]]] = []
    current: list[tuple[list[int], int]] = []
    used = 0
    truncated = 0
    for i in order:
        ex = examples[i]
        ids, n_prompt = ex.ids, ex.n_prompt
        if len(ids) > seq_len:
            ids, truncated = ids[:seq_len], truncated + 1
        if not ids:
            continue
        if current and (not pack or used + len(ids) > seq_len):
            rows.append(current)
            current, used = [], 0
        current.append((ids, n_prompt))
        used += len(ids)
    if current:
        rows.append(current)

    # filled with whole-array indexing: a tensor op per example took ~2 s for the demo's 20k examples
    N = len(rows)
    input_ids = torch.full((N, seq_len), pad_id, dtype=torch.int32)
    targets = torch.full((N, seq_len), IGNORE, dtype=torch.int32)
    real = torch.zeros((N, seq_len), dtype=torch.bool)
    pieces = [(r, ids, n_prompt) for r, row in enumerate(rows) for ids, n_prompt in row]
    if pieces:
        lengths = np.fromiter((len(ids) for _, ids, _ in pieces), dtype=np.int64, count=len(pieces))
        row_of = np.fromiter((r for r, _, _ in pieces), dtype=np.int64, count=len(pieces))
        # where each piece starts in its row: pieces of one row follow each other from position 0
        ends = np.cumsum(lengths)
        row_start = np.zeros(len(pieces), dtype=bool)
        row_start[0] = True
        row_start[1:] = row_of[1:] != row_of[:-1]
        before = np.where(row_start, ends - lengths, 0)
        start = ends - lengths - np.maximum.accumulate(before)
        first = np.fromiter(((1 if train_prompt else max(1, n)) for _, _, n in pieces), dtype=np.int64, count=len(pieces))
        piece = np.repeat(np.arange(len(pieces)), lengths)
        offset = np.arange(int(ends[-1])) - np.repeat(ends - lengths, lengths)
        rr = torch.from_numpy(row_of[piece])
        cc = torch.from_numpy(start[piece] + offset)
        flat = torch.from_numpy(np.fromiter(itertools.chain.from_iterable(ids for _, ids, _ in pieces), dtype=np.int32,
                                            count=int(ends[-1])))
        input_ids[rr, cc] = flat
        real[rr, cc] = True
        # position p predicts token p+1 of the same example; trained where that token is completion
        trained = torch.from_numpy(offset >= first[piece])
        targets[rr[trained], cc[trained] - 1] = flat[trained]
    return PackedRows(input_ids, targets, real, len(examples), truncated, name, pack)


# ---------------------------------------------------------------- mixing


def _parse_weights(weights, n: int) -> list[float]:
    if weights is None:
        return [1.0] * n
    weights = [float(w) for w in weights]
    if len(weights) != n:
        raise DataError(f"{option('--data-weights', 'weights')} has {len(weights)} values for {n} data specs; give one "
                        f"weight per {option('--data', 'spec')}")
    if any(w < 0 or not math.isfinite(w) for w in weights) or sum(weights) <= 0:
        raise DataError(f"{option('--data-weights ', 'weights=')}{weights}: weights must be non-negative numbers with a positive sum")
    return weights


DIGEST_ROWS = 4096  # rows per source a data digest reads
GROUP_WINDOW = 64  # batches per window that group_by_length sorts: order stays random beyond a window


class DataMix:
    """Weighted mixture of packed sources; batches are a pure function of (seed, state).

    `group` > 1 (the rows of one batch) draws one-example rows in length-grouped order: each epoch's shuffled
    order is cut into windows of GROUP_WINDOW batches, each window sorted by length into blocks of `group` rows,
    and the blocks shuffled, so a batch from one source pads little and no window is ordered short to long.
    """

    def __init__(self, sources: list[PackedRows], weights: list[float] | None = None, seed: int = 0, group: int = 0):
        if not sources:
            raise DataError(f"no data: give at least one {option('--data spec', 'data spec')}")
        self.sources = sources
        w = _parse_weights(weights, len(sources))
        self.weights = torch.tensor(w, dtype=torch.float64) / sum(w)
        self.seed = int(seed)
        self.group = int(group)
        self._perms: dict[tuple[int, int], torch.Tensor] = {}
        self._digest: str | None = None
        self.state = self.initial_state()

    def initial_state(self) -> dict:
        return {"rows": 0, "cursor": [0] * len(self.sources)}

    @property
    def seq_len(self) -> int:
        return max(s.seq_len for s in self.sources)

    @property
    def row_tokens(self) -> float:
        """Expected tokens of one drawn row, as a token budget counts them (PackedRows.row_tokens)."""
        return float(sum(w * s.row_tokens for w, s in zip(self.weights.tolist(), self.sources)))

    def _perm(self, src: int, epoch: int) -> torch.Tensor:
        key = (src, epoch)
        if key not in self._perms:
            if len(self._perms) > 64:
                self._perms.clear()
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + src * 7919 + epoch)
            perm = torch.randperm(len(self.sources[src]), generator=g)
            if self.group > 1 and not self.sources[src].packed:
                # blocks line up with batches of one source: the first rows finish the batch the last epoch began
                head = (-epoch * len(perm)) % self.group
                perm = torch.cat([perm[:head], _length_grouped(perm[head:], self.sources[src].real.sum(1), self.group, g)])
            self._perms[key] = perm
        return self._perms[key]

    def next_batch(self, rows: int) -> dict[str, torch.Tensor]:
        """The next `rows` rows (the global batch), advancing `self.state`. Trailing all-pad columns are cut."""
        st = self.state
        if len(self.sources) == 1:
            choice = [0] * rows
        else:
            g = torch.Generator().manual_seed(self.seed * 1_000_033 + st["rows"])
            choice = torch.multinomial(self.weights, rows, replacement=True, generator=g).tolist()
        picks = []
        for src in choice:
            c = st["cursor"][src]
            n = len(self.sources[src])
            picks.append((src, int(self._perm(src, c // n)[c % n])))
            st["cursor"][src] = c + 1
        st["rows"] += rows
        T = self.seq_len
        batch = {k: [] for k in ("input_ids", "targets", "real")}
        for src, i in picks:
            s = self.sources[src]
            for k in batch:
                row = getattr(s, k)[i]
                if row.shape[0] < T:  # sources packed at different lengths: pad to the longest
                    fill = {"input_ids": 0, "targets": IGNORE, "real": False}[k]
                    row = torch.cat([row, row.new_full((T - row.shape[0],), fill)])
                batch[k].append(row)
        out = {k: torch.stack(v) for k, v in batch.items()}
        out["input_ids"], out["targets"] = out["input_ids"].long(), out["targets"].long()
        used = int(out["real"].any(0).nonzero().max()) + 1 if out["real"].any() else 1
        return {k: v[:, :used] for k, v in out.items()}

    def state_dict(self) -> dict:
        return {"rows": self.state["rows"], "cursor": list(self.state["cursor"]), "seed": self.seed,
                "sources": [len(s) for s in self.sources], **({"group": self.group} if self.group > 1 else {}),
                "digest": self.digest()}

    def digest(self) -> str:
        """A hash of the rows' tokens (up to DIGEST_ROWS evenly spaced rows per source: cheap for billions of
        tokens): a spec whose content changed (an edited file, another generator version) is other data."""
        if self._digest is None:
            h = hashlib.sha256()
            for s in self.sources:
                rows = torch.linspace(0, len(s) - 1, min(len(s), DIGEST_ROWS)).long() if len(s) else torch.zeros(0).long()
                for t in (s.input_ids, s.targets):
                    h.update(str(tuple(t.shape)).encode())
                    h.update(t[rows].to(torch.int64).numpy().tobytes())
            self._digest = h.hexdigest()[:16]
        return self._digest

    def load_state_dict(self, d: dict) -> None:
        from ..errors import CheckpointError

        if (d.get("sources") != [len(s) for s in self.sources] or d.get("seed") != self.seed
                or d.get("group", 0) != (self.group if self.group > 1 else 0)):
            raise CheckpointError(
                f"checkpoint's data position is for other data ({d.get('sources')} rows, seed {d.get('seed')}; "
                f"now {[len(s) for s in self.sources]}, seed {self.seed}); resume with the same --data and --seq-len"
            )
        if d.get("digest") not in (None, self.digest()):  # checkpoints from before the digest resume as they did
            raise CheckpointError(
                "checkpoint's data is other examples under the same data spec (an edited file, another "
                "reasoning-gym version or dataset revision); resume with the data it trained on, or choose a new "
                f"{option('--out', 'out_dir')}")
        self.state = {"rows": int(d["rows"]), "cursor": [int(c) for c in d["cursor"]]}

    def summary(self) -> str:
        parts = [f"{s.name or i}: {len(s)} rows ({s.n_examples} examples, {s.n_truncated} truncated), weight {w:.2f}"
                 for i, (s, w) in enumerate(zip(self.sources, self.weights.tolist()))]
        return "; ".join(parts)


def _length_grouped(perm: torch.Tensor, lengths: torch.Tensor, group: int, g: torch.Generator) -> torch.Tensor:
    """`perm` reordered so that consecutive blocks of `group` rows have similar lengths (DataMix's `group`)."""
    window = group * GROUP_WINDOW
    out = []
    for start in range(0, len(perm), window):
        chunk = perm[start:start + window]
        chunk = chunk[torch.argsort(lengths[chunk], descending=True, stable=True)]
        blocks = list(torch.split(chunk, group))
        order = torch.randperm(len(blocks), generator=g).tolist()
        out += [blocks[i] for i in order]
    return torch.cat(out)


def pad_id_of(tokenizer) -> int:
    for name in ("pad_token_id", "eos_token_id"):
        v = getattr(tokenizer, name, None)
        if v is not None:
            return int(v)
    return 0


def warn_cut_examples(rows: PackedRows, where: str = "", lost: str = "never trained") -> None:
    """One warning line for a source whose examples do not fit its rows (`where`: e.g. the stages using it;
    `lost`: what happens to the cut ends)."""
    log.warning("%s%s: %d of %d examples are longer than seq_len %d and are cut (their ends %s); "
                "raise --seq-len to keep them whole", f"{where}: " if where else "", rows.name, rows.n_truncated,
                rows.n_examples, rows.seq_len, lost)


def build_data(cfg: DataConfig, tokenizer, seq_len: int, cache: dict | None = None, warn_cut: bool = True,
               batch_size: int = 0) -> DataMix:
    """Load, tokenise and pack every spec of `cfg` at `seq_len`, mixed with its weights.

    `batch_size`: the rows of one batch, which `cfg.group_by_length` groups one-example rows into.
    `cache` (optional dict) keeps tokenised examples across calls, so stages with other row lengths re-pack
    without re-reading or re-tokenising. `warn_cut`: log a warning when examples are longer than the rows.
    """
    if not cfg.specs:
        raise DataError(f"no data: give at least one {option('--data spec', 'data spec in DataConfig.specs')} "
                        "(e.g. gsm8k:../shared/data/gsm8k_train.jsonl)")
    weights = _parse_weights(cfg.weights, len(cfg.specs))
    cfg = cfg.with_declared(None)  # unset settings of a plan nobody resolved against its teacher: the defaults
    instruction = cfg.instruction
    style = PromptStyle(instruction=instruction, chat=cfg.chat, template_kwargs=cfg.template_kwargs)
    pad = pad_id_of(tokenizer)
    sources = []
    for k, spec in enumerate(cfg.specs):
        key = (spec if isinstance(spec, str) else id(spec), instruction, cfg.chat,
               json.dumps(cfg.template_kwargs, sort_keys=True), id(tokenizer))
        if cache is not None and key in cache:
            examples = cache[key]
        else:
            examples = load_examples(spec, tokenizer, style)
            if cache is not None:
                cache[key] = examples
        name = spec if isinstance(spec, str) else f"problems[{k}]"
        rows = pack_examples(examples, seq_len, pad, cfg.pack, cfg.train_prompt, cfg.seed + k, name)
        if rows.n_truncated and warn_cut:
            warn_cut_examples(rows)
        sources.append(rows)
    return DataMix(sources, weights, cfg.seed, group=batch_size if cfg.group_by_length else 0)
