"""SDN (Kaya et al., ICML 2019): internal classifiers trained with a weighted joint loss.

The loss is ``Σ_l τ_l(e)·CE(IM_l)`` where the weight of IM ``l`` grows linearly over the epochs, from
``weight_start`` (0.01) at the first epoch to ``c_l`` at the last one (SDN's schedule):
``τ_l(e) = weight_start + (c_l − weight_start)·e/(epochs − 1)`` (``c_l`` when ``epochs == 1``). ``c_l``
is the IM's relative position in the network: ``weight_position="macs"`` (default) uses the
cumulative MACs of exit ``l`` over those of the final exit, ``"index"`` uses ``(l+1)/(G+1)``.

On a frozen backbone (default) the IMs have disjoint parameters, so the weights only rescale each
IM's step. With ``train_backbone=True`` the backbone trains too (live, on augmented images), the final
head joins the loss with weight 1, and the backbone keeps its selected weights in place after
``fit``; the returned setting holds the heads only.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from eedn.core.model import EarlyExitModel
from eedn.core.options import option
from eedn.train.strategy import (FitContext, SGDHeadOptions, StrategyResult, TrainingStrategy, head_optimizer,
                                 init_ims_from_probe, per_exit_cross_entropy)
from eedn.train.heads import check_finite, cosine_schedule, selection_metric, train_heads, val_exit_accuracy


def sdn_positions(context: FitContext, num_ims: int, kind: str) -> Tensor:
    """``c_l`` for IMs 0..G-1: relative position by cumulative MACs (``macs``) or by index (``index``)."""
    if kind == "macs":
        macs = torch.as_tensor(context.exit_macs, dtype=torch.float64)
        return (macs[:num_ims] / macs[-1]).float()
    return torch.arange(1, num_ims + 1, dtype=torch.float32) / (num_ims + 1)


def sdn_weights(positions: Tensor, epoch: int, epochs: int, start: float = 0.01) -> Tensor:
    """SDN's loss weights at ``epoch``: linear from ``start`` (first epoch) to ``positions`` (last)."""
    frac = 1.0 if epochs <= 1 else epoch / (epochs - 1)
    return start + (positions - start) * frac


class SDNStrategy(TrainingStrategy):
    """SDN weighted joint loss on the IMs (optionally on the whole backbone)."""

    default_gate = "max_prob"
    compat_select = "last_im"

    @dataclass
    class Options(SGDHeadOptions):
        weight_start: float = option(0.01, "loss weight of every IM at the first epoch", min=0)
        weight_position: str = option("macs", "where each IM's final loss weight comes from: its share of the "
                                              "final exit's MACs (macs) or (l+1)/(G+1) (index)",
                                      choices=("macs", "index"))
        train_backbone: bool = option(False, "train the backbone too (live, on augmented images; no cache)")
        backbone_lr: float = option(1e-4, "SGD learning rate of the backbone with train_backbone", min=0)

    options: SDNStrategy.Options

    def __init__(self, **options):
        super().__init__(**options)
        self.trains_backbone = self.options.train_backbone

    def fit(self, model: EarlyExitModel, context: FitContext) -> StrategyResult:
        o = self.options
        torch.manual_seed(context.seed)
        positions = sdn_positions(context, len(model.ims), o.weight_position).to(context.device)
        if self.trains_backbone:
            history = self._fit_with_backbone(model, context, positions)
            return StrategyResult(settings=[("sdn", model.heads_state_dict())], history=history)

        model.backbone.requires_grad_(False)
        if o.init == "probe":
            init_ims_from_probe(model, context, weight_decay=float(o.weight_decay or 0.0))
        opt = head_optimizer(model.ims.parameters(), o)
        schedule = cosine_schedule(opt, o.epochs)

        def weights(epoch: int) -> Tensor:
            return sdn_weights(positions, epoch, o.epochs, o.weight_start)

        ce_sum = {"ce": 0.0, "n": 0}

        def step(feats: list[Tensor], y: Tensor, epoch: int) -> float:
            ce = per_exit_cross_entropy(model.im_logits(feats), y)
            loss = (ce * weights(epoch)).sum(1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            ce_sum["ce"] += float(ce.detach().mean()) * len(y)
            ce_sum["n"] += len(y)
            return float(loss.detach())

        def end_epoch(epoch: int) -> dict:
            # the weighted loss grows with SDN's weights (0.01 -> c_l): the unweighted CE shows the fit
            mean_ce = ce_sum["ce"] / max(ce_sum["n"], 1)
            ce_sum.update(ce=0.0, n=0)
            return schedule(epoch) | {"weights": weights(epoch).tolist(), "mean_ce": mean_ce}

        history = train_heads(model, context, name="sdn", epochs=o.epochs, batch_size=o.batch_size, step=step,
                              select=str(o.select), patience=int(o.patience or 0), standardize=bool(o.standardize),
                              score_start=o.init == "probe", augmented=self.head_augment, end_epoch=end_epoch)
        return StrategyResult(settings=[("sdn", model.heads_state_dict())], history=history)

    def _fit_with_backbone(self, model: EarlyExitModel, context: FitContext, positions: Tensor) -> list[dict]:
        """Its own epoch loop: the backbone runs live on augmented images, so cached features cannot serve
        the batches. The checkpoint covers the whole model; the backbone is frozen again at the end."""
        o = self.options
        model.backbone.requires_grad_(True)
        groups: list[dict[str, Any]] = [{"params": list(model.ims.parameters()), "lr": o.lr},
                  {"params": list(model.backbone.parameters()), "lr": o.backbone_lr}]
        opt = torch.optim.SGD(groups, lr=float(o.lr or 0.0), momentum=o.momentum,
                              weight_decay=float(o.weight_decay or 0.0))
        schedule = cosine_schedule(opt, o.epochs)
        history: list[dict] = []
        best_metric: float | None = None
        best_state: dict[str, Any] | None = None
        for epoch in range(o.epochs):
            tau = sdn_weights(positions, epoch, o.epochs, o.weight_start)
            loss = self._backbone_epoch(model, context, opt, tau, epoch)
            val_acc = val_exit_accuracy(model, context)  # the backbone runs live, in eval mode
            record = {"phase": "sdn", "epoch": epoch, "loss": loss, **schedule(epoch), "weights": tau.tolist(),
                      "val_accuracy": val_acc.tolist()}
            metric = selection_metric(val_acc, "last_im" if o.select == "exit_ce" else str(o.select))
            # metric and best_metric are None together (whether selection_metric gives one depends on `select` only)
            if best_state is None or metric is None or metric > cast(float, best_metric):
                best_metric, best_state = metric, copy.deepcopy(model.state_dict())
            history.append(record)
            context.progress.epoch("sdn (backbone)", epoch, o.epochs, loss=loss, val_accuracy=float(val_acc[-1]))
        assert best_state is not None  # epochs >= 1
        model.load_state_dict(best_state)
        model.freeze_backbone()
        return history

    def _backbone_epoch(self, model: EarlyExitModel, context: FitContext, opt: torch.optim.Optimizer, tau: Tensor,
                        epoch: int) -> float:
        model.train()
        gen = torch.Generator().manual_seed(context.seed * 1_000_003 + epoch)
        loader = DataLoader(context.features.dataset("train", augmented=True), batch_size=self.options.batch_size,
                            shuffle=True, generator=gen)
        weights = torch.cat([tau, tau.new_ones(1)])  # the final head joins with weight 1
        total, count = 0.0, 0
        for x, y in context.progress.track(loader, "sdn (backbone)", epoch=epoch,
                                              epochs=self.options.epochs):
            x, y = x.to(context.device), y.to(context.device)
            logits = model.logits_from_features(model.exit_features(x))
            loss = (per_exit_cross_entropy(logits, y) * weights).sum(1).mean()
            value = float(loss.detach())
            check_finite(value, "sdn", epoch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, count = total + value * len(y), count + len(y)
        return total / max(count, 1)
