"""``--dataset torchvision:<ClassName>``: a torchvision dataset read from local files in its exact on-disk format
(here FashionMNIST's idx-ubyte files), with channels, classes, size and statistics taken from the data."""
from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch

import eedn
from eedn.runtime.errors import EednError, UnknownNameError
from eedn.core.plugins import create


def write_idx(path, array: np.ndarray) -> None:
    """The MNIST idx format: magic (0, 0, dtype 0x08 = ubyte, number of dimensions), big-endian sizes, bytes."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def fashion_root(tmp_path_factory):
    """A tiny FashionMNIST under root/FashionMNIST/raw/: class c is a bright bar at row 2c+4, in noise."""
    root = tmp_path_factory.mktemp("fashion")
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 300), ("t10k", 60)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 60, size=(n, 28, 28))
        for i, c in enumerate(labels):
            images[i, 2 * c + 4 : 2 * c + 6, 4:24] = 250
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return root


def test_channels_classes_size_and_statistics_come_from_the_data(fashion_root):
    source = create("dataset", "torchvision:FashionMNIST", data_dir=str(fashion_root))
    assert (source.channels, source.num_classes, source.default_image_size) == (1, 10, 28)
    data = source.splits(28, seed=0)
    assert data.sizes() == {"train": 270, "val": 10, "cal": 20, "test": 60}
    assert data.class_names[0] == "T-shirt/top"
    # the mean/std are those of the train split's pixels (not CIFAR-10's), and normalise it to 0 / 1
    from torchvision.datasets import FashionMNIST

    pixels = FashionMNIST(str(fashion_root), train=True).data.double() / 255.0
    train_pixels = pixels[torch.as_tensor(data.train.indices)]
    assert data.info["mean"] == pytest.approx([float(train_pixels.mean())], abs=1e-5)
    assert data.info["std"] == pytest.approx([float(train_pixels.std(unbiased=False))], abs=1e-5)
    x = torch.stack([data.train_eval[i][0] for i in range(len(data.train_eval))])
    assert x.shape[1:] == (1, 28, 28)
    assert float(x.mean()) == pytest.approx(0.0, abs=1e-4) and float(x.std()) == pytest.approx(1.0, abs=1e-3)
    assert data.info["augment"] == "crop"  # grayscale: no mirror images
    assert data.info["test_from"] == "official test split"


def test_pipeline_runs_and_records_the_statistics(fashion_root, eedn_cache, tmp_path):
    cfg = {"backbone": "resnet_tiny", "dataset": "torchvision:FashionMNIST", "image_size": 16,
           "dataset_options": {"data_dir": str(fashion_root)}, "backbone_training": {"epochs": 1},
           "strategy": "im-only", "strategy_options": {"epochs": 1}, "evaluators": [], "progress": False,
           "cache_dir": eedn_cache, "out": str(tmp_path / "run")}
    results = eedn.run_pipeline(cfg)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    manifest = json.loads((tmp_path / "run" / "run.json").read_text())
    assert saved["dataset"]["name"] == "torchvision:FashionMNIST" and results["dataset"]["mean"][0] > 0.1
    assert len(saved["dataset"]["mean"]) == len(saved["dataset"]["std"]) == 1
    assert manifest["input"]["channels"] == 1 and manifest["input"]["mean"] == saved["dataset"]["mean"]


def test_missing_files_and_unknown_classes_are_one_line_errors(tmp_path):
    with pytest.raises(EednError, match="torchvision cannot read it from .*eedn never downloads"):
        create("dataset", "torchvision:FashionMNIST", data_dir=str(tmp_path))
    with pytest.raises(EednError, match="torchvision has no dataset class 'FashionMnistt'"):
        create("dataset", "torchvision:FashionMnistt", data_dir=str(tmp_path))
    with pytest.raises(EednError, match="data_dir .* is not a directory"):
        create("dataset", "torchvision:FashionMNIST", data_dir=str(tmp_path / "nope"))
    with pytest.raises(UnknownNameError, match="is a family"):
        create("dataset", "torchvision")
