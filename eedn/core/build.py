"""Registry names → objects: backbones, inference modules, gates and whole early-exit models.

The one place where a model spec (names + options) becomes modules; the pipeline and
:func:`eedn.pipeline.rundir.load_model` both go through it, so a run directory rebuilds exactly what was trained.
"""
from __future__ import annotations

import os
from typing import Any

from eedn.core.contracts import Backbone
from eedn.runtime.errors import warn
from eedn.core.model import EarlyExitModel
from eedn.core.plugins import create, registry
from eedn.runtime.seeding import seeded
from eedn.core.transfer import transfer_summary


def build_backbone(name: str, num_classes: int, image_size: int, in_channels: int = 3,
                   options: dict[str, Any] | None = None, *, seed: int | None = None) -> Backbone:
    """``build_backbone("t2t_vit_7", 10, 32)``: a registered backbone with validated options.

    ``seed`` draws its initial weights from that seed and leaves the global random state as it was; None
    draws from the global state (the pipeline seeds it once for the whole run)."""
    with seeded(seed):
        return create("backbone", name, num_classes=num_classes, image_size=image_size, in_channels=in_channels,
                      **(options or {}))


def build_model(
    backbone: Backbone,
    gate: str | None = None,
    inference_module: str | None = None,
    gate_options: dict[str, Any] | None = None,
    im_options: dict[str, Any] | None = None,
    *,
    seed: int | None = None,
) -> EarlyExitModel:
    """Attach registry-named IMs (one per intermediate exit) and a gate to a backbone; None names the
    registered default. ``seed`` draws the new modules' initial weights from that seed and leaves the global
    random state as it was; None draws from the global state (what the pipeline does after seeding it)."""
    g = backbone.num_stages - 1
    gate = gate or registry("gate").default()
    inference_module = inference_module or registry("inference_module").default()
    with seeded(seed):
        ims = [create("inference_module", inference_module, backbone.feature_dims[i], backbone.num_classes,
                      **(im_options or {})) for i in range(g)]
        gate_obj = create("gate", gate, g, backbone.num_classes, **(gate_options or {}))
        bind = getattr(gate_obj, "bind_features", None)
        if bind is not None:  # gates that read the exits' hidden features learn a projection of each width
            bind(list(backbone.feature_dims[:g]))
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
    *,
    checkpoint: str | os.PathLike | None = None,
    adapt_input_channels: bool = False,
    seed: int | None = 0,
) -> EarlyExitModel:
    """``create_model("t2t_vit_7", num_classes=10, image_size=32, gate="jei")`` from registry names.

    ``checkpoint`` loads trained backbone weights, as ``--backbone-checkpoint`` does: a state dict, or a file
    holding one under ``state_dict``/``model``/``backbone`` (timm's trainer, :func:`eedn.train_backbone`'s
    ``save_to``, a run's model.pt); a classifier of another class count is dropped and re-initialised, and
    ``adapt_input_channels`` adapts the first convolution to ``in_channels``. ``seed`` fixes every initial
    weight (the same seed builds the same model) and leaves the global random state as it was; None draws
    from the global state."""
    with seeded(seed):
        bb = build_backbone(backbone, num_classes, image_size, in_channels, backbone_options)
        if checkpoint is not None:
            note = transfer_summary(bb.load_pretrained(checkpoint, **({"adapt_input_channels": True}
                                                                      if adapt_input_channels else {})))
            if note:
                warn(note)
        return build_model(bb, gate=gate, inference_module=inference_module, gate_options=gate_options,
                           im_options=im_options)
