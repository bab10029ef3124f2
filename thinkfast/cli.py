"""`thinkfast <command>`: every command is a thin shell over a library function.

Each group of commands lives in `thinkfast/commands/<group>.py` with `add_parsers(subparsers)`: argument
parsing and glue only (the one place where engine and eval meet); the work is in the library. Bad input raises ThinkfastError: one line, exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import ThinkfastError

# module -> the commands it defines, in the order `--help` lists them
COMMAND_MODULES = {
    "thinkfast.commands.demo": ["demo", "train-teacher"],
    "thinkfast.commands.distill": ["distill", "sft"],
    "thinkfast.commands.sample": ["sample", "bench"],
    "thinkfast.commands.evaluate": ["score", "train-rm", "report"],
}


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="thinkfast",
        description="Distil Transformer reasoners into fast Mamba-2 students and measure inference scaling under a fixed time budget.",
    )
    parser.add_argument("--version", action="version", version=f"thinkfast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name == module_name:  # that area is not built yet
                continue
            raise
        module.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        result = args.func(args)
    except ThinkfastError as e:
        print(f"thinkfast {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        how = "with --resume" if getattr(args, "resume", None) is False else "as it is"  # commands with --resume want it
        print(f"thinkfast {args.command}: interrupted; re-run the same command {how} to continue", file=sys.stderr)
        return 130
    except OSError as e:  # a path that cannot be read or written, met mid-run (what was written before stays)
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(f"thinkfast {args.command}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
