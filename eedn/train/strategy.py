"""The training-strategy contract and what strategies share: the fit context, per-exit losses and the
head-training epoch loop (batches, finite-loss check, per-epoch validation, best checkpoint, history).

It sits above the model (:mod:`eedn.core.model`) and the feature source (:mod:`eedn.train.features`): a strategy
trains an :class:`~eedn.core.model.EarlyExitModel` from the batches its context serves.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from eedn.runtime.errors import EednError
from eedn.train.features import FeatureSource, compute_split_outputs
from eedn.runtime.io import fault_point
from eedn.core.model import EarlyExitModel
from eedn.core.options import declared_options, option
from eedn.runtime.precision import autocast
from eedn.runtime.progress import Progress


@dataclass
class StrategyResult:
    """What ``fit`` returns: one trained setting per operating point it produced.

    Each setting is ``(label, state_dict)`` where the state dict covers the IMs and the gate of an
    :class:`EarlyExitModel` (``model.heads_state_dict()``). A λ sweep gives several; a strategy whose
    gate is calibrated by budget gives one and lets the pipeline sweep the budgets.
    """

    settings: list[tuple[str, dict]] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)


@dataclass
class FitContext:
    """Everything a strategy needs besides the model: per-exit features of every split (``features``;
    ``features.data`` holds the splits themselves), exit costs, seed, device and progress."""

    features: FeatureSource
    exit_macs: list[int]
    full_macs: int
    seed: int = 0
    device: str = "cpu"
    progress: Progress = field(default_factory=lambda: Progress(False))
    #: the run's precision; head training autocasts under bf16 (see :meth:`head_autocast`)
    precision: str = "fp32"

    def head_autocast(self):
        """The autocast a head-training step runs under: bf16 when the run is bf16. Under fp16 heads train in
        fp32, since fp16 needs loss scaling inside every strategy's own optimiser step (docs/scale.md)."""
        return autocast(self.precision if self.precision == "bf16" else "fp32", self.device)

    def normalised_costs(self, kind: str = "uniform_index") -> Tensor:
        """Cost vector ``c_l`` for exits 0..G: ``uniform_index`` = (l+1)/(G+1) (paper time) or
        ``measured``/``true_macs`` = cumulative MACs / final-exit MACs."""
        e = len(self.exit_macs)
        if kind == "uniform_index":
            return torch.arange(1, e + 1, dtype=torch.float32) / e
        if kind in ("measured", "true_macs"):
            m = torch.tensor(self.exit_macs, dtype=torch.float32)
            return m / m[-1]
        raise ValueError(f"unknown cost vector '{kind}'; known: uniform_index, measured")

    def log(self, message: str) -> None:
        self.progress.log(message)


class TrainingStrategy(ABC):
    """Trains the IMs and gates (and the backbone, if it says so) of an early-exit model.

    Declare options as an ``Options`` dataclass (see :mod:`eedn.core.options`); ``self.options`` then holds
    them validated and complete. ``backbone_mode`` and ``head_augment`` are read by the pipeline when the
    strategy declares them.
    """

    #: the gate paired with this strategy when the user names none (None: the registered default gate).
    default_gate: str | None = None
    #: True if fit() updates backbone weights (then no feature cache is used).
    trains_backbone: bool = False
    #: True if fit() trains the gate's parameters (a learned gate is only accepted with such a strategy).
    trains_gate: bool = False
    #: the option the command line's ``--lambda`` sets (a cost/accuracy trade-off), if the strategy has one.
    tradeoff_option: str | None = None

    def __init__(self, **options: Any):
        self.options = declared_options(f"strategy {type(self).__name__}", type(self), options)

    @property
    def backbone_mode(self) -> str:
        """``eval`` (a fixed feature extractor, cacheable) or ``train`` (dropout/DropPath active)."""
        return str(getattr(self.options, "backbone_mode", "eval"))

    @property
    def head_augment(self) -> bool:
        """True if heads train on augmented images (then features cannot be cached)."""
        return bool(getattr(self.options, "head_augment", False))

    @property
    def uses_fixed_features(self) -> bool:
        """True when the strategy trains on the frozen backbone's eval-mode features of unaugmented images,
        which are then computed once and cached."""
        return not (self.trains_backbone or self.head_augment or self.backbone_mode != "eval")

    def gate_options(self) -> dict:
        """Options this strategy sets on the gate it trains (e.g. the exit rule its targets are meant for); the
        pipeline passes them to the gate and records them with it. Default: none."""
        return {}

    def prepare_model(self, model: EarlyExitModel) -> None:
        """Attach strategy-specific modules (e.g. an exit combiner) before ``fit`` and before saved heads
        are loaded back; the default attaches nothing."""

    @abstractmethod
    def fit(self, model: EarlyExitModel, context: FitContext) -> StrategyResult:
        """Train ``model`` in place and return the settings to evaluate."""

    def describe(self) -> dict:
        return self.options.as_dict()


# ------------------------------------------------------------------------------------------- losses


def per_exit_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """``[B, E]`` cross-entropy of every exit's logits ``[B, E, C]``."""
    b, e, c = logits.shape
    return F.cross_entropy(logits.reshape(b * e, c).float(), labels.repeat_interleave(e), reduction="none").view(b, e)


def warmup_weights(num_ims: int) -> Tensor:
    """JEI warm-up weights ``G + 1 - l`` for IM l (the final head has weight 1 and is frozen)."""
    return torch.arange(num_ims + 1, 1, -1, dtype=torch.float32)


def sgd(params, lr: float = 0.01, momentum: float = 0.9, weight_decay: float = 5e-4) -> torch.optim.SGD:
    return torch.optim.SGD([p for p in params if p.requires_grad], lr=lr, momentum=momentum, weight_decay=weight_decay)


# ------------------------------------------------------------------------------ the head-training loop

#: checkpoint choice: best val accuracy of the last IM, of the final exit, or simply the last epoch.
SELECT_CHOICES = ("last_im", "final", "last")


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


def check_finite(loss: float, stage: str, epoch: int, setting: str = "strategy_options.lr") -> None:
    """Stop with one line when a training loss stops being finite (nothing is cached or written)."""
    if not math.isfinite(loss):
        raise EednError(f"{stage}: the training loss became {loss} in epoch {epoch + 1}; training diverged. "
                        f"Lower the learning rate ({setting}) and run again")


@dataclass
class HeadTrainingOptions:
    """Options most head-training strategies share; subclass it to add a strategy's own."""

    epochs: int = option(15, "training epochs", min=1)
    batch_size: int = option(64, "training batch size", min=1)
    lr: float = option(0.01, "SGD learning rate of the IMs", min=0)
    backbone_mode: str = option("eval", "eval: the backbone is a fixed feature extractor (features cached); "
                                        "train: its dropout / DropPath stay active (no cache)",
                                choices=("eval", "train"))
    head_augment: bool = option(False, "train the heads on augmented images (no feature cache)")


@dataclass
class SGDHeadOptions(HeadTrainingOptions):
    """Head training with a cosine-annealed SGD and a checkpoint chosen on val (SDN, BoostNet, L2W-DEN)."""

    momentum: float = option(0.9, "SGD momentum", min=0)
    weight_decay: float = option(5e-4, "SGD weight decay", min=0)
    select: str = option("last_im", "checkpoint: best val accuracy of the last IM (last_im) or of the final "
                                    "exit (final), or the last epoch (last)", choices=SELECT_CHOICES)


def cosine_schedule(optimizer: torch.optim.Optimizer, epochs: int) -> Callable[[int], dict]:
    """An ``end_epoch`` hook for :func:`eedn.train.strategy.train_heads`: steps a per-epoch cosine schedule
    (to 0 over ``epochs``) and records the lr the epoch ran at."""
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)

    def end_epoch(epoch: int) -> dict:
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        return {"lr": lr}

    return end_epoch


def epoch_accuracies(val_accuracy: Tensor) -> dict[str, Any]:
    """What an epoch of head training shows: the IMs' mean val accuracy (the final head is often frozen, so
    its accuracy says nothing about training); ``record`` keeps every exit's for the trackers."""
    acc = [float(a) for a in val_accuracy]
    shown = {"IM_val_accuracy": sum(acc[:-1]) / len(acc[:-1])} if len(acc) > 1 else {"val_accuracy": acc[-1]}
    return shown | {"record": {f"val_accuracy_exit_{i}": a for i, a in enumerate(acc)}}


def train_heads(model: EarlyExitModel, context: FitContext, *, name: str, epochs: int, batch_size: int,
                step: Callable[[list[Tensor], Tensor, int], float], select: str = "last", augmented: bool = False,
                end_epoch: Callable[[int], dict | None] | None = None,
                validate: Callable[[], Tensor] | None = None) -> list[dict]:
    """The epoch loop every head-training strategy shares.

    Each epoch feeds the train batches (cached features when possible, same seeded order either way) to
    ``step(features, labels, epoch) -> loss``, which does the strategy's own optimiser work; checks the
    loss is finite; calls ``end_epoch(epoch)`` (schedulers; may return extra history fields); measures the
    per-exit val accuracy (``validate``, default from the features) and keeps the heads of the epoch chosen
    by ``select`` (:data:`SELECT_CHOICES`). The chosen heads are loaded back at the end. Returns one
    history record per epoch.
    """
    if select not in SELECT_CHOICES:
        raise EednError(f"{name}: select must be one of {', '.join(SELECT_CHOICES)}, got {select!r}")
    validate = validate or (lambda: val_exit_accuracy(model, context))
    source = context.features
    history: list[dict] = []
    best_metric, best_state = None, None
    total_batches = source.num_batches("train", batch_size)
    for epoch in range(epochs):
        model.heads().train()
        total, count = 0.0, 0
        batches = source.batches("train", batch_size, shuffle=True, seed=context.seed, epoch=epoch, augmented=augmented)
        for feats, y in context.progress.track(batches, name, total=total_batches, epoch=epoch,
                                                   epochs=epochs):
            with context.head_autocast():
                loss = float(step(feats, y, epoch))
            check_finite(loss, name, epoch)
            context.progress.step(name, loss)
            total, count = total + loss * len(y), count + len(y)
        extra = (end_epoch(epoch) if end_epoch is not None else None) or {}
        val_acc = validate()
        metric = selection_metric(val_acc, select)
        if metric is not None and (best_metric is None or metric > best_metric):  # "last" keeps the live heads
            best_metric, best_state = metric, model.heads_state_dict()
        record = {"phase": name, "epoch": epoch, "loss": total / max(count, 1), **extra,
                  "val_accuracy": val_acc.tolist()}
        history.append(record)
        context.progress.epoch(name, epoch, epochs, loss=record["loss"], **epoch_accuracies(val_acc))
        fault_point("head-epoch")
    if best_state is not None:
        model.load_heads_state_dict(best_state)
    return history


def train_heads_warmup(model: EarlyExitModel, context: FitContext, *, epochs: int, batch_size: int = 64,
                       lr: float = 0.01, weights: Tensor | None = None, augmented: bool = False,
                       name: str = "IM warm-up") -> list[dict]:
    """JEI warm-up / IM-only training: minimise Σ_l w_l·CE(IM_l) (default ``w_l = G + 1 - l``) with SGD at
    constant lr on a frozen backbone (the frozen final head's CE is constant and omitted); last epoch kept."""
    g = len(model.ims)
    w = (weights if weights is not None else warmup_weights(g)).to(context.device)
    opt = sgd(model.ims.parameters(), lr=lr)

    def step(feats: list[Tensor], y: Tensor, epoch: int) -> float:
        loss = (per_exit_cross_entropy(model.im_logits(feats), y) * w).sum(1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    return train_heads(model, context, name=name, epochs=epochs, batch_size=batch_size, step=step,
                       select="last", augmented=augmented)
