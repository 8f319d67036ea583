"""The fast CIFAR convnet: stage-wise contract, exact MACs, whitening stem, options."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from torch import Tensor, nn

import eedn
from eedn.core.build import create_model
from eedn.core.cost import count_macs, measure_exit_macs
from eedn.runtime.errors import EednError


def make(name: str = "fast_cifar", num_classes: int = 5, image_size: int = 16, in_channels: int = 3,
         **options) -> eedn.Backbone:
    torch.manual_seed(0)
    return eedn.create("backbone", name, num_classes, image_size, in_channels, **options)


def randomise_bn(model: nn.Module) -> None:
    """Non-trivial running statistics, so the eval-mode comparisons are not identity maps."""
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


def conv_macs(c_in: int, c_out: int, k: int, h_out: int) -> int:
    return c_out * c_in * k * k * h_out * h_out


def analytic_macs(widths: list[int], convs: int, size: int, in_channels: int = 3) -> tuple[int, list[int]]:
    """(stem MACs, MACs of every convolution in order): 2x2 valid stem, then per group a 3x3 conv at the
    incoming size, a 2x2 max-pool, and the remaining 3x3 convs at the pooled size."""
    c, size = 2 * 4 * in_channels, size - 1
    stem = conv_macs(in_channels, c, 2, size)
    layers = []
    for w in widths:
        layers.append(conv_macs(c, w, 3, size))
        size //= 2
        layers += [conv_macs(w, w, 3, size) for _ in range(convs - 1)]
        c = w
    return stem, layers


@pytest.mark.parametrize("name,options,stages,dims", [
    ("fast_cifar", {}, 6, [64, 64, 256, 256, 256, 256]),
    ("fast_cifar_small", {"convs_per_group": 3}, 9, [32] * 3 + [128] * 6),
    ("fast_cifar", {"widths": [8, 16], "exit_pool": "avg"}, 4, [8, 8, 16, 16]),
])
def test_shapes_and_stagewise_forward_match(name, options, stages, dims):
    model = make(name, num_classes=7, **options).eval()
    randomise_bn(model)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        full = model(x)
        logits, feats = stagewise(model, x)
    assert model.num_stages == stages and model.feature_dims == dims
    assert full.shape == (3, 7)
    assert [tuple(f.shape) for f in feats] == [(3, d) for d in dims]
    torch.testing.assert_close(logits, full, rtol=0, atol=0)
    assert model.prefers_channels_last and model.input_spec == eedn.InputSpec(3, 16)


def test_exit_pool_and_head_scale():
    model = make(widths=[8, 16], head_scale=0.5).eval()
    state = torch.randn(2, 16, 3, 3)
    torch.testing.assert_close(model.exit_features(3, state), state.amax(dim=(2, 3)))
    avg = make(widths=[8, 16], exit_pool="avg").eval()
    torch.testing.assert_close(avg.exit_features(3, state), state.mean(dim=(2, 3)))
    feats = torch.randn(2, 16)
    torch.testing.assert_close(model.head(feats), 0.5 * model.classifier(feats))


def test_count_macs_equals_analytic_and_paper_layout_is_118m():
    for widths, convs, size in (([8, 16], 2, 16), ([8, 16, 24], 3, 20)):
        model = make(widths=widths, convs_per_group=convs, image_size=size, num_classes=6).eval()
        stem, layers = analytic_macs(widths, convs, size)
        assert count_macs(lambda: model(torch.zeros(1, 3, size, size))) == stem + sum(layers) + widths[-1] * 6
    paper = make(num_classes=10, image_size=32).eval()
    macs = count_macs(lambda: paper(torch.zeros(1, 3, 32, 32)))
    assert abs(macs - 118e6) / 118e6 < 0.01  # the paper: about 118 M MACs per image


@pytest.mark.parametrize("convs", [2, 3])
def test_exit_macs_increase_and_are_cumulative(convs):
    classes, size, widths = 5, 16, [8, 16, 24]
    model = create_model("fast_cifar", classes, size, 3, gate="max_prob",
                         backbone_options={"widths": widths, "convs_per_group": convs})
    exit_macs, full = measure_exit_macs(model)
    stem, layers = analytic_macs(widths, convs, size)
    dims = model.backbone.feature_dims
    expected, running = [], stem
    for i, macs in enumerate(layers):
        running += macs
        expected.append(running + dims[i] * classes)  # the linear IM, or the head at the last exit
        running += dims[i] * classes
    assert len(exit_macs) == 3 * convs
    assert exit_macs == expected
    assert all(a < b for a, b in zip(exit_macs, exit_macs[1:]))
    assert full == stem + sum(layers) + widths[-1] * classes


def test_whitening_stem_whitens_its_first_training_batch_and_stays_frozen():
    model = make(widths=[8, 16]).train()
    g = torch.Generator().manual_seed(2)
    mix = torch.tensor([[1.0, 0.8, 0.3], [0.0, 0.6, 0.5], [0.0, 0.0, 0.4]])  # correlated channels
    x = torch.einsum("ij,bjhw->bihw", mix, torch.randn(64, 3, 16, 16, generator=g)) + 0.7
    assert not bool(model.whiten.ready)
    model(x)
    assert bool(model.whiten.ready)
    assert "whiten.weight" in dict(model.named_buffers())  # frozen: a buffer, not a parameter
    assert "whiten.weight" not in dict(model.named_parameters())
    with torch.no_grad():
        out = nn.functional.conv2d(x, model.whiten.weight, model.whiten.bias)  # before the GELU
    half = out[:, :12].permute(0, 2, 3, 1).reshape(-1, 12)
    torch.testing.assert_close(out[:, 12:], -out[:, :12])  # both signs of every direction
    cov = torch.cov(half.T)
    assert half.mean(0).abs().max() < 1e-3
    assert (cov - torch.diag(torch.diag(cov))).abs().max() < 2e-2  # decorrelated
    assert torch.diag(cov).max() < 1.0 + 1e-3  # unit variance or less (eps bounds flat directions)
    kernel = model.whiten.weight.clone()
    model(torch.randn(8, 3, 16, 16))  # a later batch leaves it alone
    torch.testing.assert_close(model.whiten.weight, kernel, rtol=0, atol=0)
    model.requires_grad_(True)  # a strategy that unfreezes the backbone cannot train it
    assert "whiten.weight" not in dict(model.named_parameters())


def test_whitening_survives_a_save_load_round_trip(tmp_path):
    model = make(widths=[8, 16]).train()
    model(torch.randn(16, 3, 16, 16))
    torch.save({"model": model.state_dict()}, tmp_path / "w.pt")
    fresh = make(widths=[8, 16])
    fresh.load_pretrained(tmp_path / "w.pt")
    assert bool(fresh.whiten.ready)
    torch.testing.assert_close(fresh.whiten.weight, model.whiten.weight, rtol=0, atol=0)


def test_without_whitening_the_stem_is_a_trainable_conv():
    model = make(widths=[8, 16], whiten=False).train()
    before = model.whiten.weight.detach().clone()
    model(torch.randn(4, 3, 16, 16))
    torch.testing.assert_close(model.whiten.weight.detach(), before, rtol=0, atol=0)
    assert "whiten.weight" in dict(model.named_parameters())


def test_batchnorm_has_no_trainable_scale_and_convs_start_as_identity():
    model = make(widths=[8, 16])
    names = [n for n, _ in model.named_parameters()]
    assert not any(n.endswith("norm.weight") for n in names)
    assert "layers.0.norm.bias" in names
    w = model.layers[1].conv.weight  # 8 -> 8: fully Dirac
    torch.testing.assert_close(w, nn.init.dirac_(torch.empty_like(w)))
    w = model.layers[2].conv.weight  # 8 -> 16: first 8 output channels Dirac, the rest random
    torch.testing.assert_close(w[:8], nn.init.dirac_(torch.empty_like(w[:8])))
    assert w[8:].abs().sum() > 0


def test_trains_one_step_and_gradients_reach_the_stem_bias_and_first_conv():
    model = make(widths=[8, 16], num_classes=3).train()
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 0])
    nn.functional.cross_entropy(model(x), y).backward()
    assert model.whiten.bias.grad.abs().sum() > 0
    assert model.layers[0].conv.weight.grad.abs().sum() > 0


def test_registered_names():
    names = eedn.list_names("backbone")
    assert "fast_cifar" in names and "fast_cifar_small" in names
    assert make("fast_cifar_small").feature_dims == [32, 32, 128, 128, 128, 128]
    assert make().display_name == "fast CIFAR convnet 64/256/256 x2"


def test_invalid_options_are_one_line_errors():
    cases = [
        ({"convs_per_group": 4}, "invalid convs_per_group=4; choose from 2, 3"),
        ({"widths": [64, 0, 256]}, "invalid widths=.*>= 1"),
        ({"widths": []}, "widths must name at least one group width"),
        ({"exit_pool": "min"}, "invalid exit_pool='min'; choose from max, avg"),
        ({"head_scale": 0}, "invalid head_scale=0; .* > 0"),
        ({"width": [8]}, "did you mean 'widths'"),
    ]
    for options, message in cases:
        with pytest.raises(EednError, match=message) as info:
            make(**options)
        assert "\n" not in str(info.value)
    with pytest.raises(EednError, match="image_size 8 is too small for fast_cifar with 3 groups; use at least 9"):
        make(image_size=8)
    make(image_size=9, widths=[4, 4, 4])  # the smallest size that fits three groups
