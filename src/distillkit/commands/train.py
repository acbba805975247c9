"""`distillkit train`: run a config to completion (method=ce unless the config names another)."""

from __future__ import annotations

import argparse

from distillkit.commands.common import add_run_args, print_result, split_config_arg


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `train` subcommand."""
    p = subparsers.add_parser("train", help="train a model (method=ce by default)")
    add_run_args(p)
    p.set_defaults(func=run_config)


def run_config(args: argparse.Namespace, default_method: str | None = None) -> int:
    """Load CONFIG plus overrides, run it and print the summary; shared by train and distill."""
    from distillkit.config import config_from_dict, read_config_data
    from distillkit.errors import UsageError
    from distillkit.runner import run

    config, overrides = split_config_arg(args)
    history = [" ".join([f"distillkit {args.command}", *([config] if config else []), *overrides])]
    data = read_config_data(config, overrides)
    if default_method is not None:
        data.setdefault("method", default_method)
    cfg = config_from_dict(data)
    if default_method is not None and cfg.method == "ce":
        raise UsageError(
            "`distillkit distill` needs a distillation method (`distillkit methods` lists them); use `train` for ce"
        )
    summary = run(cfg, history=history)
    print_result(summary, quiet=cfg.quiet)
    return 0
