"""What the command-line tools share: a parser whose mistakes are one line, checked number
arguments, and one way to turn an error into `error: <one line>` and exit code 2."""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable


class Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line on stderr (no usage block) and exit code 2."""

    def error(self, message: str):
        print(f"error: {self.prog}: {message}", file=sys.stderr)
        sys.exit(2)


def number(kind: type = int, low: float = -math.inf, high: float = math.inf, low_open: bool = False):
    """An argparse type: a number of `kind` in [low, high], or (low, high] when `low_open`."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if value < low or (low_open and value == low) or value > high or math.isnan(value):
            opening = "(" if low_open else "["
            wanted = f"> {low}" if low_open else f">= {low}"
            if high != math.inf:
                wanted = f"in {opening}{low}, {high}]"
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text}")
        return value

    return parse


def require_model_dir(path: str) -> None:
    """Refuses, before anything loads, a model directory a tool cannot load: missing, without
    config.json (or of an unsupported architecture), or without tokenizer files."""
    from jaxrlhf.models import DecoderConfig
    from jaxrlhf.models.hf_io import has_tokenizer, read_hf_config

    DecoderConfig.from_hf(read_hf_config(path))
    if not has_tokenizer(path):
        raise FileNotFoundError(f"{path}: no tokenizer files (tokenizer.json, tokenizer_config.json, ...)")


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


def add_engine_flags(parser: argparse.ArgumentParser) -> None:
    """--engine and --slots: static generation, or refilled decode slots (the same answers)."""
    parser.add_argument(
        "--engine", default="static", choices=["static", "refill"], help="refill: --slots rows at a time"
    )
    parser.add_argument("--slots", type=number(int, low=0), default=0, help="refill: decode slots (0: one per prompt)")


def engine_settings(args) -> dict:
    return dict(engine=args.engine, slots=args.slots)
