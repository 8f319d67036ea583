"""Per-exit test accuracy of each strategy's IMs against a converged linear probe on the same cached features.

The probe (:mod:`eedn.train.probe`: standardised features, L-BFGS, weight decay 1e-4, val-CE early stopping) is
the bar a linear IM on a frozen backbone can reach; the table shows, per exit, how far each strategy's trained IMs
are from it. Every strategy runs on one prepared backbone (trained or loaded from the cache once). Usage::

    python benchmarks/bench_converged_ims.py --backbone resnet                       # digits, the defaults
    python benchmarks/bench_converged_ims.py --backbone resnet --runs "im-only;im-only:profile=paper-compat"
    EEDN_CACHE=/work/cache python benchmarks/bench_converged_ims.py --set dataset=image-folder ...

``--runs`` is a ``;``-separated list of ``STRATEGY[:OPTION=VALUE,...]`` (JEI gets ``lambda=0.5`` unless given).
"""
from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from eedn.core.build import build_model
from eedn.core.config import load_config_file, resolve_config
from eedn.core.cost import measure_exit_macs
from eedn.core.plugins import create
from eedn.pipeline.run import feature_source, prepare, seed_everything
from eedn.runtime.progress import Progress
from eedn.train.features import compute_split_outputs
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


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None)
    p.add_argument("--set", dest="sets", action="append", default=[])
    p.add_argument("--backbone", default="resnet")
    p.add_argument("--runs", default=DEFAULT_RUNS)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="write the table as JSON here")
    args = p.parse_args(argv)
    base = load_config_file(args.config) if args.config else {}
    cfg = resolve_config(base, args.sets, backbone=args.backbone, threads=args.threads)
    torch.set_num_threads(args.threads)
    prep = prepare(cfg, Progress(False))
    rows: dict[str, list[float]] = {}
    timings: dict[str, float] = {}
    probe_model = build_model(prep.backbone, gate="max_prob", inference_module="linear")
    source = feature_source(prep, probe_model)
    train, val, test = (source.features(s) for s in ("train", "val", "test"))
    t0 = time.perf_counter()
    g = len(probe_model.ims)
    probes = probe_exits(train.feats[:g], train.labels, prep.backbone.num_classes,
                         val=(val.feats[:g], val.labels))
    timings["probe"] = time.perf_counter() - t0
    rows["linear probe"] = [100 * pr.accuracy(test.feats[l], test.labels) for l, pr in enumerate(probes)]
    for label, name, opts in parse_runs(args.runs):
        if name == "jei":
            opts.setdefault("lambda", "0.5")
        seed_everything(cfg.seed)
        strategy = create("strategy", name, **opts)
        model = build_model(prep.backbone, gate=strategy.default_gate or "max_prob", inference_module="linear")
        strategy.prepare_model(model)
        model.freeze_backbone()
        exit_macs, full_macs = measure_exit_macs(model)
        src = feature_source(prep, model)
        ctx = FitContext(features=src, exit_macs=exit_macs, full_macs=full_macs, seed=cfg.seed)
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
    table = {"rows": rows, "fit_s": timings, "backbone": cfg.backbone, "dataset": cfg.dataset}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(table, fh, indent=1)
    return table


if __name__ == "__main__":
    main()
