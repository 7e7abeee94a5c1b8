"""Tests of hw/dspmul.py: the staged product is ``a * b`` exactly, PRODUCT_LATENCY enabled
cycles later, for signed and unsigned operands of the widths the gateware uses (Amaranth
simulator, random operands, the extremes, a random enable)."""

import random

import pytest
from amaranth.hdl import Module, Signal, signed, unsigned
from hwutil import run_sim

from vitamin.hw.dspmul import LIMB, PRODUCT_LATENCY, partial_sum, staged_product

SHAPES = [
    (signed(48), signed(16)),      # the epilogue's v * mult
    (signed(48), unsigned(17)),    # row_norm's acc * r
    (signed(33), signed(16)),      # the GELU requantisation
    (signed(16), signed(16)),      # the residual: one partial product
    (signed(16), signed(32)),      # SPAD_ADD: o * prob (the wider operand second)
    (unsigned(35), signed(18)),    # an unsigned wide operand, the widest narrow one
    (signed(LIMB * 2), signed(5)),  # a wide operand of whole limbs
    (signed(30), signed(30)),      # LAYERNORM's S1 * S1: both operands cut into pieces
    (unsigned(13), unsigned(41)),  # LAYERNORM's n * S2
    (signed(19), unsigned(18)),    # both just too wide for one multiplier input
]


def _extremes(shape):
    if shape.signed:
        lo, hi = -(1 << (shape.width - 1)), (1 << (shape.width - 1)) - 1
    else:
        lo, hi = 0, (1 << shape.width) - 1
    return [lo, hi, 0, 1, -1 if shape.signed else 2, lo + 1, hi - 1]


def _random(rng, shape):
    if shape.signed:
        return rng.randrange(-(1 << (shape.width - 1)), 1 << (shape.width - 1))
    return rng.randrange(1 << shape.width)


@pytest.mark.parametrize("sa,sb", SHAPES, ids=[f"{a}x{b}" for a, b in SHAPES])
def test_staged_product_exact(sa, sb):
    rng = random.Random(f"{sa}{sb}")
    ops = [(x, y) for x in _extremes(sa) for y in _extremes(sb)]
    ops += [(_random(rng, sa), _random(rng, sb)) for _ in range(300)]
    a, b, en = Signal(sa), Signal(sb), Signal()
    m = Module()
    out_shape = signed(sa.width + sb.width + 1)
    p = staged_product(m, a, b, en=en, name="p", shape=out_shape)
    got = []

    async def bench(ctx):
        # An operand is presented in an enabled cycle; it must come out after exactly
        # PRODUCT_LATENCY more enabled cycles, however many disabled cycles come between.
        queue = list(ops) + [(0, 0)] * (PRODUCT_LATENCY - 1)
        in_flight = []
        for x, y in queue:
            held = ctx.get(p)
            while rng.random() < 0.3:
                ctx.set(en, 0)
                ctx.set(a, _random(rng, sa))     # ignored while disabled
                ctx.set(b, _random(rng, sb))
                await ctx.tick()
                assert ctx.get(p) == held, "the product changed in a disabled cycle"
            ctx.set(a, x)
            ctx.set(b, y)
            ctx.set(en, 1)
            await ctx.tick()
            in_flight.append(x * y)
            if len(in_flight) == PRODUCT_LATENCY:
                got.append((ctx.get(p), in_flight.pop(0)))

    run_sim(m, bench)
    assert len(got) == len(ops)
    bad = [(g, e) for g, e in got if g != e]
    assert not bad, f"{len(bad)} wrong products, first {bad[:3]}"


@pytest.mark.parametrize("sa,sb", SHAPES + [(unsigned(22), unsigned(16)),
                                           (unsigned(32), unsigned(22))],
                         ids=[f"{a}x{b}" for a, b in SHAPES] + ["u22xu16", "u32xu22"])
def test_partial_sum_exact(sa, sb):
    """partial_sum: the sum of registered pieces is ``a * b`` one cycle after the operands
    (the row units' range checks: unsigned 16 x 22 and 32 x 22), and every piece's register
    takes a product of operands no wider than one multiplier input."""
    rng = random.Random(f"ps{sa}{sb}")
    ops = [(x, y) for x in _extremes(sa) for y in _extremes(sb)]
    ops += [(_random(rng, sa), _random(rng, sb)) for _ in range(200)]
    a, b = Signal(sa), Signal(sb)
    m = Module()
    out = Signal(signed(sa.width + sb.width + 1))
    m.d.comb += out.eq(partial_sum(m, a, b, en=1, name="q"))
    pieces = []

    def mul(x, y):
        pieces.append((x.shape(), y.shape()))
        return x * y

    partial_sum(m, a, b, en=1, name="r", mul=mul)
    assert pieces and all(w.width <= (18 if w.signed else 17) for x in pieces for w in x)
    got = []

    async def bench(ctx):
        # the operands of a cycle are registered (as pieces) at its end: the sum shows their
        # product in the next cycle, whatever the operands of that cycle are
        for x, y in ops:
            ctx.set(a, x)
            ctx.set(b, y)
            await ctx.tick()
            ctx.set(a, _random(rng, sa))
            ctx.set(b, _random(rng, sb))
            got.append((ctx.get(out), x * y))

    run_sim(m, bench)
    assert len(got) == len(ops)
    bad = [(g, e) for g, e in got if g != e]
    assert not bad, f"{len(bad)} wrong products, first {bad[:3]}"
