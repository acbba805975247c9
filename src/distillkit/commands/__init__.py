"""The `distillkit` subcommands: each module here defines `register(subparsers)` for one of them.

The CLI imports every module of this package (except `common`, the shared helpers, and private
`_` modules), so a new subcommand is one new file named after it (`teacher_keys.py` -> `teacher-keys`).
"""
