"""Helpers shared by the subcommands: run arguments, override splitting and output."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any


def add_run_args(p: argparse.ArgumentParser) -> None:
    """CONFIG, key=value overrides, --quiet and --device: the arguments of every run command."""
    p.add_argument("config", nargs="?", help="YAML config file (see configs/); omit for defaults")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. lr=0.1 subset.method=kt")
    p.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N | mps (overrides the config)")


def split_config_arg(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """(config file or None, overrides): a first `key=value` is an override, flags become overrides."""
    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not config.endswith((".yaml", ".yml")):
        overrides.insert(0, config)
        config = None
    if args.quiet:
        overrides.append("quiet=true")
    if args.device:
        overrides.append(f"device={args.device}")
    return config, overrides


def is_main_rank() -> bool:
    """True outside torchrun and on its rank 0: only that process prints results."""
    return os.environ.get("RANK", "0") == "0"


def format_json(obj: Any) -> str:
    """Indented JSON of a result; numbers and paths that JSON lacks are written as text."""
    return json.dumps(obj, indent=2, default=str)


def print_result(result: Any, *, quiet: bool = False) -> None:
    """Print a command's JSON result, unless quiet or not the main rank."""
    if not quiet and is_main_rank():
        print(format_json(result))
