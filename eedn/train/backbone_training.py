"""Stage 0: train the backbone on its own head (or load it), cached by a hash of what defines it.

A second run with another strategy finds the trained backbone in the cache and skips this stage.
Every epoch writes a resumable checkpoint atomically; ``resume=True`` continues from it. The checkpoint
holds every random state (torch CPU and CUDA, numpy, Python, the batch-order generator), so a resumed run
is the same run as an uninterrupted one, bit for bit on CPU. The checkpoint kept is the epoch with the
best validation accuracy (clean protocol: never test). A non-finite loss stops training with one line and
caches nothing.
"""
from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Sized, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from eedn.core.cache import cache_key
from eedn.core.contracts import Backbone
from eedn.core.data import DataSplits, subset
from eedn.runtime.distributed import all_reduce_sum, barrier, shard_rows, world
from eedn.runtime.errors import EednError, warn
from eedn.core.image_batches import ImageBatches, LoaderOptions
from eedn.runtime.io import atomic_torch_save, fault_point, load_checkpoint
from eedn.runtime.precision import autocast, grad_scaler, to_memory_format
from eedn.runtime.progress import Progress


def recipe(cfg_training: dict, suggested_epochs: int) -> dict:
    """Fill the recipe's automatic values (None) so the cache key and config record real numbers."""
    r = dict(cfg_training)
    r.pop("checkpoint", None)
    if not r.get("adapt_input_channels"):
        r.pop("adapt_input_channels", None)  # the default leaves existing cache keys as they were
    adamw = r["optimizer"] == "adamw"
    r["epochs"] = suggested_epochs if r["epochs"] is None else r["epochs"]
    r["lr"] = (1e-3 if adamw else 0.05) if r["lr"] is None else r["lr"]
    r["weight_decay"] = (0.05 if adamw else 5e-4) if r["weight_decay"] is None else r["weight_decay"]
    return r


def backbone_key(backbone_name: str, backbone_options: dict, dataset: dict, image_size: int, seed: int,
                 rec: dict) -> str:
    return cache_key(backbone=backbone_name, options=backbone_options, dataset=dataset, image_size=image_size,
                     seed=seed, recipe=rec)


def rng_states(loader_generator: torch.Generator) -> dict:
    """Every random state training draws from, as tensors and numbers (a weights-only checkpoint holds them)."""
    kind, keys, pos, has_gauss, gauss = cast("tuple[str, np.ndarray, int, int, float]", np.random.get_state())
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(), "loader": loader_generator.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64),
                       "gauss_next": gauss_next}}


def restore_rng_states(states: dict, loader_generator: torch.Generator) -> None:
    torch.set_rng_state(states["torch"])
    loader_generator.set_state(states["loader"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    n = states["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = states["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["internal"].tolist()), p["gauss_next"]))


def check_finite_loss(loss: float, epoch: int, epochs: int, rec: dict) -> None:
    if not math.isfinite(loss):
        raise EednError(f"backbone training (stage 0) diverged: the loss became {loss} in epoch {epoch + 1}/{epochs}; "
                        f"lower backbone_training.lr (now {rec['lr']:g}) and run again. Nothing was cached")


@torch.no_grad()
def evaluate_accuracy(backbone: Backbone, loader: DataLoader | ImageBatches, device: str, precision: str = "fp32",
                      channels_last: bool = False) -> float:
    backbone.eval()
    correct: float = 0
    total: float = 0
    for x, y in loader:
        with autocast(precision, device):
            pred = backbone(to_memory_format(x.to(device), channels_last)).argmax(-1)
        correct += int((pred == y.to(pred.device)).sum())
        total += len(y)
    correct, total = all_reduce_sum([correct, total])  # under DDP each rank read its shard
    return correct / max(total, 1)


def train_backbone(backbone: Backbone, data: DataSplits, rec: dict, *, seed: int, device: str,
                   checkpoint_path: Path | None, resume: bool = False, progress: Progress | None = None,
                   num_workers: int = 0, precision: str = "fp32", channels_last: bool = False,
                   loader: LoaderOptions | None = None) -> dict:
    """Train ``backbone`` in place with ``rec``; return a summary (best val accuracy, epochs run).

    ``precision`` runs forward and loss under :func:`eedn.runtime.precision.autocast` (fp16 with a GradScaler);
    ``channels_last`` feeds NHWC images to a backbone whose weights were put in that format. Without
    ``checkpoint_path`` (a read-only cache) nothing is saved. Under torchrun the backbone trains with
    DistributedDataParallel, ``batch_size`` is the global batch (each rank takes its slice) and rank 0 alone
    writes checkpoints (:mod:`eedn.runtime.distributed`).
    """
    w = world()
    if w.active and int(rec["batch_size"]) % w.size:
        raise EednError(f"backbone_training.batch_size {rec['batch_size']} is the global batch and must divide by "
                        f"the {w.size} ranks; pick a multiple of {w.size}")
    if int(rec["epochs"]) < 1:
        raise EednError("backbone training needs epochs >= 1; an untrained backbone is never cached as trained")
    progress = progress or Progress(False)
    partial = checkpoint_path.with_suffix(".partial.pt") if checkpoint_path is not None else None
    epochs = int(rec["epochs"])
    g = torch.Generator().manual_seed(seed)
    loader = loader or LoaderOptions(num_workers=num_workers)
    train_loader = ImageBatches(data.train, int(rec["batch_size"]), shuffle=True, generator=g, loader=loader,
                                drop_last=len(cast(Sized, data.train)) > int(rec["batch_size"]), device=device,
                                shard=(w.rank, w.size))
    val_set = subset(data.val, shard_rows(len(cast(Sized, data.val))).numpy()) if w.active else data.val
    val_loader = ImageBatches(val_set, 256, loader=loader, device=device)
    model: torch.nn.Module = backbone
    if w.active:
        cuda = torch.device(device).type == "cuda"
        model = torch.nn.parallel.DistributedDataParallel(backbone, device_ids=[w.local_rank] if cuda else None)
    scaler = grad_scaler(precision, device)
    params = [p for p in backbone.parameters() if p.requires_grad]
    opt: torch.optim.Optimizer
    if rec["optimizer"] == "adamw":
        opt = torch.optim.AdamW(params, lr=rec["lr"], weight_decay=rec["weight_decay"])
    else:
        opt = torch.optim.SGD(params, lr=rec["lr"], momentum=0.9, weight_decay=rec["weight_decay"], nesterov=True)
    steps_per_epoch = max(len(train_loader), 1)
    total_steps = max(epochs * steps_per_epoch, 1)
    warm = int(rec.get("warmup_epochs", 0)) * steps_per_epoch

    def lr_factor(step: int) -> float:  # linear warm-up, then cosine to 0
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(total_steps - warm, 1)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    start, best_acc, best_state, history = 0, -1.0, None, []
    if resume and partial is not None and partial.exists():
        ck = load_checkpoint(partial)
        backbone.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        if "rng" in ck:
            restore_rng_states(ck["rng"], g)
        else:  # written by an eedn that saved only the batch order
            g.set_state(ck["generator"])
            warn(f"{partial} holds no random states (older eedn): the resumed training continues, but not "
                 "bit-identically to an uninterrupted one")
        if ck.get("scaler"):
            scaler.load_state_dict(ck["scaler"])
        start, best_acc, best_state, history = ck["epoch"] + 1, ck["best_acc"], ck["best_state"], ck["history"]
        progress.log(f"resuming backbone training at epoch {start + 1}/{epochs}")
    for epoch in range(start, epochs):
        backbone.train()
        total_loss, n = 0.0, 0.0
        for x, y in progress.track(train_loader, "backbone", epoch=epoch, epochs=epochs):
            x, y = to_memory_format(x.to(device, non_blocking=True), channels_last), y.to(device, non_blocking=True)
            with autocast(precision, device):
                loss = F.cross_entropy(model(x), y, label_smoothing=float(rec["label_smoothing"]))
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            value = float(loss.detach())
            if not math.isfinite(value):
                if partial is not None and partial.exists():
                    partial.unlink()
                check_finite_loss(value, epoch, epochs, rec)
            total_loss += value * len(y)
            n += len(y)
            fault_point("backbone-batch")
        total_loss, n = all_reduce_sum([total_loss, n])
        acc = evaluate_accuracy(backbone, val_loader, device, precision, channels_last)
        history.append({"epoch": epoch, "train_loss": total_loss / max(n, 1), "val_accuracy": acc})
        progress.epoch("backbone", epoch, epochs, loss=total_loss / max(n, 1), val_accuracy=acc)
        if acc > best_acc:
            best_acc = acc
            best_state = {k: v.detach().cpu().clone() for k, v in backbone.state_dict().items()}
        if partial is not None and w.main:
            atomic_torch_save({"model": backbone.state_dict(), "optimizer": opt.state_dict(),
                               "scheduler": sched.state_dict(), "rng": rng_states(g), "epoch": epoch,
                               "scaler": scaler.state_dict(),
                               "best_acc": best_acc, "best_state": best_state, "history": history}, partial)
        fault_point("backbone-epoch")
    if best_state is not None:
        backbone.load_state_dict(best_state)
    summary = {"val_accuracy": best_acc, "epochs": epochs, "history": history}
    if checkpoint_path is not None and w.main:
        atomic_torch_save({"model": backbone.state_dict(), "summary": {"val_accuracy": best_acc, "epochs": epochs}},
                          checkpoint_path)
        assert partial is not None  # set whenever checkpoint_path is
        partial.unlink(missing_ok=True)
    barrier()
    return summary
