"""The run folder written by `sft.trainer.train`, and everything that reads it back.

Writing side (used by the trainer): a folder named ``checkpoint-N`` appears in the run folder
only when it is complete. Each checkpoint is written under ``.partial/checkpoint-N`` and renamed
into place (`sft.io.publish_dir`) after its last file; old checkpoints are removed by renaming
them aside first (`sft.io.remove_dir`). A ``kill -9`` therefore leaves at most an incomplete
folder under ``.partial/``, which readers never see. `prepare_run_dir` refuses to mix two runs.

Reading side: `complete_checkpoints` / `last_checkpoint` still check each ``checkpoint-N``
(weights and ``trainer_state.json`` present, no empty file), so folders written by other tools
or copied half-way are skipped with a warning instead of being resumed from or evaluated;
``checkpoints(run)`` adds ``final/``; ``load_initial(config)`` rebuilds the model and tokenizer
training started from (same spec, dtype and seed, from ``RUN/config.json``);
``load_checkpoint(folder, config)`` loads a saved model (full weights, or a LoRA adapter merged
into the initial model); `file_fingerprint` / `changed_files` record and re-check the data
files. Used by `talr train`, `talr compare` and any study that evaluates a run's checkpoints.

Importing this module does not import torch.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

from .io import remove_dir

__all__ = ["PARTIAL", "checkpoint_problem", "complete_checkpoints", "last_checkpoint", "prepare_run_dir",
           "file_fingerprint", "changed_files", "RunDirError", "RunFolderError", "checkpoints", "load_initial",
           "load_checkpoint"]

PARTIAL = ".partial"  # staging folder of checkpoints being written
_CKPT = re.compile(r"checkpoint-(\d+)")
_WEIGHTS = ("model.safetensors", "adapter_model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


class RunDirError(ValueError):
    """A run folder that cannot be used as asked (non-empty without --overwrite, ...)."""


def checkpoint_problem(folder: str | Path) -> str | None:
    """Why ``folder`` is not a complete checkpoint, or None when it is."""
    folder = Path(folder)
    if not (folder / "trainer_state.json").is_file():
        return "no trainer_state.json (written last)"
    if not any((folder / w).is_file() for w in _WEIGHTS):
        return "no model weights"
    empty = sorted(f.name for f in folder.iterdir() if f.is_file() and f.stat().st_size == 0)
    if empty:
        return f"empty file(s) {', '.join(empty)}"
    try:
        json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))["global_step"]
    except (ValueError, KeyError, UnicodeDecodeError) as exc:
        return f"unreadable trainer_state.json ({exc.__class__.__name__})"
    return None


def complete_checkpoints(run_dir: str | Path, *, warn: bool = True) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every complete ``checkpoint-N`` under ``run_dir``, by step.

    Incomplete ones (and leftovers of a killed save under ``.partial/``) are skipped, with a
    `UserWarning` naming each when ``warn``.
    """
    run_dir = Path(run_dir)
    out = []
    for p in run_dir.glob("checkpoint-*"):
        m = _CKPT.fullmatch(p.name)
        if not (m and p.is_dir()):
            continue
        why = checkpoint_problem(p)
        if why is None:
            out.append((int(m.group(1)), p))
        elif warn:
            warnings.warn(f"{p}: incomplete checkpoint skipped ({why})", stacklevel=2)
    partial = run_dir / PARTIAL
    if warn and partial.is_dir():
        for p in sorted(partial.iterdir()):
            warnings.warn(f"{p}: incomplete checkpoint skipped (its save was interrupted)", stacklevel=2)
    return sorted(out)


def last_checkpoint(run_dir: str | Path, *, warn: bool = True) -> Path | None:
    """The complete ``checkpoint-N`` with the largest N under ``run_dir``, or None."""
    ck = complete_checkpoints(run_dir, warn=warn)
    return ck[-1][1] if ck else None


def prepare_run_dir(run_dir: str | Path, *, resume: bool, overwrite: bool) -> Path:
    """Make ``run_dir`` ready for a run; refuse to mix two runs in one folder.

    A non-empty folder is used only to resume (``resume``) or, with ``overwrite``, replaced:
    it is deleted first, but only when it is a run folder (holds ``config.json``), so a mistyped
    ``--out .`` cannot wipe a project. Stale ``.partial/`` leftovers are removed.
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"{run_dir}: exists and is not a folder")
    busy = run_dir.is_dir() and any(run_dir.iterdir())
    if busy and not resume:
        if not overwrite:
            raise RunDirError(f"{run_dir}: run folder is not empty; pass --resume-from-checkpoint last to continue "
                              f"that run or --overwrite to replace it")
        if not (run_dir / "config.json").is_file():
            raise RunDirError(f"{run_dir}: --overwrite refused: not a run folder (no config.json)")
        remove_dir(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if (run_dir / PARTIAL).exists():
        shutil.rmtree(run_dir / PARTIAL)
    return run_dir


def file_fingerprint(path: str | Path) -> dict[str, Any]:
    """``{"path": absolute path, "bytes": size, "sha256": hex}`` of a data file."""
    path = Path(path).resolve()
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return {"path": str(path), "bytes": path.stat().st_size, "sha256": h.hexdigest()}


def changed_files(fingerprints: dict[str, dict[str, Any]]) -> list[str]:
    """Messages for every recorded file that is gone or whose content changed since training."""
    out = []
    for name, fp in (fingerprints or {}).items():
        p = Path(fp["path"])
        if not p.is_file():
            out.append(f"{name}: {p} no longer exists")
        elif file_fingerprint(p)["sha256"] != fp["sha256"]:
            out.append(f"{name}: {p} changed since training (sha256 differs)")
    return out


class RunFolderError(ValueError):
    """A run folder that cannot be read back; the message names the file and field."""


def checkpoints(run: Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every complete ``checkpoint-N`` and of ``final/`` (when its step is
    new), by step; incomplete checkpoints are skipped with a warning."""
    out = dict(complete_checkpoints(run))
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
