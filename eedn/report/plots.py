"""Figures of run and comparison reports (`eedn run`, `compare`, `report`), drawn with matplotlib's Agg canvas.

Every function takes plain numbers (already aggregated over seeds) and writes one PNG atomically. Figures are
built on ``matplotlib.figure.Figure`` with an explicit ``FigureCanvasAgg`` rather than through pyplot, so drawing
never switches the process-wide backend or leaks open figures into a caller's session.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from eedn.runtime.io import atomic_save_figure
from eedn.core.outputs import RELIABILITY_BINS

#: curves with more points than this get a shaded ± std band instead of error bars
DENSE_CURVE = 12


# ------------------------------------------------------------------------------------------------------- drawing


def _figure(nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float] = (6.4, 4.4), **kwargs):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False, **kwargs)
    return fig, axes


def _save(fig, path: str | os.PathLike) -> Path:
    """Render to memory first, then replace ``path`` in one step (never a half-written PNG)."""
    fig.tight_layout()
    atomic_save_figure(fig, path)
    return Path(path)


def _mean(cell: dict | None) -> float:
    return math.nan if not cell or cell.get("mean") is None else float(cell["mean"])


def _std(cell: dict | None) -> float:
    return 0.0 if not cell or cell.get("std") is None else float(cell["std"])


def plot_metric_vs_macs(curves: dict[str, dict], metric: str, path: str | os.PathLike, *, ylabel: str,
                        title: str, scale: float = 1.0, xlabel: str = "mean MACs / full backbone MACs",
                        reference: dict[str, list[tuple[float, float]]] | None = None) -> Path:
    """One line per strategy: ``metric`` against the mean-MACs fraction, error bars ± std over seeds.

    ``curves[label] = {"points": [...], "policy": point}``, each point aggregated over seeds as
    ``{"macs_fraction": {"mean", "std"}, metric: {"mean", "std"}}``. The line joins the curve points (sorted by
    cost), with error bars, or a shaded band of ± std in the metric for a dense sweep; the reported policy is a
    star (a budget-calibrated policy is not one of the sweep's settings, so it is not joined to the line). Points
    whose metric is missing are skipped. ``scale`` multiplies the metric (100 for percentages). ``reference``
    adds dotted grey lines of ``(macs_fraction, value)`` points, e.g. every exit on its own.
    """
    fig, axes = _figure()
    ax = axes[0, 0]
    for name, pts in (reference or {}).items():
        ax.plot([x for x, _ in pts], [scale * y for _, y in pts], color="0.3", ls=":", marker="x", alpha=0.7,
                label=name)
    for i, (label, curve) in enumerate(curves.items()):
        color = f"C{i % 10}"
        line = sorted((p for p in curve.get("points", []) if not math.isnan(_mean(p.get(metric)))),
                      key=lambda p: _mean(p["macs_fraction"]))
        if line:
            xs = np.array([_mean(p["macs_fraction"]) for p in line])
            ys = np.array([scale * _mean(p[metric]) for p in line])
            ystd = np.array([scale * _std(p[metric]) for p in line])
            if len(line) > DENSE_CURVE:  # error bars on a dense sweep hide the lines: a ± std band instead
                ax.plot(xs, ys, color=color, marker="o", ms=2.5, lw=1.4, label=label)
                if ystd.any():
                    ax.fill_between(xs, ys - ystd, ys + ystd, color=color, alpha=0.15, lw=0)
            else:
                ax.errorbar(xs, ys, xerr=[_std(p["macs_fraction"]) for p in line], yerr=ystd, color=color,
                            marker="o", ms=3, lw=1.4, elinewidth=0.8, capsize=2, label=label)
        pol = curve.get("policy")
        if pol is not None and not math.isnan(_mean(pol.get(metric))):
            ax.errorbar([_mean(pol["macs_fraction"])], [scale * _mean(pol[metric])], xerr=[_std(pol["macs_fraction"])],
                        yerr=[scale * _std(pol[metric])], color=color, marker="*", ms=12, capsize=2,
                        label=None if line else label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        order = {label: i for i, label in enumerate(curves)}  # strategy order, whatever artist drew the entry
        pairs = sorted(zip(handles, labels), key=lambda hl: order.get(hl[1], len(order)))
        ax.legend([h for h, _ in pairs], [l for _, l in pairs], fontsize=8, title="★ reported policy",
                  title_fontsize=7)
    else:
        ax.text(0.5, 0.5, "no data for this metric", ha="center", va="center", transform=ax.transAxes)
    return _save(fig, path)


def plot_exit_shares(shares: dict[str, dict], path: str | os.PathLike, *, title: str) -> Path:
    """One panel per strategy: the share of test samples leaving at each exit (± std over seeds).

    ``shares[label] = {"mean": [E], "std": [E] or None, "subtitle": str}``.
    """
    n = max(len(shares), 1)
    ncols = min(n, 4)
    nrows = math.ceil(n / ncols)
    fig, axes = _figure(nrows, ncols, figsize=(3.2 * ncols, 2.9 * nrows + 0.4), sharey=True)
    top = 1.0
    for entry in shares.values():
        mean = 100 * np.asarray(entry["mean"], dtype=np.float64)
        spread = 0 if entry.get("std") is None else 100 * np.nan_to_num(np.asarray(entry["std"], dtype=np.float64))
        if mean.size:
            top = max(top, float(np.nanmax(mean + spread)))
    for i, (label, entry) in enumerate(shares.items()):
        ax = axes[i // ncols, i % ncols]
        mean = 100 * np.asarray(entry["mean"], dtype=np.float64)
        std = None if entry.get("std") is None else 100 * np.asarray(entry["std"], dtype=np.float64)
        idx = np.arange(len(mean))
        ax.bar(idx, mean, yerr=std, color=f"C{i % 10}", capsize=3, label=label)
        ax.set_xticks(idx, [f"{j}" if j < len(mean) - 1 else f"{j}\n(head)" for j in idx])
        ax.set_xlabel("exit")
        if i % ncols == 0:
            ax.set_ylabel("share of test samples (%)")
        ax.set_title(f"{label}\n{entry.get('subtitle', '')}".strip(), fontsize=8)
        ax.set_ylim(0, top * 1.25)  # shared by every panel; headroom for the legend above the bars
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, loc="upper right")
    for j in range(len(shares), nrows * ncols):
        axes[j // ncols, j % ncols].set_visible(False)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def plot_reliability(bins: dict[str, dict], path: str | os.PathLike, *, title: str) -> Path:
    """Reliability diagram: per-bin accuracy against mean confidence, one line per strategy, and below it the
    share of samples in each bin. ``bins[label]`` is :func:`eedn.core.outputs.reliability_bins` output."""
    fig, axes = _figure(2, 1, figsize=(6.4, 6.0), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top, bottom = axes[0, 0], axes[1, 0]
    top.plot([0, 1], [0, 1], color="0.5", ls="--", lw=1, label="accuracy = confidence")
    n_bins = RELIABILITY_BINS
    for i, (label, b) in enumerate(bins.items()):
        color = f"C{i % 10}"
        count = np.asarray(b["count"], dtype=np.float64)
        filled = count > 0
        conf = np.asarray(b["confidence"], dtype=np.float64)[filled]
        acc = np.asarray(b["accuracy"], dtype=np.float64)[filled]
        ece = b.get("ece")
        name = label if ece is None or math.isnan(ece) else f"{label} (ECE {100 * ece:.2f}%, n={b.get('n', '?')})"
        top.plot(conf, acc, color=color, marker="o", ms=4, label=name)
        n_bins = b.get("n_bins", n_bins)
        centers = (np.arange(len(count)) + 0.5) / len(count)
        bottom.step(centers, 100 * count / max(count.sum(), 1), where="mid", color=color)
    top.set_xlim(0, 1)
    top.set_ylim(0, 1.02)
    top.set_ylabel("accuracy in bin")
    top.set_title(title)
    top.grid(alpha=0.3)
    top.legend(fontsize=8, loc="best")
    bottom.set_xlabel(f"confidence (max softmax of the gated prediction; {n_bins} equal-width bins)")
    bottom.set_ylabel("samples (%)")
    bottom.grid(alpha=0.3)
    return _save(fig, path)

