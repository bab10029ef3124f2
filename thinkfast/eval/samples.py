"""Reading samples files: JSONL written by `thinkfast sample`, one line per completion.

Fields: problem_id, sample_idx, model, role (teacher|llamba|hybrid), completion, answer, gold, kind,
correct (true/false/null), grade_error, reward (null until scored), gen_tokens, prompt_tokens, seconds, seed,
finish_reason, hardware (device string), config (hash), batch_size and compiled (the engine settings it was timed
with; absent in older files). Unknown fields are kept untouched.

Every line is validated; a malformed one is an error naming file:line unless `skip_bad_lines`, and a rewrite
(`thinkfast score`) copies skipped lines through verbatim, so nothing already written is ever lost.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DataError, option
from .grading import KINDS

ROLES = ("teacher", "llamba", "hybrid")


@dataclass
class Sample:
    problem_id: str
    sample_idx: int
    model: str
    completion: str
    gold: str
    kind: str
    correct: bool | None
    answer: str | None
    reward: float | None
    seconds: float
    gen_tokens: int
    role: str | None
    hardware: str | None
    record: dict  # the whole JSON object, for rewriting
    where: str  # "file:line"


@dataclass
class BadLine:
    path: Path
    line: int
    reason: str


@dataclass
class SamplesFile:
    path: Path
    lines: list[str]  # raw lines, newline stripped (blank lines included)
    samples: dict[int, Sample]  # line index (0-based) -> parsed sample, for the good lines
    bad: list[BadLine] = field(default_factory=list)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def parse_sample(obj, where: str) -> Sample:
    """One JSON object -> Sample; raises DataError(reason) when a field is missing or has the wrong type."""
    if not isinstance(obj, dict):
        raise DataError("not a JSON object")

    def need(name):
        if name not in obj:
            raise DataError(f"no field {name!r}")
        return obj[name]

    pid = need("problem_id")
    if not (isinstance(pid, str) or _is_int(pid)) or pid == "":
        raise DataError(f"problem_id={pid!r} is not a string or integer")
    idx = need("sample_idx")
    if not _is_int(idx) or idx < 0:
        raise DataError(f"sample_idx={idx!r} is not a non-negative integer")
    model = need("model")
    if not isinstance(model, str) or not model:
        raise DataError(f"model={model!r} is not a name")
    completion = need("completion")
    if not isinstance(completion, str):
        raise DataError("completion is not a string")
    gold = obj.get("gold")
    if _is_num(gold):
        gold = str(gold)
    if not isinstance(gold, str) or not gold.strip():
        raise DataError("missing gold answer (field 'gold' is absent or empty)")
    kind = need("kind")
    if kind not in KINDS:
        raise DataError(f"kind={kind!r} is not a grader kind ({', '.join(KINDS)})")
    correct = obj.get("correct")
    if correct is not None and not isinstance(correct, bool):
        raise DataError(f"correct={correct!r} is not true, false or null")
    reward = obj.get("reward")
    if reward is not None and not _is_num(reward):
        raise DataError(f"reward={reward!r} is not a number or null")
    seconds = need("seconds")
    if not _is_num(seconds) or seconds < 0:
        raise DataError(f"seconds={seconds!r} is not a non-negative number")
    gen_tokens = need("gen_tokens")
    if not _is_int(gen_tokens) or gen_tokens < 0:
        raise DataError(f"gen_tokens={gen_tokens!r} is not a non-negative integer")
    answer = obj.get("answer")
    if answer is not None and not isinstance(answer, str):
        answer = str(answer)
    role = obj.get("role")
    if role is not None and role not in ROLES:
        raise DataError(f"role={role!r} is not one of {', '.join(ROLES)}")
    hardware = obj.get("hardware")
    return Sample(str(pid), idx, model, completion, gold, kind, correct, answer, None if reward is None else float(reward),
                  float(seconds), gen_tokens, role, None if hardware is None else str(hardware), obj, where)


def read_samples_file(path, skip_bad_lines: bool = False) -> SamplesFile:
    path = Path(path)
    if path.is_dir():
        raise DataError(f"samples file {path} is a folder, not a file; give the .jsonl files in it (e.g. {path}/*.jsonl)")
    if not path.is_file():
        raise DataError(f"samples file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}); is this a samples .jsonl file?") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    out = SamplesFile(path, lines, {})
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        where = f"{path}:{i + 1}"
        try:
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                # json's own message can end in "at" ("Invalid control character at")
                raise DataError(f"not valid JSON ({e.msg.removesuffix(' at')} at column {e.colno})") from None
            out.samples[i] = parse_sample(obj, where)
        except DataError as e:
            if not skip_bad_lines:
                raise DataError(f"{where}: {e}; fix or delete that line, or pass {option('--skip-bad-lines', 'skip_bad_lines=True')} to skip it") from None
            out.bad.append(BadLine(path, i + 1, str(e)))
    return out


@dataclass
class SampleSet:
    files: list[SamplesFile]
    samples: list[Sample]  # good lines of all files, deduplicated on (model, problem_id, sample_idx)
    duplicates: int = 0

    @property
    def bad(self) -> list[BadLine]:
        return [b for f in self.files for b in f.bad]

    def models(self) -> list[str]:
        return list(dict.fromkeys(s.model for s in self.samples))

    def by_model(self) -> dict[str, dict[str, list[Sample]]]:
        """model -> problem_id -> samples sorted by sample_idx (models and problems in first-seen order)."""
        out: dict[str, dict[str, list[Sample]]] = {}
        for s in self.samples:
            out.setdefault(s.model, {}).setdefault(s.problem_id, []).append(s)
        for problems in out.values():
            for lst in problems.values():
                lst.sort(key=lambda s: s.sample_idx)
        return out

    def field_values(self, model: str, name: str) -> list:
        return list(dict.fromkeys(getattr(s, name) for s in self.samples if s.model == model))


def check_drawn_from(samples, problems: dict, flag: str, spec) -> None:
    """Each sample whose problem id is in `problems` (id -> Problem) has that problem's gold answer and grader kind:
    ids alone can name other data (a reasoning-gym spec with the same seed and other options, a file of another
    split under the same name). Ids that are missing are the caller's to word."""
    checked = set()
    for s in samples:
        p = problems.get(s.problem_id)
        if p is None or s.problem_id in checked:
            continue
        checked.add(s.problem_id)
        if (str(p.answer).strip(), p.kind) != (s.gold.strip(), s.kind):
            raise DataError(f"{flag}{spec!r} is not the data these samples were drawn from: problem {s.problem_id!r} has "
                            f"the answer {p.answer!r} ({p.kind}) there and {s.gold!r} ({s.kind}) at {s.where}; pass the "
                            "spec the samples were drawn from")


def read_samples(paths, skip_bad_lines: bool = False) -> SampleSet:
    """Read and validate samples files. The same completion in two files (or twice in one) counts once."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    if not paths:
        raise DataError("no samples files given")
    files = [read_samples_file(p, skip_bad_lines) for p in paths]
    seen, samples, dup = set(), [], 0
    configs: dict[str, tuple[str, str]] = {}  # model -> (sampling config, where first seen)
    for f in files:
        for s in f.samples.values():
            config = s.record.get("config")
            if config is not None:
                first = configs.setdefault(s.model, (config, s.where))
                if first[0] != config:  # two runs under one name would pool as one model's samples
                    raise DataError(f"model {s.model!r} has samples of two sampling configurations ({first[1]} and "
                                    f"{s.where}); give the runs different names (`thinkfast sample --name`) or report them apart")
            key = (s.model, s.problem_id, s.sample_idx)
            if key in seen:
                dup += 1
                continue
            seen.add(key)
            samples.append(s)
    if not samples:
        raise DataError(f"no usable samples in {', '.join(str(p) for p in paths)}")
    return SampleSet(files, samples, dup)
