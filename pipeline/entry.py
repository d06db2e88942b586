"""The ``ferstream`` console script.

It imports the command itself only inside its guard: loading torch, Ray or the models takes seconds,
and Ctrl-C at any point of that, not only once a command runs, must end the program with status 130
and one line rather than a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable

INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a program ended by Ctrl-C


def interruptible(command: Callable[[], int]) -> int:
    """``command()``'s status; :data:`INTERRUPTED` with one line on stderr when Ctrl-C stops it."""
    try:
        return command()
    except KeyboardInterrupt:
        print("ferstream: stopped (Ctrl-C)", file=sys.stderr)
        return INTERRUPTED


def main() -> int:
    def run() -> int:
        from pipeline.cli import main as cli_main

        return cli_main()

    return interruptible(run)
