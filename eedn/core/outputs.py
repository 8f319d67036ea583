"""ExitOutputs: everything policies and evaluators need about one split, from one all-exit pass."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from eedn.runtime.errors import EednError

#: bins of a reliability diagram and of the ECE (equal width on [0, 1]), the usual count
RELIABILITY_BINS = 15
#: equal-width bins on [0, 1], or equal-mass bins (quantiles of the confidences)
BINNINGS = ("width", "mass")


@dataclass
class ExitOutputs:
    """Per-exit logits ``[N, E, C]`` (E = G + 1 exits, the last is the backbone head), labels ``[N]``,
    gate scores ``[N, G]``, cumulative per-exit cost ``exit_macs[E]`` (MACs of everything run to reach
    and evaluate exit l) and ``full_macs`` (the plain backbone through its head)."""

    logits: Tensor
    labels: Tensor
    gate_scores: Tensor
    exit_macs: Tensor
    full_macs: float

    @property
    def num_exits(self) -> int:
        return self.logits.shape[1]

    @property
    def num_samples(self) -> int:
        return self.logits.shape[0]

    def probabilities(self) -> Tensor:
        return self.logits.float().softmax(-1)

    def exit_accuracy(self) -> Tensor:
        """Accuracy of every exit on the whole split, ``[E]``."""
        return (self.logits.argmax(-1) == self.labels[:, None]).float().mean(0)

    def check_exit_index(self, exit_index: Tensor, split: str = "") -> None:
        """Raise a one-line error unless ``exit_index`` holds one exit in ``0..E-1`` per sample."""
        where = f" for the {split} split" if split else ""
        if exit_index.shape != (self.num_samples,):
            raise EednError(f"exit indices{where} have shape {list(exit_index.shape)}; "
                            f"expected [{self.num_samples}] (one exit per sample)")
        if len(exit_index) and (int(exit_index.min()) < 0 or int(exit_index.max()) >= self.num_exits):
            raise EednError(f"exit indices{where} must lie in 0..{self.num_exits - 1}")

    def gated_logits(self, exit_index: Tensor) -> Tensor:
        """Logits ``[N, C]`` of the exit each sample left at."""
        return self.logits[torch.arange(self.num_samples), exit_index]

    def summarize(self, exit_index: Tensor) -> dict:
        """Accuracy, mean MACs, fraction of full MACs and exit shares for a policy's exit indices."""
        preds = self.gated_logits(exit_index).argmax(-1)
        counts = torch.bincount(exit_index, minlength=self.num_exits).double()
        shares = counts / max(self.num_samples, 1)
        mean_macs = float((shares * self.exit_macs.double()).sum())
        return {
            "accuracy": float((preds == self.labels).double().mean()),
            "mean_macs": mean_macs,
            "macs_fraction": mean_macs / self.full_macs,
            "exit_fractions": shares.tolist(),
        }

    def subset(self, rows: Tensor) -> ExitOutputs:
        return ExitOutputs(self.logits[rows], self.labels[rows], self.gate_scores[rows], self.exit_macs, self.full_macs)

    def to_dict(self) -> dict:
        return ({k: getattr(self, k) for k in ("logits", "labels", "gate_scores", "exit_macs")}
                | {"full_macs": self.full_macs})

    @classmethod
    def from_dict(cls, d: dict) -> ExitOutputs:
        return cls(d["logits"], d["labels"], d["gate_scores"], d["exit_macs"], float(d["full_macs"]))


# ------------------------------------------------------------------------------------------------ reliability bins


def reliability_edges(confidence: Sequence[float] | np.ndarray, n_bins: int = RELIABILITY_BINS,
                      binning: str = "width") -> np.ndarray:
    """The ``n_bins + 1`` bin edges: ``linspace(0, 1, n_bins + 1)`` (``width``), or exactly sklearn's ``quantile``
    strategy, ``numpy.percentile(conf, linspace(0, 1, n_bins + 1) * 100)`` (``mass``; ``torch.quantile`` rounds
    differently and would move samples that sit on an edge, docs/method.md §5.2)."""
    if binning not in BINNINGS:
        raise EednError(f"unknown binning '{binning}'; use one of: {', '.join(BINNINGS)}")
    if not isinstance(n_bins, int) or isinstance(n_bins, bool) or n_bins < 1:
        raise EednError(f"n_bins must be a positive integer, got {n_bins!r}")
    conf = np.asarray(confidence, dtype=np.float64).ravel()
    grid = np.linspace(0.0, 1.0, n_bins + 1)
    if binning == "width" or conf.size == 0:
        return grid
    return np.percentile(conf, grid * 100)


def reliability_index(confidence: Sequence[float] | np.ndarray, edges: np.ndarray) -> np.ndarray:
    """The bin of each confidence, ``0..len(edges)-2``: bin b covers ``(edge_b, edge_{b+1}]`` and the first one also
    its lower edge (``searchsorted(interior, conf, side="left")``, sklearn's ``calibration_curve`` rule)."""
    return np.searchsorted(np.asarray(edges)[1:-1], np.asarray(confidence, dtype=np.float64).ravel(), side="left")


def reliability_bins(confidence: Sequence[float] | np.ndarray, correct: Sequence[bool] | np.ndarray,
                     n_bins: int = RELIABILITY_BINS, binning: str = "width") -> dict:
    """Per-bin sample ``count``, mean ``confidence`` and ``accuracy`` (a reliability diagram), and the ``ece`` those
    bins give, ``sum_b (n_b / n) |acc_b - conf_b|`` (NaN for no samples). Empty bins have count 0 and NaN
    confidence and accuracy; bins as :func:`reliability_edges` and :func:`reliability_index` make them."""
    conf = np.asarray(confidence, dtype=np.float64).ravel()
    hits = np.asarray(correct, dtype=np.float64).ravel()
    if conf.shape != hits.shape:
        raise ValueError(f"confidence has {conf.size} entries but correct has {hits.size}")
    index = reliability_index(conf, reliability_edges(conf, n_bins, binning))
    count = np.bincount(index, minlength=n_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(index, weights=conf, minlength=n_bins) / count
        accuracy = np.bincount(index, weights=hits, minlength=n_bins) / count
    filled = count > 0
    gaps = count[filled] * np.abs(accuracy[filled] - mean_conf[filled])
    ece = float(gaps.sum() / count.sum()) if conf.size else math.nan
    return {"count": count.tolist(), "confidence": mean_conf.tolist(), "accuracy": accuracy.tolist(),
            "ece": ece, "n": int(conf.size), "n_bins": n_bins}
