"""Frozen-backbone feature cache.

When the backbone is frozen and in eval mode, the per-exit features of a split never change, so they
are computed once, saved under the cache directory and reused by every strategy, λ and seed. The key
hashes the backbone weights, the dataset description, the split and its transform.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from eedn.io import atomic_torch_save


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


class FeatureCache:
    """A directory of ``<key>.pt`` files, each one FeatureSet."""

    def __init__(self, directory: str | os.PathLike, fp16: bool = False):
        self.directory = Path(directory)
        self.fp16 = fp16
        self.hits = 0
        self.misses = 0

    def path(self, key: str) -> Path:
        return self.directory / f"features-{key}.pt"

    def load(self, key: str) -> FeatureSet | None:
        p = self.path(key)
        if not p.exists():
            return None
        try:
            blob = torch.load(p, map_location="cpu", weights_only=True)
            fs = FeatureSet([f for f in blob["feats"]], blob["labels"])
        except Exception:  # a corrupt cache file is recomputed, never trusted
            return None
        self.hits += 1
        return fs

    def save(self, key: str, fs: FeatureSet) -> None:
        self.misses += 1
        feats = [f.half() if self.fp16 else f for f in fs.feats]
        atomic_torch_save({"feats": feats, "labels": fs.labels}, self.path(key))
