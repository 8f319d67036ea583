"""Risk control inside a run: the ``risk_control`` config block checked before training and results.json's
``risk_control`` block (docs/evaluation.md, "Risk-controlled exits"); its figure and tables are
:mod:`eedn.report.risk_report`'s.

The knob grid is fixed on val, the controller reads cal only, and the chosen setting is reported on test.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from eedn.runtime.errors import EednError

if TYPE_CHECKING:
    from eedn.core.config import Config

def check_risk_config(cfg: Config, evaluators: dict) -> None:
    """Check the ``risk_control`` block against the registered controllers and knobs, and build the risk once
    (against the run's evaluators), before anything is trained; the key table (eedn/core/config.py) has already
    checked each value's type and limits."""
    from eedn.core.plugins import create
    from eedn.evaluation.risk import CONTROLLERS, KNOBS, check_levels

    rc = cfg.risk_control
    if not rc.risk:
        return
    if rc.controller not in CONTROLLERS:
        raise EednError(f"unknown risk controller '{rc.controller}'; use one of: {', '.join(CONTROLLERS)}")
    if rc.knob not in KNOBS:
        raise EednError(f"unknown risk-control knob '{rc.knob}'; use one of: {', '.join(KNOBS)}")
    risk = create("risk", rc.risk, **rc.risk_options)
    risk.check(evaluators)
    for eps in [rc.epsilon, *rc.epsilons]:
        check_levels(eps, rc.delta, risk.lower, risk.upper)


def risk_control_block(cfg: Config, gate: Any, outs: dict, evaluators: dict) -> dict:
    """results.json's ``risk_control``: the chosen knob value and its test risk, MACs and bound, plus the ε sweep
    of every controller (``outs`` holds the val / cal / test ExitOutputs of the reported setting)."""
    from eedn.runtime.io import json_float
    from eedn.core.plugins import create
    from eedn.evaluation.risk import CONTROLLERS, GUARANTEES, build_knob, loss_matrix, mean_macs, select

    rc = cfg.risk_control
    assert rc.risk is not None  # called only when risk control is on
    risk = create("risk", rc.risk, **rc.risk_options)
    risk.fit(outs["val"], evaluators)
    knob = build_knob(gate, outs["val"], rc.knob, rc.grid_size)
    exits = {s: knob.exits(outs[s]) for s in ("cal", "test")}
    losses = {s: loss_matrix(risk.exit_losses(outs[s]), exits[s]) for s in exits}
    costs = {s: mean_macs(exits[s], outs[s].exit_macs) for s in exits}
    full = float(outs["test"].full_macs)

    def choose(controller: str, epsilon: float) -> dict:
        sel = select(controller, losses["cal"], costs["cal"], epsilon, rc.delta, risk.lower, risk.upper,
                     risk.binary)
        return {"epsilon": epsilon, "setting": knob.label(sel.index), "knob_index": sel.index,
                "knob_value": json_float(knob.values[sel.index]), **sel.to_dict(),
                "test_risk": float(losses["test"][sel.index].mean()),
                "cal_macs_fraction": float(costs["cal"][sel.index]) / full,
                "test_macs_fraction": float(costs["test"][sel.index]) / full,
                "macs_saved": 1.0 - float(costs["test"][sel.index]) / full}

    chosen = choose(rc.controller, rc.epsilon)
    test_summary = outs["test"].summarize(exits["test"][chosen["knob_index"]])
    chosen |= {"test_accuracy": test_summary["accuracy"], "test_mean_macs": test_summary["mean_macs"],
               "exit_fractions": test_summary["exit_fractions"]}
    sweep = [choose(c, e) for c in CONTROLLERS for e in rc.epsilons]
    return {"risk": risk.describe(), "epsilon": rc.epsilon, "delta": rc.delta,
            "controller": rc.controller, "guarantee": GUARANTEES[rc.controller],
            "knob": {"name": knob.name, "grid_size": len(knob.values), "fixed_on": "val", "calibrated_on": "cal"},
            "n_cal": outs["cal"].num_samples, "n_test": outs["test"].num_samples, "chosen": chosen,
            "sweep": [{k: row[k] for k in SWEEP_KEYS} for row in sweep]}


SWEEP_KEYS = ("controller", "epsilon", "setting", "certified", "bound", "cal_risk", "test_risk", "test_macs_fraction",
              "macs_saved")
