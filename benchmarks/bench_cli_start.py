"""How fast does the ``eedn`` command start?

Starts ``eedn --help``, ``eedn plugins`` and ``eedn run --help`` as fresh processes (a fresh interpreter
calling ``eedn.cli.main:main``, exactly what the installed ``eedn`` script calls) and prints the median, min
and max wall time of ``--runs`` starts each, and whether the command imported torch (it must not; the
target is < 1.5 s on a 2-core machine). A first untimed start warms the file cache.

Usage::

    python benchmarks/bench_cli_start.py [--runs 7]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

COMMANDS = (["--help"], ["plugins"], ["run", "--help"])
#: runs the CLI, then reports on stderr whether torch got imported
_PROBE = ("import sys, atexit; atexit.register(lambda: sys.stderr.write('\\nTORCH=%d\\n' % ('torch' in sys.modules)));"
          "sys.argv = ['eedn'] + sys.argv[1:]; from eedn.cli.main import main; main()")


def time_command(args: list[str], runs: int) -> dict:
    """Median / min / max seconds of ``runs`` fresh starts, and whether torch was imported."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS="200")
    cmd = [sys.executable, "-c", _PROBE, *args]
    subprocess.run(cmd, capture_output=True, env=env, check=True)  # warm the file cache
    times, torch_loaded = [], False
    for _ in range(runs):
        start = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
        times.append(time.perf_counter() - start)
        torch_loaded |= "TORCH=1" in out.stderr
    return {"command": "eedn " + " ".join(args), "median_s": statistics.median(times), "min_s": min(times),
            "max_s": max(times), "runs": runs, "imports_torch": torch_loaded}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=7, help="timed starts per command (default 7)")
    args = p.parse_args(argv)
    rows = [time_command(c, args.runs) for c in COMMANDS]
    print(f"{'command':<20} {'median s':>9} {'min s':>7} {'max s':>7}  imports torch")
    for r in rows:
        print(f"{r['command']:<20} {r['median_s']:>9.3f} {r['min_s']:>7.3f} {r['max_s']:>7.3f}  "
              f"{'yes' if r['imports_torch'] else 'no'}")
    print(f"{rows[0]['runs']} runs each, python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
    return rows


if __name__ == "__main__":
    main()
