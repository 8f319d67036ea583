"""What reports show beyond the matched table: the anytime score, duplicate operating points as one row, the
figures' shared colours and clipped shares, wide terminal tables in logs, and `eedn bench` timings beside MACs."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest

from eedn.evaluation.matched import (RunPoints, anytime_scores, area_under, comparison_numbers,
                                     collapse_duplicate_rows)
from eedn.report import plots
from eedn.report.render import BENCH, comparison_markdown, exit_latencies, exits_table, run_label
from eedn.report.terminal import PIPE_WIDTH, print_comparison, report_console
from eedn.runtime.errors import EednError


def _pt(setting: str, macs: float, acc: float) -> dict:
    return {"setting": setting, "mean_macs": macs, "macs_fraction": macs / 1000.0, "accuracy": acc,
            "exit_fractions": [0.5, 0.5]}


def _results(strategy: str, curve: list[dict], policy: dict, gate: str | None = None) -> dict:
    return {"policy": {"name": f"{strategy}+{gate or strategy}", "strategy": strategy, "gate": gate or "max_prob"}
            | policy, "curve": curve, "metrics": {}, "backbone": {"test_accuracy": 0.9}, "full_macs": 1000.0,
            "dataset": {"name": "toy"}, "config": {"gate": gate}}


# ------------------------------------------------------------------------------------------------- anytime


def test_area_under_is_the_mean_of_the_curve_over_the_range():
    rng = np.random.default_rng(0)
    xs = np.sort(rng.uniform(0.2, 1.0, 9))
    ys = rng.uniform(0.3, 0.9, 9)
    lo, hi = float(xs[1] + 0.01), float(xs[-2] - 0.02)
    grid = np.linspace(lo, hi, 200_001)
    reference = float(np.trapezoid(np.interp(grid, xs, ys), grid) / (hi - lo))
    assert area_under(list(zip(xs, ys)), lo, hi) == pytest.approx(reference, rel=1e-8)
    assert area_under([(0.2, 0.5), (0.6, 0.9)], 0.2, 0.6) == pytest.approx(0.7)  # a line: its midpoint value
    assert area_under([(0.3, 0.5), (0.6, 0.9)], 0.2, 0.6) is None  # not covered: no extrapolation
    assert area_under([(0.3, 0.5)], 0.3, 0.3) is None


def test_anytime_scores_per_strategy_over_the_shared_range_with_seeds():
    a = {0: RunPoints([_pt("p=1", 200, 0.5), _pt("p=2", 800, 0.8)], _pt("p=2", 800, 0.8)),
         1: RunPoints([_pt("p=1", 200, 0.6), _pt("p=2", 800, 0.9)], _pt("p=2", 800, 0.9))}
    b = {0: RunPoints([_pt("k=1", 400, 0.7), _pt("k=2", 1000, 0.7)], _pt("k=1", 400, 0.7)),
         1: RunPoints([_pt("k=1", 400, 0.6), _pt("k=2", 1000, 0.6)], _pt("k=1", 400, 0.6))}
    single = {0: RunPoints([], _pt("lambda=1", 500, 0.75)), 1: RunPoints([], _pt("lambda=1", 500, 0.7))}
    scores = anytime_scores({"a": a, "b": b, "jei": single})
    assert scores["range"] == [pytest.approx(0.4), pytest.approx(0.8)] and scores["source"] == "shared"
    # a over [0.4, 0.8]: the mean of its line there, 0.5 + 0.3 * (0.6 - 0.2) / 0.6 per seed (+ 0.1 in seed 1)
    s0, s1 = 0.5 + 0.3 * 0.4 / 0.6, 0.6 + 0.3 * 0.4 / 0.6
    assert scores["scores"]["a"]["mean"] == pytest.approx((s0 + s1) / 2)
    assert scores["scores"]["a"]["std"] == pytest.approx(np.std([s0, s1], ddof=1))
    assert scores["scores"]["b"]["mean"] == pytest.approx(0.65)
    assert scores["scores"]["jei"]["mean"] is None  # one cost has no area
    given = anytime_scores({"a": a, "b": b}, (0.4, 0.6))
    assert given["range"] == [0.4, 0.6] and given["source"] == "given"
    assert anytime_scores({"a": a}, (0.1, 0.6))["scores"]["a"]["mean"] is None  # a starts at 0.2
    with pytest.raises(EednError, match="anytime range"):
        anytime_scores({"a": a}, (0.6, 0.4))


def test_the_anytime_score_is_in_every_comparison_report():
    runs = {"a": {0: _results("a", [_pt("p=1", 200, 0.5), _pt("p=2", 800, 0.8)], _pt("p=2", 800, 0.8))},
            "b": {0: _results("b", [_pt("k=1", 400, 0.7), _pt("k=2", 1000, 0.7)], _pt("k=1", 400, 0.7))}}
    numbers = comparison_numbers(runs)
    comparison = {"backbone": "bb", "dataset": {"name": "toy"}, "seeds": [0], "strategies": [], **numbers}
    md = comparison_markdown(comparison)
    assert "## Anytime score" in md and "| a | 70.00 | 1 of 1 |" in md and "| b | 70.00 | 1 of 1 |" in md
    out = io.StringIO()
    print_comparison(comparison, report_console(out))
    assert "anytime score (mean accuracy % over MACs fractions [0.400, 0.800]): a 70.00; b 70.00" in out.getvalue()


# ---------------------------------------------------------------------------------------------- duplicates


def test_duplicate_operating_points_collapse_into_one_row():
    curve = [_pt("p=1", 200, 0.5), _pt("p=2", 200, 0.5), _pt("p=3", 200, 0.5), _pt("p=4", 600, 0.7)]
    runs = {"a": {0: _results("a", curve, _pt("p=3", 200, 0.5))}}
    rows = comparison_numbers(runs)["matched"]["rows"]
    assert [r["setting"] for r in rows] == ["p=1 … p=3 (3 settings)", "p=4"]
    assert [r["policy"] for r in rows] == [True, False]
    assert rows[0]["settings"] == ["p=1", "p=2", "p=3"]
    # the same numbers in another strategy, or different numbers at the same cost, stay separate rows
    row = {"strategy": "a", "setting": "x", "policy": False, "seeds": [0], "mean_macs": {"mean": 1.0},
           "macs_fraction": {"mean": 0.1}, "values": {"a": {"accuracy": {"mean": 0.5}}}}
    other = dict(row, values={"a": {"accuracy": {"mean": 0.6}}}, setting="y")
    assert len(collapse_duplicate_rows([row, dict(row, strategy="b"), other])) == 3


# ------------------------------------------------------------------------------------------------- figures


def test_labels_name_the_gate_only_when_it_is_not_the_default():
    assert run_label(_results("jei", [], _pt("l", 1, 0.5))) == "jei"
    assert run_label(_results("im-only", [], _pt("l", 1, 0.5), gate="entropy")) == "im-only+entropy"


def test_every_figure_gets_the_same_colour_per_strategy(tmp_path, monkeypatch):
    from eedn.report.render import draw_figures

    seen: dict[str, dict] = {}
    for name in ("plot_metric_vs_macs", "plot_exit_shares", "plot_reliability"):
        monkeypatch.setattr(plots, name, lambda *a, _n=name, **k: seen.__setitem__(_n, k["colors"]))
    runs = {"a": {0: _results("a", [_pt("p=1", 200, 0.5)], _pt("p=1", 200, 0.5))},
            "b": {0: _results("b", [_pt("k=1", 400, 0.7)], _pt("k=1", 400, 0.7))}}
    comparison = {"backbone": "bb", "dataset": {"name": "toy"}, "seeds": [0], **comparison_numbers(runs),
                  "reliability": {"b": {}}}  # reliability lists only some strategies: b keeps b's colour
    draw_figures(tmp_path, comparison)
    assert seen["plot_metric_vs_macs"] == seen["plot_exit_shares"] == seen["plot_reliability"]
    assert seen["plot_reliability"]["b"] != seen["plot_reliability"]["a"]


def test_exit_share_error_bars_stay_between_0_and_100_percent():
    mean = np.array([99.5, 0.3, 0.2])
    bars = plots.share_error_bars(mean, np.array([1.2, 0.6, 0.1]))
    assert np.all(mean - bars[0] >= 0) and np.all(mean + bars[1] <= 100)
    assert bars[1][0] == pytest.approx(0.5) and bars[0][1] == pytest.approx(0.3) and bars[0][2] == pytest.approx(0.1)


def test_real_figures_render_with_long_labels(tmp_path):
    curves = {"max_prob thresholds on jei's IMs": {
        "points": [{"macs_fraction": {"mean": x, "std": 0.01}, "m": {"mean": 8 - x, "std": 0.4}}
                   for x in np.linspace(0.4, 0.9, 30)],
        "policy": {"macs_fraction": {"mean": 0.6, "std": 0.02}, "m": {"mean": 7.4, "std": 0.3}}}}
    long = "mean conformal set size (LAC, α = 0.05, general q̂), lower is better"
    path = plots.plot_metric_vs_macs(curves, "m", tmp_path / "m.png", ylabel=long, title=long + " vs compute: x",
                                     n_seeds=2)
    assert path.read_bytes().startswith(b"\x89PNG")
    assert all(len(line) <= plots.TITLE_CHARS for line in plots.wrap(long * 2, plots.TITLE_CHARS).split("\n"))


# ------------------------------------------------------------------------------------------------ terminal


def test_tables_are_not_cut_at_80_columns_without_a_terminal(monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    console = report_console(io.StringIO())
    assert console.width == PIPE_WIDTH


def test_bench_timings_appear_beside_the_macs(tmp_path):
    results = {"full_macs": 1000.0, "exits": [{"index": 0, "macs": 300.0, "accuracy": 0.5},
                                              {"index": 1, "macs": 1000.0, "accuracy": 0.8}]}
    assert exit_latencies(tmp_path) is None
    rows = [{"batch_size": 32, "exit_seconds": [0.001, 0.003]}, {"batch_size": 1, "exit_seconds": [0.002, 0.005]}]
    (tmp_path / BENCH).write_text(json.dumps(rows))
    latency = exit_latencies(tmp_path)
    assert latency == (1, [pytest.approx(2.0), pytest.approx(5.0)])
    table = exits_table(results, latency)
    assert "latency ms/image (batch 1, eedn bench)" in table[0]
    assert table[2] == "| 0 | 300 | 0.300 | 2.000 | 0.5000 |"


def test_eedn_bench_leaves_timings_that_the_run_report_shows(tiny_config, tmp_path):
    from click.testing import CliRunner
    from PIL import Image

    from eedn.cli.deploy_commands import bench
    from eedn.cli.report import report_command
    from eedn.pipeline.run import run_pipeline

    run_dir = tmp_path / "run"
    run_pipeline(tiny_config | {"out": str(run_dir), "strategy": "im-only", "strategy_options": {"epochs": 1},
                                "evaluators": []})
    images = tmp_path / "imgs"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray((rng.random((16, 16)) * 255).astype(np.uint8)).save(images / f"{i}.png")
    res = CliRunner().invoke(bench, [str(run_dir), "--input", str(images), "--batch-sizes", "1,3", "--repeats", "1",
                                     "--threads", "1"])
    assert res.exit_code == 0, res.output
    batch, ms = exit_latencies(run_dir)
    assert batch == 1 and len(ms) == 3 and all(t > 0 for t in ms) and ms == sorted(ms)  # cumulative per exit
    res = CliRunner().invoke(report_command, [str(run_dir)], terminal_width=200)
    assert res.exit_code == 0, res.output
    assert "ms/image (b1)" in res.output
    assert "latency ms/image (batch 1, eedn bench)" in (run_dir / "summary.md").read_text()
