"""Tokens/s of the trainer (SFT task) against a bare PyTorch loop on the same model and batches, interleaved.

The bare loop: forward with full logits, CE, backward, clip, AdamW. The trainer adds data drawing, loss masking,
logging, progress; it also skips the logits of untrained (prompt, pad) positions and trims all-pad columns.

    python benchmarks/trainer_overhead.py [--d-model 192 --layers 6 --seq-len 512 --batch 8 --steps 6 --threads 1]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from thinkfast.data.packing import DataConfig, build_data
from thinkfast.distill.stages import SFTTask
from thinkfast.distill.toy import char_tokenizer, random_model, tiny_config, with_chain_sum_solutions
from thinkfast.distill.trainer import TrainConfig, train


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--d-model", type=int, default=192)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from thinkfast.data import load_problems

    tok = char_tokenizer()
    probs = with_chain_sum_solutions(load_problems("rg:chain_sum?size=3000&seed=1&min_terms=3&max_terms=6&min_digits=2&max_digits=4"))
    data = DataConfig(specs=[probs], instruction="none", chat=False)
    T, B = args.seq_len, args.batch
    cfg = tiny_config(len(tok), d_model=args.d_model, n_layers=args.layers, n_heads=4, n_kv_heads=2, d_mlp=3 * args.d_model)
    model = random_model(cfg, seed=0)
    n_params = sum(p.numel() for p in model.parameters())
    mix = build_data(data, tok, T)
    batches = [mix.next_batch(B) for _ in range(args.steps)]
    real = sum(int(b["real"].sum()) for b in batches)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)

    def bare():
        t0 = time.perf_counter()
        for b in batches:
            logits = model.lm(b["input_ids"]).logits
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), b["targets"].reshape(-1), ignore_index=-100)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return real / (time.perf_counter() - t0)

    def trainer():
        fresh = build_data(data, tok, T)  # the same batches, drawn by the trainer
        t0 = time.perf_counter()
        train(SFTTask(model), fresh, TrainConfig(tokens=args.steps * B * T, batch_size=B, seq_len=T, lr=1e-4,
                                                 log_every=1000), progress=False)
        return real / (time.perf_counter() - t0)

    bare()  # warm-up
    rows = []
    for _ in range(args.rounds):
        rows.append((bare(), trainer()))
    print(f"model {n_params / 1e6:.2f}M params, rows {B} x {T}, {real / args.steps:.0f} real tokens/step, "
          f"{args.threads} thread(s)")
    for b, t in rows:
        print(f"bare loop {b:7.0f} tok/s   trainer {t:7.0f} tok/s   ratio {t / b:.2f}")


if __name__ == "__main__":
    main()
