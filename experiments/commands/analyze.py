"""``talr analyze``: target-token probabilities of a dataset under one or more models (Figure 3).

    talr analyze --model MODEL [--model MODEL2 ...] --data data.jsonl --out runs/NAME

``--model`` is a local HF folder, a ``.gguf`` file or ``tiny[:k=v,...]`` (repeat it to compare
checkpoints; ``NAME=PATH`` names a box). The tokenizer comes from the first model (``--tokenizer``
overrides; ``tiny`` uses the offline byte tokenizer). Data is JSONL as in `sft.data` (``--template``
for the paper's Tables 4-6). Writes ``OUT/stats.json`` (per model: median p, quartiles,
hard-token fraction, fraction > 0.2), ``OUT/token_probs.jsonl`` (per model and example),
``OUT/boxplot.png`` and ``OUT/heatmap_<model>.png`` (example ``--example``).
"""
from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
    from theory.checks import ranged

    p = subparsers.add_parser("analyze", help="token-level probability analysis (Figure 3)", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", required=True, help="[NAME=]folder | file.gguf | tiny[:k=v] (repeat)")
    p.add_argument("--data", required=True, help="JSONL: prompt/completion, messages, or template fields")
    p.add_argument("--out", required=True, help="output folder, e.g. runs/NAME")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder / .gguf (default: the first model's)")
    p.add_argument("--template", default=None, help="prompt template: medcalc | esci | esci_cot (Tables 4-6)")
    p.add_argument("--max-length", type=ranged("max-length", 1, integer=True), default=None,
                   help="truncate examples to this many tokens")
    p.add_argument("--limit", type=ranged("limit", 1, integer=True), default=None,
                   help="analyse only the first N examples")
    p.add_argument("--batch-size", type=ranged("batch-size", 1, integer=True), default=8,
                   help="examples per forward pass")
    p.add_argument("--hard-threshold", type=ranged("hard-threshold", 0, 1, lo_open=True), default=None,
                   help="hard token: p < this, in (0, 1] (default sft.losses.HARD_P)")
    p.add_argument("--example", type=ranged("example", 0, integer=True), default=0,
                   help="example shown in the heatmaps")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float64"], help="model dtype")
    p.add_argument("--seed", type=int, default=0, help="seed of tiny:... models")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=handler)


def _split_name(spec: str) -> tuple[str, str]:
    if "=" in spec and not spec.startswith("tiny"):
        name, _, path = spec.partition("=")
        return name, path
    from pathlib import Path

    return (Path(spec).stem if not spec.startswith("tiny") else "tiny"), spec


def handler(args) -> int:
    from pathlib import Path

    from experiments.cli import UserError, user_errors
    from sft.models import check_model_spec

    specs = [_split_name(s) for s in args.model]
    names = [n for n, _ in specs]
    if len(set(names)) != len(names):
        raise UserError(f"model names repeat ({names}); name them with NAME=PATH")
    with user_errors(FileNotFoundError, ValueError):  # every model spec, before any model is loaded
        for _, spec in specs:
            check_model_spec(spec)
    import torch

    from experiments.outputs import write_json, write_text
    from sft import analysis as A
    from sft.data import DataError, SFTDataset, load_sft_dataset
    from sft.losses import HARD_P
    from sft.models import byte_tokenizer, load_model, load_tokenizer

    with user_errors(DataError, OSError):  # FileNotFoundError is an OSError
        tok = load_tokenizer(args.tokenizer or specs[0][1]) or byte_tokenizer()
        ds = load_sft_dataset(args.data, tok, template=args.template, max_length=args.max_length)
    examples = list(ds.examples if isinstance(ds, SFTDataset) else ds)
    if args.limit is not None:
        examples = examples[: args.limit]
    if not examples:
        raise UserError(f"{args.data}: no usable examples")
    ex = args.example
    if ex >= len(examples):
        raise UserError(f"--example {ex}: {args.data} has {len(examples)} usable examples "
                        f"(--example 0..{len(examples) - 1})")
    thr = HARD_P if args.hard_threshold is None else args.hard_threshold
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stats, probs_by_name = {}, {}
    lines = []
    for name, spec in specs:
        with user_errors(OSError, ValueError):  # FileNotFoundError is an OSError
            model = load_model(spec, dtype=getattr(torch, args.dtype), seed=args.seed)
        if spec.startswith("tiny") and model.config.vocab_size < len(tok):
            model.resize_token_embeddings(len(tok))
        probs = A.token_probs(model, tok, examples, args.batch_size, progress=not args.no_progress, desc=name)
        probs_by_name[name] = probs
        stats[name] = {"model": spec, **A.summary(probs, thr)}
        for i, p in enumerate(probs):
            lines.append(json.dumps({"model": name, "example": i, "p": [round(float(x), 6) for x in p]}) + "\n")
        toks = [tok.decode([t]) for t in A.target_tokens(examples[ex])]
        A.heatmap_png(toks, probs[ex], out / f"heatmap_{name}.png", title=f"{name}: example {ex}")
        del model
    write_text(out / "token_probs.jsonl", "".join(lines))
    A.boxplot_png(probs_by_name, out / "boxplot.png", hard_threshold=thr)
    write_json(out / "stats.json", {"data": args.data, "n_examples": len(examples), "template": args.template,
                                    "models": stats}, indent=2)
    for name, s in stats.items():
        print(f"talr analyze: {name}: {s['n_tokens']} target tokens, median p {s['median_p']:.3f}, "
              f"hard (p < {thr}) {s['hard_fraction']:.3f}, p > 0.2 {s['frac_above_0.2']:.3f}")
    print(f"talr analyze: results in {out}")
    return 0
