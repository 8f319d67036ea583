"""Paired differences: checked against scipy's paired t-test, whose confidence interval is the same interval."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from eedn.evaluation.paired import mean_and_se, paired_difference


def test_paired_difference_matches_scipy_paired_t_interval():
    a = [0.912, 0.905, 0.918, 0.909]
    b = [0.901, 0.899, 0.903, 0.905]
    out = paired_difference(a, b)
    ref = stats.ttest_rel(a, b).confidence_interval(0.95)
    assert out["n"] == 4
    assert out["mean"] == pytest.approx(np.mean(np.subtract(a, b)))
    assert out["ci"] == pytest.approx([ref.low, ref.high])
    assert out["excludes_zero"] is bool(ref.low > 0 or ref.high < 0)


def test_pairing_cancels_what_the_seeds_share():
    # b is a shifted by a constant plus seed-to-seed swings far larger than the shift: unpaired, the shift
    # drowns; paired, the interval is tight around it and excludes 0
    swings = [0.0, 0.05, -0.04]
    a = [0.80 + s for s in swings]
    b = [0.79 + s + e for s, e in zip(swings, (0.001, -0.001, 0.0))]
    out = paired_difference(a, b)
    assert out["mean"] == pytest.approx(0.01)
    assert out["excludes_zero"] and out["ci"][0] > 0
    unpaired = stats.ttest_ind(a, b).pvalue
    assert unpaired > 0.5


def test_one_pair_has_no_interval_and_bad_input_is_refused():
    assert paired_difference([0.5], [0.4]) == {"mean": pytest.approx(0.1), "se": None, "ci": None, "n": 1,
                                               "excludes_zero": False}
    with pytest.raises(ValueError, match="pairs"):
        paired_difference([0.5, 0.6], [0.4])
    with pytest.raises(ValueError, match="confidence"):
        paired_difference([0.5, 0.6], [0.4, 0.5], confidence=1.0)


def test_mean_and_se():
    out = mean_and_se([1.0, 2.0, 3.0])
    assert out["mean"] == 2.0 and out["se"] == pytest.approx(1 / math.sqrt(3))
    assert mean_and_se([]) == {"mean": None, "se": None, "n": 0}
