"""Data for a pilot of an embedded task whose worked solutions keep at most two numbers in flight.

The demo's pure Mamba (Llamba) student equals the teacher on 2-term sums and fails from 3 terms on
(`distill_recipe.md`, runs T and U): what it cannot do at this size is hold a third number through a block of work.
This writes train / distill / held-out jsonl files for tasks whose every step reads only the lines just above:

  gcd         Euclid's algorithm by repeated column subtraction (reasoning-gym `gcd` questions, two numbers of
              up to 50 / 100 / 200 / 300, a quarter each); each block subtracts the smaller of the pair from the
              larger and writes the next pair, so only the pair is live. Teacher-training examples over
              --max-chars are left out (a third of them at 1,150).
  count_bits  reasoning-gym `count_bits`, worked by halving the number line by line with a running count of odd
              values (numbers up to 2^10 ... 2^27).

Held-out questions that also occur in the train or distill files are dropped, and at most --per-range (16) are
kept per range. With --limit-all, --max-chars bounds every split, so held-out chains are no longer than training ones.

    python benchmarks/local_task_pilot.py --task gcd --out DIR
    # teacher: the tiny-teacher recipe with data = ["jsonl:DIR/train.jsonl?solution=solution&id=id"] and its tokens
    thinkfast train-teacher --recipe RECIPE.toml --out DIR/teacher
    thinkfast distill --recipe tiny-llamba --teacher DIR/teacher --data "jsonl:DIR/distill.jsonl?solution=solution&id=id" \
        --stages matrix,hidden,sft --tokens 24000,400000,900000 --out DIR/llamba
    thinkfast sample --model DIR/teacher --data "jsonl:DIR/heldout.jsonl?id=id&kind=number" --n 8 --temperature 1.3 \
        --max-new-tokens 1200 --out DIR/teacher.jsonl          # and the same for DIR/llamba
    thinkfast report DIR/teacher.jsonl DIR/llamba.jsonl --out DIR/report --dataset "jsonl:DIR/heldout.jsonl?id=id&kind=number" --by max
"""

from __future__ import annotations

import argparse
import json
import random
from collections import defaultdict
from pathlib import Path

import reasoning_gym

from thinkfast.data.worked import gcd_solution


def halving_solution(n: int) -> str:
    lines, count = [], 0
    while n:
        count += n % 2
        lines.append(f"{n}: {'odd' if n % 2 else 'even'}, count {count}")
        n //= 2
    lines.append(f"#### {count}")
    return "\n".join(lines)


TASKS = {
    "gcd": ([50, 100, 200, 300], lambda mx: {"min_value": 1, "max_value": mx},
            lambda item: gcd_solution(item["metadata"]["numbers"])),
    "count_bits": ([2**10, 2**16, 2**20, 2**24, 2**27], lambda mx: {"min_n": 1, "max_n": mx},
                   lambda item: halving_solution(item["metadata"]["number"])),
}


def make(task: str, seed: int, size: int, max_chars: int | None) -> list[dict]:
    ranges, config, solve = TASKS[task]
    rows = []
    for j, mx in enumerate(ranges):
        for item in reasoning_gym.create_dataset(task, size=size // len(ranges), seed=seed + j * 1000003, **config(mx)):
            solution = solve(item)
            if max_chars is not None and len(item["question"]) + len(solution) > max_chars:
                continue
            rows.append({"question": item["question"], "answer": item["answer"], "solution": solution,
                         "id": f"{seed}:{j}:{item['metadata']['source_index']}", "max": mx})
    random.Random(seed).shuffle(rows)
    return rows


def write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=sorted(TASKS), default="gcd")
    ap.add_argument("--out", required=True)
    ap.add_argument("--train", type=int, default=60_000)
    ap.add_argument("--distill", type=int, default=20_000)
    ap.add_argument("--heldout", type=int, default=400, help="drawn before dropping seen questions; 16 kept per range")
    ap.add_argument("--max-chars", type=int, default=1150, help="longest teacher-training example (question + solution)")
    ap.add_argument("--limit-all", action="store_true",
                    help="--max-chars also bounds the distillation and held-out examples: every split from one distribution")
    ap.add_argument("--per-range", type=int, default=16, help="held-out problems kept per range")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train = make(args.task, 1000, args.train, args.max_chars)
    limit = args.max_chars if args.limit_all else None
    distill = make(args.task, 200_000, args.distill, limit)  # the students' rows hold 1,280 tokens
    seen = {r["question"] for r in train + distill}
    per_range = defaultdict(list)
    for r in make(args.task, 900_000, args.heldout, limit):
        if r["question"] not in seen and len(per_range[r["max"]]) < args.per_range:
            per_range[r["max"]].append(r)
    heldout = [r for mx in sorted(per_range) for r in per_range[mx]]
    for name, rows in (("train", train), ("distill", distill), ("heldout", heldout)):
        write(out / f"{name}.jsonl", rows)
    lengths = sorted(len(r["question"]) + len(r["solution"]) for r in train)
    print(f"{args.task}: {len(train)} train, {len(distill)} distill, {len(heldout)} held-out "
          f"({', '.join(f'{mx}: {len(v)}' for mx, v in sorted(per_range.items()))}); "
          f"train characters median {lengths[len(lengths) // 2]}, max {lengths[-1]}")


if __name__ == "__main__":
    main()
