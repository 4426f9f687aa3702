"""Arithmetic coding with real bit counts: the LLM compression protocol (Definition 3.2).

A response ``z = (z_1 .. z_n)`` is coded with per-step distributions ``q(. | z_<t)``; the
ideal code length is ``-log2 Q(z) = -sum_t log2 q(z_t | z_<t)`` (:func:`ideal_code_length_bits`).

The coder (Witten, Neal & Cleary 1987, with Python integers as registers):

* **Quantisation.** Each row ``p`` of ``probs[n, V]`` is normalised by its float sum
  ``S`` and mapped to an integer cumulative table on a total of ``2**PRECISION``::

      F(j) = min(floor(K * c_j / S), K) + j,   c_j ~ p_0 + ... + p_{j-1},   K = 2**PRECISION - V

  so every symbol gets frequency ``F(j+1) - F(j) >= 1`` and ``F(j+1) - F(j) > K p_j / S``.
  ``c_j`` comes from a two-level table (:class:`_Tables`): block sums over blocks of
  ``B ~ 256`` symbols (one vectorised pass per row) plus a running sum inside the coded
  symbol's block. Encoding needs only the coded symbol's two table entries, computed for
  all steps at once, instead of quantising the whole vocabulary at every step.
* **Per-symbol overhead.** ``freq / 2**PRECISION >= (p_j / S) * (1 - V / 2**PRECISION)``
  and splitting the ``STATE_BITS``-bit interval loses at most a factor
  ``1 - 2**(PRECISION + 2 - STATE_BITS)``. Hence :func:`overhead_per_symbol_bits`
  ``delta(V) = -log2(1 - V/2**PRECISION) - log2(1 - 2**(PRECISION+2-STATE_BITS))``
  (about ``1.65e-5`` bits at ``V = 49152``).
* **Guarantee.** ``num_bits <= -log2 Q(z) + 2 + n * delta(V)`` with ``Q`` the normalised
  model probabilities; the ``+2`` is the termination (two bits pin a point inside the
  final interval; the decoder reads zeros past the end).
* **Smallest probability.** Any ``p_j >= 0`` is codable: its frequency is at least 1, so a
  symbol costs at most ``PRECISION`` (= 32) bits plus the overhead, even below
  ``2**-32`` (e.g. ``1e-12``), where the real cost is *below* the ideal one.

Encoder and decoder evaluate ``c_j`` with the same numpy reductions (row-wise block sums,
row-wise running sums), so both sides build bit-identical tables; the guarantee above holds
up to float rounding of ``c_j`` (relative ``2**-53`` for float64 rows, ``2**-24`` for float32).
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

__all__ = [
    "PRECISION",
    "STATE_BITS",
    "encode",
    "decode",
    "decode_with_model",
    "ideal_code_length_bits",
    "overhead_per_symbol_bits",
    "code_length_bound_bits",
]

PRECISION = 32  # frequency total is 2**PRECISION
STATE_BITS = 64  # interval registers
_FULL = (1 << STATE_BITS) - 1
_HALF = 1 << (STATE_BITS - 1)
_QUARTER = 1 << (STATE_BITS - 2)
_TOTAL = 1 << PRECISION


def overhead_per_symbol_bits(vocab_size: int) -> float:
    """Per-symbol quantisation overhead ``delta`` (bits) for a vocabulary of ``V`` symbols."""
    if vocab_size >= _TOTAL:
        raise ValueError(f"vocabulary of {vocab_size} symbols needs PRECISION > {PRECISION}")
    return float(
        -np.log2(1.0 - vocab_size / _TOTAL) - np.log2(1.0 - 2.0 ** (PRECISION + 2 - STATE_BITS))
    )


def ideal_code_length_bits(symbols: Sequence[int], probs: np.ndarray) -> float:
    """``-log2 Q(z)`` with each row of ``probs`` normalised to sum 1."""
    probs = np.asarray(probs, dtype=np.float64)
    sym = np.asarray(symbols, dtype=np.int64)
    p = probs[np.arange(sym.size), sym] / probs.sum(axis=1)
    with np.errstate(divide="ignore"):
        return float(-np.log2(p).sum())


def code_length_bound_bits(symbols: Sequence[int], probs: np.ndarray) -> float:
    """The guaranteed upper bound ``-log2 Q(z) + 2 + n * delta(V)`` on ``num_bits``."""
    probs = np.asarray(probs)
    return ideal_code_length_bits(symbols, probs) + 2.0 + len(symbols) * overhead_per_symbol_bits(probs.shape[1])


def _check_probs(probs: np.ndarray, n: int | None = None, check: bool = True) -> np.ndarray:
    probs = np.asarray(probs)
    if probs.dtype not in (np.float32, np.float64):
        probs = probs.astype(np.float64)
    probs = np.ascontiguousarray(probs)
    if probs.ndim != 2:
        raise ValueError(f"probs must be a 2-D matrix [n, V], got shape {probs.shape}")
    if n is not None and probs.shape[0] != n:
        raise ValueError(f"probs has {probs.shape[0]} rows for {n} symbols")
    if probs.shape[1] >= _TOTAL:
        raise ValueError(f"vocabulary of {probs.shape[1]} symbols is too large for PRECISION={PRECISION}")
    if check and probs.size and not probs.min() >= 0:  # also false for NaN
        row = int(np.flatnonzero(~(probs >= 0).all(1))[0])
        raise ValueError(f"probs row {row} has a negative or NaN entry")
    return probs


def _block_size(V: int) -> int:
    """Block length for the two-level cumulative table (a divisor of V near 256)."""
    if V <= 1024:
        return V
    divisors = [d for d in range(64, 1025) if V % d == 0]
    return min(divisors, key=lambda d: abs(d - 256)) if divisors else 0


class _Tables:
    """Two-level cumulative sums of a batch of rows.

    ``c(j) = fl(blockcum[b-1] + min(inner_b(r), bsum[b]))`` for ``j = b*B + r``, where
    ``inner_b(r)`` is the sequential cumsum of the first ``r`` entries of block ``b``.
    Floating-point addition is monotone, so ``c`` is non-decreasing in ``j`` and equal on
    both sides of a block boundary; encoder and decoder evaluate the same expression.
    Cost per row: one vectorised pass for the block sums plus ``O(B)`` for one block.
    """

    def __init__(self, probs: np.ndarray, check_blocks: bool = True):
        self.check_blocks = check_blocks
        n, V = probs.shape
        B = _block_size(V)
        if B == 0:  # no divisor near 256: pad with zeros (one copy)
            B = 256
            pad = (-V) % B
            probs = np.concatenate([probs, np.zeros((n, pad), dtype=probs.dtype)], axis=1)
        self.probs, self.V, self.B = probs, V, B
        # numpy's own reduction over the contiguous block axis: a row gives the same floats
        # alone or inside a batch (a BLAS matrix-vector product does not; see the tests).
        bsum = probs.reshape(n, -1, B).sum(axis=2).astype(np.float64)
        if not np.all(np.isfinite(bsum)) or np.any(bsum < 0):
            bad = ~np.isfinite(bsum).all(1) | (bsum < 0).any(1)
            raise ValueError(f"probs row {int(np.flatnonzero(bad)[0])} is not finite or has negative entries")
        self.bsum = bsum
        self.bcum = np.cumsum(bsum, axis=1)
        total = self.bcum[:, -1]
        if np.any(total <= 0):
            raise ValueError(f"probs row {int(np.flatnonzero(total <= 0)[0])} sums to zero")
        self.K = _TOTAL - V
        self.scale = self.K / total

    def inner(self, t: int, b: int) -> np.ndarray:
        """Exclusive prefix sums inside block ``b`` of row ``t`` (length B + 1)."""
        blk = self.probs[t, b * self.B : (b + 1) * self.B]
        if self.check_blocks and not blk.min() >= 0:
            raise ValueError(f"probs row {t} has a negative or NaN entry")
        out = np.zeros(self.B + 1)
        out[1:] = np.cumsum(blk[None, :], axis=1)[0]  # same row-wise path as ranges()
        return out

    def F_block(self, t: int, b: int, r: np.ndarray | int, inner: np.ndarray) -> np.ndarray:
        """Table entries ``F(j)`` for ``j = b*B + r``."""
        prev = self.bcum[t, b - 1] if b > 0 else 0.0
        c = prev + np.minimum(inner[r], self.bsum[t, b])
        return np.minimum(np.floor(c * self.scale[t]), self.K).astype(np.int64) + (b * self.B + r)

    def ranges(self, sym: np.ndarray) -> tuple[list[int], list[int]]:
        """``(F(z_t), F(z_t + 1))`` for every step at once (vectorised over the batch).

        Needs only the coded symbol's block per row: ``O(n * B)`` on top of the block sums.
        """
        n, B, K = sym.size, self.B, self.K
        b, r = np.divmod(sym, B)
        rows = np.arange(n)
        blocks = self.probs.reshape(n, -1, B)[rows, b]  # [n, B]
        if self.check_blocks and n and not blocks.min() >= 0:
            t = int(np.flatnonzero(~(blocks >= 0).all(1))[0])
            raise ValueError(f"probs row {t} has a negative or NaN entry")
        cs = np.zeros((n, B + 1))
        cs[:, 1:] = np.cumsum(blocks, axis=1)  # native dtype, row-wise as in inner()
        prev = np.where(b > 0, self.bcum[rows, np.maximum(b - 1, 0)], 0.0)
        bs = self.bsum[rows, b]
        c_lo = prev + np.minimum(cs[rows, r], bs)
        c_hi = np.where(r + 1 == B, self.bcum[rows, b], prev + np.minimum(cs[rows, r + 1], bs))
        lo = np.minimum(np.floor(c_lo * self.scale), K).astype(np.int64) + sym
        hi = np.minimum(np.floor(c_hi * self.scale), K).astype(np.int64) + sym + 1
        return lo.tolist(), hi.tolist()

    def find(self, t: int, target: int) -> tuple[int, int, int]:
        """Symbol ``j`` with ``F(j) <= target < F(j+1)`` and its range."""
        starts = np.concatenate([[0.0], self.bcum[t, :-1]])
        Fb = np.minimum(np.floor(starts * self.scale[t]), self.K).astype(np.int64) + np.arange(starts.size) * self.B
        b = int(np.searchsorted(Fb, target, side="right")) - 1
        inner = self.inner(t, b)
        Fin = self.F_block(t, b, np.arange(self.B + 1), inner)
        Fin[self.B] = min(int(np.floor(self.bcum[t, b] * self.scale[t])), self.K) + (b + 1) * self.B
        r = int(np.searchsorted(Fin, target, side="right")) - 1
        r = min(r, self.B - 1)
        j = b * self.B + r
        if j >= self.V:
            raise ValueError("corrupt code: decoded a padding symbol")
        return j, int(Fin[r]), int(Fin[r + 1])


def _narrow(low: int, high: int, lo: int, hi: int, total: int) -> tuple[int, int]:
    """The sub-interval of ``[low, high]`` for a symbol with cumulative range ``[lo, hi)``
    out of ``total`` (shared by encoder and decoder, which must split identically)."""
    rng = high - low + 1
    return low + (rng * lo) // total, low + (rng * hi) // total - 1


class _BitWriter:
    """Collects bits as (value, width) chunks; joined once at the end."""

    __slots__ = ("chunks", "n")

    def __init__(self):
        self.chunks: list[tuple[int, int]] = []
        self.n = 0

    def write(self, value: int, width: int) -> None:
        if width:
            self.chunks.append((value, width))
            self.n += width

    def to_bytes(self) -> bytes:
        acc = 0
        for v, w in self.chunks:  # linear: python ints shift in O(size) but chunks are few
            acc = (acc << w) | v
        pad = (-self.n) % 8
        return (acc << pad).to_bytes((self.n + pad) // 8, "big") if self.n else b""


class _Encoder:
    def __init__(self):
        self.low, self.high, self.pending = 0, _FULL, 0
        self.out = _BitWriter()

    def _emit(self, bit: int) -> None:
        self.out.write(bit, 1)
        if self.pending:
            self.out.write(((1 << self.pending) - 1) if bit == 0 else 0, self.pending)
            self.pending = 0

    def push(self, lo: int, hi: int, total: int) -> None:
        """Narrow the interval to the symbol's ``[lo, hi)`` out of ``total``."""
        low, high = _narrow(self.low, self.high, lo, hi, total)
        while True:
            if high < _HALF or low >= _HALF:
                # k equal leading bits of low and high leave at once (k rounds of E1/E2)
                k = STATE_BITS - (low ^ high).bit_length()
                top = low >> (STATE_BITS - k)
                self._emit(top >> (k - 1))
                self.out.write(top & ((1 << (k - 1)) - 1), k - 1)
                low = (low << k) & _FULL
                high = ((high << k) & _FULL) | ((1 << k) - 1)
            elif low >= _QUARTER and high < _HALF + _QUARTER:
                self.pending += 1
                low = (low - _QUARTER) << 1
                high = ((high - _QUARTER) << 1) | 1
            else:
                break
        self.low, self.high = low, high

    def finish(self) -> tuple[bytes, int]:
        self.pending += 1
        self._emit(0 if self.low < _QUARTER else 1)
        return self.out.to_bytes(), self.out.n


class _Decoder:
    def __init__(self, data: bytes, num_bits: int):
        if num_bits < 0 or num_bits > 8 * len(data):
            raise ValueError(f"num_bits={num_bits} does not fit in {len(data)} bytes")
        # Bits past num_bits are read as zeros (the encoder's termination relies on it).
        self.bits = int.from_bytes(data, "big") >> (8 * len(data) - num_bits) if num_bits else 0
        self.num_bits = num_bits
        self.pos = 0
        self.low, self.high = 0, _FULL
        self.value = self._read(STATE_BITS)

    def _read(self, k: int) -> int:
        # k bits starting at self.pos of a num_bits-long stream, zero-padded.
        end = self.pos + k
        self.pos = end
        if end <= self.num_bits:
            return (self.bits >> (self.num_bits - end)) & ((1 << k) - 1)
        avail = max(0, self.num_bits - (end - k))
        head = self.bits & ((1 << avail) - 1) if avail else 0
        return head << (k - avail)

    def target(self, total: int) -> int:
        rng = self.high - self.low + 1
        return ((self.value - self.low + 1) * total - 1) // rng

    def pop(self, lo: int, hi: int, total: int) -> None:
        low, high = _narrow(self.low, self.high, lo, hi, total)
        value = self.value
        while True:
            if high < _HALF or low >= _HALF:
                k = STATE_BITS - (low ^ high).bit_length()
                low = (low << k) & _FULL
                high = ((high << k) & _FULL) | ((1 << k) - 1)
                value = ((value << k) & _FULL) | self._read(k)
            elif low >= _QUARTER and high < _HALF + _QUARTER:
                low = (low - _QUARTER) << 1
                high = ((high - _QUARTER) << 1) | 1
                value = ((value - _QUARTER) << 1) | self._read(1)
            else:
                break
        self.low, self.high, self.value = low, high, value


def encode(symbols: Sequence[int], probs: np.ndarray, *, full_check: bool = False) -> tuple[bytes, int]:
    """Code ``symbols[t]`` with distribution ``probs[t]`` (batch-first ``[n, V]``).

    Returns ``(data, num_bits)``: the code and its real length in bits, with
    ``num_bits <= -log2 Q(z) + 2 + n * overhead_per_symbol_bits(V)`` (up to float rounding
    of the cumulative sums, relative ``2**-53`` for float64 rows, ``2**-24`` for float32).
    Validation: non-finite rows and non-positive block sums always raise, and so does a
    negative/NaN entry in the coded symbol's block (what decodability rests on);
    ``full_check=True`` adds a full scan of ``probs`` for negative entries (one more pass).
    """
    sym = np.asarray(symbols, dtype=np.int64).ravel()
    probs = _check_probs(probs, sym.size, full_check)
    V = probs.shape[1]
    if sym.size and (sym.min() < 0 or sym.max() >= V):
        t = int(np.flatnonzero((sym < 0) | (sym >= V))[0])
        raise ValueError(f"symbol {int(sym[t])} at position {t} is outside 0..{V - 1}")
    tables = _Tables(probs, check_blocks=not full_check)  # a full check already covers blocks
    enc = _Encoder()
    for lo, hi in zip(*tables.ranges(sym)):
        enc.push(lo, hi, _TOTAL)
    return enc.finish()


def decode(data: bytes, num_bits: int, probs: np.ndarray) -> np.ndarray:
    """Inverse of :func:`encode` given the same ``probs[n, V]``; returns ``n`` symbols."""
    tables = _Tables(_check_probs(probs, check=False))
    dec = _Decoder(data, num_bits)
    out = np.empty(tables.probs.shape[0], dtype=np.int64)
    for t in range(out.size):
        j, lo, hi = tables.find(t, dec.target(_TOTAL))
        dec.pop(lo, hi, _TOTAL)
        out[t] = j
    return out


def decode_with_model(
    data: bytes,
    num_bits: int,
    next_probs: Callable[[tuple[int, ...]], np.ndarray],
    *,
    max_symbols: int,
    eos: int | None = None,
) -> list[int]:
    """Decode with a model: ``next_probs(prefix) -> probs[V]`` at every step.

    Stops after ``max_symbols`` symbols, or right after decoding ``eos`` (included in the
    output) when given. The encoder must have used the same distributions, i.e.
    ``encode(z, stack([next_probs(z[:t]) for t]))`` with the same dtype.
    """
    dec = _Decoder(data, num_bits)
    prefix: list[int] = []
    for _ in range(max_symbols):
        tables = _Tables(_check_probs(np.asarray(next_probs(tuple(prefix)))[None, :], check=False))
        j, lo, hi = tables.find(0, dec.target(_TOTAL))
        dec.pop(lo, hi, _TOTAL)
        prefix.append(j)
        if eos is not None and j == eos:
            break
    return prefix
