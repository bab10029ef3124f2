"""`thinkfast score | train-rm | report`: grading, reward models and inference-scaling reports over samples files."""

from __future__ import annotations

import argparse
import math

from ..errors import ConfigError, ThinkfastError
from ..utils import check_device, check_out_path
from . import no_hf_progress_bars, non_negative_int, positive_float
from . import positive_int as _positive_int


def _ks(text: str) -> list[int]:
    try:
        ks = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--ks {text!r}: expected comma-separated integers, e.g. 1,2,4,8") from None
    if not ks or min(ks) < 1:
        raise argparse.ArgumentTypeError(f"--ks {text!r}: every k must be at least 1")
    return ks


def add_parsers(sub) -> None:
    p = sub.add_parser("score", help="grade ungraded samples and add reward-model scores to samples files (in place)",
                       description="Fill `correct` where it is null (grading) and `reward` where it is null (with --reward-model "
                                   "or --prm). Each file is rewritten atomically; every other field and line is kept.")
    p.add_argument("samples", nargs="+", metavar="SAMPLES.jsonl", help="samples files written by `thinkfast sample`")
    p.add_argument("--reward-model", metavar="DIR", help="an outcome reward model folder written by `thinkfast train-rm`")
    p.add_argument("--prm", metavar="ID_OR_DIR", help="a process reward model, e.g. RLHFlow/Llama3.1-8B-PRM-Deepseek-Data")
    p.add_argument("--prm-aggregation", default="min", choices=["last", "min", "mean", "product"], help="how PRM step scores combine (default: min)")
    p.add_argument("--data", action="append", metavar="SPEC", help="data spec(s) the samples came from, for the question text (repeatable)")
    p.add_argument("--rescore", action="store_true", help="replace existing rewards too (default: only null ones)")
    grading = p.add_mutually_exclusive_group()
    grading.add_argument("--no-regrade", dest="regrade", action="store_false", help="do not grade samples whose `correct` is null")
    grading.add_argument("--regrade-all", dest="regrade", action="store_const", const="all",
                         help="grade every sample again, graded ones too (after a grader change; default: only null ones)")
    p.add_argument("--grade-timeout", type=positive_float, default=10.0, metavar="S", help="seconds per math item before it is marked ungraded (default: 10)")
    p.add_argument("--batch-size", type=_positive_int, default=16)
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--threads", type=_positive_int, help="torch CPU threads (default: torch's choice; 1 is faster on a busy machine)")
    p.add_argument("--skip-bad-lines", action="store_true", help="skip malformed lines (they are kept in the file unchanged)")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("train-rm", help="train an outcome reward model (verifier) on graded samples",
                       description="Fit a scalar head on a small LM backbone to predict whether a completion is correct, from "
                                   "graded samples of a training split (class-balanced binary cross-entropy). The head reads the "
                                   "backbone's mean and min log-probability of the completion (--features likelihood, the default), "
                                   "the last token's and the completion's mean hidden state (pooled), or both. By default the backbone "
                                   "is frozen and the head is a logistic regression (one forward pass over the data); --train-layers N "
                                   "also fine-tunes the top N blocks (pooled features). "
                                   "Writes DIR/{backbone/, head.safetensors, reward_config.json}.")
    p.add_argument("--samples", nargs="+", required=True, metavar="FILE", help="graded samples files (a training split, not the test set)")
    p.add_argument("--backbone", required=True, metavar="DIR", help="checkpoint folder with its tokenizer (a student or teacher)")
    p.add_argument("--out", required=True, metavar="DIR", help="where to write the reward model (replaced atomically)")
    p.add_argument("--data", action="append", metavar="SPEC", help="data spec(s) the samples came from, so the verifier sees the question (repeatable)")
    p.add_argument("--train-layers", type=non_negative_int, default=0, metavar="N", help="top blocks fine-tuned with the head; 0 = frozen backbone (default: 0)")
    p.add_argument("--epochs", type=_positive_int, default=4, help="passes over the data when --train-layers > 0 (default: 4)")
    p.add_argument("--lr", type=positive_float, default=1e-3, help="head learning rate when --train-layers > 0; the blocks use a tenth of it (default: 1e-3)")
    p.add_argument("--l2", type=float, default=1e-2, help="L2 penalty of the logistic head on a frozen backbone (default: 0.01)")
    p.add_argument("--features", choices=["likelihood", "pooled", "both"], default="likelihood",
                   help="what the head reads: the backbone's log-probabilities of the completion, pooled hidden states, or both "
                        "(default: likelihood; pooled states need thousands of examples)")
    p.add_argument("--max-len", type=_positive_int, default=1024, metavar="TOKENS",
                   help="tokens per example: question head (at most 256) + completion tail; the likelihood sees only what is kept (default: 1024)")
    p.add_argument("--batch-size", type=_positive_int, default=16)
    p.add_argument("--val-fraction", type=float, default=0.1, help="fraction of problems held out for the reported AUC (default: 0.1; needs at least 10 problems)")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--device", help="cpu, cuda ... (default: cuda when available)")
    p.add_argument("--threads", type=_positive_int, help="torch CPU threads (default: torch's choice; 1 is faster on a busy machine)")
    p.add_argument("--skip-bad-lines", action="store_true", help="skip malformed lines in the samples files")
    p.set_defaults(func=cmd_train_rm)

    p = sub.add_parser("report", help="pass@k / maj@k / BoN@k against k and against seconds: report.md, metrics.json, plots",
                       description="Per model: pass@k, maj@k, BoN@k and weighted BoN@k for k = 1, 2, 4, ..., n with bootstrap CIs, "
                                   "seconds per problem (k x measured seconds per sample), Pareto fronts across models.")
    p.add_argument("samples", nargs="+", metavar="RUN.jsonl", help="samples files (one or more models)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (report.md, metrics.json, *.png)")
    p.add_argument("--dataset", metavar="SPEC", help="data spec of the problems, recorded in the report")
    p.add_argument("--by", metavar="FIELD", help="also break accuracy down by this field of the problems in --dataset "
                   "(MATH: level or subject; the demo's held-out sums: terms or digits; any jsonl field)")
    p.add_argument("--ks", type=_ks, metavar="K,K,...", help="k values (default: 1, 2, 4, ..., n)")
    p.add_argument("--max-k", type=_positive_int, help="leave out k above this")
    p.add_argument("--subsets", type=_positive_int, default=256, help="random subsets per k for maj@k and BoN@k (default: 256)")
    p.add_argument("--bootstrap", type=_positive_int, default=1000, help="bootstrap resamples for the CIs (default: 1000)")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--wall-seconds", type=positive_float, help="wall time of the whole run, recorded in the report")
    p.add_argument("--allow-mixed-hardware", action="store_true", help="compare models sampled on different devices anyway")
    p.add_argument("--all-problems", action="store_true", help="use every model's own problems, not only those all models share")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--skip-bad-lines", action="store_true", help="skip malformed lines in the samples files")
    p.set_defaults(func=cmd_report)


def _device(name, threads=None):
    import torch

    if threads:
        torch.set_num_threads(threads)

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    return check_device(name)


def cmd_score(args) -> int:
    no_hf_progress_bars()
    from ..eval.scoring import score_files

    totals = score_files(args.samples, reward_model=args.reward_model, prm=args.prm, prm_aggregation=args.prm_aggregation,
                         data=args.data, regrade=args.regrade, rescore=args.rescore, skip_bad_lines=args.skip_bad_lines,
                         batch_size=args.batch_size, device=_device(args.device, args.threads), grade_timeout=args.grade_timeout)
    print(f"{totals['samples']} samples in {totals['files']} file(s): {totals['regraded']} graded now, "
          f"{totals['ungraded']} left ungraded, {totals['scored']} given a reward")
    return 0


def cmd_train_rm(args) -> int:
    no_hf_progress_bars()
    from ..eval.reward import ORMConfig, ORMTraining
    from ..eval.scoring import train_reward_model

    if not 0 <= args.l2 < math.inf:  # also refuses nan
        raise ThinkfastError(f"--l2 {args.l2}: the penalty must be a number, 0 or more")
    check_out_path(args.out, marker="reward_config.json")
    if not 0 <= args.val_fraction < 1:
        raise ThinkfastError(f"--val-fraction {args.val_fraction}: use a fraction in [0, 1)")
    if args.train_layers and args.features == "likelihood":
        raise ThinkfastError(f"--train-layers {args.train_layers} fine-tunes blocks under the pooled hidden states; "
                             "add --features both (or pooled)")
    rm = train_reward_model(args.samples, args.backbone, args.out, data=args.data,
                            orm=ORMConfig(max_len=args.max_len, question_tokens=min(256, args.max_len // 2), train_layers=args.train_layers,
                                          features=args.features),
                            training=ORMTraining(epochs=args.epochs, lr=args.lr, l2=args.l2, batch_size=args.batch_size,
                                                 val_fraction=args.val_fraction, seed=args.seed),
                            skip_bad_lines=args.skip_bad_lines, device=_device(args.device, args.threads))
    last = rm.cfg.stats["history"][-1]
    auc = last.get("val_auc")
    print(f"reward model written to {args.out} ({rm.cfg.stats['train_examples']} training completions, "
          f"{rm.cfg.stats['seconds']:.0f}s; validation AUC {auc:.3f})" if auc is not None else
          f"reward model written to {args.out} ({rm.cfg.stats['train_examples']} training completions, {rm.cfg.stats['seconds']:.0f}s; "
          f"no validation AUC: {rm.cfg.stats.get('no_validation', 'no validation split')})")
    return 0


def cmd_report(args) -> int:
    from pathlib import Path

    from ..eval.report import build_report, is_report_folder

    check_out_path(args.out)
    out = Path(args.out)
    # like train-rm and sft: a folder of other files is not ours to write into (a report.md there may be someone's)
    if out.is_dir() and any(out.iterdir()) and not is_report_folder(out):
        raise ConfigError(f"--out {out} holds other files and no report written by `thinkfast report`, which writing "
                          "here could replace; choose a new --out or empty it")
    metrics = build_report(args.samples, args.out, dataset=args.dataset, wall_seconds=args.wall_seconds, ks=args.ks, max_k=args.max_k,
                           n_subsets=args.subsets, n_boot=args.bootstrap, seed=args.seed, allow_mixed_hardware=args.allow_mixed_hardware,
                           skip_bad_lines=args.skip_bad_lines, common_problems=not args.all_problems, plots=not args.no_plots,
                           group_by=args.by)
    for name, e in metrics["models"].items():
        k0, n = str(e["ks"][0]), str(e["ks"][-1])
        print(f"{name}: pass@{k0} {e['pass_at_k'][k0]:.3f}  pass@{n} {e['pass_at_k'][n]:.3f}  maj@{n} {e['maj_at_k'][n]:.3f}  "
              f"{e['seconds_per_sample']:.3g} s/sample")
    for note in metrics["notes"]:  # what was left out or counted specially: in report.md too, but easy to miss there
        print(f"note: {note}")
    print(f"report written to {args.out}/report.md")
    return 0
