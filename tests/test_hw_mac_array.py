# amaranth: UnusedElaboratable=no
"""Tests of the MAC array against NumPy integer matmul (Amaranth simulator and Verilator)."""
# (The first line silences Amaranth's warning for MacArrays built only to read their properties
# or to see the constructor fail; Amaranth reads linter options from line 1 only.)

import json
from pathlib import Path

import numpy as np
import pytest
from amaranth.hdl import signed
from hwutil import make_rng, run_sim, stream_get, stream_put

from vitamin.config import PRESETS, Config, ConfigError
from vitamin.hw.mac_array import MacArray, a_line_layout
from vitamin.sim.verilator import run_cocotb, write_verilog

TINY = PRESETS["tiny"]
SQUARE4 = Config(name="square4", rows=4, cols=4)
EDGES = np.array([-32768, 32767, 0, -1, 1], dtype=np.int64)


def _a_line(line, first, last):
    return {"data": [int(x) for x in line], "first": first, "last": last}


def _random_tiles(config, seed, n_tiles, max_lines=6):
    rng = np.random.default_rng(seed)
    tiles = []
    for t in range(n_tiles):
        m = int(rng.integers(1, max_lines + 1))
        w = rng.integers(-32768, 32768, size=(config.rows, config.cols))
        a = rng.integers(-32768, 32768, size=(m, config.rows))
        if t % 3 == 1:  # a tile of edge values only
            w = rng.choice(EDGES, size=w.shape)
            a = rng.choice(EDGES, size=a.shape)
        tiles.append((w, a))
    return tiles


def _simulate_tiles(config, tiles, *, seed=0, p_idle=0.0, p_stall=0.0, deadline=20_000):
    """Stream ``tiles`` (list of ``(W, A)``) through a MacArray; return received lines and flags.

    Weights, A lines and outputs are three independent testbenches, so the weight stream runs
    ahead into the shadow buffer while the previous tile computes, as in the accelerator.
    """
    dut = MacArray(config)
    rng_w, rng_a, rng_o = (make_rng(seed * 3 + i) for i in range(3))
    n_out = sum(len(a) for _, a in tiles)
    got, flags = [], []

    async def w_source(ctx):
        for w, _ in tiles:
            for row in w:
                await stream_put(ctx, dut.w_stream, [int(x) for x in row], rng=rng_w,
                                 p_idle=p_idle)

    async def a_source(ctx):
        for _, a in tiles:
            for i, line in enumerate(a):
                await stream_put(ctx, dut.a_stream, _a_line(line, i == 0, i == len(a) - 1),
                                 rng=rng_a, p_idle=p_idle)

    async def o_sink(ctx):
        for _ in range(n_out):
            p = await stream_get(ctx, dut.o_stream, rng=rng_o, p_stall=p_stall)
            got.append([p.data[c] for c in range(config.cols)])
            flags.append((p.first, p.last))

    run_sim(dut, w_source, a_source, o_sink, deadline_cycles=deadline)
    return np.array(got, dtype=np.int64), flags


def _check(config, tiles, got, flags):
    want = np.concatenate([a.astype(np.int64) @ w.astype(np.int64) for w, a in tiles])
    np.testing.assert_array_equal(got, want)
    want_flags = [(int(i == 0), int(i == len(a) - 1)) for _, a in tiles for i in range(len(a))]
    assert flags == want_flags


def test_signature_and_latency():
    dut = MacArray("tiny")
    assert dut.config is TINY
    assert dut.latency == 3  # a register, product register, one adder level for rows=2
    assert MacArray(SQUARE4).latency == 4
    assert MacArray(PRESETS["zcu102"]).latency == 6
    assert a_line_layout(TINY).size == 2 * 16 + 2
    with pytest.raises(ConfigError):
        MacArray("no-such-preset")
    with pytest.raises(TypeError):
        MacArray(42)


@pytest.mark.parametrize("config", [TINY, SQUARE4], ids=lambda c: c.name)
@pytest.mark.parametrize("p_idle,p_stall", [(0.0, 0.0), (0.3, 0.4), (0.8, 0.1), (0.1, 0.8)])
def test_random_tiles_with_backpressure(config, p_idle, p_stall):
    """Back-to-back tiles (the next tile loads while one computes) under backpressure: sparse
    sources (``p_idle``) leave bubbles in the pipeline, a slow sink (``p_stall``) stalls it."""
    tiles = _random_tiles(config, seed=config.rows, n_tiles=16)
    got, flags = _simulate_tiles(config, tiles, seed=1, p_idle=p_idle, p_stall=p_stall)
    _check(config, tiles, got, flags)


def test_extreme_sums_square4():
    """Largest positive and negative column sums (no overflow of the tree or output)."""
    config = SQUARE4
    r, c = config.rows, config.cols
    tiles = [
        (np.full((r, c), -32768), np.full((2, r), -32768)),  # +rows * 2**30
        (np.full((r, c), 32767), np.full((1, r), -32768)),  # -rows * 32767 * 32768
        (np.full((r, c), -32768), np.array([[32767] * r, [0] * r])),
        (np.array([[-32768, 32767, 0, 1]] * r), np.array([[-32768, 32767, -1, 1]])),
    ]
    got, flags = _simulate_tiles(config, tiles, seed=7, p_idle=0.2, p_stall=0.2)
    _check(config, tiles, got, flags)
    assert got[0, 0] == r * 2**30


def test_full_throughput_and_latency():
    """Without backpressure one line goes in and one comes out every cycle, ``latency`` apart."""
    config = SQUARE4
    dut = MacArray(config)
    rng = np.random.default_rng(3)
    w = rng.integers(-32768, 32768, size=(config.rows, config.cols))
    a = rng.integers(-32768, 32768, size=(24, config.rows))
    in_cycles, out_cycles, got = [], [], []

    async def testbench(ctx):
        ctx.set(dut.o_stream.ready, 1)
        for row in w:
            await stream_put(ctx, dut.w_stream, [int(x) for x in row])
        sent = 0
        ctx.set(dut.a_stream.payload, _a_line(a[0], True, False))
        ctx.set(dut.a_stream.valid, 1)
        cycle = 0
        while len(got) < len(a):
            _, _, a_valid, a_ready, o_valid, o_payload = await ctx.tick().sample(
                dut.a_stream.valid, dut.a_stream.ready, dut.o_stream.valid, dut.o_stream.payload)
            if a_valid and a_ready:
                in_cycles.append(cycle)
                sent += 1
                if sent < len(a):
                    ctx.set(dut.a_stream.payload, _a_line(a[sent], False, sent == len(a) - 1))
                else:
                    ctx.set(dut.a_stream.valid, 0)
            if o_valid:
                out_cycles.append(cycle)
                got.append([o_payload.data[c] for c in range(config.cols)])
            cycle += 1

    run_sim(dut, testbench, deadline_cycles=1000)
    assert in_cycles == list(range(len(a)))
    assert out_cycles == [c + dut.latency for c in in_cycles]
    np.testing.assert_array_equal(np.array(got), a @ w)


def test_output_stall_holds_pipeline():
    """A stalled consumer fills exactly ``latency`` stages, then the input stalls; nothing is
    lost."""
    config = TINY
    dut = MacArray(config)
    rng = np.random.default_rng(5)
    w = rng.integers(-32768, 32768, size=(config.rows, config.cols))
    a = rng.integers(-32768, 32768, size=(10, config.rows))
    accepted = []
    got = []

    async def testbench(ctx):
        for row in w:
            await stream_put(ctx, dut.w_stream, [int(x) for x in row])
        ctx.set(dut.o_stream.ready, 0)
        ctx.set(dut.a_stream.valid, 1)
        sent = 0
        ctx.set(dut.a_stream.payload, _a_line(a[0], True, False))
        for _ in range(20):  # the output never becomes ready in this phase
            _, _, a_ready, o_valid = await ctx.tick().sample(dut.a_stream.ready,
                                                              dut.o_stream.valid)
            if a_ready and sent < len(a) - 1:
                sent += 1
                ctx.set(dut.a_stream.payload, _a_line(a[sent], False, False))
        accepted.append(sent)
        assert o_valid
        # Release the output; drain everything while the source keeps offering lines.
        ctx.set(dut.o_stream.ready, 1)
        while len(got) < len(a):
            _, _, a_valid, a_ready, o_valid, o_payload = await ctx.tick().sample(
                dut.a_stream.valid, dut.a_stream.ready, dut.o_stream.valid, dut.o_stream.payload)
            if a_valid and a_ready:
                sent += 1
                if sent < len(a):
                    ctx.set(dut.a_stream.payload, _a_line(a[sent], False, False))
                else:
                    ctx.set(dut.a_stream.valid, 0)
            if o_valid:
                got.append([o_payload.data[c] for c in range(config.cols)])

    run_sim(dut, testbench, deadline_cycles=1000)
    assert accepted == [dut.latency]
    np.testing.assert_array_equal(np.array(got), a @ w)


def test_first_line_waits_for_complete_tile():
    """A ``first`` line is held until all ``rows`` weight lines are in; the next tile then loads
    into the shadow registers while the array keeps computing with the active one."""
    config = SQUARE4
    dut = MacArray(config)
    rng = np.random.default_rng(11)
    w0, w1 = (rng.integers(-32768, 32768, size=(config.rows, config.cols)) for _ in range(2))
    a = rng.integers(-32768, 32768, size=(3, config.rows))
    got = []

    async def testbench(ctx):
        for row in w0[:-1]:
            await stream_put(ctx, dut.w_stream, [int(x) for x in row])
        ctx.set(dut.a_stream.payload, _a_line(a[0], True, False))
        ctx.set(dut.a_stream.valid, 1)
        for _ in range(5):
            await ctx.tick()
            assert not ctx.get(dut.a_stream.ready)
        await stream_put(ctx, dut.w_stream, [int(x) for x in w0[-1]])
        # The shadow tile is complete but not switched in yet: no more weights accepted.
        assert not ctx.get(dut.w_stream.ready)
        assert ctx.get(dut.a_stream.ready)
        await ctx.tick()  # the first line is accepted and switches tiles
        assert ctx.get(dut.w_stream.ready)
        # Load W1 while the remaining lines of this tile use W0.
        ctx.set(dut.a_stream.payload, _a_line(a[1], False, True))
        await ctx.tick()
        ctx.set(dut.a_stream.valid, 0)
        for row in w1:
            await stream_put(ctx, dut.w_stream, [int(x) for x in row])
        await stream_put(ctx, dut.a_stream, _a_line(a[2], True, True))

    async def sink(ctx):
        for _ in range(3):
            p = await stream_get(ctx, dut.o_stream)
            got.append([p.data[c] for c in range(config.cols)])

    run_sim(dut, testbench, sink, deadline_cycles=1000)
    want = np.concatenate([a[:2] @ w0, a[2:] @ w1])
    np.testing.assert_array_equal(np.array(got), want)


def test_output_width_sign_extension():
    """Sums beyond 32 bits are kept and negative sums are sign-extended to acc_bits."""
    dut = MacArray(TINY)
    assert dut.o_stream.payload.data[0].shape() == signed(TINY.acc_bits)
    tiles = [(np.full((TINY.rows, TINY.cols), -32768),
              np.array([[-32768] * TINY.rows, [32767] * TINY.rows]))]
    got, _ = _simulate_tiles(TINY, tiles)
    assert got[0, 0] == 2**31  # needs 33 signed bits
    assert got[1, 0] == -TINY.rows * 32767 * 32768


def test_mac_array_verilator(tmp_path):
    """MacArray(tiny) in Verilator, driven by cocotb with random backpressure."""
    top = write_verilog(MacArray(TINY), tmp_path, name="mac_array")
    result = run_cocotb(
        [top], "mac_array", "cocotb_mac_array", tmp_path, module_dir=Path(__file__).parent,
        extra_env={"VITAMIN_CONFIG": json.dumps(TINY.to_dict()), "VITAMIN_SEED": "2",
                   "VITAMIN_TILES": "30"})
    assert result.tests == 1
    print(f"verilator build {result.build_seconds:.1f} s, test {result.test_seconds:.1f} s")
