"""Selection of the best of a few candidates with every comparison in parallel.

A chain of running minima (``best = Mux(v & (x < best), x, best)`` per candidate) puts one
comparator and one multiplexer per candidate in series; with 32-bit values it was the slowest
path of the controller and of the SPANS unit on the LFE5U-85F. Here every pair is compared at
once and the winner is picked by a one-hot OR: one comparator deep, same result.
"""

from amaranth.hdl import Cat, Const, Mux

__all__ = ["onehot_best", "onehot_pick", "msb_index"]


def onehot_best(cands, better=lambda a, b: a < b):
    """One-hot winner flags of ``cands = [(valid, value), ...]``.

    Candidate ``i`` wins when it is valid, ``better`` than every valid earlier candidate and not
    worse than every valid later one: the best valid value, the earliest on a tie (what a running
    chain that replaces only on "strictly better" selects). No flag is set when none is valid.
    """
    wins = []
    for i, (v, x) in enumerate(cands):
        terms = [v]
        for j, (vj, xj) in enumerate(cands):
            if j < i:
                terms.append(~vj | better(x, xj))
            elif j > i:
                terms.append(~vj | ~better(xj, x))
        wins.append(Cat(*terms).all())
    return wins


def onehot_pick(wins, values, width):
    """``values[i]`` of the set flag in ``wins`` (0 when none is set), as a ``width``-bit OR."""
    out = Const(0, width)
    for w, x in zip(wins, values, strict=True):
        out = out | Mux(w, x, 0)
    return out


def msb_index(v):
    """``(any, index)``: whether ``v`` has a set bit and the index of its highest one (0 when
    none), as a balanced tree of log2(width) 2:1 multiplexer levels; a priority chain over the
    bits (``with m.If(v[i])`` per bit) is one level per bit (40 for the row sum of SOFTMAX)."""
    bits = [v[i] for i in range(len(v))]

    def tree(lo, n):
        if n == 1:
            return bits[lo], Const(0, 1)
        h = n // 2
        any_l, idx_l = tree(lo, h)
        any_h, idx_h = tree(lo + h, n - h)
        return any_l | any_h, Mux(any_h, idx_h + h, idx_l)
    return tree(0, len(bits))
