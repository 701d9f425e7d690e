"""Errors a user can act on.

Every stage raises `UserError` for problems with the user's input (a file, a field, a flag); the CLI prints the
message and exits 2. `GateFailed` is a check that said no (a regression gate, a privacy threshold): exit 1.
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


class GateFailed(Exception):
    """A gate or check said no."""

    exit_code = 1
