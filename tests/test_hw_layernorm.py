# amaranth: UnusedElaboratable=no
"""Tests of the LayerNorm unit against golden.units.layernorm (Amaranth simulator)."""
# (The first line silences Amaranth's warning for units built only to read their properties.)

import numpy as np
import pytest
from hwutil import make_rng, run_sim, stream_get, stream_put

from vitamin.config import PRESETS
from vitamin.golden.numerics import Sat
from vitamin.golden.units import layernorm
from vitamin.hw.layernorm import LayerNormUnit, layernorm_in_layout, layernorm_param_layout

TINY = PRESETS["tiny"]
TINY4 = TINY.replace(row_lanes=4)
TINY4_A8 = TINY.replace(row_lanes=4, act_bits=8)


class Row:
    """One LayerNorm row and its parameters."""

    def __init__(self, x, gamma, beta, eps_m, eps_e, shift):
        self.x = np.asarray(x, dtype=np.int64)
        self.gamma = np.asarray(gamma, dtype=np.int64)
        self.beta = np.asarray(beta, dtype=np.int64)
        self.eps_m, self.eps_e, self.shift = eps_m, eps_e, shift

    def golden(self, config):
        sat = Sat()
        y = layernorm(self.x[None, :], self.gamma, self.beta, self.eps_m, self.eps_e,
                      self.shift, config, sat)[0]
        return y, sat.events


def _split(config, v, pad):
    lanes = config.row_lanes
    for c in range(-(-len(v) // lanes)):
        part = [int(e) for e in v[c * lanes:(c + 1) * lanes]]
        yield part + [pad] * (lanes - len(part))


def _x_chunks(config, row):
    chunks = list(_split(config, row.x, -32768))  # padding lanes: garbage, masked
    n = len(row.x)
    for c, xs in enumerate(chunks):
        n_valid = min(config.row_lanes, n - c * config.row_lanes)
        yield {
            "data": xs,
            "valid": (1 << n_valid) - 1,
            "first": c == 0,
            "last": c == len(chunks) - 1,
            # Per-row fields only count on the first chunk: send rubbish on the others.
            "eps_m": row.eps_m if c == 0 else 0xFFFF,
            "eps_e": row.eps_e if c == 0 else 33,
            "shift": row.shift if c == 0 else 63,
        }


def _p_chunks(config, row):
    for g, b in zip(_split(config, row.gamma, 32767), _split(config, row.beta, -(1 << 31)),
                    strict=True):
        yield {"gamma": g, "beta": b}


def _simulate(config, rows, *, seed=0, p_idle=0.0, p_stall=0.0):
    dut = LayerNormUnit(config)
    lanes = config.row_lanes
    rng_i, rng_p, rng_o = make_rng(seed), make_rng(seed + 1), make_rng(seed + 2)
    got = []

    async def x_source(ctx):
        for row in rows:
            for chunk in _x_chunks(config, row):
                await stream_put(ctx, dut.i_stream, chunk, rng=rng_i, p_idle=p_idle)

    async def p_source(ctx):
        for row in rows:
            for chunk in _p_chunks(config, row):
                await stream_put(ctx, dut.p_stream, chunk, rng=rng_p, p_idle=p_idle)

    async def sink(ctx):
        for row in rows:
            n_chunks = -(-len(row.x) // lanes)
            data, sat = [], 0
            for c in range(n_chunks):
                p = await stream_get(ctx, dut.o_stream, rng=rng_o, p_stall=p_stall)
                assert (p.first, p.last) == (c == 0, c == n_chunks - 1)
                data += [p.data[i] for i in range(lanes)]
                sat += p.sat
            assert data[len(row.x):] == [0] * (len(data) - len(row.x))
            got.append((np.array(data[:len(row.x)], dtype=np.int64), sat))

    n_total = sum(len(r.x) for r in rows)
    run_sim(dut, x_source, p_source, sink, deadline_cycles=40 * (n_total + 20 * len(rows)))
    return got


def _check(config, rows, got):
    assert len(got) == len(rows)
    for i, ((gy, gs), row) in enumerate(zip(got, rows, strict=True)):
        wy, ws = row.golden(config)
        np.testing.assert_array_equal(gy, wy, err_msg=f"row {i}")
        assert gs == ws, f"row {i}: {gs} saturation events, golden {ws}"


def _random_rows(config, seed):
    rng = np.random.default_rng(seed)
    lanes = config.row_lanes
    lengths = [1, max(lanes - 1, 1), 2 * lanes + 1, 33, lanes, 12]
    rows = []
    for i, n in enumerate(lengths * 2):
        kind = i % 6
        if kind == 0:
            x = rng.integers(-32768, 32768, size=n)
        elif kind == 1:    # extreme words only
            x = rng.choice(np.array([-32768, 32767]), size=n)
        elif kind == 2:    # constant row: variance 0, D = eps (or 1)
            x = np.full(n, int(rng.integers(-32768, 32768)))
        elif kind == 3:    # small values around an offset
            x = rng.integers(-20, 20, size=n) + int(rng.integers(-30000, 30000))
        elif kind == 4:    # one outlier: the largest |x_hat| for this n
            x = np.full(n, -32768)
            x[int(rng.integers(n))] = 32767
        else:
            x = rng.integers(-3000, 3000, size=n)
        gamma = rng.integers(-32768, 32768, size=n)
        if i % 3 == 0:
            beta = rng.integers(-(1 << 31), 1 << 31, size=n)
        else:
            beta = rng.integers(-(1 << 20), 1 << 20, size=n)
        eps_m = int(rng.integers(0, 1 << 16)) if i % 2 else 0
        eps_e = int(rng.integers(0, 41)) if i % 4 == 1 else int(rng.integers(0, 8))
        shift = int(rng.integers(8, 20)) if i % 5 else int(rng.integers(0, 63))
        rows.append(Row(x, gamma, beta, eps_m, eps_e, shift))
    # Largest eps (eps_e = 40), shift 62, shift 0, gamma/beta extremes.
    n = 2 * lanes + 1
    x = rng.integers(-32768, 32768, size=n)
    rows += [Row(x, np.full(n, -32768), np.full(n, (1 << 31) - 1), 0xFFFF, 40, 0),
             Row(x, np.full(n, 32767), np.full(n, -(1 << 31)), 1, 0, 62),
             Row(x, rng.integers(-32768, 32768, size=n), np.zeros(n), 0, 0, 0)]
    return rows


def test_layouts_and_widths():
    dut = LayerNormUnit("tiny")
    assert dut.config is TINY
    assert layernorm_in_layout(TINY).size == 2 * 16 + 2 + 2 + 16 + 6 + 6
    assert layernorm_param_layout(TINY).size == 2 * (16 + 32)
    assert dut.widths == {"n": 11, "s1": 26, "s2": 41, "d": 57, "x_hat": 19}
    assert LayerNormUnit(PRESETS["zcu102"]).widths["d"] == 58
    assert dut.row_cycles(33) == 2 * 17 + 18
    # 14 stages: the affine product is staged (PRODUCT_LATENCY = 3 stages, was one) and pass
    # 2's (n x - S1) * r is split (SPLIT_LATENCY = 2 stages, was one)
    assert dut.latency == 15 and dut.row_latency == 34
    with pytest.raises(TypeError):
        LayerNormUnit(42)
    with pytest.raises(ValueError, match="max_dim a multiple of row_lanes"):
        LayerNormUnit(TINY.replace(row_lanes=64, max_dim=32))  # no room for one chunk


@pytest.mark.parametrize("config", [TINY, TINY4, TINY4_A8], ids=["tiny", "lanes4", "lanes4_a8"])
@pytest.mark.parametrize("p_idle,p_stall", [(0.0, 0.0), (0.3, 0.5)])
def test_random_rows(config, p_idle, p_stall):
    """Random rows of several lengths, extreme and constant rows, random gamma/beta/eps/shift;
    with and without random backpressure on all three streams."""
    rows = _random_rows(config, seed=config.row_lanes + config.act_bits)
    got = _simulate(config, rows, seed=5, p_idle=p_idle, p_stall=p_stall)
    _check(config, rows, got)


@pytest.mark.parametrize("name", ["ecp5", "zcu102"])
def test_presets(name):
    """The larger presets (8 and 16 lanes, wider sums for max_dim 4096 and 8192)."""
    config = PRESETS[name]
    rows = _random_rows(config, seed=config.row_lanes)
    got = _simulate(config, rows, seed=6, p_idle=0.1, p_stall=0.1)
    _check(config, rows, got)


def test_short_rows_slow_sink():
    """Short rows after long ones, and a sink that stalls for long stretches: a short row's
    statistics are ready while the previous row's last chunks still wait in the pipeline
    (pass 2 must not start and change n, S1, r, k, shift under them)."""
    config = TINY4
    rng = np.random.default_rng(12)
    rows = []
    for i in range(16):
        n = [17, 1, 33, 2][i % 4]
        rows.append(Row(rng.integers(-32768, 32768, size=n), rng.integers(-32768, 32768, size=n),
                        rng.integers(-(1 << 20), 1 << 20, size=n), i, 3, 10 + i % 5))
    got = _simulate(config, rows, seed=4, p_idle=0.0, p_stall=0.93)
    _check(config, rows, got)


def test_saturation_events():
    """Outputs clamp at both ends; each clamped element is one event, padding lanes none."""
    config = TINY4
    x = np.array([-32768, 32767, 0, 100, -100], dtype=np.int64)
    rows = [Row(x, np.full(5, 32767), np.zeros(5), 0, 0, 2),
            Row(x, np.full(5, -32768), np.full(5, 1 << 30), 0, 0, 12)]
    got = _simulate(config, rows, seed=2, p_idle=0.2, p_stall=0.2)
    _check(config, rows, got)
    assert got[0][1] > 0 and got[1][1] > 0


@pytest.mark.parametrize("config", [TINY4, PRESETS["zcu102"]], ids=["lanes4", "zcu102"])
def test_longest_row(config):
    """A row of max_dim elements with one outlier: the widest S1, S2, D and x_hat."""
    n = config.max_dim
    x = np.full(n, -32768)
    x[5] = 32767
    rng = np.random.default_rng(6)
    rows = [Row(x, rng.integers(-32768, 32768, size=n), rng.integers(-1000, 1000, size=n),
                0, 0, 18),
            Row(np.full(n, 32767), np.full(n, 1), np.zeros(n), 0, 0, 0)]
    got = _simulate(config, rows, seed=8, p_idle=0.05, p_stall=0.05)
    _check(config, rows, got)


def test_full_throughput():
    """Without backpressure each pass takes one chunk per cycle and a new row is accepted every
    ``row_cycles(n)`` cycles; the first output follows the last input by ``row_latency``."""
    config = TINY4
    dut = LayerNormUnit(config)
    rng = np.random.default_rng(4)
    rows = [Row(rng.integers(-1000, 1000, size=n), rng.integers(-32768, 32768, size=n),
                np.zeros(n), 3, 2, 14) for n in (33, 8, 1, 17)]
    chunks = [c for row in rows for c in _x_chunks(config, row)]
    params = [c for row in rows for c in _p_chunks(config, row)]
    accepted, outputs = [], []

    async def testbench(ctx):
        ctx.set(dut.o_stream.ready, 1)
        for s, items in ((dut.i_stream, chunks), (dut.p_stream, params)):
            ctx.set(s.valid, 1)
            ctx.set(s.payload, items[0])
        sent = {"i": 0, "p": 0}
        cycle = 0
        while len(outputs) < len(chunks):
            _, _, i_ready, p_ready, o_valid, o_payload = await ctx.tick().sample(
                dut.i_stream.ready, dut.p_stream.ready, dut.o_stream.valid, dut.o_stream.payload)
            for key, s, items, ready in (("i", dut.i_stream, chunks, i_ready),
                                         ("p", dut.p_stream, params, p_ready)):
                if sent[key] < len(items) and ready:
                    if key == "i":
                        accepted.append((cycle, items[sent[key]]["first"],
                                         items[sent[key]]["last"]))
                    sent[key] += 1
                    if sent[key] < len(items):
                        ctx.set(s.payload, items[sent[key]])
                    else:
                        ctx.set(s.valid, 0)
            if o_valid:
                outputs.append((cycle, o_payload.first))
            cycle += 1

    run_sim(dut, testbench, deadline_cycles=2000)
    firsts = [c for c, f, _ in accepted if f]
    lasts = [c for c, _, la in accepted if la]
    assert np.diff(firsts).tolist() == [dut.row_cycles(len(r.x)) for r in rows[:-1]]
    starts = [c for c, f in outputs if f]
    out_cycles = [c for c, _ in outputs]
    for row, f_in, l_in, f_out in zip(rows, firsts, lasts, starts, strict=True):
        n_chunks = -(-len(row.x) // config.row_lanes)
        assert l_in - f_in == n_chunks - 1
        assert f_out - l_in == dut.row_latency
        i = out_cycles.index(f_out)
        assert out_cycles[i:i + n_chunks] == list(range(f_out, f_out + n_chunks))
