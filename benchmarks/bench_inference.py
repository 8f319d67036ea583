"""Does real early-exit inference save as much wall-clock time as it saves MACs?

Times the plain backbone against :class:`eedn.deploy.inference.EarlyExitEngine` at several batch sizes with
:func:`eedn.deploy.bench.benchmark` (the function behind ``eedn bench``) and prints MAC speed-up, wall
speed-up and their ratio, the *realisation*. Two sources of a model, neither trains anything:

* ``--run-dir RUN``: a finished ``eedn run`` directory (its model and policy), timed on image files
  (``--input PATH``, preprocessed like ``eedn predict``) or, without ``--input``, on the test split of
  the run's dataset rebuilt through the library (``eedn.load_dataset``: the data must still be there);
* ``--backbone NAME --image-size S``: random weights and random images, with a max-probability gate
  calibrated on those images to given exit shares (``--exit-shares``, default: equal shares), so
  exits are spread however the untrained heads score. Timing does not depend on the weights, only
  on how many rows leave where, which the shares fix.

Usage::

    python benchmarks/bench_inference.py --run-dir /tmp/bench_run --threads 1
    python benchmarks/bench_inference.py --run-dir /tmp/bench_run --input photos/ --batch-sizes 1,32
    python benchmarks/bench_inference.py --backbone resnet18 --image-size 224 --samples 256 \\
        --batch-sizes 256 --threads 2
"""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import eedn  # noqa: E402
from eedn.deploy.bench import parse_batch_sizes, print_benchmark, torch_threads  # noqa: E402
from eedn.runtime.io import atomic_write_json  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", help="a finished `eedn run` directory")
    p.add_argument("--input", action="append", metavar="PATH",
                   help="with --run-dir: image file or folder to time (repeatable; default: the run's test split)")
    p.add_argument("--backbone", help="instead of a run: a registry backbone with random weights")
    p.add_argument("--image-size", type=int, default=224, help="with --backbone (default 224)")
    p.add_argument("--num-classes", type=int, default=10, help="with --backbone")
    p.add_argument("--samples", type=int, default=256, help="with --backbone: random images to time")
    p.add_argument("--exit-shares", default="equal",
                   help="with --backbone: comma list of E exit shares (final exit included) or 'equal'")
    p.add_argument("--batch-sizes", default="1,32,256")
    p.add_argument("--max-samples", type=int, default=None, help="with --run-dir: first N images")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds; each batch keeps its best")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", dest="json_out", help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    if bool(args.run_dir) == bool(args.backbone):
        p.error("give exactly one of --run-dir and --backbone")
    if args.input and not args.run_dir:
        p.error("--input goes with --run-dir")
    return args


def synthetic_model(args: argparse.Namespace) -> tuple[eedn.EarlyExitModel, torch.Tensor, list[int], int]:
    """Random-weight model + random images, with the max_prob gate fitted to the requested shares."""
    torch.manual_seed(args.seed)
    model = eedn.create_model(args.backbone, num_classes=args.num_classes, image_size=args.image_size,
                              in_channels=3, gate="max_prob").eval()
    x = torch.randn(args.samples, 3, args.image_size, args.image_size)
    e = model.num_exits
    shares = [1.0] * e if args.exit_shares == "equal" else [float(s) for s in args.exit_shares.split(",")]
    exit_macs, full_macs = eedn.measure_exit_macs(model)
    with torch.inference_mode(), torch_threads(args.threads):
        logits = torch.cat([model(xb) for xb in x.split(64)])
        scores = model.gate_scores(logits)
    outputs = eedn.ExitOutputs(logits, torch.zeros(len(x), dtype=torch.long), scores,
                               torch.tensor(exit_macs, dtype=torch.float64), float(full_macs))
    model.gate = eedn.calibrate_gate(model.gate, outputs, {"exit_shares": shares})
    return model, x, exit_macs, full_macs


def run_images(args: argparse.Namespace):
    """The images to time a run directory on: ``--input`` files (a tensor), else its dataset's test split."""
    if args.input:
        return eedn.read_images(args.run_dir, args.input)[1]
    results = eedn.read_results(args.run_dir)
    cfg = results["config"]
    data = eedn.load_dataset(cfg["dataset"], image_size=results["dataset"]["image_size"], seed=cfg["seed"],
                             **cfg["dataset_options"])
    return data.test


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    sizes = parse_batch_sizes(args.batch_sizes)
    if args.run_dir:
        rows = eedn.benchmark(args.run_dir, run_images(args), batch_sizes=sizes, repeats=args.repeats,
                              threads=args.threads, max_samples=args.max_samples)
        title = f"early-exit inference vs full network: {args.run_dir}"
    else:
        model, x, exit_macs, full_macs = synthetic_model(args)
        rows = eedn.benchmark(model, x, batch_sizes=sizes, repeats=args.repeats, threads=args.threads,
                              exit_macs=exit_macs, full_macs=full_macs)
        title = f"early-exit inference vs full network: {args.backbone} at {args.image_size} px (random weights)"
    print_benchmark(rows, title=title)
    print("exit shares:", ", ".join(f"{f:.3f}" for f in rows[0]["exit_fractions"]))
    if args.json_out:
        atomic_write_json(args.json_out, rows)
    return rows


if __name__ == "__main__":
    main()
