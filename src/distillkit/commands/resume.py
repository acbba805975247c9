"""`distillkit resume`: continue a run exactly from its last checkpoint."""

from __future__ import annotations

import argparse

from distillkit.commands.common import format_json


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `resume` subcommand."""
    p = subparsers.add_parser("resume", help="continue a run exactly from its last checkpoint")
    p.add_argument("run_dir")
    p.add_argument("overrides", nargs="*", help="key=value, e.g. epochs=40 to train longer")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_resume)


def cmd_resume(args: argparse.Namespace) -> int:
    """resume: continue a run from checkpoints/last.pt and print its summary."""
    from distillkit.config import parse_overrides
    from distillkit.runner import resume

    overrides = parse_overrides(args.overrides)
    if args.quiet:
        overrides["quiet"] = True
    print(format_json(resume(args.run_dir, overrides)))
    return 0
