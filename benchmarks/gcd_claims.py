"""The demo's claims (`thinkfast.demo.check_claims`) on samples files of a GCD run (run Y, benchmarks/distill_recipe.md),
with whole-chain accuracy beside pass@k (a completion equal to the reference solution), since half of all GCD answers
are 1 and a derailed chain often still ends right.

    python benchmarks/gcd_claims.py SAMPLES_DIR HELDOUT.jsonl

SAMPLES_DIR holds teacher.jsonl, llamba.jsonl and hybrid.jsonl from `thinkfast sample ... --name NAME`;
HELDOUT.jsonl is the held-out file those samples were drawn on (with `id` and `solution` fields).
"""

import json
import sys
from pathlib import Path

from thinkfast.demo import check_claims
from thinkfast.eval.report import build_report


def main() -> None:
    samples, heldout = Path(sys.argv[1]), sys.argv[2]
    paths = [samples / f"{m}.jsonl" for m in ("teacher", "llamba", "hybrid") if (samples / f"{m}.jsonl").exists()]
    metrics = build_report(paths, samples / "report", dataset=f"jsonl:{heldout}?id=id&kind=number", wall_seconds=None,
                           plots=False)
    sol = {json.loads(line)["id"]: json.loads(line)["solution"] for line in open(heldout)}
    for name, m in metrics["models"].items():
        rows = [json.loads(line) for line in open(samples / f"{name}.jsonl") if line.strip()]
        rows = [r for r in rows if "completion" in r]
        chain = sum(r["completion"].strip() == sol[str(r["problem_id"])].strip() for r in rows) / len(rows)
        print(f"{name}: pass@1 {m['pass_at_k']['1']:.3f} pass@8 {m['pass_at_k']['8']:.3f} pass@32 {m['pass_at_k']['32']:.3f} "
              f"maj@8 {m['maj_at_k']['8']:.3f} maj@32 {m['maj_at_k']['32']:.3f} s/sample {m['seconds_per_sample']:.4f} "
              f"tok/s {m['tokens_per_second']:.0f} whole-chain {chain:.3f} samples {len(rows)}")
    for c in check_claims(metrics, paths):
        extra = f" margin {c['margin']:+.3f} [{c['margin_ci'][0]:+.3f}, {c['margin_ci'][1]:+.3f}]" if "margin" in c else ""
        target = f" vs {c['target']:.3f}" if "target" in c else ""
        print(("held: " if c["held"] else "DID NOT HOLD: ") + c["claim"] + f": {c['measured']:.3f}" + target + extra)


if __name__ == "__main__":
    main()
