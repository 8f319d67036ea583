"""The command line: one-line errors, non-zero exits, plugin listing, an end-to-end run."""
from __future__ import annotations

import json

from click.testing import CliRunner

from eedn.cli import cli


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args))


def test_unknown_backbone_is_one_line_listing_known_names():
    res = invoke("run", "--backbone", "nope", "--quiet")
    assert res.exit_code != 0
    lines = res.output.strip().splitlines()
    assert len(lines) == 1
    assert "unknown backbone 'nope'" in lines[0] and "t2t_vit_7" in lines[0] and "resnet20" in lines[0]
    assert "Traceback" not in res.output


def test_unknown_strategy_and_bad_values():
    res = invoke("run", "--strategy", "nope", "--quiet", "--backbone-epochs", "0")
    assert res.exit_code != 0 and "unknown strategy 'nope'" in res.output
    res = invoke("run", "--lambda", "abc", "--quiet")
    assert res.exit_code != 0 and "--lambda" in res.output and len(res.output.strip().splitlines()) == 1
    res = invoke("run", "--budget", "1.5", "--quiet")
    assert res.exit_code != 0 and "--budget" in res.output


def test_missing_config_file_and_data_dir(tmp_path):
    res = invoke("run", "--config", str(tmp_path / "none.yaml"), "--quiet")
    assert res.exit_code != 0 and "config file not found" in res.output
    res = invoke("run", "--dataset", "cifar10", "--data-dir", str(tmp_path), "--quiet")
    assert res.exit_code != 0 and str(tmp_path) in res.output and "Traceback" not in res.output


def test_plugins_lists_every_kind_with_origin():
    res = CliRunner().invoke(cli, ["plugins"], terminal_width=200)
    assert res.exit_code == 0
    for name in ("t2t_vit_7", "resnet20", "digits", "im-only", "linear", "eedn 0.1.0"):
        assert name in res.output


def test_run_writes_results(tiny_config, tmp_path):
    out = tmp_path / "cli-run"
    res = CliRunner().invoke(cli, ["run", "--backbone", "resnet_tiny", "--strategy", "im-only", "--epochs", "1",
                                   "--image-size", "16", "--backbone-epochs", "3", "--cache-dir", tiny_config["cache_dir"],
                                   "--set", "backbone_training.batch_size=64", "--set", "evaluators=[]",
                                   "--out", str(out), "--quiet"], terminal_width=200)
    assert res.exit_code == 0, res.output
    results = json.loads((out / "results.json").read_text())
    for key in ("eedn_version", "config", "dataset", "full_macs", "exits", "policy", "curve"):
        assert key in results
    assert set(results["dataset"]["sizes"]) == {"train", "val", "cal", "test"}
    assert (out / "config.json").exists() and (out / "summary.md").exists() and (out / "accuracy_vs_macs.png").exists()
    assert "policy" in res.output
