"""The `distillkit` command: assembles the subcommands of distillkit.commands and reports errors.

Each module of distillkit.commands defines `register(subparsers)` and adds one subcommand, so a
new subcommand is one new file. This module only builds the parser from them and turns expected
failures into one line on stderr with an exit status.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from collections.abc import Sequence

import distillkit.commands as commands_pkg
from distillkit.commands.common import is_main_rank
from distillkit.errors import UserError

EXAMPLES = """examples:
  distillkit train configs/digits_teacher.yaml
  distillkit distill configs/digits_kd.yaml teacher=runs/digits_teacher epochs=20
  torchrun --nproc-per-node 2 -m distillkit distill configs/digits_kd.yaml
  distillkit resume runs/digits_kd
  distillkit evaluate runs/digits_kd
  distillkit thin points.npy --size 256 --method kt --out idx.npy
"""

# listed first in --help, in this order; every other subcommand follows alphabetically
CORE = ("train", "distill", "resume", "evaluate", "models", "datasets", "demo", "plot", "methods")
# modules of distillkit.commands that hold shared code, not a subcommand
HELPERS = ("common",)

EXIT_USAGE = 2  # bad input: the user can fix the command, config or file named
EXIT_FAILURE = 1  # a valid command failed outside the user's input (teacher server, OS, export)
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report Ctrl-C

# expected errors that mean "fix your input"; ConfigError, UsageError and CheckpointError are
# ValueErrors, DatasetNotFoundError a FileNotFoundError, a diverged loss a FloatingPointError
USAGE_ERRORS = (UserError, FileNotFoundError, FileExistsError, ValueError, FloatingPointError)


def command_modules() -> list[str]:
    """Names of the subcommand modules of distillkit.commands, in --help order."""
    names = [
        info.name
        for info in pkgutil.iter_modules(commands_pkg.__path__)
        if info.name not in HELPERS and not info.name.startswith("_")
    ]
    return [n for n in CORE if n in names] + sorted(n for n in names if n not in CORE)


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
    for name in command_modules():
        importlib.import_module(f"{commands_pkg.__name__}.{name}").register(sub)
    return parser


def _loaded_class(module: str, name: str) -> type[BaseException] | None:
    """An exception class, only if its module was imported.

    An exception of a class whose module never ran cannot have been raised, so the error path
    never imports torch (or anything else heavy) just to compare classes.
    """
    return getattr(sys.modules.get(module), name, None)


def exit_code(exc: BaseException) -> int | None:
    """The exit status of an expected error, or None for a bug (shown with its traceback)."""
    if isinstance(exc, USAGE_ERRORS):
        return EXIT_USAGE
    # expected errors of a valid command that failed: a teacher server, the OS or an export
    failures = [
        _loaded_class("distillkit.teachers.remote", "RemoteTeacherError"),
        _loaded_class("distillkit.teachers.base", "BudgetExceededError"),
        # the model could not be exported, or its exported graph disagrees with it
        _loaded_class("distillkit.deploy.export", "ExportError"),
    ]
    # a 401 from a teacher server, or a file the user may not read or write
    if isinstance(exc, (PermissionError, *[c for c in failures if c is not None])):
        return EXIT_FAILURE
    return None


def _report(command: str, exc: BaseException, verbose: bool) -> None:
    """One line naming the problem; its detail (or else its cause) follows only under --verbose."""
    detail = getattr(exc, "detail", None)
    hint = " (--verbose for details)" if detail and not verbose else ""
    print(f"distillkit {command}: error: {exc}{hint}", file=sys.stderr)
    cause = exc.__cause__
    if verbose and (detail or cause is not None):
        print(detail or f"{type(cause).__name__}: {cause}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: bad input exits 2 and a failed teacher server 1, each with one line; Ctrl-C 130."""
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
    try:
        return args.func(args)
    except KeyboardInterrupt:
        if is_main_rank():
            print(f"distillkit {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        interrupted = _loaded_class("distillkit.runner", "RunInterrupted")
        if interrupted is not None and isinstance(exc, interrupted):
            # the message says where the last checkpoint is and how to resume
            if is_main_rank():
                print(f"distillkit {args.command}: {exc}", file=sys.stderr)
            return EXIT_INTERRUPTED
        code = exit_code(exc)
        if code is None:
            raise
        _report(args.command, exc, verbose)
        return code


if __name__ == "__main__":
    sys.exit(main())
