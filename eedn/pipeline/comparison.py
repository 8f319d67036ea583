"""`eedn compare` and `eedn report` as functions: which strategies and seeds, each strategy's options, the runs
on one shared backbone per seed, and a comparison (re)built from its run directories alone.

A comparison trains one backbone per seed (or loads it from the cache) and fits every strategy on it, so every
strategy sees the same backbone, the same data split and the same feature cache. Its numbers come only from the
run directories (results.json and run.json), read back from disk even right after the runs: one path for
`eedn compare` and `eedn report`. The maths is in :mod:`eedn.evaluation.matched`, the writing in
:mod:`eedn.report.render`.
"""
from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence, cast

from eedn.core.options import parse_number_list
from eedn.runtime.errors import EednError
from eedn.evaluation.matched import comparison_numbers
from eedn.report.render import render_run, write_comparison
from eedn.report.risk_report import comparison_rows
from eedn.pipeline.rundir import MANIFEST, RESULTS, created_now, read_manifest, read_results

if TYPE_CHECKING:
    from eedn.core.config import Config
    from eedn.train.strategy import TrainingStrategy

COMPARISON = "comparison.json"
#: config keys that may differ between a finished run and a rerun without making the run stale
RUNTIME_KEYS = ("out", "resume", "progress", "cache_dir", "device", "num_workers", "eval_batch_size", "loggers",
                "logger_options", "tracking_dir")
#: comparison.json keys that describe how it was made (kept when `eedn report` re-renders it)
META_KEYS = ("eedn_version", "kind", "created", "config", "backbone", "seeds", "strategies", "anytime_range",
             "sweep")


@dataclass(frozen=True)
class StrategySpec:
    """One entry of ``--strategies``: a strategy name and an optional gate (``name:gate``)."""

    name: str
    gate: str | None = None

    @property
    def text(self) -> str:
        return self.name if self.gate is None else f"{self.name}:{self.gate}"

    @property
    def label(self) -> str:
        """Used for run directories, plot legends and table columns (``:`` is awkward in file names)."""
        return self.name if self.gate is None else f"{self.name}+{self.gate}"


def parse_strategies(text: str) -> list[StrategySpec]:
    """``"jei,boostnet,im-only:entropy"`` → specs; checks names against the registries and rejects duplicates."""
    from eedn.core.plugins import registry

    specs = []
    gate: str | None
    for item in (t.strip() for t in (text or "").split(",")):
        if not item:
            continue
        name, _, gate = item.partition(":")
        name, gate = name.strip(), gate.strip() or None
        if not name:
            raise EednError(f"--strategies entry '{item}' has no strategy name; use name or name:gate")
        registry("strategy").get(name)
        if gate is not None:
            registry("gate").get(gate)
        specs.append(StrategySpec(name, gate))
    if not specs:
        raise EednError("--strategies needs at least one strategy, e.g. --strategies jei,im-only")
    labels = [s.label for s in specs]
    dupes = sorted({label for label in labels if labels.count(label) > 1})
    if dupes:
        raise EednError(f"--strategies lists {', '.join(dupes)} more than once")
    return specs


def parse_seeds(num_seeds: int | None, seed_list: str | None, seed: int | None, default_seed: int) -> list[int]:
    """``--seeds N`` → 0..N-1; ``--seed-list 0,3`` → [0, 3]; neither → the one config seed."""
    flags = (("--seeds", num_seeds), ("--seed-list", seed_list), ("--seed", seed))
    given = [name for name, value in flags if value is not None]
    if len(given) > 1:
        raise EednError(f"use only one of {', '.join(given)}")
    if num_seeds is not None:
        if num_seeds < 1:
            raise EednError(f"--seeds must be a positive number of seeds, got {num_seeds}")
        return list(range(num_seeds))
    if seed_list is not None:
        seeds = parse_number_list(seed_list, "--seed-list", int, 0, "0,1,2")
        if len(set(seeds)) != len(seeds):
            raise EednError(f"--seed-list repeats a seed: '{seed_list}'")
        return seeds
    return [seed if seed is not None else default_seed]


@dataclass(frozen=True)
class SweepCell:
    """One point of a ``--sweep`` grid: its ``KEY=VALUE`` assignments, its resolved config and each strategy's
    options. The cell of a plain comparison has no assignments."""

    assignments: tuple[str, ...]
    cfg: Config
    options: dict[str, dict]

    @property
    def text(self) -> str:
        return ", ".join(self.assignments)

    def label(self, spec: StrategySpec) -> str:
        """A strategy's column in the comparison: ``jei`` alone, ``jei [backbone=resnet_tiny]`` in a sweep."""
        return spec.label if not self.assignments else f"{spec.label} [{self.text}]"

    def run_name(self, spec: StrategySpec, seed: int) -> str:
        """The run directory's name: ``jei-s0``, or ``jei-backbone=resnet_tiny-s0`` in a sweep."""
        if not self.assignments:
            return f"{spec.label}-s{seed}"
        slug = re.sub(r"[^A-Za-z0-9_.=+-]+", "_", "-".join(self.assignments))
        return f"{spec.label}-{slug}-s{seed}"


def _split_values(text: str) -> list[str]:
    """``a,b,[1,2]`` → ``["a", "b", "[1,2]"]``: commas inside brackets or braces belong to a value."""
    values, depth, current = [], 0, ""
    for ch in text:
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            values.append(current.strip())
            current = ""
        else:
            current += ch
    values.append(current.strip())
    return values


def parse_sweeps(items: Sequence[str]) -> list[tuple[str, list[str]]]:
    """``--sweep KEY=V1,V2`` (repeatable) → ``[(key, [values])]``: any config key (``backbone``,
    ``dataset_options.val_fraction``, ``strategies.jei.epochs``, ``backbone_training.lr``) or ``seed``."""
    sweeps: list[tuple[str, list[str]]] = []
    for item in items:
        key, eq, text = item.partition("=")
        key = key.strip()
        values = _split_values(text) if eq else []
        if not key or not values or any(not v for v in values):
            raise EednError(f"--sweep expects KEY=V1,V2,..., got '{item}'; e.g. --sweep backbone_training.lr=0.01,0.1")
        if len(set(values)) != len(values):
            raise EednError(f"--sweep {key} repeats a value: '{text}'")
        if key in (k for k, _ in sweeps):
            raise EednError(f"--sweep {key} is given twice; list all its values in one --sweep {key}=V1,V2")
        sweeps.append((key, values))
    return sweeps


def sweep_grid(sweeps: Sequence[tuple[str, list[str]]]) -> list[tuple[str, ...]]:
    """Every combination of the swept values (the seed excluded) as ``KEY=VALUE`` assignments, first key
    slowest; one empty cell when nothing is swept."""
    import itertools

    keyed = [[f"{key}={v}" for v in values] for key, values in sweeps if key != "seed"]
    return [tuple(cell) for cell in itertools.product(*keyed)]


def split_strategies_key(base: dict) -> tuple[dict, dict[str, dict]]:
    """Take the compare-only ``strategies: {name: {option: value}}`` key out of a config dict."""
    base = copy.deepcopy(base)
    per_strategy = base.pop("strategies", None) or {}
    if not isinstance(per_strategy, dict) or not all(isinstance(v, dict) for v in per_strategy.values()):
        raise EednError("config key 'strategies' must map strategy names to option mappings, "
                        "e.g. strategies: {jei: {lambda: [0.1, 1.0]}}")
    return base, per_strategy


def strategy_options_for(spec: StrategySpec, shared: dict, per_strategy: dict[str, dict], cli: dict) -> dict:
    """Options of one strategy: the shared ``strategy_options`` it declares ← ``strategies.<name>`` ←
    ``strategies.<name:gate>`` ← command-line ``--epochs`` and ``--lambda`` (``cli["tradeoff"]``), the latter
    under the strategy's own ``tradeoff_option`` and only for strategies that have one."""
    from eedn.core.config import deep_merge
    from eedn.core.plugins import registry

    entry = registry("strategy").get(spec.name)
    declared = {s.name for s in entry.options() or []}
    opts = {k: v for k, v in shared.items() if k in declared}
    opts = deep_merge(opts, per_strategy.get(spec.name, {}))
    if spec.gate is not None:
        opts = deep_merge(opts, per_strategy.get(spec.text, {}))
    if cli.get("epochs") is not None:
        opts["epochs"] = cli["epochs"]
    tradeoff_option = cast("type[TrainingStrategy]", entry.factory).tradeoff_option
    if cli.get("tradeoff") is not None and tradeoff_option is not None:
        opts[tradeoff_option] = cli["tradeoff"]
    return opts


def check_shared_options(specs: Sequence[StrategySpec], shared: dict) -> None:
    """A shared ``strategy_options`` key goes to the strategies that declare it; one that none of them
    declares is a typo."""
    from eedn.core.plugins import registry

    declared = {s.name for spec in specs for s in registry("strategy").get(spec.name).options() or []}
    unknown = sorted(set(shared) - declared)
    if unknown:
        raise EednError(f"strategy_options {', '.join(unknown)} is declared by none of the compared strategies "
                        f"({', '.join(s.text for s in specs)}); `eedn plugins NAME` lists each one's options")


def run_config(cfg: Config, spec: StrategySpec, options: dict, seed: int) -> Config:
    """The config of one strategy's run in one seed."""
    return cfg.replace(seed=seed, strategy=spec.name, strategy_options=copy.deepcopy(options), gate=spec.gate,
                       tradeoff=None)


def check_strategies(cfg: Config, specs: Sequence[StrategySpec], options: dict[str, dict]) -> None:
    """Every strategy's names and options, checked as its run will check them, before anything is trained."""
    from eedn.pipeline.plugin_checks import check_plugins

    for spec in specs:
        check_plugins(run_config(cfg, spec, options.get(spec.label, {}), cfg.seed))


def check_run_dirs(cells: Sequence[SweepCell], specs: Sequence[StrategySpec], seeds: Sequence[int], out_dir: Path,
                   reuse_finished: bool) -> None:
    """Before anything is trained: every run directory the comparison will write is new, empty or (with
    config ``overwrite``) replaceable, and writable; finished runs kept by ``reuse_finished`` are skipped."""
    from eedn.pipeline.rundir import check_out_dir

    for cell in cells:
        for seed in seeds:
            for spec in specs:
                run_dir = out_dir / cell.run_name(spec, seed)
                expected = run_config(cell.cfg, spec, cell.options.get(spec.label, {}), seed)
                if not (reuse_finished and finished_run(run_dir, expected)):
                    check_out_dir(run_dir, cell.cfg.overwrite, what="run directory", cache_root=cell.cfg.cache_root)


def default_out_dir(cfg: Config) -> Path:
    from eedn.pipeline.rundir import unique_run_name

    return Path("runs") / unique_run_name(f"compare-{cfg.dataset}-{cfg.backbone}")


def read_run(run_dir: Path) -> tuple[dict, dict]:
    """``(results, manifest)`` of a finished run directory; a run of an older eedn (no run.json) is refused."""
    if (run_dir / RESULTS).exists() and not (run_dir / MANIFEST).exists():
        raise EednError(f"{run_dir} was written by an older eedn (results.json without {MANIFEST}); re-run it with "
                        "this version to compare or re-render it")
    return read_results(run_dir), read_manifest(run_dir)


def finished_run(run_dir: Path, expected_cfg: Config) -> bool:
    """Whether a run directory already holds a finished run of exactly this config (for --resume)."""
    try:
        results, _ = read_run(run_dir)
    except EednError:
        return False
    expected = json.loads(json.dumps(expected_cfg.to_dict(), default=str))
    saved = results.get("config", {})
    return all(saved.get(k) == expected.get(k) for k in (set(saved) | set(expected)) - set(RUNTIME_KEYS))


def run_compare(cfg: Config | dict, specs: Sequence[StrategySpec], seeds: Sequence[int], options: dict[str, dict],
                out_dir: str | Path, progress=None, *, reuse_finished: bool = False,
                anytime_range: Sequence[float] | None = None) -> dict:
    """``eedn compare`` as a function: per seed, one prepared backbone and every strategy on it; then
    comparison.json, comparison.md and the figures in ``out_dir``. ``options[label]`` are each strategy's
    options. With ``reuse_finished``, runs whose results.json already holds the same config (strategy, gate,
    options, seed, backbone, data ...) are kept instead of re-run. ``anytime_range`` (fractions of full MACs)
    sets the range of the anytime score. Returns the comparison dict."""
    from eedn.core.config import Config, resolve_config

    cfg = cfg if isinstance(cfg, Config) else resolve_config(cfg)
    return run_sweep([SweepCell((), cfg, options)], specs, seeds, out_dir, progress, reuse_finished=reuse_finished,
                     anytime_range=anytime_range)


def run_sweep(cells: Sequence[SweepCell], specs: Sequence[StrategySpec], seeds: Sequence[int], out_dir: str | Path,
              progress=None, *, reuse_finished: bool = False, anytime_range: Sequence[float] | None = None) -> dict:
    """Every strategy in every seed of every sweep cell, into one comparison: each (cell, strategy) is one column
    (:meth:`SweepCell.label`), with its own run directories. Every cell's names and options are checked and every
    run directory is checked before anything is trained. Returns the comparison dict."""
    from eedn.pipeline.run import prepare, run_strategy
    from eedn.runtime.progress import Progress
    from eedn.runtime.version import __version__

    out_dir = Path(out_dir)
    progress = progress or Progress(enabled=False)
    if anytime_range is not None:
        from eedn.evaluation.matched import anytime_scores

        anytime_scores({}, anytime_range)  # a bad range fails now, not after the training
    for cell in cells:
        check_strategies(cell.cfg, specs, cell.options)
    check_run_dirs(cells, specs, seeds, out_dir, reuse_finished)
    with progress.session():
        for cell in cells:
            where = f" [{cell.text}]" if cell.assignments else ""
            for seed in seeds:
                prep = None
                for spec in specs:
                    run_dir = out_dir / cell.run_name(spec, seed)
                    opts = cell.options.get(spec.label, {})
                    if reuse_finished and finished_run(run_dir, run_config(cell.cfg, spec, opts, seed)):
                        progress.log(f"seed {seed}{where}: {spec.label} already finished in {run_dir}, reusing it")
                        continue
                    if prep is None:
                        prep = prepare(run_config(cell.cfg, spec, opts, seed), progress)
                    progress.log(f"seed {seed}{where}: {spec.label}")
                    run_strategy(prep, spec.name, copy.deepcopy(opts), spec.gate, out=run_dir)
    first = cells[0].cfg
    meta = {
        "eedn_version": __version__, "kind": "comparison", "created": created_now(),
        "config": {k: v for k, v in first.to_dict().items()
                   if k not in ("strategy", "strategy_options", "gate", "out", "seed")},
        "backbone": ", ".join(dict.fromkeys(str(cell.cfg.backbone) for cell in cells)), "seeds": list(seeds),
        "strategies": [{"label": cell.label(s), "strategy": s.name, "gate_requested": s.gate,
                        "options": cell.options.get(s.label, {}), "sweep": list(cell.assignments),
                        "runs": {str(seed): cell.run_name(s, seed) for seed in seeds}}
                       for cell in cells for s in specs],
    }
    if any(cell.assignments for cell in cells):
        meta["sweep"] = [list(cell.assignments) for cell in cells]
    if anytime_range is not None:
        meta["anytime_range"] = [float(v) for v in anytime_range]
    from eedn.runtime.distributed import world

    if not world().main:
        return meta  # under torchrun rank 0 writes the comparison
    return render_comparison(out_dir, meta)


def render_comparison(out_dir: Path, meta: dict) -> dict:
    """Read every run the comparison lists, then write comparison.json, comparison.md and the figures."""
    runs: dict[str, dict[int, dict]] = {}
    manifests: dict[str, list[dict]] = {}
    for entry in meta["strategies"]:
        label = entry["label"]
        runs[label], manifests[label] = {}, []
        for seed, rel in entry["runs"].items():
            run_dir = out_dir / rel
            if not run_dir.is_dir():
                raise EednError(f"{run_dir} is missing: the comparison lists run '{rel}' but it is not there")
            runs[label][int(seed)], manifest = read_run(run_dir)
            manifests[label].append(manifest)
        entry["gate"] = next(iter(runs[label].values()))["policy"]["gate"]
    first = next(iter(next(iter(runs.values())).values()))
    dataset = dict(first["dataset"])
    names = list(dict.fromkeys(r["dataset"]["name"] for by_seed in runs.values() for r in by_seed.values()))
    dataset["name"] = ", ".join(names)  # a sweep over datasets names them all
    comparison = {**meta, "dataset": dataset, **comparison_numbers(runs, meta.get("anytime_range"))}
    comparison["risk_control"] = comparison_rows(runs)  # risk-controlled policies beside the others (if any)
    return write_comparison(out_dir, comparison, manifests)


def render_directory(path: str | Path) -> dict:
    """`eedn report` as a function: re-render a comparison directory or a single run directory from its saved
    files, training and evaluating nothing. Returns ``{"kind": "comparison" | "run", "files": [...],
    "comparison" | "results": ...}``."""
    path = Path(path)
    if not path.is_dir():
        raise EednError(f"no such directory: {path}")
    if (path / COMPARISON).exists():
        try:
            stored = json.loads((path / COMPARISON).read_text())
        except (OSError, ValueError) as exc:
            raise EednError(f"cannot read {path / COMPARISON}: {exc}") from None
        if not isinstance(stored, dict) or "strategies" not in stored or "seeds" not in stored:
            raise EednError(f"{path / COMPARISON} is not an eedn comparison (no strategies/seeds)")
        meta = {k: stored[k] for k in META_KEYS if k in stored} | {"rendered": created_now()}
        comparison = render_comparison(path, meta)
        return {"kind": "comparison", "files": comparison["files"], "comparison": comparison}
    if (path / RESULTS).exists() or (path / MANIFEST).exists():
        results, manifest = read_run(path)
        files = render_run(path, results, manifest)
        return {"kind": "run", "files": files, "results": results | {"run_dir": str(path)}}
    raise EednError(f"{path} holds neither {COMPARISON} (an `eedn compare` directory) nor {RESULTS} (an `eedn run` "
                    "directory)")
