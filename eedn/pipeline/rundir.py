"""The run directory and its manifest, ``run.json``: everything a reader needs, in one place.

A run directory holds ``run.json`` (what the model is, how its inputs are prepared, the environment, and
the reported policy's per-sample test decisions), ``results.json`` (every number), ``model.pt`` (backbone
and head weights of every trained setting), ``outputs.pt`` (stored per-exit outputs of val/cal/test),
``config.json`` (the resolved config), ``summary.md`` and figures. ``eedn predict``, ``bench``,
``compare`` and ``report`` read only these files: no dataset is rebuilt and no stored decision is
re-made.
"""
from __future__ import annotations

import errno
import contextlib
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


#: the run files whose SHA-256 run.json records (``files.sha256``); summary.md and figures are re-rendered by
#: `eedn report` and are not part of what a reader trusts
HASHED = (CONFIG, WEIGHTS, OUTPUTS, RESULTS)


def file_hashes(run_dir: Path) -> dict[str, str]:
    """The SHA-256 of each of a run directory's :data:`HASHED` files (those present)."""
    from eedn.runtime.io import file_sha256

    return {name: file_sha256(run_dir / name) for name in HASHED if (run_dir / name).is_file()}


def verify_file(run_dir: Path, name: str, manifest: dict) -> None:
    """``name`` must have the SHA-256 that run.json records for it (runs of an eedn that recorded none pass)."""
    from eedn.runtime.io import file_sha256

    recorded = (manifest.get("files") or {}).get("sha256", {}).get(name)
    path = run_dir / name
    if recorded is None or not path.is_file():
        return
    if file_sha256(path) != recorded:
        raise EednError(f"{path} does not match the sha256 recorded in {run_dir / MANIFEST} (changed or corrupt since "
                        "the run wrote it); restore it from a copy or run the run again")


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
    manifest = read_manifest(run_dir)
    verify_file(Path(run_dir), RESULTS, manifest)
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
    verify_file(run_dir, WEIGHTS, manifest)
    blob = load_checkpoint(run_dir / WEIGHTS)
    if not isinstance(blob, dict) or "backbone" not in blob or "heads" not in blob:
        raise EednError(f"{run_dir / WEIGHTS} is not an eedn run's weights file (no backbone/heads)")
    load_state_dict_strict(model.backbone, blob["backbone"], str(run_dir / WEIGHTS))
    if setting not in blob["heads"]:
        raise EednError(f"setting '{setting}' not in {run_dir}; saved: {', '.join(blob['heads'])}")
    load_state_dict_strict(model.heads(), blob["heads"][setting], f"{run_dir / WEIGHTS} [{setting}]")
    model.freeze_backbone()
    check_finite_weights(model, run_dir / WEIGHTS)
    return model.to(device).eval(), manifest


def check_finite_weights(model: Any, source: Path) -> None:
    """A model with NaN / inf weights gives NaN confidences, never a usable prediction: refused on every load
    (predict, bench, export, load_run), as `eedn run` refuses to write one."""
    import torch

    # learned weights and the backbone's buffers (batch-norm statistics); a gate's thresholds may be inf by design
    tensors = {f"backbone.{k}": v for k, v in model.backbone.state_dict().items()} | dict(model.named_parameters())
    bad = [k for k, v in tensors.items() if torch.is_floating_point(v) and not torch.isfinite(v).all()]
    if bad:
        shown = ", ".join(bad[:3]) + (f" (+{len(bad) - 3} more)" if len(bad) > 3 else "")
        raise EednError(f"{source} holds non-finite (NaN / inf) weights in {shown}; the file is corrupt or the model "
                        "diverged: run the run again")


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


def is_run_dir(path: Path) -> bool:
    """Whether ``path`` holds an eedn run (run.json of this format) or an eedn comparison (comparison.json)."""
    try:
        if (path / "comparison.json").is_file():
            return True
        return json.loads((path / MANIFEST).read_text()).get("format") == RUN_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def fingerprint(path: Path) -> str | None:
    """What is at a run directory now: None when absent or empty, else its run.json's (or comparison.json's)
    SHA-256. A run replaces with --overwrite only what it saw there when it started."""
    from eedn.runtime.io import file_sha256

    try:
        if not path.is_dir() or not any(path.iterdir()):
            return None
        for name in (MANIFEST, "comparison.json"):
            if (path / name).is_file():
                return file_sha256(path / name)
    except OSError:
        pass
    return "not-a-run"


#: each run directory's fingerprint when this process first checked it (:func:`check_out_dir`)
_SEEN: dict[Path, str | None] = {}


def check_out_dir(path: str | Path, overwrite: bool, what: str = "--out", cache_root: str | Path | None = None) -> None:
    """Before anything is trained: a non-empty run directory is refused unless ``overwrite``, and then only an
    eedn run (or comparison) is replaced; the current directory (or one holding it) and a run directory that
    holds the cache are refused; the place it will be written must be writable."""
    from eedn.runtime.io import writable_dir

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise EednError(f"{what} {path} is a file, not a directory; give a directory path")
    resolved = path.resolve()
    here = Path.cwd().resolve()
    if resolved == here or resolved in here.parents:
        raise EednError(f"{what} {path} is the current directory or holds it, and a run directory is replaced "
                        f"whole when it is published; give a new subdirectory, e.g. {what} runs/NAME")
    if cache_root is not None:
        cache = Path(cache_root).resolve()
        if cache == resolved or resolved in cache.parents:
            raise EednError(f"the cache directory {cache_root} is inside {what} {path}, which is replaced whole when "
                            "the run is published; give a --cache-dir outside it")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise EednError(f"{what} {path} already holds files; pass --overwrite (config overwrite: true) to replace "
                            "them or give another directory")
        if not is_run_dir(path):
            raise EednError(f"{what} {path} is not an eedn run directory (no run.json); --overwrite replaces only eedn "
                            "runs: give another directory, or empty it yourself")
    if not writable_dir(path.parent):
        raise EednError(f"{what} {path} cannot be written ({nearest_existing(path.parent)} is not writable); give "
                        "a writable directory")
    if path.is_dir() and (os.path.ismount(path) or not writable_dir(path)):
        raise EednError(f"{what} {path} cannot be replaced (a mount point, or not writable); give a directory "
                        "inside it or another one")
    _SEEN.setdefault(resolved, fingerprint(path))


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
    finally:
        _SEEN.pop(final.resolve(), None)  # the next run into ``final`` checks it afresh


@contextmanager
def publish_lock(final: Path) -> Iterator[None]:
    """Serialise the runs publishing into one directory (``flock`` on a lock file beside it, released by the
    kernel when a holder is killed; the file is removed by the holder on the way out)."""
    import fcntl

    lock_path = final.parent / f".{final.name}.publish-lock"
    while True:
        fd = os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o666)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            same = os.fstat(fd).st_ino == os.stat(lock_path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the previous holder removed the file after we opened it: lock the new one
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock_path)
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: this file system cannot; use two renames
        return False
    raise OSError(err, os.strerror(err), str(b))


def publish(staging: Path, final: Path, overwrite: bool) -> None:
    """Rename a finished staging directory to ``final``. With ``overwrite`` an existing run is swapped with the
    staging directory in one atomic step (a kill leaves the old run or the new one, never neither), and only
    when it is the run that was there when this run started: a run another one published meanwhile is never
    replaced (it gets a clear error instead). Without ``overwrite`` a directory that appeared meanwhile stops
    this run with an error."""
    from eedn.runtime.io import fault_point, temp_prefix

    fault_point("publish-run-dir")
    seen = _SEEN.get(final.resolve(), fingerprint(final))
    with publish_lock(final):
        now = fingerprint(final)
        if overwrite and now is not None and now != seen:
            raise EednError(f"run directory {final} was written by another run meanwhile; nothing was replaced. "
                            "Give another --out, or run again to replace it")
        try:
            if overwrite and now is not None:
                if _exchange(staging, final):
                    fault_point("publish-swapped")
                    shutil.rmtree(staging, ignore_errors=True)  # the old run, now at the staging name
                else:
                    old = final.parent / f"{temp_prefix(final.name)}{secrets.token_hex(3)}.tmpdir"
                    os.rename(final, old)
                    fault_point("publish-between-renames")
                    os.rename(staging, final)
                    shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(staging, final)  # atomic; fails if another run filled ``final`` meanwhile
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise EednError(f"run directory {final} was written by another run meanwhile; nothing was replaced. "
                                "Give another --out, or --overwrite to replace it") from None
            raise EednError(f"cannot write run directory {final} ({exc.strerror}); give a writable --out") from None


def read_outputs(run_dir: str | os.PathLike) -> dict[str, dict[str, ExitOutputs]]:
    """A finished run directory's stored outputs (``outputs.pt``): trained setting → split (``val``, ``cal``,
    ``test``) → :class:`ExitOutputs`. The reported policy's setting is ``run.json``'s
    ``policy.trained_setting`` (:func:`eedn.load_run` returns that manifest). No network pass, no dataset."""
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)  # a clear error for a directory that is not a finished run
    path = run_dir / OUTPUTS
    if not path.is_file():
        raise EednError(f"{run_dir} has no {OUTPUTS} (stored outputs); it was written by an eedn that did not "
                        "store them, or the file was removed: run it again")
    from eedn.core.outputs import ExitOutputs
    from eedn.runtime.io import load_checkpoint

    verify_file(run_dir, OUTPUTS, manifest)
    blob = load_checkpoint(path)
    keys = ("logits", "labels", "gate_scores", "exit_macs", "full_macs")
    ok = isinstance(blob, dict) and all(isinstance(splits, dict) and all(
        isinstance(d, dict) and all(k in d for k in keys) for d in splits.values()) for splits in blob.values())
    if not ok:
        raise EednError(f"{path} does not hold eedn's stored outputs (setting -> split -> logits, labels, ...); "
                        "give the directory of a finished `eedn run`")
    return {setting: {split: ExitOutputs.from_dict(d) for split, d in splits.items()}
            for setting, splits in blob.items()}
