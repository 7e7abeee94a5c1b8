# amaranth: UnusedElaboratable=no
"""Tests of the scratchpad execution units (hw/rowops.py) against the golden ISA simulator.

Each test builds a harness (the unit, a preloaded scratchpad, index memory, row-state memory and
a register array), runs a sequence of random instructions encoded with ``vitamin.isa.encode``,
and after each one compares the error code, the saturation events and the memories with
``golden.isasim.Machine`` executing the same decoded instruction on the same state.
"""
# (The first line silences Amaranth's warning for units built only to read their properties.)

import numpy as np
import pytest
from amaranth.hdl import Module, signed
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In
from hwutil import run_sim

from vitamin import isa
from vitamin.compiler.cost import ROW_OVERHEAD
from vitamin.config import PRESETS
from vitamin.golden.isasim import Fault, Machine
from vitamin.hw.mem import IdxMemory, RowStateMemory, Scratchpad
from vitamin.hw.ports import N_REGS, UnitControl, spad_lanes
from vitamin.hw.rowops import LayerNormRowUnit, SoftmaxRowUnit, TopKUnit, VecUnit
from vitamin.isa import ErrorCode, Opcode, SmMode, VecOp

TINY = PRESETS["tiny"]
TINY4 = TINY.replace(row_lanes=4)
TINY4_A8 = TINY.replace(row_lanes=4, act_bits=8)
CONFIGS = [TINY, TINY4]
CONFIG_IDS = ["tiny", "lanes4"]


# -- harness --------------------------------------------------------------------------------------

class Harness(wiring.Component):
    """A unit with its memories: scratchpad, index memory, row-state memory, 16 registers.

    Attributes
    ----------
    ctl : ``In(UnitControl())``
        The unit's control port, driven by the testbench.
    regs : ``In(ArrayLayout(signed(32), 16))``
        Register values seen by the unit (``REG[0]`` must be 0).
    """

    def __init__(self, config, unit, *, spad, idx=None, rs=None):
        self.config = config
        self.unit = unit
        self.spad = Scratchpad(config, init=[int(v) for v in spad])
        self.idx = IdxMemory(config, init=idx)
        self.rs = RowStateMemory(config, init=rs)
        super().__init__({"ctl": In(UnitControl()),
                          "regs": In(data.ArrayLayout(signed(32), N_REGS))})

    def elaborate(self, platform):
        m = Module()
        m.submodules.unit = u = self.unit
        m.submodules.spad = self.spad
        m.submodules.idx = self.idx
        m.submodules.rs = self.rs
        wiring.connect(m, wiring.flipped(self.ctl), u.ctl)
        members = u.signature.members
        wiring.connect(m, u.spad, self.spad.port)
        if "idx" in members:
            wiring.connect(m, u.idx, self.idx.port)
        if "rs" in members:
            wiring.connect(m, u.rs, self.rs.port)
        if "regs" in members:
            m.d.comb += u.regs.regs.eq(self.regs)
        return m


def _rs_fields(st):
    return {"have": int(st.have), "m": int(st.m), "s": int(st.s), "c": int(st.c),
            "r": int(st.r), "k": int(st.k)}


class Bench:
    """Random machine state shared by the hardware harness and the golden machine."""

    def __init__(self, config, unit_cls, seed, *, extremes=True):
        self.cfg = config
        self.rng = np.random.default_rng(seed)
        rng = self.rng
        W = config.spad_words
        spad = rng.integers(-32768, 32768, size=W)
        if extremes:
            # Blocks of extreme words and of small words (realistic activations).
            for _ in range(16):
                a = int(rng.integers(0, W - 64))
                spad[a:a + 64] = rng.choice([-32768, 32767, -1, 0, 1], size=64)
            for _ in range(16):
                a = int(rng.integers(0, W - 256))
                spad[a:a + 256] = rng.integers(-300, 300, size=256)
        self.spad0 = spad
        idx = rng.integers(-(1 << 31), 1 << 31, size=(config.idx_entries, 2))
        self.idx0 = idx
        n_rs = config.rowstate_rows
        self.rs0 = {
            "have": rng.integers(0, 2, size=n_rs).astype(bool),
            "m": rng.integers(-32768, 32768, size=n_rs),
            "s": rng.integers(0, 1 << 24, size=n_rs),
            "c": rng.integers(0, 1 << 15, size=n_rs),
            "r": rng.integers(1 << 14, (1 << 15) + 1, size=n_rs),
            "k": rng.integers(0, 40, size=n_rs),
        }
        self.regs0 = np.zeros(N_REGS, dtype=np.int64)
        self.regs0[1:] = rng.integers(0, 64, size=N_REGS - 1)
        self.unit = unit_cls(config)
        self.h = Harness(
            config, self.unit, spad=spad,
            idx=[{"a": int(a), "b": int(b)} for a, b in idx],
            rs=[{k: int(self.rs0[k][i]) for k in self.rs0} for i in range(n_rs)])
        self.mach = Machine(config, dram=np.zeros(4096, np.uint8))
        self.mach.spad[:] = spad
        self.mach.idx[:] = idx
        for k, v in self.rs0.items():
            getattr(self.mach.rs, k)[:] = v
        self.mach.regs[:] = self.regs0
        self.results = []   # (name, error, cycles) per instruction

    # golden ------------------------------------------------------------------------------------

    def golden(self, word):
        op, fields = isa.decode(word)
        before = self.mach.sat.events
        try:
            getattr(self.mach, "op_" + op.name.lower())(fields)
            code = ErrorCode.OK
        except Fault as e:
            code = e.code
        return code, self.mach.sat.events - before

    # hardware ----------------------------------------------------------------------------------

    async def execute(self, ctx, word):
        """Run one instruction on the harness; returns (error, saturation events, cycles)."""
        ctl = self.h.ctl
        ctx.set(ctl.instr, int.from_bytes(word, "little"))
        ctx.set(ctl.start, 1)
        await ctx.tick()
        ctx.set(ctl.start, 0)
        ctx.set(ctl.instr, 0)   # the unit must have latched the word
        cycles, sat = 1, 0
        while True:
            done, busy, s = ctx.get(ctl.done), ctx.get(ctl.busy), ctx.get(ctl.sat_inc)
            sat += s
            if done:
                assert not busy
                return ErrorCode(ctx.get(ctl.error)), sat, cycles
            assert busy, "busy must stay high until done"
            await ctx.tick()
            cycles += 1

    def read_spad(self, ctx, addrs=None):
        if addrs is None:
            addrs = range(self.cfg.spad_words)
        return np.array([ctx.get(self.h.spad.word(a)) for a in addrs],
                        dtype=np.int64)

    def read_idx(self, ctx, lo=0, n=None):
        n = self.cfg.idx_entries - lo if n is None else n
        out = np.zeros((n, 2), dtype=np.int64)
        for i in range(n):
            e = ctx.get(self.h.idx.word(lo + i))
            out[i] = (e.a, e.b)
        return out

    def read_rs(self, ctx, lo=0, n=None):
        n = self.cfg.rowstate_rows - lo if n is None else n
        return [_rs_fields(ctx.get(self.h.rs.word(lo + i))) for i in range(n)]

    def golden_rs(self, lo, n):
        rs = self.mach.rs
        return [{"have": int(rs.have[i]), "m": int(rs.m[i]), "s": int(rs.s[i]),
                 "c": int(rs.c[i]), "r": int(rs.r[i]), "k": int(rs.k[i])}
                for i in range(lo, lo + n)]

    async def check(self, ctx, word, *, out=None, idx=None, rs=None, name=""):
        """Execute ``word`` on both models and compare.

        ``out`` = (addr, rows, stride, cols): scratchpad region to compare right away;
        ``idx`` = (lo, n): index-memory entries; ``rs`` = (lo, n): row-state rows.
        The whole scratchpad is compared by :meth:`final`.
        """
        want_err, want_sat = self.golden(word)
        err, sat, cycles = await self.execute(ctx, word)
        op, fields = isa.decode(word)
        what = f"{name} {op.name} {fields}"
        assert err == want_err, f"{what}: error {err.name}, golden {want_err.name}"
        assert sat == want_sat, f"{what}: {sat} saturation events, golden {want_sat}"
        if out is not None and err == ErrorCode.OK:
            a, rows, stride, cols = out
            addrs = [a + i * stride + j for i in range(rows) for j in range(cols)]
            np.testing.assert_array_equal(self.read_spad(ctx, addrs), self.mach.spad[addrs],
                                          err_msg=what)
        if idx is not None:
            lo, n = idx
            np.testing.assert_array_equal(self.read_idx(ctx, lo, n), self.mach.idx[lo:lo + n],
                                          err_msg=what)
        if rs is not None:
            lo, n = rs
            assert self.read_rs(ctx, lo, n) == self.golden_rs(lo, n), what
        self.results.append((what, err, cycles))
        return err, cycles

    async def final(self, ctx):
        """The whole scratchpad, index memory and row state agree (no stray writes)."""
        np.testing.assert_array_equal(self.read_spad(ctx), self.mach.spad)
        np.testing.assert_array_equal(self.read_idx(ctx), self.mach.idx)
        assert self.read_rs(ctx) == self.golden_rs(0, self.cfg.rowstate_rows)

    def run(self, testbench, deadline_cycles=200_000):
        async def tb(ctx):
            ctx.set(self.h.regs, [int(v) for v in self.regs0])
            await testbench(ctx)
            await self.final(ctx)
        run_sim(self.h, tb, deadline_cycles=deadline_cycles)


def _region(rng, cfg, rows, cols, stride=None, *, avoid=()):
    """A random region (addr, stride) of rows x cols inside the scratchpad, not overlapping the
    regions in ``avoid`` [(lo, hi)]."""
    W = cfg.spad_words
    if stride is None:
        stride = cols + int(rng.choice([0, 0, 1, 3, 17]))
    span = (rows - 1) * stride + cols
    for _ in range(1000):
        a = int(rng.integers(0, W - span + 1))
        if all(a + span <= lo or a >= hi for lo, hi in avoid):
            return a, stride
    raise AssertionError("no free region")


# -- VEC ------------------------------------------------------------------------------------------

def _vec_random(bench, i):
    rng, cfg = bench.rng, bench.cfg
    op = VecOp(int(rng.integers(0, 4)))
    L = spad_lanes(cfg)
    m = int(rng.choice([1, 1, 2, 3, 4]))
    n = int(rng.choice([1, L - 1 or 1, L, L + 1, 2 * L + 3, int(rng.integers(1, 40))]))
    group = int(rng.integers(1, 4)) if op == VecOp.POOL else int(rng.integers(0, 5))
    a_rows = m * group if op == VecOp.POOL else m
    a_addr, a_stride = _region(rng, cfg, a_rows, n)
    used = [(a_addr, a_addr + (a_rows - 1) * a_stride + n)]
    b_addr, b_stride = _region(rng, cfg, m, n)
    if op in (VecOp.ADD, VecOp.MUL):
        used.append((b_addr, b_addr + (m - 1) * b_stride + n))
    out_addr, out_stride = _region(rng, cfg, m, n, avoid=used)
    if i % 7 == 3 and op != VecOp.POOL:      # in place: out = A
        out_addr, out_stride = a_addr, a_stride
    if i % 7 == 5 and op in (VecOp.ADD, VecOp.MUL):   # in place: out = B
        out_addr, out_stride = b_addr, b_stride
    kind = i % 4
    if kind == 0:        # unit gain
        ma, sa, mb, sb = 1, 0, 1, 0
    elif kind == 1:      # typical requantisation
        ma, sa = int(rng.integers(-32768, 32768)), int(rng.integers(8, 30))
        mb, sb = int(rng.integers(-32768, 32768)), int(rng.integers(8, 30))
    elif kind == 2:      # extremes (saturating)
        ma, mb = int(rng.choice([-32768, 32767])), int(rng.choice([-32768, 32767]))
        sa, sb = int(rng.choice([0, 1, 15, 62])), int(rng.choice([0, 2, 62]))
    else:
        ma, sa = int(rng.integers(-32768, 32768)), int(rng.integers(0, 63))
        mb, sb = int(rng.integers(-32768, 32768)), int(rng.integers(0, 63))
    fields = dict(op=op, m=m, n=n, group=group, a_addr=a_addr, a_stride=a_stride,
                  b_addr=b_addr, b_stride=b_stride, out_addr=out_addr, out_stride=out_stride,
                  ma=ma, sa=sa, mb=mb, sb=sb)
    return fields


def _vec_errors(cfg):
    """Field and range errors, each with the golden model's code (checked by the test)."""
    W = cfg.spad_words
    ok = dict(op=VecOp.ADD, m=2, n=5, group=1, a_addr=0, a_stride=8, b_addr=100, b_stride=8,
              out_addr=200, out_stride=8, ma=3, sa=1, mb=5, sb=2)
    cases = [
        dict(m=0), dict(n=0), dict(m=cfg.max_dim + 1), dict(n=cfg.max_dim + 1),
        dict(sa=63), dict(sb=63), dict(op=VecOp.COPY, sb=63),
        dict(op=VecOp.POOL, group=0), dict(op=VecOp.POOL, group=0, sa=63),
        dict(a_addr=W - 12), dict(a_addr=W - 13, a_stride=8, n=5),
        dict(b_addr=W - 5), dict(op=VecOp.COPY, b_addr=W - 1),  # B unused by COPY: fine
        dict(op=VecOp.POOL, group=(W // 8), a_stride=8, m=1),
        dict(out_addr=W - 13), dict(out_addr=W - 13, a_addr=W - 13),
        dict(m=3, out_stride=(1 << 22) - 1), dict(m=cfg.max_dim, a_stride=(1 << 22) - 1),
        # (m * group rows: the golden model builds the whole address array, keep it small)
        dict(op=VecOp.POOL, m=3, group=65535, a_stride=(1 << 22) - 1),
        dict(op=VecOp.POOL, m=2, group=W // 16, a_stride=7, a_addr=0, out_addr=W - 20),
        dict(op=VecOp.POOL, m=2, group=W // 16, a_stride=7, a_addr=W - 14333),
        dict(m=0, a_addr=W),
    ]
    return [{**ok, **c} for c in cases]


@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_vec_random(config):
    """Random COPY/ADD/MUL/POOL instructions: shapes with n not a multiple of the lanes, m = 1,
    strides, unaligned addresses, in-place operation, extreme words and multipliers; then the
    field and range errors."""
    bench = Bench(config, VecUnit, seed=config.row_lanes)

    async def tb(ctx):
        for i in range(36):
            f = _vec_random(bench, i)
            await bench.check(ctx, isa.encode(Opcode.VEC, **f),
                              out=(f["out_addr"], f["m"], f["out_stride"], f["n"]), name=f"#{i}")
        for f in _vec_errors(config):
            err, cycles = await bench.check(ctx, isa.encode(Opcode.VEC, **f), name="error")
        assert sum(r[1] != ErrorCode.OK for r in bench.results) >= 15

    bench.run(tb)


def test_vec_act8_and_timing():
    """act_bits = 8 saturation; the cycle count of a long COPY/ADD/POOL is the number of reads
    plus a constant overhead."""
    cfg = TINY4_A8
    bench = Bench(cfg, VecUnit, seed=7)
    L = spad_lanes(cfg)
    n, m = 10 * L, 3

    async def tb(ctx):
        base = dict(m=m, n=n, group=2, a_addr=1, a_stride=n, b_addr=5000, b_stride=n + 1,
                    out_addr=9001, out_stride=n, ma=200, sa=3, mb=-7, sb=0)
        cyc = {}
        for op in VecOp:
            f = {**base, "op": op}
            _, cyc[op] = await bench.check(ctx, isa.encode(Opcode.VEC, **f),
                                           out=(f["out_addr"], m, n, n))
        over = {op: cyc[op] - m * bench.unit.row_cycles(op, n, 2) for op in VecOp}
        # the constant is the cost model's (15: checks on registered multiplier operands)
        assert len(set(over.values())) == 1 and over[VecOp.COPY] == ROW_OVERHEAD["VEC"], over

    bench.run(tb)


# -- TOPK -----------------------------------------------------------------------------------------

async def _topk_random(ctx, bench, i):
    rng, cfg = bench.rng, bench.cfg
    R = cfg.row_lanes
    m = int(rng.choice([1, 1, 2, 3, 5]))
    n = int(rng.choice([1, R - 1 or 1, R, R + 1, 2 * R + 1, 7, int(rng.integers(1, 30))]))
    k = int(rng.integers(1, min(cfg.max_topk, n) + 1))
    in_addr, in_stride = _region(rng, cfg, m, n)
    if i % 5 == 2:   # many ties: a small value range
        await _put_spad(ctx, bench, in_addr, m, in_stride, rng.integers(-2, 2, size=(m, n)))
    causal = int(i % 3 == 1)
    q_pos = int(rng.choice([0, 1, n // 2, n + 3, (1 << 32) - 1 - int(rng.integers(0, 3))]))
    idx_addr = int(rng.integers(0, cfg.idx_entries - m * k + 1))
    return dict(causal=causal, k=k, m=m, n=n, in_addr=in_addr, in_stride=in_stride,
                idx_addr=idx_addr, q_pos=q_pos)


def _topk_errors(cfg):
    ok = dict(causal=0, k=2, m=2, n=6, in_addr=10, in_stride=6, idx_addr=0, q_pos=0)
    W, E = cfg.spad_words, cfg.idx_entries
    cases = [dict(m=0), dict(n=0), dict(n=cfg.max_dim + 1), dict(k=0),
             dict(k=cfg.max_topk + 1, n=20), dict(k=7, n=6), dict(k=0, in_addr=W),
             dict(in_addr=W - 11), dict(in_addr=W - 12, in_stride=6, n=6),
             dict(idx_addr=E - 3), dict(idx_addr=E - 3, in_addr=W - 1),
             dict(m=cfg.max_dim, in_stride=(1 << 22) - 1),
             dict(idx_addr=(1 << 20) - 1, m=cfg.max_dim, k=cfg.max_topk, n=cfg.max_topk)]
    return [{**ok, **c} for c in cases]


@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_topk_random(config):
    """Random rows (ties, extreme words), k up to max_topk, causal limits (q_pos near 2^32 as
    well), index-memory placement; then the field and range errors."""
    bench = Bench(config, TopKUnit, seed=10 + config.row_lanes)

    async def tb(ctx):
        for i in range(30):
            f = await _topk_random(ctx, bench, i)
            await bench.check(ctx, isa.encode(Opcode.TOPK, **f),
                              idx=(f["idx_addr"], f["m"] * f["k"]), name=f"#{i}")
        for f in _topk_errors(config):
            await bench.check(ctx, isa.encode(Opcode.TOPK, **f), idx=(0, 16), name="error")

    bench.run(tb)


def test_topk_timing():
    """A row takes max(chunks, k) cycles; an instruction adds k + ROW_OVERHEAD["TOPK"] (10)."""
    cfg = TINY4
    bench = Bench(cfg, TopKUnit, seed=3)

    async def tb(ctx):
        over = []
        for n, k, m in ((40, 3, 4), (40, 8, 4), (3, 3, 6), (8, 8, 6), (40, 3, 1)):
            f = dict(causal=0, k=k, m=m, n=n, in_addr=77, in_stride=n, idx_addr=5, q_pos=0)
            _, c = await bench.check(ctx, isa.encode(Opcode.TOPK, **f), idx=(5, m * k))
            # (plus the last row's k writes and a constant)
            over.append(c - m * bench.unit.row_cycles(n, k) - k)
        assert max(over) == ROW_OVERHEAD["TOPK"], over

    bench.run(tb)


async def _write_spad(ctx, bench, lo, n):
    """Copy golden scratchpad words lo .. lo + n - 1 into the hardware scratchpad."""
    for a in range(lo, lo + n):
        ctx.set(bench.h.spad.word(a), int(bench.mach.spad[a]))


# -- SOFTMAX --------------------------------------------------------------------------------------

def _scores(rng, shape, kind):
    if kind == 0:
        return rng.integers(-32768, 32768, size=shape)
    if kind == 1:
        return rng.choice(np.array([-32768, 32767, 0, -1]), size=shape)
    if kind == 2:
        return np.sort(rng.integers(-30000, 30000, size=shape), axis=-1)
    return rng.integers(-60, 60, size=shape)


async def _put_spad(ctx, bench, addr, rows, stride, values):
    """Write rows of values to both models' scratchpads."""
    for i, row in enumerate(values):
        a = addr + i * stride
        bench.mach.spad[a:a + len(row)] = row
        await _write_spad(ctx, bench, a, len(row))


async def _put_idx(ctx, bench, lo, entries):
    for i, (a, b) in enumerate(entries):
        bench.mach.idx[lo + i] = (a, b)
        ctx.set(bench.h.idx.mem.data[lo + i], {"a": int(a), "b": int(b)})


def _set_reg(ctx, bench, r, v):
    bench.mach.regs[r] = v
    ctx.set(bench.h.regs[r], int(v))


def _spans_for(rng, n):
    """A random span list covering at least n positions (with empty and negative spans)."""
    spans, total = [], 0
    while total < n:
        kind = rng.integers(0, 6)
        start = int(rng.integers(-5, 100))
        if kind == 0:
            ln = 0
        elif kind == 1:
            ln = -int(rng.integers(1, 5))
        elif kind == 2 and total > 0:
            ln = int(rng.integers(100, 1 << 20))     # longer than the positions still needed
        else:
            ln = int(rng.integers(1, 9))
        spans.append((start, ln))
        total += max(ln, 0)
    return spans


async def _softmax_random(ctx, bench, i, mode):
    rng, cfg = bench.rng, bench.cfg
    R = cfg.row_lanes
    m = int(rng.choice([1, 1, 2, 3]))
    n = int(rng.choice([1, R - 1 or 1, R, R + 1, 2 * R + 1, 9, int(rng.integers(1, 34))]))
    in_addr, in_stride = _region(rng, cfg, m, n)
    out_addr, out_stride = _region(rng, cfg, m, n, avoid=[(in_addr, in_addr + m * in_stride)])
    if i % 5 == 4:
        out_addr, out_stride = in_addr, in_stride
    await _put_spad(ctx, bench, in_addr, m, in_stride, _scores(rng, (m, n), i % 4))
    f = dict(mode=mode, m=m, n=n, in_addr=in_addr, in_stride=in_stride, out_addr=out_addr,
             out_stride=out_stride, mult=int(rng.integers(1, 1 << 15)),
             shift=int(rng.choice([6, 10, 14, 18, 22, 0, 62])), causal=int(i % 3 != 0),
             q_pos=int(rng.integers(0, 40)), k_pos=int(rng.integers(0, 40)), rs_base=0)
    if i % 7 == 6:
        f.update(q_pos=(1 << 32) - 1 - int(rng.integers(0, 3)),
                 k_pos=(1 << 32) - int(rng.integers(1, 40)))
    if i % 2 == 1:
        spans = _spans_for(rng, n)
        lo = int(rng.integers(0, cfg.idx_entries - len(spans) - 4))
        extra = int(rng.integers(0, 3))   # entries after the needed ones are not read
        await _put_idx(ctx, bench, lo, spans + [(7, 3)] * extra)
        f.update(kpos_spans=1, idx_addr=lo)
        if i % 4 == 1:
            r = int(rng.integers(1, 16))
            _set_reg(ctx, bench, r, len(spans) + extra)
            f.update(count_reg=r, n_spans=int(rng.integers(0, 3)))
        else:
            f.update(n_spans=len(spans) + extra)
    return f


async def _online_rows(ctx, bench, i):
    """A sequence of ONLINE chunks over the same rows (first ... last), then the golden check of
    the row state after each."""
    rng, cfg = bench.rng, bench.cfg
    m = int(rng.choice([1, 2, 3]))
    rs_base = int(rng.integers(0, cfg.rowstate_rows - m + 1))
    n_chunks = int(rng.choice([1, 2, 3]))
    start_first = i % 4 != 3          # else: continue from the random row state
    words = []
    for c in range(n_chunks):
        f = await _softmax_random(ctx, bench, 7 * i + c, SmMode.ONLINE)
        f.update(m=m, rs_base=rs_base, first=int(c == 0 and start_first),
                 last=int(c == n_chunks - 1), mult=int(rng.integers(1, 1 << 15)) if c == 0
                 else words[0][1]["mult"])
        # the chunk's input rows: re-place for the final m
        in_addr, in_stride = _region(rng, cfg, m, f["n"])
        out_addr, out_stride = _region(rng, cfg, m, f["n"],
                                       avoid=[(in_addr, in_addr + m * in_stride)])
        await _put_spad(ctx, bench, in_addr, m, in_stride, _scores(rng, (m, f["n"]), c % 4))
        f.update(in_addr=in_addr, in_stride=in_stride, out_addr=out_addr, out_stride=out_stride)
        words.append((isa.encode(Opcode.SOFTMAX, **f), f))
    for w, f in words:
        await bench.check(ctx, w, out=(f["out_addr"], f["m"], f["out_stride"], f["n"]),
                          rs=(rs_base, m), name=f"online #{i}")


def test_online_longest_row():
    """ONLINE rows of ``max_dim`` columns (``tiny``: 512 chunks): the running sum's FIFO holds
    half a row's chunks, so these fill it furthest. Sorted scores raise the running max in every
    chunk (every chunk rescales the sum), then random ones; bit-exact with the row state,
    cycles as ``row_cycles``."""
    cfg = TINY
    bench = Bench(cfg, SoftmaxRowUnit, seed=61)
    n = cfg.max_dim

    async def tb(ctx):
        rng = bench.rng
        m = 2
        x = np.concatenate([_scores(rng, (1, n), 2), _scores(rng, (1, n), 0)])
        await _put_spad(ctx, bench, 0, m, n, x)
        for last in (0, 1):
            f = dict(mode=SmMode.ONLINE, m=m, n=n, in_addr=0, in_stride=n, out_addr=4 * n,
                     out_stride=n, mult=1200, shift=12, first=1, last=last, rs_base=3)
            _, cyc = await bench.check(ctx, isa.encode(Opcode.SOFTMAX, **f),
                                       out=(4 * n, m, n, n), rs=(3, m), name=f"last={last}")
            want = (m * bench.unit.row_cycles(SmMode.ONLINE, n, last)
                    + ROW_OVERHEAD["SOFTMAX_ONLINE"])
            assert cyc == want, (last, cyc, want)

    bench.run(tb)


def _softmax_errors(cfg):
    ok = dict(mode=SmMode.FULL, m=2, n=5, in_addr=0, in_stride=5, out_addr=100, out_stride=5,
              mult=1000, shift=10, causal=1, q_pos=3, k_pos=0, rs_base=0)
    W, E, S = cfg.spad_words, cfg.idx_entries, cfg.rowstate_rows
    sp = dict(kpos_spans=1, idx_addr=40, n_spans=2)   # IDX[40..42] = (0, 3), (10, 1), (20, 5)

    def spans(**kw):
        return {**sp, **kw}

    cases = [
        dict(m=0), dict(n=cfg.max_dim + 1), dict(mult=-1), dict(mult=-32768, shift=63),
        dict(shift=63), dict(in_addr=W - 9), dict(in_addr=W - 9, out_addr=W - 9),
        dict(out_addr=W - 9), spans(), spans(n=4), spans(causal=0, n=4),
        spans(n_spans=3), spans(idx_addr=E - 1), spans(idx_addr=E - 1, n=2, n_spans=1),
        spans(count_reg=15), spans(count_reg=14), spans(count_reg=13),
        spans(out_addr=W - 9), spans(n=4, out_addr=W - 9), spans(n=9, n_spans=3, m=3),
        dict(mode=SmMode.ONLINE, rs_base=S - 1), dict(mode=SmMode.ONLINE, rs_base=S - 2),
        dict(mode=SmMode.ONLINE, rs_base=S - 1, out_addr=W - 9),
        dict(mode=SmMode.ONLINE, rs_base=S - 1, **spans(n_spans=1)),
        dict(mode=SmMode.ONLINE, rs_base=(1 << 16) - 1, m=3),
    ]
    return [{**ok, **c} for c in cases]


@pytest.mark.parametrize("config", CONFIGS + [TINY4_A8], ids=CONFIG_IDS + ["lanes4_a8"])
def test_softmax_full_random(config):
    """FULL: random rows, causal masks from q_pos/k_pos (near 2^32 too) and from key-span
    lists (count from n_spans or a register; empty and negative spans), in place; errors."""
    bench = Bench(config, SoftmaxRowUnit, seed=20 + config.row_lanes)

    async def tb(ctx):
        for i in range(18):
            f = await _softmax_random(ctx, bench, i, SmMode.FULL)
            await bench.check(ctx, isa.encode(Opcode.SOFTMAX, **f),
                              out=(f["out_addr"], f["m"], f["out_stride"], f["n"]), name=f"#{i}")
        await _put_idx(ctx, bench, 40, [(0, 3), (10, 1), (20, 5)])
        # (the golden model expands whole spans: keep the last entry's length small)
        await _put_idx(ctx, bench, config.idx_entries - 1, [(5, 4)])
        _set_reg(ctx, bench, 15, -1)
        _set_reg(ctx, bench, 14, 3)
        _set_reg(ctx, bench, 13, 2)
        for f in _softmax_errors(config):
            await bench.check(ctx, isa.encode(Opcode.SOFTMAX, **f), name="error")
        assert sum(r[1] == ErrorCode.OK for r in bench.results[18:]) >= 5

    bench.run(tb)


@pytest.mark.parametrize("config", CONFIGS + [TINY4_A8], ids=CONFIG_IDS + ["lanes4_a8"])
def test_softmax_online_random(config):
    """ONLINE: chunk sequences over the same rows (first/last), rows continuing from a random
    row state, masks and key spans; row state and outputs after every chunk."""
    bench = Bench(config, SoftmaxRowUnit, seed=30 + config.row_lanes)

    async def tb(ctx):
        for i in range(8):
            await _online_rows(ctx, bench, i)

    bench.run(tb)


# -- LAYERNORM ------------------------------------------------------------------------------------

async def _layernorm_random(ctx, bench, i):
    rng, cfg = bench.rng, bench.cfg
    R = cfg.row_lanes
    m = int(rng.choice([1, 1, 2, 3]))
    n = int(rng.choice([1, 2, R - 1 or 1, R, R + 1, 2 * R + 1, 9, int(rng.integers(1, 40))]))
    in_addr, in_stride = _region(rng, cfg, m, n)
    used = [(in_addr, in_addr + (m - 1) * in_stride + n)]
    p_addr, _ = _region(rng, cfg, 1, 4 * n)
    out_addr, out_stride = _region(rng, cfg, m, n, avoid=used + [(p_addr, p_addr + 4 * n)])
    if i % 5 == 4:
        out_addr, out_stride = in_addr, in_stride
    kind = i % 4
    if kind == 0:
        x = rng.integers(-32768, 32768, size=(m, n))
    elif kind == 1:
        x = rng.integers(-200, 200, size=(m, n))
    elif kind == 2:
        x = np.full((m, n), int(rng.integers(-32768, 32768)))     # variance 0: D = eps or 1
    else:
        x = rng.choice(np.array([-32768, 32767]), size=(m, n))
    await _put_spad(ctx, bench, in_addr, m, in_stride, x)
    pk = i % 4
    if pk == 3:      # small shifts: every bit of beta shows
        gamma = rng.integers(-4, 5, size=n)
        beta = rng.integers(-10000, 10000, size=n)
        shift = int(rng.integers(0, 3))
    elif pk == 0:      # realistic: x_hat (Q.12) * gamma (about 1.0 in Q.12) >> 12..14
        gamma = rng.integers(-8192, 8192, size=n)
        beta = rng.integers(-(1 << 24), 1 << 24, size=n)
        shift = int(rng.integers(12, 15))
    elif pk == 1:    # anything (mostly saturating)
        gamma = rng.integers(-32768, 32768, size=n)
        beta = rng.integers(-(1 << 31), 1 << 31, size=n)
        shift = int(rng.choice([0, 12, 16, 20, 24, 40, 62]))
    else:
        gamma = rng.integers(-32768, 32768, size=n)
        beta = rng.integers(-(1 << 16), 1 << 16, size=n)
        shift = int(rng.integers(14, 21))
    table = np.stack([gamma, ((beta & 0xFFFF) ^ 0x8000) - 0x8000, beta >> 16,
                      rng.integers(-5, 5, size=n)], axis=1).reshape(1, -1)
    await _put_spad(ctx, bench, p_addr, 1, 0, table)
    return dict(m=m, n=n, in_addr=in_addr, in_stride=in_stride, out_addr=out_addr,
                out_stride=out_stride, param_addr=p_addr,
                eps_m=int(rng.integers(0, 1 << 16)), eps_e=int(rng.choice([0, 3, 20, 40])),
                shift=shift)


def _layernorm_errors(cfg):
    W = cfg.spad_words
    ok = dict(m=2, n=5, in_addr=0, in_stride=5, out_addr=100, out_stride=5, param_addr=200,
              eps_m=5, eps_e=3, shift=16)
    cases = [dict(m=0), dict(n=0), dict(n=cfg.max_dim + 1), dict(shift=63), dict(eps_e=41),
             dict(eps_e=63, shift=63), dict(in_addr=W - 9), dict(in_addr=W - 10),
             dict(out_addr=W - 10), dict(param_addr=W - 19),
             dict(param_addr=W - 20), dict(out_addr=W - 9), dict(out_addr=W - 9, in_addr=W - 9),
             dict(m=cfg.max_dim, out_stride=(1 << 22) - 1)]
    return [{**ok, **c} for c in cases]


@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_layernorm_random(config):
    """Random rows (wide, narrow, constant, extreme), random gamma/beta tables (saturating and
    realistic), eps, shifts; in place; then the field and range errors."""
    bench = Bench(config, LayerNormRowUnit, seed=40 + config.row_lanes)

    async def tb(ctx):
        for i in range(24):
            f = await _layernorm_random(ctx, bench, i)
            await bench.check(ctx, isa.encode(Opcode.LAYERNORM, **f),
                              out=(f["out_addr"], f["m"], f["out_stride"], f["n"]), name=f"#{i}")
        for f in _layernorm_errors(config):
            await bench.check(ctx, isa.encode(Opcode.LAYERNORM, **f), name="error")

    bench.run(tb)


# -- timing ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("unit_cls", [SoftmaxRowUnit, LayerNormRowUnit],
                         ids=["softmax", "layernorm"])
def test_row_timing(unit_cls):
    """Cycles per row (the difference between m = 5 and m = 1) are the units' row_cycles:
    the scratchpad reader keeps the wrapped stream units busy."""
    cfg = TINY4
    bench = Bench(cfg, unit_cls, seed=5, extremes=False)

    async def tb(ctx):
        for n in (6, 33):
            for mode, last in ((SmMode.FULL, 0), (SmMode.ONLINE, 0), (SmMode.ONLINE, 1)):
                if unit_cls is LayerNormRowUnit and mode != SmMode.FULL:
                    continue
                cyc = []
                for m in (1, 5):
                    if unit_cls is SoftmaxRowUnit:
                        word = isa.encode(Opcode.SOFTMAX, mode=mode, m=m, n=n, in_addr=0,
                                          in_stride=n, out_addr=8000, out_stride=n, mult=900,
                                          shift=10, causal=1, q_pos=3, k_pos=0, first=1,
                                          last=last)
                        want = bench.unit.row_cycles(mode, n, last)
                    else:
                        word = isa.encode(Opcode.LAYERNORM, m=m, n=n, in_addr=0, in_stride=n,
                                          out_addr=8000, out_stride=n, param_addr=9000,
                                          eps_m=1, eps_e=0, shift=12)
                        want = bench.unit.row_cycles(n)
                    _, c = await bench.check(ctx, word, out=(8000, m, n, n))
                    cyc.append(c)
                assert (cyc[1] - cyc[0]) == 4 * want, (mode, last, n, cyc, want)

    bench.run(tb)


# -- wider presets --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["ecp5", "zcu102"])
@pytest.mark.parametrize("unit_cls", [VecUnit, TopKUnit, SoftmaxRowUnit, LayerNormRowUnit],
                         ids=["vec", "topk", "softmax", "layernorm"])
def test_wide_presets(name, unit_cls):
    """A few random instructions at the lane widths of the larger presets (16 scratchpad lanes;
    8 and 16 row lanes), on a smaller scratchpad and index memory to keep the simulation short."""
    cfg = PRESETS[name].replace(spad_words=8192, idx_entries=1024, rowstate_rows=64)
    bench = Bench(cfg, unit_cls, seed=50)

    async def tb(ctx):
        for i in range(6):
            if unit_cls is VecUnit:
                f = _vec_random(bench, i)
                await bench.check(ctx, isa.encode(Opcode.VEC, **f),
                                  out=(f["out_addr"], f["m"], f["out_stride"], f["n"]))
            elif unit_cls is TopKUnit:
                f = await _topk_random(ctx, bench, 3 * i)
                await bench.check(ctx, isa.encode(Opcode.TOPK, **f),
                                  idx=(f["idx_addr"], f["m"] * f["k"]))
            elif unit_cls is SoftmaxRowUnit:
                if i < 4:
                    f = await _softmax_random(ctx, bench, i, SmMode.FULL)
                    await bench.check(ctx, isa.encode(Opcode.SOFTMAX, **f),
                                      out=(f["out_addr"], f["m"], f["out_stride"], f["n"]))
                else:
                    await _online_rows(ctx, bench, i)
            else:
                f = await _layernorm_random(ctx, bench, i)
                await bench.check(ctx, isa.encode(Opcode.LAYERNORM, **f),
                                  out=(f["out_addr"], f["m"], f["out_stride"], f["n"]))

    bench.run(tb)
