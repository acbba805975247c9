"""`distillkit ssl CONFIG [key=value...]`: an alias of `train` kept for existing scripts.

Self-supervised runs (method dino or mokd) are ordinary runs of the one Trainer:
`distillkit train configs/digits_mokd.yaml` trains them, `distillkit resume RUN_DIR` continues
them (`ssl --resume RUN_DIR` does the same) and `distillkit evaluate RUN_DIR` evaluates them.
"""

from __future__ import annotations

import argparse

from distillkit.commands.common import add_run_args, print_result, split_config_arg
from distillkit.commands.train import run_config
from distillkit.errors import UsageError


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `ssl` subcommand."""
    p = subparsers.add_parser(
        "ssl",
        help="alias of `train` (self-supervised configs: method dino or mokd)",
        description=(
            "Same as `distillkit train`: self-supervised methods (dino, mokd) are run by the "
            "one trainer. `--resume RUN_DIR` is `distillkit resume RUN_DIR`."
        ),
    )
    add_run_args(p)
    p.add_argument("--resume", metavar="RUN_DIR", help="same as `distillkit resume RUN_DIR`")
    p.set_defaults(func=cmd_ssl)


def cmd_ssl(args: argparse.Namespace) -> int:
    """Run a config like `train`, or continue a run like `resume`."""
    if not args.resume:
        return run_config(args)
    config, overrides = split_config_arg(args)
    if config is not None:
        raise UsageError(
            "--resume takes the run directory's own config; pass only key=value overrides"
        )
    from distillkit.config import parse_overrides
    from distillkit.runner import resume

    print_result(resume(args.resume, parse_overrides(overrides)), quiet=args.quiet)
    return 0
