"""Exit policies on stored outputs: one cost model, one cached pass, every policy.

A policy is a gate in a given setting. Rule-based gates are calibrated on val (a budget target) and
swept over their budget grid; learned gates (JEI) are applied as trained. Every operating point, a
policy or a curve point, has one shape (:func:`evaluate_point`).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

from torch import Tensor

from eedn.core.contracts import Evaluator, Gate
from eedn.core.outputs import ExitOutputs
from eedn.runtime.errors import EednError

#: keys every operating point has; an evaluator's headline numbers may not reuse them
POINT_KEYS = ("setting", "accuracy", "mean_macs", "macs_fraction", "exit_fractions", "val", "gate_setting")


def apply_gate(gate: Gate, outputs: ExitOutputs) -> Tensor:
    """Exit index of every sample under ``gate`` (reads the stored gate scores only)."""
    return gate.decide(outputs.gate_scores)


@dataclass
class EvaluatedPoint:
    """One operating point: its flat results.json entry, every evaluator's full metrics and flat rows, and the
    test exit index each sample took."""

    point: dict
    details: dict
    rows: dict
    exit_test: Tensor


def evaluate_point(gate: Gate, val: ExitOutputs, cal: ExitOutputs, test: ExitOutputs,
                   evaluators: dict[str, Evaluator], setting: str) -> EvaluatedPoint:
    """Accuracy/cost on test (plus val, for selection), each evaluator's headline numbers and rows.

    The point is ``{setting, accuracy, mean_macs, macs_fraction, exit_fractions, val, gate_setting,
    <headline numbers>}``; each evaluator's full metrics and rows come beside it (results.json keeps them for
    the reported policy only).
    """
    exit_test, exit_cal, exit_val = apply_gate(gate, test), apply_gate(gate, cal), apply_gate(gate, val)
    point = {"setting": setting} | test.summarize(exit_test)
    point["val"] = {k: v for k, v in val.summarize(exit_val).items() if k != "exit_fractions"}
    point["gate_setting"] = gate.describe()
    details: dict[str, dict] = {}
    rows: dict[str, list[dict]] = {}
    for name, ev in evaluators.items():
        metrics = ev.evaluate(test, cal, exit_test, exit_cal)
        headline = ev.headline(metrics)
        clash = sorted(set(headline) & (set(point) | set(POINT_KEYS)))
        if clash:
            raise EednError(f"evaluator '{name}' reports headline number(s) {', '.join(clash)} that another "
                            "evaluator or the pipeline already reports; rename them in that evaluator")
        point |= headline
        rows[name] = ev.rows(metrics)
        details[name] = metrics
    return EvaluatedPoint(point, details, rows, exit_test)


def calibrated_copy(gate: Gate, val: ExitOutputs, target: dict) -> Gate:
    g = copy.deepcopy(gate)
    g.calibrate(val, target)
    return g


def target_label(target: dict) -> str:
    """Short label of a budget target: its leading key (``p=12``, ``macs_fraction=0.75``); the full
    target is kept in the point's ``gate_setting``."""
    key, value = next(iter(target.items()))
    return f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}"


def distinct_points(points: list[dict]) -> list[dict]:
    """Operating points with the same test and val accuracy and cost collapse into the first one; the settings
    they merge are kept in its ``same_as``."""
    kept: dict[tuple, dict] = {}
    for pt in points:
        key = (round(pt["accuracy"], 12), round(pt["mean_macs"], 6), round(pt["val"]["accuracy"], 12),
               round(pt["val"]["mean_macs"], 6))
        if key in kept:
            kept[key].setdefault("same_as", []).append(pt["setting"])
        else:
            kept[key] = pt
    return list(kept.values())
