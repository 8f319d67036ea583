"""``eedn export``: a trained early-exit network as one module per segment, for use without eedn.

Segment ``l < G`` maps its input (images for ``l = 0``, else the backbone state) to ``(state, logits, score)``:
stage ``l`` (after the stem for ``l = 0``), exit ``l``'s IM logits and its gate score. The last segment maps
the state to the backbone head's logits. Rule ``l`` is the gate's causal rule ``exits_at`` on the scores
``[b, l + 1]`` of exits ``0..l`` (docs/method.md: a decision reads only its prefix), so every gate exports
without the runtime knowing any gate. ``decision.json`` names the files with their SHA-256 and records the
preprocessing and the gate's setting; ``runner.py`` (a copy of :mod:`eedn.deploy.export_runtime`) checks the
hashes, loads the modules with safe loaders only and chains them with batch compaction.

The default format, ``exported-program``, is ``torch.export``'s ATen graph written as data: a JSON list of
operator calls plus a safetensors file of weights. ``torch.export.save``'s own archive is not used because
``torch.export.load`` unpickles (and falls back to unsafe unpickling) and parses symbolic shapes with
``sympy.sympify``, which evaluates strings: loading it can run code.

Each segment holds only the weights it uses: the model is not a registered submodule, so tracing and
``torch.export`` capture exactly the tensors a segment reads. The export is written into a temporary sibling of
``--out`` and published with one rename (an atomic exchange when an earlier export is replaced).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import io
import json
import math
import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from eedn.core.contracts import Gate
from eedn.core.model import EarlyExitModel
from eedn.deploy.export_runtime import (
    DECISION_FILE,
    EXPORT_VERSION,
    GRAPH_VERSION,
    PY_OPS,
    ExportError,
    resolve_operator,
    sha256_file,
)
from eedn.runtime.errors import EednError
from eedn.runtime.io import clean_stale_temps, current_umask, fault_point, temp_prefix

#: format -> how its module files end; ``exported-program`` (the default) writes a graph and a weights file
FORMATS = {"exported-program": ".graph.json", "torchscript": ".pt", "onnx": ".onnx"}
DEFAULT_FORMAT = "exported-program"
#: example batch the segments are traced with; the batch dimension stays dynamic
EXAMPLE_BATCH = 2
#: checks torch.export leaves in a graph; they compute nothing the runner needs
_ASSERTIONS = {"_assert_tensor_metadata", "_assert_scalar", "_assert_async", "sym_constrain_range",
               "sym_constrain_range_for_size"}


class Segment(nn.Module):
    """Exit ``index``'s part of the network (see the module docstring)."""

    net: EarlyExitModel

    def __init__(self, model: EarlyExitModel, index: int):
        super().__init__()
        object.__setattr__(self, "net", model)  # not registered: only the weights used are captured
        self.index = index

    def forward(self, x: Tensor):
        bb = self.net.backbone
        state = bb.stage(self.index, bb.stem(x) if self.index == 0 else x)
        feats = bb.exit_features(self.index, state)
        logits = self.net.exit_logits(self.index, feats)
        if self.index == bb.num_stages - 1:
            return logits
        return state, logits, self.net.gate.scores(self.index, logits, feats)


class Rule(nn.Module):
    """The gate's decision at exit ``prefix.shape[1] - 1``, as a bool ``[b]``."""

    gate: Gate

    def __init__(self, model: EarlyExitModel):
        super().__init__()
        object.__setattr__(self, "gate", model.gate)

    def forward(self, prefix: Tensor) -> Tensor:
        return self.gate.exits_at(prefix)


# ------------------------------------------------------------------------------- graph as plain data
def _encode(value: Any) -> Any:
    """A graph argument as JSON (the runner's ``_decode`` is the inverse)."""
    if isinstance(value, torch.fx.Node):
        return {"node": value.name}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"float": str(value)}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"device": value.type}
    if isinstance(value, torch.layout):
        return {"layout": str(value).removeprefix("torch.")}
    if isinstance(value, torch.memory_format):
        return {"memory_format": str(value).removeprefix("torch.")}
    raise EednError(f"the exported graph holds a {type(value).__name__} argument, which the exported-program "
                    "format cannot store; try --format onnx")


def _target(node: torch.fx.Node) -> str | None:
    """The runner's name for ``node``'s operator; None for an assertion that is dropped."""
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        if target.namespace == "aten" and target._opname in _ASSERTIONS and not node.users:
            return None
        return f"{target.namespace}::{target._opname}.{target._overloadname}"
    for name, fn in PY_OPS.items():
        if target is fn:
            return f"py::{name}"
    raise EednError(f"the exported graph calls {target}, which the exported-program format cannot store; "
                    "try --format onnx")


def program_to_data(program: torch.export.ExportedProgram) -> tuple[dict, dict[str, Tensor]]:
    """``program``'s graph as JSON-ready data and its weights by placeholder name. Checked here with the runner's
    own operator rules, so an export that the runner would refuse is never written."""
    from torch.export.graph_signature import InputKind, OutputKind

    program = program.run_decompositions({})  # functional ATen; grad-mode wrappers inlined
    signature = program.graph_signature
    if any(spec.kind != OutputKind.USER_OUTPUT for spec in signature.output_specs):
        raise EednError("the exported graph mutates its buffers; export needs an inference-only forward")
    inputs, weights = [], {}
    for spec in signature.input_specs:
        if spec.kind == InputKind.USER_INPUT:
            inputs.append(spec.arg.name)
        elif spec.kind in (InputKind.PARAMETER, InputKind.BUFFER):
            weights[spec.arg.name] = program.state_dict[spec.target]
        elif spec.kind == InputKind.CONSTANT_TENSOR:
            weights[spec.arg.name] = program.constants[spec.target]
        else:
            raise EednError(f"the exported graph takes a {spec.kind.name} input, which the exported-program format "
                            "cannot store; try --format onnx")
    nodes, output = [], None
    for node in program.graph.nodes:
        if node.op == "call_function":
            target = _target(node)
            if target is None:
                continue
            try:
                resolve_operator(target)
            except ExportError as exc:
                raise EednError(str(exc).replace("refusing to run this export", "the runner would refuse it")) from None
            nodes.append({"name": node.name, "op": target, "args": _encode(node.args),
                          "kwargs": {k: _encode(v) for k, v in node.kwargs.items()}})
        elif node.op == "output":
            output = node.args[0]
        elif node.op != "placeholder":
            raise EednError(f"the exported graph has a {node.op} node, which the exported-program format cannot "
                            "store; try --format onnx")
    if output is None:
        raise EednError("the exported graph has no output")
    outs = list(output) if isinstance(output, (list, tuple)) else [output]
    encoded = {"node": outs[0].name} if len(outs) == 1 else {"tuple": [_encode(o) for o in outs]}
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in weights.items()}
    return {"version": GRAPH_VERSION, "inputs": inputs, "weights": sorted(tensors), "nodes": nodes,
            "output": encoded}, tensors


def _save(module: nn.Module, example: Tensor, root: Path, stem: str, fmt: str,
          names: tuple[list[str], list[str]]) -> dict[str, str]:
    """Write ``module`` as ``stem`` + the format's files under ``root``; returns the runner's file names."""
    inputs, outputs = names
    batch = torch.export.Dim("batch", min=1)
    if fmt == "exported-program":
        from safetensors.torch import save_file

        program = torch.export.export(module, (example,), dynamic_shapes=({0: batch},), strict=False)
        graph, tensors = program_to_data(program)
        files = {"graph": f"{stem}.graph.json", "weights": f"{stem}.safetensors"}
        (root / files["graph"]).write_text(json.dumps(graph, allow_nan=False))
        save_file(tensors, str(root / files["weights"]))
        return files
    path = root / f"{stem}{FORMATS[fmt]}"
    if fmt == "torchscript":
        traced = torch.jit.trace(module, example, check_trace=False)
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer)
        path.write_bytes(_without_debug_info(buffer.getvalue()))
    else:
        torch.onnx.export(module, (example,), str(path), input_names=inputs, output_names=outputs,
                          dynamic_shapes=({0: batch},), dynamo=True, verbose=False,
                          external_data=False)  # one file per segment (fine below ONNX's 2 GB limit)
    return {"module": path.name}


def _without_debug_info(archive: bytes) -> bytes:
    """A TorchScript archive without its ``.debug_pkl`` entries: they hold the exporting machine's source paths and
    are optional for loading (same outputs, checked in tests/test_export.py)."""
    source = zipfile.ZipFile(io.BytesIO(archive))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as target:
        for info in source.infolist():
            if not info.filename.endswith(".debug_pkl"):
                target.writestr(info, source.read(info.filename))
    return out.getvalue()


# ------------------------------------------------------------------------------- the target folder
def is_export(path: Path) -> bool:
    """Whether ``path`` holds an eedn export (any layout version): a ``decision.json`` naming segments."""
    try:
        spec = json.loads((path / DECISION_FILE).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(spec, dict) and "format" in spec and "segments" in spec


def check_target(out: Path) -> None:
    """Refuse an ``--out`` that is a file or link, or a non-empty folder that is not an eedn export."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise EednError(f"--out {out} is a file or a link; give a new directory, an empty one or an earlier export")
    if out.is_dir() and any(out.iterdir()) and not is_export(out):
        raise EednError(f"--out {out} is not empty and is not an eedn export; give a new or empty directory "
                        "(nothing was written)")


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where that is unavailable."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def publish(tmp: Path, out: Path) -> None:
    """Move the finished export ``tmp`` to ``out`` with one rename: onto a missing or empty ``out`` a plain
    rename, onto an earlier export an atomic exchange (then the old one is deleted). Without an exchange (not
    Linux) the old export is first renamed aside, so a kill in between leaves no export, never a mixed one."""
    check_target(out)  # again: it may have changed while the segments were written
    try:
        os.rename(tmp, out)  # missing or empty target
        return
    except OSError:
        if not out.is_dir():
            raise
    if _exchange(tmp, out):
        shutil.rmtree(tmp, ignore_errors=True)  # now the old export
        return
    aside = Path(tempfile.mkdtemp(prefix=temp_prefix(out.name), suffix=".tmpdir", dir=out.parent))
    os.rename(out, aside / "old")
    os.rename(tmp, out)
    shutil.rmtree(aside, ignore_errors=True)


# ------------------------------------------------------------------------------------------ export
def preprocess_spec(input_spec: dict) -> dict:
    """What the runner does to an image file (``export_runtime.preprocess_image``), from the run's input spec."""
    channels = int(input_spec["channels"])
    return {"channels": channels, "color": "L" if channels == 1 else "RGB", "image_size": int(input_spec["image_size"]),
            "crop": "centre square", "resize": "bilinear, anti-aliased when shrinking", "scale": "1/255",
            "mean": input_spec.get("mean"), "std": input_spec.get("std")}


def export_model(model: EarlyExitModel, fmt: str, out: str | Path, input_spec: dict, extra: dict | None = None) -> dict:
    """Write ``model``'s segments, rules, ``decision.json`` and ``runner.py`` to ``out`` (through a temporary
    sibling and one rename); returns the decision spec."""
    if fmt not in FORMATS:
        raise EednError(f"unknown export format '{fmt}'; known: {', '.join(FORMATS)}")
    if model.exit_combiner is not None:
        raise EednError(f"this run's exits are ensembles ({type(model.exit_combiner).__name__}); export supports "
                        "models whose exits read their own IM only")
    if model.gate.reads_history:
        raise EednError("this run's gate reads the earlier exits' history (gate_features=history...); export "
                        "supports gates that read their own exit only: retrain with gate_features=own to export")
    if fmt == "onnx":
        try:
            import onnx  # noqa: F401
            import onnxscript  # noqa: F401
        except ImportError:
            raise EednError("ONNX export needs the onnx package: pip install 'eedn[export]'") from None
    out = Path(out)
    check_target(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_temps(out.parent)
        tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(out.name), suffix=".tmpdir", dir=out.parent))
    except OSError as exc:
        raise EednError(f"cannot write next to --out {out}: {exc.strerror}; choose a writable place") from None
    try:
        decision = _write(model, fmt, tmp, input_spec, extra)
        fault_point("export-before-publish")
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700
        publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return decision


def _write(model: EarlyExitModel, fmt: str, root: Path, input_spec: dict, extra: dict | None) -> dict:
    model = model.eval().requires_grad_(False)  # weights become constants of the exported graphs
    bb = model.backbone
    spec_in = bb.input_spec
    example: Tensor = torch.randn(EXAMPLE_BATCH, spec_in.channels, spec_in.image_size, spec_in.image_size,
                                  generator=torch.Generator().manual_seed(0))
    segments, rules = [], []
    g = bb.num_stages - 1
    with torch.no_grad():
        for l in range(bb.num_stages):
            segment = Segment(model, l).eval()
            last = l == g
            segments.append(_save(segment, example, root, f"segment_{l}", fmt,
                                  (["input"], ["logits"] if last else ["state", "logits", "score"])))
            fault_point("export-segment")
            if last:
                break
            state, _, score = segment(example)
            if not isinstance(state, Tensor):
                raise EednError(f"{bb.display_name} passes a tuple between stages; export needs a tensor state")
            prefix = torch.rand(EXAMPLE_BATCH, l + 1, generator=torch.Generator().manual_seed(l))
            prefix[:, -1] = score.float()
            rules.append(_save(Rule(model).eval(), prefix, root, f"rule_{l}", fmt, (["prefix"], ["leave"])))
            example = state
    shutil.copyfile(Path(__file__).with_name("export_runtime.py"), root / "runner.py")
    for path in root.iterdir():
        os.chmod(path, 0o666 & ~current_umask())  # safetensors and mkstemp-like writers leave 0600
    files = {p.name: sha256_file(p) for p in sorted(root.iterdir())}
    decision = {"eedn_export": EXPORT_VERSION, "format": fmt, "segments": segments, "rules": rules,
                "num_exits": bb.num_stages, "num_classes": bb.num_classes, "input": input_spec,
                "preprocess": preprocess_spec(input_spec), "class_names": list(input_spec.get("class_names") or []),
                "gate": {"name": type(model.gate).__name__, **model.gate.describe()}, **(extra or {}),
                "files": files}
    text = json.dumps(decision, indent=1, allow_nan=False, default=_json_default)
    (root / DECISION_FILE).write_text(text)
    return decision


def _json_default(o: Any) -> Any:
    if isinstance(o, Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return o.name
    raise TypeError(f"{type(o).__name__} is not JSON")


def export_run(run_dir: str | Path, fmt: str, out: str | Path) -> dict:
    """Export the reported policy of a finished run directory (``eedn export``)."""
    from eedn.pipeline.rundir import load_model

    model, manifest = load_model(run_dir)
    spec = manifest["model"]
    extra = {"run": Path(run_dir).resolve().name,  # the run's name only: no path of this machine in the export
             "exit_macs": spec.get("exit_macs"), "full_macs": spec.get("full_macs")}
    return export_model(model, fmt, out, manifest["input"], extra)
