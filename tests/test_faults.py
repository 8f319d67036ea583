"""Fault injection with real processes: SIGKILL at chosen points of backbone training, feature caching, head
training and results writing (``EEDN_FAULT_POINT``, see :func:`eedn.runtime.io.fault_point`), then resume; and
concurrent runs sharing one cache and one --out. Tiny digits runs; each asserts the exact outcome."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import eedn as eedn_package
from eedn.runtime.io import FAULT_ENV

RUN = ["run", "--backbone", "resnet_tiny", "--image-size", "16", "--backbone-epochs", "2", "--strategy", "im-only",
       "--epochs", "2", "--set", "evaluators=[calibration]", "--quiet", "--threads", "1"]
#: provenance, not results: when and where a run ran and whether its backbone came from the cache
PROVENANCE = ("timings", "environment")
TEMP = re.compile(r"\.(tmp|tmpdir)$")


def clean_env() -> dict:
    """The environment of a child eedn: this checkout's eedn first on the path, no inherited fault point."""
    source = str(Path(eedn_package.__file__).resolve().parent.parent)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join(
        p for p in (source, os.environ.get("PYTHONPATH")) if p))
    env.pop(FAULT_ENV, None)
    return env


def eedn(*args: str, cwd: Path, fault: str | None = None) -> subprocess.CompletedProcess:
    env = clean_env()
    if fault:
        env[FAULT_ENV] = fault
    return subprocess.run([sys.executable, "-m", "eedn", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def comparable(results: dict) -> dict:
    """results.json without its provenance (timings, environment, the cache's path, and whether the backbone
    was trained in this process or read back from the cache this run trained it into)."""
    out = {k: v for k, v in results.items() if k not in PROVENANCE}
    out["backbone"] = {k: v for k, v in results["backbone"].items() if k not in ("source", "cache_path")}
    out["config"] = {k: v for k, v in results["config"].items() if k not in ("resume", "cache_dir", "out")}
    return out


def leftovers(*folders: Path) -> list[str]:
    return sorted(p.name for folder in folders if folder.exists() for p in folder.rglob("*")
                  if TEMP.search(p.name) or p.name.endswith(".partial.pt"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """One uninterrupted run: the results every interrupted-and-resumed run must reproduce exactly."""
    root = tmp_path_factory.mktemp("reference")
    done = eedn(*RUN, "--cache-dir", str(root / "cache"), "--out", str(root / "run"), cwd=root)
    assert done.returncode == 0, done.stderr
    return {"root": root, "results": json.loads((root / "run" / "results.json").read_text())}


#: five kill points, one after the other on the same run; every restart resumes what the last one left
KILLS = [
    ("backbone-epoch@1", "after the first epoch's checkpoint"),
    ("backbone-batch@3", "mid-epoch, in the epoch resumed from that checkpoint"),
    ("before-replace:features-KEY.pt@2", "while caching the second split's features"),
    ("head-epoch@1", "during head training"),
    ("publish-run-dir", "with the run directory complete, before it is renamed into place"),
]


def test_kill_anywhere_then_resume_gives_the_uninterrupted_results(reference, tmp_path):
    cache, out = tmp_path / "cache", tmp_path / "run"
    args = [*RUN, "--cache-dir", str(cache), "--out", str(out), "--resume"]
    for point, where in KILLS:
        killed = eedn(*args, cwd=tmp_path, fault=point)
        assert killed.returncode == -signal.SIGKILL, f"{point} ({where}) was not reached: {killed.stderr}"
        assert not out.exists(), f"a kill {where} left a run directory"
        if point == "backbone-epoch@1":
            assert leftovers(cache) == [p.name for p in (cache / "backbones").glob("*.partial.pt")]
    kept = leftovers(cache, tmp_path)
    assert kept and all(TEMP.search(name) for name in kept)  # the last kills left temporaries behind...
    done = eedn(*args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert leftovers(cache, tmp_path) == []  # ...which the finishing run removed
    resumed = json.loads((out / "results.json").read_text())
    assert comparable(resumed) == comparable(reference["results"])
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (reference["root"] / "run").iterdir())


def test_concurrent_runs_never_share_a_run_directory(reference, tmp_path):
    """Two identical runs into one --out: exactly one wins, the other says so. Two different runs with default
    names started together get two directories. All four share one (warm) cache."""
    cache = reference["root"] / "cache"
    env = clean_env()

    def start(*extra: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "eedn", *RUN, "--cache-dir", str(cache), *extra],
                                cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    procs = [start("--out", str(tmp_path / "shared")), start("--out", str(tmp_path / "shared")), start(),
             start("--epochs", "1")]
    finished = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    same_out = sorted(code for code, _ in finished[:2])
    assert same_out == [0, 1], finished
    loser = next(err for code, err in finished[:2] if code == 1)
    assert re.fullmatch(r"error: (--out \S+shared already holds files; pass --overwrite.*|run directory \S+shared "
                        r"was written by another run meanwhile.*)\n", loser), loser
    assert [code for code, _ in finished[2:]] == [0, 0]
    defaults = {json.loads((d / "results.json").read_text())["config"]["strategy_options"]["epochs"]: d
                for d in (tmp_path / "runs").iterdir()}
    assert sorted(defaults) == [1, 2]  # two directories, each holding its own run
    expected = comparable(reference["results"])
    for run_dir in (tmp_path / "shared", defaults[2]):
        assert comparable(json.loads((run_dir / "results.json").read_text())) == expected
    assert json.loads((defaults[1] / "run.json").read_text())["model"]["strategy"]["options"]["epochs"] == 1
    assert leftovers(cache, tmp_path) == []


def test_a_kill_while_overwriting_leaves_the_old_or_the_new_run(reference, tmp_path):
    """Finding 4: `--overwrite` swaps the new run in with one atomic exchange. A kill before it leaves the old
    run; a kill right after it leaves the new run, complete (the old one is a dead temporary, removed by the next
    run). Before, a kill between its two renames left nothing at --out."""
    import shutil

    import eedn as api

    cache, out = reference["root"] / "cache", tmp_path / "run"
    shutil.copytree(reference["root"] / "run", out)
    old = (out / "run.json").read_bytes()
    args = [*RUN, "--cache-dir", str(cache), "--out", str(out), "--overwrite", "--epochs", "1"]
    killed = eedn(*args, cwd=tmp_path, fault="publish-run-dir")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert (out / "run.json").read_bytes() == old
    killed = eedn(*args, cwd=tmp_path, fault="publish-swapped")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert json.loads((out / "results.json").read_text())["config"]["strategy_options"]["epochs"] == 1
    api.load_run(out)  # complete: every hash in run.json matches, weights finite
    assert leftovers(tmp_path)  # the old run, under a dead writer's temporary name
    done = eedn(*args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert leftovers(tmp_path) == []
