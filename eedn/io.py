"""Atomic file writes: a file is either complete or absent, never half-written."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch


def _atomic_write(path: str | os.PathLike, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    _atomic_write(path, lambda fh: fh.write(data))


def atomic_save_figure(fig: Any, path: str | os.PathLike, **savefig_kwargs: Any) -> None:
    """Save a matplotlib figure as a PNG atomically."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", **savefig_kwargs)
    atomic_write_bytes(path, buf.getvalue())


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    _atomic_write(path, lambda fh: torch.save(obj, fh))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    _atomic_write(path, lambda fh: fh.write(text.encode()))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def state_dict_mismatch(module: torch.nn.Module, state: dict) -> str | None:
    """A short summary of how ``state`` fails to fit ``module`` (missing / unexpected keys, shape
    mismatches), or None when every key and shape matches."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and isinstance(state[k], torch.Tensor) and state[k].shape != own[k].shape]
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong)):
        if keys:
            shown = ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")
            parts.append(f"{label}: {shown}")
    return "; ".join(parts) or None


def load_state_dict_strict(module: torch.nn.Module, state: Any, source: str) -> None:
    """Load a state dict strictly; a mismatch is one line saying what did not fit."""
    from eedn.errors import EednError

    name = getattr(module, "display_name", type(module).__name__)
    if not isinstance(state, dict):
        raise EednError(f"{source} holds a {type(state).__name__}, not a state dict of {name}")
    problem = state_dict_mismatch(module, state)
    if problem is None:
        try:
            module.load_state_dict(state, strict=True)
            return
        except (RuntimeError, TypeError) as exc:
            problem = " ".join(str(exc).split())[:300]
    raise EednError(f"{source} does not fit {name} ({problem}); give weights saved from the "
                    "same model and options")


def load_checkpoint(path: str | os.PathLike) -> dict:
    """``torch.load(weights_only=True)`` with a one-line error for missing or corrupt files."""
    from eedn.errors import EednError

    path = Path(path)
    if not path.exists():
        raise EednError(f"checkpoint not found: {path}")
    try:
        with _checkpoint_globals():
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise EednError(f"cannot read checkpoint {path}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from exc


def _checkpoint_globals():
    """Types beyond tensors and containers that the weights-only loader may rebuild: ``argparse.Namespace``,
    which timm's trainer saves as ``args`` in every checkpoint (a plain attribute bag; nothing else is
    allowed, so a pickle that calls code is still refused)."""
    import argparse
    import contextlib

    safe_globals = getattr(torch.serialization, "safe_globals", None)
    if safe_globals is None:  # torch < 2.5: the process-wide allow-list
        torch.serialization.add_safe_globals([argparse.Namespace])
        return contextlib.nullcontext()
    return safe_globals([argparse.Namespace])
