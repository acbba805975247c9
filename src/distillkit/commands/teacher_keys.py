"""`distillkit teacher-keys`: create, list and revoke API keys for `distillkit serve-teacher`."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `teacher-keys` subcommand (add / list / revoke)."""
    p = subparsers.add_parser("teacher-keys", help="create, list or revoke teacher-server API keys")
    sub = p.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    a = sub.add_parser("add", help="create a key; prints it once (only its hash is stored)")
    a.add_argument("name", help="a human name for the key (shown in listings)")
    a.add_argument("--keys", default="teacher_keys.json", help="keys file (created if missing)")
    a.add_argument("--budget", type=int, help="this key's image budget")
    a.set_defaults(func=cmd_add)
    ls = sub.add_parser("list", help="list key ids, names and budgets")
    ls.add_argument("--keys", default="teacher_keys.json")
    ls.set_defaults(func=cmd_list)
    rv = sub.add_parser(
        "revoke",
        help="revoke a key; a running server refuses it from its next request (no restart)",
    )
    rv.add_argument("key", metavar="KEY_ID|NAME", help="the key's id (or its name when unique)")
    rv.add_argument("--keys", default="teacher_keys.json")
    rv.set_defaults(func=cmd_revoke)


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
        revoked = f"  revoked {r.revoked}" if r.revoked else ""
        print(f"{r.id}  {r.name:<20} budget={budget}{revoked}")
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    """Mark a key revoked in the keys file (kept for the record, never valid again)."""
    from distillkit.teachers.keys import KeyStore

    store = KeyStore.load(args.keys)
    record, changed = store.revoke(args.key)
    if not changed:
        print(f"key {record.id} ({record.name}) was already revoked on {record.revoked}")
        return 0
    store.save()
    print(
        f"revoked key {record.id} ({record.name}); running servers refuse it from the next request"
    )
    return 0
