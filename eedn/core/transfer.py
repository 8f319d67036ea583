"""Transfer learning: load weights trained elsewhere (ImageNet, timm's trainer) into a backbone of this run.

Two things differ between a pretrained checkpoint and the model a run builds, and both are fixed here the
same way for every backbone family:

* the classifier head has another class count (1000 ImageNet classes, 10 here): its weights are dropped
  and stay freshly initialised, and the run log says so in one line;
* the first convolution sees another number of input channels (grayscale data, RGB weights): on request
  (``backbone_training.adapt_input_channels``) its kernel is adapted so that a grayscale image gives the
  response the RGB weights gave to that image repeated on every channel.

Every other weight must fit exactly: a checkpoint of another architecture is still one clear error.
Checkpoints are read weights-only; a timm-trainer checkpoint also holds its ``argparse.Namespace`` of
arguments, which is allow-listed for the weights-only loader (:func:`eedn.runtime.io.load_checkpoint`) and nothing else.
"""
from __future__ import annotations

import math
import os
from typing import Any, Sequence

from torch import Tensor, nn

from eedn.runtime.errors import EednError
from eedn.runtime.io import load_checkpoint, load_state_dict_strict

#: where checkpoints keep their model weights, in the order they are looked for: the EMA weights of a timm-trainer
#: checkpoint first (the released ones, and what timm itself loads by default), then its ``state_dict``; eedn's
#: backbone cache: ``model``; a run directory's model.pt: ``backbone``
STATE_KEYS = ("state_dict_ema", "state_dict", "model", "backbone")


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """The tensors of a checkpoint's model weights (:func:`unwrap_state_dict`). A ``.safetensors`` file (Hugging
    Face) is read with safetensors, which holds tensors only; anything else with ``torch.load(weights_only=True)``."""
    blob = _read_safetensors(path) if str(path).endswith(".safetensors") else load_checkpoint(path)
    return unwrap_state_dict(blob, path)


def unwrap_state_dict(blob: Any, path: str | os.PathLike) -> dict[str, Tensor]:
    """The model weights inside a loaded checkpoint ``blob`` (read from ``path``): the first of :data:`STATE_KEYS`
    that holds a dict, else the blob itself, with DataParallel's ``module.`` prefixes removed and non-tensor
    entries dropped."""
    if isinstance(blob, dict):
        for key in STATE_KEYS:
            if isinstance(blob.get(key), dict):
                blob = blob[key]
                break
    if not isinstance(blob, dict) or not any(isinstance(v, Tensor) for v in blob.values()):
        raise EednError(f"checkpoint {path} holds no state dict (looked for {', '.join(STATE_KEYS)} or a plain "
                        "dict of tensors); give a file saved with torch.save(model.state_dict())")
    state: dict[str, Tensor] = {}
    for key, value in blob.items():
        if isinstance(key, str) and isinstance(value, Tensor):
            while key.startswith("module."):
                key = key[len("module."):]
            state[key] = value
    return state


def _read_safetensors(path: str | os.PathLike) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not os.path.exists(path):
        raise EednError(f"checkpoint not found: {path}")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as exc:
        raise EednError(f"cannot read checkpoint {path}: {str(exc).splitlines()[0][:200]}") from exc


def adapt_input_conv(weight: Tensor, in_channels: int) -> Tensor:
    """A first-layer kernel ``[O, C, ...]`` for ``in_channels`` inputs: summed over C for one channel (a gray
    image gives what the original weights gave to it repeated on every channel), else the C channels repeated
    cyclically and scaled by ``C / in_channels`` (when ``in_channels`` is a multiple of C, a constant image
    then gets exactly the original response)."""
    original = weight.shape[1]
    if in_channels == original:
        return weight
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    repeats = math.ceil(in_channels / original)
    tiled = weight.repeat(1, repeats, *([1] * (weight.dim() - 2)))[:, :in_channels]
    return tiled * (original / in_channels)


def fit_pretrained(module: nn.Module, state: dict[str, Tensor], source: str, classifier: Sequence[str] = (),
                   first_conv: str | None = None, adapt_input_channels: bool = False) -> dict[str, list[str]]:
    """Load ``state`` into ``module`` strictly, except that classifier weights (keys starting with a
    ``classifier`` prefix) of another shape are dropped and, when ``adapt_input_channels``, the ``first_conv``
    kernel is adapted to the module's channel count. Returns ``{"dropped": [...], "adapted": [...]}``."""
    own = module.state_dict()
    state = dict(state)
    dropped = [k for k in state if k.startswith(tuple(classifier)) and k in own and state[k].shape != own[k].shape]
    for key in dropped:
        state[key] = own[key]  # keeps the fresh initialisation
    adapted: list[str] = []
    if first_conv and first_conv in state and first_conv in own:
        have, want = state[first_conv], own[first_conv]
        if have.shape != want.shape and have.shape[:1] + have.shape[2:] == want.shape[:1] + want.shape[2:]:
            if not adapt_input_channels:
                raise EednError(f"{source}: its first layer {first_conv} reads {have.shape[1]} input channels, the "
                                f"model {want.shape[1]}; set backbone_training.adapt_input_channels=true to adapt "
                                "it (or use data with that many channels)")
            state[first_conv] = adapt_input_conv(have, want.shape[1]).to(want.dtype)
            adapted.append(first_conv)
    load_state_dict_strict(module, state, source)
    return {"dropped": dropped, "adapted": adapted}


def transfer_summary(report: Any) -> str | None:
    """One informational line about what loading a checkpoint changed (None when it loaded as it was)."""
    if not isinstance(report, dict):
        return None
    parts = []
    if report.get("dropped"):
        parts.append(f"classifier {', '.join(report['dropped'])} dropped (another class count; freshly "
                     "initialised)")
    if report.get("adapted"):
        parts.append(f"{', '.join(report['adapted'])} adapted to the data's input channels")
    if report.get("resized"):
        parts.append(f"{', '.join(report['resized'])} resized to this image size")
    return "checkpoint: " + "; ".join(parts) if parts else None


def load_pretrained_weights(module: nn.Module, path: str | os.PathLike, description: str,
                            classifier: Sequence[str] = (), first_conv: str | None = None,
                            adapt_input_channels: bool = False) -> dict[str, list[str]]:
    """:func:`read_state_dict` then :func:`fit_pretrained`: what a backbone's ``load_pretrained`` does."""
    state = read_state_dict(path)
    return fit_pretrained(module, state, f"checkpoint {path} (for {description})", classifier, first_conv,
                          adapt_input_channels)

