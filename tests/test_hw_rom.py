# amaranth: UnusedElaboratable=no
"""Tests of the interpolated table ROMs against golden.tables.interp (Amaranth simulator)."""
# (The first line silences Amaranth's warning for components built only to see the constructor
# fail or to read their properties; Amaranth reads linter options from line 1 only.)

import numpy as np
import pytest
from hwutil import make_rng, run_sim, stream_get, stream_put

from vitamin.config import PRESETS
from vitamin.golden.tables import TABLE_NAMES, interp, make_table, table_spec
from vitamin.hw.rom import INTERP_LATENCY, TableInterp, interp_input_bits

TINY = PRESETS["tiny"]
# Smallest tables the configuration allows, and the largest index width: other bank depths and
# fraction widths than the presets.
SMALL = TINY.replace(name="small_tables", exp_index_bits=4, recip_index_bits=5,
                     rsqrt_index_bits=12, gelu_step_log2=3, gelu_range=4)


def _inputs(spec, seed, n_random=120):
    """Edge inputs (0, both sides of sampled table points, the largest input) plus random ones."""
    rng = np.random.default_rng(seed)
    top = 1 << interp_input_bits(spec)
    points = rng.choice(spec.entries - 1, size=min(24, spec.entries - 1), replace=False)
    points = np.concatenate([points, [1, spec.entries - 2]])
    edges = [0, 1, top - 1, top - 2, (spec.entries - 2) << spec.in_frac]
    for p in points:
        base = int(p) << spec.in_frac
        # The table point itself, its neighbours, and the half-way point (exact rounding ties).
        edges += [base, base - 1, base + 1, base + (1 << (spec.in_frac - 1))]
    edges = [u for u in edges if 0 <= u < top]
    rand = rng.integers(0, top, size=n_random)
    u = np.array(edges + list(rand), dtype=np.int64)
    return u[rng.permutation(len(u))]


def _simulate(dut, inputs, *, seed, p_idle, p_stall):
    got = []
    rng_i, rng_o = make_rng(seed), make_rng(seed + 1)

    async def source(ctx):
        for u in inputs:
            await stream_put(ctx, dut.i_stream, int(u), rng=rng_i, p_idle=p_idle)

    async def sink(ctx):
        for _ in inputs:
            got.append(await stream_get(ctx, dut.o_stream, rng=rng_o, p_stall=p_stall))

    run_sim(dut, source, sink, deadline_cycles=20 * len(inputs) + 100)
    return np.array(got, dtype=np.int64)


@pytest.mark.parametrize("config", [TINY, SMALL], ids=lambda c: c.name)
@pytest.mark.parametrize("name", TABLE_NAMES)
def test_table_interp_matches_golden(config, name):
    spec = table_spec(name, config)
    dut = TableInterp(config, name)
    u = _inputs(spec, seed=TABLE_NAMES.index(name))
    got = _simulate(dut, u, seed=7, p_idle=0.3, p_stall=0.3)
    want = interp(make_table(name, config), u, spec.in_frac)
    np.testing.assert_array_equal(got, want)


def test_decreasing_table_rounds_negative_differences_half_up():
    # 1/(1+f) decreases: d < 0, so the product is negative and the rounding shift must be
    # arithmetic with round half up (an unsigned or truncating shift differs on these inputs).
    spec = table_spec("recip", TINY)
    tab = make_table("recip", TINY)
    half = 1 << (spec.in_frac - 1)
    u = np.array([(i << spec.in_frac) + f for i in (0, 1, 100, 254)
                  for f in (1, half - 1, half, half + 1, (1 << spec.in_frac) - 1)])
    d = tab[(u >> spec.in_frac) + 1] - tab[u >> spec.in_frac]
    assert (d < 0).all()
    got = _simulate(TableInterp(TINY, "recip"), u, seed=3, p_idle=0.0, p_stall=0.0)
    np.testing.assert_array_equal(got, interp(tab, u, spec.in_frac))


def test_table_interp_throughput_and_latency():
    dut = TableInterp(TINY, "gelu")
    spec = dut.spec
    n = 40
    u = np.random.default_rng(5).integers(0, 1 << interp_input_bits(spec), size=n)
    t_in, t_out, got = [], [], []

    async def source(ctx):
        ctx.set(dut.i_stream.valid, 1)
        cycle = 0
        for x in u:
            ctx.set(dut.i_stream.payload, int(x))
            while True:
                _, _, ready = await ctx.tick().sample(dut.i_stream.ready)
                cycle += 1
                if ready:
                    t_in.append(cycle)
                    break
        ctx.set(dut.i_stream.valid, 0)

    async def sink(ctx):
        ctx.set(dut.o_stream.ready, 1)
        cycle = 0
        while len(got) < n:
            _, _, valid, payload = await ctx.tick().sample(dut.o_stream.valid,
                                                           dut.o_stream.payload)
            cycle += 1
            if valid:
                t_out.append(cycle)
                got.append(payload)

    run_sim(dut, source, sink, deadline_cycles=n + 50)
    assert dut.latency == INTERP_LATENCY
    assert t_in == list(range(1, n + 1))
    assert [o - i for i, o in zip(t_in, t_out, strict=True)] == [dut.latency] * n
    np.testing.assert_array_equal(got, interp(make_table("gelu", TINY), u, spec.in_frac))


def test_table_interp_rejects_unknown_table():
    with pytest.raises(ValueError, match="not 'sigmoid'"):
        TableInterp(TINY, "sigmoid")
    with pytest.raises(TypeError, match="Config"):
        TableInterp(42, "exp2")
