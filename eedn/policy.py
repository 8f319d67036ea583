"""Exit policies on stored outputs: one cost model, one cached pass, every policy.

A policy is a gate in a given setting. Rule-based gates are calibrated on val (a budget target) and
swept over their budget grid; learned gates (JEI) are applied as trained.
"""
from __future__ import annotations

import copy

from torch import Tensor

from eedn.contracts import Evaluator, Gate
from eedn.outputs import ExitOutputs


def apply_gate(gate: Gate, outputs: ExitOutputs) -> Tensor:
    """Exit index of every sample under ``gate`` (reads the stored gate scores only)."""
    return gate.decide(outputs.gate_scores)


def evaluate_point(gate: Gate, val: ExitOutputs, cal: ExitOutputs, test: ExitOutputs,
                   evaluators: dict[str, Evaluator], setting: str) -> dict:
    """Accuracy/cost on test (plus val, for selection) and every evaluator's metrics for one policy."""
    exit_test, exit_cal, exit_val = apply_gate(gate, test), apply_gate(gate, cal), apply_gate(gate, val)
    point = {"setting": setting} | test.summarize(exit_test)
    point["val"] = {k: v for k, v in val.summarize(exit_val).items() if k != "exit_fractions"}
    point["gate"] = gate.describe()
    for name, ev in evaluators.items():
        point[name] = ev.evaluate(test, cal, exit_test, exit_cal)
    return point


def calibrated_copy(gate: Gate, val: ExitOutputs, target: dict) -> Gate:
    g = copy.deepcopy(gate)
    g.calibrate(val, target)
    return g


def target_label(target: dict) -> str:
    """Short label of a budget target: its leading key (``p=12``, ``macs_fraction=0.75``); the full
    target is kept in the point's ``gate_setting``."""
    key, value = next(iter(target.items()))
    return f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}"
