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

This file also holds the small helpers the other baseline strategies (BoostNet, L2W-DEN) share.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from eedn.strategy import StrategyResult, TrainingStrategy
from eedn.data import DataSplits
from eedn.errors import EednError
from eedn.model import EarlyExitModel
from eedn.features import compute_split_outputs
from eedn.strategy import FitContext, per_exit_cross_entropy, sgd

COMMON_OPTIONS = ("backbone_mode", "head_augment")  # read by the base TrainingStrategy / pipeline
#: checkpoint choice: best val accuracy of the last IM, of the final exit, or simply the last epoch.
SELECT_CHOICES = ("last_im", "final", "last")


# ------------------------------------------------------------------------------------ shared helpers
def resolve_options(strategy: str, defaults: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """Defaults overlaid with the user's options; an unknown name is a one-line EednError."""
    unknown = sorted(set(given) - set(defaults) - set(COMMON_OPTIONS))
    if unknown:
        known = ", ".join(sorted(set(defaults) | set(COMMON_OPTIONS)))
        raise EednError(f"unknown option(s) for strategy '{strategy}': {', '.join(unknown)}; known: {known}")
    opts = dict(defaults) | {k: v for k, v in given.items() if k in defaults}
    for key in ("epochs", "batch_size"):
        if key in opts and (not isinstance(opts[key], int) or isinstance(opts[key], bool) or opts[key] < 1):
            raise EednError(f"strategy '{strategy}' option {key} must be a positive integer, got {opts[key]!r}")
    if "select" in opts and opts["select"] not in SELECT_CHOICES:
        raise EednError(f"strategy '{strategy}' option select must be one of {', '.join(SELECT_CHOICES)}, "
                        f"got {opts['select']!r}")
    return opts


def selection_metric(val_accuracy: Tensor, select: str) -> float | None:
    """The val number a checkpoint is chosen on: the last IM's or the final exit's accuracy (None: keep
    the last epoch)."""
    if select == "last":
        return None
    return float(val_accuracy[-2] if select == "last_im" and len(val_accuracy) > 1 else val_accuracy[-1])


def val_exit_accuracy(model: EarlyExitModel, context: FitContext) -> Tensor:
    """Per-exit val accuracy ``[E]`` of the model as it reports its exits (combiner included)."""
    out = compute_split_outputs(model, context.features, "val", context.exit_macs, context.full_macs)
    return out.exit_accuracy()


def train_batches(context: FitContext, batch_size: int, epoch: int, augmented: bool):
    return context.features.batches("train", batch_size, shuffle=True, seed=context.seed, epoch=epoch,
                                    augmented=augmented)


# ------------------------------------------------------------------------------------------- SDN
def sdn_positions(context: FitContext, num_ims: int, kind: str) -> Tensor:
    """``c_l`` for IMs 0..G-1: relative position by cumulative MACs or by index."""
    if kind == "macs":
        macs = torch.as_tensor(context.exit_macs, dtype=torch.float64)
        return (macs[:num_ims] / macs[-1]).float()
    if kind == "index":
        return torch.arange(1, num_ims + 1, dtype=torch.float32) / (num_ims + 1)
    raise EednError(f"sdn option weight_position must be 'macs' or 'index', got {kind!r}")


def sdn_weights(positions: Tensor, epoch: int, epochs: int, start: float = 0.01) -> Tensor:
    """SDN's loss weights at ``epoch``: linear from ``start`` (first epoch) to ``positions`` (last)."""
    frac = 1.0 if epochs <= 1 else epoch / (epochs - 1)
    return start + (positions - start) * frac


@torch.no_grad()
def live_exit_accuracy(model: EarlyExitModel, context: FitContext, split: str, batch_size: int = 256) -> Tensor:
    """Per-exit accuracy ``[E]`` with the backbone run live (its weights change while training)."""
    model.eval()
    loader = DataLoader(context.features.dataset(split), batch_size=batch_size, shuffle=False)
    correct, total = None, 0
    for x, y in loader:
        pred = model(x.to(context.device)).argmax(-1).cpu()
        hits = (pred == y[:, None]).sum(0)
        correct = hits if correct is None else correct + hits
        total += len(y)
    return correct.double() / max(total, 1)


class SDNStrategy(TrainingStrategy):
    """SDN weighted joint loss on the IMs (optionally on the whole backbone)."""

    default_gate = "max_prob"
    DEFAULTS: dict[str, Any] = {
        "epochs": 15, "batch_size": 64, "lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4,
        "weight_start": 0.01, "weight_position": "macs", "select": "last_im",
        "train_backbone": False, "backbone_lr": 1e-4,
    }

    def __init__(self, **options: Any):
        super().__init__(**options)
        self.opts = resolve_options("sdn", self.DEFAULTS, options)
        self.trains_backbone = bool(self.opts["train_backbone"])

    def fit(self, model: EarlyExitModel, context: FitContext) -> StrategyResult:
        o = self.opts
        torch.manual_seed(context.seed)
        g = len(model.ims)
        positions = sdn_positions(context, g, o["weight_position"]).to(context.device)
        if self.trains_backbone:
            model.backbone.requires_grad_(True)
            params = [{"params": list(model.ims.parameters()), "lr": o["lr"]},
                      {"params": list(model.backbone.parameters()), "lr": o["backbone_lr"]}]
            opt = torch.optim.SGD(params, lr=o["lr"], momentum=o["momentum"], weight_decay=o["weight_decay"])
        else:
            model.backbone.requires_grad_(False)
            opt = sgd(model.ims.parameters(), lr=o["lr"], momentum=o["momentum"], weight_decay=o["weight_decay"])
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=o["epochs"])
        history: list[dict] = []
        best_metric, best_state = None, None
        for epoch in range(o["epochs"]):
            tau = sdn_weights(positions, epoch, o["epochs"], o["weight_start"])
            lr = opt.param_groups[0]["lr"]
            if self.trains_backbone:
                loss = self._backbone_epoch(model, context, opt, tau, epoch)
                val_acc = live_exit_accuracy(model, context, "val")
            else:
                loss = self._heads_epoch(model, context, opt, tau, epoch)
                val_acc = val_exit_accuracy(model, context)
            sched.step()
            metric = selection_metric(val_acc, o["select"])
            if best_state is None or metric is None or metric > best_metric:
                best_metric = metric
                best_state = copy.deepcopy(model.state_dict()) if self.trains_backbone else model.heads_state_dict()
            history.append({"phase": "sdn", "epoch": epoch, "loss": loss, "lr": lr, "weights": tau.tolist(),
                            "val_accuracy": val_acc.tolist()})
        if self.trains_backbone:
            model.load_state_dict(best_state)
            model.freeze_backbone()
        else:
            model.load_heads_state_dict(best_state)
        return StrategyResult(settings=[("sdn", model.heads_state_dict())], history=history)

    def _heads_epoch(self, model: EarlyExitModel, context: FitContext, opt, tau: Tensor, epoch: int) -> float:
        model.ims.train()
        total, count = 0.0, 0
        batches = train_batches(context, self.opts["batch_size"], epoch, self.head_augment)
        for feats, y in context.progress.track(batches, f"SDN epoch {epoch + 1}/{self.opts['epochs']}"):
            loss = (per_exit_cross_entropy(model.im_logits(feats), y) * tau).sum(1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, count = total + float(loss.detach()) * len(y), count + len(y)
        return total / max(count, 1)

    def _backbone_epoch(self, model: EarlyExitModel, context: FitContext, opt, tau: Tensor, epoch: int) -> float:
        model.train()
        gen = torch.Generator().manual_seed(context.seed * 1_000_003 + epoch)
        loader = DataLoader(context.features.dataset("train", augmented=True), batch_size=self.opts["batch_size"],
                            shuffle=True, generator=gen)
        weights = torch.cat([tau, tau.new_ones(1)])  # the final head joins with weight 1
        total, count = 0.0, 0
        for x, y in context.progress.track(loader, f"SDN (backbone) epoch {epoch + 1}/{self.opts['epochs']}"):
            x, y = x.to(context.device), y.to(context.device)
            logits = model.logits_from_features(model.exit_features(x))
            loss = (per_exit_cross_entropy(logits, y) * weights).sum(1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, count = total + float(loss.detach()) * len(y), count + len(y)
        return total / max(count, 1)
