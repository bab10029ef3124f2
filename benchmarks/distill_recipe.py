"""A demo student's distillation recipe at the demo's token budget: rows per step and the split over stages.

Takes a finished `thinkfast demo` folder and, for each setting `ROWSxLENGTH[u|g]:STAGE=TOKENS+STAGE=TOKENS...`
(`u`: one whole example per row, unpacked, the budget counted in the examples' real tokens; `g`: the same, with
each step's rows drawn grouped by length),
distils the demo's hybrid (or, with --student llamba, its Llamba) again from its teacher (the hybrid's attention
at the demo hybrid's layers; --d-state, --d-conv, --ssm-kv-heads and --ssm-param change the student's Mamba mixers; the demo's learning
rates and schedules, `thinkfast.demo.distill_stages`), changing only the rows per optimizer step, the row length
and the tokens of each stage (--worked left: the training sums' worked solutions in that style). Then it samples
the first --problems held-out problems greedily, at temperature 1.0 (4 samples each) and at the demo's 1.3
(8 samples each) in the engine.

    python benchmarks/distill_recipe.py DEMO_DIR --jobs 2 --settings \
        8x1024:hidden=100000+kd=300000,1x512:hidden=100000+kd=300000,1x512:hidden=200000+sft=300000

Writes --out .md and .json (default benchmarks/distill_recipe-latest); benchmarks/distill_recipe.md collects
the recorded runs, each with its command, and benchmarks/demo_findings.md quotes it. --jobs runs settings side by side, one
thread each.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ANSWER = re.compile(r"#### *(-?\d+)")


def stage_ends(out: Path) -> tuple[dict, dict]:
    """Per stage, from its log: the optimizer steps it took and its last logged loss."""
    steps, loss = {}, {}
    for line in (out / "train_log.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "eval_loss" not in row:  # held-out records carry eval_loss instead of loss
            steps[row["stage"]], loss[row["stage"]] = row["step"], row["loss"]
    return steps, loss


def set_decay_range(student, low: float, high: float) -> None:
    """Start every Mamba-2 mixer's A = exp(A_log) log-uniform in [low, high] instead of Mamba-2's [1, 16]: A < 0.1
    keeps a head's memory hundreds of tokens long at Mamba-2's dt init, so gradients reach the question."""
    import math

    import torch

    from thinkfast.models.mixers import Mamba2Mixer

    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in student.modules():
            if isinstance(m, Mamba2Mixer):
                if m.discrete:
                    raise SystemExit("--a-range needs Mamba-2's parameterisation (--ssm-param mamba2)")
                u = torch.rand(m.H, generator=gen)
                m.A_log.copy_(math.log(low) + u * (math.log(high) - math.log(low)))


def run_setting(demo_dir: str, setting: str, problems: int, out_root: str, student_kind: str = "hybrid",
                attn_layers: list[int] | None = None, shape: dict | None = None, worked: str = "columns") -> dict:
    import torch

    torch.set_num_threads(1)
    from transformers import AutoTokenizer

    from thinkfast.data import load_problems
    from thinkfast.data.packing import DataConfig
    from thinkfast.data.prompts import PromptStyle, render_prompt
    from thinkfast.demo import DISTILL_SEED, DemoSettings, distill_stages
    from thinkfast.distill.stages import distill
    from thinkfast.embedded import PROMPT_STYLE, sums_spec
    from thinkfast.engine.engine import Engine
    from thinkfast.engine.run import encode_prompt
    from thinkfast.engine.sampling import SamplingParams
    from thinkfast.models import ThinkfastForCausalLM, from_teacher

    demo = Path(demo_dir)
    row_shape, _, recipe = setting.partition(":")
    grouped = row_shape.endswith("g")  # one-example rows drawn in batches grouped by length
    unpacked = grouped or row_shape.endswith("u")  # one whole example per row instead of packed rows
    rows, length = (int(x) for x in row_shape.rstrip("ug").split("x"))
    shape = {k: v for k, v in (shape or {}).items() if v is not None}  # the student's d_state / ssm_kv_heads
    settings = dataclasses.replace(DemoSettings(), distill_batch=rows, seq_len=length)
    budgets, lrs = {}, {}
    for part in recipe.split("+"):
        stage, _, value = part.partition("=")
        tokens, _, lr = value.partition("@")
        budgets[stage] = int(tokens)
        if lr:
            lrs[stage] = float(lr)
    stages = [dataclasses.replace(st, train=dataclasses.replace(st.train, lr=lrs[st.kind])) if st.kind in lrs else st
              for st in distill_stages(settings, budgets)]
    if student_kind == "hybrid" and attn_layers is None:
        attn_layers = json.loads((demo / "models" / "hybrid" / "config.json").read_text())["attn_layers"]
    tok = AutoTokenizer.from_pretrained(demo / "models" / "teacher")
    teacher = ThinkfastForCausalLM.from_pretrained(demo / "models" / "teacher")
    train_spec = sums_spec(settings.distill_examples, DISTILL_SEED) + ("" if worked == "columns" else f"&worked={worked}")
    data = DataConfig(specs=[train_spec], instruction=PROMPT_STYLE["instruction"],
                      seed=settings.seed, pack=not unpacked, group_by_length=grouped)
    where = f"-attn{'-'.join(map(str, attn_layers))}" if student_kind == "hybrid" else ""
    where += "".join(f"-{k}{'-'.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in sorted(shape.items())) + ("" if worked == "columns" else f"-worked-{worked}")
    out = Path(out_root) / f"{student_kind}{where}-{setting.replace(':', '_').replace('+', '_').replace('=', '')}"
    t0 = time.time()
    a_range = shape.pop("a_range", None)
    student = from_teacher(teacher, kind=student_kind, attn_layers=attn_layers, **shape) if shape or a_range else student_kind
    if a_range:
        set_decay_range(student, *a_range)
        shape["a_range"] = a_range
    student = distill(teacher, student, data, stages, tokenizer=tok, out_dir=out, progress=False, attn_layers=attn_layers)
    seconds = time.time() - t0
    steps, last = stage_ends(out)

    style = PromptStyle(instruction=PROMPT_STYLE["instruction"])
    spec = f"jsonl:{demo / 'data' / 'heldout.jsonl'}?question=question&answer=answer&id=id&kind=number"
    held = load_problems(spec)[:problems]
    prompts = [(p.id, encode_prompt(tok, render_prompt(p, tok, style), True)) for p in held]
    gold = {p.id: p.answer for p in held}

    def accuracy(temperature: float, n: int) -> tuple[float, float]:
        """Fraction of samples right, and of problems with at least one right (coverage at n)."""
        engine = Engine(student, tok, batch_size=64, compile=False)
        done = list(engine.generate(prompts, n=n, params=SamplingParams(temperature=temperature, max_new_tokens=1200), seed=1))
        right = [c.problem_id for c in done if (m := ANSWER.search(c.text or "")) and m.group(1) == gold[c.problem_id]]
        return len(right) / len(done), len(set(right)) / len(prompts)

    student.eval()
    with torch.no_grad():
        (greedy, _), (warm, _), (hot, hot_cover) = accuracy(0.0, 1), accuracy(1.0, 4), accuracy(settings.temperature, 8)
    return {"student": student_kind, "attn_layers": attn_layers, "shape": shape, "worked": worked, "setting": setting, "rows": rows, "row_tokens": length, "unpacked": unpacked, "grouped": grouped, "budgets": budgets,
            "lrs": lrs, "steps": steps,
            "final_loss": last, "seconds": round(seconds), "tokens_per_second": round(sum(budgets.values()) / seconds),
            "greedy": greedy, "t1.0": warm, f"t{settings.temperature}": hot, f"t{settings.temperature}_pass@8": hot_cover}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("demo_dir")
    ap.add_argument("--settings", required=True,
                    help="comma-separated ROWSxLENGTH[u|g]:STAGE=TOKENS[@LR]+STAGE=TOKENS[@LR]... (@LR: that stage's "
                         "learning rate instead of the demo's)")
    ap.add_argument("--problems", type=int, default=24)
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--student", choices=["hybrid", "llamba"], default="hybrid")
    ap.add_argument("--attn-layers", help="hybrid: comma-separated attention layers (default: the demo hybrid's)")
    ap.add_argument("--d-state", type=int, help="the student's SSM state size per head (default: the teacher's head size)")
    ap.add_argument("--d-conv", type=int, help="the width of the student's causal conv (default 4, Mamba-2's)")
    ap.add_argument("--ssm-kv-heads", type=int, help="heads of x and B (default: the teacher's KV heads; its query heads: one each)")
    ap.add_argument("--ssm-param", choices=["discrete", "mamba2"],
                    help="the Mamba mixers' parameterisation (default: Llamba's discrete one for a llamba, Mamba-2's for a hybrid)")
    from thinkfast.data.worked import STYLES

    ap.add_argument("--a-range", help="LOW,HIGH: start A = exp(A_log) log-uniform in this range (Mamba-2: 1,16)")
    ap.add_argument("--worked", choices=STYLES, default="columns",
                    help="worked-solution style of the training sums (left: restate the terms still to add after "
                         "each partial sum; the teacher never saw it, so use it with sft stages)")
    ap.add_argument("--out", default="benchmarks/distill_recipe-latest")
    args = ap.parse_args()
    demo = Path(args.demo_dir)
    if not (demo / "models" / "hybrid" / "config.json").is_file() or not (demo / "data" / "heldout.jsonl").is_file():
        raise SystemExit(f"{demo}: not a finished `thinkfast demo` folder (models/hybrid and data/heldout.jsonl missing)")
    work = demo / "work" / "distill-recipe"
    attn = [int(x) for x in args.attn_layers.split(",")] if args.attn_layers else None
    settings = args.settings.split(",")
    for setting in settings:
        stage = r"(matrix|hidden|kd|sft)=\d+(@\d+(\.\d*)?(e-?\d+)?)?"
        if not re.fullmatch(rf"\d+x\d+[ug]?:{stage}(\+{stage})*", setting):
            raise SystemExit(f"--settings: {setting!r} is not ROWSxLENGTH[u|g]:STAGE=TOKENS[@LR]+...; "
                             "e.g. 1x1200u:hidden=200000+sft=300000@1e-4")
    with ProcessPoolExecutor(args.jobs) as pool:
        results = list(pool.map(run_setting, [str(demo)] * len(settings), settings, [args.problems] * len(settings),
                                [str(work)] * len(settings), [args.student] * len(settings),
                                [attn] * len(settings),
                                [{"d_state": args.d_state, "d_conv": args.d_conv, "ssm_kv_heads": args.ssm_kv_heads, "ssm_param": args.ssm_param,
                                  "a_range": tuple(float(x) for x in args.a_range.split(",")) if args.a_range else None}] * len(settings),
                                [args.worked] * len(settings)))
    from thinkfast.demo import DemoSettings

    temp = DemoSettings().temperature
    lines = [
        f"# The {args.student} student's distillation recipe at the demo's token budget",
        "",
        f"Command: `python benchmarks/distill_recipe.py DEMO_DIR --student {args.student}"
        + (f" --attn-layers {args.attn_layers}" if args.attn_layers else "")
        + (f" --d-state {args.d_state}" if args.d_state else "")
        + (f" --d-conv {args.d_conv}" if args.d_conv else "")
        + (f" --ssm-kv-heads {args.ssm_kv_heads}" if args.ssm_kv_heads else "")
        + (f" --ssm-param {args.ssm_param}" if args.ssm_param else "")
        + (f" --a-range {args.a_range}" if args.a_range else "")
        + (f" --worked {args.worked}" if args.worked != "columns" else "")
        + f" --jobs {args.jobs} --settings {args.settings}` "
        "(one thread per setting; seconds compare only within this table).",
        "",
        f"Each row distils the demo's {args.student} from the embedded teacher with the demo's learning rates and cosine "
        "schedules (`thinkfast.demo.distill_stages`), changing only the rows per optimizer step, their length and the "
        f"tokens per stage. Accuracy: the first {args.problems} held-out problems of DEMO_DIR, greedy, 4 samples at "
        f"temperature 1.0, 8 at the demo's {temp} (pass@8: problems solved by at least one of those 8). Losses: the last logged window (10 steps) of each stage "
        "(hidden: L2 distance of block outputs per token, mean over the Mamba layers; kd: KL per token; sft: CE per token).",
        "",
        f"| rows x tokens | stages (tokens) | steps | final losses | greedy | T=1.0 | T={temp} | pass@8 T={temp} | tokens/s |",
        "|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        stages_txt = " + ".join(f"{k} {v // 1000}k" + (f" @ lr {r['lrs'][k]:g}" if k in r["lrs"] else "")
                                for k, v in r["budgets"].items())
        steps_txt = " + ".join(str(v) for v in r["steps"].values())
        loss_txt = ", ".join(f"{k} {v:.4f}" for k, v in r["final_loss"].items())
        shape = f"{r['rows']} x {r['row_tokens']}" + (" (one example per row, grouped by length)" if r.get("grouped") else
                                                     " (one example per row)" if r.get("unpacked") else " (packed)")
        lines.append(f"| {shape} | {stages_txt} | {steps_txt} | {loss_txt} | {r['greedy']:.3f} | "
                     f"{r['t1.0']:.3f} | {r[f't{temp}']:.3f} | {r[f't{temp}_pass@8']:.3f} | "
                     f"{r['tokens_per_second']:,} |")
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    Path(args.out + ".json").write_text(json.dumps(results, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
