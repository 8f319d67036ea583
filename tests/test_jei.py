"""JEI-DNN gate and strategy: gate statistics, the hazard exit rule, the losses and targets, options and tiny fits."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings, strategies as st
from torch import nn

from eedn.core.cache import FeatureCache
from eedn.core.contracts import Backbone, Gate, InputSpec
from eedn.core.cost import measure_exit_macs
from eedn.core.data import DataSplits, TensorImages
from eedn.runtime.errors import EednError
from eedn.train.features import FeatureSource, compute_split_outputs
from eedn.core.model import EarlyExitModel
from eedn.train.strategy import FitContext
from eedn_plugins.heads import LinearIM
from eedn_plugins.jei import JeiStrategy, _Validation
from eedn_plugins.jei_targets import (
    alternation_block,
    exit_weighted_im_loss,
    gate_bce_loss,
    gate_phase_loss,
    gate_targets,
    official_im_loss,
    pos_weights,
    pos_weights_from_counts,
    resolve_variant,
    uniform_im_loss,
    variant_targets,
)
from eedn_plugins.jei_gate import (
    JeiGate,
    capped_exit_probabilities,
    cdf_exit_probabilities,
    first_above_decision,
    hazard_exit_probabilities,
    gate_statistics,
    hazards,
    jei_exit_decision,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a shared 2-core box the spinning
    threads slow these tests down by ~50x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------------ gate statistics


def test_gate_statistics_match_worked_vectors():
    p = torch.tensor([[0.5, 0.3, 0.2], [0.7, 0.2, 0.1]], dtype=torch.float64)
    stats = gate_statistics(p.log())  # softmax(log p) = p
    expected = torch.tensor([[0.5, 1.029653, 0.2, 0.853584], [0.7, 0.801819, 0.5, 0.354829]])
    assert torch.allclose(stats.double(), expected.double(), atol=1e-6)


def test_gate_statistics_saturated_softmax_is_finite_and_detached():
    logits = torch.tensor([[1000.0, 0.0, -1000.0]], requires_grad=True)
    stats = gate_statistics(logits)
    assert torch.isfinite(stats).all()
    assert torch.allclose(stats, torch.tensor([[1.0, 0.0, 1.0, 0.0]]))  # 0·ln 0 = 0
    assert not stats.requires_grad
    gate = JeiGate(2, 3)
    gate.gate_logit(0, logits).sum().backward()
    assert logits.grad is None  # no gradient reaches the IM
    assert gate.linears[0].weight.grad is not None


def test_gate_shape_and_vectorised_scores_match_per_exit_scores():
    torch.manual_seed(0)
    gate = JeiGate(3, 5)
    assert gate.trainable and len(gate.linears) == 3
    assert all(isinstance(m, nn.Linear) and m.in_features == 4 and m.out_features == 1 for m in gate.linears)
    im_logits = torch.randn(7, 3, 5)
    per_exit = torch.stack([gate.scores(l, im_logits[:, l]) for l in range(3)], 1)
    assert torch.allclose(per_exit, torch.sigmoid(gate.gate_logits(im_logits)), atol=1e-6)
    assert ((per_exit > 0) & (per_exit < 1)).all()


# ------------------------------------------------------------------------------------ exit rule


@pytest.mark.parametrize(
    "g, probs, p_final, h, exit_index",
    [
        ([0.3, 0.4], [0.3, 0.4], 0.3, [0.3, 0.571429], 1),
        ([0.4, 0.2, 0.7, 0.1], [0.4, 0.2, 0.4, 0.0], 0.0, [0.4, 0.333333, 1.0, 0.0], 2),
        ([0.2, 0.3, 0.2], [0.2, 0.3, 0.2], 0.3, [0.2, 0.375, 0.4], 3),
    ],
    ids=["A", "B", "C"],
)
def test_exit_rule_worked_cases(g, probs, p_final, h, exit_index):
    gt = torch.tensor([g], dtype=torch.float64)
    p = capped_exit_probabilities(gt)[0]
    assert torch.allclose(p[:-1], torch.tensor(probs, dtype=torch.float64), atol=1e-6)
    assert abs(float(p[-1]) - p_final) < 1e-6
    assert torch.allclose(hazards(gt)[0], torch.tensor(h, dtype=torch.float64), atol=1e-6)
    assert int(jei_exit_decision(gt)[0]) == exit_index
    gate = JeiGate(len(g), 3)
    assert int(gate.decide(gt)[0]) == exit_index
    assert int(Gate.decide(gate, gt)[0]) == exit_index  # the base loop over exits_at agrees


def exit_decision(g: list[float]) -> int:
    """The row-by-row reference rule, in plain Python floats."""
    s, surv = 0.0, 1.0
    for l, gl in enumerate(g):
        p = max(0.0, min(gl, 1.0 - s))
        s += gl
        h = min(max(p / surv, 0.0), 1.0) if surv > 0 else 0.0
        if h >= 0.5:
            return l
        surv *= 1.0 - h
    return len(g)


def test_decide_matches_reference_on_random_scores():
    gen = torch.Generator().manual_seed(0)
    seen: set[int] = set()
    for n_gates in (1, 2, 3, 6, 13):
        for scale in (1.0, 2.0 / n_gates):  # large g (caps bind) and small g (late and final exits)
            g = scale * torch.rand(500, n_gates, generator=gen, dtype=torch.float64) ** 2
            expected = torch.tensor([exit_decision(row) for row in g.tolist()])
            gate = JeiGate(n_gates, 4)
            assert torch.equal(gate.decide(g), expected)
            assert torch.equal(Gate.decide(gate, g), expected)
            assert torch.equal(gate.decide(g.float()), Gate.decide(gate, g.float()))
            seen |= set(expected.tolist())
    assert seen == set(range(14))  # every exit occurs, so the comparison is not vacuous


def test_exits_at_is_causal():
    g = torch.rand(64, 5, dtype=torch.float64)
    gate = JeiGate(5, 3)
    for l in range(5):
        changed = g.clone()
        changed[:, l + 1 :] = torch.rand(64, 4 - l, dtype=torch.float64)
        assert torch.equal(gate.exits_at(g[:, : l + 1]), gate.exits_at(changed[:, : l + 1]))
        assert torch.equal(gate.exits_at(g[:, : l + 1]), hazards(g)[:, l] >= 0.5)


unit = st.floats(0.0, 1.0, allow_nan=False)


@settings(max_examples=150, deadline=None)
@given(st.lists(unit, min_size=1, max_size=8))
def test_exit_probabilities_are_a_distribution(g):
    p = capped_exit_probabilities(torch.tensor([g], dtype=torch.float64))[0]
    assert (p >= -1e-12).all()
    assert abs(float(p.sum()) - 1.0) < 1e-9
    assert p.shape[0] == len(g) + 1


@settings(max_examples=150, deadline=None)
@given(unit, unit, st.lists(unit, max_size=4))
def test_first_two_gates_rule(g0, g1, rest):
    assume(abs(g0 - 0.5) > 1e-9 and abs(g1 - (1 - g0) / 2) > 1e-9)  # stay off float ties
    exit_index = int(jei_exit_decision(torch.tensor([[g0, g1, *rest]], dtype=torch.float64))[0])
    assert (exit_index == 0) == (g0 >= 0.5)
    if g0 < 0.5:
        assert (exit_index == 1) == (g1 >= (1 - g0) / 2)


@settings(max_examples=150, deadline=None)
@given(st.lists(unit, min_size=1, max_size=8))
def test_running_sum_reaching_one_forces_exit(g):
    gt = torch.tensor([g], dtype=torch.float64)
    p, h, exit_index = capped_exit_probabilities(gt)[0], hazards(gt)[0], int(jei_exit_decision(gt)[0])
    running, first_full = 0.0, None
    for l, gl in enumerate(g):
        if running >= 1.0:
            assert float(p[l]) == 0.0  # later exits get nothing once the sum has reached 1
        running += gl
        if first_full is None and running >= 1.0:
            first_full = l
    if first_full is not None:
        assert exit_index <= first_full
        if exit_index == first_full:
            assert float(h[first_full]) > 1 - 1e-9
        assert exit_index < len(g)
    if exit_index == len(g):
        assert sum(g) < 1.0  # reaching the final head needs Σg < 1


# ------------------------------------------------------------------------------------ gate loss


def test_gate_targets_and_pos_weights_worked_vectors():
    costs = torch.tensor([0.25, 0.5, 0.75, 1.0])
    ce = torch.tensor([[1.2, 0.5, 0.3, 0.25]])
    best, t = gate_targets(ce, 0.5, costs)
    assert int(best) == 2 and t.tolist() == [[0.0, 0.0, 1.0]]
    best, t = gate_targets(ce, 2.0, costs)
    assert int(best) == 1 and t.tolist() == [[0.0, 1.0, 1.0]]
    assert pos_weights_from_counts(torch.tensor([0, 100, 1000]), 5000).tolist() == [5.0, 5.0, 4.0]


def test_gate_targets_ties_go_to_the_earliest_exit_and_final_means_all_zero():
    best, t = gate_targets(torch.tensor([[1.0, 1.0, 1.0], [3.0, 2.0, 0.0]]), 0.0, torch.zeros(3))
    assert best.tolist() == [0, 2]
    assert t.tolist() == [[1.0, 1.0], [0.0, 0.0]]


def test_pos_weights_exact_vs_cumulative_counts():
    best = torch.tensor([0] * 10 + [1] * 30 + [3] * 60)  # G = 3 gates, 100 val samples
    assert torch.allclose(pos_weights(best, 3, "exact"), torch.tensor([5.0, 70 / 30, 5.0]))
    assert torch.allclose(pos_weights(best, 3, "cumulative"), torch.tensor([5.0, 60 / 40, 60 / 40]))


# ------------------------------------------------------------------------------------ consistent variants


def test_first_above_rule_worked_cases():
    g = torch.tensor([[0.2, 0.6, 0.9], [0.1, 0.2, 0.3], [0.5, 0.0, 0.0]])
    assert first_above_decision(g, 0.5).tolist() == [1, 3, 0]
    assert first_above_decision(g, 0.7).tolist() == [2, 3, 3]
    # the official rule on the same scores: row 0 caps P_1 = min(0.6, 0.8) -> h_1 = 0.6 / 0.8 = 0.75 -> exit 1;
    # row 1: h = 0.1, 0.2/0.9, 0.3/0.7 -> final head; row 2: h_0 = 0.5 -> exit 0
    assert jei_exit_decision(g).tolist() == [1, 3, 0]
    cdf_reads = torch.tensor([[0.21, 0.49, 0.7, 0.9]])  # a CDF: the median of l* lies at exit 2
    assert first_above_decision(cdf_reads).tolist() == [2]
    assert jei_exit_decision(cdf_reads).tolist() == [1]  # the PMF reading exits early: h_1 = 0.49 / 0.79


def test_variant_exit_probabilities_worked_cases():
    assert torch.allclose(cdf_exit_probabilities(torch.tensor([[0.2, 0.6, 0.5]])),
                          torch.tensor([[0.2, 0.4, 0.0, 0.4]]))  # cummax keeps the CDF monotone
    assert torch.allclose(hazard_exit_probabilities(torch.tensor([[0.5, 0.5, 0.2]])),
                          torch.tensor([[0.5, 0.25, 0.05, 0.2]]))


def test_variant_targets_worked_cases():
    best = torch.tensor([0, 2, 3])  # G = 3 gates; l* = 3 is the backbone's head
    t, mask = variant_targets(best, 3, "cumulative")
    assert t.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]] and mask is None
    t, mask = variant_targets(best, 3, "hazard")
    assert t.tolist() == [[1, 0, 0], [0, 0, 1], [0, 0, 0]]
    assert mask.tolist() == [[1, 0, 0], [1, 1, 1], [1, 1, 1]]  # gate l sees only samples with l* >= l
    t, mask = variant_targets(best, 3, "onehot")
    assert t.tolist() == [[1, 0, 0], [0, 0, 1], [0, 0, 0]] and mask is None


def test_variant_pos_weights_worked_cases():
    best = torch.tensor([0] * 40 + [1] * 30 + [2] * 20 + [3] * 10)  # G = 3, N = 100
    assert torch.allclose(pos_weights(best, 3, "exact"), torch.tensor([60 / 40, 70 / 30, 80 / 20]))
    assert torch.allclose(pos_weights(best, 3, "cumulative"), torch.tensor([60 / 40, 30 / 70, 10 / 90]))
    # survivors: 100, 60, 30 samples still run at gates 0, 1, 2, of which 40, 30, 20 leave there
    assert torch.allclose(pos_weights(best, 3, "survivors"), torch.tensor([60 / 40, 30 / 30, 10 / 20]))
    nobody = torch.tensor([0] * 10 + [3] * 90)
    assert pos_weights(nobody, 3, "survivors").tolist() == [5.0, 5.0, 5.0]  # n_l = 0 -> clamp 0.1 -> cap 5
    early = torch.tensor([0] * 10 + [1] * 90)  # nobody runs past gate 1: gate 2 has no pairs, weight 0
    assert pos_weights(early, 3, "survivors").tolist() == [5.0, 0.0, 0.0]


def test_masked_gate_loss_worked_case():
    logits = torch.zeros(2, 2)  # every BCE term is ln 2
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    mask = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    # weights 2 (t=1 at gate 0), 1, 3 (t=1 at gate 1) on the three masked pairs: mean = 6 ln 2 / 3
    loss = gate_bce_loss(logits, targets, torch.tensor([2.0, 3.0]), mask)
    assert float(loss) == pytest.approx(2 * math.log(2))
    ce = torch.tensor([[1.2, 0.5, 0.3, 0.25]])  # λ = 0.5 on costs 1/4 .. 1: l* = 2
    costs = torch.tensor([0.25, 0.5, 0.75, 1.0])
    w = torch.tensor([1.0, 1.0, 4.0])
    official = gate_phase_loss(torch.zeros(1, 3), ce, 0.5, costs, w)
    assert float(official) == float(gate_bce_loss(torch.zeros(1, 3), torch.tensor([[0.0, 0.0, 1.0]]), w))
    hazard = gate_phase_loss(torch.zeros(1, 3), ce, 0.5, costs, w, "hazard")
    assert float(hazard) == pytest.approx((1 + 1 + 4) * math.log(2) / 3)  # gates 0, 1 (t=0) and 2 (t=1)


def test_variant_pairings_resolve_and_refuse_inconsistent_ones():
    assert resolve_variant(None, None, None) == {"targets": "cumulative", "exit_rule": "official",
                                                 "pos_weight_counts": "exact"}
    assert resolve_variant(None, "cdf", None)["pos_weight_counts"] == "cumulative"
    assert resolve_variant("cumulative", "cdf", "exact")["pos_weight_counts"] == "exact"
    assert resolve_variant("hazard", None, None) == {"targets": "hazard", "exit_rule": "hazard",
                                                     "pos_weight_counts": "survivors"}
    assert resolve_variant(None, "hazard", None)["targets"] == "hazard"
    assert resolve_variant("onehot", None, None) == {"targets": "onehot", "exit_rule": "official",
                                                     "pos_weight_counts": "exact"}
    for bad, fragment in ((("hazard", "official", None), "exit_rule hazard"), (("onehot", "cdf", None), "official"),
                          (("onehot", None, "cumulative"), "exact"), (("cumulative", None, "survivors"), "exact")):
        with pytest.raises(EednError, match=fragment):
            resolve_variant(*bad)


@pytest.mark.parametrize("rule", ["official", "cdf", "hazard"])
def test_gate_rules_agree_between_decide_exits_at_and_probabilities(rule):
    gate = JeiGate(4, 3, exit_rule=rule, tau=0.6)
    scores = torch.rand(200, 4, generator=torch.Generator().manual_seed(3))
    assert torch.equal(gate.decide(scores), Gate.decide(gate, scores))  # the causal loop gives the same exits
    probs = gate.exit_probabilities(scores)
    assert probs.shape == (200, 5) and torch.allclose(probs.sum(1), torch.ones(200)) and bool((probs >= -1e-7).all())
    assert gate.describe()["exit_rule"] == rule


GATE_DEFAULTS = {"gate_features": "own", "gate_model": "linear"}


def test_strategy_sets_and_records_the_gate_rule(tmp_path):
    import eedn
    from eedn.core.config import resolve_config
    from eedn.pipeline.plugin_checks import check_plugins

    s = JeiStrategy(targets="hazard", tau=0.4)
    assert s.gate_options() == {"exit_rule": "hazard", "tau": 0.4}
    model = toy_model()
    s.prepare_model(model)
    assert model.gate.options.as_dict() == {"exit_rule": "hazard", "tau": 0.4} | GATE_DEFAULTS
    cfg = resolve_config(None, ["strategy_options.exit_rule=cdf"], backbone="t2t_vit", strategy="jei")
    assert check_plugins(cfg).gate_options == {"exit_rule": "cdf", "tau": 0.5} | GATE_DEFAULTS
    cfg = resolve_config(None, ["strategy_options.exit_rule=cdf", "gate_options.exit_rule=hazard"],
                         backbone="t2t_vit", strategy="jei")
    with pytest.raises(EednError, match="strategy option"):
        check_plugins(cfg)
    assert eedn.create("strategy", "jei", **s.describe()).describe() == s.describe()


@pytest.mark.parametrize("options", [{"exit_rule": "cdf"}, {"targets": "hazard"}, {"targets": "onehot"}])
def test_variants_train_on_the_toy_task(tmp_path, options):
    model, source, result, macs = fit(tmp_path, batch_size=16, **options, **{"lambda": [0.01, 5.0]})
    assert model.gate.exit_rule == JeiStrategy(**options).options.exit_rule
    means = [mean_exit_index(model, source, state, macs) for _, state in result.settings]
    assert means[0] > means[1]  # a larger λ sends samples to earlier exits under every variant
    last = [h for h in result.history if h["phase"] == "main"][-1]
    assert all(0 <= w <= 5.0 for w in last["pos_weights"])


def test_im_training_converge_trains_heads_first_then_gates_only(tmp_path):
    model, _, result, _ = fit(tmp_path, im_training="converge", max_im_epochs=6, **{"lambda": 0.5})
    warm = [h for h in result.history if h["phase"] == "warmup"]
    main = [h for h in result.history if h["phase"] == "main"]
    assert 1 <= len(warm) <= 6 and all("val_im_loss" in h for h in warm)
    assert len(main) == 8 - 2 and all(h["im_samples"] == 0 and h["gate_samples"] > 0 for h in main)
    with pytest.raises(EednError, match="optimizers=separate"):
        JeiStrategy(im_training="converge", optimizers="shared")


# ------------------------------------------------------------------------------------ IM loss


def _probs_and_losses(n: int = 6, g: int = 4):
    gen = torch.Generator().manual_seed(1)
    scores = torch.rand(n, g, generator=gen, dtype=torch.float64)
    probs = capped_exit_probabilities(scores)[:, :g]
    losses = (torch.rand(n, g, generator=gen, dtype=torch.float64) * 3 + 0.1).requires_grad_(True)
    return probs, losses


def test_official_im_loss_gradient_is_uniform():
    probs, losses = _probs_and_losses()
    n, g = losses.shape
    official_im_loss(probs, losses).backward()
    assert torch.allclose(losses.grad, torch.full_like(losses, 1 / (n * g)), atol=1e-12, rtol=0)
    official_grad = losses.grad.clone()
    losses.grad = None
    uniform_im_loss(losses).backward()
    assert torch.allclose(losses.grad, official_grad, atol=1e-12, rtol=0)
    assert torch.allclose(official_im_loss(probs, losses), uniform_im_loss(losses))


def test_exit_weighted_im_loss_gradient_follows_exit_probabilities():
    probs, losses = _probs_and_losses()
    n, g = losses.shape
    exit_weighted_im_loss(probs, losses).backward()
    assert torch.allclose(losses.grad, probs / n, atol=1e-12)
    assert not torch.allclose(losses.grad, torch.full_like(losses, 1 / (n * g)), atol=1e-6)
    losses.grad = None
    exit_weighted_im_loss(probs, losses, renorm=True).backward()
    ratio = losses.sum(1) / ((probs * losses).sum(1) + 1e-6)
    assert torch.allclose(losses.grad, probs * ratio.detach()[:, None] / (n * g), atol=1e-12)


# ------------------------------------------------------------------------------------ options


def test_paper_compat_profile_resolves_to_the_listed_settings():
    s = JeiStrategy(profile="paper-compat")
    d = s.describe()
    expected = {"im_loss": "uniform", "gate_cost": "uniform_index", "backbone_mode": "train", "head_augment": True,
                "alternation": "batches:200", "optimizers": "shared", "warmup": "fixed",
                "pos_weight_counts": "exact", "select": "pt_compat"}
    assert {k: d[k] for k in expected} == expected
    assert s.backbone_mode == "train" and s.head_augment is True
    overridden = JeiStrategy(profile="paper-compat", optimizers="separate", head_augment="false").describe()
    assert overridden["optimizers"] == "separate" and overridden["head_augment"] is False
    clean = JeiStrategy().describe()
    assert clean["profile"] == "clean" and clean["backbone_mode"] == "eval" and clean["head_augment"] is False
    assert clean["alternation"] == "auto" and clean["optimizers"] == "separate" and clean["epochs"] == 15
    # every per-profile default is filled in; paper-compat's warm-up length depends on the dataset and backbone,
    # so fit() fills it in (test_paper_compat_warmup_length_follows_the_official_table)
    assert [k for k, v in d.items() if v is None] == ["warmup_epochs"] and None not in clean.values()


def test_recorded_options_rebuild_the_same_strategy():
    """A run records describe(); building from it again (through the registry) gives the same strategy."""
    import eedn

    for options in ({"profile": "paper-compat", "lambda": "0.1,0.5"},
                    {"optimizers": "shared", "im_training": "alternate", "epochs": "9"}):
        first = eedn.create("strategy", "jei", **options).describe()
        again = eedn.create("strategy", "jei", **first).describe()
        assert again == first


def test_per_profile_options_are_declared_without_a_default():
    import eedn

    specs = {s.name: s for s in eedn.registry("strategy").get("jei").options()}
    for name in ("optimizers", "select", "backbone_mode", "head_augment", "alternation"):
        assert specs[name].default is None and "default: per profile" in specs[name].help
    assert specs["lambda"].default == 0.5 and specs["lambda"].min == 0
    assert specs["epochs"].default == 15


def test_yaml_strings_are_coerced():
    s = JeiStrategy(lr="1e-3", head_augment="true", epochs="6", warmup_epochs="2", **{"lambda": "0.1,0.5"})
    assert (s.options.lr, s.head_augment, s.options.epochs, s.options.lambda_) == (0.001, True, 6, [0.1, 0.5])


def test_the_jei_gate_takes_only_its_rule_options():
    import eedn

    with pytest.raises(EednError, match="unknown option.*valid: exit_rule, tau") as err:
        eedn.create("gate", "jei", 3, 2, k=2)
    assert "\n" not in str(err.value)
    assert eedn.create("gate", "jei", 3, 2).options.as_dict() == {"exit_rule": "official", "tau": 0.5} | GATE_DEFAULTS


@pytest.mark.parametrize(
    "options, fragment",
    [
        ({"lambdas": 1.0}, "unknown option"),
        ({"im_loss": "weighted"}, "uniform, exit_weighted"),
        ({"alternation": "batches:0"}, "batches:N"),
        ({"alternation": "fraction:1.5"}, "fraction:F"),
        ({"lambda": "0.1,x"}, "lambda"),
        ({"lambda": -1}, "lambda"),
        ({"epochs": 3, "warmup_epochs": 3}, "warmup_epochs"),
        ({"profile": "paper"}, "clean, paper-compat"),
        ({"batch_size": 0}, "batch_size"),
        ({"im_loss_renorm": True}, "exit_weighted"),
        ({"head_augment": "maybe"}, "true or false"),
    ],
)
def test_bad_options_raise_one_line_errors(options, fragment):
    with pytest.raises(EednError) as err:
        JeiStrategy(**options)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_lambda_forms_and_alternation_blocks():
    def lam(value):
        return JeiStrategy(**{"lambda": value}).options.lambda_

    assert lam("0.01,0.5,2") == [0.01, 0.5, 2.0]
    assert lam(1) == 1.0 and lam("1e-3") == 0.001
    assert lam([3]) == [3.0]
    assert JeiStrategy(**{"lambda": "0.1,0.5"}).lambdas == [0.1, 0.5]
    assert JeiStrategy(**{"lambda": 0.2}).lambdas == [0.2]
    assert alternation_block("auto", 16) == 8
    assert alternation_block("auto", 15) == 8
    assert alternation_block("auto", 704) == 200
    assert alternation_block("auto", 1) == 1
    assert alternation_block("batches:7", 16) == 7
    assert alternation_block("fraction:0.25", 16) == 4


# ------------------------------------------------------------------------------------ tiny fits


class ToyBackbone(Backbone):
    """16 input values; exit l sees only the first 4(l+1), the head sees all, so deeper exits know more."""

    num_stages = 4

    def __init__(self):
        super().__init__()
        self.feature_dims = [4, 8, 12, 16]
        self.num_classes = 2
        self.input_spec = InputSpec(channels=1, image_size=4)
        self.mix = nn.ModuleList(nn.Linear(16, 16) for _ in range(4))
        with torch.no_grad():
            for m in self.mix:
                m.weight.copy_(torch.eye(16))
                m.bias.zero_()
        self.fc = nn.Linear(16, 2)
        with torch.no_grad():  # a good frozen head: the label is the sign of x0 + x4 + x8 + x12
            w = torch.zeros(16)
            w[[0, 4, 8, 12]] = 2.0
            self.fc.weight.copy_(torch.stack([-w, w]))
            self.fc.bias.zero_()

    def stem(self, x):
        return x.flatten(1)

    def stage(self, index, state):
        return self.mix[index](state)

    def exit_features(self, index, state):
        return state[:, : self.feature_dims[index]]

    def head(self, features):
        return self.fc(features)




def toy_data() -> DataSplits:
    gen = torch.Generator().manual_seed(123)

    def split(n):
        x = torch.randn(n, 16, generator=gen)
        y = (x[:, [0, 4, 8, 12]].sum(1) > 0).long()
        return TensorImages(x.view(n, 1, 4, 4), y)

    return DataSplits("toy", 2, train=split(640), val=split(320), cal=split(64), test=split(320))


def toy_model(seed: int = 0) -> EarlyExitModel:
    torch.manual_seed(seed)
    bb = ToyBackbone()
    return EarlyExitModel(bb, [LinearIM(d, 2) for d in bb.feature_dims[:-1]], JeiGate(3, 2))


def fit(tmp_path, cacheable: bool = True, backbone_mode: str = "eval", **options):
    model = toy_model()
    data = toy_data()
    source = FeatureSource(model, data, cache=FeatureCache(tmp_path / "cache") if cacheable else None,
                           cacheable=cacheable, backbone_mode=backbone_mode)
    exit_macs, full_macs = measure_exit_macs(model)
    ctx = FitContext(features=source, exit_macs=exit_macs, full_macs=full_macs, seed=0)
    # the alternation's tests name it: the clean profile trains the IMs to convergence first
    options = {"epochs": 8, "warmup_epochs": 2, "im_training": "alternate"} | options
    result = JeiStrategy(**options).fit(model, ctx)
    return model, source, result, (exit_macs, full_macs)


def mean_exit_index(model, source, state, macs) -> float:
    model.load_heads_state_dict(state)
    test = compute_split_outputs(model, source, "test", *macs)
    return float(model.gate.decide(test.gate_scores).float().mean())


def test_lambda_sweep_moves_exits_earlier_as_lambda_rises(tmp_path):
    # batch 16 gives the gates 20 steps an epoch (at lr 0.01 they need a few dozen to settle)
    model, source, result, macs = fit(tmp_path, batch_size=16, **{"lambda": [0.01, 0.5, 5.0]})
    assert [label for label, _ in result.settings] == ["lambda=0.01", "lambda=0.5", "lambda=5"]
    means = [mean_exit_index(model, source, state, macs) for _, state in result.settings]
    assert means[0] > means[1] > means[2]
    assert means[2] < 0.5  # a large λ routes most samples to the first exits
    assert means[0] > 1.5  # a tiny λ keeps most samples for the later exits
    main = [h for h in result.history if h["phase"] == "main"]
    assert len(main) == 3 * 6 and {h["lambda"] for h in main} == {0.01, 0.5, 5.0}
    assert all(h["gate_loss"] is not None and h["im_loss"] is not None for h in main)  # both phases every epoch
    assert len([h for h in result.history if h["phase"] == "warmup"]) == 2  # warm-up ran once for the sweep



@pytest.mark.parametrize("variant", [{}, {"im_loss": "exit_weighted", "optimizers": "shared", "select": "val_tradeoff",
                                      "alternation": "batches:3"},
                                     {"targets": "hazard", "im_loss": "exit_weighted"},
                                     {"exit_rule": "cdf", "im_training": "converge", "max_im_epochs": 3}])
def test_stacked_sweep_equals_each_lambda_alone_and_the_loop(tmp_path, variant):
    """The stacked sweep (all λ as one batched model) trains each λ as a run of that λ alone (same warm-up,
    seed and batches), and as the per-λ loop does."""
    lambdas = [0.01, 0.5, 5.0]
    _, _, stacked, _ = fit(tmp_path, batch_size=16, **variant, **{"lambda": lambdas})
    assert stacked.history[-1]["phase"] == "select"
    _, _, loop, _ = fit(tmp_path, batch_size=16, sweep="loop", **variant, **{"lambda": lambdas})
    for i, lam in enumerate(lambdas):
        _, _, alone, _ = fit(tmp_path, batch_size=16, **variant, **{"lambda": lam})
        for other in (alone.settings[0][1], loop.settings[i][1]):
            for k, v in stacked.settings[i][1].items():
                assert torch.allclose(v, other[k], rtol=0, atol=1e-6), (lam, k)
        records = [[h for h in r.history if h.get("lambda") == lam] for r in (stacked, alone)]
        assert [h["epoch"] for h in records[0]] == [h["epoch"] for h in records[1]]
        assert [h.get("val_gated_accuracy") for h in records[0]] == [h.get("val_gated_accuracy") for h in records[1]]
    assert [h.get("lambda") for h in stacked.history] == [h.get("lambda") for h in loop.history]


def test_sweep_mode_follows_the_feature_cache(tmp_path):
    model = toy_model()
    cached = FeatureSource(model, toy_data(), cache=FeatureCache(tmp_path / "c"))
    live = FeatureSource(model, toy_data(), cacheable=False, backbone_mode="train")
    ctx = {name: FitContext(features=src, exit_macs=[1, 2, 3, 4], full_macs=4) for name, src in
           (("cached", cached), ("live", live))}
    assert JeiStrategy().stacks_sweep(ctx["cached"]) and not JeiStrategy().stacks_sweep(ctx["live"])
    assert not JeiStrategy(head_augment=True).stacks_sweep(ctx["cached"])
    assert JeiStrategy(sweep="stacked").stacks_sweep(ctx["live"]) and not JeiStrategy(sweep="loop").stacks_sweep(
        ctx["cached"])


def test_cached_and_uncached_training_agree(tmp_path):
    _, source_c, cached, _ = fit(tmp_path, cacheable=True, **{"lambda": 1.0})
    _, source_u, live, _ = fit(tmp_path, cacheable=False, **{"lambda": 1.0})
    assert source_c.cache.misses > 0 and source_u.cache is None
    for k, v in cached.settings[0][1].items():
        assert torch.allclose(v, live.settings[0][1][k], atol=1e-5), k


def test_variants_train_and_record_history(tmp_path):
    _, _, shared, _ = fit(tmp_path, optimizers="shared", im_loss="exit_weighted", im_loss_renorm=True,
                          select="val_tradeoff", pos_weight_counts="cumulative", gate_cost="measured",
                          alternation="batches:3", **{"lambda": 0.3})
    _, _, separate, _ = fit(tmp_path, im_loss="exit_weighted", im_loss_renorm=True, select="last",
                            pos_weight_counts="cumulative", gate_cost="measured", alternation="batches:3",
                            **{"lambda": 0.3})
    assert any(not torch.allclose(v, separate.settings[0][1][k]) for k, v in shared.settings[0][1].items())
    chosen = [h for h in shared.history if h["phase"] == "select"][0]
    assert chosen["select"] == "val_tradeoff" and 2 <= chosen["epoch"] <= 7
    last = [h for h in shared.history if h["phase"] == "main"][-1]
    assert set(last) >= {"val_gated_accuracy", "val_mean_cost", "pos_weights", "gate_loss", "im_loss", "lambda"}
    assert 0.0 <= last["val_gated_accuracy"] <= 1.0 and all(w <= 5.0 for w in last["pos_weights"])
    # the cosine schedule steps only after post-warm-up epochs: the first main epoch still runs at lr 0.01
    first = [h for h in shared.history if h["phase"] == "main"][0]
    assert first["lr_ims"] == pytest.approx(0.01) and last["lr_ims"] < 0.01


def test_early_stop_warmup_and_paper_compat_run(tmp_path):
    _, _, early, _ = fit(tmp_path, warmup="early_stop", max_warmup_epochs=4, epochs=6, **{"lambda": 0.5})
    warm = [h for h in early.history if h["phase"] == "warmup"]
    main = [h for h in early.history if h["phase"] == "main"]
    assert 1 <= len(warm) <= 4 and len(warm) + len(main) == 6
    assert all("frozen" in h for h in warm)
    model, _, compat, _ = fit(tmp_path, cacheable=False, backbone_mode="train", profile="paper-compat",
                              epochs=3, **{"lambda": 0.5})
    assert model.ims[0].fc.weight.requires_grad  # IMs unfrozen after training
    assert len([h for h in compat.history if h["phase"] == "main"]) == 1


def test_strategy_refuses_a_foreign_gate(tmp_path):
    class Fixed(Gate):
        def scores(self, exit_index, logits, features=None):
            return logits.softmax(-1).amax(-1)

        def exits_at(self, prefix):
            return prefix[:, -1] > 0.9

    model = toy_model()
    model.gate = Fixed(3, 2)
    source = FeatureSource(model, toy_data(), cacheable=False)
    ctx = FitContext(features=source, exit_macs=[1, 2, 3, 4], full_macs=4)
    with pytest.raises(EednError, match="jei"):
        JeiStrategy(**{"lambda": 1.0}).fit(model, ctx)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)`")  # the IM optimiser never steps
@pytest.mark.parametrize("sweep", ["stacked", "loop"])
def test_shared_optimiser_leaves_the_idle_group_alone(tmp_path, sweep):
    """The official shared SGD zeroes gradients to None, so gate batches move no IM parameter (no weight decay,
    no momentum step): with only gate batches after the warm-up, shared and separate optimisers agree exactly
    and the IMs stay at their warm-up values."""
    gate_only = {"epochs": 3, "warmup_epochs": 2, "alternation": "batches:1000", "lambda": 0.5, "sweep": sweep}
    _, _, shared, _ = fit(tmp_path, optimizers="shared", **gate_only)
    _, _, separate, _ = fit(tmp_path, optimizers="separate", **gate_only)
    model = toy_model()
    source = FeatureSource(model, toy_data(), cache=FeatureCache(tmp_path / "cache"))
    ctx = FitContext(features=source, exit_macs=[1, 2, 3, 4], full_macs=4)
    JeiStrategy(epochs=3, warmup_epochs=2, im_training="alternate")._warmup(model, ctx, _Validation(ctx), [])
    warm = model.heads_state_dict()
    main = [h for h in shared.history if h["phase"] == "main"]
    assert main[0]["im_samples"] == 0 and main[0]["gate_samples"] > 0
    for k, v in shared.settings[0][1].items():
        assert torch.equal(v, separate.settings[0][1][k]), k
        if k.startswith("ims."):
            assert torch.equal(v, warm[k]), k


@pytest.mark.parametrize("im_class", ["linear", "mlp"])
def test_stacked_heads_match_each_copy(im_class):
    """StackedHeads: copy k's IM logits, gate logits and gradients are those of the model holding state k
    (LinearIM and JeiGate through their stacked forwards, MLPIM through the vmap fallback)."""
    from eedn.core.stacked import StackedHeads
    from eedn_plugins.heads import MLPIM

    torch.manual_seed(0)
    bb = ToyBackbone()
    make = (lambda d: LinearIM(d, 2)) if im_class == "linear" else (lambda d: MLPIM(d, 2, hidden=5))
    model = EarlyExitModel(bb, [make(d) for d in bb.feature_dims[:-1]], JeiGate(3, 2))
    states = []
    for _ in range(3):
        for p in model.heads().parameters():
            nn.init.normal_(p)
        states.append(model.heads_state_dict())
    stack = StackedHeads(model, states)
    feats = [torch.randn(7, d) for d in bb.feature_dims[:-1]]
    im = stack.im_logits(feats)
    gl = stack.gate_logits(im)
    (im.square().sum() + gl.sum()).backward()
    for k, state in enumerate(states):
        model.load_heads_state_dict(state)
        model.zero_grad()
        one = model.im_logits(feats)
        one_gate = model.gate.gate_logits(one)
        (one.square().sum() + one_gate.sum()).backward()
        assert torch.allclose(im[k], one, atol=1e-6) and torch.allclose(gl[k], one_gate, atol=1e-6)
        for name, p in model.heads().named_parameters():
            assert torch.allclose(stack.params[name].grad[k], p.grad, atol=1e-5), name
        assert all(torch.equal(v, state[key]) for key, v in stack.state(k).items())


def test_paper_compat_warmup_length_follows_the_official_table(tmp_path):
    from eedn_plugins.jei_targets import official_warmup_epochs

    assert [official_warmup_epochs(d, b) for d, b in (("cifar10", "t2t_vit_7"), ("cifar10", "t2t_vit_14"),
                                                       ("CIFAR100", "t2t_vit_7"), ("cifar100-lt", "t2t_vit_7"),
                                                       ("svhn", "t2t_vit_7"), ("digits", "t2t_vit_tiny"))] == [
        3, 1, 4, 4, 6, 3]
    assert JeiStrategy().options.warmup_epochs == 3
    assert JeiStrategy(profile="paper-compat").options.warmup_epochs is None  # resolved by fit()
    strategy = JeiStrategy(profile="paper-compat", epochs=4, backbone_mode="eval", head_augment=False,
                           alternation="batches:3", **{"lambda": 0.5})
    model = toy_model()
    source = FeatureSource(model, toy_data(), cache=FeatureCache(tmp_path / "cache"))
    ctx = FitContext(features=source, exit_macs=[1, 2, 3, 4], full_macs=4)
    result = strategy.fit(model, ctx)
    assert strategy.options.warmup_epochs == 3  # "toy" is no official setting: the default length
    assert len([h for h in result.history if h["phase"] == "warmup"]) == 3
    with pytest.raises(EednError, match="warmup_epochs=3"):
        JeiStrategy(profile="paper-compat", epochs=3).fit(toy_model(), ctx)
