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
    bits (``with m.If(v[i])`` per bit) is one level per bit (40 for the row sum of SOFTMAX).

    The tree splits at the largest power of two ``h`` below the width, so an index in the upper
    part is its own index with bit ``log2(h)`` set: no adder anywhere (``idx + h`` at each level
    and a final ``- 1`` were 13.8 ns into SOFTMAX's ``rc_k`` in the 101b217 build, routed)."""
    def fit(idx, b):
        return Cat(idx, Const(0, b))[:b]

    def tree(x):
        n = len(x)
        if n == 1:
            return x[0], Const(0, 1)
        h = 1 << ((n - 1).bit_length() - 1)
        b = h.bit_length() - 1              # index bits within either part
        any_l, idx_l = tree(x[:h])
        any_h, idx_h = tree(x[h:])
        return any_l | any_h, Mux(any_h, Cat(fit(idx_h, b), Const(1, 1)),
                                  Cat(fit(idx_l, b), Const(0, 1)))
    return tree(v)
