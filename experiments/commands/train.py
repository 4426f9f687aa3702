"""``talr train``: fine-tune a causal LM with CE, TALR or a baseline (see `sft.trainer`).

    talr train --model tiny --data data.jsonl --method talr --lr 1e-4 --epochs 1 --out runs/NAME

``--model`` is ``tiny[:hidden=64,layers=2,...]``, a local HF folder or a ``.gguf`` file. The
tokenizer comes from the model (``--tokenizer`` overrides; ``tiny`` uses an offline byte-level
tokenizer with a ChatML template). Every field of `sft.trainer.TrainConfig` is a flag. The resolved
configuration goes to ``OUT/config.json``; see `sft.trainer` for the other files.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing

_SKIP = {"out", "method", "lr", "epochs"}


def _field_type(f):
    t = f.type if not isinstance(f.type, str) else f.type
    s = str(t)
    if "bool" in s:
        return bool
    if "int" in s and "float" not in s:
        return int
    if "float" in s:
        return float
    return str


def register(subparsers) -> None:
    from sft.trainer import METHODS, TrainConfig

    p = subparsers.add_parser("train", help="fine-tune a model (CE, TALR, DFT, clip, FLOW, L2, KL, LoRA)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="tiny[:k=v,...] | local HF folder | file.gguf")
    p.add_argument("--data", required=True, help="JSONL: prompt/completion, messages, or template fields")
    p.add_argument("--method", choices=METHODS, default="ce", help="loss / baseline")
    p.add_argument("--lr", type=float, default=1e-5, help="peak learning rate")
    p.add_argument("--epochs", type=float, default=1.0, help="epochs")
    p.add_argument("--out", required=True, help="run folder, e.g. runs/NAME")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder / .gguf (default: the model's)")
    p.add_argument("--template", default=None, help="prompt template: medcalc | esci | esci_cot (Tables 4-6)")
    p.add_argument("--max-length", type=int, default=None, help="truncate examples to this many tokens")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float64"], help="model dtype")
    p.add_argument("--general-eval", default=None,
                   help="general evaluation set recorded for `talr compare` (JSONL, or humaneval[:N])")
    p.add_argument("--domain-eval", default=None,
                   help="domain evaluation set recorded for `talr compare` (JSONL with prompt/completion)")
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        if f.name in _SKIP:
            continue
        flag = "--" + f.name.replace("_", "-")
        ty = _field_type(f)
        help_ = f.metadata.get("help", "")
        if ty is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=getattr(defaults, f.name), help=help_)
        else:
            p.add_argument(flag, type=ty, default=getattr(defaults, f.name), help=help_)
    p.set_defaults(func=handler)


def handler(args) -> int:
    import torch

    from sft.data import DataError, load_sft_dataset
    from sft.models import byte_tokenizer, load_model, load_tokenizer
    from sft.trainer import TrainConfig, train

    kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    if (args.general_eval or args.domain_eval) and args.save_total_limit == TrainConfig().save_total_limit:
        kw["save_total_limit"] = None  # `talr compare` reads every checkpoint: keep them all
    cfg = TrainConfig(**kw)
    tok = load_tokenizer(args.tokenizer or args.model)
    if tok is None:
        tok = byte_tokenizer()
    try:
        ds = load_sft_dataset(args.data, tok, template=args.template, max_length=args.max_length)
    except (DataError, FileNotFoundError) as exc:
        print(f"talr train: {exc}")
        return 2
    model = load_model(args.model, dtype=getattr(torch, args.dtype), seed=cfg.seed)
    if args.model.startswith("tiny") and model.config.vocab_size < len(tok):
        model.resize_token_embeddings(len(tok))
    extra = {"model": args.model, "data": args.data, "tokenizer": args.tokenizer, "template": args.template,
             "max_length": args.max_length, "dtype": args.dtype, "n_examples": len(ds), "n_dropped": ds.dropped,
             "general_eval": args.general_eval, "domain_eval": args.domain_eval}
    res = train(cfg, model, ds, tokenizer=tok, extra_config=extra)
    print(f"talr train: {res.status} after {res.global_step} steps, train loss {res.train_loss:.4f}; "
          f"results in {res.run_dir}" + (f" ({res.message})" if res.message else ""))
    return 0 if res.status == "completed" else 1
