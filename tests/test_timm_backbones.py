"""``--backbone timm:<model_name>``: timm models split into stages, their staged forward equal to timm's own,
exact MACs, local weight files, and the pipeline end to end."""
from __future__ import annotations

import json

import pytest
import timm
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from eedn.core.build import build_backbone, build_model
from eedn.cli.main import cli
from eedn.core.cost import count_macs, measure_exit_macs
from eedn.runtime.errors import EednError, UnknownNameError

VIT = "timm:vit_tiny_patch16_224"
CNN = "timm:resnet10t"


def staged(backbone, x):
    state = backbone.stem(x)
    for i in range(backbone.num_stages):
        state = backbone.stage(i, state)
    return backbone.head(backbone.exit_features(backbone.num_stages - 1, state))


@pytest.mark.parametrize("name,stages,dims", [(VIT, 12, [192] * 12), (CNN, 4, [64, 128, 256, 512])])
def test_staged_forward_equals_timms_forward(name, stages, dims):
    torch.manual_seed(0)
    backbone = build_backbone(name, 10, 32, 3).eval()
    assert backbone.num_stages == stages and backbone.feature_dims == dims
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        reference = backbone.model(x)
        torch.testing.assert_close(staged(backbone, x), reference, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(backbone(x), reference, rtol=1e-5, atol=1e-5)
    assert not any(k.startswith("model.model") for k in backbone.state_dict())  # no duplicate weights
    assert set(backbone.state_dict()) == {f"model.{k}" for k in backbone.model.state_dict()}


def test_vit_exit_every_k_blocks_and_class_token_or_pooled_features():
    backbone = build_backbone(VIT, 10, 32, 1, {"every": 5})
    assert backbone.num_stages == 3  # blocks 0-4, 5-9, 10-11
    pooled = build_backbone(VIT, 10, 32, 3, {"global_pool": "avg"}).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(staged(pooled, x), pooled.model(x), rtol=1e-5, atol=1e-5)


def test_exit_macs_are_exact_and_the_last_equals_timms_forward():
    model = build_model(build_backbone(CNN, 10, 32, 3))
    exit_macs, full = measure_exit_macs(model)
    with torch.no_grad():
        timm_macs = count_macs(lambda: model.backbone.model.eval()(torch.zeros(1, 3, 32, 32)))
    assert full == timm_macs
    assert exit_macs == sorted(exit_macs) and exit_macs[-1] > full  # the declined exits' IMs cost too


def test_local_timm_weight_file_loads_with_another_head(tmp_path):
    source = timm.create_model("resnet10t", pretrained=False, num_classes=1000)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    backbone = build_backbone(CNN, 10, 32, 3)
    report = backbone.load_pretrained(path)
    assert sorted(report["dropped"]) == ["model.fc.bias", "model.fc.weight"]
    torch.testing.assert_close(backbone.model.conv1[0].weight, source.conv1[0].weight)
    gray = build_backbone(CNN, 10, 32, 1)
    assert gray.load_pretrained(path, adapt_input_channels=True)["adapted"] == ["model.conv1.0.weight"]


def test_unknown_timm_names_are_one_line_errors():
    with pytest.raises(EednError, match="timm has no model 'vit_nope'"):
        build_backbone("timm:vit_nope", 10, 32, 3)
    with pytest.raises(UnknownNameError, match="needs a name after the colon"):
        build_backbone("timm:", 10, 32, 3)
    with pytest.raises(UnknownNameError, match="is a family"):
        build_backbone("timm", 10, 32, 3)
    with pytest.raises(UnknownNameError, match="timm:<name>"):
        build_backbone("nope", 10, 32, 3)


def test_cli_runs_a_timm_vit_on_digits(eedn_cache, tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["run", "--backbone", VIT, "--image-size", "32", "--strategy", "im-only",
                                      "--backbone-epochs", "1", "--epochs", "1", "--quiet", "--cache-dir", eedn_cache,
                                      "--set", "backbone_options.every=4", "--set", f"out={out}"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["model"]["backbone"]["name"] == VIT and manifest["model"]["num_exits"] == 3
