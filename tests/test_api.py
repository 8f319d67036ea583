"""The library API behind ``import eedn``: every public name resolves with a docstring, the research
functions behave like the pipeline's steps, and examples/library_use.py needs nothing but ``eedn``."""
from __future__ import annotations

import ast
import inspect
import sys
from pathlib import Path

import pytest
import torch

import eedn
from eedn.errors import EednError, UnknownNameError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "library_use.py"
#: the step-by-step research API (docs/api.md)
RESEARCH_API = ("load_dataset", "create_model", "build_model", "measure_exit_macs", "split_outputs", "fit_strategy",
                "calibrate_gate", "apply_gate", "evaluate", "load_run", "read_results", "run_pipeline",
                "predict_files", "read_images", "benchmark", "EarlyExitEngine")


def test_every_export_resolves_and_is_listed_in_the_docs():
    doc = (ROOT / "docs" / "api.md").read_text()
    for name in eedn.__all__:
        assert getattr(eedn, name) is not None, name
        assert f"`{name}" in doc, f"docs/api.md does not list eedn.{name}"
    with pytest.raises(AttributeError):
        eedn.no_such_name  # noqa: B018


@pytest.mark.parametrize("name", RESEARCH_API)
def test_research_api_is_documented_and_typed(name):
    obj = getattr(eedn, name)
    assert inspect.getdoc(obj), f"eedn.{name} has no docstring"
    if inspect.isfunction(obj):
        sig = inspect.signature(obj)
        untyped = [p.name for p in sig.parameters.values() if p.annotation is inspect.Parameter.empty]
        assert not untyped and sig.return_annotation is not inspect.Signature.empty, f"eedn.{name}: {untyped}"


def test_example_imports_nothing_but_eedn():
    tree = ast.parse(EXAMPLE.read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(("." * node.level) + (node.module or ""))
    third_party = {m for m in imported if m.split(".")[0] not in sys.stdlib_module_names and m != "__future__"}
    assert third_party == {"eedn"}, f"the example imports {sorted(third_party)}"


# ------------------------------------------------------------------------------------------- steps
@pytest.fixture(scope="module")
def digits16():
    return eedn.load_dataset("digits", image_size=16, seed=0)


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    return eedn.create_model("resnet_tiny", num_classes=10, image_size=16, in_channels=1, gate="max_prob")


def test_load_dataset(digits16):
    assert digits16.sizes() == eedn.load_dataset("digits", image_size=16, seed=0).sizes()
    assert digits16.test[0][0].shape == (1, 16, 16)
    other = eedn.load_dataset("digits", image_size=16, seed=1)
    assert other.test.indices != digits16.test.indices  # the seed draws the held-out splits
    with pytest.raises(UnknownNameError, match="unknown dataset 'nope'.*digits"):
        eedn.load_dataset("nope")


def test_split_outputs_are_the_all_exit_pass_and_are_cached(digits16, tiny_model, tmp_path):
    test = eedn.split_outputs(tiny_model, digits16, "test", tmp_path)
    images = torch.stack([digits16.test[i][0] for i in range(len(digits16.test))])
    with torch.no_grad():
        logits = tiny_model.eval()(images)
    torch.testing.assert_close(test.logits, logits, rtol=1e-4, atol=1e-5)
    assert test.labels.tolist() == [digits16.test[i][1] for i in range(len(digits16.test))]
    assert test.exit_macs.tolist() == [float(m) for m in eedn.measure_exit_macs(tiny_model)[0]]
    cached = list((tmp_path / "features").glob("*.pt"))
    assert len(cached) == 1
    again = eedn.split_outputs(tiny_model, digits16, "test", tmp_path, exit_macs=[1, 2, 3], full_macs=3)
    assert list((tmp_path / "features").glob("*.pt")) == cached  # read back, not recomputed
    assert torch.equal(again.logits, test.logits) and again.exit_macs.tolist() == [1.0, 2.0, 3.0]
    # another seed holds other images: its features must not come from that cache entry
    other = eedn.load_dataset("digits", image_size=16, seed=1)
    assert not torch.equal(eedn.split_outputs(tiny_model, other, "test", tmp_path).labels, test.labels)
    with pytest.raises(EednError, match="unknown split 'dev'"):
        eedn.split_outputs(tiny_model, digits16, "dev")


def test_fit_strategy_trains_the_heads_like_the_pipeline(digits16, tiny_model, tmp_path):
    before = {k: v.clone() for k, v in tiny_model.backbone.state_dict().items()}
    untrained = tiny_model.heads_state_dict()
    result = eedn.fit_strategy("im-only", tiny_model, digits16, cache_dir=tmp_path, epochs=2)
    assert isinstance(result, eedn.StrategyResult) and len(result.settings) == 1
    assert [h["epoch"] for h in result.history] == [0, 1]
    assert result.history[1]["loss"] < result.history[0]["loss"]  # the IMs learn
    heads = tiny_model.heads_state_dict()
    assert all(torch.equal(heads[k], v) for k, v in result.settings[0][1].items())
    assert not all(torch.equal(heads[k], untrained[k]) for k in untrained)
    after = tiny_model.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the backbone stayed frozen
    assert not any(p.requires_grad for p in tiny_model.backbone.parameters())
    assert list((tmp_path / "features").glob("*.pt"))  # fixed features: computed once, cached
    with pytest.raises(EednError, match="unknown .*option.*epochz"):
        eedn.fit_strategy("im-only", tiny_model, digits16, epochz=1)
    with pytest.raises(EednError, match="strategy's constructor"):
        eedn.fit_strategy(eedn.create("strategy", "im-only"), tiny_model, digits16, epochs=1)


def test_calibrate_gate_returns_a_calibrated_copy(digits16, tiny_model, tmp_path):
    eedn.fit_strategy("im-only", tiny_model, digits16, cache_dir=tmp_path, epochs=1)
    val = eedn.split_outputs(tiny_model, digits16, "val", tmp_path)
    original = {k: v.clone() for k, v in tiny_model.gate.state_dict().items()}
    cheapest = float(val.exit_macs[0]) / val.full_macs
    for target in (0.8, {"macs_fraction": 0.9}):
        gate = eedn.calibrate_gate(tiny_model.gate, val, target)
        fraction = target if isinstance(target, float) else target["macs_fraction"]
        cost = val.summarize(eedn.apply_gate(gate, val))["macs_fraction"]
        assert cost <= max(fraction, cheapest) + 1e-9
    assert all(torch.equal(original[k], v) for k, v in tiny_model.gate.state_dict().items())
    jei = eedn.create_model("resnet_tiny", num_classes=10, image_size=16, in_channels=1, gate="jei")
    with pytest.raises(EednError, match="no budget calibration"):
        eedn.calibrate_gate(jei.gate, val, 0.8)


def test_evaluate_fits_on_cal_then_scores_the_policy(digits16, tiny_model, tmp_path):
    eedn.fit_strategy("im-only", tiny_model, digits16, cache_dir=tmp_path, epochs=1)
    cal, test = (eedn.split_outputs(tiny_model, digits16, s, tmp_path) for s in ("cal", "test"))
    gate = eedn.calibrate_gate(tiny_model.gate, cal, 0.9)
    exit_test, exit_cal = eedn.apply_gate(gate, test), eedn.apply_gate(gate, cal)
    metrics = eedn.evaluate("calibration", test, cal, exit_test, exit_cal)
    assert 0 <= metrics["ece"] <= 1
    evaluator = eedn.create("evaluator", "calibration")
    assert eedn.evaluate(evaluator, test, cal, exit_test, exit_cal)["ece"] == pytest.approx(metrics["ece"])
    with pytest.raises(UnknownNameError, match="unknown evaluator"):
        eedn.evaluate("nope", test, cal, exit_test, exit_cal)


# ------------------------------------------------------------------------------------------ example
def test_library_example_runs_end_to_end(eedn_cache, tmp_path, capsys):
    """examples/library_use.py's three parts, on a tiny ResNet at 16 px (the example's own settings are
    the T2T-ViT of `eedn run`)."""
    import runpy

    example = runpy.run_path(str(EXAMPLE))
    workdir = str(tmp_path)
    results = example["whole_pipeline"](workdir, backbone="resnet_tiny", image_size=16, strategy="im-only",
                                        strategy_options={"epochs": 1}, evaluators=[],
                                        backbone_training={"epochs": 3, "batch_size": 64})
    assert results["run_dir"] == f"{workdir}/run" and results["curve"]
    model, manifest = eedn.load_run(results["run_dir"])
    assert manifest["input"]["image_size"] == 16 and model.num_exits == len(results["exits"])
    with pytest.raises(EednError, match="setting 'nope'"):
        eedn.load_run(results["run_dir"], setting="nope")

    rows = example["by_hand"](workdir, epochs=1, budgets=(0.8, 1.0))
    assert [r["budget"] for r in rows] == [0.8, 1.0]
    assert rows[-1]["macs_fraction"] >= rows[0]["macs_fraction"] and all(0 <= r["ece"] <= 1 for r in rows)
    (bench,) = example["real_early_exits"](workdir, samples=64)
    assert bench["samples"] == 64 and bench["mac_speedup"] >= 1
    out = capsys.readouterr().out
    assert "budget 0.80: accuracy" in out and "fewer MACs" in out
