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

Failing instead of hanging: the process group gets a timeout (``EEDN_DIST_TIMEOUT`` seconds, default 600, not
torch's 30 minutes), the ranks agree on the backbone cache's state before stage 0, and a rank whose collective
fails (another rank died or stopped) stops with one line naming the rank that is gone
(:func:`explain_failure`), using the process group's store, where every rank that stops with an error leaves it.
"""
from __future__ import annotations

import contextlib

import json
import os
import re
import time
from dataclasses import dataclass
from datetime import timedelta
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
        dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s()))
    _world = World(rank=dist.get_rank(), size=dist.get_world_size(), local_rank=local,
                   backend=dist.get_backend())
    return _world, device


#: environment variable: seconds a collective (or joining the group) may wait for the other ranks
TIMEOUT_ENV = "EEDN_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0


def timeout_s() -> float:
    """How long a rank waits for the others (``EEDN_DIST_TIMEOUT``, default 10 minutes): long enough for rank 0 to
    write a checkpoint or a run directory while the others wait, short enough that a lost rank is noticed."""
    value = os.environ.get(TIMEOUT_ENV, "")
    try:
        seconds = float(value) if value else DEFAULT_TIMEOUT_S
    except ValueError:
        raise EednError(f"environment variable {TIMEOUT_ENV} must be a number of seconds, got {value!r}") from None
    if not seconds > 0:
        raise EednError(f"environment variable {TIMEOUT_ENV} must be a positive number of seconds, got {value!r}")
    return seconds


def _store() -> Any:
    """The process group's key-value store (None when unreachable)."""
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 - no group, or a torch without it: nothing to name ranks with
        return None


def record_failure(message: str) -> None:
    """Leave this rank's error in the group's store, so the ranks it leaves waiting can name it and say why."""
    store = _store() if _world.active else None
    if store is None:
        return
    with contextlib.suppress(Exception):  # the store (rank 0 or the agent) may be gone already
        store.set(f"eedn/error/{_world.rank}", message[:300])


_COLLECTIVE_WORDS = ("gloo", "NCCL", "nccl", "Connection", "connection", "timed out", "Timed out", "c10d")


def explain_failure(exc: BaseException, wait_s: float = 2.0) -> EednError | None:
    """One line for a failed collective (None when ``exc`` is not one, or not under torchrun): which rank is gone
    and, when it said so, why. Every surviving rank marks itself alive in the store, waits ``wait_s`` for the others
    to do the same, and names the ranks that did neither that nor leave an error."""
    if not _world.active or isinstance(exc, EednError) or not isinstance(exc, RuntimeError):
        return None
    raw = " ".join(str(exc).split())
    if not isinstance(exc, dist.DistError) and not any(w in raw for w in _COLLECTIVE_WORDS):
        return None
    text = re.sub(r"^\[[^\]]*\] ", "", raw).split(". ")[0][:160]  # gloo's source location and advice dropped
    store = _store()
    try:
        if store is None:
            raise RuntimeError("no store")
        store.set(f"eedn/alive/{_world.rank}", "1")
        deadline = time.monotonic() + wait_s
        others = [r for r in range(_world.size) if r != _world.rank]
        while True:
            errors = {r: store.get(f"eedn/error/{r}").decode() for r in others if store.check([f"eedn/error/{r}"])}
            silent = [r for r in others if r not in errors and not store.check([f"eedn/alive/{r}"])]
            if not silent or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    except Exception:  # noqa: BLE001 - the store itself is gone: it lived with rank 0 (or the launcher)
        return EednError(f"rank {_world.rank}: lost contact with rank 0, which holds the process group's store (it "
                         f"died or was killed; {text}); see rank 0's output for why")
    if errors:
        r, why = min(errors.items())
        return EednError(f"rank {_world.rank}: stopped because rank {r} failed ({why.splitlines()[0]})")
    if silent:
        names = ", ".join(str(r) for r in silent)
        return EednError(f"rank {_world.rank}: rank {names} died or was killed (no answer, no error left; {text}); "
                         f"see rank {names}'s output")
    return EednError(f"rank {_world.rank}: the ranks waited for each other in different places and gave up ({text}); "
                     f"raise {TIMEOUT_ENV} if a rank needs longer, or run with --debug")


def gather_object(value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order (``[value]`` for a single process)."""
    if not _world.active:
        return [value]
    everyone: list[Any] = [None] * _world.size
    dist.all_gather_object(everyone, value)
    return everyone


def agree(value: Any, what: str) -> None:
    """Every rank must hold the same ``value`` (e.g. a cache key); otherwise one line naming the ranks."""
    everyone = gather_object(value)
    differ = [r for r, v in enumerate(everyone) if v != everyone[0]]
    if differ:
        raise EednError(f"rank {', '.join(map(str, differ))} has another {what} than rank 0 ({everyone[differ[0]]!r} "
                        f"vs {everyone[0]!r}); give every rank the same data and options")


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
