"""The `distillkit` command: each subcommand is a thin call into the modules below."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

EXAMPLES = """examples:
  distillkit train configs/digits_teacher.yaml
  distillkit distill configs/digits_kd.yaml teacher=runs/digits_teacher epochs=20
  torchrun --nproc-per-node 2 -m distillkit distill configs/digits_kd.yaml
  distillkit resume runs/digits_kd
  distillkit evaluate runs/digits_kd
  distillkit thin points.npy --size 256 --method kt --out idx.npy
"""


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="YAML config file (see configs/); omit for defaults")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. lr=0.1 subset.method=kt")
    p.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N | mps (overrides the config)")


def _split_config_arg(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not config.endswith((".yaml", ".yml")):
        overrides.insert(0, config)
        config = None
    if args.quiet:
        overrides.append("quiet=true")
    if args.device:
        overrides.append(f"device={args.device}")
    return config, overrides


def cmd_train(args: argparse.Namespace, default_method: str | None = None) -> int:
    """train / distill: run a config to completion."""
    import yaml

    from distillkit.config import load_config, parse_overrides
    from distillkit.runner import format_json, run

    config, overrides = _split_config_arg(args)
    history = [" ".join([f"distillkit {args.command}", *([config] if config else []), *overrides])]
    if default_method is not None:
        given = {}
        if config:
            from pathlib import Path

            if Path(config).is_file():
                given = yaml.safe_load(Path(config).read_text()) or {}
        if "method" not in given and "method" not in parse_overrides(overrides):
            overrides.insert(0, f"method={default_method}")
    cfg = load_config(config, overrides)
    if default_method is not None and cfg.method == "ce":
        raise ValueError(
            "`distillkit distill` needs a distillation method (`distillkit methods` lists them); use `train` for ce"
        )
    summary = run(cfg, history=history)
    if not cfg.quiet and os.environ.get("RANK", "0") == "0":
        print(format_json(summary))
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    """resume: continue a run from checkpoints/last.pt."""
    from distillkit.config import parse_overrides
    from distillkit.runner import format_json, resume

    overrides = parse_overrides(args.overrides)
    if args.quiet:
        overrides["quiet"] = True
    print(format_json(resume(args.run_dir, overrides)))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """evaluate: test accuracy of a run directory or checkpoint."""
    from distillkit.runner import evaluate_checkpoint, format_json

    print(format_json(evaluate_checkpoint(args.target, data_dir=args.data_dir, device=args.device)))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    """models: list the zoo with parameter counts."""
    from distillkit.models import build_model, count_parameters, list_models

    for name in list_models():
        n = count_parameters(build_model(name, in_channels=3, num_classes=100, image_size=32))
        print(f"{name:<14} {n / 1e6:8.2f}M params (3x32x32, 100 classes)")
    return 0


def cmd_datasets(args: argparse.Namespace) -> int:
    """datasets: list the registry."""
    from distillkit.data.datasets import list_datasets

    notes = {
        "digits": "scikit-learn's 8x8 digits, bundled (default)",
        "fashion-mnist": "IDX files: data_dir=DIR, $DISTILLKIT_DATA or apt-get install dataset-fashion-mnist",
        "cifar10": "python-pickle batches (cifar-10-batches-py) from data_dir",
        "cifar100": "python-pickle files (cifar-100-python) from data_dir",
        "imagefolder": "data_dir/{train,test}/<class>/*.png|jpg",
    }
    for name in list_datasets():
        print(f"{name:<14} {notes.get(name, '')}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """demo: teacher / student alone / KD student on digits."""
    from distillkit.demo import run_demo

    run_demo(args.out, quiet=not args.verbose, epochs=args.epochs)
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    """plot: accuracy curves of run directories."""
    from pathlib import Path

    from distillkit.report import plot_curves

    runs = {Path(r).name: r for r in args.run_dirs}
    print(plot_curves(runs, args.out, key=args.key))
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    """methods: list the registered methods."""
    from distillkit.methods import get_method, list_methods

    for name in list_methods():
        spec = get_method(name)
        teacher = "teacher" if spec.needs_teacher else "no teacher"
        print(f"{name:<12} {teacher:<11} {spec.description}")
    return 0


def _register_commands(sub: argparse._SubParsersAction) -> None:
    """Subcommands contributed by the modules of distillkit.commands."""
    import importlib
    import pkgutil

    import distillkit.commands as pkg

    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        module = importlib.import_module(f"distillkit.commands.{info.name}")
        module.register(sub)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="distillkit",
        description="Knowledge distillation and kernel thinning.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--verbose",
        dest="global_verbose",
        action="store_true",
        help="show the underlying detail of errors (also accepted after the command)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a model (method=ce by default)")
    _add_run_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("distill", help="distill a student from a teacher (method=kd by default)")
    _add_run_args(p)
    p.set_defaults(func=lambda a: cmd_train(a, default_method="kd"))

    p = sub.add_parser("resume", help="continue a run exactly from its last checkpoint")
    p.add_argument("run_dir")
    p.add_argument("overrides", nargs="*", help="key=value, e.g. epochs=40 to train longer")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_resume)

    p = sub.add_parser("evaluate", help="test accuracy of a run directory or checkpoint")
    p.add_argument("target", help="run directory or .pt checkpoint")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("models", help="list the model zoo")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("datasets", help="list the datasets")
    p.set_defaults(func=cmd_datasets)

    p = sub.add_parser("demo", help="teacher, student alone and KD student on digits")
    p.add_argument(
        "--out",
        default="runs/demo",
        help="output folder: new, empty, or an earlier demo output (only its parts are replaced)",
    )
    p.add_argument("--epochs", type=int, default=None, help="override every run's epochs")
    p.add_argument("--verbose", action="store_true", help="per-epoch lines")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("plot", help="plot test accuracy curves of run directories")
    p.add_argument("run_dirs", nargs="+")
    p.add_argument("--out", default="curves.png")
    p.add_argument("--key", default="test_acc")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("methods", help="list the distillation methods")
    p.set_defaults(func=cmd_methods)

    _register_commands(sub)
    return parser


def _error_detail(exc: BaseException) -> str | None:
    """The underlying explanation of an error, shown only under --verbose."""
    detail = getattr(exc, "detail", None)
    if detail:
        return str(detail)
    cause = exc.__cause__
    return f"{type(cause).__name__}: {cause}" if cause is not None else None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; user errors print one clear line and exit with status 2, Ctrl-C 130."""
    from distillkit.config import ConfigError
    from distillkit.engine.checkpoint import CheckpointError
    from distillkit.runner import RunInterrupted

    parser = build_parser()
    # key=value overrides may come after flags (`train cfg.yaml --quiet lr=0.1`), which plain
    # argparse would reject once the positional list has been consumed
    args, extra = parser.parse_known_args(argv)
    # `--verbose` is global but also accepted after the command (demo has its own, which also counts)
    verbose = args.global_verbose or "--verbose" in extra or getattr(args, "verbose", False) is True
    extra = [e for e in extra if e != "--verbose"]
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = list(args.overrides) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    main_rank = os.environ.get("RANK", "0") == "0"
    try:
        return args.func(args)
    except (
        ConfigError,
        CheckpointError,
        FileNotFoundError,
        FileExistsError,
        ValueError,
        FloatingPointError,
    ) as exc:
        detail = _error_detail(exc)
        hint = " (--verbose for details)" if getattr(exc, "detail", None) and not verbose else ""
        print(f"distillkit {args.command}: error: {exc}{hint}", file=sys.stderr)
        if verbose and detail:
            print(detail, file=sys.stderr)
        return 2
    except RunInterrupted as exc:
        if main_rank:
            print(f"distillkit {args.command}: {exc}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        if main_rank:
            print(f"distillkit {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
