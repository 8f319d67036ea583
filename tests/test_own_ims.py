"""The learned gate apart from its IMs: max-prob thresholds swept on the same stored exit outputs."""
from __future__ import annotations

import pytest
import torch
from conftest import numpy_interpolation

from eedn.evaluation.matched import own_im_threshold_runs
from eedn.core.outputs import ExitOutputs
from eedn.evaluation.own_ims import cost_grid, rescored, threshold_on_own_ims
from eedn_plugins.jei_gate import JeiGate


def outputs(seed: int, n: int = 300) -> ExitOutputs:
    """Three exits whose logits get sharper (and more often right) with depth; random learned-gate scores."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (n,), generator=gen)
    logits = torch.randn(n, 3, 4, generator=gen)
    for e in range(3):
        logits[torch.arange(n), e, labels] += 1.0 + 1.5 * e
    return ExitOutputs(logits, labels, torch.rand(n, 2, generator=gen), torch.tensor([1.0, 2.0, 3.0]), 3.0)


def test_rescored_outputs_carry_max_probabilities():
    out = outputs(0)
    gate = JeiGate(2, 4)
    assert gate.options.exit_rule == "official"
    from eedn.core.plugins import create

    mp = rescored(out, create("gate", "max_prob", 2, 4))
    assert torch.allclose(mp.gate_scores, out.logits[:, :2].softmax(-1).amax(-1))
    assert torch.equal(mp.logits, out.logits) and torch.equal(out.gate_scores, outputs(0).gate_scores)


def test_threshold_curve_on_own_ims_and_the_gate_at_its_own_cost():
    outs = {"lambda=1": {s: outputs(i) for i, s in enumerate(("val", "cal", "test"))}}
    gate = JeiGate(2, 4, exit_rule="cdf")
    own = threshold_on_own_ims(outs, gate, "lambda=1")
    curve = own["curves"]["lambda=1"]
    assert own["gate"] == "max_prob" and len(curve) <= 39 + len(cost_grid(outs["lambda=1"]["test"]))
    same = [(p["accuracy"], p["mean_macs"], p["val"]["accuracy"], p["val"]["mean_macs"]) for p in curve]
    assert len(same) == len(set(same)) and len(curve) >= 10  # budgets landing on one point are one row
    # the grid reaches the first exit's cost: a threshold curve that starts where everyone leaves at exit 0
    assert min(p["macs_fraction"] for p in curve) == 1 / 3
    row = own["at_gate_cost"][0]
    exit_index = gate.decide(outs["lambda=1"]["test"].gate_scores)
    expected = outs["lambda=1"]["test"].summarize(exit_index)
    assert row["gate_accuracy"] == expected["accuracy"] and row["macs_fraction"] == expected["macs_fraction"]
    threshold = numpy_interpolation([(p["mean_macs"], p["accuracy"]) for p in curve], expected["mean_macs"])
    assert threshold is not None  # the gate's cost lies inside the threshold curve: a value to compare
    assert row["threshold_accuracy"] == pytest.approx(threshold, abs=1e-12)
    assert row["gate_minus_threshold"] == pytest.approx(expected["accuracy"] - threshold, abs=1e-12)

    results = {"policy": {"strategy": "jei", "gate": "jei", "mean_macs": expected["mean_macs"], "setting": "lambda=1"},
               "curve": [], "metrics": {"ece": {}}, "threshold_on_own_ims": own}
    runs = own_im_threshold_runs({"jei": {0: results}, "im-only": {0: {"policy": {}, "curve": []}}})
    assert list(runs) == ["jei", "max_prob thresholds on jei's IMs", "im-only"]
    column = runs["max_prob thresholds on jei's IMs"][0]
    assert column["curve"] == curve and column["metrics"] == {} and column["policy"]["gate"] == "max_prob"
    nearest = min(curve, key=lambda p: abs(p["mean_macs"] - expected["mean_macs"]))
    assert column["policy"]["setting"] == nearest["setting"]
