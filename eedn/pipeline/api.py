"""The research API behind ``import eedn``: the pipeline's steps as functions.

:func:`eedn.run_pipeline` is ``eedn run`` in one call; these functions are its steps, for experiments that
change one of them: :func:`load_dataset` → :func:`eedn.create_model` → :func:`train_backbone` (stage 0) →
:func:`fit_strategy` → :func:`split_outputs` per split → :func:`calibrate_gate` / :func:`eedn.apply_gate` →
:func:`evaluate`; :func:`eedn.read_outputs` reads a finished run's stored outputs. Each takes ``seed=`` where it
draws random numbers, and draws only from it (:mod:`eedn.runtime.seeding`).
docs/api.md lists the whole public API with an example; examples/library_use.py runs it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, cast

from torch import Tensor

from eedn.train.backbone_training import recipe
from eedn.train.backbone_training import train_backbone as train_stage_0
from eedn.core.cache import FeatureCache
from eedn.core.contracts import Backbone, Evaluator, Gate
from eedn.core.cost import measure_exit_macs
from eedn.core.data import DataSplits
from eedn.runtime.errors import EednError
from eedn.train.features import FeatureSource, compute_split_outputs
from eedn.core.model import EarlyExitModel
from eedn.core.outputs import ExitOutputs
from eedn.core.plugins import create, registry
from eedn.evaluation.policy import calibrated_copy
from eedn.runtime.progress import Progress
from eedn.pipeline.rundir import POLICY_HEADS, load_model
from eedn.runtime.seeding import seeded
from eedn.train.strategy import FitContext, StrategyResult, TrainingStrategy

SPLITS = ("train", "val", "cal", "test")


def load_dataset(name: str, image_size: int | None = None, seed: int = 0, *, augment: bool = False,
                 **options: Any) -> DataSplits:
    """The train / val / cal / test splits of a registered dataset source (``eedn plugins`` lists them).

    ``image_size`` defaults to the source's own; ``seed`` fixes the held-out splits; ``augment`` adds the
    training augmentation to ``train`` (val/cal/test and ``train_eval`` never have it); ``options`` are the
    source's options, e.g. ``data_dir=...``. Nothing is downloaded."""
    source = create("dataset", name, **options)
    return source.splits(image_size or source.default_image_size, seed=seed, augment=augment)


def _device(model: EarlyExitModel, device: str | None) -> str:
    if device is not None:
        return device
    return str(next(model.parameters()).device)


def _feature_source(model: EarlyExitModel, data: DataSplits, cache_dir: str | os.PathLike | None, device: str,
                    batch_size: int, *, cacheable: bool = True, backbone_mode: str = "eval",
                    progress: Progress | None = None) -> FeatureSource:
    """Per-exit features of ``data`` under ``model``'s backbone, cached in ``cache_dir`` when given. The
    cache key holds the backbone's weights and the splits' description (source, image size, seed)."""
    key = {"name": data.name, "sizes": data.sizes(), **{k: v for k, v in data.info.items() if k != "augment"}}
    cache = FeatureCache(Path(cache_dir) / "features") if cache_dir is not None else None
    return FeatureSource(model, data, device=device, cache=cache, cacheable=cacheable, backbone_mode=backbone_mode,
                         batch_size=batch_size, dataset_key=key, progress=progress)


def split_outputs(model: EarlyExitModel, data: DataSplits, split: str, cache_dir: str | os.PathLike | None = None,
                  *, exit_macs: list[int] | None = None, full_macs: int | None = None, device: str | None = None,
                  batch_size: int = 256) -> ExitOutputs:
    """Every exit's logits and gate scores on one split (``train``, ``val``, ``cal`` or ``test``), from one
    backbone pass: what policies and evaluators read.

    With ``cache_dir`` the backbone's per-exit features are cached there (reused by later calls and by
    :func:`fit_strategy` with the same directory). ``exit_macs``/``full_macs`` are measured when not given
    (:func:`eedn.measure_exit_macs`); ``device`` defaults to the model's."""
    if split not in SPLITS:
        raise EednError(f"unknown split '{split}'; choose one of {', '.join(SPLITS)}")
    if exit_macs is None or full_macs is None:
        exit_macs, full_macs = measure_exit_macs(model)
    source = _feature_source(model, data, cache_dir, _device(model, device), batch_size)
    return compute_split_outputs(model, source, split, exit_macs, full_macs, batch_size)


def _strategy_options(name: str, tradeoff: Any, strategy_options: dict[str, Any] | None,
                      options: dict[str, Any]) -> dict[str, Any]:
    """``strategy_options`` and keyword options in one dict, with ``tradeoff`` under the option the strategy
    names for its cost trade-off (``tradeoff_option``, e.g. JEI's ``lambda``)."""
    merged = dict(strategy_options or {})
    twice = sorted(set(merged) & set(options))
    if twice:
        raise EednError(f"fit_strategy: option {', '.join(twice)} given both in strategy_options and as a keyword; "
                        "give it once")
    merged |= options
    if tradeoff is not None:
        option_name = cast("type[TrainingStrategy]", registry("strategy").get(name).factory).tradeoff_option
        if option_name is None:
            raise EednError(f"fit_strategy: strategy '{name}' has no cost trade-off, so tradeoff= has nothing to "
                            f"set; drop it (`eedn plugins {name}` lists the strategy's options)")
        if option_name in merged:
            raise EednError(f"fit_strategy: tradeoff= sets the strategy's option '{option_name}', which is also "
                            "given in the options; give it once")
        merged[option_name] = tradeoff
    return merged


def fit_strategy(strategy: str | TrainingStrategy, model: EarlyExitModel, data: DataSplits, *,
                 tradeoff: float | list[float] | None = None, strategy_options: dict[str, Any] | None = None,
                 cache_dir: str | os.PathLike | None = None, seed: int = 0, device: str | None = None,
                 feature_batch_size: int = 256, progress: Progress | None = None, **options: Any) -> StrategyResult:
    """Train ``model``'s inference modules and gate (and its backbone, for strategies that do) on ``data``.

    ``strategy`` is a registered name or a strategy object. A name takes its options as ``strategy_options``
    (a dict: any option name, ``{"lambda": [0.1, 1.0]}`` included) and/or as keywords (``epochs=2``,
    ``batch_size=32``: the strategy's training batch); ``tradeoff`` is the cost trade-off (JEI's λ) under
    whatever option the strategy names for it, like ``eedn run --lambda``. ``feature_batch_size`` is the
    batch of the backbone passes that extract the per-exit features (memory, not results).

    Like ``eedn run``: attaches the strategy's extra modules, freezes the backbone, measures the exit costs
    and serves the per-exit features (cached in ``cache_dir`` when the backbone stays fixed). Everything is
    drawn from ``seed`` (the same seed gives the same heads) and the global random state is left as it was.
    The model ends holding the first trained setting's heads (the one ``eedn run`` reports by default); the
    result holds every setting's heads (``model.load_heads_state_dict(state)``)."""
    if isinstance(strategy, str):
        strategy = cast(TrainingStrategy, create("strategy", strategy,
                                                 **_strategy_options(strategy, tradeoff, strategy_options, options)))
    elif options or strategy_options or tradeoff is not None:
        given = [*options, *(strategy_options or {}), *(["tradeoff"] if tradeoff is not None else [])]
        raise EednError(f"fit_strategy: options {', '.join(given)} go to the strategy's constructor, not here")
    device = _device(model, device)
    with seeded(seed):
        strategy.prepare_model(model)
        model.freeze_backbone()
        exit_macs, full_macs = measure_exit_macs(model)
        progress = progress or Progress(enabled=False)
        source = _feature_source(model, data, cache_dir, device, feature_batch_size,
                                 cacheable=strategy.uses_fixed_features, backbone_mode=strategy.backbone_mode,
                                 progress=progress)
        context = FitContext(features=source, exit_macs=exit_macs, full_macs=full_macs, seed=seed, device=device,
                             progress=progress)
        result = strategy.fit(model, context)
    if strategy.trains_backbone:
        model.freeze_backbone()
    if result.settings:
        model.load_heads_state_dict(result.settings[0][1])
    return result


def train_backbone(model: EarlyExitModel | Backbone, data: DataSplits, *, epochs: int, optimizer: str = "adamw",
                   lr: float | None = None, weight_decay: float | None = None, batch_size: int = 64,
                   label_smoothing: float = 0.1, warmup_epochs: int = 1, seed: int = 0, device: str | None = None,
                   save_to: str | os.PathLike | None = None, resume: bool = False, precision: str = "fp32",
                   progress: Progress | None = None) -> dict:
    """Stage 0 of ``eedn run``: train the backbone on its own head (cross-entropy with label smoothing,
    ``optimizer`` ``adamw`` or ``sgd``, linear warm-up then cosine decay), in place, keeping the epoch with
    the best val accuracy. Returns ``{"val_accuracy", "epochs", "history"}``.

    Give an :class:`EarlyExitModel` (its backbone is trained, its heads are left alone) or a backbone. The
    defaults are ``eedn run``'s (``backbone_training`` in the config); ``lr``/``weight_decay`` None pick the
    optimiser's (1e-3 / 0.05 for adamw, 0.05 / 5e-4 for sgd). Augmentation comes with the data:
    ``eedn.load_dataset(..., augment=True)``. ``save_to`` writes the trained weights there (and a resumable
    checkpoint beside it every epoch; ``resume=True`` continues from it); ``eedn.create_model(...,
    checkpoint=save_to)`` loads them. Everything is drawn from ``seed`` and the global random state is left
    as it was. The backbone's ``requires_grad`` flags are restored afterwards."""
    backbone = model.backbone if isinstance(model, EarlyExitModel) else model
    if not isinstance(backbone, Backbone):
        raise EednError(f"train_backbone: expected an EarlyExitModel or a Backbone, got {type(model).__name__}")
    if optimizer not in ("adamw", "sgd"):
        raise EednError(f"train_backbone: optimizer must be 'adamw' or 'sgd', not '{optimizer}'")
    rec = recipe({"epochs": epochs, "optimizer": optimizer, "lr": lr, "weight_decay": weight_decay,
                  "batch_size": batch_size, "label_smoothing": label_smoothing, "warmup_epochs": warmup_epochs},
                 epochs)
    device = str(next(backbone.parameters()).device) if device is None else device
    flags = {name: p.requires_grad for name, p in backbone.named_parameters()}
    backbone.requires_grad_(True)
    try:
        with seeded(seed):
            return train_stage_0(backbone, data, rec, seed=seed, device=device,
                                 checkpoint_path=Path(save_to) if save_to is not None else None, resume=resume,
                                 progress=progress, precision=precision)
    finally:
        for name, p in backbone.named_parameters():
            p.requires_grad_(flags[name])
        backbone.eval()


def calibrate_gate(gate: Gate, val: ExitOutputs, target: dict | float) -> Gate:
    """A copy of a threshold gate calibrated on stored val outputs to meet ``target``: a fraction of the
    full MACs (a number, met within ±0.02 where the gate's settings allow) or one of ``{"macs_fraction": f}``,
    ``{"accuracy_drop": d}``, ``{"p": p}`` (MSDNet's geometric budget), ``{"exit_shares": [...]}``. The gate
    passed in is left unchanged."""
    if not gate.calibratable:
        raise EednError(f"gate {type(gate).__name__} has no budget calibration; it is applied as trained")
    if isinstance(target, (int, float)):
        target = {"macs_fraction": float(target)}
    return calibrated_copy(gate, val, target)


def evaluate(evaluator: str | Evaluator, test: ExitOutputs, cal: ExitOutputs, exit_test: Tensor, exit_cal: Tensor,
             **options: Any) -> dict:
    """One evaluator's metrics of a policy: ``exit_test`` / ``exit_cal`` are the exit each test / cal
    sample takes (:func:`eedn.apply_gate`). ``evaluator`` is a registered name (``options`` are its
    options) or an evaluator object; it is first fitted on ``cal``, as the pipeline does."""
    if isinstance(evaluator, str):
        evaluator = cast(Evaluator, create("evaluator", evaluator, **options))
    elif options:
        raise EednError(f"evaluate: options {', '.join(options)} go to the evaluator's constructor, not here")
    evaluator.fit(cal)
    return evaluator.evaluate(test, cal, exit_test, exit_cal)


def load_run(run_dir: str | os.PathLike, setting: str = POLICY_HEADS,
             device: str = "cpu") -> tuple[EarlyExitModel, dict]:
    """The trained model of a run directory, in eval mode, and its manifest (run.json). ``setting`` picks
    the heads: the reported policy by default, or any trained setting listed in ``manifest["settings"]``.
    Needs only the run directory (no dataset)."""
    return load_model(run_dir, setting=setting, device=device)
