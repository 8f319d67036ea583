"""Does torch.compile speed up the early-exit engine, and what does the engine's own bookkeeping cost?

Times, interleaved in one run (:func:`eedn.deploy.bench.time_interleaved`, each batch's best of ``--repeats``):
the plain backbone, the engine in eager mode, the engine with ``compile=True`` (each exit's segment through
``torch.compile(dynamic=True)``) and, with ``--baseline-engine FILE``, the engine of an older
``eedn/deploy/inference.py`` (``git show COMMIT:eedn/deploy/inference.py > old.py``) to measure a change of the engine's
per-exit overhead. The model has random weights and a max-probability gate calibrated to equal exit shares
(as ``benchmarks/bench_inference.py --backbone``); timing depends only on where rows leave, which the shares fix.
The share of rows each engine sends to the eager engine's exit is reported. Compile time (the first calls) is reported apart.

    python benchmarks/bench_compile.py --backbone t2t_vit_tiny --image-size 32 --batch-sizes 1,32,256
    python benchmarks/bench_compile.py --backbone resnet18 --image-size 224 --batch-sizes 1 --no-compile \\
        --baseline-engine /tmp/old_inference.py
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from bench_inference import synthetic_model  # noqa: E402
from eedn.deploy.bench import parse_batch_sizes, time_interleaved, torch_threads  # noqa: E402
from eedn.deploy.inference import EarlyExitEngine, full_inference  # noqa: E402
from eedn.runtime.io import atomic_write_json  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", default="t2t_vit_tiny")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--samples", type=int, default=256, help="random images (batch 1 times the first 64)")
    p.add_argument("--exit-shares", default="equal")
    p.add_argument("--batch-sizes", default="1,32,256")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-compile", action="store_true", help="skip the compiled engine")
    p.add_argument("--baseline-engine", help="an older eedn/deploy/inference.py whose EarlyExitEngine is timed too")
    p.add_argument("--json", dest="json_out")
    return p.parse_args(argv)


def load_engine_class(path: str):
    spec = importlib.util.spec_from_file_location("baseline_inference", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module.EarlyExitEngine


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    model, x, exit_macs, _ = synthetic_model(args)
    engines = {"eager": EarlyExitEngine(model, exit_macs)}
    if args.baseline_engine:
        engines["baseline"] = load_engine_class(args.baseline_engine)(model, exit_macs)
    if not args.no_compile:
        engines["compiled"] = EarlyExitEngine(model, exit_macs, compile=True)
    rows = []
    with torch_threads(args.threads):
        for b in parse_batch_sizes(args.batch_sizes):
            n = min(len(x), 64) if b == 1 else len(x)
            batches = list(x[:n].split(b))
            compile_s = None
            for name, engine in engines.items():
                start = time.perf_counter()
                for xb in {tuple(xb.shape): xb for xb in batches}.values():  # every shape once: compiles here
                    engine(xb)
                if name == "compiled":
                    compile_s = time.perf_counter() - start
            fns = [lambda xb: full_inference(model, xb), *engines.values()]
            times, outs = time_interleaved(fns, batches, args.repeats)
            exits = [torch.cat([r.exit_index for r in o]) for o in outs[1:]]
            row = {"backbone": args.backbone, "image_size": args.image_size, "batch_size": b, "samples": n,
                   "threads": torch.get_num_threads(), "full_ms_per_sample": 1e3 * times[0] / n,
                   "compile_s": compile_s, "exit_fractions": (torch.bincount(exits[0], minlength=model.num_exits)
                                                              .double() / n).tolist()}
            for name, t, e in zip(engines, times[1:], exits):
                row[f"{name}_ms_per_sample"] = 1e3 * t / n
                row[f"{name}_vs_full"] = times[0] / t
                # the gate is calibrated on these very images, so scores sit on thresholds: kernels that round
                # differently (compiled) may send a few rows elsewhere
                row[f"{name}_same_exit"] = float((e == exits[0]).double().mean())
            rows.append(row)
            shown = ", ".join(f"{k} {v:.3f}" for k, v in row.items() if k.endswith(("_ms_per_sample", "_vs_full", "_same_exit")))
            print(f"{args.backbone}@{args.image_size} batch {b}: {shown}"
                  + (f", compile {compile_s:.1f} s" if compile_s is not None else ""), flush=True)
    if args.json_out:
        atomic_write_json(args.json_out, rows)
    return rows


if __name__ == "__main__":
    main()
