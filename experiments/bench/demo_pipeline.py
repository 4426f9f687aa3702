"""Benchmark: wall time and peak memory of `talr demo` (the main job), cold cache.

Runs the demo in a child process with a fresh pretraining cache (what a new machine does)
and prints wall time and the child's peak resident memory. Targets (issue 6): <= 10 min,
<= 4 GiB on a 2-core machine.
Run: .venv/bin/python experiments/bench/demo_pipeline.py [--preset smoke|default] [--warm]
"""
from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="default")
    ap.add_argument("--warm", action="store_true", help="reuse the user cache of worlds (sft.runs.user_cache_dir) instead of a fresh cache")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cache = None if args.warm else str(Path(tmp) / "cache")
        cmd = [sys.executable, "-m", "experiments.cli", "demo", "--preset", args.preset, "--out",
               str(Path(tmp) / "demo"), *(["--cache-dir", cache] if cache else []), "--no-progress"]
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t
    if proc.returncode != 0:
        print(proc.stderr[-3000:])
        raise SystemExit(f"demo failed with exit code {proc.returncode}")
    peak_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB -> GiB
    print(f"talr demo --preset {args.preset} ({'warm' if args.warm else 'cold'} cache): wall {wall:.1f} s "
          f"({wall / 60:.2f} min, target <= 10 min), peak RSS {peak_gib:.2f} GiB (target <= 4 GiB)")


if __name__ == "__main__":
    main()
