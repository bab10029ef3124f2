"""Does `--compile on` pay for itself over the demo's sampling? Each demo model eager and compiled, taking turns.

    python benchmarks/compile_demo.py DEMO_DIR [--problems 40] [--turn-seconds 1] [--out benchmarks/compile_demo]

First times readying each model's engine for the demo's lengths with and without `compile=True` (on a CPU the
whole decode step compiles then, before any sample's clock runs, so the difference is the compile's cost; cold:
the script gives Inductor a fresh cache folder). Then samples the first --problems held-out problems of a
finished demo n=32 times each with the demo's settings for six engines, every model eager and compiled, all taking
turns (`sample_interleaved`), so the machine's drift falls on all alike. Reports each model's seconds per sample
compiled over eager and the engine seconds the compiled one saved over the run, against its compile time.
Writes --out .md and .json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

MODELS = ("teacher", "llamba", "hybrid")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("demo_dir")
    ap.add_argument("--problems", type=int, default=40)
    ap.add_argument("--turn-seconds", type=float, default=1.0)
    ap.add_argument("--out", default="benchmarks/compile_demo")
    args = ap.parse_args()
    demo = Path(args.demo_dir)
    for m in MODELS:
        if not (demo / "models" / m / "config.json").is_file():
            raise SystemExit(f"{demo}: no models/{m}; pass a finished `thinkfast demo` folder")

    # a fresh Inductor cache: each compile's cost is a cold one, not a disk cache filled by an earlier run
    inductor_cache = tempfile.mkdtemp(prefix="thinkfast-inductor-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = inductor_cache
    import torch

    from thinkfast.data import load_problems
    from thinkfast.demo import DemoSettings
    from thinkfast.engine.engine import Engine
    from thinkfast.engine.run import hardware_string, load_for_sampling, sample_interleaved

    s = DemoSettings()
    build_seconds = {}
    for m in MODELS:
        model, tok, _ = load_for_sampling(str(demo / "models" / m), "cpu", torch.float32)
        for compiled in (False, True):
            t0 = time.perf_counter()
            engine = Engine(model, tok, batch_size=s.batch_size, device="cpu", dtype=None, compile=compiled)
            engine.ensure_capacity(s.max_new_tokens + 64)  # allocates the state and, compiled, compiles the step
            build_seconds[(m, compiled)] = time.perf_counter() - t0
            del engine
        print(f"{m}: engine built in {build_seconds[(m, False)]:.2f} s eager, {build_seconds[(m, True)]:.1f} s compiled",
              flush=True)

    spec = (f"jsonl:{demo / 'data' / 'heldout.jsonl'}?question=question&answer=answer&id=id&kind=number"
            f"&limit={args.problems}")
    common = {**s.sampling_arguments(spec), "problems": load_problems(spec)}
    with tempfile.TemporaryDirectory() as tmp:
        jobs = [dict(model_spec=str(demo / "models" / m), out=Path(tmp) / f"{m}-{c}.jsonl", name=f"{m}-{c}",
                     compile=c == "compiled") for m in MODELS for c in ("eager", "compiled")]
        t0 = time.perf_counter()
        sample_interleaved(jobs, common, turn_seconds=args.turn_seconds, progress=False)
        wall = time.perf_counter() - t0
        samples = {j["name"]: [json.loads(line) for line in j["out"].read_text().splitlines()] for j in jobs}

    rows = []
    for m in MODELS:
        eager, compiled = samples[f"{m}-eager"], samples[f"{m}-compiled"]
        same = sum(a["completion"] == b["completion"] for a, b in
                   zip(sorted(eager, key=lambda r: (r["problem_id"], r["sample_idx"])),
                       sorted(compiled, key=lambda r: (r["problem_id"], r["sample_idx"]))))
        e_sec, c_sec = sum(r["seconds"] for r in eager), sum(r["seconds"] for r in compiled)
        compile_cost = build_seconds[(m, True)] - build_seconds[(m, False)]
        rows.append({"model": m, "samples": len(eager), "eager_seconds_per_sample": e_sec / len(eager),
                     "compiled_seconds_per_sample": c_sec / len(compiled), "compiled_over_eager": c_sec / e_sec,
                     "engine_seconds_saved": e_sec - c_sec, "compile_seconds": compile_cost,
                     "identical_completions": same})
        print(rows[-1], flush=True)

    md = [f"# `--compile on` over the demo's sampling ({hardware_string('cpu')})", "",
          f"`python benchmarks/compile_demo.py {args.demo_dir} --problems {args.problems} --turn-seconds "
          f"{args.turn_seconds}`: the first {args.problems} held-out problems x {s.n} samples, T={s.temperature}, "
          f"batch {s.batch_size}, fp32; six engines (each model eager and compiled) taking turns, {wall:.0f} s in all. "
          "Seconds are the samples' own (the report's time axis); engine seconds saved is the sum over the run; "
          "compile is the extra time to ready the compiled engine for the demo's lengths (cold: a fresh Inductor "
          "cache).", "",
          "| model | s / sample eager | s / sample compiled | compiled / eager | engine s saved | compile s | "
          "identical completions |", "|---|---:|---:|---:|---:|---:|---:|"]
    md += [f"| {r['model']} | {r['eager_seconds_per_sample']:.4f} | {r['compiled_seconds_per_sample']:.4f} | "
           f"{r['compiled_over_eager']:.2f}x | {r['engine_seconds_saved']:.1f} | {r['compile_seconds']:.1f} | "
           f"{r['identical_completions']} / {r['samples']} |" for r in rows]
    Path(args.out + ".md").write_text("\n".join(md) + "\n")
    Path(args.out + ".json").write_text(json.dumps({"wall_seconds": round(wall, 1), "rows": rows}, indent=1) + "\n")
    shutil.rmtree(inductor_cache, ignore_errors=True)
    print(f"wrote {args.out}.md and .json")


if __name__ == "__main__":
    main()
