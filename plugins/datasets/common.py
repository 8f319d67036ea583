"""What the dataset sources share: the base class (``describe()``, the fraction check), the sources read from
official array files (CIFAR, SVHN), the in-memory and per-sample views, and the checks of image sizes and splits."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from eedn.core.contracts import DatasetSource
from eedn.core.data import MappedDataset
from eedn.runtime.errors import EednError
from eedn.core.image_batches import InMemoryImages, RandomCropFlip
from eedn.core.options import option



def default_data_dir() -> str:
    """Where CIFAR/SVHN files are looked for when ``data_dir`` is not given."""
    return os.environ.get("EEDN_DATA_DIR", "data")


# --------------------------------------------------------------------------------------- helpers

#: default cap on the decoded uint8 pixels a source keeps in memory (``in_memory_mb`` option)
IN_MEMORY_MB = 2048


def _in_memory_option() -> Any:
    return option(IN_MEMORY_MB, "decode the images once into memory (uint8) when they take at most this many MiB, "
                                "and augment whole batches with tensor ops; 0: decode per sample", min=0)


def _fits_in_memory(count: int, channels: int, image_size: int, limit_mb: int) -> bool:
    return count * channels * image_size * image_size <= limit_mb * 2**20


def _augment(image_size: int, augment: bool) -> RandomCropFlip | None:
    """The train augmentation of :func:`cifar_transforms` as a batched op: crop with ``image_size // 8``
    padding and a horizontal flip."""
    return RandomCropFlip(image_size // 8, flip=True) if augment else None



def _resized_uint8(images: Iterable, count: int, image_size: int) -> Tensor | None:
    """``count`` PIL images resized (shorter side, as ``T.Resize``) to ``image_size`` once, as
    ``[N, 3, S, S]`` uint8; None as soon as one comes out non-square (its random crop would then differ
    from the per-sample path's, which crops the whole resized image)."""
    from torchvision import transforms as T

    resize = T.Resize(image_size)
    out = torch.empty(count, 3, image_size, image_size, dtype=torch.uint8)
    for i, image in enumerate(images):
        image = image if image.size == (image_size, image_size) else resize(image)
        if image.size != (image_size, image_size):
            return None
        out[i] = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)
    return out


def _hwc_uint8(array: np.ndarray, image_size: int) -> Tensor:
    """A torchvision dataset's ``[N, H, W, C]`` uint8 array as ``[N, C, S, S]``, resized once when ``S`` differs."""
    pixels = torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2).contiguous()
    if pixels.shape[-1] == image_size:
        return pixels
    from PIL import Image

    out = _resized_uint8((Image.fromarray(a) for a in array), len(array), image_size)
    assert out is not None, "a non-square [N, H, W, C] array"  # square images stay square when resized
    return out


def cifar_transforms(image_size: int, mean: Sequence[float] | None, std: Sequence[float] | None,
                     augment: bool, native_size: int | None = 32, center_crop: bool = False):
    """(train, eval) torchvision transforms: optional resize, crop-with-padding and flip for train.

    ``native_size`` skips the resize when images already have that size; ``center_crop`` squares
    non-square images (image folders).
    """
    from torchvision import transforms as T

    resize: list = []
    if native_size is None or image_size != native_size:
        resize.append(T.Resize(image_size))
    tail: list = [T.ToTensor()]
    if mean is not None and std is not None:
        tail.append(T.Normalize(mean, std))
    eval_tf = T.Compose(resize + ([T.CenterCrop(image_size)] if center_crop else []) + tail)
    if not augment:
        return eval_tf, eval_tf
    train_tf = T.Compose(resize + [T.RandomCrop(image_size, padding=image_size // 8),
                                   T.RandomHorizontalFlip()] + tail)
    return train_tf, eval_tf


def _targets(base) -> list[int]:
    """Labels of a torchvision CIFAR (``targets``) or SVHN (``labels``) object."""
    return [int(t) for t in (base.targets if hasattr(base, "targets") else base.labels)]


def _check_image_size(image_size: int) -> int:
    if int(image_size) < 1:
        raise EednError(f"image_size must be a positive number of pixels, got {image_size}")
    return int(image_size)


def _require_nonempty(name: str, parts: dict[str, np.ndarray], hint: str) -> None:
    empty = [k for k in ("train", "val", "cal", "test") if k in parts and len(parts[k]) == 0]
    if empty:
        raise EednError(f"dataset '{name}': split(s) {', '.join(empty)} came out empty; {hint}")


# ----------------------------------------------------------------------------------- base class


def _fraction_option(help: str, default: float) -> Any:
    """A declared split fraction; :meth:`_Source.fraction` also rejects the ends 0 and 1."""
    return option(default, help + " (strictly between 0 and 1)", min=0.0, max=1.0)


class _Source(DatasetSource):
    """What every source shares: ``describe()`` (the cache key) and the open-interval fraction check.

    ``data_key`` names the options that define the data; where the files live (``data_dir``) is not
    one of them.
    """

    name: str = "dataset"
    data_key: tuple[str, ...] = ()

    def fraction(self, name: str) -> float:
        """A fraction option, which must leave both sides of its split non-empty."""
        value = getattr(self.options, name)
        if not 0.0 < value < 1.0:
            raise EednError(f"dataset '{self.name}': option {name} must be strictly between 0 and 1, got {value}")
        return value

    def describe(self) -> dict:
        return {"name": self.name, **{k: getattr(self.options, k) for k in self.data_key}}

    def _info(self, image_size: int, seed: int, augment: bool, **extra: Any) -> dict:
        return {"source": self.describe(), "image_size": image_size, "seed": seed, "augment": augment, **extra}



# ------------------------------------------------------------------------------- official array files


@dataclass
class ArrayOptions:
    """The options of a source read from its official files: where they are, the val pool and the memory cap."""

    data_dir: str | None = option(None, "folder holding the dataset files (default: $EEDN_DATA_DIR or ./data)")
    val_size: int = option(5000, "images held out of the train split as the validation pool", min=1)
    cal_fraction: float = _fraction_option("share of the validation pool that becomes cal", 0.5)
    in_memory_mb: int = _in_memory_option()


class _ArraySource(_Source):
    """A source read from its official train and test files by torchvision's dataset class (never downloaded),
    whose pixels are one uint8 array: the ``val_size`` pool, and views decoded into memory when they fit.

    Subclasses set ``label`` (for messages), ``mean``/``std`` (None: no normalisation) and implement ``_load`` and
    ``_pixels``.
    """

    label: str = "dataset"
    channels = 3
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None
    data_key: tuple[str, ...] = ("val_size", "cal_fraction")

    Options = ArrayOptions
    options: ArrayOptions

    def data_dir(self) -> Path:
        return Path(self.options.data_dir or default_data_dir()).expanduser()

    def _load(self, train: bool) -> Any:
        """The torchvision dataset object of the train or the test split (images decoded as PIL on access)."""
        raise NotImplementedError

    def _pixels(self, base: Any, image_size: int) -> Tensor:
        """The split's pixels as ``[N, C, S, S]`` uint8."""
        raise NotImplementedError

    def _val_fraction(self, n: int) -> float:
        val_size = self.options.val_size
        if val_size >= n:
            raise EednError(f"dataset '{self.name}': val_size must be less than the {n} train images, got {val_size}")
        return val_size / n

    def views(self, train_base, test_base, image_size: int, augment: bool) -> tuple[Dataset, Dataset, Dataset]:
        """(train, eval, test) views: in memory (uint8, batched augmentation) when the pixels fit
        ``in_memory_mb``, else torchvision's per-sample transforms."""
        train_targets, test_targets = _targets(train_base), _targets(test_base)
        mean, std = self.mean, self.std
        if _fits_in_memory(len(train_targets) + len(test_targets), 3, image_size, self.options.in_memory_mb):
            eval_view = InMemoryImages(self._pixels(train_base, image_size), torch.tensor(train_targets), mean, std)
            test_view = InMemoryImages(self._pixels(test_base, image_size), torch.tensor(test_targets), mean, std)
            return eval_view.view(_augment(image_size, augment)), eval_view, test_view
        train_tf, eval_tf = cifar_transforms(image_size, mean, std, augment)
        return (MappedDataset(train_base, train_targets, train_tf),
                MappedDataset(train_base, train_targets, eval_tf),
                MappedDataset(test_base, test_targets, eval_tf))
