"""eedn: early-exit dynamic neural networks in PyTorch.

Library use (docs/api.md lists the whole public API)::

    import eedn
    results = eedn.run_pipeline({"backbone": "t2t_vit", "strategy": "jei", "dataset": "digits"})
    model, manifest = eedn.load_run(results["run_dir"])

Names are imported on first use, so ``import eedn`` (and the ``eedn`` command's start) stays fast: torch
is loaded only when a name that needs it is touched. Editors and type checkers read the names from
``__init__.pyi`` beside this file (tests/test_api.py keeps the two in step).
"""
from __future__ import annotations

import importlib
from typing import Any

from eedn.runtime.errors import EednError, UnknownNameError
from eedn.core.hookspecs import hookimpl

from eedn.runtime.version import __version__

#: public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    # contracts a plugin implements
    "Backbone": "eedn.core.contracts", "InferenceModule": "eedn.core.contracts", "Gate": "eedn.core.contracts",
    "Evaluator": "eedn.core.contracts", "DatasetSource": "eedn.core.contracts", "InputSpec": "eedn.core.contracts",
    "Metric": "eedn.core.contracts", "select_rows": "eedn.core.contracts",
    "TrainingStrategy": "eedn.train.strategy", "StrategyResult": "eedn.train.strategy", "FitContext": "eedn.train.strategy",
    # declared plugin options
    "option": "eedn.core.options", "resolve_options": "eedn.core.options",
    # a calibratable confidence-threshold gate to subclass, and its budget helpers
    "ThresholdGate": "eedn.core.budgets",
    # data and stored outputs
    "DataSplits": "eedn.core.data", "TensorImages": "eedn.core.data", "stratified_holdout": "eedn.core.data", "hold_out": "eedn.core.data",
    "subset": "eedn.core.data", "channel_statistics": "eedn.core.data", "dataset_labels": "eedn.core.data",
    "MappedDataset": "eedn.core.data",
    "ExitOutputs": "eedn.core.outputs", "read_outputs": "eedn.pipeline.rundir",
    # models
    "EarlyExitModel": "eedn.core.model", "build_model": "eedn.core.build", "create_model": "eedn.core.build",
    "build_backbone": "eedn.core.build",
    # registries
    "create": "eedn.core.plugins", "list_names": "eedn.core.plugins", "register_plugin": "eedn.core.plugins",
    "registry": "eedn.core.plugins",
    # research API
    "Config": "eedn.core.config", "resolve_config": "eedn.core.config",
    "run_pipeline": "eedn.pipeline.run", "load_run": "eedn.pipeline.api", "measure_exit_macs": "eedn.core.cost",
    "split_outputs": "eedn.pipeline.api", "fit_strategy": "eedn.pipeline.api", "apply_gate": "eedn.evaluation.policy",
    "calibrate_gate": "eedn.pipeline.api", "evaluate": "eedn.pipeline.api", "load_dataset": "eedn.pipeline.api", "train_backbone": "eedn.pipeline.api",
    "read_results": "eedn.pipeline.rundir", "Progress": "eedn.runtime.progress",
    # real early-exit inference
    "EarlyExitEngine": "eedn.deploy.inference", "InferenceResult": "eedn.deploy.inference", "predict_files": "eedn.deploy.predict",
    "read_images": "eedn.deploy.predict", "benchmark": "eedn.deploy.bench",
}

__all__ = ["EednError", "UnknownNameError", "hookimpl", "__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'eedn' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))

