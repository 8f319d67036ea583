"""eedn as a library: the pipeline in one call, then the same steps by hand.

Run: python examples/library_use.py   (under a minute on 2 CPU cores, embedded digits, no downloads)
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

import eedn
from eedn.cache import FeatureCache
from eedn.cost import measure_exit_macs
from eedn.policy import apply_gate
from eedn.training import FeatureSource, FitContext, compute_split_outputs


def whole_pipeline(workdir: str) -> None:
    """`eedn run` as a function: returns the results.json content."""
    results = eedn.run_pipeline({"backbone": "t2t_vit", "strategy": "jei", "progress": False,
                                 "strategy_options": {"lambda": [0.01, 0.5, 2.0]},
                                 "cache_dir": f"{workdir}/cache", "out": f"{workdir}/run"})
    for point in results["curve"]:
        print(f"{point['setting']:>12}: accuracy {point['accuracy']:.3f} at {point['macs_fraction']:.2f} of full MACs")


def by_hand(workdir: str) -> None:
    """Registry names → model → strategy.fit → stored outputs → any policy, without the pipeline."""
    data = eedn.create("dataset", "digits").splits(image_size=32, seed=0)
    backbone = eedn.create("backbone", "t2t_vit_tiny", num_classes=10, image_size=32, in_channels=1)
    # the backbone the pipeline above trained and cached (a state dict saved atomically)
    cached = next(Path(workdir, "cache", "backbones").glob("t2t_vit-*.pt"))
    backbone.load_state_dict(torch.load(cached, weights_only=True)["model"])
    model = eedn.build_model(backbone, gate="max_prob")
    model.freeze_backbone()
    exit_macs, full_macs = measure_exit_macs(model)
    source = FeatureSource(model, data, cache=FeatureCache(f"{workdir}/features"))
    context = FitContext(features=source, exit_macs=exit_macs, full_macs=full_macs, seed=0)
    eedn.create("strategy", "im-only", epochs=2).fit(model, data, context)
    val = compute_split_outputs(model, source, "val", exit_macs, full_macs)
    test = compute_split_outputs(model, source, "test", exit_macs, full_macs)
    for fraction in (0.75, 0.8, 0.9):  # exit 0 alone already costs 0.74 of the backbone here
        model.gate.calibrate(val, {"macs_fraction": fraction})
        summary = test.summarize(apply_gate(model.gate, test))
        print(f"budget {fraction:.2f}: accuracy {summary['accuracy']:.3f}, mean MACs {summary['mean_macs']:.0f}")
    print("per-exit test accuracy:", [round(a, 3) for a in test.exit_accuracy().tolist()])


if __name__ == "__main__":
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        whole_pipeline(tmp)
        by_hand(tmp)
