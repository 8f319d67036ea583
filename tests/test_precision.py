"""Precision (autocast) and channels_last in every stage: checks, cache keys, stage 0, features, heads, engine.
CUDA tests are skipped without a GPU (docs/scale.md says where they ran)."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

import eedn
from eedn.core.config import resolve_config
from eedn.runtime.errors import EednError
from eedn.deploy.inference import EarlyExitEngine
from eedn.runtime.precision import (autocast, check_precision, cpu_supports_bf16, grad_scaler, numerics_key,
                            use_channels_last)
from eedn.pipeline.run import run_pipeline

needs_bf16 = pytest.mark.skipif(not cpu_supports_bf16(), reason="CPU without native bfloat16")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_precision_checks_are_one_line():
    assert check_precision("fp32", "cpu") == "fp32"
    with pytest.raises(EednError, match="fp16 needs a CUDA device") as err:
        check_precision("fp16", "cpu")
    assert "\n" not in str(err.value)
    with pytest.raises(EednError, match="precision must be one of"):
        check_precision("int8", "cpu")
    with pytest.raises(EednError, match=r"invalid precision=.half.; choose from fp32, bf16, fp16"):
        resolve_config({"precision": "half"})
    with pytest.raises(EednError, match="channels_last must be auto, true or false"):
        resolve_config({"channels_last": "yes"})
    assert not grad_scaler("bf16", "cpu").is_enabled()


def test_channels_last_follows_the_backbone_and_keys_change_only_off_default():
    resnet = eedn.create("backbone", "resnet_tiny", num_classes=3, image_size=16, in_channels=1)
    vit = eedn.create("backbone", "t2t_vit_tiny", num_classes=3, image_size=32, in_channels=1)
    assert use_channels_last("auto", resnet) and not use_channels_last("auto", vit)
    assert use_channels_last(False, resnet) is False and use_channels_last(True, vit) is True
    assert numerics_key("fp32", False) == {}  # fp32 caches made before precision existed stay valid
    assert numerics_key("bf16", True) == {"precision": "bf16", "channels_last": True}


def test_channels_last_training_step_matches_nchw():
    torch.manual_seed(0)
    a = eedn.create("backbone", "resnet_tiny", num_classes=3, image_size=16, in_channels=3)
    b = copy.deepcopy(a).to(memory_format=torch.channels_last)
    x, y = torch.randn(8, 3, 16, 16), torch.arange(8) % 3
    la = torch.nn.functional.cross_entropy(a(x), y)
    lb = torch.nn.functional.cross_entropy(b(x.contiguous(memory_format=torch.channels_last)), y)
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-5)


@needs_bf16
def test_bf16_engine_agrees_with_the_bf16_simulation():
    """Under bf16 the engine's smaller batches may round differently: decisions agree on >= 90 % of rows
    (measured 100 % on this seed), logits come back as fp32."""
    model = eedn.create_model("resnet_tiny", num_classes=5, image_size=16, in_channels=3, gate="max_prob").eval()
    x = torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), autocast("bf16", "cpu"):
        feats = model.exit_features(x)
        logits = model.logits_from_features(feats)
        scores = model.gate_scores(logits, feats).float()
    model.gate.thresholds.copy_(scores.double().median(0).values)
    exits = model.gate.decide(scores)
    result = EarlyExitEngine(model, exit_macs=[1.0] * model.num_exits, precision="bf16", channels_last=True)(x)
    fp32 = EarlyExitEngine(model, exit_macs=[1.0] * model.num_exits)(x)
    assert result.logits.dtype == torch.float32
    assert not torch.equal(result.logits, fp32.logits)  # autocast really ran
    assert float((result.exit_index == exits).double().mean()) >= 0.9
    assert len(set(exits.tolist())) > 1


@needs_bf16
def test_bf16_pipeline_caches_apart_and_stores_fp32(tiny_config, tmp_path):
    """Stage 0, features, heads and evaluation under bf16: its own backbone cache entry, fp32 features."""
    cfg = tiny_config | {"strategy": "im-only", "strategy_options": {"epochs": 1}}
    fp32 = run_pipeline(cfg | {"out": str(tmp_path / "fp32")})
    bf16 = run_pipeline(cfg | {"out": str(tmp_path / "bf16"), "precision": "bf16"})
    assert fp32["backbone"]["cache_path"] != bf16["backbone"]["cache_path"]
    assert bf16["config"]["precision"] == "bf16" and bf16["config"]["channels_last"] == "auto"
    assert bf16["backbone"]["source"] == "trained"
    features = list((Path(cfg["cache_dir"]) / "features").glob("features-*.pt"))
    blobs = [torch.load(f, weights_only=True) for f in features]
    assert blobs and all(t.dtype == torch.float32 for b in blobs for t in b["feats"])
    print("test accuracy fp32 / bf16:", fp32["backbone"]["test_accuracy"], bf16["backbone"]["test_accuracy"])
    assert bf16["backbone"]["test_accuracy"] >= fp32["backbone"]["test_accuracy"] - 0.1
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["precision"] == "bf16"


def test_fp16_on_cpu_stops_before_anything_runs(tiny_config):
    with pytest.raises(EednError, match="fp16 needs a CUDA device"):
        run_pipeline(tiny_config | {"precision": "fp16"})


# ----------------------------------------------------------------------------------------------- CUDA


@needs_cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_cuda_pipeline_runs_in_every_precision(tiny_config, tmp_path, precision):
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("GPU without bfloat16")
    cfg = tiny_config | {"device": "cuda", "precision": precision, "out": str(tmp_path / precision),
                         "strategy": "jei", "strategy_options": {"epochs": 1, "warmup_epochs": 1}}
    results = run_pipeline(cfg)
    assert results["backbone"]["test_accuracy"] > 0.3
    assert results["environment"]["device"].startswith("cuda")


@needs_cuda
def test_cuda_fp16_training_uses_a_grad_scaler():
    scaler = grad_scaler("fp16", "cuda")
    assert scaler.is_enabled()
    model = eedn.create("backbone", "resnet_tiny", num_classes=3, image_size=16, in_channels=3).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 3, 16, 16, device="cuda"), torch.arange(8, device="cuda") % 3
    before = [p.detach().clone() for p in model.parameters()]
    with autocast("fp16", "cuda"):
        loss = torch.nn.functional.cross_entropy(model(x), y)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


@needs_cuda
def test_cuda_in_memory_batches_stay_on_the_device():
    from eedn.core.image_batches import ImageBatches
    from eedn_plugins.datasets.digits import DigitsSource

    splits = DigitsSource().splits(16, seed=0)
    x, y = next(iter(ImageBatches(splits.train, 32, shuffle=True, generator=torch.Generator().manual_seed(0),
                                  device="cuda")))
    assert x.is_cuda and y.is_cuda and x.dtype == torch.float32


def test_the_resnet20_example_config_resolves():
    from eedn.core.config import load_config_file

    cfg = resolve_config(load_config_file(Path(__file__).parent.parent / "examples/configs/cifar10_resnet20.yaml"))
    assert (cfg.precision, cfg.channels_last, cfg.backbone_options["size"]) == ("bf16", True, "20")
    assert cfg.backbone_training.optimizer == "sgd" and cfg.backbone_training.batch_size == 128
