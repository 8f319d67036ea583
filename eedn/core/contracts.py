"""The contracts every plugin implements (the training-strategy contract sits above the model, in
:mod:`eedn.train.strategy`).

An early-exit network here is a *stage-wise* backbone (``stem`` then ``stage(0..L-1)``), one inference
module (IM) after each of the first L-1 stages, the backbone's own head after the last stage, and one
gate object that scores every intermediate exit and owns its decision rule. Exit ``l`` (0-based) sits
after stage ``l``; exit ``L-1`` is the backbone's own head, where every remaining sample leaves.
"""
from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from eedn.core.data import DataSplits
from eedn.core.options import declared_options
from eedn.core.outputs import ExitOutputs

State = Tensor | tuple
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
    #: True for convolutional backbones that run faster on NHWC tensors (config ``channels_last: auto``)
    prefers_channels_last: bool = False
    #: where the factory's initial weights came from when it loaded pretrained ones itself (a local file it
    #: found), so a run records them and caches a fine-tuned backbone apart from a randomly initialised one
    weights_source: str | None = None

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

    #: state-dict key prefixes of the classifier head (dropped from a checkpoint when its shape differs)
    classifier_keys: tuple[str, ...] = ()
    #: state-dict key of the first layer's kernel ``[O, C, ...]`` (adapted to other channel counts on request)
    first_conv_key: str | None = None

    def load_pretrained(self, path: str | os.PathLike, adapt_input_channels: bool = False) -> Any:
        """Load trained weights from a file (``--backbone-checkpoint``). The default reads a weights-only
        state dict (or a dict holding one under ``state_dict``, ``model`` or ``backbone``: timm's trainer,
        eedn's backbone cache and a run's model.pt) and loads it strictly, except that a classifier head of
        another class count is dropped and the first convolution is adapted to other channel counts when
        asked (:mod:`eedn.core.transfer`). Returns a report of what it changed; families may override it."""
        from eedn.core.transfer import load_pretrained_weights

        return load_pretrained_weights(self, path, self.display_name, self.classifier_keys, self.first_conv_key,
                                       adapt_input_channels)

    @property
    def display_name(self) -> str:
        """What the run log calls this model ("T2T-ViT tiny"); families may set ``_display_name``."""
        return getattr(self, "_display_name", type(self).__name__)

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
    #: True if a trained gate moves along one knob (a logit offset) to meet a budget target: ``calibrate`` then
    #: serves ``macs_fraction`` / ``accuracy_drop`` without retraining, and the run re-scores with it.
    retargetable: bool = False
    #: True if exit ``l``'s score reads earlier exits' logits: callers use :meth:`score_exit` with ``past``.
    reads_history: bool = False

    def __init__(self, num_exits: int, num_classes: int, **options: Any):
        super().__init__()
        self.num_exits = num_exits
        self.num_classes = num_classes
        #: the gate's declared options, validated (see :mod:`eedn.core.options`)
        self.options = declared_options(f"gate {type(self).__name__}", type(self), options)

    @abstractmethod
    def scores(self, exit_index: int, logits: Tensor, features: Tensor | None = None) -> Tensor:
        """Score ``[B]`` of exit ``exit_index`` from its IM's logits (and features)."""

    def score_exit(self, exit_index: int, logits: Tensor, features: Tensor | None = None,
                   past: Tensor | None = None) -> Tensor:
        """Score ``[B]`` of exit ``exit_index`` given also the reported logits ``past`` ``[B, l, C]`` of exits
        ``0..l-1`` (causal: nothing beyond exit ``l``). Every caller uses this; only history gates read ``past``."""
        return self.scores(exit_index, logits, features)

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
    def calibrate(self, val: ExitOutputs, target: dict) -> None:
        """Set the gate's thresholds on ``val`` so that it meets ``target``: one of
        ``{"exit_shares": [E floats]}``, ``{"p": float}`` (MSDNet geometric budget),
        ``{"macs_fraction": float}`` or ``{"accuracy_drop": float}``."""
        raise NotImplementedError(f"{type(self).__name__} has no budget calibration")

    def budget_sweep(self) -> list[dict]:
        """The targets of this gate's default accuracy-vs-cost sweep (e.g. the geometric budgets p = 1..39)."""
        return []


@dataclass(frozen=True)
class Metric:
    """How to show one headline number an evaluator reports: a label, a display scale (100 for a
    percentage), digits, and whether lower is better. Stored in results.json, so readers need no plugin."""

    label: str
    scale: float = 1.0
    digits: int = 2
    lower_is_better: bool = True

    def to_dict(self) -> dict:
        return {"label": self.label, "scale": self.scale, "digits": self.digits,
                "lower_is_better": self.lower_is_better}


class Evaluator(ABC):
    """Turns stored exit outputs into metrics, and says which of them are its headline numbers.

    Per trained setting the pipeline calls :meth:`fit` once on the cal split, then :meth:`evaluate` for
    every operating point (policy) of that setting. :meth:`headline` picks the flat numbers each
    operating point carries in results.json (and that ``eedn compare`` matches at equal cost; their
    display is declared by :meth:`headline_metrics`); :meth:`rows` gives the flat rows results.json keeps
    for the reported policy. Nothing in the core knows any evaluator by name.
    """

    name: str = "evaluator"

    def __init__(self, **options: Any):
        #: the evaluator's declared options, validated (see :mod:`eedn.core.options`)
        self.options = declared_options(f"evaluator '{self.name}'", type(self), options)

    def fit(self, cal: ExitOutputs) -> None:
        """Fit what depends only on the trained heads (e.g. temperatures) on the cal split; default none."""

    @abstractmethod
    def evaluate(self, test: ExitOutputs, cal: ExitOutputs, exit_test: Tensor, exit_cal: Tensor) -> dict:
        """Metrics for a policy whose exit indices are ``exit_test`` / ``exit_cal``; JSON-able."""

    def headline_metrics(self) -> dict[str, Metric]:
        """The keys :meth:`headline` returns, with how to show them; default none."""
        return {}

    def headline(self, metrics: dict) -> dict[str, float | None]:
        """The flat headline numbers of one :meth:`evaluate` result; default none."""
        return {}

    def rows(self, metrics: dict) -> list[dict]:
        """Flat rows of one :meth:`evaluate` result for results.json; default none."""
        return []


class Logger(ABC):
    """An experiment tracker (TensorBoard, MLflow, a CSV file): gets one run's numbers as they are made.

    Per run the pipeline calls :meth:`check` before stage 0 (a missing library stops the run there, in one
    line), :meth:`start` once, :meth:`log_config`, :meth:`log_metrics` for every finished epoch of every stage
    (names ``"<stage>/<metric>"``, step = epoch), for every operating point and for the final numbers,
    :meth:`log_table` for the operating points with their settings, :meth:`log_figure` for each figure of the
    run directory, and :meth:`close` at the end, also when the run fails. Loggers write under ``tracking_dir``
    (beside the run directories, never inside one, so a run directory stays complete-or-absent) unless their
    options say otherwise.
    """

    name: str = "logger"

    def __init__(self, **options: Any):
        #: the logger's declared options, validated (see :mod:`eedn.core.options`)
        self.options = declared_options(f"logger '{self.name}'", type(self), options)

    def check(self) -> None:
        """Raise :class:`eedn.runtime.errors.EednError` when this logger cannot run here (its library is not
        installed); called before anything is trained. Default: nothing to check."""

    @abstractmethod
    def start(self, run_name: str, tracking_dir: os.PathLike[str] | str) -> str:
        """Open the run's record; return where it is (a path or URI, recorded in results.json)."""

    @abstractmethod
    def log_config(self, config: dict) -> None:
        """The resolved config (config.json's content)."""

    @abstractmethod
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Numbers at one step (an epoch, an operating point's cost in ‰ of full MACs, or 0 for final ones)."""

    def log_figure(self, path: os.PathLike[str] | str) -> None:
        """A PNG of the run directory; default: not kept (the run directory has it)."""

    def log_table(self, name: str, rows: list[dict]) -> None:
        """Rows of one table (``operating_points``: every trained setting and budget with its numbers); default:
        not kept (results.json has it)."""

    @abstractmethod
    def close(self, status: str = "finished") -> None:
        """Flush and end the record; ``status`` is ``finished`` or ``failed``."""


class DatasetSource(ABC):
    """Yields train / val / cal / test splits; never downloads."""

    num_classes: int
    channels: int
    default_image_size: int

    def __init__(self, **options: Any):
        #: the source's declared options, validated (see :mod:`eedn.core.options`)
        self.options = declared_options(f"dataset {type(self).__name__}", type(self), options)

    #: backbone epochs that train well on this data when the user gives none.
    suggested_backbone_epochs: int = 30

    @abstractmethod
    def splits(self, image_size: int, seed: int, augment: bool = True) -> DataSplits:
        """Build the four splits; val/cal/test use evaluation transforms."""

    def describe(self) -> dict:
        return self.options.as_dict()


