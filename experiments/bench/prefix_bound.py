"""Bench: the per-prefix bounds on full-vocabulary conditionals (`sft.prefixbound`) of a general set,
against the forward passes that produce them; and the bound / measured table of trained SmolLM2 runs.

    python experiments/bench/prefix_bound.py                      # SmolLM2 base vs a perturbed copy
    python experiments/bench/prefix_bound.py --model tiny:vocab=49152,hidden=64,layers=2
    python experiments/bench/prefix_bound.py --train label --runs /tmp/pb   # train CE@3e-4 (20 x 4), save
    python experiments/bench/prefix_bound.py --table --runs /tmp/pb         # bound / measured per saved run

The general set is the grid study's (`talr study grid`, default preset: 8 HumanEval solutions given
their prompts, 16 GSM8K questions), coded exactly where `sft.eval.codelength` codes. Printed: forward-pass seconds (both
models), bound seconds (theory, all nodes), their ratio, the peak resident memory, and per run the
measured dL (bits/token) with every bound over it. Wall-clock figures are printed, never asserted.
"""
from __future__ import annotations

import argparse
import copy
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def _peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux: KiB


def study_setup(model: str):
    from experiments.studies import grid as S

    cfg = S.make_config("default", model=model)
    base, tok, desc = S.load_base(cfg)
    data = S.prepare_data(cfg, tok)
    return S, cfg, base, tok, desc, data


def train(variant: str, runs: Path, model: str) -> None:
    """The grid study's default-preset entry (variant, CE, 3e-4, 20 steps of 4); saves the weights."""
    import torch

    S, cfg, base, tok, _, data = study_setup(model)
    entry = S.Entry(variant, "ce", 3e-4)
    t = time.perf_counter()
    tuned, rec = S.train_entry(base, tok, cfg, data, entry, runs / f"train-{variant}")
    torch.save(tuned.state_dict(), runs / f"{variant}.pt")
    print(f"trained {entry.name}: loss {rec['train_loss']:.4f}, {time.perf_counter() - t:.0f} s -> {runs}/{variant}.pt")


def bound_of(base, tuned, tok, data, S, progress=False) -> dict:
    from sft.prefixbound import full_vocab_decomposition
    from theory.prefix import bound_columns

    ex = S.general_examples(tok, data)
    t = time.perf_counter()
    d, timing = full_vocab_decomposition(base, tuned, ex, unit="bits", progress=progress)
    cols = bound_columns(d)
    cols.update(n_coded=int(d.weight.size), wall_s=time.perf_counter() - t, **timing)
    return cols


def perturbed(base, scale: float = 0.02, seed: int = 0):
    import torch

    m = copy.deepcopy(base)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(scale * p.abs().mean() * torch.randn(p.shape, generator=g))
    return m


def print_row(name: str, c: dict) -> None:
    r = lambda k: f"{c[k]:.3g}" if c[k] is not None else "-"  # noqa: E731
    print(f"| {name} | {c['measured']:.4f} | {c['first_order']:.4f} | {c['kl_term']:.4f} | {r('bound_chi2_over_measured')} "
          f"| {r('bound_chi2_nodewise_over_measured')} | {r('bound_kl_over_measured')} "
          f"| {r('bound_kl_global_over_measured')} | {r('bound_min_over_measured')} | {r('floor_over_measured')} "
          f"| {c['dominant']} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--train", choices=("cot", "label"))
    ap.add_argument("--table", action="store_true")
    ap.add_argument("--runs", type=Path, default=Path("/tmp/talr-prefix-bound"))
    a = ap.parse_args(argv)
    a.runs.mkdir(parents=True, exist_ok=True)
    if a.train:
        train(a.train, a.runs, a.model)
        return 0
    S, cfg, base, tok, desc, data = study_setup(a.model)
    print(f"model {desc}; general set: {len(S.general_examples(tok, data))} texts")
    if a.table:
        import torch

        print("| run | measured (bits/token) | first-order | KL term | chi2 | chi2 node-wise | KL (t per node) "
              "| KL (one t) | min(KL, chi2) per node | floor | dominant |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for v in ("cot", "label"):
            f = a.runs / f"{v}.pt"
            if f.exists():
                tuned = copy.deepcopy(base)
                tuned.load_state_dict(torch.load(f))
                print_row(f"{v} CE@3e-4", bound_of(base, tuned, tok, data, S))
        return 0
    c = bound_of(base, perturbed(base), tok, data, S)
    print(f"coded positions {c['n_coded']}, vocabulary {c['vocab']}")
    print(f"forward passes (both models) {c['forward_s']:.2f} s; bound (theory, all nodes) {c['theory_s']:.2f} s; "
          f"ratio bound / forward = {c['theory_s'] / c['forward_s']:.2f}")
    print(f"peak resident memory {_peak_gb():.2f} GB (the models included); largest batch of conditionals held "
          f"{c['max_batch_gb']:.3f} GB")
    print(f"measured dL {c['measured']:.4g} bits/token; bound / measured: chi2 {c['bound_chi2_over_measured']}, "
          f"KL {c['bound_kl_over_measured']}, floor {c['floor_over_measured']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
