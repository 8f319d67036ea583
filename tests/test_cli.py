"""The command line: one-line errors, non-zero exits, plugin listing and options, progress output, a run."""
from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass

import pytest
from click.testing import CliRunner

import eedn
from eedn.cli.main import LAZY_COMMANDS, cli
from eedn.core.plugins import register_plugin, unregister_plugin
from eedn.runtime.progress import Progress


def invoke(*args: str):
    return CliRunner(env={"COLUMNS": "200"}).invoke(cli, list(args), terminal_width=200)


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


# ------------------------------------------------------------------------------------------ commands
def test_help_lists_every_command_with_its_summary():
    res = invoke("--help")
    assert res.exit_code == 0
    for name, lazy in LAZY_COMMANDS.items():
        assert re.search(rf"^\s+{name}\s+{re.escape(lazy.help[:30])}", res.output, re.M), name
    assert re.search(r"^\s+run\s+Train and evaluate", res.output, re.M)


@pytest.mark.parametrize("name", sorted(LAZY_COMMANDS))
def test_lazy_command_summary_matches_the_command(name):
    """The summary `eedn --help` shows without importing a command is the command's own first line."""
    command = cli.get_command(None, name)
    first_line = command.help.split("\n")[0]
    assert first_line.startswith(LAZY_COMMANDS[name].help.rstrip("."))


# ------------------------------------------------------------------------------------------- plugins
def test_plugins_lists_every_kind_with_origin():
    res = invoke("plugins")
    assert res.exit_code == 0
    for name in ("t2t_vit_7", "resnet20", "digits", "im-only", "linear", "eedn 0.1.0"):
        assert name in res.output
    for kind in ("backbone", "inference module", "gate", "strategy", "evaluator", "dataset"):
        assert kind in res.output


class DemoGate:
    """A registered factory that declares its options (see eedn.core.options)."""

    @dataclass
    class Options:
        k: int = eedn.option(3, "exits to agree on", min=1, max=9)
        rule: str = eedn.option("max", "how to combine", choices=("max", "mean"))
        rates: list[float] = eedn.option([0.1, 0.5], "a list option")


class DemoPlugin:
    @eedn.hookimpl
    def register_gates(self, register):
        register("demo_gate", DemoGate, description="a gate for the CLI test")

    @eedn.hookimpl
    def register_strategies(self, register):
        register("demo_gate", lambda **options: None, description="same name, another kind, no declared options")


@pytest.fixture
def demo_plugin():
    register_plugin(DemoPlugin(), name="demo-cli-plugin", origin="tests")
    yield
    unregister_plugin("demo-cli-plugin")


def test_plugins_name_shows_declared_options(demo_plugin):
    res = invoke("plugins", "demo_gate")
    assert res.exit_code == 0, res.output
    assert "gate 'demo_gate' from tests: a gate for the CLI test" in res.output
    rows = {line.split("│")[1].strip(): line for line in res.output.splitlines() if line.count("│") >= 5}
    assert {"k", "rule", "rates"} <= set(rows)
    assert "an integer" in rows["k"] and " 3 " in rows["k"] and ">= 1; <= 9" in rows["k"]
    assert "max, mean" in rows["rule"] and "'max'" in rows["rule"]
    assert "[0.1, 0.5]" in rows["rates"] and "list" in rows["rates"]
    # the same name as a strategy without declared options is shown too
    assert "strategy 'demo_gate' from tests" in res.output and "does not declare" in res.output


def test_plugins_name_of_a_builtin():
    res = invoke("plugins", "max_prob")
    assert res.exit_code == 0, res.output
    assert "gate 'max_prob' from eedn" in res.output


def test_plugins_unknown_name_is_one_line():
    res = invoke("plugins", "jie")
    assert res.exit_code == 1
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and "unknown plugin 'jie'" in lines[0] and "did you mean 'jei'" in lines[0]
    assert "resnet20" in lines[0] and "digits" in lines[0] and "Traceback" not in res.output


# ------------------------------------------------------------------------------------------ progress
def test_progress_plain_lines_per_epoch_and_stage(capsys):
    progress = Progress(enabled=True, live=False)
    with progress.session():
        for epoch in range(2):
            for _ in progress.track(range(3), "im-only", epoch=epoch, epochs=2):
                pass
            progress.epoch("im-only", epoch, 2, loss=0.5 / (epoch + 1), val_accuracy=0.75)
        for _ in progress.track([1, 2], "features: test"):
            pass
        progress.log("λ=[0.5] kept [bold]as is[/bold]")
    err = capsys.readouterr().err
    assert err.splitlines()[:2] == ["im-only epoch 1/2: loss 0.5, val accuracy 0.75",
                                    "im-only epoch 2/2: loss 0.25, val accuracy 0.75"]
    assert re.search(r"^features: test: 2 steps in [0-9.]+ s$", err, re.M)
    assert "λ=[0.5] kept [bold]as is[/bold]" in err and "\x1b" not in err


def test_progress_live_keeps_one_bar_per_stage():
    from rich.console import Console

    console = Console(file=io.StringIO(), force_terminal=True, width=160)
    progress = Progress(enabled=True, console=console)
    with progress.session():
        for stage in ("backbone", "jei λ=0.5"):
            for epoch in range(3):
                for _ in progress.track(range(4), stage, epoch=epoch, epochs=3):
                    pass
                progress.epoch(stage, epoch, 3, loss=1.0 / (epoch + 1), val_accuracy=0.5)
        for _ in progress.track(range(5), "features: train"):
            pass
        progress.epoch("sweep", 0, 2, loss=0.1)  # an epoch without tracked batches: the bar counts epochs
        tasks = {t.description: t for t in progress._bars.tasks}
    assert list(tasks) == ["backbone", "jei λ=0.5", "features: train", "sweep"]
    assert tasks["backbone"].completed == 4 and tasks["backbone"].total == 4
    assert tasks["jei λ=0.5"].fields["status"] == "epoch 3/3 · loss 0.3333, val accuracy 0.5"
    assert (tasks["sweep"].completed, tasks["sweep"].total) == (1, 2)


def test_progress_disabled_prints_nothing(capsys):
    progress = Progress(enabled=False)
    with progress.session():
        assert list(progress.track(range(3), "stage", epoch=0, epochs=1)) == [0, 1, 2]
        progress.epoch("stage", 0, 1, loss=1.0)
        progress.log("hello")
    assert capsys.readouterr() == ("", "")


# ------------------------------------------------------------------------------------------ run
RUN_ARGS = ["run", "--backbone", "resnet_tiny", "--strategy", "im-only", "--epochs", "1", "--image-size", "16",
            "--backbone-epochs", "3", "--set", "backbone_training.batch_size=64", "--set", "evaluators=[]"]


def test_run_writes_results_and_quiet_prints_only_the_table(tiny_config, tmp_path):
    out = tmp_path / "cli-run"
    res = CliRunner(env={"COLUMNS": "300"}).invoke(
        cli, RUN_ARGS + ["--cache-dir", tiny_config["cache_dir"], "--out", str(out), "--quiet"], terminal_width=300)
    assert res.exit_code == 0, res.output
    results = json.loads((out / "results.json").read_text())
    for key in ("eedn_version", "config", "dataset", "full_macs", "exits", "policy", "curve"):
        assert key in results
    assert set(results["dataset"]["sizes"]) == {"train", "val", "cal", "test"}
    assert (out / "config.json").exists() and (out / "summary.md").exists() and (out / "accuracy_vs_macs.png").exists()
    assert res.stderr == ""
    assert re.search(r"exits of im-only\s*$", res.stdout, re.M) and f"run directory: {out}" in res.stdout


def test_run_in_a_log_prints_one_plain_line_per_epoch(tiny_config, tmp_path):
    out = tmp_path / "cli-run-log"
    res = CliRunner(env={"COLUMNS": "300"}).invoke(
        cli, RUN_ARGS + ["--cache-dir", tiny_config["cache_dir"], "--out", str(out)], terminal_width=300)
    assert res.exit_code == 0, res.output
    assert "\x1b" not in res.output and "\r" not in res.output  # no control characters in a log
    assert re.search(r"^resnet_tiny -> .+ parameters, \d+ exits", res.stderr, re.M)
    assert re.search(r"^im-only epoch 1/1: loss [0-9.e-]+, val accuracy [0-9.]+$", res.stderr, re.M)
    assert f"run directory: {out}" in res.stderr and re.search(r"exits of im-only\s*$", res.stdout, re.M)
