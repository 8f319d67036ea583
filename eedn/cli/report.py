"""The ``eedn report`` command: re-render a run's or a comparison's report from its saved files."""
from __future__ import annotations

import click

from eedn.cli.common import friendly_errors
from eedn.cli.compare import METRICS_HELP


@click.command("report", epilog=METRICS_HELP)
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--quiet", is_flag=True, help="print only the directory's files")
@click.option("--debug", is_flag=True, help="show tracebacks")
@friendly_errors
def report_command(run_dir, quiet, debug) -> None:
    """Re-render the report and figures of a run or comparison directory from its saved files.

    Nothing is trained or re-evaluated: the numbers come from each run's results.json and the reliability
    diagram from its run.json. A comparison directory gets comparison.md, comparison.json and its figures; a run
    directory summary.md and its figures.
    """
    from eedn.pipeline.comparison import render_directory
    from eedn.report.terminal import print_comparison, print_run

    done = render_directory(run_dir)
    if not quiet:
        if done["kind"] == "comparison":
            print_comparison(done["comparison"])
        else:
            print_run(done["results"])
    for note in done.get("comparison", {}).get("notes", []):
        click.echo(f"note: {note}", err=True)
    click.echo(f"re-rendered {run_dir}: {', '.join(done['files'])}")
