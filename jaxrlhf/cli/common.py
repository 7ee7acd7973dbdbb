"""What the command-line tools share: a parser whose mistakes are one line, checked number
arguments, and one way to turn an error into `error: <one line>` and exit code 2."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable


class Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line on stderr (no usage block) and exit code 2."""

    def error(self, message: str):
        print(f"error: {self.prog}: {message}", file=sys.stderr)
        sys.exit(2)


def at_least(minimum: float, kind: type = int) -> Callable[[str], float]:
    """An argparse type: a number of `kind` that is >= minimum."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {text}")
        return value

    return parse


def run_or_exit_2(body: Callable[[], int]) -> int:
    """Runs a tool's body; a missing file or a bad value is `error: <one line>` and exit code 2
    (the traceback with JAXRLHF_DEBUG=1)."""
    try:
        return body()
    except (FileNotFoundError, ValueError, OSError) as error:
        if os.environ.get("JAXRLHF_DEBUG"):
            raise
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
