"""Extracting an image-folder archive (``.tar.gz``) once into the cache, safely and atomically."""
from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
import zlib
from pathlib import Path, PurePosixPath

from eedn.runtime.errors import EednError
from eedn.runtime.io import clean_stale_temps, temp_prefix


def _fingerprint(path: Path) -> str:
    """A short hash of an archive's resolved path, size and modification time."""
    st = path.stat()
    blob = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def extract_once(archive: Path, cache_dir: str | os.PathLike | None = None) -> Path:
    """Extract a tar archive into ``cache_dir/<fingerprint>`` once and return that directory.

    Extraction goes to a temporary sibling that is renamed into place, so an interrupted or
    concurrent extraction never leaves a half-filled directory that a later run would trust.
    """
    base = Path(cache_dir or Path(os.environ.get("EEDN_CACHE") or "~/.cache/eedn") / "datasets").expanduser()
    target = base / _fingerprint(archive)
    if target.is_dir():
        return target
    base.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(base)  # what killed extractions left
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(target.name), suffix=".tmpdir", dir=base))
    try:
        _extract_regular_files(archive, tmp)
    except EednError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise EednError(f"cannot extract {archive} as a tar archive ({err}); give a .tar.gz holding "
                        "train/<class>/<image files>") from None
    try:
        os.rename(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not target.is_dir():
            raise
    return target


def _extract_regular_files(archive: Path, dest: Path) -> None:
    """Stream a tar archive into ``dest``, writing only directories and regular files.

    Links, devices and the like are skipped and a member escaping ``dest`` (absolute, ``..``) is an
    error, which is all an image folder needs; it is also ~3x faster than ``extractall`` with the
    ``data`` filter on 50 000 small JPEGs, since no metadata is restored.
    """
    made: set[Path] = set()
    with tarfile.open(archive, "r|*") as tar:
        for member in tar:
            parts = PurePosixPath(member.name).parts
            if parts and (parts[0] == "/" or ".." in parts):
                raise EednError(f"{archive} holds a member outside its folder ({member.name!r}); refusing to "
                                "extract it")
            if not parts or not (member.isdir() or member.isfile()):
                continue
            out = dest.joinpath(*parts)
            if member.isdir():
                out.mkdir(parents=True, exist_ok=True)
                continue
            if out.parent not in made:
                out.parent.mkdir(parents=True, exist_ok=True)
                made.add(out.parent)
            source = tar.extractfile(member)
            assert source is not None  # a regular file (the others were skipped above)
            with open(out, "wb") as sink:
                shutil.copyfileobj(source, sink)
