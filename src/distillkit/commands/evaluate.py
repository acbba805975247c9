"""`distillkit evaluate`: test accuracy of a run directory or checkpoint."""

from __future__ import annotations

import argparse

from distillkit.commands.common import format_json


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `evaluate` subcommand."""
    p = subparsers.add_parser("evaluate", help="test accuracy of a run directory or checkpoint")
    p.add_argument("target", help="run directory or .pt checkpoint")
    p.add_argument("--data-dir", help="where the dataset's files are")
    p.add_argument(
        "--dataset",
        help="evaluate on this dataset instead of the recorded one (needed for runs trained on "
        "data given as Python objects)",
    )
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args: argparse.Namespace) -> int:
    """evaluate: print the test accuracy and loss as JSON."""
    from distillkit.runner import evaluate_checkpoint

    result = evaluate_checkpoint(
        args.target, data_dir=args.data_dir, device=args.device, dataset=args.dataset
    )
    print(format_json(result))
    return 0
