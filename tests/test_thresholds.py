"""Threshold and patience gates: scores, decision rule, MSDNet budget calibration on stored outputs."""
from __future__ import annotations

import math

import pytest
import torch

import eedn
from eedn.core.contracts import Gate
from eedn.runtime.errors import EednError
from eedn.core.outputs import ExitOutputs
from eedn.core.budgets import MACS_TOLERANCE, fit_thresholds, fit_thresholds_batch, geometric_shares
from eedn_plugins.thresholds import EntropyGate, MarginGate, MaxProbGate, PatienceGate


def make_outputs(n: int = 600, num_exits: int = 4, num_classes: int = 5, seed: int = 0, gate: Gate | None = None,
                 exit_macs: list[float] | None = None, full_macs: float | None = None) -> ExitOutputs:
    """Synthetic stored outputs where later exits are more accurate; gate scores by ``gate``."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    signal = torch.linspace(0.3, 3.0, num_exits)
    logits = torch.randn(n, num_exits, num_classes, generator=g)
    logits += signal[None, :, None] * torch.nn.functional.one_hot(labels, num_classes)[:, None, :].float() * 2
    gate = gate or MaxProbGate(num_exits - 1, num_classes)
    scores = torch.stack([gate.scores(l, logits[:, l]) for l in range(num_exits - 1)], dim=1)
    macs = torch.tensor(exit_macs or [10.0 * (i + 1) for i in range(num_exits)], dtype=torch.float64)
    return ExitOutputs(logits, labels, scores, macs, float(full_macs or macs[-1] - 2))


def distinct_score_outputs(n: int, g: int, seed: int = 1) -> ExitOutputs:
    """Outputs whose gate scores are distinct (a random permutation per exit)."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.stack([torch.randperm(n, generator=gen).float() / n for _ in range(g)], dim=1)
    logits = torch.randn(n, g + 1, 3, generator=gen)
    labels = torch.randint(0, 3, (n,), generator=gen)
    macs = torch.arange(1, g + 2, dtype=torch.float64)
    return ExitOutputs(logits, labels, scores, macs, float(g + 1))




# ------------------------------------------------------------------------------------------- scores
def test_registered_gate_names():
    assert {"max_prob", "entropy", "margin", "patience"} <= set(eedn.list_names("gate"))
    gate = eedn.create("gate", "entropy", 3, 10)
    assert isinstance(gate, EntropyGate) and gate.calibratable


def test_confidence_scores_match_spec_vectors():
    p = torch.tensor([[0.5, 0.3, 0.2], [0.7, 0.2, 0.1]])
    logits = p.log()
    assert torch.allclose(MaxProbGate(1, 3).scores(0, logits), torch.tensor([0.5, 0.7]), atol=1e-6)
    assert torch.allclose(EntropyGate(1, 3).scores(0, logits), -torch.tensor([1.029653, 0.801819]), atol=1e-6)
    assert torch.allclose(MarginGate(1, 3).scores(0, logits), torch.tensor([0.2, 0.5]), atol=1e-6)
    # one-hot-like logits: entropy 0 is the most confident possible score (0·ln 0 = 0, no NaN)
    sure = torch.tensor([[0.0, -1e4, -1e4]])
    assert float(EntropyGate(1, 3).scores(0, sure)) == pytest.approx(0.0, abs=1e-6)


def test_uncalibrated_threshold_gate_never_exits_early_and_thresholds_are_in_state_dict():
    gate = MaxProbGate(3, 4)
    scores = torch.rand(20, 3)
    assert torch.equal(gate.decide(scores), torch.full((20,), 3))
    assert "thresholds" in gate.state_dict()
    other = MaxProbGate(3, 4)
    gate.thresholds.copy_(torch.tensor([0.9, 0.8, 0.7], dtype=torch.float64))
    other.load_state_dict(gate.state_dict())
    assert torch.equal(other.thresholds, gate.thresholds)


@pytest.mark.parametrize("cls", [MaxProbGate, EntropyGate, MarginGate])
def test_threshold_decide_equals_exits_at_loop(cls):
    gen = torch.Generator().manual_seed(3)
    scores = (torch.rand(500, 4, generator=gen) * 10).round() / 10  # many ties with the thresholds
    gate = cls(4, 5, thresholds=[0.9, 0.5, 0.7, 0.3])
    loop = Gate.decide(gate, scores)
    assert torch.equal(gate.decide(scores), loop)
    assert set(loop.tolist()) == {0, 1, 2, 3, 4}


def test_exits_at_is_causal_and_reads_only_the_prefix():
    gate = MaxProbGate(3, 4, thresholds=[0.9, 0.5, 0.7])
    prefix = torch.tensor([[0.95, 0.1], [0.1, 0.5], [0.1, 0.49]])
    assert gate.exits_at(prefix).tolist() == [False, True, False]  # column 1 vs threshold 0.5


# ------------------------------------------------------------------------------------ budget shares
def test_geometric_shares_spec_examples():
    official = geometric_shares(39, 6, divisor=15, include_final=False)
    recommended = geometric_shares(39, 6, divisor=15, include_final=True)
    assert official[:6].tolist() == pytest.approx([0.005, 0.014, 0.035, 0.091, 0.237, 0.617], abs=6e-4)
    assert float(official[6]) == 0.0
    assert recommended.tolist() == pytest.approx([0.002, 0.005, 0.013, 0.035, 0.091, 0.237, 0.616], abs=6e-4)
    assert geometric_shares(15, 6, 15, include_final=False)[:6].tolist() == pytest.approx([1 / 6] * 6)
    assert geometric_shares(15, 6, 15, include_final=True).tolist() == pytest.approx([1 / 7] * 7)
    assert geometric_shares(20, 6, 20).tolist() == pytest.approx([1 / 7] * 7)  # MSDNet divisor
    assert float(geometric_shares(1000, 13, 15).sum()) == pytest.approx(1.0)  # no overflow


@pytest.mark.parametrize("shares", [[0.1, 0.2, 0.3, 0.15, 0.25], [0.0, 0.5, 0.0, 0.3, 0.2], [0.07, 0.29, 0.33, 0.01, 0.3]])
def test_calibration_hits_requested_exit_shares(shares):
    val = distinct_score_outputs(n=1000, g=4)
    gate = MaxProbGate(4, 3)
    gate.calibrate(val, {"exit_shares": shares})
    counts = torch.bincount(gate.decide(val.gate_scores), minlength=5)
    for k in range(4):
        assert abs(int(counts[k]) - 1000 * shares[k]) <= 1
        assert int(counts[k]) == math.floor(1000 * shares[k] + 1e-9)  # exactly floor(n·f_k) with distinct scores
    assert int(counts.sum()) == 1000
    if shares[0] == 0.0:
        assert math.isinf(float(gate.thresholds[0]))


def test_p_budget_matches_geometric_shares_and_official_variant_starves_final_exit():
    val = distinct_score_outputs(n=700, g=6)
    gate = MaxProbGate(6, 3, divisor=15, include_final=False)
    gate.calibrate(val, {"p": 39})
    counts = torch.bincount(gate.decide(val.gate_scores), minlength=7)
    expected = geometric_shares(39, 6, 15, include_final=False)
    assert counts[:6].tolist() == [math.floor(700 * float(f) + 1e-9) for f in expected[:6]]
    assert int(counts[6]) <= 6  # only the floor left-overs reach the final exit
    rec = MaxProbGate(6, 3, divisor=15)
    rec.calibrate(val, {"p": 39})
    assert int(torch.bincount(rec.decide(val.gate_scores), minlength=7)[6]) >= math.floor(700 * 0.616)


def test_fit_thresholds_greedy_on_hand_example():
    # 4 samples, 2 IMs; shares 1/4 each: exit 0 takes the top score 0.9; exit 1 takes the top of the rest
    scores = torch.tensor([[0.9, 0.1], [0.5, 0.8], [0.4, 0.95], [0.3, 0.2]])
    th = fit_thresholds(scores, torch.tensor([0.25, 0.25, 0.5], dtype=torch.float64))
    assert th.tolist() == [0.8999999761581421, 0.949999988079071]
    gate = MaxProbGate(2, 3)
    gate.thresholds.copy_(th)
    assert gate.decide(scores).tolist() == [0, 2, 1, 2]


def _greedy_fit_reference(scores: torch.Tensor, shares: list[float]) -> list[float]:
    """The greedy MSDNet fit written as plainly as possible, sample by sample."""
    n, g = scores.shape
    thresholds, running = [math.inf] * g, [True] * n
    for k in range(g):
        m = math.floor(n * shares[k] + 1e-9)
        remaining = sorted((float(scores[i, k]) for i in range(n) if running[i]), reverse=True)
        if m == 0 or not remaining:
            continue
        thresholds[k] = remaining[min(m, len(remaining)) - 1]
        for i in range(n):
            if running[i] and float(scores[i, k]) >= thresholds[k]:
                running[i] = False
    return thresholds


def _official_fit_reference(scores: torch.Tensor, shares: list[float]) -> list[float]:
    """The official code's fit: T_k starts "infinite" and is set only when the m-th running sample is reached."""
    n, g = scores.shape
    thresholds, filtered = [math.inf] * g, [0] * n
    for k in range(g):
        out_n, count = math.floor(n * shares[k] + 1e-9), 0
        for i in sorted(range(n), key=lambda i: -float(scores[i, k])):
            if filtered[i] == 0:
                count += 1
                if count == out_n:
                    thresholds[k] = float(scores[i, k])
                    break
        filtered = [f + (float(scores[i, k]) >= thresholds[k]) for i, f in enumerate(filtered)]
    return thresholds


def test_short_share_after_ties_official_none_and_eedn_rest():
    """Three tied top scores at exit 0 (share 1/4) all exit, leaving one sample for exit 1's share of 2: the
    official fit leaves T_1 = +inf (it reaches the final head), eedn's default lets it exit at 1."""
    scores = torch.tensor([[0.9, 0.3], [0.9, 0.2], [0.9, 0.6], [0.1, 0.5]], dtype=torch.float64)
    shares = torch.tensor([0.25, 0.5, 0.25], dtype=torch.float64)
    assert fit_thresholds(scores, shares, "none").tolist() == [0.9, math.inf] == _official_fit_reference(
        scores, shares.tolist())
    assert fit_thresholds(scores, shares).tolist() == [0.9, 0.5]
    for short_share, exits in (("none", [0, 0, 0, 2]), ("rest", [0, 0, 0, 1])):
        gate = MaxProbGate(2, 3, short_share=short_share)
        gate.thresholds.copy_(fit_thresholds(scores, shares, short_share))
        assert gate.decide(scores).tolist() == exits
        assert gate.describe()["short_share"] == short_share
    with pytest.raises(EednError, match="short_share"):
        fit_thresholds(scores, shares, "all")


@pytest.mark.parametrize("seed", range(12))
def test_batched_fit_equals_plain_greedy_fit_with_ties(seed):
    gen = torch.Generator().manual_seed(seed)
    n, g = int(torch.randint(1, 60, (1,), generator=gen)), int(torch.randint(1, 5, (1,), generator=gen))
    scores = (torch.rand(n, g, generator=gen, dtype=torch.float64) * 5).round() / 5  # heavy ties
    shares = torch.rand(4, g + 1, generator=gen, dtype=torch.float64)
    shares /= shares.sum(1, keepdim=True)
    fitted = fit_thresholds_batch(scores, shares)
    official = fit_thresholds_batch(scores, shares, "none")
    for i in range(4):
        assert fitted[i].tolist() == _greedy_fit_reference(scores, shares[i].tolist())
        assert official[i].tolist() == _official_fit_reference(scores, shares[i].tolist())


def test_budget_sweep_and_options():
    gate = MaxProbGate(6, 10, divisor=20, include_final=False)
    sweep = gate.budget_sweep()
    assert len(sweep) == 39 and sweep[0] == {"p": 1, "divisor": 20.0, "include_final": False}
    assert sweep[-1]["p"] == 39
    val = make_outputs(num_exits=7, num_classes=10)
    fractions = []
    for target in sweep[::6]:
        gate.calibrate(val, target)
        fractions.append(val.summarize(gate.decide(val.gate_scores))["macs_fraction"])
    assert fractions == sorted(fractions)  # a larger p pushes samples later: cost grows
    with pytest.raises(EednError, match="did you mean 'divisor'.*valid: divisor, include_final, thresholds") as err:
        eedn.create("gate", "max_prob", 2, 3, divsor=20)
    assert "\n" not in str(err.value)
    with pytest.raises(EednError, match="unknown option"):
        MaxProbGate(2, 3, divsor=20)
    with pytest.raises(EednError, match="divisor"):
        MaxProbGate(2, 3, divisor=-1)
    with pytest.raises(EednError, match="invalid divisor=0; expected a number > 0"):
        MaxProbGate(2, 3, divisor=0)
    coerced = eedn.create("gate", "entropy", 2, 3, divisor="20", include_final="false", thresholds="0.5,0.7")
    assert (coerced.divisor, coerced.include_final) == (20.0, False)
    assert coerced.thresholds.tolist() == [0.5, 0.7]
    with pytest.raises(EednError, match="thresholds needs 2 values"):
        MaxProbGate(2, 3, thresholds=[0.5])
    with pytest.raises(EednError, match="exactly one of"):
        gate.calibrate(val, {"budget": 0.5})
    with pytest.raises(EednError, match="exit_shares needs 7"):
        gate.calibrate(val, {"exit_shares": [0.5, 0.5]})


# ------------------------------------------------------------------------------ macs / accuracy targets
@pytest.mark.parametrize("cls", [MaxProbGate, EntropyGate, MarginGate])
@pytest.mark.parametrize("fraction", [0.45, 0.6, 0.8])
def test_macs_fraction_target_met_on_val_with_best_accuracy(cls, fraction):
    gate = cls(3, 5)
    val = make_outputs(gate=gate)
    gate.calibrate(val, {"macs_fraction": fraction})
    chosen = val.summarize(gate.decide(val.gate_scores))
    assert abs(chosen["macs_fraction"] - fraction) <= MACS_TOLERANCE  # a target, met within ±0.02
    assert gate.describe()["target"] == {"macs_fraction": fraction}
    # no point of the p sweep within the tolerance of the target is more accurate on val
    probe, compared = cls(3, 5), 0
    for target in probe.budget_sweep():
        probe.calibrate(val, target)
        s = val.summarize(probe.decide(val.gate_scores))
        if abs(s["macs_fraction"] - fraction) <= MACS_TOLERANCE:
            assert s["accuracy"] <= chosen["accuracy"] + 1e-12
            compared += 1
    assert compared >= 1  # the claim was checked against other settings, not vacuously


def test_macs_fraction_impossible_budget_is_a_clear_error():
    val = make_outputs()  # exit 0 alone costs 10 of 38
    with pytest.raises(EednError, match="cheapest reaches"):
        MaxProbGate(3, 5).calibrate(val, {"macs_fraction": 0.1})


@pytest.mark.parametrize("drop", [0.0, 0.02, 0.1, 0.3])
def test_accuracy_drop_target_is_cheapest_setting_meeting_it(drop):
    gate = MaxProbGate(3, 5)
    val = make_outputs(gate=gate)
    final_acc = float(val.exit_accuracy()[-1])
    gate.calibrate(val, {"accuracy_drop": drop})
    chosen = val.summarize(gate.decide(val.gate_scores))
    assert chosen["accuracy"] >= final_acc - drop - 1e-12
    # candidates: every setting of the p sweep and the full network (which meets any drop), so the claim is
    # never checked against an empty set (for small drops no sweep setting meets it)
    probe = MaxProbGate(3, 5)
    candidates = [val.summarize(torch.full((val.num_samples,), val.num_exits - 1))]
    for target in probe.budget_sweep():
        probe.calibrate(val, target)
        candidates.append(val.summarize(probe.decide(val.gate_scores)))
    meeting = [c["mean_macs"] for c in candidates if c["accuracy"] >= final_acc - drop - 1e-12]
    assert meeting and chosen["mean_macs"] <= min(meeting) + 1e-9
    if drop >= 0.1:
        assert chosen["macs_fraction"] < val.exit_macs[-1] / val.full_macs  # it does exit early


def test_describe_is_json_able():
    import json

    gate = MaxProbGate(3, 5)
    val = make_outputs(gate=gate)
    gate.calibrate(val, {"p": 2})
    d = json.loads(json.dumps(gate.describe(), allow_nan=False))
    assert d["score"] == "max_prob" and len(d["thresholds"]) == 3 and d["p"] == 2.0


# ------------------------------------------------------------------------------------------ patience
def _prediction_scores(preds: list[list[int]]) -> torch.Tensor:
    return torch.tensor(preds, dtype=torch.float32)


def test_patience_exits_once_k_agree_and_never_before():
    gate = PatienceGate(5, 4, k=3)
    preds = _prediction_scores([
        [1, 2, 2, 2, 0],  # exits 1..3 agree -> exit 3
        [1, 1, 2, 2, 2],  # 2..4 agree -> exit 4
        [0, 0, 0, 0, 0],  # all agree: still not before exit k-1 = 2
        [1, 2, 1, 2, 1],  # never: final head (5)
        [3, 3, 1, 1, 0],  # two in a row is not enough -> final head
    ])
    assert gate.decide(preds).tolist() == [3, 4, 2, 5, 5]
    assert torch.equal(gate.decide(preds), Gate.decide(gate, preds))
    assert gate.exits_at(preds[:, :2]).tolist() == [False] * 5  # fewer than k exits seen
    gate.calibrate(make_outputs(num_exits=6, gate=gate), {"k": 1})
    assert gate.decide(preds).tolist() == [0] * 5
    gate.calibrate(make_outputs(num_exits=6, gate=gate), {"k": 2})
    assert gate.decide(preds).tolist() == [2, 1, 1, 5, 1]


def test_patience_scores_are_predicted_classes_and_k_is_saved():
    gate = PatienceGate(2, 3, k=2)
    logits = torch.tensor([[0.1, 2.0, 0.3], [5.0, 0.0, 0.0]])
    assert gate.scores(0, logits).tolist() == [1.0, 0.0]
    assert int(gate.state_dict()["k"]) == 2
    assert gate.budget_sweep() == [{"k": 1}, {"k": 2}]
    with pytest.raises(EednError, match="invalid k=0; expected an integer >= 1"):
        PatienceGate(2, 3, k=0)
    with pytest.raises(EednError, match="positive integer"):
        gate.calibrate(make_outputs(num_exits=3, num_classes=3), {"k": 0})
    assert PatienceGate(2, 3, k="3").options.k == 3


def test_patience_macs_and_accuracy_targets():
    gate = PatienceGate(5, 5)
    val = make_outputs(num_exits=6, gate=gate)
    gate.calibrate(val, {"macs_fraction": 0.9})
    assert val.summarize(gate.decide(val.gate_scores))["macs_fraction"] <= 0.9
    gate.calibrate(val, {"accuracy_drop": 0.0})
    assert val.summarize(gate.decide(val.gate_scores))["accuracy"] >= float(val.exit_accuracy()[-1]) - 1e-12
