"""A run's experiment trackers as one (``--logger``): what they are told, and when.

Opened when the strategy starts (the run directory's name is the tracker run's name): the config, then stage 0's
epochs from the backbone's history (trained just before, or kept with the cached backbone), then every epoch of
the strategy's stages live (as :class:`eedn.runtime.progress.Progress` reports them), and after the run directory
is written every operating point (step: its mean MACs in ‰ of the full backbone; also as one table with
the settings), the final numbers (step 0) and
the figures. A failed run closes its trackers as failed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from eedn.core.config import Config
from eedn.core.contracts import Logger
from eedn.core.plugins import create
from eedn.runtime.errors import EednError
from eedn.runtime.progress import Progress

#: numbers of an operating point that are not metrics
_NOT_METRICS = ("setting", "exit_fractions", "gate_setting", "details", "name", "strategy", "gate")


def build_loggers(cfg: Config) -> dict[str, Logger]:
    """The configured loggers, built and checked (an unknown name, a typo in an option or a missing library
    fails here, before stage 0)."""
    unknown = sorted(set(cfg.logger_options) - set(cfg.loggers))
    if unknown:
        raise EednError(f"logger_options names {', '.join(unknown)}, which is not among the loggers "
                        f"({', '.join(cfg.loggers) or 'none'}); add it with --logger or drop its options")
    loggers = {name: create("logger", name, **cfg.logger_options.get(name, {})) for name in dict.fromkeys(cfg.loggers)}
    for logger in loggers.values():
        logger.check()
    return loggers


def numbers(point: dict, prefix: str = "") -> dict[str, float]:
    """The numeric fields of an operating point (``val`` ones as ``val_<key>``)."""
    out: dict[str, float] = {}
    for key, value in point.items():
        if key in _NOT_METRICS:
            continue
        if isinstance(value, dict):
            out |= numbers(value, f"{prefix}{key}_")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = float(value)
    return out


class Tracking:
    """Fans one run's numbers out to its loggers; does nothing without loggers."""

    def __init__(self) -> None:
        self.loggers: dict[str, Logger] = {}
        self.locations: dict[str, str] = {}
        self._progress: Progress | None = None

    def open(self, loggers: dict[str, Logger], run_dir: Path, cfg: Config, progress: Progress,
             backbone_history: list[dict] | None = None) -> None:
        """Start every logger for the run ``run_dir`` and subscribe to ``progress``'s epochs."""
        if not loggers:
            return
        tracking_dir = Path(cfg.tracking_dir) if cfg.tracking_dir else Path(run_dir).parent / "tracking"
        for name, logger in loggers.items():
            self.locations[name] = logger.start(Path(run_dir).name, tracking_dir)
            self.loggers[name] = logger
            logger.log_config(cfg.to_dict())
        for record in backbone_history or []:
            self.log({"backbone/loss": record.get("train_loss"), "backbone/val_accuracy": record.get("val_accuracy")},
                     int(record["epoch"]))
        progress.add_listener(self.epoch)
        self._progress = progress
        progress.log("tracking: " + "; ".join(f"{n} -> {where}" for n, where in self.locations.items()))

    def log(self, metrics: dict[str, Any], step: int) -> None:
        clean = {k: float(v) for k, v in metrics.items() if v is not None}
        if clean:
            for logger in self.loggers.values():
                logger.log_metrics(clean, step)

    def epoch(self, stage: str, epoch: int, metrics: dict[str, float]) -> None:
        """A :class:`Progress` listener: one finished epoch of a stage."""
        self.log({f"{stage}/{k}": v for k, v in metrics.items()}, epoch)

    def finish(self, results: dict, run_dir: Path) -> None:
        """Operating points, final numbers and figures of a written run; then close as finished."""
        if not self.loggers:
            return
        points = results.get("curve") or [results["policy"]]
        for point in points:
            step = round(1000 * float(point["macs_fraction"]))
            self.log({f"operating_points/{k}": v for k, v in numbers(point).items()}, step)
        rows = [{"setting": p.get("setting"), **numbers(p)} for p in points]
        for logger in self.loggers.values():
            logger.log_table("operating_points", rows)
        final = {f"final/{k}": v for k, v in numbers(results["policy"]).items()}
        final |= {f"final/exit_{e['index']}_accuracy": e["accuracy"] for e in results.get("exits", [])}
        final["final/backbone_test_accuracy"] = results["backbone"].get("test_accuracy")
        self.log(final, 0)
        for figure in sorted(Path(run_dir).glob("*.png")):
            for logger in self.loggers.values():
                logger.log_figure(figure)
        self.close("finished")

    def close(self, status: str = "finished") -> None:
        """End every logger's record (``failed`` after an error); idempotent."""
        if self._progress is not None:
            self._progress.remove_listener(self.epoch)
            self._progress = None
        loggers, self.loggers = self.loggers, {}
        for logger in loggers.values():
            logger.close(status)
