"""Experiment tracking (``--logger``) and progress people can follow (running loss, ETA, plain lines in logs).

TensorBoard is in the dev extra (about 20 MB with grpcio and protobuf), so its event files are read back here
unconditionally; MLflow is a large install kept out of dev: its test runs where it is installed.
"""
from __future__ import annotations

import csv
import importlib.util
import io
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from eedn.cli.main import cli
from eedn.runtime.progress import Progress

RUN = ["run", "--backbone", "resnet_tiny", "--dataset", "digits", "--image-size", "16", "--backbone-epochs", "3",
       "--strategy", "im-only", "--epochs", "2", "--set", "evaluators=[]", "--quiet"]


def invoke(*args: str):
    return CliRunner(env={"COLUMNS": "200"}).invoke(cli, list(args), terminal_width=200)


def csv_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def series(rows: list[dict], stage: str, metric: str) -> list[tuple[int, float]]:
    return [(int(r["step"]), float(r["value"])) for r in rows if r["stage"] == stage and r["metric"] == metric]


def close(got: list[tuple[int, float]], expected: list[tuple[int, float]]) -> bool:
    """Same steps, values equal to float32 precision (TensorBoard keeps float32)."""
    return [s for s, _ in got] == [s for s, _ in expected] and \
        [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-6)


def test_run_logs_to_tensorboard_and_csv(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "runs" / "tiny"
    res = invoke(*RUN, "--cache-dir", str(tmp_path / "cache"), "--out", str(out), "--logger", "tensorboard",
                 "--logger", "csv")
    assert res.exit_code == 0, res.output
    results = json.loads((out / "results.json").read_text())
    tracking = tmp_path / "runs" / "tracking"
    assert results["tracking"] == {"tensorboard": str(tracking / "tensorboard" / "tiny"),
                                   "csv": str(tracking / "csv" / "tiny.csv")}
    backbone = [(r["epoch"], r["train_loss"]) for r in results["backbone"]["history"]]
    heads = [(r["epoch"], r["loss"]) for r in results["strategy"]["history"]]
    assert len(backbone) == 3 and len(heads) == 2

    rows = csv_rows(tracking / "csv" / "tiny.csv")
    assert close(series(rows, "backbone", "loss"), backbone)
    assert close(series(rows, "im-only", "loss"), heads)
    ims = [sum(r["val_accuracy"][:-1]) / 2 for r in results["strategy"]["history"]]
    assert [v for _, v in series(rows, "im-only", "IM_val_accuracy")] == pytest.approx(ims)
    assert series(rows, "final", "accuracy") == [(0, pytest.approx(results["policy"]["accuracy"]))]
    points = csv_rows(tracking / "csv" / "tiny.operating_points.csv")
    assert [p["setting"] for p in points] == [p["setting"] for p in results["curve"]]
    assert json.loads((tracking / "csv" / "tiny.config.json").read_text()) == results["config"]

    events = EventAccumulator(str(tracking / "tensorboard" / "tiny"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    assert close([(e.step, e.value) for e in events.Scalars("backbone/loss")], backbone)
    assert close([(e.step, e.value) for e in events.Scalars("im-only/loss")], heads)
    assert events.Scalars("final/accuracy")[0].value == pytest.approx(results["policy"]["accuracy"])
    figures = {f"figures/{p.stem}" for p in out.glob("*.png")}
    assert "figures/training_curves" in figures and set(events.Tags()["images"]) == figures


def test_mlflow_logger_when_installed(tmp_path):
    pytest.importorskip("mlflow", reason="mlflow is not installed (pip install 'eedn[mlflow]')")
    import os

    from mlflow.tracking import MlflowClient

    out = tmp_path / "runs" / "tiny"
    res = invoke(*RUN, "--cache-dir", str(tmp_path / "cache"), "--out", str(out), "--logger", "mlflow",
                 "--set", "logger_options.mlflow.experiment=trial")
    assert res.exit_code == 0, res.output
    results = json.loads((out / "results.json").read_text())
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient((tmp_path / "runs" / "tracking" / "mlruns").as_uri())
    run = client.search_runs([client.get_experiment_by_name("trial").experiment_id])[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny"
    history = client.get_metric_history(run.info.run_id, "backbone/loss")
    assert close([(m.step, m.value) for m in history],
                 [(r["epoch"], r["train_loss"]) for r in results["backbone"]["history"]])
    assert run.data.metrics["final/accuracy"] == pytest.approx(results["policy"]["accuracy"])
    assert run.data.params["strategy"] == '"im-only"'
    assert "training_curves.png" in {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "figures")}


@pytest.mark.parametrize("name, extra", [("mlflow", "mlflow"), ("tensorboard", "tensorboard")])
def test_a_missing_library_is_one_line_naming_the_extra(tmp_path, monkeypatch, name, extra):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda mod, *a: None if mod == name else real(mod, *a))
    out = tmp_path / "run"
    res = invoke(*RUN, "--cache-dir", str(tmp_path / "cache"), "--out", str(out), "--logger", name)
    assert res.exit_code == 1
    line = (f"error: logger '{name}' needs the {name} package, which is not installed: pip install 'eedn[{extra}]' "
            f"(or pip install {name})")
    assert res.stderr.strip().splitlines() == [line]
    assert not (tmp_path / "cache").exists() and not out.exists()  # refused before stage 0


def test_unknown_logger_and_stray_logger_options_are_refused(tmp_path):
    res = invoke(*RUN, "--cache-dir", str(tmp_path / "cache"), "--logger", "wandb")
    assert res.exit_code == 1 and "unknown logger 'wandb'; known: csv, mlflow, tensorboard" in res.stderr
    res = invoke(*RUN, "--cache-dir", str(tmp_path / "cache"), "--set", "logger_options.csv.path=x.csv")
    assert res.exit_code == 1 and "logger_options names csv, which is not among the loggers" in res.stderr


class FakeClock:
    """Seconds that pass by ``tick`` at every reading: a training step takes ``tick`` seconds."""

    def __init__(self, tick: float):
        self.tick, self.now = tick, 0.0

    def __call__(self) -> float:
        self.now += self.tick
        return self.now


def test_a_60_s_epoch_prints_progress_lines_in_a_log(tiny_config, tmp_path, capsys):
    """Not a terminal: stage 0's epochs of 10 steps at 6 s each (60 s) print the running loss and time left twice
    inside every epoch, then the epoch's line; head training shows its IMs' mean val accuracy."""
    from eedn.pipeline.run import run_pipeline

    cfg = tiny_config | {"cache_dir": str(tmp_path / "cache"), "strategy": "im-only", "evaluators": [],
                         "strategy_options": {"epochs": 2},
                         "backbone_training": {"epochs": 2, "batch_size": 89}}  # 899 train images: 10 steps
    progress = Progress(enabled=True, live=False, clock=FakeClock(6.0))
    results = run_pipeline(cfg, progress=progress)
    lines = capsys.readouterr().err.splitlines()
    for epoch in (1, 2):
        inside = [line for line in lines if line.startswith(f"backbone epoch {epoch}/2: ") and "steps" in line]
        assert len(inside) >= 2, lines
        assert inside[0].startswith(f"backbone epoch {epoch}/2: 5/10 steps, running loss ")
        assert inside[0].endswith("0:00:30 elapsed, about 0:00:30 left")
        (done,) = [i for i, line in enumerate(lines) if line.startswith(f"backbone epoch {epoch}/2: loss ")]
        assert done > lines.index(inside[-1])  # the epoch's own line (loss, val accuracy) ends the epoch
    history = results["strategy"]["history"]
    for record in history:
        ims = sum(record["val_accuracy"][:-1]) / (len(record["val_accuracy"]) - 1)
        expected = f"im-only epoch {record['epoch'] + 1}/2: loss {record['loss']:.4g}, IM val accuracy {ims:.4g}"
        assert expected in lines


def test_interim_lines_come_at_most_every_interval():
    progress = Progress(enabled=True, live=False, clock=FakeClock(1.0))
    logged: list[str] = []
    progress.log = logged.append
    for _ in progress.track(range(100), "stage", epoch=0, epochs=1):
        progress.step("stage", 0.5)
    assert [line.split(": ")[1].split(",")[0] for line in logged] == ["30/100 steps", "60/100 steps", "90/100 steps"]
    assert logged[0] == "stage epoch 1/1: 30/100 steps, running loss 0.5, 0:00:30 elapsed, about 0:01:10 left"


def test_terminal_bar_shows_running_loss_and_eta():
    from rich.console import Console

    buffer = io.StringIO()
    progress = Progress(enabled=True, console=Console(file=buffer, force_terminal=True, width=200))
    with progress.session():
        for i, _ in enumerate(progress.track(range(20), "heads", epoch=0, epochs=3)):
            progress.step("heads", 2.0 if i % 2 else 1.0)
        (task,) = progress._bars.tasks  # the bar as the next refresh draws it
        assert task.fields["status"] == "epoch 1/3 · loss 1.5 (running)" and task.completed == 20
        progress.epoch("heads", 0, 3, loss=1.5, IM_val_accuracy=0.75)
        for _ in progress.track(range(20), "heads", epoch=1, epochs=3):
            progress.step("heads", 4.0)
        assert task.fields["status"] == "epoch 2/3 · loss 4 (running) · last epoch: loss 1.5, IM val accuracy 0.75"
    text = buffer.getvalue()
    assert "eta" in text and "epoch 2/3" in text


def test_listeners_get_every_epoch_even_when_nothing_is_shown():
    progress = Progress(enabled=False)
    seen: list[tuple] = []
    progress.add_listener(lambda stage, epoch, metrics: seen.append((stage, epoch, metrics)))
    progress.epoch("jei λ=0.5", 3, 5, gate_loss=0.25, val_accuracy=None, record={"val_accuracy_exit_0": 0.5})
    assert seen == [("jei λ=0.5", 3, {"gate_loss": 0.25, "val_accuracy_exit_0": 0.5})]


def test_training_stages_of_a_run_history():
    from eedn.report.render import training_stages

    results = {"backbone": {"history": [{"epoch": 0, "train_loss": 2.0, "val_accuracy": 0.5}]},
               "strategy": {"history": [
                   {"phase": "warmup", "epoch": 0, "lambda": None, "loss": 9.0, "val_gated_accuracy": 0.6},
                   {"phase": "joint", "epoch": 1, "lambda": 0.5, "gate_loss": 0.3, "im_loss": 1.0,
                    "val_gated_accuracy": 0.7},
                   {"phase": "select", "lambda": 0.5, "epoch": 1},
                   {"phase": "im-only", "epoch": 0, "loss": 3.0, "val_accuracy": [0.2, 0.4, 0.9]}]}}
    stages = training_stages(results)
    assert list(stages) == ["backbone", "warmup", "joint λ=0.5", "im-only"]
    assert stages["joint λ=0.5"] == {"loss": [1.0], "accuracy": [0.7], "accuracy_label": "val gated accuracy"}
    assert stages["im-only"]["accuracy"] == [pytest.approx(0.3)]
