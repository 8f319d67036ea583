"""Rendering of run and comparison directories (placeholder: summary and accuracy plot)."""
from __future__ import annotations

from pathlib import Path


def render_run(run_dir: Path, results: dict, manifest: dict | None = None) -> None:
    from eedn.report import render_report

    render_report(run_dir, results)
