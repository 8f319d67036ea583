"""Split conformal prediction sets for an early-exit policy: LAC, APS, RAPS; `general` and per-exit `gated` q̂.

docs/evaluation.md describes every number. Everything is calibrated on the calibration split only, for the final
model, at every fixed α of ``alphas``: no stale thresholds, no α picked on test.

Scores ``s(x, c)`` (lower = more conforming), from the softmax of one exit's logits:

* ``lac``  — ``1 - p_c``.
* ``aps``  — the probability mass of every class ranked at or above c (sorted by descending probability, ties in
  class-index order): ``sum_{j: rank(j) <= rank(c)} p_j``. With ``randomized=True`` the own mass is scaled by a
  uniform U per sample (``mass above c + U p_c``), U from a generator seeded with ``seed``.
* ``raps`` — APS + ``lam_reg * max(0, rank(c) - k_reg)`` with rank 1-based (defaults lam_reg=0.01, k_reg=5: the
  five most likely classes are not penalised).

Threshold: with n calibration scores, ``k = ceil((n + 1)(1 - α))`` and q̂ is the k-th smallest score; when
``k > n`` q̂ = +inf and the set holds every class (for LAC this is "q̂ = 1": ``1 - p_c <= 1`` always).
The set is ``{c : s(x, c) <= q̂}``; for LAC that is ``{c : p_c >= 1 - q̂}``. Sets can be empty (no "include the
last label" rule).

Variants (which calibration scores make q̂, and which q̂ a test sample uses — always on its exit's logits):

* ``general``      — one q̂ from the gated scores (each cal sample at its own exit).
* ``gated``        — per exit l: the cal samples that exited at l when there are at least ``min_per_exit`` (20) of
  them. Otherwise (``fallback``, with a warning): ``merge`` (clean profile) joins the exit with its neighbours
  until the group holds ``min_per_exit`` exited cal samples (a short last group joins the one before) and
  calibrates the group on its samples' gated scores — Mondrian conformal over groups of exits, so coverage
  holds per group and overall; ``general`` uses the general q̂; ``im_scores`` — the official code,
  ``profile=paper-compat`` — uses every cal sample's IM_l score, which under-covers: the samples that reach a
  late exit are the hard ones, while most cal samples are easy there (docs/method.md §5.3). The official code
  requires *more than* 20 (``min_per_exit=21``, the paper-compat default). The final exit is index E-1.
* ``gated_all``    — per exit l: every cal sample's IM_l score (extra).
* ``gated_strict`` — per exit l: only the cal samples that exited at l; q̂ = 1 - α when there are none (extra).
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor

from eedn.core.contracts import Evaluator, Metric
from eedn.runtime.errors import EednError
from eedn.runtime.io import json_float
from eedn.core.options import option
from eedn.core.outputs import ExitOutputs

METHODS = ("lac", "aps", "raps")
VARIANTS = ("general", "gated", "gated_all", "gated_strict")
#: per profile: the ``gated`` fallback and ``min_per_exit`` when unset (paper-compat = the official code's rule)
PROFILES: dict[str, dict[str, Any]] = {"clean": {"fallback": "merge", "min_per_exit": 20},
            "paper-compat": {"fallback": "im_scores", "min_per_exit": 21}}
FALLBACKS = ("merge", "general", "im_scores")
DEFAULT_ALPHAS = (0.01, 0.05, 0.1)
#: k = ceil((n+1)(1-α) - _CEIL_SLACK): (n+1)(1-α) computed in floating point can land a hair above an integer
#: (e.g. 0.7 * 10 = 7.000000000000001), which would silently demand one more sample than the formula says.
_CEIL_SLACK = 1e-9


# ----------------------------------------------------------------------------------------------- tensor functions


def class_scores(probs: Tensor, method: str = "lac", *, lam_reg: float = 0.01, k_reg: int = 5,
                 noise: Tensor | None = None) -> Tensor:
    """Non-conformity score of every class ``[..., C]`` from probabilities ``[..., C]``.

    ``noise`` (uniform in [0, 1), shape ``probs.shape[:-1]``) randomises APS/RAPS; None gives the non-randomised
    score (mass down to and including the class).
    """
    if method not in METHODS:
        raise EednError(f"unknown conformal method '{method}'; use one of: {', '.join(METHODS)}")
    probs = probs.double()
    if method == "lac":
        return 1.0 - probs
    sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
    cumulative = sorted_probs.cumsum(-1)
    if noise is not None:
        cumulative = cumulative - (1.0 - noise.double()[..., None]) * sorted_probs
    scores = torch.empty_like(probs).scatter_(-1, order, cumulative)
    if method == "raps":
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(1, probs.shape[-1] + 1).expand_as(order))
        scores = scores + lam_reg * (rank - k_reg).clamp(min=0).double()
    return scores


def label_scores(probs: Tensor, labels: Tensor, method: str = "lac", **score_options: Any) -> Tensor:
    """Score of the true class (the calibration scores): probs ``[..., C]``, labels ``[...]`` -> ``[...]``."""
    scores = class_scores(probs, method, **score_options)
    return scores.gather(-1, labels.long().unsqueeze(-1)).squeeze(-1)


def conformal_rank(n: int, alpha: float) -> int:
    """k = ceil((n + 1)(1 - α)): q̂ is the k-th smallest of n calibration scores (k > n means no finite q̂)."""
    _check_alpha(alpha)
    return max(math.ceil((n + 1) * (1.0 - alpha) - _CEIL_SLACK), 1)


def conformal_threshold(scores: Tensor, alpha: float) -> float:
    """q̂: the k-th smallest calibration score, or +inf when k > n (the set then holds every class)."""
    n = scores.numel()
    k = conformal_rank(n, alpha)
    if k > n:
        return math.inf
    return float(scores.double().flatten().kthvalue(k).values)


def prediction_sets(scores: Tensor, qhat: Tensor | float) -> Tensor:
    """Bool ``[N, C]``: class c is in the set of sample n iff ``scores[n, c] <= qhat[n]`` (or a scalar q̂)."""
    qhat = torch.as_tensor(qhat, dtype=torch.float64)
    if qhat.dim() == 1:
        qhat = qhat[:, None]
    return scores.double() <= qhat


def set_metrics(sets: Tensor, labels: Tensor) -> dict[str, float | None]:
    """Empirical coverage and mean set size (None for no samples)."""
    if sets.shape[0] == 0:
        return {"coverage": None, "mean_set_size": None}
    covered = sets.gather(-1, labels.long().reshape(-1, 1)).squeeze(-1)
    return {"coverage": float(covered.double().mean()), "mean_set_size": float(sets.sum(-1).double().mean())}


def exit_thresholds(cal_scores: Tensor, exit_cal: Tensor, alpha: float, variant: str,
                    min_per_exit: int = 20, fallback: str = "im_scores") -> list[tuple[float, str, int]]:
    """Per-exit ``(q̂_l, source, n_l)`` for the gated variants, from cal true-class scores ``[M, E]``.

    ``source`` is "exited" (the n_l samples that left at l), "all" (every cal sample's IM_l score), "general"
    (``gated`` below ``min_per_exit`` with ``fallback="general"``: the q̂ of every cal sample's gated score) or
    "none" (gated_strict with no sample: q̂ = 1 - α).
    """
    if fallback not in FALLBACKS:
        raise EednError(f"unknown conformal fallback '{fallback}'; use one of: {', '.join(FALLBACKS)}")
    m, n_exits = cal_scores.shape
    gated_scores = cal_scores[torch.arange(m), exit_cal]
    counts = torch.bincount(exit_cal, minlength=n_exits).tolist()
    group_of = {l: group for group in merged_exit_groups(counts, min_per_exit) for l in group}
    thresholds = []
    for l in range(n_exits):
        exited = exit_cal == l
        count = int(exited.sum())
        short = variant == "gated" and count < min_per_exit
        if variant == "gated" and fallback == "merge":  # every exit of a group shares its q̂ (Mondrian)
            group = group_of[l]
            members = torch.isin(exit_cal, torch.tensor(group))
            source = f"merged:{group[0]}-{group[-1]}" if len(group) > 1 else "exited"
            thresholds.append((conformal_threshold(gated_scores[members], alpha), source, int(members.sum())))
        elif short and fallback == "general":
            thresholds.append((conformal_threshold(gated_scores, alpha), "general", m))
        elif variant == "gated_all" or short:
            thresholds.append((conformal_threshold(cal_scores[:, l], alpha), "all", m))
        elif variant == "gated_strict" and count == 0:
            thresholds.append((1.0 - alpha, "none", 0))
        else:
            thresholds.append((conformal_threshold(cal_scores[exited, l], alpha), "exited", count))
    return thresholds


def merged_exit_groups(counts: list[int], min_count: int) -> list[list[int]]:
    """Consecutive exits joined until each group holds at least ``min_count`` samples (``counts`` per exit); a
    short last group joins the one before (one group of every exit when even all together are short)."""
    groups: list[list[int]] = []
    current: list[int] = []
    total = 0
    for l, count in enumerate(counts):
        current.append(l)
        total += count
        if total >= min_count:
            groups.append(current)
            current, total = [], 0
    if current:
        if groups:
            groups[-1] += current
        else:
            groups.append(current)
    return groups


def _check_alpha(alpha: float) -> None:
    if not 0.0 < alpha < 1.0:
        raise EednError(f"conformal alpha must lie strictly between 0 and 1, got {alpha}")


# ------------------------------------------------------------------------------------------------------ evaluator


class ConformalEvaluator(Evaluator):
    """Coverage and mean set size of split-conformal sets on the policy's gated prediction."""

    name = "conformal"

    @dataclass
    class Options:
        alphas: list[float] = option(list(DEFAULT_ALPHAS), "miscoverage levels α, each in (0, 1)", min=0, max=1)
        methods: list[str] = option(list(METHODS), "non-conformity scores", choices=METHODS)
        variants: list[str] = option(["general", "gated"], "which calibration scores make q̂", choices=VARIANTS)
        profile: str = option("clean", "clean or paper-compat (the official gated fallback: every cal sample's "
                                        "IM score, min_per_exit 21)", choices=tuple(PROFILES))
        min_per_exit: int | None = option(None, "gated: fewest cal samples exiting at an exit for its own q̂ "
                                                "(default: per profile, 20 clean, 21 official)", min=0)
        fallback: str | None = option(None, "gated, an exit below min_per_exit: merge with its neighbours into a "
                                            "group of min_per_exit (merge), the general q̂ (general) or every cal "
                                            "sample's IM score there (im_scores, official) (default: per profile)",
                                      choices=FALLBACKS)
        lam_reg: float = option(0.01, "RAPS penalty per rank beyond k_reg", min=0)
        k_reg: int = option(5, "RAPS: ranks not penalised", min=0)
        randomized: bool = option(False, "randomise APS / RAPS with a uniform draw per sample")
        seed: int = option(0, "seed of the randomisation")
        # the headline numbers (eedn compare, eedn report); computed even when not among the rows
        headline_alpha: float = option(0.05, "α of the headline set size and coverage", min=0, max=1)
        headline_method: str = option("lac", "score of the headline set size and coverage", choices=METHODS)
        headline_variant: str = option("general", "variant of the headline set size and coverage", choices=VARIANTS)

    options: ConformalEvaluator.Options

    def __init__(self, **options: Any):
        super().__init__(**options)
        profile = PROFILES[self.options.profile]
        self.options = dataclasses.replace(self.options, **{k: v for k, v in profile.items()
                                                            if getattr(self.options, k) is None})
        o = self.options
        for alpha in [*o.alphas, o.headline_alpha]:
            _check_alpha(alpha)
        self.alphas, self.methods, self.variants = o.alphas, o.methods, o.variants
        # both filled from the profile above, so never None
        self.min_per_exit, self.fallback = cast(int, o.min_per_exit), cast(str, o.fallback)
        self.score_options: dict[str, Any] = {"lam_reg": o.lam_reg, "k_reg": o.k_reg}
        self.randomized, self.seed = o.randomized, o.seed
        self._warned_fallback = False

    def evaluate(self, test: ExitOutputs, cal: ExitOutputs, exit_test: Tensor, exit_cal: Tensor) -> dict:
        """One row per (method, α, variant) with overall and per-exit coverage and mean set size, and the
        headline setting's coverage and mean set size (computed as well when it is not among the rows)."""
        for outputs, exits, split in ((test, exit_test, "test"), (cal, exit_cal, "cal")):
            outputs.check_exit_index(exits, split)
        if test.num_exits != cal.num_exits:
            raise EednError(f"test has {test.num_exits} exits but cal has {cal.num_exits}; use the same model")
        exit_test, exit_cal = exit_test.long().cpu(), exit_cal.long().cpu()
        labels_test, labels_cal = test.labels.long().cpu(), cal.labels.long().cpu()
        n_test, n_cal, n_exits = test.num_samples, cal.num_samples, test.num_exits
        probs_test = test.logits.detach().cpu()[torch.arange(n_test), exit_test].double().softmax(-1)  # gated [N, C]
        probs_cal = cal.logits.detach().cpu().double().softmax(-1)  # every exit [M, E, C]

        noise_cal = noise_test = None
        if self.randomized:
            generator = torch.Generator().manual_seed(self.seed)
            noise_cal = torch.rand(n_cal, generator=generator, dtype=torch.float64)
            noise_test = torch.rand(n_test, generator=generator, dtype=torch.float64)

        def scores(method: str) -> tuple[Tensor, Tensor]:
            """Test class scores ``[N, C]`` (gated) and cal true-class scores at every exit ``[M, E]``."""
            test_scores = class_scores(probs_test, method, noise=noise_test, **self.score_options)
            cal_noise = None if noise_cal is None else noise_cal[:, None].expand(n_cal, n_exits)
            cal_scores = label_scores(probs_cal, labels_cal[:, None].expand(n_cal, n_exits), method,
                                      noise=cal_noise, **self.score_options)
            return test_scores, cal_scores

        def make_row(method: str, alpha: float, variant: str, test_scores: Tensor, cal_scores: Tensor) -> dict:
            if variant == "general":
                qhat = conformal_threshold(cal_scores[torch.arange(n_cal), exit_cal], alpha)
                per_exit_q = [(qhat, "gated", n_cal)] * n_exits
            else:
                per_exit_q = exit_thresholds(cal_scores, exit_cal, alpha, variant, self.min_per_exit,
                                             self.fallback)
            q_values = torch.tensor([q for q, _, _ in per_exit_q], dtype=torch.float64)
            sets = prediction_sets(test_scores, q_values[exit_test])
            row: dict[str, Any] = {"alpha": alpha, "method": method, "variant": variant}
            row |= set_metrics(sets, labels_test)
            if variant == "general":
                row["qhat"] = json_float(per_exit_q[0][0])
            per_exit = []
            for l, (q, source, n_used) in enumerate(per_exit_q):
                mine = exit_test == l
                entry: dict[str, Any] = {"index": l, "count": int(mine.sum())}
                entry |= set_metrics(sets[mine], labels_test[mine])
                if variant != "general":
                    entry |= {"qhat": json_float(q), "calibrated_on": source, "cal_count": n_used}
                per_exit.append(entry)
            row["per_exit"] = per_exit
            return row

        rows = []
        for method in self.methods:
            method_scores = scores(method)
            rows += [make_row(method, alpha, variant, *method_scores) for alpha in self.alphas
                     for variant in self.variants]
        o = self.options
        key = (o.headline_alpha, o.headline_method, o.headline_variant)
        head = next((r for r in rows if (r["alpha"], r["method"], r["variant"]) == key), None)
        if head is None:
            head = make_row(key[1], key[0], key[2], *scores(key[1]))
        short = sorted({e["index"] for r in rows if r["variant"] == "gated" for e in r["per_exit"]
                        if e["calibrated_on"] != "exited"})
        if short and not self._warned_fallback:  # once per run: every operating point may have short exits
            self._warned_fallback = True
            rule = {"merge": "a q̂ shared with their neighbouring exits", "general": "the general q̂",
                    "im_scores": "every cal sample's IM score (the official rule, which under-covers there)"}[
                self.fallback]
            warnings.warn(f"conformal gated: fewer than {self.min_per_exit} cal samples exit at some exits (first "
                          f"seen: exit(s) {', '.join(map(str, short))}), so those use {rule}; results.json lists them "
                          "per operating point (gated_fallback_exits); a larger cal split gives each exit its own q̂",
                          stacklevel=2)
        return {
            "results": rows,
            "headline": {k: head[k] for k in ("alpha", "method", "variant", "coverage", "mean_set_size")},
            "settings": {
                "alphas": self.alphas, "methods": self.methods, "variants": self.variants,
                "profile": o.profile, "min_per_exit": self.min_per_exit, "fallback": self.fallback,
                "gated_fallback_exits": short, "randomized": self.randomized, "seed": self.seed,
                "n_cal": n_cal, **self.score_options,
                "threshold": "k-th smallest cal score, k = ceil((n+1)(1-alpha)); all classes when k > n",
            },
        }

    def exit_sets(self, fit: ExitOutputs, outputs: ExitOutputs) -> Tensor:
        """Bool ``[N, E, C]``: the set every exit of ``outputs`` would give each sample, with one q̂ per exit from
        ``fit``'s IM scores (the gated_all variant) at the headline α and method, not randomised. Risk-controlled
        exits read it (the set-size and miscoverage gaps); ``fit`` is the val split there, so cal stays unused."""
        if fit.num_exits != outputs.num_exits:
            raise EednError(f"fit outputs have {fit.num_exits} exits but outputs have {outputs.num_exits}")
        o = self.options
        method, alpha = o.headline_method, o.headline_alpha
        n_fit = fit.num_samples
        fit_scores = label_scores(fit.probabilities().double(), fit.labels.long()[:, None].expand(n_fit, fit.num_exits),
                                  method, **self.score_options)  # [M, E]
        qhat = torch.tensor([conformal_threshold(fit_scores[:, l], alpha) for l in range(fit.num_exits)],
                            dtype=torch.float64)
        scores = class_scores(outputs.probabilities().double(), method, **self.score_options)  # [N, E, C]
        return scores <= qhat[None, :, None]

    def headline_metrics(self) -> dict[str, Metric]:
        o = self.options
        at = f"{o.headline_method.upper()}, α = {o.headline_alpha:g}, {o.headline_variant} q̂"
        return {"set_size": Metric(label=f"mean conformal set size ({at})", digits=3),
                "coverage": Metric(label=f"conformal coverage (%; {at})", scale=100, lower_is_better=False)}

    def headline(self, metrics: dict) -> dict[str, float | None]:
        head = metrics["headline"]
        return {"set_size": head["mean_set_size"], "coverage": head["coverage"]}

    def rows(self, metrics: dict) -> list[dict]:
        """One flat row per (α, method, variant): coverage and mean set size."""
        keys = ("alpha", "method", "variant", "coverage", "mean_set_size")
        return [{k: row[k] for k in keys} for row in metrics["results"]]
