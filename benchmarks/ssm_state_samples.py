"""What a lower-precision SSM state does on the demo's sampling workload: the demo's hybrid and Llamba sample its
held-out problems (n=32, temperature 1.3, batch 256, as the demo does) with an fp32, a bf16 and an fp16 SSM state,
all six engines taking turns (`sample_interleaved`), so their speeds are measured side by side.

    python benchmarks/ssm_state_samples.py DEMO_DIR OUT_DIR [--compile on|off] [--md benchmarks/ssm_state_samples.md]

Per model and state: engine tokens/s and seconds per sample (and the ratio to the same model's fp32 state), how
many samples equal the fp32 state's sample of the same seed, and pass@1 with its paired difference from fp32 and a
95% bootstrap interval over problems. Re-running resumes the samples files in OUT_DIR; the speeds are those of
the run that wrote them (engine time, kept in each file's `seconds`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

STATES = ("float32", "bfloat16", "float16")
MODELS = ("hybrid", "llamba")


def read(path: Path) -> dict:
    return {(r["problem_id"], r["sample_idx"]): r for r in map(json.loads, path.read_text().splitlines())}


def compare(base: dict, other: dict) -> dict:
    from thinkfast.eval.metrics import bootstrap_ci

    keys = sorted(base)
    if set(other) != set(base):
        raise SystemExit("the samples files hold different samples; finish both runs first")
    problems = sorted({k[0] for k in keys})
    diff = {p: [] for p in problems}
    for k in keys:
        diff[k[0]].append(bool(other[k]["correct"]) - bool(base[k]["correct"]))
    per_problem = np.array([np.mean(diff[p]) for p in problems])
    lo, hi = bootstrap_ci(per_problem, n_boot=2000)
    seconds = sum(r["seconds"] for r in other.values())
    tokens = sum(r["gen_tokens"] for r in other.values())
    return {"samples": len(keys), "same_as_fp32": sum(base[k]["completion"] == other[k]["completion"] for k in keys),
            "pass_at_1": float(np.mean([bool(r["correct"]) for r in other.values()])),
            "pass_at_1_minus_fp32": float(per_problem.mean()), "ci": [float(lo), float(hi)],
            "seconds_per_sample": seconds / len(keys), "tokens_per_second": tokens / seconds,
            "hardware": next(iter(other.values()))["hardware"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("demo_dir")
    ap.add_argument("out_dir")
    ap.add_argument("--compile", choices=["on", "off"], default="on")
    ap.add_argument("--md", default="benchmarks/ssm_state_samples.md")
    args = ap.parse_args()
    demo, out = Path(args.demo_dir), Path(args.out_dir)
    for m in MODELS:
        if not (demo / "models" / m / "config.json").is_file():
            raise SystemExit(f"{demo}: no models/{m}; pass a finished `thinkfast demo` folder")

    from thinkfast.data.prompts import PromptStyle
    from thinkfast.engine.run import sample_interleaved
    from thinkfast.engine.sampling import SamplingParams
    from thinkfast.eval.grading import grade_many

    out.mkdir(parents=True, exist_ok=True)
    jobs = [dict(model_spec=str(demo / "models" / m), out=out / f"{m}-{s}.jsonl", name=f"{m}-{s}", ssm_state_dtype=s)
            for m in MODELS for s in STATES]
    common = dict(data_spec=f"jsonl:{demo / 'data' / 'heldout.jsonl'}?id=id", n=32,
                  params=SamplingParams(temperature=1.3, max_new_tokens=1200), seed=0, batch_size=256,
                  style=PromptStyle(instruction="none"), grade_fn=grade_many, compile=args.compile == "on")
    sample_interleaved(jobs, common, progress=sys.stderr.isatty())

    rows = {}
    for m in MODELS:
        base = read(out / f"{m}-float32.jsonl")
        for s in STATES:
            rows[f"{m}-{s}"] = compare(base, read(out / f"{m}-{s}.jsonl"))
    lines = [
        "# The SSM state's precision on the demo's sampling workload", "",
        f"- command: `python benchmarks/ssm_state_samples.py {demo} {out} --compile {args.compile}`",
        f"- hardware: {next(iter(rows.values()))['hardware']}",
        "- the demo's held-out problems, n=32 at temperature 1.3, batch 256; all six engines taking turns (1 s each)",
        "- same as fp32: samples identical to the fp32 state's sample of the same seed; pass@1 difference: paired over "
        "problems, 95% bootstrap interval (2,000 resamples)", "",
        "| model | SSM state | tokens/s | s / sample | vs fp32 (speed) | same as fp32 | pass@1 | minus fp32 | 95% interval |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, r in rows.items():
        m, s = name.split("-")
        speed = rows[f"{m}-float32"]["seconds_per_sample"] / r["seconds_per_sample"]
        lines.append(f"| {m} | {s} | {r['tokens_per_second']:,.0f} | {r['seconds_per_sample']:.4f} | {speed:.2f}x | "
                     f"{r['same_as_fp32']} / {r['samples']} | {r['pass_at_1']:.3f} | {r['pass_at_1_minus_fp32']:+.4f} | "
                     f"[{r['ci'][0]:+.4f}, {r['ci'][1]:+.4f}] |")
    Path(args.md).write_text("\n".join(lines) + "\n")
    Path(args.md).with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
