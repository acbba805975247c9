"""`distillkit evaluate`: test accuracy of a run directory or checkpoint."""

from __future__ import annotations

import argparse

from distillkit.commands.common import format_json


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `evaluate` subcommand."""
    p = subparsers.add_parser("evaluate", help="test accuracy of a run directory or checkpoint")
    p.add_argument("target", help="run directory or .pt checkpoint")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args: argparse.Namespace) -> int:
    """evaluate: print the test accuracy and loss as JSON."""
    from distillkit.runner import evaluate_checkpoint

    print(format_json(evaluate_checkpoint(args.target, data_dir=args.data_dir, device=args.device)))
    return 0
