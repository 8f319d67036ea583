"""eedn: early-exit dynamic neural networks in PyTorch.

Library use::

    import eedn
    model = eedn.create_model("t2t_vit_7", num_classes=10, image_size=32, gate="jei")
    results = eedn.run_pipeline({"backbone": "t2t_vit", "strategy": "jei", "dataset": "digits"})
"""
from __future__ import annotations

__version__ = "0.1.0"

from eedn.contracts import (  # noqa: E402
    Backbone,
    DatasetSource,
    Evaluator,
    Gate,
    InferenceModule,
    InputSpec,
    StrategyResult,
    TrainingStrategy,
    select_rows,
)
from eedn.data import DataSplits  # noqa: E402
from eedn.errors import EednError, UnknownNameError  # noqa: E402
from eedn.hookspecs import hookimpl  # noqa: E402
from eedn.model import EarlyExitModel, build_model, create_model  # noqa: E402
from eedn.outputs import ExitOutputs  # noqa: E402
from eedn.plugins import create, list_names, register_plugin, registry  # noqa: E402


def run_pipeline(config: dict | None = None, sets: list[str] | None = None, **overrides):
    """Run the whole pipeline (data → backbone → strategy → outputs → evaluators → run directory) and
    return the results.json content. ``eedn run`` on the command line does the same."""
    from eedn.run import run_pipeline as _run_pipeline

    return _run_pipeline(config, sets, **overrides)


__all__ = [
    "Backbone", "DatasetSource", "Evaluator", "Gate", "InferenceModule", "InputSpec", "StrategyResult",
    "TrainingStrategy", "select_rows", "DataSplits", "EednError", "UnknownNameError", "hookimpl",
    "EarlyExitModel", "build_model", "create_model", "ExitOutputs", "create", "list_names",
    "register_plugin", "registry", "run_pipeline",
]
