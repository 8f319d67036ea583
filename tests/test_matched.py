"""Matched-cost maths (exact numbers by hand) and the tables rendered from it, on hand-made operating points."""
from __future__ import annotations

import math

import pytest

from eedn.evaluation.matched import MISSING, OUTSIDE, RunPoints, comparison_numbers, interpolate_at, matched_cost_table, mean_std
from eedn.report.render import comparison_markdown, format_macs

# --------------------------------------------------------------------------------------- interpolation, stats


def test_interpolate_at_is_linear_in_cost_inside_the_range():
    pts = [(400.0, 0.9), (100.0, 0.5), (200.0, 0.7)]  # unsorted on purpose
    assert interpolate_at(pts, 150.0) == pytest.approx(0.6)
    assert interpolate_at(pts, 300.0) == pytest.approx(0.8)
    assert interpolate_at(pts, 175.0) == pytest.approx(0.65)
    assert interpolate_at(pts, 200.0) == pytest.approx(0.7)


def test_interpolate_at_never_extrapolates_but_includes_the_ends():
    pts = [(100.0, 0.5), (200.0, 0.7)]
    assert interpolate_at(pts, 100.0) == pytest.approx(0.5)
    assert interpolate_at(pts, 200.0) == pytest.approx(0.7)
    assert interpolate_at(pts, 200.0 * (1 + 1e-12)) == pytest.approx(0.7)  # rounding noise is still "at the end"
    assert interpolate_at(pts, 99.9) is None
    assert interpolate_at(pts, 200.1) is None
    assert interpolate_at([(150.0, 0.3)], 150.0) == pytest.approx(0.3)  # a one-point curve: only its own cost
    assert interpolate_at([(150.0, 0.3)], 151.0) is None
    assert interpolate_at([], 1.0) is None


def test_interpolate_at_merges_equal_costs_and_skips_missing_values():
    # two settings reaching the same cost (e.g. p=33 and p=34 of a threshold sweep) count as their mean
    pts = [(100.0, 0.4), (100.0, 0.6), (200.0, 1.0)]
    assert interpolate_at(pts, 150.0) == pytest.approx(0.75)
    assert interpolate_at(pts, 100.0) == pytest.approx(0.5)
    # a point without the metric (evaluator off) neither counts nor widens the range
    assert interpolate_at([(100.0, None), (200.0, 0.2), (300.0, 0.4)], 250.0) == pytest.approx(0.3)
    assert interpolate_at([(100.0, None), (200.0, 0.2), (300.0, 0.4)], 150.0) is None


def test_mean_std_uses_the_sample_std_and_empties_partial_cells():
    assert mean_std([1.0, 2.0, 3.0]) == {"mean": pytest.approx(2.0), "std": pytest.approx(1.0), "n": 3}
    assert mean_std([0.25]) == {"mean": 0.25, "std": None, "n": 1}
    assert mean_std([1.0, None]) == {"mean": None, "std": None, "n": 1}


# ------------------------------------------------------------------------------------------- matched table


def _pt(setting: str, macs: float, acc: float, ece: float | None = None, size: float | None = None) -> dict:
    """An operating point of results.json; ``ece`` and ``set_size`` stand for any evaluator's headline keys."""
    point = {"setting": setting, "mean_macs": macs, "macs_fraction": macs / 1000.0, "accuracy": acc,
             "exit_fractions": [1.0]}
    return point | {k: v for k, v in (("ece", ece), ("set_size", size)) if v is not None}


METRICS = ("accuracy", "ece", "set_size")


def test_matched_cost_table_matches_a_hand_computation():
    a = {0: RunPoints([_pt("s1", 100, 0.5, 0.10, 3.0), _pt("s2", 300, 0.9, 0.05, 1.0)], _pt("s2", 300, 0.9, 0.05, 1.0)),
         1: RunPoints([_pt("s1", 120, 0.6, 0.20, 2.0), _pt("s2", 320, 1.0, 0.10, 1.5)], _pt("s2", 320, 1.0, 0.10, 1.5))}
    b = {0: RunPoints([], _pt("pol", 200, 0.70, 0.3, 2.5)),  # no curve: its policy is its only point
         1: RunPoints([], _pt("pol", 220, 0.75, 0.2, 2.0))}
    c = {0: RunPoints([_pt("c1", 150, 0.2), _pt("c2", 250, 0.4)], _pt("c1", 150, 0.2)),
         1: RunPoints([_pt("c1", 90, 0.1), _pt("c2", 400, 0.5)], _pt("c1", 90, 0.1))}
    table = matched_cost_table({"a": a, "b": b, "c": c}, METRICS)
    assert table["columns"] == ["a", "b", "c"] and table["metrics"] == list(METRICS)
    rows = {(r["strategy"], r["setting"]): r for r in table["rows"]}
    assert [(r["strategy"], r["setting"]) for r in table["rows"]] == [
        ("a", "s1"), ("a", "s2"), ("b", "pol"), ("c", "c1"), ("c", "c2")]
    assert rows[("a", "s2")]["policy"] and not rows[("a", "s1")]["policy"] and rows[("b", "pol")]["policy"]

    # b's policy point costs 200 (seed 0) and 220 (seed 1)
    row = rows[("b", "pol")]
    assert row["mean_macs"]["mean"] == pytest.approx(210.0)
    acc_a = row["values"]["a"]["accuracy"]  # seed 0: 0.5 + 0.4 * 100/200 = 0.7; seed 1: 0.6 + 0.4 * 100/200 = 0.8
    assert acc_a["mean"] == pytest.approx(0.75) and acc_a["std"] == pytest.approx(math.sqrt(0.005)) and acc_a["n"] == 2
    ece_a = row["values"]["a"]["ece"]  # 0.1 - 0.05 * 0.5 = 0.075; 0.2 - 0.1 * 0.5 = 0.15
    assert ece_a["mean"] == pytest.approx(0.1125)
    assert row["values"]["a"]["set_size"]["mean"] == pytest.approx((2.0 + 1.75) / 2)
    acc_c = row["values"]["c"]["accuracy"]  # 0.2 + 0.2 * 50/100 = 0.3; 0.1 + 0.4 * 130/310
    assert acc_c["mean"] == pytest.approx((0.3 + 0.1 + 0.4 * 130 / 310) / 2)
    assert row["values"]["c"]["ece"]["mean"] is None and row["values"]["c"]["ece"]["empty"] == MISSING  # c has none
    own = row["values"]["b"]["accuracy"]  # a strategy's own cell is its measured value
    assert own["mean"] == pytest.approx(0.725) and "empty" not in own

    # a's cheapest point (100 / 120): c covers it only in seed 1 -> empty cell, n counts the seed in range
    cell = rows[("a", "s1")]["values"]["c"]["accuracy"]
    assert cell["mean"] is None and cell["n"] == 1 and cell["empty"] == OUTSIDE
    b_cell = rows[("a", "s1")]["values"]["b"]["accuracy"]  # a one-point curve: no extrapolation
    assert b_cell["mean"] is None and b_cell["empty"] == OUTSIDE
    assert rows[("a", "s2")]["values"]["a"]["accuracy"]["mean"] == pytest.approx(0.95)

    # where each strategy can be read in every seed, as fractions of full MACs
    assert table["cost_ranges"] == {"a": [pytest.approx(0.12), pytest.approx(0.3)],
                                    "b": [pytest.approx(0.22), pytest.approx(0.2)],  # its seeds do not overlap
                                    "c": [pytest.approx(0.15), pytest.approx(0.25)]}


def test_operating_points_add_a_policy_that_is_not_on_the_curve():
    curve = [_pt("p=1", 100, 0.5), _pt("p=2", 200, 0.6)]
    off = RunPoints(curve, _pt("budget=0.75", 150, 0.55)).operating_points()
    assert [(p["setting"], pol) for p, pol in off] == [("p=1", False), ("p=2", False), ("budget=0.75", True)]
    on = RunPoints(curve, _pt("p=2", 200, 0.6)).operating_points()
    assert [(p["setting"], pol) for p, pol in on] == [("p=1", False), ("p=2", True)]


def _results(strategy: str, gate: str, curve: list[dict], policy: dict, metrics: dict | None = None) -> dict:
    return {"policy": {"name": f"{strategy}+{gate}", "strategy": strategy, "gate": gate} | policy, "curve": curve,
            "metrics": metrics or {}, "backbone": {"test_accuracy": 0.9}, "full_macs": 1000.0,
            "dataset": {"name": "toy"}}


def test_a_single_setting_strategy_is_compared_at_its_cost_and_empty_cells_say_why():
    """JEI with one λ against a threshold curve: the baseline is read at JEI's cost; JEI's column elsewhere is
    empty, and the report says it lies outside JEI's cost range."""
    spec = {"label": "ECE (%)", "scale": 100.0, "digits": 2, "lower_is_better": True, "evaluator": "x"}
    jei = _results("jei", "jei", [], _pt("lambda=0.5", 400, 0.80, 0.05), {"ece": spec})
    base_curve = [_pt("p=1", 300, 0.60, 0.10), _pt("p=2", 500, 0.90, 0.02)]
    base = _results("im-only", "max_prob", base_curve, _pt("budget", 450, 0.85, 0.04), {"ece": spec})
    numbers = comparison_numbers({"jei": {0: jei}, "im-only": {0: base}})
    assert list(numbers["metrics"]) == ["accuracy", "ece"] and numbers["metrics"]["ece"] == spec
    assert numbers["summary"]["jei"]["ece"]["mean"] == pytest.approx(0.05)
    row = next(r for r in numbers["matched"]["rows"] if r["strategy"] == "jei")
    assert row["values"]["im-only"]["accuracy"]["mean"] == pytest.approx(0.75)  # 0.6 + 0.3 * 100/200
    assert row["values"]["im-only"]["ece"]["mean"] == pytest.approx(0.06)
    for r in (r for r in numbers["matched"]["rows"] if r["strategy"] == "im-only"):
        assert r["values"]["jei"]["accuracy"]["empty"] == OUTSIDE
    assert numbers["matched"]["cost_ranges"]["jei"] == [pytest.approx(0.4), pytest.approx(0.4)]

    comparison = {"backbone": "bb", "dataset": {"name": "toy"}, "seeds": [0], "strategies": [], **numbers,
                  "notes": ["a note"], "files": ["comparison.json", "accuracy_vs_macs.png"]}
    md = comparison_markdown(comparison)
    assert "— : outside that strategy's cost range [a, b] of full MACs" in md
    assert "| *cost range (fraction of full MACs)* |  | [0.400, 0.400] | [0.300, 0.500] |" in md
    assert "| jei [lambda=0.5] ★ | 0.400 | **80.00** | 75.00 |" in md
    assert "| im-only [p=1] | 0.300 | — | **60.00** |" in md
    assert "### ECE (%), lower is better" in md and "| jei [lambda=0.5] ★ | 0.400 | **5.00** | 6.00 |" in md
    assert "- a note" in md and "![accuracy_vs_macs.png](accuracy_vs_macs.png)" in md


def test_format_macs():
    assert [format_macs(m) for m in (950, 7_800, 45_600_000, 1.234e9)] == ["950", "7.8K", "45.6M", "1.23G"]
