"""Splits and the helpers every dataset source shares (seeded stratified hold-outs)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence, Sized, cast

import numpy as np
import torch
from torch.utils.data import Dataset, Subset


@dataclass
class DataSplits:
    """train / val / cal / test for one dataset. val selects (thresholds, pos-weights, checkpoints);
    cal fits temperature and conformal thresholds. Both are held out of train before any training
    and use evaluation transforms."""

    name: str
    num_classes: int
    train: Dataset
    val: Dataset
    cal: Dataset
    test: Dataset
    class_names: list[str] = field(default_factory=list)
    #: train split with evaluation transforms (deterministic features for the cache); same order as train.
    train_eval: Dataset | None = None
    info: dict = field(default_factory=dict)

    def sizes(self) -> dict[str, int]:
        return {k: len(getattr(self, k)) for k in ("train", "val", "cal", "test")}


def stratified_holdout(labels: np.ndarray, fractions: list[float], seed: int) -> list[np.ndarray]:
    """Split indices into ``len(fractions) + 1`` parts, class by class; the last part is the rest.

    Each class contributes ``round(n_c * f)`` samples to each held-out part, so tiny classes stay
    represented; order inside each part is shuffled with ``seed``.
    """
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    parts: list[list[int]] = [[] for _ in range(len(fractions) + 1)]
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        start = 0
        for p, f in enumerate(fractions):
            take = int(round(len(idx) * f))
            parts[p].extend(idx[start : start + take].tolist())
            start += take
        parts[-1].extend(idx[start:].tolist())
    out = []
    for part in parts:
        arr = np.array(part, dtype=np.int64)
        rng.shuffle(arr)
        out.append(arr)
    return out


#: a second, independent stream for splitting the validation pool into val and cal.
CAL_SEED_OFFSET = 1_000_003


def hold_out(labels: np.ndarray, pool_fraction: float, cal_fraction: float, seed: int,
             test_fraction: float = 0.0) -> dict[str, np.ndarray]:
    """Positions (into ``labels``) of train / val / cal, and test when ``test_fraction > 0``.

    Step 1 carves test (optional) and the validation pool out of ``labels`` with one stratified
    seeded hold-out; step 2 splits the pool into cal and val, also stratified.
    """
    labels = np.asarray(labels)
    fractions = ([test_fraction] if test_fraction > 0 else []) + [pool_fraction]
    parts = stratified_holdout(labels, fractions, seed)
    out = {"train": parts[-1]}
    if test_fraction > 0:
        out["test"] = parts[0]
    pool = parts[-2]
    cal_pos, val_pos = stratified_holdout(labels[pool], [cal_fraction], seed + CAL_SEED_OFFSET)
    out["val"], out["cal"] = pool[val_pos], pool[cal_pos]
    return out


class MappedDataset(Dataset):
    """The items of ``base`` seen through ``transform`` (None: as they are), labelled by ``targets``, which stay
    readable without decoding an image (:func:`dataset_labels`).

    ``base[i]`` is an image, or an ``(image, label)`` pair whose label ``targets`` repeats (a torchvision dataset).
    One loaded dataset thus serves its augmented and its evaluation view without being loaded twice. ``samples``
    records where each item came from, ``(path, label)``, when it was read from files.
    """

    def __init__(self, base: Any, targets: Sequence[int] | torch.Tensor, transform: Callable | None = None,
                 samples: list[tuple[str, int]] | None = None):
        self.base = base
        self.targets = targets
        self.transform = transform
        self.samples = samples

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        item = self.base[i]
        x = item[0] if isinstance(item, tuple) else item
        if self.transform is not None:
            x = self.transform(x)
        return x, int(self.targets[i])


class TensorImages(MappedDataset):
    """In-memory images ``[N, C, H, W]`` (float) with labels and an optional per-sample transform."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Callable | None = None):
        super().__init__(images, labels.long(), transform)
        self.images = images
        self.labels = self.targets


def subset(dataset: Dataset, indices: np.ndarray) -> Subset:
    """The rows ``indices`` of a dataset (a split from :func:`hold_out`'s positions)."""
    return Subset(dataset, indices.tolist())


def dataset_labels(dataset: Dataset) -> torch.Tensor:
    """Labels of a dataset without decoding images where the dataset allows it."""
    if isinstance(dataset, Subset):
        parent = dataset_labels(dataset.dataset)
        return parent[torch.as_tensor(dataset.indices, dtype=torch.long)]
    for attr in ("labels", "targets"):
        if hasattr(dataset, attr):
            return torch.as_tensor(getattr(dataset, attr)).long()
    if hasattr(dataset, "samples"):
        return torch.tensor([s[1] for s in dataset.samples], dtype=torch.long)
    return torch.tensor([int(dataset[i][1]) for i in range(len(cast(Sized, dataset)))], dtype=torch.long)


def channel_statistics(images: Iterable[torch.Tensor]) -> tuple[list[float], list[float]]:
    """Per-channel mean and std over ``[C, H, W]`` images (every pixel weighs the same; images may differ in
    size): the normalisation a source computes on its train split instead of borrowing CIFAR-10's. A constant
    channel gets std 1."""
    total: torch.Tensor | None = None
    total_sq: torch.Tensor | None = None
    count = 0
    for x in images:
        x = x.double().flatten(1)
        s, sq = x.sum(1), (x * x).sum(1)
        total, total_sq = (s, sq) if total is None or total_sq is None else (total + s, total_sq + sq)
        count += x.shape[1]
    if total is None or total_sq is None or count == 0:
        raise ValueError("channel_statistics needs at least one image")
    mean = total / count
    std = (total_sq / count - mean * mean).clamp_min(0).sqrt()
    std = torch.where(std < 1e-4, torch.ones_like(std), std)  # a constant channel is only centred
    return [round(float(m), 6) for m in mean], [round(float(v), 6) for v in std]
