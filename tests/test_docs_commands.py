"""The documented commands work as written: README's quick start and its test command (the one .ci/run runs),
docs/usage.md's FashionMNIST command on local MNIST-format files, the example configs (no data file a user lacks),
the `.gz` advice, and the dataset cache folder docs/reproduce.md names."""
from __future__ import annotations

import gzip
import json
import re
import shlex
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from eedn.cli.main import cli

ROOT = Path(__file__).resolve().parent.parent


def bash_blocks(path: Path) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", path.read_text(), re.DOTALL)


def eedn_args(command: str) -> list[str]:
    """``eedn run ...`` (backslash continuations joined, comment dropped) → the CLI's arguments."""
    words = shlex.split(command.replace("\\\n", " "), comments=True)
    assert words[0] == "eedn", command
    return words[1:]


def test_readme_installs_cpu_torch_first_then_two_commands_and_the_ci_test_command():
    blocks = bash_blocks(ROOT / "README.md")
    assert "--index-url https://download.pytorch.org/whl/cpu" in blocks[0]  # the PyTorch way, before the two
    assert blocks[1].strip() == "pip install -e . && eedn run --backbone t2t_vit --strategy jei"
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert len(blocks) == 3 and blocks[2].strip() == ci.replace(" -q", "")  # .ci/run only adds pip's -q


def test_readme_quick_start_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.setenv("EEDN_CACHE", str(tmp_path / "cache"))
    command = bash_blocks(ROOT / "README.md")[1].split("&&", 1)[1]
    res = CliRunner().invoke(cli, [*eedn_args(command), "--out", str(tmp_path / "run"), "--quiet"],
                             terminal_width=200)
    assert res.exit_code == 0, res.output
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["policy"]["strategy"] == "jei" and results["config"]["backbone"] == "t2t_vit"


def write_mnist_format(raw: Path, compress: bool = False) -> None:
    """A small FashionMNIST-format copy (idx files: 200 train, 50 test images of 28 px, one bright bar per class)."""
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 200), ("t10k", 50)):
        labels = np.arange(n) % 10
        images = (rng.random((n, 28, 28)) * 60).astype(np.uint8)
        for i, label in enumerate(labels):
            images[i, 2 * label:2 * label + 6, 4:24] = 255
        files = {f"{prefix}-images-idx3-ubyte": struct.pack(">iiii", 2051, n, 28, 28) + images.tobytes(),
                 f"{prefix}-labels-idx1-ubyte": struct.pack(">ii", 2049, n) + labels.astype(np.uint8).tobytes()}
        for name, data in files.items():
            if compress:
                (raw / f"{name}.gz").write_bytes(gzip.compress(data))
            else:
                (raw / name).write_bytes(data)


def usage_command(pattern: str) -> str:
    lines = [line for block in bash_blocks(ROOT / "docs" / "usage.md") for line in block.splitlines()
             if re.search(pattern, line)]
    assert len(lines) == 1, lines
    return lines[0]


def test_usage_fashion_mnist_command_runs(tmp_path, monkeypatch):
    """The documented command with its data folder, shortened only in epochs (CI time)."""
    monkeypatch.setenv("EEDN_CACHE", str(tmp_path / "cache"))
    write_mnist_format(tmp_path / "data" / "FashionMNIST" / "raw")
    monkeypatch.chdir(tmp_path)  # --data-dir data, as written
    args = eedn_args(usage_command(r"torchvision:FashionMNIST"))
    quick = ["--backbone-epochs", "1", "--epochs", "4", "--set", "strategy_options.warmup_epochs=2",
             "--set", "evaluators=[]", "--out", str(tmp_path / "run"), "--quiet"]
    res = CliRunner().invoke(cli, [*args, *quick], terminal_width=200)
    assert res.exit_code == 0, res.output
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["dataset"]["name"] == "torchvision:FashionMNIST" and results["dataset"]["image_size"] == 32


def test_compressed_mnist_files_get_eedns_advice_not_download_true(tmp_path, monkeypatch):
    write_mnist_format(tmp_path / "data" / "FashionMNIST" / "raw", compress=True)
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(cli, eedn_args(usage_command(r"torchvision:FashionMNIST")))
    assert res.exit_code != 0
    assert "download=True" not in res.output and "Traceback" not in res.output
    assert "gunzip -k data/FashionMNIST/raw/*.gz" in res.output


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "examples" / "configs").glob("*.yaml")))
def test_example_configs_point_at_no_data_file_and_ask_for_data_dir(name, tmp_path):
    path = ROOT / "examples" / "configs" / name
    config = yaml.safe_load(path.read_text())
    assert "data_dir" not in (config.get("dataset_options") or {})
    header = "\n".join(line[1:] for line in path.read_text().splitlines() if line.startswith("#"))
    commands = [c.strip() for c in re.findall(r"^\s+(eedn .*?(?:\\\n.*?)*)$", header, re.MULTILINE)]
    assert commands
    for command in commands:  # each documented command, run without its data: one line saying what to give
        args = eedn_args(command)
        assert args[args.index("--config") + 1] == f"examples/configs/{name}"
        assert args[args.index("--data-dir") + 1] == "data/cifar10"
        i = args.index("--data-dir")
        args = [*args[:i], *args[i + 2:]]
        args[args.index("--config") + 1] = str(path)
        res = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "o")])
        assert res.exit_code != 0 and "data_dir is required" in res.output and "--data-dir sets it" in res.output


def test_reproduce_names_the_cache_folder_archives_are_extracted_to(tmp_path, monkeypatch):
    from eedn_plugins.datasets.archive import extract_once

    text = (ROOT / "docs" / "reproduce.md").read_text()
    assert "~/.cache/eedn/datasets/" in text and "image-folder/" not in text.replace("`image-folder`", "")
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "train" / "a" / "x.txt").write_text("x")
    archive = tmp_path / "d.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "train", arcname="train")
    monkeypatch.setenv("EEDN_CACHE", str(tmp_path / "cache"))
    assert extract_once(archive).parent == tmp_path / "cache" / "datasets"
