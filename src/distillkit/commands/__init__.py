"""Extra `distillkit` subcommands: each module here defines `register(subparsers)`.

The CLI imports every module of this package, so a new subcommand is one new file.
"""
