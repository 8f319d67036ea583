"""The pipeline, as one straight line:

config → every plugin name and option checked → data → backbone (cached or trained) → EarlyExitModel →
strategy.fit → ExitOutputs for val/cal/test (one pass each) → policies and evaluators on those tensors →
run directory (run.json, results.json, weights, outputs, summary, plot).
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from eedn.runtime.version import __version__
from eedn.train.backbone_training import backbone_meta, recipe, train_backbone
from eedn.core.build import build_backbone, build_model
from eedn.core.cache import FeatureCache, cache_key
from eedn.core.config import Config, resolve_config
from eedn.core.contracts import Backbone, Evaluator
from eedn.core.cost import measure_exit_macs
from eedn.core.data import DataSplits
from eedn.runtime.distributed import (agree, barrier, broadcast_object, check_same_config, gather_object,
                                      init_from_env, world)
from eedn.runtime.errors import EednError, warn
from eedn.train.features import FeatureSource, compute_split_outputs
from eedn.core.image_batches import LoaderOptions
from eedn.runtime.io import atomic_torch_save, atomic_write_json
from eedn.core.model import EarlyExitModel
from eedn.core.outputs import ExitOutputs
from eedn.evaluation.matched import OWN_IMS_KEY
from eedn.evaluation.own_ims import threshold_on_own_ims
from eedn.core.plugins import create
from eedn.evaluation.policy import EvaluatedPoint, calibrated_copy, distinct_points, evaluate_point, target_label
from eedn.runtime.precision import apply_memory_format, check_precision, numerics_key, use_channels_last
from eedn.runtime.progress import Progress
from eedn.report.render import format_macs, render_run
from eedn.pipeline.preflight import (check_before_stage_0, check_classes, check_exits, check_splits, dataset_options,
                                     load_cached_backbone)
from eedn.pipeline.rundir import (CONFIG, MANIFEST, OUTPUTS, POLICY_HEADS, RESULTS, RUN_FORMAT, WEIGHTS, check_out_dir,
                         created_now, environment, file_hashes, staged_run_dir, unique_run_name)
from eedn.pipeline.risk_run import risk_control_block
from eedn.train.strategy import FitContext, TrainingStrategy
from eedn.pipeline.tracking import Tracking
from eedn.pipeline.plugin_checks import CheckedPlugins, check_plugins
from eedn.runtime.seeding import seed_everything
from eedn.core.transfer import transfer_summary

SPLITS = ("val", "cal", "test")
#: results.json keys the pipeline writes; an evaluator whose name is one of them keeps its rows only under
#: ``evaluators``
CORE_RESULT_KEYS = ("eedn_version", "config", "dataset", "input", "backbone", "full_macs", "exits", "metrics",
                    "policy", "curve", "strategy", "evaluators", "timings", "environment", "run_dir",
                    "risk_control", "tracking", OWN_IMS_KEY)


def join_ranks(cfg: Config) -> Config:
    """Under torchrun: join the process group, check every rank runs this config, and give each rank its own
    device (``cuda`` → ``cuda:LOCAL_RANK``); a single process is left as it is (eedn.runtime.distributed)."""
    w, device = init_from_env(cfg.device)
    check_same_config(cfg.to_dict())
    return cfg.replace(device=device) if device != cfg.device else cfg


@dataclass
class Prepared:
    """Data, a trained backbone and the run's bookkeeping: what every strategy of a run shares."""

    cfg: Config
    data: DataSplits
    dataset_desc: dict
    image_size: int
    channels: int
    backbone: Backbone
    backbone_info: dict
    cache: FeatureCache
    progress: Progress
    timings: dict = field(default_factory=dict)

    @property
    def input_spec(self) -> dict:
        """How the model's inputs are prepared (run.json's ``input``): what `eedn predict` needs."""
        return {"channels": self.channels, "image_size": self.image_size, "mean": self.data.info.get("mean"),
                "std": self.data.info.get("std"), "class_names": list(self.data.class_names)}


def prepare(cfg: Config, progress: Progress) -> Prepared:
    """Data and backbone for a resolved config (the backbone from the cache when already trained)."""
    checked = check_plugins(cfg)
    cache_writable = check_before_stage_0(cfg, cfg.cache_root)
    check_precision(cfg.precision, cfg.device)
    cfg = join_ranks(cfg)
    assert cfg.dataset is not None and cfg.backbone is not None  # resolve_config names every plugin
    t0 = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    source = create("dataset", cfg.dataset, **dataset_options(cfg, checked.dataset_options))
    check_classes(cfg.dataset, source.num_classes)
    image_size = cfg.image_size or source.default_image_size
    data = source.splits(image_size, seed=cfg.seed, augment=cfg.backbone_training.augment)
    check_splits(cfg.dataset, data)
    dataset_desc = {"name": cfg.dataset, **source.describe(), "image_size": image_size, "seed": cfg.seed}
    timings = {"data_s": time.perf_counter() - t0}

    bb_opts = checked.backbone_options
    backbone = build_backbone(cfg.backbone, source.num_classes, image_size, source.channels, bb_opts)
    check_exits(cfg.backbone, backbone.num_stages)
    ckpt = cfg.backbone_training.checkpoint
    if ckpt:
        adapt = cfg.backbone_training.adapt_input_channels
        note = transfer_summary(backbone.load_pretrained(ckpt, **({"adapt_input_channels": True} if adapt else {})))
        if note:
            progress.log(note)
    backbone = backbone.to(cfg.device)
    channels_last = use_channels_last(cfg.channels_last, backbone)
    apply_memory_format(backbone, channels_last)
    rec = recipe(cfg.backbone_training.to_dict(), source.suggested_backbone_epochs)
    params = sum(p.numel() for p in backbone.parameters())
    init = ckpt or backbone.weights_source  # a checkpoint, or weights the backbone's factory found itself
    info: dict[str, Any] = {"name": cfg.backbone, "display_name": backbone.display_name, "options": bb_opts,
                            "recipe": rec, "parameters": params, "init_checkpoint": init}
    progress.log(f"{cfg.backbone} -> {backbone.display_name}, {format_macs(params)} parameters, "
                 f"{backbone.num_stages} exits; data {cfg.dataset} at {image_size} px "
                 f"({', '.join(f'{k} {v}' for k, v in data.sizes().items())})")
    t1 = time.perf_counter()
    if init and not rec["epochs"]:
        info["source"] = f"checkpoint {init}"
    elif not rec["epochs"]:  # said plainly, and never cached as a trained backbone
        info["source"] = "untrained"
        warn("backbone_training.epochs is 0 and no checkpoint is given: the backbone keeps its random "
             "initialisation (give --backbone-checkpoint or epochs >= 1 for a trained one)")
    else:
        meta = backbone_meta(cfg.backbone, bb_opts, dataset_desc, image_size, cfg.seed,
                             rec | {"init_checkpoint": str(init) if init else None}
                             | numerics_key(cfg.precision, channels_last)
                             | ({"layout": backbone.layout} if getattr(backbone, "layout", None) else {}))
        key = cache_key(**meta)
        agree(key, "backbone cache key")  # under torchrun: the same data and recipe on every rank
        path = cfg.cache_root / "backbones" / f"{cfg.backbone}-{key}.pt"
        info["cache_path"] = str(path)
        summary = cached_backbone_on_every_rank(path, backbone, key)
        if summary is not None:
            info |= {"source": "cache", **summary}
            progress.log(f"backbone loaded from cache: {path}")
        else:
            summary = train_backbone(backbone, data, rec, seed=cfg.seed, device=cfg.device,
                                     checkpoint_path=path if cache_writable else None,
                                     resume=cfg.resume, progress=progress,
                                     precision=cfg.precision, channels_last=channels_last,
                                     loader=LoaderOptions.from_config(cfg), cache_meta=meta)
            info |= {"source": "trained", "val_accuracy": summary["val_accuracy"], "epochs": summary["epochs"],
                     "history": summary["history"]}
    timings["backbone_s"] = time.perf_counter() - t1
    cache = FeatureCache(cfg.cache_root / "features", fp16=cfg.cache_fp16)
    return Prepared(cfg, data, dataset_desc, image_size, source.channels, backbone, info, cache, progress, timings)


def cached_backbone_on_every_rank(path: Path, backbone: Backbone, key: str) -> dict | None:
    """The cached backbone's summary when every rank has a valid entry (loaded into ``backbone``), else None on
    every rank: the ranks agree on hit or miss before stage 0, so none skips the training the others wait in
    (a node-local cache may hold the entry on some nodes only). A rank that loaded it goes back to the initial
    weights, which every rank shares."""
    initial = {k: v.detach().clone() for k, v in backbone.state_dict().items()} if world().active else None
    summary = load_cached_backbone(path, backbone, key)
    hits = gather_object(summary is not None)
    if all(hits):
        return summary
    if any(hits):
        have = ", ".join(str(r) for r, h in enumerate(hits) if h)
        lack = ", ".join(str(r) for r, h in enumerate(hits) if not h)
        if world().main:
            warn(f"the cached backbone {path.name} is valid on rank {have} but not on rank {lack} (a cache that is "
                 "not shared between nodes?); every rank trains it again")
        if initial is not None:
            backbone.load_state_dict(initial)
    return None


def feature_source(prep: Prepared, model: EarlyExitModel, *, cacheable: bool = True,
                   mode: str = "eval") -> FeatureSource:
    cfg = prep.cfg
    return FeatureSource(model, prep.data, device=cfg.device, cache=prep.cache, cacheable=cacheable,
                         backbone_mode=mode, batch_size=cfg.eval_batch_size, dataset_key=prep.dataset_desc,
                         progress=prep.progress, num_workers=cfg.num_workers, precision=cfg.precision,
                         channels_last=use_channels_last(cfg.channels_last, model.backbone),
                         loader=LoaderOptions.from_config(cfg),
                         backbone_key={"name": cfg.backbone, "options": prep.backbone_info["options"]})


def run_strategy(prep: Prepared, strategy_name: str | None = None, strategy_options: dict | None = None,
                 gate: str | None = None, out: str | Path | None = None) -> dict:
    """Fit one strategy on the prepared backbone, evaluate every setting, write the run directory (and tell
    the run's experiment trackers, closed as failed when the run fails)."""
    tracking = Tracking()
    try:
        return _run_strategy(prep, strategy_name, strategy_options, gate, out, tracking)
    except BaseException:
        tracking.close("failed")
        raise


def _run_strategy(prep: Prepared, strategy_name: str | None, strategy_options: dict | None, gate: str | None,
                  out: str | Path | None, tracking: Tracking) -> dict:
    cfg = copy.deepcopy(prep.cfg)
    if strategy_name is not None:  # a comparison gives each strategy its complete options (no tradeoff)
        cfg = cfg.replace(strategy=strategy_name, strategy_options=copy.deepcopy(strategy_options or {}), gate=gate,
                          tradeoff=None)
    if out is not None:
        cfg = cfg.replace(out=str(out))
    checked = check_plugins(cfg)
    assert cfg.strategy is not None  # resolve_config names every plugin
    if cfg.out:
        check_out_dir(cfg.out, cfg.overwrite, cache_root=cfg.cache_root)
    progress = prep.progress
    run_dir = broadcast_object(run_directory(cfg))  # rank 0's name and time stamp on every rank
    if world().main:
        tracking.open(checked.loggers, run_dir, cfg, progress, prep.backbone_info.get("history"))
    head_seed = cfg.seed if cfg.head_seed is None else cfg.head_seed
    seed_everything(head_seed)
    strategy, gate_name, evaluators = checked.strategy, checked.gate, checked.evaluators
    backbone = copy.deepcopy(prep.backbone) if strategy.trains_backbone else prep.backbone
    model = build_model(backbone, gate=gate_name, inference_module=cfg.inference_module,
                        gate_options=checked.gate_options,
                        im_options=checked.im_options).to(cfg.device)
    strategy.prepare_model(model)
    model.freeze_backbone()
    exit_macs, full_macs = measure_exit_macs(model)

    cacheable = strategy.uses_fixed_features
    if not cacheable:
        trains_on = "augmented images" if strategy.head_augment else "a train-mode backbone"
        progress.log(f"strategy '{cfg.strategy}' trains on {trains_on}: "
                     "features cannot be cached, running uncached")
    train_source = feature_source(prep, model, cacheable=cacheable, mode=strategy.backbone_mode)
    ctx = FitContext(features=train_source, exit_macs=exit_macs, full_macs=full_macs, seed=head_seed,
                     device=cfg.device, progress=progress, precision=cfg.precision)
    t0 = time.perf_counter()
    result = strategy.fit(model, ctx)
    fit_s = time.perf_counter() - t0
    if not result.settings:
        raise EednError(f"strategy '{cfg.strategy}' produced no trained setting")
    if strategy.trains_backbone:
        model.freeze_backbone()
    # the training source already holds cached eval-mode features when it was cacheable: reuse it
    eval_source = train_source if cacheable else feature_source(prep, model, cacheable=not strategy.trains_backbone)

    t1 = time.perf_counter()
    outputs: dict[str, dict[str, ExitOutputs]] = {}
    curve: list[dict] = []
    labels = [label for label, _ in result.settings]
    chosen = cfg.policy_setting or labels[0]
    if chosen not in labels:
        raise EednError(f"policy_setting '{chosen}' is not a trained setting; trained: {', '.join(labels)}")
    policy: EvaluatedPoint | None = None
    policy_heads: dict | None = None
    for label, state in result.settings:
        model.load_heads_state_dict(state)
        outs = {s: compute_split_outputs(model, eval_source, s, exit_macs, full_macs, cfg.eval_batch_size)
                for s in SPLITS}
        check_finite_outputs(cfg.strategy, label, outs)
        outputs[label] = outs
        for ev in evaluators.values():
            ev.fit(outs["cal"])
        if model.gate.calibratable:
            sweep, swept = model.gate.budget_sweep(), []
            for target in progress.track(sweep, f"budget sweep ({label})"):
                g = calibrated_copy(model.gate, outs["val"], target)
                name = target_label(target) if len(labels) == 1 else f"{label};{target_label(target)}"
                swept.append(evaluate_point(g, outs["val"], outs["cal"], outs["test"], evaluators, name).point)
            curve += distinct_points(swept)  # budgets that land on the same point are one row
            if label == chosen:
                budget = cfg.budget or DEFAULT_THRESHOLD_BUDGET
                g = calibrated_copy(model.gate, outs["val"], budget)
                policy = evaluate_point(g, outs["val"], outs["cal"], outs["test"], evaluators,
                                        f"{label};{target_label(budget)}")
                model.gate.load_state_dict(g.state_dict())
                policy_heads = model.heads_state_dict()
        else:
            point = evaluate_point(model.gate, outs["val"], outs["cal"], outs["test"], evaluators, label)
            curve.append(point.point)
            if label == chosen and cfg.budget is not None and model.gate.retargetable:
                # one knob for any budget: the trained gate's offset is fitted on val, then every split re-scored
                g = calibrated_copy(model.gate, outs["val"], cfg.budget)
                model.gate.load_state_dict(g.state_dict())
                outs = {s: compute_split_outputs(model, eval_source, s, exit_macs, full_macs, cfg.eval_batch_size)
                        for s in SPLITS}
                outputs[label] = outs
                point = evaluate_point(model.gate, outs["val"], outs["cal"], outs["test"], evaluators,
                                       f"{label};{target_label(cfg.budget)}")
                curve.append(point.point)
            elif label == chosen and cfg.budget is not None:
                warn(f"--budget is ignored: gate '{gate_name}' has no budget knob (neither thresholds nor a "
                     "retargetable offset); its policy is reported as trained")
            if label == chosen:
                policy, policy_heads = point, model.heads_state_dict()
    eval_s = time.perf_counter() - t1
    if len(curve) < 2:
        curve = []

    assert policy is not None and policy_heads is not None  # `chosen` is one of the settings
    test = outputs[chosen]["test"]
    results = assemble_results(cfg, prep, strategy, gate_name, model, test, policy, curve, result.history,
                               evaluators)
    if cfg.risk_control.risk:
        model.load_heads_state_dict(policy_heads)  # the reported setting's gate (thresholds or learned weights)
        results["risk_control"] = risk_control_block(cfg, model.gate, outputs[chosen], evaluators)
    t2 = time.perf_counter()
    if strategy.trains_gate:  # the gate apart from the IMs: thresholds on the same IMs (eedn/evaluation/own_ims.py)
        model.load_heads_state_dict(policy_heads)
        results[OWN_IMS_KEY] = threshold_on_own_ims(outputs, model.gate, chosen)
        for line in learned_gate_warnings(cfg.strategy, chosen, result.history, results[OWN_IMS_KEY]):
            warn(line)
    results["timings"] = prep.timings | {"fit_s": fit_s, "evaluate_s": eval_s,
                                         "own_ims_thresholds_s": time.perf_counter() - t2}
    manifest = build_manifest(cfg, prep, checked, model, test, policy, chosen, labels, exit_macs, full_macs)
    results["environment"] = manifest["environment"]
    if tracking.locations:
        results["tracking"] = tracking.locations
    if world().main:
        write_run(run_dir, cfg, results, manifest, model, outputs,
                  {label: s for label, s in result.settings} | {POLICY_HEADS: policy_heads})
    barrier()
    results["run_dir"] = str(run_dir)
    tracking.finish(results, run_dir)
    progress.log(f"run directory: {run_dir}")
    return results


#: the reported operating point of threshold gates when no budget is given
DEFAULT_THRESHOLD_BUDGET = {"macs_fraction": 0.75}
#: a learned rule that sends at least this share of val samples to exits before its own targets' l* collapses
TOO_EARLY_SHARE = 0.9
#: a learned policy this far below max-prob thresholds on its own IMs, at the same cost, is worth a warning
BELOW_THRESHOLDS = 0.05


def learned_gate_warnings(strategy: str, chosen: str, history: list[dict], own_ims: dict) -> list[str]:
    """One line per sign that a learned exit rule fails its users: it sends >= 90 % of val samples to exits before
    the ones its own targets choose (``val_exits_before_target`` in the strategy's history, at the kept epoch), or
    its test accuracy is > 5 points below max-prob thresholds on its own IMs at the same cost."""
    lines = []
    lam = chosen.split("=", 1)[1] if "=" in chosen else None
    entries = [h for h in history if h.get("phase") == "main" and "val_exits_before_target" in h
               and (lam is None or f"{h.get('lambda'):g}" == lam)]
    kept = [h.get("epoch") for h in history if h.get("phase") == "select" and (lam is None or
                                                                               f"{h.get('lambda'):g}" == lam)]
    at = [h for h in entries if kept and h["epoch"] == kept[-1]] or entries[-1:]
    if at and at[-1]["val_exits_before_target"] >= TOO_EARLY_SHARE:
        lines.append(f"{strategy} [{chosen}] sends {at[-1]['val_exits_before_target']:.0%} of val samples to exits "
                     "before the ones its own gate targets choose (l*): the exit rule collapses early; use a "
                     f"consistent rule (--set strategy_options.exit_rule=cdf, `eedn plugins {strategy}`)")
    for row in own_ims.get("at_gate_cost", []):
        diff = row.get("gate_minus_threshold")
        if row.get("setting") == chosen and diff is not None and diff < -BELOW_THRESHOLDS:
            lines.append(f"{strategy} [{chosen}] is {-100 * diff:.1f} points below {own_ims.get('gate')} thresholds "
                         f"on its own IMs at the same cost ({row['macs_fraction']:.3f} of full MACs): use thresholds "
                         "on these IMs (the threshold_on_own_ims curve), or try --set "
                         "gate_options.gate_features=history")
    return lines


def assemble_results(cfg: Config, prep: Prepared, strategy: TrainingStrategy, gate_name: str, model: EarlyExitModel,
                     test: ExitOutputs, policy: EvaluatedPoint, curve: list[dict], history: list[dict],
                     evaluators: dict[str, Evaluator]) -> dict:
    """results.json: every number of the run. Operating points (``policy`` and ``curve`` entries) share one
    shape; ``metrics`` says how to show each evaluator headline number they carry."""
    acc = test.exit_accuracy()
    metrics = {key: m.to_dict() | {"evaluator": name} for name, ev in evaluators.items()
               for key, m in ev.headline_metrics().items()}
    results = {
        "eedn_version": __version__,
        "config": cfg.to_dict(),
        "dataset": {"name": cfg.dataset, "num_classes": model.num_classes, "sizes": prep.data.sizes(),
                    "image_size": prep.image_size, "class_names": list(prep.data.class_names),
                    "mean": prep.data.info.get("mean"), "std": prep.data.info.get("std")},
        "backbone": prep.backbone_info | {"test_accuracy": float(acc[-1])},
        "full_macs": test.full_macs,
        "exits": [{"index": i, "macs": float(test.exit_macs[i]), "accuracy": float(acc[i])}
                  for i in range(test.num_exits)],
        "metrics": metrics,
        "policy": {"name": f"{cfg.strategy}+{gate_name}", "strategy": cfg.strategy, "gate": gate_name}
                  | policy.point | {"details": policy.details},
        "curve": curve,
        "strategy": {"name": cfg.strategy, "options": strategy.describe(), "history": history},
        "evaluators": {name: {"options": ev.options.as_dict(), "rows": policy.rows[name]}
                       for name, ev in evaluators.items()},
    }
    for name, rows in policy.rows.items():
        if rows and name not in CORE_RESULT_KEYS:
            results[name] = rows  # also at the top level under the evaluator's name, e.g. results["conformal"]
    return results


def build_manifest(cfg: Config, prep: Prepared, checked: CheckedPlugins, model: EarlyExitModel, test: ExitOutputs,
                   policy: EvaluatedPoint, chosen: str, labels: list[str], exit_macs: list[int],
                   full_macs: int) -> dict:
    """run.json: the model spec, input preparation, environment and the policy's test decisions."""
    logits = test.gated_logits(policy.exit_test).float()
    confidence, prediction = logits.softmax(-1).max(-1)
    bb = prep.backbone
    return {
        "format": RUN_FORMAT,
        "created": created_now(),
        "environment": environment(cfg.device, world().size),
        "model": {
            "backbone": {"name": cfg.backbone, "options": prep.backbone_info["options"],
                         "display_name": bb.display_name, "num_classes": bb.num_classes,
                         "image_size": prep.image_size, "in_channels": prep.channels,
                         "parameters": prep.backbone_info["parameters"]},
            "inference_module": {"name": cfg.inference_module, "options": checked.im_options},
            "gate": {"name": checked.gate, "options": checked.gate_options},
            "strategy": {"name": cfg.strategy, "options": checked.strategy_options},
            "num_exits": model.num_exits,
            "feature_dims": list(bb.feature_dims),
            "exit_macs": [float(m) for m in exit_macs],
            "full_macs": float(full_macs),
        },
        "input": prep.input_spec,
        "settings": labels,
        "policy": {
            "name": f"{cfg.strategy}+{checked.gate}", "trained_setting": chosen, "setting": policy.point["setting"],
            "gate_setting": policy.point["gate_setting"],
            "test": {"exit_index": policy.exit_test.tolist(), "prediction": prediction.tolist(),
                     "confidence": [round(float(c), 7) for c in confidence], "label": test.labels.tolist()},
        },
        "files": {"results": RESULTS, "weights": WEIGHTS, "outputs": OUTPUTS, "config": CONFIG},
    }


def check_finite_outputs(strategy: str, setting: str, outputs: dict[str, ExitOutputs]) -> None:
    """A diverged model (NaN / inf logits or gate scores) stops the run: it is never reported as a result."""
    for split, out in outputs.items():
        if not (torch.isfinite(out.logits).all() and torch.isfinite(out.gate_scores).all()):
            raise EednError(f"strategy '{strategy}' setting {setting}: the trained model gives non-finite outputs "
                            f"on {split}; training diverged, nothing was written. Lower the learning rate "
                            "(strategy_options.lr or backbone_training.lr) and run again")


def run_directory(cfg: Config) -> Path:
    if cfg.out:
        return Path(cfg.out)
    return Path("runs") / unique_run_name(f"{cfg.dataset}-{cfg.backbone}-{cfg.strategy}-s{cfg.seed}")


def write_run(run_dir: Path, cfg: Config, results: dict, manifest: dict, model: EarlyExitModel,
              outputs: dict[str, dict[str, ExitOutputs]], heads: dict[str, dict]) -> None:
    """Everything a later `eedn report` / `predict` / `bench` / `compare` needs, written into a temporary
    sibling renamed into place at the end: a killed run leaves no half-written run directory."""
    with staged_run_dir(run_dir, cfg.overwrite) as staging:
        atomic_write_json(staging / CONFIG, cfg.to_dict())
        atomic_torch_save({"backbone": model.backbone.state_dict(), "heads": heads}, staging / WEIGHTS)
        atomic_torch_save({label: {s: o.to_dict() for s, o in outs.items()} for label, outs in outputs.items()},
                          staging / OUTPUTS)
        atomic_write_json(staging / RESULTS, results)
        # run.json last: it records the SHA-256 of every file a reader loads (checked by every later load)
        manifest["files"] = dict(manifest["files"], sha256=file_hashes(staging))
        atomic_write_json(staging / MANIFEST, manifest)
        render_run(staging, results, manifest)


def run_pipeline(config: dict | Config | None = None, sets: list[str] | None = None, progress: Progress | None = None,
                 **overrides: Any) -> dict:
    """``eedn run`` as a function: resolve the config, prepare data and backbone, fit, evaluate, write."""
    cfg = resolve_config(config, sets, **overrides)
    progress = progress or Progress(enabled=False)
    with progress.session():
        prep = prepare(cfg, progress)
        return run_strategy(prep)
