"""``timm:<name>.<tag>``: the architecture resolved the way timm does, weights from a local file or the local cache
(never downloaded), and the documented recipe (fine-tune a pretrained timm backbone on a local dataset, then
train JEI) end to end, with "pretrained" weights this test makes itself."""
from __future__ import annotations

import json

import pytest
import timm
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from eedn.cli.main import cli
from eedn.core.build import build_backbone
from eedn.runtime.errors import EednError

TAGGED = "timm:resnet10t.c3_in1k"


def imagenet_like_weights(path):
    """A resnet10t with 1000 classes and seeded random weights, saved like timm's hub files: stands in for the
    real pretrained weights, which the test never downloads."""
    torch.manual_seed(123)
    model = timm.create_model("resnet10t", pretrained=False, num_classes=1000)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model.state_dict()


def fake_hub_cache(root, name: str = "resnet10t.c3_in1k"):
    """The layout huggingface_hub leaves after a download: ``models--timm--NAME/snapshots/REV/model.safetensors``
    and ``refs/main`` naming REV."""
    repo = root / f"models--timm--{name}"
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    return imagenet_like_weights(snapshot / "model.safetensors"), snapshot / "model.safetensors"


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


def test_a_tagged_name_loads_weights_from_the_local_cache(empty_caches):
    saved, path = fake_hub_cache(empty_caches / "hf")
    backbone = build_backbone(TAGGED, 10, 32, 3)
    assert backbone.weights_source == str(path)
    assert backbone.model.pretrained_cfg["tag"] == "c3_in1k"  # the tag's own configuration, as timm resolves it
    torch.testing.assert_close(backbone.model.conv1[0].weight, saved["conv1.0.weight"])
    assert backbone.model.fc.out_features == 10  # the 1000-class head is dropped
    fresh = build_backbone(TAGGED, 10, 32, 3, {"pretrained": "none"})
    assert fresh.weights_source is None
    assert not torch.equal(fresh.model.conv1[0].weight, saved["conv1.0.weight"])


def test_without_cached_weights_it_says_so_and_never_downloads(empty_caches, monkeypatch, capsys):
    def no_network(*args, **kwargs):
        raise AssertionError("eedn must not download")

    monkeypatch.setattr("timm.models._builder.load_pretrained", no_network)
    backbone = build_backbone(TAGGED, 10, 32, 3)
    assert backbone.weights_source is None
    err = capsys.readouterr().err
    assert "no local weights for timm:resnet10t.c3_in1k" in err and "backbone_options.pretrained=download" in err
    untagged = build_backbone("timm:resnet10t", 10, 32, 3)
    assert untagged.weights_source is None and "no local weights" not in capsys.readouterr().err


def test_unknown_tags_and_models_are_one_line(empty_caches):
    with pytest.raises(EednError, match=r"no pretrained tag 'nope' for resnet10t; its tags: resnet10t\.c3_in1k"):
        build_backbone("timm:resnet10t.nope", 10, 32, 3)
    with pytest.raises(EednError, match="timm has no model 'resnet10z'"):
        build_backbone("timm:resnet10z.c3_in1k", 10, 32, 3)


def test_recipe_fine_tune_a_pretrained_timm_backbone_then_train_jei(empty_caches):
    """docs/usage.md, "Fine-tuning a pretrained timm backbone": the same command, on digits at 32 px."""
    weights = empty_caches / "resnet10t_in1k.safetensors"
    imagenet_like_weights(weights)
    out = empty_caches / "run"
    res = CliRunner().invoke(cli, [
        "run", "--backbone", TAGGED, "--backbone-checkpoint", str(weights), "--backbone-epochs", "1",
        "--dataset", "digits", "--image-size", "32", "--strategy", "jei", "--epochs", "4",
        "--set", "strategy_options.warmup_epochs=2", "--set", "backbone_training.adapt_input_channels=true",
        "--set", "evaluators=[]",
        "--cache-dir", str(empty_caches / "cache"),
        "--out", str(out), "--threads", "1", "--quiet"], terminal_width=200)
    assert res.exit_code == 0, res.output
    results = json.loads((out / "results.json").read_text())
    backbone = results["backbone"]
    assert backbone["init_checkpoint"] == str(weights) and backbone["source"] == "trained"
    assert backbone["epochs"] == 1
    assert results["policy"]["strategy"] == "jei" and 0 < results["policy"]["macs_fraction"] <= 1
