"""Baseline strategies (SDN, BoostNet, L2W-DEN): their formulas on tiny tensors and end-to-end fits on a
tiny stage-wise backbone with cached features."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import eedn
from eedn.core.cache import FeatureCache
from eedn.core.contracts import Backbone, InputSpec
from eedn.core.data import DataSplits, TensorImages
from eedn.runtime.errors import EednError
from eedn.train.features import FeatureSource, compute_split_outputs
from eedn.core.model import EarlyExitModel
from eedn.train.strategy import FitContext, StrategyResult
from eedn_plugins.heads import LinearIM
from eedn_plugins.boostnet import BoostNetEnsemble, BoostNetStrategy, boostnet_loss
from eedn_plugins.l2w import (
    L2WStrategy,
    WeightNet,
    greedy_confidence_assignment,
    l2w_sample_weights,
    meta_target_shares,
)
from eedn_plugins.sdn import SDNStrategy, sdn_weights
from eedn_plugins.thresholds import MaxProbGate

NUM_CLASSES = 3


# ------------------------------------------------------------------------------- tiny model and data
class TinyStages(Backbone):
    """Three small MLP stages on 1x4x4 images; exit features are the stage activations."""

    def __init__(self, width: int = 12):
        super().__init__()
        self.num_stages = 3
        self.feature_dims = [width] * 3
        self.num_classes = NUM_CLASSES
        self.input_spec = InputSpec(channels=1, image_size=4)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(16 if i == 0 else width, width), nn.ReLU())
                                    for i in range(3))
        self.fc = nn.Linear(width, NUM_CLASSES)

    def stem(self, x):
        return x.flatten(1)

    def stage(self, index, state):
        return self.blocks[index](state)

    def exit_features(self, index, state):
        return state

    def head(self, features):
        return self.fc(features)


def make_splits(seed: int = 0) -> DataSplits:
    gen = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(NUM_CLASSES, 1, 4, 4, generator=gen)

    def split(n: int) -> TensorImages:
        y = torch.randint(0, NUM_CLASSES, (n,), generator=gen)
        x = prototypes[y] + 0.9 * torch.randn(n, 1, 4, 4, generator=gen)
        return TensorImages(x, y)

    return DataSplits("tiny", NUM_CLASSES, split(192), split(96), split(48), split(48))


@pytest.fixture(scope="module")
def pretrained_backbone() -> TinyStages:
    """A backbone briefly trained on its own head, as stage 0 would leave it."""
    torch.manual_seed(0)
    bb = TinyStages()
    data = make_splits()
    x, y = data.train.images, data.train.labels
    opt = torch.optim.Adam(bb.parameters(), lr=1e-2)
    for _ in range(60):
        opt.zero_grad()
        F.cross_entropy(bb(x), y).backward()
        opt.step()
    bb.requires_grad_(False)
    return bb.eval()


def make_model(backbone: TinyStages) -> EarlyExitModel:
    import copy

    torch.manual_seed(1)
    bb = copy.deepcopy(backbone)
    ims = [LinearIM(bb.feature_dims[i], NUM_CLASSES) for i in range(bb.num_stages - 1)]
    return EarlyExitModel(bb, ims, MaxProbGate(bb.num_stages - 1, NUM_CLASSES))


def make_context(model: EarlyExitModel, data: DataSplits, cache_dir, seed: int = 0,
                 cacheable: bool = True) -> FitContext:
    source = FeatureSource(model, data, cache=FeatureCache(cache_dir), cacheable=cacheable, batch_size=64)
    return FitContext(features=source, exit_macs=[100, 220, 330], full_macs=300, seed=seed)


# ---------------------------------------------------------------------------------------- BoostNet
def test_boostnet_ensemble_matches_hand_computation():
    o = torch.randn(2, 3, 4)
    f = BoostNetEnsemble(0.5)(o)
    assert torch.allclose(f[:, 0], o[:, 0])
    assert torch.allclose(f[:, 1], o[:, 1] + 0.5 * o[:, 0])
    assert torch.allclose(f[:, 2], o[:, 2] + 0.5 * o[:, 1] + 0.25 * o[:, 0], atol=1e-6)
    assert "decay" in BoostNetEnsemble(0.5).state_dict()


def test_boostnet_loss_value_and_residual_gradients():
    torch.manual_seed(0)
    o = torch.randn(5, 3, 4, requires_grad=True)
    y = torch.randint(0, 4, (5,))
    loss = boostnet_loss(o, y, 0.5)
    o0, o1, o2 = o[:, 0].detach(), o[:, 1].detach(), o[:, 2].detach()
    expected = (F.cross_entropy(o0, y) + F.cross_entropy(o1 + 0.5 * o0, y)
                + F.cross_entropy(o2 + 0.5 * (o1 + 0.5 * o0), y))
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-6)
    loss.backward()
    # each stage only gets the gradient of its own term (the earlier ensemble is detached)
    leaf = o0.clone().requires_grad_(True)
    F.cross_entropy(leaf, y).backward()
    assert torch.allclose(o.grad[:, 0], leaf.grad, atol=1e-7)
    leaf1 = o1.clone().requires_grad_(True)
    F.cross_entropy(leaf1 + 0.5 * o0, y).backward()
    assert torch.allclose(o.grad[:, 1], leaf1.grad, atol=1e-7)


# --------------------------------------------------------------------------------------------- L2W
def test_l2w_weight_formula_uses_the_mean_of_the_whole_batch_matrix():
    m = torch.tensor([[0.1, 0.5], [-0.3, 0.7]])  # mean 0.25
    expected = torch.tensor([[1 + 0.3 * (0.1 - 0.25), 1 + 0.3 * (0.5 - 0.25)],
                             [1 + 0.3 * (-0.3 - 0.25), 1 + 0.3 * (0.7 - 0.25)]])
    assert torch.allclose(l2w_sample_weights(m, 0.3), expected)
    assert float(l2w_sample_weights(m).mean()) == pytest.approx(1.0)
    net = WeightNet(2, hidden=500)
    assert [p.shape for p in net.parameters()] == [(500, 2), (500,), (2, 500), (2,)]
    out = net(torch.randn(7, 2) * 100)
    assert out.shape == (7, 2) and float(out.detach().abs().max()) <= 1.0  # tanh output


def test_meta_targets_and_greedy_assignment():
    shares = meta_target_shares(2, 0.75)
    assert shares.tolist() == pytest.approx([0.75 / 1.734375, 0.5625 / 1.734375, 0.421875 / 1.734375])
    conf = torch.tensor([[0.9, 0.1, 0.5],
                         [0.8, 0.9, 0.5],
                         [0.2, 0.3, 0.9],
                         [0.1, 0.8, 0.1],
                         [0.7, 0.2, 0.2],
                         [0.3, 0.7, 0.3]])
    # n = 6, shares [0.5, 0.25, 0.25]: IM 0 takes 3 (rows 0, 1, 4), IM 1 takes 1 of the rest (row 3),
    # the last IM takes the rest (rows 2, 5)
    got = greedy_confidence_assignment(conf, torch.tensor([0.5, 0.25, 0.25, 0.0]))
    assert got.tolist() == [0, 0, 2, 1, 0, 2]


def test_sdn_weight_schedule_is_linear_from_start_to_position():
    pos = torch.tensor([0.3, 0.6])
    assert sdn_weights(pos, 0, 5).tolist() == pytest.approx([0.01, 0.01])
    assert sdn_weights(pos, 4, 5).tolist() == pytest.approx([0.3, 0.6])
    assert sdn_weights(pos, 2, 5).tolist() == pytest.approx([0.155, 0.305])
    assert sdn_weights(pos, 0, 1).tolist() == pytest.approx([0.3, 0.6])


# ------------------------------------------------------------------------------------ end to end
def _check_result(result: StrategyResult, model: EarlyExitModel, epochs: int, label: str) -> None:
    assert isinstance(result, StrategyResult) and len(result.settings) == 1
    name, state = result.settings[0]
    assert name == label and len(result.history) == epochs
    assert all(math.isfinite(h["loss"]) for h in result.history)
    assert set(state) == set(model.heads().state_dict())


def test_registered_strategies():
    names = set(eedn.list_names("strategy"))
    assert {"sdn", "boostnet", "l2w", "im-only"} <= names
    assert eedn.create("strategy", "boostnet").default_gate == "max_prob"


@pytest.mark.parametrize("name", ["sdn", "boostnet", "l2w", "im-only"])
def test_an_option_typo_names_the_valid_options(name):
    with pytest.raises(EednError) as err:
        eedn.create("strategy", name, epoch=3)
    message = str(err.value)
    assert "unknown option(s) epoch" in message and "did you mean 'epochs'" in message
    assert "valid: epochs, batch_size, lr" in message and "\n" not in message


def test_yaml_strings_are_coerced_and_bad_values_rejected():
    sdn = eedn.create("strategy", "sdn", lr="1e-3", epochs="4", train_backbone="true", select="final")
    assert sdn.options.lr == 0.001 and sdn.options.epochs == 4 and sdn.trains_backbone is True
    assert eedn.create("strategy", "boostnet", decay="0.25").options.decay == 0.25
    assert eedn.create("strategy", "l2w").options.select == "exit_ce"  # clean: each IM at its lowest val CE
    assert eedn.create("strategy", "l2w", profile="paper-compat").options.select == "last_im"
    assert eedn.create("strategy", "boostnet").options.select == "final"
    for name, options, fragment in [("sdn", {"select": "best"}, "last_im, final, last"),
                                    ("boostnet", {"decay": 1.5}, "decay"),
                                    ("l2w", {"meta_interval": 0}, "meta_interval"),
                                    ("sdn", {"weight_position": "depth"}, "macs, index"),
                                    ("im-only", {"epochs": 0}, "epochs"),
                                    ("im-only", {"head_augment": "perhaps"}, "true or false")]:
        with pytest.raises(EednError, match=fragment):
            eedn.create("strategy", name, **options)


@pytest.mark.parametrize("name", ["sdn", "boostnet", "l2w", "im-only"])
def test_strategy_fits_heads_on_frozen_backbone_and_settings_load_back(name, pretrained_backbone, tmp_path):
    data = make_splits()
    model = make_model(pretrained_backbone)
    context = make_context(model, data, tmp_path)
    options = {"epochs": 3, "batch_size": 32, "lr": 0.05}
    if name == "l2w":
        options["meta_interval"] = 2
    strategy = eedn.create("strategy", name, **options)
    backbone_before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    ims_before = [p.clone() for p in model.ims.parameters()]
    result = strategy.fit(model, context)
    _check_result(result, model, 3, name)
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(v, backbone_before[k]), f"backbone weight {k} changed"
    assert any(not torch.equal(a, b) for a, b in zip(ims_before, model.ims.parameters()))
    assert len(list(tmp_path.glob("features-*.pt"))) >= 2  # train and val came from the cache
    # a fresh model gets the same outputs once the strategy has prepared it and the heads are loaded
    fresh = make_model(pretrained_backbone)
    strategy.prepare_model(fresh)
    fresh.load_heads_state_dict(result.settings[0][1])
    val_ref = compute_split_outputs(model, context.features, "val", context.exit_macs, context.full_macs)
    val_new = compute_split_outputs(fresh, context.features, "val", context.exit_macs, context.full_macs)
    assert torch.allclose(val_ref.logits, val_new.logits)
    ims_acc = val_new.exit_accuracy()[:-1]
    assert float(ims_acc.max()) > 1.5 / NUM_CLASSES  # the IMs learned something
    if name == "l2w":
        assert all(h["meta_loss"] is not None for h in result.history)
        torch.manual_seed(context.seed)  # the weight net is the first thing fit draws at random
        untrained = WeightNet(len(model.ims), hidden=500)
        moved = [not torch.equal(a, b) for a, b in zip(untrained.parameters(), strategy.weight_net.parameters())]
        assert all(moved)  # meta steps reach every weight-net parameter


def test_boostnet_model_reports_ensembles_and_selects_best_val_epoch(pretrained_backbone, tmp_path):
    data = make_splits()
    model = make_model(pretrained_backbone)
    context = make_context(model, data, tmp_path)
    strategy = BoostNetStrategy(epochs=4, batch_size=32, lr=0.05)
    result = strategy.fit(model, context)
    assert isinstance(model.exit_combiner, BoostNetEnsemble)
    feats = context.features.features("val").feats
    raw = torch.stack([model.exit_logits(i, f) for i, f in enumerate(feats)], dim=1)
    combined = model.logits_from_features(feats)
    assert torch.allclose(combined[:, 2], raw[:, 2] + 0.5 * raw[:, 1] + 0.25 * raw[:, 0], atol=1e-5)
    final_acc = [h["val_accuracy"][-1] for h in result.history]
    out = compute_split_outputs(model, context.features, "val", context.exit_macs, context.full_macs)
    assert float(out.exit_accuracy()[-1]) == pytest.approx(max(final_acc))
    # without the combiner the saved heads do not load: BoostNet heads need prepare_model
    with pytest.raises(RuntimeError):
        make_model(pretrained_backbone).load_heads_state_dict(result.settings[0][1])


def test_strategies_are_seeded(pretrained_backbone, tmp_path):
    data = make_splits()
    states = []
    for _ in range(2):
        model = make_model(pretrained_backbone)
        result = L2WStrategy(epochs=1, batch_size=32, meta_interval=1).fit(model, make_context(model, data, tmp_path))
        states.append(result.settings[0][1])
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_sdn_can_train_the_backbone_live(pretrained_backbone, tmp_path):
    data = make_splits()
    model = make_model(pretrained_backbone)
    context = make_context(model, data, tmp_path, cacheable=False)
    strategy = SDNStrategy(epochs=2, batch_size=32, train_backbone=True, backbone_lr=0.05, select="last")
    assert strategy.trains_backbone and not SDNStrategy().trains_backbone
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    result = strategy.fit(model, context)
    _check_result(result, model, 2, "sdn")
    assert any(not torch.equal(v, before[k]) for k, v in model.backbone.state_dict().items())
    assert not any(p.requires_grad for p in model.backbone.parameters())  # frozen again for evaluation
    assert len(result.history[0]["weights"]) == 2


@pytest.mark.parametrize("name", ["sdn", "boostnet", "l2w"])
def test_a_diverging_loss_stops_training_with_one_line(name, pretrained_backbone, tmp_path):
    data = make_splits()
    model = make_model(pretrained_backbone)
    strategy = eedn.create("strategy", name, epochs=2, batch_size=32, lr=1e30, momentum=0)
    with pytest.raises(EednError, match="diverged") as err:
        strategy.fit(model, make_context(model, data, tmp_path))
    assert "strategy_options.lr" in str(err.value) and "\n" not in str(err.value)


def test_l2w_meta_step_skips_ims_the_checkpoint_rule_froze(pretrained_backbone, tmp_path):
    """The clean checkpoint rule freezes an IM whose val CE stopped improving (patience); L2W's look-ahead
    step must then differentiate through the IMs still training only (it raised 'does not require grad')."""
    from eedn_plugins.l2w import WeightNet, meta_target_shares

    data = make_splits()
    model = make_model(pretrained_backbone)
    context = make_context(model, data, tmp_path)
    model.ims[0].requires_grad_(False)
    frozen = {k: v.clone() for k, v in model.ims[0].state_dict().items()}
    strategy = L2WStrategy(epochs=1, batch_size=32, meta_interval=1)
    wnet = WeightNet(len(model.ims))
    opt = torch.optim.SGD([p for p in model.ims.parameters() if p.requires_grad], lr=0.1)
    meta_opt = torch.optim.Adam(wnet.parameters(), lr=1e-3)
    batches = iter(context.features.batches("train", 16, shuffle=False))
    a, b = next(batches), next(batches)
    loss = strategy._meta_step(model, wnet, opt, meta_opt, a, b, 0.1, meta_target_shares(len(model.ims)))
    assert loss == loss  # finite: the meta step ran
    assert all(torch.equal(v, frozen[k]) for k, v in model.ims[0].state_dict().items())
