"""How much does a whole JEI-DNN λ sweep cost compared with one backbone pass over the train split?

With a frozen eval-mode backbone the per-exit features are computed once and cached, so every
epoch of every λ trains tiny heads on stored vectors. This script times

  (a) one backbone pass over the train split into a fresh feature cache,
  (b) a full λ sweep (warm-up once, then all λ trained as one stacked model, ``sweep=stacked``, the
      default with cached features) from the warm cache, and
  (c) the same sweep as a loop over λ (``sweep=loop``, the path of uncached profiles),

and prints the times and the ratios (b)/(a) and (c)/(a). The backbone has random weights: the timing
does not depend on them. Usage (docs/method.md, "λ sweeps", quotes its output)::

    python benchmarks/bench_lambda_sweep.py --backbone t2t_vit_7 --dataset digits --epochs 15 --threads 1
    python benchmarks/bench_lambda_sweep.py --backbone resnet20 --dataset image-folder --threads 1 \
        --dataset-option data_dir=cifar10-jpeg-train.tar.gz --dataset-option cache_dir=/tmp/eedn-data
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import eedn  # noqa: E402
from eedn.core.cache import FeatureCache  # noqa: E402
from eedn.core.cost import measure_exit_macs  # noqa: E402
from eedn.train.features import FeatureSource  # noqa: E402
from eedn.train.strategy import FitContext  # noqa: E402

DEFAULT_LAMBDAS = "0.01,0.1,0.3,0.5,0.7,1,1.5,2,3,5"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", default="t2t_vit_7", help="registry name of the backbone (random weights)")
    p.add_argument("--dataset", default="digits", help="registry name of the dataset")
    p.add_argument("--dataset-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a dataset option, e.g. data_dir=/path/cifar10-jpeg-train.tar.gz (repeatable)")
    p.add_argument("--image-size", type=int, default=None, help="default: the dataset's default size")
    p.add_argument("--lambdas", default=DEFAULT_LAMBDAS, help="comma list of λ values (default: 10 values 0.01..5)")
    p.add_argument("--epochs", type=int, default=15, help="JEI epochs per λ, warm-up included")
    p.add_argument("--cache-dir", default=None, help="where the feature cache goes (default: a temporary folder)")
    p.add_argument("--batch-size", type=int, default=256, help="batch size of the backbone pass")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: leave torch's default)")
    p.add_argument("--skip-loop", action="store_true", help="time only the stacked sweep")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    lambdas = eedn.create("strategy", "jei", **{"lambda": args.lambdas}).lambdas
    source = eedn.create("dataset", args.dataset, **dict(o.split("=", 1) for o in args.dataset_option))
    image_size = args.image_size or source.default_image_size
    data = source.splits(image_size, args.seed)
    model = eedn.create_model(args.backbone, num_classes=source.num_classes, image_size=image_size,
                              in_channels=source.channels, gate="jei")
    model.freeze_backbone()
    exit_macs, full_macs = measure_exit_macs(model)

    root = Path(args.cache_dir) if args.cache_dir else Path(tempfile.mkdtemp(prefix="eedn-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(tempfile.mkdtemp(prefix="features-", dir=root))  # fresh: (a) really runs the backbone

    # (a) one backbone pass over the train split, written to the cache
    cold = FeatureSource(model, data, cache=FeatureCache(cache_dir), batch_size=args.batch_size)
    t0, c0 = time.perf_counter(), time.process_time()
    cold.features("train")
    backbone_s, backbone_cpu = time.perf_counter() - t0, time.process_time() - c0
    cold.features("val")  # the sweep also reads val (pos-weights, history); warm it outside the timings

    n_train = cold.num_samples("train")
    print(f"backbone {args.backbone} @ {image_size}px, dataset {args.dataset} "
          f"(train {n_train}, val {cold.num_samples('val')}), exits {model.num_exits}, "
          f"torch threads {torch.get_num_threads()}")
    # CPU time is reported too: on a shared machine the wall clock also measures the neighbours
    print(f"(a) backbone pass over train: {backbone_s:8.2f} s wall {backbone_cpu:8.2f} s CPU")
    snapshot = model.heads_state_dict()
    timings = {"backbone_s": backbone_s, "backbone_cpu_s": backbone_cpu}
    for label, sweep in (("b", "stacked"), ("c", "loop"))[: 1 if args.skip_loop else 2]:
        model.load_heads_state_dict(snapshot)
        # a new source, so features are read back from disk
        warm = FeatureSource(model, data, cache=FeatureCache(cache_dir), batch_size=args.batch_size)
        ctx = FitContext(features=warm, exit_macs=exit_macs, full_macs=full_macs, seed=args.seed)
        strategy = eedn.create("strategy", "jei", **{"lambda": args.lambdas, "epochs": args.epochs, "sweep": sweep})
        t0, c0 = time.perf_counter(), time.process_time()
        result = strategy.fit(model, ctx)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        print(f"({label}) JEI sweep {sweep:>7}, {len(lambdas)} λ x {args.epochs} ep: {wall:8.2f} s wall "
              f"{cpu:8.2f} s CPU ({len(result.settings)} settings)")
        print(f"    ratio sweep / backbone pass:  {wall / backbone_s:8.2f}   wall {cpu / backbone_cpu:8.2f}   CPU")
        timings |= {f"{sweep}_s": wall, f"{sweep}_cpu_s": cpu, f"ratio_{sweep}": wall / backbone_s,
                    f"ratio_{sweep}_cpu": cpu / backbone_cpu}
        if sweep == "stacked":
            last = {h["lambda"]: h for h in result.history if h.get("phase") == "main"}
            for lam in lambdas:
                h = last[lam]
                print(f"  λ={lam:<5g} val gated acc {h['val_gated_accuracy']:.3f}  val MACs fraction "
                      f"{h['val_macs_fraction']:.3f}")
    return timings


if __name__ == "__main__":
    main()
