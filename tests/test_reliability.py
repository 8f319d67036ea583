"""Nothing lost, nothing silently wrong: run-directory safety, cache keys and shape checks, divergence,
early validation and one-line errors, in-process on tiny digits runs (docs/reliability.md lists each
fault and the test that pins it; kills and concurrent runs are in tests/test_faults.py)."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import eedn
from eedn.pipeline import run as pipeline
from eedn.core.cache import FeatureCache, FeatureSet, cache_key
from eedn.cli.main import cli
from eedn.runtime.errors import EednError
from eedn.runtime.io import atomic_write_text, clean_stale_temps, load_checkpoint, temp_prefix

FAST = {"strategy": "im-only", "strategy_options": {"epochs": 1}, "evaluators": []}


def no_stage_0(*args, **kwargs):
    raise AssertionError("stage 0 ran before the config was checked")


# ------------------------------------------------------------------------------------------ run directories


def test_non_empty_out_is_refused_before_stage_0_and_overwrite_replaces_it_whole(tiny_config, tmp_path,
                                                                                  monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    (out / "results.json").write_text("{}")
    (out / "stale.txt").write_text("from an older run")
    monkeypatch.setattr(pipeline, "train_backbone", no_stage_0)
    cfg = tiny_config | FAST | {"cache_dir": str(tmp_path / "fresh"), "out": str(out)}
    with pytest.raises(EednError, match=r"--out .*run already holds files; pass --overwrite"):
        eedn.run_pipeline(cfg)
    # --overwrite replaces an eedn run only, never a folder of something else
    with pytest.raises(EednError, match=r"--out .*run is not an eedn run directory \(no run.json\); --overwrite "):
        eedn.run_pipeline(cfg | {"overwrite": True})
    assert (out / "stale.txt").read_text() == "from an older run"
    monkeypatch.undo()
    (out / "stale.txt").unlink()
    (out / "results.json").unlink()
    eedn.run_pipeline(tiny_config | FAST | {"out": str(out)})
    (out / "stale.txt").write_text("from an older run")
    results = eedn.run_pipeline(tiny_config | FAST | {"out": str(out), "overwrite": True})
    assert results["run_dir"] == str(out)
    assert not (out / "stale.txt").exists()  # replaced whole, never mixed with the old run's files
    assert json.loads((out / "results.json").read_text())["config"]["overwrite"] is True
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left beside it


def test_default_run_names_are_unique_within_one_second():
    from eedn.pipeline.rundir import unique_run_name

    names = {unique_run_name("digits-resnet_tiny-jei-s0") for _ in range(50)}
    assert len(names) == 50


def test_a_failed_run_leaves_no_run_directory(tiny_config, tmp_path, monkeypatch):
    from eedn.report import render

    def broken_render(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(pipeline, "render_run", broken_render)
    with pytest.raises(OSError, match="disk full"):
        eedn.run_pipeline(tiny_config | FAST)
    assert list(tmp_path.iterdir()) == []  # neither the run directory nor its staging sibling
    assert render.render_run is not broken_render


def test_unwritable_out_and_missing_cuda_fail_before_stage_0(tiny_config, tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "train_backbone", no_stage_0)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cfg = tiny_config | FAST | {"cache_dir": str(tmp_path / "fresh")}
    with pytest.raises(EednError, match=r"--out .*a-file/run cannot be written"):
        eedn.run_pipeline(cfg | {"out": str(blocker / "run")})
    if not torch.cuda.is_available():
        with pytest.raises(EednError, match="device cuda was asked for, but this torch sees no CUDA GPU"):
            eedn.run_pipeline(cfg | {"device": "cuda"})
    res = CliRunner().invoke(cli, ["run", "--backbone", "resnet_tiny", "--quiet", "--out", str(blocker / "x")])
    assert res.exit_code == 1 and res.output.count("\n") == 1 and "cannot be written" in res.output


# ------------------------------------------------------------------------------------------ atomic writes


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600)])
def test_atomic_writes_respect_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "f.json", "{}")
    finally:
        os.umask(old)
    assert (tmp_path / "f.json").stat().st_mode & 0o777 == mode


def test_stale_temporaries_of_dead_writers_are_removed_live_ones_kept(tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    live_prefix = temp_prefix("features-abc.pt")
    dead_prefix = live_prefix.replace(f"-{os.getpid()}.", f"-{dead}.")
    (tmp_path / f"{dead_prefix}x1.tmp").write_bytes(b"half")
    (tmp_path / f"{dead_prefix}x2.tmpdir").mkdir()
    (tmp_path / f"{live_prefix}x3.tmp").write_bytes(b"being written")
    (tmp_path / "features-abc.pt").write_bytes(b"kept")
    removed = clean_stale_temps(tmp_path)
    assert sorted(p.name for p in removed) == sorted([f"{dead_prefix}x1.tmp", f"{dead_prefix}x2.tmpdir"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"{live_prefix}x3.tmp", "features-abc.pt"])


# ------------------------------------------------------------------------------------------ feature cache


def test_feature_cache_entry_of_another_shape_or_row_count_is_a_miss(tmp_path):
    cache = FeatureCache(tmp_path)
    fs = FeatureSet([torch.ones(5, 3), torch.ones(5, 4)], torch.arange(5))
    k = cache_key(what="test")
    assert cache.save(k, fs, meta={"what": "test"})
    assert cache.load(k, rows=5, dims=[3, 4]) is not None
    assert cache.load(k, rows=6, dims=[3, 4]) is None
    assert cache.load(k, rows=5, dims=[3, 8]) is None
    assert cache.load(k, rows=5, dims=[3]) is None
    assert torch.load(cache.path(k), weights_only=True)["meta"] == {"what": "test"}
    cache.path(k).write_bytes(cache.path(k).read_bytes()[:100])  # truncated: a miss, never an error
    assert cache.load(k, rows=5, dims=[3, 4]) is None


def flip_tensor_bytes(path: Path, value: float, other: float) -> None:
    """Change one stored float32 ``value`` inside a torch file into ``other``, in place: the zip stays valid
    and the weights-only loader reads it without complaint (as a disk or copy error would leave it)."""
    data = path.read_bytes()
    old, new = struct.pack("<f", value), struct.pack("<f", other)
    assert old in data
    path.write_bytes(data.replace(old, new, 1))
    torch.load(path, weights_only=True)  # still loads: only the hash can tell


def test_cache_entries_are_checked_against_their_hash_meta_and_labels(tmp_path, capsys):
    """Finding 2: flipped tensor bytes, an entry copied under another key, labels that differ from the
    dataset's, and an entry without a hash are each a miss with one warning line naming the file."""
    cache = FeatureCache(tmp_path)
    labels = torch.arange(5)
    fs = FeatureSet([torch.full((5, 3), 1.5), torch.ones(5, 4)], labels)
    meta = {"what": "test"}
    k = cache_key(**meta)
    assert cache.save(k, fs, meta=meta)
    assert cache.load(k, rows=5, dims=[3, 4], labels=labels) is not None
    assert capsys.readouterr().err == ""
    assert cache.load(k, rows=5, dims=[3, 4], labels=torch.zeros(5, dtype=torch.long)) is None
    assert "holds other labels than the dataset" in capsys.readouterr().err
    other = cache_key(what="another")
    shutil.copy(cache.path(k), cache.path(other))
    assert cache.load(other, rows=5, dims=[3, 4]) is None
    assert "holds meta that does not give its key" in capsys.readouterr().err
    flip_tensor_bytes(cache.path(k), 1.5, 1.25)
    assert cache.load(k, rows=5, dims=[3, 4], labels=labels) is None
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"feature cache entry {cache.path(k)} does not match its recorded sha256" in err
    blob = torch.load(cache.path(other), weights_only=True)
    del blob["sha256"]
    torch.save(blob, cache.path(other))
    assert cache.load(other, rows=5, dims=[3, 4]) is None
    assert "has no recorded sha256" in capsys.readouterr().err


def test_same_weights_with_another_exit_layout_get_their_own_features(tiny_config, tmp_path):
    """ResNet weights fit both exit layouts; the cached features of one must never feed the other."""
    ckpt = tmp_path / "resnet20.pt"
    model = eedn.create_model("resnet20", num_classes=10, image_size=8, in_channels=1)
    torch.save(model.backbone.state_dict(), ckpt)
    cfg = tiny_config | FAST | {"backbone": "resnet20", "image_size": 8, "cache_dir": str(tmp_path / "cache"),
                                "backbone_training": {"epochs": 0, "checkpoint": str(ckpt)}}
    block = eedn.run_pipeline(cfg | {"backbone_options": {"exits": "block"}, "out": str(tmp_path / "block")})
    stage = eedn.run_pipeline(cfg | {"backbone_options": {"exits": "stage"}, "out": str(tmp_path / "stage")})
    assert (len(block["exits"]), len(stage["exits"])) == (9, 3)
    assert len(list((tmp_path / "cache" / "features").glob("features-*.pt"))) == 8  # 4 splits x 2 layouts


def test_cached_backbone_that_does_not_fit_is_retrained_with_a_warning(tiny_config, tmp_path, capsys):
    cfg = tiny_config | FAST | {"cache_dir": str(tmp_path / "cache"), "backbone_training": {"epochs": 1}}
    first = eedn.run_pipeline(cfg | {"out": str(tmp_path / "a")})
    path = Path(first["backbone"]["cache_path"])
    torch.save({"model": {"not": torch.zeros(1)}}, path)
    again = eedn.run_pipeline(cfg | {"out": str(tmp_path / "b")})
    assert again["backbone"]["source"] == "trained"
    assert "ignoring the cached backbone" in capsys.readouterr().err
    assert again["exits"] == first["exits"]
    path.write_bytes(b"garbage")
    third = eedn.run_pipeline(cfg | {"out": str(tmp_path / "c")})
    assert third["backbone"]["source"] == "trained" and third["exits"] == first["exits"]


def test_unwritable_cache_runs_uncached_with_a_warning(tiny_config, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    results = eedn.run_pipeline(tiny_config | FAST | {"cache_dir": str(blocker / "cache"),
                                                      "backbone_training": {"epochs": 1}})
    err = capsys.readouterr().err
    assert "cache directory" in err and "is not writable" in err and "feature cache" in err
    assert results["backbone"]["source"] == "trained" and blocker.read_text() == ""


def test_read_only_warm_cache_is_read_and_nothing_is_written(tiny_config, tmp_path, capsys, monkeypatch):
    """Permission bits do not bind root: the probe :func:`eedn.runtime.io.writable_dir` is what decides."""
    from eedn.core import cache as cache_module
    from eedn.pipeline import preflight

    cfg = tiny_config | FAST | {"cache_dir": str(tmp_path / "cache"), "backbone_training": {"epochs": 1}}
    warm = eedn.run_pipeline(cfg | {"out": str(tmp_path / "a")})
    files = sorted(p.name for p in (tmp_path / "cache").rglob("*"))
    monkeypatch.setattr(preflight, "writable_dir", lambda path: False)
    monkeypatch.setattr(cache_module, "writable_dir", lambda path: False)
    again = eedn.run_pipeline(cfg | {"out": str(tmp_path / "b"), "strategy_options": {"epochs": 2}})
    assert again["backbone"]["source"] == "cache" and again["exits"][-1] == warm["exits"][-1]
    assert "is not writable" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "cache").rglob("*")) == files


# ------------------------------------------------------------------------------------------ divergence


def test_diverging_backbone_stops_with_one_line_and_caches_nothing(tiny_config, tmp_path):
    cache = tmp_path / "cache"
    res = CliRunner().invoke(cli, ["run", "--backbone", "resnet_tiny", "--image-size", "16", "--quiet",
                                   "--backbone-epochs", "2", "--set", "backbone_training.lr=1.0e+9",
                                   "--cache-dir", str(cache), "--out", str(tmp_path / "run")])
    assert res.exit_code == 1
    assert res.output.startswith("error: backbone training (stage 0) diverged: the loss became nan in epoch 1/2; "
                                 "lower backbone_training.lr (now 1e+09)")
    assert res.output.count("\n") == 1
    assert not (cache / "backbones").exists() and not (tmp_path / "run").exists()


def test_diverging_heads_stop_and_nothing_is_written(tiny_config, tmp_path):
    # the official SGD on raw features overflows at this lr (Adam's steps are bounded by lr, so it stays finite)
    cfg = tiny_config | FAST | {"strategy_options": {"epochs": 1, "lr": 1e12, "profile": "paper-compat"}}
    with pytest.raises(EednError, match=r"im-only.*(diverged|non-finite)"):
        eedn.run_pipeline(cfg)
    assert not (tmp_path / "run").exists()


def test_zero_epochs_without_a_checkpoint_is_untrained_and_never_cached(tiny_config, tmp_path, capsys):
    results = eedn.run_pipeline(tiny_config | FAST | {"cache_dir": str(tmp_path / "cache"),
                                                      "backbone_training": {"epochs": 0}})
    assert results["backbone"]["source"] == "untrained" and "val_accuracy" not in results["backbone"]
    assert "keeps its random initialisation" in capsys.readouterr().err
    assert not (tmp_path / "cache" / "backbones").exists() or not any((tmp_path / "cache" / "backbones").iterdir())


# ------------------------------------------------------------------------------------------ one-line errors


def test_checkpoint_errors_say_what_is_wrong_and_what_to_do(tmp_path):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(EednError, match=r"corrupt\.pt is corrupt or not a weights-only file .*; re-create it or "
                                        r"pass a different path$"):
        load_checkpoint(corrupt)
    truncated = tmp_path / "truncated.pt"
    torch.save({"w": torch.zeros(10)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(EednError, match=r"truncated\.pt is corrupt .*\(truncated or not a zip-format torch file\)"):
        load_checkpoint(truncated)

    class Payload:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    evil = tmp_path / "evil.pt"
    torch.save({"w": Payload()}, evil, pickle_protocol=2)
    with pytest.raises(EednError, match=r"evil\.pt is corrupt or not a weights-only file \(refused by the "
                                        r"weights-only loader: .*GLOBAL posix\.system .*blocked") as refused:
        load_checkpoint(evil)
    assert "weights_only" not in str(refused.value)  # torch's advice to load unsafely is never repeated
    evil.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(EednError, match="refused by the weights-only loader: Unsupported operand"):
        load_checkpoint(evil)
    assert not (tmp_path / "pwned").exists()


def test_state_dict_mismatch_names_the_keys(tmp_path):
    model = eedn.create_model("resnet_tiny", num_classes=10, image_size=16, in_channels=1)
    state = dict(model.backbone.state_dict())
    state.pop("fc.weight")
    state["extra.weight"] = torch.zeros(1)
    ckpt = tmp_path / "w.pt"
    torch.save(state, ckpt)
    with pytest.raises(EednError, match=r"w\.pt.* does not fit .*missing: fc\.weight; unexpected: extra\.weight"):
        model.backbone.load_pretrained(ckpt)


def test_yaml_and_json_errors_give_line_and_column(tmp_path):
    from eedn.core.config import load_config_file

    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: 1\nbackbone_training:\n  epochs: [2\n  lr: 1e-3\n")
    with pytest.raises(EednError, match=r"cannot parse config file .*bad\.yaml at line 4, column 5: .*; fix the "
                                        r"YAML there"):
        load_config_file(bad)
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"seed": 1,\n "out": }')
    with pytest.raises(EednError, match=r"bad\.json at line 2, column 9: Expecting value; fix the JSON there"):
        load_config_file(bad_json)


def test_a_cut_off_first_line_keeps_its_point():
    from eedn.cli.common import first_line

    exc = RuntimeError("Error(s) in loading state_dict for T2TViT:\n\tMissing key(s) in state_dict: \"head.w\".")
    assert first_line(exc) == "Error(s) in loading state_dict for T2TViT: Missing key(s) in state_dict: \"head.w\"."
    assert first_line(ValueError("first\nsecond")) == "first"


# ------------------------------------------------------------------------------------------ config schema


def test_config_keys_are_typed_and_nested_keys_checked_through_every_door(tmp_path):
    from eedn.core.config import load_config_file, resolve_config

    file = tmp_path / "c.yaml"
    file.write_text("backbone_training:\n  lr: 1e-3\n  weight_decay: 5.0e-4\neval_batch_size: '128'\n")
    cfg = resolve_config(load_config_file(file))
    assert cfg.backbone_training.lr == 0.001 and cfg.backbone_training.weight_decay == 0.0005
    assert cfg.eval_batch_size == 128
    assert resolve_config({}, ["backbone_training.lr=1e-3"]).backbone_training.lr == 0.001
    bad = {
        "backbone_training.epochz=2": r"unknown config key\(s\) backbone_training\.epochz \(did you mean "
                                      r"'backbone_training\.epochs'\?\)",
        "budget.macs_fraction=1.5": r"config: invalid budget\.macs_fraction=1\.5; expected a number in \(0, 1\]",
        "eval_batch_size=0": r"config: invalid eval_batch_size=0; expected an integer >= 1",
        "backbone_training.lr=fast": r"config: invalid backbone_training\.lr='fast'",
        "risk_control.grid_size=1": r"risk_control\.grid_size=1; expected an integer >= 2",
        "budget.q=3": r"budget must be one of",
        "seed=-1": r"invalid seed=-1",
    }
    for assignment, message in bad.items():
        with pytest.raises(EednError, match=message):
            resolve_config({}, [assignment])
    with pytest.raises(EednError, match=r"backbone_training\.epochz"):
        resolve_config({"backbone_training": {"epochz": 2}})
    with pytest.raises(EednError, match=r"budget\.macs_fraction=1\.5"):
        resolve_config({"budget": {"macs_fraction": 1.5}})
    res = CliRunner().invoke(cli, ["run", "--quiet", "--set", "budget.macs_fraction=1.5"])
    assert res.exit_code == 1 and res.output.count("\n") == 1 and "budget.macs_fraction=1.5" in res.output


def test_bad_names_and_values_fail_before_stage_0(tiny_config, tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "train_backbone", no_stage_0)
    cfg = tiny_config | FAST | {"cache_dir": str(tmp_path / "fresh")}
    for change, message in (({"eval_batch_size": 0}, "eval_batch_size=0"),
                            ({"strategy": "nope"}, "unknown strategy 'nope'"),
                            ({"evaluators": ["nope"]}, "unknown evaluator 'nope'"),
                            ({"gate": "nope"}, "unknown gate 'nope'")):
        with pytest.raises(EednError, match=message):
            eedn.run_pipeline(cfg | change)


# ------------------------------------------------------------------------------------------ data and images


def test_one_class_dataset_is_refused(tmp_path):
    from PIL import Image

    folder = tmp_path / "one" / "train" / "only"
    folder.mkdir(parents=True)
    for i in range(4):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(folder / f"{i}.png")
    with pytest.raises(EednError, match="has one class folder \\(only\\); a classifier needs at least two"):
        eedn.create("dataset", "image-folder", data_dir=str(tmp_path / "one")).num_classes
    from eedn.pipeline.preflight import check_classes

    with pytest.raises(EednError, match="dataset 'x' has 1 class\\(es\\)"):
        check_classes("x", 1)


def test_archives_extract_under_the_run_cache_and_killed_extractions_are_cleaned(tiny_config, tmp_path):
    import io
    import tarfile

    from PIL import Image

    archive = tmp_path / "imgs.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for c, name in enumerate(("ant", "bee")):
            for i in range(20):
                buf = io.BytesIO()
                Image.new("RGB", (8, 8), (120 * c, 10 * i, 50)).save(buf, format="PNG")
                info = tarfile.TarInfo(f"train/{name}/{i}.png")
                info.size = len(buf.getvalue())
                tar.addfile(info, io.BytesIO(buf.getvalue()))
        link = tarfile.TarInfo("train/ant/link.png")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
        device = tarfile.TarInfo("train/bee/dev.png")
        device.type, device.devmajor, device.devminor = tarfile.CHRTYPE, 1, 3
        tar.addfile(device)
    datasets = tmp_path / "cache" / "datasets"
    datasets.mkdir(parents=True)
    dead = temp_prefix("x").replace(f"-{os.getpid()}.", "-999999999.")
    (datasets / f"{dead}abc.tmpdir").mkdir()  # left by a killed extraction
    results = eedn.run_pipeline(tiny_config | FAST | {"dataset": "image-folder", "image_size": 8,
                                                      "dataset_options": {"data_dir": str(archive)},
                                                      "cache_dir": str(tmp_path / "cache")})
    assert results["dataset"]["num_classes"] == 2
    extracted = list(datasets.iterdir())
    assert len(extracted) == 1 and not extracted[0].name.startswith(".")
    names = sorted(p.name for p in (extracted[0] / "train").rglob("*"))
    assert "link.png" not in names and "dev.png" not in names and len(names) == 42  # 2 folders + 40 images


def test_decompression_bombs_and_corrupt_images_name_the_file(tmp_path, monkeypatch):
    from PIL import Image

    from eedn.runtime.image_io import open_image
    from eedn.deploy.predict import load_image

    big = tmp_path / "bomb.png"
    Image.new("L", (64, 64)).save(big)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(EednError, match=r"image .*bomb\.png is too large to decode safely"):
        open_image(big, "RGB")
    with pytest.raises(EednError, match=r"image .*bomb\.png is too large to decode safely"):
        load_image(big, lambda image: image)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(EednError, match=r"cannot read image .*broken\.png"):
        open_image(broken, "RGB")


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    import numpy as np
    from PIL import Image

    from eedn.deploy.predict import InputRecipe, preprocessor

    ramp = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)  # 0 .. 63 000: mostly above 255
    Image.fromarray(ramp).save(tmp_path / "wide.png")
    Image.fromarray(np.rint(ramp / 65535 * 255).astype(np.uint8)).save(tmp_path / "narrow.png")
    preprocess = preprocessor(InputRecipe(1, 8, None, None, []))
    with Image.open(tmp_path / "wide.png") as wide, Image.open(tmp_path / "narrow.png") as narrow:
        assert wide.mode.startswith("I")
        x, y = preprocess(wide), preprocess(narrow)
    assert torch.equal(x, y) and float(x.max()) == pytest.approx(63000 / 65535, abs=1 / 255)


# ------------------------------------------------------------------------------------------ eedn cache


def test_cache_list_and_prune(tiny_config, tmp_path):
    cache = tmp_path / "cache"
    eedn.run_pipeline(tiny_config | FAST | {"cache_dir": str(cache), "backbone_training": {"epochs": 1}})
    dead = temp_prefix("features-x.pt").replace(f"-{os.getpid()}.", "-999999999.")
    (cache / "features" / f"{dead}abc.tmp").write_bytes(b"half")
    listed = CliRunner().invoke(cli, ["cache", "list", "--cache-dir", str(cache)])
    assert listed.exit_code == 0, listed.output
    lines = listed.output.splitlines()
    assert lines[0].startswith(f"{cache}: 6 entries")
    kinds = sorted(line.split()[0] for line in lines[1:])
    assert kinds == ["backbone", "features", "features", "features", "features", "temp"]
    assert any("resnet_tiny digits val: 269 rows x 3 exits" in line for line in lines)
    dry = CliRunner().invoke(cli, ["cache", "prune", "--cache-dir", str(cache), "--kind", "features", "--dry-run"])
    assert dry.output.splitlines()[-1].startswith("5 entries") and len(list((cache / "features").iterdir())) == 5
    pruned = CliRunner().invoke(cli, ["cache", "prune", "--cache-dir", str(cache), "--kind", "features"])
    assert pruned.exit_code == 0 and list((cache / "features").iterdir()) == []
    assert len(list((cache / "backbones").iterdir())) == 1
    nothing = CliRunner().invoke(cli, ["cache", "prune", "--cache-dir", str(cache), "--older-than", "1"])
    assert nothing.output.strip() == "0 entries, 0 B freed" and len(list((cache / "backbones").iterdir())) == 1
    gone = CliRunner().invoke(cli, ["cache", "list", "--cache-dir", str(tmp_path / "none")])
    assert gone.exit_code == 1 and "no cache at" in gone.output


def test_compare_checks_every_run_directory_before_stage_0(tmp_path, monkeypatch):
    from eedn.pipeline.comparison import parse_strategies, run_compare
    from eedn.core.config import resolve_config

    monkeypatch.setattr(pipeline, "prepare", no_stage_0)
    cfg = resolve_config({"backbone": "resnet_tiny", "image_size": 8, "progress": False})
    specs = parse_strategies("im-only")
    (tmp_path / "cmp" / "im-only-s1").mkdir(parents=True)
    (tmp_path / "cmp" / "im-only-s1" / "results.json").write_text("{}")
    with pytest.raises(EednError, match=r"run directory .*im-only-s1 already holds files; pass --overwrite"):
        run_compare(cfg, specs, [0, 1], {}, tmp_path / "cmp")


# ------------------------------------------------------------------------------------------ integrity (issue 23)


def test_flipped_bytes_in_a_cached_backbone_are_caught_and_it_is_retrained(tiny_config, tmp_path, capsys):
    """Finding 2: bytes changed inside a cached backbone's tensors pass torch.load; its recorded sha256 does not."""
    cfg = tiny_config | FAST | {"cache_dir": str(tmp_path / "cache")}
    first = eedn.run_pipeline(cfg | {"out": str(tmp_path / "a")})
    entry = Path(first["backbone"]["cache_path"])
    blob = torch.load(entry, weights_only=True)
    assert blob["sha256"] and blob["meta"]["backbone"] == "resnet_tiny"
    weight = next(v for v in blob["model"].values() if v.is_floating_point() and v.numel() > 8)
    flip_tensor_bytes(entry, float(weight.flatten()[3]), 7.0)
    capsys.readouterr()
    second = eedn.run_pipeline(cfg | {"out": str(tmp_path / "b")})
    err = capsys.readouterr().err
    assert f"ignoring the cached backbone: {entry} does not match its recorded sha256" in err
    assert second["backbone"]["source"] == "trained"  # retrained, never trusted
    assert second["backbone"]["test_accuracy"] == first["backbone"]["test_accuracy"]


def test_feature_entry_with_other_labels_is_recomputed_not_trusted(tiny_config, tmp_path, capsys):
    """Finding 2: a feature entry whose labels differ from the dataset's (hash and meta made consistent, as a
    deliberate edit would) is recomputed; the results are those of the clean run."""
    cfg = tiny_config | FAST | {"cache_dir": str(tmp_path / "cache")}
    clean = eedn.run_pipeline(cfg | {"out": str(tmp_path / "a")})
    from eedn.runtime.io import content_sha256

    entries = sorted((tmp_path / "cache" / "features").glob("features-*.pt"))
    assert entries
    for entry in entries:
        blob = torch.load(entry, weights_only=True)
        blob["labels"] = (blob["labels"] + 1) % 10
        del blob["sha256"]
        torch.save(blob | {"sha256": content_sha256(blob)}, entry)
    capsys.readouterr()
    again = eedn.run_pipeline(cfg | {"out": str(tmp_path / "b")})
    assert "holds other labels than the dataset; ignoring it and recomputing" in capsys.readouterr().err
    assert again["exits"] == clean["exits"] and again["policy"]["accuracy"] == clean["policy"]["accuracy"]


def test_corrupt_resume_checkpoint_stops_with_the_fix_and_a_plain_rerun_warns(tmp_path, monkeypatch, capsys):
    """Finding 2 and 8: a resume checkpoint with changed bytes is never resumed; a corrupt one says to delete
    it (not 'pass a different path'); a plain rerun says it replaces a resumable checkpoint."""
    from eedn.train import backbone_training

    data = eedn.load_dataset("digits", image_size=8, seed=0, augment=False)
    rec = {"epochs": 2, "optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.05, "batch_size": 256,
           "label_smoothing": 0.0, "warmup_epochs": 0, "augment": False}

    def model():
        torch.manual_seed(0)
        return eedn.create("backbone", "resnet_tiny", num_classes=10, image_size=8, in_channels=1)

    class Killed(Exception):
        pass

    def kill_after_epoch(name):
        if name == "backbone-epoch":
            raise Killed

    monkeypatch.setattr(backbone_training, "fault_point", kill_after_epoch)
    ckpt = tmp_path / "bb.pt"
    with pytest.raises(Killed):
        backbone_training.train_backbone(model(), data, dict(rec), seed=0, device="cpu", checkpoint_path=ckpt)
    monkeypatch.undo()
    partial = ckpt.with_suffix(".partial.pt")
    good = partial.read_bytes()
    ck = torch.load(partial, weights_only=True)
    flip_tensor_bytes(partial, float(next(v for v in ck["model"].values() if v.is_floating_point()).flatten()[2]), 9.0)
    with pytest.raises(EednError, match=r"resume checkpoint .*bb.partial.pt does not match its recorded sha256 .*; "
                                        r"delete it \(eedn cache prune --kind partial\) or run without --resume"):
        backbone_training.train_backbone(model(), data, dict(rec), seed=0, device="cpu", checkpoint_path=ckpt,
                                         resume=True)
    partial.write_bytes(good[:200])
    with pytest.raises(EednError, match=r"resume checkpoint .* is corrupt .*; delete it") as info:
        backbone_training.train_backbone(model(), data, dict(rec), seed=0, device="cpu", checkpoint_path=ckpt,
                                         resume=True)
    assert "pass a different path" not in str(info.value) and "\n" not in str(info.value)
    partial.write_bytes(good)
    capsys.readouterr()
    backbone_training.train_backbone(model(), data, dict(rec), seed=0, device="cpu", checkpoint_path=ckpt)
    assert "a resumable checkpoint of this backbone's training exists" in capsys.readouterr().err


def test_run_files_are_hashed_in_run_json_and_every_load_checks_hash_and_finiteness(tiny_config, tmp_path):
    """Findings 2 and 7: run.json records the SHA-256 of config.json, model.pt, outputs.pt and results.json; a
    changed file is refused on load; a model.pt with NaN weights (hash made consistent) is refused by load_run,
    predict and bench in one line."""
    from eedn.pipeline.rundir import read_outputs, read_results
    from eedn.runtime.io import file_sha256

    out = tmp_path / "run"
    eedn.run_pipeline(tiny_config | FAST | {"out": str(out)})
    manifest = json.loads((out / "run.json").read_text())
    hashes = manifest["files"]["sha256"]
    assert sorted(hashes) == ["config.json", "model.pt", "outputs.pt", "results.json"]
    assert all(file_sha256(out / name) == digest for name, digest in hashes.items())
    eedn.load_run(out)
    eedn.load_run(out, setting=manifest["policy"]["trained_setting"])  # uncalibrated: inf thresholds are no NaN
    for name, load in (("outputs.pt", read_outputs), ("results.json", read_results)):
        original = (out / name).read_bytes()
        (out / name).write_bytes(original.replace(b"0", b"1", 1))
        with pytest.raises(EednError, match=rf"{name} does not match the sha256 recorded in .*run.json"):
            load(out)
        (out / name).write_bytes(original)
    blob = torch.load(out / "model.pt", weights_only=True)
    first = next(k for k, v in blob["backbone"].items() if v.is_floating_point())
    blob["backbone"][first] = torch.full_like(blob["backbone"][first], float("nan"))
    torch.save(blob, out / "model.pt")
    with pytest.raises(EednError, match=r"model.pt does not match the sha256"):
        eedn.load_run(out)
    manifest["files"]["sha256"]["model.pt"] = file_sha256(out / "model.pt")
    (out / "run.json").write_text(json.dumps(manifest))
    with pytest.raises(EednError, match=rf"model.pt holds non-finite \(NaN / inf\) weights in backbone.{first}"):
        eedn.load_run(out)
    image = tmp_path / "x.png"
    from PIL import Image

    Image.new("L", (16, 16), 128).save(image)
    for args in (["predict", str(out), "--input", str(image)], ["bench", str(out), "--input", str(image)]):
        res = CliRunner().invoke(cli, args)
        assert res.exit_code == 1 and res.output.count("\n") == 1 and "non-finite (NaN / inf) weights" in res.output, \
            res.output


def test_overwrite_refuses_the_current_directory_and_a_cache_inside_out(tiny_config, tmp_path, monkeypatch):
    """Findings 4 and 8: `--out . --overwrite` and a --cache-dir inside --out are refused before stage 0."""
    monkeypatch.setattr(pipeline, "train_backbone", no_stage_0)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "something.txt").write_text("kept")
    cfg = tiny_config | FAST | {"cache_dir": str(tmp_path / "fresh")}
    with pytest.raises(EednError, match=r"--out \. is the current directory or holds it"):
        eedn.run_pipeline(cfg | {"out": ".", "overwrite": True})
    with pytest.raises(EednError, match=r"--out \.\. is the current directory or holds it"):
        eedn.run_pipeline(cfg | {"out": "..", "overwrite": True})
    with pytest.raises(EednError, match=r"the cache directory .*run/cache is inside --out .*run, which is replaced"):
        eedn.run_pipeline(cfg | {"out": str(tmp_path / "run"), "cache_dir": str(tmp_path / "run" / "cache")})
    assert (tmp_path / "something.txt").read_text() == "kept"


def test_publish_errors_say_what_happened(tmp_path, monkeypatch):
    """Finding 8: a run directory that cannot be written is not reported as 'written by another run'."""
    from eedn.pipeline import rundir

    staging = tmp_path / "staging"
    staging.mkdir()

    def refused(src, dst):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(rundir.os, "rename", refused)
    with pytest.raises(EednError, match=r"cannot write run directory .*out \(Permission denied\); give a writable"):
        rundir.publish(staging, tmp_path / "out", overwrite=False)


def test_concurrent_overwrite_never_gives_two_successes(tiny_config, tmp_path, monkeypatch):
    """Finding 4: while this run is about to publish with --overwrite, another process publishes its own
    --overwrite run there. This run must not replace it: it stops with one line, the other run stays whole."""
    import subprocess
    import sys

    from eedn.runtime import io as runtime_io

    out = tmp_path / "run"
    cfg = tiny_config | FAST
    eedn.run_pipeline(cfg)  # the run both replace
    real = runtime_io.fault_point
    other = {}

    def interloper(name):
        if name == "publish-run-dir" and not other:
            other["proc"] = subprocess.run(
                [sys.executable, "-m", "eedn", "run", "--backbone", "resnet_tiny", "--image-size", "16",
                 "--backbone-epochs", "3", "--strategy", "im-only", "--epochs", "2", "--set", "evaluators=[]",
                 "--set", "backbone_training.batch_size=64", "--cache-dir", cfg["cache_dir"], "--out", str(out),
                 "--overwrite", "--quiet", "--threads", "1"], capture_output=True, text=True, timeout=300, check=False,
                env=dict(os.environ, PYTHONPATH=str(Path(eedn.__file__).resolve().parent.parent)))
        real(name)

    monkeypatch.setattr(runtime_io, "fault_point", interloper)
    with pytest.raises(EednError, match=r"run directory .*run was written by another run meanwhile; nothing was "
                                        r"replaced"):
        eedn.run_pipeline(cfg | {"overwrite": True, "strategy_options": {"epochs": 1}})
    assert other["proc"].returncode == 0, other["proc"].stderr
    saved = json.loads((out / "results.json").read_text())
    assert saved["config"]["strategy_options"]["epochs"] == 2  # the other run's, whole
    eedn.load_run(out)  # hashes and weights intact
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def write_idx(path: Path, array) -> None:
    """MNIST's idx format (ubyte)."""
    import numpy as np

    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + np.asarray(array).astype(np.uint8).tobytes())


@pytest.mark.parametrize("case,message", [
    ("one-class", r"every label of the train split is 0; a classifier needs at least two classes"),
    ("out-of-range", r"the test split has label 12, outside 0\.\.9 \(10 classes\)"),
    ("random-bytes", r"dataset 'torchvision:MNIST': (torchvision cannot read it|cannot read class labels)"),
])
def test_torchvision_data_is_checked_before_stage_0(tiny_config, tmp_path, monkeypatch, case, message):
    """Finding 6: an MNIST whose labels are all one class, one with out-of-range labels and one of random bytes
    each stop before stage 0 with one line (not 100 % accuracy, an IndexError mid-training or a raw error)."""
    import numpy as np

    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 200), ("t10k", 40)):
        labels = np.arange(n) % 10
        if case == "one-class":
            labels[:] = 0
        if case == "out-of-range" and prefix == "t10k":
            labels[5] = 12
        if case == "random-bytes":
            (raw / f"{prefix}-images-idx3-ubyte").write_bytes(rng.bytes(5000))
            (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(rng.bytes(300))
            continue
        write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 255, size=(n, 28, 28)))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    monkeypatch.setattr(pipeline, "train_backbone", no_stage_0)
    cfg = tiny_config | FAST | {"dataset": "torchvision:MNIST", "dataset_options": {"data_dir": str(tmp_path)},
                                "cache_dir": str(tmp_path / "cache")}
    with pytest.raises(EednError, match=message) as info:
        eedn.run_pipeline(cfg)
    assert "\n" not in str(info.value)


def test_non_classification_torchvision_classes_are_refused_in_one_line(tmp_path):
    res = CliRunner().invoke(cli, ["run", "--dataset", "torchvision:CocoDetection", "--data-dir", str(tmp_path),
                                   "--quiet"])
    assert res.exit_code == 1 and res.output.count("\n") == 1
    assert "torchvision:CocoDetection needs annFile besides a root folder: it is not an image classification" \
        in res.output


def test_one_exit_backbone_and_risk_options_without_a_risk_fail_before_stage_0(tiny_config, tmp_path, monkeypatch):
    """Finding 8: `timm:... every=100` (one stage) is refused before stage 0, not after it with 'optimizer got an
    empty parameter list'; --epsilon / --controller without --risk are refused, not silently ignored."""
    monkeypatch.setattr(pipeline, "train_backbone", no_stage_0)
    cfg = tiny_config | FAST | {"cache_dir": str(tmp_path / "fresh")}
    with pytest.raises(EednError, match=r"backbone 'timm:vit_tiny_patch16_224' has 1 exit; an early-exit network "
                                        r"needs at least two"):
        eedn.run_pipeline(cfg | {"backbone": "timm:vit_tiny_patch16_224", "image_size": 32,
                                 "backbone_options": {"every": 100}})
    for flag in (["--epsilon", "0.1"], ["--controller", "crc"]):
        res = CliRunner().invoke(cli, ["run", "--backbone", "resnet_tiny", "--quiet", "--out",
                                       str(tmp_path / "r"), *flag])
        assert res.exit_code == 1 and res.output.count("\n") == 1, res.output
        assert "is set but no risk is (--risk)" in res.output


def test_prune_all_removes_symlinked_entries_without_following_them(tmp_path):
    """Finding 8: `cache prune --all` with a symlinked entry unlinks the link and leaves its target alone."""
    cache = tmp_path / "cache"
    (cache / "datasets").mkdir(parents=True)
    (cache / "features").mkdir()
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "keep.txt").write_text("not the cache's")
    (cache / "datasets" / "abc").symlink_to(target)
    (cache / "features" / "features-dead.pt").symlink_to(tmp_path / "missing.pt")
    res = CliRunner().invoke(cli, ["cache", "prune", "--all", "--cache-dir", str(cache)])
    assert res.exit_code == 0, res.output
    assert list((cache / "datasets").iterdir()) == [] and list((cache / "features").iterdir()) == []
    assert (target / "keep.txt").read_text() == "not the cache's"


def test_json_files_are_strict(tmp_path):
    """Finding 8: comparison.json (and every JSON eedn writes) is strict JSON: NaN and inf become null."""
    from eedn.runtime.io import atomic_write_json

    atomic_write_json(tmp_path / "c.json", {"a": float("nan"), "b": [1.0, float("inf")], "t": torch.tensor(float("nan"))})
    text = (tmp_path / "c.json").read_text()
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict {c}")) == {"a": None, "b": [1.0, None],
                                                                                           "t": None}


@pytest.mark.parametrize("strategy", ["boostnet", "jei"])
def test_cal_and_test_outputs_are_exchangeable(tiny_config, tmp_path, strategy):
    """Conformal coverage needs cal and test exchangeable: disjoint from train, the same preprocessing, and the
    same model state. The stored cal and test outputs equal those the saved model gives on the images now."""
    from eedn.core.cost import measure_exit_macs
    from eedn.pipeline.rundir import read_outputs
    from eedn.train.features import FeatureSource, compute_split_outputs

    out = tmp_path / "run"
    options = {"epochs": 2} | ({"warmup_epochs": 1} if strategy == "jei" else {})
    eedn.run_pipeline(tiny_config | {"strategy": strategy, "strategy_options": options, "evaluators": ["conformal"]})
    setting = json.loads((out / "run.json").read_text())["policy"]["trained_setting"]
    model, _ = eedn.load_run(out, setting=setting)
    data = eedn.load_dataset("digits", image_size=16, seed=0, augment=False)
    train, cal = set(map(int, data.train.indices)), set(map(int, data.cal.indices))
    assert not train & cal and not set(map(int, data.val.indices)) & cal
    stored = read_outputs(out)[setting]
    exit_macs, full_macs = measure_exit_macs(model)
    source = FeatureSource(model, data, cache=None)  # live images, no cache
    for split in ("cal", "test"):
        now = compute_split_outputs(model, source, split, exit_macs, full_macs)
        torch.testing.assert_close(now.logits, stored[split].logits, rtol=0, atol=1e-4)  # converged IMs scale features by 1/σ: float noise ~3e-5
        assert torch.equal(now.labels, stored[split].labels)
