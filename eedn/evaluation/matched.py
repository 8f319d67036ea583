"""Comparing strategies at equal compute: interpolation in mean MACs, seed aggregation, the matched table.

Pure functions on the operating points of results.json (no files, no plugins). Every operating point has one
shape (see :func:`eedn.evaluation.policy.evaluate_point`); the numbers compared are ``accuracy`` and every headline key
listed in results.json's ``metrics``.

Matched cost: every operating point of a strategy B (its curve points and its reported policy) becomes a row.
The value of strategy A in that row is A's metric interpolated linearly in mean MACs on A's own points, per
seed at B's cost in that seed, then averaged over seeds. Outside A's cost range the cell is empty, with the
reason recorded: there is no extrapolation.
"""
from __future__ import annotations

import bisect
import json
import math
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from eedn.runtime.errors import EednError

#: relative tolerance when deciding whether a cost lies inside a curve's range (and when merging equal costs)
COST_RTOL = 1e-9
#: how accuracy is shown; evaluators declare their own headline metrics in results.json's ``metrics``
ACCURACY = {"label": "accuracy (%)", "scale": 100.0, "digits": 2, "lower_is_better": False}
#: cost numbers every aggregated point carries besides its metrics
COST_KEYS = ("mean_macs", "macs_fraction")
#: results.json key of a learned-gate run's max-prob threshold sweep on its own IMs (eedn/evaluation/own_ims.py)
OWN_IMS_KEY = "threshold_on_own_ims"


def own_ims_label(strategy_label: str, gate: str) -> str:
    """The comparison column of a learned-gate strategy's own IMs under the threshold gate swept on them, e.g.
    ``max_prob thresholds on jei's IMs``: what the learned gate is compared with, on the same IMs."""
    name, bracket, cell = strategy_label.partition(" [")  # a sweep cell's "[key=value]" stays at the end
    return f"{gate} thresholds on {name}'s IMs" + (f" [{cell}" if bracket else "")

#: why a matched cell is empty: the cost lies outside the strategy's cost range, or it reports no such number
OUTSIDE, MISSING = "outside", "missing"


def metric_specs(results: Iterable[dict]) -> dict[str, dict]:
    """``accuracy`` then every headline metric the runs declare (first declaration wins), with its display."""
    specs = {"accuracy": dict(ACCURACY)}
    for res in results:
        for key, spec in (res.get("metrics") or {}).items():
            specs.setdefault(key, dict(spec))
    return specs


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
    tol = rtol * max(abs(pts[0][0]), abs(pts[-1][0]), 1e-300)
    xs: list[float] = []
    groups: list[list[float]] = []
    for px, py in pts:
        if xs and abs(px - xs[-1]) <= tol:
            groups[-1].append(py)
        else:
            xs.append(px)
            groups.append([py])
    ys = [sum(g) / len(g) for g in groups]
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


@dataclass
class RunPoints:
    """One run's operating points: its curve (possibly empty) and its reported policy."""

    curve: list[dict]
    policy: dict

    @classmethod
    def of(cls, results: dict) -> RunPoints:
        return cls(list(results.get("curve") or []), results["policy"])

    @property
    def interpolation_points(self) -> list[dict]:
        """The points a strategy is interpolated on: its sweep, or its single policy point when it has none."""
        return self.curve or [self.policy]

    def operating_points(self) -> list[tuple[dict, bool]]:
        """``(point, is_policy)``: every curve point, plus the policy when it is not one of them."""
        out = [(p, p["setting"] == self.policy["setting"]) for p in self.curve]
        if not any(is_pol for _, is_pol in out):
            out.append((self.policy, True))
        return out

    def value_at(self, metric: str, mean_macs: float) -> tuple[float | None, str | None]:
        """``metric`` interpolated at a cost, and why it is missing (:data:`OUTSIDE` / :data:`MISSING`)."""
        pts = [(p["mean_macs"], p.get(metric)) for p in self.interpolation_points]
        if all(y is None for _, y in pts):
            return None, MISSING
        value = interpolate_at(pts, mean_macs)
        return value, (OUTSIDE if value is None else None)

    def cost_range(self) -> tuple[float, float]:
        """Lowest and highest fraction of full MACs of the points it is interpolated on."""
        fractions = [p["macs_fraction"] for p in self.interpolation_points]
        return min(fractions), max(fractions)


def aggregate_points(points: Sequence[dict], metrics: Sequence[str]) -> dict:
    """The same operating point in several seeds → mean ± std of its cost and each metric (exit shares per exit)."""
    out: dict[str, Any] = {"setting": points[0]["setting"], "n_seeds": len(points)}
    for key in (*COST_KEYS, *metrics):
        out[key] = mean_std([p.get(key) for p in points])
    shares: list[Any] = [p.get("exit_fractions") for p in points]
    if all(s is not None for s in shares) and len({len(s) for s in shares}) == 1:
        out["exit_fractions"] = [mean_std([s[i] for s in shares]) for i in range(len(shares[0]))]
    return out


def aggregate_curve(by_seed: dict[int, RunPoints], metrics: Sequence[str]) -> dict:
    """Curve points matched by setting across seeds (order of the first seed), and the aggregated policy."""
    runs = list(by_seed.values())
    points = [aggregate_points([q for r in runs for q in r.curve if q["setting"] == p["setting"]], metrics)
              for p in runs[0].curve]
    policy = aggregate_points([r.policy for r in runs], metrics)
    policy["policy_setting"] = sorted({r.policy["setting"] for r in runs})
    return {"points": points, "policy": policy}


def cost_ranges(points: dict[str, dict[int, RunPoints]]) -> dict[str, list[float]]:
    """Per strategy, the fractions of full MACs ``[lo, hi]`` it can be read at in every seed (the intersection
    of its per-seed ranges; ``lo > hi`` when they do not overlap)."""
    out = {}
    for label, by_seed in points.items():
        ranges = [r.cost_range() for r in by_seed.values()]
        out[label] = [max(lo for lo, _ in ranges), min(hi for _, hi in ranges)]
    return out


def _cell(a: dict[int, RunPoints], at: dict[int, dict], metric: str, own: bool) -> dict:
    """Strategy ``a``'s ``metric`` at one operating point (``at[seed]``), over the seeds both ran; its measured
    value when the point is its own (``own``)."""
    seeds = [s for s in at if s in a]
    if not seeds:
        return {"mean": None, "std": None, "n": 0, "empty": MISSING}
    values, reasons = [], set()
    why: str | None
    for s in seeds:
        if own:
            value, why = at[s].get(metric), MISSING
        else:
            value, why = a[s].value_at(metric, at[s]["mean_macs"])
        values.append(value)
        if value is None:
            reasons.add(why)
    cell = mean_std(values)
    if cell["mean"] is None:
        cell["empty"] = OUTSIDE if OUTSIDE in reasons else MISSING
    return cell


def matched_cost_table(points: dict[str, dict[int, RunPoints]], metrics: Sequence[str]) -> dict:
    """Every strategy's metrics at every operating point of every strategy, matched on mean MACs.

    ``points[label][seed]``. Per seed, strategy A's value at B's point is A's metric interpolated linearly in mean
    MACs on A's points at the cost of B's point in that seed (:func:`interpolate_at`: no extrapolation); A's
    value at its own point is its measured value. A strategy with a single point is still compared: every other
    strategy is read at that point's cost. Cells are aggregated over the seeds both strategies ran with
    (:func:`mean_std`); an empty cell says why (``"empty"``: :data:`OUTSIDE` or :data:`MISSING`).
    """
    labels = list(points)
    rows = []
    for b in labels:
        b_seeds = list(points[b])
        for point, is_policy in points[b][b_seeds[0]].operating_points():
            at: dict[int, dict] = {}
            for s in b_seeds:
                match = [p for p, pol in points[b][s].operating_points()
                         if p["setting"] == point["setting"] and pol == is_policy]
                if match:
                    at[s] = match[0]
            rows.append({
                "strategy": b, "setting": point["setting"], "policy": is_policy, "seeds": sorted(at),
                **{key: mean_std([p[key] for p in at.values()]) for key in COST_KEYS},
                "values": {a: {m: _cell(points[a], at, m, a == b) for m in metrics} for a in labels},
            })
    rows.sort(key=lambda r: (labels.index(r["strategy"]),
                             math.inf if r["mean_macs"]["mean"] is None else r["mean_macs"]["mean"]))
    rows = collapse_duplicate_rows(rows)
    return {
        "x": "mean_macs",
        "metrics": list(metrics),
        "columns": labels,
        "cost_ranges": cost_ranges(points),
        "method": "per seed: linear interpolation in mean MACs on each strategy's points (sorted by cost, equal "
                  "costs merged by their mean), no extrapolation; then mean ± sample std over seeds, empty if any "
                  "seed is out of range; operating points of one strategy with identical numbers in every seed are "
                  "one row (their settings listed together)",
        "rows": rows,
    }


def _row_numbers(row: dict) -> str:
    """Every number of a matched row (costs and cells, rounded to 12 significant digits), as one comparable key."""
    def rounded(value: Any) -> Any:
        if isinstance(value, float):
            return float(f"{value:.12g}")
        if isinstance(value, dict):
            return {k: rounded(v) for k, v in value.items()}
        if isinstance(value, list):
            return [rounded(v) for v in value]
        return value

    return json.dumps(rounded({k: row[k] for k in (*COST_KEYS, "values", "seeds")}), sort_keys=True)


def settings_text(settings: Sequence[str]) -> str:
    """The settings of one collapsed row: ``a, b`` for two, ``first … last (n settings)`` for more (all of them
    stay in the row's ``settings``)."""
    if len(settings) <= 2:
        return ", ".join(settings)
    return f"{settings[0]} … {settings[-1]} ({len(settings)} settings)"


def collapse_duplicate_rows(rows: list[dict]) -> list[dict]:
    """Operating points of one strategy that reach the same numbers (a threshold sweep often lands on the same
    exit decisions for several settings) become one row listing every setting; the row is the reported policy
    when any of them is."""
    out: list[dict] = []
    index: dict[tuple[str, str], int] = {}
    for row in rows:
        key = (row["strategy"], _row_numbers(row))
        if key not in index:
            index[key] = len(out)
            out.append(dict(row, settings=[row["setting"]]))
            continue
        kept = out[index[key]]
        kept["settings"].append(row["setting"])
        kept["setting"] = settings_text(kept["settings"])
        kept["policy"] = kept["policy"] or row["policy"]
    return out


def area_under(points: Iterable[tuple[float, float | None]], lo: float, hi: float,
               rtol: float = COST_RTOL) -> float | None:
    """Mean of ``y`` over the cost range ``[lo, hi]``: the area under the piecewise-linear curve through the
    points (equal costs merged, as :func:`interpolate_at`) divided by ``hi - lo``. None when the points do not
    cover the whole range (no extrapolation) or the range is empty."""
    pts = [(float(x), float(y)) for x, y in points
           if y is not None and math.isfinite(float(y)) and math.isfinite(float(x))]
    if not pts or not (hi > lo):
        return None
    xs_all = sorted(x for x, _ in pts)
    tol = rtol * max(abs(xs_all[0]), abs(xs_all[-1]), 1e-300)
    if xs_all[0] > lo + tol or xs_all[-1] < hi - tol:
        return None
    knots = [lo, *sorted({x for x in xs_all if lo < x < hi}), hi]
    found = [interpolate_at(pts, x, rtol) for x in knots]
    ys = [y for y in found if y is not None]
    if len(ys) < len(knots):
        return None
    area = sum((x1 - x0) * (y0 + y1) / 2 for x0, x1, y0, y1 in zip(knots, knots[1:], ys, ys[1:]))
    return area / (hi - lo)


def shared_cost_range(points: dict[str, dict[int, RunPoints]]) -> tuple[float, float] | None:
    """The fraction-of-full-MACs range every strategy with a curve covers in every seed (strategies with a single
    cost are left out: they have no area); None when there is no such range."""
    ranges = [r.cost_range() for by_seed in points.values() for r in by_seed.values()
              if len({p["macs_fraction"] for p in r.interpolation_points}) > 1]
    if not ranges:
        return None
    lo, hi = max(a for a, _ in ranges), min(b for _, b in ranges)
    return (lo, hi) if hi > lo else None


def anytime_scores(points: dict[str, dict[int, RunPoints]], cost_range: Sequence[float] | None = None,
                   metric: str = "accuracy") -> dict:
    """The anytime score of every strategy: the mean of ``metric`` over a range of mean-MACs fractions, i.e. the
    area under its metric-vs-MACs curve over ``[lo, hi]`` divided by ``hi - lo``, per seed, then mean ± std over
    seeds. One number per strategy for the whole trade-off curve rather than one operating point.

    ``cost_range`` defaults to the range every strategy with a curve covers in every seed
    (:func:`shared_cost_range`); a strategy whose points do not span the range in some seed gets an empty score
    (no extrapolation)."""
    if cost_range is not None:
        lo, hi = (float(v) for v in cost_range)
        if not (0 <= lo < hi):
            raise EednError(f"the anytime range must be two fractions of full MACs 0 <= LO < HI, got [{lo}, {hi}]; "
                            "e.g. --anytime-range 0.5,1.0")
        source = "given"
    else:
        shared = shared_cost_range(points)
        if shared is None:
            return {"metric": metric, "range": None, "source": "none", "scores": {}}
        (lo, hi), source = shared, "shared"
    scores = {}
    for label, by_seed in points.items():
        per_seed = {seed: area_under([(p["macs_fraction"], p.get(metric)) for p in r.interpolation_points], lo, hi)
                    for seed, r in by_seed.items()}
        scores[label] = mean_std(list(per_seed.values())) | {"per_seed": {str(s): v for s, v in per_seed.items()}}
    return {"metric": metric, "range": [lo, hi], "source": source, "scores": scores}


def own_im_threshold_runs(runs: dict[str, dict[int, dict]]) -> dict[str, dict[int, dict]]:
    """``runs`` with, after every learned-gate strategy, one more column: the threshold sweep on the IMs of its
    reported setting (its policy: the sweep point closest in cost to the learned gate's policy)."""
    out: dict[str, dict[int, dict]] = {}
    for label, by_seed in runs.items():
        out[label] = by_seed
        if not all(res.get(OWN_IMS_KEY) for res in by_seed.values()):
            continue
        column = {}
        gate = ""
        for seed, res in by_seed.items():
            thr = res[OWN_IMS_KEY]
            gate = thr["gate"]
            curve = thr["curves"][thr["policy_setting"]]
            target = res["policy"]["mean_macs"]
            nearest = min(curve, key=lambda p: abs(p["mean_macs"] - target))
            policy = dict(nearest) | {"name": f"{res['policy']['strategy']}+{thr['gate']}",
                                      "strategy": res["policy"]["strategy"], "gate": thr["gate"]}
            column[seed] = {k: v for k, v in res.items() if k not in ("metrics", OWN_IMS_KEY)} \
                | {"curve": curve, "policy": policy, "metrics": {}}
        out[own_ims_label(label, gate)] = column
    return out


def comparison_numbers(runs: dict[str, dict[int, dict]], anytime_range: Sequence[float] | None = None) -> dict:
    """Every number of a comparison from its runs' results (``runs[label][seed]``): the metrics and how to show
    them, the per-strategy summary of the reported policies, the aggregated curves, the matched table and the
    anytime scores (over ``anytime_range``, default the cost range the strategies share)."""
    runs = own_im_threshold_runs(runs)  # a learned gate's IMs under max-prob thresholds: one more column
    metrics = metric_specs(res for by_seed in runs.values() for res in by_seed.values())
    keys = list(metrics)
    points = {label: {seed: RunPoints.of(res) for seed, res in by_seed.items()} for label, by_seed in runs.items()}
    curves = {label: aggregate_curve(by_seed, keys) for label, by_seed in points.items()}
    summary = {}
    for label, by_seed in runs.items():
        first = next(iter(by_seed.values()))
        pol = curves[label]["policy"]
        summary[label] = {
            "strategy": first["policy"]["strategy"], "gate": first["policy"]["gate"],
            "policy_setting": pol["policy_setting"],
            **{k: pol[k] for k in (*COST_KEYS, *keys)},
            "exit_fractions": pol.get("exit_fractions"),
            "backbone_accuracy": mean_std([r["backbone"].get("test_accuracy") for r in by_seed.values()]),
            "full_macs": first["full_macs"],
        }
    return {"metrics": metrics, "summary": summary, "curves": curves, "matched": matched_cost_table(points, keys),
            "anytime": anytime_scores(points, anytime_range)}
