"""`distillkit ssl CONFIG [key=value...]`: self-supervised training, DINO alone or MOKD for a pair.

`distillkit ssl --resume RUN_DIR [epochs=N]` continues a run exactly from checkpoints/last.pt.
Works under torchrun (`torchrun --nproc-per-node 2 -m distillkit ssl configs/digits_mokd.yaml`).
"""

from __future__ import annotations

import argparse

from distillkit.commands.common import add_run_args, print_result, split_config_arg
from distillkit.errors import UsageError


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `ssl` subcommand."""
    p = subparsers.add_parser(
        "ssl",
        help="self-supervised training without labels: DINO (one model) or MOKD (two models)",
        description=(
            "Train self-supervised representations (method=dino for model `a`, method=mokd for "
            "models `a` and `b`). Labels are used only to evaluate the EMA teachers (k-NN and "
            "linear probe). Overrides address models as a.lr=0.1 b.name=vit_tiny."
        ),
    )
    add_run_args(p)
    p.add_argument(
        "--resume", metavar="RUN_DIR", help="continue an SSL run from its last checkpoint"
    )
    p.set_defaults(func=cmd_ssl)


def cmd_ssl(args: argparse.Namespace) -> int:
    """Run (or resume) an SSL config and print its summary."""
    from pathlib import Path

    from distillkit.config import parse_overrides
    from distillkit.runner import RunInterrupted, interrupted_message
    from distillkit.ssl_train import load_ssl_config, resume_ssl, run_ssl

    config, overrides = split_config_arg(args)
    if args.resume:
        if config is not None:
            raise UsageError(
                "--resume takes the run directory's own config; pass only key=value overrides"
            )
        run_dir = Path(args.resume)
        quiet = args.quiet
    else:
        cfg = load_ssl_config(config, overrides)
        run_dir = cfg.run_dir()
        quiet = cfg.quiet
    try:
        if args.resume:
            summary = resume_ssl(args.resume, parse_overrides(overrides))
        else:
            summary = run_ssl(cfg)
    except KeyboardInterrupt:
        raise RunInterrupted(interrupted_message(run_dir)) from None
    print_result(summary, quiet=quiet)
    return 0
