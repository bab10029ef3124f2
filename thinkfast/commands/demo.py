"""`thinkfast demo` and `thinkfast train-teacher`: the embedded default, end to end."""

from __future__ import annotations

import time
from pathlib import Path

from . import no_hf_progress_bars, non_negative_float, positive_int


def add_parsers(sub) -> None:
    d = sub.add_parser(
        "demo",
        help="distil the embedded teacher into Llamba and hybrid students and compare them at a fixed time budget",
        description="The paper's experiment at laptop scale: embedded teacher -> Llamba (MOHAWK 1-3, forward KL) "
        "and hybrid (attention kept in a quarter of the layers, hidden-state alignment) students -> SFT of both -> "
        "n samples per held-out problem for all three in the same engine -> grading -> outcome reward model -> "
        "report.md, metrics.json and plots in --out. Re-running the same command continues an interrupted run.",
    )
    d.add_argument("--out", default="thinkfast-demo", help="output folder (default: ./thinkfast-demo)")
    d.add_argument("--quick", action="store_true", help="smoke run of the whole pipeline in about a minute (tiny budgets, no quality claims)")
    d.add_argument("--teacher", help="a thinkfast all-attention teacher folder instead of the embedded one (e.g. from train-teacher)")
    d.add_argument("--problems", type=positive_int, help="held-out problems (default 40; --quick 4)")
    d.add_argument("--n", type=positive_int, help="samples per problem and model (default 32; --quick 4)")
    d.add_argument("--temperature", type=non_negative_float, help="sampling temperature (default 1.3; 0: greedy)")
    d.add_argument("--batch-size", type=positive_int, help="engine slots (default 256)")
    d.add_argument("--threads", type=positive_int, help="torch CPU threads (default: all cores)")
    d.add_argument("--no-progress", action="store_true", help="no progress bars")
    d.add_argument("--sequential", action="store_true",
                   help="train the students one after the other (by default, with 2+ CPU threads, the Llamba's "
                   "stages after hidden-state alignment run in a second process beside the hybrid; same weights)")
    d.set_defaults(func=run_demo_command)

    t = sub.add_parser(
        "train-teacher",
        help="train the embedded teacher from scratch with a recipe (writes a save_pretrained folder)",
        description="Train a small Llama teacher from scratch on procedural arithmetic with worked solutions "
        "(recipe tiny-teacher: the checkpoint shipped with thinkfast). Resumable with --resume.",
    )
    t.add_argument("--recipe", default="tiny-teacher", help="recipe name under thinkfast/recipes or a path (default tiny-teacher)")
    t.add_argument("--out", required=True, help="output folder")
    t.add_argument("--tokens", help="token budget (overrides the recipe; e.g. 2M)")
    t.add_argument("--resume", action="store_true", help="continue a killed run in --out")
    t.add_argument("--threads", type=positive_int, help="torch CPU threads")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(func=run_train_teacher)


def _threads(n):
    import torch

    if n is not None:  # validated by argparse (positive_int)
        torch.set_num_threads(n)


def _quiet_hf():
    from transformers.utils import logging as hf_logging

    no_hf_progress_bars()
    hf_logging.set_verbosity_error()


def _config_role(path: Path) -> str | None:
    """A thinkfast config's role (teacher | llamba | hybrid, from its attention layers); None for anything else."""
    import json

    try:
        raw = json.loads(path.read_text())
        n_layers, attn = raw["n_layers"], raw.get("attn_layers") or []
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # the model's own loading names what is wrong with it
    if raw.get("model_type") != "thinkfast" or not isinstance(attn, list):
        return None
    return "teacher" if len(attn) == n_layers else "llamba" if not attn else "hybrid"


def run_demo_command(args) -> int:
    from ..demo import run_demo
    from ..errors import ConfigError

    _threads(args.threads)
    _quiet_hf()
    from ..utils import check_out_path

    check_out_path(args.out)
    if args.teacher:  # checked before the run folder records it as a setting
        t = Path(args.teacher)
        missing = [f for f in ("config.json", "model.safetensors") if not (t / f).is_file()]
        if not t.is_dir() or missing:
            raise ConfigError(f"--teacher {t}: not a thinkfast model folder ({'no such folder' if not t.is_dir() else 'no ' + ', '.join(missing)}); "
                              "pass a folder written by `thinkfast train-teacher` or drop --teacher for the embedded one")
        role = _config_role(t / "config.json")
        if role not in (None, "teacher"):  # refused here, before the run folder records it (a re-run is then free)
            raise ConfigError(f"--teacher {t}: a thinkfast {role}, not an all-attention teacher; pass a folder written "
                              "by `thinkfast train-teacher` or drop --teacher for the embedded one")
    t0 = time.perf_counter()
    metrics = run_demo(args.out, quick=args.quick, progress=not args.no_progress, overlap="off" if args.sequential else "auto",
                       teacher=args.teacher,
                       problems=args.problems, n=args.n, temperature=args.temperature, batch_size=args.batch_size)
    print(f"report: {args.out}/report.md  metrics: {args.out}/metrics.json  ({time.perf_counter() - t0:.0f} s this run, "
          f"{metrics.get('wall_seconds') or 0:.0f} s in all)")
    return 0


def run_train_teacher(args) -> int:
    from ..distill.recipes import parse_count
    from ..embedded import train_teacher

    _threads(args.threads)
    _quiet_hf()
    from ..utils import check_run_out

    check_run_out(args.out, args.resume)  # as distill and sft: --resume on a folder with no run is refused
    tokens = parse_count(args.tokens) if args.tokens else None
    from ..distill.trainer import no_bar

    train_teacher(args.recipe, args.out, tokens=tokens, resume=args.resume, progress=no_bar if args.no_progress else True)
    print(f"teacher written to {args.out}")
    return 0
