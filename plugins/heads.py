"""Inference modules (exit classifiers) and the `im-only` strategy: IMs trained alone on the frozen backbone with
the JEI warm-up loss, paired with a threshold gate calibrated on val."""
from __future__ import annotations

from typing import cast

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from eedn.core.contracts import InferenceModule
from eedn.core.model import EarlyExitModel
from eedn.core.options import option
from eedn.train.strategy import FitContext, HeadTrainingOptions, StrategyResult, TrainingStrategy
from eedn.train.heads import train_heads_warmup


class LinearIM(InferenceModule):
    """JEI-DNN's IM: one Linear on the exit features (LN_final(h_l)[cls] for T2T-ViT)."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(in_features, num_classes)

    @property
    def input_linear(self) -> nn.Linear:
        """The layer standardised training folds its feature scaling into (eedn.train.strategy.StandardizedIM)."""
        return self.fc

    def forward(self, features: Tensor) -> Tensor:
        return self.fc(features)

    @staticmethod
    def forward_stacked(params: dict[str, Tensor], features: Tensor) -> Tensor:
        """``[K, B, C]`` logits of K stacked copies (``fc.weight`` ``[K, C, D]``) in one matmul
        (eedn.core.stacked: how a λ sweep trains as one model). With K = 1 it is ``fc(features)``."""
        weight, bias = params["fc.weight"], params["fc.bias"]
        k, c, d = weight.shape
        out = torch.addmm(bias.reshape(k * c), features, weight.reshape(k * c, d).t())
        return out.view(-1, k, c).transpose(0, 1)


class MLPIM(InferenceModule):
    """A two-layer exit classifier, for backbones whose early features are not linearly separable."""

    @dataclass
    class Options:
        hidden: int = option(256, "width of the hidden layer", min=1)

    def __init__(self, in_features: int, num_classes: int, hidden: int = Options.hidden):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.GELU(), nn.Linear(hidden, num_classes))

    @property
    def input_linear(self) -> nn.Linear:
        """The layer standardised training folds its feature scaling into."""
        return cast(nn.Linear, self.net[0])

    def forward(self, features: Tensor) -> Tensor:
        return self.net(features)


# ------------------------------------------------------------------------------------------ im-only


class IMOnlyStrategy(TrainingStrategy):
    """The warm-up loss Σ (G+1−l)·CE(IM_l) of JEI-DNN alone at a constant lr (docs/usage.md, "Baselines"); exits
    are then chosen by a calibrated threshold gate (max probability by default). The clean profile trains the
    IMs to convergence (standardised features, a probe start, Adam, per-IM val-CE early stopping);
    paper-compat runs the official warm-up's SGD for ``epochs`` epochs and keeps the last."""

    default_gate = "max_prob"

    Options = HeadTrainingOptions
    options: HeadTrainingOptions

    def fit(self, model: EarlyExitModel, context: FitContext) -> StrategyResult:
        o = self.options
        history = train_heads_warmup(model, context, epochs=o.epochs, batch_size=o.batch_size, options=o,
                                     augmented=o.head_augment, name="im-only")
        return StrategyResult(settings=[("im-only", model.heads_state_dict())], history=history)
