"""Core: plugin registries, config resolution, model composition, cost, atomic writes."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import eedn
from eedn.core.config import resolve_config
from eedn.core.contracts import Backbone, Gate, InputSpec
from eedn.core.cost import count_macs, measure_exit_macs
from eedn.runtime.errors import EednError, UnknownNameError
from eedn.runtime.io import atomic_write_json
from eedn.core.model import EarlyExitModel
from eedn.core.outputs import ExitOutputs


class MLPBackbone(Backbone):
    """Three linear stages on flattened 4x4 images: small enough to count MACs by hand."""

    def __init__(self, num_classes: int = 3, width: int = 8):
        super().__init__()
        self.num_stages, self.feature_dims, self.num_classes = 3, [width] * 3, num_classes
        self.input_spec = InputSpec(1, 4)
        self.inp = nn.Linear(16, width)
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(3))
        self.fc = nn.Linear(width, num_classes)

    def stem(self, x):
        return self.inp(x.flatten(1))

    def stage(self, i, state):
        return torch.relu(self.blocks[i](state))

    def exit_features(self, i, state):
        return state

    def head(self, features):
        return self.fc(features)


class AlwaysLastGate(Gate):
    def scores(self, exit_index, logits, features=None):
        return logits.softmax(-1).max(-1).values

    def exits_at(self, prefix):
        return prefix[:, -1] > 2.0  # never


def test_registry_lists_builtins_and_rejects_unknown_names():
    assert {"t2t_vit", "t2t_vit_7", "resnet", "resnet20"} <= set(eedn.list_names("backbone"))
    assert "digits" in eedn.list_names("dataset")
    assert "linear" in eedn.list_names("inference_module")
    with pytest.raises(UnknownNameError) as err:
        eedn.create("backbone", "nope", num_classes=10, image_size=32)
    msg = str(err.value)
    assert msg.startswith("unknown backbone 'nope'; known: ") and "t2t_vit_7" in msg and "\n" not in msg


def test_origin_of_builtin_plugins_is_the_distribution():
    entry = eedn.registry("backbone").get("t2t_vit_7")
    assert entry.origin.startswith("eedn ")


def test_config_defaults_overrides_and_sets():
    cfg = resolve_config({"seed": 3}, ["strategy_options.lambda=0.5", "budget={macs_fraction: 0.6}"], backbone="resnet")
    assert cfg.seed == 3 and cfg.backbone == "resnet"
    assert cfg.strategy_options["lambda"] == 0.5
    assert cfg.budget == {"macs_fraction": 0.6}
    with pytest.raises(EednError, match="unknown config key"):
        resolve_config({"sed": 1})
    with pytest.raises(EednError, match="seed"):
        resolve_config({"seed": -1})
    with pytest.raises(EednError, match="key=value"):
        resolve_config(None, ["novalue"])


def test_model_exit_features_logits_and_head_match_backbone():
    torch.manual_seed(0)
    bb = MLPBackbone()
    model = EarlyExitModel(bb, [nn.Linear(8, 3), nn.Linear(8, 3)], AlwaysLastGate(2, 3))
    x = torch.randn(5, 1, 4, 4)
    logits = model(x)
    assert logits.shape == (5, 3, 3)
    assert torch.allclose(logits[:, -1], bb(x))
    scores = model.gate_scores(logits)
    assert scores.shape == (5, 2)
    assert (model.gate.decide(scores) == 2).all()


def test_measure_exit_macs_matches_hand_count():
    bb = MLPBackbone(num_classes=3, width=8)
    model = EarlyExitModel(bb, [nn.Linear(8, 3), nn.Linear(8, 3)], AlwaysLastGate(2, 3))
    exit_macs, full = measure_exit_macs(model)
    stem, block, im, head = 16 * 8, 8 * 8, 8 * 3, 8 * 3
    assert exit_macs == [stem + block + im, stem + 2 * block + 2 * im, stem + 3 * block + 2 * im + head]
    assert full == stem + 3 * block + head == count_macs(lambda: bb(torch.zeros(1, 1, 4, 4)))


def test_fused_cpu_attention_is_counted():
    q = torch.randn(1, 2, 5, 16)
    macs = count_macs(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q))
    assert macs == 2 * 2 * 5 * 5 * 16  # QK^T and AV


def test_exit_outputs_summary():
    logits = torch.tensor([[[2.0, 0.0], [0.0, 2.0]], [[0.0, 2.0], [0.0, 2.0]]])
    out = ExitOutputs(logits, torch.tensor([0, 1]), torch.zeros(2, 1), torch.tensor([10.0, 30.0]), 25.0)
    s = out.summarize(torch.tensor([0, 1]))
    assert s["accuracy"] == 1.0 and s["mean_macs"] == 20.0 and s["macs_fraction"] == 0.8
    assert s["exit_fractions"] == [0.5, 0.5]
    assert out.exit_accuracy().tolist() == [1.0, 0.5]


def test_atomic_write_leaves_no_partial_file(tmp_path):
    target = tmp_path / "r.json"
    atomic_write_json(target, {"a": 1})
    with pytest.raises(TypeError):
        atomic_write_json(target, {"a": object()})
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_gate_decide_default_is_first_exit_that_fires():
    class Threshold(Gate):
        def scores(self, exit_index, logits, features=None):
            return logits[:, 0]

        def exits_at(self, prefix):
            return prefix[:, -1] >= 0.5

    g = Threshold(3, 2)
    s = torch.tensor([[0.9, 0.9, 0.9], [0.1, 0.6, 0.9], [0.1, 0.1, 0.1]])
    assert g.decide(s).tolist() == [0, 1, 3]


def test_every_builtin_plugin_declares_documented_options_and_rejects_typos():
    from eedn.core.plugins import KINDS

    for kind in KINDS:
        for name in eedn.list_names(kind):
            entry = eedn.registry(kind).get(name)
            if not entry.origin.startswith("eedn "):
                continue  # a third-party plugin installed here
            specs = entry.options()
            assert specs is not None, entry.label  # declared, so they can be checked
            assert all(spec.help for spec in specs), entry.label
            with pytest.raises(EednError) as err:
                entry.resolve({"no_such_option": 1})
            valid = ", ".join(spec.name for spec in specs) or "none"
            assert str(err.value) == f"{entry.label}: unknown option(s) no_such_option; valid: {valid}"


def test_yaml_strings_coerce_to_the_declared_types():
    from eedn.core.plugins import resolve

    resolved = resolve("strategy", "jei", {"lr": "1e-3", "lambda": "0.1,0.5", "head_augment": "true",
                                                        "epochs": "6"})
    assert (resolved["lr"], resolved["lambda"], resolved["head_augment"], resolved["epochs"]) == (0.001, [0.1, 0.5],
                                                                                                  True, 6)
    assert resolve("strategy", "jei", {"lambda": "0.3"})["lambda"] == 0.3
    assert resolve("backbone", "t2t_vit", {"size": 14})["size"] == "14"
    assert resolve("gate", "max_prob", {"include_final": "no"})["include_final"] is False
    with pytest.raises(EednError, match="invalid lr='fast'"):
        resolve("strategy", "sdn", {"lr": "fast"})
