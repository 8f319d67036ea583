"""Per-exit features of each split, cached when the backbone is a fixed feature extractor, and the
stored outputs (:class:`~eedn.core.outputs.ExitOutputs`) computed from them."""
from __future__ import annotations

import math
from typing import Iterator, Sized, cast

import torch
from torch import Tensor
from torch.utils.data import Dataset

from eedn.core.cache import FeatureCache, FeatureSet, cache_key, state_dict_hash
from eedn.core.data import DataSplits, dataset_labels, subset
from eedn.runtime.distributed import all_reduce_sum, gather_rows, shard_rows, world
from eedn.core.image_batches import ImageBatches, LoaderOptions
from eedn.core.model import EarlyExitModel
from eedn.core.outputs import ExitOutputs
from eedn.runtime.precision import autocast, numerics_key, to_memory_format
from eedn.runtime.progress import Progress


def seeded_permutation(n: int, seed: int, epoch: int) -> Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


class FeatureSource:
    """Per-exit features of each split, from the cache when the backbone is a fixed feature extractor
    (frozen, eval mode, no augmentation), else computed live batch by batch.

    ``batches(split, ...)`` yields ``(feats, labels)`` in the same seeded order either way, so cached
    and live training see identical batches. The backbone runs under ``precision`` autocast (and NHWC
    images when ``channels_last``); features are stored as fp32 whatever the precision.
    """

    def __init__(self, model: EarlyExitModel, data: DataSplits, *, device: str = "cpu",
                 cache: FeatureCache | None = None, cacheable: bool = True, backbone_mode: str = "eval",
                 batch_size: int = 256, dataset_key: dict | None = None, progress: Progress | None = None,
                 num_workers: int = 0, precision: str = "fp32", channels_last: bool = False,
                 loader: LoaderOptions | None = None, backbone_key: dict | None = None):
        self.model = model
        self.data = data
        self.device = device
        self.cache = cache
        self.cacheable = cacheable and backbone_mode == "eval"
        self.backbone_mode = backbone_mode
        self.batch_size = batch_size
        self.dataset_key = dataset_key or {"name": data.name}
        self.progress = progress or Progress(False)
        self.num_workers = num_workers
        self.precision = precision
        self.channels_last = channels_last
        self.loader = loader or LoaderOptions(num_workers=num_workers)
        #: what defines the backbone beyond its weights (name, resolved options): part of the key
        self.backbone_key = backbone_key or {"name": type(model.backbone).__name__}
        self._memory: dict[str, FeatureSet] = {}
        self._backbone_hash: str | None = None

    def dataset(self, split: str, augmented: bool = False) -> Dataset:
        """The dataset behind a split; ``train`` uses eval transforms unless ``augmented``."""
        if split == "train" and not augmented and self.data.train_eval is not None:
            return self.data.train_eval
        return getattr(self.data, split)

    def _backbone_forward(self, x: Tensor, mode: str | None = None) -> list[Tensor]:
        bb = self.model.backbone
        bb.train((mode or self.backbone_mode) == "train")
        x = to_memory_format(x.to(self.device, non_blocking=True), self.channels_last)
        with torch.no_grad(), autocast(self.precision, self.device):
            return [f.float() for f in self.model.exit_features(x)]

    def features(self, split: str) -> FeatureSet:
        """All per-exit features of a split with eval transforms (computed once, cached on disk)."""
        if split in self._memory:
            return self._memory[split]
        key = None
        if self.cache is not None and self.cacheable:
            if self._backbone_hash is None:
                self._backbone_hash = state_dict_hash(self.model.backbone)
            parts = {"backbone": self.backbone_key, "weights": self._backbone_hash,
                     "feature_dims": list(self.model.backbone.feature_dims), "dataset": self.dataset_key,
                     "split": split, "transform": "eval", "fp16": self.cache.fp16,
                     **numerics_key(self.precision, False)}
            key = cache_key(**parts)
            fs = self.cache.load(key, rows=self.num_samples(split), dims=parts["feature_dims"])
            if all_reduce_sum([fs is None])[0] == 0:  # under DDP: a hit only when every rank has the file
                assert fs is not None  # this rank's hit included
                self._memory[split] = fs
                return fs
        fs = self._extract(split)
        if key is not None:
            assert self.cache is not None  # a key is made only with a cache
            saved = self.cache.save(key, fs, meta=parts) if world().main else True  # rank 0 writes the file
            if saved and self.cache.fp16:  # what later runs will read back from the cache
                fs = FeatureSet([f.half() for f in fs.feats], fs.labels)
        self._memory[split] = fs
        return fs

    def _extract(self, split: str) -> FeatureSet:
        """One eval-mode pass over a split; under DDP each rank takes a contiguous shard and the shards are
        gathered to every rank in order (:mod:`eedn.runtime.distributed`)."""
        ds = self.dataset(split)
        if world().active:
            ds = subset(ds, shard_rows(len(cast(Sized, ds))).numpy())
        loader = ImageBatches(ds, self.batch_size, loader=self.loader, device=self.device)
        chunks: list[list[Tensor]] = []
        labels = [torch.zeros(0, dtype=torch.long)]
        for x, y in self.progress.track(loader, f"features: {split}"):
            chunks.append([f.cpu() for f in self._backbone_forward(x, "eval")])
            labels.append(y.cpu())
        dims = self.model.backbone.feature_dims
        feats = [torch.cat([torch.zeros(0, d)] + [c[i] for c in chunks]) for i, d in enumerate(dims)]
        return FeatureSet([gather_rows(f) for f in feats], gather_rows(torch.cat(labels)))

    def labels(self, split: str) -> Tensor:
        if split in self._memory:
            return self._memory[split].labels
        return dataset_labels(self.dataset(split))

    def num_samples(self, split: str) -> int:
        return len(cast(Sized, self.dataset(split)))

    def batches(self, split: str, batch_size: int, *, shuffle: bool, seed: int = 0, epoch: int = 0,
                augmented: bool = False) -> Iterator[tuple[list[Tensor], Tensor]]:
        """Batches of ``(per-exit features on device, labels)`` in a seeded order. Only the train split sees
        a train-mode backbone (``backbone_mode``); val / cal / test are always read in eval mode."""
        n = self.num_samples(split)
        order = seeded_permutation(n, seed, epoch) if shuffle else torch.arange(n)
        if self.cacheable and not augmented:
            fs = self.features(split)
            for start in range(0, n, batch_size):
                idx = order[start : start + batch_size]
                feats, y = fs.rows(idx)
                yield [f.to(self.device) for f in feats], y.to(self.device)
            return
        ds = self.dataset(split, augmented=augmented)
        loader = ImageBatches(ds, batch_size, order=order, loader=self.loader, device=self.device)
        mode = self.backbone_mode if split == "train" else "eval"
        for x, y in loader:
            yield self._backbone_forward(x, mode), y.to(self.device)

    def num_batches(self, split: str, batch_size: int) -> int:
        return math.ceil(self.num_samples(split) / batch_size)


@torch.no_grad()
def compute_split_outputs(model: EarlyExitModel, source: FeatureSource, split: str, exit_macs: list[int],
                          full_macs: int, batch_size: int = 1024):
    """ExitOutputs of one split from its per-exit features (one backbone pass at most)."""
    model.eval()
    logits, scores, labels = [], [], []
    precision, device = getattr(source, "precision", "fp32"), getattr(source, "device", "cpu")
    for feats, y in source.batches(split, batch_size, shuffle=False):
        with autocast(precision, device):
            lg = model.logits_from_features(feats)
            score = model.gate_scores(lg, feats)
        logits.append(lg.float().cpu())
        scores.append(score.float().cpu())
        labels.append(y.cpu())
    return ExitOutputs(torch.cat(logits), torch.cat(labels), torch.cat(scores),
                       torch.tensor(exit_macs, dtype=torch.float64), float(full_macs))
