"""The run directory and its manifest, ``run.json``: everything a reader needs, in one place.

A run directory holds ``run.json`` (what the model is, how its inputs are prepared, the environment, and
the reported policy's per-sample test decisions), ``results.json`` (every number), ``model.pt`` (backbone
and head weights of every trained setting), ``outputs.pt`` (stored per-exit outputs of val/cal/test),
``config.json`` (the resolved config), ``summary.md`` and figures. ``eedn predict``, ``bench``,
``compare`` and ``report`` read only these files: no dataset is rebuilt and no stored decision is
re-made.
"""
from __future__ import annotations

import json
import os
import platform
import secrets
import shutil
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from eedn.runtime.errors import EednError

if TYPE_CHECKING:
    from eedn.core.outputs import ExitOutputs

RUN_FORMAT = "eedn-run/1"
MANIFEST = "run.json"
RESULTS = "results.json"
WEIGHTS = "model.pt"
OUTPUTS = "outputs.pt"
CONFIG = "config.json"
#: the heads of the reported policy in model.pt (its gate in the calibrated setting)
POLICY_HEADS = "__policy__"


def git_commit() -> str | None:
    """The commit of the eedn source tree when it is a git checkout (None otherwise)."""
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def environment(device: str, world_size: int = 1) -> dict[str, Any]:
    """Versions, device and world size saved beside every result."""
    import torch

    from eedn.runtime.version import __version__

    return {"eedn": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "device": str(device), "world_size": world_size,
            "threads": torch.get_num_threads(), "git_commit": git_commit(), "argv": sys.argv[1:]}


def read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise EednError(f"{path.parent} is not a finished eedn run directory (no {path.name}); give the --out "
                        "directory of `eedn run`") from None
    except (OSError, ValueError) as exc:
        raise EednError(f"cannot read {what} {path}: {exc}") from None
    if not isinstance(data, dict):
        raise EednError(f"{path} does not hold an eedn {what}")
    return data


def read_manifest(run_dir: str | Path) -> dict:
    """``run.json`` of a finished run directory, checked for its format."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise EednError(f"no such run directory: {run_dir}")
    manifest = read_json(run_dir / MANIFEST, "run manifest")
    if manifest.get("format") != RUN_FORMAT:
        raise EednError(f"{run_dir / MANIFEST} has format {manifest.get('format')!r}, this eedn reads {RUN_FORMAT}; "
                        "re-run it with this version")
    return manifest


def read_results(run_dir: str | Path) -> dict:
    """``results.json`` of a finished run directory."""
    read_manifest(run_dir)
    return read_json(Path(run_dir) / RESULTS, "results file")


def load_model(run_dir: str | os.PathLike, setting: str = POLICY_HEADS, device: str = "cpu"):
    """The trained model of a run directory in eval mode (backbone, IMs, gate in ``setting``; default the
    reported policy) and its manifest. Built from ``run.json`` alone: no dataset is needed."""
    from eedn.core.build import build_backbone, build_model
    from eedn.runtime.io import load_checkpoint, load_state_dict_strict
    from eedn.core.plugins import create

    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    spec = manifest["model"]
    bb = spec["backbone"]
    backbone = build_backbone(bb["name"], bb["num_classes"], bb["image_size"], bb["in_channels"], bb["options"])
    model = build_model(backbone, gate=spec["gate"]["name"], inference_module=spec["inference_module"]["name"],
                        gate_options=spec["gate"]["options"], im_options=spec["inference_module"]["options"])
    create("strategy", spec["strategy"]["name"], **spec["strategy"]["options"]).prepare_model(model)
    blob = load_checkpoint(run_dir / WEIGHTS)
    if not isinstance(blob, dict) or "backbone" not in blob or "heads" not in blob:
        raise EednError(f"{run_dir / WEIGHTS} is not an eedn run's weights file (no backbone/heads)")
    load_state_dict_strict(model.backbone, blob["backbone"], str(run_dir / WEIGHTS))
    if setting not in blob["heads"]:
        raise EednError(f"setting '{setting}' not in {run_dir}; saved: {', '.join(blob['heads'])}")
    load_state_dict_strict(model.heads(), blob["heads"][setting], f"{run_dir / WEIGHTS} [{setting}]")
    model.freeze_backbone()
    return model.to(device).eval(), manifest


def created_now() -> str:
    return datetime.now().isoformat(timespec="seconds")


# ---------------------------------------------------------------------------- writing a run directory safely


def unique_run_name(stem: str) -> str:
    """``<stem>-<time>-<random>``: two runs started in the same second never share a directory."""
    return f"{stem}-{datetime.now().strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_out_dir(path: str | Path, overwrite: bool, what: str = "--out") -> None:
    """Before anything is trained: a non-empty run directory is refused unless ``overwrite``, and the place
    it will be written must be writable."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise EednError(f"{what} {path} is a file, not a directory; give a directory path")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise EednError(f"{what} {path} already holds files; pass --overwrite (config overwrite: true) to replace "
                        "them or give another directory")
    from eedn.runtime.io import writable_dir

    if not writable_dir(path.parent):
        raise EednError(f"{what} {path} cannot be written ({nearest_existing(path.parent)} is not writable); give "
                        "a writable directory")


@contextmanager
def staged_run_dir(final: str | Path, overwrite: bool) -> Iterator[Path]:
    """A temporary sibling of ``final`` to write the run into, renamed into place when the block ends: a
    killed run leaves no half-written run directory (its temporary is removed by the next run writing
    beside it), and an old run is replaced whole or not at all."""
    from eedn.runtime.io import clean_stale_temps, current_umask, temp_prefix

    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(final.parent)
    staging = Path(tempfile.mkdtemp(prefix=temp_prefix(final.name), suffix=".tmpdir", dir=final.parent))
    os.chmod(staging, 0o777 & ~current_umask())
    try:
        yield staging
        publish(staging, final, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def publish(staging: Path, final: Path, overwrite: bool) -> None:
    """Rename a finished staging directory to ``final``. An existing non-empty ``final`` is moved aside
    first with ``overwrite``; without it (another run wrote there meanwhile), this run stops with an error."""
    from eedn.runtime.io import fault_point, temp_prefix

    fault_point("publish-run-dir")
    old = None
    if final.exists() and overwrite:
        old = final.parent / f"{temp_prefix(final.name)}{secrets.token_hex(3)}.tmpdir"
        os.rename(final, old)
    try:
        os.rename(staging, final)  # atomic; fails if another run filled ``final`` meanwhile
    except OSError:
        if old is not None:
            os.rename(old, final)
        raise EednError(f"run directory {final} was written by another run meanwhile; nothing was replaced. "
                        "Give another --out, or --overwrite to replace it") from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_outputs(run_dir: str | os.PathLike) -> dict[str, dict[str, ExitOutputs]]:
    """A finished run directory's stored outputs (``outputs.pt``): trained setting → split (``val``, ``cal``,
    ``test``) → :class:`ExitOutputs`. The reported policy's setting is ``run.json``'s
    ``policy.trained_setting`` (:func:`eedn.load_run` returns that manifest). No network pass, no dataset."""
    run_dir = Path(run_dir)
    read_manifest(run_dir)  # a clear error for a directory that is not a finished run
    path = run_dir / OUTPUTS
    if not path.is_file():
        raise EednError(f"{run_dir} has no {OUTPUTS} (stored outputs); it was written by an eedn that did not "
                        "store them, or the file was removed: run it again")
    from eedn.core.outputs import ExitOutputs
    from eedn.runtime.io import load_checkpoint

    blob = load_checkpoint(path)
    keys = ("logits", "labels", "gate_scores", "exit_macs", "full_macs")
    ok = isinstance(blob, dict) and all(isinstance(splits, dict) and all(
        isinstance(d, dict) and all(k in d for k in keys) for d in splits.values()) for splits in blob.values())
    if not ok:
        raise EednError(f"{path} does not hold eedn's stored outputs (setting -> split -> logits, labels, ...); "
                        "give the directory of a finished `eedn run`")
    return {setting: {split: ExitOutputs.from_dict(d) for split, d in splits.items()}
            for setting, splits in blob.items()}
