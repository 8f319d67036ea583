"""SVHN from its official ``.mat`` files in ``data_dir``."""
from __future__ import annotations

import numpy as np
from torch import Tensor

from eedn.core.data import DataSplits, hold_out, subset
from eedn.runtime.errors import EednError
from eedn_plugins.datasets.common import ArrayOptions, _ArraySource, _check_image_size, _hwc_uint8, _require_nonempty


class SvhnSource(_ArraySource):
    """SVHN ('train' split only, no 'extra') from ``data_dir``: ToTensor only, no normalisation and no
    augmentation, as in the official JEI-DNN code; a 5 000-image val pool split into val and cal; test =
    the official test split."""

    name = "svhn"
    label = "SVHN"
    num_classes = 10
    default_image_size = 32
    files = ("train_32x32.mat", "test_32x32.mat")

    Options = ArrayOptions
    options: ArrayOptions

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
        _, view, test_view = self.views(train_base, test_base, image_size, augment=False)
        return DataSplits(
            name=self.name, num_classes=self.num_classes,
            train=subset(view, parts["train"]), val=subset(view, parts["val"]), cal=subset(view, parts["cal"]),
            test=test_view, class_names=[str(c) for c in range(10)], train_eval=subset(view, parts["train"]),
            info=self._info(image_size, seed, augment, augmentation="none"),
        )
