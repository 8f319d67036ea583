"""Reports of run and comparison directories: Markdown and figures, from saved numbers only.

A single run is rendered as a one-strategy comparison: the same numbers
(:func:`eedn.evaluation.matched.comparison_numbers`),
the same policy and operating-point tables and the same figures, plus the run's own exits and evaluator rows.
The metrics shown are ``accuracy`` and every headline metric results.json declares, each with its own label,
scale and digits; nothing here knows any evaluator. The terminal tables are in :mod:`eedn.report.terminal`.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable

from eedn.runtime.io import atomic_write_json, atomic_write_text
from eedn.evaluation.matched import MISSING, OWN_IMS_KEY, comparison_numbers
from eedn.report.risk_report import comparison_table, risk_lines, write_risk_figure

#: figures every report has besides one ``<metric>_vs_macs.png`` per metric
EXIT_SHARES, RELIABILITY = "exit_shares.png", "reliability.png"
#: the run directory's Markdown report (a comparison's is comparison.md)
SUMMARY = "summary.md"
#: what `eedn bench` leaves in a run directory: its rows, with each exit's measured time when stage-profiled
BENCH = "bench.json"


def format_macs(macs: float) -> str:
    """``1.23G``, ``45.6M``, ``7.8K`` or a plain count: the one MACs (and parameter-count) format of every
    report and command."""
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if macs >= div:
            return f"{macs / div:.3g}{unit}"
    return f"{macs:.0f}"


def exit_latencies(run_dir: str | Path | None) -> tuple[int, list[float]] | None:
    """``(batch size, ms per image to reach and evaluate each exit)`` as `eedn bench` measured it in this run
    directory (its smallest stage-profiled batch size: the closest to per-request latency); None when not
    measured."""
    import json

    if run_dir is None or not (Path(run_dir) / BENCH).is_file():
        return None
    try:
        rows = json.loads((Path(run_dir) / BENCH).read_text())
    except (OSError, ValueError):
        return None
    timed = [r for r in rows if isinstance(r, dict) and r.get("exit_seconds")] if isinstance(rows, list) else []
    if not timed:
        return None
    row = min(timed, key=lambda r: r["batch_size"])
    return int(row["batch_size"]), [1e3 * float(t) for t in row["exit_seconds"]]


def metric_figure(key: str) -> str:
    """File name of the figure of one metric against MACs, e.g. ``accuracy_vs_macs.png``."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", key) + "_vs_macs.png"


def figure_names(comparison: dict) -> list[str]:
    names = [metric_figure(key) for key in comparison["metrics"]] + [EXIT_SHARES]
    return names + ([RELIABILITY] if comparison.get("reliability") else [])


def pooled_reliability(manifests: Iterable[dict]) -> dict:
    """Reliability bins of the reported policy's test predictions, pooled over runs (seeds); read from run.json
    (``policy.test``), where the pipeline stored every sample's confidence, prediction and label."""
    from eedn.core.outputs import reliability_bins

    confidence, correct = [], []
    for manifest in manifests:
        test = manifest["policy"]["test"]
        confidence += test["confidence"]
        correct += [p == y for p, y in zip(test["prediction"], test["label"])]
    return reliability_bins(confidence, correct)


def cost_range_notes(comparison: dict) -> list[str]:
    """Why a strategy's column is mostly empty: it covers a single cost (e.g. one trained setting), or its seeds
    share no cost range; nothing is extrapolated."""
    if len(comparison["matched"]["columns"]) < 2:
        return []
    notes = []
    for label, (lo, hi) in comparison["matched"]["cost_ranges"].items():
        if lo > hi:
            notes.append(f"the seeds of {label} share no cost range: its column is empty at the other strategies' "
                         "points (no extrapolation)")
        elif hi - lo <= 1e-9 * hi:
            notes.append(f"{label} covers a single cost ({lo:.3f} of full MACs): the other strategies are read at "
                         "that cost, its own column is empty elsewhere (no extrapolation)")
    return notes


def run_label(results: dict) -> str:
    """A run's strategy label, as `eedn compare` names it: the strategy, plus ``+gate`` only when a gate other
    than the strategy's default was asked for (``jei``, ``im-only+entropy``; never ``jei+jei``)."""
    requested = (results.get("config") or {}).get("gate")
    strategy = results["policy"]["strategy"]
    return strategy if not requested else f"{strategy}+{requested}"


def anytime_lines(comparison: dict) -> list[str]:
    """The anytime-score section: per strategy, mean accuracy over a stated MACs range (± std over seeds)."""
    anytime = comparison.get("anytime") or {}
    lines = ["## Anytime score", ""]
    if not anytime.get("range"):
        return lines + [("No cost range is covered by two or more operating points of every strategy with a "
                         "curve, so there is no anytime score (set one with `--anytime-range LO,HI`)."), ""]
    lo, hi = anytime["range"]
    how = "the range every strategy with a curve covers in every seed" if anytime["source"] == "shared" \
        else "the range asked for"
    lines += [(f"Area under the {anytime['metric']}–MACs curve over mean MACs fractions [{lo:.3f}, {hi:.3f}] "
               f"({how}), divided by its width: the mean {anytime['metric']} over that range, per seed, then mean "
               "± std over seeds. — : the strategy's points do not span the range in some seed (no extrapolation)."),
              "", *_table(["strategy", f"anytime {anytime['metric']} % over [{lo:.3f}, {hi:.3f}]", "seeds"],
                          ([label, cell(score, 100, 2), f"{score.get('n', 0)} of {len(score.get('per_seed', {}))}"]
                           for label, score in anytime["scores"].items())), ""]
    return lines


def run_comparison(results: dict, manifest: dict | None = None) -> dict:
    """One run as a one-strategy comparison (its reliability bins when ``manifest`` is given)."""
    label = run_label(results)
    seed = results["config"]["seed"]
    comparison = {"kind": "run", "backbone": results["config"]["backbone"], "dataset": results["dataset"],
                  "seeds": [seed], **comparison_numbers({label: {seed: results}}), "notes": []}
    if manifest is not None:
        comparison["reliability"] = {label: pooled_reliability([manifest])}
    return comparison


def title(comparison: dict) -> str:
    n = len(comparison["seeds"])
    seeds = f"{n} seeds" if n > 1 else f"seed {comparison['seeds'][0]}"
    return f"{comparison['backbone']} on {comparison['dataset']['name']} ({seeds})"


# --------------------------------------------------------------------------------------------------- figures


def cost_axis(comparison: dict) -> tuple[str, float, str]:
    """``(key, scale, label)`` of the figures' cost axis: the fraction of full MACs, or mean MACs in millions
    when the strategies' full costs differ (a sweep over backbones), where fractions would not be comparable."""
    fulls = {s["full_macs"] for s in comparison["summary"].values()}
    if len(fulls) == 1:
        return "macs_fraction", 1.0, f"mean MACs / full backbone MACs (full = {format_macs(next(iter(fulls)))})"
    return "mean_macs", 1e-6, "mean MACs per image (millions)"


def draw_figures(out_dir: Path, comparison: dict, exits: list[dict] | None = None) -> list[str]:
    """Every figure of a report; ``exits`` (a run's per-exit accuracies) adds the single exits to the accuracy
    figure. Every strategy keeps one colour in all of them. Returns the file names written."""
    from eedn.report import plots

    name = title(comparison)
    summary = comparison["summary"]
    colors = plots.strategy_colors([*summary, *comparison.get("reliability", {})])
    x, x_scale, xlabel = cost_axis(comparison)
    full = next(iter(summary.values()))["full_macs"]
    for key, spec in comparison["metrics"].items():
        better = "lower" if spec.get("lower_is_better") else "higher"
        ref_x = (lambda e: e["macs"] / full) if x == "macs_fraction" else (lambda e: e["macs"])
        reference = {"single exits": [(ref_x(e), e["accuracy"]) for e in exits]} \
            if exits and key == "accuracy" else None
        plots.plot_metric_vs_macs(comparison["curves"], key, out_dir / metric_figure(key), scale=spec["scale"],
                                  ylabel=f"{spec['label']}, {better} is better", xlabel=xlabel,
                                  title=f"{spec['label']} vs compute: {name}", reference=reference,
                                  colors=colors, x=x, x_scale=x_scale, n_seeds=len(comparison["seeds"]))
    shares = {}
    for label, s in summary.items():
        fr = s.get("exit_fractions") or []
        shares[label] = {"mean": [c["mean"] for c in fr],
                         "std": None if any(c["std"] is None for c in fr) else [c["std"] for c in fr],
                         "subtitle": f"{', '.join(s['policy_setting'])}: {s['macs_fraction']['mean']:.3f} of full MACs"}
    plots.plot_exit_shares(shares, out_dir / EXIT_SHARES, title=f"exit shares of the reported policies: {name}",
                           colors=colors)
    if comparison.get("reliability"):
        plots.plot_reliability(comparison["reliability"], out_dir / RELIABILITY,
                               title=f"reliability of the reported policies: {name}", colors=colors)
    return figure_names(comparison)


# --------------------------------------------------------------------------------------------------- Markdown


def cell(ms: dict | None, scale: float = 1.0, digits: int = 2, sep: str = " ± ") -> str:
    """``mean ± std`` of an aggregated number; ``—`` when empty (``n/a`` when the strategy has no such number)."""
    if not ms or ms.get("mean") is None:
        return "n/a" if ms and ms.get("empty") == MISSING else "—"
    text = f"{scale * ms['mean']:.{digits}f}"
    if ms.get("std") is not None:
        text += f"{sep}{scale * ms['std']:.{digits}f}"
    return text


def metric_cell(ms: dict | None, spec: dict, sep: str = " ± ") -> str:
    return cell(ms, spec["scale"], spec["digits"], sep)


def point_name(row: dict) -> str:
    return f"{row['strategy']} [{row['setting']}]{' ★' if row['policy'] else ''}"


def _table(header: list[str], rows: Iterable[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def policies_table(comparison: dict) -> list[str]:
    metrics = comparison["metrics"]
    return _table(["strategy", "gate", "setting", "MACs fraction", *(m["label"] for m in metrics.values())],
                  ([label, s["gate"], ", ".join(s["policy_setting"]), cell(s["macs_fraction"], 1, 3),
                    *(metric_cell(s[k], m) for k, m in metrics.items())] for label, s in comparison["summary"].items()))


def points_table(comparison: dict) -> list[str]:
    """A one-strategy comparison's operating points, one column per metric (★: the reported policy)."""
    metrics, matched = comparison["metrics"], comparison["matched"]
    label = matched["columns"][0]
    return _table(["operating point", "MACs fraction", "mean MACs", *(m["label"] for m in metrics.values())],
                  ([point_name(r), cell(r["macs_fraction"], 1, 3), format_macs(r["mean_macs"]["mean"]),
                    *(metric_cell(r["values"][label][k], m) for k, m in metrics.items())] for r in matched["rows"]))


def matched_section(comparison: dict) -> list[str]:
    """Per metric, every strategy's value at every operating point of every strategy."""
    matched, metrics = comparison["matched"], comparison["metrics"]
    cols = matched["columns"]
    ranges = ["[{:.3f}, {:.3f}]".format(*matched["cost_ranges"][a]) for a in cols]
    lines = ["## Matched-cost comparison", "",
             "Each row is one operating point of one strategy (its curve points; ★ its reported policy). Each column "
             "is a strategy's value at that point's mean MACs, interpolated linearly in mean MACs on that strategy's "
             "own points (sorted by cost) per seed, then aggregated over seeds. **Bold**: the strategy's own "
             "measured value. — : outside that strategy's cost range [a, b] of full MACs (first row; in at least "
             "one seed), since nothing is extrapolated. n/a: that strategy reports no such number."]
    for key, spec in metrics.items():
        better = "lower" if spec.get("lower_is_better") else "higher"
        rows = [["*cost range (fraction of full MACs)*", "", *ranges]]
        for r in matched["rows"]:
            values = {a: r["values"][a][key] for a in cols}
            texts = [f"**{metric_cell(v, spec)}**" if a == r["strategy"] and v["mean"] is not None
                     else metric_cell(v, spec) for a, v in values.items()]
            rows.append([point_name(r), cell(r["macs_fraction"], 1, 3), *texts])
        lines += ["", f"### {spec['label']}, {better} is better", "",
                  *_table(["operating point", "MACs fraction", *cols], rows)]
    return lines


def _tail(comparison: dict, files: list[str]) -> list[str]:
    lines = ["", "## Figures", "", *(f"![{f}]({f})" for f in files if f.endswith(".png"))]
    if comparison.get("notes"):
        lines += ["", "## Notes", "", *(f"- {n}" for n in comparison["notes"])]
    return lines


def comparison_markdown(comparison: dict) -> str:
    """comparison.md: reported policies, the matched-cost tables, the figures and the runs."""
    seeds = comparison["seeds"]
    spread = f"seeds {', '.join(map(str, seeds))}, mean ± sample std" if len(seeds) > 1 else f"seed {seeds[0]}"
    one = len(comparison["matched"]["columns"]) == 1
    lines = [f"# eedn compare: {title(comparison)}", "",
             f"One backbone per seed ({spread}), shared by every strategy. Every number is measured on the test "
             "split.", "", "## Reported policies", "", *policies_table(comparison), ""]
    lines += anytime_lines(comparison)
    lines += ["## Operating points", "", *points_table(comparison)] if one else matched_section(comparison)
    if comparison.get("risk_control"):
        lines += ["", *comparison_table(comparison["risk_control"])]
    lines += _tail(comparison, comparison.get("files", []))
    runs = ([e["label"], seed, f"[{rel}]({rel}/{SUMMARY})"] for e in comparison["strategies"]
            for seed, rel in e["runs"].items())
    lines += ["", "## Runs", "", *_table(["strategy", "seed", "run directory"], runs)]
    return "\n".join(lines + ["", "All numbers: `comparison.json`. Re-render with `eedn report <this directory>`.", ""])


def exits_table(results: dict, latency: tuple[int, list[float]] | None = None) -> list[str]:
    """The exits of a run: cumulative MACs, their fraction of the full network, accuracy and, where `eedn bench`
    measured it, the time per image to reach each exit beside its MACs."""
    full = results["full_macs"]
    header = ["exit", "cumulative MACs", "fraction of full"]
    header += [f"latency ms/image (batch {latency[0]}, eedn bench)"] if latency else []
    rows = []
    for e in results["exits"]:
        row = [str(e["index"]), format_macs(e["macs"]), f"{e['macs'] / full:.3f}"]
        if latency:
            row.append(f"{latency[1][e['index']]:.3f}" if e["index"] < len(latency[1]) else "—")
        rows.append(row + [f"{e['accuracy']:.4f}"])
    return _table(header + ["accuracy"], rows)


def run_markdown(results: dict, comparison: dict, files: list[str],
                 latency: tuple[int, list[float]] | None = None) -> str:
    """summary.md of a run: backbone and exits, then the one-strategy comparison's tables, then every
    evaluator's rows for the reported policy."""
    full = results["full_macs"]
    lines = [f"# eedn run: {run_label(results)}, {title(comparison)}", "",
             f"Backbone {results['backbone'].get('display_name', results['backbone']['name'])}: test accuracy "
             f"{results['backbone']['test_accuracy']:.4f}; full MACs {format_macs(full)} per image. Every number is "
             "measured on the test split.", "", "## Exits (whole test split)", "",
             *exits_table(results, latency),
             "", "## Reported policy", "", *policies_table(comparison), "",
             "Exit shares: " + ", ".join(f"{s:.3f}" for s in results["policy"]["exit_fractions"]), ""]
    lines += anytime_lines(comparison)
    if len(comparison["matched"]["columns"]) == 1:
        lines += ["## Operating points", "", *points_table(comparison)]
    else:
        lines += [*own_ims_section(results), *matched_section(comparison)]
    for name, entry in (results.get("evaluators") or {}).items():
        rows = entry.get("rows") or []
        if rows:
            keys = list(dict.fromkeys(k for r in rows for k in r))
            lines += ["", f"## {name} (reported policy)", "",
                      *_table(keys, ([_plain(r.get(k)) for k in keys] for r in rows))]
    if results.get("risk_control"):
        lines += ["", "## Risk-controlled policy", "", "```", *risk_lines(results["risk_control"]), "```"]
    lines += _tail(comparison, files)
    return "\n".join(lines + ["", "All numbers: `results.json`; the model and its inputs: `run.json`. Re-render "
                                  "with `eedn report <this directory>`.", ""])


def own_ims_section(results: dict) -> list[str]:
    """A learned gate against max-prob thresholds on the same IMs, at the gate's own cost, per trained setting."""
    own = results.get(OWN_IMS_KEY)
    if not own:
        return []

    def pct(v) -> str:
        return "—" if v is None else f"{100 * v:.2f}"

    rows = ([r["setting"], f"{r['macs_fraction']:.3f}", pct(r["gate_accuracy"]), pct(r["threshold_accuracy"]),
             "—" if r["gate_minus_threshold"] is None else f"{100 * r['gate_minus_threshold']:+.2f}"]
            for r in own["at_gate_cost"])
    return ["## Learned gate vs thresholds on the same IMs", "",
            f"Each trained setting's learned gate against {own['gate']} thresholds on that setting's own IMs (budgets "
            "calibrated on val), read at the gate's test cost: the difference is what the gate adds (or loses) "
            "beyond the IMs. — : the gate's cost lies outside the threshold sweep's range.", "",
            *_table(["setting", "MACs fraction", "gate accuracy %", "thresholds accuracy %", "gate − thresholds"],
                    rows), ""]


def _plain(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


# --------------------------------------------------------------------------------------------------- writing


def write_comparison(out_dir: Path, comparison: dict, manifests: dict[str, list[dict]]) -> dict:
    """Add the reliability bins (from each strategy's run.json files) and write comparison.json, comparison.md
    and every figure into ``out_dir``."""
    comparison["reliability"] = {label: pooled_reliability(ms) for label, ms in manifests.items()}
    comparison["notes"] = cost_range_notes(comparison)
    comparison["files"] = ["comparison.json", "comparison.md", *figure_names(comparison)]
    draw_figures(out_dir, comparison)
    atomic_write_text(out_dir / "comparison.md", comparison_markdown(comparison))
    atomic_write_json(out_dir / "comparison.json", comparison)
    return comparison


def render_run(run_dir: Path, results: dict, manifest: dict | None = None) -> list[str]:
    """summary.md and every figure of one run directory (what `eedn run` writes after a run and `eedn report`
    rewrites). Returns the file names written."""
    run_dir = Path(run_dir)
    comparison = run_comparison(results, manifest)
    files = [SUMMARY, *draw_figures(run_dir, comparison, exits=results["exits"])]
    risk_figure = write_risk_figure(run_dir, results)
    files += [risk_figure] if risk_figure else []
    atomic_write_text(run_dir / SUMMARY, run_markdown(results, comparison, files, exit_latencies(run_dir)))
    return files

