"""Distillation ablation on a tiny teacher, at equal total tokens per student (issue 3, "What it must show").

1. Train a small Llama teacher (character tokenizer) from scratch on reasoning-gym `chain_sum` problems with
   step-by-step worked solutions (cached in --work).
2. Distil students, each with the same total token budget:
     kd-only      Llamba, MOHAWK stage 3 alone (forward KL)
     mohawk       Llamba, stages 1 + 2 + 3 (10% / 20% / 70% of the budget)
     hybrid-rkl   hybrid (attention kept in a quarter of the layers), reverse KL
     hybrid-fkl   the same hybrid with forward KL (like for like with the Llamba arms)
   then SFT of the mohawk student on worked solutions.
3. Measure on held-out problems (reasoning-gym seeds far from the training seeds): forward and reverse KL to the
   teacher on the worked-solution tokens, CE on the worked solutions, greedy accuracy.

    python benchmarks/distill_ablation.py                 # writes benchmarks/distill_ablation.md
    python benchmarks/distill_ablation.py --scale 0.1     # a quick smoke run (numbers mean little)
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch

from thinkfast.data import load_problems
from thinkfast.data.packing import IGNORE, DataConfig, build_data
from thinkfast.distill.losses import ce_per_token, kl_per_token
from thinkfast.distill.stages import StageConfig, distill, sft
from thinkfast.distill.toy import char_tokenizer, random_model, tiny_config, with_chain_sum_solutions
from thinkfast.distill.trainer import TrainConfig
from thinkfast.models import ThinkfastForCausalLM, from_teacher

TASK = "rg:chain_sum?min_terms=2&max_terms=3&min_digits=1&max_digits=2"
TEACHER_TOKENS = 2_000_000


def problems(size: int, seed: int):
    """reasoning-gym chain_sum items with worked solutions; the fixed preamble of the question ("State the final
    answer to the following arithmetic problem: ") is dropped: at one token per character it was most of the row."""
    out = with_chain_sum_solutions(load_problems(f"{TASK}&size={size}&seed={seed}"))
    for p in out:
        p.question = p.meta["expression"] + " ="
    return out


def tc(tokens, lr, B=8, T=256, **kw):
    return TrainConfig(tokens=int(tokens), batch_size=B, seq_len=T, lr=lr, log_every=5, warmup=0.05,
                       weight_decay=0.0, **kw)


@torch.no_grad()
def heldout_metrics(teacher, student, batches):
    """Token-weighted means over worked-solution positions: KL(t||s), KL(s||t), student CE, teacher CE."""
    sums = torch.zeros(4, dtype=torch.float64)
    n = 0
    for b in batches:
        mask = b["targets"] != IGNORE
        ls = student.lm(b["input_ids"]).logits[mask]
        lt = teacher.lm(b["input_ids"]).logits[mask]
        tg = b["targets"][mask]
        sums += torch.stack([kl_per_token(ls, lt, "forward_kl").sum(), kl_per_token(ls, lt, "reverse_kl").sum(),
                             ce_per_token(ls, tg).sum(), ce_per_token(lt, tg).sum()]).double()
        n += int(mask.sum())
    f, r, ce, ce_t = (sums / n).tolist()
    return {"fkl": f, "rkl": r, "ce": ce, "teacher_ce": ce_t}


@torch.no_grad()
def greedy_accuracy(model, tok, probs, max_new=40):
    """Greedy decoding one problem at a time with the model's own decode state; exact match of '#### N'."""
    from thinkfast.data.prompts import PromptStyle, render_prompt

    style = PromptStyle(instruction="none", chat=False)
    lm = model.lm.eval()
    correct = 0
    for p in probs:
        ids = tok(render_prompt(p, tok, style))["input_ids"]
        x = torch.tensor([ids])
        state = lm.allocate_state(1, len(ids) + max_new)
        logits = lm(x, state=state).logits[:, -1]
        out = []
        pos = len(ids)
        for _ in range(max_new):
            nxt = int(logits.argmax(-1))
            if nxt == tok.eos_token_id:
                break
            out.append(nxt)
            logits = lm.step(torch.tensor([nxt]), torch.tensor([pos]), state)
            pos += 1
        m = re.search(r"####\s*(-?\d+)", tok.decode(out))
        correct += bool(m and m.group(1) == str(p.answer).strip())
    return correct / len(probs)


def train_teacher(work: Path, tok, data, tokens, log):
    path = work / "teacher"
    if (path / "model.safetensors").is_file():
        log(f"teacher: cached in {path}")
        return ThinkfastForCausalLM.from_pretrained(path).eval()
    cfg = tiny_config(len(tok), d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, d_mlp=384)
    model = random_model(cfg, seed=0, tokenizer=tok)
    t0 = time.perf_counter()
    recs = []
    teacher_data = DataConfig(specs=data.specs, instruction="none", chat=False, train_prompt=True)
    sft(model, teacher_data, tc(tokens, 3e-3), tokenizer=tok, out_dir=work / "teacher-run", progress=recs.append)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    log(f"teacher: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, {tokens:,} tokens in "
        f"{time.perf_counter() - t0:.0f}s, final train loss {recs[-1]['loss']:.3f}")
    return model.eval()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="runs/distill_ablation")
    ap.add_argument("--scale", type=float, default=1.0, help="multiplies every token budget")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--report", default=None, help="markdown output (default benchmarks/distill_ablation.md at scale 1)")
    ap.add_argument("--render-only", action="store_true", help="rewrite the report from WORK/results.json")
    args = ap.parse_args(argv)
    if args.render_only:
        saved = json.loads((Path(args.work) / "results.json").read_text())
        report = Path(args.report or "benchmarks/distill_ablation.md")
        write_report(report, saved["results"], saved["curves"], int(240_000 * args.scale), int(60_000 * args.scale),
                     saved.get("log", []), args)
        print(f"wrote {report}")
        return
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    lines = []

    def log(msg):
        print(msg, file=sys.stderr, flush=True)
        lines.append(msg)

    tok = char_tokenizer()
    train_p = problems(20000, seed=1)
    seen = {p.question for p in train_p}
    held_p = [p for p in problems(1000, seed=50_000_000) if p.question not in seen][:300]
    log(f"data: {len(train_p)} training problems (seeds 1..20000), {len(held_p)} held-out (seed 5e7, overlap dropped)")
    data = DataConfig(specs=[train_p], instruction="none", chat=False)
    held = build_data(DataConfig(specs=[held_p], instruction="none", chat=False), tok, 256)
    n_rows = len(held.sources[0])
    held_batches = [held.next_batch(16) for _ in range((n_rows + 15) // 16)]

    s = args.scale
    teacher = train_teacher(work, tok, data, int(TEACHER_TOKENS * s), log)
    for p in teacher.parameters():
        p.requires_grad_(False)
    acc_probs = held_p[:100]
    results = {"teacher": {"acc": greedy_accuracy(teacher, tok, acc_probs)}}
    log(f"teacher greedy accuracy on {len(acc_probs)} held-out: {results['teacher']['acc']:.2f}")

    budget = int(240_000 * s)
    arms = {
        "kd-only": ("llamba", [StageConfig("kd", tc(budget, 2e-3), loss="forward_kl")]),
        "mohawk": ("llamba", [StageConfig("matrix", tc(0.1 * budget, 3e-3)),
                              StageConfig("hidden", tc(0.2 * budget, 3e-3)),
                              StageConfig("kd", tc(0.7 * budget, 2e-3), loss="forward_kl")]),
        "hybrid-rkl": ("hybrid", [StageConfig("kd", tc(budget, 2e-3), loss="reverse_kl")]),
        "hybrid-fkl": ("hybrid", [StageConfig("kd", tc(budget, 2e-3), loss="forward_kl")]),
    }
    students = {}
    curves = {}
    for name, (kind, stages) in arms.items():
        student = from_teacher(teacher, kind)
        results[f"{name} (init)"] = heldout_metrics(teacher, student, held_batches)
        recs = []
        t0 = time.perf_counter()
        distill(teacher, student, data, stages, tokenizer=tok, progress=recs.append)
        secs = time.perf_counter() - t0
        results[name] = heldout_metrics(teacher, student, held_batches)
        results[name]["acc"] = greedy_accuracy(student, tok, acc_probs)
        results[name]["seconds"] = secs
        curves[name] = recs
        students[name] = student
        log(f"{name}: {json.dumps({k: round(v, 4) for k, v in results[name].items()})}")

    # SFT after distillation: CE on held-out worked solutions before and after
    sft_budget = int(60_000 * s)
    student = students["mohawk"]
    recs = []
    sft(student, data, tc(sft_budget, 2e-4), tokenizer=tok, progress=recs.append)
    results["mohawk+sft"] = heldout_metrics(teacher, student, held_batches)
    results["mohawk+sft"]["acc"] = greedy_accuracy(student, tok, acc_probs)
    curves["mohawk+sft"] = recs
    log(f"mohawk+sft: {json.dumps({k: round(v, 4) for k, v in results['mohawk+sft'].items()})}")

    (work / "results.json").write_text(json.dumps({"results": results, "curves": curves, "log": lines}, indent=1))
    report = Path(args.report) if args.report else (Path("benchmarks/distill_ablation.md") if s == 1.0 else work / "report.md")
    write_report(report, results, curves, budget, sft_budget, lines, args)
    print(f"wrote {report}")


def _stage_curve(recs, stage):
    xs = [r for r in recs if r["stage"] == stage]
    return (xs[0]["loss"], xs[-1]["loss"]) if xs else (float("nan"), float("nan"))


def write_report(path: Path, results, curves, budget, sft_budget, lines, args):
    args_teacher_tokens = int(TEACHER_TOKENS * args.scale)
    m0, m1 = _stage_curve(curves["mohawk"], "matrix")
    h0, h1 = _stage_curve(curves["mohawk"], "hidden")
    rows = ["| student | KL(t‖s) | KL(s‖t) | CE on solutions | greedy acc | seconds |", "|---|---|---|---|---|---|"]
    for name in ["kd-only (init)", "kd-only", "mohawk", "hybrid-rkl (init)", "hybrid-rkl", "hybrid-fkl", "mohawk+sft"]:
        r = results[name]
        acc = f"{r['acc']:.2f}" if "acc" in r else "-"
        sec = f"{r['seconds']:.0f}" if "seconds" in r else "-"
        label = {"kd-only (init)": "Llamba at init (from attention)", "hybrid-rkl (init)": "hybrid at init"}.get(name, name)
        rows.append(f"| {label} | {r['fkl']:.4f} | {r['rkl']:.4f} | {r['ce']:.4f} | {acc} | {sec} |")
    teacher_ce = results["mohawk"]["teacher_ce"]
    text = f"""# Distillation ablation (tiny teacher, equal tokens)

Command: `python benchmarks/distill_ablation.py --scale {args.scale} --threads {args.threads}` (CPU, shared 2-core
machine; seconds are noisy, compare only within this table).

Teacher: 4-layer Llama (d_model 128, GQA 4/2 heads, character tokenizer) trained from scratch on
reasoning-gym `chain_sum` (2-3 terms, 1-2 digits; the question's fixed preamble dropped) with step-by-step
worked solutions.
Greedy accuracy on 100 held-out problems: **{results['teacher']['acc']:.2f}**; its CE on held-out solutions: {teacher_ce:.4f}.

Every student gets **{budget:,} tokens** (batch 8 x 256). `mohawk` splits them 10% / 20% / 70% over
matrix orientation / hidden-state alignment / end-to-end KD. `mohawk+sft` adds {sft_budget:,} tokens of SFT.
Held-out metrics are token means over the worked-solution positions of 300 held-out problems; greedy accuracy
on 100 of them.

{chr(10).join(rows)}

Stage losses inside the `mohawk` arm (first -> last logged window):
- stage 1, matrix orientation: {m0:.4f} -> {m1:.4f} ({m1 / m0:.1%} of the start)
- stage 2, hidden-state alignment: {h0:.4f} -> {h1:.4f} ({h1 / h0:.1%} of the start)

Checks:
- MOHAWK 1+2+3 vs stage 3 alone (held-out KL(t‖s)): {results['mohawk']['fkl']:.4f} vs {results['kd-only']['fkl']:.4f}
  -> {'MOHAWK lower' if results['mohawk']['fkl'] < results['kd-only']['fkl'] else 'claim did NOT hold'}
- hybrid vs pure (same forward-KL objective, KL(t‖s)): {results['hybrid-fkl']['fkl']:.4f} vs {results['mohawk']['fkl']:.4f}
  -> {'hybrid closer' if results['hybrid-fkl']['fkl'] < results['mohawk']['fkl'] else 'claim did NOT hold'};
  reverse-KL hybrid: KL(s‖t) {results['hybrid-rkl']['rkl']:.4f} vs Llamba {results['mohawk']['rkl']:.4f}
- SFT after distillation, held-out CE on worked solutions: {results['mohawk']['ce']:.4f} -> {results['mohawk+sft']['ce']:.4f}
  -> {'lower' if results['mohawk+sft']['ce'] < results['mohawk']['ce'] else 'claim did NOT hold'}

Also measured:
- reverse vs forward KL for the same hybrid at equal tokens, held-out KL(t‖s): {results['hybrid-rkl']['fkl']:.4f} vs
  {results['hybrid-fkl']['fkl']:.4f}, KL(s‖t): {results['hybrid-rkl']['rkl']:.4f} vs {results['hybrid-fkl']['rkl']:.4f}
  (starting from KL(t‖s) {results['hybrid-rkl (init)']['fkl']:.2f} at initialisation)
- greedy accuracy: teacher {results['teacher']['acc']:.2f}, best student
  {max(v.get('acc', 0) for k, v in results.items() if k != 'teacher'):.2f}: at {budget:,} tokens every student is
  still far from the teacher (its own training took {args_teacher_tokens:,} tokens)

Log:
```
{chr(10).join(lines)}
```
"""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


if __name__ == "__main__":
    main()
