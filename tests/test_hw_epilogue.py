# amaranth: UnusedElaboratable=no
"""Tests of the MATMUL epilogue against golden.units.epilogue (Amaranth simulator)."""
# (The first line silences Amaranth's warning for components built only to see the constructor
# fail or to read their properties; Amaranth reads linter options from line 1 only.)

import numpy as np
import pytest
from amaranth.hdl import Module, Signal, signed
from amaranth.sim import Simulator
from hwutil import make_rng, run_sim, stream_get, stream_put

from vitamin.config import PRESETS, ConfigError
from vitamin.golden.numerics import Sat
from vitamin.golden.units import GELU_FRAC, epilogue
from vitamin.hw.epilogue import Epilogue, EpilogueGearbox, _round_saturate, make_epilogue
from vitamin.isa import Act

TINY = PRESETS["tiny"]
# 8-bit activations, the narrowest accumulator, 8 columns, a small GELU table with a short range.
NARROW = TINY.replace(name="narrow", cols=8, act_bits=8, acc_bits=42, gelu_step_log2=4,
                      gelu_range=4)

ACTS = {Act.NONE: "none", Act.GELU: "gelu", Act.RELU: "relu"}
EDGE_MULTS = [-32768, 32767, -1, 1, 0]


def _shift_for(rng, mag_bits, out_bits):
    """A shift that maps ``mag_bits``-bit products to about ``out_bits`` bits (0..62)."""
    return int(np.clip(mag_bits - out_bits + rng.integers(-3, 4), 0, 62))


def _random_line(config, rng, act):
    """One line's parameters, mixing random values with the edges of every stage."""
    cols = config.cols
    amax = 1 << (config.acc_bits - 1)
    lim = config.gelu_range << GELU_FRAC
    kind = rng.choice(["random", "extreme", "scaled", "gelu_direct"],
                      p=[0.2, 0.25, 0.35, 0.2])
    acc = rng.integers(-amax, amax, size=cols)
    bias = rng.integers(-(1 << 31), 1 << 31, size=cols)
    mult = rng.integers(-32768, 32768, size=cols)
    shift = rng.integers(0, 63, size=cols)
    if kind == "extreme":
        # Accumulators next to the acc_bits limits with biases that do or do not cross them.
        near = rng.integers(0, 1 << 32, size=cols)
        acc = np.where(rng.random(cols) < 0.5, amax - 1 - near, -amax + near)
        acc = np.where(rng.random(cols) < 0.2, np.where(acc > 0, amax - 1, -amax), acc)
        mult = rng.choice(EDGE_MULTS + list(mult), size=cols)
        shift = rng.choice([0, 62, 1, 61] + list(shift), size=cols)
    elif kind == "scaled":
        # Products that land near the activation (or the GELU input) range after the shift.
        acc = rng.integers(-(1 << 40), 1 << 40, size=cols) >> rng.integers(0, 40, size=cols)
        bias = bias >> rng.integers(0, 32, size=cols)
        mag = np.array([int(abs(int(a) + int(b)) * abs(int(mu))).bit_length()
                        for a, b, mu in zip(acc, bias, mult, strict=True)])
        out_bits = 16 + 4 if act == Act.GELU else config.act_bits
        shift = np.array([_shift_for(rng, int(b), out_bits) for b in mag])
    elif kind == "gelu_direct":
        # x = acc exactly (bias 0, mult 1, shift 0): around 0, the table points, the end of the
        # table (|x| = lim - 1, lim, lim + 1), and beyond 32 bits.
        step = 1 << (GELU_FRAC - config.gelu_step_log2)
        cand = [0, 1, -1, lim - 1, lim, lim + 1, -lim + 1, -lim, -lim - 1,
                (1 << 31) - 1, -(1 << 31), 1 << 31, -(1 << 31) - 1, 1 << 40, -(1 << 40)]
        pts = rng.integers(-lim // step, lim // step + 1, size=cols) * step
        cand += list(pts) + list(pts + rng.integers(-2, 3, size=cols))
        acc = rng.choice(np.array(cand + list(rng.integers(-2 * lim, 2 * lim, size=cols))),
                         size=cols)
        bias = np.zeros(cols, dtype=np.int64)
        mult = np.ones(cols, dtype=np.int64)
        shift = np.zeros(cols, dtype=np.int64)
    # GELU outputs are Q.16 values of up to ~20 bits and residual products 31 bits: shifts
    # around (product bits - act_bits) give results inside the range, 0 and 62 the edges.
    act_shifts = [0, 62] + [int(x) for x in rng.integers(20 - config.act_bits, 40 - config.act_bits,
                                                         size=6)]
    res_shifts = [0, 62] + [int(x) for x in rng.integers(28 - config.act_bits, 36 - config.act_bits,
                                                         size=6)]
    op = {
        "act": act,
        "act_mult": int(rng.choice(EDGE_MULTS + list(rng.integers(-32768, 32768, size=8)))),
        "act_shift": int(rng.choice(np.clip(act_shifts, 0, 62))),
        "res_en": int(rng.random() < 0.6),
        "res_mult": int(rng.choice(EDGE_MULTS + list(rng.integers(-32768, 32768, size=8)))),
        "res_shift": int(rng.choice(np.clip(res_shifts, 0, 62))),
    }
    res = rng.integers(-32768, 32768, size=cols)
    return {"acc": acc, "bias": bias, "mult": mult, "shift": shift, "res": res, "op": op}


def _payload(line):
    lanes = [{k: int(line[k][c]) for k in ("acc", "bias", "mult", "shift", "res")}
             for c in range(len(line["acc"]))]
    return {"lanes": lanes, "op": line["op"]}


def _golden(config, line):
    """(activations, saturation events) of one line."""
    op = line["op"]
    sat = Sat()
    y = epilogue(np.asarray(line["acc"], dtype=np.int64)[None, :], config, sat,
                 bias=np.asarray(line["bias"], dtype=np.int64),
                 mult=np.asarray(line["mult"], dtype=np.int64),
                 shift=np.asarray(line["shift"], dtype=np.int64),
                 act=ACTS[op["act"]], act_mult=op["act_mult"], act_shift=op["act_shift"],
                 residual=(np.asarray(line["res"], dtype=np.int64)[None, :]
                           if op["res_en"] else None),
                 res_mult=op["res_mult"], res_shift=op["res_shift"])
    return y[0], sat.events


def _simulate(config, lines, *, seed, p_idle, p_stall, dut=None):
    dut = Epilogue(config) if dut is None else dut
    rng_i, rng_o = make_rng(seed), make_rng(seed + 1)
    got, sats = [], []

    async def source(ctx):
        for line in lines:
            await stream_put(ctx, dut.i_stream, _payload(line), rng=rng_i, p_idle=p_idle)

    async def sink(ctx):
        for _ in lines:
            p = await stream_get(ctx, dut.o_stream, rng=rng_o, p_stall=p_stall)
            got.append([p.data[c] for c in range(config.cols)])
            sats.append(p.sat)

    run_sim(dut, source, sink, deadline_cycles=10 * config.epi_ratio * len(lines) + 100)
    return np.array(got, dtype=np.int64), sats


def _lines(config, seed, n, acts):
    rng = np.random.default_rng(seed)
    # Runs of lines of one instruction, then a switch: the parameters travel with the lines.
    out = []
    while len(out) < n:
        act = acts[int(rng.integers(len(acts)))]
        out += [_random_line(config, rng, act) for _ in range(int(rng.integers(1, 8)))]
    return out[:n]


def _check(config, lines, got, sats):
    want = [_golden(config, line) for line in lines]
    np.testing.assert_array_equal(got, np.array([w[0] for w in want]))
    assert sats == [w[1] for w in want]


@pytest.mark.parametrize("config", [TINY, NARROW], ids=lambda c: c.name)
@pytest.mark.parametrize("act", list(ACTS), ids=lambda a: a.name.lower())
def test_epilogue_matches_golden(config, act):
    lines = _lines(config, seed=list(ACTS).index(act) + 10 * config.cols, n=400, acts=[act])
    got, sats = _simulate(config, lines, seed=1, p_idle=0.3, p_stall=0.3)
    _check(config, lines, got, sats)
    # The lines exercise what they are meant to: outputs inside the range and on its rails,
    # and saturation events.
    inner = (got > config.act_min) & (got < config.act_max)
    assert 0.3 < inner.mean() < 0.9
    assert sum(sats) > 0


def test_epilogue_mixed_instructions_back_to_back():
    # Activations switching from line to line, without idle cycles on the input, and a sink
    # that stalls: the per-line parameters must stay with their line through every stage.
    lines = _lines(TINY, seed=99, n=150, acts=list(ACTS))
    got, sats = _simulate(TINY, lines, seed=5, p_idle=0.0, p_stall=0.5)
    _check(TINY, lines, got, sats)


def test_epilogue_counts_every_saturation_kind():
    # One element per saturation of the golden model; each line isolates a stage.
    cfg = TINY
    amax = (1 << (cfg.acc_bits - 1)) - 1
    lim = cfg.gelu_range << GELU_FRAC
    base = {"bias": [0] * 4, "mult": [1] * 4, "shift": [0] * 4, "res": [0] * 4}
    op = {"act": Act.NONE, "act_mult": 1, "act_shift": 0, "res_en": 0, "res_mult": 0,
          "res_shift": 0}
    lines = [
        # acc + bias beyond acc_bits (and then the activation range: 2 events), 0 + 0 (none).
        {**base, "acc": [amax, -amax - 1, 0, 5], "bias": [1, -1, 0, 0], "op": op},
        # GELU input beyond 32 bits (32-bit saturation; the output then saturates too).
        {**base, "acc": [1 << 33, -(1 << 33), lim, -lim], "op": {**op, "act": Act.GELU}},
        # residual saturation only: y = 32767 + 1.
        {**base, "acc": [32767, -32768, 100, 0], "res": [1, -1, 5, 0],
         "op": {**op, "res_en": 1, "res_mult": 1, "res_shift": 0}},
        # residual values are ignored without res_en.
        {**base, "acc": [32767, -32768, 100, 0], "res": [1, -1, 5, 0],
         "op": {**op, "res_en": 0, "res_mult": 1, "res_shift": 0}},
    ]
    lines = [{k: (np.asarray(v) if k != "op" else v) for k, v in line.items()} for line in lines]
    got, sats = _simulate(cfg, lines, seed=2, p_idle=0.2, p_stall=0.2)
    _check(cfg, lines, got, sats)
    assert sats == [4, 4, 2, 0]


def _timed_run(dut, cfg, lines, deadline):
    """Offer a line every cycle and sink every cycle: (cycles each line was taken, cycles each
    output was valid, outputs, saturation counts)."""
    n = len(lines)
    t_in, t_out, got, sats = [], [], [], []

    async def source(ctx):
        ctx.set(dut.i_stream.valid, 1)
        cycle = 0
        for line in lines:
            ctx.set(dut.i_stream.payload, _payload(line))
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
            _, _, valid, p = await ctx.tick().sample(dut.o_stream.valid, dut.o_stream.payload)
            cycle += 1
            if valid:
                t_out.append(cycle)
                got.append([p.data[c] for c in range(cfg.cols)])
                sats.append(p.sat)

    run_sim(dut, source, sink, deadline_cycles=deadline)
    return t_in, t_out, np.array(got, dtype=np.int64), sats


def test_epilogue_throughput_and_latency():
    cfg = TINY
    dut = Epilogue(cfg)
    lines = _lines(cfg, seed=3, n=40, acts=list(ACTS))
    n = len(lines)
    t_in, t_out, got, sats = _timed_run(dut, cfg, lines, n + 100)
    assert dut.latency == 19
    assert t_in == list(range(1, n + 1))
    assert [o - i for i, o in zip(t_in, t_out, strict=True)] == [dut.latency] * n
    _check(cfg, lines, got, sats)


def test_epilogue_rejects_bad_config():
    with pytest.raises(ConfigError, match="nope"):
        Epilogue("nope")
    with pytest.raises(TypeError, match="Config"):
        Epilogue(3)


@pytest.mark.parametrize("epi_lanes", [1, 2, 4])
def test_gearbox_matches_golden(epi_lanes):
    # A narrower epilogue behind the gearbox: the same bits as the full-width one, with random
    # idle input cycles and a stalling sink, every activation mixed.
    cfg = NARROW.replace(epi_lanes=epi_lanes)
    dut = make_epilogue(cfg)
    assert isinstance(dut, EpilogueGearbox)
    lines = _lines(cfg, seed=40 + epi_lanes, n=160, acts=list(ACTS))
    got, sats = _simulate(cfg, lines, seed=7, p_idle=0.3, p_stall=0.4, dut=dut)
    _check(cfg, lines, got, sats)
    assert sum(sats) > 0


def test_gearbox_rate_and_latency():
    # Offered a line every cycle, the gearbox takes one per R cycles; each comes out `latency`
    # cycles after it was taken.
    cfg = NARROW.replace(epi_lanes=2)
    R = cfg.epi_ratio
    dut = EpilogueGearbox(cfg)
    lines = _lines(cfg, seed=4, n=30, acts=list(ACTS))
    n = len(lines)
    t_in, t_out, got, sats = _timed_run(dut, cfg, lines, R * n + 100)
    assert dut.latency == Epilogue(cfg.replace(cols=2, epi_lanes=0)).latency + R + 1
    assert t_in == [1 + R * i for i in range(n)]
    assert [o - i for i, o in zip(t_in, t_out, strict=True)] == [dut.latency] * n
    _check(cfg, lines, got, sats)


def test_epi_lanes_must_divide_cols():
    with pytest.raises(ConfigError, match="epi_lanes"):
        NARROW.replace(epi_lanes=3)
    with pytest.raises(ConfigError, match="epi_lanes"):
        NARROW.replace(epi_lanes=16)
    assert NARROW.epi_ratio == 1 and NARROW.replace(epi_lanes=2).epi_ratio == 4
    assert NARROW.replace(epi_lanes=2).fingerprint() == NARROW.fingerprint()


@pytest.mark.parametrize("width,bits", [(5, 4), (6, 4), (7, 3), (8, 2), (8, 5), (9, 6)])
def test_round_saturate_every_value(width, bits):
    """The epilogue's rounding and saturation (``_round_saturate``) on every ``width``-bit input:
    ``rnd(t / 2)`` (half up), clamped to ``bits`` signed bits, and the out-of-range flag."""
    m = Module()
    t = Signal(signed(width))
    y = Signal(signed(bits))
    ev = Signal()
    v, e = _round_saturate(t, bits)
    m.d.comb += [y.eq(v), ev.eq(e)]
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    bad = []

    async def bench(ctx):
        for x in range(-(1 << (width - 1)), 1 << (width - 1)):
            ctx.set(t, x)
            r = (x + 1) >> 1
            want = (min(max(r, lo), hi), int(not lo <= r <= hi))
            got = (ctx.get(y), ctx.get(ev))
            if got != want:
                bad.append((x, got, want))

    sim = Simulator(m)
    sim.add_testbench(bench)
    sim.run()
    assert not bad, bad[:5]
