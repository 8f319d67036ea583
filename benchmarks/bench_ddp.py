"""2-process gloo DDP against 1 process with 2 threads on CPU: stage-0 throughput and a full ``eedn run``.

Part 1 times ``--steps`` training steps of a backbone on in-memory digits (global batch ``--batch-size``) in
three settings, each in fresh processes: 1 process x 1 thread, 1 process x 2 threads, and ``torchrun
--nproc-per-node 2`` (gloo, 1 thread each, half of every global batch per rank). Part 2 times the wall clock of
the same full ``eedn run`` on digits (``--run-args``) with ``--threads 2`` in one process and under torchrun with
2 ranks of 1 thread, each with a fresh cache. It also times one gloo all-reduce of the JEI heads' gradients
against one head-training step, the measurement behind training the heads on every rank instead of under DDP.

    python benchmarks/bench_ddp.py --json /tmp/bench_ddp.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

WORKER = r"""
import os, sys, time, json, torch, torch.nn.functional as F
import eedn
from eedn.runtime import distributed
from eedn.core.image_batches import ImageBatches
threads, steps, batch, backbone, size = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
torch.set_num_threads(threads)
world, _ = distributed.init_from_env("cpu")
torch.manual_seed(0)
data = eedn.load_dataset("digits", image_size=size, seed=0, augment=True)
model = eedn.create("backbone", backbone, num_classes=10, image_size=size, in_channels=1)
net = torch.nn.parallel.DistributedDataParallel(model) if world.active else model
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
batches = ImageBatches(data.train, batch, shuffle=True, generator=torch.Generator().manual_seed(0), drop_last=True,
                       shard=(world.rank, world.size))
done, seen, start = 0, 0, None
while done < steps + 3:
    for x, y in batches:
        if done == 3:
            distributed.barrier(); start = time.perf_counter(); seen = 0
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad(); loss.backward(); opt.step()
        done += 1; seen += len(y) * world.size
        if done >= steps + 3:
            break
distributed.barrier()
if world.main:
    print(json.dumps({"images_per_s": seen / (time.perf_counter() - start)}))
distributed.shutdown()
"""

HEADS = r"""
import json, time, torch, torch.distributed as dist
from eedn.runtime import distributed
torch.set_num_threads(1)
world, _ = distributed.init_from_env("cpu")
torch.manual_seed(0)
heads = torch.nn.ModuleList([torch.nn.Linear(64, 10) for _ in range(3)] + [torch.nn.Linear(64 + 10, 1) for _ in range(3)])
opt = torch.optim.SGD(heads.parameters(), lr=0.01)
feats, y = torch.randn(64, 64), torch.randint(0, 10, (64,))
def step():
    logits = [h(feats) for h in heads[:3]]
    loss = sum(torch.nn.functional.cross_entropy(z, y) for z in logits)
    loss = loss + sum(g(torch.cat([feats, z.softmax(-1)], 1)).mean() for g, z in zip(heads[3:], logits))
    opt.zero_grad(); loss.backward(); opt.step()
def reduce():
    for p in heads.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
for f in (step, reduce):
    f()
distributed.barrier()
t = time.perf_counter(); [step() for _ in range(200)]; t_step = (time.perf_counter() - t) / 200
distributed.barrier()
t = time.perf_counter(); [reduce() for _ in range(200)]; t_reduce = (time.perf_counter() - t) / 200
if world.main:
    print(json.dumps({"head_step_ms": 1e3 * t_step, "grad_allreduce_ms": 1e3 * t_reduce}))
distributed.shutdown()
"""


def launch(script: str, args: list[str], ranks: int, env: dict) -> dict:
    """Run ``script`` in 1 process or under torchrun with ``ranks``; the JSON line rank 0 prints."""
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as fh:
        fh.write(script)
    cmd = [sys.executable, fh.name, *args] if ranks == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks), fh.name, *args]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=True).stdout
    os.unlink(fh.name)
    return json.loads([line for line in out.splitlines() if line.startswith("{")][-1])


def timed_run(run_args: list[str], ranks: int, threads: int, env: dict) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        args = [*run_args, "--threads", str(threads), "--cache-dir", f"{tmp}/cache", "--out", f"{tmp}/run", "--quiet"]
        cmd = [sys.executable, "-m", "eedn", "run", *args] if ranks == 1 else \
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks), "-m", "eedn",
             "run", *args]
        start = time.perf_counter()
        subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=True)
        return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="resnet_tiny")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--run-args", default="--backbone resnet --strategy jei",
                    help="arguments of the timed full `eedn run` on digits")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    worker_args = [str(args.steps), str(args.batch_size), args.backbone, str(args.image_size)]
    rows = {}
    for label, ranks, threads in (("1 process x 1 thread", 1, 1), ("1 process x 2 threads", 1, 2),
                                  ("2 gloo ranks x 1 thread", 2, 1)):
        rows[label] = launch(WORKER, [str(threads), *worker_args], ranks, env)["images_per_s"]
        print(f"stage 0 {args.backbone} @{args.image_size}px, batch {args.batch_size}: {label:26s} "
              f"{rows[label]:8.1f} img/s", flush=True)
    heads = launch(HEADS, [], 2, env)
    print(f"heads: one step {heads['head_step_ms']:.3f} ms, gloo all-reduce of its gradients "
          f"{heads['grad_allreduce_ms']:.3f} ms", flush=True)
    run_args = args.run_args.split()
    walls = {"1 process x 2 threads": timed_run(run_args, 1, 2, env),
             "2 gloo ranks x 1 thread": timed_run(run_args, 2, 1, env)}
    for label, wall in walls.items():
        print(f"eedn run {args.run_args}: {label:26s} {wall:6.1f} s wall", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "stage0_images_per_s": rows, "heads": heads,
                                               "run_wall_s": walls}, indent=1))


if __name__ == "__main__":
    main()
