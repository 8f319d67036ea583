"""T2T-ViT backbones: shapes, stage-wise contract, official names, checkpoint loading, MACs."""
from __future__ import annotations

import copy
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
from eedn_plugins.t2t_vit import (
    VARIANTS,
    T2TConfig,
    SoftSplit,
    T2TViT,
    TokenPerformer,
    resize_pos_embed,
    sinusoid_position_table,
)


def make(name: str = "t2t_vit_tiny", num_classes: int = 10, image_size: int = 32, in_channels: int = 3,
         checkpoint: str | None = None, **options) -> T2TViT:
    torch.manual_seed(0)
    model = eedn.create("backbone", name, num_classes, image_size, in_channels, **options)
    if checkpoint is not None:
        model.load_pretrained(checkpoint)
    return model.eval()


class MaxProbGate(Gate):
    """A rule gate with no MACs of its own, so exit costs are backbone + IM costs only."""

    def scores(self, exit_index: int, logits: Tensor, features: Tensor | None = None) -> Tensor:
        return logits.softmax(-1).max(-1).values

    def exits_at(self, prefix: Tensor) -> Tensor:
        return prefix[:, -1] >= 2.0


@pytest.fixture(scope="module")
def t2t7_32() -> T2TViT:
    return make("t2t_vit_7", image_size=32)


@pytest.fixture(scope="module")
def t2t7_224() -> T2TViT:
    return make("t2t_vit_7", image_size=224)


@pytest.fixture(scope="module")
def t2t14_224() -> T2TViT:
    """Built through the plain family name, which also checks the ``size`` option."""
    return make("t2t_vit", image_size=224, size=14)


def early_exit_model(backbone: T2TViT) -> EarlyExitModel:
    g = backbone.num_stages - 1
    ims = [nn.Linear(backbone.feature_dims[i], backbone.num_classes) for i in range(g)]
    return EarlyExitModel(backbone, ims, MaxProbGate(g, backbone.num_classes))


# ------------------------------------------------------------------------------------ registration


def test_all_sizes_are_registered():
    names = eedn.list_names("backbone")
    for name in ("t2t_vit", "t2t_vit_7", "t2t_vit_14", "t2t_vit_24", "t2t_vit_tiny"):
        assert name in names


def check_size(model: T2TViT, dim: int, depth: int, heads: int, hidden: int) -> None:
    assert model.num_stages == depth and model.feature_dims == [dim] * depth
    block = model.blocks[0]
    assert block.attn.num_heads == heads and block.attn.head_dim == 64
    assert block.attn.scale == pytest.approx(64 ** -0.5)
    assert block.attn.qkv.bias is None
    assert block.mlp.fc1.out_features == hidden
    assert model.norm.eps == 1e-5 and block.norm1.eps == 1e-5
    assert model.tokens_to_token.attention1.kqv.in_features == 147
    assert model.tokens_to_token.attention1.m == 32
    assert model.tokens_to_token.project.in_features == 576


def test_published_sizes(t2t7_32, t2t14_224):
    check_size(t2t7_32, 256, 7, 4, 512)
    check_size(t2t14_224, 384, 14, 6, 1152)
    # T2T-ViT-24 (64 M parameters) is too slow to build in a unit test; its table entry is checked.
    assert VARIANTS["t2t_vit_24"] == T2TConfig("t2t_vit_24", 512, 24, 8, 3.0, 64)


def test_plain_name_defaults_to_t2t_vit_7_and_takes_a_size(t2t14_224):
    assert make("t2t_vit", image_size=16).variant == "t2t_vit_7"
    assert make("t2t_vit", size="tiny").variant == "t2t_vit_tiny"
    assert t2t14_224.variant == "t2t_vit_14"
    with pytest.raises(EednError, match="size"):
        make("t2t_vit", size="12")


def test_drop_path_is_linear_up_to_the_rate(t2t7_32):
    rates = [getattr(b.drop_path1, "drop_prob", 0.0) for b in t2t7_32.blocks]
    assert rates == pytest.approx([0.1 * i / 6 for i in range(7)])
    model = make("t2t_vit_tiny", drop_path_rate=0.3)
    assert model.blocks[-1].drop_path1.drop_prob == pytest.approx(0.3)


def test_tiny_overrides_and_bad_options():
    model = make("t2t_vit_tiny", depth=2, embed_dim=32, num_heads=4, token_dim=16)
    assert model.num_stages == 2 and model.feature_dims == [32, 32]
    assert model.tokens_to_token.attention2.kqv.in_features == 16 * 9
    with pytest.raises(EednError, match="unknown option"):
        make("t2t_vit_7", depth=3)
    with pytest.raises(EednError, match="unknown option"):
        make("t2t_vit_tiny", dropout=0.5)
    with pytest.raises(EednError, match="depth"):
        make("t2t_vit_tiny", depth=0)
    with pytest.raises(EednError, match="drop_path_rate"):
        make("t2t_vit_tiny", drop_path_rate="a lot")
    with pytest.raises(EednError, match="did you mean 'drop_path_rate'.*valid: drop_path_rate, qk_scale$"):
        make("t2t_vit_7", drop_path=0.2)
    with pytest.raises(EednError, match="unknown option\\(s\\) checkpoint"):  # --backbone-checkpoint loads weights
        make("t2t_vit_7", checkpoint_path="weights.pth")
    # the family takes the tiny-only options, but only with the tiny size
    assert make("t2t_vit", size="tiny", depth="2").num_stages == 2
    with pytest.raises(EednError, match="tiny-only option\\(s\\) depth need size=tiny"):
        make("t2t_vit", size=7, depth=2)


def test_display_names_say_which_member_was_built(t2t7_32, t2t14_224):
    assert make("t2t_vit", in_channels=1).display_name == "T2T-ViT tiny"  # digits-like data
    assert make("t2t_vit", image_size=16).display_name == "T2T-ViT-7"
    assert t2t7_32.display_name == "T2T-ViT-7" and t2t14_224.display_name == "T2T-ViT-14"
    assert make("t2t_vit_tiny", depth=2).display_name == "T2T-ViT tiny"


@pytest.mark.parametrize("size", [0, 8, 24, 40, 33, -16, 32.0])
def test_image_size_not_a_multiple_of_16_is_a_clear_error(size):
    with pytest.raises(EednError, match="multiple of 16"):
        make("t2t_vit_tiny", image_size=size)


# ----------------------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("image_size,tokens", [(16, 2), (32, 5), (48, 10), (64, 17)])
def test_token_count_follows_the_image_size(image_size, tokens):
    model = make(image_size=image_size)
    x = torch.randn(2, 3, image_size, image_size)
    with torch.no_grad():
        assert model.stem(x).shape == (2, tokens, 64)
        assert model(x).shape == (2, 10)
    assert model.pos_embed.shape == (1, tokens, 64)


def test_t2t_vit_7_at_32_and_224_px(t2t7_32, t2t7_224):
    model = t2t7_32
    with torch.no_grad():
        state = model.stem(torch.randn(3, 3, 32, 32))
        assert state.shape == (3, 5, 256)
        assert model.exit_features(0, model.stage(0, state)).shape == (3, 256)
    model = t2t7_224
    with torch.no_grad():
        x = torch.randn(1, 3, 224, 224)
        assert model.stem(x).shape == (1, 197, 256)
        assert model(x).shape == (1, 10)


def test_one_channel_input():
    model = make(in_channels=1)
    assert model.input_spec == eedn.InputSpec(channels=1, image_size=32)
    assert model.tokens_to_token.attention1.kqv.in_features == 49
    with torch.no_grad():
        assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_other_precisions_run(dtype):
    model = make().to(dtype)
    x = torch.randn(2, 3, 32, 32, dtype=dtype)
    with torch.no_grad():
        out = model(x)
    assert out.dtype == dtype and torch.isfinite(out).all()
    if dtype == torch.float64:
        with torch.no_grad():
            want = make()(x.float())
        assert torch.allclose(out.float(), want, atol=1e-4)


def test_input_of_the_wrong_size_is_a_clear_error():
    model = make()
    with pytest.raises(EednError, match="built for images"):
        model(torch.randn(1, 3, 64, 64))
    with pytest.raises(EednError, match="built for images"):
        model(torch.randn(1, 1, 32, 32))


# ------------------------------------------------------------------------------- stage-wise contract


def test_stagewise_forward_equals_forward_and_official_readout():
    model = make()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        state = model.stem(x)
        for i in range(model.num_stages):
            state = model.stage(i, state)
        stagewise = model.head(model.exit_features(model.num_stages - 1, state))
        # official readout: normalise every token, then read the cls token
        official = model.classifier(model.norm(state)[:, 0])
        assert torch.allclose(stagewise, model(x), atol=1e-6)
        assert torch.allclose(stagewise, official, atol=1e-6)
        last_exit = early_exit_model(model)(x)[:, -1]
        assert torch.allclose(last_exit, stagewise, atol=1e-6)


def test_rows_are_independent_so_the_engine_may_drop_them():
    model = make()
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        full = model.stage(0, model.stem(x))
        part = model.stage(0, eedn.select_rows(model.stem(x), torch.tensor([1, 3])))
    assert torch.allclose(full[[1, 3]], part, atol=1e-6)


def test_train_mode_is_stochastic_and_eval_mode_is_not():
    model = make(drop_path_rate=0.5)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
        model.train()
        assert not torch.allclose(model(x), model(x))


# ------------------------------------------------------------------------ official names and maths


def test_state_dict_uses_the_official_names(t2t7_32):
    keys = set(t2t7_32.state_dict())
    expected = {
        "cls_token", "pos_embed", "norm.weight", "norm.bias", "head.weight", "head.bias",
        "tokens_to_token.attention1.w", "tokens_to_token.attention1.kqv.weight",
        "tokens_to_token.attention1.proj.bias", "tokens_to_token.attention1.norm1.weight",
        "tokens_to_token.attention1.norm2.bias", "tokens_to_token.attention1.mlp.0.weight",
        "tokens_to_token.attention1.mlp.2.bias", "tokens_to_token.attention2.kqv.weight",
        "tokens_to_token.attention2.w", "tokens_to_token.project.weight", "tokens_to_token.project.bias",
        "blocks.0.norm1.weight", "blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight",
        "blocks.0.attn.proj.bias", "blocks.0.norm2.bias", "blocks.0.mlp.fc1.weight", "blocks.6.mlp.fc2.bias",
    }
    assert expected <= keys
    assert "blocks.0.attn.qkv.bias" not in keys and "blocks.7.norm1.weight" not in keys
    # nothing beyond the official layout: 6 top-level + 2 x 13 performer + 2 project + 7 x 11 block
    assert len(keys) == 6 + 26 + 2 + 77


def test_fixed_tensors_are_frozen_but_saved(t2t7_32):
    model = t2t7_32
    assert not model.pos_embed.requires_grad
    assert not model.tokens_to_token.attention1.w.requires_grad
    assert model.cls_token.requires_grad
    table = model.state_dict()["pos_embed"]
    assert table.shape == (1, 5, 256)
    assert torch.equal(table, sinusoid_position_table(5, 256))


def test_sinusoid_table_values():
    table = sinusoid_position_table(4, 6)[0].double()
    pos = 3
    for j in range(6):
        angle = pos / 10000 ** (2 * (j // 2) / 6)
        want = math.sin(angle) if j % 2 == 0 else math.cos(angle)
        assert table[pos, j].item() == pytest.approx(want, abs=1e-6)
    assert torch.equal(table[0, 0::2], torch.zeros(3, dtype=torch.float64))


@pytest.mark.parametrize("shape,kernel,stride,padding", [
    ((2, 3, 32, 32), 7, 4, 2), ((2, 1, 48, 48), 7, 4, 2), ((3, 5, 8, 8), 3, 2, 1), ((1, 4, 7, 7), 3, 2, 1),
])
def test_soft_split_equals_nn_unfold_forward_and_backward(shape, kernel, stride, padding):
    x = torch.randn(*shape, requires_grad=True)
    ours = SoftSplit(kernel, stride, padding)(x)
    reference = nn.Unfold(kernel, stride=stride, padding=padding)(x)
    assert torch.equal(ours, reference)
    weights = torch.randn_like(ours)
    (grad_ours,) = torch.autograd.grad((ours * weights).sum(), x)
    (grad_ref,) = torch.autograd.grad((reference * weights).sum(), x)
    assert torch.allclose(grad_ours, grad_ref, atol=1e-5)


def test_token_performer_follows_the_reference_math():
    torch.manual_seed(1)
    perf = TokenPerformer(dim=18, emb=8, kernel_ratio=0.5).eval()
    assert perf.w.shape == (4, 8)
    assert torch.allclose(perf.w @ perf.w.T, 4 * torch.eye(4), atol=1e-4)  # orthogonal rows, norm sqrt(m)
    x = torch.randn(2, 7, 18)

    def phi(t: Tensor) -> Tensor:
        return torch.exp(torch.einsum("bti,mi->btm", t, perf.w) - (t * t).sum(-1, keepdim=True) / 2) / 2.0

    with torch.no_grad():
        h = perf.norm1(x)
        k, q, v = perf.kqv(h).split(8, dim=-1)
        kp, qp = phi(k), phi(q)
        norm = torch.einsum("bti,bi->bt", qp, kp.sum(1)).unsqueeze(-1)
        attn = torch.einsum("bti,bni->btn", qp, torch.einsum("bin,bim->bnm", v, kp)) / (norm + 1e-8)
        y = v + perf.proj(attn)
        want = y + perf.mlp(perf.norm2(y))
        assert torch.allclose(perf(x), want, atol=1e-5)


@pytest.mark.parametrize("fixture,ims,want", [("t2t7_224", 6 * 2570, 4.07e6), ("t2t14_224", 13 * 3850, 21.2e6)])
def test_parameter_count_with_linear_ims_matches_the_spec(request, fixture, ims, want):
    """The published counts include every parameter at 224 px, the fixed position table included."""
    backbone = request.getfixturevalue(fixture)
    head = sum(p.numel() for p in backbone.classifier.parameters())
    model = early_exit_model(backbone)
    assert sum(p.numel() for p in model.ims.parameters()) == ims
    total = sum(p.numel() for p in model.parameters())
    assert total == pytest.approx(want, rel=0.005)
    official_imagenet = total - ims - head + backbone.feature_dims[0] * 1000 + 1000
    assert official_imagenet == pytest.approx({256: 4.3e6, 384: 21.5e6}[backbone.feature_dims[0]], rel=0.01)


# ------------------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def official_checkpoint(tmp_path_factory) -> tuple[str, dict[str, Tensor]]:
    """An ImageNet-like T2T-ViT-7 checkpoint: 224-px table, 1000-class head, DataParallel keys,
    EMA weights next to (different) training weights."""
    torch.manual_seed(3)
    source = eedn.create("backbone", "t2t_vit_7", 1000, 224)
    ema = {f"module.{k}": v.clone() for k, v in source.state_dict().items()}
    plain = {k: torch.zeros_like(v) for k, v in ema.items()}
    path = tmp_path_factory.mktemp("ckpt") / "t2t_vit_7.pth.tar"
    torch.save({"epoch": 300, "state_dict": plain, "state_dict_ema": ema}, path)
    return str(path), source.state_dict()


def test_official_checkpoint_loads_into_a_small_model(official_checkpoint):
    path, saved = official_checkpoint
    model = make("t2t_vit_7", checkpoint=path)
    state = model.state_dict()
    for key in ("blocks.0.attn.qkv.weight", "blocks.6.mlp.fc2.bias", "tokens_to_token.attention1.w",
                "tokens_to_token.attention2.kqv.weight", "tokens_to_token.project.weight", "cls_token",
                "norm.weight"):
        assert torch.equal(state[key], saved[key]), key  # the EMA weights, not the zeroed ones
    assert state["head.weight"].shape == (10, 256)
    assert state["pos_embed"].shape == (1, 5, 256)
    assert torch.equal(state["pos_embed"][:, 0], saved["pos_embed"][:, 0])
    grid = saved["pos_embed"][:, 1:].reshape(1, 14, 14, 256).permute(0, 3, 1, 2)
    want = torch.nn.functional.interpolate(grid, size=(2, 2), mode="bicubic", align_corners=False)
    assert torch.allclose(state["pos_embed"][0, 1:], want.permute(0, 2, 3, 1).reshape(4, 256), atol=1e-6)
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(2, 3, 32, 32))).all()


def test_loader_reports_what_it_adapted(official_checkpoint, t2t7_32):
    report = copy.deepcopy(t2t7_32).load_pretrained(official_checkpoint[0])
    assert report["dropped"] == ["head.weight", "head.bias"]
    assert report["resized"] == ["pos_embed"]
    assert report["left_at_init"] == ["head.weight", "head.bias"]


def test_same_shape_checkpoint_round_trips_including_the_head(tmp_path):
    model = make()
    path = tmp_path / "plain.pt"
    torch.save({"model": model.state_dict()}, path)
    torch.manual_seed(9)
    other = eedn.create("backbone", "t2t_vit_tiny", 10, 32)
    other.load_pretrained(path)
    other.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(other(x), model(x))


def test_backbone_part_of_an_early_exit_model_checkpoint_loads(tmp_path):
    source = early_exit_model(make())
    path = tmp_path / "eedn_model.pt"
    torch.save({"module." + k: v for k, v in source.state_dict().items()}, path)
    torch.manual_seed(5)
    model = eedn.create("backbone", "t2t_vit_tiny", 10, 32)
    model.load_pretrained(path)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), source.backbone(x))


def test_a_run_directory_weights_file_loads(tmp_path):
    """A run's weights.pt holds the backbone next to the trained heads; the backbone part loads."""
    source = make()
    path = tmp_path / "weights.pt"
    torch.save({"backbone": source.state_dict(), "heads": {"lambda=0.5": {"ims.0.fc.weight": torch.zeros(1)}}}, path)
    torch.manual_seed(7)
    model = eedn.create("backbone", "t2t_vit_tiny", 10, 32)
    report = model.load_pretrained(path)
    assert report == {"dropped": [], "resized": [], "left_at_init": []}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), source(x))


def test_resize_pos_embed_keeps_identity_and_rejects_non_square():
    table = sinusoid_position_table(17, 8)
    assert torch.allclose(resize_pos_embed(table, 17), table, atol=1e-6)
    with pytest.raises(EednError, match="square"):
        resize_pos_embed(sinusoid_position_table(7, 8), 5)


def test_checkpoint_of_another_size_is_a_clear_error(tmp_path, t2t7_32):
    path = tmp_path / "tiny.pt"
    torch.save(make("t2t_vit_tiny").state_dict(), path)
    with pytest.raises(EednError, match="does not match t2t_vit_7: cls_token has shape") as info:
        copy.deepcopy(t2t7_32).load_pretrained(path)
    assert "\n" not in str(info.value)


def test_checkpoint_with_missing_blocks_is_a_clear_error(tmp_path):
    state = {k: v for k, v in make().state_dict().items() if not k.startswith("blocks.3.")}
    path = tmp_path / "partial.pt"
    torch.save(state, path)
    with pytest.raises(EednError, match="does not match t2t_vit_tiny: missing 11 weights: blocks.3"):
        make(checkpoint=str(path))


def test_checkpoint_for_another_channel_count_is_a_clear_error(tmp_path):
    path = tmp_path / "rgb.pt"
    torch.save(make().state_dict(), path)
    with pytest.raises(EednError, match="attention1"):
        make(in_channels=1, checkpoint=str(path))


def test_corrupt_or_absent_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(EednError, match="is corrupt or not a weights-only file"):
        make(checkpoint=str(bad))
    with pytest.raises(EednError, match="not found"):
        make(checkpoint=str(tmp_path / "absent.pth"))
    empty = tmp_path / "empty.pth"
    torch.save({"epoch": 3}, empty)
    with pytest.raises(EednError, match="no state dict"):
        make(checkpoint=str(empty))


# -------------------------------------------------------------------------------------------- MACs


def analytic_macs(image_size: int, in_channels: int, token_dim: int, dim: int, depth: int, hidden: int,
                  num_classes: int) -> tuple[int, int]:
    """(stem MACs, one block's MACs + ...) written out per matmul; returns (stem, block)."""

    def performer(tokens: int, d_in: int, emb: int) -> int:
        m = emb // 2
        kqv = d_in * 3 * emb
        features = 2 * emb * m          # w x for keys and queries
        normaliser = m                  # q' . sum_t k'
        kptv = emb * m                  # v^T k'
        out = m * emb                   # q' (k'^T v)
        proj_and_mlp = 3 * emb * emb
        return tokens * (kqv + features + normaliser + kptv + out + proj_and_mlp)

    side1, side2, side3 = image_size // 4, image_size // 8, image_size // 16
    stem = (performer(side1 ** 2, in_channels * 49, token_dim) + performer(side2 ** 2, token_dim * 9, token_dim)
            + side3 ** 2 * token_dim * 9 * dim)
    n = side3 ** 2 + 1
    block = n * dim * 3 * dim + 2 * n * n * dim + n * dim * dim + 2 * n * dim * hidden
    return stem, block


@pytest.mark.parametrize("image_size,in_channels", [(32, 3), (48, 1)])
def test_macs_equal_the_analytic_count_exactly(image_size, in_channels):
    model = make(image_size=image_size, in_channels=in_channels, num_classes=7)
    x = torch.zeros(1, in_channels, image_size, image_size)
    stem, block = analytic_macs(image_size, in_channels, 32, 64, 4, 128, 7)
    with torch.no_grad():
        assert count_macs(lambda: model.stem(x)) == stem
        assert count_macs(lambda: model(x)) == stem + 4 * block + 64 * 7


def test_t2t_vit_7_macs_match_the_analytic_count_at_32_px(t2t7_32):
    model = t2t7_32
    x = torch.zeros(1, 3, 32, 32)
    stem, block = analytic_macs(32, 3, 64, 256, 7, 512, 10)
    with torch.no_grad():
        assert count_macs(lambda: model(x)) == stem + 7 * block + 2560


def test_per_exit_macs_of_t2t_vit_7_match_the_spec_at_224_px(t2t7_224):
    model = early_exit_model(t2t7_224)
    exit_macs, full = measure_exit_macs(model)
    spec = [408e6, 531e6, 654e6, 777e6, 900e6, 1024e6, 1147e6]
    for got, want in zip(exit_macs, spec, strict=True):
        assert got == pytest.approx(want, rel=0.01)
    assert full == pytest.approx(1147e6, rel=0.01)
    stem, block = analytic_macs(224, 3, 64, 256, 7, 512, 10)
    assert exit_macs == [stem + (l + 1) * (block + 2560) for l in range(7)]


def test_per_exit_macs_of_t2t_vit_7_match_the_spec_at_32_px(t2t7_32):
    model = early_exit_model(t2t7_32)
    exit_macs, full = measure_exit_macs(model)
    assert exit_macs[0] == pytest.approx(8.4e6, rel=0.01)
    assert exit_macs[-1] == pytest.approx(24.2e6, rel=0.01)
    assert full == pytest.approx(24.2e6, rel=0.01)
    assert all(b > a for a, b in zip(exit_macs, exit_macs[1:]))


# ------------------------------------------------------------------------- official op counter, qk_scale


@pytest.mark.parametrize("fixture, num_classes, expected", [
    ("t2t7_224", 10, [5.534, 6.843, 8.153, 9.463, 10.772, 12.082, 13.518]),
    ("t2t7_32", 10, [0.94, 1.487, 2.035, 2.583, 3.131, 3.679, 4.23]),
    ("t2t14_224", 10, [7.253, 10.209, 13.165, 16.12, 19.076, 22.031, 24.987, 27.942, 30.898, 33.854, 36.809,
                       39.765, 42.72, 45.865]),
])
def test_official_op_counter_reproduces_the_official_columns(request, fixture, num_classes, expected):
    """The official Mul-Add per exit (x 1e6, docs/method.md §5.1): Linear weights once per sample, LayerNorm 2.5
    and GELU 4 per element, with each exit's full-sequence LayerNorm, linear IM and gate (9C + 6)."""
    backbone = request.getfixturevalue(fixture)
    ims = [nn.Linear(backbone.feature_dims[i], num_classes) for i in range(backbone.num_stages - 1)]
    costs = backbone.official_exit_muladds(ims, 9 * num_classes + 6)
    assert [round(c / 1e6, 3) for c in costs] == expected


def test_official_op_counter_for_100_classes():
    backbone = make("t2t_vit_7", num_classes=100, image_size=224)
    ims = [nn.Linear(256, 100) for _ in range(6)]
    costs = backbone.official_exit_muladds(ims, 9 * 100 + 6)
    assert [round(c / 1e6, 3) for c in costs] == [5.558, 6.891, 8.225, 9.558, 10.892, 12.226, 13.685]


def test_jei_gate_cost_official_counter_is_the_cleanup_codes_vector(t2t7_224):
    """gate_cost=official_counter: the official Mul-Adds over the final exit's, [0.409 ... 0.894, 1] for
    T2T-ViT-7 at 224 px and 10 classes (docs/method.md §3.4); other backbones are refused in one line."""
    from eedn_plugins.heads import LinearIM
    from eedn_plugins.jei import official_counter_costs
    from eedn_plugins.jei_gate import JeiGate

    model = EarlyExitModel(t2t7_224, [LinearIM(256, 10) for _ in range(6)], JeiGate(6, 10))
    costs = official_counter_costs(model)
    assert [round(float(c), 3) for c in costs] == [0.409, 0.506, 0.603, 0.7, 0.797, 0.894, 1.0]
    other = EarlyExitModel(eedn.create("backbone", "resnet_tiny", 10, 16, 3), [LinearIM(d, 10) for d in (8, 16)],
                           JeiGate(2, 10))
    with pytest.raises(EednError, match="official_counter"):
        official_counter_costs(other)


def test_qk_scale_embed_dim_is_the_released_t2t_vit_attention():
    """qk_scale=embed_dim: softmax(q k^T / sqrt(embed_dim)) v, what the released T2T-ViT weights expect (their
    models set qk_scale = embed_dim^-0.5); the default keeps head_dim^-0.5 (the JEI-DNN model). Same weights."""
    plain = make("t2t_vit_7", image_size=32)
    released = make("t2t_vit_7", image_size=32, qk_scale="embed_dim")
    assert plain.state_dict().keys() == released.state_dict().keys()
    released.load_state_dict(plain.state_dict())
    x = torch.randn(2, 5, 256)

    def attention(attn, scale: float) -> Tensor:
        q, k, v = attn.qkv(x).reshape(2, 5, 3, 4, 64).permute(2, 0, 3, 1, 4)
        out = ((q @ k.transpose(-2, -1)) * scale).softmax(-1) @ v
        return attn.proj(out.transpose(1, 2).reshape(2, 5, 256))

    with torch.no_grad():
        assert torch.allclose(plain.blocks[0].attn(x), attention(plain.blocks[0].attn, 64 ** -0.5), atol=1e-5)
        assert torch.allclose(released.blocks[0].attn(x), attention(released.blocks[0].attn, 256 ** -0.5), atol=1e-5)
        assert not torch.allclose(plain.blocks[0].attn(x), released.blocks[0].attn(x), atol=1e-3)
    with pytest.raises(EednError, match="qk_scale"):
        make("t2t_vit_7", image_size=32, qk_scale="none")
