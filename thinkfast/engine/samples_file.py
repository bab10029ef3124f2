"""The samples file: JSONL, one line per completion, append-only, flushed (and fsynced) per batch.

Every line carries `config`, a short hash of the sampling configuration (model, data, n, sampling parameters,
prompt style, base seed, precision). Re-running the same command reads the file, skips the (problem_id, sample_idx) pairs
already there and writes exactly the missing ones; a file written under another configuration is refused and
left untouched. A crash can leave only a torn last line (no newline): it is not a sample, and is cut off before
appending.

Sharded runs (torchrun): rank r appends to `OUT.part<r>`; when every rank is done, rank 0 moves the parts'
lines into OUT (skipping pairs already there) and removes the parts. Every rank counts the samples in OUT and
in all part files as done, so a crash at any point, even with another world size, loses and duplicates nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ..errors import DataError

RECORD_FIELDS = (
    "problem_id", "sample_idx", "model", "role", "completion", "answer", "gold", "kind", "correct", "grade_error",
    "reward", "gen_tokens", "prompt_tokens", "seconds", "seed", "finish_reason", "hardware", "config",
)


def config_hash(config: dict) -> str:
    """12 hex digits of the SHA-256 of the configuration as canonical JSON."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def part_path(out: Path, rank: int) -> Path:
    return out.with_name(f"{out.name}.part{rank}")


def part_files(out: Path) -> list[Path]:
    return sorted(p for p in out.parent.glob(f"{out.name}.part*") if p.name[len(out.name) + 5:].isdigit())


def _read_lines(path: Path, config: str, repair: bool) -> set[tuple[str, int]]:
    """(problem_id, sample_idx) pairs in `path`; refuses another config; cuts a torn last line when `repair`."""
    done: set[tuple[str, int]] = set()
    if not path.exists():
        return done
    data = path.read_bytes()
    cut = len(data)
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1  # a crash mid-write: the unfinished last line holds no complete sample
        tail, marker = data[cut:], b'{"problem_id"'
        if not (tail.startswith(marker) or marker.startswith(tail)):  # a cut can fall inside the first key too
            raise DataError(f"{path}: last line is not a samples-file record; it was not written by `thinkfast sample`: pass another --out or move it away")
    for n, raw in enumerate(data[:cut].split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
            key = (str(rec["problem_id"]), int(rec["sample_idx"]))
            theirs = rec.get("config")
        except (ValueError, KeyError, TypeError):
            raise DataError(
                f"{path}:{n}: not a samples-file line (no problem_id/sample_idx JSON); it was not written by "
                "`thinkfast sample`: pass another --out or move it away"
            ) from None
        if theirs != config:
            raise DataError(
                f"{path} was written with another sampling configuration (config {theirs}, this run {config}); "
                "pass another --out, or re-run the exact command that wrote it"
            )
        done.add(key)
    if repair and cut < len(data):  # only once the whole file is known to be ours
        with open(path, "r+b") as f:
            f.truncate(cut)
    return done


class SamplesWriter:
    """Appends records to OUT (or to this rank's part file) and knows which samples are already done."""

    def __init__(self, out, config: str, rank: int = 0, world_size: int = 1):
        self.out = Path(out)
        self.config, self.rank, self.world_size = config, rank, world_size
        self.path = self.out if world_size == 1 else part_path(self.out, rank)
        if self.out.exists() and self.out.is_dir():
            raise DataError(f"--out {self.out} is a folder; give a .jsonl file path")

    def done(self) -> set[tuple[str, int]]:
        """Pairs already written: in OUT and in every part file (checked against this config)."""
        pairs = _read_lines(self.out, self.config, repair=self.world_size == 1 or self.rank == 0)
        for p in part_files(self.out):
            pairs |= _read_lines(p, self.config, repair=p == self.path)
        return pairs

    def append(self, records: list[dict]) -> None:
        if not records:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    def merge_parts(self) -> int:
        """Rank 0, after every rank finished: move the part files' lines into OUT. Returns lines moved."""
        have = _read_lines(self.out, self.config, repair=True)
        moved = 0
        for p in part_files(self.out):
            _read_lines(p, self.config, repair=True)
            lines = [ln for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
            fresh = []
            for ln in lines:
                rec = json.loads(ln)
                key = (str(rec["problem_id"]), int(rec["sample_idx"]))
                if key not in have:
                    have.add(key)
                    fresh.append(ln + "\n")
            if fresh:
                with open(self.out, "a", encoding="utf-8") as f:
                    f.write("".join(fresh))
                    f.flush()
                    os.fsync(f.fileno())
            moved += len(fresh)
            p.unlink()
        return moved
