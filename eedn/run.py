"""The pipeline, as one straight line:

config → registry lookups → data → backbone (cached or trained) → EarlyExitModel → strategy.fit →
ExitOutputs for val/cal/test (one pass each) → policies and evaluators on those tensors →
results.json, summary.md, plot, resolved config.
"""
from __future__ import annotations

import copy
import random
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

import eedn
from eedn.cost import measure_exit_macs
from eedn.backbone_training import backbone_key, recipe, train_backbone
from eedn.cache import FeatureCache
from eedn.config import cache_dir, resolve_config
from eedn.contracts import Backbone, TrainingStrategy
from eedn.data import DataSplits
from eedn.errors import EednError
from eedn.io import atomic_torch_save, atomic_write_json, load_checkpoint
from eedn.model import EarlyExitModel, build_model
from eedn.outputs import ExitOutputs
from eedn.plugins import create
from eedn.policy import calibrated_copy, evaluate_point, target_label
from eedn.progress import Progress
from eedn.training import FeatureSource, FitContext, compute_split_outputs

SPLITS = ("val", "cal", "test")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Prepared:
    """Data, a trained backbone and the run's bookkeeping: what every strategy of a run shares."""

    cfg: dict
    data: DataSplits
    dataset_desc: dict
    image_size: int
    backbone: Backbone
    backbone_info: dict
    cache: FeatureCache
    progress: Progress
    timings: dict = field(default_factory=dict)


def prepare(cfg: dict, progress: Progress) -> Prepared:
    """Data and backbone for a resolved config (the backbone from the cache when already trained)."""
    t0 = time.perf_counter()
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    seed_everything(cfg["seed"])
    source = create("dataset", cfg["dataset"], **cfg["dataset_options"])
    image_size = cfg["image_size"] or source.default_image_size
    data = source.splits(image_size, seed=cfg["seed"], augment=cfg["backbone_training"]["augment"])
    dataset_desc = {"name": cfg["dataset"], **source.describe(), "image_size": image_size, "seed": cfg["seed"]}
    timings = {"data_s": time.perf_counter() - t0}

    bb_opts = source.backbone_defaults(cfg["backbone"]) | dict(cfg["backbone_options"])
    ckpt = cfg["backbone_training"].get("checkpoint")
    if ckpt:
        bb_opts["checkpoint"] = ckpt
    backbone = create("backbone", cfg["backbone"], num_classes=source.num_classes, image_size=image_size,
                      in_channels=source.channels, **bb_opts).to(cfg["device"])
    rec = recipe(cfg["backbone_training"], getattr(source, "suggested_backbone_epochs", 30))
    info: dict[str, Any] = {"name": cfg["backbone"], "options": bb_opts, "recipe": rec,
                            "parameters": sum(p.numel() for p in backbone.parameters())}
    t1 = time.perf_counter()
    if ckpt and not rec["epochs"]:
        info["source"] = f"checkpoint {ckpt}"
    else:
        key = backbone_key(cfg["backbone"], bb_opts, dataset_desc, image_size, cfg["seed"], rec)
        path = cache_dir(cfg) / "backbones" / f"{cfg['backbone']}-{key}.pt"
        info["cache_path"] = str(path)
        if path.exists():
            blob = load_checkpoint(path)
            backbone.load_state_dict(blob["model"])
            info |= {"source": "cache", **blob.get("summary", {})}
            progress.log(f"backbone loaded from cache: {path}")
        else:
            summary = train_backbone(backbone, data, rec, seed=cfg["seed"], device=cfg["device"],
                                     checkpoint_path=path, resume=cfg["resume"], progress=progress,
                                     num_workers=cfg["num_workers"])
            info |= {"source": "trained", "val_accuracy": summary["val_accuracy"], "epochs": summary["epochs"]}
    timings["backbone_s"] = time.perf_counter() - t1
    cache = FeatureCache(cache_dir(cfg) / "features", fp16=bool(cfg["cache_fp16"]))
    return Prepared(cfg, data, dataset_desc, image_size, backbone, info, cache, progress, timings)


def make_strategy(cfg: dict) -> TrainingStrategy:
    return create("strategy", cfg["strategy"], **cfg["strategy_options"])


def feature_source(prep: Prepared, model: EarlyExitModel, *, cacheable: bool = True, mode: str = "eval") -> FeatureSource:
    cfg = prep.cfg
    return FeatureSource(model, prep.data, device=cfg["device"], cache=prep.cache, cacheable=cacheable,
                         backbone_mode=mode, batch_size=cfg["eval_batch_size"], dataset_key=prep.dataset_desc,
                         progress=prep.progress, num_workers=cfg["num_workers"])


def run_strategy(prep: Prepared, strategy_name: str | None = None, strategy_options: dict | None = None,
                 gate: str | None = None, out: str | Path | None = None) -> dict:
    """Fit one strategy on the prepared backbone, evaluate every setting, write the run directory."""
    cfg = copy.deepcopy(prep.cfg)
    if strategy_name is not None:
        cfg["strategy"] = strategy_name
        cfg["strategy_options"] = strategy_options or {}
        cfg["gate"] = gate
    if out is not None:
        cfg["out"] = str(out)
    progress = prep.progress
    seed_everything(cfg["seed"])
    strategy = make_strategy(cfg)
    gate_name = cfg["gate"] or strategy.default_gate
    backbone = copy.deepcopy(prep.backbone) if strategy.trains_backbone else prep.backbone
    model = build_model(backbone, gate=gate_name, inference_module=cfg["inference_module"],
                        gate_options=cfg["gate_options"]).to(cfg["device"])
    strategy.prepare_model(model)
    model.freeze_backbone()
    exit_macs, full_macs = measure_exit_macs(model)

    cacheable = not (strategy.trains_backbone or strategy.head_augment or strategy.backbone_mode != "eval")
    if not cacheable:
        progress.log(f"strategy '{cfg['strategy']}' trains on {'augmented images' if strategy.head_augment else 'a train-mode backbone'}: "
                     "features cannot be cached, running uncached")
    train_source = feature_source(prep, model, cacheable=cacheable, mode=strategy.backbone_mode)
    ctx = FitContext(features=train_source, exit_macs=exit_macs, full_macs=full_macs, seed=cfg["seed"],
                     device=cfg["device"], progress=progress, options=cfg)
    t0 = time.perf_counter()
    result = strategy.fit(model, prep.data, ctx)
    fit_s = time.perf_counter() - t0
    if not result.settings:
        raise EednError(f"strategy '{cfg['strategy']}' produced no trained setting")
    if strategy.trains_backbone:
        model.freeze_backbone()
    # the training source already holds cached eval-mode features when it was cacheable: reuse it
    eval_source = train_source if cacheable else feature_source(prep, model, cacheable=not strategy.trains_backbone)

    evaluators = {name: create("evaluator", name, **cfg["evaluator_options"].get(name, {}))
                  for name in cfg["evaluators"]}
    t1 = time.perf_counter()
    outputs: dict[str, dict[str, ExitOutputs]] = {}
    curve: list[dict] = []
    labels = [label for label, _ in result.settings]
    chosen = cfg["policy_setting"] or labels[0]
    if chosen not in labels:
        raise EednError(f"policy_setting '{chosen}' is not a trained setting; trained: {', '.join(labels)}")
    policy_point, policy_heads = None, None
    for label, state in result.settings:
        model.load_heads_state_dict(state)
        outs = {s: compute_split_outputs(model, eval_source, s, exit_macs, full_macs, cfg["eval_batch_size"])
                for s in SPLITS}
        outputs[label] = outs
        if model.gate.calibratable:
            sweep = model.gate.budget_sweep()
            for target in progress.track(sweep, f"budget sweep ({label})"):
                g = calibrated_copy(model.gate, outs["val"], target)
                name = target_label(target) if len(labels) == 1 else f"{label};{target_label(target)}"
                curve.append(evaluate_point(g, outs["val"], outs["cal"], outs["test"], evaluators, name))
            if label == chosen:
                g = calibrated_copy(model.gate, outs["val"], cfg["budget"])
                policy_point = evaluate_point(g, outs["val"], outs["cal"], outs["test"], evaluators,
                                              f"{label};{target_label(cfg['budget'])}")
                model.gate.load_state_dict(g.state_dict())
                policy_heads = model.heads_state_dict()
        else:
            point = evaluate_point(model.gate, outs["val"], outs["cal"], outs["test"], evaluators, label)
            curve.append(point)
            if label == chosen:
                policy_point, policy_heads = point, model.heads_state_dict()
    eval_s = time.perf_counter() - t1
    if len(curve) < 2:
        curve = []

    test = outputs[chosen]["test"]
    results = assemble_results(cfg, prep, strategy, gate_name, model, test, policy_point, curve, result.history)
    results["timings"] = prep.timings | {"fit_s": fit_s, "evaluate_s": eval_s}
    run_dir = run_directory(cfg)
    write_run(run_dir, cfg, results, model, outputs, {label: s for label, s in result.settings} | {"__policy__": policy_heads})
    results["run_dir"] = str(run_dir)
    return results


def assemble_results(cfg: dict, prep: Prepared, strategy: TrainingStrategy, gate_name: str, model: EarlyExitModel,
                     test: ExitOutputs, policy_point: dict, curve: list[dict], history: list[dict]) -> dict:
    acc = test.exit_accuracy()
    point = {k: v for k, v in policy_point.items() if k != "gate"}
    policy = {"name": f"{cfg['strategy']}+{gate_name}", "strategy": cfg["strategy"], "gate": gate_name,
              "gate_setting": policy_point.get("gate")} | point
    if "calibration" in policy_point:
        policy["ece"] = policy_point["calibration"].get("ece")
    results = {
        "eedn_version": eedn.__version__,
        "config": cfg,
        "dataset": {"name": cfg["dataset"], "num_classes": model.num_classes, "sizes": prep.data.sizes(),
                    "image_size": prep.image_size, "class_names": list(prep.data.class_names),
                    "mean": prep.data.info.get("mean"), "std": prep.data.info.get("std")},
        "backbone": prep.backbone_info | {"test_accuracy": float(acc[-1])},
        "full_macs": test.full_macs,
        "exits": [{"index": i, "macs": float(test.exit_macs[i]), "accuracy": float(acc[i])}
                  for i in range(test.num_exits)],
        "policy": policy,
        "curve": [summarize_point(p) for p in curve],
        "strategy": {"name": cfg["strategy"], "options": strategy.describe(), "history": history},
    }
    if "conformal" in policy_point:
        results["conformal"] = flatten_conformal(policy_point["conformal"])
    return results


def flatten_conformal(metrics: dict) -> list[dict]:
    """Conformal rows {alpha, method, variant, coverage, mean_set_size} via the evaluator's own helper."""
    import importlib

    module = importlib.import_module(eedn.registry("evaluator").get("conformal").factory.__module__)
    flatten = getattr(module, "flatten_for_results", None)
    return flatten(metrics) if flatten else metrics.get("results", [])


def summarize_point(point: dict) -> dict:
    """The curve entry kept in results.json: cost/accuracy, the gate setting, headline ECE and conformal rows."""
    out = {k: point[k] for k in ("setting", "accuracy", "mean_macs", "macs_fraction", "exit_fractions")}
    out["val"] = point.get("val")
    out["gate_setting"] = point.get("gate")
    if "calibration" in point:
        out["ece"] = point["calibration"].get("ece")
        out["ece_scaled"] = point["calibration"].get("scaled", {}).get("ece")
    if "conformal" in point:
        out["conformal"] = flatten_conformal(point["conformal"])
    return out


def run_directory(cfg: dict) -> Path:
    if cfg["out"]:
        return Path(cfg["out"])
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{cfg['dataset']}-{cfg['backbone']}-{cfg['strategy']}-s{cfg['seed']}-{stamp}"


def write_run(run_dir: Path, cfg: dict, results: dict, model: EarlyExitModel,
              outputs: dict[str, dict[str, ExitOutputs]], heads: dict[str, dict]) -> None:
    """Everything a later `eedn report` / `predict` / `bench` needs; results.json is written last."""
    from eedn.report import render_report

    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / "config.json", cfg)
    atomic_torch_save({"backbone": model.backbone.state_dict(), "heads": heads}, run_dir / "model.pt")
    atomic_torch_save({label: {s: o.to_dict() for s, o in outs.items()} for label, outs in outputs.items()},
                      run_dir / "outputs.pt")
    atomic_write_json(run_dir / "results.json", results)
    render_report(run_dir, results)


def run_pipeline(config: dict | None = None, sets: list[str] | None = None, progress: Progress | None = None,
                 **overrides: Any) -> dict:
    """``eedn run`` as a function: resolve the config, prepare data and backbone, fit, evaluate, write."""
    cfg = resolve_config(config, sets, **overrides)
    progress = progress or Progress(enabled=False)
    with progress.session():
        prep = prepare(cfg, progress)
        return run_strategy(prep)


def load_run(run_dir: str | Path, setting: str = "__policy__") -> tuple[EarlyExitModel, dict]:
    """Rebuild a trained model from a run directory (backbone, IMs, gate in the policy's setting)."""
    run_dir = Path(run_dir)
    if not (run_dir / "results.json").exists():
        raise EednError(f"{run_dir} is not a finished eedn run directory (no results.json)")
    import json

    results = json.loads((run_dir / "results.json").read_text())
    cfg = results["config"]
    blob = load_checkpoint(run_dir / "model.pt")
    source = create("dataset", cfg["dataset"], **cfg["dataset_options"])
    image_size = results["dataset"]["image_size"]
    bb_opts = {k: v for k, v in results["backbone"]["options"].items() if k != "checkpoint"}
    backbone = create("backbone", cfg["backbone"], num_classes=source.num_classes, image_size=image_size,
                      in_channels=source.channels, **bb_opts)
    backbone.load_state_dict(blob["backbone"])
    strategy = make_strategy(cfg)
    model = build_model(backbone, gate=results["policy"]["gate"], inference_module=cfg["inference_module"],
                        gate_options=cfg["gate_options"])
    strategy.prepare_model(model)
    if setting not in blob["heads"]:
        raise EednError(f"setting '{setting}' not in {run_dir}; saved: {', '.join(blob['heads'])}")
    model.load_heads_state_dict(blob["heads"][setting])
    model.freeze_backbone()
    return model.eval(), results
