"""Can a model of the demo's shape learn, from scratch, to read a number back from far up the context?

The demo's Llamba fails one thing: writing the next term of the question, hundreds of tokens after it
(`benchmarks/distill_recipe.md`). This probe isolates that look-up on synthetic sequences and asks whether the
*way the term is addressed* matters, which decides whether another task design could suit a pure Mamba student:

    Q 123+456+789+...            (keyed: Q a123 b456 c789 ...)
    <F random digits> :123;      "next":    the i-th answer follows the i-th ':' (the demo's case: order only)
    <F random digits> #2:456;    "indexed": the query names the term's position
    <F random digits> b:456;     "keyed":   the query names the term's letter (associative recall)

Only the answers' digits are trained and scored (teacher-forced argmax, all 3 digits right). Models: the embedded
teacher's shape (d 192, 4 layers, 6 / 3 heads, d_mlp 512) as all attention, or with every layer a Mamba-2 mixer
(the demo Llamba's shape and parameterisation), both from random init.

    python benchmarks/recall_probe.py --runs mamba:next,mamba:keyed,attention:next,mamba:indexed --jobs 2
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ProcessPoolExecutor

DIGITS = 10
MAX_TERMS = 8  # key tokens 10-17 (letters a-h) sit below the punctuation ids; indices 1-8 are digit tokens
KEY0, HASH, COLON, SEMI, PLUS, Q, NEWLINE = 10, 18, 19, 20, 21, 22, 23
VOCAB = 32


def example(rng, style: str, terms: int, filler: int):
    """Token ids and a mask of the answer digits."""
    values = [int(rng.integers(100, 1000)) for _ in range(terms)]
    ids, mask = [Q], [0]

    def put(tokens, trained=0):
        ids.extend(tokens)
        mask.extend([trained] * len(tokens))

    for i, v in enumerate(values):
        if style == "keyed":
            put([KEY0 + i])
        elif i:
            put([PLUS])
        put([int(c) for c in str(v)])
    put([NEWLINE])
    for i, v in enumerate(values):
        put([int(c) for c in rng.integers(0, DIGITS, filler)])
        if style == "keyed":
            put([KEY0 + i])
        elif style == "indexed":
            put([HASH, i + 1])
        put([COLON])
        put([int(c) for c in str(v)], trained=1)
        put([SEMI])
    return ids, mask


def batch(rng, style, size, terms, filler):
    import torch

    rows = [example(rng, style, terms, filler) for _ in range(size)]
    ids = torch.tensor([r[0] for r in rows])
    mask = torch.tensor([r[1] for r in rows], dtype=torch.bool)
    return ids, mask


def build(arch: str, ssm_init: str = "default", ssm_heads: int = 6):
    import torch

    from thinkfast.distill.toy import random_model, tiny_config
    from thinkfast.models import from_teacher

    heads = ssm_heads if arch == "mamba" else 6
    cfg = tiny_config(VOCAB, d_model=192, n_layers=4, n_heads=heads, n_kv_heads=heads // 2, d_mlp=512)
    model = random_model(cfg, seed=0)
    if arch == "mamba":
        torch.manual_seed(0)
        # more heads of a smaller size, the state kept at 6 x 32 x 32 per layer: more independent decays
        model = from_teacher(model, kind="llamba", ssm_param="mamba2", init_from_attention=False, d_state=32)
        if ssm_init != "default":
            long_memory_init(model, tie_bc=ssm_init == "mimetic")
    return model


def long_memory_init(model, tie_bc: bool):
    """Decay near 1 at init (A in [0.01, 0.1] instead of [1, 16]: with Mamba-2's dt init every head's half-life is
    at least ~70 tokens), so gradients reach far back; `tie_bc` also starts C as a copy of B (each query head's C
    rows equal its group's B rows), so a position's query matches the keys it resembles, as mimetic init does."""
    import torch

    from thinkfast.models.mixers import Mamba2Mixer

    with torch.no_grad():
        for m in model.modules():
            if not isinstance(m, Mamba2Mixer):
                continue
            m.A_log.copy_(torch.log(torch.empty(m.H).uniform_(0.01, 0.1)))
            if tie_bc:
                w = m.in_proj.weight
                b0 = m.d_inner + m.d_x
                c0 = b0 + m.d_b
                g = m.H // m.Hx
                for h in range(m.H):
                    src = b0 + (h // g) * m.N
                    w[c0 + h * m.N: c0 + (h + 1) * m.N] = w[src: src + m.N]


def run(spec: str, ssm_init: str, steps: int, batch_size: int, lr: float, terms: int, filler: int, seed: int,
        ssm_heads: int = 6) -> dict:
    import numpy as np
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(1)
    arch, style = spec.split(":")
    model = build(arch, ssm_init, ssm_heads)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * min(s, steps) / steps))))
    rng = np.random.default_rng(seed)
    curve, t0 = [], time.time()
    for step in range(1, steps + 1):
        ids, mask = batch(rng, style, batch_size, terms, filler)
        logits = model(input_ids=ids[:, :-1]).logits
        loss = F.cross_entropy(logits[mask[:, 1:]], ids[:, 1:][mask[:, 1:]])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == steps:
            curve.append({"step": step, "loss": round(loss.item(), 4)})
            print(f"{spec}: step {step}/{steps}, loss {loss.item():.4f}, {time.time() - t0:.0f} s", flush=True)
    seconds = time.time() - t0

    model.eval()
    test = np.random.default_rng(10_000 + seed)
    right = np.zeros(terms)
    n = 0
    with torch.no_grad():
        for _ in range(8):
            ids, mask = batch(test, style, 32, terms, filler)
            pred = model(input_ids=ids[:, :-1]).logits.argmax(-1)
            ok = (pred == ids[:, 1:]) | ~mask[:, 1:]
            # every answer is 3 digits; group the trained positions of each row by term
            per_digit = ok[mask[:, 1:]].view(ids.shape[0], terms, 3)
            right += per_digit.all(-1).float().sum(0).numpy()
            n += ids.shape[0]
    by_term = (right / n).round(3).tolist()
    return {"run": spec, "ssm_init": ssm_init if arch == "mamba" else "", "ssm_heads": ssm_heads if arch == "mamba" else None,
            "arch": arch, "style": style, "steps": steps, "batch": batch_size, "lr": lr, "terms": terms,
            "filler": filler, "tokens": steps * batch_size * (ids.shape[1] - 1), "seconds": round(seconds),
            "final_loss": curve[-1]["loss"], "curve": curve, "exact_by_term": by_term,
            "exact": round(float(right.sum() / (n * terms)), 3)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", required=True, help="ARCH:STYLE,... with ARCH attention|mamba, STYLE next|indexed|keyed")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--terms", type=int, default=8)
    ap.add_argument("--filler", type=int, default=48, help="random digits before each query (the work between look-ups)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ssm-init", choices=("default", "long", "mimetic"), default="default",
                    help="Mamba-2 init: Mamba-2's own; long: decay near 1 (A in [0.01, 0.1]); mimetic: long and C = B")
    ap.add_argument("--ssm-heads", type=int, default=6,
                    help="Mamba heads per layer (head size 192 / H, state size kept at 32 per head row: 6 is the demo's shape)")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/recall_probe-latest")
    args = ap.parse_args()
    if not 1 <= args.terms <= MAX_TERMS:
        ap.error(f"--terms {args.terms}: use 1 to {MAX_TERMS} (one key token per term)")
    specs = args.runs.split(",")
    for s in specs:
        arch, _, style = s.partition(":")
        if arch not in ("attention", "mamba") or style not in ("next", "indexed", "keyed"):
            ap.error(f"--runs {s!r}: use ARCH:STYLE with ARCH attention|mamba and STYLE next|indexed|keyed")
    with ProcessPoolExecutor(args.jobs) as pool:
        results = list(pool.map(run, specs, *([x] * len(specs) for x in (args.ssm_init, args.steps, args.batch, args.lr, args.terms,
                                                                          args.filler, args.seed, args.ssm_heads))))
    lines = [f"Command: `python benchmarks/recall_probe.py --runs {args.runs} --steps {args.steps} --batch {args.batch} "
             f"--lr {args.lr} --terms {args.terms} --filler {args.filler} --ssm-init {args.ssm_init} --ssm-heads {args.ssm_heads} "
             f"--jobs {args.jobs}` "
             "(one thread per run)", "",
             "| model | addressing | tokens | final loss | exact (all terms) | exact by term 1..N | seconds |",
             "|---|---|---:|---:|---:|---|---:|"]
    for r in results:
        lines.append(f"| {r['arch']} | {r['style']} | {r['tokens']:,} | {r['final_loss']} | {r['exact']:.3f} | "
                     f"{' / '.join(f'{x:.2f}' for x in r['exact_by_term'])} | {r['seconds']} |")
    text = "\n".join(lines) + "\n"
    print(text)
    with open(args.out + ".md", "w") as f:
        f.write(text)
    with open(args.out + ".json", "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
