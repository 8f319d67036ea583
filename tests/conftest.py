"""Test-wide settings: offline, built-in plugins only, a private cache, one thread."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# third-party eedn plugins installed beside eedn must not change what the tests see (tests that install one unset it)
os.environ.setdefault("EEDN_BUILTINS_ONLY", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)  # tiny tensors: one thread is faster and steadier


@pytest.fixture(scope="session")
def eedn_cache(tmp_path_factory) -> str:
    """One cache directory shared by the session's pipeline tests (backbones are trained once)."""
    path = tmp_path_factory.mktemp("eedn-cache")
    os.environ["EEDN_CACHE"] = str(path)
    return str(path)


TINY_RUN = {
    "backbone": "resnet_tiny",
    "dataset": "digits",
    "image_size": 16,
    "backbone_training": {"epochs": 3, "batch_size": 64},
    "progress": False,
}


@pytest.fixture
def tiny_config(eedn_cache, tmp_path) -> dict:
    """A pipeline config that runs in a few seconds: tiny ResNet on 16-px digits."""
    import copy

    cfg = copy.deepcopy(TINY_RUN)
    cfg["cache_dir"] = eedn_cache
    cfg["out"] = str(tmp_path / "run")
    return cfg


def numpy_interpolation(points: list[tuple[float, float]], x: float, rtol: float = 1e-9) -> float | None:
    """Reference for the matched-cost cells: ``np.interp`` on the points (equal costs averaged), None outside
    their cost range (an end reached within ``rtol`` counts as inside)."""
    costs = np.array([c for c, _ in points], dtype=float)
    values = np.array([v for _, v in points], dtype=float)
    unique = np.unique(costs)
    means = np.array([values[costs == c].mean() for c in unique])
    tol = rtol * max(abs(unique[0]), abs(unique[-1]))
    if x < unique[0] - tol or x > unique[-1] + tol:
        return None
    return float(np.interp(x, unique, means))

