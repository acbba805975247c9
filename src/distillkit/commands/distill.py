"""`distillkit distill`: distill a student from a teacher (method=kd unless the config names another)."""

from __future__ import annotations

import argparse
import functools

from distillkit.commands.common import add_run_args
from distillkit.commands.train import run_config


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `distill` subcommand."""
    p = subparsers.add_parser(
        "distill", help="distill a student from a teacher (method=kd by default)"
    )
    add_run_args(p)
    # like train, with method=kd unless one is given; ce is refused
    p.set_defaults(func=functools.partial(run_config, default_method="kd"))
