"""Real early-exit inference agrees with the policy simulated on stored all-exit outputs.

The engine runs the same ops as the all-exit pass, but on row subsets; batched kernels may round the
last bits differently for another batch size. So every comparison here is exact on exit indices and
predictions, and each test first *asserts* (on the simulation) that no decision is within 1e-4 of
its boundary: no score within 1e-4 of a threshold, no JEI hazard within 1e-4 of 0.5, no top-2 logit
gap below 1e-4. The thresholds/gate biases are placed in the middle of gaps between sample scores,
so these preconditions hold by construction and a failure means the engine decided differently.
"""
from __future__ import annotations

import functools
import math
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from eedn.core.cost import measure_exit_macs
from eedn.runtime.errors import EednError
from eedn.deploy.inference import EarlyExitEngine, InferenceResult, early_exit_inference, full_inference
from eedn.core.build import create_model
from eedn.core.model import EarlyExitModel

MARGIN = 1e-4
#: stand-in per-exit costs (measuring real ones is slow and tested once, below)
FAKE_MACS = [10.0, 25.0, 45.0, 70.0, 100.0]
NUM_CLASSES = 5
N = 64

BACKBONES = {
    "t2t1": ("t2t_vit_tiny", 32, 1),
    "t2t3": ("t2t_vit_tiny", 32, 3),
    "resnet": ("resnet_tiny", 16, 3),
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tiny models run fastest on one thread, and a busy shared machine cannot stall it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------ helpers
def synthetic_batch(channels: int, size: int, seed: int) -> tuple[Tensor, Tensor]:
    """Class prototypes plus noise: learnable enough that exits differ in confidence and agree often."""
    gen = torch.Generator().manual_seed(seed)
    protos = torch.randn(NUM_CLASSES, channels, size, size, generator=gen)
    labels = torch.arange(N) % NUM_CLASSES
    x = protos[labels] + 1.2 * torch.randn(N, channels, size, size, generator=gen)
    return x, labels


@functools.lru_cache(maxsize=None)
def _trained_weights(key: str, seed: int) -> tuple[dict[str, Tensor], Tensor]:
    """Backbone + IM weights after a few dozen steps of training the IMs and the head (gate-free, so
    every gate of a test reuses them)."""
    name, size, channels = BACKBONES[key]
    torch.manual_seed(seed)
    model = create_model(name, num_classes=NUM_CLASSES, image_size=size, in_channels=channels, seed=seed).eval()
    for module in model.backbone.modules():  # T2T-ViT's std-0.02 init gives near-constant cls features
        if isinstance(module, nn.Linear):
            module.reset_parameters()
    x, y = synthetic_batch(channels, size, seed)
    with torch.no_grad():
        feats = model.exit_features(x)

    def loss() -> Tensor:
        return sum(nn.functional.cross_entropy(model.exit_logits(i, f), y) for i, f in enumerate(feats))

    loss().backward()  # the features are fixed: only the IMs and the backbone's head get gradients
    opt = torch.optim.Adam([p for p in model.parameters() if p.grad is not None], lr=0.02)
    for _ in range(30):
        opt.zero_grad()
        loss().backward()
        opt.step()
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith("gate.")}
    return state, x


def trained_model(key: str, gate: str, gate_options: dict | None = None, seed: int = 0) -> tuple[EarlyExitModel, Tensor]:
    """A tiny model with trained-ish IMs and head, and a fresh ``gate``."""
    name, size, channels = BACKBONES[key]
    state, x = _trained_weights(key, seed)
    model = create_model(name, num_classes=NUM_CLASSES, image_size=size, in_channels=channels, gate=gate,
                         gate_options=gate_options, seed=seed).eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith("gate.") for k in missing)
    model.requires_grad_(False)
    return model, x.clone()


def simulate(model: EarlyExitModel, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """All-exit logits [N, E, C], gate scores [N, G] and the policy's exit indices on stored outputs."""
    with torch.no_grad():
        feats = model.exit_features(x)
        logits = model.logits_from_features(feats)
        scores = model.gate_scores(logits, feats)
    return logits, scores, model.gate.decide(scores)


def gap_midpoint(values: Tensor, target: int, ascending: bool, min_gap: float = 4 * MARGIN) -> float:
    """A cut in a gap (> ``min_gap`` wide) of ``values`` that lets about ``target`` of them through."""
    s = values.double().sort(descending=not ascending).values
    gaps = (s[1:] - s[:-1]).abs()
    ok = (gaps > min_gap).nonzero().flatten()
    assert len(ok), "no usable gap between sample scores: change the seed"
    i = int(ok[(ok + 1 - target).abs().argmin()])
    return float((s[i] + s[i + 1]) / 2)


def spread_thresholds(model: EarlyExitModel, x: Tensor) -> None:
    """Threshold gate: about 1/(E-l) of the rows still running leave at each exit l."""
    _, scores, _ = simulate(model, x)
    g = model.gate.num_exits
    th = torch.full((g,), math.inf, dtype=torch.float64)
    running = torch.ones(scores.shape[0], dtype=torch.bool)
    for l in range(g):
        col = scores[running, l]
        th[l] = gap_midpoint(col, max(1, len(col) // (g + 1 - l)), ascending=False)
        running &= ~(scores[:, l].double() >= th[l])
    model.gate.thresholds.copy_(th)


def spread_jei(model: EarlyExitModel, x: Tensor) -> None:
    """JEI gate on p_max alone: ``gate logit = W·p_max + b_l``, with each ``b_l`` in a gap.

    A running row leaves at l iff ``g_l >= surv/2`` and ``1 - Σ_{j<l} g_j >= surv/2`` (the hazard rule,
    docs/method.md), i.e. iff ``b_l >= logit(surv/2) - W·p_max``: a per-row cut, so ``b_l`` goes between
    two of them.
    """
    from eedn_plugins.jei_gate import hazards

    gate, g, w = model.gate, model.gate.num_exits, 100.0
    with torch.no_grad():
        for lin in gate.linears:
            lin.weight.zero_()
            lin.weight[0, 0] = w
            lin.bias.fill_(-1e4)  # g = 0 exactly: no exit until this gate is placed
        for l in range(g):
            logits, scores, exits = simulate(model, x)
            running = exits >= l
            if l == 0:
                surv, spent = torch.ones(len(x)), torch.zeros(len(x))
            else:
                surv = (1 - hazards(scores[:, :l])).prod(1)
                spent = scores[:, :l].sum(1)
            reachable = running & (1 - spent >= surv / 2 + 1e-3)
            p_max = logits[:, l].float().softmax(-1).amax(-1)
            cut = torch.logit(surv / 2) - w * p_max
            target = max(1, int(running.sum()) // (g + 1 - l))
            # at the cut dh/db >= 1/4, so a gap of 2e-3 in gate-logit units keeps hazards 2.5e-4 from 0.5
            gate.linears[l].bias.fill_(gap_midpoint(cut[reachable], target, ascending=True, min_gap=2e-3))


def assert_robust(model: EarlyExitModel, logits: Tensor, scores: Tensor, exits: Tensor) -> None:
    """No decision of the simulation lies within MARGIN of its boundary (see the module docstring)."""
    top2 = logits.float().topk(2, dim=-1).values
    assert float((top2[..., 0] - top2[..., 1]).min()) > MARGIN, "an argmax is a near-tie: change the seed"
    gate, g = model.gate, model.gate.num_exits
    for l in range(g):
        reach = exits >= l
        if not bool(reach.any()):
            break
        if hasattr(gate, "thresholds") and math.isfinite(float(gate.thresholds[l])):
            dist = (scores[reach, l].double() - gate.thresholds[l]).abs()
            assert float(dist.min()) > MARGIN, f"a score is within {MARGIN} of threshold {l}"
        if type(gate).__name__ == "JeiGate":
            from eedn_plugins.jei_gate import hazards

            dist = (hazards(scores[reach, : l + 1])[:, l] - 0.5).abs()
            assert float(dist.min()) > MARGIN, f"a hazard is within {MARGIN} of 0.5 at exit {l}"


def assert_engine_matches(model: EarlyExitModel, x: Tensor, result: InferenceResult | None = None) -> Tensor:
    logits, scores, exits = simulate(model, x)
    assert_robust(model, logits, scores, exits)
    engine = EarlyExitEngine(model, exit_macs=FAKE_MACS[: model.num_exits])
    result = result or engine(x)
    rows = torch.arange(len(x))
    assert torch.equal(result.exit_index, exits)
    assert torch.equal(result.predictions, logits[rows, exits].argmax(-1))
    torch.testing.assert_close(result.logits, logits[rows, exits], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(result.confidences, logits[rows, exits].softmax(-1).amax(-1), rtol=1e-4, atol=1e-5)
    assert torch.equal(result.macs, engine.exit_macs[exits])
    return exits


def configure(model: EarlyExitModel, x: Tensor, gate: str) -> None:
    if gate == "jei":
        spread_jei(model, x)
    elif gate in ("max_prob", "entropy", "margin"):
        spread_thresholds(model, x)


# --------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("key", list(BACKBONES))
@pytest.mark.parametrize("gate", ["jei", "max_prob", "entropy", "margin", "patience"])
def test_engine_equals_simulation_with_exits_everywhere(key, gate):
    model, x = trained_model(key, gate, {"k": 2} if gate == "patience" else None)
    configure(model, x, gate)
    exits = assert_engine_matches(model, x)
    used = set(exits.tolist())
    first = 1 if gate == "patience" else 0  # patience k=2 cannot leave before exit 1
    assert used == set(range(first, model.num_exits)), f"exits used: {sorted(used)}"


@pytest.mark.parametrize("key", ["t2t3", "resnet"])
@pytest.mark.parametrize("gate", ["jei", "max_prob", "patience"])
def test_batch_of_one_equals_the_batch(key, gate):
    model, x = trained_model(key, gate, {"k": 2} if gate == "patience" else None, seed=1)
    configure(model, x, gate)
    exits = assert_engine_matches(model, x)
    engine = EarlyExitEngine(model, exit_macs=FAKE_MACS[: model.num_exits])
    batch = engine(x)
    picked = range(0, N, 3)
    singles = [engine(x[i : i + 1]) for i in picked]
    assert all(one.exit_index.shape == (1,) for one in singles)
    assert torch.equal(torch.cat([one.exit_index for one in singles]), exits[picked])
    assert torch.equal(torch.cat([one.predictions for one in singles]), batch.predictions[picked])
    assert torch.equal(torch.cat([one.macs for one in singles]), batch.macs[picked])
    assert len(set(exits[picked].tolist())) > 1


def _everyone_leaves_first(model: EarlyExitModel) -> None:
    if hasattr(model.gate, "thresholds"):
        model.gate.thresholds.fill_(-math.inf)
    elif hasattr(model.gate, "linears"):
        for lin in model.gate.linears:
            lin.bias.data.fill_(50.0)
    else:
        model.gate.k.fill_(1)


def _nobody_leaves_early(model: EarlyExitModel) -> None:
    if hasattr(model.gate, "thresholds"):
        model.gate.thresholds.fill_(math.inf)
    elif hasattr(model.gate, "linears"):
        for lin in model.gate.linears:
            lin.bias.data.fill_(-50.0)
    else:
        model.gate.k.fill_(model.num_exits + 1)


class StageCounter:
    """Wraps ``backbone.stage`` to record how many rows each stage ran on."""

    def __init__(self, backbone):
        self.rows: list[int] = []
        self.inner = backbone.stage

    def __call__(self, index, state):
        self.rows.append((state[0] if isinstance(state, tuple) else state).shape[0])
        return self.inner(index, state)


@pytest.mark.parametrize("key", ["t2t1", "resnet"])
@pytest.mark.parametrize("gate", ["jei", "max_prob", "patience"])
def test_all_exit_at_first_exit_stops_after_stage_0(key, gate, monkeypatch):
    model, x = trained_model(key, gate)
    _everyone_leaves_first(model)
    counter = StageCounter(model.backbone)
    monkeypatch.setattr(model.backbone, "stage", counter)
    result = EarlyExitEngine(model, exit_macs=FAKE_MACS[: model.num_exits])(x)
    assert counter.rows == [N]  # no later stage ran
    monkeypatch.undo()
    assert torch.equal(result.exit_index, torch.zeros(N, dtype=torch.long))
    assert_engine_matches(model, x, result)


@pytest.mark.parametrize("key", ["t2t3", "resnet"])
@pytest.mark.parametrize("gate", ["jei", "max_prob", "patience"])
def test_no_early_exit_runs_the_full_network_without_copies(key, gate, monkeypatch):
    model, x = trained_model(key, gate)
    _nobody_leaves_early(model)
    copies = []
    import eedn.deploy.inference as inference

    monkeypatch.setattr(inference, "select_rows", lambda state, rows: copies.append(rows) or state[rows])
    result = EarlyExitEngine(model, exit_macs=FAKE_MACS[: model.num_exits])(x)
    assert copies == []  # nobody left, so the state was never copied
    g = model.num_exits - 1
    assert torch.equal(result.exit_index, torch.full((N,), g, dtype=torch.long))
    torch.testing.assert_close(result.logits, full_inference(model, x), rtol=1e-4, atol=1e-5)
    assert_engine_matches(model, x, result)


def test_rows_leave_the_batch():
    model, x = trained_model("resnet", "max_prob")
    spread_thresholds(model, x)
    _, _, exits = simulate(model, x)
    counter = StageCounter(model.backbone)
    model.backbone.stage = counter
    EarlyExitEngine(model, exit_macs=FAKE_MACS[: model.num_exits])(x)
    expected = [int((exits >= l).sum()) for l in range(model.num_exits)]
    assert counter.rows == expected and expected[-1] < N


def test_boostnet_combiner_prefix():
    boostnet = pytest.importorskip("eedn_plugins.boostnet")
    if not hasattr(boostnet, "BoostNetEnsemble"):
        pytest.skip("BoostNet has no exit combiner")
    for key in ("t2t3", "resnet"):
        model, x = trained_model(key, "max_prob", seed=2)
        model.exit_combiner = boostnet.BoostNetEnsemble(0.5)
        spread_thresholds(model, x)  # on the ensembles F_s, which the gate reads
        exits = assert_engine_matches(model, x)
        assert set(exits.tolist()) == set(range(model.num_exits))


class FutureLeak(nn.Module):
    """Not causal: every exit reports the mean over all exits."""

    def forward(self, logits: Tensor) -> Tensor:
        return logits.mean(1, keepdim=True).expand_as(logits)


def test_non_causal_combiner_is_refused():
    model, x = trained_model("resnet", "max_prob")
    model.exit_combiner = FutureLeak()
    with pytest.raises(EednError, match="not causal"):
        EarlyExitEngine(model)(x)


def test_exit_macs_given_measured_and_checked():
    model, x = trained_model("resnet", "max_prob")
    spread_thresholds(model, x)
    measured, full = measure_exit_macs(model)
    auto = EarlyExitEngine(model)
    assert auto.exit_macs.tolist() == [float(m) for m in measured]
    given = early_exit_inference(model, x, exit_macs=[1, 2, 3])
    assert given.macs.dtype == torch.float64
    assert torch.equal(given.macs, torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)[given.exit_index])
    assert float(auto(x).macs.mean()) < full  # exits spread: cheaper on average than the plain backbone
    with pytest.raises(EednError, match="exit_macs has 2 entries"):
        EarlyExitEngine(model, exit_macs=[1, 2])


def test_training_mode_is_restored_and_inputs_checked():
    model, x = trained_model("t2t3", "max_prob")
    model.train()
    EarlyExitEngine(model, exit_macs=[1] * model.num_exits)(x[:4])
    assert model.training and model.backbone.blocks[0].training
    with pytest.raises((EednError, ValueError)):
        EarlyExitEngine(model, exit_macs=[1] * model.num_exits)(torch.zeros(2, 1, 32, 32))
    empty = EarlyExitEngine(model, exit_macs=[1] * model.num_exits)(x[:0])
    assert len(empty) == 0 and empty.logits.shape == (0, NUM_CLASSES)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    model, x = trained_model("t2t3", "jei")
    spread_jei(model, x)
    cpu = EarlyExitEngine(model)(x)
    gpu = EarlyExitEngine(model.cuda())(x)
    assert gpu.exit_index.is_cuda
    assert torch.equal(gpu.exit_index.cpu(), cpu.exit_index)
    assert torch.equal(gpu.predictions.cpu(), cpu.predictions)


# ------------------------------------------------------------------------------- predict and bench
@pytest.fixture(scope="module")
def tiny_run(eedn_cache, tmp_path_factory):
    """A finished run directory: tiny ResNet on 16-px digits, im-only heads, max_prob policy."""
    import copy

    from conftest import TINY_RUN

    from eedn.pipeline.run import run_pipeline

    out = tmp_path_factory.mktemp("inference") / "run"
    cfg = copy.deepcopy(TINY_RUN) | {"cache_dir": eedn_cache, "out": str(out), "strategy": "im-only",
                                     "strategy_options": {"epochs": 1}, "evaluators": []}
    run_pipeline(cfg)
    return out


def _digit_pngs(folder, indices) -> list:
    """Raw 8x8 digits (the pixels behind the digits source) written as 8-bit grayscale PNGs."""
    from PIL import Image

    from eedn_plugins.datasets.digits import _digits_arrays

    images, _ = _digits_arrays()
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in indices:
        pixels = (images[i, 0] * 255).round().to(torch.uint8).numpy()
        path = folder / f"digit_{i:04d}.png"
        Image.fromarray(pixels, mode="L").save(path)
        paths.append(path)
    return paths


def test_preprocessing_matches_the_digits_eval_split(tiny_run, tmp_path):
    import eedn
    from eedn.deploy.predict import InputRecipe, load_image, preprocessor
    from eedn.pipeline.rundir import read_manifest

    recipe = InputRecipe.from_manifest(read_manifest(tiny_run))
    data = eedn.load_dataset("digits", image_size=16, seed=eedn.read_results(tiny_run)["config"]["seed"])
    assert (recipe.channels, recipe.image_size) == (1, 16)
    assert recipe.mean == data.info["mean"] and recipe.std == data.info["std"]
    assert recipe.class_names == [str(c) for c in range(10)]
    base = data.test.dataset  # the whole normalised tensor; test is a Subset of it
    indices = [int(i) for i in data.test.indices[:6]]
    preprocess = preprocessor(recipe)
    for path, i in zip(_digit_pngs(tmp_path, indices), indices):
        # 8-bit PNGs round the k/16 pixel values by at most 0.5/255 before normalisation
        torch.testing.assert_close(load_image(path, preprocess), base[i][0], atol=0.6 / 255 / recipe.std[0],
                                   rtol=0)


def test_predict_command_prints_each_image(tiny_run, tmp_path):
    from click.testing import CliRunner

    from eedn.cli.deploy_commands import predict
    from eedn.deploy.predict import predict_files
    from eedn.pipeline.rundir import read_manifest

    pngs = _digit_pngs(tmp_path / "imgs", range(5)) + _digit_pngs(tmp_path / "imgs" / "nested", [10])
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    single = _digit_pngs(tmp_path / "one", [20])[0]
    res = CliRunner(env={"COLUMNS": "300"}).invoke(
        predict, [str(tiny_run), "--input", str(tmp_path / "imgs"), "--input", str(single), "--batch-size", "4"])
    assert res.exit_code == 0, res.output
    for p in pngs + [single]:
        assert p.name in res.output
    assert "notes.txt" not in res.output and "of the full network" in res.output

    rows = predict_files(tiny_run, [tmp_path / "imgs", single], batch_size=3)
    assert [r["file"] for r in rows] == [str(p) for p in pngs + [single]]
    exit_macs = read_manifest(tiny_run)["model"]["exit_macs"]
    for r in rows:
        assert r["class"] == str(r["class_index"]) and 0 <= r["class_index"] < 10
        assert 0 < r["confidence"] <= 1 and r["macs"] == exit_macs[r["exit"]]
    other = predict_files(tiny_run, [tmp_path / "imgs", single], batch_size=7)  # batching is invisible...
    drop = lambda r: {k: v for k, v in r.items() if k != "confidence"}  # noqa: E731
    assert [drop(r) for r in rows] == [drop(r) for r in other]
    assert [r["confidence"] for r in rows] == pytest.approx([r["confidence"] for r in other])  # ...to the last bits


def test_predict_agrees_with_the_runs_stored_test_decisions(tiny_run):
    """The engine on the preprocessed test images reproduces run.json's per-sample policy decisions."""
    import eedn
    from eedn.deploy.inference import EarlyExitEngine
    from eedn.pipeline.rundir import read_manifest

    manifest = read_manifest(tiny_run)
    model, _ = eedn.load_run(tiny_run)
    data = eedn.load_dataset("digits", image_size=16, seed=0)
    images = torch.stack([data.test[i][0] for i in range(len(data.test))])
    out = EarlyExitEngine(model, exit_macs=manifest["model"]["exit_macs"])(images)
    stored = manifest["policy"]["test"]
    assert out.exit_index.tolist() == stored["exit_index"]
    assert out.predictions.tolist() == stored["prediction"]


def test_predict_bad_input_is_one_line(tiny_run, tmp_path):
    from click.testing import CliRunner

    from eedn.cli.deploy_commands import predict

    (tmp_path / "empty").mkdir()
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"definitely not a png")
    _digit_pngs(tmp_path / "ok", [0])
    cases = [
        ([str(tiny_run), "--input", str(tmp_path / "empty")], "no images found"),
        ([str(tiny_run), "--input", str(tmp_path / "missing.png")], "does not exist"),
        ([str(tiny_run), "--input", str(broken)], "cannot read image"),
        ([str(tmp_path), "--input", str(tmp_path / "ok")], "not a finished eedn run directory"),
        ([str(tmp_path / "nowhere"), "--input", str(tmp_path / "ok")], "no such run directory"),
        ([str(tiny_run), "--input", str(tmp_path / "ok"), "--batch-size", "0"], "--batch-size"),
    ]
    for args, message in cases:
        res = CliRunner().invoke(predict, args)
        assert res.exit_code == 1, res.output
        lines = res.output.strip().splitlines()
        assert len(lines) == 1 and message in lines[0] and "Traceback" not in res.output


def _colour_folder(root, classes=("red", "green", "blue"), per_class=20, size=16) -> None:
    """``root/train/<class>/*.png``: noisy RGB squares whose dominant channel is the class."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        folder = root / "train" / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 90, (size, size, 3))
            pixels[..., c] += 160
            Image.fromarray(pixels.astype(np.uint8), mode="RGB").save(folder / f"{name}_{i:02d}.png")


def test_predict_and_bench_need_only_the_run_directory(eedn_cache, tmp_path):
    """An image-folder run keeps working after its training data is deleted: model and preprocessing
    come from run.json and model.pt, and the preprocessing equals the source's evaluation transform."""
    import shutil

    from click.testing import CliRunner

    import eedn
    from eedn.cli.deploy_commands import bench, predict
    from eedn.deploy.predict import InputRecipe, load_image, predict_files, preprocessor
    from eedn.pipeline.rundir import read_manifest

    data_dir = tmp_path / "colours"
    _colour_folder(data_dir)
    run_dir = tmp_path / "run"
    eedn.run_pipeline({"backbone": "resnet_tiny", "dataset": "image-folder", "dataset_options": {"data_dir": str(data_dir)},
                       "image_size": 16, "backbone_training": {"epochs": 1, "batch_size": 32}, "strategy": "im-only",
                       "strategy_options": {"epochs": 1}, "evaluators": [], "cache_dir": eedn_cache,
                       "out": str(run_dir), "progress": False})
    recipe = InputRecipe.from_manifest(read_manifest(run_dir))
    assert recipe.class_names == ["blue", "green", "red"] and (recipe.channels, recipe.image_size) == (3, 16)
    data = eedn.load_dataset("image-folder", image_size=16, seed=0, data_dir=str(data_dir))
    view, index = data.test.dataset, data.test.indices[0]  # test is a Subset of the evaluation view
    torch.testing.assert_close(load_image(view.samples[index][0], preprocessor(recipe)), view[index][0])

    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for name in ("red_00.png", "green_01.png", "blue_02.png"):
        shutil.copy(next(data_dir.rglob(name)), inputs / name)
    shutil.rmtree(data_dir)  # the training data is gone

    rows = predict_files(run_dir, [inputs])
    assert [Path(r["file"]).name for r in rows] == ["blue_02.png", "green_01.png", "red_00.png"]
    assert all(r["class"] in recipe.class_names for r in rows)
    res = CliRunner(env={"COLUMNS": "300"}).invoke(predict, [str(run_dir), "--input", str(inputs)])
    assert res.exit_code == 0, res.output
    assert "red_00.png" in res.output and "of the full network" in res.output
    res = CliRunner(env={"COLUMNS": "300"}).invoke(
        bench, [str(run_dir), "--input", str(inputs), "--batch-sizes", "1,3", "--repeats", "1", "--no-stage-profile"])
    assert res.exit_code == 0, res.output
    assert "realised" in res.output


def test_benchmark_rows_are_consistent(tiny_run):
    import eedn
    from eedn.deploy.bench import benchmark
    from eedn.pipeline.rundir import read_manifest

    spec = read_manifest(tiny_run)["model"]
    test = eedn.load_dataset("digits", image_size=16, seed=0).test
    rows = benchmark(tiny_run, test, batch_sizes=(1, 8), repeats=2, warmup=1, max_samples=24, batch1_samples=5)
    assert [(r["batch_size"], r["samples"]) for r in rows] == [(1, 5), (8, 24)]
    exit_macs = torch.tensor(spec["exit_macs"], dtype=torch.float64)
    for r in rows:
        assert r["full_macs"] == spec["full_macs"]
        assert r["mean_macs"] == pytest.approx(float((torch.tensor(r["exit_fractions"]) * exit_macs).sum()))
        assert r["mac_speedup"] == pytest.approx(r["full_macs"] / r["mean_macs"])
        assert r["wall_speedup"] == pytest.approx(r["full_s"] / r["engine_s"])
        assert r["realisation"] == pytest.approx(r["wall_speedup"] / r["mac_speedup"])
        assert sum(r["exit_fractions"]) == pytest.approx(1.0) and r["full_s"] > 0 and r["engine_s"] > 0
    with pytest.raises(EednError, match="give the images"):
        benchmark(tiny_run)


def test_benchmark_on_a_model_measures_its_macs():
    from eedn.deploy.bench import benchmark

    model, x = trained_model("resnet", "max_prob")
    spread_thresholds(model, x)
    exit_macs, full_macs = measure_exit_macs(model)
    (row,) = benchmark(model, x, batch_sizes=[16], repeats=1, warmup=0)
    _, _, exits = simulate(model, x)
    assert row["full_macs"] == full_macs
    assert row["mean_macs"] == pytest.approx(float(torch.tensor(exit_macs, dtype=torch.float64)[exits].mean()))
    with pytest.raises(EednError, match="give the images"):
        benchmark(model)
    with pytest.raises(EednError, match="batch sizes"):
        benchmark(model, x, batch_sizes=[0])


def test_bench_command_and_script(tiny_run, tmp_path):
    import json
    import runpy

    from click.testing import CliRunner

    from eedn.cli.deploy_commands import bench

    images = tmp_path / "imgs"
    _digit_pngs(images, range(10))
    out = tmp_path / "bench.json"
    res = CliRunner(env={"COLUMNS": "200"}).invoke(
        bench, [str(tiny_run), "--input", str(images), "--batch-sizes", "2,8", "--max-samples", "8", "--repeats", "1",
                "--threads", "1", "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert "realised" in res.output
    rows = json.loads(out.read_text())
    assert [(r["batch_size"], r["samples"]) for r in rows] == [(2, 8), (8, 8)]
    res = CliRunner().invoke(bench, [str(tiny_run), "--input", str(images), "--batch-sizes", "a,b"])
    assert res.exit_code == 1 and "--batch-sizes" in res.output and len(res.output.strip().splitlines()) == 1
    res = CliRunner().invoke(bench, [str(tiny_run)])
    assert res.exit_code != 0 and "--input" in res.output

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_inference.py"
    main = runpy.run_path(str(script))["main"]
    rows = main(["--backbone", "resnet_tiny", "--image-size", "16", "--samples", "30", "--batch-sizes", "30",
                 "--repeats", "1", "--exit-shares", "1,1,1"])
    assert rows[0]["exit_fractions"] == pytest.approx([1 / 3] * 3, abs=0.04)  # the gate met the asked shares
    rows = main(["--run-dir", str(tiny_run), "--batch-sizes", "4", "--max-samples", "8", "--repeats", "1"])
    assert rows[0]["samples"] == 8  # the run's test split, rebuilt through the library
    rows = main(["--run-dir", str(tiny_run), "--input", str(images), "--batch-sizes", "5", "--repeats", "1"])
    assert rows[0]["samples"] == 10


def test_compiled_engine_reaches_the_eager_exits():
    """``compile=True`` runs the same segments through torch.compile (dynamic batch): same exits, same logits up
    to kernel rounding, on a batch and on a smaller batch (no recompile for the new size)."""
    model, x = trained_model("resnet", "max_prob", seed=2)
    configure(model, x, "max_prob")
    eager = EarlyExitEngine(model, exit_macs=FAKE_MACS[: model.num_exits])
    compiled = EarlyExitEngine(model, exit_macs=FAKE_MACS[: model.num_exits], compile=True)
    for batch in (x, x[:5]):
        a, b = eager(batch), compiled(batch)
        assert torch.equal(a.exit_index, b.exit_index) and torch.equal(a.predictions, b.predictions)
        torch.testing.assert_close(a.logits, b.logits, rtol=1e-4, atol=1e-5)
