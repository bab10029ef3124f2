"""Where a demo model first leaves the worked solution, greedily decoded on fresh sums.

    python benchmarks/student_errors.py DEMO_DIR/models/hybrid [--problems 96] [--seed 950000] [--teacher-forced]

Each problem is decoded greedily in the engine and compared, character by character, with the reference
solution (`thinkfast.data.worked.sum_solution`). The first differing character is classified by what writing it
needed: a term of the question (the header of a pairwise block, `143 + 14:`; the first header's left operand is
the question's first term), the running total carried from the previous block, an operand digit of a column
(`ones: 3+4`), a column's sum, the `so` line, or the final answer.

`--teacher-forced` also feeds each reference solution through the model and counts, per kind of digit, how
often its most likely next token is not the reference's (one forward pass per problem): a rate for every
digit, not only the first slip. `--worked left` compares with the style that restates the terms still to add
(`left: ...` lines, their own kind), for a model trained on it. benchmarks/distill_recipe.md and benchmarks/demo_findings.md
record the results.
"""

from __future__ import annotations

import argparse
import collections
import re

import torch

KINDS = ("exact", "next term from the question", "running total", "operand digit in a column", "column sum",
         "write/carry", "so-line", "left-line", "final answer", "other")


def kind_at(reference: str, i: int) -> str:
    """What writing character i of the reference needed, judged from its line up to there."""
    before = reference[:i]
    line = before.split("\n")[-1]
    if re.fullmatch(r"\d+ \+ \d*", line) or ("\n" not in before and re.fullmatch(r"\d*", line)):
        return "next term from the question"
    if re.fullmatch(r"\d*", line):
        return "running total"
    if line.startswith("so "):
        return "so-line"
    if line.startswith("left: "):
        return "left-line"
    if line.startswith("#"):
        return "final answer"
    if re.fullmatch(r"[\w^]+: (carry 1, )?\d*(\+\d*)*", line):
        return "operand digit in a column"
    if "=" in line and "write" not in line:
        return "column sum"
    if "write" in line or "carry" in line:
        return "write/carry"
    return "other"


def classify(reference: str, completion: str) -> str:
    if completion.strip() == reference.strip():
        return "exact"
    n = min(len(reference), len(completion))
    return kind_at(reference, next((k for k in range(n) if reference[k] != completion[k]), n))


def teacher_forced_errors(model, tok, pairs: list[tuple[str, str]]) -> tuple[collections.Counter, collections.Counter]:
    """Per kind: digits of the reference solutions, and those the model's argmax gets wrong (the rest: "non-digit")."""
    digits, wrong = collections.Counter(), collections.Counter()
    for prompt, reference in pairs:
        enc = tok(prompt + reference, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"]
        with torch.no_grad():
            guess = model(torch.tensor([ids])).logits[0].argmax(-1).tolist()
        for t in range(1, len(ids)):
            start, end = (o - len(prompt) for o in enc["offset_mapping"][t])
            if start < 0:
                continue
            kind = kind_at(reference, start) if reference[start:end].isdigit() else "non-digit"
            digits[kind] += 1
            wrong[kind] += guess[t - 1] != ids[t]
            if kind == "left-line":  # how many terms that line holds: does recall fail with the list's length?
                line = reference[reference.rfind("\n", 0, start) + 1:].split("\n")[0]
                by_length = f"left-line, {line.count('+') + 1} terms"
                digits[by_length] += 1
                wrong[by_length] += guess[t - 1] != ids[t]
    return digits, wrong


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="a thinkfast model folder with its tokenizer (e.g. DEMO_DIR/models/hybrid)")
    ap.add_argument("--problems", type=int, default=96)
    ap.add_argument("--seed", type=int, default=950_000, help="reasoning-gym seed of the fresh problems (held-out range)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--teacher-forced", action="store_true", help="also the per-digit error rate on the reference solutions")
    from thinkfast.data.worked import STYLES

    ap.add_argument("--worked", choices=STYLES, default="columns", help="the reference solutions' style")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    from thinkfast.data import load_problems
    from thinkfast.data.prompts import PromptStyle, render_prompt
    from thinkfast.data.worked import sum_solution
    from thinkfast.embedded import PROMPT_STYLE, sums_spec
    from thinkfast.engine.engine import Engine
    from thinkfast.engine.run import encode_prompt
    from thinkfast.engine.sampling import SamplingParams
    from thinkfast.models import ThinkfastForCausalLM

    tok = AutoTokenizer.from_pretrained(args.model)
    model = ThinkfastForCausalLM.from_pretrained(args.model).eval()
    problems = load_problems(sums_spec(args.problems, args.seed))
    style = PromptStyle(**PROMPT_STYLE)
    texts = {p.id: render_prompt(p, tok, style) for p in problems}
    prompts = [(p.id, encode_prompt(tok, texts[p.id], True)) for p in problems]
    engine = Engine(model, tok, batch_size=64, compile=False)
    with torch.no_grad():
        done = list(engine.generate(prompts, n=1, params=SamplingParams(temperature=0.0, max_new_tokens=1200), seed=1))
    by_id = {p.id: p for p in problems}
    counts = collections.Counter(classify(sum_solution(by_id[c.problem_id].meta["expression"], args.worked), c.text or "") for c in done)
    print(f"{args.model}: {len(done)} problems, greedy")
    print("| " + " | ".join(KINDS) + " |")
    print("|" + "---:|" * len(KINDS))
    print("| " + " | ".join(str(counts.get(k, 0)) for k in KINDS) + " |")
    if args.teacher_forced:
        pairs = [(texts[p.id], sum_solution(p.meta["expression"], args.worked)) for p in problems]
        digits, wrong = teacher_forced_errors(model, tok, pairs)
        kinds = [k for k in (*KINDS, "non-digit", *sorted(k for k in digits if k.startswith("left-line, "))) if digits[k]]
        print("teacher-forced: next-token error rate per kind (tokens of that kind in brackets)")
        print("| " + " | ".join(f"{k} ({digits[k]})" for k in kinds) + " |")
        print("|" + "---:|" * len(kinds))
        print("| " + " | ".join(f"{wrong[k] / digits[k]:.3f}" for k in kinds) + " |")


if __name__ == "__main__":
    main()
