"""The samples file: JSONL, one line per completion, append-only, flushed (and fsynced) per batch.

Every line carries `config`, a short hash of the sampling configuration (model weights, problems, n, sampling
parameters, prompt style, base seed, precision); the first line of each file also carries that configuration
itself under `sampling`, so that a refusal can name the settings that differ (a file whose first line was
removed records them again on its next line). Re-running the same command reads
the file, skips the (problem_id, sample_idx) pairs already there and writes exactly the missing ones; a file
written under another configuration is refused and left untouched. A crash can leave only a torn last line (no
newline), and a power loss zeros after it: neither is a sample, and both are cut off before appending.

Sharded runs (torchrun): rank r appends to `OUT.part<r>`; when every rank is done, rank 0 moves the parts'
lines into OUT (skipping pairs already there) and removes the parts. Every rank counts the samples in OUT and
in all part files as done, so a crash at any point, even with another world size, loses and duplicates nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ..errors import DataError, option
from ..utils import HeldLock

RECORD_FIELDS = (
    "problem_id", "sample_idx", "model", "role", "completion", "answer", "gold", "kind", "correct", "grade_error",
    "reward", "gen_tokens", "prompt_tokens", "seconds", "seed", "finish_reason", "hardware", "config",
)


SAMPLING_KEY = "sampling"  # the readable configuration whose hash is `config`; on the first line of each file


def config_hash(config: dict) -> str:
    """12 hex digits of the SHA-256 of the configuration as canonical JSON."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


_ABSENT = object()  # a setting one side's configuration does not have (another version of thinkfast)
_UNSET = {"ssm_state_dtype": "float32"}  # settings recorded only when they differ from this value


def _shown(value) -> str:
    if value is _ABSENT:
        return "absent"
    if value is None:
        return "none"
    if isinstance(value, str):
        return repr(value if len(value) <= 40 else value[:37] + "...")
    return json.dumps(value, ensure_ascii=False)


def _flat(config: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in config.items():
        if isinstance(value, dict) and prefix + key != "data":  # the data is judged as a whole, see below
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def explain_difference(here: dict, file: dict) -> str:
    """The settings in which this run's configuration differs from the file's, e.g.
    "temperature 0.5 here, 1.0 in the file; data: other problems (4 here, 6 in the file)"."""
    ours, theirs = _flat(here), _flat(file)
    parts = []
    for key in list(ours) + [k for k in theirs if k not in ours]:
        a, b = ours.get(key, _UNSET.get(key, _ABSENT)), theirs.get(key, _UNSET.get(key, _ABSENT))
        if a == b:
            continue
        if key == "data" and isinstance(a, dict) and isinstance(b, dict):
            if a.get("ids") == b.get("ids"):
                parts.append(f"data: the same {a.get('problems')} problem ids with other questions, answers or kinds")
            else:
                parts.append(f"data: other problems ({a.get('problems')} here, {b.get('problems')} in the file)")
        elif key == "model" and str(a).startswith("weights:") and str(b).startswith("weights:"):
            parts.append("model: other weights (retrained, or another checkpoint)")
        else:
            parts.append(f"{key} {_shown(a)} here, {_shown(b)} in the file" + _stop_hint(key, a, b))
    return "; ".join(parts)


def _stop_hint(key: str, here, file) -> str:
    """Names the flag when the stops differ by the default one of plain prompts (files from before it, or sampled
    with --no-default-stop)."""
    from ..data.prompts import PLAIN_STOP

    if key != "stop" or not (isinstance(here, list) and isinstance(file, list)):
        return ""
    if [s for s in here if s != PLAIN_STOP] != [s for s in file if s != PLAIN_STOP]:
        return ""
    if PLAIN_STOP in here:
        return (f" (plain prompts stop at {PLAIN_STOP!r} by default: add {option('--no-default-stop', 'default_stop=False')}"
                " to resume a file sampled without it)")
    return f" (the file's plain prompts stopped at {PLAIN_STOP!r} by default)"


def _recorded_sampling(lines: list[bytes], config: str) -> dict | None:
    """The readable configuration a file's lines record for the hash `config` (None: an older file without it)."""
    for raw in lines:
        try:
            rec = json.loads(raw)
        except ValueError:
            continue
        sampling = rec.get(SAMPLING_KEY) if isinstance(rec, dict) else None
        if isinstance(sampling, dict) and rec.get("config") == config and config_hash(sampling) == config:
            return sampling
    return None


def _refusal(path: Path, theirs, config: str, sampling: dict, lines: list[bytes]) -> DataError:
    recorded = _recorded_sampling(lines, theirs) if isinstance(theirs, str) else None
    if recorded is None:  # written before files recorded their settings (or its first line was removed)
        return DataError(
            f"{path} was written with another sampling configuration (config {theirs or 'none'}, this run {config}) "
            "and does not record which settings those were (its first line, which records them, was removed, or an "
            "older thinkfast wrote it: its files do not resume since the configuration hashes the problems "
            "themselves); re-run with the settings that wrote it, or pass another --out or move the file away"
        )
    what = explain_difference(sampling, recorded) or f"config {theirs}, this run {config}"
    return DataError(
        f"{path} was written with another sampling configuration ({what}); "
        "pass another --out, or re-run with the file's settings"
    )


def part_path(out: Path, rank: int) -> Path:
    return out.with_name(f"{out.name}.part{rank}")


def part_files(out: Path) -> list[Path]:
    return sorted(p for p in out.parent.glob(f"{out.name}.part*") if p.name[len(out.name) + 5:].isdigit())


def _read_lines(path: Path, sampling: dict, config: str, repair: bool) -> set[tuple[str, int]]:
    """(problem_id, sample_idx) pairs in `path`; refuses another config; cuts a torn last line when `repair`."""
    done: set[tuple[str, int]] = set()
    if not path.exists():
        return done
    whole = path.read_bytes()
    data = whole.rstrip(b"\0")  # a power loss can leave the file's last blocks as zeros: never a record
    cut = len(data)
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1  # a crash mid-write: the unfinished last line holds no complete sample
        tail, marker = data[cut:], b'{"problem_id"'
        if not (tail.startswith(marker) or marker.startswith(tail)):  # a cut can fall inside the first key too
            if any(_is_record(raw) for raw in data[:cut].split(b"\n")):  # ours, with something written after it
                raise DataError(f"{path}: its unfinished last line is not a samples record, while the lines before it "
                                "are (something else wrote to the file); fix or delete that line, then re-run the same "
                                "command to continue")
            raise DataError(f"{path}: last line is not a samples-file record; it was not written by `thinkfast sample`: pass another {option('--out', 'out file')} or move it away")
    lines = data[:cut].split(b"\n")
    for n, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
            key = (str(rec["problem_id"]), int(rec["sample_idx"]))
            theirs = rec.get("config")
        except (ValueError, KeyError, TypeError):
            if any(_is_record(other) for other in lines if other is not raw):  # ours, with one line damaged
                raise DataError(
                    f"{path}:{n}: damaged line (not a samples record, while the file's other lines are); fix or "
                    "delete that line, then re-run the same command to continue"
                ) from None
            raise DataError(
                f"{path}:{n}: not a samples-file line (no problem_id/sample_idx JSON); it was not written by "
                "`thinkfast sample`: pass another --out or move it away"
            ) from None
        if theirs != config:
            raise _refusal(path, theirs, config, sampling, lines)
        done.add(key)
    if repair and cut < len(whole):  # only once the whole file is known to be ours
        with open(path, "r+b") as f:
            f.truncate(cut)
    return done


def _is_record(raw: bytes) -> bool:
    try:
        rec = json.loads(raw)
        return isinstance(rec, dict) and "problem_id" in rec and "sample_idx" in rec
    except ValueError:
        return False


def _is_empty(path: Path) -> bool:
    return not path.exists() or path.stat().st_size == 0


class SamplesWriter:
    """Appends records to OUT (or to this rank's part file) and knows which samples are already done."""

    def __init__(self, out, sampling: dict, rank: int = 0, world_size: int = 1):
        self.out = Path(out)
        self.sampling = json.loads(json.dumps(sampling))  # as it reads back from the file, so its hash is `config`
        self.config, self.rank, self.world_size = config_hash(self.sampling), rank, world_size
        self.path = self.out if world_size == 1 else part_path(self.out, rank)
        if self.out.exists() and self.out.is_dir():
            raise DataError(f"{option('--out', 'out')} {self.out} is a folder; give a .jsonl file path")
        self._settings_missing: bool | None = None  # known at the first append
        self._lock: tuple[HeldLock, Path | None] | None = None

    def lock(self) -> None:
        """Hold `<file>.lock` while this run writes: a second run on the same file (which would draw the same
        samples again and append them twice) is refused (`HeldLock`)."""
        made = None if self.path.parent.exists() else next(p for p in [self.path.parent, *self.path.parent.parents]
                                                                if p.parent.exists())
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fix = "let it finish, or pass another " + option("--out", "out file")
        # torchrun's ranks hold OUT's lock together (shared), each its part file's alone: a one-process run or a
        # `score` on OUT is refused while they write, and they while it does
        held = [HeldLock.beside(self.out, fix, shared=True)] if self.world_size > 1 else []
        held.append(HeldLock.beside(self.path, fix))
        try:
            for lock in held:
                lock.acquire()
        except BaseException:
            for lock in held:
                lock.release()
            self._remove_made(made)
            raise
        self._lock = (held, made)

    def release(self) -> None:
        if self._lock is None:
            return
        held, made = self._lock
        self._lock = None
        for lock in reversed(held):
            lock.release()
        self._remove_made(made)

    def _remove_made(self, made: Path | None) -> None:
        if made is not None and not self.path.exists():  # a refused run leaves no folder behind
            for folder in [self.path.parent, *self.path.parent.parents]:
                try:
                    folder.rmdir()
                except OSError:
                    break
                if folder == made:
                    break

    def _records_settings(self) -> bool:
        marker = json.dumps(SAMPLING_KEY).encode() + b":"  # a key: inside a completion string its quotes are escaped
        lines = [ln for ln in self.path.read_bytes().split(b"\n") if marker in ln]
        return _recorded_sampling(lines, self.config) is not None

    def done(self) -> set[tuple[str, int]]:
        """Pairs already written: in OUT and in every part file (checked against this config)."""
        pairs = _read_lines(self.out, self.sampling, self.config, repair=self.world_size == 1 or self.rank == 0)
        for p in part_files(self.out):
            pairs |= _read_lines(p, self.sampling, self.config, repair=p == self.path)
        return pairs

    def append(self, records: list[dict]) -> None:
        if not records:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self._settings_missing is None:  # a new file (done() cut any torn first line), or one whose first line was removed
            self._settings_missing = _is_empty(self.path) or not self._records_settings()
        if self._settings_missing:  # the next line records the configuration, so a later refusal can name it
            records = [{**records[0], SAMPLING_KEY: self.sampling}, *records[1:]]
            self._settings_missing = False
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    def merge_parts(self) -> int:
        """Rank 0, after every rank finished: move the part files' lines into OUT. Returns lines moved."""
        have = _read_lines(self.out, self.sampling, self.config, repair=True)
        moved = 0
        for p in part_files(self.out):
            _read_lines(p, self.sampling, self.config, repair=True)
            lines = [ln for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
            fresh = []
            starts_out = _is_empty(self.out)
            for ln in lines:
                rec = json.loads(ln)
                key = (str(rec["problem_id"]), int(rec["sample_idx"]))
                if key not in have:
                    have.add(key)
                    first = starts_out and not fresh
                    if first != (SAMPLING_KEY in rec):  # only OUT's first line records the configuration
                        rec.pop(SAMPLING_KEY, None)
                        ln = json.dumps({**rec, SAMPLING_KEY: self.sampling} if first else rec, ensure_ascii=False)
                    fresh.append(ln + "\n")
            if fresh:
                with open(self.out, "a", encoding="utf-8") as f:
                    f.write("".join(fresh))
                    f.flush()
                    os.fsync(f.fileno())
            moved += len(fresh)
            p.unlink()
        return moved
