"""The example third-party gate package plugs in through the entry-point group, as after `pip install`."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import eedn
from eedn.core.plugins import PluginManager

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "eedn-gate-example"


@pytest.fixture
def installed_example(tmp_path, monkeypatch):
    """Put the package and a dist-info with its entry points on sys.path: what pip install leaves."""
    site = tmp_path / "site"
    dist = site / "eedn_gate_example-0.1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: eedn-gate-example\nVersion: 0.1.0\n")
    (dist / "entry_points.txt").write_text("[eedn]\ntop2_ratio = eedn_gate_example\n")
    monkeypatch.syspath_prepend(str(EXAMPLE / "src"))
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delenv("EEDN_BUILTINS_ONLY", raising=False)  # a third-party package is what this tests
    yield
    sys.modules.pop("eedn_gate_example", None)


def test_example_gate_is_found_through_entry_points(installed_example):
    pm = PluginManager()
    pm.load_entry_points()
    entry = pm.registries()["gate"].get("top2_ratio")
    assert entry.origin == "eedn-gate-example 0.1.0"
    gate = entry.factory(2, 3, ratio=2.0)
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25]]))
    s = gate.scores(0, logits)
    assert torch.allclose(s, torch.tensor([3.5, 0.4 / 0.35]))
    assert gate.exits_at(s[:, None]).tolist() == [True, False]


def test_builtins_only_leaves_the_installed_example_out(installed_example, monkeypatch):
    monkeypatch.setenv("EEDN_BUILTINS_ONLY", "1")
    gates = PluginManager().registries()["gate"]
    assert "top2_ratio" not in gates.entries and "max_prob" in gates.entries


def test_pipeline_runs_with_the_example_gate(installed_example, tiny_config, monkeypatch):
    import eedn.core.plugins as plugins

    monkeypatch.setattr(plugins, "_manager", None)  # reload entry points, now including the example
    cfg = tiny_config | {"strategy": "im-only", "gate": "top2_ratio", "gate_options": {"ratio": 1.5},
                         "strategy_options": {"epochs": 1}, "evaluators": []}
    results = eedn.run_pipeline(cfg)
    assert results["policy"]["gate"] == "top2_ratio"
    assert abs(sum(results["policy"]["exit_fractions"]) - 1) < 1e-9
    monkeypatch.setattr(plugins, "_manager", None)


def docs_examples() -> dict[str, dict]:
    """The ``# docs-example: NAME`` code blocks of docs/plugins.md, each executed as its own module."""
    import re
    import types

    text = (Path(__file__).resolve().parents[1] / "docs" / "plugins.md").read_text()
    modules = {}
    for name, code in re.findall(r"```python\n# docs-example: (\w+)\n(.*?)```", text, flags=re.S):
        module = types.ModuleType(f"docs_example_{name}")
        sys.modules[module.__name__] = module  # as an import would: dataclasses and type hints look it up
        exec(compile(code, f"docs/plugins.md:{name}", "exec", dont_inherit=True), module.__dict__)
        modules[name] = module
    return modules


def test_the_plugin_guide_examples_run_in_the_pipeline(tiny_config):
    from eedn.core.plugins import unregister_plugin

    examples = docs_examples()
    assert set(examples) == {"gate", "dataset"}
    for name, module in examples.items():
        eedn.register_plugin(module, name=f"docs-{name}")
    try:
        cfg = tiny_config | {"dataset": "noise-squares", "dataset_options": {"samples": "200"},
                             "strategy": "im-only", "gate": "logit_gap", "strategy_options": {"epochs": 2},
                             "evaluators": []}
        results = eedn.run_pipeline(cfg)
        assert results["dataset"]["sizes"] == {"train": 100, "val": 30, "cal": 30, "test": 40}
        assert results["policy"]["gate"] == "logit_gap"
        assert abs(results["policy"]["val"]["macs_fraction"] - 0.75) <= 0.02 + 1e-9  # the default budget, a target
        assert len(results["curve"]) >= 2  # the budget sweep of a ThresholdGate
        with pytest.raises(eedn.EednError, match="dataset 'noise-squares': unknown option.*did you mean 'samples'"):
            eedn.create("dataset", "noise-squares", sample=3)
    finally:
        for name in examples:
            unregister_plugin(f"docs-{name}")
            sys.modules.pop(f"docs_example_{name}", None)


def test_a_broken_installed_plugin_is_skipped_with_a_warning(tmp_path, monkeypatch, capsys):
    dist = tmp_path / "broken_pkg-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-pkg\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[eedn]\nbroken = no_such_module_for_eedn_tests\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("EEDN_BUILTINS_ONLY", raising=False)
    pm = PluginManager()
    regs = pm.registries()
    assert "jei" in regs["strategy"].names() and "digits" in regs["dataset"].names()
    assert len(pm.load_errors) == 1 and "broken-pkg 1.0" in pm.load_errors[0]
    assert "warning: plugin 'broken' from broken-pkg 1.0 failed to import" in capsys.readouterr().err
