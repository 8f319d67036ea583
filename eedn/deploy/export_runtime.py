"""Run an exported early-exit network (``eedn export``) with real early exits, without eedn.

This file imports torch (and onnxruntime for the ONNX format) and nothing from eedn: ``eedn export`` copies it
into the export directory as ``runner.py``, so the directory works on its own. The directory holds one module
per segment (``segment_0`` = stem + stage 0 + exit 0's IM and gate score, ..., the last = last stage + head),
one module per exit's decision rule (``rule_l``: the gate's causal rule on the scores of exits 0..l) and
``decision.json`` (file names, input spec, the gate's setting).

Batch compaction is real: after exit ``l`` the rows that leave are written out and only the others go on to
the next segment, as in ``eedn.deploy.inference.EarlyExitEngine``.

    python runner.py EXPORT_DIR images.pt      # a [N, C, S, S] tensor saved with torch.save, preprocessed
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

DECISION_FILE = "decision.json"


def _torchscript(path: Path) -> Callable:
    module = torch.jit.load(str(path), map_location="cpu")
    return module


def _exported_program(path: Path) -> Callable:
    return torch.export.load(str(path)).module()


def _onnx(path: Path) -> Callable:
    import numpy as np
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name

    def run(x: Tensor):
        outputs = [torch.from_numpy(np.asarray(o)) for o in session.run(None, {input_name: x.numpy()})]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    return run


LOADERS = {"torchscript": _torchscript, "exported-program": _exported_program, "onnx": _onnx}


class ExportedEarlyExit:
    """The exported segments and rules of one run, chained with batch compaction."""

    def __init__(self, export_dir: str | Path):
        root = Path(export_dir)
        self.spec = json.loads((root / DECISION_FILE).read_text())
        load = LOADERS[self.spec["format"]]
        self.segments = [load(root / name) for name in self.spec["segments"]]
        self.rules = [load(root / name) for name in self.spec["rules"]]

    @torch.inference_mode()
    def __call__(self, x: Tensor) -> dict[str, Tensor]:
        """``predictions``, ``exit_index``, ``confidences`` and ``logits`` (of the exit each row left at)."""
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


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python runner.py EXPORT_DIR IMAGES.pt", file=sys.stderr)
        return 2
    runner = ExportedEarlyExit(argv[0])
    images = torch.load(argv[1], map_location="cpu", weights_only=True)
    out = runner(images)
    for i in range(images.shape[0]):
        print(f"{i}\tclass {int(out['predictions'][i])}\texit {int(out['exit_index'][i])}\t"
              f"confidence {float(out['confidences'][i]):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
