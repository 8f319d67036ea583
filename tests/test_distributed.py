"""torchrun / DDP on CPU (gloo): stage 0 equals one process on the same global batches, sharded features and
every later stage give the single-process decisions, rank 0 alone writes, mismatched configs fail in one line.
The NCCL test runs only where 2+ GPUs exist."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import eedn
from eedn.train.backbone_training import train_backbone
from eedn.runtime.errors import EednError

REPO = Path(__file__).resolve().parent.parent
RECIPE = {"epochs": 1, "optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.05, "batch_size": 64,
          "label_smoothing": 0.1, "warmup_epochs": 0, "augment": True}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_tiny(out: Path, device: str = "cpu") -> dict:
    """One epoch of a T2T-ViT-tiny without dropout or stochastic depth (so nothing random but the shuffle and the
    augmentation) on augmented digits; the weights and the summary."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    data = eedn.load_dataset("digits", image_size=16, seed=0, augment=True)
    model = eedn.create("backbone", "t2t_vit_tiny", num_classes=10, image_size=16, in_channels=1,
                        drop_path_rate=0.0).to(device)
    for module in model.modules():  # dropout draws per rank differ from one process's by design: switch it off
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    summary = train_backbone(model, data, dict(RECIPE), seed=0, device=device, checkpoint_path=out / "bb.pt")
    return {"state": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "summary": summary}


def _ddp_worker(rank: int, size: int, port: int, out: str, task: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from eedn.runtime import distributed

    device = "cuda" if task == "nccl" else "cpu"
    world, device = distributed.init_from_env(device)
    try:
        distributed.check_same_config({"seed": 0, "device": f"{device}:{rank}", "threads": 1})  # device kind only
        try:
            distributed.check_same_config({"seed": rank, "device": "cpu", "threads": 1})
        except EednError as err:
            Path(out, f"error{rank}.txt").write_text(str(err))
        result = _train_tiny(Path(out, f"rank{rank}"), device)
        torch.save(result, Path(out, f"result{rank}.pt"))
    finally:
        distributed.shutdown()


def spawn(task: str, out: Path, size: int = 2) -> None:
    for r in range(size):
        (out / f"rank{r}").mkdir(parents=True, exist_ok=True)
    mp.spawn(_ddp_worker, args=(size, free_port(), str(out), task), nprocs=size, join=True)


def test_ddp_stage0_equals_one_process_on_the_same_global_batches(tmp_path):
    """Two gloo ranks, each with half of every global batch (same shuffle and augmentation draws), end the epoch
    with the weights one process reaches; only rank 0 writes the checkpoint."""
    spawn("train", tmp_path)
    single = _train_tiny(tmp_path)
    ranks = [torch.load(tmp_path / f"result{r}.pt", weights_only=True) for r in range(2)]
    for key, value in single["state"].items():  # equal up to the order of the gradient sums (measured 1.3e-5)
        torch.testing.assert_close(ranks[0]["state"][key], value, rtol=1e-3, atol=1e-4)
        assert torch.equal(ranks[0]["state"][key], ranks[1]["state"][key])  # DDP keeps the ranks identical
    print("max |DDP - single| weight difference:",
          max(float((ranks[0]["state"][k].float() - v.float()).abs().max()) for k, v in single["state"].items()))
    assert ranks[0]["summary"]["val_accuracy"] == pytest.approx(single["summary"]["val_accuracy"], abs=0.01)
    assert (tmp_path / "rank0" / "bb.pt").exists() and not (tmp_path / "rank1" / "bb.pt").exists()
    # the workers also checked their configs: a difference is the same one line on every rank
    errors = [(tmp_path / f"error{r}.txt").read_text() for r in range(2)]
    assert errors[0] == errors[1] and "rank 1 runs a different config than rank 0 (differs in seed)" in errors[0]
    assert "\n" not in errors[0]




def _eedn(args: list[str], torchrun: bool, env: dict) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"] if torchrun \
        else [sys.executable]
    return subprocess.run(launcher + ["-m", "eedn", "run", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


def test_torchrun_run_on_digits_gives_the_single_process_decisions(tmp_path):
    """`torchrun --nproc-per-node 2 -m eedn run --backbone resnet --strategy jei` (gloo): with the same trained
    backbone, the sharded and gathered features, the heads, every stored output and every test decision equal
    the single-process run's; the run directory is written once and records world size 2."""
    from eedn.pipeline.run import run_pipeline

    cfg = {"backbone": "resnet", "strategy": "jei", "image_size": 16, "backbone_training": {"epochs": 2},
           "strategy_options": {"epochs": 3, "warmup_epochs": 1}, "threads": 1, "progress": False}
    run_pipeline(cfg | {"cache_dir": str(tmp_path / "c1"), "out": str(tmp_path / "one")})
    (tmp_path / "c2").mkdir()
    shutil.copytree(tmp_path / "c1" / "backbones", tmp_path / "c2" / "backbones")  # features: recomputed sharded
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    ddp = _eedn(["--config", str(tmp_path / "cfg.json"), "--cache-dir", str(tmp_path / "c2"), "--out",
                 str(tmp_path / "two"), "--quiet"], True, env)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert ddp.stdout.count("run directory:") == 1  # rank 0 alone prints
    one, two = (json.loads((tmp_path / d / "run.json").read_text()) for d in ("one", "two"))
    assert two["environment"]["world_size"] == 2 and one["environment"]["world_size"] == 1
    assert two["policy"]["test"] == one["policy"]["test"]  # exits, predictions, confidences, labels
    # every stored per-exit logit and gate score of val / cal / test, for every trained setting: bit for bit
    outs = [torch.load(tmp_path / d / "outputs.pt", weights_only=True) for d in ("one", "two")]
    assert outs[0].keys() == outs[1].keys()
    for setting, splits in outs[0].items():
        for split, tensors in splits.items():
            for name, value in tensors.items():
                other = outs[1][setting][split][name]
                assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, name
    features = sorted(p.name for p in (tmp_path / "c2" / "features").iterdir())
    assert features == sorted(p.name for p in (tmp_path / "c1" / "features").iterdir())  # same keys, written once
    for name in features:
        a, b = (torch.load(tmp_path / c / "features" / name, weights_only=True) for c in ("c1", "c2"))
        assert all(torch.equal(x, y) for x, y in zip(a["feats"], b["feats"])) and torch.equal(a["labels"], b["labels"])


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_nccl_stage0_equals_one_gpu(tmp_path):
    spawn("nccl", tmp_path)
    single = _train_tiny(tmp_path, "cuda")
    ranks = [torch.load(tmp_path / f"result{r}.pt", weights_only=True) for r in range(2)]
    for key, value in single["state"].items():
        torch.testing.assert_close(ranks[0]["state"][key], value, rtol=1e-3, atol=1e-4)


# ---------------------------------------------------------------- failing instead of hanging (issue 23, finding 3)

RANK_RUN = ["run", "--backbone", "resnet_tiny", "--image-size", "16", "--backbone-epochs", "2", "--strategy", "im-only",
            "--epochs", "1", "--set", "evaluators=[]", "--set", "backbone_training.batch_size=64", "--quiet",
            "--threads", "1", "--cache-dir", "cache", "--out", "run"]


def run_ranks(cwds: list[Path], extra_env: list[dict], timeout: float = 240) -> list[tuple[int, str]]:
    """Two eedn ranks started as torchrun would start them (RANK, WORLD_SIZE, MASTER_*), each in its own working
    directory, with a short group timeout; a hang fails the test instead of waiting for gloo's 30 minutes."""
    port = free_port()
    procs = []
    for rank, (cwd, extra) in enumerate(zip(cwds, extra_env)):
        env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", RANK=str(rank), LOCAL_RANK=str(rank),
                   WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), EEDN_DIST_TIMEOUT="60",
                   PYTHONPATH=str(REPO), **extra)
        if "EEDN_FAULT_POINT" not in extra:
            env.pop("EEDN_FAULT_POINT", None)
        procs.append(subprocess.Popen([sys.executable, "-m", "eedn", *RANK_RUN], cwd=cwd, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    try:
        for p in procs:
            _, err = p.communicate(timeout=timeout)
            results.append((p.returncode, err))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
            p.communicate()
        pytest.fail(f"the ranks hung for {timeout} s")
    return results


def test_ranks_agree_on_the_backbone_cache_before_stage_0(tmp_path):
    """A node-local cache: rank 0 finds the trained backbone, rank 1 does not. Before, rank 0 skipped stage 0
    while rank 1 waited in DDP, forever. Now both train it (one warning) and the run finishes."""
    from eedn.pipeline.run import run_pipeline

    node0, node1 = tmp_path / "node0", tmp_path / "node1"
    node0.mkdir()
    node1.mkdir()
    run_pipeline({"backbone": "resnet_tiny", "image_size": 16, "backbone_training": {"epochs": 2, "batch_size": 64},
                  "strategy": "im-only", "strategy_options": {"epochs": 1}, "evaluators": [], "threads": 1,
                  "progress": False, "cache_dir": str(node0 / "cache"), "out": str(tmp_path / "warm")})
    assert list((node0 / "cache" / "backbones").glob("*.pt"))
    (rc0, err0), (rc1, err1) = run_ranks([node0, node1], [{}, {}])
    assert (rc0, rc1) == (0, 0), err0[-2000:] + err1[-2000:]
    assert "is valid on rank 0 but not on rank 1" in err0
    assert (node0 / "run" / "run.json").exists() and not (node1 / "run").exists()  # rank 0 alone writes
    manifest = json.loads((node0 / "run" / "run.json").read_text())
    assert manifest["environment"]["world_size"] == 2


def test_a_dead_rank_stops_the_others_with_one_line_naming_it(tmp_path):
    """Rank 1 is SIGKILLed in its second stage-0 batch; rank 0 stops at once with one line naming rank 1."""
    (rc0, err0), (rc1, _) = run_ranks([tmp_path, tmp_path], [{}, {"EEDN_FAULT_POINT": "backbone-batch@2"}])
    assert rc1 == -9
    assert rc0 == 1
    lines = [line for line in err0.splitlines() if line.startswith("error")]
    assert len(lines) == 1 and lines[0].startswith("error: rank 0: rank 1 died or was killed"), err0[-2000:]
    assert not (tmp_path / "run").exists()


def test_the_group_timeout_is_configurable_and_checked(monkeypatch):
    from eedn.runtime import distributed

    monkeypatch.delenv(distributed.TIMEOUT_ENV, raising=False)
    assert distributed.timeout_s() == 600.0
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "45")
    assert distributed.timeout_s() == 45.0
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "soon")
    with pytest.raises(EednError, match="EEDN_DIST_TIMEOUT must be a number of seconds"):
        distributed.timeout_s()
