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

#: at most this many error bars per curve: a dense sweep shows its seed spread at evenly spaced points, never as a
#: band (with two or three seeds a ± std band is mostly noise and hides the lines under it)
MAX_ERROR_BARS = 7
#: characters per line of a wrapped title / y-label (a 6.4-inch figure at the default font size)
TITLE_CHARS, YLABEL_CHARS = 72, 46
#: the colour cycle of every figure; :func:`strategy_colors` pins each strategy to one entry
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf")


def strategy_colors(labels) -> dict[str, str]:
    """One colour per strategy label, in the comparison's order: every figure of a report gets this same map,
    so a strategy has the same colour in the accuracy, metric, exit-share and reliability figures."""
    return {label: PALETTE[i % len(PALETTE)] for i, label in enumerate(dict.fromkeys(labels))}


def wrap(text: str, width: int) -> str:
    """Break a long title or axis label between words so that it fits the figure instead of being clipped."""
    import textwrap

    return "\n".join(textwrap.wrap(text, width)) or text


def _color(colors: dict[str, str] | None, label: str, i: int) -> str:
    return (colors or {}).get(label, PALETTE[i % len(PALETTE)])


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


def _spread_indices(n: int, limit: int) -> list[int]:
    """At most ``limit`` indices spread evenly over ``range(n)``, both ends included."""
    if n <= limit:
        return list(range(n))
    return sorted({round(i * (n - 1) / (limit - 1)) for i in range(limit)})


def plot_metric_vs_macs(curves: dict[str, dict], metric: str, path: str | os.PathLike, *, ylabel: str,
                        title: str, scale: float = 1.0, xlabel: str = "mean MACs / full backbone MACs",
                        reference: dict[str, list[tuple[float, float]]] | None = None,
                        colors: dict[str, str] | None = None, x: str = "macs_fraction", x_scale: float = 1.0,
                        n_seeds: int = 1) -> Path:
    """One line per strategy: ``metric`` against cost (``x``: the mean-MACs fraction, or ``mean_macs`` when the
    strategies have different full costs), with ± std error bars over seeds.

    ``curves[label] = {"points": [...], "policy": point}``, each point aggregated over seeds as
    ``{"macs_fraction": {"mean", "std"}, metric: {"mean", "std"}}``. The line joins the curve points (sorted by
    cost); with several seeds, thin capped error bars (± std of the metric) sit on at most
    :data:`MAX_ERROR_BARS` evenly spaced points of it. The reported policy is a star with its own metric error
    bar (a budget-calibrated policy is not one of the sweep's settings, so it is not joined to the line). Points
    whose metric is missing are skipped. ``scale`` multiplies the metric (100 for percentages). ``reference``
    adds dotted grey lines of ``(x, value)`` points, e.g. every exit on its own.
    """
    fig, axes = _figure()
    ax = axes[0, 0]
    for name, pts in (reference or {}).items():
        ax.plot([x_scale * px for px, _ in pts], [scale * y for _, y in pts], color="0.3", ls=":", marker="x",
                alpha=0.7, label=name)
    bar_style = {"elinewidth": 0.9, "capsize": 2.5, "capthick": 0.9, "ls": "none", "alpha": 0.8}
    for i, (label, curve) in enumerate(curves.items()):
        color = _color(colors, label, i)
        line = sorted((p for p in curve.get("points", []) if not math.isnan(_mean(p.get(metric)))),
                      key=lambda p: _mean(p[x]))
        if line:
            xs = np.array([x_scale * _mean(p[x]) for p in line])
            ys = np.array([scale * _mean(p[metric]) for p in line])
            ystd = np.array([scale * _std(p[metric]) for p in line])
            ax.plot(xs, ys, color=color, marker="o", ms=2.5 if len(line) > MAX_ERROR_BARS else 3.5, lw=1.4,
                    label=label)
            if ystd.any():
                keep = _spread_indices(len(line), MAX_ERROR_BARS)
                ax.errorbar(xs[keep], ys[keep], yerr=ystd[keep], color=color, **bar_style)
        pol = curve.get("policy")
        if pol is not None and not math.isnan(_mean(pol.get(metric))):
            px, py, pstd = x_scale * _mean(pol[x]), scale * _mean(pol[metric]), scale * _std(pol[metric])
            if pstd:
                ax.errorbar([px], [py], yerr=[pstd], color=color, **bar_style)
            ax.plot([px], [py], color=color, marker="*", ms=13, mec="white", mew=0.8, ls="none",
                    label=None if line else label, zorder=3)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(wrap(ylabel, YLABEL_CHARS))
    ax.set_title(wrap(title, TITLE_CHARS), fontsize=11)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        order = {label: i for i, label in enumerate(curves)}  # strategy order, whatever artist drew the entry
        pairs = sorted(zip(handles, labels), key=lambda hl: order.get(hl[1], len(order)))
        note = "★ reported policy" + (f"; bars: ± std over {n_seeds} seeds" if n_seeds > 1 else "")
        ax.legend([h for h, _ in pairs], [l for _, l in pairs], fontsize=8, title=note, title_fontsize=7)
    else:
        ax.text(0.5, 0.5, "no data for this metric", ha="center", va="center", transform=ax.transAxes)
    return _save(fig, path)


def share_error_bars(mean: np.ndarray, std: np.ndarray | None) -> np.ndarray | None:
    """Asymmetric ± std error bars of shares in percent, cut at 0 % and 100 %: a share is never drawn below
    nothing or above every sample."""
    if std is None:
        return None
    std = np.nan_to_num(std)
    return np.stack([np.minimum(std, mean), np.minimum(std, 100.0 - mean)])


def plot_exit_shares(shares: dict[str, dict], path: str | os.PathLike, *, title: str,
                     colors: dict[str, str] | None = None) -> Path:
    """One panel per strategy: the share of test samples leaving at each exit (± std over seeds, cut at 0 and
    100 %). ``shares[label] = {"mean": [E], "std": [E] or None, "subtitle": str}``."""
    n = max(len(shares), 1)
    ncols = min(n, 4)
    nrows = math.ceil(n / ncols)
    fig, axes = _figure(nrows, ncols, figsize=(3.2 * ncols, 2.9 * nrows + 0.5), sharey=True)
    for i, (label, entry) in enumerate(shares.items()):
        ax = axes[i // ncols, i % ncols]
        mean = np.clip(100 * np.asarray(entry["mean"], dtype=np.float64), 0.0, 100.0)
        std = None if entry.get("std") is None else 100 * np.asarray(entry["std"], dtype=np.float64)
        idx = np.arange(len(mean))
        ax.bar(idx, mean, yerr=share_error_bars(mean, std), color=_color(colors, label, i), capsize=3,
               error_kw={"elinewidth": 0.9})
        ax.set_xticks(idx, [f"{j}" if j < len(mean) - 1 else f"{j}\n(head)" for j in idx])
        ax.set_xlabel("exit")
        if i % ncols == 0:
            ax.set_ylabel("share of test samples (%)")
        subtitle = wrap(entry.get("subtitle", ""), 44)
        ax.set_title(f"{wrap(label, 40)}\n{subtitle}".strip(), fontsize=8)
        ax.set_ylim(0, 100)
        ax.grid(axis="y", alpha=0.3)
    for j in range(len(shares), nrows * ncols):
        axes[j // ncols, j % ncols].set_visible(False)
    fig.suptitle(wrap(title, 30 * ncols), fontsize=10)
    return _save(fig, path)


def plot_reliability(bins: dict[str, dict], path: str | os.PathLike, *, title: str,
                     colors: dict[str, str] | None = None) -> Path:
    """Reliability diagram: per-bin accuracy against mean confidence, one line per strategy, and below it the
    share of samples in each bin. ``bins[label]`` is :func:`eedn.core.outputs.reliability_bins` output."""
    fig, axes = _figure(2, 1, figsize=(6.4, 6.0), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top, bottom = axes[0, 0], axes[1, 0]
    top.plot([0, 1], [0, 1], color="0.5", ls="--", lw=1, label="accuracy = confidence")
    n_bins = RELIABILITY_BINS
    for i, (label, b) in enumerate(bins.items()):
        color = _color(colors, label, i)
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
    top.set_title(wrap(title, TITLE_CHARS), fontsize=11)
    top.grid(alpha=0.3)
    top.legend(fontsize=8, loc="best")
    bottom.set_xlabel(f"confidence (max softmax of the gated prediction; {n_bins} equal-width bins)")
    bottom.set_ylabel("samples (%)")
    bottom.grid(alpha=0.3)
    return _save(fig, path)

