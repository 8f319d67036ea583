"""Markdown summary, plots and terminal tables from a run's results (never re-runs anything)."""
from __future__ import annotations

import json
from pathlib import Path

from eedn.io import atomic_save_figure, atomic_write_text


def _fmt_macs(m: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if m >= div:
            return f"{m / div:.3g}{unit}"
    return f"{m:.0f}"


def summary_markdown(results: dict) -> str:
    cfg, pol = results["config"], results["policy"]
    lines = [
        f"# eedn run: {cfg['strategy']} on {cfg['backbone']} / {cfg['dataset']} (seed {cfg['seed']})",
        "",
        f"Backbone test accuracy {results['backbone']['test_accuracy']:.4f}; full MACs {_fmt_macs(results['full_macs'])} per image.",
        "",
        "## Exits (whole test split)",
        "",
        "| exit | cumulative MACs | fraction of full | accuracy |",
        "|---|---|---|---|",
    ]
    for e in results["exits"]:
        lines.append(f"| {e['index']} | {_fmt_macs(e['macs'])} | {e['macs'] / results['full_macs']:.3f} | {e['accuracy']:.4f} |")
    lines += ["", f"## Policy: {pol['name']} ({pol['setting']})", "",
              f"- accuracy: {pol['accuracy']:.4f}",
              f"- mean MACs: {_fmt_macs(pol['mean_macs'])} ({pol['macs_fraction']:.3f} of full)",
              f"- exit shares: {', '.join(f'{s:.3f}' for s in pol['exit_fractions'])}"]
    if pol.get("ece") is not None:
        lines.append(f"- ECE (15 equal-width bins): {pol['ece']:.4f}")
    if results.get("conformal"):
        lines += ["", "## Conformal prediction (calibrated on the cal split)", "",
                  "| α | method | variant | coverage | mean set size |", "|---|---|---|---|---|"]
        for row in results["conformal"]:
            lines.append(f"| {row['alpha']} | {row['method']} | {row.get('variant', '')} | {row['coverage']:.4f} | {row['mean_set_size']:.3f} |")
    if results.get("curve"):
        lines += ["", "## Curve", "", "| setting | accuracy | mean MACs | fraction of full |", "|---|---|---|---|"]
        for p in results["curve"]:
            lines.append(f"| {p['setting']} | {p['accuracy']:.4f} | {_fmt_macs(p['mean_macs'])} | {p['macs_fraction']:.3f} |")
    lines += ["", "Files: `results.json` (all numbers), `config.json` (resolved config), `accuracy_vs_macs.png`.", ""]
    return "\n".join(lines)


def plot_accuracy_vs_macs(results_by_name: dict[str, dict], path: Path, title: str = "") -> None:
    """One line per strategy (its curve, or its single policy point), plus the per-exit accuracies."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=110, layout="constrained")
    first = next(iter(results_by_name.values()))
    full = first["full_macs"]
    ax.plot([e["macs"] / full for e in first["exits"]], [100 * e["accuracy"] for e in first["exits"]],
            "k:", marker="x", label="single exits", alpha=0.6)
    for name, res in results_by_name.items():
        pts = sorted(res.get("curve") or [res["policy"]], key=lambda p: p["macs_fraction"])
        ax.plot([p["macs_fraction"] for p in pts], [100 * p["accuracy"] for p in pts], marker="o", ms=3, label=name)
        pol = res["policy"]
        ax.plot([pol["macs_fraction"]], [100 * pol["accuracy"]], marker="*", ms=12, color=ax.lines[-1].get_color())
    ax.set_xlabel(f"mean MACs / full MACs (full = {_fmt_macs(full)})")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title or "accuracy vs compute")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    atomic_save_figure(fig, path)
    plt.close(fig)


def render_report(run_dir: str | Path, results: dict | None = None) -> None:
    """Write summary.md and accuracy_vs_macs.png into ``run_dir`` from its results."""
    run_dir = Path(run_dir)
    if results is None:
        results = json.loads((run_dir / "results.json").read_text())
    atomic_write_text(run_dir / "summary.md", summary_markdown(results))
    cfg = results["config"]
    plot_accuracy_vs_macs({f"{cfg['strategy']}+{results['policy']['gate']}": results}, run_dir / "accuracy_vs_macs.png",
                          title=f"{cfg['backbone']} on {cfg['dataset']}")


def print_results_table(results: dict, console=None) -> None:
    """The rich table `eedn run` prints at the end."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    full = results["full_macs"]
    t = Table(title=f"{results['config']['strategy']} on {results['config']['backbone']} / {results['config']['dataset']}")
    for col in ("exit", "MACs", "of full", "accuracy", "exit share"):
        t.add_column(col, justify="right")
    shares = results["policy"]["exit_fractions"]
    for e in results["exits"]:
        t.add_row(str(e["index"]), _fmt_macs(e["macs"]), f"{e['macs'] / full:.3f}", f"{100 * e['accuracy']:.2f}%",
                  f"{100 * shares[e['index']]:.1f}%")
    pol = results["policy"]
    t.add_section()
    t.add_row("policy", _fmt_macs(pol["mean_macs"]), f"{pol['macs_fraction']:.3f}", f"{100 * pol['accuracy']:.2f}%", "100%")
    console.print(t)
    extra = f"policy {pol['name']} [{pol['setting']}]"
    if pol.get("ece") is not None:
        extra += f"  ECE {100 * pol['ece']:.2f}%"
    console.print(extra)
    if results.get("curve"):
        c = Table(title="curve")
        for col in ("setting", "accuracy", "MACs", "of full"):
            c.add_column(col, justify="right")
        for p in results["curve"]:
            c.add_row(p["setting"], f"{100 * p['accuracy']:.2f}%", _fmt_macs(p["mean_macs"]), f"{p['macs_fraction']:.3f}")
        console.print(c)
    console.print(f"run directory: {results.get('run_dir', '')}")
