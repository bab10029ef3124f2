"""Reports: samples files -> metrics.json, report.md and PNG plots (accuracy against k and against seconds).

    build_report(["runs/teacher.jsonl", "runs/llamba.jsonl"], "runs/report", dataset="math:../shared/data/math500_test.jsonl")

Models are compared on the problems they all have (the others are listed in the notes), each with the same
number n of samples per problem (extra samples beyond the smallest count are left out, by sample_idx).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import tempfile
from pathlib import Path

import numpy as np

from ..errors import ConfigError, DataError, ThinkfastError, option
from ..utils import HeldLock, atomic_write_json, atomic_write_text
from .budget import ModelTiming, best_within, check_hardware, model_timing, pareto_front
from .grading import canonical_answer, extract_answer
from .metrics import DEFAULT_SUBSETS, METRICS, ProblemSamples, dataset_curves, effective_correct, ks_for, subsets_used
from .samples import Sample, SampleSet, check_drawn_from, read_samples

LABELS = {"pass_at_k": "coverage (pass@k)", "maj_at_k": "majority vote (maj@k)", "bon_at_k": "Best-of-N (BoN@k)",
          "weighted_bon_at_k": "weighted Best-of-N"}
SHORT = {"pass_at_k": "pass@k", "maj_at_k": "maj@k", "bon_at_k": "BoN@k", "weighted_bon_at_k": "wBoN@k"}
CI_LEVEL = 0.95
REPORT_TITLE = "# Inference scaling report"  # report.md's first line: how `thinkfast report` knows its own folders
TIE_TOLERANCE = 1e-9  # metric values closer than this are equal (means of the same subsets, up to float rounding)


def _answer(s: Sample) -> str | None:
    if s.answer is not None:
        return s.answer
    return canonical_answer(extract_answer(s.completion, s.kind), s.kind)  # ungraded lines carry no answer yet


def _problem_samples(samples: list[Sample], model: str) -> ProblemSamples:
    rewards = [s.reward for s in samples]
    have = sum(r is not None for r in rewards)
    if 0 < have < len(rewards):
        raise DataError(
            f"model {model!r}: {have} of {len(rewards)} samples of problem {samples[0].problem_id} have a reward "
            f"(e.g. {samples[0].where}); run `thinkfast score` on the whole file before reporting"
        )
    return ProblemSamples([_answer(s) for s in samples], [s.correct for s in samples], rewards if have else None)


def _fmt(x: float | None, digits: int = 3) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _kmap(ks, values) -> dict[str, float]:
    return {str(k): float(v) for k, v in zip(ks, values)}


def compute_metrics(sset: SampleSet, ks: list[int] | None = None, max_k: int | None = None, n_subsets: int = DEFAULT_SUBSETS,
                    n_boot: int = 1000, seed: int = 0, allow_mixed_hardware: bool = False, common_problems: bool = True,
                    groups: ProblemGroups | None = None) -> dict:
    """The metrics.json content (without plots): per model curves, CIs, timing, Pareto fronts, budget tables, and,
    with `groups`, each model's pass@1, pass@n and maj@n per group of problems (`by_group`)."""
    by_model = sset.by_model()
    notes: list[str] = []
    if sset.bad:
        notes.append(f"{len(sset.bad)} malformed line(s) skipped, first at {sset.bad[0].path}:{sset.bad[0].line} ({sset.bad[0].reason})")
    if sset.duplicates:
        notes.append(f"{sset.duplicates} duplicate sample(s) (same model, problem and sample_idx) counted once")
    problem_ids = list(next(iter(by_model.values())))
    if common_problems and len(by_model) > 1:
        common = set.intersection(*(set(p) for p in by_model.values()))
        if not common:
            raise DataError(f"models {', '.join(by_model)} share no problem_id; were they sampled on the same data?")
        for model, problems in by_model.items():
            dropped = len(problems) - len(common)
            if dropped:
                notes.append(f"{model}: {dropped} problem(s) not sampled by every model left out")
        problem_ids = [p for p in problem_ids if p in common]
    timings: dict[str, ModelTiming] = {m: model_timing([s for ps in probs.values() for s in ps]) for m, probs in by_model.items()}
    hardware = check_hardware(timings, allow_mixed_hardware)
    if hardware is None:
        notes.append("samples come from different hardware (allowed by flag): the seconds axes are not comparable")

    models: dict[str, dict] = {}
    group_rows: dict[str, dict] = {}
    for model, problems in by_model.items():
        pids = [p for p in (problem_ids if common_problems else problems) if p in problems]
        counts = [len(problems[p]) for p in pids]
        n = min(counts)
        if max(counts) != n:
            notes.append(f"{model}: problems have {n} to {max(counts)} samples; the first {n} (by sample_idx) of each are used")
        use_ks = sorted(set(ks)) if ks else ks_for(n)
        if max_k is not None:
            use_ks = [k for k in use_ks if k <= max_k] or [1]
        too_big = [k for k in use_ks if k > n]
        if too_big:
            raise DataError(f"k={too_big[0]} is larger than the {n} samples per problem of model {model!r}; use k <= {n}")
        if use_ks[0] < 1:
            raise DataError(f"k={use_ks[0]}: k must be at least 1")
        chosen = {p: problems[p][:n] for p in pids}
        used = [s for lst in chosen.values() for s in lst]
        ungraded = sum(s.correct is None for s in used)
        if ungraded == len(used):
            raise DataError(f"model {model!r}: none of its {len(used)} samples is graded (e.g. {used[0].where}; sampled with "
                            "--no-grade?); run `thinkfast score` on its samples file before reporting")
        if ungraded:
            notes.append(f"{model}: {ungraded} ungraded sample(s) (a grader that hung or crashed, or not graded yet; "
                         "`thinkfast score` grades them): each counts as an equal answer graded among its problem's "
                         "samples, else as wrong")
        scorers = sorted({s.record.get("reward_model") for s in used if s.reward is not None} - {None})
        if len(scorers) > 1:  # Best-of-N would rank samples on two scales
            raise DataError(f"model {model!r}: its rewards come from {len(scorers)} reward models ({', '.join(scorers)}); "
                            "re-score its samples file with one of them (`thinkfast score --rescore`) before reporting")
        per_problem = {p: _problem_samples(s, model) for p, s in chosen.items()}
        try:
            curves = dataset_curves(per_problem, use_ks, n_subsets, seed, n_boot)
        except ThinkfastError as e:  # rewards on some problems only: name the model and its file
            raise DataError(f"model {model!r} ({used[0].where.rsplit(':', 1)[0]}): {e}") from None
        timing = model_timing(used)
        if len(timing.timed_with) > 1:
            notes.append(f"{model}: its samples were timed with {' and '.join(timing.timed_with)} (a run resumed "
                         "with another --batch-size or --compile): its seconds per sample mix those speeds")
        roles = [r for r in dict.fromkeys(s.role for s in used) if r]
        entry: dict = {
            "role": roles[0] if len(roles) == 1 else (",".join(roles) or None),
            "n_problems": len(pids),
            "n_samples_per_problem": n,
            "ks": use_ks,
            "subsets": subsets_used(n, n_subsets),  # per k and problem: at least n_subsets, a multiple of n
        }
        for name in METRICS:
            if name in curves:
                entry[name] = _kmap(use_ks, curves[name]["mean"])
                entry[name + "_ci"] = {str(k): [float(lo), float(hi)] for k, lo, hi in zip(use_ks, *curves[name]["ci"])}
            else:
                entry[name] = None  # no rewards: run `thinkfast score` first
                entry[name + "_ci"] = None
        entry.update(
            seconds_per_sample=timing.seconds_per_sample,
            seconds_per_problem=_kmap(use_ks, timing.seconds_at(use_ks)),
            tokens_per_second=timing.tokens_per_second,
            mean_gen_tokens=timing.mean_gen_tokens,
            hardware=timing.hardware[0] if len(timing.hardware) == 1 else timing.hardware,
            # the engine settings its seconds were measured with (None: samples written before they were recorded)
            timed_with=(timing.timed_with[0] if len(timing.timed_with) == 1 else timing.timed_with or None),
            ungraded=ungraded,
            no_answer=sum(_answer(s) is None for s in used),
            # mean over all samples, counted as the metrics count them (= pass@1)
            accuracy=float(np.mean(np.concatenate([effective_correct(ps) for ps in per_problem.values()]))),
        )
        models[model] = entry
        if groups is not None:
            group_rows[model] = _group_means(groups, list(chosen), curves, use_ks)

    metrics = [m for m in METRICS if any(e[m] is not None for e in models.values())]
    if "bon_at_k" in metrics:  # the Best-of-N tables and fronts leave out a model without rewards: say so
        for model, e in models.items():
            if e["bon_at_k"] is None:
                notes.append(f"{model}: no rewards (run `thinkfast score --reward-model RM` on its samples file); it is "
                             "left out of the Best-of-N tables and Pareto fronts")
    pareto, budgets = {}, {}
    for name in metrics:
        points = [(models[m]["seconds_per_problem"][str(k)], models[m][name][str(k)], m, k)
                  for m in models if models[m][name] is not None for k in models[m]["ks"]]
        pareto[name] = [{"model": m, "k": k, "seconds": s, "value": v} for s, v, m, k in pareto_front(points)]
        budgets[name] = _budget_table(models, name)
    out = {"hardware": hardware, "n_problems": len(problem_ids), "models": models, "pareto": pareto, "budgets": budgets,
           "settings": {"n_subsets": n_subsets, "bootstrap": n_boot, "ci_level": CI_LEVEL, "seed": seed,
                        "common_problems": common_problems}, "notes": notes}
    if groups is not None:
        out["by_group"] = {"field": groups.field, "models": group_rows}
        if groups.missing:
            notes.append(f"{groups.missing} problem(s) of the data have no {groups.field!r}; they form the group {NO_GROUP!r}")
    return out


NO_GROUP = "(none)"


class ProblemGroups:
    """Problem id -> the value of one of its fields (MATH `level`, a reasoning-gym sum's `num_terms`...), read from
    the data spec the samples were drawn from: the report breaks each model's accuracy down by it."""

    def __init__(self, field: str, labels: dict[str, str], missing: int = 0):
        self.field, self.labels, self.missing = field, labels, missing

    @classmethod
    def from_spec(cls, spec: str, field: str, problems=None) -> "ProblemGroups":
        from ..data import load_problems

        problems = load_problems(spec) if problems is None else problems
        labels = {p.id: str(p.meta[field]) for p in problems if p.meta.get(field) is not None}
        if not labels:
            fields = sorted({k for p in problems for k, v in p.meta.items() if isinstance(v, (str, int, float, bool))})
            raise DataError(f"no problem of {spec!r} has a field {field!r} to group by"
                            + (f" (fields: {', '.join(fields)})" if fields else " (its problems carry no fields besides question and answer)"))
        return cls(field, labels, len(problems) - len(labels))

    def label(self, pid: str) -> str:
        return self.labels.get(pid, NO_GROUP)


def _group_sort_key(label: str):
    try:
        return (0, float(label), label)
    except ValueError:
        return (1, 0.0, label)


def _group_means(groups: ProblemGroups, pids: list[str], curves: dict, ks: list[int]) -> dict:
    """Per group: problems, and the mean over its problems of pass@k at the first and last k and maj@k at the last."""
    by: dict[str, list[int]] = {}
    for i, pid in enumerate(pids):
        by.setdefault(groups.label(pid), []).append(i)
    first, last = str(ks[0]), str(ks[-1])
    out = {}
    for label in sorted(by, key=_group_sort_key):
        idx = by[label]
        row = {"problems": len(idx), f"pass_at_{first}": float(curves["pass_at_k"]["per_problem"][idx, 0].mean()),
               f"pass_at_{last}": float(curves["pass_at_k"]["per_problem"][idx, -1].mean())}
        if "maj_at_k" in curves:
            row[f"maj_at_{last}"] = float(curves["maj_at_k"]["per_problem"][idx, -1].mean())
        out[label] = row
    return out


def _budget_table(models: dict, name: str) -> list[dict]:
    """At the slowest model's seconds per problem for each of its k: the best value each model reaches within it."""
    have = {m: e for m, e in models.items() if e[name] is not None}
    if not have:
        return []
    slowest = max(have, key=lambda m: have[m]["seconds_per_sample"])
    rows = []
    for k in have[slowest]["ks"]:
        budget = have[slowest]["seconds_per_problem"][str(k)]
        best = {}
        for m, e in have.items():
            secs = np.array([e["seconds_per_problem"][str(j)] for j in e["ks"]])
            vals = np.array([e[name][str(j)] for j in e["ks"]])
            got = best_within(secs, vals, budget)
            best[m] = None if got is None else {"value": got[0], "k": e["ks"][got[1]]}
        reached = {m: b for m, b in best.items() if b is not None}
        top = max((b["value"] for b in reached.values()), default=None)
        # equal values (e.g. every model at 1.0 or 0.0) have no winner: naming the first would be a claim
        leaders = [m for m, b in reached.items() if top - b["value"] <= TIE_TOLERANCE]
        rows.append({"seconds": budget, "best": best, "winner": leaders[0] if len(leaders) == 1 else None,
                     "tied": leaders if len(leaders) > 1 else []})
    return rows


def _best_cell(row: dict) -> str:
    if row.get("tied"):
        return "tie: " + ", ".join(row["tied"])
    return row["winner"] or "–"


# ------------------------------------------------------------------------------------------------- plots


def _save(fig, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=150, bbox_inches="tight")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _colors(models) -> dict[str, str]:
    cycle = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]
    return {m: cycle[i % len(cycle)] for i, m in enumerate(models)}


def _curve(ax, entry, name, x_key, color, label):
    ks = entry["ks"]
    x = np.array(ks, dtype=float) if x_key == "k" else np.array([entry["seconds_per_problem"][str(k)] for k in ks])
    y = np.array([entry[name][str(k)] for k in ks])
    lo, hi = np.array([entry[name + "_ci"][str(k)] for k in ks]).T
    ax.plot(x, y, marker="o", ms=3.5, color=color, label=label)
    ax.fill_between(x, lo, hi, color=color, alpha=0.15, linewidth=0)


def _k_axis(ax, ks):
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks)
    ax.set_xticklabels([str(k) for k in ks])
    ax.set_xlabel("samples per problem k (log\u2082 scale)")


def _front(ax, front):
    if front:
        ax.step([p["seconds"] for p in front], [p["value"] for p in front], where="post", color="black",
                linestyle="--", linewidth=1, label="Pareto front")


def write_plots(metrics: dict, out_dir: Path, title: str) -> list[str]:
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed

    models = metrics["models"]
    colors = _colors(models)
    all_ks = sorted({k for e in models.values() for k in e["ks"]})
    acc = [m for m in ("maj_at_k", "bon_at_k", "weighted_bon_at_k") if m in metrics["pareto"]]
    written = []

    def label(m):
        role = models[m]["role"]
        return f"{m} ({role})" if role and role != m else m

    for x_key in ("k", "seconds"):
        fig = Figure(figsize=(6, 4.2))
        ax = fig.subplots()
        for m, e in models.items():
            _curve(ax, e, "pass_at_k", x_key, colors[m], label(m))
        if x_key == "k":
            _k_axis(ax, all_ks)
        else:
            _front(ax, metrics["pareto"].get("pass_at_k"))
            ax.set_xscale("log")
            ax.set_xlabel("seconds per problem (k \u00d7 seconds per sample, log scale)")
        ax.set_ylabel("coverage: pass@k (fraction of problems)")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title(f"Coverage vs {'k' if x_key == 'k' else 'time'}: {title}", fontsize=9)
        name = f"coverage_vs_{x_key}.png"
        _save(fig, out_dir / name)
        written.append(name)

        fig = Figure(figsize=(4.6 * len(acc), 4.2))
        axes = np.atleast_1d(fig.subplots(1, len(acc), sharey=True))
        for ax, metric in zip(axes, acc):
            for m, e in models.items():
                if e[metric] is not None:
                    _curve(ax, e, metric, x_key, colors[m], label(m))
            if x_key == "k":
                _k_axis(ax, all_ks)
            else:
                _front(ax, metrics["pareto"][metric])
                ax.set_xscale("log")
                ax.set_xlabel("seconds per problem (log scale)")
            ax.set_title(LABELS[metric], fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        axes[0].set_ylabel("accuracy (fraction of problems)")
        fig.suptitle(f"Accuracy vs {'k' if x_key == 'k' else 'time'}: {title}", fontsize=10)
        name = f"accuracy_vs_{x_key}.png"
        _save(fig, out_dir / name)
        written.append(name)

    shown = ["pass_at_k"] + acc
    fig = Figure(figsize=(4.6 * len(shown), 4.2))
    axes = np.atleast_1d(fig.subplots(1, len(shown), sharey=True))
    for ax, metric in zip(axes, shown):
        for m, e in models.items():
            if e[metric] is None:
                continue
            xs = [e["seconds_per_problem"][str(k)] for k in e["ks"]]
            ax.scatter(xs, [e[metric][str(k)] for k in e["ks"]], color=colors[m], s=18, label=label(m))
        front = metrics["pareto"][metric]
        _front(ax, front)
        for p in front:
            ax.annotate(f"k={p['k']}", (p["seconds"], p["value"]), fontsize=6, xytext=(3, -9), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("seconds per problem (log scale)")
        ax.set_title(f"Pareto front: {SHORT[metric]}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("fraction of problems")
    fig.suptitle(f"Which model is best at each time budget: {title}", fontsize=10)
    _save(fig, out_dir / "pareto.png")
    written.append("pareto.png")
    return written


# ------------------------------------------------------------------------------------------------- markdown


def _group_table(by_group: dict) -> list[str]:
    models = by_group["models"]
    labels = list(dict.fromkeys(label for rows in models.values() for label in rows))
    cols = [(m, key) for m, rows in models.items() for key in next(iter(rows.values()), {}) if key != "problems"]
    out = [f"## By {by_group['field']}", "",
           "Means over each group's problems (a group of a few problems moves by a whole problem's share).", "",
           f"| {by_group['field']} | problems | " + " | ".join(f"{m} {key.replace('_at_', '@')}" for m, key in cols) + " |",
           "|---|---|" + "---|" * len(cols)]
    for label in labels:
        n = next(rows[label]["problems"] for rows in models.values() if label in rows)
        cells = [_fmt(models[m][label][key]) if label in models[m] else "–" for m, key in cols]
        out.append(f"| {label} | {n} | " + " | ".join(cells) + " |")
    return out + [""]


def _markdown(metrics: dict, plots: list[str], summary_notes) -> str:
    models = metrics["models"]
    out = [REPORT_TITLE, ""]
    facts = [f"- dataset: `{metrics.get('dataset') or 'unknown'}`", f"- problems: {metrics['n_problems']}",
             f"- hardware: `{metrics['hardware'] or 'mixed'}`"]
    timed = {m: e.get("timed_with") for m, e in models.items() if e.get("timed_with")}
    if timed:  # seconds depend on the engine's batch size and compiled step too
        facts.append("- timed with: " + "; ".join(f"{m} {w if isinstance(w, str) else ' and '.join(w)}"
                                                   for m, w in timed.items()))
    if metrics.get("wall_seconds") is not None:
        facts.append(f"- wall time of the run: {metrics['wall_seconds']:.0f} s")
    facts.append(f"- samples files: {', '.join(f'`{p}`' for p in metrics['samples_files'])}")
    out += facts + [""]
    if summary_notes:
        out += ["## Summary", ""]
        out += [summary_notes] if isinstance(summary_notes, str) else [f"- {s}" for s in summary_notes]
        out += [""]

    # the smallest and largest k of each model (1 and n unless --ks or --max-k chose others), named in the header
    # when every model has the same, else in each cell
    lows, highs = {e["ks"][0] for e in models.values()}, {e["ks"][-1] for e in models.values()}
    low = f"@{next(iter(lows))}" if len(lows) == 1 else "@(smallest k)"
    high = f"@{next(iter(highs))}" if len(highs) == 1 else "@(largest k)"
    out += ["## Models", "",
            f"| model | role | problems | n | s / sample | tokens / s | gen tokens | pass{low} | pass{high} | maj{high} | BoN{high} | "
            f"wBoN{high} | ungraded | no answer |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for m, e in models.items():
        first, last = str(e["ks"][0]), str(e["ks"][-1])

        def cell(name, k, shared):
            if e[name] is None:
                return "–"
            return _fmt(e[name][k]) + ("" if shared else f" (k={k})")

        hi = len(highs) == 1
        out.append(f"| {m} | {e['role'] or '–'} | {e['n_problems']} | {e['n_samples_per_problem']} | {_fmt(e['seconds_per_sample'], 3)} | "
                   f"{_fmt(e['tokens_per_second'], 1)} | {_fmt(e['mean_gen_tokens'], 1)} | {cell('pass_at_k', first, len(lows) == 1)} | "
                   f"{cell('pass_at_k', last, hi)} | {cell('maj_at_k', last, hi)} | {cell('bon_at_k', last, hi)} | "
                   f"{cell('weighted_bon_at_k', last, hi)} | {e['ungraded']} | {e['no_answer']} |")
    out.append("")

    if metrics.get("by_group"):
        out += _group_table(metrics["by_group"])

    pct = int(round(100 * metrics["settings"]["ci_level"]))
    for name in METRICS:
        rows = {m: e for m, e in models.items() if e[name] is not None}
        if not rows:
            continue
        ks = sorted({k for e in rows.values() for k in e["ks"]})
        out += [f"## {LABELS[name]} vs k", "", f"Mean over problems [{pct}% bootstrap CI over problems].", "",
                "| model | " + " | ".join(f"k={k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
        for m, e in rows.items():
            cells = [f"{_fmt(e[name][str(k)])} [{_fmt(e[name + '_ci'][str(k)][0], 2)}, {_fmt(e[name + '_ci'][str(k)][1], 2)}]"
                     if str(k) in e[name] else "–" for k in ks]
            out.append(f"| {m} | " + " | ".join(cells) + " |")
        out.append("")

    out += ["## At a fixed time budget", "",
            "Seconds per problem = k × the model's mean seconds per sample. Budgets are the slowest model's cost at each of its k; "
            "each cell is the best the model reaches within that budget (its k in brackets).", ""]
    for name, rows in metrics["budgets"].items():
        if not rows:
            continue
        names = list(rows[0]["best"])
        out += [f"**{LABELS[name]}**", "", "| budget (s / problem) | " + " | ".join(names) + " | best |", "|---|" + "---|" * (len(names) + 1)]
        for r in rows:
            cells = [f"{_fmt(b['value'])} (k={b['k']})" if b else "over budget" for b in r["best"].values()]
            out.append(f"| {r['seconds']:.3g} | " + " | ".join(cells) + f" | {_best_cell(r)} |")
        out.append("")

    out += ["## Pareto fronts", "", "Points (model, k) that no other point beats with less time and higher accuracy.", ""]
    for name, front in metrics["pareto"].items():
        out.append(f"- {SHORT[name]}: " + ", ".join(f"{p['model']} k={p['k']} ({p['seconds']:.3g} s, {p['value']:.3f})" for p in front))
    out.append("")

    if plots:
        out += ["## Plots", ""] + [f"![{p[:-4].replace('_', ' ')}]({p})" for p in plots] + [""]
    out += ["## Method", "",
            f"pass@k is the unbiased estimator 1 − C(n−c, k)/C(n, k). maj@k, BoN@k and weighted BoN@k are means over at least "
            f"{metrics['settings']['n_subsets']} random size-k subsets of each problem's n samples (seed {metrics['settings']['seed']}; "
            "the subsets' first samples are dealt out evenly, so maj@1 and BoN@1 equal pass@1); "
            "ties go to the answer seen first in the subset; a completion without a final answer never votes; "
            "an ungraded sample counts as an equal answer graded among its problem's samples, else as wrong. "
            "Confidence intervals: percentile bootstrap over problems "
            f"({metrics['settings']['bootstrap']} resamples).", ""]
    if metrics["notes"]:
        out += ["## Notes", ""] + [f"- {n}" for n in metrics["notes"]] + [""]
    return "\n".join(out)


def _check_dataset_holds(sset: SampleSet, problems, dataset: str) -> None:
    """The dataset must hold every problem of the samples: it is recorded as their data, and grouped by (another
    spec, or a slice of it, would name the wrong data and put the problems it lacks in the group `(none)`)."""
    by_id = {p.id: p for p in problems}
    ids = by_id.keys()
    if not ids:
        from ..data.sources import empty_spec_hint

        raise DataError(f"{option('--dataset ', 'dataset=')}{dataset!r} names no problems ({empty_spec_hint(dataset)}); pass the data spec the samples were drawn from")
    sampled = list(dict.fromkeys(s.problem_id for s in sset.samples))
    outside = [pid for pid in sampled if pid not in ids]
    if len(outside) == len(sampled):
        raise DataError(f"{option('--dataset ', 'dataset=')}{dataset!r} holds none of the samples' {len(sampled)} problems (samples: "
                        f"{sampled[0]!r}..., dataset: {problems[0].id!r}...); pass the data spec the samples were drawn from")
    if outside:
        raise DataError(f"{option('--dataset ', 'dataset=')}{dataset!r} lacks {len(outside)} of the samples' {len(sampled)} problems (e.g. "
                        f"{outside[0]!r}); pass the data spec the samples were drawn from (a larger limit= or size=?)")
    check_drawn_from(sset.samples, by_id, option('--dataset ', 'dataset='), dataset)


PLOT_FILE = re.compile(r"^((coverage|accuracy)_vs_\w+|pareto)\.png$")  # the plots a report draws


def is_report_folder(path) -> bool:
    """Whether a folder holds a report written here before (re-running the report into it replaces that): its
    report.md starts with our title, or its metrics.json names the samples files it was computed from."""
    import json

    from ..utils import is_leftover

    path = Path(path)
    entries = list(path.iterdir()) if path.is_dir() else []
    if entries and all(PLOT_FILE.match(p.name) or is_leftover(p) for p in entries):
        return True  # a report killed while it drew its plots (they come before report.md and metrics.json)
    try:
        with (path / "report.md").open(encoding="utf-8") as f:
            if f.readline().rstrip("\n") == REPORT_TITLE:
                return True
    except (OSError, UnicodeDecodeError):
        pass
    try:
        metrics = json.loads((path / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(metrics, dict) and "samples_files" in metrics and "models" in metrics


def _plots_written_before(out: Path) -> set[str]:
    """The plots an earlier report in `out` wrote (its metrics.json lists them): only those are ours to remove."""
    import json

    try:
        listed = json.loads((out / "metrics.json").read_text(encoding="utf-8")).get("plots") or []
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return set()
    return {p for p in listed if isinstance(p, str) and p.endswith(".png") and Path(p).name == p}


def _refuse_replacing_foreign_files(out: Path) -> None:
    """Writing a report replaces report.md, metrics.json and the plots by name: only a report's own are ours to replace."""
    if not out.is_dir():
        return
    names = sorted(p.name for p in out.iterdir() if p.name in ("report.md", "metrics.json") or PLOT_FILE.match(p.name))
    if names and not is_report_folder(out):
        raise ConfigError(f"{option('--out', 'out_dir')} {out}: its {', '.join(names)} did not come from a thinkfast "
                          "report, and writing the report there would replace them; choose another folder or move them")


def build_report(samples_paths, out_dir, dataset: str | None = None, wall_seconds: float | None = None,
                 summary_notes: str | list[str] | None = None, *, ks: list[int] | None = None, max_k: int | None = None,
                 n_subsets: int = DEFAULT_SUBSETS, n_boot: int = 1000, seed: int = 0, allow_mixed_hardware: bool = False,
                 skip_bad_lines: bool = False, common_problems: bool = True, plots: bool = True, title: str | None = None,
                 group_by: str | None = None, lock: bool = True) -> dict:
    """Write report.md, metrics.json and PNG plots into `out_dir` (each file replaced atomically); return the metrics.
    `group_by`: a field of the problems in `dataset` (a data spec) to break accuracy down by. `lock`: hold
    `out_dir.lock` while writing, refusing a second report into the folder meanwhile (False: the caller holds it).
    A report.md, metrics.json or plot in `out_dir` that no thinkfast report wrote is refused, not replaced."""
    _refuse_replacing_foreign_files(Path(out_dir))
    paths = [Path(p) for p in ([samples_paths] if isinstance(samples_paths, (str, Path)) else samples_paths)]
    sset = read_samples(paths, skip_bad_lines)
    problems = None
    if dataset is not None:  # recorded in the report and grouped by: it must be the data the samples came from
        from ..data import load_problems

        problems = load_problems(dataset)
        _check_dataset_holds(sset, problems, dataset)
    else:
        specs = list(dict.fromkeys(s.record.get("dataset") for s in sset.samples if s.record.get("dataset")))
        dataset = specs[0] if len(specs) == 1 else (", ".join(specs) if specs else None)
    groups = None
    if group_by is not None:
        if dataset is None:
            raise DataError(f"grouping by {group_by!r} needs the problems' data spec: pass it with {option('--dataset SPEC', 'dataset=SPEC')}")
        groups = ProblemGroups.from_spec(dataset, group_by, problems)
    computed = compute_metrics(sset, ks, max_k, n_subsets, n_boot, seed, allow_mixed_hardware, common_problems, groups)
    metrics = {"wall_seconds": wall_seconds, "dataset": dataset, **computed, "samples_files": [str(p) for p in paths]}
    if summary_notes:
        metrics["summary"] = summary_notes
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    held = HeldLock.beside(out, "let it finish, or choose another " + option("--out", "out_dir"))
    with held if lock else contextlib.nullcontext():
        return _write_report(out, metrics, plots, title or dataset or "samples", summary_notes)


def _write_report(out: Path, metrics: dict, plots: bool, title: str, summary_notes) -> dict:
    out.mkdir(exist_ok=True)
    for leftover in out.glob(".*.png.tmp-*"):  # a killed report's half-drawn plots
        leftover.unlink(missing_ok=True)
    earlier = _plots_written_before(out)
    written = write_plots(metrics, out, title) if plots else []
    for stale in sorted(earlier - set(written)):  # an earlier report's plots here would show other data beside this one
        (out / stale).unlink(missing_ok=True)
    metrics["plots"] = written
    atomic_write_json(out / "metrics.json", metrics)
    atomic_write_text(out / "report.md", _markdown(metrics, written, summary_notes))
    for name in ("metrics.json", "report.md"):
        os.chmod(out / name, 0o644)  # readable like any report (the atomic temporary files start private)
    return metrics
