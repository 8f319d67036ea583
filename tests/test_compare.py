"""`eedn compare` and `eedn report`: parsing, the compare directory a real two-seed comparison writes (with a
test evaluator plugin whose headline metric flows through every file with no core change), and re-rendering
runs and comparisons from their files without training anything."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import numpy_interpolation

import eedn
import eedn.pipeline.run
from eedn.cli.compare import compare_command
from eedn.cli.report import report_command
from eedn.pipeline.comparison import StrategySpec, parse_seeds, parse_strategies, strategy_options_for
from eedn.runtime.errors import EednError
from eedn.core.outputs import reliability_bins
from eedn.core.plugins import register_plugin, unregister_plugin

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FIGURES = ("accuracy_vs_macs.png", "mean_confidence_vs_macs.png", "exit_shares.png", "reliability.png")

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


def test_strategy_options_precedence_and_the_tradeoff_goes_where_declared():
    from eedn.pipeline.comparison import check_shared_options

    shared = {"epochs": 4, "lambda": [0.5]}  # `lambda` is declared by jei only: the others do not get it
    per = {"jei": {"epochs": 6, "warmup_epochs": 1}, "im-only": {"lr": 0.1}, "im-only:entropy": {"lr": 0.2}}
    assert strategy_options_for(StrategySpec("jei"), shared, per, {"epochs": None, "tradeoff": [0.1, 1.0]}) == {
        "epochs": 6, "lambda": [0.1, 1.0], "warmup_epochs": 1}
    assert strategy_options_for(StrategySpec("im-only"), shared, per, {"epochs": 2, "tradeoff": 0.3}) == {
        "epochs": 2, "lr": 0.1}
    assert strategy_options_for(StrategySpec("im-only", "entropy"), shared, per, {}) == {"epochs": 4, "lr": 0.2}
    check_shared_options([StrategySpec("jei"), StrategySpec("im-only")], shared)
    with pytest.raises(EednError, match="strategy_options epochz is declared by none of the compared strategies"):
        check_shared_options([StrategySpec("jei"), StrategySpec("im-only")], {"epochz": 3})


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


def test_the_comparison_modules_name_no_plugin():
    root = Path(eedn.__file__).parent
    for name in ("evaluation/matched", "pipeline/comparison", "cli/compare", "cli/report", "report/render",
                 "report/plots"):
        text = (root / f"{name}.py").read_text()
        assert not re.search(r"conformal|calibration", text, re.IGNORECASE), name


# --------------------------------------------------------------------------- a test evaluator, as a plugin


class MeanConfidence(eedn.Evaluator):
    """Mean max-softmax of the gated prediction: a headline number the core has never heard of."""

    name = "test-confidence"

    def evaluate(self, test, cal, exit_test, exit_cal) -> dict:
        conf = test.gated_logits(exit_test).double().softmax(-1).max(-1).values
        return {"mean_confidence": float(conf.mean()), "n": int(conf.numel())}

    def headline_metrics(self) -> dict:
        return {"mean_confidence": eedn.Metric("mean confidence (%)", scale=100.0, digits=1, lower_is_better=False)}

    def headline(self, metrics: dict) -> dict:
        return {"mean_confidence": metrics["mean_confidence"]}

    def rows(self, metrics: dict) -> list[dict]:
        return [{"prediction": "gated", "mean_confidence": metrics["mean_confidence"], "samples": metrics["n"]}]


class ConfidencePlugin:
    @eedn.hookimpl
    def register_evaluators(self, register):
        register("test-confidence", MeanConfidence, description="mean confidence of the gated prediction")


PLUGIN_NAME = "test-compare-confidence"

#: an untrained backbone (0 epochs; still built, cached and shared per seed): these tests check the comparison
#: machinery, not accuracy, and must stay fast on two cores
TINY_COMPARE = {
    "backbone": "resnet_tiny",
    "image_size": 8,
    "backbone_training": {"epochs": 0},
    "progress": False,
    "evaluators": ["test-confidence"],
    "strategies": {"jei": {"epochs": 2, "warmup_epochs": 1, "lambda": [0.1, 1.0]}, "im-only": {"epochs": 1}},
}


@pytest.fixture(scope="module")
def plugin():
    register_plugin(ConfidencePlugin(), name=PLUGIN_NAME)
    yield
    unregister_plugin(PLUGIN_NAME)


@pytest.fixture(scope="module")
def compared(tmp_path_factory, plugin):
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


def _runs(out: Path, comparison: dict) -> dict:
    runs = {}
    for e in comparison["strategies"]:
        for seed in ("0", "1"):
            run_dir = out / e["runs"][seed]
            assert run_dir.name == f"{e['label']}-s{seed}"
            runs[(e["label"], int(seed))] = json.loads((run_dir / "results.json").read_text())
    return runs


def test_compare_writes_runs_comparison_and_report(compared):
    out, output, _ = compared
    comparison = json.loads((out / "comparison.json").read_text())
    assert comparison["kind"] == "comparison" and comparison["seeds"] == [0, 1]
    assert [e["label"] for e in comparison["strategies"]] == ["jei", "im-only+patience"]
    assert [e["gate"] for e in comparison["strategies"]] == ["jei", "patience"]
    jei_opts = comparison["strategies"][0]["options"]
    assert jei_opts["lambda"] == [0.1, 1.0] and comparison["strategies"][1]["options"] == {"epochs": 1}
    for key in ("summary", "curves", "matched", "metrics", "reliability", "files", "config", "dataset"):
        assert key in comparison
    assert "strategies" not in comparison["config"]

    runs = _runs(out, comparison)
    # one backbone per seed, shared by both strategies; 0 epochs: said plainly, never cached as trained
    for seed in (0, 1):
        backbones = [runs[(label, seed)]["backbone"] for label in ("jei", "im-only+patience")]
        assert {b["source"] for b in backbones} == {"untrained"} and "cache_path" not in backbones[0]
        assert len({b["test_accuracy"] for b in backbones}) == 1
    assert runs[("jei", 0)]["config"]["strategy_options"]["lambda"] == [0.1, 1.0]
    assert "lambda" not in runs[("im-only+patience", 0)]["config"]["strategy_options"]

    # policy summary = mean over seeds of each run's policy
    acc = comparison["summary"]["jei"]["accuracy"]
    seeds_acc = [runs[("jei", s)]["policy"]["accuracy"] for s in (0, 1)]
    assert acc["mean"] == pytest.approx(np.mean(seeds_acc)) and acc["std"] == pytest.approx(np.std(seeds_acc, ddof=1))
    assert acc["n"] == 2

    # matched table: one row per operating point, every strategy and metric in every row
    matched = comparison["matched"]
    n_points = {"jei": 2, "im-only+patience": 3}  # jei: two λ (policy = λ=0.1); patience: k=1, k=2 + budget policy
    for label, n in n_points.items():
        # rows with identical numbers are one row listing their settings (an untrained backbone can make both λ equal)
        assert sum(len(r["settings"]) for r in matched["rows"] if r["strategy"] == label) == n
    own = "max_prob thresholds on jei's IMs"  # the learned gate's own IMs under max-prob thresholds: one more column
    assert matched["columns"] == ["jei", own, "im-only+patience"]
    for row in matched["rows"]:
        assert set(row["values"]) == {"jei", own, "im-only+patience"}
        for cell in row["values"].values():
            assert set(cell) == {"accuracy", "mean_confidence"}
    thr = runs[("jei", 0)]["threshold_on_own_ims"]
    assert thr["policy_setting"] == "lambda=0.1" and set(thr["curves"]) == {"lambda=0.1", "lambda=1"}
    own_rows = [r for r in matched["rows"] if r["strategy"] == own]
    assert sum(len(r["settings"]) for r in own_rows) == len({p["setting"] for p in thr["curves"]["lambda=0.1"]})
    assert comparison["summary"][own]["gate"] == "max_prob"
    assert all(r["values"][own]["mean_confidence"]["empty"] == "missing" for r in own_rows)  # no evaluators there
    # the cross cells (one strategy's accuracy at the other's costs), recomputed from the per-seed results.json
    # files with numpy's linear interpolation (not eedn's): a value where both seeds' curves span the cost, else
    # "outside". Cells of both kinds must occur, so neither branch goes untested.
    checked = {"value": 0, "outside": 0}
    for row, other in ((r, o) for r in matched["rows"] for o in ("jei", "im-only+patience") if r["strategy"] != o
                       and r["strategy"] in ("jei", "im-only+patience")):
        expected = []
        for s in (0, 1):
            own_run = runs[(row["strategy"], s)]
            x = next(p for p in own_run["curve"] + [own_run["policy"]] if p.get("setting") == row["settings"][0])
            curve = runs[(other, s)]["curve"] or [runs[(other, s)]["policy"]]
            expected.append(numpy_interpolation([(p["mean_macs"], p["accuracy"]) for p in curve], x["mean_macs"]))
        cell = row["values"][other]["accuracy"]
        if any(e is None for e in expected):
            assert (cell["mean"], cell["empty"]) == (None, "outside"), (row["strategy"], row["setting"], other)
            checked["outside"] += 1
        else:
            assert cell["mean"] == pytest.approx(np.mean(expected), abs=1e-9), (row["strategy"], row["setting"])
            checked["value"] += 1
    assert checked["value"] >= 1 and checked["outside"] >= 1, checked

    md = (out / "comparison.md").read_text()
    # k=2 may share its row with the reported budget point when their numbers are identical (collapsed rows)
    assert "## Matched-cost comparison" in md and "| jei |" in md and re.search(r"im-only\+patience \[k=2[,\]]", md)
    assert "accuracy % at matched mean MACs" in output
    # every run directory got its own report through the same rendering
    for label, seed in runs:
        run_dir = out / f"{label}-s{seed}"
        assert (run_dir / "summary.md").exists() and all((run_dir / f).exists() for f in FIGURES)


def test_an_evaluator_plugin_headline_reaches_every_file(compared):
    """The test evaluator's headline number: in results.json (metrics and every point), in comparison.json and
    comparison.md, and drawn against MACs, though nothing in eedn/ knows it."""
    out, _, _ = compared
    comparison = json.loads((out / "comparison.json").read_text())
    runs = _runs(out, comparison)
    spec = {"label": "mean confidence (%)", "scale": 100.0, "digits": 1, "lower_is_better": False,
            "evaluator": "test-confidence"}
    for results in runs.values():
        assert results["metrics"] == {"mean_confidence": spec}
        for point in [results["policy"], *results["curve"]]:
            assert 0 < point["mean_confidence"] <= 1
        assert results["evaluators"]["test-confidence"]["rows"][0]["prediction"] == "gated"
    assert comparison["metrics"]["mean_confidence"] == spec and list(comparison["metrics"])[0] == "accuracy"
    assert comparison["matched"]["metrics"] == ["accuracy", "mean_confidence"]
    mean = np.mean([runs[("jei", s)]["policy"]["mean_confidence"] for s in (0, 1)])
    assert comparison["summary"]["jei"]["mean_confidence"]["mean"] == pytest.approx(mean)
    md = (out / "comparison.md").read_text()
    assert "### mean confidence (%), higher is better" in md and f"{100 * mean:.1f} ± " in md
    assert "mean_confidence_vs_macs.png" in comparison["files"]
    summary = (out / "jei-s0" / "summary.md").read_text()
    assert "## test-confidence (reported policy)" in summary and "mean confidence (%)" in summary


def test_compare_figures_are_real_pngs(compared):
    from PIL import Image

    out, _, _ = compared
    for name in FIGURES:
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC, name
        assert len(data) > 10_000, name
        with Image.open(out / name) as im:
            assert im.size[0] >= 500 and im.size[1] >= 300


def test_reliability_comes_from_the_stored_policy_decisions(compared):
    """run.json's per-sample confidences reproduce the policy's accuracy and the evaluator's mean confidence."""
    out, _, _ = compared
    for run in ("jei-s0", "im-only+patience-s1"):
        results = json.loads((out / run / "results.json").read_text())
        test = json.loads((out / run / "run.json").read_text())["policy"]["test"]
        assert len(test["confidence"]) == results["dataset"]["sizes"]["test"]
        bins = reliability_bins(test["confidence"], [p == y for p, y in zip(test["prediction"], test["label"])])
        hits = np.nansum(np.asarray(bins["accuracy"]) * np.asarray(bins["count"]))
        assert hits / bins["n"] == pytest.approx(results["policy"]["accuracy"])
        conf = np.nansum(np.asarray(bins["confidence"]) * np.asarray(bins["count"]))
        assert conf / bins["n"] == pytest.approx(results["policy"]["mean_confidence"], abs=1e-6)
    comparison = json.loads((out / "comparison.json").read_text())
    assert comparison["reliability"]["jei"]["n"] == 2 * results["dataset"]["sizes"]["test"]  # pooled over seeds


def test_report_rebuilds_a_comparison_without_training(compared, tmp_path, monkeypatch):
    out, _, config = compared
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    before = json.loads((copy / "comparison.json").read_text())
    (copy / "comparison.md").unlink()
    (copy / "reliability.png").unlink()

    def boom(*args, **kwargs):
        raise AssertionError("eedn report must not prepare, train or evaluate anything")

    monkeypatch.setattr(eedn.pipeline.run, "prepare", boom)
    monkeypatch.setattr(eedn.pipeline.run, "run_strategy", boom)
    res = CliRunner().invoke(report_command, [str(copy)], terminal_width=200)
    assert res.exit_code == 0, res.output
    assert (copy / "comparison.md").exists() and (copy / "reliability.png").read_bytes()[:8] == PNG_MAGIC
    after = json.loads((copy / "comparison.json").read_text())
    assert after["matched"] == before["matched"] and after["summary"] == before["summary"]
    assert after["reliability"] == before["reliability"]
    assert after["created"] == before["created"] and "rendered" in after

    # --resume reuses finished runs of the same config instead of training them again
    res = CliRunner().invoke(compare_command, [
        "--strategies", "jei,im-only:patience", "--seeds", "2", "--config", str(config), "--out", str(copy),
        "--cache-dir", str(tmp_path / "empty-cache"), "--resume", "--quiet"], terminal_width=200)
    assert res.exit_code == 0, res.output
    # ... but not runs of another config: those directories are refused before anything is trained (never
    # silently overwritten); with overwrite they are trained again
    res = CliRunner().invoke(compare_command, [
        "--strategies", "jei,im-only:patience", "--seeds", "2", "--config", str(config), "--out", str(copy),
        "--epochs", "3", "--resume", "--quiet"], terminal_width=200)
    assert res.exit_code == 1 and "jei-s0 already holds files; pass --overwrite" in res.output
    res = CliRunner().invoke(compare_command, [
        "--strategies", "jei,im-only:patience", "--seeds", "2", "--config", str(config), "--out", str(copy),
        "--epochs", "3", "--resume", "--set", "overwrite=true", "--quiet"], terminal_width=200)
    assert res.exit_code == 1 and "must not prepare" in res.output


def test_report_on_a_single_run(compared, tmp_path, monkeypatch):
    out, _, _ = compared
    run = tmp_path / "run"
    shutil.copytree(out / "jei-s0", run)
    for name in ("summary.md", *FIGURES):
        (run / name).unlink()
    monkeypatch.setattr(eedn.pipeline.run, "prepare", lambda *a, **k: (_ for _ in ()).throw(AssertionError("no training")))
    res = CliRunner().invoke(report_command, [str(run)], terminal_width=200)
    assert res.exit_code == 0, res.output
    for name in ("summary.md", *FIGURES):
        assert (run / name).exists(), name
    # a learned gate is shown beside max-prob thresholds on its own IMs
    assert re.search(r"exits of jei\s*$", res.output, re.M) and "max_prob thresholds on jei's IMs" in res.output
    assert "jei+jei" not in res.output  # a default gate is not repeated in the label
    assert "accuracy % at matched mean MACs" in res.output
    assert "## Learned gate vs thresholds on the same IMs" in (run / "summary.md").read_text()


def test_runs_of_an_older_eedn_are_refused_in_one_line(compared, tmp_path):
    out, _, _ = compared
    shutil.copytree(out, tmp_path / "cmp")
    (tmp_path / "cmp" / "jei-s1" / "run.json").unlink()
    for path in (tmp_path / "cmp" / "jei-s1", tmp_path / "cmp"):
        res = CliRunner().invoke(report_command, [str(path)])
        assert res.exit_code == 1 and "older eedn" in res.output and "Traceback" not in res.output
        assert len(res.output.strip().splitlines()) == 1


def test_cli_errors_are_one_line_and_come_before_training(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("trained before checking the options")

    monkeypatch.setattr(eedn.pipeline.run, "prepare", boom)
    res = CliRunner().invoke(compare_command, ["--strategies", "jei,nope", "--quiet"])
    assert res.exit_code == 1 and "unknown strategy 'nope'" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(compare_command, ["--strategies", "jei", "--seeds", "2", "--seed-list", "0,1"])
    assert res.exit_code == 1 and "only one of" in res.output
    for bad in ("strategies.im-only.nope=1", "gate_options.nope=1", "evaluator_options.nope.x=1"):
        res = CliRunner().invoke(compare_command, ["--strategies", "jei,im-only", "--set", bad, "--quiet",
                                                   "--out", str(tmp_path / "out")])
        assert res.exit_code == 1 and "nope" in res.output and "trained before" not in res.output, bad
    res = CliRunner().invoke(report_command, [str(tmp_path)])
    assert res.exit_code == 1 and "neither comparison.json" in res.output
    help_text = " ".join(CliRunner().invoke(compare_command, ["--help"]).output.split())
    assert "--set evaluator_options.NAME.OPTION=VALUE" in help_text
