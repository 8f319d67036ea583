"""The ``eedn compare`` command: parse the command line, call :mod:`eedn.pipeline.comparison`, print the tables of
:mod:`eedn.report.terminal`."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from eedn.cli.common import build_config, common_run_options, friendly_errors, parse_lambdas

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


@click.command("compare", epilog=METRICS_HELP)
@click.option("--strategies", "strategies_text", required=True, metavar="NAME[:GATE],...",
              help="strategies to compare, each with its default gate or NAME:GATE, e.g. jei,boostnet,im-only:entropy")
@click.option("--seeds", "num_seeds", type=int, help="run seeds 0..N-1 (mean ± std across them)")
@click.option("--seed-list", help="explicit seeds, e.g. 0,1,2")
@click.option("--out", type=click.Path(), help="output directory (default runs/compare-<dataset>-<backbone>-<time>)")
@common_run_options
@friendly_errors
def compare_command(strategies_text, num_seeds, seed_list, out, quiet, debug, config_file, sets, epochs, lambdas,
                    seed, **kw) -> None:
    """Compare strategies on one backbone, dataset and seed list at matched compute.

    Every strategy shares the seed's trained backbone and feature cache. Per-strategy options go in the config
    file under `strategies: {jei: {lambda: [0.1, 1]}, boostnet: {epochs: 5}}` or as
    `--set strategies.jei.epochs=5`; `--epochs` applies to every strategy and `--lambda` to the strategies with a
    λ trade-off only. Every name and option is checked before anything is trained. Writes one run directory per
    strategy and seed, comparison.json, comparison.md and the figures; `--resume` keeps finished runs of the
    same config.
    """
    from eedn.pipeline.comparison import (check_shared_options, default_out_dir, parse_seeds, parse_strategies,
                                          run_compare, strategy_options_for)
    from eedn.runtime.progress import Progress
    from eedn.report.terminal import print_comparison

    specs = parse_strategies(strategies_text)
    cfg, per_strategy, cli = resolve_compare_config(config_file, list(sets), epochs, lambdas, dict(kw, seed=None))
    seeds = parse_seeds(num_seeds, seed_list, seed, cfg.seed)
    check_shared_options(specs, cfg.strategy_options)
    options = {s.label: strategy_options_for(s, cfg.strategy_options, per_strategy, cli) for s in specs}
    from eedn.runtime.distributed import broadcast_object, launched_rank, shutdown
    from eedn.pipeline.run import join_ranks

    cfg = join_ranks(cfg)  # under torchrun: every rank needs rank 0's output directory (its time stamp)
    out_dir = broadcast_object(Path(out) if out else default_out_dir(cfg))
    progress = Progress(enabled=not quiet and cfg.progress and launched_rank() == 0)
    comparison = run_compare(cfg, specs, seeds, options, out_dir, progress, reuse_finished=cfg.resume)
    shutdown()
    if launched_rank() != 0:
        return
    print_comparison(comparison)
    for note in comparison["notes"]:
        click.echo(f"note: {note}", err=True)
    click.echo(f"comparison directory: {out_dir}")
