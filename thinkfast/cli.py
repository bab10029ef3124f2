"""`thinkfast <command>`: every command is a thin shell over a library function.

Each group of commands lives in `thinkfast/commands/<group>.py` with `add_parsers(subparsers)`: argument
parsing and glue only (the one place where engine and eval meet); the work is in the library. Bad input raises ThinkfastError: one line, exit status 2.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import re
import sys
from pathlib import Path

from .errors import ConfigError, ThinkfastError, command_line
from .utils import free_bytes, write_failure

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)

# module -> the commands it defines, in the order `--help` lists them
COMMAND_MODULES = {
    "thinkfast.commands.demo": ["demo", "train-teacher"],
    "thinkfast.commands.distill": ["distill", "sft"],
    "thinkfast.commands.convert": ["convert"],
    "thinkfast.commands.sample": ["sample", "bench"],
    "thinkfast.commands.evaluate": ["score", "train-rm", "report"],
    "thinkfast.commands.harness": ["lm-eval"],
    "thinkfast.commands.env": ["env"],
}


class OneLineErrors(argparse.ArgumentParser):
    """argparse's refusals in one line, as every other refusal (argparse prints its whole usage block first);
    subcommand parsers are made of the same class."""

    argv: list[str] = []  # the command line being parsed, for hints that quote it

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}{self._dash_value_hint(message)} (see {self.prog} --help)\n")

    def _dash_value_hint(self, message: str) -> str:
        """argparse takes a value such as `-1,2` for an option and then says the option got no value."""
        missing = re.fullmatch(r"argument (--[\w-]+)(?:/[^:]*)?: expected one argument", message)
        if not missing:
            return ""
        option = missing.group(1)
        given = [self.argv[i + 1] for i, a in enumerate(self.argv[:-1]) if a == option]
        if given and given[-1].startswith("-") and not given[-1].startswith("--"):
            return f"; a value that starts with '-' goes after '=': {option}={given[-1]}"
        return ""


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = OneLineErrors(
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
    if sys.platform == "win32":  # new sessions (the demo's Ctrl-C), flock, rlimits, select on pipes: POSIX-only
        print("thinkfast: runs on Linux and macOS, not on native Windows; use WSL2 (Windows Subsystem for Linux)",
              file=sys.stderr)
        return 2
    argv = sys.argv[1:] if argv is None else list(argv)
    OneLineErrors.argv = argv
    try:  # the command modules import the engine and the data sources first
        parser = build_parser()
        if argv[:1] == ["lm-eval"]:  # every argument after it is lm-eval's, options included
            args = argparse.Namespace(command="lm-eval", lm_eval_args=argv[1:],
                                      func=importlib.import_module("thinkfast.commands.harness").cmd_lm_eval)
        else:
            args = parser.parse_args(argv)
    except KeyboardInterrupt:
        print("thinkfast: interrupted while starting; nothing was done", file=sys.stderr)
        return 130
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    logger = logging.getLogger("thinkfast")
    level = logger.level
    if int(os.environ.get("RANK", "0") or 0) > 0:  # under torchrun every rank would repeat rank 0's warnings
        logger.setLevel(logging.ERROR)
    try:
        return _run_command(args)
    finally:
        logger.setLevel(level)  # main() called in a process that goes on (a notebook, tests) leaves logging as it was


# commands whose processes share work under torchrun; the others would each run the whole job, racing for its output
TORCHRUN_COMMANDS = ("sample", "distill", "sft", "train-teacher", "lm-eval", "env")


def _refuse_torchrun(command: str) -> None:
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 and command not in TORCHRUN_COMMANDS:
        raise ConfigError(f"`thinkfast {command}` runs in one process: launch it without torchrun (the commands that "
                          f"share work across processes: {', '.join(c for c in TORCHRUN_COMMANDS if c != 'env')})")


def _run_command(args) -> int:
    try:
        with command_line():
            _refuse_torchrun(args.command)
            result = args.func(args)
    except ThinkfastError as e:
        print(f"thinkfast {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"thinkfast {args.command}: interrupted; re-run the same command {_how_to_continue(args)} to continue",
              file=sys.stderr)
        return 130
    except BrokenPipeError:  # `thinkfast env | head`: the reader has gone; nothing to say to it
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the interpreter's final flush is quiet
        return 1
    except Exception as e:  # a path that cannot be read or written, met mid-run (what was written before stays)
        failure = write_failure(e)
        if failure is None:  # a bug, here or in a library: its traceback, and what a report needs
            print(f"thinkfast {args.command}: unexpected {type(e).__name__}, a bug: please report it with the "
                  "traceback below and the output of `thinkfast env`", file=sys.stderr)
            raise
        print(f"thinkfast {args.command}: error: {os_error_line(failure, args)}", file=sys.stderr)
        return 2
    return int(result or 0)


def _how_to_continue(args) -> str:
    """Commands with --resume want it, once their run folder holds a run (interrupted while loading, it holds none)."""
    out = getattr(args, "out", None)
    started = out is not None and (Path(out) / "run.json").is_file()
    return "with --resume" if getattr(args, "resume", None) is False and started else "as it is"


def os_error_line(e: OSError, args) -> str:
    """What failed, where, and what to do. A full disk names the output and its free space: the run keeps what it
    finished (checkpoints and sample files are written whole or repaired on resume), so freeing space and
    re-running continues it."""
    # shutil's copies name the source first and the destination second; a full disk is about the destination
    writing = e.errno in DISK_FULL + (errno.EFBIG, errno.EROFS)
    where = e.filename2 if writing and e.filename2 else e.filename
    if writing and not where:  # a bare write() names no file; the output is where this command writes
        where = getattr(args, "out", None)
    prefix = f"{where}: " if where else ""
    if e.errno in DISK_FULL:
        free = f" ({free_bytes(where) / 2**20:.0f} MiB free)" if where else ""
        out = " or choose another --out" if getattr(args, "out", None) else ""
        return (f"{prefix}no space left on its disk{free}; free some space{out}, then re-run the same command "
                f"{_how_to_continue(args)} to continue from what was saved")
    if e.errno == errno.EFBIG:
        return (f"{prefix}file too large for the file system or for this shell's file-size limit (`ulimit -f`); "
                f"raise the limit or choose another --out, then re-run the same command {_how_to_continue(args)}")
    if e.errno == errno.EIO:
        return (f"{prefix}{e.strerror}; check the disk (and its free space), then re-run the same command "
                f"{_how_to_continue(args)} to continue from what was saved")
    if e.errno == errno.EROFS:
        return f"{prefix}{e.strerror}; this command writes there (or beside it): work on a copy in a writable folder"
    if e.errno in (errno.EACCES, errno.EPERM):
        return f"{prefix}{e.strerror}; check its permissions (and its folder's), or work on a copy you own"
    return f"{prefix}{e.strerror or e}"


if __name__ == "__main__":
    sys.exit(main())
