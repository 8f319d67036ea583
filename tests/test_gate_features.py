"""JEI gates that read more than their own exit (gate_features), and the one-knob budget of a trained gate."""
from __future__ import annotations

import pytest
import torch
from test_inference import FAKE_MACS, MARGIN, gap_midpoint, simulate, trained_model

from eedn.core.budgets import MACS_TOLERANCE
from eedn.core.build import create_model
from eedn.core.cost import measure_exit_macs
from eedn.core.outputs import ExitOutputs
from eedn.core.stacked import StackedHeads
from eedn.deploy.inference import EarlyExitEngine
from eedn.runtime.errors import EednError
from eedn_plugins.jei_gate import (
    HIDDEN_PROJECTION,
    HISTORY_STATISTICS,
    history_statistics,
)

VARIANTS = [("history", "linear"), ("history", "mlp"), ("history+hidden", "linear"), ("history+hidden", "mlp")]


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _last_layer(gate, l: int) -> torch.nn.Linear:
    return gate.linears[l] if gate.options.gate_model == "linear" else gate.mlps[l][2]


def spread_cdf(model, x) -> None:
    """Biases that send a share of the still-running samples out at every exit (cdf rule, τ = 0.5), with every
    gate logit at least 2e-3 from 0 so that rounding cannot flip a decision."""
    gate = model.gate
    g = gate.num_exits
    for l in range(g):
        _last_layer(gate, l).weight.data.mul_(50.0)  # fresh gates score everyone alike: spread them
        _last_layer(gate, l).bias.data.fill_(-1e3)
    for l in range(g):
        _last_layer(gate, l).bias.data.fill_(0.0)
        _, _, exits = simulate(model, x)
        with torch.no_grad():
            feats = model.exit_features(x)
            z = gate.gate_logits(model.im_logits(feats), feats)[:, l].double()
        running = exits >= l
        target = max(1, int(running.sum()) // (g + 1 - l))
        cut = gap_midpoint(z[running], target, ascending=False, min_gap=2e-3)
        _last_layer(gate, l).bias.data.fill_(-cut)


@pytest.mark.parametrize("key", ["t2t3", "resnet"])
@pytest.mark.parametrize("features,gate_model", VARIANTS)
def test_history_gates_in_the_engine_equal_the_simulation(key, features, gate_model):
    model, x = trained_model(key, "jei", {"exit_rule": "cdf", "gate_features": features, "gate_model": gate_model})
    spread_cdf(model, x)
    logits, scores, exits = simulate(model, x)
    reach = [exits >= l for l in range(model.gate.num_exits)]
    assert all(float((scores[r, l] - 0.5).abs().min()) > MARGIN for l, r in enumerate(reach) if r.any())
    result = EarlyExitEngine(model, exit_macs=FAKE_MACS[: model.num_exits])(x)
    assert torch.equal(result.exit_index, exits)
    assert set(exits.tolist()) == set(range(model.num_exits))
    rows = torch.arange(len(x))
    assert torch.equal(result.predictions, logits[rows, exits].argmax(-1))


def test_history_statistics_are_causal_and_prefix_exact():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(32, 5, 7, generator=gen) * 3
    full = history_statistics(logits, 5)
    assert full.shape == (32, 5, len(HISTORY_STATISTICS))
    for l in range(5):
        assert torch.equal(history_statistics(logits[:, : l + 1], 5)[:, l], full[:, l])  # what the engine sees
        changed = logits.clone()
        changed[:, l + 1 :] = torch.randn(32, 4 - l, 7, generator=gen)
        assert torch.equal(history_statistics(changed, 5)[:, : l + 1], full[:, : l + 1])  # nothing beyond exit l
    # patience on a worked example: exits predict 1, 2, 2, 2 -> streaks 0, 0, 1, 2 (over G = 4)
    worked = torch.full((1, 4, 3), -5.0)
    for l, c in enumerate([1, 2, 2, 2]):
        worked[0, l, c] = 5.0
    stats = history_statistics(worked, 4)[0]
    assert stats[:, HISTORY_STATISTICS.index("patience")].tolist() == [0.0, 0.0, 0.25, 0.5]
    assert stats[:, HISTORY_STATISTICS.index("agreement")].tolist() == pytest.approx([0.0, 0.0, 0.5, 2 / 3])


@pytest.mark.parametrize("features,gate_model", [("own", "linear"), *VARIANTS])
def test_training_scores_equal_per_exit_scores_and_stacked_copies(features, gate_model):
    """The vectorised gate logits JEI trains on, the per-exit scores of stored outputs and the stacked λ copies
    are one function."""
    model, x = trained_model("resnet", "jei", {"exit_rule": "cdf", "gate_features": features,
                                               "gate_model": gate_model})
    with torch.no_grad():
        feats = model.exit_features(x)
        im = model.im_logits(feats)
        stored = model.gate_scores(model.logits_from_features(feats), feats)
        trained = torch.sigmoid(model.gate.gate_logits(im, feats))
        torch.testing.assert_close(trained, stored, rtol=0, atol=1e-6)
    states = [model.heads_state_dict() for _ in range(2)]
    for key in states[1]:
        if key.startswith("gate.") and states[1][key].is_floating_point() and key != "gate.offset":
            states[1][key] = states[1][key] + 0.1
    stack = StackedHeads(model, states)
    stacked = stack.gate_logits(im.unsqueeze(0).expand(2, *im.shape), feats)
    model.load_heads_state_dict(states[1])
    torch.testing.assert_close(stacked[0], torch.logit(trained.double()).float(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(stacked[1], model.gate.gate_logits(im, feats), rtol=1e-5, atol=1e-5)
    assert stack.group("gate.")  # the stacked gate parameters are trained


def test_hidden_projection_cost_is_counted_exactly():
    kw = {"num_classes": 5, "image_size": 16, "in_channels": 3, "gate": "jei", "seed": 0}
    own, _ = measure_exit_macs(create_model("resnet_tiny", **kw, gate_options={"gate_features": "own"}))
    hist, _ = measure_exit_macs(create_model("resnet_tiny", **kw, gate_options={"gate_features": "history"}))
    model = create_model("resnet_tiny", **kw, gate_options={"gate_features": "history+hidden", "gate_model": "mlp"})
    hidden, _ = measure_exit_macs(model)
    dims = model.backbone.feature_dims
    g = model.gate.num_exits
    width = 4 + len(HISTORY_STATISTICS)
    # history: the gate's linear layer reads 6 more inputs per exit; each exit pays for every earlier gate too
    assert [h - o for h, o in zip(hist, own)] == [6 * min(l + 1, g) for l in range(g + 1)]
    per_gate = [d * HIDDEN_PROJECTION + (width + HIDDEN_PROJECTION) * 16 + 16 for d in dims[:g]]
    assert [h - o for h, o in zip(hidden, own)] == [sum(per_gate[: min(l + 1, g)]) - 4 * min(l + 1, g)
                                                  for l in range(g + 1)]


def test_history_gates_are_refused_by_export(tmp_path):
    from eedn.deploy.export import export_model

    model = create_model("resnet_tiny", num_classes=5, image_size=16, in_channels=3, gate="jei",
                         gate_options={"gate_features": "history"}, seed=0)
    with pytest.raises(EednError, match="gate_features=own"):
        export_model(model, "exported-program", tmp_path / "x", {})


# ------------------------------------------------------------------------------- one knob for any budget
def _learned_val(n: int = 400, g: int = 3, seed: int = 0) -> ExitOutputs:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (n,), generator=gen)
    logits = torch.randn(n, g + 1, 4, generator=gen)
    logits[torch.arange(n), :, labels] += torch.linspace(0.5, 3, g + 1)
    scores = torch.sigmoid(torch.randn(n, g, generator=gen) * 2 + torch.linspace(-1, 1, g))
    return ExitOutputs(logits, labels, scores, torch.tensor([25.0, 50.0, 75.0, 100.0], dtype=torch.float64), 100.0)


@pytest.mark.parametrize("rule", ["cdf", "hazard", "official"])
@pytest.mark.parametrize("budget", [0.35, 0.5, 0.75, 0.9])
def test_a_trained_gate_meets_any_macs_budget_by_its_offset(rule, budget):
    from eedn.core.plugins import create

    gate = create("gate", "jei", 3, 4, exit_rule=rule)
    val = _learned_val()
    gate.calibrate(val, {"macs_fraction": budget})
    rescored = torch.sigmoid(torch.logit(val.gate_scores.double().clamp(1e-12, 1 - 1e-12)) + gate.offset)
    got = val.summarize(gate.decide(rescored.float()))["macs_fraction"]
    assert abs(got - budget) <= MACS_TOLERANCE
    assert gate.setting["val_macs_fraction"] == pytest.approx(got)
    assert gate.describe()["offset"] == float(gate.offset) != 0.0


def test_the_offset_moves_the_engine_too():
    model, x = trained_model("resnet", "jei", {"exit_rule": "cdf"})
    _, before, _ = simulate(model, x)
    model.gate.offset.fill_(1.5)
    _, after, exits = simulate(model, x)
    torch.testing.assert_close(torch.logit(after.double()), torch.logit(before.double()) + 1.5, rtol=1e-4, atol=1e-4)
    assert torch.equal(EarlyExitEngine(model, exit_macs=FAKE_MACS[: model.num_exits])(x).exit_index, exits)
    state = {k: v for k, v in model.gate.state_dict().items() if k != "offset"}
    model.gate.load_state_dict(state)  # a gate saved before the offset existed loads as trained
    assert float(model.gate.offset) == 0.0


# ------------------------------------------------------------------------------------------- in a run
def test_budget_is_one_target_for_learned_and_threshold_policies(tiny_config, tmp_path):
    """--budget F: the reported policy is within ±0.02 of F on val, for the learned gate (its offset, outputs
    re-scored) and for thresholds; without it the learned gate is reported as trained."""
    import eedn

    base = tiny_config | {"evaluators": []}
    options = {"jei": {"epochs": 3, "warmup_epochs": 1}, "im-only": {"epochs": 2}}
    trained = eedn.run_pipeline(base | {"strategy": "jei", "strategy_options": options["jei"], "out": str(tmp_path / "t")})
    assert trained["policy"]["setting"] == "lambda=0.5" and trained["policy"]["gate_setting"]["offset"] == 0.0
    low = trained["exits"][0]["macs"] / trained["full_macs"]
    budget = round(low + 0.5 * (1 - low), 2)
    for strategy in ("jei", "im-only"):
        res = eedn.run_pipeline(base | {"strategy": strategy, "strategy_options": options[strategy],
                                        "budget": {"macs_fraction": budget}, "out": str(tmp_path / strategy)})
        assert abs(res["policy"]["val"]["macs_fraction"] - budget) <= MACS_TOLERANCE
        assert res["policy"]["setting"].endswith(f"macs_fraction={budget:g}")
        settings = [p["setting"] for p in res["curve"]]
        assert len(settings) == len(set(settings))
        numbers = [(p["accuracy"], p["mean_macs"], p["val"]["accuracy"], p["val"]["mean_macs"]) for p in res["curve"]]
        assert len(numbers) == len(set(numbers))  # duplicate operating points collapsed
    assert res["policy"]["gate_setting"]["target"] == {"macs_fraction": budget}


def test_learned_gate_warnings_name_the_fix():
    from eedn.pipeline.run import learned_gate_warnings

    history = [{"phase": "main", "lambda": 0.5, "epoch": e, "val_exits_before_target": v}
               for e, v in ((3, 0.95), (4, 0.5))] + [{"phase": "select", "lambda": 0.5, "epoch": 3}]
    own = {"gate": "max_prob", "at_gate_cost": [{"setting": "lambda=0.5", "macs_fraction": 0.4,
                                                 "gate_minus_threshold": -0.08}]}
    lines = learned_gate_warnings("jei", "lambda=0.5", history, own)
    assert len(lines) == 2 and "95%" in lines[0] and "exit_rule=cdf" in lines[0] and "8.0 points" in lines[1] and "gate_features=history" in lines[1]
    history[-1]["epoch"] = 4  # the kept epoch routes half the samples early: no collapse
    own["at_gate_cost"][0]["gate_minus_threshold"] = -0.03
    assert learned_gate_warnings("jei", "lambda=0.5", history, own) == []


def test_distinct_points_collapse():
    from eedn.evaluation.policy import distinct_points

    pt = {"accuracy": 0.9, "mean_macs": 10.0, "val": {"accuracy": 0.8, "mean_macs": 11.0}}
    points = [pt | {"setting": "p=1"}, pt | {"setting": "p=2"}, pt | {"setting": "p=3", "accuracy": 0.91}]
    kept = distinct_points(points)
    assert [p["setting"] for p in kept] == ["p=1", "p=3"] and kept[0]["same_as"] == ["p=2"]


def test_the_readme_jobs_first_exit_saves_most_of_the_compute():
    """`eedn run --backbone t2t_vit --strategy jei` on the digits (1 channel, 32 px): size=auto gives the tiny
    T2T-ViT in the digits layout, whose first exit costs at most 0.35 of the full MACs."""
    from eedn.core.build import build_backbone, build_model

    backbone = build_backbone("t2t_vit", 10, 32, 1, {})
    exit_macs, full = measure_exit_macs(build_model(backbone, gate="jei", seed=0))
    assert backbone.num_stages == 8 and exit_macs[0] / full <= 0.35
    rgb = build_backbone("t2t_vit", 10, 32, 3, {})
    assert rgb.variant == "t2t_vit_7"  # other inputs keep the JEI-DNN backbone
