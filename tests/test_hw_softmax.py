# amaranth: UnusedElaboratable=no
"""Tests of the softmax unit against golden.units.softmax_full (Amaranth simulator)."""
# (The first line silences Amaranth's warning for units built only to read their properties.)

import numpy as np
import pytest
from hwutil import make_rng, run_sim, stream_get, stream_put

from vitamin.config import PRESETS
from vitamin.golden.numerics import Sat
from vitamin.golden.units import softmax_full
from vitamin.hw.softmax import SoftmaxUnit, softmax_in_layout

TINY = PRESETS["tiny"]
TINY4 = TINY.replace(row_lanes=4)
TINY4_A8 = TINY.replace(row_lanes=4, act_bits=8)


def _golden(config, rows):
    """Per row: (expected outputs, saturation events)."""
    out = []
    for x, valid, mult, shift in rows:
        sat = Sat()
        y = softmax_full(x[None, :], valid[None, :], mult, shift, config, sat)[0]
        out.append((y, sat.events))
    return out


def _chunks(config, x, valid, mult, shift):
    lanes = config.row_lanes
    n_chunks = -(-len(x) // lanes)
    for c in range(n_chunks):
        xs = [int(v) for v in x[c * lanes:(c + 1) * lanes]]
        vs = [bool(v) for v in valid[c * lanes:(c + 1) * lanes]]
        pad = lanes - len(xs)
        # Lanes past the end of the row hold garbage and are masked.
        xs += [12345] * pad
        vs += [False] * pad
        yield {
            "data": xs,
            "valid": sum(1 << i for i, v in enumerate(vs) if v),
            "first": c == 0,
            "last": c == n_chunks - 1,
            # mult/shift only count on the first chunk: send rubbish on the others.
            "mult": mult if c == 0 else (mult * 7 + 3) & 0x7FFF,
            "shift": shift if c == 0 else (shift + 5) % 64,
        }


def _simulate(config, rows, *, seed=0, p_idle=0.0, p_stall=0.0):
    dut = SoftmaxUnit(config)
    lanes = config.row_lanes
    rng_i, rng_o = make_rng(seed), make_rng(seed + 1)
    got = []

    async def source(ctx):
        for row in rows:
            for chunk in _chunks(config, *row):
                await stream_put(ctx, dut.i_stream, chunk, rng=rng_i, p_idle=p_idle)

    async def sink(ctx):
        for x, *_ in rows:
            n_chunks = -(-len(x) // lanes)
            data, sat = [], 0
            for c in range(n_chunks):
                p = await stream_get(ctx, dut.o_stream, rng=rng_o, p_stall=p_stall)
                assert (p.first, p.last) == (c == 0, c == n_chunks - 1)
                data += [p.data[i] for i in range(lanes)]
                sat += p.sat
            # Lanes past the end of the row are masked lanes: 0.
            assert data[len(x):] == [0] * (len(data) - len(x))
            got.append((np.array(data[:len(x)], dtype=np.int64), sat))

    n_total = sum(len(r[0]) for r in rows)
    run_sim(dut, source, sink, deadline_cycles=40 * (n_total + 20 * len(rows)))
    return got


def _check(config, rows, got):
    want = _golden(config, rows)
    assert len(got) == len(want)
    for i, ((gy, gs), (wy, ws)) in enumerate(zip(got, want, strict=True)):
        np.testing.assert_array_equal(gy, wy, err_msg=f"row {i}")
        assert gs == ws, f"row {i}: {gs} saturation events, golden {ws}"


def _random_rows(config, seed):
    rng = np.random.default_rng(seed)
    lanes = config.row_lanes
    lengths = [1, max(lanes - 1, 1), 2 * lanes + 1, 33, lanes, 7]
    rows = []
    for i, n in enumerate(lengths * 2):
        kind = i % 6
        if kind == 0:     # wide random scores, moderate temperature
            x = rng.integers(-32768, 32768, size=n)
        elif kind == 1:   # extreme words only
            x = rng.choice(np.array([-32768, 32767, 0, -1]), size=n)
        elif kind == 2:   # increasing: the max grows every chunk, s is rescaled every chunk
            x = np.sort(rng.integers(-30000, 30000, size=n))
        elif kind == 3:   # narrow spread: many similar probabilities
            x = rng.integers(-40, 40, size=n)
        elif kind == 4:   # constant row: every element is the max
            x = np.full(n, int(rng.integers(-32768, 32768)))
        else:             # increasing in steps that make z cross whole powers of two
            x = np.arange(n) * int(rng.integers(1, 3000)) - 20000
        valid = rng.random(n) < 0.7
        if i % 4 == 3:
            valid[:] = True
        if i == 7:
            valid[:] = False  # a row without a valid element: zeros
        mult = int(rng.integers(1, 1 << 15))
        shift = int(rng.integers(6, 22))
        rows.append((x.astype(np.int64), valid, mult, shift))
    # Rescale-heavy rows: the max grows by about one unit of log2 per chunk, so s is halved
    # (and rounded) every chunk while staying small enough that its rounding shows in 1/s.
    for n in (2 * lanes + 1, 33, 4 * lanes):
        for _ in range(8):
            x = np.cumsum(rng.integers(0, 3000, size=n)) - 30000
            rows.append((np.clip(x, -32768, 32767), rng.random(n) < 0.9, 16384, 10))
    # Parameter edges: shift 0 (huge z), shift 62 (z = 0), mult 0 (z = 0), largest mult.
    x = rng.integers(-32768, 32768, size=9)
    rows += [(x, np.ones(9, dtype=bool), 1, 0), (x, np.ones(9, dtype=bool), 32767, 62),
             (x, np.ones(9, dtype=bool), 0, 5), (x, np.ones(9, dtype=bool), 32767, 16)]
    # z = 16, 17, 15 whole units of log2 (z = 68 * 16384): E = 2^-16 -> 1, E = 2^-17 -> 0.
    x = np.array([0, -64, -68, -60, -72, -1000, -4], dtype=np.int64)
    rows.append((x, np.ones(7, dtype=bool), 16384, 0))
    return rows


def test_layouts_and_timing_figures():
    dut = SoftmaxUnit("tiny")
    assert dut.config is TINY
    assert softmax_in_layout(TINY).size == 2 * 16 + 2 + 2 + 15 + 6
    assert dut.s_bits == 26  # max_dim 1024 * 2^15 fits 26 bits unsigned
    assert dut.row_cycles(33) == 3 * 17 + 10
    eight = PRESETS["ecp5"].replace(row_lanes=8)
    assert dut.latency == 17 and SoftmaxUnit(eight).latency == 19
    with pytest.raises(TypeError):
        SoftmaxUnit(42)
    with pytest.raises(ValueError, match="max_dim a multiple of row_lanes"):
        SoftmaxUnit(TINY.replace(row_lanes=64, max_dim=32))  # no room for one chunk


@pytest.mark.parametrize("config", [TINY, TINY4, TINY4_A8], ids=["tiny", "lanes4", "lanes4_a8"])
@pytest.mark.parametrize("p_idle,p_stall", [(0.0, 0.0), (0.3, 0.5)])
def test_random_rows(config, p_idle, p_stall):
    """Random rows, masks, extreme and increasing scores, parameter edges; with and without
    random backpressure on both streams."""
    rows = _random_rows(config, seed=config.row_lanes + config.act_bits)
    got = _simulate(config, rows, seed=3, p_idle=p_idle, p_stall=p_stall)
    _check(config, rows, got)


@pytest.mark.parametrize("name", ["ecp5", "zcu102"])
def test_presets(name):
    """The larger presets (8 and 16 lanes, wider sums for max_dim 4096 and 8192)."""
    config = PRESETS[name]
    rows = _random_rows(config, seed=config.row_lanes)
    got = _simulate(config, rows, seed=6, p_idle=0.1, p_stall=0.1)
    _check(config, rows, got)


def test_short_rows_slow_sink():
    """Short rows after long ones, and a sink that stalls for long stretches: a short row's 1/s
    is computed while the previous row's last chunks still wait in the pipeline."""
    config = TINY4
    rng = np.random.default_rng(12)
    rows = []
    for i in range(16):
        n = [17, 1, 33, 2][i % 4]
        rows.append((rng.integers(-2000, 2000, size=n), rng.random(n) < 0.8,
                     int(rng.integers(1, 1 << 15)), 8 + i % 7))
    got = _simulate(config, rows, seed=4, p_idle=0.0, p_stall=0.93)
    _check(config, rows, got)


def test_saturation_events():
    """p = 1.0 (one dominant element) saturates to the largest word: one event per row."""
    config = TINY
    x = np.array([32767, -32768, -32768, -32768, -32768], dtype=np.int64)
    rows = [(x, np.ones(5, dtype=bool), 32767, 8), (x[:1], np.ones(1, dtype=bool), 100, 8),
            (x, np.array([0, 1, 1, 0, 1], dtype=bool), 1000, 10)]
    got = _simulate(config, rows, seed=5, p_idle=0.2, p_stall=0.2)
    _check(config, rows, got)
    assert [s for _, s in got[:2]] == [1, 1]


@pytest.mark.parametrize("config", [TINY4, PRESETS["zcu102"]], ids=["lanes4", "zcu102"])
def test_longest_row(config):
    """Rows of max_dim elements fill the row buffer; a constant row gives the largest s,
    max_dim * 2^15."""
    rng = np.random.default_rng(11)
    n = config.max_dim
    rows = [(rng.integers(-50, 50, size=n), np.ones(n, dtype=bool), 200, 12),
            (np.zeros(n, dtype=np.int64), np.ones(n, dtype=bool), 1, 0)]
    got = _simulate(config, rows, seed=9, p_idle=0.05, p_stall=0.05)
    _check(config, rows, got)


def test_full_throughput():
    """Without backpressure the unit takes one chunk per cycle in each pass and accepts a new
    row every ``row_cycles(n)`` cycles; the first output follows the last input chunk by
    ``row_latency(n)`` cycles."""
    config = TINY4
    dut = SoftmaxUnit(config)
    rng = np.random.default_rng(4)
    rows = [(rng.integers(-1000, 1000, size=n), np.ones(n, dtype=bool), 3000, 12)
            for n in (33, 8, 1, 17)]
    chunks = [c for row in rows for c in _chunks(config, *row)]
    accepted, outputs = [], []

    async def testbench(ctx):
        ctx.set(dut.o_stream.ready, 1)
        ctx.set(dut.i_stream.valid, 1)
        ctx.set(dut.i_stream.payload, chunks[0])
        sent, cycle = 0, 0
        while len(outputs) < len(chunks):
            _, _, i_ready, o_valid, o_payload = await ctx.tick().sample(
                dut.i_stream.ready, dut.o_stream.valid, dut.o_stream.payload)
            if sent < len(chunks) and i_ready:
                accepted.append((cycle, chunks[sent]["first"], chunks[sent]["last"]))
                sent += 1
                if sent < len(chunks):
                    ctx.set(dut.i_stream.payload, chunks[sent])
                else:
                    ctx.set(dut.i_stream.valid, 0)
            if o_valid:
                outputs.append((cycle, o_payload.first))
            cycle += 1

    run_sim(dut, testbench, deadline_cycles=2000)
    firsts = [c for c, f, _ in accepted if f]
    lasts = [c for c, _, la in accepted if la]
    assert np.diff(firsts).tolist() == [dut.row_cycles(len(r[0])) for r in rows[:-1]]
    # One chunk per cycle inside each pass.
    starts = [c for c, f in outputs if f]
    for (x, *_), f_in, l_in, f_out in zip(rows, firsts, lasts, starts, strict=True):
        n_chunks = -(-len(x) // config.row_lanes)
        assert l_in - f_in == n_chunks - 1
        assert f_out - l_in == dut.row_latency(len(x))
    out_cycles = [c for c, _ in outputs]
    assert out_cycles == sorted(out_cycles)
    for f_out, (x, *_) in zip(starts, rows, strict=True):
        n_chunks = -(-len(x) // config.row_lanes)
        assert out_cycles[out_cycles.index(f_out) + n_chunks - 1] == f_out + n_chunks - 1

