"""Budget calibration of threshold gates, on stored validation outputs alone (no network pass).

:class:`ThresholdGate` is the public base of every confidence-threshold gate: subclass it, implement
``confidence(logits) -> [B]`` (higher = more confident), and the gate is calibratable by budget, swept over
the geometric budgets and runs in the early-exit engine. Thresholds live in the buffer ``thresholds`` ``[G]``
(so they travel in state dicts) and start at ``+inf``: an uncalibrated gate never exits early. Calibration
follows the MSDNet budgeted-batch recipe (Huang et al., ICLR 2018) as the official JEI-DNN code applies it
(docs/method.md §4.1):

* ``{"p": p}`` (optionally with ``divisor`` and ``include_final``): geometric exit shares
  ``f_k ∝ q^k`` with ``q = p / divisor`` for ``k = 1..G+1`` (``include_final=True``, the eedn default:
  the final exit gets a share, as in MSDNet) or ``k = 1..G`` (``False``, the official JEI variant: the
  final exit gets no share). The default divisor is 15, the official JEI value (at ``p = 15`` every
  exit gets the same share); MSDNet itself uses 20 (``divisor=20``).
* ``{"exit_shares": [f_0, ..., f_G]}``: the same greedy fit with given shares (normalised to sum 1).
* ``{"macs_fraction": F}``: a target: among a one-parameter family of settings, the one with the best val
  accuracy whose val MACs fraction is within ±0.02 of ``F`` (:data:`MACS_TOLERANCE`; ties: the closer one),
  the family refined by bisection when none is. The family is the
  geometric budget over a fine log grid of ``q`` (1e-3 .. 1e3, plus the sweep's own ``p = 1..39``),
  plus its two ends: everyone leaves at exit 0, and nobody exits early.
* ``{"accuracy_drop": d}``: the cheapest setting of that family whose val accuracy is at least the
  final exit's val accuracy minus ``d`` (a fraction: ``0.01`` is one percentage point).

The greedy fit: for ``k = 0..G-1``, ``m = floor(n * f_k)``; ``T_k = +inf`` if ``m == 0``,
else the ``m``-th largest score among samples that have not exited yet; every such sample whose score
is ``>= T_k`` exits at ``k``. With distinct scores exactly ``m`` samples exit at ``k``. After tied scores
fewer than ``m`` samples may still run: then ``short_share="rest"`` (eedn) lets them all exit at ``k`` (the
closest to the share), ``"none"`` (the official code) sets ``T_k = +inf`` and nobody exits there.

The helpers (:func:`geometric_shares`, :func:`fit_thresholds`, :func:`pick_setting`, ...) serve any other
calibratable gate too (the patience gate picks its ``k`` with :func:`pick_setting`).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from eedn.core.contracts import Gate
from eedn.core.options import option
from eedn.core.outputs import ExitOutputs
from eedn.runtime.errors import EednError

DEFAULT_DIVISOR = 15.0  # official JEI budgets q = p/15; MSDNet uses 20
SWEEP_P = tuple(range(1, 40))  # p = 1..39, the official sweep
SEARCH_Q = torch.logspace(-3, 3, 241, dtype=torch.float64)  # the macs_fraction / accuracy_drop family
FLOOR_EPS = 1e-9  # floor(n*f) guard against float noise (100 * 0.29 = 28.999999999999996)
TARGET_KEYS = ("p", "exit_shares", "macs_fraction", "accuracy_drop")
SHORT_SHARES = ("rest", "none")  # fewer samples running than an exit's share: they all exit / nobody exits


# ------------------------------------------------------------------------------------- budget helpers
def geometric_shares(p: float, num_exits: int, divisor: float = DEFAULT_DIVISOR, include_final: bool = True) -> Tensor:
    """Exit shares ``[G+1]`` (float64) with ``f_k ∝ (p/divisor)^k``; k = 1..G+1, or k = 1..G with the
    final share 0 when ``include_final`` is False (official JEI variant)."""
    if p <= 0 or divisor <= 0:
        raise EednError(f"budget p and divisor must be positive, got p={p}, divisor={divisor}")
    return geometric_shares_many(torch.tensor([float(p)]), num_exits, divisor, include_final)[0]


def geometric_shares_many(ps: Tensor, num_exits: int, divisor: float, include_final: bool) -> Tensor:
    """:func:`geometric_shares` for a vector of budgets ``p`` -> ``[P, G+1]``."""
    g = num_exits
    k = torch.arange(1, g + 2 if include_final else g + 1, dtype=torch.float64)
    log_w = k[None, :] * torch.log(ps.double()[:, None] / divisor)  # normalised in log space: no overflow
    shares = torch.softmax(log_w, dim=1)
    if not include_final:
        shares = torch.cat([shares, shares.new_zeros(len(ps), 1)], dim=1)
    return shares


def fit_thresholds(scores: Tensor, shares: Tensor, short_share: str = "rest") -> Tensor:
    """Greedy MSDNet threshold fit on a ``[N, G]`` score matrix; ``shares`` has G+1 (or G)
    entries, of which the first G are used. Returns float64 thresholds ``[G]``."""
    return fit_thresholds_batch(scores, shares.reshape(1, -1), short_share)[0]


def fit_thresholds_batch(scores: Tensor, shares: Tensor, short_share: str = "rest") -> Tensor:
    """:func:`fit_thresholds` for ``P`` share vectors at once (``shares [P, >=G]``) -> ``[P, G]``.

    For each exit k: ``m = floor(n·f_k)``; ``T_k`` is the m-th largest score among the samples still
    running (+inf if ``m == 0`` or none runs); running samples with score ``>= T_k`` exit. If fewer than
    m run (only after ties): ``short_share="rest"`` takes the smallest running score (all of them exit),
    ``"none"`` leaves ``T_k = +inf`` as the official code does (nobody exits at k).
    """
    if short_share not in SHORT_SHARES:
        raise EednError(f"short_share must be one of {', '.join(SHORT_SHARES)}, got {short_share!r}")
    n, g = scores.shape
    p = shares.shape[0]
    scores = scores.double().cpu()
    thresholds = torch.full((p, g), math.inf, dtype=torch.float64)
    running = torch.ones(p, n, dtype=torch.bool)
    for k in range(g):
        m = torch.floor(n * shares[:, k].double().cpu() + FLOOR_EPS).long()
        col = scores[:, k]
        order = col.argsort(descending=True)  # one sort serves every candidate
        alive_ranked = running[:, order].cumsum(1)  # [P, N]: running samples seen so far, best first
        take = torch.minimum(m, alive_ranked[:, -1])
        position = (alive_ranked >= take.clamp(min=1)[:, None]).int().argmax(1)  # the take-th running one
        fits = take > 0 if short_share == "rest" else (take > 0) & (take == m)
        thresholds[:, k] = torch.where(fits, col[order][position], thresholds[:, k])
        running &= ~(col[None, :] >= thresholds[:, k : k + 1])
    return thresholds


def summarize_many(val: ExitOutputs, exit_index: Tensor) -> list[dict]:
    """Val accuracy, mean MACs and MACs fraction for ``P`` policies at once (``exit_index [P, N]``)."""
    correct = (val.logits.argmax(-1) == val.labels[:, None]).double()  # [N, E]
    rows = torch.arange(val.num_samples)
    acc = correct[rows[None, :], exit_index].mean(1)
    macs = val.exit_macs.double()[exit_index].mean(1)
    return [{"accuracy": float(a), "mean_macs": float(c), "macs_fraction": float(c) / val.full_macs}
            for a, c in zip(acc, macs)]


def first_exit_at_or_above(scores: Tensor, thresholds: Tensor) -> Tensor:
    """Exit index ``[N]``: first k with ``scores[:, k] >= thresholds[k]``, else G (the final head)."""
    n, g = scores.shape
    if g == 0:
        return torch.zeros(n, dtype=torch.long, device=scores.device)
    leave = scores.double() >= thresholds.to(device=scores.device, dtype=torch.float64)
    first = leave.int().argmax(1)
    return torch.where(leave.any(1), first, torch.full_like(first, g))


def first_exits_many(scores: Tensor, thresholds: Tensor) -> Tensor:
    """:func:`first_exit_at_or_above` for ``P`` threshold vectors ``[P, G]`` -> ``[P, N]``."""
    n, g = scores.shape
    if g == 0:
        return torch.zeros(thresholds.shape[0], n, dtype=torch.long)
    leave = scores.double().cpu()[None] >= thresholds.double()[:, None, :]  # [P, N, G]
    first = leave.int().argmax(2)
    return torch.where(leave.any(2), first, torch.full_like(first, g))


def _format_threshold(t: float) -> float | str:
    return t if math.isfinite(t) else ("inf" if t > 0 else "-inf")


def check_target(target: dict, allowed: tuple[str, ...]) -> str:
    keys = [k for k in target if k in allowed]
    if len(keys) != 1:
        raise EednError(f"a budget target needs exactly one of {', '.join(allowed)}; got {dict(target)}")
    return keys[0]


#: how far the val MACs fraction of a ``macs_fraction`` target's setting may be from the target
MACS_TOLERANCE = 0.02


def pick_setting(points: list[dict], val: ExitOutputs, target: dict, kind: str) -> dict:
    """Choose among candidate settings (each with a ``summary`` on val) per a macs/accuracy target.

    ``macs_fraction``: a target, not a ceiling: the most accurate setting whose val MACs fraction is within
    :data:`MACS_TOLERANCE` of it (ties: the closer one); the closest setting when none is (its distance is
    then in the chosen point's summary). A target more than the tolerance below the cheapest setting is an error.
    """
    if kind == "macs_fraction":
        budget = float(target["macs_fraction"])
        cheapest = min(pt["summary"]["macs_fraction"] for pt in points)
        if budget < cheapest - MACS_TOLERANCE:
            raise EednError(f"no gate setting meets macs_fraction={budget} on val; the cheapest reaches "
                            f"{cheapest:.4f}: ask for at least that")
        near = [pt for pt in points if abs(pt["summary"]["macs_fraction"] - budget) <= MACS_TOLERANCE + 1e-12]
        if near:
            return max(near, key=lambda pt: (pt["summary"]["accuracy"], -abs(pt["summary"]["macs_fraction"] - budget)))
        return min(points, key=lambda pt: (abs(pt["summary"]["macs_fraction"] - budget), -pt["summary"]["accuracy"]))
    drop = float(target["accuracy_drop"])
    if not 0.0 <= drop <= 1.0:
        raise EednError(f"accuracy_drop is a fraction in [0, 1] (0.01 = one point), got {drop}")
    floor_acc = float(val.exit_accuracy()[-1]) - drop
    ok = [pt for pt in points if pt["summary"]["accuracy"] >= floor_acc - 1e-12]
    if not ok:
        best = max(pt["summary"]["accuracy"] for pt in points)
        raise EednError(f"no gate setting reaches val accuracy {floor_acc:.4f} (final exit minus {drop}); the best "
                        f"reaches {best:.4f}: allow a larger accuracy_drop")
    return min(ok, key=lambda pt: (pt["summary"]["mean_macs"], -pt["summary"]["accuracy"]))


def score_logits(scores: Tensor) -> Tensor:
    """float64 ``logit(g)`` of gate scores in (0, 1) (clamped away from 0 and 1)."""
    g = scores.double().clamp(1e-12, 1 - 1e-12)
    return torch.log(g) - torch.log1p(-g)


def calibrate_offset(decide: Callable[[Tensor], Tensor], val: ExitOutputs, target: dict,
                     max_candidates: int = 400, refine_steps: int = 30) -> tuple[float, dict]:
    """The logit offset ``b`` (scores ``σ(logit(g) + b)``) of a probabilistic learned gate that meets a
    ``macs_fraction`` or ``accuracy_drop`` target on val, with :func:`pick_setting`'s rule; returns ``b`` and
    its val summary. Candidates are the offsets where a val score crosses 0 (up to ``max_candidates`` of them,
    by quantile); a ``macs_fraction`` target between two candidates is then bisected."""
    kind = check_target(target, ("macs_fraction", "accuracy_drop"))
    logits = score_logits(val.gate_scores)
    dtype = val.gate_scores.dtype

    def summaries(offsets: list[float]) -> list[dict]:
        exits = torch.stack([decide(torch.sigmoid(logits + b).to(dtype)) for b in offsets])
        return summarize_many(val, exits)

    crossings = torch.unique(-logits.flatten())
    if crossings.numel() > max_candidates:
        crossings = torch.quantile(crossings, torch.linspace(0, 1, max_candidates, dtype=torch.float64))
    offsets = sorted({0.0, -60.0, 60.0, *(float(c) for c in crossings), *(float(c) + 1e-9 for c in crossings)})
    points: list[dict[str, Any]] = [{"offset": b, "summary": sm} for b, sm in zip(offsets, summaries(offsets))]
    best = pick_setting(points, val, target, kind)
    if kind == "macs_fraction":
        budget = float(target["macs_fraction"])
        if abs(best["summary"]["macs_fraction"] - budget) > MACS_TOLERANCE:
            # bisect between the neighbours that bracket the target (more offset: more early exits)
            below = max((pt for pt in points if pt["summary"]["macs_fraction"] >= budget), default=None,
                        key=lambda pt: pt["offset"])
            above = min((pt for pt in points if pt["summary"]["macs_fraction"] <= budget), default=None,
                        key=lambda pt: pt["offset"])
            if below is not None and above is not None:
                lo, hi = below["offset"], above["offset"]
                for _ in range(refine_steps):
                    mid = (lo + hi) / 2
                    pt: dict[str, Any] = {"offset": mid, "summary": summaries([mid])[0]}
                    points.append(pt)
                    if abs(pt["summary"]["macs_fraction"] - budget) <= MACS_TOLERANCE:
                        break
                    lo, hi = (mid, hi) if pt["summary"]["macs_fraction"] > budget else (lo, mid)
                best = pick_setting(points, val, target, kind)
    return float(best["offset"]), best["summary"]


def check_val(gate: Gate, val: ExitOutputs) -> None:
    if val.gate_scores.shape[1] != gate.num_exits:
        raise EednError(f"val outputs have {val.gate_scores.shape[1]} gate scores per sample, the gate expects "
                        f"{gate.num_exits}: compute them with this model")
    if val.num_samples == 0:
        raise EednError("cannot calibrate a gate on an empty validation split")


# --------------------------------------------------------------------------------------------- gates
class ThresholdGate(Gate):
    """Exit at the first IM whose confidence score clears its threshold (``+inf`` until calibrated)."""

    thresholds: Tensor  # a registered buffer ``[G]``

    calibratable = True
    score_name = "confidence"

    @dataclass
    class Options:
        divisor: float = option(DEFAULT_DIVISOR, "geometric budgets q = p / divisor (15: official JEI, 20: MSDNet)",
                                above=0)
        include_final: bool = option(True, "the final exit gets a share of the geometric budget (MSDNet); "
                                           "false: the official JEI variant")
        thresholds: list[float] | None = option(None, "one threshold per IM, set directly (else calibrated)")
        short_share: str = option("rest", "an exit whose share exceeds the samples still running (only after "
                                          "tied scores): rest = they all exit there; none = nobody does "
                                          "(official)", choices=SHORT_SHARES)

    options: ThresholdGate.Options

    def __init__(self, num_exits: int, num_classes: int, **options: Any):
        super().__init__(num_exits, num_classes, **options)
        self.divisor = self.options.divisor
        self.include_final = self.options.include_final
        self.short_share = self.options.short_share
        thresholds = self.options.thresholds
        init = torch.full((num_exits,), math.inf, dtype=torch.float64)
        if thresholds is not None:
            if len(thresholds) != num_exits:
                raise EednError(f"gate option thresholds needs {num_exits} values (one per IM), got {len(thresholds)}")
            init = torch.tensor(thresholds, dtype=torch.float64)
        self.register_buffer("thresholds", init)
        self.setting: dict = {}

    def confidence(self, logits: Tensor) -> Tensor:
        raise NotImplementedError

    def scores(self, exit_index: int, logits: Tensor, features: Tensor | None = None) -> Tensor:
        return self.confidence(logits)

    def exits_at(self, prefix: Tensor) -> Tensor:
        l = prefix.shape[1] - 1
        return prefix[:, -1].double() >= self.thresholds[l].to(prefix.device)

    def decide(self, scores: Tensor) -> Tensor:
        """Vectorised; equal to the ``exits_at`` loop of :class:`Gate`."""
        return first_exit_at_or_above(scores, self.thresholds)

    # -- calibration on stored validation outputs
    def _shares_for(self, target: dict) -> Tensor:
        e = self.num_exits + 1
        if "exit_shares" in target:
            shares = torch.as_tensor([float(s) for s in target["exit_shares"]], dtype=torch.float64)
            if shares.numel() != e or bool((shares < 0).any()) or float(shares.sum()) <= 0:
                raise EednError(f"exit_shares needs {e} non-negative numbers (one per exit, final included) with a "
                                f"positive sum; got {list(target['exit_shares'])}")
            return shares / shares.sum()
        return geometric_shares(float(target["p"]), self.num_exits, float(target.get("divisor", self.divisor)),
                                bool(target.get("include_final", self.include_final)))

    def _candidates(self, val: ExitOutputs) -> list[dict]:
        """The macs/accuracy search family: geometric budgets over a q grid, plus both ends."""
        scores, g = val.gate_scores, self.num_exits
        ps = sorted({q * self.divisor for q in SEARCH_Q.tolist()} | {float(p) for p in SWEEP_P})
        shares = geometric_shares_many(torch.tensor(ps), g, self.divisor, self.include_final)
        everyone_first = torch.full((1, g), math.inf, dtype=torch.float64)
        everyone_first[:, :1] = -math.inf
        thresholds = torch.cat([everyone_first, torch.full((1, g), math.inf, dtype=torch.float64),
                                fit_thresholds_batch(scores, shares, self.short_share)])
        labels = [{"family": "all_exit_0"}, {"family": "no_early_exit"}] + [{"family": "geometric", "p": p} for p in ps]
        summaries = summarize_many(val, first_exits_many(scores, thresholds))
        return [lab | {"thresholds": th, "summary": sm} for lab, th, sm in zip(labels, thresholds, summaries)]

    def _bisect(self, val: ExitOutputs, points: list[dict], budget: float, steps: int = 30) -> list[dict]:
        """More geometric settings between the two that bracket ``budget`` (larger p: more MACs), until one
        lands within :data:`MACS_TOLERANCE` of it."""
        geo = [pt for pt in points if pt.get("family") == "geometric"]
        lower = [pt["p"] for pt in geo if pt["summary"]["macs_fraction"] <= budget]
        upper = [pt["p"] for pt in geo if pt["summary"]["macs_fraction"] >= budget]
        if not lower or not upper:
            return []
        lo, hi, added = math.log(max(lower)), math.log(min(upper)), []
        for _ in range(steps):
            p = math.exp((lo + hi) / 2)
            shares = geometric_shares_many(torch.tensor([p]), self.num_exits, self.divisor, self.include_final)
            th = fit_thresholds_batch(val.gate_scores, shares, self.short_share)
            sm = summarize_many(val, first_exits_many(val.gate_scores, th))[0]
            added.append({"family": "geometric", "p": p, "thresholds": th[0], "summary": sm})
            if abs(sm["macs_fraction"] - budget) <= MACS_TOLERANCE:
                break
            lo, hi = (math.log(p), hi) if sm["macs_fraction"] < budget else (lo, math.log(p))
        return added

    def calibrate(self, val: ExitOutputs, target: dict) -> None:
        check_val(self, val)
        kind = check_target(target, TARGET_KEYS)
        if kind in ("p", "exit_shares"):
            th = fit_thresholds(val.gate_scores, self._shares_for(target), self.short_share)
            chosen: dict = {"family": kind}
            if kind == "p":
                chosen["p"] = float(target["p"])
        else:
            points = self._candidates(val)
            pt = pick_setting(points, val, target, kind)
            if kind == "macs_fraction" and \
                    abs(pt["summary"]["macs_fraction"] - target["macs_fraction"]) > MACS_TOLERANCE:
                pt = pick_setting(points + self._bisect(val, points, float(target["macs_fraction"])), val, target, kind)
            th = pt["thresholds"]
            chosen = {k: v for k, v in pt.items() if k in ("family", "p")}
        self.thresholds.copy_(th.to(self.thresholds))
        summary = val.summarize(self.decide(val.gate_scores))
        self.setting = {"target": dict(target), **chosen,
                        "val_accuracy": summary["accuracy"], "val_macs_fraction": summary["macs_fraction"]}

    def budget_sweep(self) -> list[dict]:
        return [{"p": p, "divisor": self.divisor, "include_final": self.include_final} for p in SWEEP_P]

    def describe(self) -> dict:
        return {"score": self.score_name, "thresholds": [_format_threshold(float(t)) for t in self.thresholds],
                "divisor": self.divisor, "include_final": self.include_final,
                "short_share": self.short_share} | self.setting
