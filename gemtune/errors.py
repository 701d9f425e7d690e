"""Errors a user can act on.

Every stage raises `UserError` for problems with the user's input (a file, a field, a flag); the CLI prints the
message and exits 2. `NotFound` is the UserError for a name that does not exist (the gateway answers it with 404).
`GateFailed` is a check that said no (a regression gate, a privacy threshold): exit 1.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input: the message names the file, line and field where it can."""

    exit_code = 2

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None, field: str | None = None):
        where = ""
        if file:
            where = f"{file}:{line}: " if line is not None else f"{file}: "
        if field:
            where += f'field "{field}": '
        super().__init__(where + message)
        self.file, self.line, self.field = file, line, field


class NotFound(UserError):
    """A name the user gave that does not exist (an adapter, a version, an alias in the registry).

    Still a UserError (CLI exit 2, the message names what is missing); callers that answer differently for
    "no such thing" (the gateway: 404 instead of 400) catch this type instead of matching message text.
    """


class GateFailed(Exception):
    """A gate or check said no."""

    exit_code = 1
