"""The options of ``gradwatch demo`` and their defaults.

Torch-free on purpose: ``gradwatch --help`` and ``gradwatch demo --help`` build the
argument parser from this module and answer without importing torch.
"""

from __future__ import annotations

import argparse

DEFAULT_STEPS = 200
DEFAULT_SEED = 0
#: The watcher's default: a monitored step every 15, a finding after 3 of them.
MIN_STEPS_FOR_FINDINGS = 31
#: The demo's networks in the order they train (``gradwatch.demo.nets.NETS`` builds them).
NET_NAMES = (
    "sigmoid",
    "relu-default-init",
    "relu-kaiming",
    "sigmoid-residual",
    "relu-high-lr",
    "leaky-high-lr",
)


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``gradwatch demo``."""
    parser.add_argument(
        "--steps",
        type=positive_int,
        default=DEFAULT_STEPS,
        help=f"training steps per network (default {DEFAULT_STEPS}; findings need "
        f"at least {MIN_STEPS_FOR_FINDINGS})",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=DEFAULT_SEED,
        help=f"initialisation and batch-order seed (default {DEFAULT_SEED})",
    )
    parser.add_argument(
        "--only",
        action="append",
        metavar="NAME",
        help=f"train only these networks (repeat, or a comma list): {', '.join(NET_NAMES)}",
    )
    parser.add_argument(
        "--png",
        metavar="FILE",
        help="write a gradient-flow figure (gradient RMS by depth, one curve per network; "
        "needs the 'plot' extra: matplotlib); checked before any training",
    )
    parser.add_argument(
        "--record",
        metavar="DIR",
        help="write one JSONL record per network to DIR (NAME.jsonl, replaced if present); "
        "read one back with: gradwatch report DIR/NAME.jsonl",
    )
