"""Inference-scaling metrics over n sampled completions per problem.

pass@k (coverage)   P(at least one of k samples is correct) = 1 - C(n-c, k) / C(n, k), unbiased (Chen et al. 2021).
maj@k               the most frequent answer among k samples is correct.
BoN@k               the sample with the highest reward among k is correct.
weighted BoN@k      the answer with the largest summed reward among k samples is correct.

maj@k and the BoN variants are means over many random size-k subsets of the n samples (fixed seed), never the
first k. A subset is the first k entries of a random order of the samples; the orders are independent, except
that their first places are dealt out evenly (each sample leads equally many), so maj@1 and BoN@1 equal pass@1
exactly (where equal answers are graded alike) instead of within sampling noise. "The answer seen first in the
subset" (the tie-break) is itself random. An unparseable answer (None) never votes; a subset with no answer at all
is wrong. An ungraded sample (correct is None: its grader hung or crashed) takes the grade of an equal answer graded
among the problem's samples, in every metric alike (so maj@1 stays pass@1), and else counts as wrong; reports show
how many there were.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np

from ..errors import ThinkfastError

DEFAULT_SUBSETS = 256
METRICS = ("pass_at_k", "maj_at_k", "bon_at_k", "weighted_bon_at_k")


def _check_nck(n: int, c: int, k: int) -> None:
    if not (isinstance(n, (int, np.integer)) and isinstance(c, (int, np.integer)) and isinstance(k, (int, np.integer))):
        raise ThinkfastError(f"pass@k: n={n!r}, c={c!r}, k={k!r} must be integers")
    if n < 1 or not 0 <= c <= n:
        raise ThinkfastError(f"pass@k: need n >= 1 and 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ThinkfastError(f"k={k} but only n={n} samples per problem; pick k between 1 and {n}")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct.

    C(n-c, k) / C(n, k) = prod_{i=n-c+1..n} (1 - k/i): a product of c factors in [0, 1), stable for n in the
    thousands where the binomials themselves overflow a float.
    """
    _check_nck(n, c, k)
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def majority_vote(answers, weights=None):
    """The answer with the most votes (or the largest summed weight); ties go to the answer seen first.
    None never votes; None when nothing voted."""
    answers = list(answers)
    if weights is not None:
        weights = [float(w) for w in weights]
        if len(weights) != len(answers):
            raise ThinkfastError(f"majority_vote: {len(weights)} weights for {len(answers)} answers; give one per answer")
        if not all(math.isfinite(w) for w in weights):
            raise ThinkfastError("majority_vote: a weight is NaN or infinite; weights must be finite numbers")
    totals: dict = {}
    for i, a in enumerate(answers):
        if a is None:
            continue
        w = 1.0 if weights is None else weights[i]
        totals[a] = totals.get(a, 0.0) + w  # dict order = first-seen order
    best, best_w = None, -math.inf
    for a, w in totals.items():
        if w > best_w:
            best, best_w = a, w
    return best


def ks_for(n: int) -> list[int]:
    """1, 2, 4, ..., and n itself when it is not a power of two."""
    if n < 1:
        return []
    ks = [1 << i for i in range(n.bit_length()) if (1 << i) <= n]
    return ks if ks[-1] == n else ks + [n]


@dataclass
class ProblemSamples:
    """The n samples of one problem, in sample_idx order."""

    answers: list  # canonical answers (hashable) or None
    correct: list  # True / False / None (ungraded)
    rewards: list | None = None  # floats, or None when the samples were not scored

    def __post_init__(self):
        if len(self.answers) != len(self.correct) or (self.rewards is not None and len(self.rewards) != len(self.answers)):
            raise ThinkfastError("ProblemSamples: answers, correct and rewards must have one entry per sample")


def _encode(ps: ProblemSamples):
    """Answers -> integer ids (-1 for None) and, per id, whether that answer is correct (its first graded sample)."""
    ids, table, ans_correct = [], {}, []
    for a, c in zip(ps.answers, ps.correct):
        if a is None:
            ids.append(-1)
            continue
        if a not in table:
            table[a] = len(table)
            ans_correct.append(None)
        j = table[a]
        if ans_correct[j] is None and c is not None:
            ans_correct[j] = bool(c)
        ids.append(j)
    return np.array(ids, dtype=np.int64), np.array([bool(c) for c in ans_correct], dtype=bool)


def _effective_correct(graded: list, ids: np.ndarray, ans_correct: np.ndarray) -> np.ndarray:
    """Per sample: its grade, or for an ungraded one its answer's grade (as the votes count it), else wrong."""
    return np.array([c is True if c is not None else bool(i >= 0 and ans_correct[i]) for c, i in zip(graded, ids)],
                    dtype=bool)


def effective_correct(ps: ProblemSamples) -> np.ndarray:
    """`ps`'s samples as every metric counts them right or wrong (see the module docstring on ungraded ones)."""
    ids, ans_correct = _encode(ps)
    return _effective_correct(ps.correct, ids, ans_correct)


def _vote(ids_sub: np.ndarray, weights_sub: np.ndarray, n_answers: int) -> np.ndarray:
    """Winning answer id per row of (M, k) subsets; -1 where no sample in the row has an answer."""
    M, k = ids_sub.shape
    if n_answers == 0:
        return np.full(M, -1)
    valid = ids_sub >= 0
    rows = np.broadcast_to(np.arange(M)[:, None], ids_sub.shape)
    flat = (rows * n_answers + np.where(valid, ids_sub, 0))[valid]
    totals = np.bincount(flat, weights=weights_sub[valid], minlength=M * n_answers).reshape(M, n_answers)
    first = np.full((M, n_answers), k, dtype=np.int64)  # position of each answer's first vote (k = absent)
    pos = np.broadcast_to(np.arange(k)[None, :], ids_sub.shape)
    np.minimum.at(first, (rows[valid], ids_sub[valid]), pos[valid])
    present = first < k
    best = np.where(present, totals, -np.inf).max(1, keepdims=True)
    tied = present & (totals == best)
    winner = np.where(tied, first, k + 1).argmin(1)  # among the tied, the one seen first
    return np.where(present.any(1), winner, -1)


def _voted_correct(win: np.ndarray, ans_correct: np.ndarray) -> np.ndarray:
    """Per subset: the winning answer is correct (no winner: wrong)."""
    if len(ans_correct) == 0:
        return np.zeros(len(win), dtype=bool)
    return (win >= 0) & ans_correct[np.maximum(win, 0)]


def subsets_used(n: int, n_subsets: int) -> int:
    """Subsets per k actually drawn for n samples: n_subsets rounded up to a multiple of n (at least n), so that
    every sample leads equally many."""
    return max(1, -(-n_subsets // n)) * n


def _balanced_orders(n: int, n_subsets: int, rng: np.random.Generator) -> np.ndarray:
    """(M, n) independent random sample orders whose k-prefixes are the subsets, M = `subsets_used(n, n_subsets)`,
    with the first place dealt out evenly: each sample leads M / n orders (which sample leads which order is itself
    shuffled, so each order is still uniformly random). Size-1 subsets are then exact, and the larger ones as
    independent as plain random orders."""
    M = subsets_used(n, n_subsets)
    orders = rng.permuted(np.broadcast_to(np.arange(n), (M, n)), axis=1)
    leaders = rng.permutation(np.resize(np.arange(n), M))
    rows = np.arange(M)
    at = np.argmax(orders == leaders[:, None], axis=1)  # where each order holds its leader
    orders[rows, at] = orders[:, 0]  # the displaced first entry takes the leader's place
    orders[:, 0] = leaders
    return orders


def problem_curves(ps: ProblemSamples, ks: list[int], n_subsets: int = DEFAULT_SUBSETS, seed: int = 0,
                   key: str = "") -> dict[str, np.ndarray]:
    """Per-k values of every metric for one problem: {"pass_at_k": (len(ks),), ...}; BoN entries only with rewards.

    `key` (the problem id) seeds this problem's subsets, so a problem's numbers do not depend on which other
    problems are in the report.
    """
    n = len(ps.answers)
    ids, ans_correct = _encode(ps)
    correct = _effective_correct(ps.correct, ids, ans_correct)
    c = int(correct.sum())
    out = {"pass_at_k": np.array([pass_at_k(n, c, k) for k in ks])}
    orders = _balanced_orders(n, n_subsets, np.random.default_rng([seed, zlib.crc32(key.encode())]))
    M = orders.shape[0]
    ones = np.ones(n)
    rewards = None
    if ps.rewards is not None:
        given = [r is not None for r in ps.rewards]
        rewards = np.array([np.nan if r is None else float(r) for r in ps.rewards], dtype=np.float64)
        if not any(given):
            raise ThinkfastError(f"problem {key}: no sample has a reward; pass rewards=None, or score the samples first")
        if not all(given):
            raise ThinkfastError(f"problem {key}: {sum(given)} of {n} samples have a reward; run `thinkfast score` on the whole file")
        if not np.isfinite(rewards).all():
            raise ThinkfastError(f"problem {key}: a reward is NaN or infinite; score its samples again")
    maj, bon, wbon = [], [], []
    for k in ks:
        _check_nck(n, c, k)
        sub = orders[:, :k]  # (M, k) sample indices
        win = _vote(ids[sub], ones[sub], len(ans_correct))
        maj.append(_voted_correct(win, ans_correct).mean())
        if rewards is not None:
            best = sub[np.arange(M), rewards[sub].argmax(1)]  # argmax: ties go to the first in the subset
            bon.append(correct[best].mean())
            win = _vote(ids[sub], rewards[sub], len(ans_correct))
            wbon.append(_voted_correct(win, ans_correct).mean())
    out["maj_at_k"] = np.array(maj, dtype=np.float64)
    if rewards is not None:
        out["bon_at_k"] = np.array(bon, dtype=np.float64)
        out["weighted_bon_at_k"] = np.array(wbon, dtype=np.float64)
    return out


def maj_at_k(answers, correct, k: int, n_subsets: int = DEFAULT_SUBSETS, seed: int = 0) -> float:
    return float(problem_curves(ProblemSamples(list(answers), list(correct)), [k], n_subsets, seed)["maj_at_k"][0])


def bon_at_k(answers, correct, rewards, k: int, n_subsets: int = DEFAULT_SUBSETS, seed: int = 0, weighted: bool = False) -> float:
    curves = problem_curves(ProblemSamples(list(answers), list(correct), list(rewards)), [k], n_subsets, seed)
    return float(curves["weighted_bon_at_k" if weighted else "bon_at_k"][0])


def bootstrap_ci(per_problem: np.ndarray, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> np.ndarray:
    """Percentile CI of the mean over problems, resampling problems with replacement.

    per_problem: (P,) or (P, K) -> (2,) or (2, K) [low, high]."""
    x = np.asarray(per_problem, dtype=np.float64)
    if x.shape[0] == 0:
        raise ThinkfastError("bootstrap over zero problems")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.shape[0], size=(n_boot, x.shape[0]))
    means = x[idx].mean(1)  # (n_boot,) or (n_boot, K)
    alpha = (1 - level) / 2
    return np.quantile(means, [alpha, 1 - alpha], axis=0)


def dataset_curves(problems: dict[str, ProblemSamples], ks: list[int], n_subsets: int = DEFAULT_SUBSETS, seed: int = 0,
                   n_boot: int = 1000) -> dict[str, dict]:
    """Mean over problems of every metric, with bootstrap CIs: {metric: {"mean": (K,), "ci": (2, K), "per_problem": (P, K)}}."""
    per: dict[str, list] = {}
    for pid, ps in problems.items():
        for name, values in problem_curves(ps, ks, n_subsets, seed, key=str(pid)).items():
            per.setdefault(name, []).append(values)
    out = {}
    for name, rows in per.items():
        if len(rows) != len(problems):  # rewards on some problems only
            missing = next(str(p) for p, ps in problems.items() if ps.rewards is None)
            raise ThinkfastError(f"{name}: rewards exist for {len(rows)} of {len(problems)} problems (none for problem "
                                 f"{missing}); score every sample first")
        mat = np.stack(rows)
        out[name] = {"mean": mat.mean(0), "ci": bootstrap_ci(mat, n_boot, seed), "per_problem": mat}
    return out
