"""Risk-controlled exits: pick the most efficient setting of a gate's scalar knob whose risk is certified.

Following *Fast yet Safe: Early-Exiting with Risk Control* (Jazbec, Timans et al., NeurIPS 2024), derived here
from the risk-control literature it builds on (docs/evaluation.md, "Risk-controlled exits"):

* a :class:`Risk` (a plugin kind) gives the loss of every sample at every exit, ``[N, E]``, and declares the range
  ``[lower, upper]`` its losses lie in (the concentration bounds need it);
* a :class:`Knob` turns one scalar into exit decisions. Its grid is fixed on the val split, ordered from the
  safe end (index 0: nobody exits early, the final exit answers) to the most aggressive setting; the knob of a
  threshold gate is one shared threshold (or the MSDNet budget scale), of a probabilistic gate (JEI) an offset
  added to its gate logits, of another calibratable gate its budget sweep;
* a controller (:func:`select`) reads the ``[K, n]`` loss matrix of the cal split only and chooses among the
  certified settings the one with the fewest cal mean MACs (ties: the safer one). When no setting is
  certified the knob stays at index 0 (the final exit) and the selection says so.

Controllers: ``naive`` (empirical risk ≤ ε; no guarantee), ``crc`` (conformal risk control on the monotonised
losses: E[risk] ≤ ε), ``ucb-hb`` / ``ucb-wsr`` (upper confidence bounds scanned from the safe end:
P(risk ≤ ε) ≥ 1 − δ when the risk grows along the knob) and ``ltt`` (Learn-then-Test with fixed-sequence
testing along the knob: P(risk ≤ ε) ≥ 1 − δ without any monotonicity).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, cast

import numpy as np
import torch
from torch import Tensor

from eedn.evaluation import risk_bounds as rb
from eedn.core.contracts import Gate
from eedn.runtime.errors import EednError
from eedn.core.options import declared_options
from eedn.core.outputs import ExitOutputs

CONTROLLERS = ("naive", "crc", "ucb-hb", "ucb-wsr", "ltt")
KNOBS = ("auto", "threshold", "budget", "offset")
GUARANTEES = {
    "naive": "none: the empirical cal risk is at most ε",
    "crc": "E[test risk] <= ε (conformal risk control on monotonised losses)",
    "ucb-hb": "P(risk <= ε) >= 1 - δ if the risk grows along the knob (Hoeffding-Bentkus UCB)",
    "ucb-wsr": "P(risk <= ε) >= 1 - δ if the risk grows along the knob (Waudby-Smith-Ramdas UCB)",
    "ltt": "P(risk <= ε) >= 1 - δ (Learn-then-Test, fixed-sequence testing; no monotonicity needed)",
}
FALLBACK_MESSAGE = "no knob value is certified safe on cal: every sample runs to the final exit"


class Risk(ABC):
    """A per-sample loss of leaving at each exit, with the range it lies in.

    Implement :meth:`exit_losses`; set ``lower``/``upper`` (every loss must lie in that range: the bounds are
    only as valid as this declaration) and ``binary = True`` when losses are 0 or 1 (the exact binomial test
    then applies). :meth:`fit` may read the val split (never cal or test) and the run's evaluators.
    """

    name: str = "risk"
    lower: float = 0.0
    upper: float = 1.0
    binary: bool = False
    needs_labels: bool = True

    def __init__(self, **options: Any):
        #: the risk's declared options, validated (see :mod:`eedn.core.options`)
        self.options = declared_options(f"risk '{self.name}'", type(self), options)

    def check(self, evaluators: dict) -> None:
        """Raise a one-line error before training if the run lacks something the risk needs; default none."""

    def fit(self, val: ExitOutputs, evaluators: dict) -> None:
        """Fit what the loss depends on (e.g. conformal thresholds) on the val split; default none."""

    @abstractmethod
    def exit_losses(self, outputs: ExitOutputs) -> Tensor:
        """``[N, E]`` loss of every sample had it left at exit ``e`` (float, within ``[lower, upper]``)."""

    def describe(self) -> dict:
        return {"name": self.name, "bounds": [self.lower, self.upper], "binary": self.binary,
                "needs_labels": self.needs_labels, "options": self.options.as_dict()}


# --------------------------------------------------------------------------------------------------- knobs
@dataclass
class Knob:
    """A gate's scalar knob over a fixed grid: ``values[0]`` is the safe end (no early exit)."""

    name: str
    values: list[float | None]
    decide: Callable[[ExitOutputs], Tensor]  # [K-1, N] exit indices of values[1:]

    def exits(self, outputs: ExitOutputs) -> Tensor:
        """``[K, N]`` exit index of every sample under every knob value."""
        final = torch.full((1, outputs.num_samples), outputs.num_exits - 1, dtype=torch.long)
        if len(self.values) == 1:
            return final
        return torch.cat([final, self.decide(outputs).long().cpu()])

    def label(self, index: int) -> str:
        value = self.values[index]
        return "no early exit" if value is None else f"{self.name}={value:.6g}"


def _quantiles(values: Tensor, count: int) -> list[float]:
    """``count`` evenly spaced quantiles (max to min) of every value (numpy: no size limit, unlike torch)."""
    return np.quantile(values.double().cpu().numpy().ravel(), np.linspace(1.0, 0.0, count)).tolist()


def _threshold_knob(gate: Gate, val: ExitOutputs, grid_size: int) -> Knob:
    """One threshold shared by every intermediate exit, on quantiles of the val scores (high to low)."""
    from eedn.core.budgets import first_exits_many

    taus = sorted(set(_quantiles(val.gate_scores, grid_size)), reverse=True)

    def decide(outputs: ExitOutputs) -> Tensor:
        th = torch.tensor(taus, dtype=torch.float64)[:, None].expand(len(taus), gate.num_exits)
        return first_exits_many(outputs.gate_scores, th)

    return Knob("threshold", [None, *taus], decide)


def _budget_knob(gate: Gate, val: ExitOutputs, grid_size: int) -> Knob:
    """The gate's own budget sweep (MSDNet geometric p for thresholds, k for patience), calibrated on val and
    ordered from the most to the fewest val mean MACs."""
    from eedn.evaluation.policy import calibrated_copy

    targets = gate.budget_sweep()
    if not targets:
        raise EednError(f"gate {type(gate).__name__} has no budget sweep to use as a knob; pick another knob")
    gates = [calibrated_copy(gate, val, t) for t in targets]
    macs = [val.summarize(g.decide(val.gate_scores))["mean_macs"] for g in gates]
    order = sorted(range(len(gates)), key=lambda i: -macs[i])  # stable: ties keep the sweep's order
    key = next(iter(targets[0]))
    values = [float(targets[i][key]) for i in order]

    def decide(outputs: ExitOutputs) -> Tensor:
        return torch.stack([gates[i].decide(outputs.gate_scores) for i in order])

    return Knob(f"budget_{key}", [None, *values], decide)


def _gate_logits(scores: Tensor) -> Tensor:
    g = scores.double().clamp(1e-12, 1 - 1e-12)
    return torch.log(g) - torch.log1p(-g)


def _offset_knob(gate: Gate, val: ExitOutputs, grid_size: int) -> Knob:
    """A scalar ``b`` added to the logit of every gate score ``g`` of a probabilistic gate (JEI):
    ``g' = σ(logit(g) + b)``; larger b exits more. The grid is minus the quantiles of the val gate logits (from
    the highest down), so ``logit(g) + b`` crosses 0 for a steady share of val samples from one value to the next."""
    offsets = sorted({-q for q in _quantiles(_gate_logits(val.gate_scores), grid_size)})

    def decide(outputs: ExitOutputs) -> Tensor:
        logit = _gate_logits(outputs.gate_scores)
        return torch.stack([gate.decide(torch.sigmoid(logit + b).to(outputs.gate_scores.dtype)) for b in offsets])

    return Knob("offset", [None, *offsets], decide)


def build_knob(gate: Gate, val: ExitOutputs, kind: str = "auto", grid_size: int = 100) -> Knob:
    """The knob of ``gate`` with its grid fixed on ``val``. ``auto``: a shared threshold for threshold gates, a
    logit offset for probabilistic gates, the budget sweep for other calibratable gates."""
    from eedn.core.budgets import ThresholdGate

    if kind not in KNOBS:
        raise EednError(f"unknown risk-control knob '{kind}'; use one of: {', '.join(KNOBS)}")
    if grid_size < 2:
        raise EednError(f"risk_control.grid_size must be at least 2, got {grid_size}")
    if val.num_samples == 0:
        raise EednError("risk control needs a non-empty val split to fix its knob grid")
    probabilistic = gate.exit_probabilities(val.gate_scores[:1]) is not None
    if kind == "auto":
        kind = ("threshold" if isinstance(gate, ThresholdGate) else "offset" if probabilistic
                else "budget" if gate.calibratable else "")
        if not kind:
            raise EednError(f"gate {type(gate).__name__} has no scalar knob for risk control: use a threshold, "
                            "patience or probabilistic (JEI) gate")
    if kind == "threshold" and not isinstance(gate, ThresholdGate):
        raise EednError(f"knob 'threshold' needs a confidence-threshold gate, not {type(gate).__name__}; "
                        "use knob=auto")
    if kind == "offset" and not probabilistic:
        raise EednError(f"knob 'offset' needs a probabilistic gate (JEI), not {type(gate).__name__}; use knob=auto")
    if kind == "budget" and not gate.calibratable:
        raise EednError(f"knob 'budget' needs a calibratable gate, not {type(gate).__name__}; use knob=auto")
    if gate.num_exits == 0:
        return Knob(kind, [None], lambda outputs: torch.zeros(0, outputs.num_samples, dtype=torch.long))
    return {"threshold": _threshold_knob, "budget": _budget_knob, "offset": _offset_knob}[kind](gate, val, grid_size)


def loss_matrix(exit_losses: Tensor, exits: Tensor) -> np.ndarray:
    """``[K, N]`` loss of every sample under every knob value, from ``[N, E]`` per-exit losses."""
    rows = torch.arange(exit_losses.shape[0])
    return exit_losses.double().cpu()[rows[None, :], exits].numpy()


def mean_macs(exits: Tensor, exit_macs: Tensor) -> np.ndarray:
    """``[K]`` mean MACs of every knob value."""
    return exit_macs.double().cpu()[exits].mean(1).numpy() if exits.shape[1] else np.zeros(exits.shape[0])


# ---------------------------------------------------------------------------------------------- controllers
@dataclass
class Selection:
    """What a controller chose: the knob index, whether any setting was certified, and the bound behind it."""

    controller: str
    index: int
    certified: bool
    bound: float | None
    bound_name: str
    cal_risk: float
    num_certified: int
    message: str = ""
    certified_mask: list[bool] = field(default_factory=list, repr=False)

    @property
    def fallback(self) -> bool:
        return not self.certified

    def to_dict(self) -> dict:
        return {"controller": self.controller, "index": self.index, "certified": self.certified,
                "fallback": self.fallback, "bound": self.bound, "bound_name": self.bound_name,
                "cal_risk": self.cal_risk, "num_certified": self.num_certified, "message": self.message,
                "guarantee": GUARANTEES[self.controller]}


def _prefix(ok: np.ndarray) -> np.ndarray:
    """Fixed-sequence testing: only the run of passes from the safe end counts."""
    return np.cumprod(ok.astype(bool)).astype(bool)


def check_levels(epsilon: float, delta: float, lower: float, upper: float) -> None:
    if not lower < epsilon < upper:
        raise EednError(f"epsilon must lie strictly inside the risk's range ({lower:g}, {upper:g}), got {epsilon}")
    if not 0 < delta < 1:
        raise EednError(f"delta must lie strictly between 0 and 1, got {delta}")


def certify(controller: str, losses: np.ndarray, epsilon: float, delta: float, lower: float, upper: float,
            binary: bool) -> tuple[np.ndarray, np.ndarray, str]:
    """``(certified [K], statistic [K], statistic name)`` for one controller on a ``[K, n]`` cal loss matrix.
    The statistic is what each setting is judged by (empirical risk, CRC-adjusted risk, p-value, or whether the
    WSR capital passed 1/δ)."""
    if controller not in CONTROLLERS:
        raise EednError(f"unknown risk controller '{controller}'; use one of: {', '.join(CONTROLLERS)}")
    check_levels(epsilon, delta, lower, upper)
    k, n = losses.shape
    if n == 0:
        raise EednError("risk control needs a non-empty cal split")
    if losses.min() < lower - 1e-9 or losses.max() > upper + 1e-9:
        raise EednError(f"a loss lies outside the risk's declared range [{lower:g}, {upper:g}]: fix the risk")
    means = losses.mean(1)
    if controller == "naive":
        return means <= epsilon, means, "empirical cal risk"
    if controller == "crc":
        # CRC needs losses that fall along λ; monotonise from the safe end (sup over safer settings) so it holds
        adjusted = n / (n + 1) * np.maximum.accumulate(losses, axis=0).mean(1) + upper / (n + 1)
        return _prefix(adjusted <= epsilon), adjusted, "CRC-adjusted cal risk"
    unit = cast(np.ndarray, rb.rescale(losses, lower, upper))  # an array in, an array out
    unit_eps = float(rb.rescale(epsilon, lower, upper))
    if controller == "ucb-wsr":
        passed = rb.wsr_rejects(unit, delta, unit_eps)
        return _prefix(passed), passed.astype(float), "WSR capital above 1/δ"
    if controller == "ltt" and binary:
        if not np.all((losses == 0) | (losses == 1)):
            raise EednError("the risk declares binary losses but a loss is neither 0 nor 1: the exact binomial "
                            "test does not apply; fix the risk's `binary` flag")
        pvalues = np.asarray(rb.binomial_pvalue(losses.sum(1), n, epsilon), dtype=np.float64).reshape(k)
        return _prefix(pvalues <= delta), pvalues, "binomial p-value"
    pvalues = np.asarray(rb.hb_pvalue(unit.mean(1), n, unit_eps), dtype=np.float64).reshape(k)
    return _prefix(pvalues <= delta), pvalues, "Hoeffding-Bentkus p-value"


def select(controller: str, losses: np.ndarray, costs: np.ndarray, epsilon: float, delta: float,
           lower: float = 0.0, upper: float = 1.0, binary: bool = False) -> Selection:
    """The cheapest certified knob value (by ``costs``, ties to the safer one), else the safe end."""
    losses = np.asarray(losses, dtype=np.float64)
    if losses.ndim != 2 or losses.shape[0] == 0:
        raise EednError("risk control needs a non-empty knob grid (a [K, n] loss matrix with K >= 1)")
    ok, stat, stat_name = certify(controller, losses, epsilon, delta, lower, upper, binary)
    certified = bool(ok.any())
    if certified:
        candidates = np.flatnonzero(ok)
        index = int(candidates[np.argmin(np.asarray(costs)[candidates])])  # argmin: first (safest) of ties
    else:
        index = 0
    bound, bound_name = _reported_bound(controller, losses[index], index, stat, stat_name, delta, lower, upper)
    return Selection(controller, index, certified, bound, bound_name, float(losses[index].mean()), int(ok.sum()),
                     "" if certified else FALLBACK_MESSAGE, ok.tolist())


def _reported_bound(controller: str, row: np.ndarray, index: int, stat: np.ndarray, stat_name: str, delta: float,
                    lower: float, upper: float) -> tuple[float | None, str]:
    """The number a user reads beside the chosen setting: a UCB (in the risk's units), a p-value or the
    CRC-adjusted risk."""
    if controller in ("naive", "crc", "ltt"):
        return float(stat[index]), stat_name
    unit = cast(np.ndarray, rb.rescale(row, lower, upper))
    ucb = rb.wsr_ucb(unit, delta) if controller == "ucb-wsr" else rb.hb_ucb(float(unit.mean()), len(unit), delta)
    value = lower + ucb * (upper - lower)
    return float(value), f"{'WSR' if controller == 'ucb-wsr' else 'Hoeffding-Bentkus'} UCB of the risk at 1 - δ"

