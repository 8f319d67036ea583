"""``eedn predict``: classify image files with a trained run, with real early exits.

Everything comes from the run directory, so it works after the training data is gone: the model from
``run.json`` and ``model.pt`` (:func:`eedn.pipeline.rundir.load_model`) and the preprocessing from ``run.json``'s
``input`` section (channels, image size, mean/std, class names). Images are batched and sent through
:class:`eedn.deploy.inference.EarlyExitEngine`; each file gets its class, confidence, the exit it left at and
the MACs it cost.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

import torch
from torch import Tensor

from eedn.deploy.export_runtime import ExportError, preprocess_image
from eedn.deploy.export_runtime import find_images as export_find_images
from eedn.deploy.inference import EarlyExitEngine
from eedn.pipeline.rundir import MANIFEST, load_model, read_manifest
from eedn.report.render import format_macs
from eedn.runtime.errors import EednError

if TYPE_CHECKING:  # pragma: no cover
    from PIL.Image import Image



# ----------------------------------------------------------------------------------- preprocessing
@dataclass(frozen=True)
class InputRecipe:
    """How a run's model wants its images (run.json's ``input``): what the dataset's evaluation
    transforms did, recorded when the run was trained."""

    channels: int
    image_size: int
    mean: list[float] | None
    std: list[float] | None
    class_names: list[str]

    @classmethod
    def from_manifest(cls, manifest: dict) -> InputRecipe:
        spec = manifest.get("input")
        if not isinstance(spec, dict) or "channels" not in spec or "image_size" not in spec:
            raise EednError(f"the run's {MANIFEST} has no input section (channels, image_size); re-run it with "
                            "this version of eedn")
        mean, std = spec.get("mean"), spec.get("std")
        return cls(int(spec["channels"]), int(spec["image_size"]), None if mean is None else [float(m) for m in mean],
                   None if std is None else [float(s) for s in std], [str(c) for c in spec.get("class_names") or []])

    def class_name(self, index: int) -> str:
        return self.class_names[index] if index < len(self.class_names) else str(index)


def preprocessor(recipe: InputRecipe) -> Callable[[Image], Tensor]:
    """PIL image -> ``[C, S, S]`` tensor like the dataset's evaluation split. The exported runner's own function
    (:func:`eedn.deploy.export_runtime.preprocess_image`), so an export classifies image files as this does."""

    def preprocess(image: Image) -> Tensor:
        return preprocess_image(image, recipe.channels, recipe.image_size, recipe.mean, recipe.std)

    return preprocess


def find_images(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Files given directly, plus image files (by extension) found recursively in folders, in order: the exported
    runner's own search (:func:`eedn.deploy.export_runtime.find_images`), so both find the same files."""
    try:
        return export_find_images(list(paths))
    except ExportError as exc:
        raise EednError(str(exc)) from None


def load_image(path: Path, preprocess: Callable[[Image], Tensor]) -> Tensor:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return preprocess(image)
    except Image.DecompressionBombError as exc:
        raise EednError(f"image {path} is too large to decode safely ({exc}); resize it or remove it") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise EednError(f"cannot read image {path}: {exc}") from None


def read_images(run_dir: str | Path, inputs: Sequence[str | os.PathLike],
                max_images: int | None = None) -> tuple[list[Path], Tensor]:
    """The image files under ``inputs`` (at most ``max_images``) and one ``[N, C, S, S]`` tensor of them,
    preprocessed for the run in ``run_dir`` (what ``eedn bench --input`` times)."""
    recipe = InputRecipe.from_manifest(read_manifest(run_dir))
    files = find_images(inputs)[:max_images]
    preprocess = preprocessor(recipe)
    return files, torch.stack([load_image(f, preprocess) for f in files])


# ---------------------------------------------------------------------------------------- predict
def predict_files(run_dir: str | Path, inputs: Sequence[str | os.PathLike], batch_size: int = 64,
                  device: str = "cpu", compile: bool = False) -> list[dict]:
    """One dict per image file under ``inputs``: ``file``, ``class_index``, ``class`` (the run's class
    name), ``confidence``, ``exit`` and ``macs``, from the run's reported policy with real early exits."""
    if batch_size < 1:
        raise EednError(f"--batch-size must be at least 1, got {batch_size}")
    recipe = InputRecipe.from_manifest(read_manifest(run_dir))
    files = find_images(inputs)
    model, manifest = load_model(run_dir, device=device)
    preprocess = preprocessor(recipe)
    engine = EarlyExitEngine(model, exit_macs=manifest["model"]["exit_macs"], compile=compile)
    rows: list[dict] = []
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        out = engine(torch.stack([load_image(f, preprocess) for f in chunk]))
        for i, f in enumerate(chunk):
            c = int(out.predictions[i])
            rows.append({"file": str(f), "class_index": c, "class": recipe.class_name(c),
                         "confidence": float(out.confidences[i]), "exit": int(out.exit_index[i]),
                         "macs": float(out.macs[i])})
    return rows


def _display_path(path: str) -> str:
    """Relative to the working directory when below it (shorter tables), else as given."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return path


def print_predictions(rows: list[dict], full_macs: float | None = None, num_exits: int | None = None) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.console import JustifyMethod
    from rich.text import Text

    table = Table(title="early-exit predictions")
    columns: tuple[tuple[str, JustifyMethod], ...] = (("class", "left"), ("confidence", "right"), ("exit", "right"),
                                                      ("MACs", "right"))
    table.add_column("file", overflow="fold")  # never cut a path short
    for col, justify in columns:
        table.add_column(col, justify=justify, no_wrap=True)
    for r in rows:
        exit_label = str(r["exit"]) + (" (head)" if num_exits is not None and r["exit"] == num_exits - 1 else "")
        table.add_row(Text(_display_path(r["file"])), Text(r["class"]), f"{r['confidence']:.3f}", exit_label,
                      format_macs(r["macs"]))
    console = Console()
    console.print(table)
    if rows and full_macs:
        mean = sum(r["macs"] for r in rows) / len(rows)
        console.print(f"{len(rows)} images, mean {format_macs(mean)} MACs = {mean / full_macs:.3f} of the full network")


#: ``eedn predict --format``: a table, or machine-readable rows
OUTPUT_FORMATS = ("table", "json", "csv")


def write_predictions(rows: list[dict], fmt: str, stream: IO[str] | None = None) -> None:
    """``rows`` as JSON (a list of objects, strict JSON) or CSV (with a header) on ``stream`` (stdout)."""
    import csv
    import json
    import sys

    stream = stream or sys.stdout
    if fmt == "json":
        json.dump(rows, stream, indent=1, allow_nan=False)
        stream.write("\n")
    elif fmt == "csv":
        writer = csv.DictWriter(stream, fieldnames=["file", "class_index", "class", "confidence", "exit", "macs"],
                                lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    else:
        raise EednError(f"unknown output format '{fmt}'; known: {', '.join(OUTPUT_FORMATS)}")
