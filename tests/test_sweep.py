"""`eedn compare --sweep KEY=V1,V2`: a grid over config keys run into one comparison with one report, complete
run directories reused on a second call, and bad sweeps refused in one line before anything is trained."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

import eedn.pipeline.run
from eedn.cli.compare import compare_command
from eedn.cli.report import report_command
from eedn.pipeline.comparison import parse_sweeps, sweep_grid
from eedn.runtime.errors import EednError

TINY = {
    "backbone": "resnet_tiny",
    "image_size": 8,
    "backbone_training": {"epochs": 0},
    "progress": False,
    "evaluators": [],
    "strategies": {"im-only": {"epochs": 1}},
}


def test_parse_sweeps_and_the_grid():
    sweeps = parse_sweeps(["backbone_training.lr=0.01,0.1", "strategies.jei.lambda=[0.1,1],[2]", "seed=0,1"])
    assert sweeps == [("backbone_training.lr", ["0.01", "0.1"]), ("strategies.jei.lambda", ["[0.1,1]", "[2]"]),
                      ("seed", ["0", "1"])]
    assert sweep_grid(sweeps) == [("backbone_training.lr=0.01", "strategies.jei.lambda=[0.1,1]"),
                                  ("backbone_training.lr=0.01", "strategies.jei.lambda=[2]"),
                                  ("backbone_training.lr=0.1", "strategies.jei.lambda=[0.1,1]"),
                                  ("backbone_training.lr=0.1", "strategies.jei.lambda=[2]")]
    assert sweep_grid([]) == [()]
    for bad, why in (("lr", "KEY=V1,V2"), ("lr=", "KEY=V1,V2"), ("lr=1,,2", "KEY=V1,V2"), ("lr=1,1", "repeats")):
        with pytest.raises(EednError, match=why):
            parse_sweeps([bad])
    with pytest.raises(EednError, match="given twice"):
        parse_sweeps(["lr=1", "lr=2"])


def test_a_sweep_is_one_comparison_and_reuses_complete_runs(tmp_path, monkeypatch):
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps(TINY))
    out = tmp_path / "out"
    args = ["--strategies", "im-only", "--config", str(config), "--cache-dir", str(tmp_path / "cache"),
            "--out", str(out), "--quiet", "--sweep", "image_size=8,12", "--sweep", "strategies.im-only.lr=0.01,0.1",
            "--sweep", "seed=0,1"]
    res = CliRunner().invoke(compare_command, args, terminal_width=200)
    assert res.exit_code == 0, res.output
    comparison = json.loads((out / "comparison.json").read_text())
    labels = [e["label"] for e in comparison["strategies"]]
    assert labels == [f"im-only [image_size={s}, strategies.im-only.lr={lr}]" for s in (8, 12) for lr in (0.01, 0.1)]
    assert comparison["seeds"] == [0, 1] and len(comparison["sweep"]) == 4
    assert list(comparison["summary"]) == labels and comparison["matched"]["columns"] == labels
    assert "anytime" in comparison and set(comparison["anytime"]["scores"]) == set(labels)
    for entry in comparison["strategies"]:
        for seed, rel in entry["runs"].items():
            results = json.loads((out / rel / "results.json").read_text())
            cfg = results["config"]
            assert cfg["seed"] == int(seed)
            assert f"image_size={cfg['image_size']}" in entry["label"]
            assert f"lr={cfg['strategy_options']['lr']}" in entry["label"]
    # the 8 px and 12 px cells really ran different inputs: different full costs, so figures use absolute MACs
    fulls = {s["full_macs"] for s in comparison["summary"].values()}
    assert len(fulls) == 2
    md = (out / "comparison.md").read_text()
    assert "## Anytime score" in md and all(label in md for label in labels)

    # the same sweep again trains nothing: every run directory is complete and reused
    monkeypatch.setattr(eedn.pipeline.run, "prepare",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("nothing should train")))
    again = CliRunner().invoke(compare_command, args, terminal_width=200)
    assert again.exit_code == 0, again.output
    # and `eedn report` re-renders the sweep from its files
    report = CliRunner().invoke(report_command, [str(out)], terminal_width=200)
    assert report.exit_code == 0, report.output
    assert json.loads((out / "comparison.json").read_text())["sweep"] == comparison["sweep"]


def test_bad_sweeps_fail_in_one_line_before_training(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps(TINY))
    base = ["--strategies", "im-only", "--config", str(config), "--out", str(tmp_path / "o"), "--quiet"]
    res = CliRunner().invoke(compare_command, [*base, "--sweep", "seed=0,1", "--seeds", "2"])
    assert res.exit_code != 0 and "--sweep seed" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(compare_command, [*base, "--sweep", "strategies.im-only.nope=1,2"])
    assert res.exit_code != 0 and "nope" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(compare_command, [*base, "--anytime-range", "0.9,0.2"])
    assert res.exit_code != 0 and "--anytime-range" in res.output
    assert not (tmp_path / "o").exists()
