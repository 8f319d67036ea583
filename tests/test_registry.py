"""Registry hygiene: one name per kind, `eedn plugins --filter`, and the built-ins-only switch."""
from __future__ import annotations

import importlib.metadata
import types

import pytest
from click.testing import CliRunner

import eedn
from eedn.cli.main import cli
from eedn.runtime.errors import EednError
from eedn.core.plugins import PluginManager, list_names, register_plugin, registry, unregister_plugin


def invoke(*args: str):
    return CliRunner(env={"COLUMNS": "200"}).invoke(cli, list(args), terminal_width=200)


class Rival:
    """A third-party package that claims a built-in's name."""

    @eedn.hookimpl
    def register_datasets(self, register):
        register("digits", "nowhere:Nothing", description="another digits")


def test_a_name_registered_twice_is_an_error_naming_both_origins():
    register_plugin(Rival(), name="rival-digits", origin="rival-pkg 1.0")
    try:
        with pytest.raises(EednError, match=r"dataset 'digits' is registered twice: by eedn [0-9.]+ and by "
                                            r"rival-pkg 1\.0; uninstall or rename one \(EEDN_BUILTINS_ONLY=1"):
            registry("dataset")
    finally:
        unregister_plugin("rival-digits")
    assert "digits" in list_names("dataset")  # gone with the rival


def test_one_name_in_two_kinds_is_allowed():
    class Both:
        @eedn.hookimpl
        def register_gates(self, register):
            register("twin-name", "nowhere:Gate")

        @eedn.hookimpl
        def register_strategies(self, register):
            register("twin-name", "nowhere:Strategy")

    register_plugin(Both(), name="twin-plugin", origin="tests")
    try:
        assert "twin-name" in list_names("gate") and "twin-name" in list_names("strategy")
    finally:
        unregister_plugin("twin-plugin")


def test_a_taken_plugin_name_is_refused_but_the_same_object_is_a_no_op():
    first, second = Rival(), Rival()
    manager = PluginManager()
    manager._entry_points_loaded = True  # this test's manager holds only what it is given
    manager.register(first, name="pkg", origin="first-pkg")
    manager.register(first, name="pkg", origin="first-pkg")  # again: nothing happens
    with pytest.raises(EednError, match="plugin name 'pkg' is taken: by first-pkg and by second-pkg"):
        manager.register(second, name="pkg", origin="second-pkg")
    assert manager.pm.get_plugin("pkg") is first


def test_names_filter_with_shell_patterns():
    assert list_names("backbone", "res*") == sorted(n for n in list_names("backbone") if n.startswith("res"))
    assert "resnet20" in list_names("backbone", "RES*") and list_names("backbone", "t2t*")
    assert list_names("dataset", "cifar10?-lt") == ["cifar100-lt"]
    assert list_names("gate", "zz*") == []


def test_cli_plugins_filter_lists_only_matching_names():
    res = invoke("plugins", "--filter", "res*")
    assert res.exit_code == 0, res.output
    rows = [line.split("│") for line in res.output.splitlines() if line.count("│") == 5]
    names = {cells[2].strip() for cells in rows if cells[2].strip()}
    assert names == set(list_names("backbone", "res*")) and "resnet20" in names
    assert {cells[1].strip() for cells in rows} <= {"backbone", ""}


def test_cli_plugins_filter_without_a_match_is_one_line():
    res = invoke("plugins", "--filter", "zz*")
    assert res.exit_code == 1
    assert res.output.strip() == "error: no plugin name matches 'zz*'; `eedn plugins` lists them all"
    res = invoke("plugins", "jei", "--filter", "j*")
    assert res.exit_code == 1 and "not both" in res.output


class _FakeDist:
    def __init__(self, name: str):
        self.name, self.version = name, "9.9"


def _third_party_entry_point():
    module = types.ModuleType("third_party_eedn_plugin")

    @eedn.hookimpl
    def register_gates(register):
        register("third-party-gate", "nowhere:Gate", description="from an installed package")

    module.register_gates = register_gates
    return types.SimpleNamespace(name="third-party", value="third_party_eedn_plugin", group="eedn",
                                 dist=_FakeDist("eedn-third-party"), load=lambda: module)


@pytest.mark.parametrize("switch, expect_third_party", [(None, True), ("1", False), ("true", False), ("0", True)])
def test_builtins_only_switch_loads_eedn_own_entry_points(monkeypatch, switch, expect_third_party):
    real = list(importlib.metadata.entry_points(group="eedn"))
    assert any(ep.dist is not None and ep.dist.name == "eedn" for ep in real)
    extra = _third_party_entry_point()
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group=None: [*real, extra])
    if switch is None:
        monkeypatch.delenv("EEDN_BUILTINS_ONLY", raising=False)
    else:
        monkeypatch.setenv("EEDN_BUILTINS_ONLY", switch)
    gates = PluginManager().registries()["gate"]
    assert ("third-party-gate" in gates.entries) is expect_third_party
    assert "max_prob" in gates.entries  # the built-ins load either way
    if expect_third_party:
        assert gates.entries["third-party-gate"].origin == "eedn-third-party 9.9"


def test_two_packages_under_one_entry_point_name_are_an_error(monkeypatch):
    real = list(importlib.metadata.entry_points(group="eedn"))
    extra = _third_party_entry_point()
    clash = types.SimpleNamespace(**{**vars(extra), "dist": _FakeDist("other-pkg"),
                                     "load": lambda: types.ModuleType("other")})
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group=None: [*real, extra, clash])
    monkeypatch.delenv("EEDN_BUILTINS_ONLY", raising=False)
    manager = PluginManager()
    for _ in range(2):  # reported on every use, not only the first
        with pytest.raises(EednError, match="plugin name 'third-party' is taken: by eedn-third-party 9.9 and by "
                                            "other-pkg 9.9"):
            manager.registries()
