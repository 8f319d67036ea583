"""The ``eedn compare`` command: parse the command line, call :mod:`eedn.pipeline.comparison`, print the tables of
:mod:`eedn.report.terminal`."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from eedn.cli.common import build_config, common_run_options, friendly_errors, parse_lambdas
from eedn.runtime.errors import EednError

if TYPE_CHECKING:
    from eedn.core.config import Config

if TYPE_CHECKING:
    from eedn.core.config import Config

METRICS_HELP = (
    "The numbers matched at equal cost and drawn against MACs are accuracy and every evaluator's headline "
    "metrics. An evaluator chooses its headline numbers through its own options, e.g. "
    "`--set evaluator_options.NAME.OPTION=VALUE` (`eedn plugins NAME` lists them); `evaluators` picks which "
    "evaluators run."
)


def resolve_compare_config(config_file, sets, epochs, lambdas, kw) -> tuple[Config, dict[str, dict], dict]:
    """The shared resolved config, the per-strategy option blocks (``strategies:`` in the file, plus
    ``--set strategies.NAME.KEY=VALUE``) and the command-line strategy options."""
    from eedn.pipeline.comparison import split_strategies_key
    from eedn.core.config import apply_set, load_config_file

    base = load_config_file(config_file) if config_file else {}
    base, per_strategy = split_strategies_key(base)
    holder = {"strategies": per_strategy}
    for assignment in sets:
        if assignment.strip().startswith("strategies."):
            apply_set(holder, assignment)
    _, per_strategy = split_strategies_key(holder)
    other_sets = [s for s in sets if not s.strip().startswith("strategies.")]
    cfg = build_config(config_file=None, sets=other_sets, epochs=epochs, lambdas=lambdas, base=base, **kw)
    return cfg, per_strategy, {"epochs": epochs, "tradeoff": parse_lambdas(lambdas)}


def parse_anytime_range(text: str | None) -> list[float] | None:
    """``--anytime-range 0.5,1`` → ``[0.5, 1.0]`` (fractions of full MACs)."""
    if text is None:
        return None
    from eedn.core.options import parse_number_list

    values = parse_number_list(text, "--anytime-range", float, 0, "0.5,1.0")
    if len(values) != 2 or not 0 <= values[0] < values[1]:
        raise EednError(f"--anytime-range expects LO,HI with 0 <= LO < HI (fractions of full MACs), got '{text}'")
    return values


def sweep_cells(config_file, sets, epochs, lambdas, kw, specs, sweeps) -> list:
    """One :class:`~eedn.pipeline.comparison.SweepCell` per combination of swept values (one cell without a
    sweep): each cell is the command line plus its ``--set KEY=VALUE`` assignments, resolved and checked."""
    from eedn.pipeline.comparison import SweepCell, check_shared_options, strategy_options_for, sweep_grid

    cells = []
    for assignments in sweep_grid(sweeps):
        cfg, per_strategy, cli = resolve_compare_config(config_file, [*sets, *assignments], epochs, lambdas, kw)
        check_shared_options(specs, cfg.strategy_options)
        options = {s.label: strategy_options_for(s, cfg.strategy_options, per_strategy, cli) for s in specs}
        cells.append(SweepCell(tuple(assignments), cfg, options))
    return cells


@click.command("compare", epilog=METRICS_HELP)
@click.option("--strategies", "strategies_text", required=True, metavar="NAME[:GATE],...",
              help="strategies to compare, each with its default gate or NAME:GATE, e.g. jei,boostnet,im-only:entropy")
@click.option("--seeds", "num_seeds", type=int, help="run seeds 0..N-1 (mean ± std across them)")
@click.option("--seed-list", help="explicit seeds, e.g. 0,1,2")
@click.option("--out", type=click.Path(), help="output directory (default runs/compare-<dataset>-<backbone>-<time>)")
@click.option("--sweep", "sweep_items", multiple=True, metavar="KEY=V1,V2",
              help="run every combination of these config values (repeatable; any key --set takes, or seed) into "
                   "one comparison; complete run directories are reused")
@click.option("--anytime-range", metavar="LO,HI",
              help="MACs-fraction range of the anytime score (default: the range every strategy covers)")
@common_run_options
@friendly_errors
def compare_command(strategies_text, num_seeds, seed_list, out, sweep_items, anytime_range, quiet, debug,
                    config_file, sets, epochs, lambdas, seed, **kw) -> None:
    """Compare strategies on one backbone, dataset and seed list at matched compute.

    Every strategy shares the seed's trained backbone and feature cache. Per-strategy options go in the config
    file under `strategies: {jei: {lambda: [0.1, 1]}, boostnet: {epochs: 5}}` or as
    `--set strategies.jei.epochs=5`; `--epochs` applies to every strategy and `--lambda` to the strategies with a
    λ trade-off only. Every name and option is checked before anything is trained. Writes one run directory per
    strategy and seed, comparison.json, comparison.md and the figures; `--resume` keeps finished runs of the
    same config. `--sweep KEY=V1,V2` (repeatable) runs the grid of those values, each cell's strategies one
    more column of the same comparison (e.g. `--sweep backbone=resnet_tiny,resnet --sweep
    strategies.jei.epochs=4,8`); a sweep always reuses complete run directories.
    """
    from eedn.pipeline.comparison import default_out_dir, parse_seeds, parse_strategies, parse_sweeps, run_sweep
    from eedn.report.terminal import print_comparison
    from eedn.runtime.progress import Progress

    specs = parse_strategies(strategies_text)
    sweeps = parse_sweeps(sweep_items)
    span = parse_anytime_range(anytime_range)
    cells = sweep_cells(config_file, list(sets), epochs, lambdas, dict(kw, seed=None), specs, sweeps)
    cfg = cells[0].cfg
    swept_seeds = dict(sweeps).get("seed")
    if swept_seeds is not None:
        if any(v is not None for v in (num_seeds, seed_list, seed)):
            raise EednError("--sweep seed=... sets the seeds: leave out --seeds, --seed-list and --seed")
        seed_list = ",".join(swept_seeds)
    seeds = parse_seeds(num_seeds, seed_list, seed, cfg.seed)
    from eedn.pipeline.run import join_ranks
    from eedn.runtime.distributed import broadcast_object, launched_rank, shutdown

    cfg = join_ranks(cfg)  # under torchrun: every rank needs rank 0's output directory (its time stamp)
    out_dir = broadcast_object(Path(out) if out else default_out_dir(cfg))
    progress = Progress(enabled=not quiet and cfg.progress and launched_rank() == 0)
    swept = any(cell.assignments for cell in cells)
    comparison = run_sweep(cells, specs, seeds, out_dir, progress, reuse_finished=cfg.resume or swept,
                           anytime_range=span)
    shutdown()
    if launched_rank() != 0:
        return
    print_comparison(comparison)
    for note in comparison["notes"]:
        click.echo(f"note: {note}", err=True)
    click.echo(f"comparison directory: {out_dir}")
