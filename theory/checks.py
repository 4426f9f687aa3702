"""The one validation layer: numeric options are range-checked where they are parsed.

`check_range` is used by `sft.trainer.TrainConfig`, the ``talr bounds`` / ``simulate`` / ``claims``
commands and `theory.simulate.SoftmaxConfig`; every message names the option, the value and the
allowed range, e.g. ``--lam: 1000.0 is outside [0, 1]``.
"""
from __future__ import annotations

import math

__all__ = ["check_range", "ranged"]


def _fmt(x: float) -> str:
    return "inf" if x == math.inf else "-inf" if x == -math.inf else f"{x:g}"


def check_range(name: str, value, lo: float = -math.inf, hi: float = math.inf, *, lo_open: bool = False,
                hi_open: bool = False, integer: bool = False, allow_none: bool = False):
    """Return ``value`` when it is a finite number in the interval; raise `ValueError` otherwise.

    ``lo_open`` / ``hi_open`` exclude the end point; ``integer`` requires an int; ``allow_none``
    lets ``None`` (meaning "automatic") through. NaN and infinities are always refused (an
    infinite bound of the interval is open).
    """
    if value is None and allow_none:
        return value
    left = "(" if lo_open or lo == -math.inf else "["
    right = ")" if hi_open or hi == math.inf else "]"
    interval = f"{left}{_fmt(lo)}, {_fmt(hi)}{right}"
    what = "an integer" if integer else "a finite number"
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: {value!r} is not {what} in {interval}") from None
    if integer and (isinstance(value, bool) or int(x) != x):
        raise ValueError(f"{name}: {value!r} is not {what} in {interval}")
    if not math.isfinite(x):
        raise ValueError(f"{name}: {value!r} is not {what} in {interval}")
    if x < lo or x > hi or (lo_open and x == lo) or (hi_open and x == hi):
        raise ValueError(f"{name}: {value!r} is outside {interval}")
    return value


def ranged(name: str, lo: float = -math.inf, hi: float = math.inf, **opt):
    """An argparse ``type=``: parse a number and `check_range` it (``integer=True`` for ints).

    argparse reports the error as ``argument --NAME: 0 is outside [1, inf)``.
    """
    import argparse

    integer = opt.get("integer", False)

    def conv(text):
        try:
            v = int(text) if integer else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{'an integer' if integer else 'a number'} is needed, got {text!r}")
        try:
            return check_range(name, v, lo, hi, **opt)
        except ValueError as exc:  # argparse prefixes "argument --NAME: "
            raise argparse.ArgumentTypeError(str(exc).split(": ", 1)[1]) from None

    return conv
