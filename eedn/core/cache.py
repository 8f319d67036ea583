"""Frozen-backbone feature cache.

When the backbone is frozen and in eval mode, the per-exit features of a split never change, so they
are computed once, saved under the cache directory and reused by every strategy, λ and seed. The key
hashes everything that defines an entry: the backbone's name, resolved options, feature dims and weights,
the dataset description, the split, its transform and the stored precision. A load also checks the row
count and every exit's shape: an entry that does not fit is a miss, never a silently wrong input. Each entry
also stores the SHA-256 of its content and the ``meta`` its key was made from; an entry whose content does
not match its hash, whose meta does not hash to its key, or whose labels differ from the dataset's is a miss
with a one-line warning, recomputed and replaced (cache entries are derived data that eedn rebuilds exactly,
so recomputing is the fix; stopping the run would only make the user delete the file by hand). A cache
directory that cannot be written is read, with a warning, and the run continues uncached.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from eedn.runtime.errors import warn
from eedn.runtime.io import (
    atomic_torch_save,
    clean_stale_temps,
    content_sha256,
    writable_dir,
)


@dataclass
class FeatureSet:
    """Per-exit features ``feats[l]: [N, D_l]`` and labels ``[N]`` of one split."""

    feats: list[Tensor]
    labels: Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def rows(self, idx: Tensor) -> tuple[list[Tensor], Tensor]:
        return [f[idx].float() for f in self.feats], self.labels[idx]


def state_dict_hash(module: torch.nn.Module) -> str:
    """A short content hash of a module's weights (keys, shapes and values)."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        t = v.detach().cpu().contiguous()
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()[:16]


def cache_key(**parts: object) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def fits(fs: FeatureSet, rows: int | None, dims: Sequence[int] | None) -> bool:
    """Whether a loaded entry has the expected row count and one ``[rows, D_l]`` tensor per exit."""
    if fs.labels.ndim != 1 or any(f.shape[0] != len(fs.labels) for f in fs.feats):
        return False
    if rows is not None and len(fs.labels) != rows:
        return False
    return dims is None or [f.shape[-1] for f in fs.feats] == list(dims)


def entry_problem(blob: dict, key: str | None = None) -> str | None:
    """What is wrong with a loaded cache entry (``blob`` with its ``sha256`` and, for a keyed entry, the
    ``meta`` its key was made from), or None when its content matches the recorded hash."""
    recorded = blob.get("sha256")
    if not isinstance(recorded, str):
        return "has no recorded sha256 (written by an older eedn, or not by eedn)"
    if content_sha256({k: v for k, v in blob.items() if k != "sha256"}) != recorded:
        return "does not match its recorded sha256 (changed or corrupt since it was written)"
    if key is not None and cache_key(**blob.get("meta", {})) != key:
        return "holds meta that does not give its key (renamed or copied from another entry)"
    return None


class FeatureCache:
    """A directory of ``features-<key>.pt`` files, each one FeatureSet with what defines it (``meta``)."""

    def __init__(self, directory: str | os.PathLike, fp16: bool = False):
        self.directory = Path(directory)
        self.fp16 = fp16
        self.hits = 0
        self.misses = 0
        self.writable = writable_dir(self.directory)
        if self.writable:
            clean_stale_temps(self.directory)
        else:
            warn(f"feature cache {self.directory} is not writable: features are read from it when present, "
                 "otherwise computed and not cached")

    def path(self, key: str) -> Path:
        return self.directory / f"features-{key}.pt"

    def load(self, key: str, rows: int | None = None, dims: Sequence[int] | None = None,
             labels: Tensor | None = None) -> FeatureSet | None:
        """The entry under ``key``, or None when it is absent, unreadable, does not have the expected shape
        (``rows`` samples, ``dims[l]`` features at exit ``l``), fails its integrity checks (content hash,
        meta against the key) or holds other ``labels`` than the dataset's."""
        p = self.path(key)
        if not p.exists():
            return None
        try:
            blob = torch.load(p, map_location="cpu", weights_only=True)
            fs = FeatureSet([f for f in blob["feats"]], blob["labels"])
            ok = fits(fs, rows, dims)
        except Exception:  # a corrupt cache file is recomputed, never trusted
            return None
        if not ok:
            return None
        problem = entry_problem(blob, key)
        if problem is None and labels is not None and not torch.equal(fs.labels.long(), labels.long().cpu()):
            problem = "holds other labels than the dataset"
        if problem is not None:
            warn(f"feature cache entry {p} {problem}; ignoring it and recomputing the features")
            return None
        self.hits += 1
        return fs

    def save(self, key: str, fs: FeatureSet, meta: dict | None = None) -> bool:
        """Store an entry (``meta`` says what it is, for ``eedn cache list``); False when it was not stored."""
        self.misses += 1
        if not self.writable:
            return False
        feats = [f.half() if self.fp16 else f for f in fs.feats]
        blob = {"feats": feats, "labels": fs.labels, "meta": meta or {}}
        try:
            atomic_torch_save(blob | {"sha256": content_sha256(blob)}, self.path(key))
        except OSError as exc:
            self.writable = False
            warn(f"cannot write the feature cache ({exc}); continuing uncached")
            return False
        return True
