"""The embedded default dataset: scikit-learn's 1 797 handwritten 8x8 digits, no files needed."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from eedn.core.data import DataSplits, hold_out, subset
from eedn.runtime.errors import EednError
from eedn.core.image_batches import InMemoryImages, RandomCropFlip
from eedn_plugins.datasets.common import _check_image_size, _fraction_option, _require_nonempty, _Source


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
    with black, applied to whole batches (:mod:`eedn.core.image_batches`).
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
