"""A fast CIFAR convnet in the layout of Jordan's airbench94 ("94% on CIFAR-10 in 3.29 seconds on a single
GPU", arXiv 2404.00498), written from the paper's description, with an exit after every convolution.

Layout (defaults: 64/256/256 wide, 2 convolutions per group, ≈118 M MACs at 32 px):

* stem: a 2x2 convolution without padding into ``2 * 4 * C`` channels (24 for RGB), then GELU. With
  ``whiten`` (default) its weights become a patch-whitening transform (both signs of every eigenvector of
  the 2x2 patch covariance, scaled by 1/sqrt(eigenvalue)) computed from the first training batch the
  backbone sees, and stay frozen; its bias trains. :meth:`FastCifarBackbone.init_from_data` does the same
  from any image tensor, for a recipe that wants to whiten on a chosen sample.
* groups: for each width, ``conv3x3 -> maxpool2 -> BN -> GELU`` then ``convs_per_group - 1`` times
  ``conv3x3 -> BN -> GELU``. Convolutions have no bias; their first ``in`` output channels start as the
  identity (Dirac init), as in the paper. BatchNorm has no trainable scale (only a bias) and a running-
  statistics momentum of 0.4 (the paper's 0.6 in its convention).
* head: global max pool, a bias-free Linear, logits times ``head_scale`` (1/9 in the paper).

Stages: one per convolution (``len(widths) * convs_per_group``), so 6 exits for the paper's layout and 9
with ``convs_per_group=3``. Exit features are the global pool (``exit_pool``, max by default) of the
stage's activated map: the final exit must read exactly what the paper's head reads (a global max pool),
and using the same pool everywhere keeps every exit's features on one scale.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from eedn.core.contracts import Backbone, InputSpec, State
from eedn.runtime.errors import EednError
from eedn.core.options import option, options_instance, resolve_options

PAPER_WIDTHS = [64, 256, 256]
SMALL_WIDTHS = [32, 128, 128]
#: running-statistics momentum in PyTorch's convention (new = (1 - m) old + m batch); the paper's 0.6 is 1 - m
BN_MOMENTUM = 0.4
#: added to the patch-covariance eigenvalues before the inverse square root, so flat directions stay bounded
WHITEN_EPS = 5e-4


@dataclass
class FastCifarOptions:
    """The options of the fast CIFAR convnet."""

    widths: list[int] = option(PAPER_WIDTHS, "output channels of each conv group; each group halves the map "
                                             "(the paper: 64,256,256)", min=1)
    convs_per_group: int = option(2, "convolutions per group, each followed by an exit (the paper: 2)",
                                  choices=(2, 3))
    whiten: bool = option(True, "start the 2x2 stem as a frozen patch-whitening transform of the first "
                                "training batch (false: an ordinary trainable convolution)")
    exit_pool: str = option("max", "global pool of every exit's features, the head's included (the paper: max)",
                            choices=("max", "avg"))
    head_scale: float = option(1 / 9, "factor on the head's logits (the paper: 1/9)", above=0)


class BiasOnlyBatchNorm(nn.BatchNorm2d):
    """BatchNorm whose affine part is a bias only: the scale is fixed at 1, as in the paper. The scale is
    absent rather than frozen, so a strategy that unfreezes the backbone cannot make it trainable."""

    def __init__(self, channels: int):
        super().__init__(channels, momentum=BN_MOMENTUM, affine=False)
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, None, self.bias, self.training,
                            self.momentum, self.eps)


class ConvLayer(nn.Module):
    """``conv3x3 [-> maxpool2] -> BN -> GELU``: one backbone stage."""

    def __init__(self, c_in: int, c_out: int, pool: bool):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.pool = nn.MaxPool2d(2) if pool else nn.Identity()
        self.norm = BiasOnlyBatchNorm(c_out)
        with torch.no_grad():  # identity start for the first c_in output channels (Dirac init)
            nn.init.dirac_(self.conv.weight[: min(c_in, c_out)])

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.norm(self.pool(self.conv(x))))


class WhiteningStem(nn.Module):
    """2x2 convolution without padding, then GELU. When ``frozen`` the kernel is a buffer (set by
    :meth:`set_whitening`), so no optimiser or ``requires_grad_`` can train it; the bias always trains."""

    def __init__(self, in_channels: int, frozen: bool):
        super().__init__()
        out = 2 * in_channels * 4
        weight = torch.empty(out, in_channels, 2, 2)
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))  # PyTorch's Conv2d default
        if frozen:
            self.register_buffer("weight", weight)
        else:
            self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(torch.zeros(out))
        #: 1 once the kernel holds a whitening transform (saved with the weights, so loading skips it)
        self.register_buffer("ready", torch.zeros((), dtype=torch.bool))
        self.frozen = frozen

    @torch.no_grad()
    def set_whitening(self, images: Tensor) -> None:
        """Kernel = both signs of the eigenvectors of the 2x2 patch covariance of ``images``, each scaled by
        1/sqrt(eigenvalue + eps); bias = minus the kernel times the mean patch, so outputs start centred.
        Under torch.distributed the statistics are summed over ranks, so every rank gets the same kernel."""
        c = images.shape[1]
        with torch.autocast(images.device.type, enabled=False):
            patches = F.unfold(images.float(), 2).transpose(1, 2).reshape(-1, c * 4)  # [N, 4C], (c, ky, kx) order
            stats = torch.cat([patches.sum(0), (patches.T @ patches).flatten(),
                               torch.tensor([patches.shape[0]], dtype=torch.float32, device=patches.device)])
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(stats)
            d = c * 4
            n = stats[-1]
            mean = stats[:d] / n
            cov = stats[d:-1].view(d, d) / n - torch.outer(mean, mean)
            eigenvalues, eigenvectors = torch.linalg.eigh(cov.double())
            kernel = (eigenvectors.T / torch.sqrt(eigenvalues.clamp_min(0) + WHITEN_EPS)[:, None]).float()
            kernel = torch.cat([kernel, -kernel])  # [2d, d]
            self.weight.copy_(kernel.view_as(self.weight))
            self.bias.copy_(-(kernel @ mean))
            self.ready.fill_(True)

    def forward(self, x: Tensor) -> Tensor:
        if self.frozen and self.training and not bool(self.ready):
            self.set_whitening(x)
        return F.gelu(F.conv2d(x, self.weight, self.bias))


class FastCifarBackbone(Backbone):
    """The network run as stem + one stage per convolution (see the module docstring)."""

    prefers_channels_last = True  # NHWC convolutions are the fast path on CPU with bf16 (docs/scale.md)
    classifier_keys = ("classifier.",)
    first_conv_key = None  # the stem's channel count depends on the input's, so it cannot be adapted

    def __init__(self, num_classes: int, image_size: int, in_channels: int, options: FastCifarOptions,
                 display_name: str):
        super().__init__()
        self.options = options
        self._display_name = display_name
        self.num_classes = num_classes
        self.input_spec = InputSpec(in_channels, image_size)
        self.whiten = WhiteningStem(in_channels, frozen=options.whiten)
        layers, c_in = [], 2 * in_channels * 4
        for width in options.widths:
            for k in range(options.convs_per_group):
                layers.append(ConvLayer(c_in, width, pool=k == 0))
                c_in = width
        self.layers = nn.ModuleList(layers)
        self.classifier = nn.Linear(c_in, num_classes, bias=False)
        self.num_stages = len(layers)
        self.feature_dims = [w for w in options.widths for _ in range(options.convs_per_group)]

    def stem(self, x: Tensor) -> State:
        return self.whiten(x)

    def stage(self, index: int, state: State) -> State:
        return self.layers[index](state)

    def exit_features(self, index: int, state: State) -> Tensor:
        """Global max (or average, ``exit_pool``) of the stage's map: ``[B, C_index]``."""
        if self.options.exit_pool == "max":
            return torch.amax(state, dim=(2, 3))
        return state.mean(dim=(2, 3))

    def head(self, features: Tensor) -> Tensor:
        return self.classifier(features) * self.options.head_scale

    def init_from_data(self, images: Tensor) -> None:
        """Whiten the stem on ``images`` (normalised, ``[N, C, H, W]``) now instead of on the first training
        batch. Does nothing when the option ``whiten`` is off."""
        if self.options.whiten:
            self.whiten.set_whitening(images)


def _build(num_classes: int, image_size: int, in_channels: int, opts: FastCifarOptions) -> FastCifarBackbone:
    if int(num_classes) < 1:
        raise EednError(f"num_classes must be at least 1, got {num_classes}")
    if int(in_channels) < 1:
        raise EednError(f"in_channels must be at least 1, got {in_channels}")
    if not opts.widths:
        raise EednError("fast_cifar: widths must name at least one group width, e.g. widths=64,256,256")
    groups = len(opts.widths)
    smallest = 2 ** groups + 1  # the 2x2 stem takes one pixel, every group halves the map
    if int(image_size) < smallest:
        raise EednError(f"image_size {image_size} is too small for fast_cifar with {groups} groups; use at least "
                        f"{smallest} px (or fewer widths)")
    layout = "/".join(map(str, opts.widths))
    return FastCifarBackbone(int(num_classes), int(image_size), int(in_channels), opts,
                             f"fast CIFAR convnet {layout} x{opts.convs_per_group}")


def _factory(default_widths: list[int], name: str, doc: str):
    @dataclass
    class Options(FastCifarOptions):
        widths: list[int] = option(default_widths, "output channels of each conv group; each group halves the "
                                                   "map (the paper: 64,256,256)", min=1)

    Options.__name__ = Options.__qualname__ = f"{name.title().replace('_', '')}Options"

    def factory(num_classes: int, image_size: int, in_channels: int = 3, **options: Any) -> FastCifarBackbone:
        # the registry has resolved the options already; resolving again (idempotent) serves direct calls
        values = resolve_options(f"backbone '{name}'", factory, options)
        return _build(num_classes, image_size, in_channels, options_instance(Options, values))

    factory.__name__ = name
    factory.__doc__ = doc
    factory.Options = Options
    return factory


fast_cifar = _factory(PAPER_WIDTHS, "fast_cifar",
                      "airbench94's layout: widths 64/256/256, 2 convolutions per group, ≈118 M MACs at 32 px.")
fast_cifar_small = _factory(SMALL_WIDTHS, "fast_cifar_small",
                            "Half-width variant (32/128/128) for quick runs and tests.")
