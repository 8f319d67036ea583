"""T2T-ViT backbones (Yuan et al., ICCV 2021) as stage-wise eedn backbones, as JEI-DNN uses them.

The tokens-to-token module is the *performer* variant, written so that the official T2T-ViT checkpoints
load by key: ``tokens_to_token.{soft_split0,1,2, attention1,2, project}``, ``cls_token``, ``pos_embed``,
``blocks.{i}.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}``, ``norm``, ``head``. The
transformer blocks are timm's pre-LN ViT ``Block`` (fused attention), whose names already match.

Stage-wise contract: ``stem`` = T2T module + cls token + position table (``[B, N, d]``), stage ``i`` =
block ``i``, ``exit_features(i, ...)`` = the shared final LayerNorm on the cls token (LayerNorm is
per token, so this equals the official "normalise all tokens, take cls").
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from typing import Any, Callable, cast

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from eedn.core.contracts import Backbone, InputSpec
from eedn.runtime.errors import EednError
from eedn.core.transfer import read_state_dict
from eedn.core.options import declares, option

#: side of the patch grid cell: the three soft splits have strides 4, 2 and 2.
TOTAL_STRIDE = 16
#: attention scales: head_dim^-0.5 (the official JEI-DNN code builds T2T-ViT with ``pretrained=False``, so
#: qk_scale stays None) or embed_dim^-0.5 (the T2T-ViT release sets it for its pretrained 7/14/24 weights)
QK_SCALES = ("head_dim", "embed_dim")
#: official JEI-DNN op counter (docs/method.md §5.1): Mul-Adds charged per element of a LayerNorm / GELU input
OFFICIAL_LAYERNORM, OFFICIAL_GELU = 2.5, 4.0


@dataclass(frozen=True)
class T2TConfig:
    """Width and depth of one T2T-ViT size; ``token_dim`` is the width inside the T2T module."""

    name: str
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float
    token_dim: int = 64


VARIANTS: dict[str, T2TConfig] = {
    "t2t_vit_7": T2TConfig("t2t_vit_7", embed_dim=256, depth=7, num_heads=4, mlp_ratio=2.0),
    "t2t_vit_14": T2TConfig("t2t_vit_14", embed_dim=384, depth=14, num_heads=6, mlp_ratio=3.0),
    "t2t_vit_24": T2TConfig("t2t_vit_24", embed_dim=512, depth=24, num_heads=8, mlp_ratio=3.0),
    # Not a published size: small enough for unit tests and the embedded digits default on a laptop CPU.
    "t2t_vit_tiny": T2TConfig("t2t_vit_tiny", embed_dim=64, depth=4, num_heads=2, mlp_ratio=2.0, token_dim=32),
}
SIZE_ALIASES = {"7": "t2t_vit_7", "14": "t2t_vit_14", "24": "t2t_vit_24", "tiny": "t2t_vit_tiny"}
DISPLAY_NAMES = {"t2t_vit_7": "T2T-ViT-7", "t2t_vit_14": "T2T-ViT-14", "t2t_vit_24": "T2T-ViT-24",
                 "t2t_vit_tiny": "T2T-ViT tiny"}


@dataclass
class T2TOptions:
    """The options of every T2T-ViT size."""

    drop_path_rate: float = option(0.1, "stochastic depth of the last block (linear from 0 at the first)",
                                   min=0.0, max=1.0)
    qk_scale: str = option("head_dim", "attention scale: head_dim^-0.5 (the JEI-DNN model) or embed_dim^-0.5 "
                                       "(embed_dim: what the released T2T-ViT ImageNet weights were trained with)",
                           choices=QK_SCALES)


@dataclass
class TinyOptions(T2TOptions):
    """The tiny size can also be reshaped (not a published size: its shape is free)."""

    embed_dim: int | None = option(None, "token width (default 64)", min=1)
    depth: int | None = option(None, "transformer blocks, i.e. exits (default 4)", min=1)
    num_heads: int | None = option(None, "attention heads (default 2)", min=1)
    mlp_ratio: float | None = option(None, "MLP width over token width (default 2)", min=0)
    token_dim: int | None = option(None, "token width inside the T2T module (default 32)", min=1)


@dataclass
class FamilyOptions(TinyOptions):
    size: str = option("auto", "7, 14, 24 or tiny; auto: tiny for 1-channel inputs of <= 32 px, else 7 (the "
                               "JEI-DNN backbone). The tiny-only options need size=tiny",
                       choices=("auto", *SIZE_ALIASES))


def sinusoid_position_table(num_positions: int, dim: int) -> Tensor:
    """The fixed ``[1, num_positions, dim]`` table of "Attention is all you need": sin on even
    channels, cos on odd ones, channel pair ``2k, 2k+1`` at frequency ``10000^(-2k/dim)``."""
    position = torch.arange(num_positions, dtype=torch.float64).unsqueeze(1)
    channel = torch.arange(dim, dtype=torch.float64)
    angle = position / torch.pow(10000.0, 2 * torch.div(channel, 2, rounding_mode="floor") / dim)
    table = torch.where(channel.long() % 2 == 0, torch.sin(angle), torch.cos(angle))
    return table.float().unsqueeze(0)


class TokenPerformer(nn.Module):
    """One-head performer block of the T2T module (linear-cost attention with positive random features).

    ``kqv`` maps the unfolded tokens (width ``dim``) to key, query and value of width ``emb``; the
    softmax kernel is approximated with ``m = emb * kernel_ratio`` fixed random features ``w``
    (orthogonal rows scaled by sqrt(m), stored as a frozen parameter so checkpoints carry it). The
    value skips around the attention because the token width changes (``dim -> emb``)."""

    def __init__(self, dim: int, emb: int, kernel_ratio: float = 0.5, dropout: float = 0.1):
        super().__init__()
        self.emb = emb
        self.kqv = nn.Linear(dim, 3 * emb)
        self.dp = nn.Dropout(dropout)
        self.proj = nn.Linear(emb, emb)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(emb)
        self.epsilon = 1e-8  # keeps the kernel normaliser away from zero
        self.mlp = nn.Sequential(nn.Linear(emb, emb), nn.GELU(), nn.Linear(emb, emb), nn.Dropout(dropout))
        self.m = int(emb * kernel_ratio)
        features = nn.init.orthogonal_(torch.empty(self.m, emb)) * math.sqrt(self.m)
        self.w = nn.Parameter(features, requires_grad=False)

    def prm_exp(self, x: Tensor) -> Tensor:
        """Positive random features ``exp(w x - |x|^2 / 2) / sqrt(m)``, so that
        ``E[phi(q) . phi(k)] = exp(q . k)``. Computed in at least float32: the exponentials overflow
        half precision."""
        x = _at_least_fp32(x)
        half_sq_norm = (x * x).sum(dim=-1, keepdim=True) / 2
        projected = torch.matmul(x, self.w.to(x.dtype).t())
        return torch.exp(projected - half_sq_norm) / math.sqrt(self.m)

    def single_attn(self, x: Tensor) -> Tensor:
        k, q, v = torch.split(self.kqv(x), self.emb, dim=-1)
        kp, qp = self.prm_exp(k), self.prm_exp(q)  # [B, T, m]
        normaliser = torch.matmul(qp, kp.sum(dim=1).unsqueeze(-1))  # [B, T, 1]
        kptv = torch.matmul(_at_least_fp32(v).transpose(1, 2), kp)  # [B, emb, m]
        attended = torch.matmul(qp, kptv.transpose(1, 2)) / (normaliser + self.epsilon)  # [B, T, emb]
        return v + self.dp(self.proj(attended.to(v.dtype)))

    def forward(self, x: Tensor) -> Tensor:
        x = self.single_attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class QueryScale(nn.Module):
    """Multiplies the queries by a constant (no parameters: checkpoints are unchanged)."""

    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, q: Tensor) -> Tensor:
        return q * self.factor

    def extra_repr(self) -> str:
        return f"factor={self.factor:g}"


class SoftSplit(nn.Unfold):
    """``nn.Unfold`` (same output, same channel-major ``C*k*k`` order) built from strided views:
    the CPU ``im2col`` kernel behind ``nn.Unfold`` is several times slower here, forward and backward."""

    def __init__(self, kernel_size: int, stride: int, padding: int):
        super().__init__(kernel_size=(kernel_size, kernel_size), stride=(stride, stride), padding=(padding, padding))
        self.kernel, self.step, self.pad = kernel_size, stride, padding

    def forward(self, x: Tensor) -> Tensor:
        batch, channels = x.shape[:2]
        p = self.pad
        patches = F.pad(x, (p, p, p, p)).unfold(2, self.kernel, self.step).unfold(3, self.kernel, self.step)
        rows, cols = patches.shape[2:4]  # patches: [B, C, rows, cols, k, k]
        return patches.permute(0, 1, 4, 5, 2, 3).reshape(batch, channels * self.kernel ** 2, rows * cols)


class TokensToToken(nn.Module):
    """Three soft splits (unfold 7x7/s4, 3x3/s2, 3x3/s2) with a performer after the first two:
    an ``H x W`` image becomes ``(H/16) * (W/16)`` tokens of width ``embed_dim``."""

    def __init__(self, in_channels: int, embed_dim: int, token_dim: int):
        super().__init__()
        self.soft_split0 = SoftSplit(7, stride=4, padding=2)
        self.soft_split1 = SoftSplit(3, stride=2, padding=1)
        self.soft_split2 = SoftSplit(3, stride=2, padding=1)
        self.attention1 = TokenPerformer(in_channels * 7 * 7, token_dim, kernel_ratio=0.5)
        self.attention2 = TokenPerformer(token_dim * 3 * 3, token_dim, kernel_ratio=0.5)
        self.project = nn.Linear(token_dim * 3 * 3, embed_dim)

    @staticmethod
    def _tokens_to_map(tokens: Tensor, height: int, width: int) -> Tensor:
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], height, width)

    def forward(self, x: Tensor) -> Tensor:
        height, width = x.shape[-2:]
        h1, w1 = _unfold_out(height, 7, 4, 2), _unfold_out(width, 7, 4, 2)
        tokens = self.attention1(self.soft_split0(x).transpose(1, 2))
        h2, w2 = _unfold_out(h1, 3, 2, 1), _unfold_out(w1, 3, 2, 1)
        tokens = self.attention2(self.soft_split1(self._tokens_to_map(tokens, h1, w1)).transpose(1, 2))
        tokens = self.soft_split2(self._tokens_to_map(tokens, h2, w2)).transpose(1, 2)
        return self.project(tokens)


def _at_least_fp32(t: Tensor) -> Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _unfold_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def check_image_size(image_size: Any) -> int:
    """T2T-ViT reduces the image by 16 per side; other sizes would not give the square token grid
    the position table is built for."""
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < TOTAL_STRIDE \
            or image_size % TOTAL_STRIDE:
        raise EednError(f"T2T-ViT needs an image size that is a positive multiple of {TOTAL_STRIDE} "
                        f"(e.g. 32 or 224), got {image_size!r}; resize the images or choose another size")
    return image_size


class T2TViT(Backbone):
    """T2T-ViT as a stage-wise backbone: one stage per transformer block, exits on the cls token."""

    #: the shape options ``size=auto`` chose for this input (recorded in the backbone cache key)
    layout: dict[str, int] = {}

    def __init__(self, config: T2TConfig, num_classes: int, image_size: int, in_channels: int = 3,
                 drop_path_rate: float = T2TOptions.drop_path_rate, qk_scale: str = "head_dim"):
        super().__init__()
        check_image_size(image_size)
        if not isinstance(in_channels, int) or in_channels < 1:
            raise EednError(f"in_channels must be a positive integer (1 or 3), got {in_channels!r}")
        if not isinstance(num_classes, int) or num_classes < 1:
            raise EednError(f"num_classes must be a positive integer, got {num_classes!r}")
        if config.embed_dim % config.num_heads:
            raise EednError(f"embed_dim {config.embed_dim} is not divisible by num_heads {config.num_heads}")
        self.config = config
        self.variant = config.name
        self._display_name = DISPLAY_NAMES.get(config.name, config.name)
        self.num_classes = num_classes
        self.num_stages = config.depth
        self.feature_dims = [config.embed_dim] * config.depth
        self.input_spec = InputSpec(channels=in_channels, image_size=image_size)
        self.num_patches = (image_size // TOTAL_STRIDE) ** 2

        self.tokens_to_token = TokensToToken(in_channels, config.embed_dim, config.token_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.embed_dim))
        # Fixed table, but a parameter (not a buffer) so it sits in checkpoints under the official key.
        self.pos_embed = nn.Parameter(sinusoid_position_table(self.num_patches + 1, config.embed_dim),
                                      requires_grad=False)
        rates = [float(drop_path_rate) * i / max(config.depth - 1, 1) for i in range(config.depth)]
        self.blocks = nn.ModuleList([
            Block(config.embed_dim, config.num_heads, mlp_ratio=config.mlp_ratio, qkv_bias=False,
                  drop_path=rate, norm_layer=nn.LayerNorm)
            for rate in rates
        ])
        if qk_scale not in QK_SCALES:
            raise EednError(f"qk_scale must be one of {', '.join(QK_SCALES)}, got {qk_scale!r}")
        self.qk_scale = qk_scale
        if qk_scale == "embed_dim":
            # timm scales q·k by head_dim^-0.5 inside its fused attention; pre-scaling q by the ratio gives
            # embed_dim^-0.5 overall and keeps the fused kernel (q_norm runs on q before the product)
            ratio = (config.embed_dim / (config.embed_dim // config.num_heads)) ** -0.5
            for block in self.blocks:
                cast(Block, block).attn.q_norm = QueryScale(ratio)
        self.norm = nn.LayerNorm(config.embed_dim)
        # Registered under the official key "head"; the contract's head() method shadows attribute
        # access, so the layer itself is reached through ``classifier``.
        self._modules["head"] = nn.Linear(config.embed_dim, num_classes)

        with torch.no_grad():
            self.cls_token.normal_(0.0, 0.02).clamp_(-2.0, 2.0)
        self.apply(_init_weights)

    @property
    def classifier(self) -> nn.Linear:
        """The final linear head (state-dict key ``head``)."""
        return self._modules["head"]  # type: ignore[return-value]

    def check_input(self, x: Tensor) -> None:
        """The position table fixes the image size, so any other input is a user error."""
        spec = self.input_spec
        if x.dim() != 4 or x.shape[1] != spec.channels or x.shape[-2:] != (spec.image_size, spec.image_size):
            raise EednError(f"{self.variant} was built for images [B, {spec.channels}, {spec.image_size}, "
                            f"{spec.image_size}], got {list(x.shape)}; resize the inputs or rebuild the backbone")

    def stem(self, x: Tensor) -> Tensor:
        self.check_input(x)
        tokens = self.tokens_to_token(x)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        return torch.cat([cls, tokens], dim=1) + self.pos_embed

    # T2T-ViT's state is always one token tensor [B, N, D], narrower than the contract's State
    def stage(self, index: int, state: Tensor) -> Tensor:  # type: ignore[override]
        return self.blocks[index](state)

    def exit_features(self, index: int, state: Tensor) -> Tensor:  # type: ignore[override]
        return self.norm(state[:, 0])

    def head(self, features: Tensor) -> Tensor:
        return self.classifier(features)

    @torch.no_grad()
    def official_exit_muladds(self, ims: list[nn.Module], gate_muladds: float) -> list[float]:
        """Per-exit cost in the official JEI-DNN op counter's units (docs/method.md §5.1), for the gate cost
        vector of the cleanup code (``gate_cost=official_counter``).

        A sequential pass of one image, charging every Linear its weight and bias counts once (per sample,
        not per token), LayerNorm 2.5 and GELU 4 per input element, nothing else (attention products, softmax,
        performer kernels and unfolds are free). Exit l < G costs everything up to block l plus, for every
        exit j <= l, the final LayerNorm over the whole sequence, IM j and its gate (``gate_muladds``); the
        final exit adds the last block, the final LayerNorm twice and the head, which reproduces the official
        columns (e.g. T2T-ViT-7 at 224 px, 10 classes: 5.534 ... 12.082, 13.518 M; tests/test_t2t_vit.py).
        """
        total = 0.0

        def charge(module: nn.Module, inputs: tuple, output: Any) -> None:
            nonlocal total
            if isinstance(module, nn.Linear):
                total += module.weight.numel() + (module.bias.numel() if module.bias is not None else 0)
            elif isinstance(module, nn.LayerNorm):
                total += OFFICIAL_LAYERNORM * inputs[0].numel()
            elif isinstance(module, nn.GELU):
                total += OFFICIAL_GELU * inputs[0].numel()

        layers = [m for m in [*self.modules(), *(m for im in ims for m in im.modules())]
                  if isinstance(m, (nn.Linear, nn.LayerNorm, nn.GELU))]
        handles = [m.register_forward_hook(charge) for m in layers]
        was_training = self.training
        self.eval()
        try:
            spec = self.input_spec
            state = self.stem(torch.zeros(1, spec.channels, spec.image_size, spec.image_size))
            costs = []
            for index in range(self.num_stages):
                state = self.stage(index, state)
                if index < len(ims):
                    self.norm(state)  # the official exit normalises every token
                    ims[index](self.exit_features(index, state))
                    total -= OFFICIAL_LAYERNORM * state.shape[-1]  # exit_features' cls-only LayerNorm: not charged
                    total += gate_muladds
                    costs.append(total)
            self.norm(state)
            self.head(self.exit_features(self.num_stages - 1, state))
            total += OFFICIAL_LAYERNORM * (state.numel() - state.shape[-1])  # the final LayerNorm, all tokens
            costs.append(total)
        finally:
            for handle in handles:
                handle.remove()
            self.train(was_training)
        return costs

    def load_pretrained(self, path: str | os.PathLike, adapt_input_channels: bool = False) -> dict[str, list[str]]:
        """Load official or eedn-saved T2T-ViT weights, non-strictly (``--backbone-checkpoint``).

        Accepts an official checkpoint (EMA weights first, DataParallel's ``module.`` prefix removed), a
        plain state dict, eedn's backbone cache (``model``), a run directory's ``weights.pt``
        (``backbone``) or a whole :class:`~eedn.core.model.EarlyExitModel` state dict. A head of another class
        count is dropped (it stays freshly initialised) and a position table of another resolution is
        resized; every other backbone weight must be present with the right shape, else one
        :class:`EednError` line. Returns which keys were dropped, resized and left at their init.
        ``adapt_input_channels`` is refused: T2T-ViT's first layer layer-normalises the channels of each
        7x7 patch together, which no kernel rewrite maps from RGB to another channel count.
        """
        source = _backbone_state(path)
        target = self.state_dict()
        prefix = f"checkpoint {path} does not match {self.variant}"
        first = "tokens_to_token.attention1.kqv.weight"
        if adapt_input_channels and first in source and source[first].shape != target[first].shape:
            raise EednError(f"{prefix}: T2T-ViT cannot adapt its first layer to {self.input_spec.channels}-channel "
                            "inputs (it normalises each patch's channels together); train it from scratch")
        dropped: list[str] = []
        resized: list[str] = []
        mismatched: list[str] = []
        to_load: dict[str, Tensor] = {}

        for key, value in source.items():
            if key not in target:
                if key.startswith(("blocks.", "tokens_to_token.")):
                    mismatched.append(f"unexpected {key}")
                continue
            expected = target[key].shape
            if value.shape == expected:
                to_load[key] = value
            elif key.startswith("head."):
                dropped.append(key)
            elif key == "pos_embed" and value.dim() == 3 and value.shape[-1] == expected[-1]:
                to_load[key] = resize_pos_embed(value, expected[1])
                resized.append(key)
            else:
                mismatched.append(f"{key} has shape {list(value.shape)}, expected {list(expected)}")
        if mismatched:
            more = f" (and {len(mismatched) - 3} more)" if len(mismatched) > 3 else ""
            raise EednError(f"{prefix}: {'; '.join(mismatched[:3])}{more}; check the model size and in_channels")

        # The head may be new (another dataset); the position table is fixed and rebuilt anyway.
        optional = ("head.", "pos_embed")
        missing = [k for k in target if k not in to_load and not k.startswith(optional) and k not in dropped]
        if missing:
            more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
            raise EednError(f"{prefix}: missing {len(missing)} weights: {', '.join(missing[:3])}{more}; "
                            f"is it a T2T-ViT checkpoint?")
        self.load_state_dict(to_load, strict=False)
        left_at_init = [k for k in target if k not in to_load]
        return {"dropped": dropped, "resized": resized, "left_at_init": left_at_init}


def _init_weights(module: nn.Module) -> None:
    """T2T-ViT's initialisation: truncated normal (std 0.02) linears with zero bias, unit LayerNorms.

    The official truncation bounds are +-2 in absolute units (100 std), which never bind, so a clamped
    normal draws the same distribution at a third of the cost of inverse-CDF sampling."""
    if isinstance(module, nn.Linear):
        with torch.no_grad():
            module.weight.normal_(0.0, 0.02).clamp_(-2.0, 2.0)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


# --------------------------------------------------------------------------------------------------
# Checkpoints


def _backbone_state(path: str | os.PathLike) -> dict[str, Tensor]:
    """The backbone weights inside a checkpoint (:func:`eedn.core.transfer.read_state_dict`: EMA weights first, they
    are the released ones); a whole :class:`~eedn.core.model.EarlyExitModel` state dict contributes its
    ``backbone.`` part."""
    cleaned = read_state_dict(path)
    if not any(k.startswith("blocks.") for k in cleaned) and any(k.startswith("backbone.blocks.") for k in cleaned):
        cleaned = {k[len("backbone."):]: v for k, v in cleaned.items() if k.startswith("backbone.")}
    return cleaned


def resize_pos_embed(table: Tensor, num_tokens: int) -> Tensor:
    """Fit a ``[1, 1 + g*g, d]`` position table to ``num_tokens`` (= 1 + n*n): the cls row is kept and
    the patch grid is resized by bicubic interpolation (official weights at 224 px -> 32 px)."""
    cls_row, grid_rows = table[:, :1], table[:, 1:]
    old_side, new_side = math.isqrt(grid_rows.shape[1]), math.isqrt(num_tokens - 1)
    if old_side * old_side != grid_rows.shape[1] or new_side * new_side != num_tokens - 1:
        raise EednError(f"cannot resize a position table of {table.shape[1]} tokens to {num_tokens}: "
                        f"the patch tokens do not form a square grid")
    dim = table.shape[-1]
    grid = grid_rows.reshape(1, old_side, old_side, dim).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(new_side, new_side), mode="bicubic", align_corners=False)
    grid_rows = grid.permute(0, 2, 3, 1).reshape(1, new_side * new_side, dim).to(table.dtype)
    return torch.cat([cls_row, grid_rows], dim=1)


# --------------------------------------------------------------------------------------------------
# Factories and registration


def build_t2t_vit(variant: str, num_classes: int, image_size: int, in_channels: int = 3,
                  drop_path_rate: float = T2TOptions.drop_path_rate, qk_scale: str = "head_dim",
                  **shape: int | float | None) -> T2TViT:
    """``variant`` is a key of :data:`VARIANTS`; ``shape`` holds the tiny size's :class:`TinyOptions`
    (None: keep the size's own value)."""
    config = VARIANTS[variant]
    given: dict[str, Any] = {k: v for k, v in shape.items() if v is not None}
    if given:
        if variant != "t2t_vit_tiny":
            raise EednError(f"backbone {variant}: the tiny-only option(s) {', '.join(given)} need size=tiny; "
                            "drop them or use size=tiny")
        config = replace(config, **given)
    return T2TViT(config, num_classes=num_classes, image_size=image_size, in_channels=in_channels,
                  drop_path_rate=drop_path_rate, qk_scale=qk_scale)


def _factory_for(variant: str) -> Callable[..., T2TViT]:
    @declares(TinyOptions if variant == "t2t_vit_tiny" else T2TOptions)
    def factory(num_classes: int, image_size: int, in_channels: int = 3, **options: Any) -> T2TViT:
        return build_t2t_vit(variant, num_classes, image_size, in_channels, **options)

    factory.__name__ = variant
    factory.__doc__ = f"Build {variant}; see build_t2t_vit for the options."
    return factory


t2t_vit_7 = _factory_for("t2t_vit_7")
t2t_vit_14 = _factory_for("t2t_vit_14")
t2t_vit_24 = _factory_for("t2t_vit_24")
t2t_vit_tiny = _factory_for("t2t_vit_tiny")


#: the tiny shape ``size=auto`` gives single-channel inputs of at most 32 px (the embedded digits): a narrower T2T
#: module and 8 blocks, so that the first exit costs 0.33 of the full MACs (0.74 with tiny's own 4 blocks), and
#: early exits can save most of the compute (options given explicitly win)
DIGITS_LAYOUT: dict[str, int] = {"token_dim": 16, "depth": 8}


@declares(FamilyOptions)
def t2t_vit(num_classes: int, image_size: int, in_channels: int = 3, size: str = "auto", **options: Any) -> T2TViT:
    """The family by ``size``. ``auto`` is tiny in the :data:`DIGITS_LAYOUT` shape for single-channel inputs of
    at most 32 px (the embedded digits, MNIST-like data: a 1 797-image set needs no T2T-ViT-7) and T2T-ViT-7, the
    JEI-DNN backbone, otherwise; the run log prints the member it resolved to."""
    layout: dict[str, int] = {}
    if size == "auto":
        size = "tiny" if in_channels == 1 and image_size <= 32 else "7"
        if size == "tiny":
            layout = {k: v for k, v in DIGITS_LAYOUT.items() if options.get(k) is None}
            options = {**options, **layout}
    model = build_t2t_vit(SIZE_ALIASES[size], num_classes, image_size, in_channels, **options)
    model.layout = layout  # part of the backbone cache key: the same options name another shape than before
    return model
