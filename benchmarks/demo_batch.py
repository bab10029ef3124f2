"""Seconds per sample of a finished demo's models against the engine's batch size and precision, on the demo's own workload.

    python benchmarks/demo_batch.py DEMO_DIR --batches 64,128,256 [--dtypes float32,bfloat16]
        [--row-groups 32,none] [--models teacher,llamba,hybrid] [--problems 24]

Samples the first --problems held-out problems n=32 times each at the demo's temperature (the demo's sampling
step, without grading or writing) for every (batch, dtype, row group, model), interleaving the models within each setting so
that machine drift hits them alike, and reports each model's mean engine seconds per sample and its ratio to the
teacher's in the same setting. Writes --out .md and .json (default benchmarks/demo_batch-latest).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("demo_dir")
    ap.add_argument("--batches", default="64,128,256")
    ap.add_argument("--dtypes", default="float32", help="comma list of float32, bfloat16 (bf16 pays on CPUs with AMX)")
    ap.add_argument("--row-groups", default="32",
                    help="comma list of the engine's row_group (rows per attention block, rows ordered by context), or none")
    ap.add_argument("--models", default="teacher,llamba,hybrid")
    ap.add_argument("--problems", type=int, default=24)
    ap.add_argument("--out", default="benchmarks/demo_batch-latest")
    args = ap.parse_args()
    demo = Path(args.demo_dir)
    models = args.models.split(",")
    if "teacher" not in models:
        raise SystemExit("--models: include teacher (ratios are to the teacher's seconds per sample)")
    for m in models:
        if not (demo / "models" / m / "config.json").is_file():
            raise SystemExit(f"{demo}: no models/{m}; pass a finished `thinkfast demo` folder")
    try:
        batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        raise SystemExit(f"--batches {args.batches!r}: give comma-separated integers, e.g. 64,128,256") from None
    dtypes = args.dtypes.split(",")
    try:
        groups = [None if g == "none" else int(g) for g in args.row_groups.split(",")]
    except ValueError:
        raise SystemExit(f"--row-groups {args.row_groups!r}: give comma-separated integers or none, e.g. 32,none") from None
    if not set(dtypes) <= {"float32", "bfloat16"}:
        raise SystemExit(f"--dtypes {args.dtypes!r}: give a comma list of float32, bfloat16")

    import torch
    from transformers import AutoTokenizer

    from thinkfast.data import load_problems
    from thinkfast.data.prompts import PromptStyle, render_prompt
    from thinkfast.demo import DemoSettings
    from thinkfast.embedded import PROMPT_STYLE
    from thinkfast.engine.engine import Engine
    from thinkfast.engine.run import encode_prompt, hardware_string
    from thinkfast.engine.sampling import SamplingParams
    from thinkfast.models import ThinkfastForCausalLM

    s = DemoSettings()
    tok = AutoTokenizer.from_pretrained(demo / "models" / "teacher")
    held = load_problems(f"jsonl:{demo / 'data' / 'heldout.jsonl'}?question=question&answer=answer&id=id&kind=number")
    style = PromptStyle(instruction=PROMPT_STYLE["instruction"])
    prompts = [(p.id, encode_prompt(tok, render_prompt(p, tok, style), True)) for p in held[: args.problems]]
    params = SamplingParams(temperature=s.temperature, top_p=s.top_p, max_new_tokens=s.max_new_tokens)
    lms = {m: ThinkfastForCausalLM.from_pretrained(demo / "models" / m).eval() for m in models}
    rows = []
    for B, dtype, group in [(B, d, g) for B in batches for d in dtypes for g in groups]:
        for m in models:
            engine = Engine(lms[m], tok, batch_size=B, compile=False, dtype=getattr(torch, dtype), row_group=group)
            t0 = time.perf_counter()
            with torch.no_grad():
                done = list(engine.generate(prompts, n=s.n, params=params, seed=s.seed))
            wall = time.perf_counter() - t0
            row = {"batch": B, "dtype": dtype, "row_group": group, "model": m, "samples": len(done), "wall_seconds": round(wall, 2),
                   "seconds_per_sample": sum(c.seconds for c in done) / len(done),
                   "tokens_per_second": sum(len(c.tokens) for c in done) / wall}
            rows.append(row)
            print(f"batch {B} {dtype} row group {group} {m}: {row['seconds_per_sample']:.4f} s/sample, {row['tokens_per_second']:,.0f} tok/s", flush=True)
    teacher = {(r["batch"], r["dtype"], r["row_group"]): r["seconds_per_sample"] for r in rows if r["model"] == "teacher"}
    lines = [
        "# Seconds per sample against the engine's batch size and precision (a finished demo's models, its sampling workload)",
        "",
        f"Command: `python benchmarks/demo_batch.py DEMO_DIR --batches {args.batches} --dtypes {args.dtypes} --row-groups {args.row_groups} "
        f"--models {args.models} --problems {args.problems}` ({hardware_string(torch.device('cpu'))}; "
        f"{args.problems} held-out problems x {s.n} samples at T={s.temperature}; models interleaved within each setting)",
        "",
        "| batch | dtype | row group | model | s / sample | tokens / s | / teacher's s / sample |",
        "|---:|---|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['dtype']} | {r['row_group'] or 'none'} | {r['model']} | {r['seconds_per_sample']:.4f} | "
                     f"{r['tokens_per_second']:,.0f} | {r['seconds_per_sample'] / teacher[r['batch'], r['dtype'], r['row_group']]:.2f} |")
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    Path(args.out + ".json").write_text(json.dumps(rows, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
