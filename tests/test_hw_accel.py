# amaranth: UnusedElaboratable=no
"""The whole accelerator against the golden model: Verilator (cocotb) and Amaranth simulator.

The Verilator model of :class:`vitamin.sim.simtop.SimTop` for the tiny preset is built once per
session (and cached in build/rtl across sessions, see :func:`vitamin.sim.simtop.build`); every
test hands a batch of programs to ONE simulator run (tests/cocotb_accel.py). Each program's
final DRAM window, status, faulting pc and counters are compared with
:func:`vitamin.golden.isasim.simulate`.

Decode-time faults (ILLEGAL_OPCODE, NO_END, undefined enum values, tokens) are found by golden
before anything executes, while the hardware finds them when it fetches the instruction: for
those only the status and pc are compared (docs/ISA.md, "Notes on the code").
"""

import dataclasses
import time
from pathlib import Path

import numpy as np
import pytest
from amaranth import Module
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In
from hwutil import make_rng, run_sim
from test_hw_dma import AxiRamModel, axi_read_slave, axi_write_slave

from vitamin import get_config, isa
from vitamin.asm import Assembler
from vitamin.golden.isasim import simulate
from vitamin.golden.progen import GENERATED_OPCODES, random_program
from vitamin.hw.accel import ACCEL_ID, COUNTERS, REGISTERS, Accelerator
from vitamin.hw.dma import LoadUnit, StoreUnit
from vitamin.hw.ports import UnitControl
from vitamin.isa import DmaMode, DType, ErrorCode, Mem, Opcode
from vitamin.sim import simtop

TINY = get_config("tiny")
TESTS = Path(__file__).resolve().parent
GOLDEN_COUNTERS = ("instructions", "macs", "dram_read_bytes", "dram_write_bytes", "skipped",
                   "sat_events")


# -- Verilator runs --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sim():
    t0 = time.monotonic()
    b = simtop.build(TINY)         # the build the rtl backend uses too
    print(f"\nVerilator model of the tiny accelerator: "
          f"{'built in %.1f s' % b.build_seconds if b.build_seconds else 'cached'} "
          f"({time.monotonic() - t0:.1f} s), {b.build_dir}")
    return b


def _image(prog, inputs=None):
    img = prog.dram_image()
    for name, v in (inputs or {}).items():
        prog.write_tensor(img, name, v)
    return img


def run_and_compare(sim, cases, *, decode_fault=False):
    """``cases``: [(program, inputs, regs, job options)]. Runs all in one simulation; compares
    with golden. Returns [(golden RunResult, rtl result)]."""
    jobs, golds = [], []
    for prog, inputs, regs, opts in cases:
        img = _image(prog, inputs)
        n = opts.pop("n_instr", prog.n_instr)
        if "window" in opts:           # a smaller window: golden's window is its image size
            img = img[:opts.pop("window")]
        golds.append(simulate(prog.config, img, n, regs=regs))
        jobs.append({"image": img, "n_instr": n, "regs": regs or {}, "timeout_cycles": 400_000,
                     **opts})
    t0 = time.monotonic()
    results = sim.run(jobs, test_module="cocotb_accel", module_dir=TESTS)
    wall = time.monotonic() - t0
    cycles = sum(r["counters"].get("cycles", 0) for r in results)
    print(f"{len(jobs)} programs, {cycles} cycles, {wall:.2f} s in the simulator process")
    for i, (g, r) in enumerate(zip(golds, results)):
        assert r["status"] is not None, f"program {i}: the RTL did not halt"
        assert ErrorCode(r["status"]) == g.status, (i, ErrorCode(r["status"]), g.status,
                                                    g.message)
        if g.status != ErrorCode.OK:
            assert r["error_pc"] == g.error_pc, (i, r["error_pc"], g.error_pc, g.message)
        if decode_fault:
            continue
        got = np.frombuffer(r["dram"], dtype=np.uint8)
        if not np.array_equal(got, g.dram):
            diff = np.flatnonzero(got != g.dram)
            raise AssertionError(f"program {i}: DRAM differs at {len(diff)} bytes, first "
                                 f"{[hex(int(a)) for a in diff[:8]]}")
        for name in GOLDEN_COUNTERS:
            assert r["counters"][name] == g.counters[name], (i, name, r["counters"][name],
                                                            g.counters[name])
    return list(zip(golds, results))


def _dma_program(kind):
    """Hand-written LOAD/STORE/MARK/END programs."""
    a = Assembler(TINY)
    rng = np.random.default_rng(kind)
    inputs, regs = {}, {}
    if kind == 0:      # every SPAD dtype, saturating narrow stores
        x16 = a.tensor("x16", "input", (40,), "i16")
        x8 = a.tensor("x8", "input", (40,), "i8")
        xu = a.tensor("xu", "input", (40,), "u8")
        y8 = a.tensor("y8", "output", (40,), "i8")
        yu = a.tensor("yu", "output", (40,), "u8")
        y16 = a.tensor("y16", "output", (120,), "i16")
        inputs = {"x16": rng.integers(-400, 400, 40), "x8": rng.integers(-128, 128, 40),
                  "xu": rng.integers(0, 256, 40)}
        a.load(dram_addr=x16, spad_addr=3, run=40, dtype=DType.I16)
        a.load(dram_addr=x8 + 1, spad_addr=101, run=39, dtype=DType.I8)
        a.load(dram_addr=xu, spad_addr=200, run=40, dtype=DType.U8)
        a.mark(5)
        a.store(dram_addr=y8, spad_addr=3, run=40, dtype=DType.I8)
        a.store(dram_addr=yu + 3, spad_addr=3, run=37, dtype=DType.U8)
        a.store(dram_addr=y16 + 1 * 0, spad_addr=3, run=40, dtype=DType.I16)
        a.store(dram_addr=y16 + 80, spad_addr=101, run=39, dtype=DType.I16)
        a.store(dram_addr=y16 + 160, spad_addr=200, run=40, dtype=DType.I16)
    elif kind == 1:    # index memory round trip, SPANS gather with a count register, blk_reg
        ent = a.tensor("ent", "input", (6, 2), "i32")
        rows = a.tensor("rows", "input", (16, 6), "i16")
        out = a.tensor("out", "output", (40, 6), "i16")
        oent = a.tensor("oent", "output", (6, 2), "i32")
        e = np.array([[1, 2], [5, 3], [9, 0], [12, 1], [-7, 123456], [2 ** 31 - 1, -2 ** 31]])
        inputs = {"ent": e, "rows": rng.integers(-30000, 30000, (16, 6))}
        regs = {3: 4, 1: 2}
        a.load(dram_addr=ent, spad_addr=10, run=6, dtype=DType.I32, mem=Mem.IDX)
        a.load(dram_addr=rows, spad_addr=0, run=6, mode=DmaMode.SPANS, idx_addr=10,
               count_reg=3, ds0=12, ss0=6, n1=2, ds1=2, ss1=100)
        a.load(dram_addr=rows, spad_addr=300, run=3, n0=4, ds0=12, ss0=3, blk_reg=1,
               blk_stride=12)
        a.store(dram_addr=out, spad_addr=0, run=6, n0=40, ds0=12, ss0=6)
        a.store(dram_addr=oent, spad_addr=10, run=6, dtype=DType.I32, mem=Mem.IDX)
        a.store(dram_addr=out + 12 * 30, spad_addr=300, run=12)
    elif kind == 2:    # negative strides, three loop levels, a long run across 4 KiB
        big = a.tensor("big", "input", (3000,), "i16")
        out = a.tensor("out", "output", (3000,), "i16")
        inputs = {"big": rng.integers(-32768, 32768, 3000)}
        a.load(dram_addr=big + (2 * 2999 - 7), spad_addr=0, run=4, n0=3, n1=2, n2=2,
               ds0=-10, ds1=-100, ds2=-1000, ss0=4, ss1=12, ss2=24)
        a.load(dram_addr=big + 1, spad_addr=1000, run=2900, dtype=DType.I8)
        a.load(dram_addr=big, spad_addr=5000, run=3000)
        a.store(dram_addr=out + 5, spad_addr=5000, run=2990, dtype=DType.I16)
        a.store(dram_addr=out, spad_addr=0, run=48, ds0=2, n0=1)
        a.store(dram_addr=out + 4001, spad_addr=1000, run=700, dtype=DType.I8)
    a.end()
    return a.link(), inputs, regs


def test_load_store_mark_end_programs(sim):
    cases = []
    for kind in range(3):
        prog, inputs, regs = _dma_program(kind)
        # no dependency tokens in these programs: program order (CTRL.SEQUENTIAL)
        for throttle in (0, 1):
            cases.append((prog, inputs, regs, {"throttle": throttle, "sequential": True}))
    # the DRAM window elsewhere on the bus: PROG_BASE offsets fetch and every DMA address
    cases.append((prog, inputs, regs, {"prog_base": 0x40000, "sequential": True}))
    res = run_and_compare(sim, cases)
    assert res[0][1]["counters"]["last_mark"] == 5 and res[0][1]["counters"]["marks"] == 1
    assert res[0][0].counters["sat_events"] > 0


def _copy_prog():
    a = Assembler(TINY)
    x = a.tensor("x", "input", (4, 8), "i16")
    y = a.tensor("y", "output", (4, 8), "i16")
    a.load(dram_addr=x, spad_addr=0, run=32, dtype=DType.I16)
    a.store(dram_addr=y, spad_addr=0, run=32, dtype=DType.I16)
    a.mark(1)
    a.end()
    return a


def _patched(prog, pc, **fields):
    """``prog`` with instruction ``pc`` replaced (raw fields; may be invalid)."""
    code = bytearray(prog.code)
    if fields.get("zero"):
        word = 0
    else:
        op, f = isa.decode(code[pc * 64:(pc + 1) * 64])
        layout = data.Layout.cast(isa.FORMATS[op])
        word = int.from_bytes(code[pc * 64:(pc + 1) * 64], "little")
        for name, v in fields.items():
            fl = layout[name] if name in dict(layout) else None
            if fl is None:
                hl = data.Layout.cast(isa.Header)[name]
                off, width = hl.offset, hl.width
            else:
                off, width = fl.offset, fl.width
            word = (word & ~(((1 << width) - 1) << off)) | ((v & ((1 << width) - 1)) << off)
    code[pc * 64:(pc + 1) * 64] = word.to_bytes(64, "little")
    return dataclasses.replace(prog, code=bytes(code))


def test_error_paths(sim):
    x = np.arange(32).reshape(4, 8) - 9
    base = _copy_prog().link()
    cases = []
    # runtime faults: DRAM identical to golden (checks come before any access)
    out_of_window = _patched(base, 1, dram_addr=base.dram_size - 8)
    cases.append((out_of_window, {"x": x}, {}, {}))
    neg = _patched(base, 0, run=0)
    cases.append((neg, {"x": x}, {}, {}))
    spad = _patched(base, 1, spad_addr=TINY.spad_words - 4)
    cases.append((spad, {"x": x}, {}, {}))
    pred = _patched(base, 1, pred_en=1, pred_q=TINY.max_experts)
    cases.append((pred, {"x": x}, {}, {}))
    skip = _patched(base, 1, pred_en=1, pred_q=3)       # empty queue: skipped
    cases.append((skip, {"x": x}, {}, {}))
    small_window = {"window": 4096}                       # the tensors lie beyond it
    cases.append((base, {"x": x}, {}, dict(small_window)))
    # the state after a runtime fault is golden's in program order (CTRL.SEQUENTIAL)
    run_and_compare(sim, [(p, i, r, {**o, "sequential": True}) for p, i, r, o in cases])
    # decode-time faults: status and pc only
    dcases = [
        (_patched(base, 2, zero=1), {"x": x}, {}, {}),                        # opcode 0
        (_patched(base, 1, opcode=17), {"x": x}, {}, {}),                     # undefined opcode
        (base, {"x": x}, {}, {"n_instr": 3}),                                 # NO_END
        (_patched(base, 0, push_prev=1), {"x": x}, {}, {}),                   # token to nothing
        (_patched(base, 1, pop_next=1), {"x": x}, {}, {}),
    ]
    want = [ErrorCode.ILLEGAL_OPCODE, ErrorCode.ILLEGAL_OPCODE, ErrorCode.NO_END,
            ErrorCode.BAD_FIELD, ErrorCode.BAD_FIELD]
    if Opcode.MATMUL.value in sim.opcodes:
        # an undefined enum value (MATMUL acc_in = 3) is a decode fault
        dcases.append((_patched(_patched(base, 2, opcode=Opcode.MATMUL.value), 2, acc_in=3),
                       {"x": x}, {}, {}))
        want.append(ErrorCode.BAD_FIELD)
    res = run_and_compare(sim, dcases, decode_fault=True)
    assert [ErrorCode(r["status"]) for _, r in res] == want


def _differential(sim, seeds, n_instr):
    ops = [op for op in GENERATED_OPCODES if op.value in sim.opcodes]
    assert Opcode.LOAD in ops and Opcode.STORE in ops, "the accelerator has no DMA units"
    cases = []
    for seed in seeds:
        rp = random_program(TINY, seed, n_instr=n_instr, opcodes=ops, dump=True)
        cases.append((rp.program, rp.inputs, rp.regs, {"throttle": seed % 2}))
    return run_and_compare(sim, cases)


def test_random_programs_match_golden(sim):
    res = _differential(sim, range(6), 24)
    assert all(g.ok for g, _ in res)


def test_random_programs_narrow_epilogue():
    # The whole accelerator with a one-column epilogue (epi_lanes = 1, the MATMUL sequencer
    # spaces its epilogue rows four slots apart): still the golden model's bits and counters.
    b = simtop.build(TINY.replace(name="tiny_e1", epi_lanes=1))
    res = _differential(b, range(6), 24)
    assert all(g.ok for g, _ in res)
    assert any(g.counters["macs"] > 0 for g, _ in res)


@pytest.mark.slow
def test_random_programs_match_golden_many(sim):
    for chunk in range(10):
        _differential(sim, range(100 + 20 * chunk, 120 + 20 * chunk), 40)


# -- Amaranth simulator: host registers, dispatch and the watchdog ---------------------------------

class _HangUnit(wiring.Component):
    """A unit that starts and never finishes (for the watchdog)."""

    def __init__(self, config):
        super().__init__({"ctl": In(UnitControl())})

    def elaborate(self, platform):
        m = Module()
        with m.If(self.ctl.start):
            m.d.sync += self.ctl.busy.eq(1)
        return m


class _AxilDriver:
    def __init__(self, port):
        self.p = port

    async def write(self, ctx, addr, value):
        p = self.p
        ctx.set(p.awaddr, addr)
        ctx.set(p.wdata, value & 0xFFFFFFFF)
        ctx.set(p.wstrb, 0xF)
        ctx.set(p.awvalid, 1)
        ctx.set(p.wvalid, 1)
        ctx.set(p.bready, 1)
        while True:
            _, _, ready = await ctx.tick().sample(p.awready)
            if ready:
                break
        ctx.set(p.awvalid, 0)
        ctx.set(p.wvalid, 0)
        while True:
            _, _, bvalid = await ctx.tick().sample(p.bvalid)
            if bvalid:
                break
        ctx.set(p.bready, 0)

    async def read(self, ctx, addr):
        p = self.p
        ctx.set(p.araddr, addr)
        ctx.set(p.arvalid, 1)
        ctx.set(p.rready, 1)
        while True:
            _, _, ready = await ctx.tick().sample(p.arready)
            if ready:
                break
        ctx.set(p.arvalid, 0)
        while True:
            _, _, rvalid, rdata = await ctx.tick().sample(p.rvalid, p.rdata)
            if rvalid:
                break
        ctx.set(p.rready, 0)
        return rdata


def _run_amaranth(units, prog, check, *, window=None, watchdog=None, regs=None):
    cfg = TINY.replace(watchdog_cycles=1024)
    dut = Accelerator(cfg, units)
    img = prog.dram_image()
    ram = AxiRamModel(img.tobytes(), cfg.bus_bytes)
    rng = make_rng(1)
    host = _AxilDriver(dut.s_axil)

    async def tb(ctx):
        await host.write(ctx, REGISTERS["PROG_LEN"], prog.n_instr)
        await host.write(ctx, REGISTERS["WINDOW"], window or prog.dram_size)
        if watchdog:
            await host.write(ctx, REGISTERS["WATCHDOG"], watchdog)
        for r, v in (regs or {}).items():
            await host.write(ctx, REGISTERS["REG0"] + 4 * r, v)
        await host.write(ctx, REGISTERS["CTRL"], 1)
        while not ctx.get(dut.irq):
            await ctx.tick()
        await check(ctx, host, ram)

    run_sim(dut, tb, processes=[axi_read_slave(dut.m_axi_r, ram, rng),
                                axi_write_slave(dut.m_axi_w, ram, rng)],
            deadline_cycles=50_000)


def test_watchdog_halts_a_hung_unit():
    a = Assembler(TINY)
    a.mark(1)
    a.vec(m=1, n=1)
    a.end()
    prog = a.link()

    async def check(ctx, host, ram):
        st = await host.read(ctx, REGISTERS["STATUS"])
        assert ErrorCode((st >> 4) & 0xF) == ErrorCode.WATCHDOG and st & 2 and not st & 1
        assert await host.read(ctx, REGISTERS["ERROR_PC"]) == 1
        stall = await host.read(ctx, COUNTERS["stall_cycles"])
        assert stall >= 2000

    _run_amaranth({Opcode.VEC: _HangUnit}, prog, check, watchdog=2000)


def test_registers_dispatch_and_missing_units():
    a = Assembler(TINY)
    x = a.tensor("x", "input", (8,), "i16")
    y = a.tensor("y", "output", (8,), "i16")
    a.load(dram_addr=x, spad_addr=0, run=8, blk_reg=2, blk_stride=0, dtype=DType.I16)
    a.mark(77)
    a.store(dram_addr=y, spad_addr=0, run=8, dtype=DType.I16)
    a.vec(m=1, n=1)                       # no VEC unit in this build: ILLEGAL_OPCODE
    a.end()
    prog = a.link()

    async def check(ctx, host, ram):
        assert await host.read(ctx, REGISTERS["ID"]) == ACCEL_ID
        units = await host.read(ctx, REGISTERS["UNITS"])
        assert units == (1 << 1) | (1 << 2) | (1 << 10) | (1 << 31)
        fp = int.from_bytes(TINY.fingerprint(), "little")
        assert await host.read(ctx, REGISTERS["FP_LO"]) == fp & 0xFFFFFFFF
        assert await host.read(ctx, REGISTERS["REG0"] + 8) == 0xFFFFFFFB   # REG2 = -5
        assert await host.read(ctx, REGISTERS["REG0"]) == 0
        st = await host.read(ctx, REGISTERS["STATUS"])
        assert ErrorCode((st >> 4) & 0xF) == ErrorCode.ILLEGAL_OPCODE
        assert await host.read(ctx, REGISTERS["ERROR_PC"]) == 3
        assert await host.read(ctx, REGISTERS["LAST_MARK"]) == 77
        assert await host.read(ctx, COUNTERS["instructions"]) == 3
        assert await host.read(ctx, COUNTERS["dram_write_bytes"]) == 16
        y_addr = prog.symbol("y").addr
        assert bytes(ram.mem[y_addr:y_addr + 16]) == bytes(ram.mem[prog.symbol("x").addr:
                                                                    prog.symbol("x").addr + 16])

    _run_amaranth({Opcode.LOAD: LoadUnit, Opcode.STORE: StoreUnit}, prog, check,
                  regs={2: -5})


def test_units_are_discovered():
    from vitamin.hw.accel import discover_units
    found = discover_units()
    assert found[Opcode.LOAD] is LoadUnit and found[Opcode.STORE] is StoreUnit
    with pytest.raises(ValueError, match="controller"):
        Accelerator(TINY, {Opcode.END: LoadUnit})
