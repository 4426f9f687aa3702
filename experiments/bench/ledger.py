"""Benchmark: the claims ledger (``theory.claims.run_ledger``) entry by entry -- instances, hard-family
instances, violations, power (1% / 10% stronger) and seconds -- and each entry's share of the total.

Run it on two checkouts in the same session to compare them (the ratio of the totals is the figure
to quote; absolute seconds depend on the machine's load):

    PYTHONPATH=. .venv/bin/python -m experiments.bench.ledger --n 1000
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

from theory.claims import CHECKS
from theory.claims_corrected import CORRECTED_CHECKS


def timed_ledger(n: int, seed: int = 0) -> list[dict]:
    """The entries of ``run_ledger(n, seed)`` in its order (same generators), each with its seconds."""
    seeds = np.random.SeedSequence(seed).spawn(len(CHECKS))
    rows = []
    for k, ((cid, chk), ss) in enumerate(zip(CHECKS.items(), seeds)):
        fns = [(chk, np.random.default_rng(ss))]
        fns += [(fn, np.random.default_rng(np.random.SeedSequence([seed, k, j + 1])))
                for j, fn in enumerate(CORRECTED_CHECKS.get(cid, []))]
        for fn, rng in fns:
            t0 = time.perf_counter()
            c = fn(n, rng)
            rows.append({"id": c.id, "verdict": c.verdict, "n": c.n_instances, "n_hard": getattr(c, "n_hard", None),
                         "violations": c.n_violations, "power": c.power, "seconds": time.perf_counter() - t0})
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000, help="instances per check (the tests use 1000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = ap.parse_args(argv)
    rows = timed_ledger(args.n, args.seed)
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    total = sum(r["seconds"] for r in rows)
    for r in rows:
        pw = "n/a" if not r["power"] else f"{100 * r['power']['1%']:.3g}% / {100 * r['power']['10%']:.3g}%"
        hard = "-" if r["n_hard"] is None else r["n_hard"]
        print(f"{r['id']:<44} n={r['n']:<5} hard={hard!s:<5} violations={r['violations']:<5} "
              f"power={pw:<16} {r['seconds']:6.2f} s ({100 * r['seconds'] / total:4.1f}%)")
    print(f"total {total:.2f} s for n = {args.n}")


if __name__ == "__main__":
    main()
