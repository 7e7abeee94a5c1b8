"""Integer primitives of the vitamin number formats.

One rounding rule everywhere: round half up (towards +infinity), ``(x + 2^(s-1)) >> s`` with an
arithmetic shift. One narrowing rule everywhere: saturate, never wrap. Every function works on
Python ints and on int64 NumPy arrays; callers guarantee that intermediates fit 63 bits (the
configuration's limits make that true, see docs/ISA.md "Widths").
"""

from __future__ import annotations

import numpy as np

__all__ = ["rshift_round", "saturate", "sat_count", "Sat", "bit_length", "requant_params"]


def rshift_round(x, s):
    """Arithmetic right shift by ``s`` (0..62) with round half up. ``s`` may be an array."""
    x = np.asarray(x, dtype=np.int64)
    s = np.asarray(s, dtype=np.int64)
    half = np.where(s > 0, np.left_shift(np.int64(1), np.maximum(s - 1, 0)), 0)
    return np.right_shift(x + half, s)


def saturate(x, bits: int):
    """Clamp to the signed range of ``bits`` bits."""
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return np.clip(np.asarray(x, dtype=np.int64), lo, hi)


def sat_count(x, bits: int) -> tuple[np.ndarray, int]:
    """:func:`saturate` and the number of elements that were out of range."""
    x = np.asarray(x, dtype=np.int64)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    n = int(np.count_nonzero((x < lo) | (x > hi)))
    return np.clip(x, lo, hi), n


class Sat:
    """Saturation with an event counter (the hardware's ``sat_events`` counter)."""

    def __init__(self):
        self.events = 0

    def __call__(self, x, bits: int):
        y, n = sat_count(x, bits)
        self.events += n
        return y

    def unsigned(self, x, bits: int):
        x = np.asarray(x, dtype=np.int64)
        hi = (1 << bits) - 1
        self.events += int(np.count_nonzero((x < 0) | (x > hi)))
        return np.clip(x, 0, hi)


def bit_length(x):
    """Bit length of non-negative int64 values (0 for 0), element-wise."""
    x = np.asarray(x, dtype=np.int64)
    out = np.zeros(x.shape, dtype=np.int64)
    v = x.copy()
    for sh in (32, 16, 8, 4, 2, 1):
        m = v >= (np.int64(1) << sh)
        out = np.where(m, out + sh, out)
        v = np.where(m, v >> sh, v)
    return out + (v > 0)


def requant_params(factor: float, mult_bits: int = 16) -> tuple[int, int]:
    """(mult, shift) with mult / 2^shift ~= factor, |mult| < 2^(mult_bits-1), shift in 0..62.

    The multiplier is normalised to use the full precision (|mult| in [2^(mult_bits-2),
    2^(mult_bits-1))) unless the shift range is exhausted. Raises ValueError when the factor
    cannot be represented (too large, or zero/NaN).
    """
    import math
    if not math.isfinite(factor) or factor == 0:
        raise ValueError(f"requantisation factor {factor!r} must be finite and non-zero")
    top = 1 << (mult_bits - 1)
    e = math.floor(math.log2(abs(factor)))
    shift = (mult_bits - 2) - e
    shift = min(max(shift, 0), 62)
    mult = int(math.floor(factor * (1 << shift) + 0.5))
    if abs(mult) >= top:
        if shift == 0:
            raise ValueError(f"requantisation factor {factor!r} too large for a "
                             f"{mult_bits}-bit multiplier")
        shift -= 1
        mult = int(math.floor(factor * (1 << shift) + 0.5))
    if mult == 0:
        raise ValueError(f"requantisation factor {factor!r} too small (below 2^-62)")
    return mult, shift
