"""Numeric precision and memory format: PyTorch's own autocast, GradScaler and channels_last.

``precision`` (config key, ``--precision``) is ``fp32`` (no autocast), ``bf16`` (autocast to bfloat16;
CPU where the processor supports it, and CUDA) or ``fp16`` (autocast to float16 with loss scaling;
CUDA only). Weights stay fp32 in every case (autocast casts per operation), and every feature, logit
or score eedn stores is converted back to fp32, so caches and run directories read the same way
whatever the precision (docs/scale.md).

``channels_last`` (config key) is ``auto`` (what the backbone says it prefers:
:attr:`eedn.core.contracts.Backbone.prefers_channels_last`), ``true`` or ``false``. Convolutions on CPU and
GPU run several times faster on NHWC tensors with bf16 (docs/scale.md, measured).
"""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, ContextManager

from eedn.runtime.errors import EednError

if TYPE_CHECKING:  # torch is imported where it is used, so the config (and `eedn --help`) can read PRECISIONS
    import torch
    from torch import nn

#: the autocast precisions eedn runs in (the config key ``precision`` takes its choices from here)
PRECISIONS = ("fp32", "bf16", "fp16")
CHANNELS_LAST_CHOICES = ("auto", True, False)


def _dtype(precision: str) -> torch.dtype:
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def device_type(device: str | torch.device) -> str:
    """``cpu`` or ``cuda`` (what :class:`torch.autocast` takes) from ``cuda:1`` and the like."""
    import torch

    return torch.device(device).type


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bfloat16 kernels (oneDNN: AVX-512 BF16 or AMX); elsewhere bf16 autocast
    would run emulated, slower than fp32."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def check_precision(precision: str, device: str | torch.device) -> str:
    """Validate ``precision`` for ``device``; raise one clear line where the pair cannot run."""
    import torch

    if precision not in PRECISIONS:
        raise EednError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    kind = device_type(device)
    if precision == "fp16" and kind != "cuda":
        raise EednError("precision fp16 needs a CUDA device (float16 autocast with loss scaling); on CPU use "
                        "--precision bf16 or fp32")
    if precision == "bf16" and kind == "cpu" and not cpu_supports_bf16():
        raise EednError("precision bf16 needs a CPU with native bfloat16 (AVX-512 BF16 or AMX), which this one "
                        "lacks; use --precision fp32")
    if precision == "bf16" and kind == "cuda" and not torch.cuda.is_bf16_supported():
        raise EednError("precision bf16 is not supported by this GPU; use --precision fp16 or fp32")
    return precision


def autocast(precision: str, device: str | torch.device) -> ContextManager[Any]:
    """``torch.autocast`` for ``precision`` on ``device`` (a no-op context for fp32)."""
    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type(device), dtype=_dtype(precision))


def grad_scaler(precision: str, device: str | torch.device) -> torch.amp.GradScaler:
    """A GradScaler that scales only under fp16 (bf16 has fp32's exponent range and needs none); disabled,
    its ``scale``/``step``/``update`` are plain pass-throughs."""
    import torch

    kind = device_type(device)
    return torch.amp.GradScaler(kind if kind == "cuda" else "cpu", enabled=precision == "fp16")


def use_channels_last(setting: Any, module: nn.Module) -> bool:
    """Resolve the ``channels_last`` setting: ``auto`` asks the backbone (``prefers_channels_last``)."""
    if setting in ("auto", None):
        return bool(getattr(module, "prefers_channels_last", False))
    if isinstance(setting, bool):
        return setting
    raise EednError(f"channels_last must be auto, true or false, got {setting!r}")


def to_memory_format(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """Images ``[B, C, H, W]`` in NHWC memory order when asked (other tensors unchanged)."""
    import torch

    if channels_last and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


def apply_memory_format(module: nn.Module, channels_last: bool) -> nn.Module:
    """Put a module's 4-d weights in NHWC order (in place) when ``channels_last``; returns the module."""
    import torch

    if channels_last:
        module.to(memory_format=torch.channels_last)
    return module


def numerics_key(precision: str, channels_last: bool) -> dict:
    """What a cache key adds for non-default numerics; empty for fp32 / NCHW, so existing fp32 caches stay valid."""
    out: dict = {}
    if precision != "fp32":
        out["precision"] = precision
    if channels_last:
        out["channels_last"] = True
    return out
