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

from eedn.errors import EednError, UnknownNameError
from eedn.hookspecs import hookimpl

__version__ = "0.1.0"

#: public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    # contracts a plugin implements
    "Backbone": "eedn.contracts", "InferenceModule": "eedn.contracts", "Gate": "eedn.contracts",
    "Evaluator": "eedn.contracts", "DatasetSource": "eedn.contracts", "InputSpec": "eedn.contracts",
    "Metric": "eedn.contracts", "select_rows": "eedn.contracts",
    "TrainingStrategy": "eedn.strategy", "StrategyResult": "eedn.strategy", "FitContext": "eedn.strategy",
    # declared plugin options
    "option": "eedn.options", "resolve_options": "eedn.options",
    # a calibratable confidence-threshold gate to subclass, and its budget helpers
    "ThresholdGate": "eedn.budgets",
    # data and stored outputs
    "DataSplits": "eedn.data", "TensorImages": "eedn.data", "stratified_holdout": "eedn.data", "hold_out": "eedn.data",
    "subset": "eedn.data", "channel_statistics": "eedn.data", "dataset_labels": "eedn.data",
    "MappedDataset": "eedn.data",
    "ExitOutputs": "eedn.outputs", "read_outputs": "eedn.outputs",
    # models
    "EarlyExitModel": "eedn.model", "build_model": "eedn.build", "create_model": "eedn.build",
    "build_backbone": "eedn.build",
    # registries
    "create": "eedn.plugins", "list_names": "eedn.plugins", "register_plugin": "eedn.plugins",
    "registry": "eedn.plugins",
    # research API
    "run_pipeline": "eedn.run", "load_run": "eedn.api", "measure_exit_macs": "eedn.cost",
    "split_outputs": "eedn.api", "fit_strategy": "eedn.api", "apply_gate": "eedn.policy",
    "calibrate_gate": "eedn.api", "evaluate": "eedn.api", "load_dataset": "eedn.api", "train_backbone": "eedn.api",
    "read_results": "eedn.rundir", "Progress": "eedn.progress",
    # real early-exit inference
    "EarlyExitEngine": "eedn.inference", "InferenceResult": "eedn.inference", "predict_files": "eedn.predict",
    "read_images": "eedn.predict", "benchmark": "eedn.bench",
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

