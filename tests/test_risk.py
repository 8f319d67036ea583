"""Risk-controlled exits: the bounds against hand-computed values, the selection rules on constructed loss
matrices, the guarantees on synthetic data with a known risk curve, the risks and knobs, and the CLI."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from eedn.evaluation import risk_bounds as rb
from eedn.cli.main import cli
from eedn.runtime.errors import EednError
from eedn.core.outputs import ExitOutputs
from eedn.core.plugins import create
from eedn.evaluation.risk import build_knob, loss_matrix, mean_macs, select
from eedn.report.risk_report import comparison_rows, comparison_table


def binom_cdf(k: int, n: int, p: float) -> float:
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1))


# ------------------------------------------------------------------------------------------------------ bounds
def test_binomial_tail_matches_the_sum_of_terms():
    assert rb.binomial_tail(2, 10, 0.3) == pytest.approx(0.7**10 + 10 * 0.3 * 0.7**9 + 45 * 0.09 * 0.7**8, rel=1e-12)
    assert rb.binomial_tail(0, 5, 0.1) == pytest.approx(0.9**5)
    assert rb.binomial_pvalue(3, 40, 0.2) == pytest.approx(binom_cdf(3, 40, 0.2), rel=1e-12)


def test_hoeffding_and_bentkus_pvalues_by_hand():
    # r = 0.1, n = 50, ε = 0.3: h1 = 0.1 ln(0.1/0.3) + 0.9 ln(0.9/0.7)
    h = 0.1 * math.log(1 / 3) + 0.9 * math.log(0.9 / 0.7)
    assert rb.hoeffding_pvalue(0.1, 50, 0.3) == pytest.approx(math.exp(-50 * h), rel=1e-12)
    assert rb.bentkus_pvalue(0.1, 50, 0.3) == pytest.approx(math.e * binom_cdf(5, 50, 0.3), rel=1e-10)
    assert rb.hb_pvalue(0.1, 50, 0.3) == pytest.approx(min(math.exp(-50 * h), math.e * binom_cdf(5, 50, 0.3)))
    # zero losses: Hoeffding gives (1 - ε)^n, Bentkus e (1 - ε)^n
    assert rb.hoeffding_pvalue(0.0, 100, 0.05) == pytest.approx(0.95**100)
    assert rb.bentkus_pvalue(0.0, 100, 0.05) == pytest.approx(math.e * 0.95**100)
    # an empirical risk above ε is no evidence: p = 1 for Hoeffding
    assert rb.hoeffding_pvalue(0.5, 100, 0.3) == 1.0


def test_ucbs_invert_their_pvalues():
    assert rb.hoeffding_ucb(0.1, 200, 0.1) == pytest.approx(0.1 + math.sqrt(math.log(10) / 400))
    ucb = rb.hb_ucb(0.1, 200, 0.1)
    assert 0.1 < ucb < rb.hoeffding_ucb(0.1, 200, 0.1)  # HB is tighter than plain Hoeffding
    assert rb.hb_pvalue(0.1, 200, ucb - 1e-6) >= 0.1 >= rb.hb_pvalue(0.1, 200, ucb + 1e-6)


def test_wsr_by_hand_on_tiny_vectors():
    # x = (0, 0), δ = 0.5: ν = 1 twice, K_2(R) = (1 + R)^2 > 2  <=>  R > sqrt(2) - 1
    assert rb.wsr_ucb(np.array([0.0, 0.0]), 0.5) == pytest.approx(math.sqrt(2) - 1, abs=1e-9)
    # x = (0, 0, 0), δ = 0.2: ν = 1 thrice (σ̂² = 0.25, 0.15625, 0.11343), K_3 = (1 + R)^3 > 5
    assert rb.wsr_ucb(np.zeros(3), 0.2) == pytest.approx(5 ** (1 / 3) - 1, abs=1e-9)
    # x = (1,): K_1(R) = R never passes 1/δ: no bound below 1
    assert rb.wsr_ucb(np.array([1.0]), 0.5) == 1.0


def test_wsr_rejects_agrees_with_its_ucb():
    rng = np.random.default_rng(0)
    x = (rng.random((4, 300)) < np.array([[0.02], [0.1], [0.3], [0.6]])).astype(float)
    for row in x:
        ucb = rb.wsr_ucb(row, 0.1)
        assert 0 < ucb <= 1
        assert rb.wsr_rejects(row[None], 0.1, min(ucb + 1e-6, 1.0))[0]
        assert not rb.wsr_rejects(row[None], 0.1, max(ucb - 1e-3, 0.0))[0]


def test_bounds_reject_bad_input():
    with pytest.raises(EednError, match="WSR needs losses in"):
        rb.wsr_ucb(np.array([1.5]), 0.1)
    with pytest.raises(EednError, match="declares binary losses"):
        select("ltt", np.array([[0.5, 0.0]]), np.array([1.0]), 0.1, 0.1, binary=True)
    with pytest.raises(EednError, match="at least one"):
        rb.hb_pvalue(0.0, 0, 0.1)


# ------------------------------------------------------------------------------------------------- selection
def losses_with_means(means: list[float], n: int = 10) -> np.ndarray:
    """``[K, n]`` binary losses, row k with ``round(means[k] n)`` ones, nested (monotone per sample)."""
    out = np.zeros((len(means), n))
    for k, m in enumerate(means):
        out[k, : round(m * n)] = 1
    return out


def test_selection_on_a_monotone_matrix():
    losses, costs = losses_with_means([0.0, 0.1, 0.3, 0.6]), np.array([4.0, 3.0, 2.0, 1.0])
    assert select("naive", losses, costs, 0.35, 0.1).index == 2
    crc = select("crc", losses, costs, 0.35, 0.1)  # n/(n+1) r + 1/(n+1): 1/11, 2/11, 4/11 > 0.35
    assert crc.index == 1 and crc.bound == pytest.approx(2 / 11)
    assert crc.certified_mask == [True, True, False, False]


def test_selection_on_a_non_monotone_matrix():
    # knob 1 is risky, knobs 2 and 3 are safe again: only the naive rule jumps over the risky one
    losses = np.zeros((4, 400))
    losses[1, :200] = 1
    costs = np.array([4.0, 3.0, 2.0, 1.0])
    assert select("naive", losses, costs, 0.1, 0.1).index == 3
    for controller in ("crc", "ucb-hb", "ucb-wsr", "ltt"):
        sel = select(controller, losses, costs, 0.1, 0.1, binary=True)
        assert sel.index == 0 and sel.certified, controller
    # CRC monotonises from the safe end: knobs 2 and 3 inherit knob 1's losses
    assert select("crc", losses, costs, 0.1, 0.1).certified_mask == [True, False, False, False]


def test_ties_in_cost_go_to_the_safer_setting():
    losses = np.zeros((3, 500))
    sel = select("ltt", losses, np.array([2.0, 1.0, 1.0]), 0.05, 0.1, binary=True)
    assert sel.index == 1 and sel.num_certified == 3


def test_no_safe_setting_falls_back_to_the_final_exit():
    losses = np.zeros((3, 5))  # 5 samples cannot certify ε = 0.01 at δ = 0.1: 0.99^5 > 0.1
    sel = select("ltt", losses, np.array([3.0, 2.0, 1.0]), 0.01, 0.1, binary=True)
    assert (sel.index, sel.certified, sel.fallback) == (0, False, True)
    assert "final exit" in sel.message and sel.to_dict()["fallback"] is True
    assert select("crc", losses, np.array([3.0, 2.0, 1.0]), 0.01, 0.1).fallback  # 1/(n+1) > ε


def test_selection_rejects_empty_grids_and_bad_levels():
    with pytest.raises(EednError, match="non-empty knob grid"):
        select("ltt", np.zeros((0, 10)), np.zeros(0), 0.1, 0.1)
    with pytest.raises(EednError, match="non-empty cal"):
        select("ltt", np.zeros((2, 0)), np.zeros(2), 0.1, 0.1)
    with pytest.raises(EednError, match="epsilon"):
        select("ltt", np.zeros((2, 5)), np.zeros(2), 1.5, 0.1)
    with pytest.raises(EednError, match="delta"):
        select("ltt", np.zeros((2, 5)), np.zeros(2), 0.1, 0.0)
    with pytest.raises(EednError, match="unknown risk controller 'ucb'"):
        select("ucb", np.zeros((2, 5)), np.zeros(2), 0.1, 0.1)
    with pytest.raises(EednError, match="declared range"):
        select("ltt", -np.ones((2, 5)), np.zeros(2), 0.1, 0.1)


# -------------------------------------------------------------------------------------- the guarantee, simulated
def test_guarantees_hold_on_a_known_risk_curve():
    """Losses 1{U < p_k} with one uniform U per sample: the true risk of knob k is p_k (rising along the knob).
    Over 300 draws of n = 400, P(p_chosen > ε) stays under δ (plus Monte-Carlo error) for ucb/ltt, E[p_chosen]
    under ε for crc, and the naive choice violates about half of the time."""
    rng = np.random.default_rng(0)
    curve = np.linspace(0.0, 0.3, 61)
    costs = np.linspace(1.0, 0.2, 61)
    eps, delta, trials = 0.1, 0.1, 300
    chosen = {c: [] for c in ("naive", "crc", "ucb-hb", "ucb-wsr", "ltt")}
    for _ in range(trials):
        losses = (rng.random(400)[None, :] < curve[:, None]).astype(float)
        for c in chosen:
            chosen[c].append(curve[select(c, losses, costs, eps, delta, binary=True).index])
    slack = 3 * math.sqrt(delta * (1 - delta) / trials)
    for c in ("ucb-hb", "ucb-wsr", "ltt"):
        assert np.mean(np.array(chosen[c]) > eps) <= delta + slack, c
    assert np.mean(chosen["crc"]) <= eps + 3 * np.std(chosen["crc"]) / math.sqrt(trials)
    assert np.mean(np.array(chosen["naive"]) > eps) > 0.3
    # and they do not give everything away: every controller exits early on most draws
    assert all(np.mean(np.array(v) > 0) > 0.9 for v in chosen.values())


# -------------------------------------------------------------------------------------------- risks and knobs
def outputs(n: int = 60, exits: int = 3, classes: int = 4, seed: int = 0) -> ExitOutputs:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, exits, classes, generator=g) * torch.arange(1, exits + 1).view(1, -1, 1)
    labels = logits[:, -1].argmax(-1)
    labels[: n // 5] = torch.randint(0, classes, (n // 5,), generator=g)
    scores = logits[:, :-1].softmax(-1).max(-1).values
    return ExitOutputs(logits, labels, scores, torch.tensor([1.0, 2.0, 3.0][:exits]), 3.0)


def test_builtin_risks_by_hand():
    logits = torch.tensor([[[2.0, 0.0], [0.0, 2.0]], [[0.0, 2.0], [0.0, 2.0]], [[2.0, 0.0], [2.0, 0.0]]])
    out = ExitOutputs(logits, torch.tensor([1, 1, 1]), torch.zeros(3, 1), torch.tensor([1.0, 2.0]), 2.0)
    # sample 0: exit 0 says 0, final 1 (right); sample 1: both right; sample 2: both 0 (wrong)
    assert create("risk", "prediction_gap").exit_losses(out).tolist() == [[1, 0], [0, 0], [0, 0]]
    assert create("risk", "accuracy_gap").exit_losses(out).tolist() == [[1, 0], [0, 0], [0, 0]]
    out.labels = torch.tensor([0, 1, 1])  # sample 0: exit right, final wrong: gap -1; clipped 0
    assert create("risk", "accuracy_gap").exit_losses(out)[0].tolist() == [-1, 0]
    clipped = create("risk", "accuracy_gap", clip=True)
    assert clipped.exit_losses(out)[0].tolist() == [0, 0] and (clipped.lower, clipped.binary) == (0.0, True)


def test_conformal_gaps_need_the_conformal_evaluator():
    out = outputs()
    risk = create("risk", "set_size_gap")
    with pytest.raises(EednError, match="needs an active evaluator that builds conformal sets"):
        risk.check({"calibration": create("evaluator", "calibration")})
    conformal = create("evaluator", "conformal", headline_alpha=0.2)
    risk.fit(out, {"conformal": conformal})
    losses = risk.exit_losses(out)
    sets = conformal.exit_sets(out, out)
    assert losses.shape == (60, 3) and float(losses[:, -1].abs().max()) == 0.0
    assert torch.allclose(losses[:, 0], (sets[:, 0].sum(-1) - sets[:, -1].sum(-1)).double() / 4)
    miss = create("risk", "miscoverage_gap")
    miss.fit(out, {"conformal": conformal})
    covered = sets[torch.arange(60), :, out.labels]  # [N, E]
    assert torch.equal(miss.exit_losses(out), (~covered).double() - (~covered[:, -1:]).double())


def test_threshold_knob_starts_safe_and_exits_more_along_the_grid():
    val, cal = outputs(seed=1), outputs(seed=2)
    gate = create("gate", "max_prob", num_exits=2, num_classes=4)
    knob = build_knob(gate, val, "auto", grid_size=20)
    assert knob.name == "threshold" and knob.values[0] is None and knob.label(0) == "no early exit"
    exits = knob.exits(cal)
    assert exits.shape == (len(knob.values), 60) and bool((exits[0] == 2).all())
    assert bool((exits[1:] <= exits[:-1]).all())  # a lower shared threshold never exits later
    assert float(mean_macs(exits, cal.exit_macs)[-1]) == 1.0  # the lowest val score: everyone leaves at exit 0
    risk = create("risk", "prediction_gap")
    assert loss_matrix(risk.exit_losses(cal), exits)[0].sum() == 0


def test_budget_and_offset_knobs():
    val = outputs(seed=1)
    budget = build_knob(create("gate", "entropy", num_exits=2, num_classes=4), val, "budget")
    assert budget.name == "budget_p" and len(budget.values) == 40
    macs = mean_macs(budget.exits(val), val.exit_macs)
    assert macs[0] == 3.0 and np.all(np.diff(macs[1:]) <= 1e-12)  # ordered from the most val MACs down
    patience = build_knob(create("gate", "patience", num_exits=2, num_classes=4), val)
    assert patience.name == "budget_k"
    jei = create("gate", "jei", num_exits=2, num_classes=4)
    jei_val = ExitOutputs(val.logits, val.labels, torch.rand(60, 2, generator=torch.Generator().manual_seed(0)),
                          val.exit_macs, val.full_macs)
    offset = build_knob(jei, jei_val, "auto", grid_size=9)
    exits = offset.exits(jei_val)
    assert offset.name == "offset" and len(offset.values) == 10 and bool((exits[0] == 2).all())
    assert bool((exits[-1] == 0).all())  # b = -(lowest val gate logit): every first gate reaches 0.5
    assert float(exits[1].double().mean()) > float(exits[-1].double().mean())
    with pytest.raises(EednError, match="knob 'threshold' needs a confidence-threshold gate"):
        build_knob(jei, jei_val, "threshold")


# ------------------------------------------------------------------------------------------------ reporting, CLI
def test_comparison_rows_average_over_seeds():
    block = {"risk": {"name": "prediction_gap"}, "controller": "ltt", "epsilon": 0.05, "delta": 0.1}
    runs = {"im-only": {s: {"risk_control": block | {"chosen": {"test_risk": r, "test_accuracy": 0.9,
                                                                  "test_macs_fraction": 0.5, "fallback": s == 1}}}
                        for s, r in ((0, 0.02), (1, 0.04))},
            "jei": {0: {}}}
    rows = comparison_rows(runs)
    assert len(rows) == 1 and rows[0]["test_risk"]["mean"] == pytest.approx(0.03) and rows[0]["fallbacks"] == 1
    assert "| im-only | 0.0300 ± 0.0141 |" in "\n".join(comparison_table(rows))


RUN_ARGS = ["run", "--backbone", "resnet_tiny", "--strategy", "im-only", "--epochs", "1", "--image-size", "16",
            "--backbone-epochs", "3", "--set", "backbone_training.batch_size=64", "--set", "evaluators=[]", "--quiet"]


def test_cli_run_with_risk_control(tiny_config, tmp_path):
    out = tmp_path / "risk-run"
    res = CliRunner(env={"COLUMNS": "300"}).invoke(
        cli, RUN_ARGS + ["--cache-dir", tiny_config["cache_dir"], "--out", str(out), "--risk", "prediction_gap",
                         "--epsilon", "0.1", "--delta", "0.2", "--controller", "ucb-wsr",
                         "--set", "risk_control.epsilons=[0.05,0.1]"], terminal_width=300)
    assert res.exit_code == 0, res.output
    block = json.loads((out / "results.json").read_text())["risk_control"]
    chosen = block["chosen"]
    assert (block["epsilon"], block["delta"], block["controller"]) == (0.1, 0.2, "ucb-wsr")
    assert block["knob"]["name"] == "threshold" and block["risk"]["name"] == "prediction_gap"
    # WSR's betting bound is time-uniform (the capital may pass 1/δ before the last cal sample), so it can lie
    # below the full-sample cal risk: only the certification and the bound's level are guaranteed
    assert chosen["certified"] and 0 <= chosen["bound"] <= 0.1 and 0 <= chosen["cal_risk"] <= 1
    assert 0 <= chosen["test_risk"] <= 1 and chosen["macs_saved"] == pytest.approx(1 - chosen["test_macs_fraction"])
    assert len(block["sweep"]) == 5 * 2
    assert (out / "risk_control.png").exists() and "Risk-controlled policy" in (out / "summary.md").read_text()
    assert "risk control: prediction_gap <= ε = 0.1 with ucb-wsr" in res.stdout
    # the re-split benchmark reads the same run directory
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / "bench_risk_validity.py"
    spec = importlib.util.spec_from_file_location("bench_risk_validity", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    report = bench.main([str(out), "--resplits", "4", "--epsilons", "0.05,0.1", "--controllers", "naive,ltt",
                         "--out", str(tmp_path / "bench")])
    assert [(r["controller"], r["epsilon"]) for r in report["rows"]] == [("naive", 0.05), ("naive", 0.1),
                                                                         ("ltt", 0.05), ("ltt", 0.1)]
    assert all(0 <= r["violation"] <= 1 and 0 <= r["mean_risk"] <= 1 for r in report["rows"])
    assert report["n_cal"] == block["n_cal"] and (tmp_path / "bench" / "risk_validity.png").exists()


def test_cli_risk_errors_are_one_line_before_training(tiny_config, tmp_path):
    base = RUN_ARGS + ["--cache-dir", tiny_config["cache_dir"], "--out", str(tmp_path / "x")]
    for extra, message in ((["--risk", "nope"], "unknown risk 'nope'; known: accuracy_gap"),
                           (["--risk", "prediction_gap", "--controller", "ucb"], "unknown risk controller 'ucb'"),
                           (["--risk", "prediction_gap", "--epsilon", "2"], "epsilon must lie strictly inside"),
                           (["--risk", "set_size_gap"], "needs an active evaluator"),
                           (["--risk", "prediction_gap", "--set", "risk_control.epsilons=[]"],
                            "risk_control.epsilons must be a non-empty list")):
        res = CliRunner().invoke(cli, base + extra)
        assert res.exit_code == 1 and message in res.stderr, (extra, res.output)
        assert len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_cli_compare_puts_the_risk_controlled_policy_beside_the_others(tiny_config, tmp_path):
    out = tmp_path / "risk-compare"
    args = ["compare", "--strategies", "im-only", "--backbone", "resnet_tiny", "--epochs", "1", "--image-size", "16",
            "--backbone-epochs", "3", "--set", "backbone_training.batch_size=64", "--set", "evaluators=[]", "--quiet",
            "--cache-dir", tiny_config["cache_dir"], "--out", str(out), "--risk", "accuracy_gap", "--epsilon", "0.1",
            "--controller", "crc"]
    res = CliRunner(env={"COLUMNS": "300"}).invoke(cli, args, terminal_width=300)
    assert res.exit_code == 0, res.output
    rows = json.loads((out / "comparison.json").read_text())["risk_control"]
    assert [(r["strategy"], r["risk"], r["controller"], r["seeds"]) for r in rows] == [("im-only", "accuracy_gap",
                                                                                        "crc", 1)]
    assert "## Risk-controlled policies" in (out / "comparison.md").read_text()
    assert "| im-only |" in res.stdout
