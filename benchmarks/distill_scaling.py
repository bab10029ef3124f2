"""How many more distillation tokens a demo student needs: continue its forward-KL KD and measure accuracy.

Takes a finished `thinkfast demo` folder, continues one student's KD (MOHAWK stage 3 / the hybrid's end-to-end
KD, forward KL, on the demo's own distillation data) for --tokens more tokens, and every --every steps samples
the first --problems held-out problems greedily and at temperatures 1.0 and 1.3 (4 samples each) in the engine.

    python benchmarks/distill_scaling.py DEMO_DIR --student hybrid --tokens 1600000 --every 50
    python benchmarks/distill_scaling.py DEMO_DIR --student llamba --tokens 800000 --every 50

Prints one JSON line per evaluation (and appends them to OUT/eval.jsonl).
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import torch

from thinkfast.data import load_problems
from thinkfast.data.packing import DataConfig
from thinkfast.data.prompts import PromptStyle, render_prompt
from thinkfast.demo import DISTILL_SEED
from thinkfast.distill.stages import StageConfig, distill
from thinkfast.distill.trainer import TrainConfig
from thinkfast.embedded import PROMPT_STYLE, sums_spec
from thinkfast.engine.engine import Engine
from thinkfast.engine.run import encode_prompt
from thinkfast.engine.sampling import SamplingParams
from thinkfast.models import ThinkfastForCausalLM

ANSWER = re.compile(r"#### *(-?\d+)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("demo_dir")
    ap.add_argument("--student", default="hybrid", choices=["hybrid", "llamba"])
    ap.add_argument("--tokens", type=int, default=1_600_000)
    ap.add_argument("--every", type=int, default=50, help="optimizer steps between evaluations")
    ap.add_argument("--rows", type=int, default=8, help="rows per optimizer step")
    ap.add_argument("--row-tokens", type=int, default=1024, help="tokens per row")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--problems", type=int, default=24)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="work folder (default DEMO_DIR/work/scaling-<student>)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    demo = Path(args.demo_dir)
    out = Path(args.out or demo / "work" / f"scaling-{args.student}")
    out.mkdir(parents=True, exist_ok=True)

    teacher = ThinkfastForCausalLM.from_pretrained(demo / "models" / "teacher")
    student = ThinkfastForCausalLM.from_pretrained(demo / "models" / args.student)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo / "models" / "teacher")
    style = PromptStyle(instruction=PROMPT_STYLE["instruction"])
    spec = f"jsonl:{demo / 'data' / 'heldout.jsonl'}?question=question&answer=answer&id=id&kind=number"
    problems = load_problems(spec)[: args.problems]
    prompts = [(p.id, encode_prompt(tok, render_prompt(p, tok, style), True)) for p in problems]
    gold = {p.id: p.answer for p in problems}

    def accuracy(temperature: float, n: int) -> float:
        engine = Engine(student, tok, batch_size=64, compile=False)
        done = list(engine.generate(prompts, n=n, params=SamplingParams(temperature=temperature, max_new_tokens=1200), seed=1))
        right = sum(bool((m := ANSWER.search(c.text or "")) and m.group(1) == gold[c.problem_id]) for c in done)
        return right / len(done)

    log = (out / "eval.jsonl").open("a")

    def evaluate(step: int, tokens: int) -> None:
        student.eval()
        with torch.no_grad():
            row = {"student": args.student, "step": step, "extra_tokens": tokens, "greedy": accuracy(0.0, 1),
                   "t1.0": accuracy(1.0, 4), "t1.3": accuracy(1.3, 4)}
        student.train()
        print(json.dumps(row), flush=True)
        log.write(json.dumps(row) + "\n")
        log.flush()

    evaluate(0, 0)
    rows_per_step, seq_len = args.rows, args.row_tokens

    def every(step, record):
        if step % args.every == 0:
            evaluate(step, step * rows_per_step * seq_len)

    data = DataConfig(specs=[sums_spec(20000, DISTILL_SEED)], instruction=PROMPT_STYLE["instruction"], seed=0)
    stage = StageConfig("kd", TrainConfig(tokens=args.tokens, lr=args.lr, warmup=0.05, batch_size=rows_per_step, seq_len=seq_len,
                                          log_every=10, ckpt_every=0, weight_decay=0.0), loss="forward_kl")
    t0 = time.time()
    distill(teacher, student, data, [stage], tokenizer=tok, out_dir=out / "run", progress=False, callback=every)
    evaluate(-1, args.tokens)
    print(json.dumps({"wall_seconds": round(time.time() - t0)}))


if __name__ == "__main__":
    main()
