"""Do models that take turns (`sample_interleaved`, the demo's sampling) time as they do one after another?

    python benchmarks/interleaved_timing.py DEMO_DIR [--problems 16] [--rounds 2] [--turn-seconds 1]

Samples the first --problems held-out problems of a finished demo n=32 times each with the demo's settings, for
every model, in two modes per round: one model after another (`sample_to_file`) and taking turns
(`sample_interleaved`), the modes' order alternating between rounds. Reports each model's mean seconds per sample
(the samples' `seconds`, the report's time axis) and its ratio to the teacher's in the same pass. Taking turns must
not slow a model (cache or thread-pool effects of switching): on a steady machine both modes give the same ratios.
Writes --out .md and .json (default benchmarks/interleaved_timing-latest).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

MODELS = ("teacher", "llamba", "hybrid")


def seconds_per_sample(path: Path) -> float:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return sum(r["seconds"] for r in rows) / len(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("demo_dir")
    ap.add_argument("--problems", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--turn-seconds", type=float, default=1.0)
    ap.add_argument("--out", default="benchmarks/interleaved_timing-latest")
    args = ap.parse_args()
    demo = Path(args.demo_dir)
    for m in MODELS:
        if not (demo / "models" / m / "config.json").is_file():
            raise SystemExit(f"{demo}: no models/{m}; pass a finished `thinkfast demo` folder")

    from thinkfast.data import load_problems
    from thinkfast.demo import DemoSettings
    from thinkfast.engine.run import hardware_string, sample_interleaved, sample_to_file

    s = DemoSettings()
    spec = f"jsonl:{demo / 'data' / 'heldout.jsonl'}?question=question&answer=answer&id=id&kind=number&limit={args.problems}"
    problems = load_problems(spec)
    common = {**s.sampling_arguments(spec), "problems": problems}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(args.rounds):
            modes = ["one after another", "taking turns"]
            for mode in modes if rnd % 2 == 0 else modes[::-1]:
                out = Path(tmp) / f"r{rnd}-{mode.replace(' ', '-')}"
                jobs = [dict(model_spec=str(demo / "models" / m), out=out / f"{m}.jsonl", name=m) for m in MODELS]
                t0 = time.perf_counter()
                if mode == "taking turns":
                    sample_interleaved(jobs, common, turn_seconds=args.turn_seconds, progress=False)
                else:
                    for job in jobs:
                        sample_to_file(**common, **job, progress=False)
                wall = time.perf_counter() - t0
                sps = {m: seconds_per_sample(out / f"{m}.jsonl") for m in MODELS}
                for m in MODELS:
                    rows.append({"round": rnd + 1, "mode": mode, "model": m, "seconds_per_sample": round(sps[m], 5),
                                 "ratio_to_teacher": round(sps[m] / sps["teacher"], 3), "pass_wall_seconds": round(wall, 1)})
                print(f"round {rnd + 1}, {mode}: " + ", ".join(f"{m} {sps[m]:.4f} s ({sps[m] / sps['teacher']:.2f}x)"
                                                              for m in MODELS) + f"; {wall:.0f} s", flush=True)

    md = [f"# Taking turns vs one after another: seconds per sample ({hardware_string('cpu')})", "",
          f"`python benchmarks/interleaved_timing.py {args.demo_dir} --problems {args.problems} --rounds {args.rounds} "
          f"--turn-seconds {args.turn_seconds}`: the first {args.problems} held-out problems x {s.n} samples, "
          f"T={s.temperature}, batch {s.batch_size}, fp32.", "",
          "| round | mode | model | s / sample | ratio to teacher | pass wall (s) |", "|---:|---|---|---:|---:|---:|"]
    md += [f"| {r['round']} | {r['mode']} | {r['model']} | {r['seconds_per_sample']:.4f} | {r['ratio_to_teacher']:.3f} | "
           f"{r['pass_wall_seconds']:.0f} |" for r in rows]
    Path(args.out + ".md").write_text("\n".join(md) + "\n")
    Path(args.out + ".json").write_text(json.dumps(rows, indent=1) + "\n")
    print(f"wrote {args.out}.md and .json")


if __name__ == "__main__":
    main()
