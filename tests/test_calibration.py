"""Calibration evaluator: ECE binning against torchmetrics / sklearn, NLL, Brier, temperature scaling, the evaluator."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import eedn
from eedn.runtime.errors import EednError
from eedn.core.outputs import ExitOutputs
from eedn_plugins.calibration import (
    bin_edges,
    bin_indices,
    brier_score,
    calibration_bins,
    calibration_metrics,
    compat_batches,
    confidence_and_correct,
    expected_calibration_error,
    fit_temperature,
    maximum_calibration_error,
    negative_log_likelihood,
    per_batch_quantile_ece,
)


def synthetic(n: int, num_classes: int = 10, scale: float = 2.0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits whose softmax *is* the label distribution (perfectly calibrated), and labels drawn from it."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, num_classes, generator=g, dtype=torch.float64) * scale
    labels = torch.multinomial(logits.softmax(-1), 1, generator=g).squeeze(1)
    return logits, labels


def numpy_quantile_ece(conf: np.ndarray, correct: np.ndarray, n_bins: int = 15) -> float:
    """Independent reference: sklearn's quantile binning (percentile edges, searchsorted on interior edges)."""
    edges = np.percentile(conf, np.linspace(0, 1, n_bins + 1) * 100)
    ids = np.searchsorted(edges[1:-1], conf)
    count = np.bincount(ids, minlength=n_bins)
    acc = np.bincount(ids, weights=correct, minlength=n_bins)
    mean_conf = np.bincount(ids, weights=conf, minlength=n_bins)
    keep = count > 0
    return float(np.sum(np.abs(acc[keep] - mean_conf[keep])) / len(conf))


# ------------------------------------------------------------------------------------------------------- binning


def test_bins_are_left_open_right_closed_and_one_lands_in_the_last_bin():
    edges = bin_edges(torch.zeros(0), 15, "width")
    assert torch.equal(bin_indices(edges[1:]), torch.arange(15))  # an upper edge belongs to its bin
    assert torch.equal(bin_indices(edges[1:-1] + 1e-12), torch.arange(1, 15))  # just above: the next bin
    assert bin_indices(torch.tensor([0.0, 1.0])).tolist() == [0, 14]
    # hand computation: 1.0, 1.0 and 0.95 share the last bin (14/15, 1]; 0.5 sits alone in bin 7
    conf = torch.tensor([1.0, 1.0, 0.95, 0.5], dtype=torch.float64)
    correct = torch.tensor([True, False, True, True])
    expected = 0.75 * abs(2 / 3 - 2.95 / 3) + 0.25 * 0.5
    assert expected_calibration_error(conf, correct) == pytest.approx(expected, abs=1e-12)
    assert maximum_calibration_error(conf, correct) == pytest.approx(0.5, abs=1e-12)


def test_equal_width_ece_and_mce_match_torchmetrics():
    from torchmetrics.functional.classification import multiclass_calibration_error

    logits, labels = synthetic(3000, 10, scale=3.0, seed=1)
    logits = logits * 1.7  # over-confident, so the ECE is far from zero
    conf, correct = confidence_and_correct(logits, labels)
    probs = logits.softmax(-1).float()
    # torchmetrics bins are [lo, hi) and put a confidence of exactly 1.0 in an extra bin; no confidence here sits on
    # an edge or at 1.0, so both conventions give the same bins and only float32 rounding differs.
    assert conf.max() < 1.0
    ours = expected_calibration_error(conf, correct, 15, "width")
    oracle = float(multiclass_calibration_error(probs, labels, num_classes=10, n_bins=15, norm="l1"))
    assert ours > 0.05
    assert ours == pytest.approx(oracle, abs=2e-6)
    mce = float(multiclass_calibration_error(probs, labels, num_classes=10, n_bins=15, norm="max"))
    assert maximum_calibration_error(conf, correct) == pytest.approx(mce, abs=2e-6)


def test_equal_mass_bins_match_sklearn_quantile_curve():
    from sklearn.calibration import calibration_curve

    for n in (600, 1001):
        logits, labels = synthetic(n, 5, scale=1.5, seed=n)
        conf, correct = confidence_and_correct(logits * 1.5, labels)
        prob_true, prob_pred = calibration_curve(correct.numpy(), conf.numpy(), n_bins=15, strategy="quantile")
        bins = calibration_bins(conf, correct, 15, "mass")
        keep = bins["count"] > 0
        np.testing.assert_allclose(bins["accuracy"][keep].numpy(), prob_true, atol=1e-12)
        np.testing.assert_allclose(bins["confidence"][keep].numpy(), prob_pred, atol=1e-12)
    # n = 15 * 40 distinct confidences: every quantile bin holds exactly 40, so ECE = mean_b |acc_b - conf_b|
    logits, labels = synthetic(600, 5, scale=1.5, seed=600)
    conf, correct = confidence_and_correct(logits * 1.5, labels)
    prob_true, prob_pred = calibration_curve(correct.numpy(), conf.numpy(), n_bins=15, strategy="quantile")
    assert len(prob_true) == 15
    assert calibration_bins(conf, correct, 15, "mass")["count"].tolist() == [40.0] * 15
    expected = float(np.mean(np.abs(prob_true - prob_pred)))
    assert expected_calibration_error(conf, correct, 15, "mass") == pytest.approx(expected, abs=1e-12)


def test_compat_ece_is_the_batch_weighted_mean_of_per_batch_quantile_ece():
    logits, labels = synthetic(130, 10, seed=3)
    conf, correct = confidence_and_correct(logits * 2.0, labels)
    c, k = conf.numpy(), correct.numpy().astype(float)
    batches = [(0, 64), (64, 128), (128, 130)]
    expected = sum((b - a) * numpy_quantile_ece(c[a:b], k[a:b]) for a, b in batches) / 130
    assert per_batch_quantile_ece(conf, correct, batch_size=64) == pytest.approx(expected, abs=1e-12)
    # with few samples per bin the per-batch estimate is biased upward against the dataset-level one
    assert per_batch_quantile_ece(conf, correct, 64) > expected_calibration_error(conf, correct, 15, "mass") - 1e-12
    with pytest.raises(EednError):
        per_batch_quantile_ece(conf, correct, batch_size=0)
    with pytest.raises(EednError, match="binning"):
        expected_calibration_error(conf, correct, 15, "quantile")


def test_quantile_edges_are_numpy_percentile_edges_on_an_official_batch_size():
    """A batch of 64 (64 - 1 divisible by 3): the 5th, 7th, 10th, 11th and 14th edges fall on samples, where
    torch.quantile and numpy.percentile round differently and move a sample across bins. eedn follows numpy, the
    official code's (sklearn's) computation."""
    conf = torch.tensor([((i + 1) / 64) ** 2 for i in range(64)], dtype=torch.float64)
    correct = torch.tensor([(i * 7 + 1) % 3 == 0 for i in range(64)])
    percent = np.linspace(0, 1, 16) * 100
    assert np.array_equal(bin_edges(conf, 15, "mass").numpy(), np.percentile(conf.numpy(), percent))
    expected = numpy_quantile_ece(conf.numpy(), correct.numpy().astype(float))
    assert expected == pytest.approx(0.265831, abs=1e-6)  # torch.quantile edges gave 0.253426
    assert expected_calibration_error(conf, correct, 15, "mass") == pytest.approx(expected, abs=1e-12)
    assert per_batch_quantile_ece(conf, correct, batch_size=64) == pytest.approx(expected, abs=1e-12)


def test_compat_ece_reads_the_official_test_loader_batches():
    """The official test loader: 10 consecutive chunks (numpy.array_split), each in a random order, batches of 64
    within a chunk; the ECE is the batch-size weighted mean of the per-batch quantile ECEs."""
    batches = compat_batches(1000, 64, chunks=10, seed=3)
    assert [len(b) for b in batches] == [64, 36] * 10  # chunks of 100
    for c in range(10):
        chunk = torch.cat(batches[2 * c:2 * c + 2])
        assert sorted(chunk.tolist()) == list(range(100 * c, 100 * c + 100))
        assert chunk.tolist() != list(range(100 * c, 100 * c + 100))  # shuffled within the chunk
    assert [b.tolist() for b in compat_batches(130, 64, chunks=0)] == [list(range(64)), list(range(64, 128)),
                                                                        [128, 129]]
    assert [len(b) for b in compat_batches(23, 64, chunks=10)] == [3, 3, 3, 2, 2, 2, 2, 2, 2, 2]
    logits, labels = synthetic(1000, 10, seed=5)
    conf, correct = confidence_and_correct(logits * 2.0, labels)
    c, k = conf.numpy(), correct.numpy().astype(float)
    expected = sum(len(b) * numpy_quantile_ece(c[b.numpy()], k[b.numpy()]) for b in batches) / 1000
    assert per_batch_quantile_ece(conf, correct, 64, chunks=10, seed=3) == pytest.approx(expected, abs=1e-12)
    with pytest.raises(EednError, match="compat_chunks"):
        compat_batches(10, 64, chunks=-1)


def test_nll_and_brier_against_hand_and_sklearn():
    from sklearn.metrics import log_loss

    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]], dtype=torch.float64)
    labels = torch.tensor([0, 1])
    logits = probs.log()
    expected_brier = ((0.3**2 + 0.2**2 + 0.1**2) + (0.1**2 + 0.7**2 + 0.6**2)) / 2
    assert brier_score(logits, labels) == pytest.approx(expected_brier, abs=1e-12)
    assert negative_log_likelihood(logits, labels) == pytest.approx(
        log_loss(labels.numpy(), probs.numpy(), labels=[0, 1, 2]), abs=1e-12)
    empty = calibration_metrics(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
    assert all(v is None for v in empty.values())


# ------------------------------------------------------------------------------------------- temperature scaling


def test_temperature_scaling_recovers_a_known_temperature_and_lowers_nll():
    true_logits, labels = synthetic(3000, 10, scale=2.0, seed=4)
    over_confident = true_logits * 3.0
    cal, test = slice(0, 2000), slice(2000, 3000)
    temperature = fit_temperature(over_confident[cal], labels[cal])
    assert temperature == pytest.approx(3.0, rel=0.10)
    raw = calibration_metrics(over_confident[test], labels[test])
    scaled = calibration_metrics(over_confident[test] / temperature, labels[test])
    assert scaled["nll"] < raw["nll"] - 0.1
    assert scaled["ece"] < raw["ece"] / 2
    # the official settings without a line search (lr 0.01: 1 % of each quasi-Newton step) stop well short
    official = fit_temperature(over_confident[cal], labels[cal], line_search=None)
    assert abs(official - 3.0) > abs(temperature - 3.0)


def test_temperature_stays_positive_and_finite_on_separable_data():
    labels = torch.arange(50) % 5
    logits = F.one_hot(labels, 5).double() * 20.0  # always right and sure: NLL keeps falling as T -> 0
    temperature = fit_temperature(logits, labels)
    assert 0.0 < temperature <= 1.5 and math.isfinite(temperature)
    assert fit_temperature(torch.zeros(0, 5), torch.zeros(0, dtype=torch.long)) == 1.0


# ------------------------------------------------------------------------------------------------------ evaluator


def exit_outputs(n: int, seed: int) -> ExitOutputs:
    """Three exits of growing sharpness over the same calibrated logits."""
    true_logits, labels = synthetic(n, 6, scale=1.5, seed=seed)
    logits = torch.stack([true_logits * s for s in (0.5, 1.0, 2.5)], dim=1).float()
    return ExitOutputs(logits, labels, torch.zeros(n, 2), torch.tensor([1.0, 2.0, 3.0]), 3.0)


def test_calibration_evaluator_reports_gated_and_per_exit_metrics():
    test, cal = exit_outputs(400, seed=5), exit_outputs(600, seed=6)
    exit_test = torch.arange(400) % 3
    exit_cal = torch.zeros(600, dtype=torch.long)  # T is fitted per exit on all cal samples, whatever their exit
    evaluator = eedn.create("evaluator", "calibration")
    result = evaluator.evaluate(test, cal, exit_test, exit_cal)
    json.dumps(result, allow_nan=False)

    gated = test.gated_logits(exit_test)
    assert result["ece"] == pytest.approx(calibration_metrics(gated, test.labels)["ece"], abs=1e-12)
    assert [row["index"] for row in result["per_exit"]] == [0, 1, 2]
    for l, row in enumerate(result["per_exit"]):
        assert row["ece"] == pytest.approx(calibration_metrics(test.logits[:, l], test.labels)["ece"], abs=1e-12)
        assert row["temperature"] == result["temperatures"][l]
    temps = torch.tensor(result["temperatures"], dtype=torch.float64)
    # the exits were built as the calibrated logits x 0.5, x 1 and x 2.5: TS should find about those factors
    assert temps.tolist() == pytest.approx([0.5, 1.0, 2.5], rel=0.15)
    scaled_nll = F.cross_entropy(gated.double() / temps[exit_test][:, None], test.labels).item()
    assert result["scaled"]["nll"] == pytest.approx(scaled_nll, abs=1e-9)
    assert result["scaled"]["nll"] < result["nll"]
    assert result["per_exit"][2]["scaled"]["ece"] < result["per_exit"][2]["ece"]
    assert 0.0 <= result["ece_compat"] <= 1.0


def test_calibration_evaluator_rejects_bad_input():
    test = exit_outputs(20, seed=7)
    with pytest.raises(EednError, match="exit indices"):
        eedn.create("evaluator", "calibration").evaluate(test, test, torch.zeros(19, dtype=torch.long),
                                                         torch.zeros(20, dtype=torch.long))
    with pytest.raises(EednError, match="0..2"):
        eedn.create("evaluator", "calibration").evaluate(test, test, torch.full((20,), 3),
                                                         torch.zeros(20, dtype=torch.long))
    with pytest.raises(EednError, match="unknown option.*did you mean 'n_bins'.*valid: n_bins, compat_batch_size"):
        eedn.create("evaluator", "calibration", bins=10)
    with pytest.raises(EednError, match="n_bins"):
        eedn.create("evaluator", "calibration", n_bins=0)
    assert eedn.create("evaluator", "calibration", ts_line_search="none", n_bins="10").ts_options["line_search"] is None


def test_headline_is_the_gated_ece_raw_and_scaled_and_rows_are_flat():
    test, cal = exit_outputs(200, seed=10), exit_outputs(300, seed=11)
    evaluator = eedn.create("evaluator", "calibration")
    evaluator.fit(cal)
    metrics = evaluator.evaluate(test, cal, torch.arange(200) % 3, torch.zeros(300, dtype=torch.long))
    shown = evaluator.headline_metrics()
    assert set(shown) == {"ece", "ece_scaled"}
    assert shown["ece"].label == "ECE of the gated prediction (%)" and shown["ece"].scale == 100
    assert shown["ece"].lower_is_better
    assert evaluator.headline(metrics) == {"ece": metrics["ece"], "ece_scaled": metrics["scaled"]["ece"]}
    assert evaluator.headline(metrics)["ece"] != evaluator.headline(metrics)["ece_scaled"]
    rows = evaluator.rows(metrics)
    assert [r["scaling"] for r in rows] == ["none", "temperature"]
    assert rows[0]["ece"] == metrics["ece"] and rows[1]["nll"] == metrics["scaled"]["nll"]
    assert all(not isinstance(v, (dict, list)) for r in rows for v in r.values())
    json.dumps(rows, allow_nan=False)


def test_temperatures_are_fitted_once_per_trained_setting(monkeypatch):
    import eedn_plugins.calibration as calibration

    calls = []
    real = calibration.fit_exit_temperatures
    monkeypatch.setattr(calibration, "fit_exit_temperatures", lambda *a, **k: calls.append(1) or real(*a, **k))
    test, cal = exit_outputs(60, seed=8), exit_outputs(80, seed=9)
    evaluator = eedn.create("evaluator", "calibration")
    evaluator.fit(cal)
    first = []
    for exits in (torch.zeros(60, dtype=torch.long), torch.full((60,), 2)):  # two policies, same heads
        first.append(evaluator.evaluate(test, cal, exits, torch.zeros(80, dtype=torch.long))["temperatures"])
    assert len(calls) == 1 and first[0] == first[1]
    other = ExitOutputs(cal.logits * 2, cal.labels, cal.gate_scores, cal.exit_macs, cal.full_macs)
    evaluator.fit(other)  # the next trained setting
    second = evaluator.evaluate(test, other, torch.zeros(60, dtype=torch.long), torch.zeros(80, dtype=torch.long))
    assert len(calls) == 2
    assert second["temperatures"] == pytest.approx([2 * t for t in first[0]], rel=0.05)
