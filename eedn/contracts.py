"""The contracts every plugin implements.

An early-exit network here is a *stage-wise* backbone (``stem`` then ``stage(0..L-1)``), one inference
module (IM) after each of the first L-1 stages, the backbone's own head after the last stage, and one
gate object that scores every intermediate exit and owns its decision rule. Exit ``l`` (0-based) sits
after stage ``l``; exit ``L-1`` is the backbone's own head, where every remaining sample leaves.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Union

import torch
from torch import Tensor, nn

if TYPE_CHECKING:  # pragma: no cover
    from eedn.data import DataSplits
    from eedn.model import EarlyExitModel
    from eedn.outputs import ExitOutputs
    from eedn.training import FitContext

State = Union[Tensor, tuple]
"""A backbone's running state: a tensor or tuple of tensors, batch first, so rows can be dropped."""


def select_rows(state: State, rows: Tensor) -> State:
    """Keep only ``rows`` (index or bool mask) of a batch-first state."""
    if isinstance(state, Tensor):
        # index_select copies faster than advanced indexing for index tensors
        return state.index_select(0, rows) if rows.dtype != torch.bool else state[rows]
    return tuple(select_rows(s, rows) for s in state)


@dataclass(frozen=True)
class InputSpec:
    """What a backbone eats: channels and (square) image size, plus the normalisation it expects."""

    channels: int
    image_size: int
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None


class Backbone(nn.Module, ABC):
    """A network that runs as ``stem`` followed by ``num_stages`` stages, with its own final head.

    Subclasses set ``num_stages``, ``feature_dims`` (the width of ``exit_features(i, ...)`` for each
    stage), ``num_classes`` and ``input_spec``.
    """

    num_stages: int
    feature_dims: list[int]
    num_classes: int
    input_spec: InputSpec

    @abstractmethod
    def stem(self, x: Tensor) -> State:
        """Input images -> the state that stage 0 consumes."""

    @abstractmethod
    def stage(self, index: int, state: State) -> State:
        """Run stage ``index`` on a state."""

    @abstractmethod
    def exit_features(self, index: int, state: State) -> Tensor:
        """The ``[B, feature_dims[index]]`` vector an exit after stage ``index`` reads."""

    @abstractmethod
    def head(self, features: Tensor) -> Tensor:
        """The backbone's own classifier on ``exit_features(num_stages - 1, ...)``."""

    def forward(self, x: Tensor) -> Tensor:
        state = self.stem(x)
        for i in range(self.num_stages):
            state = self.stage(i, state)
        return self.head(self.exit_features(self.num_stages - 1, state))

    def check_input(self, x: Tensor) -> None:
        """Raise a clear error if ``x`` does not fit this backbone."""
        spec = self.input_spec
        if x.dim() != 4 or x.shape[1] != spec.channels:
            raise ValueError(f"expected images of shape [B, {spec.channels}, H, W], got {list(x.shape)}")


class InferenceModule(nn.Module):
    """Exit classifier: features ``[B, D]`` -> logits ``[B, C]``. Subclass to replace the default Linear."""


class Gate(nn.Module, ABC):
    """Scores every intermediate exit and decides where each sample leaves.

    ``scores(l, logits, features)`` gives one score per sample for exit ``l`` (e.g. max probability, a
    learned exit probability, the predicted class for patience). ``exits_at(prefix)`` receives the score
    matrix ``[B, l+1]`` of exits ``0..l`` for samples that have not exited yet and says which of them
    leave at ``l``; it must only read the prefix (causal), so the real early-exit engine and the
    simulation on stored outputs agree. ``num_exits`` counts intermediate exits (G); exit ``G`` is the
    backbone's head.
    """

    #: True if the gate has parameters a strategy trains (JEI); False for rule-based gates.
    trainable: bool = False
    #: True if the gate has thresholds set by a budget calibration on validation outputs.
    calibratable: bool = False

    def __init__(self, num_exits: int, num_classes: int, **options: Any):
        super().__init__()
        self.num_exits = num_exits
        self.num_classes = num_classes

    @abstractmethod
    def scores(self, exit_index: int, logits: Tensor, features: Tensor | None = None) -> Tensor:
        """Score ``[B]`` of exit ``exit_index`` from its IM's logits (and features)."""

    @abstractmethod
    def exits_at(self, prefix: Tensor) -> Tensor:
        """Bool ``[B]``: does each still-running sample leave at exit ``prefix.shape[1] - 1``?"""

    def exit_probabilities(self, scores: Tensor) -> Tensor | None:
        """``[B, G+1]`` exit probabilities if the gate is probabilistic (JEI), else None."""
        return None

    def decide(self, scores: Tensor) -> Tensor:
        """Exit index ``[B]`` in ``0..G`` for a full ``[B, G]`` score matrix (G means the final head)."""
        n, g = scores.shape
        exit_index = torch.full((n,), g, dtype=torch.long, device=scores.device)
        running = torch.ones(n, dtype=torch.bool, device=scores.device)
        for l in range(g):
            leave = self.exits_at(scores[:, : l + 1]) & running
            exit_index[leave] = l
            running &= ~leave
        return exit_index

    def describe(self) -> dict:
        """A JSON-able summary of the gate's setting (thresholds, k, ...) for results.json."""
        return {}

    # Budget calibration (only for ``calibratable`` gates). It reads stored validation outputs only.
    def calibrate(self, val: "ExitOutputs", target: dict) -> None:
        """Set the gate's thresholds on ``val`` so that it meets ``target``: one of
        ``{"exit_shares": [E floats]}``, ``{"p": float}`` (MSDNet geometric budget),
        ``{"macs_fraction": float}`` or ``{"accuracy_drop": float}``."""
        raise NotImplementedError(f"{type(self).__name__} has no budget calibration")

    def budget_sweep(self) -> list[dict]:
        """The targets of this gate's default accuracy-vs-cost sweep (e.g. the geometric budgets p = 1..39)."""
        return []


@dataclass
class StrategyResult:
    """What ``fit`` returns: one trained setting per operating point it produced.

    Each setting is ``(label, state_dict)`` where the state dict covers the IMs and the gate of an
    :class:`EarlyExitModel` (``model.heads_state_dict()``). A λ sweep gives several; a strategy whose
    gate is calibrated by budget gives one and lets the pipeline sweep the budgets.
    """

    settings: list[tuple[str, dict]] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)


class TrainingStrategy(ABC):
    """Trains the IMs and gates (and the backbone, if it says so) of an early-exit model."""

    #: the gate paired with this strategy when the user names none.
    default_gate: str = "max_prob"
    #: True if fit() updates backbone weights (then no feature cache is used).
    trains_backbone: bool = False
    #: the option the command line's ``--lambda`` sets (a cost/accuracy trade-off), if the strategy has one.
    tradeoff_option: str | None = None

    def __init__(self, **options: Any):
        self.options = options

    @property
    def backbone_mode(self) -> str:
        """``eval`` (a fixed feature extractor, cacheable) or ``train`` (dropout/DropPath active)."""
        return str(self.options.get("backbone_mode", "eval"))

    @property
    def head_augment(self) -> bool:
        """True if heads train on augmented images (then features cannot be cached)."""
        return bool(self.options.get("head_augment", False))

    def prepare_model(self, model: "EarlyExitModel") -> None:
        """Attach strategy-specific modules (e.g. an exit combiner) before ``fit`` and before saved heads
        are loaded back; the default attaches nothing."""

    @abstractmethod
    def fit(self, model: "EarlyExitModel", data: "DataSplits", context: "FitContext") -> StrategyResult:
        """Train ``model`` in place and return the settings to evaluate."""

    def describe(self) -> dict:
        return dict(self.options)


class Evaluator(ABC):
    """Turns stored exit outputs (test, plus the cal split for anything fitted) into metrics."""

    name: str = "evaluator"

    def __init__(self, **options: Any):
        self.options = options

    @abstractmethod
    def evaluate(self, test: "ExitOutputs", cal: "ExitOutputs", exit_test: Tensor, exit_cal: Tensor) -> dict:
        """Metrics for a policy whose exit indices are ``exit_test`` / ``exit_cal``; JSON-able."""


class DatasetSource(ABC):
    """Yields train / val / cal / test splits; never downloads."""

    num_classes: int
    channels: int
    default_image_size: int

    def __init__(self, **options: Any):
        self.options = options

    #: backbone epochs that train well on this data when the user gives none.
    suggested_backbone_epochs: int = 30

    @abstractmethod
    def splits(self, image_size: int, seed: int, augment: bool = True) -> "DataSplits":
        """Build the four splits; val/cal/test use evaluation transforms."""

    def backbone_defaults(self, backbone: str) -> dict:
        """Options that size a plain family name (e.g. ``t2t_vit``) sensibly for this data; the user's
        own backbone options win. Default: none."""
        return {}

    def describe(self) -> dict:
        return dict(self.options)


