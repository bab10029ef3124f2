"""How much maj@k / BoN@k move with the subset seed: random orders whose first places are dealt out evenly (what
`thinkfast.eval.metrics` draws) against plain independent random orders (what it drew before), on real samples
files, side by side.

    python benchmarks/subset_noise.py DEMO_DIR [--seeds 20] [--subsets 256] [--ks 1,8,12,32]

For each model, metric and k: the dataset mean's spread (standard deviation) over --seeds seeds, and its mean
minus the exact pass@1 at k=1. Writes --out .md and .json (default benchmarks/subset_noise).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def independent_orders(n: int, n_subsets: int, rng: np.random.Generator) -> np.ndarray:
    return rng.permuted(np.broadcast_to(np.arange(n), (n_subsets, n)), axis=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("demo_dir")
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--subsets", type=int, default=256)
    ap.add_argument("--ks", default="1,8,12,32")
    ap.add_argument("--out", default="benchmarks/subset_noise")
    args = ap.parse_args()

    from thinkfast.eval import metrics
    from thinkfast.eval.report import _problem_samples
    from thinkfast.eval.samples import read_samples

    files = sorted(Path(args.demo_dir, "samples").glob("*.jsonl"))
    by_model = read_samples(files).by_model()
    ks = [int(k) for k in args.ks.split(",")]
    balanced = metrics._balanced_orders
    rows = []
    for model, per_problem in by_model.items():
        problems = {pid: _problem_samples(s, model) for pid, s in per_problem.items()}
        values: dict[tuple[str, str], list[np.ndarray]] = {}
        for draw, orders in (("dealt", balanced), ("independent", independent_orders)):
            metrics._balanced_orders = orders
            try:
                for seed in range(args.seeds):
                    curves = metrics.dataset_curves(problems, ks, n_subsets=args.subsets, seed=seed, n_boot=10)
                    for name in ("maj_at_k", "bon_at_k", "weighted_bon_at_k"):
                        if name in curves:
                            values.setdefault((draw, name), []).append(curves[name]["mean"])
            finally:
                metrics._balanced_orders = balanced
        pass1 = float(np.mean([metrics.pass_at_k(len(p.correct), sum(c is True for c in p.correct), 1)
                               for p in problems.values()]))
        for (draw, name), runs in values.items():
            mat = np.stack(runs)  # (seeds, len(ks))
            for j, k in enumerate(ks):
                rows.append({"model": model, "metric": name, "k": k, "draw": draw, "mean": float(mat[:, j].mean()),
                             "sd_over_seeds": float(mat[:, j].std(ddof=1)),
                             "minus_pass_at_1": float(mat[:, j].mean() - pass1) if k == 1 else None})
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    lines = ["# maj@k / BoN@k: spread over subset seeds, evenly dealt first places against plain independent orders", "",
             f"- command: `python benchmarks/subset_noise.py DEMO_DIR --seeds {args.seeds} --subsets {args.subsets} --ks {args.ks}`",
             f"- samples: {', '.join(f.name for f in files)} ({args.demo_dir})",
             "- sd: standard deviation of the dataset mean over the seeds; at k=1 the exact value is pass@1", "",
             "| model | metric | k | sd, dealt | sd, independent | mean, dealt | mean, independent |",
             "|---|---|---:|---:|---:|---:|---:|"]
    key = {(r["model"], r["metric"], r["k"], r["draw"]): r for r in rows}
    for model in by_model:
        for name in ("maj_at_k", "bon_at_k", "weighted_bon_at_k"):
            for k in ks:
                b, i = key.get((model, name, k, "dealt")), key.get((model, name, k, "independent"))
                if b and i:
                    lines.append(f"| {model} | {name} | {k} | {b['sd_over_seeds']:.4f} | {i['sd_over_seeds']:.4f} | "
                                 f"{b['mean']:.4f} | {i['mean']:.4f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
