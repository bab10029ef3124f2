"""`thinkfast lm-eval ...`: lm-evaluation-harness's own command line, with thinkfast's models in it."""

from __future__ import annotations

import argparse

from ..errors import ConfigError


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "lm-eval",
        add_help=False,  # --help is lm-eval's
        help="lm-evaluation-harness with thinkfast models (--model thinkfast: generate_until on the engine)",
        description="Runs lm-evaluation-harness's command line with every argument given: `thinkfast lm-eval --model "
        "thinkfast --model_args pretrained=DIR,slots=64 --tasks gsm8k`. Needs `pip install 'thinkfast[lm-eval]'`.",
    )
    p.add_argument("lm_eval_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_lm_eval)


def cmd_lm_eval(args) -> int:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise ConfigError("lm-evaluation-harness is not installed: pip install 'thinkfast[lm-eval]' "
                          "(or pip install lm-eval)") from None
    from ..eval.harness import run_cli

    return run_cli(list(args.lm_eval_args))
