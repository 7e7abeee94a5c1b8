# amaranth: UnusedElaboratable=no
# (The first line silences Amaranth's warning for components whose constructor is expected to fail.)
"""The UART bridge (hw/bridge.py) in the Amaranth simulator: random frames against the Python
reference of the protocol (vitamin.runtime.BridgeModel), corrupted and truncated frames, bus
errors, and the UART itself."""

import random
import struct

import pytest
from amaranth.sim import Simulator
from hwutil import stream_get, stream_put

from vitamin import runtime as rt
from vitamin.hw.bridge import Bridge, UartBridge

TIMEOUT = 64


class BusModel:
    """AXI4-Lite and AXI4 slaves in Python with random ready/valid delays; addresses at or above
    ``err_from`` answer SLVERR. The same store serves as the target of the reference model."""

    def __init__(self, rng, err_from=0x8000, reg_err_from=0xF00):
        self.rng = rng
        self.reg_err_from = reg_err_from
        self.regs = {}
        self.mem = bytearray(0x10000)
        self.err_from = err_from
        self.writes = 0

    # -- as a runtime.Transport, for BridgeModel ----------------------------------------------
    def read_regs(self, off, n):
        if off + 4 * n > self.reg_err_from:
            raise rt.BridgeError(rt.Status.BUS_ERROR, "ref")
        return [self.regs.get(off + 4 * i, 0) for i in range(n)]

    def write_regs(self, off, vals):
        for i, v in enumerate(vals):
            if off + 4 * i >= self.reg_err_from:
                raise rt.BridgeError(rt.Status.BUS_ERROR, "ref")
            self.regs[off + 4 * i] = v

    def read_mem(self, a, n):
        if a + n > self.err_from:
            raise rt.BridgeError(rt.Status.BUS_ERROR, "ref")
        return bytes(self.mem[a:a + n])

    def write_mem(self, a, data):
        for i in range(0, len(data), 4):
            if a + i >= self.err_from:
                raise rt.BridgeError(rt.Status.BUS_ERROR, "ref")
            self.mem[a + i:a + i + 4] = data[i:i + 4]

    # -- as the DUT's bus -----------------------------------------------------------------------
    async def serve(self, ctx, dut):
        lite, ar, aw = dut.axil, dut.axi_r, dut.axi_w
        rl = rm = None          # pending read data (data, resp)
        bl = bm = None          # pending write responses
        awl = wl = awm = wm = None
        rng = self.rng
        while True:
            ctx.set(lite.arready, rl is None and rng.random() < 0.6)
            ctx.set(ar.arready, rm is None and rng.random() < 0.6)
            ctx.set(lite.awready, awl is None and bl is None and rng.random() < 0.6)
            ctx.set(lite.wready, wl is None and bl is None and rng.random() < 0.6)
            ctx.set(aw.awready, awm is None and bm is None and rng.random() < 0.6)
            ctx.set(aw.wready, wm is None and bm is None and rng.random() < 0.6)
            for port, pend, valid, data, resp in ((lite, rl, "rvalid", "rdata", "rresp"),
                                                  (ar, rm, "rvalid", "rdata", "rresp")):
                show = pend is not None and rng.random() < 0.7
                ctx.set(getattr(port, valid), show)
                ctx.set(getattr(port, data), pend[0] if show else 0)
                ctx.set(getattr(port, resp), pend[1] if show else 0)
            if ar.rlast is not None:
                ctx.set(ar.rlast, 1)
            for port, pend in ((lite, bl), (aw, bm)):
                show = pend is not None and rng.random() < 0.7
                ctx.set(port.bvalid, show)
                ctx.set(port.bresp, pend if show else 0)
            sigs = [lite.arvalid, lite.arready, lite.araddr, lite.rvalid, lite.rready,
                    ar.arvalid, ar.arready, ar.araddr, ar.arlen, ar.rvalid, ar.rready,
                    lite.awvalid, lite.awready, lite.awaddr, lite.wvalid, lite.wready,
                    lite.wdata, lite.bvalid, lite.bready,
                    aw.awvalid, aw.awready, aw.awaddr, aw.wvalid, aw.wready, aw.wdata,
                    aw.wstrb, aw.wlast, aw.bvalid, aw.bready]
            v = dict(zip(range(len(sigs)), (await ctx.tick().sample(*sigs))[2:]))
            (l_arv, l_arr, l_ara, l_rv, l_rr, m_arv, m_arr, m_ara, m_arlen, m_rv, m_rr,
             l_awv, l_awr, l_awa, l_wv, l_wr, l_wd, l_bv, l_br,
             m_awv, m_awr, m_awa, m_wv, m_wr, m_wd, m_wstrb, m_wlast, m_bv, m_br) = \
                [v[i] for i in range(len(sigs))]
            if l_rv and l_rr:
                rl = None
            if m_rv and m_rr:
                rm = None
            if l_bv and l_br:
                bl = None
            if m_bv and m_br:
                bm = None
            if l_arv and l_arr:
                a = int(l_ara)
                rl = (0, 2) if a >= self.reg_err_from else (self.regs.get(a, 0), 0)
            if m_arv and m_arr:
                assert m_arlen == 0
                a = int(m_ara)
                rm = (0, 2) if a >= self.err_from else \
                    (int.from_bytes(self.mem[a:a + 4], "little"), 0)
            if l_awv and l_awr:
                awl = int(l_awa)
            if l_wv and l_wr:
                wl = int(l_wd)
            if m_awv and m_awr:
                awm = int(m_awa)
            if m_wv and m_wr:
                assert m_wstrb == 0xF and m_wlast
                wm = int(m_wd)
            if awl is not None and wl is not None:
                if awl >= self.reg_err_from:
                    bl = 2
                else:
                    self.regs[awl] = wl
                    self.writes += 1
                    bl = 0
                awl = wl = None
            if awm is not None and wm is not None:
                if awm >= self.err_from:
                    bm = 2
                else:
                    self.mem[awm:awm + 4] = wm.to_bytes(4, "little")
                    self.writes += 1
                    bm = 0
                awm = wm = None


def _random_frame(rng):
    cmd = rng.choice(list(rt.Cmd))
    count = 1 if cmd == rt.Cmd.PING else rng.randint(1, 12)
    if rng.random() < 0.1:
        count = rng.choice([0, rt.MAX_WORDS + 1])
    base = 0x100 if cmd in (rt.Cmd.READ_REG, rt.Cmd.WRITE_REG) else 0x1000
    addr = base + 4 * rng.randrange(0, 256)
    if rng.random() < 0.1:                       # runs into the bus-error range
        addr = (0xF00 if base == 0x100 else 0x8000) - 4 * rng.randint(0, 2)
    if base == 0x100 and rng.random() < 0.05:
        addr = 0x1000 - 4 * rng.randint(0, 2)     # beyond the 4 KiB register space
    if rng.random() < 0.05:
        addr += 2
    payload = bytes(rng.randrange(256) for _ in range(4 * count)) \
        if cmd in rt.WRITE_CMDS else b""
    return rt.encode_request(cmd, addr, count, payload)


def _response_len(raw_so_far, frame):
    status = raw_so_far[1]
    n = 4 * frame[6] if status == rt.Status.OK and frame[1] not in rt.WRITE_CMDS else 0
    return 4 + n


def _run_bridge(frames, seed, *, stall=0.3):
    """Send ``frames`` (bytes; may be corrupted/truncated) to a Bridge one by one and return
    the response of each, plus the DUT's bus store."""
    rng = random.Random(seed)
    dut = Bridge(timeout_cycles=TIMEOUT)
    bus = BusModel(random.Random(seed + 1))
    responses = []

    async def host(ctx):
        for f in frames:
            for b in f:
                await stream_put(ctx, dut.i, b, rng=rng, p_idle=0.2)
            raw = bytearray()
            while not (len(raw) >= 2 and len(raw) == _response_len(raw, f)):
                raw.append(await stream_get(ctx, dut.o, rng=rng, p_stall=stall))
            responses.append(bytes(raw))

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(host)

    async def deadline(ctx):
        for _ in range(len(frames) * (2 * TIMEOUT + 3000)):
            await ctx.tick()
        raise AssertionError(f"no response after frame {len(responses)}")

    sim.add_testbench(deadline, background=True)

    async def serve(ctx):
        await bus.serve(ctx, dut)

    sim.add_testbench(serve, background=True)
    sim.run()
    return responses, bus


def _reference(frames, seed):
    """The same frames through the Python reference on the same (initially empty) store."""
    store = BusModel(random.Random(seed))
    model = rt.BridgeModel(store)
    out = []
    for f in frames:
        model.feed(f)
        model.line_idle()
        out.append(model.take())
    return out, store


@pytest.mark.parametrize("seed", [1, 2])
def test_random_frames_match_reference(seed):
    rng = random.Random(seed)
    frames = [_random_frame(rng) for _ in range(40)]
    got, bus = _run_bridge(frames, seed)
    ref, store = _reference(frames, seed)
    for i, (g, r) in enumerate(zip(got, ref)):
        assert g == r, f"frame {i} {frames[i].hex()}: {g.hex()} != {r.hex()}"
    assert bus.mem == store.mem and bus.regs == store.regs
    statuses = {r[1] for r in ref}
    assert rt.Status.OK in statuses and rt.Status.BUS_ERROR in statuses


def test_corrupted_frames_are_nacked_and_not_applied():
    rng = random.Random(7)
    frames = []
    for _ in range(20):
        f = bytearray(rt.encode_request(rt.Cmd.WRITE_MEM, 0x2000 + 4 * rng.randrange(64), 4,
                                        bytes(rng.randrange(256) for _ in range(16))))
        # keep SYNC, CMD and COUNT: the frame's length stays known
        pos = rng.choice([2, 3, 4, 5] + list(range(7, len(f))))
        f[pos] ^= 1 << rng.randrange(8)
        frames.append(bytes(f))
    got, bus = _run_bridge(frames, 3)
    for g in got:
        assert g == rt.encode_response(rt.Status.BAD_CRC)
    assert bus.writes == 0 and not any(bus.mem)


def test_corrupted_length_or_command_is_never_applied():
    """A flipped COUNT or CMD byte changes the frame's length: the bridge answers BAD_CRC (too
    short: the trailing bytes are dropped) or TIMEOUT (too long), and applies nothing."""
    rng = random.Random(9)
    frames = []
    for k in range(16):
        f = bytearray(rt.encode_request(rt.Cmd.WRITE_MEM, 0x2000, 4,
                                        bytes(rng.randrange(256) for _ in range(16))))
        f[6 if k % 2 else 1] ^= 1 << rng.randrange(8)
        frames.append(bytes(f))
    got, bus = _run_bridge(frames, 4, stall=0.0)
    for g in got:
        assert g in (rt.encode_response(rt.Status.BAD_CRC), rt.encode_response(rt.Status.TIMEOUT))
    assert bus.writes == 0 and not any(bus.mem)


def test_truncated_frames_time_out_and_bridge_recovers():
    good = rt.encode_request(rt.Cmd.WRITE_REG, 0x40, 2, struct.pack("<2I", 7, 9))
    rd = rt.encode_request(rt.Cmd.READ_REG, 0x40, 2)
    frames = [good[:5], good[:-1], rd[:3], good, rd]
    got, bus = _run_bridge(frames, 5, stall=0.0)
    for g in got[:3]:
        assert g == rt.encode_response(rt.Status.TIMEOUT)
    assert got[3] == rt.encode_response(rt.Status.OK)
    assert got[4] == rt.encode_response(rt.Status.OK, struct.pack("<2I", 7, 9))
    assert bus.writes == 2


def test_uart_bridge_end_to_end_through_the_line():
    """Bytes through the UART pins (4 cycles per bit) with the runtime's encoder."""
    div = 4
    dut = UartBridge(divisor=div, timeout_bytes=8)
    bus = BusModel(random.Random(11))
    frames = [rt.encode_request(rt.Cmd.WRITE_MEM, 0x100, 2, b"\x11\x22\x33\x44\x55\x66\x77\x88"),
              rt.encode_request(rt.Cmd.READ_MEM, 0x100, 2),
              rt.encode_request(rt.Cmd.PING, 0, 1)]
    expect = [rt.encode_response(rt.Status.OK),
              rt.encode_response(rt.Status.OK, b"\x11\x22\x33\x44\x55\x66\x77\x88"),
              rt.encode_response(rt.Status.OK, struct.pack("<I", rt.BRIDGE_ID))]
    received = bytearray()

    async def line_in(ctx):
        ctx.set(dut.rx, 1)
        for _ in range(10):
            await ctx.tick()
        for f in frames:
            for b in f:
                for bit in [0] + [(b >> k) & 1 for k in range(8)] + [1]:
                    ctx.set(dut.rx, bit)
                    for _ in range(div):
                        await ctx.tick()
            for _ in range(div * 10 * 30):        # wait for the response
                await ctx.tick()
        # let the receiver finish
        for _ in range(200):
            await ctx.tick()

    async def line_out(ctx):
        while True:
            _, _, tx = await ctx.tick().sample(dut.tx)
            if tx:
                continue
            for _ in range(div // 2):
                await ctx.tick()
            b = 0
            for k in range(8):
                for _ in range(div):
                    await ctx.tick()
                b |= ctx.get(dut.tx) << k
            for _ in range(div):
                await ctx.tick()
            assert ctx.get(dut.tx) == 1, "stop bit"
            received.append(b)

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(line_in)
    sim.add_testbench(line_out, background=True)

    async def serve(ctx):
        await bus.serve(ctx, dut)

    sim.add_testbench(serve, background=True)
    sim.run()
    assert bytes(received) == b"".join(expect)
    assert bus.mem[0x100:0x108] == b"\x11\x22\x33\x44\x55\x66\x77\x88"


def test_bad_parameters():
    with pytest.raises(ValueError, match="divisor"):
        UartBridge(divisor=2)
    with pytest.raises(ValueError, match="timeout_cycles"):
        Bridge(timeout_cycles=1)
