"""Options and error handling shared by every ``eedn`` command (``run``, ``compare``, ``bench``, ...)."""
from __future__ import annotations

import functools
import os
import sys
import typing
from typing import TYPE_CHECKING, Any, Callable, Sequence

import click

from eedn.runtime.errors import EednError
from eedn.core.options import parse_number_list

if TYPE_CHECKING:
    from eedn.core.config import Config

DEBUG_ENV = "EEDN_DEBUG"


def friendly_errors(fn: Callable) -> Callable:
    """Turn exceptions into one line on stderr and exit code 1, unless --debug."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any):
        debug = kwargs.get("debug") or os.environ.get(DEBUG_ENV) == "1"
        try:
            return fn(*args, **kwargs)
        except click.exceptions.Exit:
            raise
        except click.ClickException:
            raise
        except KeyboardInterrupt:
            click.echo("interrupted; rerun with --resume to continue backbone training", err=True)
            sys.exit(130)
        except Exception as exc:  # noqa: BLE001 - the CLI boundary
            if debug:
                raise
            exc = distributed_view(exc)
            msg = first_line(exc)
            prefix = "error" if isinstance(exc, EednError) else f"error ({type(exc).__name__})"
            click.echo(f"{prefix}: {msg}" + ("" if isinstance(exc, EednError) else " — rerun with --debug for details"),
                       err=True)
            sys.exit(1)

    return wrapper


def distributed_view(exc: Exception) -> Exception:
    """Under torchrun: a failed collective becomes one line naming the rank that is gone, and this rank's own
    error is left where the other ranks can read it (eedn.runtime.distributed). Otherwise ``exc`` itself."""
    if "eedn.runtime.distributed" not in sys.modules:  # never imported: not a distributed command
        return exc
    from eedn.runtime.distributed import explain_failure, record_failure

    explained = explain_failure(exc)
    if explained is not None:
        return explained
    record_failure(first_line(exc))
    return exc


def first_line(exc: BaseException) -> str:
    """The one line printed for an error; a line that ends with ':' (torch's "Error(s) in loading
    state_dict for X:") keeps what follows, so the point is never cut off."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    if lines[0].endswith(":") and len(lines) > 1:
        return " ".join(lines)[:400]
    return lines[0]


def parse_lambdas(text: str | None) -> Any:
    """``--lambda``: one value, or a list for a sweep."""
    if text is None:
        return None
    values = parse_number_list(text, "--lambda", float, 0, "0.01,0.5,2")
    return values[0] if len(values) == 1 else values


def key_flag(flag: str, **click_kwargs: Any) -> Callable:
    """The click option of a config key's flag (``--backbone-epochs``): its type, choices and help come from
    the key table (eedn/core/config.py), and its value goes through the key's checks in :func:`build_config`."""
    from eedn.core.config import config_key, flag_keys

    spec = config_key(flag_keys()[flag])
    kind = next((t for t in typing.get_args(spec.type) if t is not type(None)), spec.type)
    kwargs: dict[str, Any] = {"help": spec.help.replace("(None: ", "(default: ").replace("; None: ", "; unset: ")}
    if kind is bool:
        kwargs |= {"is_flag": True, "default": None}
    elif spec.choices is not None:
        kwargs["type"] = click.Choice([str(c) for c in spec.choices])
    elif kind in (int, float):
        kwargs["type"] = kind
    if spec.default is not None and kind is not bool:
        kwargs["help"] += f" (default {spec.default})"
    return click.option(flag, **(kwargs | click_kwargs))


def common_run_options(fn: Callable) -> Callable:
    """Options shared by `run` and `compare`."""
    opts = [
        key_flag("--backbone"),
        key_flag("--dataset"),
        click.option("--data-dir", type=click.Path(), help="where the dataset's files are (never downloaded)"),
        click.option("--config", "config_file", type=click.Path(), help="YAML/JSON config file"),
        click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="override any config key (dotted)"),
        key_flag("--seed"),
        key_flag("--head-seed"),
        key_flag("--image-size"),
        key_flag("--backbone-epochs"),
        key_flag("--backbone-checkpoint", type=click.Path()),
        click.option("--epochs", type=int, help="epochs of head/gate training for the strategy"),
        click.option("--lambda", "lambdas", help="cost trade-off λ of strategies that have one: one value or a "
                                                 "list, e.g. 0.01,0.5,2"),
        click.option("--budget", type=float, help="target mean-MACs fraction of the reported policy, met within "
                                                "±0.02 on val by threshold and learned gates alike (default: "
                                                "thresholds 0.75, learned gates as trained)"),
        key_flag("--risk"),
        key_flag("--epsilon"),
        key_flag("--delta"),
        key_flag("--controller"),
        key_flag("--device"),
        key_flag("--threads"),
        key_flag("--precision"),
        key_flag("--cache-dir", type=click.Path()),
        key_flag("--resume"),
        click.option("--logger", "loggers", multiple=True, metavar="NAME",
                     help="log to an experiment tracker: tensorboard, mlflow or csv (`eedn plugins` lists them); "
                          "repeat for several"),
        click.option("--quiet", is_flag=True, help="no progress: print only the final table and directory"),
        click.option("--debug", is_flag=True, help="show tracebacks"),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def build_config(config_file: str | None = None, sets: Sequence[str] = (), data_dir: str | None = None,
                 epochs: int | None = None, lambdas: str | None = None, budget: float | None = None,
                 base: dict | None = None, loggers: Sequence[str] = (), **flags: Any) -> Config:
    """CLI options → resolved config (CLI wins over the file or ``base``, --set wins over both). ``flags`` are
    the key flags by parameter name (``backbone_epochs=3``); None means not given."""
    from eedn.core.config import BUDGET_KEYS, config_key, flag_keys, load_config_file, resolve_config
    from eedn.core.options import coerce

    if base is None:
        base = load_config_file(config_file) if config_file else {}
    base = dict(base)
    by_param = {flag[2:].replace("-", "_"): (flag, dotted) for flag, dotted in flag_keys().items()}
    overrides: dict[str, Any] = {"tradeoff": parse_lambdas(lambdas), "loggers": list(loggers) or None}
    for param, value in flags.items():
        if value is None:
            continue
        flag, dotted = by_param[param]
        *path, last = dotted.split(".")
        node = overrides
        for part in path:
            node = node.setdefault(part, {})
        node[last] = coerce(flag, config_key(dotted), value)
    for name in ("dataset", "strategy"):  # another plugin: the file's options were the other one's
        if flags.get(name) is not None and flags[name] != base.get(name):
            base.pop(f"{name}_options", None)
    if epochs is not None:
        overrides["strategy_options"] = {"epochs": epochs}
    if budget is not None:
        base["budget"] = {"macs_fraction": coerce("--budget", BUDGET_KEYS["macs_fraction"], budget)}
    cfg = resolve_config(base, list(sets), **overrides)
    if data_dir is not None:
        cfg = cfg.replace(dataset_options={**cfg.dataset_options, "data_dir": data_dir})
    return cfg
