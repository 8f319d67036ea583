"""Run an exported early-exit network (``eedn export``) with real early exits, without eedn.

This file imports torch (PIL and numpy for image files, onnxruntime for the ONNX format) and nothing from eedn:
``eedn export`` copies it into the export directory as ``runner.py``, so the directory works on its own. The
directory holds one module per segment (``segment_0`` = stem + stage 0 + exit 0's IM and gate score, ..., the
last = last stage + head), one module per exit's decision rule (``rule_l``: the gate's causal rule on the scores
of exits 0..l) and ``decision.json`` (file names and their SHA-256, the preprocessing, the gate's setting).

Loading is safe for the default ``exported-program`` format: every file's SHA-256 is checked against
``decision.json`` before anything is read, each module is a JSON graph of ATen operators (interpreted here; an
operator that returns nothing, writes into an argument or takes a file name is refused) and its weights are a
safetensors file (parsed here, no pickle). Nothing falls back to a loader that can run code. TorchScript can run
code when loaded, so it is loaded only with ``--trust-code``.

Batch compaction is real: after exit ``l`` the rows that leave are written out and only the others go on to
the next segment, as in ``eedn.deploy.inference.EarlyExitEngine``.

    python runner.py EXPORT_DIR IMAGE_OR_FOLDER ...     # image files, preprocessed as decision.json says
    python runner.py EXPORT_DIR images.pt               # a preprocessed [N, C, S, S] tensor (torch.save)
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import operator
import os
import pickle
import re
import struct
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

DECISION_FILE = "decision.json"
#: ``decision.json``'s ``eedn_export`` field: the layout version this runner reads
EXPORT_VERSION = 2
#: the one graph format this runner interprets (``<segment>.graph.json``)
GRAPH_VERSION = 1
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".gif", ".tif", ".tiff", ".webp")
#: ``str`` arguments an operator may take (enum-like modes); any other ``str`` argument (a file name) is refused
STR_ARGUMENTS = frozenset({"approximate", "rounding_mode", "reduce", "padding", "equation", "indexing", "side",
                           "interpolation", "mode"})
#: Python operators torch.export leaves for shape arithmetic and tuple outputs
PY_OPS: dict[str, Callable] = {"getitem": operator.getitem, "add": operator.add, "sub": operator.sub,
                               "mul": operator.mul, "floordiv": operator.floordiv, "neg": operator.neg}
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}
WIDE_INTEGER_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class ExportError(Exception):
    """A bad export directory or input: one line saying what was wrong and what to do."""


# ------------------------------------------------------------------------------------------- integrity
def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _plain_name(name: Any) -> str:
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", "..") \
            or name.startswith("."):
        raise ExportError(f"{DECISION_FILE} names the file {name!r}, which is not a plain file name; re-export")
    return name


def read_decision(root: Path, expect_sha256: str | None = None) -> tuple[dict, dict[str, bytes]]:
    """``decision.json`` and the bytes of every module file it names, each checked against its SHA-256 (and,
    when given, ``decision.json`` itself against ``expect_sha256``). The loaders parse these checked bytes, never
    the files again, so a file swapped after the check is not read."""
    path = root / DECISION_FILE
    if not path.is_file():
        raise ExportError(f"{root} is not an eedn export (no {DECISION_FILE}); give the directory eedn export wrote")
    raw = path.read_bytes()
    if expect_sha256 is not None and hashlib.sha256(raw).hexdigest() != expect_sha256.lower():
        raise ExportError(f"{path} does not have the SHA-256 you expected; do not run this export")
    try:
        spec = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ExportError(f"{path} is not valid JSON ({exc}); re-export the run") from None
    if not isinstance(spec, dict) or spec.get("eedn_export") != EXPORT_VERSION:
        raise ExportError(f"{root} was written by another version of eedn export (this runner reads layout "
                          f"{EXPORT_VERSION}); re-export the run with this eedn")
    files = spec.get("files")
    if not isinstance(files, dict) or not files:
        raise ExportError(f"{path} records no file hashes; re-export the run")
    for name in files:
        file = root / _plain_name(name)
        if not file.is_file() or file.is_symlink():
            raise ExportError(f"export file {file} is missing; re-export the run")
    modules = [*spec.get("segments", []), *spec.get("rules", [])]
    if not modules or not all(isinstance(m, dict) for m in modules):
        raise ExportError(f"{path} lists no modules; re-export the run")
    blobs: dict[str, bytes] = {}
    for name in sorted({n for m in modules for n in m.values()} | {"runner.py"} & set(files)):
        if _plain_name(name) not in files:
            raise ExportError(f"{DECISION_FILE} lists {name} without a SHA-256; re-export the run")
        data = (root / name).read_bytes()
        if hashlib.sha256(data).hexdigest() != files[name]:
            raise ExportError(f"export file {root / name} does not match the SHA-256 in {DECISION_FILE} (changed "
                              "or corrupted after export, or a mix of two exports); re-export the run")
        blobs[name] = data
    return spec, blobs


# ------------------------------------------------------------------------------------ safe loaders
def load_safetensors(path: Path, data: bytes | None = None) -> dict[str, Tensor]:
    """A safetensors file (its checked ``data``, else read from ``path``) as CPU tensors, parsed here: a length, a
    JSON header, raw little-endian bytes."""
    data = path.read_bytes() if data is None else data
    if len(data) < 8:
        raise ExportError(f"{path} is not a safetensors file; re-export the run")
    (size,) = struct.unpack("<Q", data[:8])
    if size > len(data) - 8:
        raise ExportError(f"{path} is not a safetensors file; re-export the run")
    try:
        header = json.loads(data[8 : 8 + size])
    except ValueError:
        raise ExportError(f"{path} has a broken safetensors header; re-export the run") from None
    body = memoryview(data)[8 + size :]
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
            shape = [int(s) for s in entry["shape"]]
            start, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ExportError(f"{path}: tensor {name!r} has a broken header entry; re-export the run") from None
        itemsize = torch.empty((), dtype=dtype).element_size()
        fits = 0 <= start <= end <= len(body) and min(shape, default=0) >= 0
        if not fits or end - start != math.prod(shape) * itemsize:
            raise ExportError(f"{path}: tensor {name!r} lies outside the file; re-export the run")
        raw = bytearray(body[start:end])
        flat = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        tensors[name] = flat.reshape(shape)
    return tensors


def check_operator(op: Any, name: str) -> None:
    """Refuse an operator that can act outside its tensors: one that returns nothing (save, print, warn), writes
    into an argument, or takes a ``str`` argument other than a mode (a file name: ``from_file``)."""
    schema = op._schema
    if not schema.returns:
        raise ExportError(f"operator {name} returns nothing (a side effect); refusing to run this export")
    for arg in schema.arguments:
        if arg.alias_info is not None and arg.alias_info.is_write:
            raise ExportError(f"operator {name} writes into its argument {arg.name}; refusing to run this export")
        if "str" in str(arg.type) and arg.name not in STR_ARGUMENTS:
            raise ExportError(f"operator {name} takes a string argument {arg.name!r}; refusing to run this export")


def resolve_operator(target: str) -> Callable:
    """``aten::name.overload`` as ``torch.ops.aten.name.overload`` after :func:`check_operator`; ``py::getitem``
    and the other :data:`PY_OPS` as Python's operators. Nothing else resolves."""
    space, _, rest = target.partition("::")
    if space == "py" and rest in PY_OPS:
        return PY_OPS[rest]
    name, _, overload = rest.partition(".")
    if space != "aten" or not _NAME.match(name) or not _NAME.match(overload or "default"):
        raise ExportError(f"the graph calls {target!r}, which is not an ATen operator; refusing to run this export")
    try:
        op = getattr(getattr(torch.ops.aten, name), overload or "default")
    except (AttributeError, RuntimeError):
        raise ExportError(f"this torch has no operator {target}; use the torch version that exported it") from None
    check_operator(op, target)
    return op


def _decode(value: Any, env: dict[str, Any]) -> Any:
    """A graph argument: JSON literals and lists as themselves, ``{"node": n}`` as node ``n``'s value, and the
    tagged torch constants (dtype, device, layout, memory format, non-finite float)."""
    if isinstance(value, list):
        return [_decode(v, env) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) != 1:
        raise ExportError(f"graph argument {value!r} is not one tagged value; re-export the run")
    (tag, raw), = value.items()
    if tag == "node":
        if raw not in env:
            raise ExportError(f"graph argument names {raw!r} before it is computed; re-export the run")
        return env[raw]
    if tag == "tuple":
        return tuple(_decode(v, env) for v in raw)
    if tag == "float" and raw in ("inf", "-inf", "nan"):
        return float(raw)
    if tag == "device" and raw in ("cpu", "cuda", "meta"):
        return torch.device("cpu")  # the runner computes on the CPU
    if tag in ("dtype", "layout", "memory_format") and isinstance(raw, str) and _NAME.match(raw):
        constant = getattr(torch, raw, None)
        if isinstance(constant, (torch.dtype, torch.layout, torch.memory_format)):
            return constant
    raise ExportError(f"graph argument {value!r} is not a value this runner knows; re-export the run")


class GraphModule:
    """One exported module: a JSON list of ATen calls over named values, run by a small interpreter."""

    def __init__(self, graph_path: Path, weights_path: Path, graph_data: bytes, weights_data: bytes):
        try:
            graph = json.loads(graph_data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ExportError(f"{graph_path} is not valid JSON ({exc}); re-export the run") from None
        if not isinstance(graph, dict) or graph.get("version") != GRAPH_VERSION:
            raise ExportError(f"{graph_path} is not a graph this runner reads (version {GRAPH_VERSION}); re-export")
        weights = load_safetensors(weights_path, weights_data)
        try:
            self.inputs: list[str] = [str(i) for i in graph["inputs"]]
            self.weights = {str(k): weights[str(k)] for k in graph["weights"]}
            self.nodes = [(str(n["name"]), resolve_operator(str(n["op"])), n.get("args", []), n.get("kwargs", {}))
                          for n in graph["nodes"]]
            self.output = graph["output"]
        except (KeyError, TypeError) as exc:
            raise ExportError(f"{graph_path} is not a complete graph (missing {exc}); re-export the run") from None
        if set(weights) != set(self.weights):
            raise ExportError(f"{weights_path} holds other tensors than {graph_path.name} reads; re-export the run")

    def __call__(self, *args: Tensor) -> Any:
        if len(args) != len(self.inputs):
            raise ExportError(f"the module takes {len(self.inputs)} inputs, got {len(args)}")
        env: dict[str, Any] = dict(self.weights)
        env.update(zip(self.inputs, args))
        for name, op, raw_args, raw_kwargs in self.nodes:
            env[name] = op(*_decode(raw_args, env), **{k: _decode(v, env) for k, v in raw_kwargs.items()})
        return _decode(self.output, env)


def _exported_program(root: Path, files: dict, blobs: dict[str, bytes], trust_code: bool) -> Callable:
    return GraphModule(root / files["graph"], root / files["weights"], blobs[files["graph"]], blobs[files["weights"]])


def _torchscript(root: Path, files: dict, blobs: dict[str, bytes], trust_code: bool) -> Callable:
    if not trust_code:
        raise ExportError("this export is TorchScript, which can run code when loaded; run it only if you trust the "
                          "directory like code (--trust-code), or re-export with the default format")
    import io

    return torch.jit.load(io.BytesIO(blobs[files["module"]]), map_location="cpu")


def _onnx(root: Path, files: dict, blobs: dict[str, bytes], trust_code: bool) -> Callable:
    try:
        import numpy as np
        import onnxruntime
    except ImportError:
        raise ExportError("this export is ONNX: pip install onnxruntime numpy") from None
    session = onnxruntime.InferenceSession(blobs[files["module"]], providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name

    def run(x: Tensor):
        outputs = [torch.from_numpy(np.asarray(o)) for o in session.run(None, {input_name: x.numpy()})]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    return run


LOADERS: dict[str, Callable[[Path, dict, dict[str, bytes], bool], Callable]] = {
    "exported-program": _exported_program, "torchscript": _torchscript, "onnx": _onnx}


# ------------------------------------------------------------------------------------- preprocessing
def to_eight_bit(image: Any) -> Any:
    """A 16-bit (or 32-bit integer) grayscale image as 8-bit ``L``, scaled by its type's range; others as given."""
    if image.mode not in WIDE_INTEGER_MODES:
        return image
    import numpy as np
    from PIL import Image

    values = np.asarray(image, dtype=np.float64)
    top = 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) <= 65535 else float(2**31 - 1)
    scaled = np.clip(np.rint(values / top * 255.0), 0, 255).astype(np.uint8)
    return Image.fromarray(scaled, mode="L")


def preprocess_image(image: Any, channels: int, size: int, mean: Sequence[float] | None,
                     std: Sequence[float] | None) -> Tensor:
    """PIL image -> ``[C, S, S]`` like the dataset's evaluation split: grayscale/RGB, centre-cropped to a square,
    resized to S with bilinear interpolation (anti-aliased when shrinking), scaled to ``[0, 1]``, normalised with
    the recorded mean/std (none recorded: no normalisation). ``eedn predict`` uses this same function."""
    import numpy as np

    image = to_eight_bit(image).convert("L" if channels == 1 else "RGB")  # 16-bit PNGs scaled, never clipped
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
        x = (x - torch.tensor(mean).view(-1, 1, 1)) / torch.tensor(std).view(-1, 1, 1)
    return x


def find_images(paths: Sequence[str | os.PathLike]) -> list[Path]:
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
            raise ExportError(f"input {raw} does not exist; give image files or folders of images")
    if not found:
        raise ExportError(f"no images found in {', '.join(map(str, paths))} (looked for {', '.join(IMAGE_EXTENSIONS)})")
    return found


# ------------------------------------------------------------------------------------------ the runner
class ExportedEarlyExit:
    """The exported segments and rules of one run, chained with batch compaction. Every file is checked against
    ``decision.json``'s SHA-256 before anything is loaded; pin ``decision.json`` itself with ``expect_sha256``."""

    def __init__(self, export_dir: str | os.PathLike, expect_sha256: str | None = None, trust_code: bool = False):
        root = Path(export_dir)
        self.spec, blobs = read_decision(root, expect_sha256)
        load = LOADERS.get(self.spec.get("format"))  # type: ignore[arg-type]
        if load is None:
            raise ExportError(f"unknown export format {self.spec.get('format')!r}; re-export the run")
        try:
            self.segments = [load(root, files, blobs, trust_code) for files in self.spec["segments"]]
            self.rules = [load(root, files, blobs, trust_code) for files in self.spec["rules"]]
        except KeyError as exc:
            raise ExportError(f"{DECISION_FILE} names a module without its {exc} file; re-export the run") from None
        self.preprocess_spec = self.spec["preprocess"]
        self.class_names = [str(c) for c in self.spec.get("class_names") or []]

    def preprocess(self, image: Any) -> Tensor:
        """A PIL image as the model's input row (``decision.json``'s ``preprocess``)."""
        p = self.preprocess_spec
        return preprocess_image(image, int(p["channels"]), int(p["image_size"]), p.get("mean"), p.get("std"))

    def read_images(self, files: Sequence[Path]) -> Tensor:
        from PIL import Image, UnidentifiedImageError

        rows = []
        for path in files:
            try:
                with Image.open(path) as image:
                    rows.append(self.preprocess(image))
            except Image.DecompressionBombError:
                raise ExportError(f"image {path} is too large to decode safely; resize it or remove it") from None
            except (UnidentifiedImageError, OSError, ValueError) as exc:
                raise ExportError(f"cannot read image {path}: {exc}") from None
        return torch.stack(rows)

    def check_input(self, x: Any) -> Tensor:
        p = self.preprocess_spec
        want = (int(p["channels"]), int(p["image_size"]), int(p["image_size"]))
        if not isinstance(x, Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != want or x.shape[0] < 1:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ExportError(f"inputs must be a [N, {want[0]}, {want[1]}, {want[2]}] tensor, got {got}; give image "
                              "files or preprocess as decision.json's 'preprocess' says")
        if not x.is_floating_point():
            raise ExportError(f"inputs must be a float tensor, got {x.dtype}")
        return x.float()

    @torch.inference_mode()
    def __call__(self, x: Tensor) -> dict[str, Tensor]:
        """``predictions``, ``exit_index``, ``confidences`` and ``logits`` (of the exit each row left at)."""
        x = self.check_input(x)
        n = x.shape[0]
        last = len(self.segments) - 1
        exit_index = torch.full((n,), last, dtype=torch.long)
        out_logits = torch.zeros(n, self.spec["num_classes"])
        rows = torch.arange(n)
        state = x
        prefix = torch.zeros(n, 0)
        for l, segment in enumerate(self.segments):
            if l == last:
                out_logits[rows] = segment(state)
                break
            state, logits, score = segment(state)
            prefix = torch.cat([prefix, score.reshape(-1, 1).to(prefix.dtype)], dim=1)
            leave = self.rules[l](prefix).bool()
            out_logits[rows[leave]] = logits[leave].to(out_logits.dtype)
            exit_index[rows[leave]] = l
            kept = (~leave).nonzero().squeeze(1)
            if kept.numel() == 0:
                break
            rows, state, prefix = rows[kept], state[kept], prefix[kept]
        return {"predictions": out_logits.argmax(-1), "exit_index": exit_index, "logits": out_logits,
                "confidences": out_logits.softmax(-1).amax(-1)}

    def classify(self, inputs: Sequence[str | os.PathLike], batch_size: int = 64) -> list[dict]:
        """One row per image file (or per row of one ``.pt`` tensor file): ``file``, ``class_index``, ``class``,
        ``confidence``, ``exit``."""
        if len(inputs) == 1 and str(inputs[0]).endswith(".pt") and Path(inputs[0]).is_file():
            try:
                x = torch.load(inputs[0], map_location="cpu", weights_only=True)
            except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError) as exc:  # safe unpickler
                raise ExportError(f"cannot read {inputs[0]} as a tensor file ({type(exc).__name__}); save a tensor "
                                  "with torch.save or give image files") from None
            names = [f"{inputs[0]}[{i}]" for i in range(len(x))] if isinstance(x, Tensor) and x.dim() else []
            batches = [(names, x)]
        else:
            files = find_images(inputs)
            batches = [([str(f) for f in files[i : i + batch_size]], None) for i in range(0, len(files), batch_size)]
        rows = []
        for names, x in batches:
            out = self(self.read_images([Path(n) for n in names]) if x is None else x)
            for i, name in enumerate(names):
                c = int(out["predictions"][i])
                rows.append({"file": name, "class_index": c,
                             "class": self.class_names[c] if c < len(self.class_names) else str(c),
                             "confidence": float(out["confidences"][i]), "exit": int(out["exit_index"][i])})
        return rows


def write_rows(rows: list[dict], fmt: str, stream: Any = None) -> None:
    """``text`` (tab-separated), ``json`` (a list of objects) or ``csv`` (with a header) on ``stream``."""
    stream = stream or sys.stdout
    if fmt == "json":
        json.dump(rows, stream, indent=1, allow_nan=False)
        stream.write("\n")
    elif fmt == "csv":
        writer = csv.DictWriter(stream, fieldnames=list(rows[0]) if rows else ["file"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    else:
        for r in rows:
            stream.write(f"{r['file']}\tclass {r['class_index']} ({r['class']})\texit {r['exit']}\t"
                         f"confidence {r['confidence']:.4f}\n")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="runner.py", description="Classify images with an eedn export.")
    parser.add_argument("export_dir", help="the directory eedn export wrote")
    parser.add_argument("inputs", nargs="+", help="image files or folders, or one preprocessed IMAGES.pt tensor")
    parser.add_argument("--format", choices=["text", "json", "csv"], default="text", help="output format")
    parser.add_argument("--batch-size", type=int, default=64, help="images per call")
    parser.add_argument("--expect-sha256", help="refuse unless decision.json has this SHA-256 (eedn export prints it)")
    parser.add_argument("--trust-code", action="store_true",
                        help="allow TorchScript exports, which can run code when loaded")
    args = parser.parse_args(argv)
    try:
        if args.batch_size < 1:
            raise ExportError(f"--batch-size must be at least 1, got {args.batch_size}")
        runner = ExportedEarlyExit(args.export_dir, args.expect_sha256, args.trust_code)
        rows = runner.classify(args.inputs, args.batch_size)
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
        print(f"error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} (is this an eedn "
              "export and are these its inputs?)", file=sys.stderr)
        return 1
    write_rows(rows, args.format)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
