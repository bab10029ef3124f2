"""Training tokens/s with one example per row: batch 1 (the demo's recipes) against larger batches drawn in plain
shuffled order and grouped by length (`--group-by-length`), through the real trainer, side by side.

    python benchmarks/train_grouping.py [--kinds llamba,hybrid] [--batches 1,4,8] [--tokens 60000] [--rounds 2]

Students are built from the embedded teacher as the demo builds them (Mamba-2 SSM; the hybrid keeps attention at
layer 3) and trained by the SFT stage on the demo's distillation sums. Settings are interleaved round by round so
that machine drift hits them alike; tokens/s counts real (non-pad) tokens, as the trainer's budget does.
Writes --out .md and .json (default benchmarks/train_grouping).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kinds", default="llamba,hybrid")
    ap.add_argument("--batches", default="1,4,8")
    ap.add_argument("--tokens", type=int, default=60_000, help="real tokens each setting trains per round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/train_grouping")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoTokenizer

    from thinkfast.data.packing import DataConfig, build_data
    from thinkfast.demo import DISTILL_SEED
    from thinkfast.distill.stages import SFTTask
    from thinkfast.distill.trainer import TrainConfig, train
    from thinkfast.embedded import PROMPT_STYLE, embedded_teacher_dir, sums_spec
    from thinkfast.models import from_teacher
    from thinkfast.models.teacher import load_thinkfast

    teacher, _ = load_thinkfast(str(embedded_teacher_dir()), where="teacher")
    tok = AutoTokenizer.from_pretrained(embedded_teacher_dir())
    spec = sums_spec(4000, DISTILL_SEED)
    settings = [(kind, b, grouped) for kind in args.kinds.split(",") for b in map(int, args.batches.split(","))
                for grouped in ([False] if b == 1 else [False, True])]
    results = {s: [] for s in settings}
    for r in range(args.rounds):
        for kind, b, grouped in settings:
            data = build_data(DataConfig(specs=[spec], instruction=PROMPT_STYLE["instruction"], pack=False,
                                         group_by_length=grouped, seed=r), tok, 1280, batch_size=b)
            student = from_teacher(teacher, kind=kind, attn_layers=[3] if kind == "hybrid" else None, ssm_param="mamba2")
            cfg = TrainConfig(tokens=args.tokens, batch_size=b, seq_len=1280, lr=1e-4, warmup=0.1, log_every=10**9)
            drawn = [0]
            next_batch = data.next_batch

            def counted(rows, next_batch=next_batch, drawn=drawn):  # real tokens of the rows trained
                batch = next_batch(rows)
                drawn[0] += int(batch["real"].sum())
                return batch

            data.next_batch = counted
            t0 = time.perf_counter()
            res = train(SFTTask(student), data, cfg, progress=False)
            seconds = time.perf_counter() - t0
            real_tokens = drawn[0]
            results[(kind, b, grouped)].append(real_tokens / seconds)
            print(f"round {r + 1}: {kind} batch {b} {'grouped' if grouped else 'shuffled'}: "
                  f"{real_tokens / seconds:,.0f} tokens/s ({res.steps} steps, {seconds:.1f} s)", flush=True)

    rows = []
    for kind in args.kinds.split(","):
        base = statistics.median(results[(kind, 1, False)]) if (kind, 1, False) in results else None
        for (k, b, grouped), v in results.items():
            if k != kind:
                continue
            med = statistics.median(v)
            rows.append({"kind": kind, "batch": b, "grouped": grouped, "tokens_per_s": med,
                         "vs_batch_1": med / base if base else None, "rounds": v})
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    from thinkfast.engine.run import hardware_string

    lines = ["# Training tokens/s: one example per row, batch 1 vs larger batches, shuffled or grouped by length", "",
             f"- command: `python benchmarks/train_grouping.py --kinds {args.kinds} --batches {args.batches} "
             f"--tokens {args.tokens} --rounds {args.rounds} --threads {args.threads}`",
             f"- hardware: {hardware_string('cpu')}, torch {torch.__version__}",
             "- SFT stage of the trainer on the demo's distillation sums (rows up to 1,280 tokens), students built from "
             "the embedded teacher; median over rounds, settings interleaved within each round", "",
             "| student | rows per step | order | tokens / s (median) | vs batch 1 |", "|---|---:|---|---:|---:|"]
    for x in rows:
        lines.append(f"| {x['kind']} | {x['batch']} | {'grouped by length' if x['grouped'] else 'shuffled'} | "
                     f"{x['tokens_per_s']:,.0f} | {x['vs_batch_1']:.2f}x |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
