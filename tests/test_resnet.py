"""ResNet backbones: stage-wise contract, exact MAC accounting, options, display names and checkpoints."""
from __future__ import annotations

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from torch import Tensor, nn

import eedn
from eedn.core.contracts import Gate
from eedn.core.cost import count_macs, measure_exit_macs
from eedn.runtime.errors import EednError
from eedn.core.model import EarlyExitModel


class NeverExitGate(Gate):
    """Max-probability score with an unreachable threshold: every sample runs to the end."""

    def scores(self, exit_index: int, logits: Tensor, features: Tensor | None = None) -> Tensor:
        return logits.softmax(-1).max(-1).values

    def exits_at(self, prefix: Tensor) -> Tensor:
        return prefix[:, -1] >= 2.0


def make(name: str, num_classes: int = 5, image_size: int = 16, in_channels: int = 3, **options) -> eedn.Backbone:
    torch.manual_seed(0)
    return eedn.create("backbone", name, num_classes, image_size, in_channels, **options)


def randomise_bn(model: nn.Module) -> None:
    """Non-trivial BN statistics, so eval-mode equality is not a trivial identity map."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


def stagewise(model: eedn.Backbone, x: Tensor) -> tuple[Tensor, list[Tensor]]:
    state = model.stem(x)
    feats = []
    for i in range(model.num_stages):
        state = model.stage(i, state)
        feats.append(model.exit_features(i, state))
    return model.head(feats[-1]), feats


# ----- analytic MACs of a CIFAR ResNet (conv: Cout*Cin*k*k*Hout*Wout, linear: in*out) -----

def conv_macs(c_in: int, c_out: int, k: int, h_out: int) -> int:
    return c_out * c_in * k * k * h_out * h_out


def cifar_block_macs(blocks_per_stage: int, widths: tuple[int, ...], image_size: int,
                     in_channels: int = 3) -> tuple[int, list[int]]:
    """(stem MACs, MACs of every residual block in order) for a CIFAR ResNet with option-B shortcuts."""
    stem = conv_macs(in_channels, widths[0], 3, image_size)
    blocks = []
    size, c_in = image_size, widths[0]
    for layer, width in enumerate(widths):
        for b in range(blocks_per_stage):
            stride = 2 if (layer > 0 and b == 0) else 1
            size = math.ceil(size / stride)  # 3x3 pad 1 and 1x1 pad 0 convs agree on the output size
            macs = conv_macs(c_in, width, 3, size) + conv_macs(width, width, 3, size)
            if stride != 1 or c_in != width:
                macs += conv_macs(c_in, width, 1, size)
            blocks.append(macs)
            c_in = width
    return stem, blocks


@pytest.mark.parametrize("name,classes,size,stages,dims", [
    ("resnet_tiny", 5, 16, 3, [8, 16, 32]),
    ("resnet20", 7, 32, 9, [16] * 3 + [32] * 3 + [64] * 3),
    ("resnet18", 4, 32, 4, [64, 128, 256, 512]),
])
def test_shapes_and_stagewise_forward_match(name, classes, size, stages, dims):
    model = make(name, num_classes=classes, image_size=size).eval()
    randomise_bn(model)
    x = torch.randn(3, 3, size, size)
    with torch.no_grad():
        full = model(x)
        logits, feats = stagewise(model, x)
    assert model.num_stages == stages and model.feature_dims == dims
    assert full.shape == (3, classes)
    assert [tuple(f.shape) for f in feats] == [(3, d) for d in dims]
    torch.testing.assert_close(logits, full, rtol=0, atol=0)
    assert model.input_spec == eedn.InputSpec(3, size)


def test_exit_modes_number_of_stages():
    assert make("resnet32", image_size=8).num_stages == 15
    assert make("resnet32", image_size=8, exits="stage").num_stages == 3
    assert make("resnet56", image_size=8, exits="block").num_stages == 27
    assert make("resnet110", image_size=8, exits="stage").feature_dims == [16, 32, 64]
    assert make("resnet18", image_size=8).num_stages == 4
    assert make("resnet18", image_size=8, exits="block").num_stages == 8
    assert make("resnet50", image_size=8).feature_dims == [256, 512, 1024, 2048]


def test_stage_mode_matches_block_mode_and_state_keys_equal():
    block = make("resnet20", image_size=16).eval()
    stage = make("resnet20", image_size=16, exits="stage").eval()
    assert list(block.state_dict()) == list(stage.state_dict())
    stage.load_state_dict(block.state_dict())
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        _, block_feats = stagewise(block, x)
        _, stage_feats = stagewise(stage, x)
    for s in range(3):  # stage s ends where block 3s+2 ends
        torch.testing.assert_close(stage_feats[s], block_feats[3 * s + 2])


def test_torchvision_stem_small_vs_large_and_state_dict_names():
    import torchvision

    small = make("resnet18", num_classes=10, image_size=32)
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert isinstance(small.maxpool, nn.Identity)
    large = make("resnet18", num_classes=10, image_size=96, in_channels=1)
    assert large.conv1.kernel_size == (7, 7) and large.conv1.in_channels == 1
    assert isinstance(large.maxpool, nn.MaxPool2d)
    reference = torchvision.models.resnet18(weights=None, num_classes=10)
    rgb = make("resnet18", num_classes=10, image_size=96)
    rgb.load_state_dict(reference.state_dict())  # torchvision names, strict
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(rgb.eval()(x), reference.eval()(x))


def test_count_macs_equals_analytic_cifar_resnet():
    classes, size = 6, 12  # 12 -> 6 -> 3: even and odd map sizes
    model = make("resnet_tiny", num_classes=classes, image_size=size).eval()
    stem, blocks = cifar_block_macs(1, (8, 16, 32), size)
    expected = stem + sum(blocks) + 32 * classes
    assert count_macs(lambda: model(torch.zeros(1, 3, size, size))) == expected

    model = make("resnet20", num_classes=classes, image_size=size, in_channels=1).eval()
    stem, blocks = cifar_block_macs(3, (16, 32, 64), size, in_channels=1)
    assert count_macs(lambda: model(torch.zeros(1, 1, size, size))) == stem + sum(blocks) + 64 * classes


@pytest.mark.parametrize("exits", ["block", "stage"])
def test_measure_exit_macs_is_cumulative_and_analytic(exits):
    classes, size = 5, 16
    backbone = make("resnet20", num_classes=classes, image_size=size, exits=exits)
    g = backbone.num_stages - 1
    ims = [nn.Linear(backbone.feature_dims[i], classes) for i in range(g)]
    model = EarlyExitModel(backbone, ims, NeverExitGate(g, classes))
    exit_macs, full = measure_exit_macs(model)

    stem, blocks = cifar_block_macs(3, (16, 32, 64), size)
    per_stage = blocks if exits == "block" else [sum(blocks[3 * s: 3 * s + 3]) for s in range(3)]
    expected, running = [], stem
    for i, macs in enumerate(per_stage):
        running += macs
        exit_cost = backbone.feature_dims[i] * classes  # an IM, or the head at the last exit
        expected.append(running + exit_cost)
        running += exit_cost
    assert exit_macs == expected
    assert all(a < b for a, b in zip(exit_macs, exit_macs[1:]))
    plain = make("resnet20", num_classes=classes, image_size=size, exits=exits).eval()
    assert full == count_macs(lambda: plain(torch.zeros(1, 3, size, size)))
    assert full == stem + sum(blocks) + 64 * classes
    assert exit_macs[-1] == full + sum(backbone.feature_dims[i] * classes for i in range(g))


def test_resnet56_macs_near_published_125m():
    model = make("resnet56", num_classes=10, image_size=32).eval()
    macs = count_macs(lambda: model(torch.zeros(1, 3, 32, 32)))
    assert abs(macs - 125e6) / 125e6 < 0.03


def test_plain_resnet_picks_by_image_size():
    assert make("resnet", image_size=32).num_stages == 9  # ResNet-20, block exits
    big = make("resnet", image_size=72)
    assert big.num_stages == 4 and isinstance(big.maxpool, nn.MaxPool2d)  # ResNet-18
    names = eedn.list_names("backbone")
    for name in ("resnet", "resnet_tiny", "resnet20", "resnet32", "resnet56", "resnet110", "resnet18", "resnet50"):
        assert name in names
    assert "64" in eedn.registry("backbone").get("resnet").info["description"]


def test_display_names_say_which_member_was_built():
    assert make("resnet", image_size=32, in_channels=1).display_name == "ResNet-8 (tiny)"  # digits-like data
    assert make("resnet", image_size=32).display_name == "ResNet-20"
    assert make("resnet", image_size=72).display_name == "ResNet-18"
    assert make("resnet", image_size=8, size=56).display_name == "ResNet-56"
    assert make("resnet", image_size=8, size="50").display_name == "ResNet-50"
    assert make("resnet_tiny", image_size=8).display_name == "ResNet-8 (tiny)"


def trained_tiny() -> eedn.Backbone:
    trained = make("resnet_tiny", num_classes=3, image_size=8).eval()
    randomise_bn(trained)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.05)
    return trained


@pytest.mark.parametrize("wrap", [lambda s: s, lambda s: {"model": s, "summary": {}},
                                  lambda s: {"backbone": s, "heads": {}}],
                         ids=["state_dict", "backbone_cache", "run_weights"])
def test_load_pretrained_round_trip_of_eedn_saved_weights(tmp_path, wrap):
    trained = trained_tiny()
    path = tmp_path / "tiny.pt"
    torch.save(wrap(trained.state_dict()), path)
    loaded = make("resnet_tiny", num_classes=3, image_size=8)
    loaded.load_pretrained(path)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), trained(x), rtol=0, atol=0)


@pytest.mark.parametrize("name,num_classes,display", [("resnet20", 3, "ResNet-20"), ("resnet20", 4, "ResNet-20")])
def test_mismatched_checkpoint_is_one_line_error(tmp_path, name, num_classes, display):
    torch.save(make("resnet_tiny", num_classes=3, image_size=8).state_dict(), tmp_path / "tiny.pt")
    model = make(name, num_classes=num_classes, image_size=8)
    with pytest.raises(EednError, match="does not fit") as info:
        model.load_pretrained(tmp_path / "tiny.pt")
    message = str(info.value)
    assert "\n" not in message and "tiny.pt" in message and display in message


def test_bad_checkpoint_files(tmp_path):
    model = make("resnet_tiny", image_size=8)
    with pytest.raises(EednError, match="not found"):
        model.load_pretrained(tmp_path / "missing.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(EednError, match="holds no state dict"):
        model.load_pretrained(tmp_path / "list.pt")


def test_invalid_options_list_the_valid_ones():
    with pytest.raises(EednError, match="invalid exits='layer'; choose from block, stage") as info:
        make("resnet20", exits="layer")
    assert "\n" not in str(info.value)
    with pytest.raises(EednError, match="unknown option\\(s\\) depth; valid: exits"):
        make("resnet18", depth=3)
    with pytest.raises(EednError, match="unknown option\\(s\\) checkpoint"):  # --backbone-checkpoint loads weights
        make("resnet18", checkpoint="weights.pt")
    with pytest.raises(EednError, match="did you mean 'exits'.*valid: exits, size"):
        make("resnet", exit="stage")
    with pytest.raises(EednError, match="invalid size=19; choose from auto, tiny, 20"):
        make("resnet", size=19)
    with pytest.raises(EednError, match="too small"):
        make("resnet_tiny", image_size=7)
    with pytest.raises(EednError, match="too small"):
        make("resnet50", image_size=4)


def test_trains_one_step_and_gradients_reach_the_stem():
    model = make("resnet_tiny", num_classes=3, image_size=8).train()
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])
    nn.functional.cross_entropy(model(x), y).backward()
    assert model.conv1.weight.grad is not None and model.conv1.weight.grad.abs().sum() > 0
