"""Inference modules (exit classifiers) and the `im-only` strategy: IMs trained alone on the frozen
backbone with the JEI warm-up loss, paired with a threshold gate calibrated on val."""
from __future__ import annotations

from torch import Tensor, nn

from eedn import InferenceModule
from eedn.strategy import StrategyResult, TrainingStrategy
from eedn.errors import EednError
from eedn.strategy import train_heads_warmup


class LinearIM(InferenceModule):
    """JEI-DNN's IM: one Linear on the exit features (LN_final(h_l)[cls] for T2T-ViT)."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, features: Tensor) -> Tensor:
        return self.fc(features)


class MLPIM(InferenceModule):
    """A two-layer exit classifier, for backbones whose early features are not linearly separable."""

    def __init__(self, in_features: int, num_classes: int, hidden: int = 256):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.GELU(), nn.Linear(hidden, num_classes))

    def forward(self, features: Tensor) -> Tensor:
        return self.net(features)


class IMOnlyStrategy(TrainingStrategy):
    """Spec §4.4: the warm-up loss Σ (G+1−l)·CE(IM_l) alone for ``epochs`` epochs; exits are then
    chosen by a calibrated threshold gate (max probability by default)."""

    default_gate = "max_prob"
    KNOWN = {"epochs": 15, "batch_size": 64, "lr": 0.01, "backbone_mode": "eval", "head_augment": False}

    def __init__(self, **options):
        unknown = sorted(set(options) - set(self.KNOWN))
        if unknown:
            raise EednError(f"unknown im-only option(s) {', '.join(unknown)}; known: {', '.join(self.KNOWN)}")
        super().__init__(**(self.KNOWN | options))
        if int(self.options["epochs"]) < 1:
            raise EednError("im-only: epochs must be >= 1")

    def fit(self, model, context) -> StrategyResult:
        history = train_heads_warmup(
            model, context, epochs=int(self.options["epochs"]), batch_size=int(self.options["batch_size"]),
            lr=float(self.options["lr"]), augmented=bool(self.options["head_augment"]), name="im-only",
        )
        return StrategyResult(settings=[("im-only", model.heads_state_dict())], history=history)
