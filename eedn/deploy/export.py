"""``eedn export``: a trained early-exit network as one module per segment, for use without eedn.

Segment ``l < G`` maps its input (images for ``l = 0``, else the backbone state) to ``(state, logits, score)``:
stage ``l`` (after the stem for ``l = 0``), exit ``l``'s IM logits and its gate score. The last segment maps
the state to the backbone head's logits. Rule ``l`` is the gate's causal rule ``exits_at`` on the scores
``[b, l + 1]`` of exits ``0..l`` (docs/method.md: a decision reads only its prefix), so every gate exports
without the runtime knowing any gate. ``decision.json`` names the files and records the input spec and the
gate's setting; ``runner.py`` (a copy of :mod:`eedn.deploy.export_runtime`) chains them with batch compaction.

Each segment holds only the weights it uses: the model is not a registered submodule, so tracing and
``torch.export`` capture exactly the tensors a segment reads.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
from torch import Tensor, nn

from eedn.runtime.errors import EednError
from eedn.deploy.export_runtime import DECISION_FILE
from eedn.runtime.io import atomic_write_json
from eedn.core.model import EarlyExitModel

FORMATS = {"torchscript": ".pt", "exported-program": ".pt2", "onnx": ".onnx"}
#: example batch the segments are traced with; the batch dimension stays dynamic
EXAMPLE_BATCH = 2


class Segment(nn.Module):
    """Exit ``index``'s part of the network (see the module docstring)."""

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

    def __init__(self, model: EarlyExitModel):
        super().__init__()
        object.__setattr__(self, "gate", model.gate)

    def forward(self, prefix: Tensor) -> Tensor:
        return self.gate.exits_at(prefix)


def _save(module: nn.Module, example: Tensor, path: Path, fmt: str, names: tuple[list[str], list[str]]) -> None:
    inputs, outputs = names
    if fmt == "torchscript":
        traced = torch.jit.trace(module, example, check_trace=False)
        torch.jit.save(traced, str(path))
    elif fmt == "exported-program":
        batch = torch.export.Dim("batch", min=1)
        program = torch.export.export(module, (example,), dynamic_shapes=({0: batch},), strict=False)
        torch.export.save(program, str(path))
    else:
        batch = torch.export.Dim("batch", min=1)
        torch.onnx.export(module, (example,), str(path), input_names=inputs, output_names=outputs,
                          dynamic_shapes=({0: batch},), dynamo=True, verbose=False,
                          external_data=False)  # one file per segment (fine below ONNX's 2 GB limit)


def export_model(model: EarlyExitModel, fmt: str, out: str | Path, input_spec: dict, extra: dict | None = None) -> dict:
    """Write ``model``'s segments, rules, ``decision.json`` and ``runner.py`` under ``out``; returns the
    decision spec."""
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
    out.mkdir(parents=True, exist_ok=True)
    model = model.eval().requires_grad_(False)  # weights become constants of the exported graphs
    bb = model.backbone
    suffix = FORMATS[fmt]
    spec_in = bb.input_spec
    example: Tensor = torch.randn(EXAMPLE_BATCH, spec_in.channels, spec_in.image_size, spec_in.image_size,
                                  generator=torch.Generator().manual_seed(0))
    segments, rules = [], []
    g = bb.num_stages - 1
    with torch.no_grad():
        for l in range(bb.num_stages):
            segment = Segment(model, l).eval()
            name = f"segment_{l}{suffix}"
            last = l == g
            _save(segment, example, out / name, fmt, (["input"], ["logits"] if last else ["state", "logits", "score"]))
            segments.append(name)
            if last:
                break
            state, logits, score = segment(example)
            if not isinstance(state, Tensor):
                raise EednError(f"{bb.display_name} passes a tuple between stages; export needs a tensor state")
            prefix = torch.rand(EXAMPLE_BATCH, l + 1, generator=torch.Generator().manual_seed(l))
            prefix[:, -1] = score.float()
            rule_name = f"rule_{l}{suffix}"
            _save(Rule(model).eval(), prefix, out / rule_name, fmt, (["prefix"], ["leave"]))
            rules.append(rule_name)
            example = state
    decision = {"format": fmt, "segments": segments, "rules": rules, "num_exits": bb.num_stages,
                "num_classes": bb.num_classes, "input": input_spec, "gate": {"name": type(model.gate).__name__,
                                                                             **model.gate.describe()},
                **(extra or {})}
    atomic_write_json(out / DECISION_FILE, decision)
    shutil.copyfile(Path(__file__).with_name("export_runtime.py"), out / "runner.py")
    return decision


def export_run(run_dir: str | Path, fmt: str, out: str | Path) -> dict:
    """Export the reported policy of a finished run directory (``eedn export``)."""
    from eedn.pipeline.rundir import load_model

    model, manifest = load_model(run_dir)
    spec = manifest["model"]
    extra = {"run": str(Path(run_dir).resolve()), "exit_macs": spec.get("exit_macs"),
             "full_macs": spec.get("full_macs")}
    return export_model(model, fmt, out, manifest["input"], extra)
