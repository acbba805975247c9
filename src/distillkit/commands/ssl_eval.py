"""`distillkit ssl-eval TARGET`: k-NN and linear-probe accuracy of an SSL run's EMA teachers."""

from __future__ import annotations

import argparse

from distillkit.commands.common import format_json


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `ssl-eval` subcommand."""
    p = subparsers.add_parser(
        "ssl-eval", help="k-NN and linear-probe accuracy of an SSL run directory or checkpoint"
    )
    p.add_argument("target", help="SSL run directory or .pt checkpoint")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--which", default="best", choices=("best", "last"))
    p.set_defaults(func=cmd_ssl_eval)


def cmd_ssl_eval(args: argparse.Namespace) -> int:
    """Evaluate and print JSON."""
    from distillkit.ssl_train import evaluate_ssl_checkpoint

    result = evaluate_ssl_checkpoint(args.target, args.data_dir, args.device, args.which)
    print(format_json(result))
    return 0
