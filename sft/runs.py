"""The run folder written by `sft.trainer.train`, and everything that reads it back.

Writing side (used by the trainer): a folder named ``checkpoint-N`` appears in the run folder
only when it is complete. Each checkpoint is written under ``.partial/checkpoint-N`` and renamed
into place (`sft.io.publish_dir`) after its last file; old checkpoints are removed by renaming
them aside first (`sft.io.remove_dir`). A ``kill -9`` therefore leaves at most an incomplete
folder under ``.partial/``, which readers never see. `prepare_run_dir` refuses to mix two runs.

Ownership and exclusivity: `open_run_dir` writes a marker file (``.talr-run``) into every folder
talr creates as a run (train, simulate, demo); ``--overwrite`` deletes only a folder holding
that marker, never through a symbolic link, never a folder that is or holds an input the user
gave (model, data). It holds an exclusive ``fcntl.flock`` on ``.talr-lock`` in the folder for
the life of the run: a second process is refused at once. `check_out_dir` makes the same checks
(and that the folder can be written) without touching anything, so a command can refuse before
any work. `config_mismatch` names the fields in which a resumed run's configuration differs.

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

import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

from .io import remove_dir

__all__ = ["user_cache_dir", "PARTIAL", "MARKER", "LOCK", "RunLock", "open_run_dir", "check_out_dir", "run_kind", "mark_run_dir",
           "config_mismatch", "checkpoint_problem", "complete_checkpoints", "last_checkpoint", "prepare_run_dir",
           "file_fingerprint", "changed_files", "RunDirError", "RunFolderError", "checkpoints", "load_initial",
           "load_checkpoint"]

PARTIAL = ".partial"  # staging folder of checkpoints being written
MARKER = ".talr-run"  # written into every folder talr creates as a run: only these may be overwritten
LOCK = ".talr-lock"  # flock'ed for the life of a run
_OWN = {MARKER, LOCK}
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


def user_cache_dir(name: str) -> Path:
    """Where talr caches ``name`` (pretrained tiny worlds: ``"worlds"``) for this user, outside any
    working folder: ``$TALR_CACHE_DIR/name``, else ``$XDG_CACHE_HOME/talr/name``, else
    ``~/.cache/talr/name``."""
    root = os.environ.get("TALR_CACHE_DIR")
    if root:
        return Path(root).expanduser() / name
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "talr" / name


def run_kind(folder: str | Path) -> str | None:
    """The kind (``"train"``, ``"simulate"``, ``"demo"``, ...) talr wrote into ``folder``'s marker,
    or None when ``folder`` is not a folder talr created."""
    marker = Path(folder) / MARKER
    if not marker.is_file():
        return None
    try:
        return str(json.loads(marker.read_text(encoding="utf-8")).get("kind") or "run")
    except (ValueError, UnicodeDecodeError, AttributeError):
        return "run"


def mark_run_dir(folder: str | Path, kind: str) -> None:
    """Write the marker that makes ``folder`` a talr ``kind`` folder (``--overwrite`` may delete it)."""
    (Path(folder) / MARKER).write_text(json.dumps({"kind": kind, "by": "talr"}) + "\n", encoding="utf-8")


def _busy(folder: Path) -> bool:
    """True when ``folder`` holds anything but talr's own marker and lock files."""
    return folder.is_dir() and any(p.name not in _OWN for p in folder.iterdir())


def _holds(outer: Path, inner: Path) -> bool:
    return inner == outer or outer in inner.parents


def _writable(folder: Path) -> str | None:
    """Why nothing can be created in ``folder`` (or, when it does not exist, in its nearest
    existing parent), or None. A real probe (a temporary folder, removed at once): ``os.access``
    says yes to root on a read-only file system."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        os.rmdir(tempfile.mkdtemp(dir=probe, prefix=".talr-probe-"))
    except OSError as exc:
        what = "is not writable" if probe == folder else f"cannot be created: {probe} is not writable"
        return f"{what} ({exc.strerror or exc})"
    return None


def check_out_dir(run_dir: str | Path, *, overwrite: bool, resume: bool = False, protect=(), kind: str | None = None,
                  flag: str = "--out", hint: str = "pass --overwrite to replace it") -> None:
    """Refuse (`RunDirError`, one line naming ``flag``) what `open_run_dir` would refuse, before
    any work and without changing anything.

    ``protect``: paths the user gave as inputs (model, tokenizer, data); ``run_dir`` may not be
    one of them nor hold one. ``kind``: a non-empty ``run_dir`` whose marker has this kind is
    reused (a cached demo); any other non-empty folder needs ``overwrite`` and a talr marker.
    """
    run_dir = Path(run_dir)
    where = f"{flag} {run_dir}"
    if overwrite and run_dir.is_symlink():
        raise RunDirError(f"{where}: is a symbolic link; --overwrite never deletes through a link "
                          f"(pass the folder it points to, or remove the link)")
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"{where}: is a file, not a folder")
    real = Path(os.path.realpath(run_dir))
    for p in protect:
        if p and Path(p).exists() and _holds(real, Path(os.path.realpath(p))):
            raise RunDirError(f"{where}: is (or holds) the input {p}; write the run to another folder")
    why = _writable(run_dir)
    if why:
        raise RunDirError(f"{where}: {why}")
    if resume or not _busy(run_dir) or (kind is not None and run_kind(run_dir) == kind and not overwrite):
        return
    if not overwrite:
        raise RunDirError(f"{where}: folder is not empty; {hint}")
    if run_kind(run_dir) is None:
        raise RunDirError(f"{where}: --overwrite refused: not a folder talr created (no {MARKER} marker); "
                          f"remove it yourself or choose another folder")


class RunLock:
    """An exclusive ``flock`` on ``FOLDER/.talr-lock`` (released by `release` or at process exit)."""

    def __init__(self, folder: Path, fd: int, created: bool):
        self.folder, self._fd, self.created = folder, fd, created

    @classmethod
    def acquire(cls, folder: Path, created: bool = False) -> "RunLock":
        import fcntl

        path = folder / LOCK
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunDirError(f"{folder}: in use by another talr process (pid {holder}); wait for it to "
                                  f"finish or use another folder") from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return cls(folder, fd, created)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def discard_if_unused(self) -> None:
        """Release, and remove the folder when this run created it and wrote nothing into it."""
        self.release()
        if self.created and self.folder.is_dir() and not _busy(self.folder):
            shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def _clear_dir(folder: Path) -> None:
    """Delete everything in ``folder`` but its lock file (held by us), via a hidden sibling so that
    no reader sees a half-deleted run."""
    aside = folder.with_name(f".{folder.name}.deleting")
    if aside.exists():
        shutil.rmtree(aside)
    aside.mkdir()
    for p in folder.iterdir():
        if p.name != LOCK:
            os.replace(p, aside / p.name)
    shutil.rmtree(aside)


def open_run_dir(run_dir: str | Path, *, resume: bool, overwrite: bool, kind: str = "train", protect=(),
                 flag: str = "--out", hint: str | None = None) -> RunLock:
    """Make ``run_dir`` ready for a run and lock it; refuse to mix two runs in one folder.

    The checks of `check_out_dir` (``hint``: what to tell the user about a non-empty folder), then
    an exclusive lock (a second process is refused at once), then: a non-empty folder is used to
    resume (``resume``), reused when its marker has ``kind`` (a cached study; not for ``"train"``),
    or, with ``overwrite`` and a talr marker, emptied. The marker is written, stale ``.partial/`` leftovers
    are removed. Returns the held `RunLock`.
    """
    run_dir = Path(run_dir)
    hint = hint or ("pass --resume-from-checkpoint last to continue that run or --overwrite to replace it"
                    if kind == "train" else "pass --overwrite to replace it")
    reuse = None if kind == "train" else kind
    check_out_dir(run_dir, overwrite=overwrite, resume=resume, protect=protect, kind=reuse, flag=flag, hint=hint)
    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunDirError(f"{flag} {run_dir}: cannot create it ({exc.strerror or exc})") from None
    lock = RunLock.acquire(run_dir, created)
    try:
        own = reuse is not None and run_kind(run_dir) == reuse and not overwrite
        if _busy(run_dir) and not resume and not own:
            check_out_dir(run_dir, overwrite=overwrite, flag=flag, hint=hint)  # again, under the lock
            _clear_dir(run_dir)
        if run_kind(run_dir) is None:
            mark_run_dir(run_dir, kind)
        if (run_dir / PARTIAL).exists():
            shutil.rmtree(run_dir / PARTIAL)
    except BaseException:
        lock.discard_if_unused()
        raise
    return lock


def prepare_run_dir(run_dir: str | Path, *, resume: bool, overwrite: bool) -> Path:
    """`open_run_dir` for a training run, without keeping the lock (see `open_run_dir`)."""
    open_run_dir(run_dir, resume=resume, overwrite=overwrite).release()
    return Path(run_dir)


# fields that may differ between a run and its resumption (bookkeeping, not the training itself)
RESUME_FREE = frozenset({"out", "resume_from_checkpoint", "overwrite", "progress", "dataloader_num_workers",
                         "save_total_limit", "save_steps", "logging_steps", "chunked_lm_head", "data_files",
                         "n_examples", "n_dropped"})


def config_mismatch(old: dict, new: dict) -> list[str]:
    """``"field: old -> new"`` for every field in which ``new`` (a resolved run configuration about
    to resume) differs from ``old`` (the run's ``config.json``), data files compared by sha256."""
    new = json.loads(json.dumps(new, default=str))  # tuples -> lists, paths -> str, as config.json holds them
    out = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
           if k not in RESUME_FREE and old.get(k) != new.get(k)]
    of, nf = old.get("data_files") or {}, new.get("data_files") or {}
    for name in sorted(set(of) | set(nf)):
        a, b = (of.get(name) or {}).get("sha256"), (nf.get(name) or {}).get("sha256")
        if a != b:
            out.append(f"{name} file: sha256 {str(a)[:12]}... -> {str(b)[:12]}...")
    return out


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
