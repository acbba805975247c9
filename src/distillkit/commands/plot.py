"""`distillkit plot`: test accuracy curves of run directories."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `plot` subcommand."""
    p = subparsers.add_parser("plot", help="plot test accuracy curves of run directories")
    p.add_argument("run_dirs", nargs="+")
    p.add_argument("--out", default="curves.png")
    p.add_argument("--key", default="test_acc")
    p.set_defaults(func=cmd_plot)


def cmd_plot(args: argparse.Namespace) -> int:
    """plot: one curve per run directory, named by the directory; prints the PNG path."""
    from pathlib import Path

    from distillkit.report import plot_curves

    runs = {Path(r).name: r for r in args.run_dirs}
    print(plot_curves(runs, args.out, key=args.key))
    return 0
