"""The eedn command line: click commands only, on top of every other layer."""
from __future__ import annotations

from eedn.cli.main import cli, main

__all__ = ["cli", "main"]
