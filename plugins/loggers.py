"""Experiment trackers (``--logger``): TensorBoard, MLflow and a plain CSV file.

Each writes through its tool's own library (``torch.utils.tensorboard``, ``mlflow`` with a local file store), which
is imported only when the logger starts; a missing library stops the run before stage 0 with the extra to install.
By default each keeps its records under the run's tracking folder (``tracking_dir``): ``tensorboard/<run>/``
(``tensorboard --logdir <tracking_dir>/tensorboard``), ``mlruns/`` (``mlflow ui --backend-store-uri
<tracking_dir>/mlruns``) and ``csv/<run>.csv``.
"""
from __future__ import annotations

import csv
import importlib.util
import io
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eedn.core.contracts import Logger
from eedn.core.options import option
from eedn.runtime.errors import EednError
from eedn.runtime.io import atomic_write_json, atomic_write_text


def require(module: str, logger: str, extra: str) -> None:
    """One line naming the extra to install when ``module`` is missing."""
    if importlib.util.find_spec(module) is None:
        raise EednError(f"logger '{logger}' needs the {module} package, which is not installed: "
                        f"pip install 'eedn[{extra}]' (or pip install {module})")


def flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists and scalars are leaves)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat |= flatten(value, f"{name}.")
        else:
            flat[name] = value
    return flat


def _cell(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class CsvLogger(Logger):
    """One tidy CSV per run (columns stage, metric, step, value, time) and the config as JSON beside it.

    The file is rewritten whole (atomically) at every call, so a reader never sees half a row."""

    name = "csv"
    FIELDS = ("stage", "metric", "step", "value", "time")

    @dataclass
    class Options:
        path: str | None = option(None, "the CSV file (None: <tracking_dir>/csv/<run>.csv)")

    options: CsvLogger.Options

    def start(self, run_name: str, tracking_dir: os.PathLike[str] | str) -> str:
        self.path = Path(self.options.path or Path(tracking_dir) / "csv" / f"{run_name}.csv")
        self.rows: list[tuple] = []
        self._write()
        return str(self.path)

    def log_config(self, config: dict) -> None:
        atomic_write_json(self.path.with_suffix(".config.json"), config)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = round(time.time(), 3)
        for key, value in metrics.items():
            stage, _, metric = key.rpartition("/")
            self.rows.append((stage, metric, step, float(value), now))
        self._write()

    def log_table(self, name: str, rows: list[dict]) -> None:
        """``<run>.<name>.csv`` beside the run's CSV, one row per entry."""
        fields = list(dict.fromkeys(k for row in rows for k in row))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(self.path.with_suffix(f".{name}.csv"), buffer.getvalue())

    def _write(self) -> None:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(self.FIELDS)
        writer.writerows(self.rows)
        atomic_write_text(self.path, buffer.getvalue())

    def close(self, status: str = "finished") -> None:
        self.log_metrics({"run/failed": float(status != "finished")}, 0)


class TensorBoardLogger(Logger):
    """Scalars (``<stage>/<metric>`` by epoch; operating points by their MACs in ‰ of the full backbone), the
    config as text and the run's figures as images, through ``torch.utils.tensorboard``."""

    name = "tensorboard"

    @dataclass
    class Options:
        log_dir: str | None = option(None, "the event-file folder (None: <tracking_dir>/tensorboard/<run>)")

    options: TensorBoardLogger.Options

    def check(self) -> None:
        require("tensorboard", self.name, "tensorboard")

    def start(self, run_name: str, tracking_dir: os.PathLike[str] | str) -> str:
        self.check()
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(self.options.log_dir or Path(tracking_dir) / "tensorboard" / run_name)
        self.writer = SummaryWriter(log_dir=str(self.log_dir))
        return str(self.log_dir)

    def log_config(self, config: dict) -> None:
        text = json.dumps(config, indent=2, default=str)
        self.writer.add_text("config", "\n".join("    " + line for line in text.splitlines()))  # Markdown code

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, float(value), step)

    def log_figure(self, path: os.PathLike[str] | str) -> None:
        from matplotlib.image import imread

        image = imread(str(path))  # float RGBA in [0, 1], height x width x channels
        self.writer.add_image(f"figures/{Path(path).stem}", image[..., :3], 0, dataformats="HWC")

    def log_table(self, name: str, rows: list[dict]) -> None:
        fields = list(dict.fromkeys(k for row in rows for k in row))
        lines = ["| " + " | ".join(fields) + " |", "|" + "---|" * len(fields)]
        lines += ["| " + " | ".join(_cell(row.get(k, "")) for k in fields) + " |" for row in rows]
        self.writer.add_text(name, "\n".join(lines))

    def close(self, status: str = "finished") -> None:
        self.writer.add_text("status", status)
        self.writer.close()


class MlflowLogger(Logger):
    """An MLflow run: the config as parameters (flattened, dotted) and as config.json, metrics by step, the
    figures as artifacts; the run ends FINISHED or FAILED. Local file store unless ``tracking_uri`` says other."""

    name = "mlflow"

    @dataclass
    class Options:
        tracking_uri: str | None = option(None, "MLflow tracking URI, e.g. sqlite:///mlflow.db (None: the local file "
                                                "store <tracking_dir>/mlruns)")
        experiment: str = option("eedn", "MLflow experiment the runs go to (created when missing)")

    options: MlflowLogger.Options

    def check(self) -> None:
        require("mlflow", self.name, "mlflow")

    def start(self, run_name: str, tracking_dir: os.PathLike[str] | str) -> str:
        self.check()
        from mlflow.tracking import MlflowClient

        uri = self.options.tracking_uri
        if uri is None:  # the local file store, which MLflow >= 3.7 keeps only on request (docs/usage.md)
            uri = (Path(tracking_dir) / "mlruns").absolute().as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name(self.options.experiment)
        experiment_id = (experiment.experiment_id if experiment is not None
                         else self.client.create_experiment(self.options.experiment))
        self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        return f"{uri} (experiment {self.options.experiment}, run {self.run_id})"

    @staticmethod
    def key(name: str) -> str:
        """MLflow takes letters, digits and ``_ - . / :`` and spaces in names (``λ=0.5`` -> ``λ_0.5``)."""
        return re.sub(r"[^\w\-./: ]", "_", name)

    def log_config(self, config: dict) -> None:
        from mlflow.entities import Param

        params = [Param(self.key(k), json.dumps(v, default=str)[:250]) for k, v in flatten(config).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters per batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])
        self.client.log_dict(self.run_id, config, "config.json")

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(self.key(k), float(v), now, step) for k, v in metrics.items()]
        for i in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[i:i + 1000])

    def log_figure(self, path: os.PathLike[str] | str) -> None:
        self.client.log_artifact(self.run_id, str(path), "figures")

    def log_table(self, name: str, rows: list[dict]) -> None:
        self.client.log_dict(self.run_id, rows, f"{name}.json")

    def close(self, status: str = "finished") -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if status == "finished" else "FAILED")
