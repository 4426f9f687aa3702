"""Benchmark: training throughput of SmolLM2 as a fraction of this machine's fp32 matmul peak (MFU).

Times ``--steps`` optimizer steps of full fine-tuning (CE) and of LoRA (r=8) on the study's
label-only MedCalc examples (`experiments.studies.grid`), and a large fp32 matmul in the same
process. MFU = 6 N tokens/s / matmul GFLOP/s, N = all parameters (for LoRA 6 N over-counts the
work: the frozen weights get no gradient). The study log prints the same number for every run.

Run: PYTHONPATH=. .venv/bin/python experiments/bench/mfu.py [--steps 2] [--batch-size 2] [--model smollm2|tiny:...]
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
import copy
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--matmul", type=int, default=2048, help="matmul size n (n x n fp32)")
    a = ap.parse_args(argv)
    if a.steps < 1 or a.batch_size < 1 or a.matmul < 64:
        ap.error("--steps and --batch-size must be >= 1, --matmul >= 64")
    from experiments.studies.grid import Entry, StudyConfig, load_base, matmul_gflops, prepare_data, train_entry

    cfg = StudyConfig(model=a.model, steps=a.steps, batch_size=a.batch_size)
    base, tok, desc = load_base(cfg)
    data = prepare_data(cfg, tok)
    n = sum(p.numel() for p in base.parameters())
    peak = matmul_gflops(a.matmul)
    print(f"model: {desc}, N = {n / 1e6:.1f} M parameters; fp32 matmul {a.matmul}^3: {peak:.1f} GFLOP/s")
    for method, lr in (("ce", 1e-4), ("lora", 1e-3)):
        with tempfile.TemporaryDirectory() as d:
            _, rec = train_entry(copy.deepcopy(base), tok, cfg, data, Entry("label", method, lr), Path(d))
        mfu = rec["model_gflops_per_s"] / peak
        print(f"{'full fine-tuning' if method == 'ce' else 'LoRA r=8'}: {rec['train_tokens']} tokens in "
              f"{rec['train_seconds']:.1f} s = {rec['tokens_per_s']:.1f} tokens/s, 6N tokens/s = "
              f"{rec['model_gflops_per_s']:.1f} GFLOP/s, MFU {100 * mfu:.1f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
