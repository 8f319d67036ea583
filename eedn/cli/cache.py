"""``eedn cache list|prune``: what the cache holds (size, age, what each entry is) and removing entries.

The cache holds trained backbones (``backbones/<name>-<key>.pt``, and ``.partial.pt`` resumable checkpoints of
an interrupted training), per-exit features (``features/features-<key>.pt``, each with the ``meta`` that
defines it) and extracted dataset archives (``datasets/<fingerprint>/``). Temporaries that killed
writers left behind are listed as ``temp`` and removed by every prune (a live writer's are left alone).
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import click

from eedn.cli.common import friendly_errors
from eedn.runtime.errors import EednError

KINDS = ("backbone", "partial", "features", "dataset", "temp")


@dataclass
class Entry:
    kind: str
    path: Path
    size: int
    age_s: float
    what: str


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())
    return path.stat().st_size


def _describe(path: Path, kind: str) -> str:
    """A few words on what an entry is, read from its own metadata (memory-mapped: the tensors stay on disk)."""
    import torch

    if kind in ("temp", "dataset"):
        return "left by a killed writer" if kind == "temp" else "extracted dataset archive"
    name = path.name.split("-")[0]
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - an unreadable entry is listed as such, never trusted
        return "unreadable (a later run recomputes it)"
    if kind == "features":
        meta = blob.get("meta") or {}
        backbone = meta.get("backbone") or {}
        dims = meta.get("feature_dims")
        return (f"{backbone.get('name', '?')} {meta.get('dataset', {}).get('name', '?')} {meta.get('split', '?')}: "
                f"{len(blob['labels'])} rows x {len(dims) if dims else len(blob['feats'])} exits")
    if kind == "partial":
        return f"{name}: resumable after epoch {int(blob.get('epoch', -1)) + 1} (--resume)"
    summary = blob.get("summary") or {}
    acc = summary.get("val_accuracy")
    return f"{name}: {summary.get('epochs', '?')} epochs" + (f", val accuracy {acc:.4f}" if acc is not None else "")


def cache_entries(root: Path) -> list[Entry]:
    """Every entry under a cache directory, oldest first."""
    from eedn.runtime.io import is_stale_temp

    found: list[tuple[str, Path]] = []
    for sub, pattern, kind in (("backbones", "*.pt", "backbone"), ("features", "features-*.pt", "features")):
        for path in sorted((root / sub).glob(pattern)):
            found.append(("partial" if path.name.endswith(".partial.pt") else kind, path))
    image_root = root / "datasets"
    if image_root.is_dir():
        found += [("dataset", p) for p in sorted(image_root.iterdir()) if p.is_dir() and not p.name.startswith(".")]
    for folder in (root / "backbones", root / "features", image_root):
        if folder.is_dir():
            found += [("temp", p) for p in sorted(folder.iterdir()) if is_stale_temp(p)]
    now = time.time()
    entries = [Entry(kind, p, _size(p), now - p.stat().st_mtime, _describe(p, kind)) for kind, p in found]
    return sorted(entries, key=lambda e: -e.age_s)


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def human_age(seconds: float) -> str:
    for unit, span in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= span:
            return f"{seconds / span:.0f} {unit}"
    return f"{seconds:.0f} s"


def _root(cache_dir: str | None) -> Path:
    from eedn.core.config import cache_dir as configured

    root = configured(cache_dir)
    if not root.is_dir():
        raise EednError(f"no cache at {root}; give --cache-dir or set EEDN_CACHE")
    return root


@click.group("cache")
def cache_command() -> None:
    """Show and remove cached backbones, features and extracted datasets."""


@cache_command.command("list")
@click.option("--cache-dir", type=click.Path(), help="cache directory (default $EEDN_CACHE or ~/.cache/eedn)")
@click.option("--debug", is_flag=True, help="show tracebacks")
@friendly_errors
def list_command(cache_dir, debug) -> None:
    """Every cache entry: kind, size, age and what it is."""
    root = _root(cache_dir)
    entries = cache_entries(root)
    click.echo(f"{root}: {len(entries)} entries, {human_size(sum(e.size for e in entries))}")
    for e in entries:
        click.echo(f"{e.kind:<9} {human_size(e.size):>10} {human_age(e.age_s):>7}  "
                   f"{e.path.relative_to(root)}  {e.what}")


@cache_command.command("prune")
@click.option("--cache-dir", type=click.Path(), help="cache directory (default $EEDN_CACHE or ~/.cache/eedn)")
@click.option("--kind", "kinds", multiple=True, type=click.Choice(KINDS), help="remove entries of this kind")
@click.option("--older-than", type=float, help="remove entries not written for this many days")
@click.option("--all", "everything", is_flag=True, help="remove every entry")
@click.option("--dry-run", is_flag=True, help="list what would be removed, remove nothing")
@click.option("--debug", is_flag=True, help="show tracebacks")
@friendly_errors
def prune_command(cache_dir, kinds, older_than, everything, dry_run, debug) -> None:
    """Remove entries by kind and/or age (both must match when both are given); stale temporaries of
    killed writers always go. A removed entry is recomputed by the next run that needs it."""
    if older_than is not None and older_than < 0:
        raise EednError(f"--older-than is a number of days >= 0, got {older_than}")
    root = _root(cache_dir)
    chosen = [e for e in cache_entries(root)
              if e.kind == "temp" or everything
              or ((kinds or older_than is not None)
                  and (not kinds or e.kind in kinds)
                  and (older_than is None or e.age_s > older_than * 86400))]
    for e in chosen:
        if not dry_run:
            shutil.rmtree(e.path) if e.path.is_dir() else e.path.unlink(missing_ok=True)
        click.echo(f"{'would remove' if dry_run else 'removed'} {e.kind} {e.path.relative_to(root)} "
                   f"({human_size(e.size)})")
    freed = human_size(sum(e.size for e in chosen))
    click.echo(f"{len(chosen)} entries, {freed} {'would be freed' if dry_run else 'freed'}")
