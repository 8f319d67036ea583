"""eedn: early-exit dynamic neural networks in PyTorch.

Library use::

    import eedn
    model = eedn.create_model("t2t_vit_7", num_classes=10, image_size=32, gate="jei")
    result = eedn.run({"backbone": "t2t_vit", "strategy": "jei", "dataset": "digits"})
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


def run(config: dict | None = None, **overrides):
    """Run the whole pipeline (data → backbone → strategy → outputs → evaluators → run directory)."""
    from eedn.run import run_pipeline

    return run_pipeline(config, **overrides)


__all__ = [
    "Backbone", "DatasetSource", "Evaluator", "Gate", "InferenceModule", "InputSpec", "StrategyResult",
    "TrainingStrategy", "select_rows", "DataSplits", "EednError", "UnknownNameError", "hookimpl",
    "EarlyExitModel", "build_model", "create_model", "ExitOutputs", "create", "list_names",
    "register_plugin", "registry", "run",
]
