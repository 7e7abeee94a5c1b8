"""LOAD and STORE units against the golden model (Amaranth simulator).

Each test runs a sequence of random ``Dma`` descriptors (valid ones and ones that fault) through
:class:`vitamin.hw.dma.LoadUnit` / ``StoreUnit`` with the real scratchpad and index memory, and a
Python AXI4 slave model that inserts random ready/valid delays and checks the burst rules (INCR,
full-width beats, <= 256 beats, never across 4 KiB, W never before its AW). The same descriptors
run on :class:`vitamin.golden.isasim.Machine`; the error code of every instruction, the final
scratchpad / index memory / DRAM and the byte and saturation counts must be identical.

The AXI models are also used by tests/test_hw_accel.py.
"""

import zlib
from collections import deque

import numpy as np
import pytest
from amaranth import Module, Mux, Signal
from amaranth.lib import wiring
from hwutil import make_rng, run_sim

from vitamin import isa
from vitamin.config import Config
from vitamin.golden.isasim import Fault, Machine
from vitamin.hw.dma import LoadUnit, StoreUnit
from vitamin.hw.mem import IdxMemory, Scratchpad
from vitamin.hw.ports import spad_lanes
from vitamin.isa import DmaMode, DType, ErrorCode, Mem, Opcode

# Small memories keep the simulator fast; three lane/bus combinations exercise the byte aligner
# (bus narrower than, equal to and wider than a scratchpad access).
CONFIGS = {
    "l4b32": Config(name="l4b32", rows=2, cols=4, row_lanes=2, spad_words=2048, idx_entries=128,
                    bus_bits=32),
    "l8b64": Config(name="l8b64", rows=8, cols=8, row_lanes=8, spad_words=2048, idx_entries=128,
                    bus_bits=64),
    "l2b128": Config(name="l2b128", rows=2, cols=2, row_lanes=2, spad_words=2048,
                     idx_entries=128, bus_bits=128),
}
ES = {DType.I8: 1, DType.U8: 1, DType.I16: 2, DType.I32: 8}


# -- AXI4 slave models ----------------------------------------------------------------------------

class AxiRamModel:
    """Byte memory behind the AXI models; records protocol violations as assertion errors."""

    def __init__(self, data, bus_bytes, window=None):
        self.mem = bytearray(data)
        self.bb = bus_bytes
        self.window = len(self.mem) if window is None else window
        self.read_beats = 0
        self.write_beats = 0

    def check_burst(self, addr, length, size, burst):
        assert burst == 1, f"burst type {burst}, expected INCR"
        assert 1 << size == self.bb, f"arsize/awsize {size} is not the full bus width"
        assert addr % self.bb == 0, f"burst address {addr:#x} not aligned to the bus"
        assert length <= 255
        assert addr % 4096 + (length + 1) * self.bb <= 4096, \
            f"burst at {addr:#x} of {length + 1} beats crosses a 4 KiB boundary"

    def read_beat(self, addr):
        self.read_beats += 1
        raw = bytes(self.mem[addr:addr + self.bb]).ljust(self.bb, b"\0")
        return int.from_bytes(raw, "little")

    def write_beat(self, addr, wdata, wstrb):
        self.write_beats += 1
        for j in range(self.bb):
            if wstrb >> j & 1:
                assert addr + j < self.window, f"write strobe at {addr + j:#x} outside the window"
                self.mem[addr + j] = (wdata >> (8 * j)) & 0xFF


def axi_read_slave(ax, ram, rng, p_ready=0.7, p_valid=0.7, base=0):
    """Background testbench serving AR/R of master port ``ax`` from ``ram``."""
    async def process(ctx):
        pending = deque()
        cur = None          # [addr, beats_left]
        rvalid = False
        while True:
            arready = rng.random() < p_ready
            ctx.set(ax.arready, arready)
            if cur is None and pending:
                cur = pending.popleft()
            if not rvalid and cur is not None and rng.random() < p_valid:
                rvalid = True
                ctx.set(ax.rdata, ram.read_beat(cur[0]))
                ctx.set(ax.rlast, cur[1] == 1)
                ctx.set(ax.rresp, 0)
            ctx.set(ax.rvalid, rvalid)
            _, _, arvalid, araddr, arlen, arsize, arburst, rready = await ctx.tick().sample(
                ax.arvalid, ax.araddr, ax.arlen, ax.arsize, ax.arburst, ax.rready)
            if arvalid and arready:
                ram.check_burst(araddr - base, arlen, arsize, arburst)
                pending.append([araddr - base, arlen + 1])
            if rvalid and rready:
                rvalid = False
                cur[0] += ram.bb
                cur[1] -= 1
                if cur[1] == 0:
                    cur = None
    return process


def axi_write_slave(ax, ram, rng, p_ready=0.7, p_valid=0.7, base=0):
    """Background testbench accepting AW/W and answering B on master port ``ax``."""
    async def process(ctx):
        aws = deque()
        bs = 0
        bvalid = False
        while True:
            awready = rng.random() < p_ready
            wready = bool(aws) and rng.random() < p_ready
            ctx.set(ax.awready, awready)
            ctx.set(ax.wready, wready)
            if not bvalid and bs and rng.random() < p_valid:
                bvalid = True
            ctx.set(ax.bvalid, bvalid)
            ctx.set(ax.bresp, 0)
            (_, _, awvalid, awaddr, awlen, awsize, awburst, wvalid, wdata, wstrb, wlast,
             bready) = await ctx.tick().sample(ax.awvalid, ax.awaddr, ax.awlen, ax.awsize,
                                               ax.awburst, ax.wvalid, ax.wdata, ax.wstrb,
                                               ax.wlast, ax.bready)
            if wvalid and wready:
                cur = aws[0]
                ram.write_beat(cur[0], wdata, wstrb)
                assert bool(wlast) == (cur[1] == 1), "wlast does not mark the burst's last beat"
                cur[0] += ram.bb
                cur[1] -= 1
                if cur[1] == 0:
                    aws.popleft()
                    bs += 1
            if awvalid and awready:
                ram.check_burst(awaddr - base, awlen, awsize, awburst)
                aws.append([awaddr - base, awlen + 1])
            if bvalid and bready:
                bvalid = False
                bs -= 1
    return process


# -- bench -------------------------------------------------------------------------------------

class _Bench(wiring.Component):
    """A DMA unit with the real scratchpad and index memory behind its ports."""

    def __init__(self, unit, cfg, spad_init, idx_init, contention=False):
        self.unit = unit
        self.spad = Scratchpad(cfg, init=spad_init)
        self.idx = IdxMemory(cfg, init=[{"a": int(a), "b": int(b)} for a, b in idx_init])
        self.contention = contention
        # with contention, another user reads these addresses while the unit is not granted
        self.other_spad = Signal(range(cfg.spad_words // spad_lanes(cfg)))
        self.other_idx = Signal(range(cfg.idx_entries))
        super().__init__({})

    def elaborate(self, platform):
        m = Module()
        m.submodules.unit = self.unit
        m.submodules.spad = self.spad
        m.submodules.idx = self.idx
        if not self.contention:
            wiring.connect(m, self.unit.spad, self.spad.port)
            wiring.connect(m, self.unit.idx, self.idx.port)
            return m
        u = self.unit
        for up, mp, rd_gnt, wr_gnt, other in (
                (u.spad, self.spad.port, u.spad_gnt, u.spad_gnt, self.other_spad),
                (u.idx, self.idx.port, u.idx_rd_gnt, u.idx_wr_gnt, self.other_idx)):
            m.d.comb += [up.rd_data.eq(mp.rd_data),
                         mp.rd_en.eq(Mux(rd_gnt, up.rd_en, 1)),
                         mp.rd_addr.eq(Mux(rd_gnt, up.rd_addr, other)),
                         mp.wr_en.eq(up.wr_en & wr_gnt), mp.wr_addr.eq(up.wr_addr),
                         mp.wr_data.eq(up.wr_data)]
            if hasattr(mp, "wr_mask"):
                m.d.comb += mp.wr_mask.eq(up.wr_mask)
        return m


def _rand_i32(rng):
    return rng.randrange(-(1 << 31), 1 << 31)


def random_descriptor(rng, cfg, window, store):
    """A random Dma field dict: mostly in range, sometimes not, sometimes with bad fields."""
    kind = rng.choice([(Mem.SPAD, DType.I8), (Mem.SPAD, DType.U8), (Mem.SPAD, DType.I16),
                       (Mem.SPAD, DType.I16), (Mem.IDX, DType.I32)])
    if rng.random() < 0.04:      # dtype / memory mismatch
        kind = rng.choice([(Mem.SPAD, DType.I32), (Mem.IDX, DType.I16)])
    mem, dt = kind
    es = ES[dt]
    lim = cfg.spad_words if mem == Mem.SPAD else cfg.idx_entries
    mode = DmaMode.SPANS if rng.random() < 0.3 else DmaMode.STRIDED
    big = rng.random() < 0.12 and mem == Mem.SPAD
    run = rng.randrange(300, 800) if big else rng.randrange(1, 10)
    ns = [rng.randrange(1, 4) for _ in range(3)] if not big else [1, 1, rng.randrange(1, 3)]
    f = {"mem": mem, "mode": mode, "dtype": dt, "run": run, "n0": ns[0], "n1": ns[1],
         "n2": ns[2], "idx_addr": 0, "count_reg": 0, "blk_reg": 0, "blk_stride": 0}

    # STORE: DRAM strides are multiples of the element size. Elements that overlap partially
    # are written by golden byte plane by byte plane (all first bytes, then all second bytes),
    # which streaming hardware cannot reproduce; docs/ISA.md leaves such programs undefined.
    gran = es if store else 1

    def dstride(n):
        return dstride_(n) // gran * gran

    def dstride_(n):
        c = rng.random()
        if c < 0.3:
            return run * es
        if c < 0.45:
            return -run * es - rng.randrange(0, 9)
        if c < 0.55:
            return 0
        return rng.randrange(0, 3 * run * es + 40)

    def sstride():
        c = rng.random()
        if c < 0.4:
            return run
        if c < 0.5:
            return 0
        return rng.randrange(0, 2 * run + 9)

    for i in range(3):
        f[f"ds{i}"] = dstride(ns[i])
        f[f"ss{i}"] = sstride()
    if mode == DmaMode.SPANS:
        f["idx_addr"] = rng.randrange(0, 4) * 4          # span lists live in entries 0..15
        f["ds0"] = rng.choice([run * es, run * es + rng.randrange(0, 20) // gran * gran,
                               -run * es])
        f["ss0"] = rng.choice([run, run + 1])
        f["n2"] = rng.randrange(0, 5)
        if rng.random() < 0.4:
            f["count_reg"] = rng.choice([1, 2, 3])
        f["n1"] = rng.randrange(1, 3)
    if rng.random() < 0.2:
        f["blk_reg"] = rng.choice([1, 2, 3, 4])
        f["blk_stride"] = rng.randrange(0, 200) // gran * gran

    # place the DRAM side so that it fits most of the time
    if mode == DmaMode.STRIDED:
        lo = sum(min(0, (n - 1) * f[f"ds{i}"]) for i, n in enumerate(ns))
        hi = sum(max(0, (n - 1) * f[f"ds{i}"]) for i, n in enumerate(ns)) + run * es
        slo = sum((n - 1) * f[f"ss{i}"] for i, n in enumerate(ns)) + run
    else:
        lo, hi = min(0, 8 * f["ds0"]), max(0, 8 * f["ds0"]) + abs(f["ds1"]) + run * es
        slo = run + 8 * f["ss0"] + f["ss1"]
    span = hi - lo
    if rng.random() < 0.85 and span < window - 64:
        f["dram_addr"] = rng.randrange(-lo, window - hi + 1) if window - hi >= -lo else 0
    else:
        f["dram_addr"] = rng.randrange(max(0, window - hi - 64), window + 64)
    # a SPANS LOAD into index memory must not overwrite its own span list (entries 0..15 here):
    # golden reads the whole list first, the hardware re-reads it in every i1 pass
    lo_chip = 16 if (mode == DmaMode.SPANS and mem == Mem.IDX and not store) else 0
    if rng.random() < 0.92 and slo < lim - lo_chip:
        f["spad_addr"] = rng.randrange(lo_chip, lim - slo + 1)
    else:
        f["spad_addr"] = rng.randrange(lo_chip, lim + 8)
    if rng.random() < 0.03:
        f[rng.choice(["run", "n0", "n1", "n2"])] = 0
    for k in ("ds0", "ds1", "ds2"):
        f[k] = max(-(1 << 31), min((1 << 31) - 1, f[k]))
    return f


def encode(op, f):
    return int.from_bytes(isa.encode(op, **f), "little")


def initial_state(cfg, op, window, seed):
    """Random DRAM, scratchpad and index memory; span lists (start, length) in entries 0..15."""
    nprng = np.random.default_rng(seed)
    dram = nprng.integers(0, 256, size=window, dtype=np.uint8)
    spad = nprng.integers(-32768, 32768, size=cfg.spad_words).astype(np.int64)
    idx = nprng.integers(-(1 << 31), 1 << 31, size=(cfg.idx_entries, 2)).astype(np.int64)
    idx[:16, 0] = nprng.integers(0, 12, size=16)
    idx[:16, 1] = nprng.choice([0, 1, 2, 3], size=16)
    if op == Opcode.STORE:
        # values around the I8/U8 limits so that saturation happens both ways
        half = cfg.spad_words // 2
        spad[:half] = nprng.integers(-300, 300, size=half)
    return dram, spad, idx


def port_contention(bench, unit, rng, p_gnt):
    """Background testbench: the shared-port grants (``spad_gnt``, ``idx_rd_gnt``,
    ``idx_wr_gnt``) each high with probability ``p_gnt`` in every cycle, as when a COMPUTE unit
    takes the ports in the v2 top; while a grant is low, the memory reads another address and
    ignores the unit's writes."""
    async def process(ctx):
        while True:
            for g in (unit.spad_gnt, unit.idx_rd_gnt, unit.idx_wr_gnt):
                ctx.set(g, rng.random() < p_gnt)
            ctx.set(bench.other_spad, rng.randrange(1 << len(bench.other_spad)))
            ctx.set(bench.other_idx, rng.randrange(1 << len(bench.other_idx)))
            await ctx.tick()
    return process


def run_dma_sequence(cfg, op, descs, *, seed, window, regs, state=None, p_ready=0.7,
                     p_valid=0.7, deadline=400_000, p_gnt=None):
    """Run ``descs`` (field dicts) through the unit and through golden; compare everything.
    ``p_gnt``: grant the shared memory ports only with this probability per cycle.

    Returns ``[(word, golden error code, golden sat events, golden bytes)]``.
    """
    rng = make_rng(seed)
    dram, spad, idx = state if state is not None else initial_state(cfg, op, window, seed)

    gold = Machine(cfg, dram.copy(), regs)
    gold.spad[:] = spad
    gold.idx[:] = idx
    expect = []
    for f in descs:
        word = encode(op, f)
        _, fields = isa.decode(word)
        before = (gold.sat.events, gold.counters["dram_read_bytes"],
                  gold.counters["dram_write_bytes"])
        try:
            (gold.op_load if op == Opcode.LOAD else gold.op_store)(fields)
            code = ErrorCode.OK
        except Fault as e:
            code = e.code
        after = (gold.sat.events, gold.counters["dram_read_bytes"],
                 gold.counters["dram_write_bytes"])
        expect.append((word, code, after[0] - before[0],
                       after[1] - before[1] + after[2] - before[2]))

    unit = (LoadUnit if op == Opcode.LOAD else StoreUnit)(cfg)
    bench = _Bench(unit, cfg, [int(x) for x in spad], idx, contention=p_gnt is not None)
    ram = AxiRamModel(dram.tobytes(), cfg.bus_bytes, window)
    got = []
    final = {}
    ctl = unit.ctl
    inc = unit.dram_rd_inc if op == Opcode.LOAD else unit.dram_wr_inc

    async def driver(ctx):
        for r in range(1, 16):
            ctx.set(unit.regs.regs[r], regs.get(r, 0))
        ctx.set(unit.window, window)
        for word, *_ in expect:
            ctx.set(ctl.instr, word)
            ctx.set(ctl.start, 1)
            await ctx.tick()
            ctx.set(ctl.start, 0)
            sat = nbytes = 0
            while True:
                _, _, done, busy, err, s, b = await ctx.tick().sample(
                    ctl.done, ctl.busy, ctl.error, ctl.sat_inc, inc)
                sat += s
                nbytes += b
                if done:
                    break
                assert busy, "busy dropped before done"
            got.append((err, sat, nbytes))
            for _ in range(rng.randrange(0, 3)):
                await ctx.tick()
        final["spad"] = [ctx.get(bench.spad.word(e))
                         for e in range(cfg.spad_words)]
        final["idx"] = [(ctx.get(bench.idx.word(i)).a, ctx.get(bench.idx.word(i)).b)
                        for i in range(cfg.idx_entries)]

    procs = [axi_read_slave(unit.axi_r, ram, rng, p_ready, p_valid) if op == Opcode.LOAD else
             axi_write_slave(unit.axi_w, ram, rng, p_ready, p_valid)]
    if p_gnt is not None:
        procs.append(port_contention(bench, unit, rng, p_gnt))
    run_sim(bench, driver, processes=procs, deadline_cycles=deadline)

    for i, ((word, code, sat, nbytes), (g_code, g_sat, g_bytes)) in enumerate(zip(expect, got)):
        desc = isa.decode(word)[1]
        assert g_code == code, (i, g_code, code, desc)
        assert (g_sat, g_bytes) == (sat, nbytes), (i, g_sat, sat, g_bytes, nbytes, desc)
    np.testing.assert_array_equal(np.array(final["spad"]), gold.spad)
    np.testing.assert_array_equal(np.array(final["idx"]), gold.idx)
    np.testing.assert_array_equal(np.frombuffer(bytes(ram.mem), np.uint8), gold.dram)
    return expect


REGS = {1: 3, 2: 0, 3: 5, 4: -2}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("op", [Opcode.LOAD, Opcode.STORE])
def test_random_descriptors_match_golden(op, name):
    cfg = CONFIGS[name]
    window = 10_000            # not a multiple of the bus width nor of 4 KiB
    rng = make_rng(zlib.crc32(f"{op.name}{name}".encode()))
    descs = [random_descriptor(rng, cfg, window, op == Opcode.STORE) for _ in range(70)]
    expect = run_dma_sequence(cfg, op, descs, seed=int(op.value) * 7 + len(name),
                              window=window, regs=REGS)
    codes = {c for _, c, _, _ in expect}
    # the random mix must exercise success and the main faults
    assert ErrorCode.OK in codes and ErrorCode.DRAM_RANGE in codes, codes
    assert sum(c == ErrorCode.OK for _, c, _, _ in expect) >= 35


@pytest.mark.parametrize("name", ["l4b32", "l8b64"])
@pytest.mark.parametrize("op", [Opcode.LOAD, Opcode.STORE])
def test_random_descriptors_under_port_contention(op, name):
    """The memory ports granted in 55 % of the cycles: the units wait (STORE's grant reaches
    its state a cycle late, through a register) and still match golden exactly."""
    cfg = CONFIGS[name]
    window = 10_000
    rng = make_rng(zlib.crc32(f"gnt{op.name}{name}".encode()))
    descs = [random_descriptor(rng, cfg, window, op == Opcode.STORE) for _ in range(40)]
    expect = run_dma_sequence(cfg, op, descs, seed=int(op.value) * 13 + len(name),
                              window=window, regs=REGS, p_gnt=0.55)
    assert sum(c == ErrorCode.OK for _, c, _, _ in expect) >= 20


@pytest.mark.parametrize("p_gnt", [0.3, 0.8])
@pytest.mark.parametrize("op", [Opcode.LOAD, Opcode.STORE])
def test_span_scan_reads_exactly_the_list_under_port_contention(op, p_gnt):
    """SPANS span lists fenced by poison entries (negative lengths: reading one is BAD_FIELD),
    some ending in a span too long for the scratchpad (skipping it is a missed SPAD_RANGE),
    scanned while the index memory's read port is granted only part of the time: one read too
    many or too few shows. (The scan takes its grant through a register and picks the next
    address by the previous request's outcome.)"""
    cfg = CONFIGS["l4b32"]
    window = 10_000
    rng = make_rng(zlib.crc32(f"scan{op.name}{p_gnt}".encode()))
    dram, spad, idx = initial_state(cfg, op, window, 5)
    idx[:] = (0, -1)                       # poison everywhere but in the lists
    descs = []
    addr = 1
    while addr < cfg.idx_entries - 8:
        count = rng.randrange(1, 7)
        spans = [(rng.randrange(0, 12), rng.randrange(0, 4)) for _ in range(count)]
        if rng.random() < 0.3:
            spans[-1] = (0, 100_000)
        idx[addr:addr + count] = spans
        f = _base(mode=DmaMode.SPANS, run=rng.randrange(1, 5), n1=rng.randrange(1, 3),
                  n2=count, idx_addr=addr, ds0=16, ss0=8, ds1=4, ss1=1,
                  dram_addr=rng.randrange(0, 4000), spad_addr=rng.randrange(0, 1024))
        descs.append(f)
        addr += count + 1
    expect = run_dma_sequence(cfg, op, descs, seed=17, window=window, regs=REGS,
                              state=(dram, spad, idx), p_gnt=p_gnt)
    codes = [c for _, c, _, _ in expect]
    assert codes.count(ErrorCode.OK) >= 5 and ErrorCode.SPAD_RANGE in codes, codes
    assert ErrorCode.BAD_FIELD not in codes, codes


def _base(**kw):
    f = {"mem": Mem.SPAD, "mode": DmaMode.STRIDED, "dtype": DType.I16, "dram_addr": 0,
         "spad_addr": 0, "run": 4, "n0": 1, "n1": 1, "n2": 1, "ds0": 0, "ds1": 0, "ds2": 0,
         "ss0": 0, "ss1": 0, "ss2": 0, "idx_addr": 0, "count_reg": 0, "blk_reg": 0,
         "blk_stride": 0}
    f.update(kw)
    return f


# Each fault of docs/ISA.md's check order, and the edge just inside it. (field dict, expected)
DIRECTED = [
    (_base(run=0), ErrorCode.BAD_FIELD),
    (_base(n1=0), ErrorCode.BAD_FIELD),
    (_base(n2=0), ErrorCode.BAD_FIELD),
    (_base(mode=DmaMode.SPANS, n2=0), ErrorCode.OK),            # SPANS: n2 = 0 spans is fine
    (_base(dtype=DType.I32), ErrorCode.BAD_FIELD),
    (_base(mem=Mem.IDX, dtype=DType.U8), ErrorCode.BAD_FIELD),
    (_base(dram_addr=9992, run=4), ErrorCode.OK),                # last 8 bytes of the window
    (_base(dram_addr=9993, run=4), ErrorCode.DRAM_RANGE),
    (_base(dram_addr=8, n0=3, ds0=-4), ErrorCode.OK),
    (_base(dram_addr=8, n0=3, ds0=-5), ErrorCode.DRAM_RANGE),    # negative address
    (_base(blk_reg=4, blk_stride=100, dram_addr=200), ErrorCode.OK),   # REG4 = -2
    (_base(blk_reg=4, blk_stride=100, dram_addr=199), ErrorCode.DRAM_RANGE),
    (_base(spad_addr=2044, run=4), ErrorCode.OK),
    (_base(spad_addr=2045, run=4), ErrorCode.SPAD_RANGE),
    (_base(dram_addr=9994, run=4, spad_addr=2045), ErrorCode.DRAM_RANGE),   # DRAM first
    (_base(mode=DmaMode.SPANS, idx_addr=126, n2=2), ErrorCode.OK),
    (_base(mode=DmaMode.SPANS, idx_addr=127, n2=2), ErrorCode.IDX_RANGE),
    (_base(mode=DmaMode.SPANS, idx_addr=20, n2=1), ErrorCode.BAD_FIELD),    # negative length
    (_base(mode=DmaMode.SPANS, idx_addr=21, n2=1), ErrorCode.DRAM_RANGE),   # negative start
    (_base(mode=DmaMode.SPANS, idx_addr=22, n2=1, ds0=8), ErrorCode.SPAD_RANGE),  # too many rows
    (_base(mode=DmaMode.SPANS, idx_addr=23, n2=1, ds0=8), ErrorCode.DRAM_RANGE),  # rows too far
    (_base(mode=DmaMode.SPANS, idx_addr=24, n2=2, ds0=8, ss0=4, run=4), ErrorCode.OK),
    (_base(mode=DmaMode.SPANS, idx_addr=24, n2=0, count_reg=4), ErrorCode.BAD_FIELD),  # REG4<0
    (_base(mode=DmaMode.SPANS, idx_addr=24, n2=0, count_reg=1, ds0=-8, dram_addr=9000, run=4,
           ss0=4), ErrorCode.OK),
    # after the SPANS cases: a LOAD of entry 127 changes the span list at 126..127
    (_base(mem=Mem.IDX, dtype=DType.I32, spad_addr=127, run=1), ErrorCode.OK),
    (_base(mem=Mem.IDX, dtype=DType.I32, spad_addr=127, run=2), ErrorCode.IDX_RANGE),
]


@pytest.mark.parametrize("op", [Opcode.LOAD, Opcode.STORE])
def test_directed_checks(op):
    cfg = CONFIGS["l4b32"]
    window = 10_000
    dram, spad, idx = initial_state(cfg, op, window, 11)
    # span lists of the SPANS cases at entries 20..26
    spans = [(0, -1), (-1, 2), (0, 3000), (1, 2000), (2, 3), (5, 0), (40, 2)]
    idx[20:20 + len(spans)] = spans
    idx[126:128] = [(0, 1), (3, 1)]
    expect = run_dma_sequence(cfg, op, [f for f, _ in DIRECTED], seed=3, window=window,
                              regs=REGS, state=(dram, spad, idx))
    wrong = [(i, got, want) for i, ((f, want), (_, got, _, _)) in
             enumerate(zip(DIRECTED, expect)) if got != want]
    assert not wrong, wrong
