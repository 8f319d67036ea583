"""`eedn compare` (several strategies on one backbone, dataset and seed list) and `eedn report` (re-render a run
or a comparison from its saved outputs, never re-running anything).

A comparison trains one backbone per seed (or loads it from the cache) and fits every strategy on it, so every
strategy sees the same backbone, the same data split and the same feature cache. The numbers of the comparison
are derived from the per-strategy ``results.json`` files only; the reliability diagram also reads each run's
``outputs.pt`` and the policy gate's state in ``model.pt``.

Matched cost: strategies are compared at equal mean MACs. Every operating point of a strategy B (its curve
points and its reported policy) becomes a row; the value of strategy A in that row is A's metric interpolated
linearly in mean MACs on A's own curve, per seed at B's cost in that seed, then averaged over seeds. Outside A's
cost range the cell is empty (no extrapolation).
"""
from __future__ import annotations

import bisect
import copy
import json
import math
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Sequence

import click

from eedn.cli_options import build_config, common_run_options, friendly_errors, parse_lambdas, parse_number_list
from eedn.errors import EednError
from eedn.io import atomic_write_json, atomic_write_text

#: metrics compared at matched cost (and drawn against MACs)
MATCHED_METRICS = ("accuracy", "ece", "set_size")
#: per-point numbers aggregated over seeds
POINT_METRICS = ("accuracy", "mean_macs", "macs_fraction", "ece", "set_size", "coverage")
#: relative tolerance when deciding whether a cost lies inside a curve's range (and when merging equal costs)
COST_RTOL = 1e-9
#: the figures a comparison directory holds
COMPARE_FIGURES = ("accuracy_vs_macs.png", "ece_vs_macs.png", "set_size_vs_macs.png", "exit_shares.png",
                   "reliability.png")
#: the figures `eedn report` adds to a single run directory (summary.md and accuracy_vs_macs.png come from
#: eedn.report.render_report)
RUN_FIGURES = ("ece_vs_macs.png", "set_size_vs_macs.png", "exit_shares.png", "reliability.png")
#: rows per strategy in the terminal's matched-cost table (the Markdown report has all of them)
TERMINAL_ROWS_PER_STRATEGY = 8


# ------------------------------------------------------------------------------------------------ what to compare


@dataclass(frozen=True)
class StrategySpec:
    """One entry of ``--strategies``: a strategy name and an optional gate (``name:gate``)."""

    name: str
    gate: str | None = None

    @property
    def text(self) -> str:
        return self.name if self.gate is None else f"{self.name}:{self.gate}"

    @property
    def label(self) -> str:
        """Used for run directories, plot legends and table columns (``:`` is awkward in file names)."""
        return self.name if self.gate is None else f"{self.name}+{self.gate}"


@dataclass(frozen=True)
class ConformalChoice:
    """Which conformal row gives "the" set size: α, score method and q̂ variant."""

    alpha: float = 0.05
    method: str = "lac"
    variant: str = "general"

    def describe(self) -> str:
        return f"{self.method.upper()}, α = {self.alpha:g}, {self.variant} q̂"


def parse_strategies(text: str) -> list[StrategySpec]:
    """``"jei,boostnet,im-only:entropy"`` → specs; checks names against the registries and rejects duplicates."""
    from eedn.plugins import registry

    specs = []
    for item in (t.strip() for t in (text or "").split(",")):
        if not item:
            continue
        name, _, gate = item.partition(":")
        name, gate = name.strip(), gate.strip() or None
        if not name:
            raise EednError(f"--strategies entry '{item}' has no strategy name; use name or name:gate")
        registry("strategy").get(name)
        if gate is not None:
            registry("gate").get(gate)
        specs.append(StrategySpec(name, gate))
    if not specs:
        raise EednError("--strategies needs at least one strategy, e.g. --strategies jei,im-only")
    labels = [s.label for s in specs]
    dupes = sorted({l for l in labels if labels.count(l) > 1})
    if dupes:
        raise EednError(f"--strategies lists {', '.join(dupes)} more than once")
    return specs


def parse_seeds(num_seeds: int | None, seed_list: str | None, seed: int | None, default_seed: int) -> list[int]:
    """``--seeds N`` → 0..N-1; ``--seed-list 0,3`` → [0, 3]; neither → the one config seed."""
    given = [name for name, v in (("--seeds", num_seeds), ("--seed-list", seed_list), ("--seed", seed)) if v is not None]
    if len(given) > 1:
        raise EednError(f"use only one of {', '.join(given)}")
    if num_seeds is not None:
        if num_seeds < 1:
            raise EednError(f"--seeds must be a positive number of seeds, got {num_seeds}")
        return list(range(num_seeds))
    if seed_list is not None:
        seeds = parse_number_list(seed_list, "--seed-list", int, 0, "0,1,2")
        if len(set(seeds)) != len(seeds):
            raise EednError(f"--seed-list repeats a seed: '{seed_list}'")
        return seeds
    return [seed if seed is not None else default_seed]


def split_strategies_key(base: dict) -> tuple[dict, dict[str, dict]]:
    """Take the compare-only ``strategies: {name: {option: value}}`` key out of a config dict."""
    base = copy.deepcopy(base)
    per_strategy = base.pop("strategies", None) or {}
    if not isinstance(per_strategy, dict) or not all(isinstance(v, dict) for v in per_strategy.values()):
        raise EednError("config key 'strategies' must map strategy names to option mappings, "
                        "e.g. strategies: {jei: {lambda: [0.1, 1.0]}}")
    return base, per_strategy


def strategy_options_for(spec: StrategySpec, shared: dict, per_strategy: dict[str, dict], cli: dict) -> dict:
    """Options of one strategy: shared ``strategy_options`` ← ``strategies.<name>`` ← ``strategies.<name:gate>``
    ← command-line ``--epochs``/``--lambda``. ``lambda`` goes only to strategies whose ``tradeoff_option``
    is ``lambda`` (JEI); the others do not take it."""
    from eedn.config import deep_merge
    from eedn.plugins import registry

    takes_lambda = getattr(registry("strategy").get(spec.name).factory, "tradeoff_option", None) == "lambda"
    opts = {k: v for k, v in shared.items() if takes_lambda or k != "lambda"}
    opts = deep_merge(opts, per_strategy.get(spec.name, {}))
    if spec.gate is not None:
        opts = deep_merge(opts, per_strategy.get(spec.text, {}))
    for key, value in cli.items():
        if value is not None and (key != "lambda" or takes_lambda):
            opts[key] = value
    return opts


# -------------------------------------------------------------------------------------- numbers out of results


def conformal_row(entry: Any, choice: ConformalChoice) -> dict | None:
    """The conformal row for ``choice`` from an evaluator dict (``{"results": [...]}``) or a flat row list."""
    rows = entry.get("results") if isinstance(entry, dict) else entry
    for row in rows or []:
        if (math.isclose(float(row.get("alpha", -1)), choice.alpha) and row.get("method") == choice.method
                and row.get("variant", "general") == choice.variant):
            return row
    return None


def normalize_point(point: dict, choice: ConformalChoice, fallback_conformal: Any = None) -> dict:
    """A curve or policy entry of results.json → the flat numbers compare works with."""
    ece = point.get("ece")
    if ece is None and isinstance(point.get("calibration"), dict):
        ece = point["calibration"].get("ece")
    row = conformal_row(point.get("conformal"), choice) or conformal_row(fallback_conformal, choice)
    return {
        "setting": point["setting"],
        "accuracy": point["accuracy"],
        "mean_macs": point["mean_macs"],
        "macs_fraction": point["macs_fraction"],
        "ece": ece,
        "set_size": None if row is None else row.get("mean_set_size"),
        "coverage": None if row is None else row.get("coverage"),
        "exit_fractions": point.get("exit_fractions"),
    }


@dataclass
class RunPoints:
    """One run's operating points: its curve (possibly empty) and its reported policy."""

    curve: list[dict]
    policy: dict

    @property
    def interpolation_points(self) -> list[dict]:
        """The curve a strategy is interpolated on: its sweep, or its single policy point when it has none."""
        return self.curve or [self.policy]

    def operating_points(self) -> list[tuple[dict, bool]]:
        """``(point, is_policy)``: every curve point, plus the policy when it is not one of them."""
        out = [(p, p["setting"] == self.policy["setting"]) for p in self.curve]
        if not any(is_pol for _, is_pol in out):
            out.append((self.policy, True))
        return out


def run_points(results: dict, choice: ConformalChoice) -> RunPoints:
    policy = normalize_point(results["policy"], choice, results.get("conformal"))
    return RunPoints([normalize_point(p, choice) for p in results.get("curve") or []], policy)


def gate_name(results: dict) -> str:
    """The policy's gate name (``policy.gate`` may hold the gate's description dict rather than its name)."""
    pol = results["policy"]
    if isinstance(pol.get("gate"), str):
        return pol["gate"]
    strategy = pol.get("strategy") or results["config"]["strategy"]
    name = pol.get("name", "")
    if name.startswith(f"{strategy}+"):
        return name[len(strategy) + 1:]
    return results["config"].get("gate") or "?"


# ------------------------------------------------------------------------------------------ interpolation, stats


def interpolate_at(points: Iterable[tuple[float, float | None]], x: float, rtol: float = COST_RTOL) -> float | None:
    """Linear interpolation of ``y`` at cost ``x`` on the points ``(cost, y)``; None outside their cost range.

    Points with a missing or non-finite y are ignored; points of equal cost (within ``rtol``) are merged into one
    with the mean of their y (a threshold sweep often reaches the same exit shares twice). A cost equal to an end
    of the range (within ``rtol``) counts as inside it. No extrapolation.
    """
    pts = sorted((float(px), float(py)) for px, py in points
                 if py is not None and math.isfinite(float(py)) and math.isfinite(float(px)))
    if not pts or x is None or not math.isfinite(x):
        return None
    scale = max(abs(pts[0][0]), abs(pts[-1][0]), 1e-300)
    xs: list[float] = []
    groups: list[list[float]] = []
    for px, py in pts:
        if xs and abs(px - xs[-1]) <= rtol * scale:
            groups[-1].append(py)
        else:
            xs.append(px)
            groups.append([py])
    ys = [sum(g) / len(g) for g in groups]
    tol = rtol * scale
    if x < xs[0] - tol or x > xs[-1] + tol:
        return None
    if len(xs) == 1:
        return ys[0]
    x = min(max(x, xs[0]), xs[-1])
    i = min(max(bisect.bisect_right(xs, x), 1), len(xs) - 1)
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def mean_std(values: Sequence[float | None]) -> dict:
    """``{"mean", "std", "n"}`` over seeds; std is the sample std (n-1) and None for one seed. If any seed has no
    value the cell is empty (mean None) and ``n`` counts the seeds that had one: means over different seed subsets
    would not be comparable across columns."""
    present = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not values or len(present) < len(values):
        return {"mean": None, "std": None, "n": len(present)}
    n = len(present)
    mean = sum(present) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in present) / (n - 1)) if n > 1 else None
    return {"mean": mean, "std": std, "n": n}


def aggregate_points(points: Sequence[dict]) -> dict:
    """The same operating point in several seeds → mean ± std of each number (exit shares per exit)."""
    out: dict[str, Any] = {"setting": points[0]["setting"], "n_seeds": len(points)}
    for key in POINT_METRICS:
        out[key] = mean_std([p.get(key) for p in points])
    shares = [p["exit_fractions"] for p in points if p.get("exit_fractions") is not None]
    if shares and len(shares) == len(points) and len({len(s) for s in shares}) == 1:
        out["exit_fractions"] = [mean_std([s[i] for s in shares]) for i in range(len(shares[0]))]
    return out


def aggregate_curve(by_seed: dict[int, RunPoints]) -> dict:
    """Curve points matched by setting across seeds (order of the first seed), and the aggregated policy."""
    seeds = list(by_seed)
    first = by_seed[seeds[0]]
    points = []
    for p in first.curve:
        same = [q for s in seeds for q in by_seed[s].curve if q["setting"] == p["setting"]]
        points.append(aggregate_points(same))
    policy = aggregate_points([by_seed[s].policy for s in seeds])
    policy["policy_setting"] = sorted({by_seed[s].policy["setting"] for s in seeds})
    return {"points": points, "policy": policy}


def matched_cost_table(points: dict[str, dict[int, RunPoints]], metrics: Sequence[str] = MATCHED_METRICS) -> dict:
    """Every strategy's metrics at every operating point of every strategy, matched on mean MACs.

    ``points[label][seed]``. Per seed, strategy A's value at B's point is A's metric interpolated linearly in mean
    MACs on A's curve at the cost of B's point in that seed (:func:`interpolate_at`: no extrapolation); A's value
    at its own point is its measured value. Cells are then aggregated over the seeds both strategies ran with
    (:func:`mean_std`).
    """
    labels = list(points)
    rows = []
    for b in labels:
        b_seeds = list(points[b])
        for point, is_policy in points[b][b_seeds[0]].operating_points():
            setting = point["setting"]
            per_seed: dict[int, dict] = {}
            for s in b_seeds:
                match = [p for p, pol in points[b][s].operating_points() if p["setting"] == setting and pol == is_policy]
                if match:
                    per_seed[s] = match[0]
            row: dict[str, Any] = {
                "strategy": b, "setting": setting, "policy": is_policy, "seeds": sorted(per_seed),
                "mean_macs": mean_std([p["mean_macs"] for p in per_seed.values()]),
                "macs_fraction": mean_std([p["macs_fraction"] for p in per_seed.values()]),
                "values": {},
            }
            for a in labels:
                seeds = [s for s in per_seed if s in points[a]]
                cell = {}
                for metric in metrics:
                    vals = []
                    for s in seeds:
                        if a == b:
                            vals.append(per_seed[s].get(metric))
                        else:
                            curve = points[a][s].interpolation_points
                            vals.append(interpolate_at([(p["mean_macs"], p.get(metric)) for p in curve],
                                                       per_seed[s]["mean_macs"]))
                    cell[metric] = mean_std(vals) if seeds else {"mean": None, "std": None, "n": 0}
                row["values"][a] = cell
            rows.append(row)
    rows.sort(key=lambda r: (labels.index(r["strategy"]), r["mean_macs"]["mean"] if r["mean_macs"]["mean"] is not None
                             else math.inf))
    return {
        "x": "mean_macs",
        "metrics": list(metrics),
        "columns": labels,
        "method": "per seed: linear interpolation in mean MACs on each strategy's curve (sorted by cost, equal costs "
                  "merged by their mean), no extrapolation; then mean ± sample std over seeds, empty if any seed "
                  "is out of range",
        "rows": rows,
    }


# -------------------------------------------------------------------------------------------- the comparison


def build_comparison(meta: dict, runs: dict[str, dict[int, dict]], choice: ConformalChoice) -> dict:
    """comparison.json's numbers from the per-run results (``runs[label][seed]``) and the run metadata."""
    points = {label: {seed: run_points(res, choice) for seed, res in by_seed.items()} for label, by_seed in runs.items()}
    curves = {label: aggregate_curve(by_seed) for label, by_seed in points.items()}
    summary = {}
    for label, by_seed in runs.items():
        first = next(iter(by_seed.values()))
        pol = curves[label]["policy"]
        summary[label] = {
            "strategy": first["config"]["strategy"], "gate": gate_name(first),
            "policy_setting": pol["policy_setting"],
            **{k: pol[k] for k in POINT_METRICS},
            "exit_fractions": pol.get("exit_fractions"),
            "backbone_accuracy": mean_std([r["backbone"].get("test_accuracy") for r in by_seed.values()]),
            "full_macs": first["full_macs"],
        }
    first = next(iter(next(iter(runs.values())).values()))
    return {
        **meta,
        "dataset": first["dataset"],
        "conformal": {"alpha": choice.alpha, "method": choice.method, "variant": choice.variant},
        "summary": summary,
        "curves": curves,
        "matched": matched_cost_table(points),
    }


def default_out_dir(cfg: dict) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"compare-{cfg['dataset']}-{cfg['backbone']}-{stamp}"


#: config keys that may differ between a finished run and a rerun without making the run stale
_RUNTIME_KEYS = ("out", "resume", "progress", "cache_dir", "device", "num_workers", "eval_batch_size")


def _finished_run(run_dir: Path, expected_cfg: dict) -> dict | None:
    """A run directory's results when it already holds a run of exactly this config (for --resume)."""
    path = run_dir / "results.json"
    if not path.exists():
        return None
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    expected = json.loads(json.dumps(expected_cfg, default=str))
    saved = results.get("config", {})
    keys = (set(saved) | set(expected)) - set(_RUNTIME_KEYS)
    return results if all(saved.get(k) == expected.get(k) for k in keys) else None


def run_compare(cfg: dict, specs: Sequence[StrategySpec], seeds: Sequence[int], options: dict[str, dict],
                out_dir: str | Path, progress=None, *, choice: ConformalChoice = ConformalChoice(),
                reuse_finished: bool = False) -> dict:
    """``eedn compare`` as a function: per seed, one prepared backbone and every strategy on it; then
    comparison.json, comparison.md and the figures in ``out_dir``. ``options[label]`` are each strategy's
    options. With ``reuse_finished``, runs whose results.json already holds the same config (strategy, gate,
    options, seed, backbone, data ...) are read back instead of re-run. Returns the comparison dict."""
    from eedn.progress import Progress
    from eedn.run import prepare, run_strategy

    out_dir = Path(out_dir)
    progress = progress or Progress(enabled=False)
    runs: dict[str, dict[int, dict]] = {s.label: {} for s in specs}
    with progress.session():
        for seed in seeds:
            seed_cfg = copy.deepcopy(cfg)
            seed_cfg["seed"] = seed
            prep = None
            for spec in specs:
                run_dir = out_dir / f"{spec.label}-s{seed}"
                expected = seed_cfg | {"strategy": spec.name, "strategy_options": options.get(spec.label, {}),
                                       "gate": spec.gate}
                results = _finished_run(run_dir, expected) if reuse_finished else None
                if results is not None:
                    progress.log(f"seed {seed}: {spec.label} already finished in {run_dir}, reusing it")
                else:
                    if prep is None:
                        prep = prepare(seed_cfg, progress)
                    progress.log(f"seed {seed}: {spec.label}")
                    results = run_strategy(prep, spec.name, options.get(spec.label, {}), spec.gate, out=run_dir)
                runs[spec.label][seed] = results
    base_cfg = {k: v for k, v in cfg.items() if k not in ("strategy", "strategy_options", "gate", "out", "seed")}
    meta = {
        "eedn_version": _version(),
        "kind": "comparison",
        "created": datetime.now().isoformat(timespec="seconds"),
        "config": base_cfg,
        "backbone": cfg["backbone"],
        "seeds": list(seeds),
        "strategies": [
            {"label": s.label, "strategy": s.name, "gate": gate_name(runs[s.label][seeds[0]]),
             "gate_requested": s.gate, "options": options.get(s.label, {}),
             "runs": {str(seed): f"{s.label}-s{seed}" for seed in seeds}}
            for s in specs
        ],
    }
    return render_comparison(out_dir, meta, runs, choice)


def render_comparison(out_dir: str | Path, meta: dict, runs: dict[str, dict[int, dict]],
                      choice: ConformalChoice) -> dict:
    """Write comparison.json, comparison.md and every figure of a comparison from its runs' results."""
    out_dir = Path(out_dir)
    comparison = build_comparison(meta, runs, choice)
    run_dirs = {e["label"]: {int(s): out_dir / rel for s, rel in e["runs"].items()} for e in meta["strategies"]}
    reliability, notes = {}, []
    for label, dirs in run_dirs.items():
        try:
            reliability[label] = pooled_reliability([(d, runs[label][s]) for s, d in dirs.items()])
        except EednError as exc:
            notes.append(f"no reliability diagram for {label}: {exc}")
    comparison["reliability"] = reliability
    comparison["notes"] = notes
    comparison["files"] = ["comparison.json", "comparison.md", *COMPARE_FIGURES]
    _draw_figures(out_dir, comparison, reliability, COMPARE_FIGURES)
    atomic_write_text(out_dir / "comparison.md", comparison_markdown(comparison))
    atomic_write_json(out_dir / "comparison.json", comparison)
    return comparison


def _title(comparison: dict) -> str:
    n = len(comparison["seeds"])
    return f"{comparison['backbone']} on {comparison['dataset']['name']} ({n} seed{'s' if n > 1 else ''})"


def _draw_figures(out_dir: Path, comparison: dict, reliability: dict, names: Sequence[str]) -> None:
    from eedn import plots

    title = _title(comparison)
    full = next(iter(comparison["summary"].values()))["full_macs"] if comparison["summary"] else None
    curves = comparison["curves"]
    cp = ConformalChoice(**comparison["conformal"])
    if "accuracy_vs_macs.png" in names:
        plots.plot_metric_vs_macs(curves, "accuracy", out_dir / "accuracy_vs_macs.png", ylabel="test accuracy (%)",
                                  title=f"accuracy vs compute: {title}", scale=100, full_macs=full)
    if "ece_vs_macs.png" in names:
        plots.plot_metric_vs_macs(curves, "ece", out_dir / "ece_vs_macs.png",
                                  ylabel="ECE of the gated prediction (%)",
                                  title=f"calibration vs compute: {title}", scale=100, full_macs=full)
    if "set_size_vs_macs.png" in names:
        plots.plot_metric_vs_macs(curves, "set_size", out_dir / "set_size_vs_macs.png",
                                  ylabel=f"mean conformal set size ({cp.describe()})",
                                  title=f"conformal set size vs compute: {title}", full_macs=full)
    if "exit_shares.png" in names:
        shares = {}
        for label, s in comparison["summary"].items():
            fr = s.get("exit_fractions") or []
            shares[label] = {"mean": [c["mean"] for c in fr],
                             "std": None if any(c["std"] is None for c in fr) else [c["std"] for c in fr],
                             "subtitle": f"{', '.join(s['policy_setting'])}: "
                                         f"{s['macs_fraction']['mean']:.3f} of full MACs"}
        plots.plot_exit_shares(shares, out_dir / "exit_shares.png", title=f"exit shares of the reported policies: {title}")
    if "reliability.png" in names:
        plots.plot_reliability(reliability, out_dir / "reliability.png",
                               title=f"reliability of the reported policies: {title}")


# ---------------------------------------------------------------------------------- reliability from outputs


def policy_test_predictions(run_dir: str | Path, results: dict) -> tuple[Any, Any]:
    """Confidence and correctness ``(numpy [N], numpy [N])`` of the reported policy on the test split, from the
    saved test outputs and the policy gate's saved state (no model is run).

    The gate is rebuilt from the registry and its state in ``model.pt`` (``heads["__policy__"]``); its decisions
    are checked against the exit shares in results.json, so a gate whose setting does not travel in its state
    dict is reported instead of plotted wrongly.
    """
    import torch

    from eedn.io import load_checkpoint
    from eedn.outputs import ExitOutputs
    from eedn.plugins import create

    run_dir = Path(run_dir)
    outputs = load_checkpoint(run_dir / "outputs.pt")
    if not outputs:
        raise EednError(f"{run_dir / 'outputs.pt'} holds no outputs")
    cfg = results["config"]
    label = cfg.get("policy_setting") or next(iter(outputs))
    if label not in outputs or "test" not in outputs[label]:
        raise EednError(f"{run_dir / 'outputs.pt'} has no test outputs for setting '{label}'")
    test = ExitOutputs.from_dict(outputs[label]["test"])
    heads = load_checkpoint(run_dir / "model.pt").get("heads", {}).get("__policy__")
    if heads is None:
        raise EednError(f"{run_dir / 'model.pt'} has no policy heads")
    gate = create("gate", gate_name(results), test.num_exits - 1, test.logits.shape[-1], **cfg.get("gate_options", {}))
    gate_state = {k[len("gate."):]: v for k, v in heads.items() if k.startswith("gate.")}
    try:
        gate.load_state_dict(gate_state)
    except RuntimeError as exc:
        raise EednError(f"cannot restore the policy gate of {run_dir}: {str(exc).splitlines()[0]}") from exc
    with torch.no_grad():
        exit_index = gate.decide(test.gate_scores)
    shares = test.summarize(exit_index)["exit_fractions"]
    saved = results["policy"].get("exit_fractions") or []
    if len(saved) != len(shares) or any(abs(a - b) > 1e-6 for a, b in zip(shares, saved)):
        raise EednError(f"the restored policy gate of {run_dir} does not reproduce the saved exit shares")
    probs = test.gated_logits(exit_index).double().softmax(-1)
    confidence, prediction = probs.max(-1)
    return confidence.numpy(), (prediction == test.labels.long()).numpy()


def pooled_reliability(runs: Sequence[tuple[Path, dict]]) -> dict:
    """Reliability bins of the policy's test predictions, pooled over the given runs (seeds)."""
    import numpy as np

    from eedn.plots import reliability_bins

    confs, hits = [], []
    for run_dir, results in runs:
        c, h = policy_test_predictions(run_dir, results)
        confs.append(c)
        hits.append(h)
    return reliability_bins(np.concatenate(confs), np.concatenate(hits))


# ------------------------------------------------------------------------------------------------ rendering


def _cell(ms: dict | None, scale: float = 1.0, digits: int = 2, sep: str = " ± ") -> str:
    if not ms or ms.get("mean") is None:
        return "—"
    text = f"{scale * ms['mean']:.{digits}f}"
    if ms.get("std") is not None:
        text += f"{sep}{scale * ms['std']:.{digits}f}"
    return text


def _tight(ms: dict | None, scale: float = 1.0, digits: int = 2) -> str:
    """A terminal cell: no spaces around ±, so narrow tables wrap less."""
    return _cell(ms, scale, digits, sep="±")


_METRIC_FORMAT = {"accuracy": ("accuracy (%)", 100.0, 2), "ece": ("ECE (%)", 100.0, 2),
                  "set_size": ("conformal set size", 1.0, 2), "coverage": ("coverage (%)", 100.0, 1)}


def _point_name(row: dict) -> str:
    return f"{row['strategy']} [{row['setting']}]{' ★' if row['policy'] else ''}"


def comparison_markdown(comparison: dict) -> str:
    """comparison.md: reported policies, matched-cost tables and the figures."""
    seeds = comparison["seeds"]
    cp = ConformalChoice(**comparison["conformal"])
    spread = "mean ± sample std over seeds" if len(seeds) > 1 else "one seed"
    lines = [
        f"# eedn compare: {_title(comparison)}",
        "",
        f"Seeds {', '.join(map(str, seeds))} ({spread}); one backbone per seed shared by every strategy. "
        f"Accuracy, ECE (15 equal-width bins, gated prediction) and conformal sets ({cp.describe()}, calibrated on "
        f"the cal split) are measured on the test split.",
        "",
        "## Reported policies",
        "",
        "| strategy | gate | setting | accuracy (%) | MACs fraction | ECE (%) | set size | coverage (%) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, s in comparison["summary"].items():
        lines.append(f"| {label} | {s['gate']} | {', '.join(s['policy_setting'])} | {_cell(s['accuracy'], 100)} | "
                     f"{_cell(s['macs_fraction'], 1, 3)} | {_cell(s['ece'], 100)} | {_cell(s['set_size'])} | "
                     f"{_cell(s['coverage'], 100, 1)} |")
    matched = comparison["matched"]
    cols = matched["columns"]
    lines += [
        "",
        "## Matched-cost comparison",
        "",
        "Each row is one operating point of one strategy (its curve points; ★ its reported policy). Each column is a "
        "strategy's value at that point's mean MACs, interpolated linearly in mean MACs on that strategy's own "
        "curve (sorted by cost) per seed, then aggregated over seeds. — : the cost lies outside that strategy's "
        "cost range in at least one seed (no extrapolation). **Bold**: the strategy's own measured value.",
    ]
    for metric in matched["metrics"]:
        title, scale, digits = _METRIC_FORMAT[metric]
        lines += ["", f"### {title}", "", "| operating point | MACs fraction | " + " | ".join(cols) + " |",
                  "|---|---|" + "---|" * len(cols)]
        for row in matched["rows"]:
            cells = []
            for a in cols:
                text = _cell(row["values"][a][metric], scale, digits)
                cells.append(f"**{text}**" if a == row["strategy"] and text != "—" else text)
            lines.append(f"| {_point_name(row)} | {_cell(row['macs_fraction'], 1, 3)} | " + " | ".join(cells) + " |")
    lines += ["", "## Figures", ""]
    for name in comparison.get("files", []):
        if name.endswith(".png"):
            lines.append(f"![{name}]({name})")
    if comparison.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in comparison["notes"]]
    lines += ["", "## Runs", "", "| strategy | seed | run directory |", "|---|---|---|"]
    for e in comparison["strategies"]:
        for seed, rel in e["runs"].items():
            lines.append(f"| {e['label']} | {seed} | [{rel}]({rel}/summary.md) |")
    lines += ["", "All numbers: `comparison.json`. Re-render with `eedn report <this directory>`.", ""]
    return "\n".join(lines)


def _thin(rows: list[dict], limit: int) -> list[dict]:
    """At most ``limit`` rows spread evenly over cost, always keeping the policy rows."""
    if len(rows) <= limit:
        return rows
    step = (len(rows) - 1) / (limit - 1)
    keep = {round(i * step) for i in range(limit)} | {i for i, r in enumerate(rows) if r["policy"]}
    return [r for i, r in enumerate(rows) if i in keep]


def print_comparison(comparison: dict, console=None) -> None:
    """The rich tables `eedn compare` prints: reported policies (mean ± std), then matched-cost accuracy (means
    only, so that several strategies fit a terminal; the Markdown report has the spreads)."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console()
    t = Table(title=escape(f"reported policies: {_title(comparison)}"))
    for col in ("strategy", "setting", "accuracy %", "MACs frac.", "ECE %", "set size"):
        left = col in ("strategy", "setting")
        t.add_column(col, justify="left" if left else "right", overflow="fold")
    for label, s in comparison["summary"].items():
        t.add_row(escape(label), escape(", ".join(s["policy_setting"])), _tight(s["accuracy"], 100),
                  _tight(s["macs_fraction"], 1, 3), _tight(s["ece"], 100), _tight(s["set_size"]))
    console.print(t)
    matched = comparison["matched"]
    n = len(comparison["seeds"])
    m = Table(title="accuracy % at matched mean MACs" + (f" (mean of {n} seeds)" if n > 1 else "")
              + "; — : outside that strategy's cost range")
    m.add_column("operating point", overflow="fold")
    m.add_column("MACs frac.", justify="right")
    for a in matched["columns"]:
        m.add_column(escape(a), justify="right", overflow="fold")
    thinned = False
    for label in matched["columns"]:
        rows = [r for r in matched["rows"] if r["strategy"] == label]
        shown = _thin(rows, TERMINAL_ROWS_PER_STRATEGY)
        thinned |= len(shown) < len(rows)
        for row in shown:
            cells = [_mean_cell(row["values"][a]["accuracy"], 100) for a in matched["columns"]]
            m.add_row(escape(_point_name(row)), _mean_cell(row["macs_fraction"], 1, 3), *cells)
        m.add_section()
    console.print(m)
    note = "± std over seeds and " if n > 1 else ""
    if thinned:
        console.print(f"(some rows left out; {note}every operating point, ECE and set size are in comparison.md)")
    elif n > 1:
        console.print("(± std over seeds, ECE and set size are in comparison.md)")


def _mean_cell(ms: dict | None, scale: float = 1.0, digits: int = 2) -> str:
    return _cell({"mean": ms.get("mean") if ms else None, "std": None}, scale, digits)


# ------------------------------------------------------------------------------------------------- re-render


def load_comparison_runs(out_dir: Path, comparison: dict) -> dict[str, dict[int, dict]]:
    runs: dict[str, dict[int, dict]] = {}
    for e in comparison["strategies"]:
        runs[e["label"]] = {}
        for seed, rel in e["runs"].items():
            path = out_dir / rel / "results.json"
            if not path.exists():
                raise EednError(f"{path} is missing: the comparison lists run '{rel}' but it has no results")
            runs[e["label"]][int(seed)] = json.loads(path.read_text())
    return runs


def render_run(run_dir: Path, choice: ConformalChoice) -> tuple[dict, list[str], list[str]]:
    """summary.md and accuracy_vs_macs.png (eedn.report), plus ECE / set-size curves, exit shares and the
    reliability diagram, for one run directory. Returns (results, files written, notes)."""
    from eedn.report import render_report

    results = json.loads((run_dir / "results.json").read_text())
    render_report(run_dir, results)
    label = results["policy"].get("name") or results["config"]["strategy"]
    points = {label: {results["config"]["seed"]: run_points(results, choice)}}
    curves = {label: aggregate_curve(points[label])}
    pseudo = {
        "backbone": results["config"]["backbone"], "dataset": results["dataset"], "seeds": [results["config"]["seed"]],
        "conformal": {"alpha": choice.alpha, "method": choice.method, "variant": choice.variant},
        "curves": curves,
        "summary": {label: {"exit_fractions": curves[label]["policy"]["exit_fractions"],
                            "policy_setting": curves[label]["policy"]["policy_setting"],
                            "macs_fraction": curves[label]["policy"]["macs_fraction"],
                            "full_macs": results["full_macs"]}},
    }
    notes, reliability, names = [], {}, list(RUN_FIGURES)
    try:
        reliability[label] = pooled_reliability([(run_dir, results)])
    except EednError as exc:
        notes.append(f"no reliability diagram: {exc}")
        names.remove("reliability.png")
    _draw_figures(run_dir, pseudo, reliability, names)
    return results, ["summary.md", "accuracy_vs_macs.png", *names], notes


def render_directory(path: str | Path, choice: ConformalChoice | None = None) -> dict:
    """`eedn report` as a function: re-render a comparison directory or a single run directory from its saved
    files. ``choice`` None keeps a comparison's stored conformal setting (or the default for a run).
    Returns ``{"kind": "comparison" | "run", "files": [...], "notes": [...], "comparison" | "results": ...}``."""
    path = Path(path)
    if (path / "comparison.json").exists():
        stored = json.loads((path / "comparison.json").read_text())
        if "strategies" not in stored or "seeds" not in stored:
            raise EednError(f"{path / 'comparison.json'} is not an eedn comparison (no strategies/seeds)")
        choice = choice or ConformalChoice(**stored.get("conformal", {}))
        runs = load_comparison_runs(path, stored)
        meta = {k: stored[k] for k in ("eedn_version", "kind", "created", "config", "backbone", "seeds", "strategies")
                if k in stored}
        meta["rendered"] = datetime.now().isoformat(timespec="seconds")
        comparison = render_comparison(path, meta, runs, choice)
        return {"kind": "comparison", "files": comparison["files"], "notes": comparison["notes"],
                "comparison": comparison}
    if (path / "results.json").exists():
        results, files, notes = render_run(path, choice or ConformalChoice())
        return {"kind": "run", "files": files, "notes": notes, "results": results}
    raise EednError(f"{path} holds neither comparison.json (an `eedn compare` directory) nor results.json "
                    "(an `eedn run` directory)")


def _version() -> str:
    import eedn

    return eedn.__version__


# ---------------------------------------------------------------------------------------------- the commands


def _conformal_options(fn):
    opts = [
        click.option("--alpha", type=float, help="miscoverage level of the set-size figure and tables (default 0.05)"),
        click.option("--conformal-method", type=click.Choice(["lac", "aps", "raps"]),
                     help="conformal score of the set-size figure and tables (default lac)"),
        click.option("--conformal-variant", type=click.Choice(["general", "gated", "gated_all", "gated_strict"]),
                     help="one q̂ for all exits (general, default) or one per exit (gated ...)"),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def _choice(alpha: float | None, method: str | None, variant: str | None, base: ConformalChoice | None = None):
    if alpha is None and method is None and variant is None:
        return base
    base = base or ConformalChoice()
    if alpha is not None and not 0 < alpha < 1:
        raise EednError(f"--alpha must lie strictly between 0 and 1, got {alpha}")
    return ConformalChoice(alpha if alpha is not None else base.alpha, method or base.method, variant or base.variant)


def _resolve_compare_config(config_file, sets, epochs, lambdas, kw) -> tuple[dict, dict[str, dict], dict]:
    """The shared resolved config, the per-strategy option blocks (``strategies:`` in the file, plus
    ``--set strategies.NAME.KEY=VALUE``) and the command-line strategy options."""
    from eedn.config import apply_set, load_config_file

    base = load_config_file(config_file) if config_file else {}
    base, per_strategy = split_strategies_key(base)
    holder = {"strategies": per_strategy}
    for assignment in sets:
        if assignment.strip().startswith("strategies."):
            apply_set(holder, assignment)
    _, per_strategy = split_strategies_key(holder)
    other_sets = [s for s in sets if not s.strip().startswith("strategies.")]
    cfg = build_config(config_file=None, sets=other_sets, epochs=epochs, lambdas=lambdas, base=base, **kw)
    cli = {"epochs": epochs, "lambda": parse_lambdas(lambdas)}
    return cfg, per_strategy, cli


@click.command("compare")
@click.option("--strategies", "strategies_text", required=True, metavar="NAME[:GATE],...",
              help="strategies to compare, each with its default gate or NAME:GATE, e.g. jei,boostnet,im-only:entropy")
@click.option("--seeds", "num_seeds", type=int, help="run seeds 0..N-1 (mean ± std across them)")
@click.option("--seed-list", help="explicit seeds, e.g. 0,1,2")
@click.option("--out", type=click.Path(), help="output directory (default runs/compare-<dataset>-<backbone>-<time>)")
@_conformal_options
@common_run_options
@friendly_errors
def compare_command(strategies_text, num_seeds, seed_list, out, alpha, conformal_method, conformal_variant, quiet,
                    debug, config_file, sets, epochs, lambdas, seed, **kw) -> None:
    """Compare strategies on one backbone, dataset and seed list at matched compute.

    Every strategy shares the seed's trained backbone and feature cache. Per-strategy options go in the config
    file under `strategies: {jei: {lambda: [0.1, 1]}, boostnet: {epochs: 5}}` or as
    `--set strategies.jei.epochs=5`; `--epochs` applies to every strategy and `--lambda` to jei only. Writes one
    run directory per strategy and seed, comparison.json, comparison.md and the figures.
    """
    from eedn.plugins import create
    from eedn.progress import Progress

    specs = parse_strategies(strategies_text)
    cfg, per_strategy, cli = _resolve_compare_config(config_file, list(sets), epochs, lambdas, dict(kw, seed=None))
    seeds = parse_seeds(num_seeds, seed_list, seed, cfg["seed"])
    options = {s.label: strategy_options_for(s, cfg["strategy_options"], per_strategy, cli) for s in specs}
    for s in specs:  # bad options fail now, not after the first backbone has trained
        create("strategy", s.name, **copy.deepcopy(options[s.label]))
    out_dir = Path(out) if out else default_out_dir(cfg)
    choice = _choice(alpha, conformal_method, conformal_variant) or ConformalChoice()
    progress = Progress(enabled=not quiet and cfg["progress"])
    comparison = run_compare(cfg, specs, seeds, options, out_dir, progress, choice=choice,
                             reuse_finished=bool(cfg["resume"]))
    print_comparison(comparison)
    for note in comparison["notes"]:
        click.echo(f"note: {note}", err=True)
    click.echo(f"comparison directory: {out_dir}")


@click.command("report")
@click.argument("run_dir", type=click.Path(file_okay=False))
@_conformal_options
@click.option("--quiet", is_flag=True, help="print only the directory's files")
@click.option("--debug", is_flag=True, help="show tracebacks")
@friendly_errors
def report_command(run_dir, alpha, conformal_method, conformal_variant, quiet, debug) -> None:
    """Re-render the report and figures of a run or comparison directory from its saved outputs.

    Nothing is trained or re-evaluated: a comparison directory's comparison.md, comparison.json and figures are
    rebuilt from its runs' results.json (and outputs.pt for the reliability diagram); a run directory gets
    summary.md, accuracy_vs_macs.png, ECE / set-size curves, exit shares and a reliability diagram.
    """
    path = Path(run_dir)
    if not path.is_dir():
        raise EednError(f"no such directory: {path}")
    stored = None
    if (path / "comparison.json").exists():
        stored = ConformalChoice(**json.loads((path / "comparison.json").read_text()).get("conformal", {}))
    done = render_directory(path, _choice(alpha, conformal_method, conformal_variant, stored))
    if not quiet:
        if done["kind"] == "comparison":
            print_comparison(done["comparison"])
        else:
            from eedn.report import print_results_table

            print_results_table(done["results"] | {"run_dir": str(path)})
    for note in done["notes"]:
        click.echo(f"note: {note}", err=True)
    click.echo(f"re-rendered {path}: {', '.join(done['files'])}")
