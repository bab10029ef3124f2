"""Grading: answer extraction, strict number equality, math-verify in killable workers, the real benchmark files."""

import json
import os
import signal
import threading
import time

import pytest

from conftest import SHARED_DATA
from thinkfast.errors import ThinkfastError
from thinkfast.eval.grading import (
    MathGraderPool, canonical_answer, extract_answer, grade, grade_many, parse_number,
)

HANG = r"so the answer is \boxed{\dfrac{5^{(5^{(5^{(5^5)})} - 4)} - 5}{16}}"


def _rows(name):
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"{path} not present")
    return [json.loads(line) for line in path.open()]


@pytest.fixture(scope="module")
def pool():
    p = MathGraderPool(workers=2)
    yield p
    p.close()


# ------------------------------------------------------------------------------------------ extraction


@pytest.mark.parametrize("text,kind,expected", [
    (r"first \boxed{3} then \boxed{\frac{1}{2}}", "math", r"\frac{1}{2}"),
    (r"nested \boxed{\frac{a}{b^{2}}}", "math", r"\frac{a}{b^{2}}"),
    (r"ok \boxed{7} and a cut-off \boxed{\frac{1}{", "math", "7"),  # truncated last box: the complete one counts
    ("step\n#### 1,234\n", "gsm8k", "1,234"),
    ("so 3 + 4 = 7 apples", "number", "7"),
    (r"\boxed{12} but #### 13", "gsm8k", "12"),  # \boxed beats ####
    ("no digits at all", "gsm8k", None),
    ("3 + 4 = 7\n#### 7<|im_end|>\n", "gsm8k", "7"),  # an end-of-turn token is not part of the answer
    (r"so \boxed{5}<|eot_id|>", "math", "5"),
    ("", "math", None),
    ("The final answer is $x^2+1$.", "math", "x^2+1"),
    # SmolLM2 on MATH-500: the answer in a display block under the phrase (it was read as no answer)
    ("So the final answer is:\n\n$$\nx = 5\n$$", "math", "x = 5"),
    ("The answer is:\n\\[\n\\frac{14}{3}\n\\]\nDone.", "math", "\\frac{14}{3}"),
    # the phrase's own sentence, not what a later one says; a decimal point is no sentence's end
    ("so the answer is 3. Then later 7", "math", "3"),
    ("the answer is 3.5 exactly", "math", "3.5 exactly"),
    # the text after the *last* marker, to the next run of four or more `#`
    ("x #### 17 y #### 18", "gsm8k", "18"),
    ("#### 42 #####", "gsm8k", "42"),
    ("#### Final Answer: 42", "number", "42"),
    # lm-eval minerva_math's answer line: the inner phrase, to its sentence's end
    ("Final Answer: The final answer is $\\frac{1}{2}$. I hope it is correct.", "math", "\\frac{1}{2}"),
    ("Final Answer: The final answer is 7. I hope it is correct.", "math", "7"),
    # markdown emphasis around the phrase or the answer
    ("Work: 3 + 4 = 7.\n\n**Final Answer**: $\\frac{1}{2}$", "math", "\\frac{1}{2}"),
    ("The answer is **7**.", "math", "7"),
    # markdown headings are not GSM8K's marker
    ("#### Step 1: Eggs\n16 - 7 = 9\n#### Step 2: Money\n9 * 2 = 18, so $18", "gsm8k", "18"),
    ("Work.\n#### Final Answer\n$\\frac{1}{2}$", "math", "\\frac{1}{2}"),
    ("#### Step 1: Setup\n3 + 4 = 7\n#### Step 2: Result\nThe final answer is $2k$.", "math", "2k"),
    # gsm8k reads the phrase too, when later numbers are checks, not answers
    ("The answer is 18.\n\nLet me double check: 16-3-4 = 9.", "gsm8k", "18"),
    ("The final answer is 600 (= 6*100).", "gsm8k", "600"),
    ("**Final Answer:** 18 (3 + 4 = 7 steps)", "gsm8k", "18"),
    ("First, the answer is not obvious. She has 18 eggs.", "gsm8k", "18"),  # a phrase with no number: skipped
    ("The answer is yes.", "number", "yes"),
    # inside a box or after the marker: the result, not the sum; doubled braces; a remark in brackets
    ("\\boxed{3 \\times 6 = 18}", "gsm8k", "18"),
    ("\\boxed{{18}}", "gsm8k", "18"),
    ("#### 18 (eighteen)", "gsm8k", "18"),
])
def test_extract_answer(text, kind, expected):
    assert extract_answer(text, kind) == expected


@pytest.mark.parametrize("pred,gold,ok", [
    ("#### 18.00", "18", True),
    ("#### $1,000", "1000", True),
    ("#### 1000.5", "1000", False),
    ("#### -5", "5", False),  # signs matter (reasoning-gym's own scorer ignores them)
    ("#### −5", "-5", True),  # unicode minus
    ("the answer is 18 dollars", "18", True),
    (r"\boxed{18 \text{ cm}^2}", "18", True),
    (r"\boxed{50\%}", "50", True),
    (r"\boxed{\frac{36}{2}}", "18", True),
    ("#### 36/2", "18", True),
    ("#### x = 4", "4", True),
    ("#### 4 or 5", "4", False),  # strict: no partial credit for hedging
    ("#### 1,2", "12", False),  # a list is not a thousands separator
    ("I give up", "3", False),
    ("#### 1e400000000000", "1", False),  # absurd numbers are refused quickly, not computed
    # what a small instruct model wrote (SmolLM2 on GSM8K): a `#####` rule is not GSM8K's marker
    ("#### 375\n#####", "375", True),
    ("##### The answer is: 375\n#####", "375", True),
    ("#### 9010 + 11 = 101", "101", True),  # the result after the last `=`, not the sum
    ("#### Final Answer\nThe total is $42.", "42", True),  # a markdown heading: the number under it
    ("#### Final Answer\nThe total is $42.", "4", False),
    ("#### The final answer is 42", "42", True),
    ("#### €1,000", "1000", True),  # any currency sign, as `$`
    ("#### £12.50", "12.5", True),
])
def test_number_grading(pred, gold, ok):
    assert grade(pred, gold, "gsm8k") is ok
    assert grade(pred, gold, "number") is ok


def test_no_catastrophic_backtracking():
    t = time.perf_counter()
    for n in (30, 3000):
        assert grade("#### 5 " + "a" * n + "!", "5", "gsm8k") is False
        assert grade("#### 5 " + "ab " * n, "5", "gsm8k") is True
    assert time.perf_counter() - t < 1.0


def test_letters_after_a_math_number_are_part_of_the_answer_not_a_unit():
    """2k, 3R^2, y = -2x (real MATH-500 golds) must not share a voting key with 2, 3, -2: maj@1 = pass@1."""
    from thinkfast.eval.metrics import ProblemSamples, problem_curves

    for gold, wrong in (("2k", "2"), ("3R^2", "3"), ("y = -2x", "-2")):
        assert canonical_answer(gold, "math") != canonical_answer(wrong, "math")
        results = grade_many([f"\\boxed{{{wrong}}}", f"\\boxed{{{gold}}}", f"\\boxed{{{gold}}}"], [gold] * 3, ["math"] * 3)
        assert [r.correct for r in results] == [False, True, True]
        curves = problem_curves(ProblemSamples([r.answer for r in results], [r.correct for r in results]), [1, 3])
        assert curves["maj_at_k"][0] == pytest.approx(curves["pass_at_k"][0]) and curves["maj_at_k"][1] == 1.0
    assert canonical_answer("5 \\text{ cm}", "math") == canonical_answer("5", "math") == "5"  # units in \text{}
    assert canonical_answer("x = 5", "math") == "5"


def test_unclosed_boxes_are_read_in_linear_time():
    """A degenerate completion full of cut-off boxes (a model looping) is read in one pass, not one per box."""
    text = "Step: \\boxed{1 + " * 20000  # 340k characters; quadratic reading took minutes
    t = time.perf_counter()
    assert extract_answer(text, "gsm8k") == "1"
    assert time.perf_counter() - t < 5.0


def test_word_answers_for_number_kind():
    assert grade("#### Alice", "alice", "number") is True
    assert grade("#### Bob", "alice", "number") is False
    assert grade("17 has no divisor but 1 and 17.\n#### yes", "yes", "number") is True  # numbers above a word answer


def test_a_rule_of_hashes_never_becomes_an_answer_that_votes():
    assert extract_answer("#### 375\n#####", "gsm8k") == "375"
    assert extract_answer("work\n#####\n", "gsm8k") is None  # no marker, no number: no answer, not "#"


def test_canonical_answers_group_equal_values():
    assert canonical_answer("1,000.00", "gsm8k") == canonical_answer("1000", "gsm8k") == "1000"
    assert canonical_answer(r"\dfrac12", "math") == canonical_answer(r"\frac{1}{2}", "math") == canonical_answer("0.5", "math")
    assert canonical_answer(r"\left( 3, \frac{\pi}{2} \right)", "math") == r"(3,\frac{\pi}{2})"
    assert canonical_answer(None, "math") is None
    assert parse_number("1/3") is not None and canonical_answer("2/6", "number") == "1/3"


def test_unknown_kind_and_missing_gold_are_clear_errors():
    with pytest.raises(ThinkfastError, match="unknown"):
        grade("#### 1", "1", "algebra")
    with pytest.raises(ThinkfastError, match="missing gold"):
        grade_many(["#### 1"], [""], ["gsm8k"])
    with pytest.raises(ThinkfastError, match="one of each"):
        grade_many(["a", "b"], ["1"], ["gsm8k"])


# ------------------------------------------------------------------------------------------ math workers


def test_math_grading_basics(pool):
    res = grade_many([r"\boxed{\dfrac{14}{3}}", r"\boxed{4.6667}", r"\boxed{\frac{\sqrt{2}}{2}}", "nothing here", r"\boxed{(3, \frac{\pi}{2})}"],
                     [r"\frac{14}{3}", r"\frac{14}{3}", r"\frac{1}{\sqrt{2}}", "3", r"\left( 3, \frac{\pi}{2} \right)"],
                     ["math"] * 5, pool=pool)
    assert [r.correct for r in res] == [True, False, True, False, True]
    assert res[3].answer is None and res[3].error is None  # no answer: wrong, not ungraded
    assert all(r.error is None for r in res)


def test_several_listed_boxes_are_one_answer_as_math_verify_reads_them(pool):
    """`$\\boxed{-2}$ and $\\boxed{1}$` answers {-2, 1}, as math-verify reads it (the last box alone was wrong).
    Boxes with other text between them are separate answers and the last one counts (math-verify, more lenient,
    joins a corrected guess too)."""
    listed = [r"So $x = \boxed{-2}$ and $x = \boxed{1}$.", r"$\boxed{-2}$ and $\boxed{1}$.", r"\boxed{-2}, \boxed{1}",
              r"\boxed{1} or \boxed{-2}", r"\boxed{-2},\boxed{1}"]
    res = grade_many(listed, ["-2, 1"] * len(listed), ["math"] * len(listed), pool=pool)
    assert [r.correct for r in res] == [True] * len(listed)
    assert extract_answer(listed[2], "math") == "-2, 1"
    separate = [r"First I guessed \boxed{3}, but checking it again gives \boxed{1}.", r"\boxed{-2} \boxed{1}"]
    assert [extract_answer(t, "math") for t in separate] == ["1", "1"]
    assert extract_answer(r"\boxed{-2} and \boxed{1}", "gsm8k") == "1"  # a number answer states one number


def test_sympy_hang_is_ungraded_within_timeout(pool):
    t = time.perf_counter()
    res = grade_many([HANG, r"\boxed{2}"], ["1", "2"], ["math", "math"], timeout=2.0, pool=pool)
    elapsed = time.perf_counter() - t
    assert res[0].correct is None and "timed out" in res[0].error
    assert res[1].correct is True  # the other item still graded
    assert elapsed < 15, elapsed  # the hang is cut at ~2 s (plus a worker start), not minutes
    # the pool replaced the killed worker and still works
    assert grade_many([r"\boxed{3}"], ["3"], ["math"], pool=pool)[0].correct is True


def test_crashed_worker_is_replaced_and_item_ungraded():
    pool = MathGraderPool(workers=1)
    try:
        assert pool.verify_many([(r"\boxed{1}", "$1$")])[0] == (True, None)  # pool started
        victim = pool.workers[0].proc.pid
        threading.Timer(1.0, lambda: os.kill(victim, signal.SIGKILL)).start()
        (correct, error), = pool.verify_many([(r"\boxed{" + extract_answer(HANG, "math") + "}", "$1$")], timeout=30)
        assert correct is None and "crashed" in error
        assert pool.verify_many([(r"\boxed{2}", "$2$")])[0] == (True, None)
        assert pool.workers[0].proc.pid != victim
    finally:
        pool.close()


def test_duplicate_items_graded_once(pool):
    before = len(pool.cache)
    res = grade_many([r"\boxed{\frac{2}{4}}"] * 50, [r"\frac{1}{2}"] * 50, ["math"] * 50, pool=pool)
    assert all(r.correct for r in res)
    assert len(pool.cache) == before + 1


# ------------------------------------------------------------------------------------------ real files


def test_gsm8k_test_solutions_match_their_own_answers():
    rows = _rows("gsm8k_test.jsonl")
    golds = [r["answer"].rsplit("####", 1)[-1].strip() for r in rows]
    res = grade_many([r["answer"] for r in rows], golds, ["gsm8k"] * len(rows))
    assert sum(r.correct for r in res) == len(rows) == 1319
    shifted = grade_many([r["answer"] for r in rows], golds[1:] + golds[:1], ["gsm8k"] * len(rows))
    coincidences = sum(parse_number(a) == parse_number(b) for a, b in zip(golds, golds[1:] + golds[:1]))
    assert sum(r.correct for r in shifted) == coincidences  # only genuinely equal answers pass


# how chat models and lm-eval's prompts state a final answer; every form must read every real gold answer
GSM8K_FORMS = {
    "hash": "Reasoning 3 + 4 = 7.\n#### {}",
    "boxed": "Reasoning 3 + 4 = 7.\nThe final answer is $\\boxed{{{}}}$",
    "answer is, then a check": "The answer is {}.\nCheck: 3 + 4 = 7.",
    "bold final answer": "**Final Answer:** {} (3 + 4 = 7 steps)",
    "llama final answer": "## Step 1: 3 + 4 = 7\nThe final answer is: {}",
    "step headings": "#### Step 1: Add\n3 + 4 = 7\n#### Step 2: Total\nSo the total is {}.",
    "units": "#### {} dollars",
}
MATH_FORMS = {
    "boxed": "Some reasoning.\n\nTherefore the answer is $\\boxed{{{}}}$.",
    "minerva": "Some reasoning.\nFinal Answer: The final answer is ${}$. I hope it is correct.",
    "answer is": "Some reasoning with 17 and 4.\nThe answer is ${}$.",
    "bold final answer": "Work: 3 + 4 = 7.\n\n**Final Answer**: ${}$",
    "bold answer": "Work: 3 + 4 = 7.\nThe answer is **{}**.",
    "final answer heading": "Work: 3 + 4 = 7.\n#### Final Answer\n${}$",
}


def test_gsm8k_answer_forms_read_every_test_answer():
    golds = [r["answer"].rsplit("####", 1)[-1].strip() for r in _rows("gsm8k_test.jsonl")]
    plus_one = [str(int(g.replace(",", "")) + 1) for g in golds]
    for name, form in GSM8K_FORMS.items():
        right = grade_many([form.format(g) for g in golds], golds, ["gsm8k"] * len(golds))
        assert [r.correct for r in right] == [True] * 1319, name
        wrong = grade_many([form.format(w) for w in plus_one], golds, ["gsm8k"] * len(golds))
        assert not any(r.correct for r in wrong), name


def test_math_answer_forms_read_every_math500_answer(pool):
    golds = [r["answer"] for r in _rows("math500_test.jsonl")]
    for name, form in MATH_FORMS.items():
        res = grade_many([form.format(g) for g in golds], golds, ["math"] * len(golds), pool=pool, timeout=30)
        assert [(g, r.answer) for g, r in zip(golds, res) if r.correct is not True] == [], name


def _math500_check(rows, pool):
    sols, golds = [r["solution"] for r in rows], [r["answer"] for r in rows]
    own = grade_many(sols, golds, ["math"] * len(rows), pool=pool)
    failures = [(r["unique_id"], g.answer, g.error) for r, g in zip(rows, own) if g.correct is not True]
    other = golds[1:] + golds[:1]
    res = grade_many(sols, other, ["math"] * len(rows), pool=pool)
    accepted = [(canonical_answer(a, "math"), canonical_answer(b, "math")) for a, b, g in zip(golds, other, res) if g.correct is not False]
    return failures, accepted


def test_math500_reference_solutions_subset(pool):
    rows = _rows("math500_test.jsonl")[:80]
    failures, accepted = _math500_check(rows, pool)
    assert failures == []
    assert all(a == b for a, b in accepted), accepted  # accepted only where the two gold answers coincide


@pytest.mark.slow
def test_math500_reference_solutions_all(pool):
    rows = _rows("math500_test.jsonl")
    failures, accepted = _math500_check(rows, pool)
    assert failures == [], failures
    assert len(accepted) <= 5 and all(a == b for a, b in accepted), accepted


def test_gold_answers_in_dataset_form_and_bad_arguments():
    """A GSM8K row's whole answer field (or a boxed gold) is read as its final answer; wrong types and timeouts
    are one clear error naming the argument, not a TypeError from a regex."""
    row = _rows("gsm8k_test.jsonl")[0]
    gold = row["answer"].split("####")[-1].strip()
    assert grade(f"#### {gold}", row["answer"], "gsm8k") and grade(row["answer"], row["answer"], "gsm8k")
    assert not grade(f"#### {gold}1", row["answer"], "gsm8k")
    assert grade("\\boxed{18}", "\\boxed{18}", "gsm8k") and grade(18, "18", "number") and grade("#### 18", 18, "gsm8k")
    for call, needle in ((lambda: grade(["#### 1"], ["1"], "gsm8k"), "prediction of type list"),
                         (lambda: grade("1", "", "number"), "^missing gold answer"),
                         (lambda: grade("1", "1", "number", timeout=-1), "timeout=-1"),
                         (lambda: grade("1", "1", "math", timeout=float("nan")), "timeout=nan"),
                         (lambda: grade_many("12", "12", ["number"] * 2), "takes lists")):
        with pytest.raises(ThinkfastError, match=needle):
            call()


def test_score_regrade_all_grades_graded_samples_again(tmp_path, capsys):
    """After a grader change, `--regrade-all` re-grades samples a file already holds a verdict for."""
    from thinkfast.cli import main

    record = {"problem_id": "p1", "sample_idx": 0, "model": "m", "role": "teacher", "answer": "Step 2: Money",
              "completion": "#### Step 1: Eggs\n16 - 7 = 9\n#### Step 2: Money\n9 * 2 = 18, so $18", "gold": "18",
              "kind": "gsm8k", "correct": False, "grade_error": None, "reward": None, "gen_tokens": 9,
              "prompt_tokens": 5, "seconds": 0.01, "seed": 0, "finish_reason": "eos", "hardware": "cpu", "config": "aa"}
    path = tmp_path / "s.jsonl"
    path.write_text(json.dumps(record) + "\n")
    assert main(["score", str(path)]) == 0  # only null verdicts are graded by default
    assert json.loads(path.read_text())["correct"] is False
    assert main(["score", str(path), "--regrade-all"]) == 0
    regraded = json.loads(path.read_text())
    assert regraded["correct"] is True and regraded["answer"] == "18"
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["score", str(path), "--regrade-all", "--no-regrade"])
    assert e.value.code == 2 and "not allowed with" in capsys.readouterr().err
