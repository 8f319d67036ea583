"""torchrun / DistributedDataParallel: one process per device, started by ``torchrun`` (docs/scale.md).

``torchrun --nproc-per-node N -m eedn run ...`` sets ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``; :func:`init_from_env`
joins the process group (gloo on CPU, NCCL on CUDA) and pins each rank to its GPU. What each stage does then:

* stage 0: the backbone trains under DDP; every global batch (``batch_size``) is cut into ``WORLD_SIZE`` equal
  slices, one per rank, after the same seeded shuffle and augmentation draws on every rank, so the ranks
  together see exactly the batches one process would (:class:`eedn.core.image_batches.ImageBatches`, ``shard``);
* features: each rank extracts a contiguous shard of every split, the shards are gathered to all ranks, and
  rank 0 alone writes the cache file (atomically);
* heads and evaluation: every rank trains the heads and computes the outputs on the gathered features with the
  same seed, so all ranks hold identical heads without sending them (measured against DDP in docs/scale.md);
* the run directory (and a comparison's) is written by rank 0 only.

Without ``WORLD_SIZE`` (or with 1) nothing here does anything: a plain single process.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from eedn.runtime.errors import EednError


@dataclass(frozen=True)
class World:
    """This process's place among the ranks (one rank, size 1, when not under torchrun)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1


_world = World()


def world() -> World:
    return _world


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise EednError(f"environment variable {name} must be an integer, got {value!r}") from None


def init_from_env(device: str) -> tuple[World, str]:
    """Join the process group torchrun describes (once) and return the world and this rank's device
    (``cuda`` becomes ``cuda:LOCAL_RANK``). A single process returns ``World()`` and ``device`` unchanged."""
    global _world
    size = _env_int("WORLD_SIZE", 1)
    if size <= 1:
        return _world, device
    local = _env_int("LOCAL_RANK", 0)
    cuda = str(device).startswith("cuda")
    if cuda:
        if not torch.cuda.is_available():
            raise EednError("device cuda was asked for under torchrun, but no GPU is visible; use --device cpu")
        if local >= torch.cuda.device_count():
            raise EednError(f"LOCAL_RANK {local} has no GPU ({torch.cuda.device_count()} visible); start at most "
                            "one process per GPU (--nproc-per-node)")
        device = f"cuda:{local}"
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    _world = World(rank=dist.get_rank(), size=dist.get_world_size(), local_rank=local,
                   backend=dist.get_backend())
    return _world, device


def launched_rank() -> int:
    """This process's rank as torchrun set it (0 when not under torchrun), readable before the group is joined:
    only rank 0 prints progress and tables."""
    return _env_int("RANK", 0)


def shutdown() -> None:
    """Leave the process group (end of a torchrun command)."""
    global _world
    if dist.is_initialized():
        dist.destroy_process_group()
    _world = World()


def barrier() -> None:
    if _world.active:
        dist.barrier()


def broadcast_object(value: Any) -> Any:
    """Rank 0's ``value`` on every rank."""
    if not _world.active:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sum(values: list[float]) -> list[float]:
    """Element-wise sums over the ranks (float64)."""
    if not _world.active:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t)
    return t.tolist()


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if _world.backend == "nccl" else torch.device("cpu")


def shard_rows(n: int) -> Tensor:
    """The contiguous block of ``range(n)`` this rank handles (blocks in rank order cover it exactly)."""
    return torch.tensor_split(torch.arange(n), _world.size)[_world.rank]


def gather_rows(local: Tensor) -> Tensor:
    """Concatenate every rank's ``local`` rows (shards of :func:`shard_rows`, any row count) in rank order."""
    if not _world.active:
        return local
    dev = _collective_device()
    counts = [torch.zeros(1, dtype=torch.long, device=dev) for _ in range(_world.size)]
    dist.all_gather(counts, torch.tensor([local.shape[0]], dtype=torch.long, device=dev))
    sizes = [int(c) for c in counts]
    longest = max(sizes)
    padded = torch.zeros((longest, *local.shape[1:]), dtype=local.dtype, device=dev)
    padded[: local.shape[0]] = local.to(dev)
    parts = [torch.empty_like(padded) for _ in range(_world.size)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)]).to(local.device)


def check_same_config(config: dict) -> None:
    """Every rank must run the same resolved config (``Config.to_dict()``); a difference is one line naming
    the keys (on all ranks)."""
    if not _world.active:
        return
    # each rank's device is its own GPU (cuda:LOCAL_RANK): compare the device kind only
    device_kind = str(config.get("device", "")).split(":")[0]
    mine = json.loads(json.dumps(dict(config, device=device_kind), sort_keys=True, default=str))
    everyone: list[Any] = [None] * _world.size
    dist.all_gather_object(everyone, mine)
    for rank, other in enumerate(everyone):
        if other != everyone[0]:
            keys = sorted(k for k in set(other) | set(everyone[0]) if other.get(k) != everyone[0].get(k))
            raise EednError(f"rank {rank} runs a different config than rank 0 (differs in {', '.join(keys)}); "
                            "start every rank with the same command and config file")
