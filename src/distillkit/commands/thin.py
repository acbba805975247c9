"""`distillkit thin`: kernel thinning of a point set from .npy or .csv."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `thin` subcommand."""
    from distillkit.thinning.command import add_arguments, main

    p = subparsers.add_parser("thin", help="kernel thinning: pick a coreset of a point set")
    add_arguments(p)
    p.set_defaults(func=main)
