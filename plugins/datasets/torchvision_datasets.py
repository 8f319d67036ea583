"""Any torchvision classification dataset from local files: ``--dataset torchvision:<ClassName> --data-dir ROOT``.

The class is torchvision's own (``torchvision.datasets.FashionMNIST``, ``CIFAR10``, ``SVHN``, ``GTSRB``, ...), built
with ``download=False``: the files must already be under ``ROOT`` in the layout torchvision reads (eedn never
downloads). Reading them is torchvision's code; note that some of its loaders unpickle their files (CIFAR's python
batches), so point ``--data-dir`` at data you trust, as with any dataset.

What the data decides, not CIFAR-10's defaults:

* channels (1 for grayscale images, 3 otherwise), classes (``classes`` or the labels) and the default image size
  (the first training image's larger side);
* normalisation: per-channel mean/std computed on the train split (up to ``stats_images`` of its images), recorded
  in results.json and run.json, unless ``mean``/``std`` are given;
* augmentation (``augment=auto``): random crop with padding for every dataset, plus horizontal flips for colour
  images only; grayscale sets are mostly characters and digits, where a mirror image is another symbol.

Splits follow the clean protocol (docs/evaluation.md): the val pool is held out of the train split (stratified,
seeded) and split into val and cal; test is the official test split when the class has one (``train=False`` or
``split="test"``), else ``test_fraction`` of the data.
"""
from __future__ import annotations

import inspect
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from eedn.core.contracts import DatasetSource
from eedn.core.data import DataSplits, MappedDataset, channel_statistics, dataset_labels, hold_out, subset
from eedn.runtime.errors import EednError
from eedn.core.options import option

AUGMENTS = ("auto", "crop-flip", "crop", "none")


class ConvertMode:
    """PIL image -> the given mode ("L" or "RGB"); a class rather than a lambda so data loader workers can pickle it."""

    def __init__(self, mode: str):
        self.mode = mode

    def __call__(self, image):
        return image.convert(self.mode)


@dataclass
class TorchvisionOptions:
    data_dir: str = option(MISSING, "the root directory torchvision reads the dataset from (--data-dir sets it)")
    val_fraction: float = option(0.1, "share of the train split held out as the validation pool", min=0.0, max=1.0)
    cal_fraction: float = option(0.5, "share of the validation pool that becomes cal", min=0.0, max=1.0)
    test_fraction: float = option(0.1, "share held out as test when the class has no test split", min=0.0, max=1.0)
    augment: str = option("auto", "training augmentation: auto (crop, plus flips for colour images), crop-flip, "
                                  "crop or none", choices=AUGMENTS)
    mean: list[float] | None = option(None, "per-channel normalisation mean (default: computed on the train split)")
    std: list[float] | None = option(None, "per-channel normalisation std (default: computed on the train split)")
    stats_images: int = option(10000, "train images the mean/std are computed on (a seeded sample)", min=1)


class TorchvisionSource(DatasetSource):
    """``torchvision:<ClassName>`` (see the module docstring)."""

    Options = TorchvisionOptions

    def __init__(self, variant: str, **options: Any):
        super().__init__(**options)
        self.variant = variant
        self.name = f"torchvision:{variant}"
        for key in ("val_fraction", "cal_fraction", "test_fraction"):
            value = getattr(self.options, key)
            if not 0.0 < value < 1.0:
                raise EednError(f"dataset '{self.name}': option {key} must be strictly between 0 and 1, "
                                f"got {value}")
        self.root = Path(self.options.data_dir).expanduser()
        if not self.root.is_dir():
            raise EednError(f"dataset '{self.name}': data_dir {self.root} is not a directory; give --data-dir ROOT "
                            "holding the files torchvision reads (eedn never downloads)")
        self.train_base, self.test_base = self._load()
        self.train_targets = dataset_labels(self.train_base).tolist()
        classes = getattr(self.train_base, "classes", None)
        self.class_names = [str(c) for c in classes] if classes else [str(c) for c in
                                                                      range(max(self.train_targets) + 1)]
        self.num_classes = len(self.class_names)
        first, _ = self.train_base[0]
        self.channels = 1 if getattr(first, "mode", "RGB") in ("L", "1", "I", "I;16", "F") else 3
        self.default_image_size = max(first.size)
        self.suggested_backbone_epochs = 30

    def _load(self) -> tuple[Dataset, Dataset | None]:
        import torchvision.datasets as datasets

        cls = getattr(datasets, self.variant, None)
        if not inspect.isclass(cls) or not issubclass(cls, datasets.VisionDataset):
            known = [n for n in dir(datasets) if inspect.isclass(getattr(datasets, n))
                     and issubclass(getattr(datasets, n), datasets.VisionDataset) and n != "VisionDataset"]
            close = [n for n in known if n.lower().startswith(self.variant.lower()[:3])] or known[:12]
            raise EednError(f"torchvision has no dataset class '{self.variant}'; e.g. {', '.join(close)}")
        vision_class: Any = cls  # a VisionDataset subclass (torchvision is untyped)
        params = inspect.signature(cls.__init__).parameters
        base = {"download": False} if "download" in params else {}

        def build(**kwargs: Any) -> Dataset:
            try:
                return vision_class(str(self.root), **base, **kwargs)
            except TypeError:
                raise
            except Exception as exc:  # noqa: BLE001 - torchvision's own message says which files are missing
                raise EednError(self._unreadable(exc)) from None

        if "train" in params:
            return build(train=True), build(train=False)
        if "split" in params:
            return build(split="train"), build(split="test")
        return build(), None

    def _unreadable(self, exc: Exception) -> str:
        """What to do when torchvision cannot read the files. torchvision's own advice, "use download=True",
        does not apply (eedn never downloads): compressed files it would have extracted itself are named, with
        the command that extracts them; otherwise its message, without that advice, and the expected layout."""
        packed = sorted(p for pattern in ("*.gz", "*.zip", "*.tar", "*.tgz", "*.tar.gz")
                        for p in self.root.rglob(pattern) if p.is_file())
        gz = [p for p in packed if p.name.endswith(".gz") and not p.name.endswith(".tar.gz")]
        if gz:
            folders = sorted({str(p.parent) for p in gz})
            return (f"dataset '{self.name}': {self.root} holds compressed files ({', '.join(p.name for p in gz[:4])}"
                    f"{', ...' if len(gz) > 4 else ''}) but torchvision reads them extracted; extract them in place, "
                    f"e.g. `gunzip -k {' '.join(f + '/*.gz' for f in folders)}`, then run again")
        if packed:
            return (f"dataset '{self.name}': {self.root} holds archives ({', '.join(p.name for p in packed[:4])}) "
                    "that torchvision did not accept as they are; extract them in place (e.g. `tar -xf FILE -C "
                    f"{self.root}`) or check they are the files torchvision expects, then run again")
        message = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        message = message.replace(" You can use download=True to download it", "")
        return (f"dataset '{self.name}': torchvision cannot read it from {self.root} ({message}); put its files "
                f"there in torchvision's layout, e.g. {self.root}/{self.variant}/raw/ for MNIST-style sets (eedn "
                "never downloads)")

    def describe(self) -> dict:
        keys = ("val_fraction", "cal_fraction", "test_fraction", "augment", "mean", "std", "stats_images")
        return {"name": self.name, "root": str(self.root.resolve()), **{k: getattr(self.options, k) for k in keys}}

    def _statistics(self, train_positions: np.ndarray, seed: int) -> tuple[list[float], list[float], str]:
        from torchvision.transforms.functional import pil_to_tensor

        if self.options.mean is not None and self.options.std is not None:
            return list(self.options.mean), list(self.options.std), "given"
        picked = np.random.default_rng(seed).permutation(train_positions)[: self.options.stats_images]
        convert = ConvertMode("L" if self.channels == 1 else "RGB")
        images = (pil_to_tensor(convert(self.train_base[int(i)][0])).float() / 255.0 for i in picked)
        mean, std = channel_statistics(images)
        return mean, std, f"{len(picked)} train images"

    def _transforms(self, image_size: int, mean: list[float], std: list[float], augment: bool):
        from torchvision import transforms as T

        convert = ConvertMode("L" if self.channels == 1 else "RGB")
        resize = [] if image_size == self.default_image_size else [T.Resize(image_size), T.CenterCrop(image_size)]
        tail = [T.ToTensor(), T.Normalize(mean, std)]
        eval_tf = T.Compose([convert, *resize, *tail])
        mode = self.options.augment
        if mode == "auto":
            mode = "crop-flip" if self.channels == 3 else "crop"
        if not augment or mode == "none":
            return eval_tf, eval_tf, "none"
        crop = [T.RandomCrop(image_size, padding=max(1, image_size // 8))]
        flip = [T.RandomHorizontalFlip()] if mode == "crop-flip" else []
        return T.Compose([convert, *resize, *crop, *flip, *tail]), eval_tf, mode

    def splits(self, image_size: int, seed: int, augment: bool = True) -> DataSplits:
        if int(image_size) < 1:
            raise EednError(f"image_size must be a positive number of pixels, got {image_size}")
        test_f = 0.0 if self.test_base is not None else self.options.test_fraction
        parts = hold_out(np.asarray(self.train_targets), self.options.val_fraction, self.options.cal_fraction,
                         seed, test_fraction=test_f)
        empty = [k for k, v in parts.items() if len(v) == 0]
        if empty:
            raise EednError(f"dataset '{self.name}': split(s) {', '.join(empty)} came out empty; use larger fractions")
        mean, std, stats_from = self._statistics(parts["train"], seed)
        train_tf, eval_tf, used = self._transforms(int(image_size), mean, std, augment)
        train_view = MappedDataset(self.train_base, self.train_targets, train_tf)
        eval_view = MappedDataset(self.train_base, self.train_targets, eval_tf)
        test: Dataset
        if self.test_base is None:
            test = subset(eval_view, parts["test"])
        else:
            test = MappedDataset(self.test_base, dataset_labels(self.test_base).tolist(), eval_tf)
        return DataSplits(
            name=self.name, num_classes=self.num_classes, train=subset(train_view, parts["train"]),
            val=subset(eval_view, parts["val"]), cal=subset(eval_view, parts["cal"]), test=test,
            class_names=self.class_names, train_eval=subset(eval_view, parts["train"]),
            info={"source": self.describe(), "image_size": int(image_size), "seed": seed, "augment": used,
                  "channels": self.channels, "mean": mean, "std": std, "statistics_from": stats_from,
                  "test_from": "official test split" if self.test_base is not None else f"{test_f:g} of train"},
        )

