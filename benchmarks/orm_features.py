"""What the outcome reward model should read: its features and its window, on a finished demo's own samples.

    python benchmarks/orm_features.py DEMO_DIR [--settings likelihood@1400,pooled@1400,both@1400,likelihood@192]

For each setting FEATURES@MAX_LEN it trains the demo's reward model again (the teacher as backbone, the demo's
training-split samples DEMO_DIR/work/rm-samples, `thinkfast.eval.reward.train_orm` as the demo calls it), scores
every held-out sample of DEMO_DIR/samples, and reports the ranking AUC over all of a model's held-out samples,
BoN@k and weighted BoN@k (k = 8, 32; the report's subset means) beside pass@k and maj@k, and the seconds spent
scoring. Writes --out .md and .json (default benchmarks/orm_features-latest).
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

KS = (8, 32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("demo_dir")
    ap.add_argument("--settings", default="likelihood@1400,pooled@1400,both@1400,likelihood@192")
    ap.add_argument("--out", default="benchmarks/orm_features-latest")
    args = ap.parse_args()
    demo = Path(args.demo_dir)
    models = [m for m in ("teacher", "llamba", "hybrid") if (demo / "samples" / f"{m}.jsonl").is_file()]
    if not models or not (demo / "work" / "rm-samples").is_dir():
        raise SystemExit(f"{demo}: not a finished `thinkfast demo` folder (samples/ and work/rm-samples/ missing)")
    settings = []
    for item in args.settings.split(","):
        m = re.fullmatch(r"(likelihood|pooled|both)@(\d+)", item)
        if not m:
            raise SystemExit(f"--settings: {item!r} is not FEATURES@MAX_LEN; e.g. likelihood@1400 (features: likelihood, pooled, both)")
        settings.append((m.group(1), int(m.group(2))))

    import numpy as np
    import torch

    from thinkfast.eval.metrics import ProblemSamples, dataset_curves
    from thinkfast.eval.reward import ORMConfig, auc, load_backbone, train_orm

    def rows_of(path: Path) -> list[dict]:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def questions(name: str) -> dict:
        return {r["id"]: r["question"] for r in rows_of(demo / "data" / name)}

    train_q, held_q = questions("rm_train.jsonl"), questions("heldout.jsonl")
    train = [r for m in models for r in rows_of(demo / "work" / "rm-samples" / f"{m}.jsonl") if r["correct"] is not None]
    held = {m: rows_of(demo / "samples" / f"{m}.jsonl") for m in models}
    results = []
    for features, max_len in settings:
        backbone, tok = load_backbone(demo / "models" / "teacher")
        rm = train_orm([train_q[r["problem_id"]] for r in train], [r["completion"] for r in train],
                       [bool(r["correct"]) for r in train], [r["problem_id"] for r in train], backbone, tok,
                       ORMConfig(max_len=max_len, question_tokens=96, features=features), log=lambda *_: None)
        row = {"features": features, "max_len": max_len, "train_examples": len(train), "models": {}}
        for m, samples in held.items():
            t0 = time.perf_counter()
            with torch.no_grad():
                scores = rm.score([held_q[r["problem_id"]] for r in samples], [r["completion"] for r in samples])
            seconds = time.perf_counter() - t0
            by: dict[str, list] = {}
            for r, s in zip(samples, scores):
                by.setdefault(r["problem_id"], []).append((r["sample_idx"], r["answer"], r["correct"], float(s)))
            problems = {pid: ProblemSamples([a for _, a, _, _ in sorted(v)], [c for _, _, c, _ in sorted(v)],
                                            [s for *_, s in sorted(v)]) for pid, v in by.items()}
            curves = dataset_curves(problems, list(KS), n_boot=10)
            correct = np.array([bool(r["correct"]) for r in samples])
            row["models"][m] = {"auc": auc(scores, correct), "score_seconds": round(seconds, 1),
                                **{f"{metric}@{k}": float(curves[metric]["mean"][i]) for metric in
                                   ("pass_at_k", "maj_at_k", "bon_at_k", "weighted_bon_at_k") for i, k in enumerate(KS)}}
            print(features, max_len, m, json.dumps(row["models"][m]), flush=True)
        results.append(row)

    def cell(v):
        return "-" if v is None else f"{v:.3f}"

    lines = [
        "# The outcome reward model's features and window (a finished demo's samples)",
        "",
        f"Command: `python benchmarks/orm_features.py DEMO_DIR --settings {args.settings}` ({torch.get_num_threads()} "
        f"threads). Each setting trains the demo's reward model on the same {len(train)} graded training-split "
        "completions and scores every held-out sample; AUC over all of a model's held-out samples; BoN and weighted "
        "BoN are the report's means over size-k subsets; score s: seconds to score that model's samples.",
        "",
        "| features @ max_len | model | AUC | BoN@8 | BoN@32 | wBoN@8 | wBoN@32 | maj@8 | maj@32 | pass@8 | score s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in results:
        for m, r in row["models"].items():
            lines.append(f"| {row['features']} @ {row['max_len']} | {m} | {cell(r['auc'])} | {cell(r['bon_at_k@8'])} | "
                         f"{cell(r['bon_at_k@32'])} | {cell(r['weighted_bon_at_k@8'])} | {cell(r['weighted_bon_at_k@32'])} | "
                         f"{cell(r['maj_at_k@8'])} | {cell(r['maj_at_k@32'])} | {cell(r['pass_at_k@8'])} | {r['score_seconds']} |")
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    Path(args.out + ".json").write_text(json.dumps(results, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
