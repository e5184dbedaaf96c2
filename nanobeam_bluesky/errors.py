"""The package's errors: what a user can fix gets a :class:`NanobeamError`, with one line that names
the problem and the fix. The command line prints that line and no traceback (``--debug`` shows it).

Every error class of the package derives from :class:`NanobeamError` and from the builtin it has
always been (``ValueError`` for bad input, ``OSError`` for unreadable storage), so code that
catches those keeps working.
"""

from __future__ import annotations

__all__ = ["InputError", "NanobeamError"]


class NanobeamError(Exception):
    """Base of every error about the user's input, data or configuration."""


class InputError(NanobeamError, ValueError):
    """An argument or data that cannot be used as given (the message says what and how to fix it)."""
