"""`eedn compare` and `eedn report`: matched-cost interpolation (exact numbers), seed aggregation, the compare
directory a real two-seed comparison writes, and re-rendering it without training anything."""
from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import eedn.run
from eedn.compare import (
    COMPARE_FIGURES,
    ConformalChoice,
    RunPoints,
    StrategySpec,
    compare_command,
    interpolate_at,
    matched_cost_table,
    mean_std,
    parse_seeds,
    parse_strategies,
    policy_test_predictions,
    report_command,
    strategy_options_for,
)
from eedn.errors import EednError
from eedn.plots import reliability_bins

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

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


def _pt(setting: str, macs: float, acc: float, ece: float | None = None, size: float | None = None) -> dict:
    return {"setting": setting, "mean_macs": macs, "macs_fraction": macs / 1000.0, "accuracy": acc, "ece": ece,
            "set_size": size, "coverage": None, "exit_fractions": [1.0]}


def test_matched_cost_table_matches_a_hand_computation():
    a = {0: RunPoints([_pt("s1", 100, 0.5, 0.10, 3.0), _pt("s2", 300, 0.9, 0.05, 1.0)], _pt("s2", 300, 0.9, 0.05, 1.0)),
         1: RunPoints([_pt("s1", 120, 0.6, 0.20, 2.0), _pt("s2", 320, 1.0, 0.10, 1.5)], _pt("s2", 320, 1.0, 0.10, 1.5))}
    b = {0: RunPoints([], _pt("pol", 200, 0.70, 0.3, 2.5)),  # no curve: its policy is its only point
         1: RunPoints([], _pt("pol", 220, 0.75, 0.2, 2.0))}
    c = {0: RunPoints([_pt("c1", 150, 0.2), _pt("c2", 250, 0.4)], _pt("c1", 150, 0.2)),
         1: RunPoints([_pt("c1", 90, 0.1), _pt("c2", 400, 0.5)], _pt("c1", 90, 0.1))}
    table = matched_cost_table({"a": a, "b": b, "c": c})
    assert table["columns"] == ["a", "b", "c"]
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
    assert row["values"]["c"]["ece"]["mean"] is None  # c has no ECE at all
    own = row["values"]["b"]["accuracy"]  # a strategy's own cell is its measured value
    assert own["mean"] == pytest.approx(0.725)

    # a's cheapest point (100 / 120): c covers it only in seed 1 -> empty cell, n counts the seed in range
    cell = rows[("a", "s1")]["values"]["c"]["accuracy"]
    assert cell["mean"] is None and cell["n"] == 1
    assert rows[("a", "s1")]["values"]["b"]["accuracy"]["mean"] is None  # a one-point curve: no extrapolation
    assert rows[("a", "s2")]["values"]["a"]["accuracy"]["mean"] == pytest.approx(0.95)


def test_operating_points_add_a_policy_that_is_not_on_the_curve():
    curve = [_pt("p=1", 100, 0.5), _pt("p=2", 200, 0.6)]
    off = RunPoints(curve, _pt("budget=0.75", 150, 0.55)).operating_points()
    assert [(p["setting"], pol) for p, pol in off] == [("p=1", False), ("p=2", False), ("budget=0.75", True)]
    on = RunPoints(curve, _pt("p=2", 200, 0.6)).operating_points()
    assert [(p["setting"], pol) for p, pol in on] == [("p=1", False), ("p=2", True)]


# ------------------------------------------------------------------------------------------------- parsing


def test_parse_strategies_and_seeds():
    specs = parse_strategies("jei, im-only:entropy,im-only")
    assert specs == [StrategySpec("jei"), StrategySpec("im-only", "entropy"), StrategySpec("im-only")]
    assert [s.label for s in specs] == ["jei", "im-only+entropy", "im-only"]
    with pytest.raises(EednError, match="unknown strategy 'nope'"):
        parse_strategies("jei,nope")
    with pytest.raises(EednError, match="unknown gate 'nope'"):
        parse_strategies("im-only:nope")
    with pytest.raises(EednError, match="more than once"):
        parse_strategies("jei,jei")
    assert parse_seeds(3, None, None, 7) == [0, 1, 2]
    assert parse_seeds(None, "4,2", None, 7) == [4, 2]
    assert parse_seeds(None, None, None, 7) == [7]
    assert parse_seeds(None, None, 5, 7) == [5]
    with pytest.raises(EednError, match="only one of"):
        parse_seeds(2, "0,1", None, 0)
    with pytest.raises(EednError, match="--seed-list"):
        parse_seeds(None, "0,x", None, 0)


def test_strategy_options_precedence_and_lambda_only_for_jei():
    shared = {"epochs": 4, "lambda": [0.5]}
    per = {"jei": {"epochs": 6, "warmup_epochs": 1}, "im-only": {"lr": 0.1}, "im-only:entropy": {"lr": 0.2}}
    assert strategy_options_for(StrategySpec("jei"), shared, per, {"epochs": None, "lambda": [0.1, 1.0]}) == {
        "epochs": 6, "lambda": [0.1, 1.0], "warmup_epochs": 1}
    assert strategy_options_for(StrategySpec("im-only"), shared, per, {"epochs": 2, "lambda": 0.3}) == {
        "epochs": 2, "lr": 0.1}
    assert strategy_options_for(StrategySpec("im-only", "entropy"), shared, per, {}) == {"epochs": 4, "lr": 0.2}


def test_reliability_bins_agree_with_the_calibration_evaluator():
    from eedn_plugins.calibration import calibration_bins, expected_calibration_error

    gen = torch.Generator().manual_seed(0)
    conf = torch.rand(500, generator=gen, dtype=torch.float64)
    conf[:3] = torch.tensor([0.0, 1.0, 1 / 15], dtype=torch.float64)  # the bin edges
    correct = torch.rand(500, generator=gen) < conf
    mine = reliability_bins(conf.numpy(), correct.numpy())
    ref = calibration_bins(conf, correct)
    assert mine["count"] == ref["count"].tolist()
    filled = ref["count"] > 0
    assert np.allclose(np.asarray(mine["accuracy"])[filled.numpy()], ref["accuracy"][filled].numpy())
    assert mine["ece"] == pytest.approx(expected_calibration_error(conf, correct))


# ------------------------------------------------------------------------------ a real two-seed comparison

#: an untrained backbone (0 epochs; still built, cached and shared per seed): these tests check the comparison
#: machinery, not accuracy, and must stay fast on two cores
TINY_COMPARE = {
    "backbone": "resnet_tiny",
    "image_size": 8,
    "backbone_training": {"epochs": 0},
    "progress": False,
    "strategies": {"jei": {"epochs": 2, "warmup_epochs": 1, "lambda": [0.1, 1.0]}, "im-only": {"epochs": 1}},
}


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """One two-seed comparison of jei and im-only (patience gate: a two-point budget sweep keeps it fast)."""
    root = tmp_path_factory.mktemp("compare")
    config = root / "compare.yaml"
    config.write_text(json.dumps(TINY_COMPARE))  # JSON is YAML
    out = root / "out"
    res = CliRunner().invoke(compare_command, [
        "--strategies", "jei,im-only:patience", "--seeds", "2", "--config", str(config),
        "--cache-dir", str(root / "cache"), "--out", str(out), "--quiet"], terminal_width=200)
    assert res.exit_code == 0, res.output
    return out, res.output, config


def test_compare_writes_runs_comparison_and_report(compared):
    out, output, _ = compared
    comparison = json.loads((out / "comparison.json").read_text())
    assert comparison["kind"] == "comparison" and comparison["seeds"] == [0, 1]
    assert [e["label"] for e in comparison["strategies"]] == ["jei", "im-only+patience"]
    assert [e["gate"] for e in comparison["strategies"]] == ["jei", "patience"]
    assert comparison["conformal"] == {"alpha": 0.05, "method": "lac", "variant": "general"}
    jei_opts = comparison["strategies"][0]["options"]
    assert jei_opts["lambda"] == [0.1, 1.0] and comparison["strategies"][1]["options"] == {"epochs": 1}
    for key in ("summary", "curves", "matched", "reliability", "files", "config", "dataset"):
        assert key in comparison
    assert "strategies" not in comparison["config"]

    runs = {}
    for e in comparison["strategies"]:
        for seed in ("0", "1"):
            run_dir = out / e["runs"][seed]
            assert run_dir.name == f"{e['label']}-s{seed}"
            runs[(e["label"], int(seed))] = json.loads((run_dir / "results.json").read_text())
    # one backbone per seed, shared by both strategies
    for seed in (0, 1):
        paths = {runs[(label, seed)]["backbone"]["cache_path"] for label in ("jei", "im-only+patience")}
        assert len(paths) == 1
    assert runs[("jei", 0)]["backbone"]["cache_path"] != runs[("jei", 1)]["backbone"]["cache_path"]
    assert runs[("jei", 0)]["config"]["strategy_options"]["lambda"] == [0.1, 1.0]
    assert "lambda" not in runs[("im-only+patience", 0)]["config"]["strategy_options"]

    # policy summary = mean over seeds of each run's policy
    acc = comparison["summary"]["jei"]["accuracy"]
    seeds_acc = [runs[("jei", s)]["policy"]["accuracy"] for s in (0, 1)]
    assert acc["mean"] == pytest.approx(np.mean(seeds_acc)) and acc["std"] == pytest.approx(np.std(seeds_acc, ddof=1))
    assert acc["n"] == 2

    # matched table: one row per operating point, every strategy in every row
    matched = comparison["matched"]
    n_points = {"jei": 2, "im-only+patience": 3}  # jei: two λ (policy = λ=0.1); patience: k=1, k=2 + budget policy
    for label, n in n_points.items():
        assert sum(r["strategy"] == label for r in matched["rows"]) == n
    for row in matched["rows"]:
        assert set(row["values"]) == {"jei", "im-only+patience"}
        for cell in row["values"].values():
            assert set(cell) == {"accuracy", "ece", "set_size"}
    # a cross cell, recomputed by hand from the per-seed results.json files
    row = next(r for r in matched["rows"] if r["strategy"] == "im-only+patience" and r["setting"] == "k=2")
    expected = []
    for s in (0, 1):
        x = next(p for p in runs[("im-only+patience", s)]["curve"] if p["setting"] == "k=2")["mean_macs"]
        curve = runs[("jei", s)]["curve"] or [runs[("jei", s)]["policy"]]
        expected.append(interpolate_at([(p["mean_macs"], p["accuracy"]) for p in curve], x))
    cell = row["values"]["jei"]["accuracy"]
    if None in expected:
        assert cell["mean"] is None
    else:
        assert cell["mean"] == pytest.approx(np.mean(expected))

    md = (out / "comparison.md").read_text()
    assert "## Matched-cost comparison" in md and "| jei |" in md and "im-only+patience [k=2]" in md
    assert "accuracy % at matched mean MACs" in output


def test_compare_figures_are_real_pngs(compared):
    from PIL import Image

    out, _, config = compared
    for name in COMPARE_FIGURES:
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC, name
        assert len(data) > 10_000, name
        with Image.open(out / name) as im:
            assert im.size[0] >= 500 and im.size[1] >= 300


def test_reliability_of_a_run_reproduces_its_policy_ece(compared):
    out, _, config = compared
    for run in ("jei-s0", "im-only+patience-s1"):
        results = json.loads((out / run / "results.json").read_text())
        conf, correct = policy_test_predictions(out / run, results)
        assert len(conf) == results["dataset"]["sizes"]["test"]
        assert reliability_bins(conf, correct)["ece"] == pytest.approx(results["policy"]["ece"], abs=1e-9)


def test_report_rebuilds_a_comparison_without_training(compared, tmp_path, monkeypatch):
    out, _, config = compared
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    before = json.loads((copy / "comparison.json").read_text())
    (copy / "comparison.md").unlink()
    (copy / "reliability.png").unlink()

    def boom(*args, **kwargs):
        raise AssertionError("eedn report must not prepare, train or evaluate anything")

    monkeypatch.setattr(eedn.run, "prepare", boom)
    monkeypatch.setattr(eedn.run, "run_strategy", boom)
    res = CliRunner().invoke(report_command, [str(copy)], terminal_width=200)
    assert res.exit_code == 0, res.output
    assert (copy / "comparison.md").exists() and (copy / "reliability.png").read_bytes()[:8] == PNG_MAGIC
    after = json.loads((copy / "comparison.json").read_text())
    assert after["matched"] == before["matched"] and after["summary"] == before["summary"]
    assert after["created"] == before["created"] and "rendered" in after

    # another conformal level re-renders the set sizes (α = 0.1 sets are never larger than α = 0.05 ones)
    res = CliRunner().invoke(report_command, [str(copy), "--alpha", "0.1", "--quiet"])
    assert res.exit_code == 0, res.output
    alpha10 = json.loads((copy / "comparison.json").read_text())
    assert alpha10["conformal"]["alpha"] == 0.1
    for label, s in alpha10["summary"].items():
        assert s["set_size"]["mean"] <= before["summary"][label]["set_size"]["mean"] + 1e-12

    # and --resume reuses finished runs of the same config instead of training them again
    res = CliRunner().invoke(compare_command, [
        "--strategies", "jei,im-only:patience", "--seeds", "2", "--config", str(config), "--out", str(copy),
        "--cache-dir", str(tmp_path / "empty-cache"), "--resume", "--quiet"], terminal_width=200)
    assert res.exit_code == 0, res.output
    # ... but not runs of another config
    res = CliRunner().invoke(compare_command, [
        "--strategies", "jei,im-only:patience", "--seeds", "2", "--config", str(config), "--out", str(copy),
        "--epochs", "3", "--resume", "--quiet"], terminal_width=200)
    assert res.exit_code == 1 and "must not prepare" in res.output


def test_report_on_a_single_run(compared, tmp_path, monkeypatch):
    out, _, config = compared
    run = tmp_path / "run"
    shutil.copytree(out / "jei-s0", run)
    (run / "summary.md").unlink()
    monkeypatch.setattr(eedn.run, "prepare", lambda *a, **k: (_ for _ in ()).throw(AssertionError("no training")))
    res = CliRunner().invoke(report_command, [str(run)], terminal_width=200)
    assert res.exit_code == 0, res.output
    for name in ("summary.md", "accuracy_vs_macs.png", "reliability.png", "exit_shares.png", "ece_vs_macs.png",
                 "set_size_vs_macs.png"):
        assert (run / name).exists(), name


def test_cli_errors_are_one_line(tmp_path):
    res = CliRunner().invoke(compare_command, ["--strategies", "jei,nope", "--quiet"])
    assert res.exit_code == 1 and "unknown strategy 'nope'" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(compare_command, ["--strategies", "jei", "--seeds", "2", "--seed-list", "0,1"])
    assert res.exit_code == 1 and "only one of" in res.output
    res = CliRunner().invoke(compare_command, ["--strategies", "im-only", "--set", "strategies.im-only.nope=1"])
    assert res.exit_code == 1 and "nope" in res.output
    res = CliRunner().invoke(report_command, [str(tmp_path)])
    assert res.exit_code == 1 and "neither comparison.json" in res.output
    assert ConformalChoice().describe() == "LAC, α = 0.05, general q̂"
