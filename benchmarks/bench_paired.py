"""Learned exit policies against threshold policies over head seeds, as paired differences with 95 % intervals.

On one prepared backbone (trained or loaded once, per-exit features cached), every policy runs once per head
seed (``--head-seeds``; the data split and the backbone stay those of ``seed``). Each run gives an accuracy-vs-MACs
curve on test (a λ sweep for learned gates, a budget sweep for threshold gates), read at the ``--at`` fractions of
full MACs by linear interpolation in MACs (nothing outside a curve's range). Reported, per fraction:

* every policy's mean ± s.e. over the head seeds;
* the best threshold policy there (highest mean), and each learned policy minus it, paired seed by seed, with a
  Student-t 95 % interval (:func:`eedn.evaluation.paired.paired_difference`);
* each learned policy minus max-prob thresholds on its own IMs (results.json ``threshold_on_own_ims``): the gate
  apart from the IMs.

Usage (digits, the embedded default; a few minutes on 2 cores)::

    python benchmarks/bench_paired.py --out runs/paired-digits --backbone resnet --head-seeds 0,1,2
    python benchmarks/bench_paired.py --config examples/configs/cifar10_fast.yaml --out runs/paired-cifar \\
        --learned cdf=jei:exit_rule=cdf --thresholds im-only+max_prob,im-only+entropy,sdn+max_prob

A learned policy is ``LABEL=STRATEGY[:OPT=VALUE[;OPT=VALUE...]]`` (``gate.OPT=VALUE`` sets a gate option); a threshold
policy is ``STRATEGY+GATE``.
Writes ``paired.md`` and ``paired.json`` into ``--out`` (one run directory per policy and head seed beside them).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from eedn.core.config import load_config_file, parse_value, resolve_config  # noqa: E402
from eedn.evaluation.matched import interpolate_at  # noqa: E402
from eedn.evaluation.paired import mean_and_se, paired_difference  # noqa: E402
from eedn.pipeline.run import prepare, run_strategy  # noqa: E402
from eedn.runtime.io import atomic_write_json, atomic_write_text  # noqa: E402
from eedn.runtime.progress import Progress  # noqa: E402

DEFAULT_LEARNED = "official=jei:exit_rule=official,cdf=jei:exit_rule=cdf"
DEFAULT_THRESHOLDS = "im-only+max_prob,im-only+entropy,im-only+patience"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None, help="an eedn config file (dataset, backbone, training)")
    p.add_argument("--set", dest="sets", action="append", default=[], help="KEY=VALUE config override (repeatable)")
    p.add_argument("--backbone", default=None, help="default: the config's, else resnet (tiny on digits)")
    p.add_argument("--learned", default=DEFAULT_LEARNED,
                   help="comma list of LABEL=STRATEGY[:OPT=VALUE[;OPT=VALUE...]] learned-gate policies")
    p.add_argument("--thresholds", default=DEFAULT_THRESHOLDS, help="comma list of STRATEGY+GATE threshold policies")
    p.add_argument("--lambdas", default="0.01,0.1,0.3,0.5,1,2,5", help="λ list of every learned policy")
    p.add_argument("--epochs", type=int, default=None, help="epochs of every strategy (default: each one's own)")
    p.add_argument("--head-seeds", default="0,1,2", help="comma list of head seeds")
    p.add_argument("--at", default="0.3,0.4,0.5,0.6,0.75", help="fractions of full MACs to compare at")
    p.add_argument("--confidence", type=float, default=0.95)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--reuse", action="store_true", help="read a policy's run directory when it is already complete "
                                                       "(a resumed or extended benchmark) instead of refusing it")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def parse_learned(text: str) -> list[tuple[str, str, dict]]:
    """``cdf=jei:exit_rule=cdf;epochs=10`` -> ``("cdf", "jei", {"exit_rule": "cdf", "epochs": 10})``; an option
    written ``gate.NAME=VALUE`` is the gate's (``gate_options``), e.g. ``gate.gate_features=history``."""
    specs = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        label, _, rest = item.partition("=")
        strategy, _, opts = rest.partition(":")
        if not label or not strategy:
            raise SystemExit(f"--learned expects LABEL=STRATEGY[:OPT=VALUE;...], got '{item}'")
        options = {}
        for pair in (o for o in opts.split(";") if o.strip()):
            key, _, value = pair.partition("=")
            options[key.strip()] = parse_value(value.strip())
        specs.append((label.strip(), strategy.strip(), options))
    return specs


def parse_thresholds(text: str) -> list[tuple[str, str, str]]:
    """``im-only+entropy`` -> ``("im-only+entropy", "im-only", "entropy")``."""
    specs = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        strategy, _, gate = item.partition("+")
        if not strategy or not gate:
            raise SystemExit(f"--thresholds expects STRATEGY+GATE, got '{item}'")
        specs.append((item, strategy, gate))
    return specs


def curve(results: dict) -> list[tuple[float, float]]:
    points = results["curve"] or [results["policy"]]
    return [(p["macs_fraction"], p["accuracy"]) for p in points]


def budget_curve(run_dir: Path, results: dict, fractions: list[float]) -> list[tuple[float, float]]:
    """A learned policy's operating points at any budget, without retraining: its reported setting's trained gate
    with the logit offset fitted on val for each MACs fraction of a grid (issue "one knob for any budget"; what
    ``--budget`` does), read on test. Empty when the gate has no offset to fit."""
    import eedn
    from eedn.core.budgets import score_logits
    from eedn.evaluation.policy import calibrated_copy
    from eedn.runtime.errors import EednError

    setting = json.loads((run_dir / "run.json").read_text())["policy"]["trained_setting"]
    model, _ = eedn.load_run(run_dir, setting=setting)
    gate = model.gate
    if not getattr(gate, "retargetable", False):
        return []
    outs = eedn.read_outputs(run_dir)[setting]
    val, test = outs["val"], outs["test"]
    low = float(test.exit_macs[0]) / test.full_macs
    grid = sorted({round(low + (1 - low) * k / 20, 3) for k in range(21)} | {f for f in fractions if f >= low})
    points = []
    for target in grid:
        try:
            tuned = calibrated_copy(gate, val, {"macs_fraction": target})
        except EednError:
            continue
        shift = float(tuned.offset) - float(gate.offset)  # stored scores were computed with the trained offset
        scores = torch.sigmoid(score_logits(test.gate_scores) + shift).to(test.gate_scores.dtype)
        summary = test.summarize(tuned.decide(scores))
        points.append((summary["macs_fraction"], summary["accuracy"]))
    return points


def own_ims_curve(results: dict) -> list[tuple[float, float]] | None:
    own = results.get("threshold_on_own_ims")
    if not own:
        return None
    return [(p["macs_fraction"], p["accuracy"]) for p in own["curves"][own["policy_setting"]]]


def read_at(points: list[tuple[float, float]] | None, fraction: float) -> float | None:
    return None if points is None else interpolate_at(points, fraction)


def summarise(curves: dict[str, dict[int, list]], own: dict[str, dict[int, list | None]], learned: list[str],
              thresholds: list[str], seeds: list[int], fractions: list[float], confidence: float) -> dict:
    """Per fraction: every policy's mean ± s.e., the best threshold policy, and the paired differences."""
    table = {}
    for f in fractions:
        values = {name: [read_at(curves[name][s], f) for s in seeds] for name in curves}
        complete = {name: v for name, v in values.items() if all(x is not None for x in v)}
        policies = {name: mean_and_se(v) for name, v in complete.items()}
        best = max((n for n in thresholds if n in complete), key=lambda n: policies[n]["mean"], default=None)
        rows = {}
        for name in learned:
            row: dict = {}
            if name in complete and best is not None:
                row["minus_best_threshold"] = paired_difference(complete[name], complete[best], confidence)
            own_values = [read_at(own[name][s], f) for s in seeds]
            if name in complete and all(x is not None for x in own_values):
                row["own_ims_max_prob"] = mean_and_se(own_values)
                row["minus_own_ims_max_prob"] = paired_difference(complete[name], own_values, confidence)
            rows[name] = row
        table[f"{f:g}"] = {"policies": policies, "best_threshold": best, "learned": rows,
                           "missing": sorted(set(values) - set(complete))}
    return table


def pct(v: float | None, signed: bool = False) -> str:
    return "—" if v is None else (f"{100 * v:+.2f}" if signed else f"{100 * v:.2f}")


def diff_cell(d: dict | None) -> str:
    if not d or d["mean"] is None:
        return "—"
    if d["ci"] is None:
        return pct(d["mean"], True)
    mark = " *" if d["excludes_zero"] else ""
    return f"{pct(d['mean'], True)} [{pct(d['ci'][0], True)}, {pct(d['ci'][1], True)}]{mark}"


def markdown(summary: dict, info: dict) -> str:
    seeds = info["head_seeds"]
    lines = [f"# Learned vs threshold exit policies: {info['backbone']} on {info['dataset']}", "",
             f"Head seeds {seeds} on one backbone (seed {info['seed']}, test accuracy "
             f"{pct(info['backbone_test_accuracy'])} %); test split; accuracy (%) read on each run's curve by linear "
             "interpolation in mean MACs (— : outside the curve's range for some seed). Differences are paired by "
             f"head seed, mean [{int(100 * info['confidence'])} % t-interval]; * marks an interval that excludes 0. "
             f"Wall time {info['wall_s']:.0f} s.", "",
             "## Accuracy at matched cost (mean ± s.e. over head seeds)", "",
             "| policy | " + " | ".join(f"@ {f}" for f in summary) + " |", "|---|" + "---|" * len(summary)]
    names = list(dict.fromkeys(n for row in summary.values() for n in row["policies"]))
    for name in info["learned"] + info["thresholds"]:
        if name not in names:
            continue
        cells = []
        for row in summary.values():
            p = row["policies"].get(name)
            cells.append("—" if p is None else pct(p["mean"]) + ("" if p["se"] is None else f" ± {pct(p['se'])}"))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "## Learned policy minus the best threshold policy there (paired)", "",
              "| learned policy | " + " | ".join(f"@ {f}" for f in summary) + " |", "|---|" + "---|" * len(summary)]
    for name in info["learned"]:
        lines.append(f"| {name} | " + " | ".join(diff_cell(row["learned"].get(name, {}).get("minus_best_threshold"))
                                                 for row in summary.values()) + " |")
    lines.append("| (best threshold policy) | " + " | ".join(row["best_threshold"] or "—" for row in summary.values())
                 + " |")
    lines += ["", "## Learned gate minus max-prob thresholds on the same IMs (paired)", "",
              "| learned policy | " + " | ".join(f"@ {f}" for f in summary) + " |", "|---|" + "---|" * len(summary)]
    for name in info["learned"]:
        lines.append(f"| {name} | " + " | ".join(diff_cell(row["learned"].get(name, {}).get("minus_own_ims_max_prob"))
                                                 for row in summary.values()) + " |")
    lines += ["", "Per-exit test accuracy (%) of each policy's IMs, head seed " + str(seeds[0]) + ":", "",
              "| policy | " + " | ".join(f"exit {i}" for i in range(len(info["exit_fractions"]))) + " |",
              "|---|" + "---|" * len(info["exit_fractions"]),
              "| (MACs fraction) | " + " | ".join(f"{f:.3f}" for f in info["exit_fractions"]) + " |"]
    for name, accs in info["exit_accuracy"].items():
        lines.append(f"| {name} | " + " | ".join(pct(a) for a in accs) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    t0 = time.perf_counter()
    torch.set_num_threads(args.threads)
    learned = parse_learned(args.learned)
    thresholds = parse_thresholds(args.thresholds)
    seeds = [int(s) for s in args.head_seeds.split(",") if s.strip()]
    fractions = [float(f) for f in args.at.split(",") if f.strip()]
    config = load_config_file(args.config) if args.config else {}
    cfg = resolve_config(config, args.sets, backbone=args.backbone or config.get("backbone") or "resnet",
                         threads=args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    progress = Progress(enabled=not args.quiet, live=False)
    curves: dict[str, dict[int, list]] = {}
    own: dict[str, dict[int, list | None]] = {}
    exit_accuracy: dict[str, list[float]] = {}
    first: dict = {}
    with progress.session():
        prep = prepare(cfg.replace(strategy=learned[0][1] if learned else thresholds[0][1]), progress)
        for seed in seeds:
            seeded = dataclasses.replace(prep, cfg=prep.cfg.replace(head_seed=seed))
            runs = [(label, strategy, {"lambda": args.lambdas} | opts, None) for label, strategy, opts in learned]
            runs += [(label, strategy, {}, gate) for label, strategy, gate in thresholds]
            for label, strategy, opts, gate in runs:
                if args.epochs is not None:
                    opts = opts | {"epochs": args.epochs}
                gate_options = {k[len("gate."):]: v for k, v in opts.items() if k.startswith("gate.")}
                opts = {k: v for k, v in opts.items() if not k.startswith("gate.")}
                run_prep = dataclasses.replace(seeded, cfg=seeded.cfg.replace(gate_options=gate_options)) \
                    if gate_options else seeded
                run_dir = out / f"{label}-h{seed}"
                if args.reuse and (run_dir / "results.json").is_file():
                    res = json.loads((run_dir / "results.json").read_text())
                else:
                    res = run_strategy(run_prep, strategy, copy.deepcopy(opts), gate, out=run_dir)
                curves.setdefault(label, {})[seed] = curve(res) if gate is not None else \
                    budget_curve(run_dir, res, fractions) or curve(res)
                own.setdefault(label, {})[seed] = own_ims_curve(res)
                if seed == seeds[0]:
                    exit_accuracy[label] = [e["accuracy"] for e in res["exits"]]
                    first = first or res
    summary = summarise(curves, own, [n for n, _, _ in learned], [n for n, _, _ in thresholds], seeds, fractions,
                        args.confidence)
    info = {"backbone": first["backbone"]["display_name"], "dataset": first["dataset"]["name"], "seed": cfg.seed,
            "head_seeds": seeds, "backbone_test_accuracy": first["backbone"].get("test_accuracy"),
            "learned": [n for n, _, _ in learned], "thresholds": [n for n, _, _ in thresholds],
            "exit_fractions": [e["macs"] / first["full_macs"] for e in first["exits"]], "exit_accuracy": exit_accuracy,
            "lambdas": args.lambdas, "epochs": args.epochs, "confidence": args.confidence, "threads": args.threads,
            "wall_s": time.perf_counter() - t0, "config": cfg.to_dict(), "command": ["benchmarks/bench_paired.py", *(sys.argv[1:] if argv is None else argv)]}
    atomic_write_text(out / "paired.md", markdown(summary, info))
    atomic_write_json(out / "paired.json", {**info, "at": summary})
    print((out / "paired.md").read_text())
    return {"info": info, "at": summary}


if __name__ == "__main__":
    from eedn.runtime.errors import EednError

    try:
        main()
    except EednError as exc:
        raise SystemExit(f"error: {exc}") from None
