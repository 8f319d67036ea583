"""Conformal evaluator: scores vs MAPIE, thresholds and sets vs MAPIE and crepes (Mondrian = per exit), coverage
property, per-exit fallback, general vs gated.

Quantile conventions. eedn: q̂ = k-th smallest cal score, k = ceil((n+1)(1-α)); set = {c : s(x, c) <= q̂}.
MAPIE 1.x (prefit): ``np.quantile(scores, ceil((n+1)(1-α))/n, method="lower")`` = the same k-th order statistic, and
its LAC set is ``s - q̂ <= 1e-8``. crepes (smoothing=False): p(s) = (#{cal >= s} + 1)/(n+1), set = {c : p >= α},
which is the same set whenever (n+1)(1-α) is not an integer; when it is, crepes admits one more order statistic
(k+1). The data below keep every (n+1)(1-α) non-integer, so all three agree exactly. (eedn also takes 1e-9 off
(n+1)(1-α) before the ceil, so float noise such as 100 * (1 - 0.45) = 55.00000000000001 cannot demand an extra
sample; MAPIE would use k = 56 there.)
"""
from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import eedn
from eedn.runtime.errors import EednError
from eedn.core.outputs import ExitOutputs
from eedn_plugins.conformal import (
    METHODS,
    class_scores,
    conformal_rank,
    conformal_threshold,
    label_scores,
    merged_exit_groups,
    prediction_sets,
)


def exchangeable_outputs(n: int, num_classes: int = 6, num_exits: int = 3, seed: int = 0) -> ExitOutputs:
    """i.i.d. samples: labels drawn from softmax(z); exit l sees z blurred by noise and sharpened by (l+1)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, num_classes, generator=g, dtype=torch.float64) * 2.0
    labels = torch.multinomial(z.softmax(-1), 1, generator=g).squeeze(1)
    logits = torch.stack([(z + torch.randn(n, num_classes, generator=g, dtype=torch.float64) * (1.5 - 0.5 * l))
                          * (0.6 + 0.5 * l) for l in range(num_exits)], dim=1)
    return ExitOutputs(logits.float(), labels, torch.zeros(n, num_exits - 1), torch.arange(1.0, num_exits + 1), 3.0)


def confidence_policy(outputs: ExitOutputs, threshold: float = 0.6) -> torch.Tensor:
    """A causal rule of each sample's own logits: leave at the first exit whose max probability clears threshold."""
    confident = outputs.probabilities().max(-1).values >= threshold
    confident[:, -1] = True
    return confident.long().argmax(1)


def crepes_sets(cal_scores, cal_bins, test_scores, test_bins, alpha):
    from crepes import ConformalClassifier

    classifier = ConformalClassifier().fit(np.asarray(cal_scores), bins=cal_bins)
    return classifier.predict_set(np.asarray(test_scores), bins=test_bins, confidence=1 - alpha, smoothing=False)


def row(metrics: dict, alpha: float, method: str, variant: str) -> dict:
    (found,) = [r for r in metrics["results"] if (r["alpha"], r["method"], r["variant"]) == (alpha, method, variant)]
    return found


# ----------------------------------------------------------------------------------------------- scores / q̂


def test_threshold_rank_and_the_no_finite_quantile_case():
    assert conformal_rank(500, 0.1) == 451  # ceil(450.9)
    assert conformal_rank(99, 0.45) == 55  # (n+1)(1-α) = 55 exactly, though 100 * (1 - 0.45) = 55.00000000000001
    scores = torch.arange(1.0, 10.0)  # 1..9
    assert conformal_threshold(scores, 0.3) == 7.0  # k = ceil(10 * 0.7) = 7
    assert conformal_threshold(scores, 0.05) == math.inf  # k = 10 > n = 9
    assert prediction_sets(torch.tensor([[0.2, 5.0]]), math.inf).all()


def test_aps_and_raps_scores_match_mapie():
    from mapie.conformity_scores import APSConformityScore

    g = torch.Generator().manual_seed(0)
    probs = torch.randn(300, 12, generator=g, dtype=torch.float64).mul(1.5).softmax(-1)
    labels = torch.randint(0, 12, (300,), generator=g)
    cumsum, rank = APSConformityScore.get_true_label_cumsum_proba(labels.numpy(), probs.numpy(), np.arange(12))
    np.testing.assert_allclose(label_scores(probs, labels, "aps").numpy(), cumsum[:, 0], atol=1e-12)
    raps = cumsum[:, 0] + 0.01 * np.maximum(0, rank - 5)  # RAPS with lam_reg=0.01, k_reg=5, rank 1-based
    np.testing.assert_allclose(label_scores(probs, labels, "raps", lam_reg=0.01, k_reg=5).numpy(), raps, atol=1e-12)
    np.testing.assert_allclose(label_scores(probs, labels, "lac").numpy(), 1 - probs[torch.arange(300), labels])
    # randomised APS: mass strictly above the class plus U times its own mass
    u = torch.rand(300, generator=g, dtype=torch.float64)
    own = probs[torch.arange(300), labels]
    randomized = label_scores(probs, labels, "aps", noise=u)
    np.testing.assert_allclose(randomized.numpy(), cumsum[:, 0] - own.numpy() + u.numpy() * own.numpy(), atol=1e-12)


def test_lac_sets_match_mapie_split_conformal():
    from mapie.classification import SplitConformalClassifier
    from sklearn.base import BaseEstimator, ClassifierMixin

    class GivenProbabilities(ClassifierMixin, BaseEstimator):
        """A 'prefit' classifier whose input already is the probability matrix."""

        def fit(self, X, y):
            self.classes_ = np.arange(X.shape[1])
            return self

        def predict_proba(self, X):
            return np.asarray(X)

        def predict(self, X):
            return np.asarray(X).argmax(1)

    g = torch.Generator().manual_seed(1)
    probs = torch.randn(1300, 8, generator=g, dtype=torch.float64).mul(2.0).softmax(-1)
    labels = torch.multinomial(probs, 1, generator=g).squeeze(1)
    cal, test = slice(0, 500), slice(500, 1300)
    alphas = [0.01, 0.05, 0.1, 0.2]
    mapie = SplitConformalClassifier(GivenProbabilities().fit(probs.numpy(), labels.numpy()),
                                     confidence_level=[1 - a for a in alphas], conformity_score="lac", prefit=True)
    mapie.conformalize(probs[cal].numpy(), labels[cal].numpy())
    _, mapie_sets = mapie.predict_set(probs[test].numpy())
    for i, alpha in enumerate(alphas):
        qhat = conformal_threshold(label_scores(probs[cal], labels[cal], "lac"), alpha)
        ours = prediction_sets(class_scores(probs[test], "lac"), qhat)
        assert np.array_equal(ours.numpy(), mapie_sets[:, :, i]), f"alpha={alpha}"


# ------------------------------------------------------------------------------------------ evaluator vs crepes


@pytest.mark.parametrize("method", METHODS)
def test_general_and_gated_match_crepes_standard_and_mondrian(method):
    cal, test = exchangeable_outputs(600, seed=12), exchangeable_outputs(500, seed=13)
    exit_cal, exit_test = confidence_policy(cal), confidence_policy(test)
    counts = torch.bincount(exit_cal, minlength=3).tolist()
    assert min(counts) >= 20  # every exit calibrates on its own samples: gated = Mondrian with exit as category
    alphas = (0.05, 0.1)
    for n in counts + [600]:  # keep every (n+1)(1-α) off the integers, where crepes differs by one order statistic
        assert all(abs((n + 1) * (1 - a) - round((n + 1) * (1 - a))) > 1e-6 for a in alphas)
    metrics = eedn.create("evaluator", "conformal", alphas=alphas, methods=[method]).evaluate(
        test, cal, exit_test, exit_cal)
    json.dumps(metrics, allow_nan=False)

    cal_probs = cal.logits.double().softmax(-1)[torch.arange(600), exit_cal]
    test_probs = test.logits.double().softmax(-1)[torch.arange(500), exit_test]
    cal_scores = label_scores(cal_probs, cal.labels, method).numpy()
    test_scores = class_scores(test_probs, method).numpy()
    for alpha in alphas:
        for variant, bins_cal, bins_test in (("general", None, None),
                                             ("gated", exit_cal.numpy(), exit_test.numpy())):
            sets = crepes_sets(cal_scores, bins_cal, test_scores, bins_test, alpha)
            covered = sets[np.arange(500), test.labels.numpy()]
            found = row(metrics, alpha, method, variant)
            assert found["coverage"] == pytest.approx(covered.mean(), abs=1e-12)
            assert found["mean_set_size"] == pytest.approx(sets.sum(1).mean(), abs=1e-12)
            for entry in found["per_exit"]:
                mine = exit_test.numpy() == entry["index"]
                assert entry["count"] == mine.sum()
                assert entry["mean_set_size"] == pytest.approx(sets[mine].sum(1).mean(), abs=1e-12)
            if variant == "gated":
                assert [e["calibrated_on"] for e in found["per_exit"]] == ["exited"] * 3


# ------------------------------------------------------------------------------------------ coverage property


def coverage_lower_bound(alpha: float, cal_counts: list[int], test_counts: list[int], delta: float = 1e-3) -> float:
    """A bound the empirical coverage breaks with probability about 2e-3 at most.

    Split conformal's coverage given the cal set is at least Beta(k, n + 1 - k)-distributed (stochastically; exactly
    that law for continuous scores), per group (one group for `general`, one per exit for Mondrian `gated`); we take
    each group's delta/G quantile (a union bound) and subtract three standard errors of the test-set average. The
    Beta law is left-skewed, so a plain "3 normal standard errors" bound is too tight for small n and α.
    """
    from scipy.stats import beta

    m = sum(test_counts)
    bound = 0.0
    for n, m_g in zip(cal_counts, test_counts):
        k = math.ceil((n + 1) * (1 - alpha) - 1e-9)
        group = 1.0 if k > n else float(beta.ppf(delta / len(cal_counts), k, n + 1 - k))
        bound += m_g / m * group
    return bound - 3 * math.sqrt(alpha * (1 - alpha) / m)


@settings(max_examples=20, deadline=None, derandomize=True)
@given(seed=st.integers(0, 10_000), n_cal=st.integers(60, 400), num_classes=st.integers(2, 15),
       alpha=st.sampled_from([0.05, 0.1, 0.2]), method=st.sampled_from(METHODS),
       variant=st.sampled_from(["general", "gated"]), randomized=st.booleans())
def test_coverage_holds_on_exchangeable_data(seed, n_cal, num_classes, alpha, method, variant, randomized):
    n_test = 1000
    data = exchangeable_outputs(n_cal + n_test, num_classes, seed=seed)
    cal, test = data.subset(torch.arange(n_cal)), data.subset(torch.arange(n_cal, n_cal + n_test))
    exit_cal, exit_test = confidence_policy(cal), confidence_policy(test)
    # min_per_exit=1: every exit calibrates on its own exited samples (Mondrian), for which the guarantee holds
    evaluator = eedn.create("evaluator", "conformal", alphas=[alpha], methods=[method], variants=[variant],
                            min_per_exit=1, randomized=randomized, seed=seed)
    coverage = evaluator.evaluate(test, cal, exit_test, exit_cal)["results"][0]["coverage"]
    if variant == "general":
        groups = [n_cal], [n_test]
    else:
        groups = torch.bincount(exit_cal, minlength=3).tolist(), torch.bincount(exit_test, minlength=3).tolist()
    assert coverage >= coverage_lower_bound(alpha, *groups)


# ---------------------------------------------------------------------------------- fallback, variants, options


def crafted(probs: list[list[float]], labels: list[int]) -> ExitOutputs:
    """Two exits that see the same probabilities (given as [N, C])."""
    logits = torch.tensor(probs, dtype=torch.float64).log()
    return ExitOutputs(torch.stack([logits, logits], 1), torch.tensor(labels), torch.zeros(len(labels), 1),
                       torch.tensor([1.0, 2.0]), 2.0)


def test_gated_fallback_merges_short_exits_and_keeps_the_official_rule_under_paper_compat():
    cal, test = exchangeable_outputs(300, seed=4), exchangeable_outputs(200, seed=5)
    exit_cal = torch.zeros(300, dtype=torch.long)
    exit_cal[:20] = 1  # exactly 20 at exit 1, none at exit 2
    exit_test = torch.arange(200) % 3
    scores = label_scores(cal.logits.double().softmax(-1), cal.labels[:, None].expand(300, 3), "lac")  # [M, E]
    gated_scores = scores[torch.arange(300), exit_cal]

    # clean: exit 2 (no cal sample) joins exit 1, and both use the q̂ of their 20 gated scores
    evaluator = eedn.create("evaluator", "conformal", methods=["lac"])
    with pytest.warns(UserWarning, match=r"fewer than 20 .* exit\(s\) 1, 2\), so those use"):
        clean = evaluator.evaluate(test, cal, exit_test, exit_cal)
    with warnings.catch_warnings():  # one warning per evaluator: the next operating point stays quiet
        warnings.simplefilter("error")
        evaluator.evaluate(test, cal, exit_test, exit_cal)
    gated = row(clean, 0.1, "lac", "gated")
    assert [(e["calibrated_on"], e["cal_count"]) for e in gated["per_exit"]] == [
        ("exited", 280), ("merged:1-2", 20), ("merged:1-2", 20)]
    assert gated["per_exit"][0]["qhat"] == conformal_threshold(scores[20:, 0], 0.1)
    assert gated["per_exit"][1]["qhat"] == gated["per_exit"][2]["qhat"] == conformal_threshold(scores[:20, 1], 0.1)
    assert clean["settings"]["gated_fallback_exits"] == [1, 2]
    with pytest.warns(UserWarning):
        general = eedn.create("evaluator", "conformal", methods=["lac"], fallback="general").evaluate(
            test, cal, exit_test, exit_cal)
    assert row(general, 0.1, "lac", "gated")["per_exit"][2]["qhat"] == conformal_threshold(gated_scores, 0.1)

    # paper-compat: the official rule, "more than 20" exited samples, else every cal sample's IM_l score
    with pytest.warns(UserWarning, match="official rule"):
        compat = eedn.create("evaluator", "conformal", methods=["lac"], profile="paper-compat").evaluate(
            test, cal, exit_test, exit_cal)
    per_exit = row(compat, 0.1, "lac", "gated")["per_exit"]
    assert [(e["calibrated_on"], e["cal_count"]) for e in per_exit] == [("exited", 280), ("all", 300), ("all", 300)]
    assert per_exit[2]["qhat"] == conformal_threshold(scores[:, 2], 0.1)
    assert compat["settings"]["min_per_exit"] == 21 and compat["settings"]["fallback"] == "im_scores"
    strict = eedn.create("evaluator", "conformal", methods=["lac"], variants=["gated_strict", "gated_all"]).evaluate(
        test, cal, exit_test, exit_cal)
    assert row(strict, 0.1, "lac", "gated_strict")["per_exit"][2]["qhat"] == pytest.approx(0.9)
    assert [e["cal_count"] for e in row(strict, 0.1, "lac", "gated_all")["per_exit"]] == [300] * 3


def test_merged_exit_groups():
    assert merged_exit_groups([30, 5, 10, 25, 3], 20) == [[0], [1, 2, 3, 4]]
    assert merged_exit_groups([30, 5, 15, 25, 30], 20) == [[0], [1, 2], [3], [4]]
    assert merged_exit_groups([3, 4, 5], 20) == [[0, 1, 2]]
    assert merged_exit_groups([0, 0, 0], 0) == [[0], [1], [2]]


def two_populations(n: int, seed: int, hard: float = 0.1, num_classes: int = 5) -> ExitOutputs:
    """Easy samples (strong true-class logit at every exit) and a ``hard`` share with almost none."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, num_classes, (n,), generator=g)
    strength = torch.where(torch.rand(n, generator=g) < hard, 0.3, 5.0).double()
    onehot = torch.nn.functional.one_hot(y, num_classes).double()
    logits = torch.stack([strength[:, None] * onehot * (1 + 0.2 * l)
                          + torch.randn(n, num_classes, generator=g, dtype=torch.float64) for l in range(3)], 1)
    return ExitOutputs(logits.float(), y, torch.zeros(n, 2), torch.arange(1.0, 4.0), 3.0)


@pytest.mark.filterwarnings("ignore:conformal gated")
def test_gated_marginal_coverage_over_random_splits():
    """A confident-exit policy sends the hard 15 % to exits 1-2, each short of 20 of the 150 cal samples. Over 60
    random cal/test splits the clean fallback (merge) keeps the marginal coverage at 1 - α; the official fallback
    (every cal sample's IM score there) under-covers, as reported for the README's default run (0.833 at α = 0.1)."""
    pool = two_populations(4000, seed=3)
    exits = confidence_policy(pool, threshold=0.8)
    shares = torch.bincount(exits, minlength=3) / 4000
    assert shares[0] > 0.8 and shares[1:].sum() > 0.12
    evaluators = {profile: eedn.create("evaluator", "conformal", alphas=[0.1], methods=["lac"], variants=["gated"],
                                       profile=profile) for profile in ("clean", "paper-compat")}
    coverage: dict[str, list[float]] = {profile: [] for profile in evaluators}
    generator = torch.Generator().manual_seed(0)
    for _ in range(60):
        perm = torch.randperm(4000, generator=generator)
        cal_i, test_i = perm[:150], perm[150:1150]
        for profile, evaluator in evaluators.items():
            metrics = evaluator.evaluate(pool.subset(test_i), pool.subset(cal_i), exits[test_i], exits[cal_i])
            coverage[profile].append(metrics["results"][0]["coverage"])
    mean = {profile: sum(v) / len(v) for profile, v in coverage.items()}
    assert mean["clean"] >= 0.9 - 0.01  # split-conformal guarantee (its mean), up to the sampling error
    assert mean["paper-compat"] < 0.86


def test_general_and_gated_differ_as_computed_by_hand():
    # cal: 20 samples leave at exit 0 with p_y = 0.9 (LAC score 0.1), 20 leave at exit 1 with p_y = 0.4 (score 0.6)
    cal = crafted([[0.9, 0.05, 0.03, 0.02]] * 20 + [[0.4, 0.3, 0.2, 0.1]] * 20, [0] * 40)
    exit_cal = torch.tensor([0] * 20 + [1] * 20)
    # test: A leaves at 0 with p = (0.85, 0.1, ...), label 0; B leaves at 1 with p = (0.45, 0.42, ...), label 1
    test = crafted([[0.85, 0.1, 0.03, 0.02], [0.45, 0.42, 0.1, 0.03]], [0, 1])
    exit_test = torch.tensor([0, 1])
    metrics = eedn.create("evaluator", "conformal", alphas=[0.1], methods=["lac"]).evaluate(
        test, cal, exit_test, exit_cal)
    general, gated = row(metrics, 0.1, "lac", "general"), row(metrics, 0.1, "lac", "gated")
    # general: k = ceil(41 * 0.9) = 37 -> q̂ = 0.6, sets {p >= 0.4}: A {0} (covered), B {0, 1} (covered)
    assert general["qhat"] == pytest.approx(0.6)
    assert (general["coverage"], general["mean_set_size"]) == (1.0, 1.5)
    # gated: exit 0 k = ceil(21 * 0.9) = 19 -> q̂_0 = 0.1 (A's set {p >= 0.9} is empty); exit 1 q̂_1 = 0.6
    assert [e["qhat"] for e in gated["per_exit"]] == pytest.approx([0.1, 0.6])
    assert (gated["coverage"], gated["mean_set_size"]) == (0.5, 1.0)
    assert [(e["count"], e["coverage"], e["mean_set_size"]) for e in gated["per_exit"]] == [(1, 0.0, 0.0),
                                                                                           (1, 1.0, 2.0)]
    flat = eedn.create("evaluator", "conformal").rows(metrics)
    assert flat == [{"alpha": 0.1, "method": "lac", "variant": v, "coverage": c, "mean_set_size": s}
                    for v, c, s in (("general", 1.0, 1.5), ("gated", 0.5, 1.0))]


def test_too_few_calibration_samples_give_full_sets():
    cal, test = exchangeable_outputs(5, seed=6), exchangeable_outputs(50, seed=7)
    evaluator = eedn.create("evaluator", "conformal")
    metrics = evaluator.evaluate(test, cal, confidence_policy(test), confidence_policy(cal))
    assert len(evaluator.rows(metrics)) == 3 * 3 * 2
    for r in metrics["results"]:  # k = ceil(6 (1 - α)) = 6 > 5 for every default α
        assert (r["coverage"], r["mean_set_size"]) == (1.0, 6.0)
    json.dumps(metrics, allow_nan=False)


def test_randomized_aps_is_seeded():
    cal, test = exchangeable_outputs(300, seed=8), exchangeable_outputs(300, seed=9)
    args = (test, cal, confidence_policy(test), confidence_policy(cal))

    def run(seed):
        return eedn.create("evaluator", "conformal", methods=["aps"], randomized=True, seed=seed).evaluate(*args)

    assert run(1) == run(1)
    rows = eedn.create("evaluator", "conformal").rows
    assert rows(run(1)) != rows(run(2))


def test_bad_options_are_user_errors():
    with pytest.raises(EednError, match="alpha"):
        eedn.create("evaluator", "conformal", alphas=[0.0])
    with pytest.raises(EednError, match="method"):
        eedn.create("evaluator", "conformal", methods=["thr"])
    with pytest.raises(EednError, match="variant"):
        eedn.create("evaluator", "conformal", variants=["per_exit"])
    with pytest.raises(EednError, match="unknown option.*did you mean 'alphas'.*valid: alphas, methods, variants"):
        eedn.create("evaluator", "conformal", alpha=0.1)
    with pytest.raises(EednError, match="alpha"):
        eedn.create("evaluator", "conformal", headline_alpha=1.0)
    with pytest.raises(EednError, match="headline_method"):
        eedn.create("evaluator", "conformal", headline_method="thr")
    coerced = eedn.create("evaluator", "conformal", alphas="0.02,0.2", methods="lac,aps", randomized="true")
    assert (coerced.alphas, coerced.methods, coerced.randomized) == ([0.02, 0.2], ["lac", "aps"], True)
    cal = exchangeable_outputs(10, num_exits=2, seed=10)
    test = exchangeable_outputs(10, num_exits=3, seed=11)
    with pytest.raises(EednError, match="exits"):
        eedn.create("evaluator", "conformal").evaluate(test, cal, torch.zeros(10, dtype=torch.long),
                                                       torch.zeros(10, dtype=torch.long))


def test_headline_is_the_declared_setting_and_rows_are_flat():
    cal, test = exchangeable_outputs(300, seed=14), exchangeable_outputs(200, seed=15)
    args = (test, cal, confidence_policy(test), confidence_policy(cal))
    evaluator = eedn.create("evaluator", "conformal")
    metrics = evaluator.evaluate(*args)
    shown = evaluator.headline_metrics()
    assert set(shown) == {"set_size", "coverage"}
    assert shown["set_size"].label == "mean conformal set size (LAC, α = 0.05, general q̂)"
    assert shown["set_size"].lower_is_better and not shown["coverage"].lower_is_better
    assert shown["coverage"].scale == 100
    lac = row(metrics, 0.05, "lac", "general")
    assert evaluator.headline(metrics) == {"set_size": lac["mean_set_size"], "coverage": lac["coverage"]}
    rows = evaluator.rows(metrics)
    assert len(rows) == 3 * 3 * 2 and set(rows[0]) == {"alpha", "method", "variant", "coverage", "mean_set_size"}
    assert rows[0] == {k: metrics["results"][0][k] for k in rows[0]}

    # another headline choice, not among the rows: computed as well, and equal to a run that lists it
    other = eedn.create("evaluator", "conformal", alphas=[0.1], methods=["lac"], headline_alpha=0.2,
                        headline_method="aps", headline_variant="gated")
    assert other.headline_metrics()["set_size"].label == "mean conformal set size (APS, α = 0.2, gated q̂)"
    got = other.evaluate(*args)
    assert [(r["alpha"], r["method"]) for r in got["results"]] == [(0.1, "lac"), (0.1, "lac")]
    listed = eedn.create("evaluator", "conformal", alphas=[0.2], methods=["aps"]).evaluate(*args)
    full = row(listed, 0.2, "aps", "gated")
    assert other.headline(got) == {"set_size": full["mean_set_size"], "coverage": full["coverage"]}
