"""A run folder written by `talr train` (`sft.trainer`), read back for evaluation.

``checkpoints(run)`` lists ``checkpoint-N`` folders and ``final/`` by optimizer step;
``load_initial(config)`` rebuilds the model and tokenizer training started from (same spec, dtype
and seed, from ``RUN/config.json``); ``load_checkpoint(folder, config)`` loads a saved model (full
weights, or a LoRA adapter merged into the initial model). Used by `talr compare`; any study that
evaluates a run's checkpoints reads them here.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

__all__ = ["RunFolderError", "checkpoints", "load_initial", "load_checkpoint"]


class RunFolderError(ValueError):
    """A run folder that cannot be read back; the message names the file and field."""


def checkpoints(run: Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every ``checkpoint-N`` and of ``final/`` (when its step is new), by step."""
    out = {}
    for p in run.glob("checkpoint-*"):
        m = re.fullmatch(r"checkpoint-(\d+)", p.name)
        if m and p.is_dir():
            out[int(m.group(1))] = p
    final = run / "final"
    if final.is_dir():
        step = None
        if (run / "result.json").exists():
            step = json.loads((run / "result.json").read_text()).get("global_step")
        if step is None:
            step = max(out, default=0) + 1
        out.setdefault(int(step), final)
    return sorted(out.items())


def load_initial(config: dict):
    """(model, tokenizer) as `talr train` built them before training (same spec, dtype, seed)."""
    import torch

    from .models import byte_tokenizer, load_model, load_tokenizer

    spec = config.get("model")
    if not spec:
        raise RunFolderError("config.json: field 'model' missing: cannot rebuild the initial model")
    tok = load_tokenizer(config.get("tokenizer") or spec)
    if tok is None:
        tok = byte_tokenizer()
    dtype = getattr(torch, config.get("dtype") or "float32")
    model = load_model(spec, dtype=dtype, seed=int(config.get("seed", 0)))
    if str(spec).startswith("tiny") and model.config.vocab_size < len(tok):
        model.resize_token_embeddings(len(tok))
    model.hf_quantizer, model.is_quantized = None, False  # a de-quantised GGUF model keeps these flags
    return model.eval(), tok


def load_checkpoint(folder: Path, config: dict):
    """The model saved in ``folder`` (a full model, or a LoRA adapter merged into the initial model)."""
    import torch
    from transformers import AutoModelForCausalLM

    if (folder / "adapter_config.json").exists():
        from peft import PeftModel

        base, _ = load_initial(config)
        return PeftModel.from_pretrained(base, str(folder)).merge_and_unload().eval()
    dtype = getattr(torch, config.get("dtype") or "float32")
    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, local_files_only=True).eval()
