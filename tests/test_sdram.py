"""SDRAM controller (hw/sdram.py) against the behavioural SDRAM model (sim/sdram_model.py):
random AXI4 bursts with random strobes and back-pressure compared with a reference memory;
initialisation, refresh, CAS latency 2 and 3, bank and row switching, no timing violation."""

import random

import pytest
from amaranth.sim import Simulator

from vitamin.hw.sdram import SdramController, SdramGeometry, SdramTiming
from vitamin.sim.sdram_model import ModelTiming, SdramModel

GEOM = SdramGeometry(row_bits=4, col_bits=4)      # 2 KiB: every burst meets rows and banks


def _timing(cl, refresh=150):
    # the controller's settings at the model's limits (cycles)
    return SdramTiming(t_rp=2, t_rcd=2, t_rc=6, t_rfc=6, t_wr=2, t_mrd=2, refresh=refresh,
                       init=12, cas_latency=cl)


def _run(cl, n_bursts, seed, *, idle_gaps=False):
    rng = random.Random(seed)
    dut = SdramController(_timing(cl), GEOM)
    model = SdramModel(GEOM.row_bits, GEOM.col_bits,
                       ModelTiming(refresh_interval=151, max_postponed=2, init_min=10))
    ref = bytearray(GEOM.bytes)
    errors = []
    done = []

    async def sdram(ctx):
        p = dut.sdram
        while True:
            _, _, *v = await ctx.tick().sample(p.cs, p.ras, p.cas, p.we, p.ba, p.a, p.dq_o,
                                               p.dq_oe, p.dqm, p.cke)
            cs, ras, cas, we, ba, a, dq_o, dq_oe, dqm, cke = (int(x) for x in v)
            nxt = model.edge(cs=cs, ras=ras, cas=cas, we=we, ba=ba, a=a, dq_o=dq_o,
                             dq_oe=dq_oe, dqm=dqm, cke=cke)
            ctx.set(p.dq_i, 0xDEAD if nxt is None else nxt)

    async def master(ctx):
        ar, aw = dut.axi_r, dut.axi_w
        while not ctx.get(dut.init_done):
            await ctx.tick()
        for i in range(n_bursts):
            n = rng.choice([1, 1, 2, 3, 4, 8, 16])
            addr = 4 * rng.randrange(GEOM.bytes // 4 - n + 1)
            if rng.random() < 0.5:
                data = [rng.randrange(1 << 32) for _ in range(n)]
                strb = [rng.choice([0xF, 0xF, rng.randrange(16)]) for _ in range(n)]
                ctx.set(aw.awvalid, 1)
                ctx.set(aw.awaddr, addr)
                ctx.set(aw.awlen, n - 1)
                ctx.set(aw.awsize, 2)
                ctx.set(aw.awburst, 1)
                while True:
                    _, _, rdy = await ctx.tick().sample(aw.awready)
                    if rdy:
                        break
                ctx.set(aw.awvalid, 0)
                for k in range(n):
                    while rng.random() < 0.2:
                        await ctx.tick()
                    ctx.set(aw.wvalid, 1)
                    ctx.set(aw.wdata, data[k])
                    ctx.set(aw.wstrb, strb[k])
                    ctx.set(aw.wlast, k == n - 1)
                    while True:
                        _, _, rdy = await ctx.tick().sample(aw.wready)
                        if rdy:
                            break
                    ctx.set(aw.wvalid, 0)
                    for b in range(4):
                        if strb[k] >> b & 1:
                            ref[addr + 4 * k + b] = data[k] >> 8 * b & 0xFF
                ctx.set(aw.bready, 1)
                while True:
                    _, _, bv = await ctx.tick().sample(aw.bvalid)
                    if bv:
                        break
                ctx.set(aw.bready, 0)
            else:
                ctx.set(ar.arvalid, 1)
                ctx.set(ar.araddr, addr)
                ctx.set(ar.arlen, n - 1)
                ctx.set(ar.arsize, 2)
                ctx.set(ar.arburst, 1)
                while True:
                    _, _, rdy = await ctx.tick().sample(ar.arready)
                    if rdy:
                        break
                ctx.set(ar.arvalid, 0)
                for k in range(n):
                    while rng.random() < 0.3:               # back-pressure
                        await ctx.tick()
                    ctx.set(ar.rready, 1)
                    while True:
                        _, _, rv, rd, rl = await ctx.tick().sample(ar.rvalid, ar.rdata,
                                                                   ar.rlast)
                        if rv:
                            break
                    ctx.set(ar.rready, 0)
                    want = int.from_bytes(ref[addr + 4 * k:addr + 4 * k + 4], "little")
                    if rd != want:
                        errors.append(f"burst {i} beat {k} at {addr + 4 * k:#x}: "
                                      f"{rd:#010x} != {want:#010x}")
                    if bool(rl) != (k == n - 1):
                        errors.append(f"burst {i} beat {k}: rlast {rl}")
            if idle_gaps and rng.random() < 0.1:
                for _ in range(rng.randrange(100, 300)):
                    await ctx.tick()
        done.append(True)

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(master)
    sim.add_testbench(sdram, background=True)

    async def deadline(ctx):
        for _ in range(400 * n_bursts + 2000):
            await ctx.tick()
        raise AssertionError("the controller stopped answering")

    sim.add_testbench(deadline, background=True)
    sim.run()
    return model, ref, errors, done


@pytest.mark.parametrize("cl", [2, 3])
def test_random_bursts_match_reference(cl):
    model, ref, errors, done = _run(cl, 150, seed=cl, idle_gaps=True)
    assert done and not errors, errors[:5]
    assert model.violations == [], model.violations[:5]
    assert model.cl == cl
    assert model.read_bytes(0, len(ref)) == bytes(ref)
    assert model.refreshes >= 3            # refreshed between bursts and while idle
    # bursts crossed rows and banks
    assert model.activates > 150 and model.reads > 50 and model.writes > 50


def test_model_catches_violations():
    """The checker is not vacuous: a READ to a closed bank and a missed refresh are reported."""
    m = SdramModel(4, 4, ModelTiming(refresh_interval=5, max_postponed=2, init_min=2))
    nop = dict(cs=1, ras=0, cas=0, we=0, ba=0, a=0, dq_o=0, dq_oe=0, dqm=0)
    for _ in range(3):
        m.edge(**nop)
    m.edge(**{**nop, "ras": 1, "we": 1, "a": 1 << 10})         # precharge all
    for _ in range(3):
        m.edge(**nop)
    for _ in range(2):
        m.edge(**{**nop, "ras": 1, "cas": 1})                   # refresh
        for _ in range(6):
            m.edge(**nop)
    m.edge(**{**nop, "ras": 1, "cas": 1, "we": 1, "a": 0x21})  # mode: CL 2, BL 2
    for _ in range(2):
        m.edge(**nop)
    m.edge(**{**nop, "ras": 1, "cas": 1})                       # first counted refresh
    assert m.violations == []
    m.edge(**{**nop, "cas": 1, "ba": 1})                        # READ, bank 1 closed
    for _ in range(30):
        m.edge(**nop)
    assert any("closed bank" in v for v in m.violations)
    assert any("refresh late" in v for v in m.violations)


def test_bad_parameters():
    with pytest.raises(ValueError, match="cas_latency"):
        SdramTiming.from_clock(25e6, cas_latency=4)
    with pytest.raises(ValueError, match="row_bits"):
        SdramGeometry(row_bits=20)
    t = SdramTiming.from_clock(25e6)
    assert t.t_rp == 1 and t.t_rc == 2 and t.refresh > 150 and t.init == 5000
