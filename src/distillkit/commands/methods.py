"""`distillkit methods`: the registered training and distillation methods."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `methods` subcommand."""
    p = subparsers.add_parser("methods", help="list the distillation methods")
    p.set_defaults(func=cmd_methods)


def cmd_methods(args: argparse.Namespace) -> int:
    """methods: name, whether it needs a teacher, and a description."""
    from distillkit.methods import get_method, list_methods

    for name in list_methods():
        spec = get_method(name)
        teacher = "teacher" if spec.needs_teacher else "no teacher"
        print(f"{name:<12} {teacher:<11} {spec.description}")
    return 0
