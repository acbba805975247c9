"""`distillkit export`: a run's network, normalisation included, as ONNX or TorchScript."""

from __future__ import annotations

import argparse


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
    p.add_argument("--data-dir", help="dataset location for the parity check")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    """Export, check parity, print the report; an ExportError (the graph disagrees) exits 1."""
    from distillkit.deploy.export import export_run, format_export

    report = export_run(
        args.run_dir,
        args.fmt,
        args.out,
        which=args.checkpoint,
        force=args.force,
        data_dir=args.data_dir,
    )
    print(format_export(report))
    return 0
