"""Registry names → objects: backbones, inference modules, gates and whole early-exit models.

The one place where a model spec (names + options) becomes modules; the pipeline and
:func:`eedn.rundir.load_model` both go through it, so a run directory rebuilds exactly what was trained.
"""
from __future__ import annotations

from typing import Any

from eedn.contracts import Backbone
from eedn.model import EarlyExitModel
from eedn.plugins import create, registry


def build_backbone(name: str, num_classes: int, image_size: int, in_channels: int = 3,
                   options: dict[str, Any] | None = None) -> Backbone:
    """``build_backbone("t2t_vit_7", 10, 32)``: a registered backbone with validated options."""
    return create("backbone", name, num_classes=num_classes, image_size=image_size, in_channels=in_channels,
                  **(options or {}))


def build_model(
    backbone: Backbone,
    gate: str | None = None,
    inference_module: str | None = None,
    gate_options: dict[str, Any] | None = None,
    im_options: dict[str, Any] | None = None,
) -> EarlyExitModel:
    """Attach registry-named IMs (one per intermediate exit) and a gate to a backbone; None names the
    registered default."""
    g = backbone.num_stages - 1
    gate = gate or registry("gate").default()
    inference_module = inference_module or registry("inference_module").default()
    ims = [create("inference_module", inference_module, backbone.feature_dims[i], backbone.num_classes,
                  **(im_options or {})) for i in range(g)]
    gate_obj = create("gate", gate, g, backbone.num_classes, **(gate_options or {}))
    return EarlyExitModel(backbone, ims, gate_obj)


def create_model(
    backbone: str,
    num_classes: int,
    image_size: int,
    in_channels: int = 3,
    gate: str | None = None,
    inference_module: str | None = None,
    backbone_options: dict[str, Any] | None = None,
    gate_options: dict[str, Any] | None = None,
    im_options: dict[str, Any] | None = None,
) -> EarlyExitModel:
    """``create_model("t2t_vit_7", num_classes=10, image_size=32, gate="jei")`` from registry names."""
    bb = build_backbone(backbone, num_classes, image_size, in_channels, backbone_options)
    return build_model(bb, gate=gate, inference_module=inference_module, gate_options=gate_options,
                       im_options=im_options)
