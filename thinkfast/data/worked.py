"""Worked solutions for procedural arithmetic that reasoning-gym gives only a final answer for.

A sum is solved one term at a time, column by column with carries, the way a pupil writes it out:

    47 + 77:
    ones: 7+7=14, write 4, carry 1
    tens: 4+7+1=12, write 2, carry 1
    hundreds: carry 1, write 1
    so 47 + 77 = 124

A GCD is found by Euclid's algorithm as repeated column subtraction (`gcd(18, 65)` / `larger first: gcd(65, 18)` /
`65 - 18:` / `ones: 5-8, borrow: 15-8=7, write 7` / ... / `so 65 - 18 = 47` / `gcd(47, 18)` ... `#### 1`): only
the current pair is live.

Every token is a small local step, so a small model can learn it, and a chain of several terms runs to hundreds
of characters: long enough that a Transformer's growing KV cache matters when sampling.

Style "left" also restates, after each partial sum, the terms still to add (`left: 5 + 300`), so the next term is
copied from a line one addition back instead of from the question, hundreds of tokens back. It tests whether a
pure Mamba student's misses are about distance; they are not: it then miscopies the restated lists instead
(benchmarks/distill_recipe.md, run R).

Style "running" ends each column line with the sum's digits so far (`tens: 6+8=14, write 4, carry 1 -> 46`) and
the addition with `so the sum is 757746`: the final line copies the line above instead of reading both terms and
the written digits back from far up, where a pure Mamba student failed on long two-term sums (run Z).
"""

from __future__ import annotations

import re

SUM = re.compile(r"^\s*\d+(\s*\+\s*\d+)+\s*$")
STYLES = ("columns", "left", "running")
PLACES = ["ones", "tens", "hundreds", "thousands"]


def place_name(i: int) -> str:
    return PLACES[i] if i < len(PLACES) else f"10^{i}"


def column_addition(a: int, b: int, running: bool = False) -> list[str]:
    """`a + b` column by column. `running`: each column line also writes the digits so far (`-> 46`) and the last
    line states only the sum, so no line reads a number back from far above."""
    lines = [f"{a} + {b}:"]
    da, db = str(a)[::-1], str(b)[::-1]
    carry = 0
    width = max(len(da), len(db))
    for i in range(width):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        total = x + y + carry
        step = f"{x}+{y}+{carry}={total}" if carry else f"{x}+{y}={total}"
        line = f"{place_name(i)}: {step}, write {total % 10}" + (", carry 1" if total >= 10 else "")
        lines.append(line + (f" -> {str(a + b)[-(i + 1):]}" if running else ""))
        carry = total // 10
    if carry:
        lines.append(f"{place_name(width)}: carry 1, write 1" + (f" -> {a + b}" if running else ""))
    lines.append(f"so the sum is {a + b}" if running else f"so {a} + {b} = {a + b}")
    return lines


def column_subtraction(a: int, b: int) -> list[str]:
    """`a - b` for a >= b >= 0, column by column with borrows; each line reads only digits just above it."""
    lines = [f"{a} - {b}:"]
    da, db = str(a)[::-1], str(b)[::-1]
    borrow = 0
    for i in range(len(da)):
        x, y = int(da[i]), int(db[i]) if i < len(db) else 0
        top = x - borrow
        step = f"{x}-{borrow}" if borrow else f"{x}"
        if top < y:
            lines.append(f"{place_name(i)}: {step}-{y}, borrow: {top + 10}-{y}={top + 10 - y}, write {top + 10 - y}")
            borrow = 1
        else:
            lines.append(f"{place_name(i)}: {step}-{y}={top - y}, write {top - y}")
            borrow = 0
    lines.append(f"so {a} - {b} = {a - b}")
    return lines


def gcd_solution(numbers: list[int]) -> str | None:
    """Euclid's algorithm by repeated subtraction, ending in `#### gcd`: each block subtracts the smaller number of
    the pair from the larger and writes the next pair, so only the pair is live (a third number joins when the
    first pair is done). None unless every number is a positive integer."""
    if len(numbers) < 2 or any(not isinstance(n, int) or n < 1 for n in numbers):
        return None
    g, lines = numbers[0], []
    for n in numbers[1:]:
        # copy the pair as the question orders it, then reorder it on the next line: copying and comparing in one
        # step from the question is where a pure Mamba student failed most (benchmarks/distill_recipe.md, run X)
        a, b = max(g, n), min(g, n)
        lines += [f"gcd({g}, {n})", f"larger first: gcd({a}, {b})"]
        while a != b:
            lines += column_subtraction(a, b)
            a, b = max(b, a - b), min(b, a - b)
            lines.append(f"gcd({a}, {b})")
        g = a
        lines.append(f"equal, so the GCD is {g}")
    lines.append(f"#### {g}")
    return "\n".join(lines)


def sum_solution(expression: str, style: str = "columns") -> str | None:
    """Worked solution of `a + b + ...` (non-negative integers), ending in `#### total`; None for other expressions."""
    if style not in STYLES:
        raise ValueError(f"unknown worked-solution style {style!r}; use one of {', '.join(STYLES)}")
    if not SUM.match(expression):
        return None
    terms = [int(t) for t in expression.split("+")]
    lines, total = [], terms[0]
    for i, term in enumerate(terms[1:], start=2):
        lines += column_addition(total, term, running=style == "running")
        total += term
        if style == "left" and i < len(terms):
            lines.append("left: " + " + ".join(map(str, terms[i:])))
    lines.append(f"#### {total}")
    return "\n".join(lines)


def worked_solution(generator: str, item: dict, style: str = "columns") -> str | None:
    """A worked solution for a reasoning-gym item, from its own chain of thought or one we can derive (sums: in
    `style`)."""
    meta = item.get("metadata", {})
    if meta.get("answer_cot"):
        return meta["answer_cot"]
    expression = meta.get("expression")
    if generator in ("basic_arithmetic", "chain_sum") and expression:
        return sum_solution(expression, style)
    if generator == "gcd" and meta.get("numbers"):
        return gcd_solution(list(meta["numbers"]))
    return None
