"""``eedn predict``: classify image files with a trained run, with real early exits.

Images are preprocessed like the run's dataset evaluates them (see :func:`eval_preprocessor`), batched,
and sent through :class:`eedn.inference.EarlyExitEngine`; each file gets its class, confidence, the
exit it left at and the MACs it cost.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import click
import torch
import torch.nn.functional as F
from torch import Tensor

from eedn.cli_options import friendly_errors
from eedn.errors import EednError
from eedn.inference import EarlyExitEngine
from eedn.model import EarlyExitModel

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".gif", ".tif", ".tiff", ".webp")


# ----------------------------------------------------------------------------------------- the run
def read_results(run_dir: str | Path) -> dict:
    path = Path(run_dir) / "results.json"
    if not path.is_file():
        raise EednError(f"{run_dir} is not a finished eedn run directory (no results.json); "
                        "give the --out directory of `eedn run`")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise EednError(f"cannot read {path}: {exc}") from None


def load_trained_run(run_dir: str | Path) -> tuple[EarlyExitModel, dict]:
    """``eedn.run.load_run`` in eval mode, tolerating run directories whose ``policy.gate`` holds the
    gate's setting (a dict) instead of its registry name: then the gate name comes from the config or
    the strategy's default gate."""
    from eedn.run import load_run

    results = read_results(run_dir)
    gate = results.get("policy", {}).get("gate")
    if isinstance(gate, str):
        model, results = load_run(run_dir)
        return model.eval(), results
    from eedn.io import load_checkpoint
    from eedn.model import build_model
    from eedn.plugins import create
    from eedn.run import make_strategy

    cfg = results["config"]
    strategy = make_strategy(cfg)
    gate_name = cfg.get("gate") or strategy.default_gate
    source = create("dataset", cfg["dataset"], **cfg["dataset_options"])
    bb_opts = {k: v for k, v in results["backbone"]["options"].items() if k != "checkpoint"}
    backbone = create("backbone", cfg["backbone"], num_classes=source.num_classes,
                      image_size=results["dataset"]["image_size"], in_channels=source.channels, **bb_opts)
    blob = load_checkpoint(Path(run_dir) / "model.pt")
    backbone.load_state_dict(blob["backbone"])
    model = build_model(backbone, gate=gate_name, inference_module=cfg["inference_module"],
                        gate_options=cfg["gate_options"])
    strategy.prepare_model(model)
    model.load_heads_state_dict(blob["heads"]["__policy__"])
    model.freeze_backbone()
    return model.eval(), results


# ----------------------------------------------------------------------------------- preprocessing
@dataclass
class EvalRecipe:
    """How the run's dataset turns an image into the tensor the model saw at evaluation."""

    channels: int
    image_size: int
    mean: list[float] | None
    std: list[float] | None
    class_names: list[str]
    note: str = ""


def eval_recipe(results: dict) -> EvalRecipe:
    """The run's evaluation preprocessing, read from its dataset source.

    No dataset hook exposes an eval transform for arbitrary files, so the recipe is rebuilt from what
    every built-in source shares: resize to the run's image size, ``[0, 1]`` pixels, normalisation
    with the mean/std that the source's ``splits()`` reports in ``DataSplits.info`` (digits: the train
    split's own mean/std; CIFAR: the dataset constants) or takes as options (image folders). When the
    splits cannot be built (dataset files absent here), the source's options/constants are used.
    """
    from eedn.plugins import create

    cfg = results["config"]
    image_size = int(results["dataset"]["image_size"])
    source = create("dataset", cfg["dataset"], **cfg["dataset_options"])
    stored = results["dataset"]
    mean, std, names, note = stored.get("mean"), stored.get("std"), list(stored.get("class_names") or []), ""
    if mean is None or not names:
        try:
            data = source.splits(image_size, seed=cfg["seed"], augment=False)
            info, names = data.info, names or list(data.class_names)
            if mean is None:
                mean, std = info.get("mean"), info.get("std")
                if mean is None:
                    mean, std = source.options.get("mean"), source.options.get("std")
        except EednError as exc:
            note = f"dataset splits unavailable ({exc}); using the source's normalisation constants"
            if mean is None:
                mean = source.options.get("mean", getattr(source, "mean", None))
                std = source.options.get("std", getattr(source, "std", None))
    return EvalRecipe(int(source.channels), image_size, None if mean is None else [float(m) for m in mean],
                      None if std is None else [float(s) for s in std], names, note)


def eval_preprocessor(recipe: EvalRecipe) -> Callable[["PIL.Image.Image"], Tensor]:  # noqa: F821
    """PIL image -> ``[C, S, S]`` tensor: grayscale/RGB, centre-cropped to a square, resized to S with
    bilinear interpolation (the digits source upsamples with ``F.interpolate(bilinear)``; CIFAR-style
    sources resize with torchvision's bilinear ``Resize``), scaled to ``[0, 1]``, normalised."""
    import numpy as np

    mode = "L" if recipe.channels == 1 else "RGB"
    size = recipe.image_size
    mean = None if recipe.mean is None else torch.tensor(recipe.mean).view(-1, 1, 1)
    std = None if recipe.std is None else torch.tensor(recipe.std).view(-1, 1, 1)

    def preprocess(image) -> Tensor:
        image = image.convert(mode)
        w, h = image.size
        side = min(w, h)
        if w != h:
            left, top = (w - side) // 2, (h - side) // 2
            image = image.crop((left, top, left + side, top + side))
        x = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()) / 255.0
        x = x.unsqueeze(0) if x.dim() == 2 else x.permute(2, 0, 1)
        if side != size:
            x = F.interpolate(x.unsqueeze(0), size=(size, size), mode="bilinear", align_corners=False,
                              antialias=side > size).squeeze(0)
        if mean is not None and std is not None:
            x = (x - mean) / std
        return x

    return preprocess


def find_images(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Files given directly, plus image files (by extension) found recursively in folders, in order."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_file():
            found.append(path)
        elif path.is_dir():
            for dirpath, dirnames, filenames in os.walk(path):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                found.extend(Path(dirpath) / f for f in sorted(filenames)
                             if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."))
        else:
            raise EednError(f"input {raw} does not exist; give image files or folders of images")
    if not found:
        raise EednError(f"no images found in {', '.join(map(str, paths))} (looked for {', '.join(IMAGE_EXTENSIONS)})")
    return found


def load_image(path: Path, preprocess: Callable) -> Tensor:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return preprocess(image)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise EednError(f"cannot read image {path}: {exc}") from None


# ---------------------------------------------------------------------------------------- predict
def fmt_macs(m: float) -> str:
    """3 significant digits with a G/M/K suffix."""
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if m >= div:
            return f"{m / div:.3g}{unit}"
    return f"{m:.0f}"


def predict_files(run_dir: str | Path, inputs: Sequence[str | os.PathLike], batch_size: int = 64,
                  device: str = "cpu") -> list[dict]:
    """One dict per image: file, class index and name, confidence, exit index, MACs."""
    if batch_size < 1:
        raise EednError(f"--batch-size must be at least 1, got {batch_size}")
    files = find_images(inputs)
    model, results = load_trained_run(run_dir)
    model.to(device)
    recipe = eval_recipe(results)
    preprocess = eval_preprocessor(recipe)
    engine = EarlyExitEngine(model, exit_macs=[e["macs"] for e in results["exits"]])
    rows: list[dict] = []
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        out = engine(torch.stack([load_image(f, preprocess) for f in chunk]))
        for i, f in enumerate(chunk):
            c = int(out.predictions[i])
            rows.append({"file": str(f), "class_index": c,
                         "class": recipe.class_names[c] if c < len(recipe.class_names) else str(c),
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

    table = Table(title="early-exit predictions")
    table.add_column("file", overflow="fold")  # never cut a path short
    for col, justify in (("class", "left"), ("confidence", "right"), ("exit", "right"), ("MACs", "right")):
        table.add_column(col, justify=justify, no_wrap=True)
    for r in rows:
        exit_label = str(r["exit"]) + (" (head)" if num_exits is not None and r["exit"] == num_exits - 1 else "")
        table.add_row(_display_path(r["file"]), r["class"], f"{r['confidence']:.3f}", exit_label, fmt_macs(r["macs"]))
    console = Console()
    console.print(table)
    if rows and full_macs:
        mean = sum(r["macs"] for r in rows) / len(rows)
        console.print(f"{len(rows)} images, mean {fmt_macs(mean)} MACs = {mean / full_macs:.3f} of the full network")


@click.command("predict")
@click.argument("run_dir", type=click.Path())
@click.option("--input", "inputs", multiple=True, required=True, metavar="PATH",
              help="an image file or a folder of images (repeatable)")
@click.option("--batch-size", type=int, default=64, show_default=True, help="images per engine call")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda")
@click.option("--debug", is_flag=True, help="show tracebacks")
@friendly_errors
def predict(run_dir, inputs, batch_size, device, debug) -> None:
    """Classify images with a trained run (real early exits): class, confidence, exit, MACs per file."""
    results = read_results(run_dir)
    rows = predict_files(run_dir, inputs, batch_size=batch_size, device=device)
    print_predictions(rows, results.get("full_macs"), len(results.get("exits", [])) or None)
