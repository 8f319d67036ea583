"""The report side of risk control: the ε-sweep figure, the terminal and summary lines of a run's
``risk_control`` block, and the comparison table over strategies (docs/evaluation.md, "Risk-controlled exits")."""
from __future__ import annotations

import math
from pathlib import Path

FIGURE = "risk_control.png"


def plot_risk_sweep(rows: list[dict], path: str | Path, *, title: str, delta: float | None = None) -> Path:
    """Two panels per controller against ε: test risk (with the line risk = ε) and the share of MACs saved.
    ``rows`` carry ``controller``, ``epsilon``, ``test_risk`` (or ``mean_risk``) and ``macs_saved``; optional
    ``violation`` draws a third panel (P(test risk > ε) over re-splits, with the line δ)."""
    from eedn.report.plots import _figure, _save

    violations = any("violation" in r for r in rows)
    fig, axes = _figure(1, 3 if violations else 2, figsize=(13.5 if violations else 10, 4.0))
    controllers = list(dict.fromkeys(r["controller"] for r in rows))
    eps_all = sorted({r["epsilon"] for r in rows})
    for i, c in enumerate(controllers):
        mine = sorted((r for r in rows if r["controller"] == c), key=lambda r: r["epsilon"])
        xs = [r["epsilon"] for r in mine]
        style = {"color": f"C{i}", "marker": "o", "ms": 3, "lw": 1.3, "label": c, "ls": "--" if c == "naive" else "-"}
        axes[0, 0].plot(xs, [r.get("mean_risk", r.get("test_risk")) for r in mine], **style)
        axes[0, 1].plot(xs, [100 * r["macs_saved"] for r in mine], **style)
        if violations:
            axes[0, 2].plot(xs, [r["violation"] for r in mine], **style)
            if "pool_violation" in mine[0]:
                axes[0, 2].plot(xs, [r["pool_violation"] for r in mine], color=f"C{i}", ls=":", lw=1)
    axes[0, 0].plot(eps_all, eps_all, color="0.4", ls=":", label="risk = ε")
    axes[0, 0].set_ylabel("mean test risk" if any("mean_risk" in r for r in rows) else "test risk")
    axes[0, 1].set_ylabel("MACs saved vs the full backbone (%)")
    if violations:
        if delta is not None:
            axes[0, 2].axhline(delta, color="0.4", ls=":", label="δ")
        axes[0, 2].set_ylabel("P(test risk > ε) over re-splits (dotted: pool risk)")
    for ax in axes[0]:
        ax.set_xlabel("ε")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def write_risk_figure(run_dir: Path, results: dict) -> str | None:
    """Draw the run's ε sweep into ``run_dir`` (nothing when the run has no risk control)."""
    block = results.get("risk_control")
    if not block:
        return None
    plot_risk_sweep(block["sweep"], Path(run_dir) / FIGURE, delta=block["delta"],
                    title=f"{results['policy']['name']}: {block['risk']['name']}, δ = {block['delta']:g}, "
                          f"knob {block['knob']['name']} (cal n = {block['n_cal']}, test n = {block['n_test']})")
    return FIGURE


def risk_lines(block: dict) -> list[str]:
    """Plain-text summary of a risk_control block (terminal and summary.md)."""
    c = block["chosen"]
    bound = "n/a" if c["bound"] is None else f"{c['bound']:.4g}"
    lines = [f"risk control: {block['risk']['name']} <= ε = {block['epsilon']:g} with {block['controller']} "
             f"(δ = {block['delta']:g}; guarantee: {block['guarantee']})",
             f"  chosen: {c['setting']} ({c['num_certified']} of {block['knob']['grid_size']} knob values certified "
             f"on cal, n = {block['n_cal']}); {c['bound_name']}: {bound}",
             f"  test: risk {c['test_risk']:.4f}, accuracy {c['test_accuracy']:.4f}, mean MACs "
             f"{c['test_macs_fraction']:.3f} of full ({100 * c['macs_saved']:.1f}% saved)"]
    if c["fallback"]:
        lines.append(f"  note: {c['message']}")
    return lines


def comparison_rows(runs: dict[str, dict[int, dict]]) -> list[dict]:
    """One row per strategy with a risk-controlled policy: its chosen setting's test risk and MACs over seeds."""
    rows = []
    for label, by_seed in runs.items():
        blocks = [r["risk_control"] for r in by_seed.values() if r.get("risk_control")]
        if not blocks:
            continue
        chosen = [b["chosen"] for b in blocks]
        rows.append({"strategy": label, "risk": blocks[0]["risk"]["name"], "controller": blocks[0]["controller"],
                     "epsilon": blocks[0]["epsilon"], "delta": blocks[0]["delta"], "seeds": len(blocks),
                     "test_risk": _mean_std([c["test_risk"] for c in chosen]),
                     "test_accuracy": _mean_std([c["test_accuracy"] for c in chosen]),
                     "macs_fraction": _mean_std([c["test_macs_fraction"] for c in chosen]),
                     "fallbacks": sum(bool(c["fallback"]) for c in chosen)})
    return rows


def _mean_std(values: list[float]) -> dict:
    import numpy as np

    arr = np.asarray(values, dtype=np.float64)
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if len(arr) > 1 else None}


def comparison_table(rows: list[dict]) -> list[str]:
    """Markdown table of :func:`comparison_rows`."""
    if not rows:
        return []

    def cell(ms: dict, digits: int = 4) -> str:
        spread = "" if ms["std"] is None or math.isnan(ms["std"]) else f" ± {ms['std']:.{digits}f}"
        return f"{ms['mean']:.{digits}f}" + spread

    r0 = rows[0]
    lines = ["## Risk-controlled policies", "",
             f"{r0['risk']} <= ε = {r0['epsilon']:g} with {r0['controller']} (δ = {r0['delta']:g}); knob fixed on "
             "val, chosen on cal, measured on test.", "",
             "| strategy | test risk | test accuracy | MACs fraction | fallbacks / seeds |", "|---|---|---|---|---|"]
    lines += [f"| {r['strategy']} | {cell(r['test_risk'])} | {cell(r['test_accuracy'])} "
              f"| {cell(r['macs_fraction'], 3)} | {r['fallbacks']} / {r['seeds']} |" for r in rows]
    return lines
