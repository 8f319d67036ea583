"""``eedn export``: the exported segments, chained by the standalone runner with batch compaction, reproduce
``eedn predict`` exactly (exit indices and predictions) on the test split."""
from __future__ import annotations

import ast
import copy
import importlib.util
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import eedn
from eedn.cli.main import cli
from eedn.runtime.errors import EednError
from eedn.deploy.export import FORMATS, export_run
from eedn.deploy.export_runtime import ExportedEarlyExit
from eedn.deploy.predict import predict_files, read_images

from conftest import TINY_RUN

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


@pytest.mark.parametrize("fmt", ["torchscript", "exported-program",
                                 pytest.param("onnx", marks=pytest.mark.skipif(
                                     not ONNX_READY, reason="pip install 'eedn[export]' for ONNX"))])
def test_exported_runner_reproduces_eedn_predict(trained_run, tmp_path, fmt):
    run_dir, images = trained_run
    result = CliRunner().invoke(cli, ["export", str(run_dir), "--format", fmt, "--out", str(tmp_path / fmt)])
    assert result.exit_code == 0, result.output
    expected = predict_files(run_dir, [images], batch_size=512)
    _, x = read_images(run_dir, [images])
    runner = ExportedEarlyExit(tmp_path / fmt)
    got = runner(x)
    assert got["exit_index"].tolist() == [r["exit"] for r in expected]
    assert got["predictions"].tolist() == [r["class_index"] for r in expected]
    assert len(set(got["exit_index"].tolist())) > 1  # rows left at several exits: compaction was exercised
    single = runner(x[:1])  # a batch of one through the same (dynamic-batch) segments
    assert single["exit_index"].tolist() == got["exit_index"][:1].tolist()
    assert sorted(p.name for p in (tmp_path / fmt).iterdir()) == sorted(
        ["decision.json", "runner.py"] + [f"segment_{i}{FORMATS[fmt]}" for i in range(3)]
        + [f"rule_{i}{FORMATS[fmt]}" for i in range(2)])


def test_runner_is_standalone_and_runs_as_a_script(trained_run, tmp_path):
    run_dir, images = trained_run
    export_run(run_dir, "torchscript", tmp_path / "ts")
    source = (tmp_path / "ts" / "runner.py").read_text()
    imported = {alias.name.split(".")[0] for node in ast.walk(ast.parse(source))
                if isinstance(node, (ast.Import, ast.ImportFrom)) for alias in getattr(node, "names", [])}
    imported |= {node.module.split(".")[0] for node in ast.walk(ast.parse(source))
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert "eedn" not in imported and "eedn_plugins" not in imported
    _, x = read_images(run_dir, [images], max_images=5)
    torch.save(x, tmp_path / "images.pt")
    out = subprocess.run([sys.executable, "runner.py", str(tmp_path / "ts"), str(tmp_path / "images.pt")],
                         cwd=tmp_path / "ts", capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    expected = predict_files(run_dir, [images])[:5]
    lines = out.stdout.strip().splitlines()
    assert [line.split("\t")[1:3] for line in lines] == [[f"class {r['class_index']}", f"exit {r['exit']}"]
                                                         for r in expected]


def test_bad_export_requests_are_one_line_errors(tmp_path):
    result = CliRunner().invoke(cli, ["export", str(tmp_path / "nope"), "--out", str(tmp_path / "x")])
    assert result.exit_code == 1 and "no such run directory" in result.output
    with pytest.raises(EednError, match="unknown export format 'tflite'; known: torchscript"):
        from eedn.deploy.export import export_model

        export_model(None, "tflite", tmp_path, {})
