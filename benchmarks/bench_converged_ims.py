"""Per-exit test accuracy of each strategy's IMs against a converged linear probe on the same cached features.

The probe (:mod:`eedn.train.probe`: standardised features, L-BFGS, weight decay 1e-4, val-CE early stopping) is
the bar a linear IM on a frozen backbone can reach; the table shows, per exit, how far each strategy's trained IMs
are from it. Every strategy runs on one prepared backbone (trained or loaded from the cache once). Usage::

    python benchmarks/bench_converged_ims.py --backbone resnet                       # digits, the defaults
    python benchmarks/bench_converged_ims.py --backbone resnet --runs "im-only;im-only:profile=paper-compat"
    python benchmarks/bench_converged_ims.py --cached-backbone CACHE/backbones/fast_cifar-KEY.pt \
        --cached-features CACHE/features        # a backbone cached by another run, and its cached features

``--runs`` is a ``;``-separated list of ``STRATEGY[:OPTION=VALUE,...]`` (JEI gets ``lambda=0.5`` unless given).
"""
from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from eedn.core.build import build_backbone, build_model
from eedn.core.cache import FeatureSet, state_dict_hash
from eedn.core.data import DataSplits
from eedn.core.config import load_config_file, resolve_config
from eedn.core.cost import measure_exit_macs
from eedn.core.plugins import create
from eedn.pipeline.run import feature_source, prepare, seed_everything
from eedn.runtime.progress import Progress
from eedn.train.features import FeatureSource, compute_split_outputs
from eedn.train.probe import probe_exits
from eedn.train.strategy import FitContext

DEFAULT_RUNS = "im-only;im-only:profile=paper-compat;jei;jei:profile=paper-compat,backbone_mode=eval,head_augment=false;sdn;sdn:profile=paper-compat"


def parse_runs(text: str) -> list[tuple[str, str, dict]]:
    runs = []
    for item in filter(None, (s.strip() for s in text.split(";"))):
        name, _, rest = item.partition(":")
        opts: dict = {}
        for pair in filter(None, rest.split(",")):
            key, _, value = pair.partition("=")
            opts[key.strip()] = value.strip()
        runs.append((item, name.strip(), opts))
    return runs


class CachedFeatures(FeatureSource):
    """Every split's features from cache files alone (no dataset, no backbone pass)."""

    def __init__(self, model, sets: dict[str, FeatureSet], name: str):
        super().__init__(model, DataSplits(name, int(sets["train"].labels.max()) + 1, None, None, None, None))
        self._memory = dict(sets)

    def num_samples(self, split: str) -> int:
        return len(self._memory[split])


def load_cached(backbone_file: str, features_dir: str) -> tuple:
    """The backbone stored in ``backbone_file`` (eedn's backbone cache) and the cached features its weights
    produced (matched by the weights hash in each file's meta)."""
    import glob

    blob = torch.load(backbone_file, map_location="cpu", weights_only=True)
    sets, meta = {}, None
    for path in glob.glob(os.path.join(features_dir, "features-*.pt")):
        f = torch.load(path, map_location="cpu", weights_only=True)
        m = f.get("meta", {})
        if m.get("transform") == "eval":
            sets.setdefault(m["weights"], {})[m["split"]] = (FeatureSet(f["feats"], f["labels"]), m)
    for weights, splits in sets.items():
        if {"train", "val", "test"} <= set(splits):
            meta = splits["train"][1]
            bb = build_backbone(meta["backbone"]["name"], int(splits["train"][0].labels.max()) + 1,
                                meta["dataset"].get("image_size", 32), meta["dataset"].get("channels", 3),
                                meta["backbone"]["options"])
            bb.load_state_dict(blob["model"])
            if state_dict_hash(bb) == weights:
                return bb.eval(), {s: fs for s, (fs, _) in splits.items()}, meta["dataset"]["name"]
    raise SystemExit(f"no cached train/val/test features of {backbone_file} in {features_dir}")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None)
    p.add_argument("--set", dest="sets", action="append", default=[])
    p.add_argument("--backbone", default="resnet")
    p.add_argument("--runs", default=DEFAULT_RUNS)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="write the table as JSON here")
    p.add_argument("--cached-backbone", default=None, help="a backbone file of eedn's cache (with --cached-features)")
    p.add_argument("--cached-features", default=None, help="the cache's features/ folder holding its features")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.cached_backbone:
        backbone, sets, dataset = load_cached(args.cached_backbone, args.cached_features)
        seed = 0

        def source_for(model):
            return CachedFeatures(model, sets, dataset)
    else:
        base = load_config_file(args.config) if args.config else {}
        cfg = resolve_config(base, args.sets, backbone=args.backbone, threads=args.threads)
        prep = prepare(cfg, Progress(False))
        backbone, dataset, seed = prep.backbone, cfg.dataset, cfg.seed

        def source_for(model):
            return feature_source(prep, model)
    rows: dict[str, list[float]] = {}
    timings: dict[str, float] = {}
    probe_model = build_model(backbone, gate="max_prob", inference_module="linear")
    source = source_for(probe_model)
    train, val, test = (source.features(s) for s in ("train", "val", "test"))
    t0 = time.perf_counter()
    g = len(probe_model.ims)
    probes = probe_exits(train.feats[:g], train.labels, backbone.num_classes,
                         val=(val.feats[:g], val.labels))
    timings["linear probe"] = time.perf_counter() - t0
    rows["linear probe"] = [100 * pr.accuracy(test.feats[l], test.labels) for l, pr in enumerate(probes)]
    for label, name, opts in parse_runs(args.runs):
        if name == "jei":
            opts.setdefault("lambda", "0.5")
        seed_everything(seed)
        strategy = create("strategy", name, **opts)
        model = build_model(backbone, gate=strategy.default_gate or "max_prob", inference_module="linear")
        strategy.prepare_model(model)
        model.freeze_backbone()
        exit_macs, full_macs = measure_exit_macs(model)
        src = source_for(model)
        ctx = FitContext(features=src, exit_macs=exit_macs, full_macs=full_macs, seed=seed)
        t0 = time.perf_counter()
        result = strategy.fit(model, ctx)
        timings[label] = time.perf_counter() - t0
        model.load_heads_state_dict(result.settings[0][1])
        out = compute_split_outputs(model, src, "test", exit_macs, full_macs)
        rows[label] = [100 * float(a) for a in out.exit_accuracy()[:g]]
    width = max(len(k) for k in rows)
    print(f"| {'heads':<{width}} | " + " | ".join(f"exit {l}" for l in range(g)) + " | fit s |")
    print("|" + "-" * (width + 2) + "|" + "---|" * (g + 1))
    for k, accs in rows.items():
        print(f"| {k:<{width}} | " + " | ".join(f"{a:5.1f}" for a in accs) + f" | {timings.get(k, 0):.1f} |")
    table = {"rows": rows, "fit_s": timings, "backbone": type(backbone).__name__, "dataset": dataset}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(table, fh, indent=1)
    return table


if __name__ == "__main__":
    main()
