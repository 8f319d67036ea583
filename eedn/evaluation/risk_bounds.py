"""Concentration bounds for risk control (docs/evaluation.md, "Risk-controlled exits").

Every function here works on losses already rescaled to [0, 1]; :func:`rescale` maps a risk's declared range
``[lower, upper]`` onto it (a level ε maps the same way). Two kinds of statement are used:

* p-values for the null hypothesis ``H: R > ε`` (Learn-then-Test, Angelopoulos et al. 2021): small when the
  empirical risk is well below ε;
* upper confidence bounds ``R⁺`` with ``P(R ≤ R⁺) ≥ 1 − δ`` (risk-controlling prediction sets, Bates et al. 2021).

Formulas (n losses, empirical mean ``r``):

* Hoeffding: ``p = exp(−n·h1(min(r, ε), ε))`` with ``h1(a, b) = a ln(a/b) + (1 − a) ln((1 − a)/(1 − b))``.
* Bentkus: ``p = e · P(Bin(n, ε) ≤ ⌈n r⌉)``.
* Hoeffding-Bentkus: the smaller of the two; its UCB is ``sup{R : p_HB(R) ≥ δ}``.
* exact binomial (losses in {0, 1} only): ``p = P(Bin(n, ε) ≤ n r)``.
* WSR (Waudby-Smith & Ramdas 2020, the betting bound as stated in Bates et al. 2021, Prop. 5):
  ``μ̂_i = (1/2 + Σ_{j≤i} x_j)/(1 + i)``, ``σ̂²_i = (1/4 + Σ_{j≤i} (x_j − μ̂_j)²)/(1 + i)``,
  ``ν_i = min(1, sqrt(2 ln(1/δ) / (n σ̂²_{i−1})))``, ``K_i(R) = Π_{j≤i} (1 − ν_j (x_j − R))``;
  ``R⁺ = inf{R ≥ 0 : max_i K_i(R) > 1/δ}``. It depends on the order of the losses (a fixed, data-independent
  order is fine: the samples are exchangeable).
"""
from __future__ import annotations

import math

import numpy as np
from scipy.special import xlogy
from scipy.stats import binom

from eedn.runtime.errors import EednError

_BISECT_STEPS = 60


def rescale(values: np.ndarray | float, lower: float, upper: float) -> np.ndarray | float:
    """Map ``[lower, upper]`` onto ``[0, 1]`` (losses and risk levels alike)."""
    if not upper > lower:
        raise EednError(f"a risk's bounds must satisfy lower < upper, got [{lower}, {upper}]")
    return (values - lower) / (upper - lower)


def binomial_tail(k: np.ndarray | float, n: int, p: float) -> np.ndarray | float:
    """``P(Bin(n, p) ≤ k)`` (elementwise for an array of k)."""
    out = binom.cdf(np.floor(np.asarray(k, dtype=np.float64) + 1e-9), n, p)
    return float(out) if np.ndim(out) == 0 else out


def h1(a: np.ndarray | float, b: float) -> np.ndarray | float:
    """Kullback-Leibler divergence between Bernoulli(a) and Bernoulli(b) (0 < b < 1), with 0·ln 0 = 0."""
    a = np.asarray(a, dtype=np.float64)
    out = xlogy(a, a / b) + xlogy(1 - a, (1 - a) / (1 - b))
    return float(out) if out.ndim == 0 else out


def _check(mean: np.ndarray | float, n: int) -> np.ndarray:
    if n < 1:
        raise EednError("a concentration bound needs at least one calibration sample")
    mean = np.asarray(mean, dtype=np.float64)
    if mean.size and (mean.min() < -1e-9 or mean.max() > 1 + 1e-9):
        raise EednError("an empirical risk is outside [0, 1] after rescaling: the risk's declared bounds are wrong")
    return np.clip(mean, 0.0, 1.0)


def _scalar(out: np.ndarray) -> np.ndarray | float:
    return float(out) if np.ndim(out) == 0 else out


def hoeffding_pvalue(mean: np.ndarray | float, n: int, epsilon: float) -> np.ndarray | float:
    """Hoeffding's p-value of ``R > ε`` (1 when ε is outside (0, 1): no test is possible there)."""
    mean = _check(mean, n)
    if not 0 < epsilon < 1:
        return _scalar(np.ones_like(mean))
    return _scalar(np.minimum(1.0, np.exp(-n * np.asarray(h1(np.minimum(mean, epsilon), epsilon)))))


def bentkus_pvalue(mean: np.ndarray | float, n: int, epsilon: float) -> np.ndarray | float:
    """Bentkus' p-value of ``R > ε``: ``e · P(Bin(n, ε) ≤ ⌈n r⌉)``."""
    mean = _check(mean, n)
    if not 0 < epsilon < 1:
        return _scalar(np.ones_like(mean))
    return _scalar(np.minimum(1.0, math.e * np.asarray(binomial_tail(np.ceil(n * mean - 1e-9), n, epsilon))))


def hb_pvalue(mean: np.ndarray | float, n: int, epsilon: float) -> np.ndarray | float:
    """Hoeffding-Bentkus p-value: the smaller of the two (both are valid, Bates et al. 2021)."""
    return _scalar(np.minimum(hoeffding_pvalue(mean, n, epsilon), bentkus_pvalue(mean, n, epsilon)))


def binomial_pvalue(count: np.ndarray | float, n: int, epsilon: float) -> np.ndarray | float:
    """Exact p-value of ``R > ε`` for losses in {0, 1} with ``count`` ones among n: ``P(Bin(n, ε) ≤ count)``."""
    _check(np.asarray(count, dtype=np.float64) / max(n, 1), n)
    if not 0 < epsilon < 1:
        return _scalar(np.ones(np.shape(count)))
    return binomial_tail(count, n, epsilon)


def hoeffding_ucb(mean: float, n: int, delta: float) -> float:
    """The plain Hoeffding UCB ``r + sqrt(ln(1/δ) / (2n))`` (reference; looser than HB)."""
    mean = float(_check(mean, n))
    return min(1.0, mean + math.sqrt(math.log(1 / delta) / (2 * n)))


def hb_ucb(mean: float, n: int, delta: float) -> float:
    """``sup{R ∈ [r, 1] : p_HB(r; R) ≥ δ}`` by bisection (p_HB falls as R grows beyond r)."""
    mean = float(_check(mean, n))
    lo, hi = mean, 1.0
    if hb_pvalue(mean, n, 1 - 1e-12) >= delta:
        return 1.0
    for _ in range(_BISECT_STEPS):
        mid = (lo + hi) / 2
        if hb_pvalue(mean, n, mid) >= delta:
            lo = mid
        else:
            hi = mid
    return hi


def wsr_log_capital(x: np.ndarray, delta: float, level: float) -> np.ndarray:
    """``max_i ln K_i(R)`` at ``R = level`` for every row of ``x [K, n]`` (or one vector ``[n]``)."""
    x = np.atleast_2d(np.asarray(x, dtype=np.float64))
    n = x.shape[1]
    i = np.arange(1, n + 1)
    mu = (0.5 + np.cumsum(x, axis=1)) / (1 + i)
    sigma2 = (0.25 + np.cumsum((x - mu) ** 2, axis=1)) / (1 + i)
    sigma2_prev = np.concatenate([np.full((x.shape[0], 1), 0.25), sigma2[:, :-1]], axis=1)
    nu = np.minimum(1.0, np.sqrt(2 * math.log(1 / delta) / (n * sigma2_prev)))
    factors = np.maximum(1 - nu * (x - level), 0.0)  # >= 0 already: nu <= 1, x <= 1, level >= 0
    with np.errstate(divide="ignore"):
        return np.cumsum(np.log(factors), axis=1).max(axis=1)


def wsr_rejects(x: np.ndarray, delta: float, level: float) -> np.ndarray:
    """Bool ``[K]``: is the WSR UCB of each row of ``x [K, n]`` at most ``level`` (the capital at ``level``
    passes 1/δ)? Equivalent to ``wsr_ucb(row) <= level`` without the bisection."""
    return wsr_log_capital(_check_unit(x), delta, level) > math.log(1 / delta)


def _check_unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.size == 0 or x.shape[-1] == 0:
        raise EednError("a concentration bound needs at least one calibration sample")
    if x.min() < -1e-9 or x.max() > 1 + 1e-9:
        raise EednError("WSR needs losses in [0, 1] after rescaling: the risk's declared bounds are wrong")
    return np.clip(x, 0.0, 1.0)


def wsr_ucb(losses: np.ndarray, delta: float) -> float:
    """The Waudby-Smith–Ramdas betting UCB of the mean of ``losses`` in [0, 1] (order as given)."""
    x = _check_unit(losses).reshape(1, -1)
    threshold = math.log(1 / delta)
    if wsr_log_capital(x, delta, 1.0)[0] <= threshold:
        return 1.0
    if wsr_log_capital(x, delta, 0.0)[0] > threshold:
        return 0.0
    lo, hi = 0.0, 1.0
    for _ in range(_BISECT_STEPS):  # max_i K_i(R) grows with R
        mid = (lo + hi) / 2
        if wsr_log_capital(x, delta, mid)[0] > threshold:
            hi = mid
        else:
            lo = mid
    return hi
