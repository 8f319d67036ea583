"""Plugin manager and per-kind registries.

Built-in plugins (package ``eedn_plugins``) and third-party ones are found the same way: through the
``eedn`` entry-point group. Tests and notebooks can add a plugin object directly with
:func:`register_plugin`.
"""
from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass, field
from typing import Any, Callable

import pluggy

from eedn import hookspecs
from eedn.errors import UnknownNameError

KINDS = ("backbone", "inference_module", "gate", "strategy", "evaluator", "dataset")
_HOOK_FOR_KIND = {
    "backbone": "register_backbones",
    "inference_module": "register_inference_modules",
    "gate": "register_gates",
    "strategy": "register_strategies",
    "evaluator": "register_evaluators",
    "dataset": "register_datasets",
}


@dataclass
class Entry:
    """One registered thing: its factory and where it came from."""

    name: str
    kind: str
    factory: Callable[..., Any]
    origin: str
    info: dict = field(default_factory=dict)


class Registry:
    """Named factories of one kind; an unknown name raises an error listing the known ones."""

    def __init__(self, kind: str):
        self.kind = kind
        self.entries: dict[str, Entry] = {}

    def add(self, entry: Entry) -> None:
        self.entries[entry.name] = entry

    def names(self) -> list[str]:
        return sorted(self.entries)

    def get(self, name: str) -> Entry:
        if name not in self.entries:
            known = ", ".join(self.names()) or "(none)"
            label = self.kind.replace("_", " ")
            raise UnknownNameError(f"unknown {label} '{name}'; known: {known}")
        return self.entries[name]

    def create(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return self.get(name).factory(*args, **kwargs)


class PluginManager:
    """Loads the ``eedn`` entry points once and fills one registry per kind."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager("eedn")
        self.pm.add_hookspecs(hookspecs)
        self._origins: dict[int, str] = {}
        self._registries: dict[str, Registry] | None = None

    def load_entry_points(self) -> None:
        for ep in importlib.metadata.entry_points(group="eedn"):
            if self.pm.has_plugin(ep.name):
                continue
            module = ep.load()
            dist = getattr(ep, "dist", None)
            origin = f"{dist.name} {dist.version}" if dist is not None else ep.value
            self.register(module, name=ep.name, origin=origin)

    def register(self, plugin: Any, name: str | None = None, origin: str | None = None) -> None:
        if name is not None and self.pm.has_plugin(name):
            return
        self.pm.register(plugin, name=name)
        self._origins[id(plugin)] = origin or getattr(plugin, "__name__", repr(plugin))
        self._registries = None  # rebuilt lazily

    def registries(self) -> dict[str, Registry]:
        if self._registries is None:
            regs = {kind: Registry(kind) for kind in KINDS}
            for kind, hook_name in _HOOK_FOR_KIND.items():
                hook = getattr(self.pm.hook, hook_name)
                for impl in hook.get_hookimpls():
                    origin = self._origins.get(id(impl.plugin), impl.plugin_name)

                    def register(name: str, factory: Callable[..., Any], _k=kind, _o=origin, **info: Any) -> None:
                        regs[_k].add(Entry(name, _k, factory, _o, info))

                    impl.function(register=register)
            self._registries = regs
        return self._registries

    def add_commands(self, cli: Any) -> None:
        self.pm.hook.register_commands(cli=cli)


_manager: PluginManager | None = None


def get_plugin_manager() -> PluginManager:
    """The process-wide plugin manager, with every installed entry point loaded."""
    global _manager
    if _manager is None:
        _manager = PluginManager()
        _manager.load_entry_points()
    return _manager


def register_plugin(plugin: Any, name: str | None = None, origin: str | None = None) -> None:
    """Add a plugin object by hand (tests, notebooks), as if it had been installed."""
    get_plugin_manager().register(plugin, name=name, origin=origin)


def registry(kind: str) -> Registry:
    if kind not in KINDS:
        raise ValueError(f"unknown plugin kind {kind!r}; known: {', '.join(KINDS)}")
    return get_plugin_manager().registries()[kind]


def create(kind: str, name: str, *args: Any, **kwargs: Any) -> Any:
    """Build the registered ``kind`` named ``name``: ``create("backbone", "t2t_vit_7", ...)``."""
    return registry(kind).create(name, *args, **kwargs)


def list_names(kind: str) -> list[str]:
    return registry(kind).names()
