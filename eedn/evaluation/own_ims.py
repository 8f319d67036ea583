"""The gate apart from the IMs: threshold-gate sweeps on a learned-gate strategy's own IMs.

A learned gate (JEI) is trained together with its IMs, so its accuracy-vs-MACs curve mixes two things: how good the
IMs are and how well the gate routes. Sweeping a plain max-probability threshold gate over the *same* stored exit
outputs (the same IMs) separates them (the registered default gate, a rule-based threshold gate: ``eedn plugins``
marks it; another calibratable gate may be named): at the learned gate's cost, the difference between the two curves
is what the gate adds or loses. results.json keeps it under ``threshold_on_own_ims``;
:func:`eedn.evaluation.matched.own_im_threshold_runs` turns it into one more column of a comparison, so every report
of a learned-gate strategy shows both curves.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from eedn.core.contracts import Gate
from eedn.evaluation.matched import interpolate_at
from eedn.core.outputs import ExitOutputs
from eedn.evaluation.policy import calibrated_copy, distinct_points, evaluate_point, target_label

def rescored(outputs: ExitOutputs, gate: Gate) -> ExitOutputs:
    """The same exit outputs with ``gate``'s scores in place of the stored (learned) gate scores."""
    g = outputs.num_exits - 1
    scores = [gate.scores(l, outputs.logits[:, l]) for l in range(g)]
    stacked = torch.stack(scores, 1).float() if scores else outputs.logits.new_zeros(outputs.num_samples, 0).float()
    return dataclasses.replace(outputs, gate_scores=stacked)


#: points of the extra MACs-fraction grid, so the sweep reaches down to the first exit's cost
COST_GRID_POINTS = 11


def cost_grid(outputs: ExitOutputs, points: int = COST_GRID_POINTS) -> list[dict]:
    """``macs_fraction`` budgets evenly from the first exit's cost to the full cost: the geometric sweep alone
    starts above the first exit's cost and may miss a learned gate that routes nearly everyone there."""
    low = float(outputs.exit_macs[0]) / outputs.full_macs
    # rounded up to 3 decimals: short labels, and never below the cheapest reachable cost
    # the first point sends everyone to exit 0 (a macs_fraction target is met within ±0.02, not as a ceiling)
    first = {"exit_shares": [1.0] + [0.0] * (outputs.num_exits - 1)}
    return [first] + [{"macs_fraction": math.ceil(1000 * (low + (1 - low) * k / (points - 1))) / 1000}
                      for k in range(1, points)]


def threshold_on_own_ims(outputs: dict[str, dict[str, ExitOutputs]], learned_gate: Gate, chosen: str,
                         threshold_gate: str | None = None) -> dict:
    """Per trained setting: the threshold gate's budget sweep on that setting's IMs (accuracy and cost on test; budgets
    calibrated on val, as for every threshold gate; no evaluators), and the learned gate's own point beside the
    threshold curve read at the same mean MACs (linear interpolation, none outside the curve's range)."""
    from eedn.core.plugins import create, registry
    from eedn.runtime.errors import EednError

    threshold_gate = threshold_gate or registry("gate").default()
    curves: dict[str, list[dict]] = {}
    at_gate_cost = []
    for label, outs in outputs.items():
        num_gates, num_classes = outs["test"].num_exits - 1, outs["test"].logits.shape[-1]
        gate = create("gate", threshold_gate, num_gates, num_classes)
        if not gate.calibratable:
            raise EednError(f"gate '{threshold_gate}' has no budget calibration, so it cannot be swept on a learned "
                            "gate's IMs; name a threshold gate")
        val, cal, test = (rescored(outs[s], gate) for s in ("val", "cal", "test"))
        points = []
        for target in [*gate.budget_sweep(), *cost_grid(test)]:
            calibrated = calibrated_copy(gate, val, target)
            points.append(evaluate_point(calibrated, val, cal, test, {}, f"{label};{target_label(target)}").point)
        points = distinct_points(points)
        curves[label] = points
        own = outs["test"].summarize(learned_gate.decide(outs["test"].gate_scores))
        threshold = interpolate_at([(p["mean_macs"], p["accuracy"]) for p in points], own["mean_macs"])
        at_gate_cost.append({"setting": label, "macs_fraction": own["macs_fraction"], "gate_accuracy": own["accuracy"],
                             "threshold_accuracy": threshold,
                             "gate_minus_threshold": None if threshold is None else own["accuracy"] - threshold})
    return {"gate": threshold_gate, "policy_setting": chosen, "curves": curves, "at_gate_cost": at_gate_cost,
            "method": f"{threshold_gate} thresholds calibrated on val for each budget of the gate's sweep and a "
                      "MACs-fraction grid from the first exit's cost to 1, applied to the "
                      "same stored IM outputs as the learned gate; threshold_accuracy is that curve interpolated "
                      "linearly in mean MACs at the learned gate's test cost (None outside its range)"}
