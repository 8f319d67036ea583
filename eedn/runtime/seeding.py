"""Seeding for the library API: a call given ``seed=`` draws only from that seed and leaves the caller's
random streams (Python, NumPy, torch CPU and CUDA) as they were, so its numbers depend on the seed alone."""
from __future__ import annotations

import random
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (torch's CUDA ones included)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """Inside: every global generator seeded with ``seed``. After: each back in the state it had before.
    ``seed=None`` does nothing (draws continue from the global state)."""
    if seed is None:
        yield
        return
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if torch.cuda.is_initialized() else []):
        try:
            seed_everything(seed)
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
