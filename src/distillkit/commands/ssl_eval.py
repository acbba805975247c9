"""`distillkit ssl-eval TARGET`: an alias of `evaluate`, kept for existing scripts.

A self-supervised run's checkpoint holds model a's EMA teacher with its linear probe as the
classifier, so `evaluate` gives the probe's test accuracy like any classifier's.
"""

from __future__ import annotations

import argparse
from typing import Any


class _AsAlias:
    """Lends `evaluate`'s register() a subparsers object that names the parser `ssl-eval`."""

    def __init__(self, subparsers: argparse._SubParsersAction):
        self.subparsers = subparsers

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        kwargs["help"] = f"alias of `{name}`"
        return self.subparsers.add_parser("ssl-eval", **kwargs)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `ssl-eval` subcommand: the arguments and function of `evaluate`."""
    from distillkit.commands.evaluate import register as register_evaluate

    register_evaluate(_AsAlias(subparsers))  # type: ignore[arg-type]
