"""Rule-based exit gates: confidence thresholds (max probability, entropy, margin) and patience.

The threshold gates subclass eedn's public :class:`eedn.ThresholdGate` (budget calibration in
:mod:`eedn.core.budgets`) and only say how confident an IM is. Patience (``patience``) scores exit ``l`` with
IM ``l``'s predicted class and lets a sample leave at exit ``l`` once the predictions of exits
``l-k+1 .. l`` all agree (so never before exit ``k-1``). It is calibrated by choosing ``k``
(``{"k": k}``; ``macs_fraction`` / ``accuracy_drop`` scan ``k = 1..G+1``, where ``k = G+1`` never exits
early).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from eedn.core.budgets import ThresholdGate, check_target, check_val, pick_setting
from eedn.core.contracts import Gate
from eedn.runtime.errors import EednError
from eedn.core.options import option
from eedn.core.outputs import ExitOutputs

# --------------------------------------------------------------------------------------------- scores
def _probabilities(logits: Tensor) -> Tensor:
    return logits.float().softmax(-1)


def max_probability(logits: Tensor) -> Tensor:
    """Max softmax probability ``[B]``."""
    return _probabilities(logits).max(-1).values


def negative_entropy(logits: Tensor) -> Tensor:
    """``-H(p) = Σ p ln p`` ``[B]`` (0·ln 0 = 0); negated so that higher means more confident."""
    p = _probabilities(logits)
    return torch.special.xlogy(p, p).sum(-1)


def top2_margin(logits: Tensor) -> Tensor:
    """``p_(1) - p_(2)`` ``[B]``; 1 when there is a single class."""
    p = _probabilities(logits)
    if p.shape[-1] < 2:
        return torch.ones(p.shape[:-1], dtype=p.dtype, device=p.device)
    top = p.topk(2, dim=-1).values
    return top[..., 0] - top[..., 1]


class MaxProbGate(ThresholdGate):
    """Exit when the max softmax probability clears the exit's threshold (MSDNet / JEI baselines)."""

    score_name = "max_prob"

    def confidence(self, logits: Tensor) -> Tensor:
        return max_probability(logits)


class EntropyGate(ThresholdGate):
    """Exit when the negative entropy ``Σ p ln p`` (higher = more confident) clears the threshold."""

    score_name = "entropy"

    def confidence(self, logits: Tensor) -> Tensor:
        return negative_entropy(logits)


class MarginGate(ThresholdGate):
    """Exit when the top-1 minus top-2 probability clears the threshold."""

    score_name = "margin"

    def confidence(self, logits: Tensor) -> Tensor:
        return top2_margin(logits)


class PatienceGate(Gate):
    """Exit once ``k`` consecutive exits ending here predict the same class (score = predicted class).

    ``k = 1`` exits everyone at exit 0; ``k > G`` never exits early.
    """

    calibratable = True

    @dataclass
    class Options:
        k: int = option(3, "consecutive agreeing exits needed to leave (calibration may choose another)", min=1)

    options: PatienceGate.Options
    k: Tensor  # a registered buffer

    def __init__(self, num_exits: int, num_classes: int, **options: Any):
        super().__init__(num_exits, num_classes, **options)
        self.register_buffer("k", torch.tensor(self.options.k, dtype=torch.long))
        self.setting: dict = {}

    @staticmethod
    def _valid_k(k: Any) -> int:
        """A ``{"k": k}`` calibration target's k."""
        if isinstance(k, bool) or not isinstance(k, (int, float)) or int(k) != k or int(k) < 1:
            raise EednError(f"patience k must be a positive integer, got {k!r}")
        return int(k)

    def scores(self, exit_index: int, logits: Tensor, features: Tensor | None = None) -> Tensor:
        return logits.argmax(-1).float()

    def exits_at(self, prefix: Tensor) -> Tensor:
        k = int(self.k)
        l = prefix.shape[1] - 1
        if l + 1 < k:
            return torch.zeros(prefix.shape[0], dtype=torch.bool, device=prefix.device)
        window = prefix[:, l + 1 - k :]
        return (window == window[:, -1:]).all(1)

    def calibrate(self, val: ExitOutputs, target: dict) -> None:
        check_val(self, val)
        kind = check_target(target, ("k", "macs_fraction", "accuracy_drop"))
        if kind == "k":
            self.k.fill_(self._valid_k(target["k"]))
        else:
            points = []
            for k in range(1, self.num_exits + 2):
                self.k.fill_(k)
                points.append({"k": k, "summary": val.summarize(self.decide(val.gate_scores))})
            pt = pick_setting(points, val, target, kind)
            self.k.fill_(pt["k"])
        summary = val.summarize(self.decide(val.gate_scores))
        self.setting = {"target": dict(target), "val_accuracy": summary["accuracy"],
                        "val_macs_fraction": summary["macs_fraction"]}

    def budget_sweep(self) -> list[dict]:
        return [{"k": k} for k in range(1, self.num_exits + 1)]

    def describe(self) -> dict:
        return {"score": "patience", "k": int(self.k)} | self.setting
