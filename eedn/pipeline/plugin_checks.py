"""Every plugin name and option of a config, checked before anything is trained (what ``eedn run`` and ``eedn
compare`` call first): the strategy, its gate and the evaluators are built, each role's options validated, and
contradictions between them refused in one line."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

from eedn.core.config import Config
from eedn.core.contracts import Evaluator
from eedn.core.plugins import create, registry
from eedn.pipeline.risk_run import check_risk_config
from eedn.pipeline.tracking import build_loggers
from eedn.runtime.errors import EednError
from eedn.train.strategy import TrainingStrategy


def strategy_options(cfg: Config) -> dict:
    """The strategy's options, with the command line's trade-off (``--lambda``, config ``tradeoff``) put under
    the option the strategy names for it (its ``tradeoff_option``)."""
    options = dict(cfg.strategy_options)
    if cfg.tradeoff is not None:
        assert cfg.strategy is not None  # resolve_config names every plugin
        name = cast("type[TrainingStrategy]", registry("strategy").get(cfg.strategy).factory).tradeoff_option
        if name is None:
            raise EednError(f"--lambda sets a cost trade-off, but strategy '{cfg.strategy}' has none; drop it "
                            f"(`eedn plugins {cfg.strategy}` lists the strategy's options)")
        options[name] = cfg.tradeoff
    return options


@dataclass
class CheckedPlugins:
    """What :func:`check_plugins` built and resolved: the strategy and evaluators (cheap objects, no tensors),
    the gate's name, and every plugin's validated options by role (plain dicts: they are recorded in run.json)."""

    strategy: TrainingStrategy
    gate: str
    evaluators: dict[str, Evaluator]
    dataset_options: dict[str, Any]
    backbone_options: dict[str, Any]
    strategy_options: dict[str, Any]
    gate_options: dict[str, Any]
    im_options: dict[str, Any]
    #: the experiment trackers (``--logger``), built and checked, not started
    loggers: dict[str, Any] = field(default_factory=dict)


def check_plugins(cfg: Config) -> CheckedPlugins:
    """Every plugin name and option of a config, validated before anything is trained: an unknown name, a
    typo in an option, options that contradict each other, or a learned gate without a strategy that trains
    it fail here, not after stage 0."""
    # resolve_config names every plugin
    assert cfg.strategy is not None and cfg.dataset is not None and cfg.backbone is not None
    assert cfg.inference_module is not None and cfg.evaluators is not None
    strategy: TrainingStrategy = create("strategy", cfg.strategy, **strategy_options(cfg))
    gate = cfg.gate or strategy.default_gate or registry("gate").default()
    gate_entry = registry("gate").get(gate)
    gate_options = gate_entry.resolve(cfg.gate_options)
    learned = bool(getattr(gate_entry.factory, "trainable", False))
    if learned and strategy.trains_gate:
        gate_options = _with_strategy_gate_options(cfg, gate_entry, gate_options, strategy.gate_options())
    if learned and not strategy.trains_gate:
        raise EednError(f"gate '{gate}' is learned, but strategy '{cfg.strategy}' does not train gates, so it "
                        "would run untrained; pick a strategy that trains it or a rule-based gate")
    if strategy.trains_gate and not learned:
        raise EednError(f"strategy '{cfg.strategy}' trains its gate, but gate '{gate}' has nothing to train; "
                        "drop the gate option to use the strategy's own")
    unknown = sorted(set(cfg.evaluator_options) - set(cfg.evaluators))
    if unknown:
        raise EednError(f"evaluator_options names {', '.join(unknown)}, which is not among the evaluators "
                        f"({', '.join(cfg.evaluators) or 'none'}); add it to evaluators or drop its options")
    evaluators = {name: create("evaluator", name, **cfg.evaluator_options.get(name, {}))
                  for name in cfg.evaluators}
    check_risk_config(cfg, evaluators)
    return CheckedPlugins(
        strategy, gate, evaluators,
        dataset_options=registry("dataset").get(cfg.dataset).resolve(cfg.dataset_options),
        backbone_options=registry("backbone").get(cfg.backbone).resolve(cfg.backbone_options),
        strategy_options=strategy.options.as_dict(),
        gate_options=gate_options,
        im_options=registry("inference_module").get(cfg.inference_module).resolve(cfg.inference_module_options),
        loggers=build_loggers(cfg))


def _with_strategy_gate_options(cfg: Config, gate_entry: Any, resolved: dict, implied: dict) -> dict:
    """The gate's options with those its training strategy sets (its exit rule); a different explicit value
    in ``gate_options`` is refused rather than silently overridden."""
    clash = sorted(k for k, v in implied.items() if k in cfg.gate_options and resolved.get(k) != v)
    if clash:
        raise EednError(f"gate_options {', '.join(clash)} contradicts strategy '{cfg.strategy}', which sets it "
                        f"on the gate it trains ({', '.join(f'{k}={implied[k]}' for k in clash)}); set it as a "
                        "strategy option instead")
    return gate_entry.resolve({**cfg.gate_options, **implied})
