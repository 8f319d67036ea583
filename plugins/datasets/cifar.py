"""CIFAR-10, CIFAR-100 and their long-tailed versions, from ``data_dir`` in torchvision's layout."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from torch import Tensor

from eedn.core.data import DataSplits, hold_out, subset
from eedn.runtime.errors import EednError
from eedn.core.options import option
from eedn_plugins.datasets.common import ArrayOptions, _ArraySource, _check_image_size, _hwc_uint8, _require_nonempty

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.24703, 0.24348, 0.26158)
CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)
#: shot groups of long-tailed benchmarks, by nominal train images per class: many > 100, few < 20.
MANY_SHOT_ABOVE = 100
FEW_SHOT_BELOW = 20


# ------------------------------------------------------------------------------------- long tail


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


def long_tail_indices(targets: Sequence[int] | np.ndarray, counts: Sequence[int], seed: int = 0) -> np.ndarray:
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


# ---------------------------------------------------------------------------------------- sources


class CifarSource(_ArraySource):
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
    default_image_size = 224
    mean, std = CIFAR10_MEAN, CIFAR10_STD

    Options = ArrayOptions
    options: ArrayOptions

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
    class Options(ArrayOptions):  # CifarSource.Options
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
    class Options(ArrayOptions):  # CifarSource.Options
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
