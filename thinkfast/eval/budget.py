"""Time budgets: turn "k samples" into "seconds per problem" so models of different speeds compare at equal compute.

seconds per problem at k samples = k x the model's seconds per sample (mean of the `seconds` the engine measured
for each completion of that model). This is only meaningful when every model ran on the same hardware, so a
report refuses mixed `hardware` values unless told otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import DataError
from .samples import Sample


@dataclass
class ModelTiming:
    seconds_per_sample: float  # mean wall seconds per completion
    tokens_per_second: float  # generated tokens / generation seconds, over all of the model's samples
    mean_gen_tokens: float
    hardware: list[str]  # distinct device strings seen
    timed_with: list[str] = field(default_factory=list)  # distinct engine settings seen ("batch 64", "batch 64, compiled")

    def seconds_at(self, ks) -> np.ndarray:
        return np.asarray(ks, dtype=np.float64) * self.seconds_per_sample


def model_timing(samples: list[Sample]) -> ModelTiming:
    seconds = np.array([s.seconds for s in samples], dtype=np.float64)
    tokens = np.array([s.gen_tokens for s in samples], dtype=np.float64)
    total = float(seconds.sum())
    return ModelTiming(
        seconds_per_sample=float(seconds.mean()) if len(seconds) else float("nan"),
        tokens_per_second=float(tokens.sum() / total) if total > 0 else float("nan"),
        mean_gen_tokens=float(tokens.mean()) if len(tokens) else float("nan"),
        hardware=list(dict.fromkeys(s.hardware or "unknown" for s in samples)),
        timed_with=list(dict.fromkeys(_timed_with(s.record) for s in samples if "batch_size" in s.record)),
    )


def _timed_with(record: dict) -> str:
    return f"batch {record.get('batch_size')}" + (", compiled" if record.get("compiled") else "")


def check_hardware(timings: dict[str, ModelTiming], allow_mixed: bool = False) -> str | None:
    """The one hardware string shared by all models; DataError when they differ (unless allowed)."""
    seen = {hw: [m for m, t in timings.items() if hw in t.hardware] for t in timings.values() for hw in t.hardware}
    split = next((m for m, t in timings.items() if len(t.hardware) > 1), None)
    if split is not None and not allow_mixed:  # one run resumed elsewhere, or with other --threads
        raise DataError(
            f"model {split!r}'s samples were timed on {len(timings[split].hardware)} machines or thread counts "
            f"({', '.join(map(repr, timings[split].hardware))}): its run was resumed on another device or with other "
            "--threads; seconds are only comparable on one machine: re-sample it on one, or pass --allow-mixed-hardware "
            "to compare anyway"
        )
    if len(seen) > 1 and not allow_mixed:
        detail = "; ".join(f"{hw!r}: {', '.join(models)}" for hw, models in seen.items())
        raise DataError(
            f"samples come from different hardware ({detail}); seconds are only comparable on one machine: "
            "re-sample on one device, or pass --allow-mixed-hardware to compare anyway"
        )
    return next(iter(seen)) if len(seen) == 1 else None


def pareto_front(points: list[tuple[float, float, str, int]]) -> list[tuple[float, float, str, int]]:
    """Points (seconds, accuracy, model, k) that no other point beats on both axes (less or equal time and
    strictly higher accuracy, or strictly less time and equal accuracy), sorted by seconds."""
    front, best = [], -np.inf
    for p in sorted(points, key=lambda p: (p[0], -p[1])):
        if p[1] > best:
            front.append(p)
            best = p[1]
    return front


def best_within(seconds: np.ndarray, values: np.ndarray, budget: float) -> tuple[float, int] | None:
    """Best value reachable within `budget` seconds per problem, and the index of the k that reaches it."""
    ok = np.nonzero(seconds <= budget * (1 + 1e-9))[0]
    if len(ok) == 0:
        return None
    j = ok[np.argmax(values[ok])]
    return float(values[j]), int(j)
