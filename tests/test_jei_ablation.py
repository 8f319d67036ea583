"""The JEI gate ablation benchmark end to end on the tiny pipeline config (a smoke test: it runs, and its table
is the runs' own numbers)."""
from __future__ import annotations

import json
import runpy
from pathlib import Path


def test_ablation_benchmark_writes_curves_and_table(eedn_cache, tmp_path):
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_jei_ablation.py"
    main = runpy.run_path(str(script))["main"]
    out = tmp_path / "ablation"
    main(["--backbone", "resnet_tiny", "--set", "dataset=digits", "--set", "image_size=16",
          "--set", "backbone_training.epochs=3", "--set", "backbone_training.batch_size=64",  # the session's backbone
          "--set", f"cache_dir={eedn_cache}", "--variants", "official,hazard",
          "--lambdas", "0.1,2", "--epochs", "3", "--jei-set", "warmup_epochs=1", "--at", "0.6,0.9",
          "--out", str(out), "--quiet"])
    for name in ("ablation.md", "ablation.json", "ablation.png", "comparison.md", "comparison.json"):
        assert (out / name).exists(), name
    table = json.loads((out / "ablation.json").read_text())
    assert set(table["variants"]) == {"official", "hazard"}
    for variant, row in table["variants"].items():
        results = json.loads((out / f"{variant}-s0" / "results.json").read_text())
        assert results["strategy"]["options"]["exit_rule"] == ("hazard" if variant == "hazard" else "official")
        fractions = [p["macs_fraction"] for p in results["curve"]]
        assert row["macs_range"] == [min(fractions), max(fractions)]
        assert row["collapse"]["lambda"] == 0.1 and 0 <= row["collapse"]["target_share_deep"] <= 1
        smallest = next(p for p in results["curve"] if p["setting"] == "lambda=0.1")
        assert row["collapse"]["rule_share_final"] == smallest["exit_fractions"][-1]
        assert row["at_gate_cost"] == results["threshold_on_own_ims"]["at_gate_cost"]
    comparison = json.loads((out / "comparison.json").read_text())
    assert comparison["matched"]["columns"] == ["jei-official", "max_prob thresholds on jei-official's IMs", "jei-hazard",
                                                "max_prob thresholds on jei-hazard's IMs", "im-only"]
    assert "| official |" in (out / "ablation.md").read_text()
