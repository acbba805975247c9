"""`distillkit models`: the model zoo with parameter counts."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `models` subcommand."""
    p = subparsers.add_parser("models", help="list the model zoo")
    p.set_defaults(func=cmd_models)


def cmd_models(args: argparse.Namespace) -> int:
    """models: one line per model, its size at 3x32x32 with 100 classes."""
    from distillkit.models import build_model, count_parameters, list_models

    for name in list_models():
        n = count_parameters(build_model(name, in_channels=3, num_classes=100, image_size=32))
        print(f"{name:<14} {n / 1e6:8.2f}M params (3x32x32, 100 classes)")
    return 0
