"""The research API behind ``import eedn``: the pipeline's steps as functions (placeholder, filled below)."""
from __future__ import annotations

from eedn.rundir import load_model as load_run  # noqa: F401
