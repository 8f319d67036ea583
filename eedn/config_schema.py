"""The typed schema of every config key that is not a plugin's option.

Each key, nested ones included (``backbone_training.lr``, ``risk_control.epsilon``), is checked and coerced by
the same machinery as plugin options (:func:`eedn.options.coerce`): ``1e-3`` is the float 0.001 whether YAML
read it as a string or not, a typo in a nested key is an error that names the valid keys, and a config file,
a keyword override, the CLI and ``--set`` all go through the same checks.

Adding a config key: put its default in :data:`eedn.config.DEFAULTS`; a key without an entry here is typed by
its default (bool, int, float, str, list; a mapping is a section whose keys are checked one by one). Declare
it here with :func:`key` to give it a help text, limits, choices or a type its default does not show (a
``None`` default).
"""
from __future__ import annotations

import difflib
import os
from typing import Any

from eedn.errors import EednError
from eedn.options import OptionSpec, coerce


def key(name: str, type_: Any, help: str = "", *, choices: tuple | None = None, min: float | None = None,
        max: float | None = None, above: float | None = None) -> OptionSpec:
    """A config key's declaration (the default lives in ``DEFAULTS``)."""
    return OptionSpec(name, type_, None, help, choices, min, max, above)


_DECLARED = [
    key("backbone", str | None, "backbone name (None: the registered default)"),
    key("strategy", str | None, "training strategy (None: the registered default)"),
    key("gate", str | None, "gate (None: the strategy's own, else the default gate)"),
    key("inference_module", str | None, "inference module (None: the registered default)"),
    key("dataset", str | None, "dataset source (None: the registered default)"),
    key("tradeoff", float | list[float] | None, "the strategy's cost trade-off (--lambda)", min=0),
    key("image_size", int | None, "input size in pixels (None: the dataset's)", min=1),
    key("seed", int, "random seed", min=0),
    key("device", str, "cpu, cuda or cuda:N"),
    key("threads", int | None, "torch CPU threads", min=1),
    key("backbone_training.checkpoint", str | None, "a trained backbone to load"),
    key("backbone_training.adapt_input_channels", bool, "adapt the checkpoint's first convolution"),
    key("backbone_training.epochs", int | None, "epochs of backbone training", min=0),
    key("backbone_training.optimizer", str, "optimiser of stage 0", choices=("adamw", "sgd")),
    key("backbone_training.lr", float | None, "learning rate of stage 0", above=0),
    key("backbone_training.weight_decay", float | None, "weight decay of stage 0", min=0),
    key("backbone_training.batch_size", int, "batch size of stage 0", min=1),
    key("backbone_training.label_smoothing", float, "label smoothing of stage 0", min=0, max=1),
    key("backbone_training.warmup_epochs", int, "linear warm-up epochs of stage 0", min=0),
    key("backbone_training.augment", bool, "train-time augmentation"),
    key("policy_setting", str | None, "the trained setting reported as the policy"),
    key("evaluators", list[str] | None, "evaluators to run (None: the default ones)"),
    key("eval_batch_size", int, "batch size of evaluation passes", min=1),
    key("out", str | None, "run directory"),
    key("overwrite", bool, "replace a non-empty run directory"),
    key("cache_dir", str | None, "backbone and feature cache"),
    key("cache_fp16", bool, "store cached features in fp16"),
    key("num_workers", int, "DataLoader workers", min=0),
    key("pin_memory", bool | None, "pinned host memory (None: on CUDA)"),
    key("persistent_workers", bool, "keep DataLoader workers between epochs"),
    key("precision", str, "autocast precision: fp32, bf16 or fp16"),
    key("channels_last", Any, "NHWC images and weights: auto, true or false (checked by eedn.config.validate)"),
    key("progress", bool, "live progress lines"),
    key("resume", bool, "continue an interrupted backbone training"),
    key("risk_control.risk", str | None, "a registered risk (None: risk control off)"),
    key("risk_control.epsilon", float, "the risk level"),
    key("risk_control.delta", float, "the failure probability of high-probability controllers"),
    key("risk_control.controller", str, "risk controller"),
    key("risk_control.knob", str, "the knob risk control sets"),
    key("risk_control.grid_size", int, "knob values tried", min=2),
    key("risk_control.epsilons", list[float], "the risk levels of the sweep figure"),
]
#: every declared key by its dotted name
SCHEMA: dict[str, OptionSpec] = {spec.name: spec for spec in _DECLARED}

#: mappings whose keys belong to a plugin (checked against its declared options before stage 0) or name
#: evaluators: only their being a mapping is checked here
OPEN_SECTIONS = {"backbone_options", "strategy_options", "gate_options", "inference_module_options",
                 "dataset_options", "evaluator_options", "risk_control.risk_options"}

#: ``budget``: exactly one target, with the options some targets take
BUDGET_KEYS = {
    "macs_fraction": key("budget.macs_fraction", float, "mean MACs as a fraction of the full network", above=0,
                         max=1),
    "accuracy_drop": key("budget.accuracy_drop", float, "val accuracy given up", min=0, max=1),
    "p": key("budget.p", float, "geometric exit-share parameter", above=0),
    "exit_shares": key("budget.exit_shares", list[float], "share of samples per exit", min=0),
    "divisor": key("budget.divisor", float, "divisor of p", above=0),
    "include_final": key("budget.include_final", bool, "the final exit takes a share"),
}
BUDGET_TARGETS = ("macs_fraction", "accuracy_drop", "p", "exit_shares")


def check_config(cfg: dict, defaults: dict) -> dict:
    """``cfg`` with every key checked against the schema and coerced to its declared type (in place)."""
    unknown_keys("config key", cfg, defaults, "")
    for name in list(cfg):
        cfg[name] = check_value(name, cfg[name], defaults[name])
    return cfg


def unknown_keys(what: str, given: dict, known: dict, prefix: str) -> None:
    unknown = sorted(set(given) - set(known))
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), list(known), n=1)
        hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
        raise EednError(f"unknown {what}(s) {', '.join(prefix + str(k) for k in unknown)}{hint}; known: "
                        f"{', '.join(prefix + k for k in known)}")


def check_value(name: str, value: Any, default: Any) -> Any:
    """One key's value, checked and coerced; a section's keys one by one."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if name in OPEN_SECTIONS:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise EednError(f"{name} must be a mapping of options, got {value!r}")
        return value
    if name == "budget":
        return check_budget(value)
    if isinstance(default, dict) and name not in SCHEMA:
        if not isinstance(value, dict):
            raise EednError(f"{name} must be a mapping with keys {', '.join(default)}, got {value!r}")
        unknown_keys("config key", value, default, f"{name}.")
        return {k: check_value(f"{name}.{k}", v, default[k]) for k, v in value.items()}
    spec = SCHEMA.get(name) or key(name, type(default) if default is not None else Any)
    return coerce("config", spec, value)


def check_budget(value: Any) -> dict:
    """``budget``: one of {macs_fraction: F}, {accuracy_drop: D}, {p: P[, divisor, include_final]},
    {exit_shares: [...]}, each value within its limits."""
    targets = [k for k in (value or {}) if k in BUDGET_TARGETS] if isinstance(value, dict) else []
    if not isinstance(value, dict) or len(targets) != 1:
        raise EednError("budget must be one of {macs_fraction: F}, {accuracy_drop: D}, {p: P}, "
                        f"{{exit_shares: [...]}}, got {value!r}")
    unknown_keys("budget key", value, BUDGET_KEYS, "budget.")
    return {k: coerce("config", BUDGET_KEYS[k], v) for k, v in value.items()}
