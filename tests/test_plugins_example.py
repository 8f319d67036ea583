"""The example third-party gate package plugs in through the entry-point group, as after `pip install`."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import eedn
from eedn.plugins import PluginManager

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


def test_pipeline_runs_with_the_example_gate(installed_example, tiny_config, monkeypatch):
    import eedn.plugins as plugins

    monkeypatch.setattr(plugins, "_manager", None)  # reload entry points, now including the example
    cfg = tiny_config | {"strategy": "im-only", "gate": "top2_ratio", "gate_options": {"ratio": 1.5},
                         "strategy_options": {"epochs": 1}, "evaluators": []}
    results = eedn.run_pipeline(cfg)
    assert results["policy"]["gate"] == "top2_ratio"
    assert abs(sum(results["policy"]["exit_fractions"]) - 1) < 1e-9
    monkeypatch.setattr(plugins, "_manager", None)
