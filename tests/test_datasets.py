"""Dataset sources: seeded stratified hold-outs, evaluation transforms where promised, image folders
(directory and .tar.gz), clear errors for missing or malformed data, and the long-tail profile."""
from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import eedn
from eedn.core.data import DataSplits, dataset_labels
from eedn.runtime.errors import EednError
from eedn_plugins.datasets import archive as ds_archive
from eedn_plugins.datasets import cifar as ds_cifar
from eedn_plugins.datasets import digits as ds_digits
from eedn_plugins.datasets import image_folder as ds_image_folder
from eedn_plugins.datasets import svhn as ds_svhn

SPLITS = ("train", "val", "cal", "test")


def indices(split) -> set[int]:
    return set(split.indices)


def read_twice_equal(dataset, n: int = 5) -> bool:
    return all(torch.equal(dataset[i][0], dataset[i][0]) for i in range(min(n, len(dataset))))


# ----------------------------------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits() -> DataSplits:
    return ds_digits.DigitsSource().splits(32, seed=0)


def test_registry_builds_every_source_and_digits_splits():
    names = eedn.list_names("dataset")
    for name in ("digits", "cifar10", "cifar100", "cifar100-lt", "cifar10-lt", "svhn", "image-folder"):
        assert name in names
    source = eedn.create("dataset", "digits")
    splits = source.splits(32, seed=0)
    assert isinstance(splits, DataSplits)
    assert (source.num_classes, source.channels, source.default_image_size) == (10, 1, 32)
    assert splits.num_classes == 10 and splits.class_names == [str(c) for c in range(10)]


def test_digits_splits_are_disjoint_cover_everything_and_are_stratified(digits):
    parts = {k: indices(getattr(digits, k)) for k in SPLITS}
    assert sum(len(p) for p in parts.values()) == 1797
    assert set().union(*parts.values()) == set(range(1797))
    for a in SPLITS:
        for b in SPLITS:
            if a < b:
                assert not parts[a] & parts[b], (a, b)
        counts = torch.bincount(dataset_labels(getattr(digits, a)), minlength=10)
        assert (counts > 0).all(), a
    sizes = digits.sizes()
    assert abs(sizes["test"] / 1797 - 0.20) < 0.01
    assert abs(sizes["val"] / 1797 - 0.15) < 0.01 and abs(sizes["cal"] / 1797 - 0.15) < 0.01
    assert digits.train_eval.indices == digits.train.indices  # same images, same order


def test_digits_split_depends_on_the_seed_only(digits):
    again = ds_digits.DigitsSource().splits(32, seed=0)
    other = ds_digits.DigitsSource().splits(32, seed=1)
    for k in SPLITS:
        assert getattr(again, k).indices == getattr(digits, k).indices
    assert any(getattr(other, k).indices != getattr(digits, k).indices for k in SPLITS)
    assert indices(other.test) != indices(digits.test)


def test_digits_shapes_eval_transforms_and_train_augmentation(digits):
    x, y = digits.train[0]
    assert x.shape == (1, 32, 32) and isinstance(y, int)
    for k in ("val", "cal", "test"):
        assert read_twice_equal(getattr(digits, k)), k
    assert read_twice_equal(digits.train_eval)
    torch.manual_seed(0)
    assert not all(torch.equal(digits.train[i][0], digits.train_eval[i][0]) for i in range(10))
    plain = ds_digits.DigitsSource().splits(32, seed=0, augment=False)
    assert all(torch.equal(plain.train[i][0], plain.train_eval[i][0]) for i in range(10))


def test_digits_normalised_with_train_statistics(digits):
    train = torch.stack([digits.train_eval[i][0] for i in range(len(digits.train_eval))])
    assert abs(train.mean().item()) < 1e-4 and abs(train.std().item() - 1) < 1e-3
    native = ds_digits.DigitsSource().splits(8, seed=0)
    from sklearn.datasets import load_digits

    raw = torch.tensor(load_digits().images[native.test.indices[0]], dtype=torch.float32) / 16
    mean, std = native.info["mean"][0], native.info["std"][0]
    torch.testing.assert_close(native.test[0][0][0], (raw - mean) / std)


def test_digits_describe_is_json_and_bad_options_fail():
    import json

    desc = ds_digits.DigitsSource(val_fraction=0.2).describe()
    assert json.loads(json.dumps(desc)) == {"name": "digits", "val_fraction": 0.2, "cal_fraction": 0.5,
                                            "test_fraction": 0.2}
    with pytest.raises(EednError, match="val_fractoin"):
        ds_digits.DigitsSource(val_fractoin=0.2)
    with pytest.raises(EednError, match="cal_fraction"):
        ds_digits.DigitsSource(cal_fraction=1.5).splits(32, seed=0)
    with pytest.raises(EednError, match="< 1"):
        ds_digits.DigitsSource(val_fraction=0.5, test_fraction=0.5).splits(32, seed=0)
    with pytest.raises(EednError, match="test_fraction must be strictly between 0 and 1"):
        ds_digits.DigitsSource(test_fraction=0).splits(32, seed=0)


def test_option_typos_name_the_valid_options_and_strings_are_coerced():
    with pytest.raises(EednError) as err:
        eedn.create("dataset", "digits", val_fractoin=0.2)
    message = str(err.value)
    assert "dataset 'digits': unknown option(s) val_fractoin (did you mean 'val_fraction'?)" in message
    assert "valid: val_fraction, cal_fraction, test_fraction" in message and "\n" not in message
    # only sources that read files declare data_dir
    with pytest.raises(EednError, match="unknown option.*data_dir"):
        eedn.create("dataset", "digits", data_dir="data")
    for name in ("cifar10", "cifar100", "cifar100-lt", "cifar10-lt", "svhn", "image-folder"):
        assert "data_dir" in [spec.name for spec in eedn.registry("dataset").get(name).options()]
    assert eedn.create("dataset", "digits", val_fraction="0.25").options.val_fraction == 0.25
    source = eedn.create("dataset", "cifar100-lt", val_size="500", imbalance="50", test_profile="balanced")
    assert source.describe() == {"name": "cifar100-lt", "imbalance": 50.0, "val_size": 500, "cal_fraction": 0.5,
                                 "test_profile": "balanced"}
    assert eedn.create("dataset", "cifar100").options.val_size == 10000
    with pytest.raises(EednError, match="imbalanced, balanced"):
        eedn.create("dataset", "cifar10-lt", test_profile="uniform")
    with pytest.raises(EednError, match="val_size"):
        eedn.create("dataset", "cifar10", val_size=0)


# ------------------------------------------------------------------------------------ long tail


def test_long_tail_profile_of_cifar100():
    counts = ds_cifar.long_tail_counts(500, 100, 100)
    assert counts[:3] == [500, 477, 455] and counts[-1] == 5 and sum(counts) == 10847
    test_counts = ds_cifar.long_tail_counts(100, 100, 100)
    assert test_counts[0] == 100 and test_counts[-1] == 1 and sum(test_counts) == 2131
    groups = ds_cifar.shot_groups(counts)
    assert [len(groups[k]) for k in ("many", "medium", "few")] == [35, 35, 30]
    assert ds_cifar.long_tail_counts(5000, 10, 100) == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert ds_cifar.long_tail_counts(50, 4, 1) == [50, 50, 50, 50]
    with pytest.raises(EednError):
        ds_cifar.long_tail_counts(500, 100, 0.5)


def test_long_tail_indices_keep_a_seeded_prefix_per_class_in_class_order():
    targets = np.repeat(np.arange(3), 10)[::-1].copy()  # classes stored out of order
    kept = ds_cifar.long_tail_indices(targets, [6, 3, 1], seed=0)
    assert targets[kept].tolist() == [0] * 6 + [1] * 3 + [2]
    assert kept.tolist() == ds_cifar.long_tail_indices(targets, [6, 3, 1], seed=0).tolist()
    rng = np.random.RandomState(0)  # LDAM: one generator, classes shuffled in order
    expected = []
    for c, n in enumerate([6, 3, 1]):
        idx = np.flatnonzero(targets == c)
        rng.shuffle(idx)
        expected += idx[:n].tolist()
    assert kept.tolist() == expected


# ----------------------------------------------------------------------------------- CIFAR, SVHN


def test_missing_cifar_and_svhn_name_the_folder_and_the_files(tmp_path):
    with pytest.raises(EednError) as err:
        eedn.create("dataset", "cifar10", data_dir=str(tmp_path)).splits(32, seed=0)
    assert str(tmp_path) in str(err.value) and "cifar-10-batches-py" in str(err.value)
    assert "\n" not in str(err.value)
    with pytest.raises(EednError, match="cifar-100-python"):
        ds_cifar.Cifar100Source(data_dir=str(tmp_path)).splits(32, seed=0)
    with pytest.raises(EednError, match="cifar-100-python"):
        ds_cifar.LongTailCifarSource(data_dir=str(tmp_path)).splits(32, seed=0)
    with pytest.raises(EednError, match="train_32x32.mat"):
        ds_svhn.SvhnSource(data_dir=str(tmp_path)).splits(32, seed=0)
    (tmp_path / "cifar-10-batches-py").mkdir()  # present but empty
    with pytest.raises(EednError, match="corrupted"):
        ds_cifar.CifarSource(data_dir=str(tmp_path)).splits(32, seed=0)


def write_fake_cifar10(root: Path, train_per_class: int, test_per_class: int) -> None:
    """A tiny CIFAR-10 in torchvision's pickle layout (integrity checks are patched off)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def batch(labels: list[int]) -> dict:
        return {"data": rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8), "labels": labels}

    train_labels = [c for c in range(10) for _ in range(train_per_class)]
    rng.shuffle(train_labels)
    for b in range(5):
        with open(folder / f"data_batch_{b + 1}", "wb") as f:
            pickle.dump(batch(train_labels[b::5]), f)
    test_labels = [c for c in range(10) for _ in range(test_per_class)]
    rng.shuffle(test_labels)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump(batch(test_labels), f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{c}" for c in range(10)]}, f)


@pytest.fixture
def fake_cifar10(tmp_path, monkeypatch) -> Path:
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)
    write_fake_cifar10(tmp_path, train_per_class=20, test_per_class=10)
    return tmp_path


@pytest.fixture
def fake_svhn(tmp_path, monkeypatch) -> Path:
    """SVHN's two .mat files (``X`` [32, 32, 3, N] uint8, ``y`` 1..10 with 10 for the digit 0), 30 + 10 per class."""
    import scipy.io
    import torchvision.datasets.svhn as tv_svhn

    monkeypatch.setattr(tv_svhn, "check_integrity", lambda *a, **k: True)
    rng = np.random.default_rng(0)
    for name, per_class in (("train_32x32.mat", 30), ("test_32x32.mat", 10)):
        y = np.repeat(np.arange(1, 11), per_class)[:, None].astype(np.uint8)
        x = rng.integers(0, 256, size=(32, 32, 3, len(y)), dtype=np.uint8)
        scipy.io.savemat(tmp_path / name, {"X": x, "y": y})
    return tmp_path


def test_svhn_is_its_own_source_unnormalised_in_memory_or_per_sample(fake_svhn):
    assert not issubclass(ds_svhn.SvhnSource, ds_cifar.CifarSource)
    source = eedn.create("dataset", "svhn", data_dir=str(fake_svhn), val_size=100)
    assert source.describe() == {"name": "svhn", "val_size": 100, "cal_fraction": 0.5}
    splits = source.splits(32, seed=0)
    assert splits.sizes() == {"train": 200, "val": 50, "cal": 50, "test": 100}
    assert splits.info["augmentation"] == "none" and splits.class_names == [str(c) for c in range(10)]
    lazy = eedn.create("dataset", "svhn", data_dir=str(fake_svhn), val_size=100, in_memory_mb=0).splits(32, seed=0)
    for name in ("train", "val", "test"):
        (x, y), (x_lazy, y_lazy) = getattr(splits, name)[3], getattr(lazy, name)[3]
        assert y == y_lazy and torch.equal(x, x_lazy), name  # ToTensor only, the same on both paths
        assert x.shape == (3, 32, 32) and 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    import scipy.io

    raw = scipy.io.loadmat(fake_svhn / "test_32x32.mat")
    first = torch.from_numpy(raw["X"][:, :, :, 0]).permute(2, 0, 1).float() / 255
    assert torch.equal(splits.test[0][0], first) and splits.test[0][1] == 1  # the official test split, in order
    assert dataset_labels(splits.test).tolist() == [c % 10 for c in range(1, 11) for _ in range(10)]  # .mat's 10 is 0
    assert torch.equal(dataset_labels(lazy.test), dataset_labels(splits.test))


def test_cifar10_holds_val_and_cal_out_of_train(fake_cifar10):
    source = eedn.create("dataset", "cifar10", data_dir=str(fake_cifar10), val_size=40)
    splits = source.splits(32, seed=0)
    assert splits.sizes() == {"train": 160, "val": 20, "cal": 20, "test": 100}
    parts = [indices(getattr(splits, k)) for k in ("train", "val", "cal")]
    assert set().union(*parts) == set(range(200)) and sum(map(len, parts)) == 200
    assert (torch.bincount(dataset_labels(splits.val), minlength=10) == 2).all()
    assert splits.train_eval.indices == splits.train.indices
    x, _ = splits.train[0]
    assert x.shape == (3, 32, 32)
    for k in ("val", "cal", "test"):
        assert read_twice_equal(getattr(splits, k)), k
    assert splits.class_names[0] == "class0"
    assert source.describe() == {"name": "cifar10", "val_size": 40, "cal_fraction": 0.5}
    assert splits.test[0][0].shape == (3, 32, 32)
    assert source.splits(48, seed=0, augment=False).val[0][0].shape == (3, 48, 48)
    with pytest.raises(EednError, match="val_size"):
        ds_cifar.CifarSource(data_dir=str(fake_cifar10), val_size=1000).splits(32, seed=0)


class TinyLongTailCifar10(ds_cifar.LongTailCifar10Source):
    n_max_train = 20  # the fake data has 20 train images per class


def test_long_tailed_cifar_train_val_test_and_shot_groups(fake_cifar10):
    source = TinyLongTailCifar10(data_dir=str(fake_cifar10), imbalance=10, val_size=10)
    splits = source.splits(32, seed=0)
    counts = ds_cifar.long_tail_counts(20, 10, 10)
    assert splits.info["train_counts"] == counts
    train_val_cal = torch.cat([dataset_labels(getattr(splits, k)) for k in ("train", "val", "cal")])
    assert torch.bincount(train_val_cal, minlength=10).tolist() == counts
    test_labels = dataset_labels(splits.test).tolist()
    assert test_labels == sorted(test_labels)  # class order, head classes first
    assert torch.bincount(torch.tensor(test_labels), minlength=10).tolist() == ds_cifar.long_tail_counts(10, 10, 10)
    assert splits.info["shot_groups"]["few"] == [c for c, n in enumerate(counts) if n < 20]
    balanced = TinyLongTailCifar10(data_dir=str(fake_cifar10), imbalance=10, val_size=10,
                                   test_profile="balanced").splits(32, seed=0)
    assert len(balanced.test) == 100


# ---------------------------------------------------------------------------------- image folder


def make_image_tree(root: Path, classes=("cat", "ant", "bee"), per_class: int = 20, test_per_class: int = 0):
    """PNG files of 8x8 solid colours, one colour per class (20 per class: with the default 10 %
    val pool, each class gives one image to val and one to cal)."""
    for split, n in (("train", per_class), ("test", test_per_class)):
        for c, name in enumerate(classes):
            if n == 0:
                continue
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.new("RGB", (8, 8), (80 * c, 10 * i, 200)).save(folder / f"{i:03d}.png")
    return root


def make_tar(folder: Path, archive: Path) -> Path:
    with tarfile.open(archive, "w:gz") as tar:
        for child in sorted(folder.iterdir()):
            tar.add(child, arcname=child.name)
    return archive


def test_image_folder_directory_without_test_split(tmp_path):
    root = make_image_tree(tmp_path / "imgs")
    source = eedn.create("dataset", "image-folder", data_dir=str(root))
    assert (source.num_classes, source.channels, source.default_image_size) == (3, 3, 8)
    splits = source.splits(16, seed=0)
    assert splits.class_names == ["ant", "bee", "cat"]  # sorted folder names
    parts = {k: indices(getattr(splits, k)) for k in SPLITS}
    assert set().union(*parts.values()) == set(range(60)) and sum(map(len, parts.values())) == 60
    for k in SPLITS:
        assert set(dataset_labels(getattr(splits, k)).tolist()) == {0, 1, 2}, k
    x, y = splits.val[0]
    assert x.shape == (3, 16, 16) and 0 <= y < 3
    assert read_twice_equal(splits.test) and read_twice_equal(splits.cal) and read_twice_equal(splits.train_eval)
    assert splits.train_eval.indices == splits.train.indices
    sample_path, label = splits.test.dataset.samples[splits.test.indices[0]]
    assert Path(sample_path).parent.name == splits.class_names[label]
    other = source.splits(16, seed=1)
    assert indices(other.test) != parts["test"]
    # the normalisation is the train split's own, recorded so a run directory can preprocess new images alike
    assert splits.info["statistics_from"] == f"{len(parts['train'])} train images"
    train = torch.stack([splits.train_eval[i][0] for i in range(len(splits.train_eval))])
    assert train.mean((0, 2, 3)).abs().max() < 1e-3  # blue is constant (200) in every image: centred only
    assert (train[:, :2].std((0, 2, 3)) - 1).abs().max() < 1e-2 and float(train[:, 2].abs().max()) < 1e-3
    assert splits.info["augmentation"] == "crop-flip" and splits.info["channels"] == 3


def test_image_folder_with_test_split_and_a_tar_gz_extracted_once(tmp_path, monkeypatch):
    root = make_image_tree(tmp_path / "imgs", test_per_class=4)
    archive = make_tar(root, tmp_path / "imgs.tar.gz")
    cache = tmp_path / "cache"
    from_dir = ds_image_folder.ImageFolderSource(data_dir=str(root)).splits(8, seed=0)
    source = ds_image_folder.ImageFolderSource(data_dir=str(archive), cache_dir=str(cache))
    from_tar = source.splits(8, seed=0)
    assert len(from_tar.test) == 12 and sum(len(getattr(from_tar, k)) for k in ("train", "val", "cal")) == 60
    for k in SPLITS:
        assert dataset_labels(getattr(from_tar, k)).tolist() == dataset_labels(getattr(from_dir, k)).tolist()
    assert torch.equal(from_tar.test[3][0], from_dir.test[3][0])
    assert [p.name for p in cache.iterdir()] == [source.describe()["archive"]]  # no temp dirs left

    def no_second_extraction(*args, **kwargs):
        raise AssertionError("extracted twice")

    monkeypatch.setattr(ds_archive, "_extract_regular_files", no_second_extraction)
    again = ds_image_folder.ImageFolderSource(data_dir=str(archive), cache_dir=str(cache)).splits(8, seed=0)
    assert again.val.indices == from_tar.val.indices


def test_image_folder_archive_wrapped_in_one_top_folder(tmp_path):
    make_image_tree(tmp_path / "outer" / "data")
    archive = make_tar(tmp_path / "outer", tmp_path / "wrapped.tar.gz")
    splits = ds_image_folder.ImageFolderSource(data_dir=str(archive), cache_dir=str(tmp_path / "c")).splits(8, seed=0)
    assert sum(splits.sizes().values()) == 60


def test_malformed_image_folders_raise_one_line_errors(tmp_path):
    def fails(match: str, **options):
        with pytest.raises(EednError, match=match) as err:
            ds_image_folder.ImageFolderSource(**options).splits(8, seed=0)
        assert "\n" not in str(err.value)

    fails("option data_dir is required .*--data-dir")
    fails("does not exist", data_dir=str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    fails("no train/ folder", data_dir=str(tmp_path / "empty"))
    (tmp_path / "noclass" / "train").mkdir(parents=True)
    fails("no class folders", data_dir=str(tmp_path / "noclass"))
    (tmp_path / "noimg" / "train" / "a").mkdir(parents=True)
    (tmp_path / "noimg" / "train" / "a" / "notes.txt").write_text("not an image")
    fails("no image files", data_dir=str(tmp_path / "noimg"))
    root = make_image_tree(tmp_path / "holes")
    (root / "train" / "empty_class").mkdir()
    fails("empty_class", data_dir=str(root))
    root = make_image_tree(tmp_path / "foreign", test_per_class=2)
    (root / "test" / "ant").rename(root / "test" / "zebra")
    fails("zebra", data_dir=str(root))
    (tmp_path / "junk.tar.gz").write_bytes(b"this is not a tar archive")
    fails("cannot extract", data_dir=str(tmp_path / "junk.tar.gz"), cache_dir=str(tmp_path / "c1"))
    assert list((tmp_path / "c1").iterdir()) == []  # nothing half-extracted left behind
    evil = tmp_path / "evil.tar.gz"
    with tarfile.open(evil, "w:gz") as tar:
        data = b"x"
        info = tarfile.TarInfo("../escape.png")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    fails("outside its folder", data_dir=str(evil), cache_dir=str(tmp_path / "c2"))
    assert not (tmp_path / "c2" / "escape.png").exists() and not (tmp_path / "escape.png").exists()


def test_image_folder_of_grayscale_images_stays_one_channel(tmp_path):
    """All-grayscale folders give 1-channel inputs, no flips by default, and the data's own statistics."""
    from PIL import Image

    for split, n in (("train", 12), ("test", 4)):
        for c, name in enumerate(("a", "b")):
            folder = tmp_path / "gray" / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                Image.new("L", (8, 8), 40 + 150 * c + i).save(folder / f"{i}.png")
    source = eedn.create("dataset", "image-folder", data_dir=str(tmp_path / "gray"), val_fraction=0.3)
    assert source.channels == 1
    splits = source.splits(8, seed=0)
    x, _ = splits.test[0]
    assert x.shape == (1, 8, 8) and len(splits.info["mean"]) == 1
    assert splits.info["augmentation"] == "crop"
    given = eedn.create("dataset", "image-folder", data_dir=str(tmp_path / "gray"), val_fraction=0.3,
                        mean=[0.5], std=[0.25], augment="none").splits(8, seed=0)
    assert given.info["mean"] == [0.5] and given.info["statistics_from"] == "given"
    assert given.info["augmentation"] == "none"


def test_mapped_dataset_reads_pairs_or_items_through_its_transform_and_pickles():
    pairs = [(torch.full((1, 2, 2), float(i)), 9) for i in range(4)]  # the base's own label is not used
    view = eedn.MappedDataset(pairs, [3, 1, 2, 0], lambda x: x + 1)
    assert len(view) == 4 and view[2][1] == 2 and torch.equal(view[2][0], torch.full((1, 2, 2), 3.0))
    assert dataset_labels(view).tolist() == [3, 1, 2, 0]
    plain = eedn.MappedDataset(torch.arange(3.0), torch.tensor([1, 0, 1]))  # items alone, no transform
    assert [plain[i] for i in range(3)] == [(torch.tensor(0.0), 1), (torch.tensor(1.0), 0), (torch.tensor(2.0), 1)]
    images = eedn.TensorImages(torch.zeros(2, 1, 2, 2), torch.tensor([1, 0]))
    assert isinstance(images, eedn.MappedDataset) and images[1][1] == 0 and images.labels.tolist() == [1, 0]
    again = pickle.loads(pickle.dumps(eedn.MappedDataset(pairs, [3, 1, 2, 0])))  # data loader workers pickle it
    assert again[0][1] == 3 and torch.equal(again[0][0], pairs[0][0])
