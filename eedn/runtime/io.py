"""Atomic file writes: a file is either complete or absent, never half-written."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

#: temporary files and folders carry the writer's host and pid, so a later run can tell a killed writer's
#: leftovers (removed by :func:`clean_stale_temps`) from a live concurrent writer's
_HOST = re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname())[:40] or "host"
_TEMP_NAME = re.compile(r"^\..*\.(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)\.[^.]+\.(tmp|tmpdir)$")
#: a leftover older than this is stale whoever wrote it (another host's pid cannot be checked)
STALE_AFTER_S = 24 * 3600


def json_float(value: float | None) -> float | None:
    """``value`` as a JSON-safe number: None for missing, NaN and infinite values (JSON has no NaN)."""
    return None if value is None or not math.isfinite(value) else float(value)


def temp_prefix(name: str) -> str:
    """The prefix of a temporary sibling of ``name`` written by this process."""
    return f".{name}.{_HOST}-{os.getpid()}."


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_stale_temp(entry: Path) -> bool:
    """Whether ``entry`` is a temporary file / folder of a writer that was killed (its pid is gone on this
    host, or it is older than a day); a live writer's temporaries are not stale."""
    match = _TEMP_NAME.match(entry.name)
    if not match:
        return False
    try:
        old = time.time() - entry.lstat().st_mtime > STALE_AFTER_S
    except OSError:
        return False
    return old or (match["host"] == _HOST and not _pid_alive(int(match["pid"])))


def clean_stale_temps(directory: str | os.PathLike) -> list[Path]:
    """Remove the stale temporaries (:func:`is_stale_temp`) in ``directory``; returns what went."""
    removed: list[Path] = []
    try:
        entries = list(Path(directory).iterdir())
    except OSError:
        return removed
    for entry in entries:
        if is_stale_temp(entry):
            try:
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
                removed.append(entry)
            except OSError:
                pass
    return removed


def writable_dir(path: str | os.PathLike) -> bool:
    """Whether files can be created in ``path`` (or, while it does not exist, in its nearest existing
    ancestor), found by trying: permission bits say nothing for root or read-only mounts."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    if not path.is_dir():
        return False
    try:
        fd, probe = tempfile.mkstemp(prefix=temp_prefix("write-probe"), suffix=".tmp", dir=path)
    except OSError:
        return False
    os.close(fd)
    os.unlink(probe)
    return True


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic_write(path: str | os.PathLike, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path.name), suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; a finished file gets the usual mode
        fault_point("before-replace:" + re.sub(r"[0-9a-f]{16,}", "KEY", path.name))
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
    from eedn.runtime.errors import EednError

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
    from eedn.runtime.errors import EednError

    path = Path(path)
    if not path.exists():
        raise EednError(f"checkpoint not found: {path}")
    try:
        with _checkpoint_globals():
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise EednError(f"checkpoint {path} is corrupt or not a weights-only file ({load_failure_reason(exc)}); "
                        "re-create it or pass a different path") from exc


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


def load_failure_reason(exc: BaseException) -> str:
    """Why ``torch.load(weights_only=True)`` failed, in a few words: torch's own message leads with advice to
    load unsafely, which eedn never does, and puts the reason last."""
    text = " ".join(str(exc).split())
    if text.startswith("Weights only load failed"):
        reason = text.split(" Check the documentation")[0]
        for boilerplate in ("trusted source.", "your use case:", "WeightsUnpickler error:"):
            reason = reason.split(boilerplate)[-1]
        return f"refused by the weights-only loader: {reason.strip() or 'unsupported content'}"
    if "failed finding central directory" in text or "zip archive" in text:
        return "truncated or not a zip-format torch file"
    return f"{type(exc).__name__}: {text[:160]}"


#: environment variable naming a test-only fault point: the process SIGKILLs itself when it reaches it
FAULT_ENV = "EEDN_FAULT_POINT"


def fault_point(name: str) -> None:
    """Test-only kill switch (tests/test_faults.py): ``EEDN_FAULT_POINT=name[@N]`` SIGKILLs this process the
    N-th time (default first) it reaches the named point, so the suite can check what a real kill leaves."""
    wanted = os.environ.get(FAULT_ENV)
    if not wanted:
        return
    point, _, count = wanted.partition("@")
    if point != name:
        return
    hits = _FAULT_HITS[name] = _FAULT_HITS.get(name, 0) + 1
    if hits >= int(count or 1):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


_FAULT_HITS: dict[str, int] = {}
