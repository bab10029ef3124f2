"""Reading a published Llamba-1B-shaped checkpoint: seconds and peak memory of `load_thinkfast`, per code tree.

Writes a Cartesia-layout checkpoint with Llamba-1B's published shape (d_model 2048, 16 layers, 32 heads of 64,
d_state 64, MLP 8192, vocab 128256, tied embeddings; random bf16 weights, 2.8 GB) into a temporary folder, then
loads it (`dtype=None`: kept in bf16) in a fresh process per round for each `--code` tree given (a checkout of
thinkfast; default this one), alternating trees, and reports each process's time and peak RSS:

    python benchmarks/published_convert.py [--code OLD_CHECKOUT --code .] [--rounds 2] [--out benchmarks/published_convert]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

LOAD = """
import json, resource, sys, time
from thinkfast.models.teacher import load_thinkfast
t = time.perf_counter()
model, _ = load_thinkfast(sys.argv[1], dtype=None)
print(json.dumps({"seconds": time.perf_counter() - t, "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                  "params": sum(p.numel() for p in model.parameters()), "dtypes": sorted({str(p.dtype) for p in model.parameters()})}))
"""


def write_checkpoint(folder: Path) -> None:
    import torch
    from safetensors.torch import save_file

    d, m, V, H, N = 2048, 8192, 128256, 32, 64
    cfg = {"d_model": d, "n_layer": 16, "vocab_size": V, "tie_embeddings": True, "pad_vocab_size_multiple": 8,
           "lm_head_bias": False, "norm_epsilon": 1e-5, "mlp_cfg": {"intermediate_size": m, "bias": False, "act_fn": "silu"},
           "ssm_cfg": {"d_state": N, "n_v_heads": H, "n_qk_heads": H, "expand": 1, "chunk_size": 128,
                       "activation": "identity", "bias": False}}
    bf = torch.bfloat16

    def r(*shape):
        return (torch.randn(*shape) * 0.02).to(bf)

    def ones(n):
        return torch.ones(n, dtype=bf)

    w = {"backbone.embedding.weight": r(V, d), "backbone.final_layernorm.weight": ones(d)}
    for i in range(cfg["n_layer"]):
        p = f"backbone.layers.{i}."
        w |= {p + "mixer.in_proj.weight": r(2 * d + 2 * H * N + H, d), p + "mixer.z_bias": r(d),
              p + "mixer.conv1d.weight": r(d + 2 * H * N, 1, 4), p + "mixer.conv1d.bias": r(d + 2 * H * N),
              p + "mixer.D": ones(H), p + "mixer.out_proj.weight": r(d, d), p + "input_layernorm.weight": ones(d),
              p + "post_attention_layernorm.weight": ones(d), p + "mlp.gate_proj.weight": r(m, d),
              p + "mlp.up_proj.weight": r(m, d), p + "mlp.down_proj.weight": r(d, m)}
    (folder / "config.json").write_text(json.dumps(cfg))
    save_file(w, str(folder / "model.safetensors"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--code", action="append", help="a thinkfast checkout to load with (repeatable; default: this one)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/published_convert")
    args = ap.parse_args()
    trees = [str(Path(c).resolve()) for c in (args.code or [Path(__file__).resolve().parent.parent])]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(Path(tmp))
        for rnd in range(args.rounds):
            for tree in trees:
                env = dict(os.environ, PYTHONPATH=tree)
                out = subprocess.run([sys.executable, "-c", LOAD, tmp], env=env, cwd=tmp, capture_output=True, text=True,
                                     check=True)
                row = dict(json.loads(out.stdout.strip().splitlines()[-1]), code=tree, round=rnd + 1)
                rows.append(row)
                print(row, flush=True)
    Path(args.out + ".json").write_text(json.dumps(rows, indent=1) + "\n")
    lines = ["# Loading a Llamba-1B-shaped Cartesia checkpoint (random bf16 weights, 2.8 GB)", "",
             f"`python benchmarks/published_convert.py {' '.join(sys.argv[1:])}`", "",
             "| code | round | seconds | peak RSS (GiB) | parameters | dtypes |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| `{r['code']}` | {r['round']} | {r['seconds']:.1f} | {r['peak_rss_gib']:.2f} | {r['params'] / 1e9:.3f}B "
                     f"| {', '.join(r['dtypes'])} |")
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
