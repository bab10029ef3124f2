"""The embedded default: worked solutions, the byte tokenizer, the shipped teacher and the recipe that made it."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from thinkfast.data import load_problems
from thinkfast.data.tokenizer import build_byte_tokenizer
from thinkfast.data.worked import gcd_solution, sum_solution
from thinkfast.distill.recipes import RECIPE_DIR
from thinkfast.embedded import TEACHER_SPEC, TINY_TEACHER, train_teacher
from thinkfast.eval.grading import grade

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib


@pytest.mark.parametrize("expression", ["7 + 5", "999 + 1 + 0", "47 + 77 + 60 + 9999", "0 + 0"])
def test_worked_sum_solutions_are_correct_and_graded_right(expression):
    total = sum(int(t) for t in expression.split("+"))
    sol = sum_solution(expression)
    assert sol.endswith(f"#### {total}")
    assert grade(sol, str(total), "number") is True and grade(sol, str(total + 1), "number") is False
    # every column line is true arithmetic
    for line in sol.splitlines():
        if "=" in line and ":" in line and "write" in line:
            lhs, rhs = line.split(": ", 1)[1].split(",")[0].split("=")
            assert sum(int(x) for x in lhs.split("+")) == int(rhs), line


def test_left_style_restates_the_terms_still_to_add_and_only_adds_lines():
    expression = "47 + 77 + 5 + 300"
    plain, left = sum_solution(expression), sum_solution(expression, "left")
    restated = [line for line in left.splitlines() if line.startswith("left: ")]
    assert restated == ["left: 5 + 300", "left: 300"]
    assert [line for line in left.splitlines() if not line.startswith("left: ")] == plain.splitlines()
    assert sum_solution("7 + 5", "left") == sum_solution("7 + 5")  # nothing left after the only addition
    with pytest.raises(ValueError, match="style"):
        sum_solution(expression, "rows")


@pytest.mark.parametrize("expression", ["114163 + 643583", "999 + 1", "5 + 5 + 90", "100 + 1", "0 + 0"])
def test_running_style_writes_the_digits_so_far_and_states_only_the_sum(expression):
    """Each column line ends with the sum's digits up to that column, so the last line copies the line above it
    instead of reading the terms and the written digits back from far up."""
    terms = [int(t) for t in expression.split("+")]
    sol = sum_solution(expression, "running")
    assert sol.endswith(f"#### {sum(terms)}") and grade(sol, str(sum(terms)), "number") is True
    for k, block in enumerate(sol.split(":\n")[1:]):  # one block per addition, after its `a + b:` header
        lines = block.splitlines()
        columns = [x for x in lines if " -> " in x]
        total = sum(terms[: k + 2])
        digits = str(total)
        assert [x.rsplit(" -> ", 1)[1] for x in columns] == [digits[-(i + 1):] for i in range(len(columns))]
        assert lines[len(columns)] == f"so the sum is {total}"
    plain_columns = [x for x in sum_solution(expression).splitlines() if "write" in x]
    assert [x.rsplit(" -> ", 1)[0] for x in sol.splitlines() if " -> " in x] == plain_columns  # the same arithmetic


def test_rg_spec_worked_option_picks_the_style_and_refuses_unknown_ones():
    from thinkfast.errors import DataError

    spec = TEACHER_SPEC.replace("size=150000", "size=20")
    plain, left = load_problems(spec), load_problems(spec + "&worked=left")
    assert [p.question for p in plain] == [p.question for p in left]  # the option never reaches reasoning-gym
    assert all(q.solution == sum_solution(q.meta["expression"], "left") for q in left)
    assert any("\nleft: " in q.solution for q in left) and not any("\nleft: " in q.solution for q in plain)
    with pytest.raises(DataError, match="worked='rows'"):
        load_problems(spec + "&worked=rows")


@pytest.mark.parametrize("numbers", [[65, 18], [100, 60], [7, 7], [1, 300], [60, 100, 32], [1000, 1]])
def test_gcd_solutions_are_true_subtractions_ending_in_the_gcd(numbers):
    import math
    import re

    sol = gcd_solution(numbers)
    g = math.gcd(*numbers)
    assert sol.endswith(f"#### {g}") and grade(sol, str(g), "number") is True
    lines = sol.splitlines()
    for i, line in enumerate(lines):
        if m := re.fullmatch(r"so (\d+) - (\d+) = (\d+)", line):
            a, b, c = map(int, m.groups())
            assert a - b == c and lines[i + 1] == f"gcd({max(b, c)}, {min(b, c)})"  # the next pair, nothing else
        if m := re.search(r"borrow: (\d+)-(\d+)=(\d+), write (\d+)$", line):
            x, y, d, w = map(int, m.groups())
            assert x - y == d == w and 9 <= x <= 18  # a digit, less a borrow, plus ten
    assert lines[:2] == [f"gcd({numbers[0]}, {numbers[1]})",  # the question's order first, then reordered
                         f"larger first: gcd({max(numbers[:2])}, {min(numbers[:2])})"]
    digits = {int(line.split("write ")[1][0]) for line in lines if "write" in line}
    assert digits <= set(range(10))
    assert gcd_solution([0, 5]) is None and gcd_solution([4]) is None


def test_rg_gcd_spec_has_worked_solutions_and_max_chars_keeps_ids():
    from thinkfast.data.sources import check_spec
    from thinkfast.errors import DataError

    spec = "rg:gcd?min_value=1&max_value=300&size=40&seed=3"
    whole, short = load_problems(spec), load_problems(spec + "&max_chars=600")
    assert all(p.solution and p.solution.endswith("#### " + p.answer) for p in whole)
    assert 0 < len(short) < len(whole)  # some chains run longer than 600 characters, some do not
    assert all(len(p.question) + len(p.solution) <= 600 for p in short)
    by_id = {p.id: p for p in whole}
    assert all(by_id[p.id].question == p.question for p in short)  # the same items, under the same ids
    for bad, says in (("0", "max_chars=0 must be at least 1"), ("x", "max_chars='x' is not an integer")):
        with pytest.raises(DataError, match=says):
            check_spec(spec + f"&max_chars={bad}")


def test_worked_solutions_are_hundreds_of_tokens():
    problems = load_problems(TEACHER_SPEC.replace("size=150000", "size=300"))
    lengths = [len(p.solution) for p in problems]
    assert all(p.solution and p.solution.endswith("#### " + p.answer) for p in problems)
    assert sum(lengths) / len(lengths) > 250 and max(lengths) > 600


def test_byte_tokenizer_roundtrips_any_text_and_has_a_chat_template(tmp_path):
    tok = build_byte_tokenizer()
    text = "Calculate 13 + 92.\nso 13 + 92 = 105 ✓ é"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text and len(ids) == len(text.encode())
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    prompt = again.apply_chat_template([{"role": "user", "content": "Calculate 1 + 2."}], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n") and again.eos_token == "<|im_end|>"


def test_shipped_teacher_matches_its_recipe_and_loads():
    recipe = tomllib.loads((RECIPE_DIR / "tiny-teacher.toml").read_text())
    cfg = json.loads((TINY_TEACHER / "config.json").read_text())
    for key, value in recipe["architecture"].items():
        assert cfg[key] == value, key
    assert cfg["attn_layers"] == list(range(cfg["n_layers"])) and cfg["n_kv_heads"] < cfg["n_heads"]  # GQA
    model = AutoModelForCausalLM.from_pretrained(TINY_TEACHER)
    tok = AutoTokenizer.from_pretrained(TINY_TEACHER)
    assert model.config.role == "teacher" and len(tok) == cfg["vocab_size"]


def test_shipped_teacher_solves_a_sum_greedily():
    model = AutoModelForCausalLM.from_pretrained(TINY_TEACHER).eval()
    tok = AutoTokenizer.from_pretrained(TINY_TEACHER)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Calculate 23 + 45."}], tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
    lm = model.lm
    with torch.no_grad():
        state = lm.allocate_state(1, 512)
        logits = lm(ids, state=state).logits[:, -1]
        out, pos = [], ids.shape[1]
        for _ in range(200):
            nxt = logits.argmax(-1)
            if nxt.item() == tok.eos_token_id:
                break
            out.append(nxt.item())
            logits = lm.step(nxt, torch.tensor([pos]), state)
            pos += 1
    assert grade(tok.decode(out), "68", "number") is True, tok.decode(out)


def test_teacher_recipe_still_trains(tmp_path):
    # the recipe as shipped, on a slice of its data (its full 150k problems take minutes to prepare)
    small = TEACHER_SPEC.replace("size=150000", "size=64")
    model = train_teacher("tiny-teacher", tmp_path / "t", tokens=4096, progress=False, flags={"data": [small]})
    assert model.config.role == "teacher"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "t")
    assert loaded.config.prompt_style == {"instruction": "none"}
    assert (tmp_path / "t" / "tokenizer.json").is_file()


def test_written_model_folders_are_readable_like_any_folder(tmp_path):
    # temporary folders start 0700 and transformers writes model.safetensors 0600; outputs get the usual modes
    import os
    import stat

    from thinkfast.utils import atomic_dir

    model = AutoModelForCausalLM.from_pretrained(TINY_TEACHER)
    with atomic_dir(tmp_path / "m") as d:
        model.save_pretrained(d)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "m").stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((tmp_path / "m" / "model.safetensors").stat().st_mode) == 0o666 & ~umask
