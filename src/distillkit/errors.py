"""Errors distillkit raises for problems the user can fix; the bottom layer (imports nothing here).

The CLI prints any `UserError` as one line and exits with status 2. Each class also derives from
the built-in exception callers already catch (ValueError, FileNotFoundError), so code written
against those keeps working.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with what the user gave or asked for; the message is one line naming it."""

    def __init__(self, message: str = "", detail: str | None = None):
        super().__init__(message)
        # the underlying library's explanation: shown by the CLI only under --verbose
        self.detail = detail


class ConfigError(UserError, ValueError):
    """A configuration key or value that cannot be used."""


class UsageError(UserError, ValueError):
    """Command-line arguments that do not fit together or are out of range."""


class InputNotFoundError(UserError, FileNotFoundError):
    """A file, run directory or dataset the user named was not found."""


class InvalidInputError(UserError, ValueError):
    """A file the user named exists but cannot be used (corrupt, wrong format or version)."""
