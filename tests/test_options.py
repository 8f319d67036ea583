"""Plugins read their options as typed attributes; the eedn 0.1 dict access still works but warns."""
from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest

import eedn
import eedn.core.options
from eedn.runtime.errors import EednError
from eedn.train.strategy import FitContext, StrategyResult, TrainingStrategy
from eedn_plugins.jei import JeiStrategy
from eedn_plugins.jei_gate import JeiGate

ROOT = Path(__file__).resolve().parents[1]


class _Demo(TrainingStrategy):
    @dataclass
    class Options:
        epochs: int = eedn.option(3, "epochs", min=1)
        lambda_: float = eedn.option(0.5, "trade-off", min=0)

    def fit(self, model, context: FitContext) -> StrategyResult:  # pragma: no cover - never trained here
        raise NotImplementedError


@pytest.fixture
def fresh_warning(monkeypatch):
    """The deprecation warning is once per process; make this test the first."""
    monkeypatch.setattr(eedn.core.options, "_WARNED", [])


def test_options_are_an_instance_of_the_declared_class():
    demo = _Demo(epochs="7")
    assert isinstance(demo.options, _Demo.Options)
    assert demo.options.epochs == 7 and demo.options.lambda_ == 0.5
    assert isinstance(JeiStrategy().options, JeiStrategy.Options)
    assert isinstance(JeiGate(2, 3).options, JeiGate.Options)


def test_a_typo_in_an_option_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError):
        _Demo().options.epoch  # noqa: B018


def test_a_typo_in_a_given_option_is_refused_with_a_hint():
    with pytest.raises(EednError, match="did you mean 'epochs'"):
        _Demo(epoch=3)


def test_as_dict_names_keyword_options_without_the_underscore():
    assert _Demo(**{"lambda": 0.25}).options.as_dict() == {"epochs": 3, "lambda": 0.25}


def test_dict_access_still_works_and_warns_once(fresh_warning):
    options = _Demo(epochs=4).options
    with pytest.warns(DeprecationWarning, match=r"self\.options\.NAME"):
        assert options["epochs"] == 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second read is silent
        assert options["lambda"] == 0.5
        assert options.get("epochs") == 4 and options.get("missing", 9) == 9
        assert "epochs" in options and "nope" not in options
        assert dict(options) == {"epochs": 4, "lambda": 0.5}
    with pytest.raises(KeyError):
        options["nope"]


def test_plugins_without_an_options_class_get_attributes():
    class Free(eedn.Gate):
        def __init__(self, num_exits: int, num_classes: int, ratio: float = 4.0):
            super().__init__(num_exits, num_classes, ratio=ratio)

        def scores(self, exit_index, logits, features=None):  # pragma: no cover
            raise NotImplementedError

        def exits_at(self, prefix):  # pragma: no cover
            raise NotImplementedError

    gate = Free(2, 3, ratio=2.5)
    assert gate.options.ratio == 2.5 and gate.options.as_dict() == {"ratio": 2.5}


def test_jei_resolves_its_profile_into_a_typed_instance_and_records_it_as_before():
    clean = JeiStrategy(**{"lambda": [0.1, 0.5]})
    assert isinstance(clean.options, JeiStrategy.Options)  # dataclasses.replace keeps the typed class
    record = clean.describe()
    assert list(record) == [eedn.core.options._option_name(f) for f in JeiStrategy.Options.__dataclass_fields__]
    assert "lambda" in record and "lambda_" not in record
    assert (record["warmup"], record["alternation"], record["select"], record["warmup_epochs"]) == (
        "fixed", "auto", "last", 3)
    assert (record["targets"], record["exit_rule"], record["pos_weight_counts"]) == ("cumulative", "cdf", "cumulative")
    assert json.loads(json.dumps(record)) == record
    compat = JeiStrategy(profile="paper-compat", exit_rule="cdf").describe()
    assert (compat["select"], compat["optimizers"], compat["pos_weight_counts"]) == ("pt_compat", "shared",
                                                                                   "cumulative")
    # the record rebuilds the same strategy
    assert JeiStrategy(**record).describe() == record


def test_no_plugin_reads_its_options_by_string_key():
    """Plugin options are attributes everywhere in eedn and its built-ins (the dict access is for old plugins)."""
    everywhere = re.compile(r"""self\.options(\[|\.get\()|dict\(self\.options\)""")
    in_plugins = re.compile(r"""\b(opts?|o|options)\[["']""")  # plugin code names its options o / opts
    offenders = [f"{path.relative_to(ROOT)}:{n}" for folder in ("plugins", "eedn") for path in
                 sorted((ROOT / folder).rglob("*.py")) if path.name != "options.py"  # options.py: the machinery
                 for n, line in enumerate(path.read_text().splitlines(), 1)
                 if everywhere.search(line) or (folder == "plugins" and in_plugins.search(line))]
    assert offenders == []
