"""``eedn predict``, ``eedn bench`` and ``eedn export``: the click commands over :mod:`eedn.deploy` (which holds the
work and no command-line code)."""
from __future__ import annotations

from pathlib import Path

import click

from eedn.cli.common import friendly_errors
from eedn.deploy.bench import benchmark, parse_batch_sizes, print_benchmark
from eedn.deploy.export import FORMATS, export_run
from eedn.deploy.predict import predict_files, print_predictions
from eedn.pipeline.rundir import read_manifest
from eedn.runtime.errors import EednError


@click.command("predict")
@click.argument("run_dir", type=click.Path())
@click.option("--input", "inputs", multiple=True, required=True, metavar="PATH",
              help="an image file or a folder of images (repeatable)")
@click.option("--batch-size", type=int, default=64, show_default=True, help="images per engine call")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda")
@click.option("--compile", "compile_", is_flag=True, help="run the exits through torch.compile (slow first batch; "
                                                           "docs/inference.md)")
@click.option("--debug", is_flag=True, help="show tracebacks")
@friendly_errors
def predict(run_dir, inputs, batch_size, device, compile_, debug) -> None:
    """Classify images with a trained run (real early exits): class, confidence, exit, MACs per file.

    Needs only the run directory: the training data may be gone."""
    spec = read_manifest(run_dir)["model"]
    rows = predict_files(run_dir, inputs, batch_size=batch_size, device=device, compile=compile_)
    print_predictions(rows, spec["full_macs"], spec["num_exits"])


@click.command("bench")
@click.argument("run_dir", type=click.Path())
@click.option("--input", "inputs", multiple=True, required=True, metavar="PATH",
              help="an image file or a folder of images to time (repeatable), preprocessed like `eedn predict`")
@click.option("--batch-sizes", default="1,32,256", show_default=True, help="comma-separated batch sizes")
@click.option("--max-samples", type=int, help="use only the first N images (default: all)")
@click.option("--threads", type=int, help="torch intra-op threads (default: torch's)")
@click.option("--repeats", type=int, default=5, show_default=True, help="timed rounds per batch (best kept)")
@click.option("--stage-profile/--no-stage-profile", default=True, show_default=True,
              help="also time each stage alone (time-model speed-up, engine efficiency)")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda")
@click.option("--json", "json_out", type=click.Path(), help="also write the rows to this JSON file")
@click.option("--debug", is_flag=True, help="show tracebacks")
@friendly_errors
def bench(run_dir, inputs, batch_sizes, max_samples, threads, repeats, stage_profile, device, json_out,
          debug) -> None:
    """Time early-exit inference against the full network on image files (needs only the run directory)."""
    from eedn.deploy.predict import read_images

    sizes = parse_batch_sizes(batch_sizes)
    if max_samples is not None and max_samples < 1:
        raise EednError(f"--max-samples must be at least 1, got {max_samples}")
    _, images = read_images(run_dir, inputs, max_samples)
    rows = benchmark(run_dir, images, batch_sizes=sizes, repeats=repeats, threads=threads,
                     stage_profile=stage_profile, device=device)
    print_benchmark(rows, title=f"early-exit inference vs full network: {run_dir}")
    from eedn.runtime.io import atomic_write_json

    if json_out:
        atomic_write_json(Path(json_out), rows)
    if stage_profile:  # the run's reports show each exit's measured time beside its MACs (`eedn report` re-renders)
        from eedn.report.render import BENCH

        try:
            atomic_write_json(Path(run_dir) / BENCH, rows)
        except OSError as exc:
            click.echo(f"warning: could not save the timings to {Path(run_dir) / BENCH}: {exc}", err=True)


@click.command("export")
@click.argument("run_dir", type=click.Path())
@click.option("--format", "fmt", type=click.Choice(list(FORMATS)), default="torchscript", show_default=True,
              help="torchscript and exported-program need torch only; onnx needs pip install 'eedn[export]'")
@click.option("--out", required=True, type=click.Path(), help="directory to write the segments and runner.py to")
@click.option("--debug", is_flag=True, help="show tracebacks")
@friendly_errors
def export_command(run_dir, fmt, out, debug) -> None:
    """Export a trained run as per-exit segments with a small runner (no eedn needed).

    Writes the reported policy's segments (one module per exit), one module per exit rule, decision.json and
    runner.py, which chains them with real early exits (docs/deploy.md)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and exporter chatter; the result is checked in the tests
        decision = export_run(run_dir, fmt, out)
    click.echo(f"wrote {len(decision['segments'])} segments and {len(decision['rules'])} exit rules ({fmt}) to "
               f"{out}; run them with: python {Path(out) / 'runner.py'} {out} IMAGES.pt")
