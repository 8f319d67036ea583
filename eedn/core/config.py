"""The run configuration: one typed key table, :class:`Config`.

Every config key, nested ones included (``backbone_training.lr``, ``risk_control.epsilon``), is one field of
:class:`Config` or of one of its sections, declared with :func:`key`: its default, help text, limits, choices
and, where it has one, its command-line flag. That one table serves every door a value comes in by: a config
file (YAML/JSON), keyword overrides (``eedn.run_pipeline(config, seed=1)``), ``--set a.b=value`` and the CLI
flags (``eedn/cli/common.py`` builds each flag's type, choices and help from its key). Every value is coerced
and checked by :func:`eedn.core.options.coerce`, the machinery plugin options use: ``1e-3`` is the float 0.001 whether
YAML read it as a string or not, a typo in a nested key is an error that names the valid keys ("did you mean"),
and a value out of its limits is one line. A :class:`Config` is checked when it is built, so every instance the
pipeline sees holds valid values; code reads it by attribute (``cfg.backbone_training.epochs``).

The ``*_options`` mappings stay dicts: their keys belong to plugins and are checked against the plugin's
declared options before stage 0 (eedn/pipeline/plugin_checks.py::check_plugins). ``budget`` is a one-of
mapping (one target, with the options some targets take).

Why in-house and not pydantic: importing pydantic 2.13 takes 0.19 s (0.26 s with one model defined) on the
2-core dev machine, most of the 0.3 s that ``eedn --help`` may take (0.13 s today), and it is not a dependency
of eedn; the in-house coercion already checks plugin options, so config keys and plugin options follow one set
of rules and give the same messages.

The resolved config is saved beside every result (``config.json``, from :meth:`Config.to_dict`), so a run can
be repeated exactly with ``eedn run --config RUN_DIR/config.json``.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import os
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Mapping, cast

from eedn.runtime.errors import EednError
from eedn.core.options import OptionSpec, coerce, option
from eedn.runtime.precision import PRECISIONS

#: torch.autocast precisions (eedn/runtime/precision.py maps them to dtypes)


def key(default: Any, help: str = "", *, flag: str | None = None, choices: tuple | None = None,
        min: float | None = None, max: float | None = None, above: float | None = None,
        kind: str = "value") -> Any:
    """A config key: :func:`eedn.core.options.option` metadata (help, choices, limits) plus the key's CLI ``flag``
    and its ``kind``: ``value`` (coerced to the field's type), ``open`` (a mapping whose keys a plugin
    declares) or ``one_of`` (``budget``)."""
    f = option(default, help, choices=choices, min=min, max=max, above=above)
    f.metadata = types.MappingProxyType({**f.metadata, "flag": flag, "kind": kind})
    return f


def section(cls: type, help: str) -> Any:
    """A nested block of keys (its own :class:`Section` dataclass)."""
    return dataclasses.field(default_factory=cls, metadata={"help": help, "kind": "section"})


class Section:
    """What every block of the key table shares: each field checked and coerced when an instance is built,
    :meth:`from_dict` with unknown-key errors, :meth:`to_dict` and a checked :meth:`replace`."""

    #: the dotted prefix of the block's keys in messages (``backbone_training.``)
    PREFIX: ClassVar[str] = ""

    def __post_init__(self) -> None:
        for spec, kind, f in key_specs(type(self)):
            object.__setattr__(self, f.name, check_value(spec, kind, getattr(self, f.name), f))
        self.validate()

    def validate(self) -> None:
        """What the per-key types and limits cannot say."""

    @classmethod
    def from_dict(cls, data: Any) -> Any:
        """The block from a mapping; an unknown key (at any depth) is one line that names the valid ones."""
        if isinstance(data, cls):
            return data
        if not isinstance(data, Mapping):
            name = cls.PREFIX.rstrip(".") or "config"
            raise EednError(f"{name} must be a mapping with keys {', '.join(field_names(cls))}, got {data!r}")
        unknown_keys("config key", data, field_names(cls), cls.PREFIX)
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """Key -> value in declaration order, sections as nested dicts: what config.json holds."""
        return {f.name: (v.to_dict() if isinstance(v := getattr(self, f.name), Section) else copy.deepcopy(v))
                for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    def replace(self, **changes: Any) -> Any:
        """A copy with ``changes``, checked like every other value."""
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


@dataclass(frozen=True)
class BackboneTraining(Section):
    """Stage 0: training (or loading) the backbone."""

    PREFIX: ClassVar[str] = "backbone_training."

    checkpoint: str | None = key(None, "trained backbone weights to load instead of training one",
                                 flag="--backbone-checkpoint")
    adapt_input_channels: bool = key(False, "adapt the checkpoint's first convolution to the data's channel count "
                                            "(e.g. RGB weights, gray data)")
    epochs: int | None = key(None, "epochs of backbone training (None: the dataset's suggestion; 0 with a "
                                   "checkpoint: no training)", flag="--backbone-epochs", min=0)
    optimizer: str = key("adamw", "optimiser of stage 0", choices=("adamw", "sgd"))
    lr: float | None = key(None, "learning rate of stage 0 (None: 1e-3 for adamw, 0.05 for sgd)", above=0)
    weight_decay: float | None = key(None, "weight decay of stage 0 (None: 0.05 for adamw, 5e-4 for sgd)", min=0)
    batch_size: int = key(64, "batch size of stage 0", min=1)
    label_smoothing: float = key(0.1, "label smoothing of stage 0", min=0, max=1)
    warmup_epochs: int = key(1, "linear warm-up epochs of stage 0", min=0)
    augment: bool = key(True, "train-time augmentation")


@dataclass(frozen=True)
class RiskControl(Section):
    """Risk-controlled exits (docs/evaluation.md); off while ``risk`` is None."""

    PREFIX: ClassVar[str] = "risk_control."

    risk: str | None = key(None, "risk-controlled exits: a risk (`eedn plugins` lists them), e.g. prediction_gap",
                           flag="--risk")
    risk_options: dict[str, Any] = key({}, "the risk's options", kind="open")
    epsilon: float = key(0.05, "risk level ε the controlled policy must keep", flag="--epsilon")
    delta: float = key(0.1, "failure probability δ of the ucb-*/ltt controllers", flag="--delta")
    controller: str = key("ltt", "naive, crc, ucb-hb, ucb-wsr or ltt (docs/evaluation.md)", flag="--controller")
    knob: str = key("auto", "the knob risk control sets: auto, threshold, budget or offset")
    grid_size: int = key(100, "knob values tried", min=2)
    epsilons: list[float] = key([0.01, 0.02, 0.05, 0.1, 0.2], "the risk levels of the ε-sweep figure")

    def validate(self) -> None:
        if not self.epsilons:
            raise EednError("risk_control.epsilons must be a non-empty list of risk levels, e.g. [0.01, 0.05, 0.1]")


@dataclass(frozen=True)
class Config(Section):
    """Every key of a run. Plugin names left None are filled with the registered defaults by
    :func:`resolve_config`, so a resolved config names what ran."""

    backbone: str | None = key(None, "backbone (None: the one `eedn plugins` marks as default)", flag="--backbone")
    backbone_options: dict[str, Any] = key({}, "the backbone's options", kind="open")
    strategy: str | None = key(None, "training strategy (None: the one `eedn plugins` marks as default)",
                               flag="--strategy")
    strategy_options: dict[str, Any] = key({}, "the strategy's options", kind="open")
    # --lambda: put under the option the strategy names for it (its tradeoff_option)
    tradeoff: float | list[float] | None = key(None, "the strategy's cost trade-off λ (--lambda)", min=0)
    gate: str | None = key(None, "gate (None: the strategy's own, else the default gate; `eedn plugins` lists "
                                 "them)", flag="--gate")
    gate_options: dict[str, Any] = key({}, "the gate's options", kind="open")
    inference_module: str | None = key(None, "inference module (None: the registered default)")
    inference_module_options: dict[str, Any] = key({}, "the inference module's options", kind="open")
    dataset: str | None = key(None, "dataset source (None: the one `eedn plugins` marks as default)",
                              flag="--dataset")
    dataset_options: dict[str, Any] = key({}, "the dataset source's options", kind="open")
    image_size: int | None = key(None, "input size in pixels (None: the dataset's)", flag="--image-size", min=1)
    seed: int = key(0, "random seed (data split, init, batches)", flag="--seed", min=0)
    head_seed: int | None = key(None, "seed of the heads' initialisation and batch order (None: seed); the data split "
                                "and the backbone follow seed, so head seeds vary on one cached backbone",
                                flag="--head-seed", min=0)
    device: str = key("cpu", "cpu, cuda or cuda:N", flag="--device")
    # Early-exit heads and small backbones are overhead-bound: on the 2-core dev machine a second thread made
    # T2T-ViT-tiny training 25x slower (788 vs 30 img/s) whenever any other process ran.
    threads: int | None = key(1, "torch CPU threads (raise for large backbones; None: torch's default)",
                              flag="--threads", min=1)
    backbone_training: BackboneTraining = section(BackboneTraining, "stage 0: the backbone's training")
    budget: dict[str, Any] | None = key(None, "target operating point of the reported policy, calibrated on val: "
                                        "one of {macs_fraction: F} (met within ±0.02 by threshold gates and "
                                        "by the offset of a trained gate), {accuracy_drop: D}, {p: P}, "
                                        "{exit_shares: [...]} (None: threshold gates take macs_fraction 0.75, "
                                        "learned gates stay as trained)", kind="one_of")
    policy_setting: str | None = key(None, "the trained setting (e.g. lambda=0.5) reported as the policy")
    evaluators: list[str] | None = key(None, "evaluators to run (None: the ones registered as on by default)")
    evaluator_options: dict[str, Any] = key({}, "each evaluator's options, by evaluator name", kind="open")
    eval_batch_size: int = key(256, "batch size of evaluation passes", min=1)
    out: str | None = key(None, "run directory (None: runs/<dataset>-<backbone>-<strategy>-s<seed>-<time>-<random>)",
                          flag="--out")
    overwrite: bool = key(False, "replace a non-empty run directory (refused otherwise)", flag="--overwrite")
    cache_dir: str | None = key(None, "backbone and feature cache (None: $EEDN_CACHE or ~/.cache/eedn)",
                                flag="--cache-dir")
    cache_fp16: bool = key(False, "store cached features in fp16")
    num_workers: int = key(0, "DataLoader workers for datasets not held in memory (docs/scale.md)", min=0)
    pin_memory: bool | None = key(None, "pinned host memory (None: when the device is CUDA)")
    persistent_workers: bool = key(True, "keep DataLoader workers between epochs")
    precision: str = key("fp32", "autocast precision of stage 0, features, heads and the engine (fp16 needs CUDA)",
                         flag="--precision", choices=PRECISIONS)
    channels_last: str | bool = key("auto", "NHWC images and weights: auto (when the backbone prefers it), true "
                                            "or false")
    progress: bool = key(True, "live progress lines")
    loggers: list[str] = key([], "experiment trackers the run logs to (--logger, repeatable; `eedn plugins` lists "
                                 "them), e.g. [tensorboard, csv]")
    logger_options: dict[str, Any] = key({}, "each logger's options, by logger name", kind="open")
    tracking_dir: str | None = key(None, "where loggers write (None: a 'tracking' folder beside the run directory)")
    resume: bool = key(False, "continue an interrupted backbone training", flag="--resume")
    risk_control: RiskControl = section(RiskControl, "risk-controlled exits (--risk/--epsilon/--delta/--controller)")

    def validate(self) -> None:
        if self.device not in ("cpu", "cuda") and not re.fullmatch(r"cuda:\d+", self.device):
            raise EednError(f"device must be cpu or cuda[:N], got {self.device!r}")
        if self.channels_last not in ("auto", True, False):
            raise EednError(f"channels_last must be auto, true or false, got {self.channels_last!r}")

    @property
    def cache_root(self) -> Path:
        """The backbone and feature cache: ``cache_dir``, else $EEDN_CACHE, else ~/.cache/eedn."""
        return cache_dir(self.cache_dir)


# ------------------------------------------------------------------------------------------ the table


_SPECS: dict[type, list[tuple[OptionSpec, str, dataclasses.Field]]] = {}


def key_specs(cls: type) -> list[tuple[OptionSpec, str, dataclasses.Field]]:
    """Each key of a block as an :class:`OptionSpec` (dotted name, type, default, help, limits), its kind and
    its field."""
    specs = _SPECS.get(cls)
    if specs is None:
        hints = typing.get_type_hints(cls)
        specs = []
        for f in dataclasses.fields(cls):
            meta = f.metadata
            # every key has a default or a default factory
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[operator]
            prefix = cast("type[Section]", cls).PREFIX
            specs.append((OptionSpec(prefix + f.name, hints[f.name], default, meta.get("help", ""),
                                     meta.get("choices"), meta.get("min"), meta.get("max"), meta.get("above")),
                          meta.get("kind", "value"), f))
        _SPECS[cls] = specs
    return specs


def field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def config_key(dotted: str) -> OptionSpec:
    """The declaration of one key by its dotted name (``backbone_training.epochs``)."""
    cls: type = Config
    *path, last = dotted.split(".")
    for part in path:
        cls = next(f for s, kind, f in key_specs(cls) if f.name == part and kind == "section").default_factory  # type: ignore[assignment]
    return next(spec for spec, _, f in key_specs(cls) if f.name == last)


def flag_keys() -> dict[str, str]:
    """CLI flag (``--backbone-epochs``) -> the dotted key it sets, from the table."""
    out: dict[str, str] = {}

    def walk(cls: type) -> None:
        for spec, kind, f in key_specs(cls):
            if kind == "section":
                walk(f.default_factory)  # type: ignore[arg-type]
            elif f.metadata.get("flag"):
                out[f.metadata["flag"]] = spec.name
    walk(Config)
    return out


def check_value(spec: OptionSpec, kind: str, value: Any, f: dataclasses.Field) -> Any:
    """One key's value, checked and coerced; a section's keys one by one."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if kind == "section":
        return f.default_factory.from_dict(value)  # type: ignore[union-attr]
    if kind == "open":
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise EednError(f"{spec.name} must be a mapping of options, got {value!r}")
        return value
    if kind == "one_of":
        return None if value is None else check_budget(value)
    return coerce("config", spec, value)


def unknown_keys(what: str, given: Mapping, known: list[str], prefix: str) -> None:
    unknown = sorted(str(k) for k in set(given) - set(known))
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(known), n=1)
        hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
        raise EednError(f"unknown {what}(s) {', '.join(prefix + k for k in unknown)}{hint}; known: "
                        f"{', '.join(prefix + k for k in known)}")


def _budget_key(name: str, type_: Any, help: str, **limits: Any) -> OptionSpec:
    return OptionSpec(f"budget.{name}", type_, None, help, None, limits.get("min"), limits.get("max"),
                      limits.get("above"))


#: ``budget``: exactly one target, with the options some targets take
BUDGET_KEYS = {
    "macs_fraction": _budget_key("macs_fraction", float, "mean MACs as a fraction of the full network", above=0,
                                 max=1),
    "accuracy_drop": _budget_key("accuracy_drop", float, "val accuracy given up", min=0, max=1),
    "p": _budget_key("p", float, "geometric exit-share parameter", above=0),
    "exit_shares": _budget_key("exit_shares", list[float], "share of samples per exit", min=0),
    "divisor": _budget_key("divisor", float, "divisor of p", above=0),
    "include_final": _budget_key("include_final", bool, "the final exit takes a share"),
}
BUDGET_TARGETS = ("macs_fraction", "accuracy_drop", "p", "exit_shares")


def check_budget(value: Any, owner: str = "config") -> dict:
    """``budget``: one of {macs_fraction: F}, {accuracy_drop: D}, {p: P[, divisor, include_final]},
    {exit_shares: [...]}, each value within its limits."""
    targets = [k for k in (value or {}) if k in BUDGET_TARGETS] if isinstance(value, dict) else []
    if not isinstance(value, dict) or len(targets) != 1:
        raise EednError("budget must be one of {macs_fraction: F}, {accuracy_drop: D}, {p: P}, "
                        f"{{exit_shares: [...]}}, got {value!r}")
    unknown_keys("budget key", value, list(BUDGET_KEYS), "budget.")
    return {k: coerce(owner, BUDGET_KEYS[k], v) for k, v in value.items()}


# ------------------------------------------------------------------------------------------ resolving


def defaults() -> dict[str, Any]:
    """Every key's default, as config.json would hold it."""
    return Config().to_dict()


def deep_merge(base: dict, update: Mapping) -> dict:
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
    name, value = assignment.split("=", 1)
    parts = [p for p in name.strip().split(".") if p]
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


def resolve_config(config: Mapping | Config | None = None, sets: list[str] | None = None,
                   **overrides: Any) -> Config:
    """Defaults ← config ← keyword overrides (None means 'not given') ← ``--set`` assignments, checked
    against the key table, with unset plugin names filled in."""
    config = config.to_dict() if isinstance(config, Config) else dict(config or {})
    cfg = deep_merge(defaults(), config)
    cfg.update({k: copy.deepcopy(config[k]) for k in ONE_OF_KEYS if k in config})
    for k, v in overrides.items():
        if v is not None:
            v = v.to_dict() if isinstance(v, Section) else v
            cfg[k] = deep_merge(cfg[k], v) if isinstance(v, dict) and isinstance(cfg.get(k), dict) else v
    replaced: set[str] = set()
    for s in sets or []:
        head = s.split("=", 1)[0].strip().split(".")[0]
        if head in ONE_OF_KEYS and head not in replaced and "." in s.split("=", 1)[0]:
            cfg[head] = {}  # the first --set budget.X=... replaces the default target
            replaced.add(head)
        apply_set(cfg, s)
    return fill_plugin_defaults(Config.from_dict(cfg))


def fill_plugin_defaults(cfg: Config) -> Config:
    """Plugin names left unset become the registered defaults, so the saved config names what ran."""
    from eedn.core.plugins import registry

    names: dict[str, Any] = {kind: registry(kind).default() for kind in ("backbone", "strategy", "dataset",
                                                                         "inference_module")
             if getattr(cfg, kind) is None}
    if cfg.evaluators is None:
        names["evaluators"] = registry("evaluator").defaults()
    return cfg.replace(**names) if names else cfg


def cache_dir(setting: str | None) -> Path:
    """The cache root for a ``cache_dir`` setting: itself, else $EEDN_CACHE, else ~/.cache/eedn."""
    return Path(setting or os.environ.get("EEDN_CACHE") or (Path.home() / ".cache" / "eedn")).expanduser()
