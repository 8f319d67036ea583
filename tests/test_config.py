"""The typed config: one key table (eedn.core.config.Config) behind the config file, keyword overrides, ``--set`` and
the CLI flags."""
from __future__ import annotations

import dataclasses
import json

import click
import pytest
from click.testing import CliRunner

from eedn.cli.main import cli
from eedn.cli.common import build_config
from eedn.core.config import (BackboneTraining, Config, RiskControl, config_key, defaults, flag_keys, load_config_file,
                         resolve_config)
from eedn.runtime.errors import EednError


def test_values_are_typed_attributes_whatever_door_they_came_in_by(tmp_path):
    file = tmp_path / "c.yaml"
    file.write_text("backbone_training:\n  lr: 1e-3\n  epochs: '3'\nrisk_control:\n  epsilon: '0.1'\n"
                    "eval_batch_size: 128.0\ntradeoff: 0.1,0.5\n")
    cfg = resolve_config(load_config_file(file))
    assert isinstance(cfg, Config) and isinstance(cfg.backbone_training, BackboneTraining)
    assert isinstance(cfg.risk_control, RiskControl)
    # YAML reads 1e-3 and '3' as strings: the table makes them the declared types
    assert type(cfg.backbone_training.lr) is float and cfg.backbone_training.lr == 0.001
    assert type(cfg.backbone_training.epochs) is int and cfg.backbone_training.epochs == 3
    assert type(cfg.risk_control.epsilon) is float and cfg.risk_control.epsilon == 0.1
    assert type(cfg.eval_batch_size) is int and cfg.eval_batch_size == 128
    assert cfg.tradeoff == [0.1, 0.5]
    # built directly, a Config is checked and coerced too
    assert Config(seed="4").seed == 4
    with pytest.raises(EednError, match=r"config: invalid seed=-1; expected an integer >= 0"):
        Config(seed=-1)


def test_file_keywords_set_and_flags_give_the_same_config(tmp_path):
    file = tmp_path / "c.yaml"
    file.write_text("seed: 2\nprecision: bf16\nbackbone_training: {epochs: 3}\nrisk_control: {delta: 0.2}\n")
    from_file = resolve_config(load_config_file(file))
    from_keywords = resolve_config(None, seed=2, precision="bf16", backbone_training={"epochs": 3},
                                   risk_control={"delta": 0.2})
    from_sets = resolve_config(None, ["seed=2", "precision=bf16", "backbone_training.epochs=3", "risk_control.delta=0.2"])
    from_flags = build_config(seed=2, precision="bf16", backbone_epochs=3, delta=0.2)
    assert from_file == from_keywords == from_sets == from_flags
    assert from_file != resolve_config({})
    # one bad value, one message, from each door (a flag names itself)
    file.write_text("backbone_training: {epochs: -1}\n")
    expected = r"invalid backbone_training\.epochs=-1; expected an integer or none >= 0"
    for make in (lambda: resolve_config(load_config_file(file)),
                 lambda: resolve_config(None, backbone_training={"epochs": -1}),
                 lambda: resolve_config(None, ["backbone_training.epochs=-1"])):
        with pytest.raises(EednError, match=r"^config: " + expected):
            make()
    with pytest.raises(EednError, match=r"^--backbone-epochs: " + expected):
        build_config(backbone_epochs=-1)


def test_unknown_nested_keys_and_malformed_sections_name_the_valid_keys(tmp_path):
    with pytest.raises(EednError, match=r"unknown config key\(s\) risk_control\.epsilom \(did you mean "
                                        r"'risk_control\.epsilon'\?\); known: risk_control\.risk, "):
        resolve_config({"risk_control": {"epsilom": 0.1}})
    with pytest.raises(EednError, match=r"unknown config key\(s\) precison \(did you mean 'precision'\?\)"):
        resolve_config(None, ["precison=bf16"])
    with pytest.raises(EednError, match=r"backbone_training must be a mapping with keys checkpoint, "):
        resolve_config({"backbone_training": 3})
    with pytest.raises(EednError, match=r"gate_options must be a mapping of options, got 'x'"):
        resolve_config({"gate_options": "x"})
    with pytest.raises(EednError, match=r"invalid precision='half'; choose from fp32, bf16, fp16"):
        resolve_config({"precision": "half"})
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: 1\nbackbone_training:\n  epochs: [1\n")
    with pytest.raises(EednError, match=r"cannot parse config file .*bad\.yaml at line 4, column 1"):
        load_config_file(bad)


def test_to_dict_round_trips_and_keeps_the_saved_format(tmp_path):
    cfg = resolve_config({"seed": 3, "budget": {"p": 12}, "dataset_options": {"data_dir": "x"}},
                         ["backbone_training.lr=1e-3", "risk_control.risk=prediction_gap", "tradeoff=0.1,1"])
    saved = cfg.to_dict()
    assert list(saved) == list(defaults()) and list(saved["backbone_training"]) == list(defaults()["backbone_training"])
    assert saved["backbone_training"]["lr"] == 0.001 and saved["budget"] == {"p": 12.0}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(saved, indent=2))
    again = resolve_config(load_config_file(path))  # `eedn run --config RUN_DIR/config.json`
    assert again == cfg and again.to_dict() == saved
    assert Config.from_dict(saved) == cfg
    # to_dict is a copy: editing it leaves the config alone
    saved["dataset_options"]["data_dir"] = "elsewhere"
    assert cfg.dataset_options == {"data_dir": "x"}


def test_config_is_frozen_and_replace_checks_the_new_values():
    cfg = resolve_config({})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 1  # type: ignore[misc]
    assert cfg.replace(seed="7").seed == 7 and cfg.seed == 0
    with pytest.raises(EednError, match=r"invalid eval_batch_size=0; expected an integer >= 1"):
        cfg.replace(eval_batch_size=0)
    with pytest.raises(EednError, match=r"device must be cpu or cuda\[:N\], got 'gpu'"):
        cfg.replace(device="gpu")


def test_cli_flags_are_built_from_the_key_table():
    import eedn.runtime.precision

    assert eedn.runtime.precision.PRECISIONS is config_key("precision").choices  # one list of precisions
    flags = flag_keys()
    assert flags["--backbone-epochs"] == "backbone_training.epochs" and flags["--epsilon"] == "risk_control.epsilon"
    run = cli.commands["run"]
    by_flag = {opt: p for p in run.params for opt in p.opts}
    for flag, dotted in flags.items():
        spec = config_key(dotted)
        assert flag in by_flag, flag
        assert spec.help.split(" (")[0] in by_flag[flag].help
    assert isinstance(by_flag["--precision"].type, click.Choice)
    assert list(by_flag["--precision"].type.choices) == ["fp32", "bf16", "fp16"]
    res = CliRunner().invoke(cli, ["run", "--quiet", "--epsilon", "abc"])
    assert res.exit_code != 0 and "--epsilon" in res.output


def test_library_callers_may_pass_a_config_or_a_dict():
    cfg = resolve_config({"seed": 5})
    assert resolve_config(cfg) == cfg
    assert resolve_config(cfg, ["seed=6"]).seed == 6
    assert resolve_config(None, backbone_training=BackboneTraining(epochs=2)).backbone_training.epochs == 2
