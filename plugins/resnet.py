"""ResNet backbones: the CIFAR ResNet-20/32/56/110 family and torchvision ResNet-18/50, stage-wise.

Every model here has the same shape, so one :class:`ResNetBackbone` serves them all: a stem
(``conv1``, ``bn1``, ``relu``, ``maxpool``), residual layers ``layer1..layerK`` of blocks, a global
average pool and a linear ``fc``. Attribute names follow torchvision, so a torchvision ResNet state
dict loads unchanged (``--backbone-checkpoint``) when the stem was not adapted.

Exits (option ``exits``):

* ``"block"``: one backbone stage per residual block (CIFAR default; ResNet-20 has 9 stages);
* ``"stage"``: one backbone stage per residual layer (torchvision default; 3 for CIFAR, 4 for
  torchvision).

Choices worth knowing:

* CIFAR ResNets use **option B** shortcuts (He et al. 2016): a 1x1 stride-s conv + BN projection
  wherever the shape changes, identity elsewhere. The paper's CIFAR models use option A (zero-padded
  identity, parameter-free); B is what torchvision-style code does, trains at least as well and costs
  two small convolutions (≈0.26 M MACs at 32 px, 0.2 % of ResNet-56).
* torchvision ResNets on small images (``image_size <= 64``) get the usual CIFAR stem: a 3x3
  stride-1 conv and no max-pool, so a 32 px image keeps a 4x4 map at the last layer instead of 1x1.
  Larger images keep the ImageNet stem (7x7 stride-2 conv + max-pool); only its input channel count
  follows ``in_channels``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, cast

import torch
from torch import Tensor, nn

from eedn.core.contracts import Backbone, InputSpec, State
from eedn.runtime.errors import EednError
from eedn.core.options import declares, option
from eedn.core.transfer import load_pretrained_weights

EXIT_MODES = ("block", "stage")
MIN_IMAGE_SIZE = 8
SMALL_IMAGE_SIZE = 64  # at or below: CIFAR-style stem for torchvision ResNets; `resnet` picks ResNet-20


@dataclass
class ResNetOptions:
    """The options of every ResNet."""

    exits: str | None = option(None, "block: one exit per residual block; stage: one per residual layer "
                                     "(default: block for CIFAR ResNets, stage for torchvision ones)",
                               choices=EXIT_MODES)


class BasicBlock(nn.Module):
    """Two 3x3 conv+BN layers with a residual connection (He et al. 2016, CIFAR variant, option B)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


def _out_width(module: nn.Module) -> int:
    """Output channels of a residual block (BasicBlock or torchvision Bottleneck) or a layer of them."""
    if isinstance(module, nn.Sequential):
        return _out_width(module[-1])
    last_bn = cast(nn.BatchNorm2d, getattr(module, "bn3", None) or module.bn2)
    return last_bn.num_features


class ResNetBackbone(Backbone):
    """A ResNet run as stem + stages, where a stage is one residual block or one residual layer.

    ``layers`` are ``nn.Sequential`` of blocks and become ``layer1..layerK`` (torchvision names).
    """

    prefers_channels_last = True  # NHWC convolutions: 2.3x faster with bf16 on CPU (docs/scale.md)

    def __init__(
        self,
        conv1: nn.Module,
        bn1: nn.Module,
        maxpool: nn.Module,
        layers: list[nn.Sequential],
        fc: nn.Linear,
        num_classes: int,
        input_spec: InputSpec,
        exits: str,
        display_name: str,
    ):
        super().__init__()
        self._display_name = display_name
        self.conv1 = conv1
        self.bn1 = bn1
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = maxpool
        self.layer_names = [f"layer{i + 1}" for i in range(len(layers))]
        for name, layer in zip(self.layer_names, layers):
            self.add_module(name, layer)
        self.fc = fc
        self.num_classes = num_classes
        self.input_spec = input_spec
        self.exits = exits
        if exits == "block":
            # plain list (not a ModuleList) so state-dict keys keep torchvision's layerK.j names
            self._stage_modules: list[nn.Module] = [block for layer in layers for block in layer]
        else:
            self._stage_modules = list(layers)
        self.num_stages = len(self._stage_modules)
        self.feature_dims = [_out_width(m) for m in self._stage_modules]

    def stem(self, x: Tensor) -> State:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def stage(self, index: int, state: State) -> State:
        return self._stage_modules[index](state)

    def exit_features(self, index: int, state: State) -> Tensor:
        """Global average pool of the stage's map: ``[B, C_index]``."""
        return torch.flatten(nn.functional.adaptive_avg_pool2d(cast(Tensor, state), 1), 1)  # one map per stage

    def head(self, features: Tensor) -> Tensor:
        return self.fc(features)

    classifier_keys = ("fc.",)
    first_conv_key = "conv1.weight"

    def load_pretrained(self, path: str | os.PathLike, adapt_input_channels: bool = False) -> dict[str, list[str]]:
        """Weights of this architecture: a plain state dict, timm's trainer checkpoint (``state_dict``), eedn's
        backbone cache (``model``) or a run directory's ``model.pt`` (``backbone``). A torchvision ResNet's own
        ImageNet weights load when the stem was not adapted (> 64 px): an ``fc`` of another class count is
        dropped, and ``conv1`` is adapted to 1-channel (or other) data when ``adapt_input_channels``."""
        spec = self.input_spec
        return load_pretrained_weights(self, path, f"{self.display_name}, {self.num_classes} classes, "
                                                   f"{spec.channels}-channel {spec.image_size} px images",
                                       self.classifier_keys, self.first_conv_key, adapt_input_channels)


def _check_arguments(num_classes: int, image_size: int, in_channels: int) -> None:
    """The data-given factory arguments (the options are checked by their declaration)."""
    if int(num_classes) < 1:
        raise EednError(f"num_classes must be at least 1, got {num_classes}")
    if int(in_channels) < 1:
        raise EednError(f"in_channels must be at least 1, got {in_channels}")
    if int(image_size) < MIN_IMAGE_SIZE:
        raise EednError(f"image_size {image_size} is too small for a ResNet; use at least {MIN_IMAGE_SIZE} px")


def build_cifar_resnet(
    blocks_per_stage: int,
    widths: tuple[int, int, int],
    num_classes: int,
    image_size: int,
    in_channels: int = 3,
    exits: str | None = None,
    display_name: str = "CIFAR ResNet",
) -> ResNetBackbone:
    """He et al. (2016) CIFAR ResNet-(6n+2): 3x3 stem, 3 layers of n basic blocks, strides 1/2/2."""
    _check_arguments(num_classes, image_size, in_channels)
    conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
    bn1 = nn.BatchNorm2d(widths[0])
    layers = []
    in_planes = widths[0]
    for layer_index, planes in enumerate(widths):
        stride = 1 if layer_index == 0 else 2
        blocks = []
        for block_index in range(blocks_per_stage):
            blocks.append(BasicBlock(in_planes, planes, stride if block_index == 0 else 1))
            in_planes = planes
        layers.append(nn.Sequential(*blocks))
    fc = nn.Linear(widths[-1], num_classes)
    model = ResNetBackbone(conv1, bn1, nn.Identity(), layers, fc, num_classes,
                           InputSpec(in_channels, image_size), exits or "block", display_name)
    _init_cifar(model)
    return model


def _init_cifar(model: nn.Module) -> None:
    """Kaiming-normal convs and unit BN, as in He et al.; Linear keeps PyTorch's default."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def build_torchvision_resnet(
    arch: str,
    num_classes: int,
    image_size: int,
    in_channels: int = 3,
    exits: str | None = None,
) -> ResNetBackbone:
    """torchvision ResNet-18/50 (random init), split at its four layers (or at every block)."""
    import torchvision

    _check_arguments(num_classes, image_size, in_channels)
    net = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
    conv1, maxpool = net.conv1, net.maxpool
    if image_size <= SMALL_IMAGE_SIZE:
        conv1 = nn.Conv2d(in_channels, net.conv1.out_channels, 3, stride=1, padding=1, bias=False)
        maxpool = nn.Identity()
    elif in_channels != 3:
        conv1 = nn.Conv2d(in_channels, net.conv1.out_channels, 7, stride=2, padding=3, bias=False)
    if conv1 is not net.conv1:
        nn.init.kaiming_normal_(conv1.weight, mode="fan_out", nonlinearity="relu")
    layers = [net.layer1, net.layer2, net.layer3, net.layer4]
    return ResNetBackbone(conv1, net.bn1, maxpool, layers, net.fc, num_classes, InputSpec(in_channels, image_size),
                          exits or "stage", f"ResNet-{arch.removeprefix('resnet')}")


def _cifar_factory(depth: int) -> Callable[..., ResNetBackbone]:
    n = (depth - 2) // 6

    @declares(ResNetOptions)
    def factory(num_classes: int, image_size: int, in_channels: int = 3, **options: Any) -> ResNetBackbone:
        return build_cifar_resnet(n, (16, 32, 64), num_classes, image_size, in_channels,
                                  display_name=f"ResNet-{depth}", **options)

    factory.__name__ = f"resnet{depth}"
    factory.__doc__ = f"CIFAR ResNet-{depth} ({n} basic blocks per stage, widths 16/32/64)."
    return factory


def _torchvision_factory(arch: str) -> Callable[..., ResNetBackbone]:
    @declares(ResNetOptions)
    def factory(num_classes: int, image_size: int, in_channels: int = 3, **options: Any) -> ResNetBackbone:
        return build_torchvision_resnet(arch, num_classes, image_size, in_channels, **options)

    factory.__name__ = arch
    factory.__doc__ = f"torchvision {arch} with eedn stages at its four layers."
    return factory


resnet20 = _cifar_factory(20)
resnet32 = _cifar_factory(32)
resnet56 = _cifar_factory(56)
resnet110 = _cifar_factory(110)
resnet18 = _torchvision_factory("resnet18")
resnet50 = _torchvision_factory("resnet50")


@declares(ResNetOptions)
def resnet_tiny(num_classes: int, image_size: int, in_channels: int = 3, **options: Any) -> ResNetBackbone:
    """CIFAR-style ResNet-8 with widths 8/16/32: three stages in block mode, for fast tests."""
    return build_cifar_resnet(1, (8, 16, 32), num_classes, image_size, in_channels, display_name="ResNet-8 (tiny)",
                              **options)


SIZES: dict[str, Callable[..., ResNetBackbone]] = {"tiny": resnet_tiny, "20": resnet20, "32": resnet32,
                                                   "56": resnet56, "110": resnet110, "18": resnet18, "50": resnet50}


@dataclass
class ResNetFamilyOptions(ResNetOptions):
    size: str = option("auto", "tiny, 20, 32, 56, 110 (CIFAR), 18, 50 (torchvision); auto: tiny for 1-channel "
                               "inputs of <= 32 px, ResNet-20 up to 64 px, else ResNet-18",
                       choices=("auto", *SIZES))


@declares(ResNetFamilyOptions)
def resnet(num_classes: int, image_size: int, in_channels: int = 3, size: str = "auto",
           **options: Any) -> ResNetBackbone:
    """The family by ``size``; ``auto`` picks tiny for digits-like data (1 channel, <= 32 px), as the
    T2T-ViT family does, ResNet-20 for other small images (<= 64 px) and ResNet-18 for larger ones."""
    if size == "auto":
        tiny = in_channels == 1 and image_size <= 32
        size = "tiny" if tiny else "20" if image_size <= SMALL_IMAGE_SIZE else "18"
    return SIZES[size](num_classes, image_size, in_channels, **options)
