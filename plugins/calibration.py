"""Calibration of an early-exit policy: ECE (equal-width and equal-mass), MCE, NLL, Brier, temperature scaling.

docs/evaluation.md describes every number. eedn's primary ECE is dataset-level with 15 equal-width bins on the max
softmax of the policy's **gated** prediction (and of every exit over all samples), reported raw and after per-exit
temperature scaling fitted on the calibration split. The official JEI-DNN variant (per test batch, 15 quantile bins,
no TS) is reported as ``ece_compat``. Every ECE here is a fraction in [0, 1] (the official code multiplies by 100).

Binning convention (both kinds): bin b covers ``(edge_b, edge_{b+1}]`` and the first bin also takes its lower edge,
so a confidence of exactly 1.0 falls in the last bin and one of exactly 0 in the first. This is
``numpy.searchsorted(interior_edges, conf, side="left")``, the rule of ``sklearn.calibration.calibration_curve``.
Equal-width edges are ``linspace(0, 1, n_bins + 1)``; equal-mass edges are exactly sklearn's ``"quantile"``
strategy (the official code's): ``numpy.percentile(conf, linspace(0, 1, n_bins + 1) * 100)``. ``torch.quantile``
is not used: its interpolation index and rounding differ from numpy's, so an edge that should sit on a sample
can land just below or above it and move that sample across bins (for 15 bins whenever n - 1 is a multiple of 3,
e.g. the official test batches of 64 and 100; docs/method.md §5.2). Empty bins contribute nothing.

The tensor functions below are importable on their own (no evaluator needed).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from eedn.core.contracts import Evaluator, Metric
from eedn.runtime.errors import EednError
from eedn.runtime.io import json_float
from eedn.core.options import option
from eedn.core.outputs import RELIABILITY_BINS, ExitOutputs, reliability_bins, reliability_edges, reliability_index

DEFAULT_BINS = RELIABILITY_BINS
#: the official code's temperature-scaling settings
TS_INIT, TS_LR, TS_MAX_ITER = 1.5, 0.01, 50
#: a fitted temperature is clamped to this range: an exit whose calibration logits are perfectly separable
#: drives T towards 0 (or a constant-prediction exit towards infinity) and would otherwise report nonsense.
TS_RANGE = (1e-2, 1e2)


# ----------------------------------------------------------------------------------------------- tensor functions


def confidence_and_correct(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Max softmax probability ``[N]`` (float64) and whether the argmax is right ``[N]`` (bool)."""
    probs = logits.double().softmax(-1)
    confidence, prediction = probs.max(-1)
    return confidence, prediction == labels.to(prediction.device)


def bin_edges(confidences: Tensor, n_bins: int = DEFAULT_BINS, binning: str = "width") -> Tensor:
    """The ``n_bins + 1`` edges: uniform on [0, 1] (``width``) or quantiles of the confidences (``mass``), as
    :func:`eedn.core.outputs.reliability_edges` makes every reliability bin."""
    return torch.from_numpy(reliability_edges(confidences.double().cpu().numpy(), n_bins, binning))


def bin_indices(confidences: Tensor, n_bins: int = DEFAULT_BINS, binning: str = "width") -> Tensor:
    """Bin of each confidence in ``0..n_bins-1``; bins are ``(lo, hi]``, the first one also holds ``lo``."""
    conf = confidences.double().cpu().numpy()
    return torch.from_numpy(reliability_index(conf, reliability_edges(conf, n_bins, binning)))


def calibration_bins(confidences: Tensor, correct: Tensor, n_bins: int = DEFAULT_BINS,
                     binning: str = "width") -> dict[str, Tensor]:
    """Per-bin ``count``, mean ``confidence`` and ``accuracy`` (0 where a bin is empty) — a reliability diagram
    (:func:`eedn.core.outputs.reliability_bins` as tensors)."""
    bins = reliability_bins(confidences.double().cpu().numpy(), correct.double().cpu().numpy(), n_bins, binning)
    return {key: torch.nan_to_num(torch.tensor(bins[key], dtype=torch.float64), nan=0.0)
            for key in ("count", "confidence", "accuracy")}


def expected_calibration_error(confidences: Tensor, correct: Tensor, n_bins: int = DEFAULT_BINS,
                               binning: str = "width") -> float:
    """ECE = sum_b (n_b / n) |acc_b - conf_b| as a fraction; NaN for no samples."""
    if confidences.numel() == 0:
        return float("nan")
    bins = calibration_bins(confidences, correct, n_bins, binning)
    gap = (bins["accuracy"] - bins["confidence"]).abs()
    return float((bins["count"] * gap).sum() / bins["count"].sum())


def maximum_calibration_error(confidences: Tensor, correct: Tensor, n_bins: int = DEFAULT_BINS,
                              binning: str = "width") -> float:
    """MCE = the largest |acc_b - conf_b| over non-empty bins; NaN for no samples."""
    if confidences.numel() == 0:
        return float("nan")
    bins = calibration_bins(confidences, correct, n_bins, binning)
    gap = (bins["accuracy"] - bins["confidence"]).abs()
    return float(gap[bins["count"] > 0].max())


def compat_batches(n: int, batch_size: int = 64, chunks: int = 10, seed: int = 0) -> list[Tensor]:
    """Index batches of the official JEI test ECE: ``0..n-1`` cut into ``chunks`` consecutive chunks
    (``numpy.array_split``), each read in a seeded random order (a ``SubsetRandomSampler``) in batches of
    ``batch_size``; the last batch of a chunk may be short. ``chunks=0``: consecutive batches, no shuffling."""
    if batch_size < 1:
        raise EednError(f"compat_batch_size must be a positive integer, got {batch_size}")
    if chunks < 0:
        raise EednError(f"compat_chunks must be >= 0, got {chunks}")
    if chunks == 0:
        parts = [torch.arange(n)]
    else:
        generator = torch.Generator().manual_seed(seed)
        parts = [torch.from_numpy(c)[torch.randperm(len(c), generator=generator)]
                 for c in np.array_split(np.arange(n), chunks)]
    return [p[start:start + batch_size] for p in parts for start in range(0, len(p), batch_size)]


def per_batch_quantile_ece(confidences: Tensor, correct: Tensor, batch_size: int = 64,
                           n_bins: int = DEFAULT_BINS, chunks: int = 0, seed: int = 0) -> float:
    """Paper-compat ECE, as the official code computes it: quantile bins per test batch, mean weighted by
    batch size; batches from :func:`compat_batches` (``chunks=10`` is the official test loader).

    With ~4 samples per bin it is biased upward; it exists to compare with the official numbers (which are this
    value x 100).
    """
    batches = compat_batches(confidences.numel(), batch_size, chunks, seed)
    n = confidences.numel()
    if n == 0:
        return float("nan")
    total = 0.0
    for idx in batches:
        total += len(idx) * expected_calibration_error(confidences[idx], correct[idx], n_bins, "mass")
    return total / n


def negative_log_likelihood(logits: Tensor, labels: Tensor) -> float:
    """Mean cross-entropy of the softmax of ``logits`` ``[N, C]``."""
    if logits.shape[0] == 0:
        return float("nan")
    return float(F.cross_entropy(logits.double(), labels.to(logits.device).long()))


def brier_score(logits: Tensor, labels: Tensor) -> float:
    """Multi-class Brier score: mean over samples of sum_c (p_c - onehot_c)^2 (in [0, 2])."""
    if logits.shape[0] == 0:
        return float("nan")
    probs = logits.double().softmax(-1)
    onehot = F.one_hot(labels.to(logits.device).long(), probs.shape[-1]).double()
    return float(((probs - onehot) ** 2).sum(-1).mean())


def calibration_metrics(logits: Tensor, labels: Tensor, n_bins: int = DEFAULT_BINS) -> dict[str, float | None]:
    """Accuracy, mean confidence, ECE (equal-width and equal-mass), MCE, NLL and Brier for logits ``[N, C]``."""
    confidence, correct = confidence_and_correct(logits, labels)
    metrics = {
        "accuracy": float(correct.double().mean()) if len(correct) else float("nan"),
        "confidence": float(confidence.mean()) if len(confidence) else float("nan"),
        "ece": expected_calibration_error(confidence, correct, n_bins, "width"),
        "ece_equal_mass": expected_calibration_error(confidence, correct, n_bins, "mass"),
        "mce": maximum_calibration_error(confidence, correct, n_bins, "width"),
        "nll": negative_log_likelihood(logits, labels),
        "brier": brier_score(logits, labels),
    }
    return {k: json_float(v) for k, v in metrics.items()}


def fit_temperature(logits: Tensor, labels: Tensor, init: float = TS_INIT, lr: float = TS_LR,
                    max_iter: int = TS_MAX_ITER, line_search: str | None = "strong_wolfe") -> float:
    """Scalar T > 0 minimising the NLL of ``logits / T`` (LBFGS, official init/lr/iterations).

    T is optimised as log T, so it stays positive. ``line_search="strong_wolfe"`` (default) lets LBFGS take full
    steps: without it, lr 0.01 moves only 1 % of the quasi-Newton step per iteration and 50 iterations stop well
    short of the optimum (pass ``None`` to get the official behaviour). Returns 1.0 for no samples.
    """
    if logits.shape[0] == 0:
        return 1.0
    if init <= 0:
        raise EednError(f"ts_init must be positive, got {init}")
    x = logits.detach().double().cpu()
    y = labels.detach().long().cpu()
    log_t = torch.tensor(math.log(init), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=lr, max_iter=max_iter, line_search_fn=line_search)

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x / log_t.exp(), y)
        loss.backward()
        return loss

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 1-D problem on small tensors: intra-op threads only add contention here
    try:
        with torch.enable_grad():
            optimizer.step(closure)
    finally:
        torch.set_num_threads(threads)
    temperature = float(log_t.detach().exp())
    if not math.isfinite(temperature):
        return 1.0
    return min(max(temperature, TS_RANGE[0]), TS_RANGE[1])


def fit_exit_temperatures(logits: Tensor, labels: Tensor, **ts_options: Any) -> list[float]:
    """One temperature per exit of ``logits`` ``[N, E, C]``, each fitted on all samples' logits of that exit."""
    return [fit_temperature(logits[:, l], labels, **ts_options) for l in range(logits.shape[1])]


# ------------------------------------------------------------------------------------------------------ evaluator


class CalibrationEvaluator(Evaluator):
    """Calibration of the gated prediction and of every exit, raw and after per-exit temperature scaling.

    The temperatures depend on the trained heads only: :meth:`fit` fits them once per trained setting on
    the cal split, and every policy of that setting reuses them.
    """

    name = "calibration"

    @dataclass
    class Options:
        n_bins: int = option(DEFAULT_BINS, "bins of every ECE / MCE", min=1)
        compat_batch_size: int = option(64, "test batch of the paper-compat ECE (official: 64; 100 for "
                                            "CIFAR-100 and SVHN)", min=1)
        compat_chunks: int = option(10, "paper-compat ECE: the test set cut into this many consecutive chunks, "
                                        "each read in a seeded random order (official: 10); 0: consecutive "
                                        "batches", min=0)
        compat_seed: int = option(0, "seed of the paper-compat ECE's in-chunk order")
        ts_init: float = option(TS_INIT, "initial temperature", min=0)
        ts_lr: float = option(TS_LR, "LBFGS learning rate", min=0)
        ts_max_iter: int = option(TS_MAX_ITER, "LBFGS iterations", min=1)
        ts_line_search: str | None = option("strong_wolfe", "LBFGS line search; none: the official fixed steps",
                                            choices=("strong_wolfe",))

    options: CalibrationEvaluator.Options

    def __init__(self, **options: Any):
        super().__init__(**options)
        o = self.options
        self.n_bins = o.n_bins
        self.ts_options = {"init": o.ts_init, "lr": o.ts_lr, "max_iter": o.ts_max_iter,
                           "line_search": o.ts_line_search}
        self.temperatures: list[float] | None = None

    def fit(self, cal: ExitOutputs) -> None:
        """One temperature per exit, each fitted on every cal sample's logits of that exit."""
        self.temperatures = fit_exit_temperatures(cal.logits.detach().cpu(), cal.labels.detach().cpu(),
                                                  **self.ts_options)

    def evaluate(self, test: ExitOutputs, cal: ExitOutputs, exit_test: Tensor, exit_cal: Tensor) -> dict:
        """Metrics for the policy's exits ``exit_test``. The temperatures come from :meth:`fit` (fitted on
        ``cal`` here when it was not called); ``exit_cal`` is unused, as T is fitted per exit on all cal
        samples, the way the per-exit ECE is measured over all samples."""
        test.check_exit_index(exit_test, "test")
        if self.temperatures is None:
            self.fit(cal)
        assert self.temperatures is not None  # fit() sets them
        temperatures = list(self.temperatures)
        exit_test = exit_test.long().cpu()
        logits = test.logits.detach().double().cpu()
        labels = test.labels.detach().long().cpu()
        t_per_sample = torch.tensor(temperatures, dtype=torch.float64)[exit_test]

        gated = logits[torch.arange(len(labels)), exit_test]
        result: dict[str, Any] = calibration_metrics(gated, labels, self.n_bins)
        result["ece_compat"] = json_float(self._compat(gated, labels))
        result["scaled"] = calibration_metrics(gated / t_per_sample[:, None], labels, self.n_bins)
        result["temperatures"] = temperatures
        per_exit = []
        for l in range(test.num_exits):
            row: dict[str, Any] = {"index": l}
            row |= calibration_metrics(logits[:, l], labels, self.n_bins)
            row["ece_compat"] = json_float(self._compat(logits[:, l], labels))
            row["temperature"] = temperatures[l]
            row["scaled"] = calibration_metrics(logits[:, l] / temperatures[l], labels, self.n_bins)
            per_exit.append(row)
        result["per_exit"] = per_exit
        result["settings"] = {
            "n_bins": self.n_bins,
            "bins": "(lo, hi], first bin includes 0; ece: equal width, ece_equal_mass: quantile edges",
            "ece_compat": f"paper-compat: per batch of {self.options.compat_batch_size} "
                          f"({self.options.compat_chunks} shuffled chunks, seed {self.options.compat_seed}), "
                          f"{self.n_bins} numpy-percentile quantile bins, batch-size weighted mean, no TS (official "
                          "value = this x 100)",
            "temperature_scaling": dict(self.ts_options) | {"fitted_on": "cal split logits, one T per exit"},
        }
        return result

    def headline_metrics(self) -> dict[str, Metric]:
        return {"ece": Metric(label="ECE of the gated prediction (%)", scale=100),
                "ece_scaled": Metric(label="ECE of the gated prediction after temperature scaling (%)", scale=100)}

    def headline(self, metrics: dict) -> dict[str, float | None]:
        return {"ece": metrics["ece"], "ece_scaled": metrics["scaled"]["ece"]}

    def rows(self, metrics: dict) -> list[dict]:
        """The gated prediction's metrics, raw and after temperature scaling: two flat rows."""
        keys = ("accuracy", "confidence", "ece", "ece_equal_mass", "mce", "nll", "brier")
        raw = {"scaling": "none"} | {k: metrics[k] for k in keys} | {"ece_compat": metrics["ece_compat"]}
        scaled = {"scaling": "temperature"} | {k: metrics["scaled"][k] for k in keys}
        return [raw, scaled]

    def _compat(self, logits: Tensor, labels: Tensor) -> float:
        confidence, correct = confidence_and_correct(logits, labels)
        o = self.options
        return per_batch_quantile_ece(confidence, correct, o.compat_batch_size, self.n_bins, o.compat_chunks,
                                      o.compat_seed)
