"""Where a decode step's time goes at the demo's batch: each model's step, the teacher's without attention, and
one attention layer as SDPA (the engine's kernel), as two matmuls and a softmax (whole, and 32 rows at a time),
and as a plain read of its keys and values.

    python benchmarks/decode_attention.py DEMO_DIR [--batch 256] [--contexts 200,450,800] [--spread 150] [--reps 30]

Rows are the first --batch slots of an engine state for 1,400 positions, ordered by context and spread over
--spread positions below the context (as the engine keeps them), attended in blocks of 32 rows (the engine's
row_group). Times are medians over --reps rounds after 3 warm-up rounds, every variant taking one step in turn in
each round so that the host's drift reaches them alike. The state starts at zeros: timing does not depend on the
values. Writes --out .md and .json (default benchmarks/decode_attention-latest).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

MAX_LEN = 1400
ROW_GROUP = 32


def interleaved_medians(fns: dict, reps: int) -> dict:
    """Median milliseconds of each callable, timed one call each in turn, `reps` rounds after 3 warm-up rounds:
    side by side at every moment, so that the host's drift (large on shared machines) reaches each alike."""
    times = {k: [] for k in fns}
    for r in range(reps + 3):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            if r >= 3:
                times[k].append((time.perf_counter() - t) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("demo_dir")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--contexts", default="200,450,800")
    ap.add_argument("--spread", type=int, default=150, help="rows' contexts lie within this many positions below it")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--out", default="benchmarks/decode_attention-latest")
    args = ap.parse_args()
    demo = Path(args.demo_dir)
    names = ["teacher", "llamba", "hybrid"]
    for m in names:
        if not (demo / "models" / m / "config.json").is_file():
            raise SystemExit(f"{demo}: no models/{m}; pass a finished `thinkfast demo` folder")
    contexts = [int(c) for c in args.contexts.split(",")]
    if max(contexts) > MAX_LEN or min(contexts) <= args.spread:
        raise SystemExit(f"--contexts: each must lie in ({args.spread}, {MAX_LEN}]")

    from thinkfast.engine.decode import DecodeStep, engine_state
    from thinkfast.engine.run import hardware_string
    from thinkfast.models.hf import ThinkfastForCausalLM

    torch.manual_seed(0)
    B = args.batch
    steps = {}
    for m in names:
        lm = ThinkfastForCausalLM.from_pretrained(str(demo / "models" / m)).lm.eval()
        steps[m] = DecodeStep(lm, engine_state(lm, B, MAX_LEN), row_group=ROW_GROUP)
    teacher = steps["teacher"]
    cfg = teacher.cfg
    Hk, G, hd = cfg.n_kv_heads, cfg.n_heads // cfg.n_kv_heads, cfg.hd
    cache = teacher.state.caches[teacher.attn_layers[0]]
    rows = []
    with torch.inference_mode():
        for S in contexts:
            pos = torch.sort(torch.randint(S - args.spread, S, (B,)), descending=True).values
            pos[0] = S - 1
            tok = torch.randint(0, 256, (B,))
            row = {"context": S}

            def timed(step, attention=True):
                def run():
                    if not attention:
                        step._attention = lambda i, mixer, x, *rest: torch.zeros_like(x)
                    try:
                        step(tok, pos, S)
                    finally:
                        step.__dict__.pop("_attention", None)
                return run

            fns = {m: timed(steps[m]) for m in names}
            fns["teacher_without_attention"] = timed(teacher, attention=False)
            # one layer, every row attending over all S positions (no row blocks): the kernels side by side
            q = torch.randn(B, Hk, G, hd)
            K, V = cache.k[:B, :, :S], cache.v[:B, :, :S]
            bias = torch.zeros(B, 1, 1, S).masked_fill_(~(torch.arange(S) <= pos[:, None])[:, None, None, :], float("-inf"))
            scale = hd ** -0.5
            fns["layer_sdpa"] = lambda: F.scaled_dot_product_attention(q, K, V, attn_mask=bias, scale=scale)

            def matmuls(rows):
                out = []
                for a in range(0, B, rows):
                    scores = torch.matmul(q[a:a + rows], K[a:a + rows].transpose(-1, -2)).mul_(scale).add_(bias[a:a + rows])
                    out.append(torch.matmul(torch.softmax(scores, dim=-1), V[a:a + rows]))
                return torch.cat(out)

            fns["layer_matmuls"] = lambda: matmuls(B)
            fns["layer_matmuls_32_rows"] = lambda: matmuls(32)
            fns["layer_read_kv"] = lambda: (K.sum(), V.sum())
            row.update(interleaved_medians(fns, args.reps))
            row["kv_megabytes"] = 2 * K.numel() * K.element_size() / 1e6
            rows.append(row)
            print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}), flush=True)

    hw = hardware_string("cpu")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"hardware": hw, "batch": B, "spread": args.spread, "rows": rows}, indent=1))
    lines = [f"# Decode step time at batch {B} ({hw})", "",
             f"`python benchmarks/decode_attention.py {args.demo_dir} --batch {B} --contexts {args.contexts} "
             f"--spread {args.spread} --reps {args.reps}`", "",
             "| context | teacher | teacher without attention | hybrid | Llamba | one layer: SDPA | matmuls + softmax "
             "| the same, 32 rows at a time | reading its K and V | K and V (MB) |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['context']} | {r['teacher']:.1f} | {r['teacher_without_attention']:.1f} | {r['hybrid']:.1f} | "
                     f"{r['llamba']:.1f} | {r['layer_sdpa']:.2f} | {r['layer_matmuls']:.2f} | {r['layer_matmuls_32_rows']:.2f} | "
                     f"{r['layer_read_kv']:.2f} | {r['kv_megabytes']:.0f} |")
    lines += ["", "Milliseconds. The models' columns are whole decode steps (the engine's `DecodeStep`, row blocks of 32); "
              "the layer columns are one attention layer over every row's full context."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out.with_suffix('.md')} and .json")


if __name__ == "__main__":
    main()
