"""Metrics: pass@k against brute force, maj@k / BoN@k against exact expectations, bootstrap CIs."""

import itertools
import math
import random

import numpy as np
import pytest

from thinkfast.errors import ThinkfastError
from thinkfast.eval.metrics import (
    ProblemSamples, _balanced_orders, bootstrap_ci, dataset_curves, effective_correct, ks_for, majority_vote, pass_at_k, problem_curves,
)


def test_pass_at_k_equals_brute_force():
    rng = random.Random(0)
    for _ in range(40):
        n = rng.randint(1, 9)
        correct = [rng.random() < 0.4 for _ in range(n)]
        c = sum(correct)
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(range(n), k))
            brute = sum(any(correct[i] for i in s) for s in subsets) / len(subsets)
            assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12)


def test_pass_at_k_stable_for_large_n():
    # exact value with integers, compared with the float product form
    for n, c, k in [(5000, 3, 64), (4096, 1, 1), (4096, 4000, 2), (3000, 17, 1000), (10000, 0, 10)]:
        exact = 1 - math.comb(n - c, k) / math.comb(n, k)
        assert pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-9, abs=1e-12)
    assert pass_at_k(100, 100, 5) == 1.0 and pass_at_k(100, 0, 5) == 0.0


def test_pass_at_k_bad_input():
    with pytest.raises(ThinkfastError, match="k=9"):
        pass_at_k(8, 2, 9)
    with pytest.raises(ThinkfastError):
        pass_at_k(8, 9, 1)
    with pytest.raises(ThinkfastError):
        pass_at_k(8, 2, 0)


def test_majority_vote_rules():
    assert majority_vote(["a", "b", "b", "a"]) == "a"  # tie: first seen
    assert majority_vote(["b", "a", "a", "b"]) == "b"
    assert majority_vote([None, None, "c"]) == "c"  # None never votes
    assert majority_vote([None, None]) is None
    assert majority_vote(["a", "b", "b"], weights=[0.9, 0.4, 0.4]) == "a"
    assert majority_vote(["a", "b"], weights=[0.5, 0.5]) == "a"
    assert majority_vote(iter(["a", "b", "b"])) == "b"
    for weights, needle in (([1], "1 weights for 3 answers"), ([1, 2, 3, 4], "4 weights"), ({}, "0 weights"),
                            ([1, math.nan, 1], "NaN or infinite")):
        with pytest.raises(ThinkfastError, match=needle):
            majority_vote(["a", "a", "b"], weights)


def test_ks_for():
    assert ks_for(1) == [1]
    assert ks_for(8) == [1, 2, 4, 8]
    assert ks_for(12) == [1, 2, 4, 8, 12]


def _exact(ps: ProblemSamples, k: int, rule: str) -> float:
    """Expectation over all ordered k-subsets (a uniform random subset in random order)."""
    n = len(ps.answers)
    total = 0
    perms = list(itertools.permutations(range(n), k))
    ans_correct = {}
    for a, c in zip(ps.answers, ps.correct):  # an answer's correctness: its first graded sample
        if a is not None and a not in ans_correct and c is not None:
            ans_correct[a] = c
    for p in perms:
        answers = [ps.answers[i] for i in p]
        if rule == "maj":
            win = majority_vote(answers)
            total += bool(win is not None and ans_correct.get(win, False))
        elif rule == "wbon":
            win = majority_vote(answers, [ps.rewards[i] for i in p])
            total += bool(win is not None and ans_correct.get(win, False))
        else:  # bon: highest reward, ties to the first in the subset
            best = max(range(k), key=lambda j: (ps.rewards[p[j]], -j))
            total += ps.correct[p[best]] is True
    return total / len(perms)


@pytest.mark.parametrize("seed", range(6))
def test_subset_estimates_match_exact_expectation(seed):
    rng = random.Random(seed)
    n = rng.randint(3, 6)
    pool = ["1", "2", "3"]
    answers = [rng.choice(pool + [None]) for _ in range(n)]
    gold = rng.choice(pool)
    correct = [None if a is None else a == gold for a in answers]
    rewards = [rng.choice([0.1, 0.5, 0.5, 0.9]) for _ in range(n)]  # repeated values exercise the tie rules
    ps = ProblemSamples(answers, correct, rewards)
    M = 20000
    curves = problem_curves(ps, list(range(1, n + 1)), n_subsets=M, seed=seed)
    for j, k in enumerate(range(1, n + 1)):
        for name, rule in (("maj_at_k", "maj"), ("bon_at_k", "bon"), ("weighted_bon_at_k", "wbon")):
            exact = _exact(ps, k, rule)
            se = math.sqrt(max(exact * (1 - exact), 1e-4) / M)
            assert abs(curves[name][j] - exact) < 5 * se + 1e-9, (name, k, curves[name][j], exact)


def test_curves_are_seeded_and_per_problem():
    ps = ProblemSamples(["1", "2", "1", "3", None, "2"], [True, False, True, False, None, False], [0.3, 0.2, 0.9, 0.1, 0.5, 0.4])
    a = problem_curves(ps, [1, 2, 4], 64, seed=3, key="p1")
    b = problem_curves(ps, [1, 2, 4], 64, seed=3, key="p1")
    assert all(np.array_equal(a[m], b[m]) for m in a)
    assert "bon_at_k" not in problem_curves(ProblemSamples(["1"], [True]), [1])  # no rewards: no BoN


def test_rewards_missing_on_some_samples_is_an_error():
    with pytest.raises(ThinkfastError, match="score"):
        problem_curves(ProblemSamples(["1", "2"], [True, False], [0.5, None]), [1])


def test_bootstrap_ci():
    rng = np.random.default_rng(0)
    x = rng.random((200, 3))
    lo, hi = bootstrap_ci(x, 2000, seed=0)
    assert np.all(lo < x.mean(0)) and np.all(x.mean(0) < hi)
    # about mean +- 1.96 standard errors
    se = x.std(0) / np.sqrt(len(x))
    assert np.allclose(hi - lo, 2 * 1.96 * se, rtol=0.15)
    lo2, hi2 = bootstrap_ci(np.concatenate([x] * 4), 2000, seed=0)
    assert np.all(hi2 - lo2 < hi - lo)  # more problems, narrower interval


def test_dataset_curves_means_and_cis():
    rng = random.Random(1)
    problems = {}
    for p in range(30):
        ans = [rng.choice("abc") for _ in range(8)]
        problems[f"p{p}"] = ProblemSamples(ans, [a == "a" for a in ans])
    out = dataset_curves(problems, [1, 2, 4, 8], n_subsets=64, n_boot=200)
    pk = out["pass_at_k"]
    assert pk["per_problem"].shape == (30, 4)
    assert np.all(np.diff(pk["mean"]) >= 0)  # coverage never falls with k
    assert np.all(pk["ci"][0] <= pk["mean"]) and np.all(pk["mean"] <= pk["ci"][1])
    expected_p1 = np.mean([np.mean(ps.correct) for ps in problems.values()])
    assert pk["mean"][0] == pytest.approx(expected_p1)


@pytest.mark.parametrize("n,subsets", [(32, 256), (5, 12), (7, 7), (40, 16)])
def test_subset_orders_are_permutations_whose_leaders_are_dealt_evenly(n, subsets):
    orders = _balanced_orders(n, subsets, np.random.default_rng(0))
    # at least `subsets` orders, a multiple of n: with fewer subsets asked than samples, n of them (one led by each)
    assert orders.shape == (max(1, -(-subsets // n)) * n, n) and orders.shape[0] >= subsets
    assert all(sorted(row) == list(range(n)) for row in orders.tolist())  # each row orders all n samples
    leads = np.bincount(orders[:, 0], minlength=n)
    assert leads.min() == leads.max()


@pytest.mark.parametrize("seed", range(4))
def test_maj_and_bon_at_1_equal_pass_at_1_exactly(seed):
    # independent draws of 256 subsets put maj@1 near pass@1 only (a report read maj@1 0.561 beside pass@1 0.567)
    rng = random.Random(seed)
    problems = {}
    for p in range(20):
        n = rng.choice([4, 32, 48])
        answers = [rng.choice(["1", "2", "3", None]) for _ in range(n)]
        problems[f"p{p}"] = ProblemSamples(answers, [a == "1" for a in answers], [rng.random() for _ in range(n)])
    for n_subsets in (256, 64, 16, 1):  # fewer subsets than samples too (a report asked for 16 read maj@1 0.575 beside 0.568)
        means = {name: v["mean"][0] for name, v in dataset_curves(problems, [1], n_subsets=n_subsets, n_boot=10).items()}
        assert means["maj_at_k"] == pytest.approx(means["pass_at_k"], abs=1e-12)
        assert means["bon_at_k"] == pytest.approx(means["pass_at_k"], abs=1e-12)
        assert means["weighted_bon_at_k"] == pytest.approx(means["pass_at_k"], abs=1e-12)


def test_an_ungraded_sample_counts_as_its_answer_graded_elsewhere_in_every_metric():
    # a grader that hung on one sample: its answer, graded on another sample, decides it for pass@k as for the votes
    answers = ["5", "5", "7", "9", None, "5"]
    graded = [True, None, False, None, False, None]
    ps = ProblemSamples(answers, graded, [0.1, 0.9, 0.2, 0.8, 0.3, 0.4])
    assert effective_correct(ps).tolist() == [True, True, False, False, False, True]  # "9" was never graded: wrong
    curves = problem_curves(ps, [1, 2], n_subsets=60)
    assert curves["pass_at_k"][0] == pytest.approx(3 / 6)
    assert curves["maj_at_k"][0] == pytest.approx(curves["pass_at_k"][0])
    assert curves["bon_at_k"][0] == pytest.approx(curves["pass_at_k"][0])
    assert curves["pass_at_k"][1] == pytest.approx(pass_at_k(6, 3, 2))


def test_reward_gaps_are_named_as_what_they_are():
    """All rewards missing, or one NaN, were both reported as 'some samples have a reward and others do not'."""
    answers, correct = ["1", "2", "1"], [True, False, True]
    for rewards, says in [([None, None, None], "problem p7: no sample has a reward"),
                          ([0.5, None, 0.1], "problem p7: 2 of 3 samples have a reward"),
                          ([0.5, float("nan"), 0.1], "problem p7: a reward is NaN or infinite")]:
        with pytest.raises(ThinkfastError, match=says):
            problem_curves(ProblemSamples(answers, correct, rewards), [1], key="p7")
