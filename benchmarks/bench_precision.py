"""Stage-0 training throughput, end to end (data pipeline included), fp32 vs bf16 vs bf16 + channels_last.

Each setting runs the same loop as ``eedn.train.backbone_training.train_backbone`` (batches from
:class:`eedn.core.image_batches.ImageBatches`, autocast forward + loss, backward, SGD step) for ``--steps``
timed steps after ``--warmup`` steps, on one thread by default, and reports images per second and the
ratio to the per-sample PIL pipeline in fp32 (the path before the in-memory pipeline; ``legacy`` row).

    python benchmarks/bench_precision.py --data ../shared/data/cifar10-jpeg-train.tar.gz \\
        --backbones resnet20,resnet56,t2t_vit_7 --steps 30

Without ``--data`` it uses random 32 px images in memory (no decoding), which isolates the model.
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import eedn
from eedn.core.image_batches import ImageBatches, InMemoryImages, RandomCropFlip
from eedn.runtime.precision import apply_memory_format, autocast, to_memory_format

SETTINGS = {"fp32": ("fp32", False), "bf16": ("bf16", False), "bf16+channels_last": ("bf16", True)}


def data_splits(path: str | None, image_size: int, limit: int):
    """(in-memory train view, per-sample train view or None) of the CIFAR-10 image folder, or random images."""
    if path is None:
        g = torch.Generator().manual_seed(0)
        pixels = torch.randint(0, 256, (limit, 3, image_size, image_size), dtype=torch.uint8, generator=g)
        labels = torch.randint(0, 10, (limit,), generator=g)
        return InMemoryImages(pixels, labels, [0.5] * 3, [0.25] * 3, RandomCropFlip(image_size // 8)), None, 10
    t0 = time.perf_counter()
    fast = eedn.create("dataset", "image-folder", data_dir=path).splits(image_size, seed=0)
    print(f"decoded into memory in {time.perf_counter() - t0:.1f} s ({len(fast.train)} train images)")
    lazy = eedn.create("dataset", "image-folder", data_dir=path, in_memory_mb=0).splits(image_size, seed=0)
    return fast.train, lazy.train, fast.num_classes


def time_steps(backbone_name: str, batches, num_classes: int, image_size: int, precision: str, channels_last: bool,
               steps: int, warmup: int) -> float:
    """Images per second of ``steps`` training steps after ``warmup`` ones."""
    torch.manual_seed(0)
    model = eedn.create("backbone", backbone_name, num_classes=num_classes, image_size=image_size, in_channels=3)
    apply_memory_format(model, channels_last)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    it = iter(batches)
    seen, start = 0, None
    for i in range(warmup + steps):
        if i == warmup:
            start, seen = time.perf_counter(), 0
        x, y = next(it)
        x = to_memory_format(x, channels_last)
        with autocast(precision, "cpu"):
            loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        seen += len(y)
    return seen / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="CIFAR-10 image folder or .tar.gz (default: random images)")
    ap.add_argument("--backbones", default="resnet20,resnet56,t2t_vit_7")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n_needed = args.batch_size * (args.steps + args.warmup)
    fast, lazy, num_classes = data_splits(args.data, args.image_size, n_needed)
    rows = []
    for name in args.backbones.split(","):
        results = {}
        if lazy is not None:  # fp32 through the per-sample PIL DataLoader: the path this pipeline replaces
            loader = DataLoader(lazy, batch_size=args.batch_size, shuffle=True,
                                generator=torch.Generator().manual_seed(0), drop_last=True)
            results["legacy fp32 (PIL per sample)"] = time_steps(name, loader, num_classes, args.image_size, "fp32",
                                                                 False, args.steps, args.warmup)
        for label, (precision, cl) in SETTINGS.items():
            batches = ImageBatches(fast, args.batch_size, shuffle=True, generator=torch.Generator().manual_seed(0),
                                   drop_last=True)
            results[label] = time_steps(name, batches, num_classes, args.image_size, precision, cl, args.steps,
                                        args.warmup)
        base = results.get("legacy fp32 (PIL per sample)", results["fp32"])
        for label, ips in results.items():
            rows.append({"backbone": name, "setting": label, "images_per_s": round(ips, 1),
                         "speedup": round(ips / base, 2)})
            print(f"{name:12s} {label:30s} {ips:8.1f} img/s  x{ips / base:.2f}", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "torch": torch.__version__, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
