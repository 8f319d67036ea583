"""User-facing errors: the CLI prints these as one line (no traceback unless --debug)."""
from __future__ import annotations


class EednError(Exception):
    """A problem the user can fix: bad option, missing file, unknown plugin name."""


class UnknownNameError(EednError, KeyError):
    """A registry lookup failed; the message lists the known names."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def warn(message: str) -> None:
    """One ``warning: ...`` line on stderr: something the user should know that does not stop the run."""
    import sys

    print(f"warning: {message}", file=sys.stderr, flush=True)
