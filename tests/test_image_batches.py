"""The in-memory input pipeline: batched crop + flip equal torchvision's per-sample ops for the same draws,
draws with the same distribution, and in-memory views equal to the per-sample transforms they replace."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import functional as TF

import eedn
from eedn.core.data import dataset_labels
from eedn.core.image_batches import ImageBatches, InMemoryImages, LoaderOptions, RandomCropFlip, in_memory_rows
from eedn_plugins.datasets import digits as ds_digits
from test_datasets import fake_cifar10, make_image_tree  # noqa: F401  (fixture)


def test_batched_crop_and_flip_equal_torchvision_ops_for_the_same_offsets():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (16, 3, 12, 12), dtype=torch.uint8, generator=g)
    aug = RandomCropFlip(pad=3, flip=True)
    top, left, flipped = aug.sample(16, g)
    out = aug.apply(x, top, left, flipped)
    for i in range(16):
        ref = TF.crop(TF.pad(x[i], [3]), int(top[i]), int(left[i]), 12, 12)  # torchvision's RandomCrop(padding=3)
        if flipped[i]:
            ref = TF.hflip(ref)
        assert torch.equal(out[i], ref), i
    assert flipped.any() and not flipped.all()


def test_draws_have_torchvisions_distribution():
    """Offsets uniform on 0..2·pad and flips with p = 1/2, as RandomCrop and RandomHorizontalFlip draw them."""
    n, pad = 60_000, 4
    top, left, flipped = RandomCropFlip(pad).sample(n, torch.Generator().manual_seed(1))
    for offsets in (top, left):
        counts = torch.bincount(offsets, minlength=2 * pad + 1).double()
        assert len(counts) == 2 * pad + 1 and counts.min() > 0
        expected = n / (2 * pad + 1)
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        assert chi2 < 26.1, chi2  # chi-square, 8 degrees of freedom, p = 0.001
    assert abs(float(flipped.double().mean()) - 0.5) < 4 * 0.5 / n**0.5
    assert not RandomCropFlip(pad, flip=False).sample(100)[2].any()


def test_image_batches_cover_the_subset_in_a_seeded_order_and_match_samples():
    pixels = torch.arange(20 * 3 * 4 * 4, dtype=torch.float32).reshape(20, 3, 4, 4) % 251
    store = InMemoryImages(pixels.to(torch.uint8), torch.arange(20) % 5, mean=[0.1, 0.2, 0.3], std=[0.5, 0.6, 0.7])
    sub = torch.utils.data.Subset(store, list(range(3, 17)))
    assert in_memory_rows(sub)[1].tolist() == list(range(3, 17))
    batches = ImageBatches(sub, 4, shuffle=True, generator=torch.Generator().manual_seed(0))
    assert len(batches) == 4
    seen = torch.cat([y for _, y in batches])
    assert sorted(seen.tolist()) == sorted(dataset_labels(sub).tolist())
    plain = list(ImageBatches(sub, 5))
    x0 = torch.stack([sub[i][0] for i in range(5)])
    assert torch.equal(plain[0][0], x0)  # batch path == per-sample path, bit for bit
    again = [y for _, y in ImageBatches(sub, 4, shuffle=True, generator=torch.Generator().manual_seed(0))]
    assert torch.equal(torch.cat(again), seen)
    assert len(ImageBatches(sub, 4, drop_last=True)) == 3 and sum(len(y) for _, y in ImageBatches(sub, 4, drop_last=True)) == 12


def test_other_datasets_go_through_a_configured_dataloader():
    tensors = torch.utils.data.TensorDataset(torch.randn(10, 2), torch.arange(10))
    batches = ImageBatches(tensors, 4, order=torch.arange(9, -1, -1), loader=LoaderOptions(num_workers=0))
    assert in_memory_rows(tensors) is None
    assert torch.cat([y for _, y in batches]).tolist() == list(range(9, -1, -1))


def test_cifar_in_memory_views_equal_torchvision_transforms(fake_cifar10):  # noqa: F811
    fast = eedn.create("dataset", "cifar10", data_dir=str(fake_cifar10), val_size=40).splits(32, seed=0)
    lazy = eedn.create("dataset", "cifar10", data_dir=str(fake_cifar10), val_size=40,
                       in_memory_mb=0).splits(32, seed=0)
    assert isinstance(fast.train.dataset, InMemoryImages) and not isinstance(lazy.train.dataset, InMemoryImages)
    for split in ("val", "cal", "test", "train_eval"):
        a, b = getattr(fast, split), getattr(lazy, split)
        assert torch.equal(torch.stack([a[i][0] for i in range(6)]), torch.stack([b[i][0] for i in range(6)])), split
        assert torch.equal(dataset_labels(a), dataset_labels(b))
    # augmentation: per-sample torchvision transforms with the same draws give the same images
    store, rows = in_memory_rows(fast.train)
    base = lazy.train.dataset.base
    g = torch.Generator().manual_seed(3)
    top, left, flipped = store.augment.sample(4, g)
    raw = store.augment.apply(store.pixels[rows[:4]], top, left, flipped)
    for i in range(4):
        image = base[int(rows[i])][0]
        ref = TF.crop(TF.pad(image, [4]), int(top[i]), int(left[i]), 32, 32)
        ref = TF.hflip(ref) if flipped[i] else ref
        assert torch.equal(raw[i], torch.from_numpy(np.array(ref)).permute(2, 0, 1)), i
    assert isinstance(fast.train_eval.dataset, InMemoryImages) and fast.train_eval.dataset.augment is None
    resized = eedn.create("dataset", "cifar10", data_dir=str(fake_cifar10), val_size=40).splits(40, seed=0)
    lazy40 = eedn.create("dataset", "cifar10", data_dir=str(fake_cifar10), val_size=40, in_memory_mb=0).splits(40, seed=0)
    assert torch.equal(resized.val[0][0], lazy40.val[0][0])


def test_image_folder_in_memory_only_when_square_and_equal_to_the_lazy_path(tmp_path):
    root = make_image_tree(tmp_path / "imgs")
    fast = eedn.create("dataset", "image-folder", data_dir=str(root)).splits(16, seed=0)
    lazy = eedn.create("dataset", "image-folder", data_dir=str(root), in_memory_mb=0).splits(16, seed=0)
    assert isinstance(fast.train.dataset, InMemoryImages)
    for split in ("val", "test", "train_eval"):
        a, b = getattr(fast, split), getattr(lazy, split)
        assert torch.equal(torch.stack([a[i][0] for i in range(len(a))]), torch.stack([b[i][0] for i in range(len(b))]))
    wide = tmp_path / "wide" / "train" / "a"
    wide.mkdir(parents=True)
    for i in range(20):
        Image.new("RGB", (12, 8), (i, 0, 0)).save(wide / f"{i}.png")
    (tmp_path / "wide" / "train" / "b").mkdir()
    for i in range(20):
        Image.new("RGB", (12, 8), (0, i, 0)).save(tmp_path / "wide" / "train" / "b" / f"{i}.png")
    splits = eedn.create("dataset", "image-folder", data_dir=str(tmp_path / "wide")).splits(8, seed=0)
    assert not isinstance(splits.train.dataset, InMemoryImages)  # non-square: per-sample crops stay exact


def test_digits_augmentation_is_a_black_padded_shift_without_flip():
    splits = ds_digits.DigitsSource().splits(16, seed=0)
    store, rows = in_memory_rows(splits.train)
    assert store.augment.pad == 2 and not store.augment.flip
    x, _ = store.batch(rows[:64], torch.Generator().manual_seed(0))
    clean, _ = in_memory_rows(splits.train_eval)[0].batch(rows[:64])
    black = float((0 - store.mean.flatten()[0]) / store.std.flatten()[0])
    shifted = (x != clean).flatten(1).any(1)
    assert shifted.any()
    assert torch.isclose(x.amin(), torch.tensor(black), atol=1e-5)  # padding is the normalised black value
    assert float(clean.mean()) == pytest.approx(float(torch.stack([splits.train_eval[i][0] for i in range(64)]).mean()))
