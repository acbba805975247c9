"""`distillkit demo`: teacher, student alone and KD student on the bundled digits."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `demo` subcommand."""
    p = subparsers.add_parser("demo", help="teacher, student alone and KD student on digits")
    p.add_argument(
        "--out",
        default="runs/demo",
        help="output folder: new, empty, or an earlier demo output (only its parts are replaced)",
    )
    p.add_argument("--epochs", type=int, help="override every run's epochs")
    p.add_argument("--verbose", action="store_true", help="per-epoch lines")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    """demo: run the three trainings and write the summary and curves."""
    from distillkit.demo import run_demo

    run_demo(args.out, quiet=not args.verbose, epochs=args.epochs)
    return 0
