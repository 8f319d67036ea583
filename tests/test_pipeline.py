"""The pipeline end to end on the embedded digits with tiny backbones: every strategy, the backbone
cache, resume, and bad input."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import eedn
from eedn.train import backbone_training
from eedn.cli.main import cli
from eedn.runtime.errors import EednError


def test_jei_routes_samples_to_early_exits(tiny_config):
    cfg = tiny_config | {"strategy": "jei", "strategy_options": {"epochs": 4, "warmup_epochs": 1, "lambda": 2.0}}
    results = eedn.run_pipeline(cfg)
    policy = results["policy"]
    assert policy["gate"] == "jei" and policy["setting"] == "lambda=2"
    assert abs(sum(policy["exit_fractions"]) - 1) < 1e-9
    assert sum(policy["exit_fractions"][:-1]) > 0  # some samples leave before the backbone's head
    assert policy["mean_macs"] < results["full_macs"]
    assert results["strategy"]["options"]["profile"] == "clean"
    assert {row["method"] for row in results["conformal"]} >= {"lac", "aps"}
    assert 0 <= policy["ece"] <= 1


def test_lambda_sweep_writes_a_curve_whose_cost_falls(tiny_config):
    cfg = tiny_config | {"strategy": "jei",
                         "strategy_options": {"epochs": 5, "warmup_epochs": 2, "lambda": [0.01, 0.5, 5.0]},
                         "evaluators": []}
    results = eedn.run_pipeline(cfg)
    curve = results["curve"]
    assert [p["setting"] for p in curve] == ["lambda=0.01", "lambda=0.5", "lambda=5"]
    macs = [p["mean_macs"] for p in curve]
    assert macs[0] >= macs[1] >= macs[2] and macs[0] > macs[2]


@pytest.mark.parametrize("strategy,gate", [("im-only", None), ("sdn", "entropy"), ("boostnet", "margin"),
                                           ("l2w", "patience"), ("im-only", "max_prob")])
def test_every_baseline_writes_a_budget_curve(tiny_config, strategy, gate):
    cfg = tiny_config | {"strategy": strategy, "gate": gate, "strategy_options": {"epochs": 2},
                         "evaluators": ["calibration"]}
    results = eedn.run_pipeline(cfg)
    assert len(results["curve"]) >= 2
    for point in results["curve"]:
        assert abs(sum(point["exit_fractions"]) - 1) < 1e-9
        assert 0 < point["macs_fraction"] <= results["exits"][-1]["macs"] / results["full_macs"] + 1e-9
    if gate != "patience":  # the default budget is a target on val, met within ±0.02
        assert abs(results["policy"]["val"]["macs_fraction"] - 0.75) <= 0.02 + 1e-9


def test_second_run_reuses_the_trained_backbone(tiny_config, tmp_path):
    first = eedn.run_pipeline(tiny_config | {"strategy": "im-only", "strategy_options": {"epochs": 1},
                                             "evaluators": [], "out": str(tmp_path / "a")})
    second = eedn.run_pipeline(tiny_config | {"strategy": "jei", "strategy_options": {"epochs": 2, "warmup_epochs": 1},
                                              "evaluators": [], "out": str(tmp_path / "b")})
    assert first["backbone"]["cache_path"] == second["backbone"]["cache_path"]
    assert second["backbone"]["source"] == "cache"
    assert first["exits"][-1]["accuracy"] == second["exits"][-1]["accuracy"]
    saved = json.loads((tmp_path / "b" / "config.json").read_text())
    assert saved["strategy"] == "jei" and saved["seed"] == 0


def test_interrupted_backbone_training_resumes(tiny_config, tmp_path, monkeypatch):
    cfg = tiny_config | {"cache_dir": str(tmp_path / "cache"), "backbone_training": {"epochs": 3}}
    calls = {"n": 0}
    real = backbone_training.evaluate_accuracy

    def interrupt_second_epoch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(backbone_training, "evaluate_accuracy", interrupt_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        eedn.run_pipeline(cfg | {"strategy": "im-only", "evaluators": []})
    partial = list((tmp_path / "cache" / "backbones").glob("*.partial.pt"))
    assert len(partial) == 1 and torch.load(partial[0], weights_only=True)["epoch"] == 0

    monkeypatch.setattr(backbone_training, "evaluate_accuracy", real)
    seen = []
    monkeypatch.setattr(backbone_training.Progress, "log", lambda self, msg: seen.append(msg))
    results = eedn.run_pipeline(cfg | {"strategy": "im-only", "strategy_options": {"epochs": 1}, "evaluators": [],
                                       "resume": True})
    assert any("resuming backbone training at epoch 2/3" in m for m in seen)
    assert results["backbone"]["source"] == "trained"
    assert not list((tmp_path / "cache" / "backbones").glob("*.partial.pt"))


def test_bad_inputs_are_one_line_errors(tiny_config, tmp_path):
    with pytest.raises(EednError, match="multiple of 16"):
        eedn.run_pipeline(tiny_config | {"backbone": "t2t_vit_tiny", "image_size": 20})
    corrupt = tmp_path / "bad.pt"
    corrupt.write_bytes(b"not a checkpoint")
    res = CliRunner().invoke(cli, ["run", "--backbone", "resnet_tiny", "--image-size", "16", "--quiet",
                                   "--backbone-checkpoint", str(corrupt), "--backbone-epochs", "0",
                                   "--out", str(tmp_path / "never")])
    assert res.exit_code != 0
    assert len(res.output.strip().splitlines()) == 1 and "bad.pt" in res.output
    assert not (tmp_path / "never").exists()  # nothing half-written
    res = CliRunner().invoke(cli, ["run", "--backbone", "t2t_vit_tiny", "--image-size", "20", "--quiet"])
    assert res.exit_code != 0 and "multiple of 16" in res.output and "Traceback" not in res.output


def test_names_and_options_are_checked_before_stage_0(tiny_config, tmp_path, monkeypatch):
    from eedn.pipeline import run as pipeline

    def no_training(*args, **kwargs):
        raise AssertionError("stage 0 ran before the config was checked")

    monkeypatch.setattr(pipeline, "train_backbone", no_training)
    cfg = tiny_config | {"cache_dir": str(tmp_path / "fresh-cache")}
    with pytest.raises(EednError, match=r"strategy 'im-only': unknown option\(s\) epochz.*did you mean 'epochs'"):
        eedn.run_pipeline(cfg | {"strategy": "im-only", "strategy_options": {"epochz": 2}})
    with pytest.raises(EednError, match="unknown evaluator 'nope'; known: .*calibration"):
        eedn.run_pipeline(cfg | {"strategy": "im-only", "evaluators": ["nope"]})
    with pytest.raises(EednError, match="unknown gate 'nope'"):
        eedn.run_pipeline(cfg | {"strategy": "im-only", "gate": "nope"})
    with pytest.raises(EednError, match="backbone 'resnet_tiny': unknown option"):
        eedn.run_pipeline(cfg | {"backbone_options": {"exitz": "block"}})


def test_run_directory_describes_itself(tiny_config, tmp_path):
    """run.json alone rebuilds the model (no dataset), and the stored decisions are the gate's."""
    from eedn.pipeline.rundir import load_model, read_manifest

    out = tmp_path / "selfdescribing"
    results = eedn.run_pipeline(tiny_config | {"strategy": "im-only", "strategy_options": {"epochs": 1},
                                               "evaluators": [], "out": str(out)})
    manifest = read_manifest(out)
    assert manifest["model"]["backbone"]["name"] == "resnet_tiny"
    assert manifest["input"]["image_size"] == 16 and manifest["input"]["channels"] == 1
    assert manifest["environment"]["torch"] == torch.__version__
    assert manifest["environment"]["world_size"] == 1
    model, _ = load_model(out)
    test = eedn.read_outputs(out)[manifest["policy"]["trained_setting"]]["test"]
    decided = model.gate.decide(test.gate_scores)
    assert decided.tolist() == manifest["policy"]["test"]["exit_index"]
    shares = torch.bincount(decided, minlength=model.num_exits).double() / len(decided)
    assert torch.allclose(shares, torch.tensor(results["policy"]["exit_fractions"], dtype=torch.float64))
    predictions = test.gated_logits(decided).argmax(-1)
    assert predictions.tolist() == manifest["policy"]["test"]["prediction"]


def test_library_api_builds_a_model_from_registry_names():
    model = eedn.create_model("t2t_vit_tiny", num_classes=10, image_size=32, in_channels=1, gate="jei")
    logits = model(torch.zeros(2, 1, 32, 32))
    assert logits.shape == (2, model.num_exits, 10)
    assert model.gate_scores(logits).shape == (2, model.num_exits - 1)


def test_plugin_defaults_come_from_the_registrations():
    """The core names no plugin: unset names resolve to what the plugins registered as default."""
    from eedn.core.config import resolve_config
    from eedn.core.plugins import unregister_plugin

    cfg = resolve_config({})
    assert (cfg.backbone, cfg.strategy, cfg.dataset, cfg.inference_module) == (
        "t2t_vit", "jei", "digits", "linear")
    assert cfg.evaluators == ["calibration", "conformal"]

    class Rival:
        @eedn.hookimpl
        def register_datasets(self, register):
            register("rival", "nowhere:Nothing", default=True)

    eedn.register_plugin(Rival(), name="rival-default")
    try:
        with pytest.raises(EednError, match=r"no single default dataset: 2 \(digits, rival\)"):
            resolve_config({})
        assert resolve_config({"dataset": "digits"}).dataset == "digits"
    finally:
        unregister_plugin("rival-default")


def test_gate_pairing_tradeoff_and_budget_are_checked_before_stage_0(tiny_config, tmp_path, monkeypatch):
    from eedn.core.config import resolve_config
    from eedn.pipeline import run as pipeline
    from eedn.pipeline.plugin_checks import strategy_options

    monkeypatch.setattr(pipeline, "train_backbone", lambda *a, **k: (_ for _ in ()).throw(AssertionError("trained")))
    cfg = tiny_config | {"cache_dir": str(tmp_path / "fresh-cache")}
    with pytest.raises(EednError, match="gate 'jei' is learned, but strategy 'im-only' does not train gates"):
        eedn.run_pipeline(cfg | {"strategy": "im-only", "gate": "jei"})
    with pytest.raises(EednError, match="strategy 'jei' trains its gate, but gate 'max_prob' has nothing to train"):
        eedn.run_pipeline(cfg | {"strategy": "jei", "gate": "max_prob"})
    with pytest.raises(EednError, match="--lambda sets a cost trade-off, but strategy 'sdn' has none"):
        eedn.run_pipeline(cfg | {"strategy": "sdn", "tradeoff": 0.5})
    with pytest.raises(EednError, match="gate 'max_prob': invalid divisor=0"):
        eedn.run_pipeline(cfg | {"strategy": "im-only", "gate_options": {"divisor": 0}})
    assert strategy_options(resolve_config({"strategy": "jei", "tradeoff": [0.1, 1]}))["lambda"] == [0.1, 1]
    assert resolve_config({"budget": {"p": 12}}).budget == {"p": 12}  # a target replaces the default one
    assert resolve_config({}, ["budget.accuracy_drop=0.01"]).budget == {"accuracy_drop": 0.01}


def test_inference_module_options_reach_the_model_and_the_manifest(tiny_config, tmp_path):
    from eedn.pipeline.rundir import load_model

    out = tmp_path / "mlp-ims"
    eedn.run_pipeline(tiny_config | {"strategy": "im-only", "strategy_options": {"epochs": 1}, "evaluators": [],
                                     "inference_module": "mlp", "inference_module_options": {"hidden": "12"},
                                     "out": str(out)})
    model, manifest = load_model(out)
    assert manifest["model"]["inference_module"] == {"name": "mlp", "options": {"hidden": 12}}
    assert model.ims[0].net[0].out_features == 12


def test_evaluation_splits_are_read_in_eval_mode_whatever_the_training_mode():
    """A train-mode backbone (DropPath on) serves the train batches; val must stay deterministic."""
    from eedn.train.features import FeatureSource

    data = eedn.load_dataset("digits", image_size=16, seed=0)
    model = eedn.create_model("t2t_vit_tiny", num_classes=10, image_size=16, in_channels=1,
                              backbone_options={"drop_path_rate": 0.5})
    source = FeatureSource(model, data, cacheable=False, backbone_mode="train")
    first = next(source.batches("val", 32, shuffle=False))[0][-1]
    second = next(source.batches("val", 32, shuffle=False))[0][-1]
    assert torch.equal(first, second)
    a = next(source.batches("train", 32, shuffle=False))[0][-1]
    b = next(source.batches("train", 32, shuffle=False))[0][-1]
    assert not torch.equal(a, b)  # the train split does see the train-mode backbone
