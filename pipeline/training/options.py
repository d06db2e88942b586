"""Command-line options shared by the model commands (``ferstream train``, ``eval``, ``automl`` ...)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

__all__ = ["add_compute_arguments", "apply_threads", "int_at_least"]


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``minimum``, refused with the value named."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} must be at least {minimum}")
        return value

    return parse


def add_compute_arguments(parser: argparse.ArgumentParser) -> None:
    """``--threads`` and ``--no-cache``, shared by the model commands that read a labelled split."""
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = all cores)")
    parser.add_argument("--no-cache", action="store_true", help="do not use the decoded-array cache")


def apply_threads(args: argparse.Namespace) -> None:
    """``--threads``: torch's intra-op threads; 0 leaves torch's default (all cores)."""
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
