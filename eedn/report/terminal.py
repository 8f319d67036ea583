"""What `eedn run`, `eedn compare` and `eedn report` print: the tables of :mod:`eedn.report.render` for a terminal
(means only where several strategies must fit; the Markdown reports have every number)."""
from __future__ import annotations

import os
import sys

from eedn.report.render import (cell, exit_latencies, format_macs, metric_cell, point_name, run_comparison, run_label,
                                title)
from eedn.report.risk_report import comparison_table, risk_lines

#: rows per strategy in the terminal's matched-cost table (the Markdown report has all of them)
TERMINAL_ROWS_PER_STRATEGY = 8
#: line width of the tables when stdout is no terminal (a log file, a pipe, CI): wide enough that no table is cut
PIPE_WIDTH = 200


def report_console(file=None):
    """The console the tables go to: the terminal's width in a terminal; otherwise ``$COLUMNS`` or
    :data:`PIPE_WIDTH` columns, where rich would assume 80 and fold every table into narrow columns."""
    from rich.console import Console

    stream = file or sys.stdout
    if stream.isatty() or os.environ.get("COLUMNS"):
        return Console(file=file)
    return Console(file=file, width=PIPE_WIDTH)


def _thin(rows: list[dict], limit: int) -> list[dict]:
    """At most ``limit`` rows spread evenly over cost, always keeping the policy rows."""
    if len(rows) <= limit:
        return rows
    step = (len(rows) - 1) / (limit - 1)
    keep = {round(i * step) for i in range(limit)} | {i for i, r in enumerate(rows) if r["policy"]}
    return [r for i, r in enumerate(rows) if i in keep]


def _min_width(header: str, text: bool) -> int:
    """Narrow terminals wrap headers between words, never inside one (numbers keep their width)."""
    return 8 if text else max(len(word) for word in header.split())


def _terminal_metrics(metrics: dict[str, dict]) -> dict[str, dict]:
    """Accuracy and each evaluator's first headline number: what fits an 80-column terminal."""
    seen: set = set()
    shown = {}
    for key, spec in metrics.items():
        owner = spec.get("evaluator", key)
        if owner not in seen:
            seen.add(owner)
            shown[key] = spec
    return shown


def _header(key: str, spec: dict) -> str:
    """A short column header (the metric's key); the full labels are printed below the table."""
    return f"{key} %" if spec["scale"] == 100 else key


def print_comparison(comparison: dict, console=None) -> None:
    """The reported policies (mean ± std), then the accuracy at matched cost (means only, so that several
    strategies fit a terminal), or a one-strategy comparison's operating points."""
    from rich.markup import escape
    from rich.table import Table

    console = console or report_console()
    metrics, matched = _terminal_metrics(comparison["metrics"]), comparison["matched"]
    cols = matched["columns"]
    t = Table(title=escape(f"reported policies: {title(comparison)}"))
    for col in ("strategy", "setting", "MACs frac.", *(_header(key, spec) for key, spec in metrics.items())):
        text = col in ("strategy", "setting")
        t.add_column(escape(col), justify="left" if text else "right", overflow="fold", min_width=_min_width(col, text))
    for label, pol in comparison["summary"].items():
        t.add_row(escape(label), escape(", ".join(pol["policy_setting"])), cell(pol["macs_fraction"], 1, 3, "±"),
                  *(metric_cell(pol[key], spec, "±") for key, spec in metrics.items()))
    console.print(t)
    legend = [f"{key}: {spec['label']}" for key, spec in metrics.items() if key != "accuracy"]
    if legend:
        console.print(escape("; ".join(legend)))
    anytime = comparison.get("anytime") or {}
    if anytime.get("range"):
        lo, hi = anytime["range"]
        console.print(escape(f"anytime score (mean accuracy % over MACs fractions [{lo:.3f}, {hi:.3f}]): " + "; ".join(
            f"{label} {cell(score, 100, 2, '±')}" for label, score in anytime["scores"].items())))
    one = len(cols) == 1
    acc = metrics["accuracy"]
    table = Table(title=f"operating points of {escape(cols[0])}" if one else
                  "accuracy % at matched mean MACs; — : outside that strategy's cost range")
    for col in ("operating point", "MACs frac.", *([_header(k, spec) for k, spec in metrics.items()] if one else cols)):
        text = col == "operating point"
        table.add_column(escape(col), justify="left" if text else "right", overflow="fold",
                         min_width=_min_width(col, text))
    thinned = False
    for label in cols:
        rows = [r for r in matched["rows"] if r["strategy"] == label]
        shown = _thin(rows, TERMINAL_ROWS_PER_STRATEGY)
        thinned |= len(shown) < len(rows)
        for r in shown:
            if one:
                cells = [metric_cell(r["values"][label][key], spec, "±") for key, spec in metrics.items()]
            else:
                cells = [metric_cell({**r["values"][a]["accuracy"], "std": None}, acc) for a in cols]
            table.add_row(escape(point_name(r)), cell(r["macs_fraction"], 1, 3, "±"), *cells)
        table.add_section()
    console.print(table)
    if comparison.get("risk_control"):
        console.print("\n".join(comparison_table(comparison["risk_control"])), markup=False, highlight=False)
    if thinned or not one or len(metrics) < len(comparison["metrics"]):
        console.print("(every operating point and metric, with ± std over seeds, is in the Markdown report)")


def print_run(results: dict, console=None) -> None:
    """What `eedn run` prints at the end: the exits, then the run's one-strategy comparison tables."""
    from rich.table import Table

    console = console or report_console()
    full, shares = results["full_macs"], results["policy"]["exit_fractions"]
    latency = exit_latencies(results.get("run_dir"))
    t = Table(title=f"exits of {run_label(results)}")
    cols = ["exit", "MACs", "of full", *([f"ms/image (b{latency[0]})"] if latency else []), "accuracy", "exit share"]
    for col in cols:
        t.add_column(col, justify="right")
    for e in results["exits"]:
        ms = [f"{latency[1][e['index']]:.3f}" if e["index"] < len(latency[1]) else "—"] if latency else []
        t.add_row(str(e["index"]), format_macs(e["macs"]), f"{e['macs'] / full:.3f}", *ms,
                  f"{100 * e['accuracy']:.2f}%", f"{100 * shares[e['index']]:.1f}%")
    console.print(t)
    if latency:
        console.print(f"ms/image: time to reach and evaluate each exit, measured by `eedn bench` at batch "
                      f"{latency[0]}")
    print_comparison(run_comparison(results), console)
    if results.get("risk_control"):
        console.print("\n".join(risk_lines(results["risk_control"])), markup=False, highlight=False)
    if results.get("run_dir"):
        console.print(f"run directory: {results['run_dir']}")
