"""Dataset sources: the embedded ``digits`` default, CIFAR-10/100, SVHN, long-tailed CIFAR and any
folder (or ``.tar.gz``) of images laid out as ``train/<class>/*``.

Every source follows the clean protocol (docs/evaluation.md, "Splits"): val and cal are held out of the training
images *before* any training, stratified and seeded, and always read with evaluation transforms;
``train_eval`` is the train split (same indices, same order) with evaluation transforms, for the
frozen-backbone feature cache. Nothing is ever downloaded: a missing dataset is an
:class:`~eedn.errors.EednError` that says where to put which files.

Hold-outs are made in two seeded stratified steps: first the *validation pool* (``val_size`` images
or ``val_fraction`` of them; plus the test split where a dataset has no official one), then the pool
is split into cal (``cal_fraction`` of it) and val. The train split therefore does not depend on
``cal_fraction``, so changing it keeps backbone checkpoints and cached train features valid.

``describe()`` gives the options that define the data (for cache keys); ``seed`` and ``image_size``
are arguments of ``splits()`` and are recorded in ``DataSplits.info`` instead.
"""
from __future__ import annotations

import functools
import hashlib
import os
import shutil
import tarfile
import tempfile
import zlib
from dataclasses import MISSING, dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from eedn.contracts import DatasetSource
from eedn.data import DataSplits, channel_statistics, hold_out, subset
from eedn.image_batches import InMemoryImages, RandomCropFlip
from eedn.errors import EednError
from eedn.image_io import open_image
from eedn.io import clean_stale_temps, temp_prefix
from eedn.options import option

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.24703, 0.24348, 0.26158)
CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
#: shot groups of long-tailed benchmarks, by nominal train images per class: many > 100, few < 20.
MANY_SHOT_ABOVE = 100
FEW_SHOT_BELOW = 20


def default_data_dir() -> str:
    """Where CIFAR/SVHN files are looked for when ``data_dir`` is not given."""
    return os.environ.get("EEDN_DATA_DIR", "data")


# --------------------------------------------------------------------------------------- helpers


def long_tail_counts(n_max: int, num_classes: int, imbalance: float) -> list[int]:
    """Images kept per class by the exponential long-tail profile (LDAM-style).

    Class ``c`` keeps ``floor(n_max * (1/imbalance) ** (c / (C-1)))``: CIFAR100-LT with imbalance 100
    keeps 500, 477, 455, ..., 5 (10 847 in all).
    """
    if imbalance < 1:
        raise EednError(f"imbalance must be >= 1 (ratio of the largest to the smallest class), got {imbalance}")
    if num_classes < 2:
        return [int(n_max)] * num_classes
    factor = 1.0 / imbalance
    return [int(n_max * factor ** (c / (num_classes - 1.0))) for c in range(num_classes)]


def long_tail_indices(targets: Sequence[int], counts: Sequence[int], seed: int = 0) -> np.ndarray:
    """Indices keeping the first ``counts[c]`` images of each class after a per-class shuffle.

    One ``RandomState(seed)`` shuffles the classes in order 0, 1, ... (as LDAM's ``np.random.seed(0)``
    does); the result is in class order, head classes first.
    """
    targets = np.asarray(targets)
    rng = np.random.RandomState(seed)
    kept = []
    for c, n_c in enumerate(counts):
        idx = np.flatnonzero(targets == c)
        rng.shuffle(idx)
        kept.append(idx[:n_c])
    return np.concatenate(kept).astype(np.int64) if kept else np.zeros(0, dtype=np.int64)


def shot_groups(train_counts: Sequence[int]) -> dict[str, list[int]]:
    """Classes per shot group from nominal train counts: many (> 100), medium (20-100), few (< 20)."""
    groups: dict[str, list[int]] = {"many": [], "medium": [], "few": []}
    for c, n in enumerate(train_counts):
        key = "many" if n > MANY_SHOT_ABOVE else "few" if n < FEW_SHOT_BELOW else "medium"
        groups[key].append(c)
    return groups


class TransformedDataset(Dataset):
    """A (PIL image, label) dataset seen through a transform; labels stay readable without decoding.

    Lets one loaded CIFAR/SVHN object serve both augmented and evaluation views without loading the
    arrays twice.
    """

    def __init__(self, base: Dataset, targets: Sequence[int], transform: Callable | None):
        self.base = base
        self.targets = targets
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        image, label = self.base[i]
        if self.transform is not None:
            image = self.transform(image)
        return image, int(label)


class ImageFiles(Dataset):
    """Image files decoded lazily (PIL, RGB), one per ``__getitem__``; ``samples``/``targets`` give
    labels without opening any file."""

    def __init__(self, samples: list[tuple[str, int]], transform: Callable | None,
                 targets: list[int] | None = None, mode: str = "RGB"):
        self.samples = samples
        self.targets = targets if targets is not None else [label for _, label in samples]
        self.transform = transform
        self.mode = mode  # "L" for image folders whose images are all grayscale

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        image = open_image(path, self.mode)
        if self.transform is not None:
            image = self.transform(image)
        return image, label


#: PIL modes of single-channel images (an image folder of only these stays one channel)
GRAYSCALE_MODES = ("1", "L", "I", "I;16", "F")
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


def _open_rgb(paths: Iterable[str]) -> Iterator:
    for path in paths:
        yield open_image(path, "RGB")


def _hwc_uint8(array: np.ndarray, image_size: int) -> Tensor:
    """A torchvision dataset's ``[N, H, W, C]`` uint8 array as ``[N, C, S, S]``, resized once when ``S`` differs."""
    pixels = torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2).contiguous()
    if pixels.shape[-1] == image_size:
        return pixels
    from PIL import Image

    return _resized_uint8((Image.fromarray(a) for a in array), len(array), image_size)


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


# --------------------------------------------------------------------------------------- digits


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[Tensor, Tensor]:
    """sklearn's 1 797 8x8 digits as ``[N, 1, 8, 8]`` floats in [0, 1] and labels."""
    table = _read_digits_csv()
    if table is None:
        from sklearn.datasets import load_digits

        bunch = load_digits()
        pixels, target = bunch.data, bunch.target
    else:
        pixels, target = table[:, :-1], table[:, -1]
    images = torch.as_tensor(pixels, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    return images, torch.as_tensor(target, dtype=torch.long)


def _read_digits_csv() -> np.ndarray | None:
    """The table behind ``load_digits()`` read straight from scikit-learn's package data, which
    skips the ~3 s import of sklearn; None when the file is not where it is expected."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            return np.loadtxt(path, delimiter=",")
    return None


class DigitsSource(_Source):
    """The embedded default: sklearn's 1 797 handwritten digits (8x8 grayscale, 10 classes).

    No official split exists, so all four are seeded stratified hold-outs: test 20 %, validation pool
    30 % (val 15 % + cal 15 %), train the remaining ~50 %. Images are upsampled 8 -> 32 px by default
    so a T2T-ViT gets 4 patch tokens, as in the paper's 32 px SVHN setup. The bilinear resize and the
    normalisation statistics (mean/std of the train split) are computed once on the whole in-memory tensor; train
    augmentation is a random shift of up to ``image_size // 8`` pixels (one original pixel at 32 px), padding
    with black, applied to whole batches (:mod:`eedn.image_batches`).
    """

    name = "digits"
    num_classes = 10
    channels = 1
    default_image_size = 32
    suggested_backbone_epochs = 20

    @dataclass
    class Options:
        val_fraction: float = _fraction_option("share of the images held out as the validation pool", 0.3)
        cal_fraction: float = _fraction_option("share of the validation pool that becomes cal", 0.5)
        test_fraction: float = _fraction_option("share of the images held out as test", 0.2)

    options: DigitsSource.Options

    data_key = ("val_fraction", "cal_fraction", "test_fraction")

    def splits(self, image_size: int, seed: int, augment: bool = True) -> DataSplits:
        image_size = _check_image_size(image_size)
        val_f, cal_f, test_f = (self.fraction(k) for k in ("val_fraction", "cal_fraction", "test_fraction"))
        if val_f + test_f >= 1.0:
            raise EednError(f"dataset 'digits': val_fraction + test_fraction must be < 1, got {val_f + test_f}")
        images, labels = _digits_arrays()
        parts = hold_out(labels.numpy(), val_f, cal_f, seed, test_fraction=test_f)
        _require_nonempty(self.name, parts, "use larger fractions")

        resized = images
        if image_size != images.shape[-1]:
            resized = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
        train_pixels = resized[torch.as_tensor(parts["train"])]
        mean, std = train_pixels.mean().item(), train_pixels.std().item()

        eval_ds = InMemoryImages(resized, labels, mean=[mean], std=[std])
        shift = RandomCropFlip(max(1, image_size // 8), flip=False) if augment else None
        train_ds = eval_ds.view(shift)
        return DataSplits(
            name=self.name, num_classes=self.num_classes,
            train=subset(train_ds, parts["train"]), val=subset(eval_ds, parts["val"]),
            cal=subset(eval_ds, parts["cal"]), test=subset(eval_ds, parts["test"]),
            class_names=[str(c) for c in range(10)], train_eval=subset(eval_ds, parts["train"]),
            info=self._info(image_size, seed, augment, mean=[mean], std=[std]),
        )


# ---------------------------------------------------------------------------------------- CIFAR


class CifarSource(_Source):
    """CIFAR-10 from ``data_dir`` (torchvision layout, never downloaded).

    Val pool: ``val_size`` images held out of the official train split (stratified, seeded), split
    into val and cal by ``cal_fraction``; test is the official test split. Train: resize (when not
    32 px), random crop with ``image_size // 8`` padding, horizontal flip, normalise.
    Default image size 224, the paper's upsampled CIFAR setup.
    """

    name = "cifar10"
    label = "CIFAR-10"
    folder = "cifar-10-batches-py"
    num_classes = 10
    channels = 3
    default_image_size = 224
    mean, std = CIFAR10_MEAN, CIFAR10_STD
    data_key = ("val_size", "cal_fraction")

    @dataclass
    class Options:
        data_dir: str | None = option(None, "folder holding the dataset files (default: $EEDN_DATA_DIR or ./data)")
        val_size: int = option(5000, "images held out of the train split as the validation pool", min=1)
        cal_fraction: float = _fraction_option("share of the validation pool that becomes cal", 0.5)
        in_memory_mb: int = _in_memory_option()

    options: CifarSource.Options

    def data_dir(self) -> Path:
        return Path(self.options.data_dir or default_data_dir()).expanduser()

    def _load(self, train: bool):
        """The torchvision dataset object (images decoded as PIL on access)."""
        from torchvision import datasets

        root = self.data_dir()
        if not (root / self.folder).is_dir():
            raise EednError(f"{self.label} not found under {root}: put the extracted '{self.folder}' folder "
                            "there (eedn never downloads)")
        cls = datasets.CIFAR100 if self.num_classes == 100 else datasets.CIFAR10
        try:
            return cls(root=str(root), train=train, download=False)
        except (RuntimeError, OSError) as err:
            raise EednError(f"{self.label} under {root / self.folder} is incomplete or corrupted ({err}); "
                            f"replace it with a fresh extracted '{self.folder}' folder") from None

    def _val_fraction(self, n: int) -> float:
        val_size = self.options.val_size
        if val_size >= n:
            raise EednError(f"dataset '{self.name}': val_size must be less than the {n} train images, got {val_size}")
        return val_size / n

    def views(self, train_base, test_base, image_size: int, augment: bool,
              normalise: bool = True) -> tuple[Dataset, Dataset, Dataset]:
        """(train, eval, test) views: in memory (uint8, batched augmentation) when the pixels fit
        ``in_memory_mb``, else torchvision's per-sample transforms."""
        train_targets, test_targets = _targets(train_base), _targets(test_base)
        mean, std = (self.mean, self.std) if normalise else (None, None)
        if _fits_in_memory(len(train_targets) + len(test_targets), 3, image_size, self.options.in_memory_mb):
            eval_view = InMemoryImages(self._pixels(train_base, image_size), torch.tensor(train_targets), mean, std)
            test_view = InMemoryImages(self._pixels(test_base, image_size), torch.tensor(test_targets), mean, std)
            return eval_view.view(_augment(image_size, augment)), eval_view, test_view
        train_tf, eval_tf = cifar_transforms(image_size, mean, std, augment)
        return (TransformedDataset(train_base, train_targets, train_tf),
                TransformedDataset(train_base, train_targets, eval_tf),
                TransformedDataset(test_base, test_targets, eval_tf))

    def _pixels(self, base, image_size: int) -> Tensor:
        return _hwc_uint8(base.data, image_size)

    def splits(self, image_size: int, seed: int, augment: bool = True) -> DataSplits:
        image_size = _check_image_size(image_size)
        cal_f = self.fraction("cal_fraction")
        train_base, test_base = self._load(True), self._load(False)
        train_targets = list(train_base.targets)
        parts = hold_out(np.asarray(train_targets), self._val_fraction(len(train_targets)), cal_f, seed)
        _require_nonempty(self.name, parts, "use a larger val_size")
        train_view, eval_view, test_view = self.views(train_base, test_base, image_size, augment)
        return DataSplits(
            name=self.name, num_classes=self.num_classes,
            train=subset(train_view, parts["train"]), val=subset(eval_view, parts["val"]),
            cal=subset(eval_view, parts["cal"]), test=test_view, class_names=list(train_base.classes),
            train_eval=subset(eval_view, parts["train"]),
            info=self._info(image_size, seed, augment, mean=list(self.mean), std=list(self.std)),
        )


class Cifar100Source(CifarSource):
    """CIFAR-100 from ``data_dir``: as CIFAR-10 with a 10 000-image val pool and CIFAR-100 statistics."""

    name = "cifar100"
    label = "CIFAR-100"
    folder = "cifar-100-python"
    num_classes = 100
    mean, std = CIFAR100_MEAN, CIFAR100_STD

    @dataclass
    class Options(CifarSource.Options):
        val_size: int = option(10000, "images held out of the train split as the validation pool", min=1)

    options: Cifar100Source.Options


class LongTailCifarSource(CifarSource):
    """Long-tailed CIFAR-100 (LDAM, Cao et al., NeurIPS 2019): exponential profile with ``imbalance``
    (largest / smallest class, default 100), per-class shuffle with ``RandomState(0)`` keeping the first
    n_c images.

    The val pool (``val_size``, default 1 000) is held out of the long-tailed train set. The test set
    is imbalanced the same way (n_max = official test images per class) and in class order, head
    classes first; ``test_profile="balanced"`` uses the full official test split instead. ``info``
    gives the nominal per-class train counts and the many/medium/few shot groups.
    """

    name = "cifar100-lt"
    label = "CIFAR-100"
    folder = "cifar-100-python"
    num_classes = 100
    mean, std = CIFAR100_MEAN, CIFAR100_STD
    n_max_train = 500
    data_key = ("imbalance", "val_size", "cal_fraction", "test_profile")

    @dataclass
    class Options(CifarSource.Options):
        val_size: int = option(1000, "images held out of the long-tailed train set as the validation pool", min=1)
        imbalance: float = option(100.0, "largest / smallest class size", min=1)
        test_profile: str = option("imbalanced", "test split: long-tailed like train (imbalanced) or the full "
                                                 "official one (balanced)", choices=("imbalanced", "balanced"))

    options: LongTailCifarSource.Options

    def train_counts(self) -> list[int]:
        return long_tail_counts(self.n_max_train, self.num_classes, self.options.imbalance)

    def splits(self, image_size: int, seed: int, augment: bool = True) -> DataSplits:
        image_size = _check_image_size(image_size)
        cal_f = self.fraction("cal_fraction")
        profile = self.options.test_profile
        counts = self.train_counts()
        train_base, test_base = self._load(True), self._load(False)
        train_targets, test_targets = list(train_base.targets), list(test_base.targets)

        lt_train = long_tail_indices(train_targets, counts, seed=0)
        lt_labels = np.asarray(train_targets)[lt_train]
        parts = hold_out(lt_labels, self._val_fraction(len(lt_train)), cal_f, seed)
        _require_nonempty(self.name, parts, "use a larger val_size")
        parts = {k: lt_train[v] for k, v in parts.items()}

        test_counts = [test_targets.count(c) for c in range(self.num_classes)]
        if profile == "imbalanced":
            test_counts = long_tail_counts(max(test_counts), self.num_classes, self.options.imbalance)
            test_idx = long_tail_indices(test_targets, test_counts, seed=0)
        else:
            test_idx = np.arange(len(test_targets), dtype=np.int64)

        train_view, eval_view, test_view = self.views(train_base, test_base, image_size, augment)
        return DataSplits(
            name=self.name, num_classes=self.num_classes,
            train=subset(train_view, parts["train"]), val=subset(eval_view, parts["val"]),
            cal=subset(eval_view, parts["cal"]), test=subset(test_view, test_idx),
            class_names=list(train_base.classes), train_eval=subset(eval_view, parts["train"]),
            info=self._info(image_size, seed, augment, mean=list(self.mean), std=list(self.std),
                            train_counts=counts, test_counts=test_counts, shot_groups=shot_groups(counts)),
        )


class LongTailCifar10Source(LongTailCifarSource):
    """Long-tailed CIFAR-10: 5 000 ... 50 images per class at imbalance 100 (12 406 in all)."""

    name = "cifar10-lt"
    label = "CIFAR-10"
    folder = "cifar-10-batches-py"
    num_classes = 10
    mean, std = CIFAR10_MEAN, CIFAR10_STD
    n_max_train = 5000


# ----------------------------------------------------------------------------------------- SVHN


class SvhnSource(CifarSource):
    """SVHN ('train' split only, no 'extra') from ``data_dir``: ToTensor only, no normalisation and no
    augmentation, as in the official JEI-DNN code; a 5 000-image val pool split into val and cal; test =
    the official test split."""

    name = "svhn"
    label = "SVHN"
    num_classes = 10
    default_image_size = 32
    files = ("train_32x32.mat", "test_32x32.mat")

    def _load(self, train: bool):
        from torchvision import datasets

        root = self.data_dir()
        missing = [f for f in self.files if not (root / f).is_file()]
        if missing:
            raise EednError(f"SVHN not found under {root}: put {' and '.join(repr(f) for f in self.files)} "
                            "there (eedn never downloads)")
        try:
            return datasets.SVHN(root=str(root), split="train" if train else "test", download=False)
        except (RuntimeError, OSError, ValueError) as err:
            raise EednError(f"SVHN under {root} is incomplete or corrupted ({err}); replace "
                            f"{' and '.join(self.files)} with fresh copies") from None

    def _pixels(self, base, image_size: int) -> Tensor:
        return _hwc_uint8(base.data.transpose(0, 2, 3, 1), image_size)  # SVHN stores [N, C, H, W]

    def splits(self, image_size: int, seed: int, augment: bool = True) -> DataSplits:
        image_size = _check_image_size(image_size)
        cal_f = self.fraction("cal_fraction")
        train_base, test_base = self._load(True), self._load(False)
        train_targets = [int(t) for t in train_base.labels]
        parts = hold_out(np.asarray(train_targets), self._val_fraction(len(train_targets)), cal_f, seed)
        _require_nonempty(self.name, parts, "use a larger val_size")
        _, view, test_view = self.views(train_base, test_base, image_size, augment=False, normalise=False)
        return DataSplits(
            name=self.name, num_classes=self.num_classes,
            train=subset(view, parts["train"]), val=subset(view, parts["val"]), cal=subset(view, parts["cal"]),
            test=test_view, class_names=[str(c) for c in range(10)], train_eval=subset(view, parts["train"]),
            info=self._info(image_size, seed, augment, augmentation="none"),
        )


# --------------------------------------------------------------------------------- image folder


def _fingerprint(path: Path) -> str:
    """A short hash of an archive's resolved path, size and modification time."""
    st = path.stat()
    blob = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def extract_once(archive: Path, cache_dir: str | os.PathLike | None = None) -> Path:
    """Extract a tar archive into ``cache_dir/<fingerprint>`` once and return that directory.

    Extraction goes to a temporary sibling that is renamed into place, so an interrupted or
    concurrent extraction never leaves a half-filled directory that a later run would trust.
    """
    base = Path(cache_dir or Path(os.environ.get("EEDN_CACHE") or "~/.cache/eedn") / "datasets").expanduser()
    target = base / _fingerprint(archive)
    if target.is_dir():
        return target
    base.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(base)  # what killed extractions left
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(target.name), suffix=".tmpdir", dir=base))
    try:
        _extract_regular_files(archive, tmp)
    except EednError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise EednError(f"cannot extract {archive} as a tar archive ({err}); give a .tar.gz holding "
                        "train/<class>/<image files>") from None
    try:
        os.rename(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not target.is_dir():
            raise
    return target


def _extract_regular_files(archive: Path, dest: Path) -> None:
    """Stream a tar archive into ``dest``, writing only directories and regular files.

    Links, devices and the like are skipped and a member escaping ``dest`` (absolute, ``..``) is an
    error, which is all an image folder needs; it is also ~3x faster than ``extractall`` with the
    ``data`` filter on 50 000 small JPEGs, since no metadata is restored.
    """
    made: set[Path] = set()
    with tarfile.open(archive, "r|*") as tar:
        for member in tar:
            parts = PurePosixPath(member.name).parts
            if parts and (parts[0] == "/" or ".." in parts):
                raise EednError(f"{archive} holds a member outside its folder ({member.name!r}); refusing to "
                                "extract it")
            if not parts or not (member.isdir() or member.isfile()):
                continue
            out = dest.joinpath(*parts)
            if member.isdir():
                out.mkdir(parents=True, exist_ok=True)
                continue
            if out.parent not in made:
                out.parent.mkdir(parents=True, exist_ok=True)
                made.add(out.parent)
            source = tar.extractfile(member)
            with open(out, "wb") as sink:
                shutil.copyfileobj(source, sink)


def _image_files(folder: Path) -> list[str]:
    files = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files.extend(os.path.join(dirpath, f) for f in sorted(filenames)
                     if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."))
    return files


def _class_dirs(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


class ImageFolderSource(_Source):
    """Images under ``data_dir`` (a directory or a ``.tar.gz``) laid out as ``train/<class>/*`` and
    optionally ``test/<class>/*``; class names are the sorted ``train/`` folder names.

    A ``.tar.gz`` is extracted once into ``cache_dir/<hash of path, size, mtime>`` (default
    ``<the run's cache directory>/datasets``) and reused. Without ``test/``, a seeded stratified
    ``test_fraction`` of ``train/`` becomes the test split. The val pool is ``val_fraction`` of the
    ``train/`` images, split into val and cal by ``cal_fraction``. Images are decoded lazily, one per
    sample, or all at once into memory when they fit ``in_memory_mb`` (:mod:`eedn.image_batches`).
    The data decides the rest: images that are all grayscale stay one channel; the normalisation is the
    per-channel mean/std of (up to ``stats_images`` of) the train split unless ``mean``/``std`` are given;
    ``augment=auto`` crops with padding and flips colour images only (a mirrored character is another
    symbol), or ``crop-flip``, ``crop``, ``none``. The default image size is that of the first train image.
    """

    name = "image-folder"
    data_key = ("val_fraction", "cal_fraction", "test_fraction", "mean", "std", "augment", "stats_images")

    @dataclass
    class Options:
        data_dir: str = option(MISSING, "a directory or .tar.gz holding train/<class>/<image files>; "
                                         "--data-dir sets it")
        cache_dir: str | None = option(None, "where a .tar.gz is extracted (default: <the run's cache>/datasets)")
        val_fraction: float = _fraction_option("share of train/ held out as the validation pool", 0.1)
        cal_fraction: float = _fraction_option("share of the validation pool that becomes cal", 0.5)
        test_fraction: float = _fraction_option("share of train/ held out as test when there is no test/", 0.1)
        mean: list[float] | None = option(None, "per-channel normalisation mean (default: the train split's)")
        std: list[float] | None = option(None, "per-channel normalisation std (default: the train split's)")
        augment: str = option("auto", "training augmentation: auto (crop, plus flips for colour images), "
                                      "crop-flip, crop or none", choices=("auto", "crop-flip", "crop", "none"))
        stats_images: int = option(2000, "train images the default mean/std are computed on", min=1)
        in_memory_mb: int = _in_memory_option()

    options: ImageFolderSource.Options

    def __init__(self, **options: Any):
        super().__init__(**options)
        self.path = Path(self.options.data_dir).expanduser()
        if not self.path.exists():
            raise EednError(f"image folder {self.path} does not exist; give a directory or .tar.gz holding "
                            "train/<class>/<image files>")
        self._tree: dict | None = None

    def describe(self) -> dict:
        out = super().describe()
        out["path"] = str(self.path.resolve())
        if self.path.is_file():
            out["archive"] = _fingerprint(self.path)
        return out

    def root(self) -> Path:
        """The directory holding ``train/`` (extracting an archive first)."""
        root = self.path if self.path.is_dir() else extract_once(self.path, self.options.cache_dir)
        if not (root / "train").is_dir():
            inner = _class_dirs(root)
            if len(inner) == 1 and (root / inner[0] / "train").is_dir():
                return root / inner[0]  # an archive wrapping everything in one top-level folder
            raise EednError(f"image folder {self.path} has no train/ folder; lay it out as "
                            "train/<class>/<image files> (optionally test/<class>/...)")
        return root

    def tree(self) -> dict:
        """Class names and (path, label) samples of train/ and, when present, test/ (scanned once)."""
        if self._tree is not None:
            return self._tree
        root = self.root()
        classes = _class_dirs(root / "train")
        if not classes:
            raise EednError(f"image folder {root / 'train'} has no class folders; lay it out as "
                            "train/<class>/<image files>")
        index = {c: i for i, c in enumerate(classes)}
        train = [(f, index[c]) for c in classes for f in _image_files(root / "train" / c)]
        if not train:
            raise EednError(f"image folder {root / 'train'} holds no image files "
                            f"({', '.join(IMAGE_EXTENSIONS)}) in its class folders")
        empty = [c for c in classes if not any(label == index[c] for _, label in train)]
        if empty:
            raise EednError(f"image folder {root / 'train'}: class folder(s) {', '.join(empty)} hold no image "
                            "files; add images or remove the folders")
        if len(classes) < 2:
            raise EednError(f"image folder {root / 'train'} has one class folder ({classes[0]}); a classifier "
                            "needs at least two classes")
        test = None
        if (root / "test").is_dir():
            test_classes = _class_dirs(root / "test")
            foreign = [c for c in test_classes if c not in index]
            if foreign:
                raise EednError(f"image folder {root / 'test'}: class folder(s) {', '.join(foreign)} are not in "
                                "train/; test classes must be train classes")
            test = [(f, index[c]) for c in test_classes for f in _image_files(root / "test" / c)]
            if not test:
                raise EednError(f"image folder {root / 'test'} holds no image files; fill it or remove it")
        self._tree = {"root": root, "classes": classes, "train": train, "test": test}
        return self._tree

    @property
    def num_classes(self) -> int:  # type: ignore[override]
        return len(self.tree()["classes"])

    @functools.cached_property
    def channels(self) -> int:  # type: ignore[override]
        """1 when every image (train/ and test/) is grayscale (read from the file headers), else 3."""
        from PIL import Image

        tree = self.tree()
        for path, _ in tree["train"] + (tree["test"] or []):
            try:
                with Image.open(path) as im:
                    if im.mode not in GRAYSCALE_MODES:
                        return 3
            except (Image.DecompressionBombError, OSError, ValueError):
                return 3  # decoding later names the file
        return 1

    def _augment_mode(self) -> str:
        mode = self.options.augment
        return ("crop-flip" if self.channels == 3 else "crop") if mode == "auto" else mode

    def _statistics(self, samples: list, train_positions: np.ndarray, image_size: int,
                    seed: int) -> tuple[list[float], list[float], str]:
        """The given mean/std, else those of a seeded sample of the train split at ``image_size``."""
        if self.options.mean is not None and self.options.std is not None:
            return list(self.options.mean), list(self.options.std), "given"
        _, eval_tf = cifar_transforms(image_size, None, None, False, native_size=None, center_crop=True)
        picked = np.random.default_rng(seed).permutation(train_positions)[: self.options.stats_images]
        mode = "L" if self.channels == 1 else "RGB"
        mean, std = channel_statistics(eval_tf(open_image(samples[int(i)][0], mode)) for i in picked)
        return mean, std, f"{len(picked)} train images"

    @property
    def default_image_size(self) -> int:  # type: ignore[override]
        """The larger side of the first train image (read from its header, not decoded)."""
        from PIL import Image

        path = self.tree()["train"][0][0]
        try:
            with Image.open(path) as im:
                return max(im.size)
        except (Image.DecompressionBombError, OSError, ValueError):
            return max(open_image(path, "RGB").size)  # raises the one-line error naming the file

    def views(self, tree: dict, image_size: int, augment: bool, mean: list[float],
              std: list[float]) -> tuple[Dataset, Dataset, Dataset | None]:
        """(train, eval, test or None) views: decoded once into memory when the pixels fit ``in_memory_mb`` and
        every image is square once resized (colour images), else decoded per sample with torchvision
        transforms."""
        samples, test = tree["train"], tree["test"] or []
        mode = self._augment_mode()
        augment = augment and mode != "none"
        if self.channels == 3 and _fits_in_memory(len(samples) + len(test), 3, image_size,
                                                  self.options.in_memory_mb):
            pixels = _resized_uint8(_open_rgb(p for p, _ in samples), len(samples), image_size)
            test_pixels = (_resized_uint8(_open_rgb(p for p, _ in test), len(test), image_size)
                           if test and pixels is not None else None)
            if pixels is not None and (not test or test_pixels is not None):
                eval_view = InMemoryImages(pixels, torch.tensor([y for _, y in samples]), mean, std, samples=samples)
                test_view = (InMemoryImages(test_pixels, torch.tensor([y for _, y in test]), mean, std, samples=test)
                             if test else None)
                crop = RandomCropFlip(image_size // 8, flip=mode == "crop-flip") if augment else None
                return eval_view.view(crop), eval_view, test_view
        train_tf, eval_tf = cifar_transforms(image_size, mean, std, augment, native_size=None, center_crop=True)
        if augment and mode == "crop":
            from torchvision import transforms as T

            train_tf = T.Compose([t for t in train_tf.transforms if not isinstance(t, T.RandomHorizontalFlip)])
        pil_mode = "L" if self.channels == 1 else "RGB"
        test_view = ImageFiles(test, eval_tf, mode=pil_mode) if test else None
        return ImageFiles(samples, train_tf, mode=pil_mode), ImageFiles(samples, eval_tf, mode=pil_mode), test_view

    def splits(self, image_size: int, seed: int, augment: bool = True) -> DataSplits:
        image_size = _check_image_size(image_size)
        val_f = self.fraction("val_fraction")
        cal_f = self.fraction("cal_fraction")
        tree = self.tree()
        samples = tree["train"]
        targets = [label for _, label in samples]
        test_f = 0.0
        if tree["test"] is None:
            test_f = self.fraction("test_fraction")
            if val_f + test_f >= 1.0:
                raise EednError(f"dataset 'image-folder': val_fraction + test_fraction must be < 1, "
                                f"got {val_f + test_f}")
        parts = hold_out(np.asarray(targets), val_f, cal_f, seed, test_fraction=test_f)
        _require_nonempty(self.name, parts, "add images or use larger fractions")
        mean, std, stats_from = self._statistics(samples, parts["train"], image_size, seed)
        train_view, eval_view, test = self.views(tree, image_size, augment, mean, std)
        if test is None:
            test = subset(eval_view, parts["test"])
        return DataSplits(
            name=self.name, num_classes=len(tree["classes"]),
            train=subset(train_view, parts["train"]), val=subset(eval_view, parts["val"]),
            cal=subset(eval_view, parts["cal"]), test=test, class_names=list(tree["classes"]),
            train_eval=subset(eval_view, parts["train"]),
            info=self._info(image_size, seed, augment, mean=mean, std=std, statistics_from=stats_from,
                            channels=self.channels, augmentation=self._augment_mode() if augment else "none",
                            root=str(tree["root"]),
                            test_from=("test/" if tree["test"] is not None else f"{test_f:g} of train/")),
        )
