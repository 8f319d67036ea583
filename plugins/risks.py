"""Risks for risk-controlled exits (docs/evaluation.md, "Risk-controlled exits"): the loss of leaving at each exit.

Every risk compares an exit with the final exit, so the safe end of any knob (no early exit) has zero risk:

* ``prediction_gap`` — ``1{ŷ_exit ≠ ŷ_final}``: needs no labels, in {0, 1};
* ``accuracy_gap`` — ``1{ŷ_final = y} − 1{ŷ_exit = y}``, in [−1, 1] (an early exit may be right where the final
  one is wrong); ``clip=true`` keeps its positive part ``1{final right, exit wrong}``, in {0, 1}, which bounds it
  from above, so controlling it controls the gap too, with the tighter binomial test;
* ``set_size_gap`` — ``(|C_exit| − |C_final|) / C`` for conformal sets, in [−1, 1];
* ``miscoverage_gap`` — ``1{y ∉ C_exit} − 1{y ∉ C_final}``, in [−1, 1].

The two conformal gaps need an active evaluator that builds per-exit sets (``exit_sets``: the conformal
evaluator); its q̂ per exit is fitted on the val split, at the evaluator's headline α and score.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from eedn.runtime.errors import EednError
from eedn.core.options import option
from eedn.core.outputs import ExitOutputs
from eedn.evaluation.risk import Risk


def _predictions(outputs: ExitOutputs) -> Tensor:
    return outputs.logits.argmax(-1)  # [N, E]


class PredictionGap(Risk):
    """Disagreement with the final exit: how often exiting early changes the answer."""

    name = "prediction_gap"
    lower, upper, binary, needs_labels = 0.0, 1.0, True, False

    @dataclass
    class Options:
        """None: the loss is fixed."""

    options: PredictionGap.Options

    def exit_losses(self, outputs: ExitOutputs) -> Tensor:
        pred = _predictions(outputs)
        return (pred != pred[:, -1:]).double()


class AccuracyGap(Risk):
    """Accuracy lost against the final exit, per sample."""

    name = "accuracy_gap"
    lower, upper = -1.0, 1.0

    @dataclass
    class Options:
        clip: bool = option(False, "keep only the positive part 1{final right, exit wrong} (in {0, 1}; bounds the "
                                   "gap from above and allows the exact binomial test)")

    options: AccuracyGap.Options

    def __init__(self, **options: Any):
        super().__init__(**options)
        if self.options.clip:
            self.lower, self.binary = 0.0, True

    def exit_losses(self, outputs: ExitOutputs) -> Tensor:
        correct = (_predictions(outputs) == outputs.labels[:, None]).double()
        gap = correct[:, -1:] - correct
        return gap.clamp(min=0) if self.options.clip else gap


class _ConformalGap(Risk):
    """Shared by the conformal gaps: per-exit sets from the run's conformal evaluator, fitted on val."""

    lower, upper = -1.0, 1.0

    @dataclass
    class Options:
        """None: α and the score are the conformal evaluator's headline ones."""

    options: _ConformalGap.Options

    def check(self, evaluators: dict) -> None:
        if not any(hasattr(ev, "exit_sets") for ev in evaluators.values()):
            raise EednError(f"risk '{self.name}' needs an active evaluator that builds conformal sets (the conformal "
                            f"evaluator): add it to evaluators (running: {', '.join(evaluators) or 'none'})")

    def fit(self, val: ExitOutputs, evaluators: dict) -> None:
        self.check(evaluators)
        self.builder = next(ev for ev in evaluators.values() if hasattr(ev, "exit_sets"))
        self.val = val

    def sets(self, outputs: ExitOutputs) -> Tensor:
        if not hasattr(self, "builder"):
            raise EednError(f"risk '{self.name}' must be fitted on the val split first")
        return self.builder.exit_sets(self.val, outputs)  # [N, E, C]


class SetSizeGap(_ConformalGap):
    """How much larger an exit's conformal set is than the final exit's, as a share of the classes."""

    name = "set_size_gap"

    def exit_losses(self, outputs: ExitOutputs) -> Tensor:
        size = self.sets(outputs).sum(-1).double()  # [N, E]
        return (size - size[:, -1:]) / outputs.logits.shape[-1]


class MiscoverageGap(_ConformalGap):
    """Whether an exit's conformal set misses the label where the final exit's covers it (or the reverse: -1)."""

    name = "miscoverage_gap"

    def exit_losses(self, outputs: ExitOutputs) -> Tensor:
        sets = self.sets(outputs)
        labels = outputs.labels.long()[:, None, None].expand(-1, sets.shape[1], 1)
        missed = (~sets.gather(-1, labels).squeeze(-1)).double()  # [N, E]
        return missed - missed[:, -1:]
