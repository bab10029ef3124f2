"""Data specs -> problems. One string names a source everywhere (CLI, recipes, samples files):

  gsm8k:PATH                                 GSM8K jsonl (`question`, `answer` ending in `#### N`)
  math:PATH                                  MATH jsonl (`problem`, `answer`, optional `solution`)
  jsonl:PATH?question=FIELD&answer=FIELD     any jsonl (`solution=FIELD`, `kind=number|gsm8k|math` optional; a
                                             FIELD may be a dotted path into lists and records: generations.0)
  rg:NAME?size=N&seed=S&KEY=VALUE...         a reasoning-gym generator (extra keys go to its config; sums take
                                             `worked=columns|left|running`, the style of their worked solutions;
                                             `max_chars=N` leaves out items whose question + worked solution
                                             run longer; worked solutions: sums, gcd, and any `answer_cot`)
  hf:ID[:CONFIG]:SPLIT                       a Hugging Face dataset (needs `datasets` and the network; fields as
                                             for jsonl)
  text:PATH                                  plain text (distillation data only; no answers)

Every spec also takes `offset=N` and `limit=N` to select a slice of problems. Any other key is refused: a typo
(`ofset=5`) would otherwise select other problems without a word.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote

from ..errors import DataError
from .worked import STYLES, worked_solution

SCHEMES = ("gsm8k", "math", "jsonl", "rg", "hf", "text")
GRADER_KINDS = ("gsm8k", "math", "number")
CALCULATOR_MARK = re.compile(r"<<[^>]*>>")
RG_RESERVED = {"offset", "limit", "kind", "worked", "max_chars"}  # rg options thinkfast reads; the rest go to the generator
SLICE_KEYS = ("offset", "limit")
# the query keys each scheme reads (rg's generator options are checked against the generator's own config)
SCHEME_KEYS = {
    "gsm8k": SLICE_KEYS,
    "math": SLICE_KEYS,
    "jsonl": ("question", "answer", "solution", "id", "kind", *SLICE_KEYS),
    "hf": ("question", "answer", "solution", "kind", *SLICE_KEYS),
    "text": SLICE_KEYS,
}


@dataclass
class Problem:
    id: str  # stable within its source: used to resume sampling and to join samples with problems
    question: str
    answer: str  # gold final answer ("" for text sources)
    kind: str = "number"  # grader kind: gsm8k | math | number
    solution: str | None = None  # worked solution when the source has one (calculator marks removed)
    meta: dict = field(default_factory=dict)


@dataclass
class DataSpec:
    scheme: str
    target: str  # path, generator name or dataset id
    params: dict[str, str]
    text: str  # the spec as written

    def int_param(self, name: str, default: int | None = None, minimum: int | None = None) -> int | None:
        if name not in self.params:
            return default
        value = self.params[name]
        try:
            n = int(value)
        except ValueError:
            raise DataError(f"data spec {self.text!r}: {name}={value!r} is not an integer") from None
        if minimum is not None and n < minimum:
            raise DataError(f"data spec {self.text!r}: {name}={value} must be at least {minimum}")
        return n

    def slice_params(self) -> tuple[int, int | None]:
        """(offset, limit): a negative one would silently drop problems from the end."""
        return self.int_param("offset", 0, minimum=0), self.int_param("limit", minimum=1)


def parse_spec(spec: str) -> DataSpec:
    if ":" not in spec:
        raise DataError(f"data spec {spec!r}: expected SCHEME:TARGET with SCHEME one of {', '.join(SCHEMES)} (e.g. gsm8k:../shared/data/gsm8k_test.jsonl)")
    scheme, rest = spec.split(":", 1)
    if scheme not in SCHEMES:
        raise DataError(f"data spec {spec!r}: unknown scheme {scheme!r}; use one of {', '.join(SCHEMES)}")
    target, _, query = rest.partition("?")
    if not target:
        raise DataError(f"data spec {spec!r}: nothing after '{scheme}:'")
    params = {}
    for item in filter(None, query.split("&")):
        key, _, value = item.partition("=")
        key = unquote(key)
        if key in params:  # limit=2&limit=3: which one was meant?
            raise DataError(f"data spec {spec!r}: {key}= is given twice; keep one")
        params[key] = unquote(value)  # not unquote_plus: '+' is an operator in rg specs, not a space
    if scheme in SCHEME_KEYS:
        _refuse_unknown_keys(spec, params, SCHEME_KEYS[scheme], f"{scheme} specs")
    return DataSpec(scheme, target, params, spec)


def _refuse_unknown_keys(spec: str, params: dict, accepted, what: str) -> None:
    unknown = [k for k in params if k not in accepted]
    if unknown:
        import difflib

        close = difflib.get_close_matches(unknown[0], accepted, n=1, cutoff=0.7)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise DataError(f"data spec {spec!r}: unknown key {unknown[0]!r}{hint}; {what} take {', '.join(accepted)}")


def empty_spec_hint(spec: str) -> str:
    """What to check when a spec names no problems: the keys that select fewer, else the data itself."""
    try:
        params = parse_spec(spec).params
    except DataError:
        params = {}
    keys = [f"{k}=" for k in ("offset", "limit", "max_chars", "size") if k in params]
    return f"check {', '.join(keys)}" if keys else "is its file empty?"


def check_spec(spec: str) -> DataSpec:
    """Parse a spec and check its options without reading or generating anything: callers run this before
    loading a model, so a typo costs no model load."""
    s = parse_spec(spec)
    s.slice_params()
    if "kind" in s.params:
        _kind(s, "number")
    if s.scheme == "rg":
        _rg_config(s)
        _worked_style(s)
        s.int_param("max_chars", minimum=1)
    return s


def load_problems(spec: str) -> list[Problem]:
    """All problems a spec names, in a stable order."""
    s = parse_spec(spec)
    loader = {"gsm8k": _gsm8k, "math": _math, "jsonl": _jsonl, "rg": _reasoning_gym, "hf": _hf, "text": _text}[s.scheme]
    offset, limit = s.slice_params()  # before loading: a typo fails before a big file is read
    problems = loader(s)
    if s.scheme == "hf":  # sliced while reading: a trace dataset's rows are too many to turn into problems first
        return problems
    return problems[offset: None if limit is None else offset + limit]


def load_questions(spec: str) -> list[str]:
    """The questions a spec names (same order and slice as `load_problems`), cheaper for large generated sets:
    used to drop held-out problems that occur in a training split."""
    s = parse_spec(spec)
    if s.scheme != "rg" or "max_chars" in s.params:  # max_chars filters by the worked solution: build them
        return [p.question for p in load_problems(spec)]
    offset, limit = s.slice_params()
    ds = _rg_dataset(s)
    end = len(ds) if limit is None else min(len(ds), offset + limit)
    return [ds[i]["question"] for i in range(offset, end)]


def _data_file(s: DataSpec) -> Path:
    path = Path(s.target)
    if path.is_dir():
        raise DataError(f"data spec {s.text!r}: {path} is a folder, not a file; give the path of a file in it")
    if not path.is_file():
        hint = (f"; options follow a '?' ({path.name.split('&')[0]}?{path.name.split('&', 1)[1]})"
                if "&" in path.name and "=" in path.name and "?" not in s.text else "")
        raise DataError(f"data spec {s.text!r}: file {path} does not exist{hint}")
    return path


def _read_jsonl(s: DataSpec) -> list[tuple[int, dict]]:
    """(line number, row) of every non-blank line: ids count rows (blank lines skipped), messages name lines."""
    path = _data_file(s)
    rows = []
    with path.open("rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{n}: not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1}); "
                                "re-save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg}); fix or remove that line") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{n}: a JSON {_json_kind(row)}, not an object; write one problem per line as "
                                'an object, e.g. {"question": ..., "answer": ...}')
            rows.append((n, row))
    return rows


def _json_kind(value) -> str:
    return {list: "list", str: "string", bool: "true/false", type(None): "null"}.get(type(value), "number")


_MISSING = object()


def _lookup(row, path: str):
    """A field by name, or by a dotted path into nested records and lists (`generations.0`,
    `messages.1.content`): reasoning datasets keep their chains in lists of generations or chat turns."""
    if isinstance(row, dict) and path in row:  # a field whose own name has a dot
        return row[path]
    value = row
    for part in path.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, (list, tuple)) and part.lstrip("-").isdigit() and -len(value) <= int(part) < len(value):
            value = value[int(part)]
        else:
            return _MISSING
    return value


def _field(row: dict, name: str, s: DataSpec, n: int):
    value = _lookup(row, name)
    if value is _MISSING:
        if s.scheme in ("gsm8k", "math"):  # fixed fields: another file's need the jsonl scheme (or the other one)
            raise DataError(f"{s.target}:{n}: no field {name!r} (fields: {sorted(row)}); is this a {s.scheme} file? Read "
                            f"others as jsonl:{s.target}?question=...&answer=...")
        raise DataError(f"{s.target}:{n}: no field {name!r} (fields: {sorted(row)}); map fields with ?question=...&answer=... "
                        "(a dotted path such as generations.0 or messages.1.content reads into lists and records)")
    return value


def _text_field(row: dict, name: str, s: DataSpec, n: int, allow_empty: bool = False) -> str:
    """A question, gold answer or id: plain text or a number; a list or record (a whole chat) or null is refused
    rather than written into prompts as its Python repr, and so is empty text unless `allow_empty` (an answer:
    distillation data may have worked solutions only)."""
    value = _field(row, name, s, n)
    empty = isinstance(value, str) and not value.strip() and not allow_empty
    if value is None or isinstance(value, (list, dict, bool)) or empty:
        what = "null" if value is None else "empty" if isinstance(value, str) else f"a {type(value).__name__}"
        raise DataError(f"{s.target}:{n}: field {name!r} is {what}, not text; map a text field with ?question=...&answer=..."
                        "&id=... (a dotted path such as messages.0.content reads into lists and records)")
    return str(value)


def _solution_field(row: dict, name: str | None, s: DataSpec, n: int) -> str | None:
    """The worked solution when the spec names one: a named field missing from a row is an error (a typo would
    otherwise train on nothing), an empty or null one is no solution."""
    if not name:
        return None
    value = _field(row, name, s, n)
    return CALCULATOR_MARK.sub("", str(value)) if value else None


def gsm8k_final_answer(answer_text: str) -> str:
    return answer_text.rsplit("####", 1)[-1].strip().replace(",", "")


def _gsm8k(s: DataSpec) -> list[Problem]:
    stem = Path(s.target).stem
    out = []
    for i, (n, row) in enumerate(_read_jsonl(s)):
        full = _text_field(row, "answer", s, n)
        if "####" not in full:
            raise DataError(f"{s.target}:{n}: GSM8K answer has no '#### <number>' line; is this a GSM8K file?")
        solution = CALCULATOR_MARK.sub("", full)
        out.append(Problem(f"{stem}:{i}", _text_field(row, "question", s, n), gsm8k_final_answer(full), "gsm8k", solution))
    return out


def _math(s: DataSpec) -> list[Problem]:
    stem = Path(s.target).stem
    out = []
    for i, (n, row) in enumerate(_read_jsonl(s)):
        meta = {k: row[k] for k in ("subject", "level") if k in row}
        pid = _text_field(row, "unique_id", s, n) if row.get("unique_id") is not None else f"{stem}:{i}"
        solution = row.get("solution")
        if solution is not None and not isinstance(solution, str):
            raise DataError(f"{s.target}:{n}: field 'solution' is a {_json_kind(solution)}, not text; fix that line")
        out.append(Problem(pid, _text_field(row, "problem", s, n), _text_field(row, "answer", s, n), "math",
                           solution or None, meta))
    return out


def _kind(s: DataSpec, default: str) -> str:
    kind = s.params.get("kind", default)
    if kind not in GRADER_KINDS:
        raise DataError(f"data spec {s.text!r}: kind={kind!r}; use one of {', '.join(GRADER_KINDS)}")
    return kind


def _jsonl(s: DataSpec) -> list[Problem]:
    q, a, sol = s.params.get("question", "question"), s.params.get("answer", "answer"), s.params.get("solution")
    idf = s.params.get("id")
    kind = _kind(s, "number")
    stem = Path(s.target).stem
    out = []
    for i, (n, row) in enumerate(_read_jsonl(s)):
        pid = _text_field(row, idf, s, n) if idf else f"{stem}:{i}"
        solution = _solution_field(row, sol, s, n)
        # the row's other plain fields (a difficulty level, a topic) stay with the problem: reports group by them
        used = {part for name in (q, a, sol, idf) if name for part in (name, name.split(".")[0])}
        meta = {k: v for k, v in row.items() if k not in used and isinstance(v, (str, int, float, bool))}
        out.append(Problem(pid, _text_field(row, q, s, n), _text_field(row, a, s, n, allow_empty=True), kind, solution, meta))
    return out


def _rg_value(v: str):
    if "," in v:  # a list option, e.g. operators=+,-
        return tuple(_rg_value(x) for x in v.split(",") if x)
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(v.lower(), v)


def _rg_option_types(name: str) -> dict:
    """Option -> declared type of a reasoning-gym generator's config dataclass ({} when it cannot be read)."""
    import dataclasses
    import typing

    try:
        from reasoning_gym.factory import DATASETS

        config_cls = DATASETS[name][1]
        hints = typing.get_type_hints(config_cls)
        return {f.name: hints.get(f.name, f.type) for f in dataclasses.fields(config_cls)}
    except Exception:  # unknown generator or another reasoning-gym layout: create_dataset reports it
        return {}


def _check_rg_options(s: DataSpec, cfg: dict) -> None:
    """Numeric and true/false options checked against the generator's declared types: reasoning-gym itself
    fails on a string deep inside (a type-comparison error, or a traceback while generating)."""
    declared = _rg_option_types(s.target)
    if declared:  # else reasoning-gym names an unknown generator or option itself
        _refuse_unknown_keys(s.text, s.params, sorted({*declared, "size", "seed"}) + sorted(RG_RESERVED), f"rg:{s.target} specs")
    types = {"size": int, "seed": int, **declared}  # thinkfast sets these two for every generator
    for key, value in cfg.items():
        declared = types.get(key)
        allowed = set(_type_args(declared)) or {declared}
        raw = s.params.get(key, str(value))
        if bool in allowed:
            if not isinstance(value, bool) and value not in (0, 1):
                raise DataError(f"data spec {s.text!r}: {key}={raw!r} is not true or false")
        elif int in allowed:
            if isinstance(value, bool) or not isinstance(value, int):
                raise DataError(f"data spec {s.text!r}: {key}={raw!r} is not an integer")
        elif float in allowed:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise DataError(f"data spec {s.text!r}: {key}={raw!r} is not a number")
    if cfg["size"] < 1:
        raise DataError(f"data spec {s.text!r}: size={cfg['size']} must be at least 1")


def _type_args(tp) -> tuple:
    """The members of Optional[X] / X | None (just () for a plain type)."""
    import typing

    return tuple(a for a in typing.get_args(tp) if a is not type(None))


def _rg_config(s: DataSpec) -> dict:
    """The generator's options from the spec (size 100 and seed 0 unless given), checked."""
    cfg = {k: _rg_value(v) for k, v in s.params.items() if k not in RG_RESERVED}
    cfg.setdefault("size", 100)
    cfg.setdefault("seed", 0)
    _check_rg_options(s, cfg)
    return cfg


def _worked_style(s: DataSpec) -> str:
    style = s.params.get("worked", "columns")
    if style not in STYLES:
        raise DataError(f"data spec {s.text!r}: worked={style!r} is not a worked-solution style; use one of {', '.join(STYLES)}")
    return style


def _rg_dataset(s: DataSpec):
    try:
        import reasoning_gym
    except ImportError:
        raise DataError("data spec rg:...: the reasoning-gym package is not installed (pip install reasoning-gym)") from None
    cfg = _rg_config(s)
    try:
        ds = reasoning_gym.create_dataset(s.target, **cfg)
    except (KeyError, ValueError, TypeError, AssertionError) as e:
        raise DataError(f"data spec {s.text!r}: reasoning-gym refused it ({e}); check the generator name and its options") from None
    return ds


def _reasoning_gym(s: DataSpec) -> list[Problem]:
    ds = _rg_dataset(s)
    seed = s.params.get("seed", "0")
    kind = _kind(s, "number")
    style = _worked_style(s)
    max_chars = s.int_param("max_chars", minimum=1)
    out = []
    for i, item in enumerate(ds):  # ids keep the generator's index, so a filtered spec names the same items
        meta = dict(item.get("metadata", {}))
        solution = worked_solution(s.target, item, style)
        if max_chars is not None and len(item["question"]) + len(solution or "") > max_chars:
            continue
        out.append(Problem(f"{s.target}:{seed}:{i}", item["question"], str(item["answer"]), kind, solution, meta))
    return out


def _refuse_uncached_offline(s: DataSpec, ds_id: str, datasets) -> None:
    """Offline, a dataset that is not in the local cache fails at once: `load_dataset` retries a dead connection
    for ~30 s first (a cached one still loads, from the cache)."""
    from ..models.teacher import hub_reachable

    if Path(ds_id).exists() or hub_reachable():
        return
    cache = Path(os.path.expanduser(str(datasets.config.HF_DATASETS_CACHE)))
    *namespace, name = ds_id.split("/")
    try:  # where datasets keeps a hub dataset: its name in snake_case
        from datasets.naming import camelcase_to_snakecase

        name = camelcase_to_snakecase(name)
    except ImportError:
        pass
    if (cache / "___".join([*namespace, name])).is_dir():
        return
    raise DataError(f"data spec {s.text!r}: the Hugging Face hub cannot be reached and {ds_id} is not in the local "
                    f"datasets cache ({cache}); load it once where the network is up, or save it as a jsonl: file")


def _hf(s: DataSpec) -> list[Problem]:
    parts = re.split(r":(?![^\[]*\])", s.target)  # not the ':' of a split's own slice, train[:1000]
    if len(parts) not in (2, 3):
        raise DataError(f"data spec {s.text!r}: expected hf:ID[:CONFIG]:SPLIT")
    ds_id, split = parts[0], parts[-1]
    config = parts[1] if len(parts) == 3 else None
    try:
        import datasets
    except ImportError:
        raise DataError(f"data spec {s.text!r}: needs the `datasets` package and network access (pip install datasets)") from None
    _refuse_uncached_offline(s, ds_id, datasets)
    try:
        rows = datasets.load_dataset(ds_id, config, split=split)
    except Exception as e:
        raise DataError(f"data spec {s.text!r}: could not load ({str(e).splitlines()[0][:200]}); is the network up?") from None
    columns = list(rows.column_names)
    q = s.params.get("question") or ("question" if "question" in columns else "problem")
    a = s.params.get("answer", "answer")
    kind = _kind(s, "gsm8k" if "gsm8k" in ds_id.lower() else "math")
    # a `solution` column is read when present; one the spec names must be there
    sol = s.params.get("solution") or ("solution" if "solution" in columns else None)
    for name in (q, a, sol):
        if name and name not in columns and name.split(".")[0] not in columns:
            raise DataError(f"data spec {s.text!r}: the dataset has no column {name.split('.')[0]!r} (columns: "
                            f"{', '.join(columns)}); map them with ?question=...&answer=...&solution=...")
    offset, limit = s.slice_params()
    end = len(rows) if limit is None else min(len(rows), offset + limit)
    out = []
    for i in range(offset, end):  # ids keep the row's index in the split, as a sliced file's do
        row = rows[i]
        answer = _text_field(row, a, s, i + 1, allow_empty=True)
        gold = gsm8k_final_answer(answer) if kind == "gsm8k" else answer
        solution = CALCULATOR_MARK.sub("", answer) if kind == "gsm8k" else _solution_field(row, sol, s, i + 1)
        out.append(Problem(f"{ds_id}:{split}:{i}", _text_field(row, q, s, i + 1), gold, kind, solution))
    return out


def _text(s: DataSpec) -> list[Problem]:
    path = _data_file(s)
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise DataError(f"data spec {s.text!r}: {path} is not UTF-8 text") from None
    docs = [d.strip() for d in re.split(r"\n\s*\n", text) if d.strip()]
    return [Problem(f"{path.stem}:{i}", "", "", "number", d) for i, d in enumerate(docs)]
