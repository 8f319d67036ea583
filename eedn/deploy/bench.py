"""Wall-clock benchmark of real early-exit inference against the plain backbone.

For each batch size, the images (``eedn bench --input``: files preprocessed like ``eedn predict`` does;
library: any tensor or dataset) are cut into batches and run twice, interleaved ``repeats`` times:
once through the plain backbone (:func:`eedn.deploy.inference.full_inference`, the network without exits)
and once through the early-exit engine. The report gives

* MAC speed-up = full MACs ÷ the engine's mean per-sample MACs on those samples (what the cost model
  promises),
* wall speed-up = full time ÷ engine time (what the clock says),
* realisation = wall speed-up ÷ MAC speed-up (1.0: the clock delivers every saved MAC).

Both run on the same batches, interleaved batch by batch, ``repeats`` rounds; each batch keeps its best
round (the least disturbed by other work on the machine) and the times are summed over batches, after
``warmup`` batches of each kind. Inputs are materialised in memory first, so data loading is not timed.
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence, Sized, cast

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from eedn.core.options import parse_number_list
from eedn.runtime.errors import EednError
from eedn.deploy.inference import EarlyExitEngine, full_inference
from eedn.core.model import EarlyExitModel
from eedn.pipeline.rundir import load_model

DEFAULT_BATCH_SIZES = (1, 32, 256)
#: at batch size 1 the per-call overhead dominates and each sample is a call: cap the samples.
BATCH1_SAMPLES = 200


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run with ``threads`` intra-op threads (unchanged when None), restoring the setting after."""
    before = torch.get_num_threads()
    if threads is not None:
        if threads < 1:
            raise EednError(f"--threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def stack_images(dataset: Dataset, max_samples: int | None = None, batch_size: int = 256) -> Tensor:
    """The first ``max_samples`` images of a dataset as one ``[N, C, H, W]`` tensor."""
    size = len(cast(Sized, dataset))
    n = size if max_samples is None else min(size, max_samples)
    if n == 0:
        raise EednError("the benchmark data holds no samples")
    chunks, seen = [], 0
    for x, _ in DataLoader(torch.utils.data.Subset(dataset, range(n)), batch_size=batch_size, shuffle=False):
        chunks.append(x)
        seen += len(x)
    return torch.cat(chunks)[:n]


def _timed(fn, xb: Tensor):
    start = time.perf_counter()
    out = fn(xb)
    if xb.is_cuda:
        torch.cuda.synchronize(xb.device)
    return time.perf_counter() - start, out


def time_interleaved(fns: Sequence, batches: list[Tensor], repeats: int) -> tuple[list[float], list[list]]:
    """Per function: the sum over batches of each batch's best time across ``repeats`` rounds.

    Within a round every batch runs through every function back to back, so a burst of load from
    other processes hits all of them alike; keeping each batch's best round drops the bursts.
    Also returns the first round's outputs of each function.
    """
    best = [[math.inf] * len(batches) for _ in fns]
    first: list[list] = [[] for _ in fns]
    for r in range(repeats):
        for i, xb in enumerate(batches):
            for k, fn in enumerate(fns):
                t, out = _timed(fn, xb)
                best[k][i] = min(best[k][i], t)
                if r == 0:
                    first[k].append(out)
    return [sum(b) for b in best], first


def _profile_pass(model: EarlyExitModel, x: Tensor) -> Tensor:
    """Seconds of each part of one all-stage pass: ``[stem, stage_0, exit_0, ..., stage_G, exit_G]``
    (exit ``l``: its features, IM or head, and gate score), synchronised part by part on CUDA."""
    bb, gate, g = model.backbone, model.gate, len(model.ims)
    sync = (lambda: torch.cuda.synchronize(x.device)) if x.is_cuda else (lambda: None)
    parts = []
    past: Tensor | None = None  # earlier exits' logits (history gates read them)
    with torch.inference_mode():
        start = time.perf_counter()
        state = bb.stem(x)
        sync()
        parts.append(time.perf_counter() - start)
        for l in range(bb.num_stages):
            start = time.perf_counter()
            state = bb.stage(l, state)
            sync()
            mid = time.perf_counter()
            feats = bb.exit_features(l, state)
            logits = model.exit_logits(l, feats)
            if l < g:
                gate.score_exit(l, logits, feats, past)
            past = logits.unsqueeze(1) if past is None else torch.cat([past, logits.unsqueeze(1)], 1)
            sync()
            parts += [mid - start, time.perf_counter() - mid]
    return torch.tensor(parts, dtype=torch.float64)


def profile_exit_costs(model: EarlyExitModel, batches: list[Tensor], repeats: int) -> tuple[Tensor, float]:
    """The time analogue of ``exit_macs``: per-sample seconds to reach and evaluate each exit
    (``[E]``, cumulative like the MACs) and of the plain backbone, from each part's best of
    ``repeats`` all-stage passes at these batch sizes."""
    best: list[Tensor | None] = [None] * len(batches)
    for _ in range(repeats):
        for i, xb in enumerate(batches):
            parts = _profile_pass(model, xb)
            prev = best[i]
            best[i] = parts if prev is None else torch.minimum(prev, parts)
    n = sum(len(xb) for xb in batches)
    total = torch.stack(cast("list[Tensor]", best)).sum(0) / n  # [1 + 2E]; repeats >= 1 filled every entry
    stem, stages, exits = total[0], total[1::2], total[2::2]
    cumulative = stem + stages.cumsum(0) + exits.cumsum(0)
    full = float(stem + stages.sum() + exits[-1])
    return cumulative, full


def benchmark(run: str | Path | EarlyExitModel, data: Tensor | Dataset | None = None,
              batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES, repeats: int = 5, warmup: int = 2,
              threads: int | None = None, max_samples: int | None = None, batch1_samples: int = BATCH1_SAMPLES,
              exit_macs: Sequence[float] | None = None, full_macs: float | None = None,
              stage_profile: bool = True, device: str = "cpu") -> list[dict]:
    """One row per batch size: times, MAC and wall speed-ups, realisation (see the module docstring).

    With ``stage_profile`` each part of the network is also timed on its own (:func:`profile_exit_costs`)
    to split the realisation in two: ``time_model_speedup`` is the speed-up the policy would give if
    each stage's time shrank exactly with its rows (so ``time_model_speedup / mac_speedup`` says how
    well MACs predict time on this machine), and ``engine_efficiency = wall / time_model`` is what the
    engine itself delivers of that.

    ``run`` is a run directory (the model, loaded on ``device``, and its MACs come from it) or a model
    (run where it is; MACs measured unless given). ``data`` holds the images to time: a tensor
    ``[N, C, H, W]`` prepared like the model's inputs (:func:`eedn.deploy.predict.read_images` prepares image
    files for a run directory) or a dataset yielding ``(image, label)``.
    """
    if repeats < 1 or warmup < 0:
        raise EednError(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
    if not batch_sizes or any(int(b) < 1 for b in batch_sizes):
        raise EednError(f"batch sizes must be positive integers, got {list(batch_sizes)}")
    if data is None:
        raise EednError("benchmark(run_or_model, data): give the images to time (a tensor or a dataset)")
    if isinstance(run, EarlyExitModel):
        model = run
    else:
        model, manifest = load_model(run, device=device)
        exit_macs = exit_macs or manifest["model"]["exit_macs"]
        full_macs = full_macs or manifest["model"]["full_macs"]
    if exit_macs is None or full_macs is None:
        from eedn.core.cost import measure_exit_macs

        measured, measured_full = measure_exit_macs(model)
        exit_macs = exit_macs or measured
        full_macs = full_macs or measured_full
    images = data if isinstance(data, Tensor) else stack_images(data, max_samples)
    if max_samples is not None:
        images = images[:max_samples]
    where = next(model.parameters()).device
    images = images.to(where)
    engine = EarlyExitEngine(model, exit_macs)
    model.eval()

    rows = []
    with torch_threads(threads):
        for b in batch_sizes:
            b = int(b)
            n = min(len(images), batch1_samples) if b == 1 else len(images)
            batches = list(images[:n].split(b))
            for xb in batches[:max(warmup, 1)]:
                full_inference(model, xb)
                engine(xb)
            (t_full, t_engine), (_, outs) = time_interleaved(
                [lambda xb: full_inference(model, xb), engine], batches, repeats)
            exit_index = torch.cat([r.exit_index for r in outs]).cpu()
            macs = torch.cat([r.macs for r in outs]).cpu()
            mac_speedup = float(full_macs) / float(macs.mean())
            wall_speedup = t_full / t_engine
            row_extra: dict = {}
            if stage_profile:
                time_costs, full_time = profile_exit_costs(model, batches, repeats)
                time_model = full_time / float(time_costs[exit_index].mean())
                row_extra = {"exit_seconds": time_costs.tolist(), "full_seconds": full_time,
                             "time_model_speedup": time_model, "engine_efficiency": wall_speedup / time_model}
            rows.append({
                "batch_size": b, "samples": n, "threads": torch.get_num_threads(), "device": str(where),
                "repeats": repeats, "full_s": t_full, "engine_s": t_engine,
                "full_ms_per_sample": 1e3 * t_full / n, "engine_ms_per_sample": 1e3 * t_engine / n,
                "full_macs": float(full_macs), "mean_macs": float(macs.mean()),
                "mac_speedup": mac_speedup, "wall_speedup": wall_speedup, "realisation": wall_speedup / mac_speedup,
                "exit_fractions": (torch.bincount(exit_index, minlength=len(exit_macs)).double() / n).tolist(),
            } | row_extra)
    return rows


def print_benchmark(rows: list[dict], title: str = "early-exit inference vs full network") -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    profiled = all("time_model_speedup" in r for r in rows)
    cols = ["batch", "images", "full ms", "exits ms", "MAC×", "wall×", "realised"]
    cols += ["time×", "eff."] if profiled else []
    for col in cols:
        table.add_column(col, justify="right", no_wrap=True)
    for r in rows:
        cells = [str(r["batch_size"]), str(r["samples"]), f"{r['full_ms_per_sample']:.3f}",
                 f"{r['engine_ms_per_sample']:.3f}", f"{r['mac_speedup']:.2f}", f"{r['wall_speedup']:.2f}",
                 f"{r['realisation']:.2f}"]
        if profiled:
            cells += [f"{r['time_model_speedup']:.2f}", f"{r['engine_efficiency']:.2f}"]
        table.add_row(*cells)
    console = Console()
    console.print(table)
    if rows:
        console.print("ms per image: full = plain backbone, exits = early-exit engine; MAC× = full MACs / mean "
                      "MACs; wall× = full time / engine time; realised = wall× / MAC×"
                      + ("; time× = the speed-up if every stage's time scaled with its rows (stages timed "
                         "alone); eff. = wall× / time×" if profiled else "")
                      + f"; threads "
                      f"{rows[0]['threads']}, {rows[0]['device']}; each batch's best of {rows[0]['repeats']} "
                      f"interleaved rounds")


def parse_batch_sizes(text: str) -> list[int]:
    return parse_number_list(text, "--batch-sizes", int, 1, "1,32,256")
