"""The training-strategy contract and what strategies share: the fit context, per-exit losses and the
head-training epoch loop (batches, finite-loss check, per-epoch validation, best checkpoint, history).

It sits above the model (:mod:`eedn.core.model`) and the feature source (:mod:`eedn.train.features`): a strategy
trains an :class:`~eedn.core.model.EarlyExitModel` from the batches its context serves.
"""
from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from eedn.runtime.errors import EednError
from eedn.train.features import FeatureSource
from eedn.core.model import EarlyExitModel
from eedn.core.options import declared_options, option
from eedn.runtime.precision import autocast
from eedn.runtime.progress import Progress
from eedn.train.probe import fit_linear_probe, fold_standardization, standardization, unfold_standardization


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

    #: the checkpoint rule of this strategy's head training under ``profile=paper-compat``
    compat_select: str = "last"
    #: per head-training profile, what this strategy sets differently from :data:`HEAD_PROFILES`
    profile_overrides: ClassVar[dict[str, dict[str, Any]]] = {}

    def __init__(self, **options: Any):
        self.options = declared_options(f"strategy {type(self).__name__}", type(self), options)
        if isinstance(self.options, HeadTrainingOptions):
            self.options = resolve_head_profile(self.options, self.compat_select, self.profile_overrides)

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


# ------------------------------------------------------------------------------ head-training options

#: checkpoint choice: best val accuracy of the last IM or of the final exit, the last epoch, or per IM the epoch
#: of its lowest val CE (``exit_ce``; the IMs on a frozen backbone share no parameter, so each keeps its own best)
SELECT_CHOICES = ("last_im", "final", "last", "exit_ce")
HEAD_OPTIMIZERS = ("sgd", "adam")
HEAD_INITS = ("default", "probe")

#: what each head-training profile sets for the options declared "per profile" (explicit options still win).
#: ``clean`` converges the IMs (measured on digits and CIFAR-10 features, docs/method.md "Converged IMs");
#: ``paper-compat`` is the official optimiser: SGD, lr 0.01, momentum 0.9, weight decay 5e-4, raw features.
HEAD_PROFILES: dict[str, dict[str, Any]] = {
    "clean": {"optimizer": "adam", "lr": 0.01, "weight_decay": 1e-4, "standardize": True, "init": "probe",
              "select": "exit_ce", "patience": 5},
    "paper-compat": {"optimizer": "sgd", "lr": 0.01, "weight_decay": 5e-4, "standardize": False,
                     "init": "default", "patience": 0},
}


def _per_profile(help: str, choices: tuple | None = None, **limits: float) -> Any:
    return option(None, f"{help} (default: per profile)", choices=choices, **limits)


@dataclass
class HeadTrainingOptions:
    """Options most head-training strategies share; subclass it to add a strategy's own. Options marked "per
    profile" are filled from :data:`HEAD_PROFILES`, so ``self.options`` holds the resolved values."""

    epochs: int = option(15, "training epochs", min=1)
    batch_size: int = option(64, "training batch size", min=1)
    lr: float | None = _per_profile("learning rate of the IMs", min=0)
    momentum: float = option(0.9, "SGD momentum", min=0)
    weight_decay: float | None = _per_profile("weight decay (on standardised weights with standardize)", min=0)
    profile: str = option("clean", "clean (IMs trained to convergence) or paper-compat (the official SGD)",
                          choices=tuple(HEAD_PROFILES))
    optimizer: str | None = _per_profile("optimiser of the IMs", HEAD_OPTIMIZERS)
    standardize: bool | None = _per_profile("train each IM on its exit's features standardised with the train "
                                            "mean and std, folded back into the IM afterwards (same inference)")
    init: str | None = _per_profile("IM start: default (the module's init) or probe (a converged linear probe, "
                                    "linear IMs only)", HEAD_INITS)
    select: str | None = _per_profile("checkpoint: best val accuracy of the last IM (last_im) or of the final "
                                      "exit (final), the last epoch (last), or per IM its lowest val CE (exit_ce)",
                                      SELECT_CHOICES)
    patience: int | None = _per_profile("with select=exit_ce: an IM stops after this many epochs without a lower "
                                        "val CE (0: never)", min=0)
    backbone_mode: str = option("eval", "eval: the backbone is a fixed feature extractor (features cached); "
                                        "train: its dropout / DropPath stay active (no cache)",
                                choices=("eval", "train"))
    head_augment: bool = option(False, "train the heads on augmented images (no feature cache)")


#: the name the SDN / BoostNet / L2W options were declared under
SGDHeadOptions = HeadTrainingOptions


def resolve_head_profile(options: HeadTrainingOptions, compat_select: str = "last",
                         overrides: dict[str, dict[str, Any]] | None = None) -> HeadTrainingOptions:
    """Fill the "per profile" options from :data:`HEAD_PROFILES` (``compat_select``: the strategy's own
    checkpoint rule under paper-compat; ``overrides``: what a strategy sets differently per profile)."""
    profile = dict(HEAD_PROFILES[options.profile]) | (overrides or {}).get(options.profile, {})
    profile.setdefault("select", compat_select)
    return dataclasses.replace(options, **{k: v for k, v in profile.items() if getattr(options, k) is None})


def head_optimizer(params: Iterable[Tensor], options: HeadTrainingOptions) -> torch.optim.Optimizer:
    """The IMs' optimiser from the resolved options: SGD (momentum) or Adam, both with L2 weight decay (the
    linear probe's objective, so a probe start is its optimum)."""
    trainable = [p for p in params if p.requires_grad]
    lr, wd = float(options.lr or 0.0), float(options.weight_decay or 0.0)
    if options.optimizer == "adam":
        return torch.optim.Adam(trainable, lr=lr, weight_decay=wd)
    return torch.optim.SGD(trainable, lr=lr, momentum=options.momentum, weight_decay=wd)


# ------------------------------------------------------------------------------ standardised IMs


def input_linear(im: nn.Module) -> nn.Linear | None:
    """The ``Linear`` an IM applies first to its features (``input_linear`` attribute), if it declares one."""
    layer = getattr(im, "input_linear", None)
    return layer if isinstance(layer, nn.Linear) else None


class StandardizedIM(nn.Module):
    """An IM reading ``(x − μ)/σ`` while it trains; :meth:`fold` gives back the IM on raw features with its
    input layer rewritten (``W/σ``, ``b − Wμ/σ``), so inference and MACs are those of the plain IM."""

    mu: Tensor
    sigma: Tensor

    def __init__(self, im: nn.Module, mu: Tensor, sigma: Tensor):
        super().__init__()
        layer = input_linear(im)
        if layer is None:
            raise EednError(f"standardize=true needs IMs whose first layer is a Linear (input_linear); "
                            f"{type(im).__name__} has none: set strategy_options.standardize=false")
        self.im = im
        self.register_buffer("mu", mu.to(layer.weight))
        self.register_buffer("sigma", sigma.to(layer.weight))
        with torch.no_grad():
            w, b = unfold_standardization(layer.weight, layer.bias, self.mu, self.sigma)
            layer.weight.copy_(w)
            layer.bias.copy_(b)

    def forward(self, features: Tensor) -> Tensor:
        return self.im((features - self.mu) / self.sigma)

    def fold(self) -> nn.Module:
        layer = input_linear(self.im)
        assert layer is not None
        with torch.no_grad():
            w, b = fold_standardization(layer.weight, layer.bias, self.mu, self.sigma)
            layer.weight.copy_(w)
            layer.bias.copy_(b)
        return self.im


def standardize_ims(model: EarlyExitModel, context: FitContext) -> None:
    """Wrap every IM in a :class:`StandardizedIM` with its exit's train mean and std (the parameters stay the
    same tensors, so optimisers built before keep working)."""
    train = context.features.features("train").feats
    for l in range(len(model.ims)):
        mu, sigma = standardization(train[l])
        model.ims[l] = StandardizedIM(model.ims[l], mu.to(context.device), sigma.to(context.device))


def unstandardize_ims(model: EarlyExitModel) -> None:
    """Fold every :class:`StandardizedIM` back into a plain IM on raw features."""
    for l in range(len(model.ims)):
        im = model.ims[l]
        if isinstance(im, StandardizedIM):
            model.ims[l] = im.fold()


def init_ims_from_probe(model: EarlyExitModel, context: FitContext, weight_decay: float = 1e-4) -> list[float]:
    """Start every linear IM from a converged linear probe on its exit's train features (val CE early
    stopping); returns the probes' val accuracies. IMs that are not a single Linear keep their init."""
    train, val = context.features.features("train"), context.features.features("val")
    accuracies = []
    for l, im in enumerate(model.ims):
        inner = im.im if isinstance(im, StandardizedIM) else im
        layer = input_linear(inner)
        if layer is None or sum(1 for m in inner.modules() if isinstance(m, nn.Linear)) != 1:
            accuracies.append(float("nan"))
            continue
        probe = fit_linear_probe(train.feats[l], train.labels, layer.out_features, weight_decay=weight_decay,
                                 val=(val.feats[l], val.labels))
        w, b = probe.weight.to(layer.weight), probe.bias.to(layer.bias)
        if isinstance(im, StandardizedIM):
            w, b = unfold_standardization(w, b, im.mu, im.sigma)
        with torch.no_grad():
            layer.weight.copy_(w)
            layer.bias.copy_(b)
        accuracies.append(probe.accuracy(val.feats[l], val.labels))
    return accuracies
