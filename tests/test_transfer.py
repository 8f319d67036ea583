"""Transfer learning: ImageNet-shaped weights fine-tune into a 10-class model, timm-trainer checkpoints (with
their argparse.Namespace) load, and the weights-only loader still refuses a pickle that runs code."""
from __future__ import annotations

import argparse
import os
import pickle

import pytest
import torch
import torchvision

from eedn.core.build import build_backbone
from eedn.runtime.errors import EednError
from eedn.runtime.io import load_checkpoint
from eedn.core.transfer import adapt_input_conv, read_state_dict, transfer_summary

IMAGENET_SIZE = 72  # > 64 px: eedn keeps torchvision's ImageNet stem (7x7 conv + max-pool)


@pytest.fixture(scope="module")
def imagenet_resnet18(tmp_path_factory):
    """A random torchvision ResNet-18 with 1000 classes, saved exactly as torchvision's weights are laid out."""
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None, num_classes=1000).eval()
    path = tmp_path_factory.mktemp("imagenet") / "resnet18-imagenet.pth"
    torch.save(net.state_dict(), path)
    return net, path


def test_imagenet_weights_fine_tune_into_ten_classes(imagenet_resnet18):
    net, path = imagenet_resnet18
    model = build_backbone("resnet18", 10, IMAGENET_SIZE, 3)
    fresh_fc = model.fc.weight.detach().clone()
    report = model.load_pretrained(path)
    assert report == {"dropped": ["fc.weight", "fc.bias"], "adapted": []}
    assert "fc.weight, fc.bias dropped" in transfer_summary(report)
    torch.testing.assert_close(model.fc.weight, fresh_fc)  # the new head keeps its initialisation
    model.eval()
    x = torch.randn(2, 3, IMAGENET_SIZE, IMAGENET_SIZE)
    with torch.no_grad():  # every backbone weight came over: identical features before the head
        features = model.exit_features(3, model.stage(3, model.stage(2, model.stage(1, model.stage(0, model.stem(x))))))
        reference = torch.flatten(net.avgpool(net.layer4(net.layer3(net.layer2(net.layer1(
            net.maxpool(net.relu(net.bn1(net.conv1(x))))))))), 1)
    torch.testing.assert_close(features, reference)
    model.train()
    optimiser = torch.optim.SGD(model.parameters(), lr=0.01)
    images, labels = torch.randn(8, 3, IMAGENET_SIZE, IMAGENET_SIZE), torch.arange(8) % 10
    losses = []
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert model(images).shape == (8, 10) and losses[-1] < losses[0]


def test_first_convolution_adapts_to_gray_data_only_when_asked(imagenet_resnet18):
    net, path = imagenet_resnet18
    model = build_backbone("resnet18", 10, IMAGENET_SIZE, 1)
    with pytest.raises(EednError, match="reads 3 input channels, the model 1; set backbone_training.adapt_input"):
        model.load_pretrained(path)
    report = model.load_pretrained(path, adapt_input_channels=True)
    assert report["adapted"] == ["conv1.weight"]
    gray = torch.rand(2, 1, 16, 16)
    with torch.no_grad():  # a gray image gets the response the RGB kernel gave it on all three channels
        torch.testing.assert_close(model.conv1(gray), net.conv1(gray.expand(-1, 3, -1, -1)), rtol=1e-4, atol=1e-5)


def test_adapt_input_conv_keeps_constant_response_for_a_multiple_of_channels():
    weight = torch.randn(4, 3, 3, 3)
    six = adapt_input_conv(weight, 6)
    assert six.shape == (4, 6, 3, 3) and adapt_input_conv(weight, 5).shape == (4, 5, 3, 3)
    torch.testing.assert_close(six.sum(1), weight.sum(1))


def test_another_architecture_is_still_refused(imagenet_resnet18):
    _, path = imagenet_resnet18
    with pytest.raises(EednError, match="does not fit"):
        build_backbone("resnet50", 10, IMAGENET_SIZE, 3).load_pretrained(path)


def test_timm_trainer_checkpoint_with_namespace_loads(tmp_path):
    source = build_backbone("resnet_tiny", 3, 16, 3)
    path = tmp_path / "checkpoint-7.pth.tar"
    torch.save({"epoch": 7, "arch": "resnet_tiny", "state_dict": {f"module.{k}": v for k, v in
                                                                  source.state_dict().items()},
                "optimizer": {"state": {}, "param_groups": []}, "version": 2,
                "args": argparse.Namespace(model="resnet_tiny", lr=0.1, mean=(0.5,), amp=False, resume="")}, path)
    blob = load_checkpoint(path)
    assert isinstance(blob["args"], argparse.Namespace) and blob["args"].lr == 0.1
    target = build_backbone("resnet_tiny", 5, 16, 3)
    assert target.load_pretrained(path)["dropped"] == ["fc.weight", "fc.bias"]
    torch.testing.assert_close(target.conv1.weight, source.conv1.weight)


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo owned > /dev/null",))


def test_one_unwrapping_rule_for_every_checkpoint_layout(tmp_path):
    """EMA weights first (a timm-trainer or T2T-ViT release), then state_dict, model, backbone, else the dict itself;
    ``module.`` prefixes go, non-tensors are dropped."""
    ema, plain = {"w": torch.ones(2)}, {"module.w": torch.zeros(2)}
    layouts = {"ema": ({"epoch": 3, "state_dict": plain, "state_dict_ema": ema}, 1.0),
               "state_dict": ({"epoch": 3, "state_dict": plain, "args": None}, 0.0),
               "model": ({"model": {"module.module.w": torch.full((2,), 2.0)}}, 2.0),
               "backbone": ({"backbone": {"w": torch.full((2,), 3.0)}, "config": {}}, 3.0),
               "plain": ({"w": torch.full((2,), 4.0), "note": "x"}, 4.0)}
    for name, (blob, value) in layouts.items():
        torch.save(blob, tmp_path / f"{name}.pt")
        state = read_state_dict(tmp_path / f"{name}.pt")
        assert list(state) == ["w"] and torch.equal(state["w"], torch.full((2,), value)), name
    torch.save({"epoch": 3}, tmp_path / "none.pt")
    with pytest.raises(EednError, match="holds no state dict .looked for state_dict_ema, state_dict, model, backbone"):
        read_state_dict(tmp_path / "none.pt")


def test_a_pickle_that_runs_code_is_still_refused(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as fh:
        pickle.dump({"state_dict": {}, "payload": _RunsCode()}, fh)
    with pytest.raises(EednError, match="is corrupt or not a weights-only file"):
        load_checkpoint(path)
    torch.save({"args": _RunsCode()}, tmp_path / "evil2.pt")
    with pytest.raises(EednError, match="is corrupt or not a weights-only file"):
        load_checkpoint(tmp_path / "evil2.pt")


def test_pipeline_logs_the_dropped_head(imagenet_resnet18, eedn_cache, tmp_path, capsys):
    from eedn.core.config import resolve_config
    from eedn.runtime.progress import Progress
    from eedn.pipeline.run import prepare

    _, path = imagenet_resnet18
    cfg = resolve_config({"backbone": "resnet18", "dataset": "digits", "image_size": IMAGENET_SIZE,
                          "cache_dir": eedn_cache, "out": str(tmp_path / "run"),
                          "backbone_training": {"checkpoint": str(path), "epochs": 0,
                                                "adapt_input_channels": True}})
    prep = prepare(cfg, Progress(enabled=True, live=False))
    assert prep.backbone.fc.out_features == 10 and prep.backbone.conv1.in_channels == 1
    err = capsys.readouterr().err
    assert "checkpoint: classifier fc.weight, fc.bias dropped" in err and "conv1.weight adapted" in err
