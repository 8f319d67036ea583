"""Configuration: defaults, config files, ``--set key=value`` overrides, validation.

The resolved config is a plain dict saved beside every result (``config.json``), so a run can be
repeated exactly with ``eedn run --config RUN_DIR/config.json``.
"""
from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path
from typing import Any

from eedn.config_schema import check_config
from eedn.errors import EednError
from eedn.risk_run import RISK_DEFAULTS

DEFAULTS: dict[str, Any] = {
    # None for a plugin name: the plugin registered as that kind's default (`eedn plugins` marks it)
    "backbone": None,
    "backbone_options": {},
    "strategy": None,
    "strategy_options": {},
    # --lambda: the strategy's cost trade-off, put under the option the strategy names for it (tradeoff_option)
    "tradeoff": None,
    "gate": None,  # None: the strategy's default gate
    "gate_options": {},
    "inference_module": None,
    "inference_module_options": {},
    "dataset": None,
    "dataset_options": {},
    "image_size": None,  # None: the dataset's default
    "seed": 0,
    "device": "cpu",
    # torch CPU threads. Early-exit heads and small backbones are overhead-bound: on the 2-core dev
    # machine a second thread made T2T-ViT-tiny training 25x slower (788 vs 30 img/s) whenever any other
    # process ran. Raise it for large backbones on an idle machine; None keeps torch's default.
    "threads": 1,
    "backbone_training": {
        "checkpoint": None,  # a trained backbone to load instead of training one
        # adapt the checkpoint's first convolution to the data's channel count (e.g. RGB weights, gray data)
        "adapt_input_channels": False,
        "epochs": None,  # None: the dataset source's suggestion
        "optimizer": "adamw",
        "lr": None,  # None: 1e-3 for adamw, 0.05 for sgd
        "weight_decay": None,  # None: 0.05 for adamw, 5e-4 for sgd
        "batch_size": 64,
        "label_smoothing": 0.1,
        "warmup_epochs": 1,
        "augment": True,
    },
    # operating point for calibratable (threshold) gates; one of several targets, so a given budget replaces it
    "budget": {"macs_fraction": 0.75},
    "policy_setting": None,  # which trained setting (e.g. "lambda=0.5") is the reported policy
    "evaluators": None,  # None: every evaluator registered as on by default
    "evaluator_options": {},
    "eval_batch_size": 256,
    "out": None,  # run directory; None: runs/<dataset>-<backbone>-<strategy>-s<seed>-<time>-<random>
    "overwrite": False,  # replace a non-empty `out` (else refused before anything is trained)
    "cache_dir": None,  # None: $EEDN_CACHE or ~/.cache/eedn
    "cache_fp16": False,
    "num_workers": 0,  # DataLoader workers for datasets not held in memory (docs/scale.md)
    "pin_memory": None,  # None: pinned host memory when the device is CUDA
    "persistent_workers": True,
    # torch.autocast precision of stage 0, features, heads and the engine: fp32, bf16 or fp16 (CUDA)
    "precision": "fp32",
    "channels_last": "auto",  # NHWC images and weights; auto: when the backbone prefers it (convolutions)
    "progress": True,
    "resume": False,
    # risk-controlled exits (--risk/--epsilon/--delta/--controller; docs/evaluation.md): off while risk is null
    "risk_control": RISK_DEFAULTS,
}


def deep_merge(base: dict, update: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def parse_value(text: str) -> Any:
    """``--set`` values: YAML scalars/lists (``0.5``, ``true``, ``[1, 2]``, ``0.01,0.5`` stays a string)."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_set(cfg: dict, assignment: str) -> None:
    """Apply one ``dotted.key=value`` override in place."""
    if "=" not in assignment:
        raise EednError(f"--set expects key=value, got '{assignment}'")
    key, value = assignment.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise EednError(f"--set expects key=value, got '{assignment}'")
    node = cfg
    for p in parts[:-1]:
        if p not in node or not isinstance(node[p], dict):
            node[p] = {}
        node = node[p]
    node[parts[-1]] = parse_value(value)


def load_config_file(path: str | os.PathLike) -> dict:
    import yaml

    p = Path(path)
    if not p.exists():
        raise EednError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) if p.suffix in (".yaml", ".yml") else json.loads(p.read_text())
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise EednError(f"cannot parse config file {p}{where}: {exc.problem or exc.context}; fix the YAML "
                        "there") from exc
    except json.JSONDecodeError as exc:
        raise EednError(f"cannot parse config file {p} at line {exc.lineno}, column {exc.colno}: {exc.msg}; "
                        "fix the JSON there") from exc
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise EednError(f"cannot read config file {p}: {str(exc).splitlines()[0]}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise EednError(f"config file {p} must hold a mapping of options")
    return data


#: mappings that hold one choice among alternatives: a value given for them replaces the default whole
ONE_OF_KEYS = ("budget",)


def resolve_config(config: dict | None = None, sets: list[str] | None = None, **overrides: Any) -> dict:
    """Defaults ← config ← keyword overrides (None means 'not given') ← ``--set`` assignments."""
    config = config or {}
    cfg = deep_merge(DEFAULTS, config)
    cfg.update({k: copy.deepcopy(config[k]) for k in ONE_OF_KEYS if k in config})
    for k, v in overrides.items():
        if v is not None:
            cfg[k] = deep_merge(cfg[k], v) if isinstance(v, dict) and isinstance(cfg.get(k), dict) else v
    replaced: set[str] = set()
    for s in sets or []:
        head = s.split("=", 1)[0].strip().split(".")[0]
        if head in ONE_OF_KEYS and head not in replaced and "." in s.split("=", 1)[0]:
            cfg[head] = {}  # the first --set budget.X=... replaces the default target
            replaced.add(head)
        apply_set(cfg, s)
    check_config(cfg, DEFAULTS)  # every key, nested ones too, typed and within its limits (eedn/config_schema.py)
    validate(cfg)
    fill_plugin_defaults(cfg)
    return cfg


def fill_plugin_defaults(cfg: dict) -> None:
    """Plugin names left unset become the registered defaults, so the saved config names what ran."""
    from eedn.plugins import registry

    for key in ("backbone", "strategy", "dataset", "inference_module"):
        if cfg[key] is None:
            cfg[key] = registry(key).default()
    if cfg["evaluators"] is None:
        cfg["evaluators"] = registry("evaluator").defaults()


def validate(cfg: dict) -> None:
    """What the schema's per-key types and limits cannot say."""
    if cfg["device"] not in ("cpu", "cuda") and not re.fullmatch(r"cuda:\d+", str(cfg["device"])):
        raise EednError(f"device must be cpu or cuda[:N], got {cfg['device']!r}")
    if cfg["precision"] not in ("fp32", "bf16", "fp16"):
        raise EednError(f"precision must be fp32, bf16 or fp16, got {cfg['precision']!r}")
    if cfg["channels_last"] not in ("auto", True, False):
        raise EednError(f"channels_last must be auto, true or false, got {cfg['channels_last']!r}")


def cache_dir(cfg: dict) -> Path:
    d = cfg.get("cache_dir") or os.environ.get("EEDN_CACHE") or (Path.home() / ".cache" / "eedn")
    return Path(d).expanduser()
