"""The board-independent part of a board top: UART bridge + accelerator + memory.

::

    rx/tx -> UartBridge --axil--------------------------> Accelerator.s_axil
                        --axi_r--\\                 /-- Accelerator.m_axi_r
                        --axi_w--> AxiArbiter x2 <---- Accelerator.m_axi_w
                                       |
                         SdramController (ULX3S) | SpramMemory (iCEBreaker)

:class:`AxiReadArbiter` / :class:`AxiWriteArbiter` grant the memory to one master per burst
(the accelerator first, the bridge when the accelerator is not asking). The host only touches
memory while the accelerator is idle, so the bridge never waits long.
"""

from __future__ import annotations

from amaranth import Cat, ClockSignal, Instance, Module, Mux, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from vitamin.config import get_config
from vitamin.hw.accel import Accelerator
from vitamin.hw.bridge import Bridge, UartBridge
from vitamin.hw.ports import AxiRead, AxiWrite
from vitamin.hw.sdram import SdramBus, SdramController, SdramGeometry, SdramTiming

__all__ = ["AxiReadArbiter", "AxiWriteArbiter", "SpramMemory", "BoardCore"]


def _fwd(m, src, dst, names):
    for n in names:
        m.d.comb += getattr(dst, n).eq(getattr(src, n))


_AR = ("araddr", "arlen", "arsize", "arburst")
_AW = ("awaddr", "awlen", "awsize", "awburst")
_W = ("wdata", "wstrb", "wlast")


class AxiReadArbiter(wiring.Component):
    """Two AXI4 read masters (``m0`` has priority) onto one slave, one burst at a time."""

    def __init__(self, data_bits=32):
        super().__init__({"m0": In(AxiRead(data_bits)), "m1": In(AxiRead(data_bits)),
                          "s": Out(AxiRead(data_bits))})

    def elaborate(self, platform):
        m = Module()
        busy = Signal()
        sel = Signal()
        s = self.s
        pick = Signal()     # the master presenting AR this cycle / owning the burst
        m.d.comb += pick.eq(Mux(busy, sel, ~self.m0.arvalid))
        for k, mm in enumerate((self.m0, self.m1)):
            mine = pick == k
            with m.If(mine):
                _fwd(m, mm, s, _AR)
                m.d.comb += [s.arvalid.eq(mm.arvalid & ~busy), mm.arready.eq(s.arready & ~busy),
                             s.arid.eq(mm.arid)]
                with m.If(busy):
                    m.d.comb += [mm.rvalid.eq(s.rvalid), s.rready.eq(mm.rready)]
            m.d.comb += [mm.rdata.eq(s.rdata), mm.rresp.eq(s.rresp), mm.rlast.eq(s.rlast),
                         mm.rid.eq(s.rid)]
        with m.If(s.arvalid & s.arready):
            m.d.sync += [busy.eq(1), sel.eq(pick)]
        with m.If(s.rvalid & s.rready & s.rlast):
            m.d.sync += busy.eq(0)
        return m


class AxiWriteArbiter(wiring.Component):
    """Two AXI4 write masters (``m0`` has priority) onto one slave, one burst at a time
    (AW, all W beats, then B)."""

    def __init__(self, data_bits=32):
        super().__init__({"m0": In(AxiWrite(data_bits)), "m1": In(AxiWrite(data_bits)),
                          "s": Out(AxiWrite(data_bits))})

    def elaborate(self, platform):
        m = Module()
        busy = Signal()
        sel = Signal()
        s = self.s
        pick = Signal()
        m.d.comb += pick.eq(Mux(busy, sel, ~self.m0.awvalid))
        for k, mm in enumerate((self.m0, self.m1)):
            with m.If(pick == k):
                _fwd(m, mm, s, _AW)
                m.d.comb += [s.awvalid.eq(mm.awvalid & ~busy),
                             mm.awready.eq(s.awready & ~busy), s.awid.eq(mm.awid)]
                with m.If(busy):
                    _fwd(m, mm, s, _W)
                    m.d.comb += [s.wvalid.eq(mm.wvalid), mm.wready.eq(s.wready),
                                 mm.bvalid.eq(s.bvalid), s.bready.eq(mm.bready)]
            m.d.comb += [mm.bresp.eq(s.bresp), mm.bid.eq(s.bid)]
        with m.If(s.awvalid & s.awready):
            m.d.sync += [busy.eq(1), sel.eq(pick)]
        with m.If(s.bvalid & s.bready):
            m.d.sync += busy.eq(0)
        return m


class SpramMemory(wiring.Component):
    """AXI4 slave over the iCE40UP5K's four SB_SPRAM256KA (16K x 16 each): two pairs give 32-bit
    words, 128 KiB at address 0 (wraps above). About one beat per two cycles. Synthesis only:
    the SPRAM primitive has no model in the Amaranth simulator."""

    def __init__(self):
        super().__init__({"axi_r": In(AxiRead(32)), "axi_w": In(AxiWrite(32))})

    def elaborate(self, platform):
        m = Module()
        ar, aw = self.axi_r, self.axi_w
        addr = Signal(15)            # word address; bit 14 selects the pair
        left = Signal(9)
        rd = [Signal(16) for _ in range(4)]
        we = Signal()
        wdata = Signal(32)
        wstrb = Signal(4)
        for k in range(4):
            pair, half = k // 2, k % 2
            b0, b1 = wstrb[2 * half], wstrb[2 * half + 1]
            # MASKWREN enables nibbles: byte b -> nibbles 2b, 2b+1
            m.submodules[f"spram{k}"] = Instance(
                "SB_SPRAM256KA", i_ADDRESS=addr[:14], i_DATAIN=wdata[16 * half:16 * half + 16],
                i_MASKWREN=Cat(b0, b0, b1, b1), i_WREN=we & (addr[14] == pair),
                i_CHIPSELECT=1, i_CLOCK=ClockSignal(), i_STANDBY=0, i_SLEEP=0, i_POWEROFF=1,
                o_DATAOUT=rd[k])
        hi = Signal()
        m.d.comb += [ar.rdata.eq(Mux(hi, Cat(rd[2], rd[3]), Cat(rd[0], rd[1]))),
                     ar.rresp.eq(0), aw.bresp.eq(0), ar.rid.eq(0), aw.bid.eq(0)]
        with m.FSM():
            with m.State("IDLE"):
                with m.If(ar.arvalid):
                    m.d.comb += ar.arready.eq(1)
                    m.d.sync += [addr.eq(ar.araddr >> 2), left.eq(ar.arlen + 1)]
                    m.next = "READ"
                with m.Elif(aw.awvalid):
                    m.d.comb += aw.awready.eq(1)
                    m.d.sync += [addr.eq(aw.awaddr >> 2), left.eq(aw.awlen + 1)]
                    m.next = "WDATA"
            with m.State("READ"):          # address presented; data after this edge
                m.d.sync += hi.eq(addr[14])
                m.next = "RDATA"
            with m.State("RDATA"):
                m.d.comb += [ar.rvalid.eq(1), ar.rlast.eq(left == 1)]
                with m.If(ar.rready):
                    m.d.sync += [addr.eq(addr + 1), left.eq(left - 1)]
                    with m.If(left == 1):
                        m.next = "IDLE"
                    with m.Else():
                        m.next = "READ"
            with m.State("WDATA"):
                m.d.comb += aw.wready.eq(1)
                with m.If(aw.wvalid):
                    m.d.sync += [wdata.eq(aw.wdata), wstrb.eq(aw.wstrb)]
                    m.next = "WRITE"
            with m.State("WRITE"):
                m.d.comb += we.eq(1)
                m.d.sync += [addr.eq(addr + 1), left.eq(left - 1)]
                with m.If(left == 1):
                    m.next = "BRESP"
                with m.Else():
                    m.next = "WDATA"
            with m.State("BRESP"):
                m.d.comb += aw.bvalid.eq(1)
                with m.If(aw.bready):
                    m.next = "IDLE"
        return m


class BoardCore(wiring.Component):
    """Bridge + accelerator + memory.

    Parameters
    ----------
    config : Config or str
        The accelerator preset (its bus must be 32 bits wide).
    memory : str
        ``"sdram"`` (SdramController; ``sdram`` port) or ``"spram"`` (iCE40UP5K SPRAM).
    clk_hz : float
        The clock, for the UART divisor and the SDRAM timing.
    baud : int
    uart : bool
        False: no UART; the bridge's byte streams are ports ``i``/``o`` (simulation fast path).
    sdram_geometry, sdram_timing : optional overrides (simulation).
    units : dict, optional
        The accelerator's units (:class:`~vitamin.hw.accel.Accelerator`); ``{}`` gives a
        controller-only accelerator for quick elaboration tests.

    Ports
    -----
    rx, tx : when ``uart``; i, o, bridge_busy : byte streams and the bridge's busy otherwise
    sdram : Out(SdramBus) when ``memory == "sdram"``
    irq : Out(1)
    """

    def __init__(self, config, *, memory="sdram", clk_hz=25e6, baud=1_000_000, uart=True,
                 sdram_geometry=None, sdram_timing=None, bridge_timeout_cycles=None,
                 units=None):
        self._cfg = cfg = get_config(config)
        self._units = units
        if cfg.bus_bits != 32:
            raise ValueError(f"board tops need a 32-bit accelerator bus; preset {cfg.name!r} "
                             f"has {cfg.bus_bits}")
        if memory not in ("sdram", "spram"):
            raise ValueError(f"memory must be 'sdram' or 'spram', not {memory!r}")
        self._memory = memory
        self._div = round(clk_hz / baud)
        if self._div < 4:
            raise ValueError(f"clock {clk_hz} Hz is too slow for {baud} baud")
        self._uart = uart
        self._geom = sdram_geometry or SdramGeometry()
        self._timing = sdram_timing or SdramTiming.from_clock(clk_hz)
        self._bto = bridge_timeout_cycles or self._div * 10 * 64
        members = {"irq": Out(1)}
        if uart:
            members.update({"rx": In(1, init=1), "tx": Out(1, init=1)})
        else:
            members.update({"i": In(stream.Signature(8)), "o": Out(stream.Signature(8)),
                            "bridge_busy": Out(1)})
        if memory == "sdram":
            members["sdram"] = Out(SdramBus(self._geom))
            members["init_done"] = Out(1)
        super().__init__(members)

    def elaborate(self, platform):
        m = Module()
        acc = m.submodules.accel = Accelerator(self._cfg, self._units)
        if self._uart:
            br = m.submodules.bridge = UartBridge(self._div, timeout_bytes=64)
            m.d.comb += [br.rx.eq(self.rx), self.tx.eq(br.tx)]
        else:
            br = m.submodules.bridge = Bridge(self._bto)
            wiring.connect(m, wiring.flipped(self.i), br.i)
            wiring.connect(m, br.o, wiring.flipped(self.o))
            m.d.comb += self.bridge_busy.eq(br.busy)
        wiring.connect(m, br.axil, acc.s_axil)
        rarb = m.submodules.rarb = AxiReadArbiter()
        warb = m.submodules.warb = AxiWriteArbiter()
        wiring.connect(m, acc.m_axi_r, rarb.m0)
        wiring.connect(m, br.axi_r, rarb.m1)
        wiring.connect(m, acc.m_axi_w, warb.m0)
        wiring.connect(m, br.axi_w, warb.m1)
        if self._memory == "sdram":
            mem = m.submodules.sdram = SdramController(self._timing, self._geom)
            wiring.connect(m, wiring.flipped(self.sdram), mem.sdram)
            m.d.comb += self.init_done.eq(mem.init_done)
        else:
            mem = m.submodules.spram = SpramMemory()
        wiring.connect(m, rarb.s, mem.axi_r)
        wiring.connect(m, warb.s, mem.axi_w)
        m.d.comb += self.irq.eq(acc.irq)
        return m
