"""The ``eedn`` command line. Bad input prints one line and exits non-zero (``--debug`` for tracebacks)."""
from __future__ import annotations

import importlib

import click

from eedn.cli_options import build_config, common_run_options, friendly_errors

#: commands that live in their own modules, imported only when used (keeps `eedn --help` fast).
LAZY_COMMANDS = {
    "compare": ("eedn.compare", "compare_command"),
    "report": ("eedn.compare", "report_command"),
    "predict": ("eedn.predict", "predict"),
    "bench": ("eedn.bench", "bench"),
}


class EednGroup(click.Group):
    """A click group that also serves the lazily imported commands."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(LAZY_COMMANDS))

    def get_command(self, ctx: click.Context, name: str):
        if name in LAZY_COMMANDS and name not in self.commands:
            module, attr = LAZY_COMMANDS[name]
            return getattr(importlib.import_module(module), attr)
        return super().get_command(ctx, name)


@click.group(cls=EednGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="eedn")
def cli() -> None:
    """eedn: early-exit dynamic neural networks (JEI-DNN and its baselines)."""


@cli.command()
@click.option("--strategy", help="training strategy: jei (default), im-only, sdn, boostnet, l2w, ...")
@click.option("--gate", help="gate (default: the strategy's): jei, max_prob, entropy, margin, patience, ...")
@click.option("--out", type=click.Path(), help="run directory (default runs/<dataset>-<backbone>-<strategy>-s<seed>-<time>)")
@common_run_options
@friendly_errors
def run(strategy, gate, out, quiet, debug, **kw) -> None:
    """Train and evaluate one early-exit model; write results.json, summary.md and a plot.

    JEI switches go through --set, e.g. --set strategy_options.profile=paper-compat,
    --set strategy_options.im_loss=exit_weighted; `docs/usage.md` lists them all.
    """
    from eedn.progress import Progress
    from eedn.report import print_results_table
    from eedn.run import prepare, run_strategy

    cfg = build_config(strategy=strategy, gate=gate, out=out, **kw)
    progress = Progress(enabled=not quiet and cfg["progress"])
    with progress.session():
        prep = prepare(cfg, progress)
        results = run_strategy(prep)
    print_results_table(results)


@cli.command()
@click.option("--debug", is_flag=True, help="show tracebacks")
@friendly_errors
def plugins(debug) -> None:
    """List every registered backbone, IM, gate, strategy, evaluator and dataset with its origin."""
    from rich.console import Console
    from rich.table import Table

    from eedn.plugins import KINDS, registry

    table = Table(title="eedn plugins")
    for col in ("kind", "name", "from", "description"):
        table.add_column(col)
    for kind in KINDS:
        reg = registry(kind)
        for name in reg.names():
            e = reg.get(name)
            table.add_row(kind.replace("_", " "), name, e.origin, str(e.info.get("description", "")))
        table.add_section()
    Console().print(table)


def main() -> None:
    from eedn.plugins import get_plugin_manager

    try:
        get_plugin_manager().add_commands(cli)
    except Exception as exc:  # a broken third-party plugin must not hide the built-in commands
        click.echo(f"warning: a plugin failed to add commands: {exc}", err=True)
    cli()


if __name__ == "__main__":
    main()
