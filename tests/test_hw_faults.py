"""The controller's fault recording (``hw/accel_v2.record_faults``) against a Python model:
random fault reports from several sources, often in the same cycle, often with equal pcs, and
START pulses that drop the reports of their cycle. The oldest report (lowest pc, the earlier
source on a tie) must be recorded, and a later, younger one must not replace it."""

import random

import pytest
from amaranth import Module, Signal
from amaranth.sim import Simulator

from vitamin.hw.accel_v2 import record_faults
from vitamin.isa import ErrorCode

CODES = [c.value for c in ErrorCode if c != ErrorCode.OK]


def _model(cycles):
    """The recorded (code, pc) after each cycle's clock edge, or None: reports are registered
    (dropped in a START cycle) and the oldest registered one is recorded a cycle later."""
    rec, staged, out = None, [], []
    for reports, start in cycles:
        # this edge: record from the reports registered at the previous edge ...
        valid = [(pc, i, code) for i, (v, code, pc) in enumerate(staged) if v]
        if valid:
            pc, _i, code = min(valid)
            if rec is None or pc < rec[1]:
                rec = (code, pc)
        # ... and register this cycle's
        staged = [(v and not start, code, pc) for v, code, pc in reports]
        out.append(rec)
    return out


@pytest.mark.parametrize("n_src", [1, 2, 5])
def test_oldest_fault_is_recorded(n_src):
    rng = random.Random(n_src)
    m = Module()
    srcs = [(Signal(name=f"v{i}"), Signal(ErrorCode, name=f"c{i}"), Signal(32, name=f"p{i}"))
            for i in range(n_src)]
    start = Signal()
    f_valid, f_code, f_pc = Signal(), Signal(ErrorCode), Signal(32)
    any_report, pending = record_faults(m, srcs, start, f_valid, f_code, f_pc)
    any_out, pending_out = Signal(), Signal()
    m.d.comb += [any_out.eq(any_report), pending_out.eq(pending)]

    def pc():
        return rng.choice([0, 1, 2, 7, 0xFFFF_FFFF, 0x8000_0000, rng.getrandbits(32),
                           rng.randrange(0, 40)])

    runs = []
    for _ in range(100):      # each run starts from an empty record
        cycles = []
        for _ in range(rng.randint(1, 6)):
            reports = [(rng.random() < 0.5, rng.choice(CODES), pc()) for _ in range(n_src)]
            cycles.append((reports, rng.random() < 0.15))
        cycles.append(([(False, CODES[0], 0)] * n_src, False))   # let the last ones land
        cycles.append(([(False, CODES[0], 0)] * n_src, False))
        runs.append(cycles)

    async def bench(ctx):
        seen_tie = seen_many = 0
        for cycles in runs:
            ctx.set(f_valid, 0)      # the controller clears it with START's next program
            await ctx.tick()
            ctx.set(f_valid, 0)
            await ctx.tick()         # flush any staged report of the previous run
            ctx.set(f_valid, 0)
            expect = _model(cycles)
            for (reports, st), want in zip(cycles, expect, strict=True):
                for (v, c, p), (sv, sc, sp) in zip(reports, srcs, strict=True):
                    ctx.set(sv, v)
                    ctx.set(sc, c)
                    ctx.set(sp, p)
                ctx.set(start, st)
                assert ctx.get(any_out) == any(v for v, _c, _p in reports)
                await ctx.tick()
                got = (ctx.get(f_code).value, ctx.get(f_pc)) if ctx.get(f_valid) else None
                assert got == want, (reports, st, got, want)
                valid_pcs = [p for v, _c, p in reports if v]
                seen_many += len(valid_pcs) > 1
                seen_tie += len(valid_pcs) != len(set(valid_pcs))
            assert not ctx.get(pending_out)
        if n_src > 1:   # the cases this test is for did occur
            assert seen_many > 20 and seen_tie > 3, (seen_many, seen_tie)

    sim = Simulator(m)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
