"""`distillkit profile`: size, compute, CPU speed and accuracy of runs; KD runs against their teacher."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `profile` subcommand."""
    p = subparsers.add_parser(
        "profile",
        help="parameters, ONNX size, MACs, CPU latency/throughput and accuracy of runs",
        description=(
            "Profile each RUN_DIR's network (exported to a temporary ONNX file): parameters, "
            "ONNX size, multiply-accumulates per image (FLOPs / 2 from torch's FlopCounterMode), "
            "CPU latency at batch 1 and throughput at batch 64 (medians after warm-up), test "
            "accuracy. A KD run is also compared with its teacher."
        ),
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for timing (default 1)")
    p.add_argument("--repeats", type=int, default=30, help="timed runs per measurement (median)")
    p.add_argument("--warmup", type=int, default=5, help="untimed runs before timing")
    p.add_argument(
        "--runtime", default="onnxruntime", help="onnxruntime (default, the exported graph) | torch"
    )
    p.add_argument("--checkpoint", default="best", help="best (default) | last")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--force", action="store_true", help="overwrite an existing --json file")
    p.add_argument("--data-dir", help="dataset location when evaluating accuracy")
    p.set_defaults(func=cmd_profile)


def cmd_profile(args: argparse.Namespace) -> int:
    """Profile the runs, print the table and optionally write JSON."""
    from pathlib import Path

    from distillkit.deploy.profile import ProfileSettings, format_profile, profile_runs, write_json

    settings = ProfileSettings(
        threads=args.threads,
        repeats=args.repeats,
        warmup=args.warmup,
        runtime=args.runtime,
        which=args.checkpoint,
        data_dir=args.data_dir,
    )
    settings.validate()
    if args.json and Path(args.json).exists() and not args.force:
        # checked before the timings, not after them
        raise FileExistsError(f"{args.json} already exists; pass --force to overwrite it")
    result = profile_runs(args.run_dirs, settings)  # an ExportError exits 1 through the CLI
    print(format_profile(result))
    if args.json:
        print(f"wrote {write_json(args.json, result, force=args.force)}")
    return 0
