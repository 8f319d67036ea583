"""Do the risk controllers keep their promise on real outputs? A re-split validity check.

Reads a finished run directory (its outputs.pt, run.json and model.pt: no network pass, no training), fixes the
knob grid on its val split, pools its cal and test splits, and over ``--resplits`` random cal/test re-splits of
that pool (the cal size of the run) lets every controller choose on cal and measures on test, at every ε:

* the violation frequency P(test risk > ε) — at most δ (within Monte-Carlo error) for ucb-hb, ucb-wsr and ltt;
  beside it P(pool risk > ε), the risk of the chosen setting on the whole cal + test pool, which is the
  population each cal split is drawn from and so the quantity the guarantee is about;
* the mean test risk — at most ε for crc;
* the mean share of MACs saved against the full backbone, and how often no setting was certified (fallback).

The naive choice (empirical cal risk ≤ ε) is the baseline that violates. The test risk is itself a finite-sample
estimate, and the test split is the complement of cal in the pool: a cal split that happened to look safe leaves
a test split that looks worse (E[test risk | cal] = R_pool + n_cal/n_test · (R_pool − cal risk)), so
P(test risk > ε) overstates how often the true risk exceeds ε, the more so the smaller the test split. Writes a JSON file and a
figure (test risk, MACs saved and violations against ε). Usage (docs/evaluation.md has the measured results)::

    nice -n 5 python benchmarks/bench_risk_validity.py RUN_DIR --risk prediction_gap --resplits 200 --out /tmp/rv
"""
from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import eedn  # noqa: E402
from eedn.runtime.io import atomic_write_json  # noqa: E402
from eedn.core.outputs import ExitOutputs  # noqa: E402
from eedn.evaluation.risk import CONTROLLERS, build_knob, loss_matrix, select  # noqa: E402
from eedn.report.risk_report import plot_risk_sweep  # noqa: E402
from eedn.pipeline.rundir import load_model, read_results  # noqa: E402

DEFAULT_EPSILONS = "0.01,0.02,0.05,0.1,0.15"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="a finished `eedn run` directory")
    p.add_argument("--risk", default="prediction_gap", help="registered risk (default prediction_gap)")
    p.add_argument("--risk-option", action="append", default=[], metavar="KEY=VALUE", help="a risk option")
    p.add_argument("--epsilons", default=DEFAULT_EPSILONS, help=f"comma list of ε (default {DEFAULT_EPSILONS})")
    p.add_argument("--delta", type=float, default=0.1, help="δ of ucb-hb / ucb-wsr / ltt (default 0.1)")
    p.add_argument("--controllers", default=",".join(CONTROLLERS), help="comma list (default: all)")
    p.add_argument("--knob", default="auto", help="auto | threshold | budget | offset")
    p.add_argument("--grid-size", type=int, default=100)
    p.add_argument("--resplits", type=int, default=200, help="random cal/test re-splits (default 200)")
    p.add_argument("--cal-size", type=int, default=None, help="cal samples per re-split (default: the run's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="directory for risk_validity.json and risk_validity.png")
    return p.parse_args(argv)


def load_run(run_dir: Path) -> tuple[object, dict[str, ExitOutputs], dict, dict]:
    """The reported policy's gate, its val / cal / test outputs, results.json and run.json."""
    model, manifest = load_model(run_dir)
    setting = manifest["policy"]["trained_setting"]
    outs = eedn.read_outputs(run_dir)[setting]
    return model.gate, outs, read_results(run_dir), manifest


def evaluators_of(results: dict) -> dict:
    """The run's evaluators, rebuilt from results.json (the conformal gaps need the conformal one)."""
    return {name: eedn.create("evaluator", name, **entry["options"])
            for name, entry in (results.get("evaluators") or {}).items()}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(1)
    run_dir = Path(args.run_dir)
    t0 = time.perf_counter()
    gate, outs, results, manifest = load_run(run_dir)
    options = dict(kv.split("=", 1) for kv in args.risk_option)
    risk = eedn.create("risk", args.risk, **options)
    risk.fit(outs["val"], evaluators_of(results))
    knob = build_knob(gate, outs["val"], args.knob, args.grid_size)

    pool = {k: torch.cat([getattr(outs["cal"], k), getattr(outs["test"], k)]) for k in ("logits", "labels",
                                                                                       "gate_scores")}
    pooled = ExitOutputs(pool["logits"], pool["labels"], pool["gate_scores"], outs["test"].exit_macs,
                         outs["test"].full_macs)
    exits = knob.exits(pooled)  # [K, N]
    losses = loss_matrix(risk.exit_losses(pooled), exits)  # [K, N]
    sample_macs = pooled.exit_macs.double()[exits].numpy() / pooled.full_macs  # [K, N] fraction of full MACs
    n_pool = pooled.num_samples
    n_cal = args.cal_size or outs["cal"].num_samples
    if not 0 < n_cal < n_pool:
        raise SystemExit(f"--cal-size must lie in 1..{n_pool - 1}, got {n_cal}")
    epsilons = [float(e) for e in args.epsilons.split(",") if e.strip()]
    controllers = [c for c in args.controllers.split(",") if c.strip()]
    rng = np.random.default_rng(args.seed)
    pool_risk = losses.mean(1)  # [K] the risk of every knob value on the whole pool that cal is drawn from
    record = {(c, e): {"risk": [], "pool": [], "saved": [], "fallback": []} for c in controllers for e in epsilons}
    for _ in range(args.resplits):
        order = rng.permutation(n_pool)
        cal, test = order[:n_cal], order[n_cal:]
        cal_losses, cal_costs = losses[:, cal], sample_macs[:, cal].mean(1)
        for c in controllers:
            for e in epsilons:
                sel = select(c, cal_losses, cal_costs, e, args.delta, risk.lower, risk.upper, risk.binary)
                r = record[(c, e)]
                r["risk"].append(float(losses[sel.index, test].mean()))
                r["pool"].append(float(pool_risk[sel.index]))
                r["saved"].append(1.0 - float(sample_macs[sel.index, test].mean()))
                r["fallback"].append(sel.fallback)
    mc_error = math.sqrt(args.delta * (1 - args.delta) / args.resplits)
    rows = []
    for (c, e), r in record.items():
        risks = np.array(r["risk"])
        rows.append({"controller": c, "epsilon": e, "violation": float(np.mean(risks > e)),
                     "pool_violation": float(np.mean(np.array(r["pool"]) > e)),
                     "mean_risk": float(risks.mean()), "risk_q90": float(np.quantile(risks, 0.9)),
                     "macs_saved": float(np.mean(r["saved"])), "fallback_rate": float(np.mean(r["fallback"]))})
    report = {
        "run_dir": str(run_dir), "dataset": results["dataset"]["name"], "policy": results["policy"]["name"],
        "backbone": manifest["model"]["backbone"]["display_name"], "risk": risk.describe(), "delta": args.delta,
        "knob": {"name": knob.name, "grid_size": len(knob.values), "fixed_on": "val"},
        "resplits": args.resplits, "n_cal": n_cal, "n_test": n_pool - n_cal, "seed": args.seed,
        "final_exit_accuracy": float(outs["test"].exit_accuracy()[-1]),
        "monte_carlo_error_at_delta": mc_error, "rows": rows, "seconds": time.perf_counter() - t0,
    }
    print(render(report))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "risk_validity.json", report)
        plot_risk_sweep(rows, out / "risk_validity.png", delta=args.delta,
                        title=f"{report['dataset']} {report['backbone']} {report['policy']}: {risk.name}, "
                              f"δ = {args.delta:g}, {args.resplits} re-splits (cal {n_cal}, test {n_pool - n_cal})")
        print(f"wrote {out / 'risk_validity.json'} and {out / 'risk_validity.png'}")
    return report


def render(report: dict) -> str:
    """A Markdown table: one row per controller and ε."""
    lines = [f"{report['dataset']} / {report['backbone']} / {report['policy']}: risk {report['risk']['name']}, "
             f"δ = {report['delta']:g}, knob {report['knob']['name']} ({report['knob']['grid_size']} values), "
             f"{report['resplits']} re-splits, cal {report['n_cal']} / test {report['n_test']}; Monte-Carlo error of "
             f"a frequency near δ: ±{report['monte_carlo_error_at_delta']:.3f} (1 s.e.); {report['seconds']:.0f} s",
             "", "| controller | ε | P(test risk > ε) | P(pool risk > ε) | mean test risk | 90% quantile | MACs saved "
             "| fallbacks |", "|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['controller']} | {r['epsilon']:g} | {r['violation']:.3f} | {r['pool_violation']:.3f} | "
                     f"{r['mean_risk']:.4f} | "
                     f"{r['risk_q90']:.4f} | {100 * r['macs_saved']:.1f}% | {r['fallback_rate']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
