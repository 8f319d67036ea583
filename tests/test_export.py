"""``eedn export``: the exported segments, chained by the standalone runner with batch compaction, reproduce
``eedn predict`` exactly (exit indices and predictions) on the test split; the runner checks hashes, loads without
running code and refuses tampered files; the export lands at --out in one step."""
from __future__ import annotations

import copy
import csv
import importlib.util
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import TINY_RUN
from PIL import Image

import eedn
from eedn.cli.main import cli
from eedn.deploy.export import FORMATS, export_run
from eedn.deploy.export_runtime import (
    ExportedEarlyExit,
    ExportError,
    load_safetensors,
    resolve_operator,
    sha256_file,
)
from eedn.deploy.predict import predict_files, read_images
from eedn.runtime.errors import EednError

ONNX_READY = all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime", "onnxscript"))


@pytest.fixture(scope="module")
def trained_run(eedn_cache, tmp_path_factory):
    """A tiny trained run and its test split written as PNG files (what `eedn predict` reads)."""
    root = tmp_path_factory.mktemp("export")
    cfg = copy.deepcopy(TINY_RUN) | {"cache_dir": eedn_cache, "out": str(root / "run"), "strategy": "im-only",
                                     "strategy_options": {"epochs": 2}, "evaluators": []}
    eedn.run_pipeline(cfg)
    data = eedn.load_dataset("digits", 16)
    images = root / "images"
    images.mkdir()
    mean, std = data.info["mean"][0], data.info["std"][0]
    for i in range(len(data.test)):
        pixels = (data.test[i][0][0] * std + mean).clamp(0, 1).mul(255).round().byte().numpy()
        Image.fromarray(np.asarray(pixels), mode="L").save(images / f"{i:04d}.png")
    return root / "run", images


def _module_files(fmt: str, n_segments: int = 3) -> list[str]:
    stems = [f"segment_{i}" for i in range(n_segments)] + [f"rule_{i}" for i in range(n_segments - 1)]
    if fmt == "exported-program":
        return [f"{s}.graph.json" for s in stems] + [f"{s}.safetensors" for s in stems]
    return [f"{s}{FORMATS[fmt]}" for s in stems]


@pytest.mark.parametrize("fmt", ["torchscript", "exported-program",
                                 pytest.param("onnx", marks=pytest.mark.skipif(
                                     not ONNX_READY, reason="pip install 'eedn[export]' for ONNX"))])
@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")  # TorchScript's deprecation, noted by eedn export
def test_exported_runner_reproduces_eedn_predict(trained_run, tmp_path, fmt):
    run_dir, images = trained_run
    result = CliRunner().invoke(cli, ["export", str(run_dir), "--format", fmt, "--out", str(tmp_path / fmt)])
    assert result.exit_code == 0, result.output
    expected = predict_files(run_dir, [images], batch_size=512)
    _, x = read_images(run_dir, [images])
    runner = ExportedEarlyExit(tmp_path / fmt, trust_code=fmt == "torchscript")
    got = runner(x)
    assert got["exit_index"].tolist() == [r["exit"] for r in expected]
    assert got["predictions"].tolist() == [r["class_index"] for r in expected]
    assert len(set(got["exit_index"].tolist())) > 1  # rows left at several exits: compaction was exercised
    single = runner(x[:1])  # a batch of one through the same (dynamic-batch) segments
    assert single["exit_index"].tolist() == got["exit_index"][:1].tolist()
    assert sorted(p.name for p in (tmp_path / fmt).iterdir()) == sorted(
        ["decision.json", "runner.py"] + _module_files(fmt))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left beside --out


def _no_eedn_env() -> dict:
    """Only the interpreter's site-packages (torch, PIL, numpy) on the path; with ``python -S`` the editable
    install's .pth is not read, so eedn is not importable."""
    return {"PYTHONPATH": sysconfig.get_paths()["purelib"], "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": os.environ.get("HOME", "/tmp")}


def _run_runner(export_dir, *args, cwd=None):
    return subprocess.run([sys.executable, "-S", str(export_dir / "runner.py"), str(export_dir), *map(str, args)],
                          cwd=cwd or export_dir, env=_no_eedn_env(), capture_output=True, text=True, check=False,
                          timeout=300)


def test_default_export_classifies_image_files_without_eedn(trained_run, tmp_path):
    """`eedn export RUN` (defaults) plus the runner classify image files with no eedn importable, as eedn
    predict does (issue 24's done-when)."""
    run_dir, images = trained_run
    out = tmp_path / "deploy"
    result = CliRunner().invoke(cli, ["export", str(run_dir), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "decision.json").read_text())["format"] == "exported-program"
    assert f"SHA-256 {sha256_file(out / 'decision.json')}" in result.output
    no_eedn = subprocess.run([sys.executable, "-S", "-c", "import eedn"], cwd=out, env=_no_eedn_env(),
                             capture_output=True, text=True, check=False, timeout=120)
    assert no_eedn.returncode != 0 and "No module named 'eedn'" in no_eedn.stderr
    ran = _run_runner(out, images, "--format", "json")
    assert ran.returncode == 0, ran.stderr
    got = json.loads(ran.stdout)
    predicted = CliRunner().invoke(cli, ["predict", str(run_dir), "--input", str(images), "--format", "json"])
    assert predicted.exit_code == 0, predicted.output
    expected = json.loads(predicted.stdout)
    assert len(got) == len(expected) == len(list(images.iterdir())) > 100
    assert [(Path(g["file"]).name, g["class_index"], g["class"], g["exit"]) for g in got] == \
           [(Path(e["file"]).name, e["class_index"], e["class"], e["exit"]) for e in expected]
    assert max(abs(g["confidence"] - e["confidence"]) for g, e in zip(got, expected)) < 1e-5
    assert len({g["exit"] for g in got}) > 1
    csv_run = _run_runner(out, images / "0000.png", images / "0001.png", "--format", "csv")
    assert csv_run.returncode == 0, csv_run.stderr
    rows = list(csv.DictReader(io.StringIO(csv_run.stdout)))
    assert [int(r["class_index"]) for r in rows] == [e["class_index"] for e in expected[:2]]


def test_predict_machine_readable_formats(trained_run):
    run_dir, images = trained_run
    files = [images / "0003.png", images / "0004.png"]
    args = ["predict", str(run_dir)] + [a for f in files for a in ("--input", str(f))]
    as_json = CliRunner().invoke(cli, args + ["--format", "json"])
    as_csv = CliRunner().invoke(cli, args + ["--format", "csv"])
    assert as_json.exit_code == 0 and as_csv.exit_code == 0, as_json.output + as_csv.output
    rows = json.loads(as_json.stdout)
    table = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert [r["file"] for r in rows] == [r["file"] for r in table] == [str(f) for f in files]
    assert [str(r["exit"]) for r in rows] == [r["exit"] for r in table]
    assert set(rows[0]) == {"file", "class_index", "class", "confidence", "exit", "macs"}


# ----------------------------------------------------------------------------------- safety (issue 23)
def _rehash(export_dir, *names):
    """What an attacker who can write the directory does: update decision.json's hashes to match."""
    spec = json.loads((export_dir / "decision.json").read_text())
    for name in names:
        spec["files"][name] = sha256_file(export_dir / name)
    (export_dir / "decision.json").write_text(json.dumps(spec))


class _Payload:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (str(self.target), "w"))  # unpickling this creates the file


@pytest.fixture(scope="module")
def clean_export(trained_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean") / "deploy"
    export_run(trained_run[0], "exported-program", out)
    return out


@pytest.mark.parametrize("attack", ["graph-calls-save", "graph-calls-save-rehashed", "pickled-weights-rehashed",
                                    "pickled-weights", "torch-export-archive-rehashed"])
def test_tampered_segment_is_refused_and_runs_no_payload(clean_export, tmp_path, trained_run, attack):
    export = tmp_path / "deploy"
    shutil.copytree(clean_export, export)
    marker = tmp_path / "PWNED"
    if attack.startswith("graph-calls-save"):  # a graph node that would write a file with aten::save
        graph = json.loads((export / "segment_0.graph.json").read_text())
        graph["nodes"].insert(0, {"name": "pwn", "op": "aten::save.default", "args": [[1], str(marker)], "kwargs": {}})
        (export / "segment_0.graph.json").write_text(json.dumps(graph))
        changed = "segment_0.graph.json"
    elif attack.startswith("pickled-weights"):  # weights replaced by a pickle whose loading writes a file
        torch.save({"w": _Payload(marker)}, export / "segment_0.safetensors")
        changed = "segment_0.safetensors"
    else:  # torch.export's own archive with a pickled payload for a weight: this runner never unpickles it
        pickle_bytes = pickle.dumps(_Payload(marker))
        (export / "segment_0.graph.json").write_bytes(b"PK\x03\x04" + pickle_bytes)
        changed = "segment_0.graph.json"
    if attack.endswith("rehashed"):
        _rehash(export, changed)
    ran = _run_runner(export, trained_run[1] / "0000.png")
    assert ran.returncode == 1
    assert ran.stderr.startswith("error: ") and len(ran.stderr.strip().splitlines()) == 1, ran.stderr
    assert "Traceback" not in ran.stderr
    assert ("does not match the SHA-256" in ran.stderr) != attack.endswith("rehashed")
    with pytest.raises(ExportError):
        ExportedEarlyExit(export)
    assert not marker.exists()  # the payload never ran


def test_pinned_decision_hash_catches_a_rewritten_decision(clean_export, tmp_path, trained_run):
    export = tmp_path / "deploy"
    shutil.copytree(clean_export, export)
    pinned = sha256_file(export / "decision.json")
    assert _run_runner(export, trained_run[1] / "0000.png", "--expect-sha256", pinned).returncode == 0
    _rehash(export, "runner.py")  # rewritten (here: re-serialised) decision.json
    ran = _run_runner(export, trained_run[1] / "0000.png", "--expect-sha256", pinned)
    assert ran.returncode == 1 and "does not have the SHA-256 you expected" in ran.stderr


def test_operator_rules_refuse_side_effects():
    for unsafe in ("aten::save.default", "aten::from_file.default", "aten::_print.default", "aten::relu_.default",
                   "os::system", "py::exec", "aten::__import__"):
        with pytest.raises(ExportError):
            resolve_operator(unsafe)
    assert resolve_operator("aten::conv2d.default") is torch.ops.aten.conv2d.default


def test_torchscript_runs_only_with_trust_code(trained_run, tmp_path, monkeypatch):
    result = CliRunner().invoke(cli, ["export", str(trained_run[0]), "--format", "torchscript",
                                      "--out", str(tmp_path / "ts")])
    assert result.exit_code == 0 and "deprecates TorchScript" in result.output
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: pytest.fail("TorchScript was loaded"))
    with pytest.raises(ExportError, match="--trust-code"):
        ExportedEarlyExit(tmp_path / "ts")


def test_safetensors_reader_matches_the_library(clean_export):
    from safetensors.torch import load_file

    for path in clean_export.glob("*.safetensors"):
        ours, theirs = load_safetensors(path), load_file(str(path))
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) and ours[k].dtype == theirs[k].dtype for k in ours)


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_export_embeds_no_path_of_this_machine(clean_export, trained_run, tmp_path):
    run_dir = trained_run[0]
    export_run(run_dir, "torchscript", tmp_path / "ts")
    needles = {str(run_dir.resolve()).encode(), str(Path(eedn.__file__).resolve().parents[1]).encode(),
               str(Path.home()).encode() + b"/", str(tmp_path).encode()}
    for path in [*clean_export.iterdir(), *(tmp_path / "ts").iterdir()]:
        data = path.read_bytes()
        assert not [n for n in needles if n in data], path.name


def test_runner_bad_inputs_are_one_line_errors(clean_export, tmp_path):
    torch.save(torch.zeros(2, 3, 5, 5), tmp_path / "wrong.pt")
    (tmp_path / "notes.txt").write_text("not an image")
    for args, message in [((tmp_path / "missing.png",), "does not exist"),
                          ((tmp_path / "notes.txt",), "cannot read image"),
                          ((tmp_path / "wrong.pt",), "must be a [N, 1, 16, 16] tensor"),
                          ((tmp_path / "empty_dir_does_not_exist",), "does not exist")]:
        ran = _run_runner(clean_export, *args)
        assert ran.returncode == 1 and ran.stderr.startswith("error: ") and message in ran.stderr, ran.stderr
        assert len(ran.stderr.strip().splitlines()) == 1
    not_export = subprocess.run([sys.executable, "-S", str(clean_export / "runner.py"), str(tmp_path),
                                 str(tmp_path / "notes.txt")], env=_no_eedn_env(), capture_output=True, text=True,
                                check=False,
                                timeout=300)
    assert not_export.returncode == 1 and "is not an eedn export" in not_export.stderr


# ------------------------------------------------------------------------------ the target (issue 23)
def test_export_target_is_checked_and_replaced_in_one_step(trained_run, tmp_path):
    run_dir = trained_run[0]
    a_file = tmp_path / "model.bin"
    a_file.write_text("keep me")
    result = CliRunner().invoke(cli, ["export", str(run_dir), "--out", str(a_file)])
    assert result.exit_code == 1 and "is a file" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1 and a_file.read_text() == "keep me"
    other = tmp_path / "photos"
    other.mkdir()
    (other / "holiday.jpg").write_text("x")
    result = CliRunner().invoke(cli, ["export", str(run_dir), "--out", str(other)])
    assert result.exit_code == 1 and "not an eedn export" in result.output
    assert [p.name for p in other.iterdir()] == ["holiday.jpg"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert CliRunner().invoke(cli, ["export", str(run_dir), "--out", str(empty)]).exit_code == 0
    before = (empty / "decision.json").stat().st_ino
    (empty / "stale.txt").write_text("from the old export")
    assert CliRunner().invoke(cli, ["export", str(run_dir), "--out", str(empty)]).exit_code == 0
    assert (empty / "decision.json").stat().st_ino != before and not (empty / "stale.txt").exists()
    ExportedEarlyExit(empty)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "model.bin", "photos"]


def test_replacing_without_an_atomic_exchange(trained_run, tmp_path, monkeypatch):
    """Where renameat2 is missing the old export is renamed aside first: the result is still the new export alone."""
    from eedn.deploy import export as export_module

    out = tmp_path / "deploy"
    export_run(trained_run[0], "exported-program", out)
    (out / "extra.txt").write_text("old")
    monkeypatch.setattr(export_module, "_exchange", lambda a, b: False)
    export_run(trained_run[0], "exported-program", out)
    assert not (out / "extra.txt").exists() and [p.name for p in tmp_path.iterdir()] == ["deploy"]
    ExportedEarlyExit(out)


def test_runner_and_dataset_read_wide_images_alike():
    """The runner's copy of the 16-bit conversion matches the datasets' (eedn.runtime.image_io)."""
    from eedn.deploy.export_runtime import to_eight_bit as runner_version
    from eedn.runtime.image_io import to_eight_bit as dataset_version

    rng = np.random.default_rng(0)
    for mode, values in (("I;16", rng.integers(0, 65536, (9, 7), dtype=np.uint16)),
                         ("I", rng.integers(0, 2**31 - 1, (9, 7)).astype(np.int32)),
                         ("L", rng.integers(0, 256, (9, 7), dtype=np.uint8))):
        image = Image.fromarray(values, mode=mode) if mode != "I;16" else Image.fromarray(values)
        assert np.array_equal(np.asarray(runner_version(image)), np.asarray(dataset_version(image))), mode


@pytest.mark.parametrize("point", ["export-segment@2", "export-before-publish"])
def test_killed_reexport_leaves_the_old_export(trained_run, tmp_path, point):
    run_dir = trained_run[0]
    out = tmp_path / "deploy"
    export_run(run_dir, "exported-program", out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    env = dict(os.environ, EEDN_FAULT_POINT=point)
    killed = subprocess.run([sys.executable, "-m", "eedn", "export", str(run_dir), "--format", "torchscript",
                             "--out", str(out)], env=env, capture_output=True, text=True, check=False, timeout=300)
    assert killed.returncode == -9, killed.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the old export, whole and alone
    ExportedEarlyExit(out)
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers  # the killed writer's temporary sibling...
    export_run(run_dir, "exported-program", out)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # ...is cleaned by the next export


def test_bad_export_requests_are_one_line_errors(tmp_path):
    result = CliRunner().invoke(cli, ["export", str(tmp_path / "nope"), "--out", str(tmp_path / "x")])
    assert result.exit_code == 1 and "no such run directory" in result.output
    with pytest.raises(EednError, match="unknown export format 'tflite'; known: exported-program"):
        from eedn.deploy.export import export_model

        export_model(None, "tflite", tmp_path, {})
