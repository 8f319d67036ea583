"""A third-party eedn gate: leave at the first exit whose top-1 probability is at least ``ratio``
times its top-2 probability. Installed with pip, it shows up in `eedn plugins` and works with
`eedn run --gate top2_ratio`."""
from __future__ import annotations

from torch import Tensor

import eedn


class Top2RatioGate(eedn.Gate):
    """Rule-based, so nothing to train: ``scores`` is p1 / p2 and ``exits_at`` compares the newest
    column with a fixed ratio (option ``ratio``, default 4)."""

    def __init__(self, num_exits: int, num_classes: int, ratio: float = 4.0):
        super().__init__(num_exits, num_classes)
        if ratio < 1:
            raise eedn.EednError(f"top2_ratio: ratio must be >= 1, got {ratio}")
        self.ratio = float(ratio)

    def scores(self, exit_index: int, logits: Tensor, features: Tensor | None = None) -> Tensor:
        top2 = logits.float().softmax(-1).topk(2, dim=-1).values
        return top2[:, 0] / top2[:, 1].clamp_min(1e-12)

    def exits_at(self, prefix: Tensor) -> Tensor:
        return prefix[:, -1] >= self.ratio

    def describe(self) -> dict:
        return {"ratio": self.ratio}


@eedn.hookimpl
def register_gates(register):
    register("top2_ratio", Top2RatioGate, description="exit when p1 >= ratio * p2 (example plugin)")
