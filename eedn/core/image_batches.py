"""Fast input pipeline: images decoded once into one in-memory tensor, batches cut by indexing and augmented
with batched tensor ops; everything else goes through a configurable :class:`torch.utils.data.DataLoader`.

A per-sample PIL pipeline (decode, crop, flip, to-tensor, normalise, collate) costs more than a ResNet-20
step in bf16 on CPU (docs/scale.md). Datasets that fit in memory (digits, CIFAR, SVHN, small image
folders) are therefore held as one ``[N, C, H, W]`` tensor of raw pixels (uint8, or float for digits),
and a batch is ``pixels[idx]`` → random crop with zero padding + horizontal flip for all rows at once →
``/ 255`` → normalise. The crop offsets are uniform in ``[0, 2·pad]`` and the flip has probability ½, as
torchvision's ``RandomCrop(padding=pad)`` + ``RandomHorizontalFlip()`` draw them per sample, and padding is
black (raw 0) before normalisation as there; tests/test_image_batches.py checks both, exactly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Sequence, Sized, cast

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

if TYPE_CHECKING:
    from eedn.core.config import Config


@dataclass
class LoaderOptions:
    """DataLoader settings for datasets that are not in memory (config keys ``num_workers``,
    ``pin_memory``, ``persistent_workers``)."""

    num_workers: int = 0
    #: None: pin when the device is CUDA (page-locked host memory makes the copy asynchronous).
    pin_memory: bool | None = None
    #: keep worker processes alive between epochs (only with workers).
    persistent_workers: bool = True

    @classmethod
    def from_config(cls, cfg: Config) -> LoaderOptions:
        return cls(cfg.num_workers, cfg.pin_memory, cfg.persistent_workers)


class RandomCropFlip:
    """Random crop of a ``pad``-pixel zero-padded image back to its size, then a horizontal flip with
    probability ½ (when ``flip``), for a whole batch in one gather."""

    def __init__(self, pad: int, flip: bool = True):
        self.pad = int(pad)
        self.flip = bool(flip)

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``(top, left, flipped)`` for ``n`` images: offsets uniform in ``[0, 2·pad]``, flips with p = ½."""
        top = torch.randint(0, 2 * self.pad + 1, (n,), generator=generator)
        left = torch.randint(0, 2 * self.pad + 1, (n,), generator=generator)
        flipped = (torch.rand(n, generator=generator) < 0.5) if self.flip else torch.zeros(n, dtype=torch.bool)
        return top, left, flipped

    def apply(self, x: Tensor, top: Tensor, left: Tensor, flipped: Tensor) -> Tensor:
        """Crop ``x`` ``[B, C, H, W]`` at the given offsets of its zero-padded copy, flipping where asked."""
        b, c, h, w = x.shape
        p = self.pad
        padded = torch.nn.functional.pad(x, (p, p, p, p)) if p else x
        dev = x.device
        top, left, flipped = top.to(dev), left.to(dev), flipped.to(dev)
        ys = top[:, None] + torch.arange(h, device=dev)  # [B, H]
        cols = torch.arange(w, device=dev)
        xs = left[:, None] + torch.where(flipped[:, None], w - 1 - cols, cols)  # [B, W]
        rows = torch.arange(b, device=dev)[:, None, None, None]
        chans = torch.arange(c, device=dev)[None, :, None, None]
        return padded[rows, chans, ys[:, None, :, None], xs[:, None, None, :]]

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return self.apply(x, *self.sample(x.shape[0], generator))


class InMemoryImages(Dataset):
    """Raw pixels ``[N, C, H, W]`` (uint8 0..255, or float already in [0, 1]) with labels, normalised per
    batch with ``mean``/``std`` (None: not normalised) and augmented per batch by ``augment``.

    Indexing one sample gives what the per-sample pipeline gave (normalised float ``[C, H, W]``, int label),
    so every consumer keeps working; :func:`image_batches` uses :meth:`batch` instead.
    """

    def __init__(self, pixels: Tensor, labels: Tensor, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, augment: RandomCropFlip | None = None,
                 samples: list[tuple[str, int]] | None = None):
        self.pixels = pixels
        #: where each image came from, ``(path, label)``, when decoded from files (as an image folder's file view has
        #: them)
        self.samples = samples
        self.labels = torch.as_tensor(labels).long()
        self.mean = None if mean is None else torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = None if std is None else torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.augment = augment
        self._on_device: dict[torch.device, Tensor] = {}

    def view(self, augment: RandomCropFlip | None) -> InMemoryImages:
        """The same pixels (shared, not copied) with another augmentation."""
        other = InMemoryImages.__new__(InMemoryImages)
        other.__dict__.update(self.__dict__)
        other.augment = augment
        return other

    def __len__(self) -> int:
        return len(self.labels)

    def nbytes(self) -> int:
        return self.pixels.numel() * self.pixels.element_size()

    def _pixels_on(self, device: torch.device) -> Tensor:
        if device.type == "cpu":
            return self.pixels
        if device not in self._on_device:  # the whole store moves once; batches are cut on the device
            self._on_device[device] = self.pixels.to(device)
        return self._on_device[device]

    def batch(self, idx: Tensor, generator: torch.Generator | None = None,
              device: torch.device | str = "cpu", draws: tuple[Tensor, ...] | None = None
              ) -> tuple[Tensor, Tensor]:
        """Normalised float images ``[B, C, H, W]`` and labels of rows ``idx``, augmented if this view is (with
        ``draws`` from :meth:`RandomCropFlip.sample` when given, else fresh ones from ``generator``)."""
        device = torch.device(device)
        x = self._pixels_on(device)[idx.to(device)]
        if self.augment is not None:
            x = self.augment.apply(x, *draws) if draws is not None else self.augment(x, generator)
        x = x.float().div(255) if x.dtype == torch.uint8 else x.float()  # as torchvision's ToTensor
        if self.mean is not None and self.std is not None:
            x = x.sub(self.mean.to(device)).div(self.std.to(device))  # as torchvision's Normalize
        return x, self.labels[idx.cpu()].to(device)

    def __getitem__(self, i: int):
        x, y = self.batch(torch.tensor([int(i)]))
        return x[0], int(y[0])


def in_memory_rows(dataset: Dataset) -> tuple[InMemoryImages, Tensor] | None:
    """``(store, row indices)`` when ``dataset`` is an :class:`InMemoryImages` or a (nested) subset of one."""
    if isinstance(dataset, InMemoryImages):
        return dataset, torch.arange(len(dataset))
    if isinstance(dataset, Subset):
        inner = in_memory_rows(dataset.dataset)
        if inner is not None:
            return inner[0], inner[1][torch.as_tensor(dataset.indices, dtype=torch.long)]
    return None


class ImageBatches:
    """Batches ``(x, y)`` of a dataset in a given or seeded order; re-iterable (one pass per ``iter``).

    In-memory datasets are cut by indexing (augmentation drawn from ``generator``, on ``device``); any
    other dataset goes through a DataLoader with ``loader`` settings, yielding CPU tensors as before.

    ``shard=(rank, world_size)`` (DDP, :mod:`eedn.runtime.distributed`): ``batch_size`` is the global batch; every rank
    draws the same order (and augmentation) from an identically seeded ``generator`` and keeps its
    ``1/world_size`` slice of each global batch, so the ranks together see what one process would.
    """

    def __init__(self, dataset: Dataset, batch_size: int, *, shuffle: bool = False,
                 generator: torch.Generator | None = None, order: Sequence[int] | Tensor | None = None,
                 drop_last: bool = False, loader: LoaderOptions | None = None, device: str | torch.device = "cpu",
                 shard: tuple[int, int] = (0, 1)):
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.generator = generator
        self.order = None if order is None else torch.as_tensor(order, dtype=torch.long)
        self.drop_last = drop_last
        self.loader = loader or LoaderOptions()
        self.device = torch.device(device)
        self.rows = in_memory_rows(dataset)
        self.rank, self.world_size = shard
        self._dataloader: DataLoader | None = None

    def __len__(self) -> int:
        n = self._count()
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _count(self) -> int:
        return len(cast(Sized, self.dataset)) if self.order is None else len(self.order)

    def _global_order(self) -> Tensor:
        """Positions (into the dataset) in this pass's order: given, seeded shuffle or natural."""
        if self.order is not None:
            return self.order
        n = self._count()
        return torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)

    def _batches(self) -> Iterator[Tensor]:
        """The global batches of one pass (positions), before any sharding."""
        order = self._global_order()
        n = len(order)
        stop = n - n % self.batch_size if self.drop_last else n
        for start in range(0, stop, self.batch_size):
            yield order[start : start + self.batch_size]

    def _slice(self, chunk: Tensor) -> slice:
        """This rank's part of a global batch (equal parts when the batch divides by the world size)."""
        bounds = torch.tensor_split(torch.arange(len(chunk)), self.world_size)[self.rank]
        return slice(int(bounds[0]), int(bounds[-1]) + 1) if len(bounds) else slice(0, 0)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        if self.rows is None:
            return iter(self._loader())
        return self._in_memory()

    def _in_memory(self) -> Iterator[tuple[Tensor, Tensor]]:
        assert self.rows is not None  # __iter__ comes here only for rows held in memory
        store, rows = self.rows
        for chunk in self._batches():
            if self.world_size == 1:
                yield store.batch(rows[chunk], self.generator, self.device)
                continue
            part = self._slice(chunk)
            draws: tuple[Tensor, ...] | None = None
            if store.augment is not None:  # drawn for the whole global batch, as one process would
                draws = tuple(d[part] for d in store.augment.sample(len(chunk), self.generator))
            yield store.batch(rows[chunk[part]], self.generator, self.device, draws)

    def _loader(self) -> DataLoader:
        if self._dataloader is None:
            opts = self.loader
            workers = opts.num_workers
            pin = opts.pin_memory if opts.pin_memory is not None else self.device.type == "cuda"
            if self.world_size > 1:
                per_rank = self.batch_size // self.world_size
                self._dataloader = DataLoader(
                    self.dataset, batch_size=per_rank, sampler=_ShardSampler(self), drop_last=False,
                    num_workers=workers, pin_memory=pin and torch.cuda.is_available(),
                    persistent_workers=opts.persistent_workers and workers > 0)
                return self._dataloader
            sampler = None if self.order is None else self.order.tolist()
            self._dataloader = DataLoader(
                self.dataset, batch_size=self.batch_size, shuffle=self.shuffle if sampler is None else False,
                sampler=sampler, generator=self.generator if sampler is None else None, drop_last=self.drop_last,
                num_workers=workers, pin_memory=pin and torch.cuda.is_available(),
                persistent_workers=opts.persistent_workers and workers > 0)
        return self._dataloader


class _ShardSampler(torch.utils.data.Sampler):
    """This rank's slice of every global batch, in order (the DistributedSampler of :class:`ImageBatches`:
    global batches rather than interleaved rows, so the union over ranks is one process's batch)."""

    def __init__(self, batches: ImageBatches):
        self.batches = batches

    def __iter__(self):
        for chunk in self.batches._batches():
            yield from chunk[self.batches._slice(chunk)].tolist()

    def __len__(self) -> int:
        return len(self.batches) * (self.batches.batch_size // self.batches.world_size)
