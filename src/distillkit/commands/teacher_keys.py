"""`distillkit teacher-keys`: create and list API keys for `distillkit serve-teacher`."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `teacher-keys` subcommand (add / list)."""
    p = subparsers.add_parser("teacher-keys", help="create or list teacher-server API keys")
    sub = p.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    a = sub.add_parser("add", help="create a key; prints it once (only its hash is stored)")
    a.add_argument("name", help="a human name for the key (shown in listings)")
    a.add_argument("--keys", default="teacher_keys.json", help="keys file (created if missing)")
    a.add_argument("--budget", type=int, default=None, help="this key's image budget")
    a.set_defaults(func=cmd_add)
    ls = sub.add_parser("list", help="list key ids, names and budgets")
    ls.add_argument("--keys", default="teacher_keys.json")
    ls.set_defaults(func=cmd_list)


def cmd_add(args: argparse.Namespace) -> int:
    """Create a key and print the plaintext."""
    from distillkit.teachers.keys import KeyStore

    path = Path(args.keys)
    store = KeyStore.load(path) if path.is_file() else KeyStore(path)
    key = store.add(args.name, args.budget)
    store.save()
    print(key)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    """Print one line per key (never the key itself)."""
    from distillkit.teachers.keys import KeyStore

    for r in KeyStore.load(args.keys).records.values():
        budget = "unlimited (server --budget applies)" if r.budget is None else str(r.budget)
        print(f"{r.id}  {r.name:<20} budget={budget}")
    return 0
