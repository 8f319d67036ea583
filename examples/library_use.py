"""eedn as a library: the pipeline in one call, then the same steps by hand, then real early exits.

Run: python examples/library_use.py   (about a minute on 2 CPU cores, embedded digits, no downloads)

Everything goes through ``import eedn`` (docs/api.md lists the public API); nothing here reaches into
eedn's modules.
"""
from __future__ import annotations

import tempfile
from typing import Any

import eedn


def whole_pipeline(workdir: str, **config: Any) -> dict:
    """`eedn run` as a function: returns the results.json content; the run directory is ``workdir/run``."""
    results = eedn.run_pipeline({"backbone": "t2t_vit", "strategy": "jei", "progress": False,
                                 "strategy_options": {"lambda": [0.01, 0.5, 2.0]},
                                 "cache_dir": f"{workdir}/cache", "out": f"{workdir}/run"} | config)
    for point in results["curve"]:
        print(f"{point['setting']:>12}: accuracy {point['accuracy']:.3f} at {point['macs_fraction']:.2f} of full MACs")
    stored = eedn.read_outputs(results["run_dir"])  # every setting's val/cal/test outputs, no network pass
    for setting, splits in stored.items():
        print(f"{setting:>12}: per-exit test accuracy {[round(a, 3) for a in splits['test'].exit_accuracy().tolist()]}")
    return results


def by_hand(workdir: str, epochs: int = 2, budgets: tuple[float, ...] = (0.75, 0.8, 0.9)) -> list[dict]:
    """Dataset → model on the backbone trained above → im-only heads → stored outputs → a calibrated
    threshold gate at several budgets, each scored for accuracy, cost and calibration."""
    trained, manifest = eedn.load_run(f"{workdir}/run")  # the run's model; we keep only its backbone
    data = eedn.load_dataset("digits", image_size=manifest["input"]["image_size"], seed=0)
    model = eedn.build_model(trained.backbone, gate="max_prob", seed=0)  # seed: the same heads every run
    eedn.fit_strategy("im-only", model, data, cache_dir=f"{workdir}/cache", seed=0, epochs=epochs)
    exit_macs, full_macs = eedn.measure_exit_macs(model)
    val, cal, test = (eedn.split_outputs(model, data, split, f"{workdir}/cache", exit_macs=exit_macs,
                                         full_macs=full_macs) for split in ("val", "cal", "test"))
    rows = []
    for fraction in budgets:  # exit 0 alone may cost most of a tiny backbone: low budgets clip there
        gate = eedn.calibrate_gate(model.gate, val, fraction)
        exit_test, exit_cal = eedn.apply_gate(gate, test), eedn.apply_gate(gate, cal)
        summary = test.summarize(exit_test)
        ece = eedn.evaluate("calibration", test, cal, exit_test, exit_cal)["ece"]
        print(f"budget {fraction:.2f}: accuracy {summary['accuracy']:.3f}, {summary['macs_fraction']:.2f} of full "
              f"MACs, ECE {ece:.3f}")
        rows.append(summary | {"budget": fraction, "ece": ece})
    print("per-exit test accuracy:", [round(a, 3) for a in test.exit_accuracy().tolist()])
    return rows


def real_early_exits(workdir: str, samples: int = 128) -> list[dict]:
    """The run's policy with real early exits (rows leave the batch) timed against the plain backbone."""
    model, manifest = eedn.load_run(f"{workdir}/run")
    data = eedn.load_dataset("digits", image_size=manifest["input"]["image_size"], seed=0)
    rows = eedn.benchmark(model, data.test, batch_sizes=[64], repeats=2, max_samples=samples,
                          exit_macs=manifest["model"]["exit_macs"], full_macs=manifest["model"]["full_macs"],
                          stage_profile=False)
    for r in rows:
        print(f"batch {r['batch_size']}: {r['mac_speedup']:.2f}x fewer MACs, {r['wall_speedup']:.2f}x faster")
    return rows


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        whole_pipeline(tmp)
        by_hand(tmp)
        real_early_exits(tmp)
