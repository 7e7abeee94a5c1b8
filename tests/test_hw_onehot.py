"""The tree-shaped selection helpers of hw/onehot.py against Python, exhaustively for small
widths and on random wide values."""

import random

import pytest
from amaranth import Module, Signal
from amaranth.sim import Simulator

from vitamin.hw.onehot import msb_index


@pytest.mark.parametrize("width", [1, 2, 3, 5, 8, 11, 17, 28, 40])
def test_msb_index_matches_bit_length(width):
    m = Module()
    v = Signal(width)
    any_, idx = msb_index(v)
    a_out, i_out = Signal(), Signal(8)
    m.d.comb += [a_out.eq(any_), i_out.eq(idx)]
    rng = random.Random(width)
    values = range(1 << width) if width <= 11 else \
        [0, 1, (1 << width) - 1] + [rng.getrandbits(rng.randint(1, width)) for _ in range(300)]

    async def bench(ctx):
        for x in values:
            ctx.set(v, x)
            await ctx.delay(1e-9)
            assert ctx.get(a_out) == (x != 0), x
            assert ctx.get(i_out) == max(x.bit_length() - 1, 0), x

    sim = Simulator(m)
    sim.add_testbench(bench)
    sim.run()
