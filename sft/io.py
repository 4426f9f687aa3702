"""Atomic file output and JSON-safe values: the one place in talr that calls ``os.replace``.

Pure standard library (no torch), so the theory commands can use it too.

Invariant: a reader of ``path`` sees either the previous complete file (or none) or the new
complete file, never a partial one. Every writer here writes to a temporary sibling in the
same directory (same file system), flushes and fsyncs it, then renames it over ``path``
(``os.replace`` is atomic on POSIX). On any error the temporary file is removed and ``path``
is left untouched.

``atomic_path`` gives the temporary name to a callback, for writers that only accept a path
(``torch.save``, ``Figure.savefig``, ``save_pretrained`` of a folder); ``publish_dir`` renames a
completed temporary directory into place and refuses to replace a non-empty one silently.
"""
from __future__ import annotations

import gzip
import json
import math
import os
import re
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

__all__ = [
    "to_jsonable",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_path",
    "publish_dir",
    "write_with",
    "remove_dir",
    "text_lines",
    "json_lines",
    "umask_mode",
]


def to_jsonable(obj: Any) -> Any:
    """A copy of ``obj`` that ``json.dumps(..., allow_nan=False)`` accepts.

    numpy scalars and arrays become Python numbers and lists, paths become strings,
    dataclasses with ``to_dict`` are expanded, and non-finite floats become ``None``
    (JSON has no NaN/inf; a ``null`` says "not available" without lying).
    """
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "to_dict") and callable(obj.to_dict):
        return to_jsonable(obj.to_dict())
    tolist = getattr(obj, "tolist", None)  # numpy arrays and scalars, torch tensors
    if callable(tolist):
        return to_jsonable(tolist())
    item = getattr(obj, "item", None)
    if callable(item):
        return to_jsonable(item())
    raise TypeError(f"cannot convert {type(obj).__name__} to JSON")


def umask_mode(mode: int = 0o666) -> int:
    """``mode`` with the process's umask applied: what ``open``/``mkdir`` would give a new file or
    folder (``tempfile`` creates 0600 files and 0700 folders whatever the umask)."""
    try:  # Linux: read it without changing it (os.umask would, briefly, for every thread)
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return mode & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mode & ~mask


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on normal exit rename it onto ``path``.

    ``suffix`` defaults to ``path``'s own suffix (matplotlib picks the format from it).
    The caller writes the whole file at the yielded path (it exists, empty, on entry).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp.", suffix=path.suffix if suffix is None else suffix,
                               dir=path.parent)
    os.fchmod(fd, umask_mode(0o666))  # mkstemp makes it 0600; the published file follows the umask
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.is_file():
            with open(tmp_path, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; return ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically; return ``path``."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> Path:
    """Write ``to_jsonable(obj)`` as strict JSON (no NaN) atomically; return ``path``."""
    text = json.dumps(to_jsonable(obj), indent=indent, allow_nan=False)
    return atomic_write_text(path, text + "\n")


def publish_dir(tmp_dir: str | os.PathLike, final_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Rename a completed directory ``tmp_dir`` to ``final_dir`` (same file system).

    A non-empty ``final_dir`` is replaced only with ``overwrite=True`` (it is first moved
    aside, then deleted after the rename, so a crash leaves one complete copy).
    """
    tmp_dir, final_dir = Path(tmp_dir), Path(final_dir)
    if not tmp_dir.is_dir():
        raise FileNotFoundError(f"{tmp_dir}: not a directory")
    old = None
    if final_dir.exists():
        if final_dir.is_dir() and not any(final_dir.iterdir()):
            final_dir.rmdir()
        elif not overwrite:
            raise FileExistsError(f"{final_dir} exists and is not empty (pass overwrite=True to replace it)")
        else:
            old = final_dir.with_name(f".{final_dir.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(final_dir, old)
    os.replace(tmp_dir, final_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final_dir


def write_with(path: str | os.PathLike, writer: Callable[[Path], Any]) -> Path:
    """Call ``writer(tmp_path)`` and publish the result at ``path`` atomically."""
    with atomic_path(path) as tmp:
        writer(tmp)
    return Path(path)


def remove_dir(path: str | os.PathLike) -> None:
    """Delete the folder ``path`` so that no reader sees it half-deleted.

    It is first renamed to a hidden sibling (atomic), then removed; a crash in between leaves
    only the hidden ``.NAME.deleting`` folder, which the next call for the same ``path`` removes.
    """
    path = Path(path)
    aside = path.with_name(f".{path.name}.deleting")
    if aside.exists():
        shutil.rmtree(aside)
    if path.exists():
        os.replace(path, aside)
        shutil.rmtree(aside)


def text_lines(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    """``(1-based line number, text)`` of every line of a UTF-8 file (gzip when ``.gz``).

    A line that is not valid UTF-8 raises `ValueError` naming the file, the line and the byte
    offset (in the uncompressed stream) of the first bad byte.
    """
    path = os.fspath(path)
    opener = gzip.open if path.endswith(".gz") else open
    offset = 0
    with opener(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not UTF-8 text (byte offset {offset + exc.start} in the file, "
                                 f"byte 0x{raw[exc.start]:02x}); save the file as UTF-8") from None
            offset += len(raw)


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _lone_surrogate(obj: Any) -> str | None:
    """The field path (``messages[0].content``) of the first string in ``obj`` holding a lone
    UTF-16 surrogate (``"\\ud800"`` parses to a str that no encoder accepts), else None.
    Iterative: the depth is whatever the JSON parser accepted."""
    stack = [(obj, "")]
    while stack:
        x, where = stack.pop()
        if isinstance(x, str):
            try:
                x.encode("utf-8")
            except UnicodeEncodeError:
                return where or "<row>"
        elif isinstance(x, dict):
            stack.extend((v, f"{where}.{k}" if where else str(k)) for k, v in reversed(list(x.items())))
            stack.extend((k, where or "<row>") for k in x)
        elif isinstance(x, list):
            stack.extend((v, f"{where}[{i}]") for i, v in reversed(list(enumerate(x))))
    return None


def json_lines(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """``(1-based line number, parsed value)`` of every non-blank line of a JSONL file (gzip when ``.gz``).

    The one JSONL reader of talr. Every line that is not usable JSON text raises `ValueError`
    starting ``PATH:LINE:`` and saying what is wrong: not UTF-8 (with the byte offset), a syntax
    error (with the column), nesting deeper than the parser's recursion limit, an integer of more
    digits than Python converts, or a string holding a lone surrogate escape (``"\\ud800"``, not
    Unicode text; the message names the field).
    """
    path = os.fspath(path)
    for lineno, text in text_lines(path):
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{lineno}: field '<row>': invalid JSON: {exc.msg} (column {exc.colno})") from None
        except RecursionError:
            raise ValueError(f"{path}:{lineno}: field '<row>': invalid JSON: nested deeper than the parser's limit "
                             f"(~{sys.getrecursionlimit()} levels)") from None
        except ValueError as exc:  # e.g. an integer of more than 4300 digits
            raise ValueError(f"{path}:{lineno}: field '<row>': invalid JSON: {exc}") from None
        if _SURROGATE_ESCAPE.search(text):
            field = _lone_surrogate(obj)
            if field is not None:
                raise ValueError(f"{path}:{lineno}: field {field!r}: a lone surrogate escape (\\ud800-\\udfff "
                                 f"without its pair) is not Unicode text")
        yield lineno, obj


def write_jsonl(path: str | os.PathLike, rows) -> str:
    """Write ``rows`` (dicts) as strict JSON lines atomically; return ``str(path)``."""
    text = "".join(json.dumps(to_jsonable(r), allow_nan=False) + "\n" for r in rows)
    atomic_write_text(path, text)
    return str(path)


# ---------------------------------------------------------------------------------- peak memory
def status_kib(key: str, status: str = "/proc/self/status") -> int | None:
    """A ``kB`` field of the process status file (Linux), None where there is none."""
    try:
        with open(status) as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (``VmHWM``) to the current RSS, so that :func:`peak_rss_gb`
    after some work is that work's peak. Large tensors are mmap-ed by the allocator and unmapped
    when freed, so RSS follows the live tensors. False where the mark cannot be reset (not Linux,
    or ``/proc/self/clear_refs`` not writable): the peak then counts from the process start."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_rss_gb(status: str = "/proc/self/status") -> float | None:
    """The process's peak resident memory since the last :func:`reset_peak_rss` (or its start), in
    GB (10^9 bytes); None where the status file has no ``VmHWM`` (not Linux)."""
    return _status_gb("VmHWM", status)


def rss_gb(status: str = "/proc/self/status") -> float | None:
    """The process's resident memory now (``VmRSS``), in GB; None where the status file lacks it."""
    return _status_gb("VmRSS", status)


def _status_gb(key: str, status: str) -> float | None:
    kib = status_kib(key, status)
    return None if kib is None else kib * 1024 / 1e9


def release_free_memory() -> bool:
    """Return the allocator's free heap pages to the system (glibc ``malloc_trim(0)``) after a
    garbage collection. Tensors below glibc's mmap threshold (which rises to 32 MB after the first
    large free) live on the heap; once freed, fragmented pages stay resident and count in RSS until
    trimmed, so a phase that frees many activations would hand its resident size to the next.
    False where there is no glibc (nothing done but the collection)."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        return bool(ctypes.CDLL(name).malloc_trim(0) >= 0)
    except (OSError, AttributeError):
        return False
