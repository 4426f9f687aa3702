"""Benchmark: talr's arithmetic coder vs a straightforward pure-Python coder and constriction.

Prints, at V=256 and V=49152, bits over the ideal code length per sequence and encoding
(and decoding) throughput in symbols/s, as ratios measured in this one run:

  (a) a pure-Python coder that quantises the full distribution at every step (the approach
      of DeepMind's language_modeling_is_compression arithmetic coder, re-implemented here);
  (b) constriction's range coder (optional peer: `pip install constriction`).

Targets (issue 2): <= ideal + 2 bits per sequence (+ n*delta); >= 20x (a) and >= 2x (b) at V=49152.
Run: .venv/bin/python experiments/bench/coding.py
"""
from __future__ import annotations

import time

import numpy as np

from theory.coding import decode, encode, ideal_code_length_bits, overhead_per_symbol_bits


class NaiveCoder:
    """Textbook arithmetic coder: at every step quantise all V probabilities in pure Python,
    build the cumulative table as a list, then narrow a 32-bit interval bit by bit."""

    PREC, BITS = 24, 32

    def encode(self, symbols, probs):
        full, half, quarter = (1 << self.BITS) - 1, 1 << (self.BITS - 1), 1 << (self.BITS - 2)
        low, high, pending, out = 0, full, 0, []
        for s, row in zip(symbols, probs.tolist()):
            freqs = [max(1, int(p * (1 << self.PREC))) for p in row]
            cum = [0]
            for f in freqs:
                cum.append(cum[-1] + f)
            total = cum[-1]
            rng = high - low + 1
            high = low + rng * cum[s + 1] // total - 1
            low = low + rng * cum[s] // total
            while True:
                if high < half:
                    out.append(0); out.extend([1] * pending); pending = 0
                elif low >= half:
                    out.append(1); out.extend([0] * pending); pending = 0
                    low -= half; high -= half
                elif low >= quarter and high < half + quarter:
                    pending += 1; low -= quarter; high -= quarter
                else:
                    break
                low, high = 2 * low, 2 * high + 1
        pending += 1
        bit = 0 if low < quarter else 1
        out.append(bit); out.extend([1 - bit] * pending)
        return len(out)


def workload(V, n, seed=0):
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((n, V)) * 2.5
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    sym = np.array([rng.choice(V, p=r) for r in p])
    return sym, p.astype(np.float32)  # LLM outputs are float32; both coders get the same rows


def timeit(fn, repeat=3):
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def constriction_coder():
    try:
        import constriction
    except ImportError:
        return None
    family = constriction.stream.model.Categorical(perfect=False)

    def enc(sym, p):
        e = constriction.stream.queue.RangeEncoder()
        e.encode(sym.astype(np.int32), family, p)
        return e.get_compressed(), e.num_bits()

    def dec(comp, p):
        d = constriction.stream.queue.RangeDecoder(comp)
        return d.decode(family, p)

    return enc, dec


def main():
    cons = constriction_coder()
    print(f"{'V':>6} {'n':>5} | {'talr bits-ideal':>15} {'bound':>7} | {'talr enc sym/s':>14} {'dec sym/s':>10} | "
          f"{'naive sym/s':>11} {'x naive':>8} | {'constr. sym/s':>13} {'x constr':>8} {'constr bits-ideal':>17}")
    for V, n, n_naive in [(256, 2000, 2000), (49152, 400, 40)]:
        sym, p = workload(V, n)
        ideal = ideal_code_length_bits(sym, p)
        t_enc, (data, nb) = timeit(lambda: encode(sym, p))
        t_dec, out = timeit(lambda: decode(data, nb, p), repeat=1)
        assert np.array_equal(out, sym)
        naive = NaiveCoder()
        t_naive, _ = timeit(lambda: naive.encode(sym[:n_naive], p[:n_naive]), repeat=1)
        ours, naive_rate = n / t_enc, n_naive / t_naive
        line = (f"{V:>6} {n:>5} | {nb - ideal:>15.3f} {2 + n * overhead_per_symbol_bits(V):>7.3f} | "
                f"{ours:>14.0f} {n / t_dec:>10.0f} | {naive_rate:>11.0f} {ours / naive_rate:>8.1f} | ")
        if cons:
            enc_c, dec_c = cons
            p32 = p
            t_c, (comp, nb_c) = timeit(lambda: enc_c(sym, p32))
            assert np.array_equal(dec_c(comp, p32), sym)
            line += f"{n / t_c:>13.0f} {(n / t_enc) / (n / t_c):>8.2f} {nb_c - ideal:>17.3f}"
        else:
            line += "constriction not installed"
        print(line)


if __name__ == "__main__":
    main()
