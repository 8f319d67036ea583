"""Typed plugin options: declared once, validated and coerced in one place.

A plugin declares its options as a dataclass named ``Options`` on the class (or function) it registers::

    @dataclass
    class Options:
        epochs: int = option(15, "epochs of IM training", min=1)
        select: str = option("final", "checkpoint rule", choices=("final", "last"))

A plugin without an ``Options`` class gets one derived from its factory's keyword parameters and their type
hints (``def __init__(self, num_exits, num_classes, ratio: float = 4.0)`` declares ``ratio``). Either way
:func:`resolve_options` turns what a user wrote (YAML, ``--set``, Python) into the declared types — ``"1e-3"``
and ``1e-3`` are both the float 0.001, ``"0.1,0.5"`` is a list where a list is declared — fills the
defaults, and rejects unknown names or bad values with one line that lists the valid options.
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
import keyword
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence, TypeVar, cast

from eedn.runtime.errors import EednError

_MISSING = dataclasses.MISSING
_Factory = TypeVar("_Factory", bound=Callable[..., Any])


def declares(options: type) -> Callable[[_Factory], _Factory]:
    """``@declares(MyOptions)`` above a registered function (or a class defined elsewhere) sets its ``Options``:
    what ``my_factory.Options = MyOptions`` does, in a form type checkers accept on a function."""
    def attach(factory: _Factory) -> _Factory:
        # a function object's __dict__ holds its attributes; writing there is what the attribute assignment does
        factory.__dict__["Options"] = options
        return factory
    return attach


def option(default: Any, help: str = "", *, choices: Sequence[Any] | None = None, min: float | None = None,
           max: float | None = None, above: float | None = None) -> Any:
    """A dataclass field with the help text and limits :func:`resolve_options` checks (``min``/``max`` are
    inclusive, ``above`` a strict lower bound). Mutable defaults (lists, dicts) are copied per instance."""
    meta = {"help": help, "choices": tuple(choices) if choices is not None else None, "min": min, "max": max,
            "above": above}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True)
class OptionSpec:
    """One declared option: name, type annotation, default, help and limits."""

    name: str
    type: Any
    default: Any
    help: str = ""
    choices: tuple | None = None
    min: float | None = None
    max: float | None = None
    above: float | None = None

    @property
    def required(self) -> bool:
        return self.default is _MISSING

    def type_text(self) -> str:
        return _type_text(self.type)

    def limits_text(self) -> str:
        """The choices and bounds, e.g. ``">= 0; <= 1"`` (empty when there are none)."""
        parts = [", ".join(map(str, self.choices))] if self.choices is not None else []
        parts += [f"{sign} {bound:g}" for sign, bound in ((">", self.above), (">=", self.min), ("<=", self.max))
                  if bound is not None]
        return "; ".join(parts)

    def default_text(self) -> str:
        if self.required:
            return "(required)"
        return "None" if self.default is None else repr(self.default)


def option_specs(factory: Callable[..., Any]) -> list[OptionSpec] | None:
    """The options a registered factory declares, or None when it takes arbitrary ``**options`` without
    declaring them (then nothing can be checked)."""
    declared = getattr(factory, "Options", None)
    if declared is not None and dataclasses.is_dataclass(declared):
        hints = typing.get_type_hints(declared)
        specs = []
        for f in dataclasses.fields(declared):
            # a field cannot be called like a Python keyword: `lambda_` declares the option `lambda`
            name = f.name[:-1] if f.name.endswith("_") and keyword.iskeyword(f.name[:-1]) else f.name
            default = f.default if f.default is not _MISSING else (
                f.default_factory() if f.default_factory is not _MISSING else _MISSING)
            meta: Mapping[str, Any] = f.metadata or {}
            specs.append(OptionSpec(name, hints.get(f.name, Any), default, meta.get("help", ""),
                                    meta.get("choices"), meta.get("min"), meta.get("max"), meta.get("above")))
        return specs
    target = factory.__init__ if inspect.isclass(factory) else factory
    try:
        signature = inspect.signature(target)
        hints = typing.get_type_hints(target)
    except (TypeError, ValueError, NameError):
        return None
    specs = []
    for p in signature.parameters.values():
        if p.kind is p.VAR_KEYWORD:
            return None
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is not p.empty:
            specs.append(OptionSpec(p.name, hints.get(p.name, Any), p.default))
    return specs


def resolve_options(owner: str, factory_or_specs: Callable[..., Any] | list[OptionSpec] | None,
                    given: dict[str, Any] | None) -> dict[str, Any]:
    """Every declared option of ``owner`` (e.g. ``"strategy 'jei'"``) with the user's values coerced to the
    declared types and the defaults filled in. Unknown names, bad types and out-of-range values raise one
    :class:`EednError` line naming the owner and listing the valid options."""
    given = dict(given or {})
    specs = factory_or_specs if isinstance(factory_or_specs, list) or factory_or_specs is None \
        else option_specs(factory_or_specs)
    if specs is None:
        return given
    by_name = {s.name: s for s in specs}
    unknown = [k for k in given if k not in by_name]
    if unknown:
        hint = ""
        close = difflib.get_close_matches(unknown[0], list(by_name), n=1)
        if close:
            hint = f" (did you mean '{close[0]}'?)"
        valid = ", ".join(by_name) or "none"
        raise EednError(f"{owner}: unknown option(s) {', '.join(map(str, unknown))}{hint}; valid: {valid}")
    resolved = {}
    for spec in specs:
        if spec.name in given:
            resolved[spec.name] = coerce(owner, spec, given[spec.name])
        elif spec.required:
            raise EednError(f"{owner}: option {spec.name} is required ({spec.help or spec.type_text()})")
        else:
            resolved[spec.name] = spec.default
    return resolved


class OptionValues:
    """What a plugin's ``self.options`` is: attribute access to the validated values (``self.options.epochs``).

    The declared ``Options`` dataclass is instantiated with this class mixed in, so ``isinstance(options,
    MyPlugin.Options)`` holds and a type checker sees the declared fields. ``options["epochs"]`` (the dict
    access of eedn 0.1 plugins) still works and warns once, so third-party plugins keep running."""

    __slots__ = ()

    def as_dict(self) -> dict[str, Any]:
        """Option name -> value (``lambda``, not the field name ``lambda_``), for results.json."""
        if dataclasses.is_dataclass(self):
            return {_option_name(f.name): getattr(self, f.name) for f in dataclasses.fields(self)}
        return dict(vars(self))

    def _field(self, name: str) -> str:
        field = f"{name}_" if keyword.iskeyword(name) else name
        if not hasattr(self, field):
            raise KeyError(name)
        return field

    def __getitem__(self, name: str) -> Any:
        _warn_mapping_access()
        return getattr(self, self._field(name))

    def get(self, name: str, default: Any = None) -> Any:
        _warn_mapping_access()
        try:
            return getattr(self, self._field(name))
        except KeyError:
            return default

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self.as_dict()

    def keys(self) -> list[str]:
        return list(self.as_dict())

    def __iter__(self):  # dict(options) keeps working
        return iter(self.as_dict())


class FreeOptions(OptionValues):
    """The options of a plugin that declares no ``Options`` dataclass (its ``__init__`` parameters hold them),
    as attributes."""

    def __init__(self, **values: Any):
        self.__dict__.update(values)

    def __repr__(self) -> str:
        return f"FreeOptions({', '.join(f'{k}={v!r}' for k, v in vars(self).items())})"


_WARNED: list[bool] = []


def _warn_mapping_access() -> None:
    if not _WARNED:
        _WARNED.append(True)
        import warnings

        warnings.warn("plugin options are attributes since eedn 0.2: write self.options.NAME instead of "
                      "self.options['NAME']", DeprecationWarning, stacklevel=3)


def _option_name(field: str) -> str:
    return field[:-1] if field.endswith("_") and keyword.iskeyword(field[:-1]) else field


_TYPED: dict[type, type] = {}


def options_instance(declared: type, values: dict[str, Any]) -> Any:
    """An instance of the declared ``Options`` dataclass (with :class:`OptionValues` mixed in) holding
    ``values``, keyed by option name."""
    typed = _TYPED.get(declared)
    if typed is None:
        typed = declared if issubclass(declared, OptionValues) else type(
            declared.__name__, (declared, OptionValues), {"__module__": declared.__module__,
                                                          "__qualname__": declared.__qualname__})
        _TYPED[declared] = typed
    fields = {_option_name(f.name): f.name for f in dataclasses.fields(declared)}
    return typed(**{fields[name]: value for name, value in values.items()})


def declared_options(owner: str, cls: type, options: dict[str, Any]) -> Any:
    """What a plugin base class stores as ``self.options``: an instance of the class's ``Options`` dataclass,
    validated and complete, when it declares one; else the options as given, as attributes (its own
    ``__init__`` parameters hold them)."""
    declared = getattr(cls, "Options", None)
    if declared is not None and dataclasses.is_dataclass(declared):
        return options_instance(cast(type, declared), resolve_options(owner, cls, options))
    return FreeOptions(**options)


def coerce(owner: str, spec: OptionSpec, value: Any) -> Any:
    """``value`` as ``spec.type``, inside ``spec``'s choices and limits, or a one-line error."""
    try:
        out = _coerce(spec.type, value)
    except (TypeError, ValueError):
        raise EednError(f"{owner}: invalid {spec.name}={value!r}; expected {spec.type_text()}"
                        f"{_limits(spec)}") from None
    if spec.choices is not None and out is not None:
        items = out if isinstance(out, list) else [out]
        bad = [v for v in items if v not in spec.choices]
        if bad:
            raise EednError(f"{owner}: invalid {spec.name}={value!r}; choose from {', '.join(map(str, spec.choices))}")
    for v in (out if isinstance(out, list) else [out]):
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            if ((spec.min is not None and v < spec.min) or (spec.max is not None and v > spec.max)
                    or (spec.above is not None and v <= spec.above)):
                raise EednError(f"{owner}: invalid {spec.name}={value!r}; expected {spec.type_text()}"
                                f"{_limits(spec)}")
    return out


# ------------------------------------------------------------------------------------------------ coercion


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_NONE = {"none", "null", "~", ""}


def _coerce(tp: Any, value: Any) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any or tp is object:
        return value
    if origin in (typing.Union, types.UnionType):
        members = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.strip().lower() in _NONE):
            if type(None) in members:
                return None
        # lists first when the value looks like one, so "0.1,0.5" under `float | list[float]` is a list
        ordered = sorted((m for m in members if m is not type(None)),
                         key=lambda m: 0 if typing.get_origin(m) in (list, tuple) and _listish(value) else 1)
        for member in ordered:
            try:
                return _coerce(member, value)
            except (TypeError, ValueError):
                continue
        raise ValueError(value)
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        args = typing.get_args(tp)
        inner = args[0] if args else Any
        if isinstance(value, str):
            items: list = [v.strip() for v in value.split(",") if v.strip()]
        elif isinstance(value, (list, tuple)):
            items = list(value)
        else:
            items = [value]
        return [_coerce(inner, v) for v in items]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise TypeError(value)
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        text = str(value).strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise ValueError(value)
    if tp is int:
        if isinstance(value, bool):
            raise TypeError(value)
        number = float(value) if isinstance(value, str) else value
        if not isinstance(number, (int, float)) or not math.isfinite(number) or int(number) != number:
            raise ValueError(value)
        return int(number)
    if tp is float:
        if isinstance(value, bool):
            raise TypeError(value)
        number = float(value)
        if math.isnan(number):
            raise ValueError(value)
        return number
    if tp is str:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise TypeError(value)
        return str(value)
    if typing.get_origin(tp) is typing.Literal:
        if value in typing.get_args(tp):
            return value
        raise ValueError(value)
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise TypeError(value)
    return value


def _listish(value: Any) -> bool:
    return isinstance(value, (list, tuple)) or (isinstance(value, str) and "," in value)


def _type_text(tp: Any) -> str:
    if tp is Any:
        return "any value"
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_text(a) for a in typing.get_args(tp))
    if origin in (list, tuple, Sequence):
        args = typing.get_args(tp)
        plural = {int: "integers", float: "numbers", bool: "booleans", str: "strings"}
        return f"a list of {plural.get(args[0], _type_text(args[0])) if args else 'values'}"
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "a mapping",
             type(None): "none"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _limits(spec: OptionSpec) -> str:
    """The bounds as the error messages say them: " in [0, 1]", " >= 1", " > 0"."""
    if spec.min is not None and spec.max is not None:
        return f" in [{spec.min:g}, {spec.max:g}]"
    if spec.above is not None and spec.max is not None:
        return f" in ({spec.above:g}, {spec.max:g}]"
    bounds = [f" {sign} {b:g}" for sign, b in ((">", spec.above), (">=", spec.min), ("<=", spec.max)) if b is not None]
    return "".join(bounds)


def parse_number_list(text: str, option: str, convert: Callable[[str], Any], minimum: float, example: str) -> list:
    """A comma-separated option value (``--lambda 0.01,0.5``, ``--batch-sizes 1,32``) as numbers >= ``minimum``."""
    try:
        values = [convert(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise EednError(f"{option} expects a comma-separated list such as {example}, got '{text}'") from None
    if not values or any(v < minimum for v in values):
        raise EednError(f"{option} values must be numbers >= {minimum:g}, got '{text}'")
    return values
