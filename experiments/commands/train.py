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
import sys
import typing

from experiments.cli import UserError

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
    from sft.config import METHODS, TrainConfig
    from theory.checks import ranged

    methods = "\n".join(f"  {n:6s} {m.help}" for n, m in METHODS.items())
    p = subparsers.add_parser("train", help="fine-tune a model (CE, TALR, DFT, clip, FLOW, L2, KL, LoRA)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=f"methods (sft.methods):\n{methods}")
    p.add_argument("--model", required=True, help="tiny[:k=v,...] | local HF folder | file.gguf")
    p.add_argument("--data", required=True, help="JSONL: prompt/completion, messages, or template fields")
    p.add_argument("--method", choices=tuple(METHODS), default="ce", help="loss / baseline (sft.methods)")
    p.add_argument("--lr", type=float, default=1e-5, help="peak learning rate")
    p.add_argument("--epochs", type=float, default=1.0, help="epochs")
    p.add_argument("--out", required=True, help="run folder, e.g. runs/NAME")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder / .gguf (default: the model's)")
    p.add_argument("--template", default=None, help="prompt template: medcalc | esci | esci_cot (Tables 4-6)")
    p.add_argument("--max-length", type=ranged("max-length", 1, integer=True), default=None,
                   help="truncate examples to this many tokens")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float64"], help="model dtype")
    p.add_argument("--general-eval", default=None,
                   help="general evaluation set recorded for `talr compare` (JSONL, or humaneval[:N])")
    p.add_argument("--domain-eval", default=None,
                   help="domain evaluation set recorded for `talr compare` (JSONL with prompt/completion)")
    p.add_argument("--json", action="store_true", help="print the run summary as JSON")
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


def _recorded_path(spec: str | None) -> str | None:
    """An existing file as its absolute path (so `talr compare` works from any folder); other
    specs (``humaneval:N``, ``tiny``) unchanged."""
    from pathlib import Path

    return str(Path(spec).resolve()) if spec and Path(spec).is_file() else spec


_RESUME_HINT = "pass --resume-from-checkpoint last to continue that run or --overwrite to replace it"


def _eval_spec_problem(flag: str, spec: str | None) -> str | None:
    """Why ``spec`` (``--general-eval``/``--domain-eval``) cannot be read by `talr compare`, or None."""
    import re
    from pathlib import Path

    if spec is None or re.fullmatch(r"humaneval(?::\d+)?", spec) or Path(spec).is_file():
        return None
    return f"{flag} {spec!r}: no such file (expected a JSONL file or humaneval[:N])"


def _context_problem(ds, model, max_length: int | None, data: str) -> str | None:
    """Examples longer than the model's context (``max_position_embeddings``), or a ``--max-length``
    above it: refused (with the option that truncates), never trained on silently."""
    ctx = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if not ctx:
        return None
    if max_length is not None and max_length > ctx:
        return f"--max-length {max_length} exceeds the model's context of {ctx} tokens; pass --max-length {ctx} or less"
    lengths = [len(ds[i]["input_ids"]) for i in range(len(ds))]
    long = [i for i, n in enumerate(lengths) if n > ctx]
    if not long:
        return None
    worst = max(long, key=lambda i: lengths[i])
    return (f"{data}: {len(long)} of {len(lengths)} examples are longer than the model's context of {ctx} tokens "
            f"(longest: example {worst + 1}, {lengths[worst]} tokens); pass --max-length {ctx} to truncate them "
            f"(examples left without a completion token are dropped)")


def _preflight(args, cfg) -> str | None:
    """Every check that needs neither the model nor the data: before any work."""
    from sft.runs import RunDirError, check_out_dir

    for flag, spec in (("--general-eval", args.general_eval), ("--domain-eval", args.domain_eval)):
        problem = _eval_spec_problem(flag, spec)
        if problem:
            return problem
    try:
        check_out_dir(cfg.out, overwrite=cfg.overwrite, resume=cfg.resume_from_checkpoint is not None,
                      protect=[args.model, args.tokenizer, args.data, args.general_eval, args.domain_eval],
                      hint=_RESUME_HINT)
    except RunDirError as exc:
        return str(exc)
    return None


def handler(args) -> int:
    kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(_config_class())}
    if (args.general_eval or args.domain_eval) and args.save_total_limit == _config_class()().save_total_limit:
        kw["save_total_limit"] = None  # `talr compare` reads every checkpoint: keep them all
    try:
        cfg = _config_class()(**kw)
    except ValueError as exc:  # one validation layer: TrainConfig names the option and its range
        raise UserError(f"--{str(exc).replace('_', '-')}") from None
    problem = _preflight(args, cfg)
    if problem:
        raise UserError(problem)
    try:
        return _train(args, cfg)
    except KeyboardInterrupt as exc:  # Ctrl-C: one line, the conventional 128 + SIGINT
        from sft.trainer import TrainingInterrupted

        if isinstance(exc, TrainingInterrupted):
            res = exc.result
            how = ("resume with the same command plus --resume-from-checkpoint last" if res.last_checkpoint else
                   "start again with --overwrite (pass --save-steps N to make a run resumable)")
            print(f"talr train: {res.message}; status 'interrupted' in {res.run_dir}/result.json; {how}",
                  file=sys.stderr)
        else:
            print("talr train: interrupted before training started; nothing was trained", file=sys.stderr)
        return 130


def _train(args, cfg) -> int:
    import errno
    import warnings

    from sft.data import DataError
    from sft.runs import RunDirError
    from sft.trainer import DiskFull, train

    if not cfg.progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        tok, ds, model = _load(args, cfg)
    except (DataError, OSError, ValueError) as exc:  # FileNotFoundError is an OSError
        raise UserError(str(exc)) from None
    extra = _recorded_inputs(args, ds)
    try:
        with warnings.catch_warnings(record=True):  # divergence is reported below, once
            warnings.simplefilter("always")
            res = train(cfg, model, ds, tokenizer=tok, extra_config=extra)
    except (RunDirError, FileNotFoundError) as exc:  # folder refused; nothing to resume from
        raise UserError(str(exc)) from None
    except ValueError as exc:  # an option the model cannot take (--lora-targets)
        raise UserError(f"--{str(exc).replace('_', '-', 1)}" if str(exc).startswith("lora_") else str(exc)) from None
    except OSError as exc:
        if not isinstance(exc, DiskFull) and exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        what = exc.strerror if isinstance(exc, DiskFull) else f"disk full ({exc})"
        raise UserError(f"{what}; the half-written checkpoint in {cfg.out} was removed; free space first") from None
    _print_summary(res, args.json)
    return 0 if res.status == "completed" else 1


def _load(args, cfg):
    """(tokenizer, dataset, model) of the command line; examples longer than the context refused."""
    import torch

    from sft.data import load_sft_dataset
    from sft.models import load_model, load_tokenizer

    tok = load_tokenizer(args.tokenizer or args.model)
    if tok is None:
        raise FileNotFoundError(f"--model {args.model!r}: expected tiny[:k=v,...], a local HF folder or a .gguf file")
    ds = load_sft_dataset(args.data, tok, template=args.template, max_length=args.max_length)
    model = load_model(args.model, dtype=getattr(torch, args.dtype), seed=cfg.seed)
    problem = _context_problem(ds, model, args.max_length, args.data)
    if problem:
        raise ValueError(problem)
    if args.model.startswith("tiny") and model.config.vocab_size < len(tok):
        model.resize_token_embeddings(len(tok))
    return tok, ds, model


def _print_summary(res, as_json: bool) -> None:
    import json

    summary = {"status": res.status, "global_step": res.global_step, "train_loss_nats_per_token": res.train_loss,
               "run_dir": str(res.run_dir),
               "last_checkpoint": str(res.last_checkpoint) if res.last_checkpoint else None,
               "message": res.message, "warnings": res.warnings}
    if as_json:
        from sft.io import to_jsonable

        print(json.dumps(to_jsonable(summary), indent=2))
    else:
        print(f"talr train: {res.status} after {res.global_step} steps, train loss {res.train_loss:.4f} nats/token; "
              f"results in {res.run_dir}" + (f" ({res.message})" if res.message and res.message not in res.warnings
                                             else ""))
        for w in res.warnings:
            print(f"talr train: warning: {w}")


def _recorded_inputs(args, ds) -> dict:
    """What config.json records beside TrainConfig: the inputs as given, the data's size and the
    fingerprints of the data and evaluation files (so `talr compare` can tell when they changed)."""
    from pathlib import Path

    from sft.runs import file_fingerprint

    files = {name: file_fingerprint(spec) for name, spec in
             (("data", args.data), ("general_eval", args.general_eval), ("domain_eval", args.domain_eval))
             if spec and Path(spec).is_file()}
    return {"model": _recorded_path(args.model), "data": _recorded_path(args.data),
            "tokenizer": _recorded_path(args.tokenizer), "template": args.template,
            "max_length": args.max_length, "dtype": args.dtype, "n_examples": len(ds), "n_dropped": ds.dropped,
            "general_eval": _recorded_path(args.general_eval), "domain_eval": _recorded_path(args.domain_eval),
            "data_files": files}


def _config_class():
    from sft.config import TrainConfig

    return TrainConfig
