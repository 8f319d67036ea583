"""Any folder (or ``.tar.gz``) of images laid out as ``train/<class>/*`` and optionally ``test/<class>/*``."""
from __future__ import annotations

import functools
import os
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset

from eedn.core.data import DataSplits, MappedDataset, channel_statistics, hold_out, subset
from eedn.runtime.errors import EednError
from eedn.core.image_batches import InMemoryImages, RandomCropFlip
from eedn.runtime.image_io import IMAGE_EXTENSIONS, open_image
from eedn.core.options import option
from eedn_plugins.datasets.archive import _fingerprint, extract_once
from eedn_plugins.datasets.common import (_check_image_size, _fits_in_memory, _fraction_option, _in_memory_option,
                                          _require_nonempty, _resized_uint8, _Source, cifar_transforms)

#: PIL modes of single-channel images (an image folder of only these stays one channel)
GRAYSCALE_MODES = ("1", "L", "I", "I;16", "F")


class ImageFileList:
    """Image files decoded on access (PIL, in ``mode``: "L" for folders whose images are all grayscale, else
    "RGB"); a class so data loader workers can pickle it."""

    def __init__(self, paths: list[str], mode: str = "RGB"):
        self.paths = paths
        self.mode = mode

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        return open_image(self.paths[i], self.mode)


def image_files(samples: list[tuple[str, int]], transform: Callable | None, mode: str = "RGB") -> MappedDataset:
    """``(path, label)`` samples decoded lazily, one per ``__getitem__``; their labels are read without opening
    any file."""
    return MappedDataset(ImageFileList([path for path, _ in samples], mode), [label for _, label in samples],
                         transform, samples=samples)


def _open_rgb(paths: Iterable[str]) -> Iterator:
    for path in paths:
        yield open_image(path, "RGB")



def _image_files(folder: Path) -> list[str]:
    files: list[str] = []
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
    sample, or all at once into memory when they fit ``in_memory_mb`` (:mod:`eedn.core.image_batches`).
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
                test_view: Dataset | None = (
                    InMemoryImages(test_pixels, torch.tensor([y for _, y in test]), mean, std, samples=test)
                    if test and test_pixels is not None else None)
                crop = RandomCropFlip(image_size // 8, flip=mode == "crop-flip") if augment else None
                return eval_view.view(crop), eval_view, test_view
        train_tf, eval_tf = cifar_transforms(image_size, mean, std, augment, native_size=None, center_crop=True)
        if augment and mode == "crop":
            from torchvision import transforms as T

            train_tf = T.Compose([t for t in train_tf.transforms if not isinstance(t, T.RandomHorizontalFlip)])
        pil_mode = "L" if self.channels == 1 else "RGB"
        test_view = image_files(test, eval_tf, mode=pil_mode) if test else None
        return (image_files(samples, train_tf, mode=pil_mode), image_files(samples, eval_tf, mode=pil_mode),
                test_view)

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
