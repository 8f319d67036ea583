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
import platform
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from eedn.errors import EednError

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

    import eedn

    return {"eedn": eedn.__version__, "torch": torch.__version__, "python": platform.python_version(),
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


def load_model(run_dir: str | Path, setting: str = POLICY_HEADS, device: str = "cpu"):
    """The trained model of a run directory in eval mode (backbone, IMs, gate in ``setting``; default the
    reported policy) and its manifest. Built from ``run.json`` alone: no dataset is needed."""
    from eedn.build import build_backbone, build_model
    from eedn.io import load_checkpoint, load_state_dict_strict
    from eedn.plugins import create

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
