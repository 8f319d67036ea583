"""JEI-DNN gate ablation: the official exit rule against the three consistent variants, on one cached backbone.

Runs, on one prepared backbone (trained or loaded once, per-exit features cached):

* ``jei`` with the official rule (cumulative targets, capped-PMF hazard rule, exact-count pos-weights),
* ``exit_rule=cdf`` (first ``g_l >= tau`` on the same cumulative targets, cumulative pos-weights),
* ``targets=hazard`` (survivor-only targets ``1{l* = l}``, first ``g_l >= 0.5``, survivor pos-weights),
* ``targets=onehot`` (``1{l = l*}``, official capped rule, exact pos-weights),

each over the same λ list, plus threshold baselines (``--baselines``: IM-only, L2W-DEN, BoostNet with max-prob
thresholds). Every JEI run also
carries max-prob thresholds on its own IMs (results.json ``threshold_on_own_ims``), so the table separates the
gate from the IMs. Writes into ``--out``: one run directory per strategy, ``comparison.md`` / ``comparison.json``
with every matched-cost number and figure (`eedn report` re-renders it), and ``ablation.md`` / ``ablation.json`` /
``ablation.png``: the curves side by side, and per variant the MACs range it covers, accuracy at the ``--at``
fractions of full MACs against the best threshold policy there, and whether the official rule's collapse (samples
the targets send deep, the rule sends to exits 0-1) disappears. docs/results.md reports it. Usage::

    python benchmarks/bench_jei_ablation.py --out runs/ablation-digits --at 0.8,0.9
    python benchmarks/bench_jei_ablation.py --config examples/configs/cifar10_resnet20.yaml \\
        --set backbone_training.checkpoint=/work/data/resnet20_cifar10.pt --set backbone_training.epochs=0 \\
        --out runs/ablation-cifar-resnet20 --at 0.5,0.75
"""
from __future__ import annotations

import argparse
import copy
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import eedn  # noqa: E402
from eedn.pipeline.comparison import render_comparison  # noqa: E402
from eedn.core.config import load_config_file, resolve_config  # noqa: E402
from eedn.runtime.io import atomic_write_json, atomic_write_text  # noqa: E402
from eedn.evaluation.matched import interpolate_at  # noqa: E402
from eedn.runtime.progress import Progress  # noqa: E402
from eedn.pipeline.rundir import created_now  # noqa: E402
from eedn.pipeline.run import prepare, run_strategy  # noqa: E402

#: label -> jei options of each variant (docs/usage.md, "Consistent gate variants")
VARIANTS = {
    "official": {"exit_rule": "official"},  # the clean default reads the targets with cdf
    "cdf": {"exit_rule": "cdf"},
    "hazard": {"targets": "hazard"},
    "onehot": {"targets": "onehot"},
    # the official gates' training (exact-count pos-weights) read through the CDF rule: isolates the rule
    "cdf-exact": {"exit_rule": "cdf", "pos_weight_counts": "exact"},
}
DEFAULT_VARIANTS = "official,cdf,hazard,onehot"
#: threshold baselines the benchmark may run (each with its default max-prob gate and budget sweep)
BASELINES = ("im-only", "l2w", "boostnet")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None, help="an eedn config file (dataset, backbone, training)")
    p.add_argument("--set", dest="sets", action="append", default=[], help="KEY=VALUE config override (repeatable)")
    p.add_argument("--backbone", default=None, help="default: the config's, else t2t_vit (tiny on digits)")
    p.add_argument("--lambdas", default="0.01,0.1,0.5,1,2,5", help="λ list of every JEI variant")
    p.add_argument("--epochs", type=int, default=15, help="epochs of every strategy (JEI: warm-up included)")
    p.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--jei-set", action="append", default=[], help="NAME=VALUE jei option for every variant, "
                                                                  "e.g. im_training=converge (repeatable)")
    p.add_argument("--baselines", default="im-only", help=f"comma list of {', '.join(BASELINES)} (max-prob "
                                                          "thresholds on each one's IMs)")
    p.add_argument("--at", default="0.5,0.75", help="fractions of full MACs the table compares at")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def jei_options(args: argparse.Namespace, variant: str) -> dict:
    opts = {"lambda": args.lambdas, "epochs": args.epochs} | VARIANTS[variant]
    for item in args.jei_set:
        key, _, value = item.partition("=")
        opts[key.strip()] = value.strip()
    return opts


def curve_points(results: dict) -> list[dict]:
    return results["curve"] or [results["policy"]]


def interp(points: list[dict], fraction: float, key: str = "accuracy") -> float | None:
    return interpolate_at([(p["macs_fraction"], p[key]) for p in points], fraction)


def collapse(run_dir: Path, results: dict) -> dict:
    """At the smallest λ: the share of test samples whose optimal exit l* (the gate targets' own argmin of
    CE + λ·c) lies at exit 2 or later, against the share the rule sends there."""
    lams = results["strategy"]["options"]["lambda"]
    lam = min(lams) if isinstance(lams, list) else lams
    label = f"lambda={lam:g}"
    test = eedn.read_outputs(run_dir)[label]["test"]
    logits, labels = test.logits.float(), test.labels
    e = logits.shape[1]
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.repeat_interleave(e),
                                           reduction="none").view(-1, e)
    costs = torch.arange(1, e + 1, dtype=torch.float32) / e  # gate_cost=uniform_index (the default)
    best = (ce + lam * costs).argmin(1)
    point = next(p for p in curve_points(results) if p["setting"] == label)
    return {"lambda": lam, "target_share_deep": float((best >= 2).float().mean()),
            "rule_share_deep": float(sum(point["exit_fractions"][2:])),
            "target_share_final": float((best == e - 1).float().mean()),
            "rule_share_final": float(point["exit_fractions"][-1]), "macs_fraction": point["macs_fraction"]}


def best_threshold(curves: dict[str, list[dict]], fraction: float) -> tuple[str | None, float | None]:
    """The best of several threshold curves at one cost: ``(name, accuracy)``; ``(None, None)`` outside all."""
    present = {k: v for k, v in ((k, interp(c, fraction)) for k, c in curves.items()) if v is not None}
    return max(present.items(), key=lambda kv: kv[1]) if present else (None, None)


def summarise(runs: dict[str, tuple[Path, dict]], baselines: list[str], fractions: list[float]) -> dict:
    """Per variant: cost range, accuracy at each fraction against the best threshold policy there, collapse."""
    baseline_curves = {f"{b}+max_prob": curve_points(runs[b][1]) for b in baselines}
    rows = {}
    for label, (run_dir, res) in runs.items():
        if label in baselines:
            continue
        points = curve_points(res)
        own = res["threshold_on_own_ims"]
        curves = baseline_curves | {"own IMs+max_prob": own["curves"][own["policy_setting"]]}
        at = {}
        for f in fractions:
            name, best = best_threshold(curves, f)
            gate = interp(points, f)
            at[f"{f:g}"] = {"gate": gate, "own_ims_thresholds": interp(curves["own IMs+max_prob"], f),
                            "best_threshold": best, "best_threshold_policy": name,
                            "gate_minus_best": None if gate is None or best is None else gate - best}
        own_points = []  # at each of the variant's own λ points: the best threshold policy at that cost
        for p in points:
            _, best = best_threshold(curves, p["macs_fraction"])
            own_points.append(None if best is None else p["accuracy"] - best)
        fr = [p["macs_fraction"] for p in points]
        rows[label] = {"macs_range": [min(fr), max(fr)], "gate_minus_best_at_own_points": own_points, "points": [
            {k: p[k] for k in ("setting", "macs_fraction", "accuracy", "exit_fractions")} for p in points],
            "at": at, "at_gate_cost": own["at_gate_cost"], "collapse": collapse(run_dir, res)}
    return rows


def pct(v: float | None, sign: bool = False) -> str:
    return "—" if v is None else (f"{100 * v:+.2f}" if sign else f"{100 * v:.2f}")


def markdown(summary: dict, meta: dict) -> str:
    fr = meta["at"]
    lines = [f"# JEI gate ablation: {meta['backbone']} on {meta['dataset']}", "",
             f"λ = {meta['lambdas']}, {meta['epochs']} epochs; test split; wall time {meta['wall_s']:.0f} s. "
             "Accuracy (%) interpolated linearly in MACs on each curve (— : outside its range). Best threshold: the "
             f"best of {', '.join(b + ' + max-prob' for b in meta['baselines'])} and max-prob thresholds on that "
             "variant's own IMs.", "",
             "| variant | MACs range | " + " | ".join(f"acc @ {f} | best thr @ {f} | Δ @ {f}" for f in fr) +
             " | Δ at its own λ points (mean; min, max) | smallest λ, at exits ≥ 2: targets / rule | at the final "
             "head: targets / rule |", "|---|---|" + "---|---|---|" * len(fr) + "---|---|---|"]
    for label, row in summary["variants"].items():
        lo, hi = row["macs_range"]
        cells = []
        for f in fr:
            a = row["at"][f]
            best = pct(a["best_threshold"]) + (f" ({a['best_threshold_policy']})" if a["best_threshold_policy"] else "")
            cells += [pct(a["gate"]), best, pct(a["gate_minus_best"], sign=True)]
        c = row["collapse"]
        deltas = [d for d in row["gate_minus_best_at_own_points"] if d is not None]
        own = "—" if not deltas else \
            f"{pct(sum(deltas) / len(deltas), True)} ({pct(min(deltas), True)}, {pct(max(deltas), True)})"
        lines.append(f"| {label} | {lo:.3f}–{hi:.3f} | " + " | ".join(cells) + f" | {own}"
                     f" | {100 * c['target_share_deep']:.1f} / {100 * c['rule_share_deep']:.1f} %"
                     f" | {100 * c['target_share_final']:.1f} / {100 * c['rule_share_final']:.1f} % |")
    lines += ["", "Learned gate vs max-prob thresholds on the same IMs, at the gate's own cost (per λ):", "",
              "| variant | λ setting | MACs fraction | gate % | thresholds % | gate − thresholds |", "|---|---|---|---|---|---|"]
    for label, row in summary["variants"].items():
        for r in row["at_gate_cost"]:
            lines.append(f"| {label} | {r['setting']} | {r['macs_fraction']:.3f} | {pct(r['gate_accuracy'])} | "
                         f"{pct(r['threshold_accuracy'])} | {pct(r['gate_minus_threshold'], sign=True)} |")
    lines += ["", "![curves](ablation.png)", "", "Every matched-cost number: `comparison.md`.", ""]
    return "\n".join(lines)


def figure(runs: dict[str, tuple[Path, dict]], baselines: list[str], path: Path, title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.4), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for label, (_, res) in runs.items():
        pts = sorted(curve_points(res), key=lambda p: p["macs_fraction"])
        style = "--" if label in baselines else "-o"
        ax.plot([p["macs_fraction"] for p in pts], [100 * p["accuracy"] for p in pts], style, ms=3,
                label=f"{label} + max_prob" if label in baselines else f"jei {label}")
    first = next(res for label, (_, res) in runs.items() if label not in baselines)
    own = first["threshold_on_own_ims"]
    pts = sorted(own["curves"][own["policy_setting"]], key=lambda p: p["macs_fraction"])
    ax.plot([p["macs_fraction"] for p in pts], [100 * p["accuracy"] for p in pts], ":", color="grey",
            label="max_prob on JEI's IMs")
    full = first["full_macs"]
    ax.plot([e["macs"] / full for e in first["exits"]], [100 * e["accuracy"] for e in first["exits"]], "kx",
            label="single exits")
    ax.set_xlabel("mean MACs / full backbone MACs")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    t0 = time.perf_counter()
    torch.set_num_threads(args.threads)
    config = load_config_file(args.config) if args.config else {}
    config = {k: v for k, v in config.items() if k != "strategies"}
    cfg = resolve_config(config, args.sets, backbone=args.backbone or config.get("backbone") or "t2t_vit",
                         threads=args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    progress = Progress(enabled=not args.quiet, live=False)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    baselines = [b.strip() for b in args.baselines.split(",") if b.strip()]
    if not set(baselines) <= set(BASELINES) or not baselines:
        raise SystemExit(f"--baselines must list some of {', '.join(BASELINES)}")
    specs = [(v, "jei", jei_options(args, v)) for v in variants] + [(b, b, {"epochs": args.epochs}) for b in baselines]
    runs: dict[str, tuple[Path, dict]] = {}
    timings = {}
    with progress.session():
        prep = prepare(cfg.replace(strategy="jei"), progress)
        for label, name, opts in specs:
            t = time.perf_counter()
            run_dir = out / f"{label}-s{cfg.seed}"
            runs[label] = (run_dir, run_strategy(prep, name, copy.deepcopy(opts), None, out=run_dir))
            timings[label] = time.perf_counter() - t
    fractions = [float(f) for f in args.at.split(",")]
    meta = {"eedn_version": runs[baselines[0]][1]["eedn_version"], "kind": "comparison", "created": created_now(),
            "config": {k: v for k, v in cfg.to_dict().items() if k not in ("strategy", "strategy_options", "gate", "out", "seed")},
            "backbone": cfg.backbone, "seeds": [cfg.seed],
            "strategies": [{"label": label if name in baselines else f"jei-{label}", "strategy": name,
                            "gate_requested": None, "options": opts, "runs": {str(cfg.seed): f"{label}-s{cfg.seed}"}}
                           for label, name, opts in specs]}
    render_comparison(out, meta)
    first = runs[variants[0]][1]
    summary = {"variants": summarise(runs, baselines, fractions),
               "backbone_test_accuracy": first["backbone"]["test_accuracy"], "exits": first["exits"]}
    wall = time.perf_counter() - t0
    info = {"backbone": first["backbone"]["display_name"], "dataset": first["dataset"]["name"],
            "lambdas": args.lambdas, "epochs": args.epochs, "at": [f"{f:g}" for f in fractions], "wall_s": wall,
            "jei_set": args.jei_set, "timings_s": timings, "threads": args.threads, "baselines": baselines}
    figure(runs, baselines, out / "ablation.png", f"JEI gate variants: {info['backbone']} on {info['dataset']}")
    atomic_write_text(out / "ablation.md", markdown(summary, info))
    atomic_write_json(out / "ablation.json", {**info, **summary})
    print((out / "ablation.md").read_text())
    return summary


if __name__ == "__main__":
    main()
