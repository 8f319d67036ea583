"""Inference modules (exit classifiers), the options every head-training strategy shares, and the
`im-only` strategy: IMs trained alone on the frozen backbone with the JEI warm-up loss, paired with a
threshold gate calibrated on val."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from eedn.contracts import InferenceModule
from eedn.model import EarlyExitModel
from eedn.options import option
from eedn.strategy import SELECT_CHOICES, FitContext, StrategyResult, TrainingStrategy, train_heads_warmup


class LinearIM(InferenceModule):
    """JEI-DNN's IM: one Linear on the exit features (LN_final(h_l)[cls] for T2T-ViT)."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, features: Tensor) -> Tensor:
        return self.fc(features)


class MLPIM(InferenceModule):
    """A two-layer exit classifier, for backbones whose early features are not linearly separable."""

    @dataclass
    class Options:
        hidden: int = option(256, "width of the hidden layer", min=1)

    def __init__(self, in_features: int, num_classes: int, hidden: int = Options.hidden):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.GELU(), nn.Linear(hidden, num_classes))

    def forward(self, features: Tensor) -> Tensor:
        return self.net(features)


# ------------------------------------------------------------------------- shared strategy options


@dataclass
class HeadTrainingOptions:
    """Options of every strategy that trains the heads on a frozen backbone."""

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
    """An ``end_epoch`` hook for :func:`eedn.strategy.train_heads`: steps a per-epoch cosine schedule
    (to 0 over ``epochs``) and records the lr the epoch ran at."""
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)

    def end_epoch(epoch: int) -> dict:
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        return {"lr": lr}

    return end_epoch


# ------------------------------------------------------------------------------------------ im-only


class IMOnlyStrategy(TrainingStrategy):
    """The warm-up loss Σ (G+1−l)·CE(IM_l) of JEI-DNN alone, at a constant lr, for ``epochs`` epochs
    (docs/usage.md, "Baselines"); exits are then chosen by a calibrated threshold gate (max probability
    by default)."""

    default_gate = "max_prob"

    Options = HeadTrainingOptions

    def fit(self, model: EarlyExitModel, context: FitContext) -> StrategyResult:
        o = self.options
        history = train_heads_warmup(model, context, epochs=o["epochs"], batch_size=o["batch_size"], lr=o["lr"],
                                     augmented=o["head_augment"], name="im-only")
        return StrategyResult(settings=[("im-only", model.heads_state_dict())], history=history)
