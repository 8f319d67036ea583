"""The ``eedn`` command line. Bad input prints one line and exits non-zero (``--debug`` for tracebacks).

Start-up stays fast (``eedn --help``, ``eedn plugins`` and ``eedn run --help`` import no torch): commands
that need the model code live in their own modules, imported only when the command runs, and the plugin
listing reads the registration page only (see ``benchmarks/bench_cli_start.py``).
"""
from __future__ import annotations

import difflib
import importlib
from typing import NamedTuple

import click

from eedn.cli.common import build_config, common_run_options, friendly_errors, key_flag
from eedn.runtime.errors import EednError


class LazyCommand(NamedTuple):
    """A command imported on first use; ``help`` is its one-line summary for ``eedn --help``."""

    target: str  # "module:attribute"
    help: str


#: commands that live in their own modules, imported only when run (keeps `eedn --help` free of torch).
LAZY_COMMANDS: dict[str, LazyCommand] = {
    "compare": LazyCommand("eedn.cli.compare:compare_command",
                           "Compare strategies on one backbone, dataset and seed list at matched compute."),
    "report": LazyCommand("eedn.cli.report:report_command",
                          "Re-render the report and figures of a run or comparison directory."),
    "predict": LazyCommand("eedn.cli.deploy_commands:predict",
                           "Classify images with a trained run (real early exits)."),
    "bench": LazyCommand("eedn.cli.deploy_commands:bench", "Time early-exit inference against the full network."),
    "cache": LazyCommand("eedn.cli.cache:cache_command",
                         "Show and remove cached backbones, features and extracted datasets."),
    "export": LazyCommand("eedn.cli.deploy_commands:export_command",
                          "Export a trained run as per-exit segments with a small runner (no eedn needed)."),
}


class EednGroup(click.Group):
    """A click group that also serves the lazily imported commands, listing them without importing them."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(LAZY_COMMANDS))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in LAZY_COMMANDS and name not in self.commands:
            module, _, attr = LAZY_COMMANDS[name].target.partition(":")
            return getattr(importlib.import_module(module), attr)
        return super().get_command(ctx, name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = []
        for name in self.list_commands(ctx):
            if name in LAZY_COMMANDS and name not in self.commands:
                rows.append((name, LAZY_COMMANDS[name].help))
            else:
                cmd = super().get_command(ctx, name)
                if cmd is not None and not cmd.hidden:
                    rows.append((name, cmd.get_short_help_str(formatter.width - 6 - len(name))))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


@click.group(cls=EednGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="eedn")
def cli() -> None:
    """eedn: early-exit dynamic neural networks (JEI-DNN and its baselines)."""


@cli.command()
@key_flag("--strategy")
@key_flag("--gate")
@key_flag("--out", type=click.Path())
@key_flag("--overwrite")
@common_run_options
@friendly_errors
def run(strategy, gate, out, overwrite, quiet, debug, **kw) -> None:
    """Train and evaluate one early-exit model; write results.json, summary.md and a plot.

    Progress: one live line per stage on a terminal, one line per finished epoch in a log,
    nothing but the final table with --quiet. Plugin options go through --set, e.g.
    --set strategy_options.epochs=5; `eedn plugins NAME` lists a plugin's options and
    `docs/usage.md` every config key.
    """
    from eedn.runtime.progress import Progress
    from eedn.pipeline.run import prepare, run_strategy
    from eedn.report.terminal import print_run

    from eedn.runtime.distributed import launched_rank, shutdown

    cfg = build_config(strategy=strategy, gate=gate, out=out, overwrite=overwrite, **kw)
    main_rank = launched_rank() == 0  # under torchrun only rank 0 prints
    progress = Progress(enabled=not quiet and cfg.progress and main_rank)
    with progress.session():
        prep = prepare(cfg, progress)
        results = run_strategy(prep)
    shutdown()
    if main_rank:
        print_run(results)


@cli.command()
@click.argument("name", required=False)
@click.option("--filter", "pattern", metavar="PATTERN",
              help="list only the plugins whose name matches this shell pattern, e.g. 'res*'")
@click.option("--debug", is_flag=True, help="show tracebacks")
@friendly_errors
def plugins(name, pattern, debug) -> None:
    """List every registered backbone, IM, gate, strategy, evaluator and dataset with its origin;
    with NAME, show that plugin's options (type, default, help, limits)."""
    if name is None:
        print_plugin_list(pattern)
    elif pattern is not None:
        raise EednError("give NAME or --filter PATTERN, not both")
    else:
        print_plugin_options(name)


def print_plugin_list(pattern: str | None = None) -> None:
    """kind / name / from / description of every plugin (those whose name matches ``pattern``), without
    importing any plugin module."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from eedn.core.plugins import KINDS, registry

    shown = {kind: set(registry(kind).names(pattern)) for kind in KINDS}
    if not any(shown.values()):
        raise EednError(f"no plugin name matches '{pattern}'; `eedn plugins` lists them all")
    table = Table(title="eedn plugins (`eedn plugins NAME` shows a plugin's options; * = the default)")
    for col in ("kind", "name", "from", "description"):
        table.add_column(col)
    for kind in KINDS:
        if not shown[kind]:
            continue
        for entry in registry(kind).entries.values():
            if entry.name in shown[kind]:
                name = entry.name + (" *" if entry.info.get("default") else "")
                table.add_row(kind.replace("_", " "), name, entry.origin, Text(entry.description))
        table.add_section()
    Console().print(table)


def print_plugin_options(name: str) -> None:
    """The declared options of every plugin called ``name`` (a name may be both a gate and a strategy)."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from eedn.core.plugins import KINDS, find, registry

    entries = find(name)
    if not entries:
        known = sorted({n for kind in KINDS for n in registry(kind).names()})
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise EednError(f"unknown plugin '{name}'{hint}; known: {', '.join(known)}")
    console = Console()
    for entry in entries:
        specs = entry.options()
        title = f"{entry.label} from {entry.origin}" + (f": {entry.description}" if entry.description else "")
        if not specs:
            console.print(title, markup=False)
            console.print("  takes no options" if specs == [] else
                          "  takes options it does not declare (**options); see its documentation", markup=False)
            continue
        table = Table(title=Text(title), title_justify="left")
        for col in ("option", "type", "default", "help", "choices / limits"):
            table.add_column(col, overflow="fold")
        for spec in specs:
            table.add_row(*(Text(t) for t in (spec.name, spec.type_text(), spec.default_text(), spec.help,
                                               spec.limits_text())))
        console.print(table)


def one_line_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                     line: str | None = None) -> str:
    """Python warnings on the command line read like eedn's own: one ``warning: ...`` line, no source line."""
    return f"warning: {message}\n"


def main() -> None:
    import warnings

    from eedn.core.plugins import get_plugin_manager

    warnings.formatwarning = one_line_warning

    try:
        get_plugin_manager().add_commands(cli)
    except Exception as exc:  # a broken third-party plugin must not hide the built-in commands
        click.echo(f"warning: a plugin failed to add commands: {exc}", err=True)
    cli()


if __name__ == "__main__":
    main()
