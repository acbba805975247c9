"""`distillkit export`: a run's network, normalisation included, as ONNX or TorchScript."""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `export` subcommand."""
    p = subparsers.add_parser(
        "export",
        help="export a run's network (normalisation included) to ONNX or TorchScript",
        description=(
            "Export the trained network of RUN_DIR (the student only: no teacher, adapters or "
            "connectors) in eval mode. The graph takes float32 NCHW pixels in [0, 1] with a "
            "dynamic batch dimension and includes the dataset normalisation. A parity check "
            "against PyTorch on the test split follows; the file is written only if it passes."
        ),
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="run directory (or a .pt checkpoint file)")
    p.add_argument(
        "--format",
        dest="fmt",
        default="onnx",
        metavar="FORMAT",
        help="onnx (default) | torchscript",
    )
    p.add_argument("--out", required=True, help="file to write (refused if it exists)")
    p.add_argument(
        "--checkpoint", default="best", help="best (default) | last: which checkpoint of RUN_DIR"
    )
    p.add_argument("--force", action="store_true", help="overwrite an existing --out file")
    p.add_argument("--data-dir", default=None, help="dataset location for the parity check")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    """Export, check parity, print the report; exit 1 when the exported graph disagrees."""
    from distillkit.deploy.export import ExportError, export_run, format_export

    try:
        report = export_run(
            args.run_dir,
            args.fmt,
            args.out,
            which=args.checkpoint,
            force=args.force,
            data_dir=args.data_dir,
        )
    except ExportError as exc:
        print(f"distillkit export: error: {exc}", file=sys.stderr)
        return 1
    print(format_export(report))
    return 0
