"""Plugin manager and per-kind registries, filled on first use.

Built-in plugins (package ``eedn_plugins``) and third-party ones are found the same way: through the
``eedn`` entry-point group. Tests and notebooks can add a plugin object directly with
:func:`register_plugin`. A factory may be registered as an object or as a ``"module:attribute"`` string;
a string is imported only when that plugin is built, so listing plugins (``eedn plugins``) and starting
the CLI import no model code at all.

A name is registered once per kind: a second registration of it is an error that names both origins (one package
cannot silently shadow another). ``EEDN_BUILTINS_ONLY=1`` loads only the entry points of eedn's own distribution
(the built-ins), to run the tests or to tell a broken third-party install from a broken eedn.

A plugin registered with ``namespace=True`` names a whole family: ``timm:vit_tiny_patch16_224`` is the entry
``timm`` built with ``variant="vit_tiny_patch16_224"`` (its factory takes a ``variant`` parameter). The core
resolves the prefix and never names the family.
"""
from __future__ import annotations

import fnmatch
import importlib
import importlib.metadata
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

import pluggy

from eedn.core import hookspecs
from eedn.runtime.errors import EednError, UnknownNameError
from eedn.core.options import OptionSpec, option_specs, resolve_options

#: the environment switch that loads the built-ins only (``EEDN_BUILTINS_ONLY=1``)
BUILTINS_ONLY_ENV = "EEDN_BUILTINS_ONLY"
#: the distribution whose entry points are the built-ins
CORE_DISTRIBUTION = "eedn"

KINDS = ("backbone", "inference_module", "gate", "strategy", "evaluator", "dataset", "risk")
_HOOK_FOR_KIND = {
    "backbone": "register_backbones",
    "inference_module": "register_inference_modules",
    "gate": "register_gates",
    "strategy": "register_strategies",
    "evaluator": "register_evaluators",
    "dataset": "register_datasets",
    "risk": "register_risks",
}


@dataclass
class Entry:
    """One registered thing: its factory (or a ``"module:attribute"`` reference to it) and its origin."""

    name: str
    kind: str
    target: Callable[..., Any] | str
    origin: str
    info: dict = field(default_factory=dict)
    #: the name after ``family:`` when this entry is a member of a namespace entry (``timm:resnet18``)
    variant: str | None = None

    @property
    def label(self) -> str:
        return f"{self.kind.replace('_', ' ')} '{self.name}'"

    @property
    def factory(self) -> Callable[..., Any]:
        """The factory, imported on first use when it was registered by reference."""
        if isinstance(self.target, str):
            module, _, attr = self.target.partition(":")
            try:
                obj: Any = importlib.import_module(module)
                for part in attr.split("."):
                    obj = getattr(obj, part)
            except (ImportError, AttributeError) as exc:
                raise EednError(f"{self.label} from {self.origin} cannot be loaded ({self.target}): {exc}") from exc
            self.target = obj
            return obj
        return self.target

    def options(self) -> list[OptionSpec] | None:
        """The options this plugin declares (None: it takes undeclared ``**options``)."""
        return option_specs(self.factory)

    def resolve(self, options: dict[str, Any] | None) -> dict[str, Any]:
        """The user's options for this plugin, validated and complete (defaults filled)."""
        return resolve_options(self.label, self.factory, options)

    def create(self, *args: Any, **kwargs: Any) -> Any:
        """Call the factory. Keyword arguments that are parameters of the factory itself (a backbone's
        ``num_classes``, ``image_size``, ``in_channels``) pass through; the rest are its options, validated."""
        factory = self.factory
        declared = {s.name for s in (self.options() or [])}
        parameters = _call_parameters(factory)
        call = {k: kwargs.pop(k) for k in list(kwargs) if k in parameters and k not in declared}
        if self.info.get("namespace"):
            if self.variant is None:
                raise UnknownNameError(f"{self.label} is a family: name a member, e.g. {self.name}:<name>")
            call["variant"] = self.variant
        return factory(*args, **call, **self.resolve(kwargs))

    @property
    def description(self) -> str:
        return str(self.info.get("description", ""))


def _call_parameters(factory: Callable[..., Any]) -> set[str]:
    """Names of the explicit parameters of a factory (a class's ``__init__`` or a function)."""
    import inspect

    try:
        params = inspect.signature(factory.__init__ if inspect.isclass(factory) else factory).parameters
    except (TypeError, ValueError):
        return set()
    return {n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


class Registry:
    """Named factories of one kind; an unknown name raises an error listing the known ones."""

    def __init__(self, kind: str):
        self.kind = kind
        self.entries: dict[str, Entry] = {}

    def add(self, entry: Entry) -> None:
        """Add ``entry``; a name this registry already holds is refused with both origins."""
        existing = self.entries.get(entry.name)
        if existing is not None:
            raise EednError(f"{entry.label} is registered twice: by {existing.origin} and by {entry.origin}; "
                            f"uninstall or rename one ({BUILTINS_ONLY_ENV}=1 loads eedn's built-ins only)")
        self.entries[entry.name] = entry

    def names(self, pattern: str | None = None) -> list[str]:
        """Sorted names, or those matching the shell-style ``pattern`` (``res*``, case-insensitive)."""
        names = sorted(self.entries)
        if pattern is None:
            return names
        return [n for n in names if fnmatch.fnmatchcase(n.lower(), pattern.lower())]

    def get(self, name: str) -> Entry:
        label = self.kind.replace("_", " ")
        family, colon, variant = name.partition(":")
        namespace = self.entries.get(family) if colon else None
        if namespace is not None and namespace.info.get("namespace"):
            if not variant:
                raise UnknownNameError(f"{label} '{name}' needs a name after the colon, e.g. {family}:<name>")
            return Entry(name, self.kind, namespace.target, namespace.origin, namespace.info, variant)
        if name not in self.entries:
            known = ", ".join(f"{n}:<name>" if self.entries[n].info.get("namespace") else n
                              for n in self.names()) or "(none)"
            raise UnknownNameError(f"unknown {label} '{name}'; known: {known}")
        return self.entries[name]

    def create(self, name: str, *args: Any, **options: Any) -> Any:
        return self.get(name).create(*args, **options)

    def defaults(self) -> list[str]:
        """Names registered with ``default=True`` (e.g. the evaluators that run unless the user names others)."""
        return [n for n in self.names() if self.entries[n].info.get("default")]

    def default(self) -> str:
        """The one plugin of this kind registered with ``default=True``: what runs when the user names none."""
        label = self.kind.replace("_", " ")
        names = self.defaults()
        if len(names) != 1:
            found = f"{len(names)} ({', '.join(names)})" if names else "none"
            raise EednError(f"no single default {label}: {found} registered with default=True; name the {label} "
                            f"to use (`eedn plugins` lists them)")
        return names[0]


class PluginManager:
    """Loads the ``eedn`` entry points on first use and fills one registry per kind."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager("eedn")
        self.pm.add_hookspecs(hookspecs)
        self._origins: dict[int, str] = {}
        self._registries: dict[str, Registry] | None = None
        self._entry_points_loaded = False
        #: one line per installed plugin that failed to import (it is skipped; the others still load)
        self.load_errors: list[str] = []

    def load_entry_points(self) -> None:
        """Import every ``eedn`` entry point once (only eedn's own with ``EEDN_BUILTINS_ONLY=1``). A package
        that fails to import is skipped with a warning on stderr, so one broken third-party plugin cannot take the
        built-ins down with it; two packages under one entry-point name are an error naming both."""
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        try:
            self._load_entry_points()
        except EednError:
            self._entry_points_loaded = False  # the next use reports the clash again instead of running half-loaded
            raise

    def _load_entry_points(self) -> None:
        builtins_only = builtins_only_requested()
        for ep in importlib.metadata.entry_points(group="eedn"):
            dist = getattr(ep, "dist", None)
            if builtins_only and (dist is None or dist.name.lower() != CORE_DISTRIBUTION):
                continue
            origin = f"{dist.name} {dist.version}" if dist is not None else ep.value
            try:
                module = ep.load()
            except Exception as exc:  # noqa: BLE001 - a broken third-party package must not break eedn
                message = (f"plugin '{ep.name}' from {origin} failed to import ({type(exc).__name__}: {exc}); "
                           "it is skipped: fix or uninstall that package")
                if message not in self.load_errors:
                    self.load_errors.append(message)
                    sys.stderr.write(f"warning: {message}\n")
                continue
            self.register(module, name=ep.name, origin=origin)

    def register(self, plugin: Any, name: str | None = None, origin: str | None = None) -> None:
        """Add a plugin object; registering the same object again is a no-op, another one under a taken name an
        error naming both origins."""
        origin = origin or str(getattr(plugin, "__name__", repr(plugin)))
        if name is not None and self.pm.has_plugin(name):
            held = self.pm.get_plugin(name)
            if held is plugin:
                return
            raise EednError(f"plugin name '{name}' is taken: by {self._origins.get(id(held), name)} and by {origin}; "
                            f"uninstall or rename one ({BUILTINS_ONLY_ENV}=1 loads eedn's built-ins only)")
        self.pm.register(plugin, name=name)
        self._origins[id(plugin)] = origin
        self._registries = None  # rebuilt lazily

    def registries(self) -> dict[str, Registry]:
        self.load_entry_points()
        if self._registries is None:
            regs = {kind: Registry(kind) for kind in KINDS}
            for kind, hook_name in _HOOK_FOR_KIND.items():
                hook = getattr(self.pm.hook, hook_name)
                for impl in hook.get_hookimpls():
                    origin = self._origins.get(id(impl.plugin), impl.plugin_name)

                    def register(name: str, factory: Callable[..., Any] | str, _k=kind, _o=origin,
                                 **info: Any) -> None:
                        regs[_k].add(Entry(name, _k, factory, _o, info))

                    impl.function(register=register)
            self._registries = regs
        return self._registries

    def add_commands(self, cli: Any) -> None:
        self.load_entry_points()
        self.pm.hook.register_commands(cli=cli)


_manager: PluginManager | None = None


def get_plugin_manager() -> PluginManager:
    """The process-wide plugin manager (entry points are read on first registry use)."""
    global _manager
    if _manager is None:
        _manager = PluginManager()
    return _manager


def register_plugin(plugin: Any, name: str | None = None, origin: str | None = None) -> None:
    """Add a plugin object by hand (tests, notebooks), as if it had been installed."""
    manager = get_plugin_manager()
    manager.load_entry_points()  # installed plugins first, so they cannot shadow this one later
    manager.register(plugin, name=name, origin=origin)


def unregister_plugin(name: str) -> None:
    """Remove a plugin added with :func:`register_plugin` (tests)."""
    manager = get_plugin_manager()
    plugin = manager.pm.get_plugin(name)
    if plugin is not None:
        manager.pm.unregister(plugin)
        manager._origins.pop(id(plugin), None)
        manager._registries = None


def registry(kind: str) -> Registry:
    """The registry of one plugin kind (``backbone``, ``gate``, ...), entry points loaded on first use."""
    if kind not in KINDS:
        raise ValueError(f"unknown plugin kind {kind!r}; known: {', '.join(KINDS)}")
    return get_plugin_manager().registries()[kind]


def create(kind: str, name: str, *args: Any, **options: Any) -> Any:
    """Build the registered ``kind`` named ``name`` with validated options:
    ``create("backbone", "t2t_vit_7", num_classes=10, image_size=32)``."""
    return registry(kind).create(name, *args, **options)


def resolve(kind: str, name: str, options: dict[str, Any] | None) -> dict[str, Any]:
    """Validate ``options`` for a plugin without building it (the pipeline checks everything before stage 0)."""
    return registry(kind).get(name).resolve(options)


def list_names(kind: str, pattern: str | None = None) -> list[str]:
    """Sorted names of every registered plugin of ``kind`` (those matching ``pattern``, e.g. ``res*``)."""
    return registry(kind).names(pattern)


def builtins_only_requested() -> bool:
    """True when ``EEDN_BUILTINS_ONLY`` is set to a true value (``1``, ``true``, ``yes``, ``on``)."""
    return os.environ.get(BUILTINS_ONLY_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def find(name: str) -> list[Entry]:
    """Every registered plugin called ``name``, whatever its kind."""
    regs = get_plugin_manager().registries()
    return [regs[kind].entries[name] for kind in KINDS if name in regs[kind].entries]
