"""Nothing lost, nothing silently wrong: run-directory safety, cache keys and shape checks, divergence,
early validation and one-line errors, in-process on tiny digits runs (docs/reliability.md lists each
fault and the test that pins it; kills and concurrent runs are in tests/test_faults.py)."""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import eedn
from eedn import run as pipeline
from eedn.cache import FeatureCache, FeatureSet
from eedn.cli import cli
from eedn.errors import EednError
from eedn.io import atomic_write_text, clean_stale_temps, load_checkpoint, temp_prefix

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
    monkeypatch.undo()
    results = eedn.run_pipeline(tiny_config | FAST | {"out": str(out), "overwrite": True})
    assert results["run_dir"] == str(out)
    assert not (out / "stale.txt").exists()  # replaced whole, never mixed with the old run's files
    assert json.loads((out / "results.json").read_text())["config"]["overwrite"] is True
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left beside it


def test_default_run_names_are_unique_within_one_second():
    from eedn.rundir import unique_run_name

    names = {unique_run_name("digits-resnet_tiny-jei-s0") for _ in range(50)}
    assert len(names) == 50


def test_a_failed_run_leaves_no_run_directory(tiny_config, tmp_path, monkeypatch):
    from eedn import render

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
    assert cache.save("k", fs, meta={"what": "test"})
    assert cache.load("k", rows=5, dims=[3, 4]) is not None
    assert cache.load("k", rows=6, dims=[3, 4]) is None
    assert cache.load("k", rows=5, dims=[3, 8]) is None
    assert cache.load("k", rows=5, dims=[3]) is None
    assert torch.load(cache.path("k"), weights_only=True)["meta"] == {"what": "test"}
    cache.path("k").write_bytes(cache.path("k").read_bytes()[:100])  # truncated: a miss, never an error
    assert cache.load("k", rows=5, dims=[3, 4]) is None


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
    """Permission bits do not bind root: the probe :func:`eedn.io.writable_dir` is what decides."""
    from eedn import cache as cache_module, preflight

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
    cfg = tiny_config | FAST | {"strategy_options": {"epochs": 1, "lr": 1e12}}
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
    from eedn.config import load_config_file

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
    from eedn.cli_options import first_line

    exc = RuntimeError("Error(s) in loading state_dict for T2TViT:\n\tMissing key(s) in state_dict: \"head.w\".")
    assert first_line(exc) == "Error(s) in loading state_dict for T2TViT: Missing key(s) in state_dict: \"head.w\"."
    assert first_line(ValueError("first\nsecond")) == "first"
