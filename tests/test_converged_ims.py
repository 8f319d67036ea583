"""Converged IMs: the linear probe, standardised head training folded back into the IM, the one checkpoint rule,
and the bar the clean profile is held to (IM-only's and JEI's IMs within 0.5 point of the probe on digits)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from eedn.core.build import build_model
from eedn.core.config import resolve_config
from eedn.core.cost import measure_exit_macs
from eedn.core.plugins import create
from eedn.pipeline.run import feature_source, prepare
from eedn.runtime.seeding import seed_everything
from eedn.runtime.errors import EednError
from eedn.runtime.progress import Progress
from eedn.train.features import compute_split_outputs
from eedn.train.probe import fit_linear_probe, fold_standardization, probe_exits, standardization
from eedn.train.strategy import FitContext, StandardizedIM
from eedn.train.heads import Checkpoint
from eedn_plugins.heads import LinearIM, MLPIM


def _blobs(n: int = 400, d: int = 6, c: int = 3, scale: float = 0.05, seed: int = 0):
    """Separable-ish classes on features of tiny spread and an offset (like pooled backbone features)."""
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(c, d, generator=gen)
    y = torch.randint(0, c, (n,), generator=gen)
    x = (centers[y] + 0.8 * torch.randn(n, d, generator=gen)) * scale + 0.7
    return x, y


def test_fold_standardization_gives_the_same_logits_on_raw_features():
    x, _ = _blobs()
    mu, sigma = standardization(x)
    w, b = torch.randn(3, 6), torch.randn(3)
    w_raw, b_raw = fold_standardization(w, b, mu, sigma)
    assert torch.allclose((x - mu) / sigma @ w.t() + b, x @ w_raw.t() + b_raw, atol=1e-4)
    const = torch.ones(10, 2)  # a constant feature is left alone (σ = 1), not divided by zero
    assert torch.equal(standardization(const)[1], torch.ones(2))


def test_the_probe_reaches_the_optimum_of_its_objective():
    """At the returned weights the gradient of mean CE + wd/2·‖W‖² (on standardised features) is ~0, and plain
    SGD on the raw features from zero stays well below it in the same number of passes."""
    x, y = _blobs()
    wd = 1e-4
    probe = fit_linear_probe(x, y, 3, weight_decay=wd)
    mu, sigma = standardization(x)
    w = (probe.weight * sigma).requires_grad_(True)  # the weights on standardised features
    b = (probe.bias + probe.weight @ mu).requires_grad_(True)
    loss = F.cross_entropy((x - mu) / sigma @ w.t() + b, y) + 0.5 * wd * w.square().sum()
    loss.backward()
    assert float(w.grad.abs().max()) < 1e-3 and float(b.grad.abs().max()) < 1e-3
    sgd = LinearIM(6, 3)
    opt = torch.optim.SGD(sgd.parameters(), lr=0.01, momentum=0.9)
    for _ in range(15):
        for i in range(0, len(y), 64):
            opt.zero_grad()
            F.cross_entropy(sgd(x[i:i + 64]), y[i:i + 64]).backward()
            opt.step()
    sgd_acc = float((sgd(x).argmax(-1) == y).float().mean())
    assert probe.accuracy(x, y) > sgd_acc + 0.2


@pytest.mark.parametrize("make", [lambda: LinearIM(6, 3), lambda: MLPIM(6, 3, hidden=5)])
def test_standardized_im_trains_on_standardised_features_and_folds_back(make):
    torch.manual_seed(0)
    x, _ = _blobs()
    im = make()
    before = im(x).detach()
    mu, sigma = standardization(x)
    wrapped = StandardizedIM(im, mu, sigma)
    assert torch.allclose(wrapped(x), before, atol=1e-4)  # wrapping changes no output
    with torch.no_grad():
        wrapped.im.input_linear.weight.add_(0.3)
    trained = wrapped(x).detach()
    plain = wrapped.fold()
    assert plain is im and torch.allclose(plain(x), trained, atol=1e-4)  # folded: same logits, plain module


def test_standardize_refuses_an_im_without_an_input_linear():
    class Odd(nn.Module):
        def forward(self, f):
            return f

    with pytest.raises(EednError, match="standardize=false"):
        StandardizedIM(Odd(), torch.zeros(2), torch.ones(2))


def test_checkpoint_keeps_each_part_at_its_best_and_freezes_stale_parts():
    a, b = nn.Linear(1, 1, bias=False), nn.Linear(1, 1, bias=False)
    heads = nn.ModuleDict({"a": a, "b": b})

    def state():
        return {k: v.detach().clone() for k, v in heads.state_dict().items()}

    ck = Checkpoint(state, lambda r: r["scores"], heads.load_state_dict, parts=["a.", "b."], modules=[a, b],
                    patience=2, record_key="stopped")
    for epoch, scores in enumerate([[1.0, 1.0], [2.0, 0.5], [1.5, 0.4], [1.4, 3.0]]):
        with torch.no_grad():
            a.weight.fill_(epoch)
            b.weight.fill_(epoch)
        record = {"scores": scores}
        ck.update(record, epoch)
    # b went stale after epochs 1 and 2: restored to epoch 0 and frozen, so epoch 3's score does not count
    assert record["stopped"] == [True, True] and not b.weight.requires_grad
    out = ck.finish()
    assert float(out["a.weight"]) == 1.0 and float(out["b.weight"]) == 0.0 and ck.chosen_epoch() == [1, 0]
    assert a.weight.requires_grad and b.weight.requires_grad and float(heads["b"].weight.detach()) == 0.0


def test_checkpoint_with_a_fixed_baseline_keeps_the_last_epoch_beating_it():
    """The official rule (pt_compat): the bar is the warm-up's best and never rises."""
    value = {"w": torch.zeros(1)}
    ck = Checkpoint(lambda: {"w": value["w"].clone()}, lambda r: r["acc"], baseline=0.5, fixed_baseline=True,
                    initial={"w": torch.full((1,), -1.0)})
    for epoch, acc in enumerate([0.7, 0.6, 0.4]):
        value["w"].fill_(epoch)
        ck.update({"acc": acc}, epoch)
    assert float(ck.finish()["w"]) == 1.0 and ck.chosen_epoch() == 1
    none = Checkpoint(lambda: {"w": torch.zeros(1)}, lambda r: r["acc"], baseline=0.9, fixed_baseline=True,
                      initial={"w": torch.full((1,), -1.0)})
    none.update({"acc": 0.5}, 0)
    assert float(none.finish()["w"]) == -1.0 and none.chosen_epoch() is None  # the warm-up model stands


def test_profiles_resolve_the_head_training_options():
    clean = create("strategy", "im-only").options
    assert (clean.optimizer, clean.standardize, clean.init, clean.select) == ("adam", True, "probe", "exit_ce")
    compat = create("strategy", "sdn", profile="paper-compat").options
    assert (compat.optimizer, compat.lr, compat.momentum, compat.weight_decay, compat.standardize, compat.select) == (
        "sgd", 0.01, 0.9, 5e-4, False, "last_im")
    assert create("strategy", "l2w").options.optimizer == "sgd"  # its meta step needs an SGD step
    assert create("strategy", "im-only", lr="0.2", optimizer="sgd").options.lr == 0.2  # explicit options win
    assert create("strategy", "jei").options.im_training == "converge"
    assert create("strategy", "jei", profile="paper-compat").options.im_training == "alternate"


# ------------------------------------------------------------------------------ the bar, on digits


def _per_exit_test_accuracy(prep, name: str, **options) -> list[float]:
    seed_everything(0)
    strategy = create("strategy", name, **options)
    model = build_model(prep.backbone, gate=strategy.default_gate or "max_prob", inference_module="linear")
    strategy.prepare_model(model)
    model.freeze_backbone()
    exit_macs, full_macs = measure_exit_macs(model)
    source = feature_source(prep, model)
    result = strategy.fit(model, FitContext(features=source, exit_macs=exit_macs, full_macs=full_macs, seed=0))
    model.load_heads_state_dict(result.settings[0][1])
    out = compute_split_outputs(model, source, "test", exit_macs, full_macs)
    return [100 * float(a) for a in out.exit_accuracy()[: len(model.ims)]]


def test_clean_ims_are_within_half_a_point_of_a_converged_probe_on_digits(tiny_config):
    """IM-only's and JEI's IMs (clean profile) score within 0.5 point of a converged linear probe on the same
    cached digits features at every exit; the official optimiser (paper-compat) does not, so the bar bites."""
    prep = prepare(resolve_config(tiny_config), Progress(False))
    model = build_model(prep.backbone, gate="max_prob", inference_module="linear")
    source = feature_source(prep, model)
    train, val, test = (source.features(s) for s in ("train", "val", "test"))
    g = len(model.ims)
    probes = probe_exits(train.feats[:g], train.labels, prep.backbone.num_classes, val=(val.feats[:g], val.labels))
    probe = [100 * p.accuracy(test.feats[l], test.labels) for l, p in enumerate(probes)]
    assert min(probe) > 50  # the features carry the classes
    for name, options in (("im-only", {}), ("jei", {"lambda": 0.5})):
        ims = _per_exit_test_accuracy(prep, name, **options)
        assert all(a >= p - 0.5 for a, p in zip(ims, probe)), (name, ims, probe)
    official = _per_exit_test_accuracy(prep, "im-only", profile="paper-compat")
    assert any(a < p - 10 for a, p in zip(official, probe)), (official, probe)
