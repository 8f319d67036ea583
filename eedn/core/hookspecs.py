"""The one page a plugin author reads: every hook eedn calls.

A plugin is a module (or object) with functions named like these hooks and marked with
``@eedn.hookimpl``. Each ``register_*`` hook receives a ``register(name, factory, **info)`` callable;
call it once per thing you provide. Register the module under the ``eedn`` entry-point group in
your package's ``pyproject.toml`` and eedn finds it after ``pip install``.
"""
from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("eedn")
hookimpl = pluggy.HookimplMarker("eedn")


@hookspec
def register_backbones(register):
    """Register backbone factories: ``register(name, factory)``; ``factory(num_classes, image_size,
    in_channels, **options) -> eedn.Backbone``."""


@hookspec
def register_inference_modules(register):
    """Register inference-module factories: ``register(name, factory)``; ``factory(in_features,
    num_classes, **options) -> eedn.InferenceModule``."""


@hookspec
def register_gates(register):
    """Register gate classes: ``register(name, cls)``; ``cls(num_exits, num_classes, **options) ->
    eedn.Gate``."""


@hookspec
def register_strategies(register):
    """Register training strategies: ``register(name, cls)``; ``cls(**options) ->
    eedn.TrainingStrategy``."""


@hookspec
def register_evaluators(register):
    """Register evaluators: ``register(name, cls)``; ``cls(**options) -> eedn.Evaluator``."""


@hookspec
def register_datasets(register):
    """Register dataset sources: ``register(name, cls)``; ``cls(**options) -> eedn.DatasetSource``."""


@hookspec
def register_risks(register):
    """Register risks for risk-controlled exits: ``register(name, cls)``;
    ``cls(**options) -> eedn.evaluation.risk.Risk``."""


@hookspec
def register_commands(cli):
    """Add commands to the ``eedn`` click group: ``cli.add_command(my_command)``."""
