"""Is thinkfast's Mamba-2 mixer able to learn associative recall at all? A multi-query associative recall (MQAR) check.

The recall probe (`recall_probe.py`) finds the demo's Mamba-2 shape at chance on reading multi-digit terms back
across filler, which could also mean a broken mixer. MQAR is the standard task on which Mamba-2 is known to learn
recall: N single-token key-value pairs, then every key again in a random order, each followed by its value (only
those values are trained and scored, teacher-forced argmax). Keys 0-63, values 64-127; d 128, 2 layers, 4 heads,
d_mlp 256, from random init; all attention, or every layer a Mamba-2 mixer (d_state 32). Both run side by side,
one thread each, on the same batches:

    python benchmarks/mqar_check.py [--pairs 8] [--steps 1500] [--out benchmarks/mqar_check]
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ProcessPoolExecutor

KEYS = VALUES = 64


def batch(rng, size: int, pairs: int):
    import torch

    ids, mask = [], []
    for _ in range(size):
        keys = rng.choice(KEYS, pairs, replace=False)
        values = rng.integers(0, VALUES, pairs) + KEYS
        seq = [t for kv in zip(keys, values) for t in kv]
        trained = [0] * len(seq)
        for i in rng.permutation(pairs):
            seq += [keys[i], values[i]]
            trained += [0, 1]
        ids.append(seq)
        mask.append(trained)
    return torch.tensor(ids), torch.tensor(mask, dtype=torch.bool)


def accuracy(model, pairs: int) -> float:
    import numpy as np
    import torch

    ids, mask = batch(np.random.default_rng(99), 256, pairs)
    with torch.no_grad():
        pred = model(input_ids=ids[:, :-1]).logits.argmax(-1)
    return (pred[mask[:, 1:]] == ids[:, 1:][mask[:, 1:]]).float().mean().item()


def run(arch: str, pairs: int, steps: int, lr: float) -> dict:
    import numpy as np
    import torch
    import torch.nn.functional as F

    from thinkfast.distill.toy import random_model, tiny_config
    from thinkfast.models import from_teacher

    torch.set_num_threads(1)
    model = random_model(tiny_config(KEYS + VALUES, d_model=128, n_layers=2, n_heads=4, n_kv_heads=4, d_mlp=256), seed=0)
    if arch == "mamba":
        torch.manual_seed(0)
        model = from_teacher(model, kind="llamba", ssm_param="mamba2", init_from_attention=False, d_state=32)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + np.cos(np.pi * min(s, steps) / steps)))
    rng = np.random.default_rng(0)
    curve, t0 = [], time.time()
    for step in range(1, steps + 1):
        ids, mask = batch(rng, 64, pairs)
        logits = model(input_ids=ids[:, :-1]).logits
        loss = F.cross_entropy(logits[mask[:, 1:]], ids[:, 1:][mask[:, 1:]])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
        if step % 250 == 0 or step == steps:
            acc = accuracy(model, pairs)
            curve.append({"step": step, "loss": round(loss.item(), 4), "accuracy": round(acc, 3)})
            print(f"{arch}: step {step}/{steps}, loss {loss.item():.3f}, accuracy {acc:.3f}, {time.time() - t0:.0f} s",
                  flush=True)
    return {"arch": arch, "pairs": pairs, "steps": steps, "examples": steps * 64,
            "parameters": sum(p.numel() for p in model.parameters()), "curve": curve,
            "accuracy": curve[-1]["accuracy"], "seconds": round(time.time() - t0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--out", default="benchmarks/mqar_check")
    args = ap.parse_args()
    with ProcessPoolExecutor(2) as pool:
        results = list(pool.map(run, ["attention", "mamba"], [args.pairs] * 2, [args.steps] * 2, [args.lr] * 2))
    with open(args.out + ".json", "w") as f:
        json.dump(results, f, indent=1)
    steps = [p["step"] for p in results[0]["curve"]]
    lines = [f"MQAR, {args.pairs} pairs, batch 64, lr {args.lr}: accuracy on 256 fresh examples (chance 1/64)", "",
             "| model | parameters | " + " | ".join(f"step {s}" for s in steps) + " | seconds |",
             "|---|---:|" + "---:|" * len(steps) + "---:|"]
    for r in results:
        lines.append(f"| {r['arch']} | {r['parameters']:,} | " + " | ".join(f"{p['accuracy']:.3f}" for p in r["curve"])
                     + f" | {r['seconds']} |")
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
