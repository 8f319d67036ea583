"""Checks that run before stage 0: everything that can be known wrong without data or training (device,
output directory, cache directory) fails here in one line, not after hours of backbone training."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from eedn.core.cache import entry_problem
from eedn.core.data import DataSplits, dataset_labels
from eedn.runtime.errors import EednError, warn
from eedn.runtime.io import clean_stale_temps, load_checkpoint, load_state_dict_strict, writable_dir
from eedn.pipeline.rundir import check_out_dir

if TYPE_CHECKING:
    from eedn.core.config import Config


def check_device(device: str) -> None:
    """``cuda`` / ``cuda:N`` must name a visible GPU."""
    device = str(device)
    if not device.startswith("cuda"):
        return
    if not torch.cuda.is_available():
        raise EednError(f"device {device} was asked for, but this torch sees no CUDA GPU; use --device cpu or "
                        "install a CUDA build of torch")
    index = int(device.split(":", 1)[1]) if ":" in device else 0
    if index >= torch.cuda.device_count():
        raise EednError(f"device {device} does not exist: {torch.cuda.device_count()} CUDA device(s) are visible "
                        f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1})")


def check_before_stage_0(cfg: Config, cache_root: Path) -> bool:
    """Device, run directory and cache directory, checked before any data is read. Returns whether the cache
    can be written (a read-only cache is read, with a warning, and the run goes on uncached)."""
    check_device(cfg.device)
    if cfg.out:
        check_out_dir(cfg.out, cfg.overwrite, cache_root=cache_root)
    elif not writable_dir(Path("runs")):
        raise EednError(f"the default run directory {Path('runs').absolute()} cannot be written; give --out")
    if writable_dir(cache_root):
        for sub in ("backbones", "features"):
            clean_stale_temps(cache_root / sub)
        return True
    warn(f"cache directory {cache_root} is not writable: cached entries are read, new ones are computed and not "
         "saved (set --cache-dir or EEDN_CACHE to a writable directory to cache them)")
    return False


def load_cached_backbone(path: Path, backbone: torch.nn.Module, key: str | None = None) -> dict | None:
    """The summary of a cached backbone loaded into ``backbone``, or None (a miss) when the entry is absent,
    corrupt, fails its integrity checks (content hash; the meta it stores against ``key``) or does not fit this
    backbone: it is then trained again and the entry replaced (one warning line)."""
    if not path.exists():
        return None
    try:
        blob = load_checkpoint(path)
        if not isinstance(blob, dict) or "model" not in blob:
            raise EednError(f"{path} holds no backbone weights")
        problem = entry_problem(blob, key)
        if problem is not None:
            raise EednError(f"{path} {problem}")
        load_state_dict_strict(backbone, blob["model"], str(path))
    except EednError as exc:
        warn(f"ignoring the cached backbone: {exc}; training it again")
        return None
    return dict(blob.get("summary", {}))


def dataset_options(cfg: Config, resolved: dict) -> dict:
    """The dataset's options as given, with a ``cache_dir`` option left unset pointed at the run's cache
    (``<cache>/datasets``), so extracted archives follow ``--cache-dir`` / ``EEDN_CACHE``."""
    if "cache_dir" in resolved and resolved["cache_dir"] is None:
        return {**cfg.dataset_options, "cache_dir": str(cfg.cache_root / "datasets")}
    return dict(cfg.dataset_options)


def check_splits(dataset: str, data: DataSplits) -> None:
    """Before stage 0, for every dataset source: each split's labels can be read and lie in 0..C-1, train and
    test each hold more than one class (a one-class test split reports 100 % accuracy for any model), and the
    first sample of each split can be read (a damaged file fails here, not mid-training)."""
    c = data.num_classes
    for split in ("train", "val", "cal", "test"):
        ds = getattr(data, split)
        try:
            labels = dataset_labels(ds)
        except Exception as exc:  # noqa: BLE001 - a source's own error, said in one line
            raise EednError(f"dataset '{dataset}': cannot read the labels of the {split} split ({_why(exc)}); it is "
                            "not a classification dataset, or its files are damaged") from None
        if len(labels) == 0:
            raise EednError(f"dataset '{dataset}': the {split} split is empty")
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= c:
            bad = low if low < 0 else high
            raise EednError(f"dataset '{dataset}': the {split} split has label {bad}, outside 0..{c - 1} "
                            f"({c} classes); the label files are damaged or do not match the class list")
        present = torch.unique(labels)
        if split in ("train", "test") and len(present) < 2:
            raise EednError(f"dataset '{dataset}': every label of the {split} split is {int(present[0])}; a classifier "
                            "needs at least two classes present in train and test (the label files are damaged?)")
        try:
            ds[0]
        except Exception as exc:  # noqa: BLE001
            raise EednError(f"dataset '{dataset}': cannot read the first sample of the {split} split ({_why(exc)}); "
                            "check its files") from None


def _why(exc: BaseException) -> str:
    text = " ".join(str(exc).split())[:160]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def check_exits(backbone_name: str, num_exits: int) -> None:
    """An early-exit network needs an exit before the last one: refused before anything is trained."""
    if num_exits < 2:
        raise EednError(f"backbone '{backbone_name}' has {num_exits} exit; an early-exit network needs at least two "
                        "(choose backbone options that give more stages or exits)")


def check_classes(dataset: str, num_classes: int) -> None:
    """A one-class dataset would report 100 % accuracy for any model: refused."""
    if num_classes < 2:
        raise EednError(f"dataset '{dataset}' has {num_classes} class(es); a classifier needs at least two")
