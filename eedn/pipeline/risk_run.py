"""Risk control inside a run: the ``risk_control`` config block, results.json's ``risk_control`` block, its
ε-sweep figure and its terminal / comparison tables (docs/evaluation.md, "Risk-controlled exits").

The knob grid is fixed on val, the controller reads cal only, and the chosen setting is reported on test.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from eedn.runtime.errors import EednError

if TYPE_CHECKING:
    from eedn.core.config import Config

FIGURE = "risk_control.png"


def check_risk_config(cfg: Config, evaluators: dict) -> None:
    """Check the ``risk_control`` block against the registered controllers and knobs, and build the risk once
    (against the run's evaluators), before anything is trained; the key table (eedn/core/config.py) has already
    checked each value's type and limits."""
    from eedn.core.plugins import create
    from eedn.evaluate.risk import CONTROLLERS, KNOBS, check_levels

    rc = cfg.risk_control
    if not rc.risk:
        return
    if rc.controller not in CONTROLLERS:
        raise EednError(f"unknown risk controller '{rc.controller}'; use one of: {', '.join(CONTROLLERS)}")
    if rc.knob not in KNOBS:
        raise EednError(f"unknown risk-control knob '{rc.knob}'; use one of: {', '.join(KNOBS)}")
    risk = create("risk", rc.risk, **rc.risk_options)
    risk.check(evaluators)
    for eps in [rc.epsilon, *rc.epsilons]:
        check_levels(eps, rc.delta, risk.lower, risk.upper)


def risk_control_block(cfg: Config, gate: Any, outs: dict, evaluators: dict) -> dict:
    """results.json's ``risk_control``: the chosen knob value and its test risk, MACs and bound, plus the ε sweep
    of every controller (``outs`` holds the val / cal / test ExitOutputs of the reported setting)."""
    from eedn.runtime.io import json_float
    from eedn.core.plugins import create
    from eedn.evaluate.risk import CONTROLLERS, GUARANTEES, build_knob, loss_matrix, mean_macs, select

    rc = cfg.risk_control
    risk = create("risk", rc.risk, **rc.risk_options)
    risk.fit(outs["val"], evaluators)
    knob = build_knob(gate, outs["val"], rc.knob, rc.grid_size)
    exits = {s: knob.exits(outs[s]) for s in ("cal", "test")}
    losses = {s: loss_matrix(risk.exit_losses(outs[s]), exits[s]) for s in exits}
    costs = {s: mean_macs(exits[s], outs[s].exit_macs) for s in exits}
    full = float(outs["test"].full_macs)

    def choose(controller: str, epsilon: float) -> dict:
        sel = select(controller, losses["cal"], costs["cal"], epsilon, rc.delta, risk.lower, risk.upper,
                     risk.binary)
        return {"epsilon": epsilon, "setting": knob.label(sel.index), "knob_index": sel.index,
                "knob_value": json_float(knob.values[sel.index]), **sel.to_dict(),
                "test_risk": float(losses["test"][sel.index].mean()),
                "cal_macs_fraction": float(costs["cal"][sel.index]) / full,
                "test_macs_fraction": float(costs["test"][sel.index]) / full,
                "macs_saved": 1.0 - float(costs["test"][sel.index]) / full}

    chosen = choose(rc.controller, rc.epsilon)
    test_summary = outs["test"].summarize(exits["test"][chosen["knob_index"]])
    chosen |= {"test_accuracy": test_summary["accuracy"], "test_mean_macs": test_summary["mean_macs"],
               "exit_fractions": test_summary["exit_fractions"]}
    sweep = [choose(c, e) for c in CONTROLLERS for e in rc.epsilons]
    return {"risk": risk.describe(), "epsilon": rc.epsilon, "delta": rc.delta,
            "controller": rc.controller, "guarantee": GUARANTEES[rc.controller],
            "knob": {"name": knob.name, "grid_size": len(knob.values), "fixed_on": "val", "calibrated_on": "cal"},
            "n_cal": outs["cal"].num_samples, "n_test": outs["test"].num_samples, "chosen": chosen,
            "sweep": [{k: row[k] for k in SWEEP_KEYS} for row in sweep]}


SWEEP_KEYS = ("controller", "epsilon", "setting", "certified", "bound", "cal_risk", "test_risk", "test_macs_fraction",
              "macs_saved")


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
        return f"{ms['mean']:.{digits}f}" + ("" if ms["std"] is None or math.isnan(ms["std"]) else f" ± {ms['std']:.{digits}f}")

    r0 = rows[0]
    lines = ["## Risk-controlled policies", "",
             f"{r0['risk']} <= ε = {r0['epsilon']:g} with {r0['controller']} (δ = {r0['delta']:g}); knob fixed on "
             "val, chosen on cal, measured on test.", "",
             "| strategy | test risk | test accuracy | MACs fraction | fallbacks / seeds |", "|---|---|---|---|---|"]
    lines += [f"| {r['strategy']} | {cell(r['test_risk'])} | {cell(r['test_accuracy'])} | {cell(r['macs_fraction'], 3)} "
              f"| {r['fallbacks']} / {r['seeds']} |" for r in rows]
    return lines
