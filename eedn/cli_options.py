"""Options and error handling shared by every ``eedn`` command (``run``, ``compare``, ``bench``, ...)."""
from __future__ import annotations

import functools
import os
import sys
from typing import Any, Callable

import click

from eedn.errors import EednError

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
            msg = first_line(exc)
            prefix = "error" if isinstance(exc, EednError) else f"error ({type(exc).__name__})"
            click.echo(f"{prefix}: {msg}" + ("" if isinstance(exc, EednError) else " — rerun with --debug for details"),
                       err=True)
            sys.exit(1)

    return wrapper


def first_line(exc: BaseException) -> str:
    """The one line printed for an error; a line that ends with ':' (torch's "Error(s) in loading
    state_dict for X:") keeps what follows, so the point is never cut off."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    if lines[0].endswith(":") and len(lines) > 1:
        return " ".join(lines)[:400]
    return lines[0]


def parse_number_list(text: str, option: str, convert: Callable[[str], Any], minimum: float, example: str) -> list:
    """A comma-separated option value (``--lambda 0.01,0.5``, ``--batch-sizes 1,32``) as numbers >= ``minimum``."""
    try:
        values = [convert(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise EednError(f"{option} expects a comma-separated list such as {example}, got '{text}'") from None
    if not values or any(v < minimum for v in values):
        raise EednError(f"{option} values must be numbers >= {minimum:g}, got '{text}'")
    return values


def parse_lambdas(text: str | None) -> Any:
    """``--lambda``: one value, or a list for a sweep."""
    if text is None:
        return None
    values = parse_number_list(text, "--lambda", float, 0, "0.01,0.5,2")
    return values[0] if len(values) == 1 else values


def common_run_options(fn: Callable) -> Callable:
    """Options shared by `run` and `compare`."""
    opts = [
        click.option("--backbone", help="backbone (default: the one `eedn plugins` marks as default)"),
        click.option("--dataset", help="dataset source (default: the one `eedn plugins` marks as default)"),
        click.option("--data-dir", type=click.Path(), help="where the dataset's files are (never downloaded)"),
        click.option("--config", "config_file", type=click.Path(), help="YAML/JSON config file"),
        click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="override any config key (dotted)"),
        click.option("--seed", type=int, help="random seed (data split, init, batches)"),
        click.option("--image-size", type=int, help="input size in pixels (default: the dataset's)"),
        click.option("--backbone-epochs", type=int, help="epochs of backbone training (0 with a checkpoint: no training)"),
        click.option("--backbone-checkpoint", type=click.Path(), help="trained backbone weights to load"),
        click.option("--epochs", type=int, help="epochs of head/gate training for the strategy"),
        click.option("--lambda", "lambdas", help="cost trade-off λ of strategies that have one: one value or a "
                                                 "list, e.g. 0.01,0.5,2"),
        click.option("--budget", type=float, help="target mean-MACs fraction for threshold gates (default 0.75)"),
        click.option("--risk", help="risk-controlled exits: a risk (`eedn plugins` lists them), e.g. prediction_gap"),
        click.option("--epsilon", type=float, help="risk level ε the controlled policy must keep (default 0.05)"),
        click.option("--delta", type=float, help="failure probability δ of the ucb-*/ltt controllers (default 0.1)"),
        click.option("--controller", help="naive, crc, ucb-hb, ucb-wsr or ltt (default ltt; docs/evaluation.md)"),
        click.option("--device", help="cpu or cuda"),
        click.option("--threads", type=int, help="torch CPU threads (default 1; raise for large backbones)"),
        click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]),
                     help="autocast precision of every stage (default fp32; fp16 needs CUDA)"),
        click.option("--cache-dir", type=click.Path(), help="backbone and feature cache (default ~/.cache/eedn)"),
        click.option("--resume", is_flag=True, default=None, help="continue an interrupted backbone training"),
        click.option("--quiet", is_flag=True, help="no progress: print only the final table and directory"),
        click.option("--debug", is_flag=True, help="show tracebacks"),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def build_config(config_file, sets, backbone, dataset, data_dir, seed, image_size, backbone_epochs,
                 backbone_checkpoint, epochs, lambdas, budget, device, cache_dir, resume, threads=None, strategy=None,
                 gate=None, out=None, base: dict | None = None, risk=None, epsilon=None, delta=None,
                 controller=None, precision=None) -> dict:
    """CLI options → resolved config (CLI wins over the file or ``base``, --set wins over both)."""
    from eedn.config import load_config_file, resolve_config

    if base is None:
        base = load_config_file(config_file) if config_file else {}
    base = dict(base)
    overrides: dict[str, Any] = {"backbone": backbone, "dataset": dataset, "seed": seed, "image_size": image_size,
                                 "device": device, "threads": threads, "cache_dir": cache_dir, "resume": resume, "strategy": strategy,
                                 "gate": gate, "out": out, "tradeoff": parse_lambdas(lambdas), "precision": precision}
    if dataset is not None and dataset != base.get("dataset"):
        base.pop("dataset_options", None)
    bt = {k: v for k, v in {"epochs": backbone_epochs, "checkpoint": backbone_checkpoint}.items() if v is not None}
    if bt:
        overrides["backbone_training"] = bt
    rc = {k: v for k, v in {"risk": risk, "epsilon": epsilon, "delta": delta, "controller": controller}.items()
          if v is not None}
    if rc:
        overrides["risk_control"] = rc
    so = {"epochs": epochs} if epochs is not None else {}
    if strategy is not None and strategy != base.get("strategy"):
        base.pop("strategy_options", None)
    if so:
        overrides["strategy_options"] = so
    if budget is not None:
        if not 0 < budget <= 1:
            raise EednError(f"--budget is a fraction of full MACs in (0, 1], got {budget}")
        base["budget"] = {"macs_fraction": budget}
    cfg = resolve_config(base, list(sets), **overrides)
    if data_dir is not None:
        cfg["dataset_options"]["data_dir"] = data_dir
    return cfg
