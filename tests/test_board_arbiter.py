"""AXI arbiters of the board top (boards/core.py): two masters issuing random bursts at once
into one memory; every burst completes with its own data and bursts never interleave. With
``slices``, the memory sits behind the register slices, as in the board top, and both sides
stall at random."""

import random

import pytest
from amaranth import Elaboratable, Module
from amaranth.lib import wiring
from amaranth.sim import Simulator

from vitamin.boards.core import (
    AxiLiteSlice,
    AxiReadArbiter,
    AxiReadSlice,
    AxiWriteArbiter,
    AxiWriteSlice,
)


class _Pair(Elaboratable):
    def __init__(self, slices):
        self.r = AxiReadArbiter()
        self.w = AxiWriteArbiter()
        self.slices = slices
        if slices:
            self.rs, self.ws = AxiReadSlice(), AxiWriteSlice()
            self.s_r, self.s_w = self.rs.s, self.ws.s
        else:
            self.s_r, self.s_w = self.r.s, self.w.s

    def elaborate(self, platform):
        m = Module()
        m.submodules.r = self.r
        m.submodules.w = self.w
        if self.slices:
            m.submodules.rs = self.rs
            m.submodules.ws = self.ws
            wiring.connect(m, self.r.s, self.rs.m)
            wiring.connect(m, self.w.s, self.ws.m)
        return m


@pytest.mark.parametrize("slices", [False, True])
def test_two_masters_random_bursts(slices):
    dut = _Pair(slices)
    mem = bytearray(4096)
    rng = random.Random(5)
    log = []            # (kind, master) per slave burst, in order
    errors = []
    finished = []

    async def slave(ctx):
        s_r, s_w = dut.s_r, dut.s_w
        rd = wr = None
        while True:
            ctx.set(s_r.arready, rd is None and rng.random() < 0.5)
            ctx.set(s_w.awready, wr is None and rng.random() < 0.5)
            show_r = rd is not None and rd["left"] > 0 and rng.random() < 0.7
            ctx.set(s_r.rvalid, show_r)
            if show_r:
                a = rd["addr"]
                ctx.set(s_r.rdata, int.from_bytes(mem[a:a + 4], "little"))
                ctx.set(s_r.rlast, rd["left"] == 1)
            ctx.set(s_w.wready, wr is not None and wr["left"] > 0 and rng.random() < 0.7)
            ctx.set(s_w.bvalid, wr is not None and wr["left"] == 0)
            _, _, *v = await ctx.tick().sample(
                s_r.arvalid, s_r.arready, s_r.araddr, s_r.arlen, s_r.rvalid, s_r.rready,
                s_w.awvalid, s_w.awready, s_w.awaddr, s_w.awlen, s_w.wvalid, s_w.wready,
                s_w.wdata, s_w.wlast, s_w.bvalid, s_w.bready)
            (arv, arr, ara, arl, rv, rr, awv, awr, awa, awl, wv, wr_, wd, wl, bv, br) = v
            if rv and rr:
                rd["addr"] += 4
                rd["left"] -= 1
                if rd["left"] == 0:
                    rd = None
            if arv and arr:
                rd = {"addr": int(ara), "left": int(arl) + 1}
                log.append(("r", int(ara)))
            if wv and wr_:
                a = wr["addr"]
                mem[a:a + 4] = int(wd).to_bytes(4, "little")
                wr["addr"] += 4
                wr["left"] -= 1
                if bool(wl) != (wr["left"] == 0):
                    errors.append("wlast out of place")
            if bv and br:
                wr = None
            if awv and awr:
                wr = {"addr": int(awa), "left": int(awl) + 1}
                log.append(("w", int(awa)))

    def master(k):
        async def run(ctx):
            r, w = (dut.r.m0, dut.w.m0) if k == 0 else (dut.r.m1, dut.w.m1)
            base = 2048 * k                     # each master owns half of the memory
            mine = {}
            for i in range(25):
                n = rng.randint(1, 6)
                addr = base + 4 * rng.randrange(0, 512 - n)
                data = [rng.randrange(1 << 32) for _ in range(n)]
                ctx.set(w.awvalid, 1)
                ctx.set(w.awaddr, addr)
                ctx.set(w.awlen, n - 1)
                while not (await ctx.tick().sample(w.awready))[2]:
                    pass
                ctx.set(w.awvalid, 0)
                for j, d in enumerate(data):
                    ctx.set(w.wvalid, 1)
                    ctx.set(w.wdata, d)
                    ctx.set(w.wlast, j == n - 1)
                    while not (await ctx.tick().sample(w.wready))[2]:
                        pass
                    ctx.set(w.wvalid, 0)
                    mine[addr + 4 * j] = d
                ctx.set(w.bready, 1)
                while not (await ctx.tick().sample(w.bvalid))[2]:
                    pass
                ctx.set(w.bready, 0)
                ctx.set(r.arvalid, 1)
                ctx.set(r.araddr, addr)
                ctx.set(r.arlen, n - 1)
                while not (await ctx.tick().sample(r.arready))[2]:
                    pass
                ctx.set(r.arvalid, 0)
                ctx.set(r.rready, 1)
                for j in range(n):
                    while True:
                        _, _, rv, rd, rl = await ctx.tick().sample(r.rvalid, r.rdata, r.rlast)
                        if rv:
                            break
                    if rd != mine[addr + 4 * j]:
                        errors.append(f"master {k} burst {i} beat {j}")
                    if bool(rl) != (j == n - 1):
                        errors.append(f"master {k} rlast")
                ctx.set(r.rready, 0)
            finished.append(k)
        return run

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(master(0))
    sim.add_testbench(master(1))
    sim.add_testbench(slave, background=True)

    async def deadline(ctx):
        for _ in range(40_000):
            await ctx.tick()
        raise AssertionError("arbitration deadlock")

    sim.add_testbench(deadline, background=True)
    sim.run()
    assert sorted(finished) == [0, 1] and not errors, errors[:5]
    owners = {a >= 2048 for _, a in log}
    assert owners == {False, True} and len(log) == 100


@pytest.mark.parametrize("cls", [AxiReadSlice, AxiWriteSlice, AxiLiteSlice])
def test_slice_channels_in_order(cls):
    """Every channel of a register slice passes its beats unchanged and in order, with random
    gaps at the source and random stalls at the destination."""
    dut = cls()
    rng = random.Random(11)
    n_beats = 80
    sent, got = {}, {}

    def bench(ch, forward, fields):
        src, dst = (dut.m, dut.s) if forward else (dut.s, dut.m)
        beats = [tuple(rng.getrandbits(len(getattr(src, n))) for n in fields)
                 for _ in range(n_beats)]
        sent[ch], got[ch] = beats, []
        sv, sr = getattr(src, f"{ch}valid"), getattr(src, f"{ch}ready")
        dv, dr = getattr(dst, f"{ch}valid"), getattr(dst, f"{ch}ready")

        async def producer(ctx):
            for beat in beats:
                while rng.random() < 0.3:
                    ctx.set(sv, 0)
                    await ctx.tick()
                ctx.set(sv, 1)
                for n, v in zip(fields, beat):
                    ctx.set(getattr(src, n), v)
                while not (await ctx.tick().sample(sr))[2]:
                    pass
            ctx.set(sv, 0)

        async def consumer(ctx):
            for _ in range(20 * n_beats):
                ready = rng.random() < 0.6
                ctx.set(dr, ready)
                _, _, valid, *payload = await ctx.tick().sample(
                    dv, *(getattr(dst, n) for n in fields))
                if valid and ready:
                    got[ch].append(tuple(int(v) for v in payload))
                if len(got[ch]) == n_beats:
                    break

        return producer, consumer

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    for ch, forward, fields in cls.CHANNELS:
        for tb in bench(ch, forward, fields):
            sim.add_testbench(tb)
    sim.run()
    assert [c for c, _f, _d in cls.CHANNELS] == list(sent)
    for ch in sent:
        assert got[ch] == sent[ch], ch
