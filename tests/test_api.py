"""The library API behind ``import eedn``: every public name resolves with a docstring, docs/api.md and the
type stub match the code, the research functions behave like the pipeline's steps, the same seeds give the
same numbers, and examples/library_use.py needs nothing but ``eedn``."""
from __future__ import annotations

import ast
import inspect
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import eedn
from eedn.runtime.errors import EednError, UnknownNameError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "library_use.py"
#: the step-by-step research API (docs/api.md)
RESEARCH_API = ("load_dataset", "create_model", "build_model", "measure_exit_macs", "split_outputs", "fit_strategy",
                "calibrate_gate", "apply_gate", "evaluate", "load_run", "read_results", "run_pipeline",
                "predict_files", "read_images", "benchmark", "EarlyExitEngine", "train_backbone", "read_outputs")


def test_every_export_resolves_and_is_listed_in_the_docs():
    doc = (ROOT / "docs" / "api.md").read_text()
    for name in eedn.__all__:
        assert getattr(eedn, name) is not None, name
        assert f"`{name}" in doc, f"docs/api.md does not list eedn.{name}"
    with pytest.raises(AttributeError):
        eedn.no_such_name  # noqa: B018


def documented_signatures(doc: str) -> dict[str, ast.arguments]:
    """Every ``name(params)`` in the first column of docs/api.md's tables (the column that names the API;
    calls in the descriptions are prose), parsed as a Python parameter list."""
    found = {}
    for line in doc.splitlines():
        if not line.startswith("|") or line.startswith("|---"):
            continue
        for span in line.split("|")[1].split("`")[1::2]:  # the backticked spans of the first cell
            head, paren, rest = span.partition("(")
            if paren and head.isidentifier() and ")" in rest:
                found[head] = ast.parse(f"def {head}({rest[:rest.rindex(')')]}): pass").body[0].args
    return found


def code_parameters(obj) -> list[tuple[str, str, object]]:
    target = obj.__init__ if inspect.isclass(obj) else obj
    params = list(inspect.signature(target).parameters.values())
    if inspect.isclass(obj):
        params = params[1:]  # self
    return [(p.name, p.kind.name, p.default) for p in params]


def doc_parameters(args: ast.arguments) -> list[tuple[str, str, object]]:
    empty = inspect.Parameter.empty
    positional = args.posonlyargs + args.args
    defaults = [empty] * (len(positional) - len(args.defaults)) + [ast.literal_eval(d) for d in args.defaults]
    out = [(a.arg, "POSITIONAL_OR_KEYWORD", d) for a, d in zip(positional, defaults)]
    if args.vararg:
        out.append((args.vararg.arg, "VAR_POSITIONAL", empty))
    out += [(a.arg, "KEYWORD_ONLY", empty if d is None else ast.literal_eval(d))
            for a, d in zip(args.kwonlyargs, args.kw_defaults)]
    if args.kwarg:
        out.append((args.kwarg.arg, "VAR_KEYWORD", empty))
    return out


def test_documented_signatures_match_the_code():
    """docs/api.md writes each signature in full: names, order, keyword-only marks and defaults."""
    import eedn.evaluation.risk

    signatures = documented_signatures((ROOT / "docs" / "api.md").read_text())
    assert {"fit_strategy", "EarlyExitEngine", "create_model", "train_backbone", "read_outputs"} <= set(signatures)
    wrong = {}
    for name, args in signatures.items():
        obj = getattr(eedn, name, None) or getattr(eedn.evaluation.risk, name, None)
        assert obj is not None, f"docs/api.md documents {name}(...), which is neither eedn.{name} nor eedn.evaluation.risk.{name}"
        if doc_parameters(args) != (code := code_parameters(obj)):
            wrong[name] = [f"{n}={d!r}" if d is not inspect.Parameter.empty else n for n, _, d in code]
    assert not wrong, f"docs/api.md signatures differ from the code; the code has: {wrong}"


def test_signature_reader_sees_a_wrong_signature():
    args = documented_signatures("| `f(a, b=2, *, c=None, **kw) -> int` | `engine(x)` runs it |\n|---|---|")
    assert list(args) == ["f"]

    def f(a, b=3, *, c=None, **kw):
        return a

    assert doc_parameters(args["f"]) != code_parameters(f)  # b's default differs
    f.__defaults__ = (2,)
    assert doc_parameters(args["f"]) == code_parameters(f)


def test_type_stub_lists_every_export_from_its_module():
    """eedn/__init__.pyi (what editors and type checkers read) names exactly eedn.__all__, each imported from
    the module the lazy export loads it from."""
    stub = ast.parse((ROOT / "eedn" / "__init__.pyi").read_text())
    imported = {}
    for node in stub.body:
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                assert alias.asname == alias.name, f"the stub must re-export {alias.name} as itself"
                imported[alias.name] = node.module
    declared = next(n for n in stub.body if isinstance(n, ast.Assign) and n.targets[0].id == "__all__")
    assert sorted(ast.literal_eval(declared.value)) == sorted(eedn.__all__)
    assert set(imported) | {"__version__"} == set(eedn.__all__)
    expected = {name: module for name, module in eedn._EXPORTS.items()}
    expected |= {"EednError": "eedn.runtime.errors", "UnknownNameError": "eedn.runtime.errors", "hookimpl": "eedn.core.hookspecs"}
    assert imported == expected


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
        assert abs(cost - max(fraction, cheapest)) <= 0.02 + 1e-9  # a target, met within ±0.02 on val
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


# -------------------------------------------------------------------------------------- seeds
#: the same research script, run in two fresh interpreters whose global random states differ (another hash
#: seed, other draws before and between the calls): with seed=0 everywhere it must print the same numbers
SEEDED_SCRIPT = """
import random, sys, tempfile
import numpy as np, torch
import eedn

noise = int(sys.argv[1])  # a user script that drew from the global generators before and between the calls
torch.manual_seed(noise); random.seed(noise); np.random.seed(noise); torch.rand(noise)
data = eedn.load_dataset("digits", image_size=8, seed=0)
model = eedn.create_model("resnet_tiny", num_classes=10, image_size=8, in_channels=1, gate="max_prob", seed=0)
torch.rand(noise)
summary = eedn.train_backbone(model, data, epochs=1, batch_size=128, seed=0)
torch.rand(noise)
with tempfile.TemporaryDirectory() as cache:
    eedn.fit_strategy("im-only", model, data, cache_dir=cache, seed=0, epochs=1, batch_size=128)
    test = eedn.split_outputs(model, data, "test", cache)
print(repr(summary["val_accuracy"]), repr(summary["history"][0]["train_loss"]))
finite = test.gate_scores[test.gate_scores.isfinite()]
print(repr(float(test.logits.double().sum())), repr(float(finite.double().sum())), len(finite))
heads = torch.cat([v.double().flatten() for v in model.heads_state_dict().values()])
print(repr(float(heads[heads.isfinite()].sum())))
"""


def test_the_same_script_with_seed_0_prints_the_same_numbers():
    runs = []
    for noise, hash_seed in ((1, "1"), (7, "2")):
        env = dict(os.environ, PYTHONHASHSEED=hash_seed, HF_HUB_OFFLINE="1")
        out = subprocess.run([sys.executable, "-c", SEEDED_SCRIPT, str(noise)], capture_output=True, text=True,
                             env=env, timeout=300, cwd=ROOT)
        assert out.returncode == 0, out.stderr
        runs.append(out.stdout.split())
    assert len(runs[0]) == 6 and runs[0] == runs[1]


def test_create_model_seed_fixes_the_weights_and_leaves_the_global_rng_alone():
    def weights(**kwargs):
        model = eedn.create_model("resnet_tiny", num_classes=10, image_size=16, in_channels=1, **kwargs)
        return torch.cat([v.flatten().float() for v in model.state_dict().values()])

    torch.manual_seed(123)
    expected_draw = torch.rand(5)
    torch.manual_seed(123)
    first = weights(seed=0)
    assert torch.equal(torch.rand(5), expected_draw)  # the seeded build drew nothing from the global stream
    torch.manual_seed(456)
    assert torch.equal(weights(seed=0), first)
    assert not torch.equal(weights(seed=1), first)
    torch.manual_seed(1)  # seed=None draws from the global stream, as torch modules do
    unseeded = weights(seed=None)
    torch.manual_seed(1)
    assert torch.equal(weights(seed=None), unseeded)
    assert not torch.equal(weights(seed=None), unseeded)


# ----------------------------------------------------------------------- stage 0 and checkpoints
def test_train_backbone_trains_in_place_and_create_model_loads_it(digits16, tiny_model, tmp_path):
    tiny_model.freeze_backbone()
    heads = {k: v.clone() for k, v in tiny_model.heads_state_dict().items()}
    before = {k: v.clone() for k, v in tiny_model.backbone.state_dict().items()}
    path = tmp_path / "backbone.pt"
    summary = eedn.train_backbone(tiny_model, digits16, epochs=2, batch_size=128, lr=3e-3, save_to=path)
    assert [h["epoch"] for h in summary["history"]] == [0, 1] and summary["epochs"] == 2
    assert summary["val_accuracy"] == max(h["val_accuracy"] for h in summary["history"])
    assert summary["history"][1]["train_loss"] < summary["history"][0]["train_loss"]
    trained = tiny_model.backbone.state_dict()
    assert not all(torch.equal(before[k], trained[k]) for k in before)
    assert all(torch.equal(heads[k], v) for k, v in tiny_model.heads_state_dict().items())  # heads untouched
    assert not any(p.requires_grad for p in tiny_model.backbone.parameters())  # still frozen, as it was given
    assert path.exists() and not path.with_suffix(".partial.pt").exists()

    loaded = eedn.create_model("resnet_tiny", num_classes=10, image_size=16, in_channels=1, gate="max_prob",
                               checkpoint=path, seed=5)
    assert all(torch.equal(v, trained[k]) for k, v in loaded.backbone.state_dict().items())
    fresh = eedn.create_model("resnet_tiny", num_classes=10, image_size=16, in_channels=1, gate="max_prob", seed=5)
    assert all(torch.equal(v, fresh.heads_state_dict()[k]) for k, v in loaded.heads_state_dict().items())
    with pytest.raises(EednError, match="not found"):
        eedn.create_model("resnet_tiny", num_classes=10, image_size=16, checkpoint=tmp_path / "nope.pt")
    with pytest.raises(EednError, match="optimizer must be"):
        eedn.train_backbone(tiny_model, digits16, epochs=1, optimizer="adam")
    with pytest.raises(EednError, match="epochs >= 1"):
        eedn.train_backbone(tiny_model, digits16, epochs=0)


# ---------------------------------------------------------------------- strategy options and λ
class RecordingStrategy(eedn.TrainingStrategy):
    """Trains nothing: records the options and the feature batch it was given."""

    tradeoff_option = "cost"
    seen: list = []

    @dataclass
    class Options:
        cost: float = eedn.option(0.5, "a cost trade-off")
        batch_size: int = eedn.option(64, "training batch size", min=1)
        epochs: int = eedn.option(1, "epochs", min=1)

    def fit(self, model, context):
        RecordingStrategy.seen.append({"cost": self.options.cost, "batch_size": self.options.batch_size,
                                       "epochs": self.options.epochs,
                                       "feature_batch": context.features.batch_size})
        return eedn.StrategyResult(settings=[(f"cost={self.options.cost}", model.heads_state_dict())])


class RecordingPlugin:
    @eedn.hookimpl
    def register_strategies(self, register):
        register("test-recording", RecordingStrategy, description="records its options (tests)")


@pytest.fixture
def recording():
    from eedn.core.plugins import register_plugin, unregister_plugin

    RecordingStrategy.seen.clear()
    register_plugin(RecordingPlugin(), name="test-api-recording")
    yield RecordingStrategy.seen
    unregister_plugin("test-api-recording")


def test_fit_strategy_tradeoff_and_options_reach_the_strategy(digits16, tiny_model, recording):
    eedn.fit_strategy("test-recording", tiny_model, digits16, tradeoff=2.0, strategy_options={"epochs": 3},
                      batch_size=16, feature_batch_size=100)
    assert recording[-1] == {"cost": 2.0, "batch_size": 16, "epochs": 3, "feature_batch": 100}
    eedn.fit_strategy("test-recording", tiny_model, digits16, strategy_options={"cost": 0.25})
    assert recording[-1] == {"cost": 0.25, "batch_size": 64, "epochs": 1, "feature_batch": 256}
    with pytest.raises(EednError, match="'cost'.*give it once"):
        eedn.fit_strategy("test-recording", tiny_model, digits16, tradeoff=1.0, cost=2.0)
    with pytest.raises(EednError, match="epochs given both"):
        eedn.fit_strategy("test-recording", tiny_model, digits16, strategy_options={"epochs": 2}, epochs=2)
    with pytest.raises(EednError, match="'im-only' has no cost trade-off"):
        eedn.fit_strategy("im-only", tiny_model, digits16, tradeoff=1.0)
    with pytest.raises(EednError, match="tradeoff go to the strategy's constructor"):
        eedn.fit_strategy(RecordingStrategy(), tiny_model, digits16, tradeoff=1.0)
    assert len(recording) == 2


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

    # the stored outputs are what the run's model gives on the run's test split
    stored = eedn.read_outputs(results["run_dir"])
    assert list(stored) == manifest["settings"] == ["im-only"]
    assert all(set(splits) == {"val", "cal", "test"} for splits in stored.values())
    test = stored[manifest["policy"]["trained_setting"]]["test"]
    data = eedn.load_dataset("digits", image_size=16, seed=0)
    recomputed = eedn.split_outputs(model, data, "test")
    assert torch.equal(test.labels, recomputed.labels)
    # converged IMs carry weights ~1/σ of their features (σ ≈ 0.05 here), so a recomputed feature's float noise
    # (another batch size) reaches the logits ~20× larger
    torch.testing.assert_close(test.logits, recomputed.logits, rtol=1e-4, atol=1e-4)
    assert test.exit_macs.tolist() == [float(m) for m in manifest["model"]["exit_macs"]]
    with pytest.raises(EednError, match="not a finished eedn run directory"):
        eedn.read_outputs(tmp_path)

    rows = example["by_hand"](workdir, epochs=1, budgets=(0.8, 1.0))
    assert [r["budget"] for r in rows] == [0.8, 1.0]
    assert rows[-1]["macs_fraction"] >= rows[0]["macs_fraction"] and all(0 <= r["ece"] <= 1 for r in rows)
    (bench,) = example["real_early_exits"](workdir, samples=64)
    assert bench["samples"] == 64 and bench["mac_speedup"] >= 1
    out = capsys.readouterr().out
    assert "budget 0.80: accuracy" in out and "fewer MACs" in out
