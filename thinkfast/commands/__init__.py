"""The CLI's subcommands, one module per group; shared argument types below (argparse reports a bad value in
one line and exits 2)."""

from __future__ import annotations

import argparse
import math


def _int_at_least(text: str, minimum: int, wording: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < minimum:
        raise argparse.ArgumentTypeError(f"{v} must be {wording}")
    return v


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _int_at_least(text, 1, "at least 1")


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0 (seeds: numpy refuses negative ones deep inside the work)."""
    return _int_at_least(text, 0, "0 or more")


def _finite_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(v):  # nan and inf parse as floats but mean nothing as seconds, rates or temperatures
        raise argparse.ArgumentTypeError(f"{text} is not a finite number")
    return v


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    v = _finite_float(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be a number above 0")
    return v


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0 (a sampling temperature: 0 is greedy)."""
    v = _finite_float(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"{text} must be 0 or more")
    return v


def no_hf_progress_bars() -> None:
    """Hugging Face's weight loading and saving bars would interleave with ours (and ignore --quiet)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
