"""The board-independent part of a board top: UART bridge + accelerator + memory.

::

    rx/tx -> UartBridge --axil--> AxiLiteSlice ---------> Accelerator.s_axil
                        --axi_r--\\                 /-- Accelerator.m_axi_r
                        --axi_w--> AxiArbiter x2 <---- Accelerator.m_axi_w
                                       |
                                 AxiSlice x2  (a register on every channel)
                                       |
                         SdramController (ULX3S) | SpramMemory (iCEBreaker)

:class:`AxiReadArbiter` / :class:`AxiWriteArbiter` grant the memory to one master per burst
(the accelerator first, the bridge when the accelerator is not asking). The host only touches
memory while the accelerator is idle, so the bridge never waits long. :class:`AxiReadSlice` /
:class:`AxiWriteSlice` put a register on each channel between the arbiters and the memory
controller, so that no path runs from an accelerator unit through the arbiter into the SDRAM
controller's command registers and pins (the slowest paths of the placed ULX3S design before
they were added).
"""

from __future__ import annotations

from amaranth import Cat, ClockSignal, Instance, Module, Mux, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from vitamin.config import get_config
from vitamin.hw.accel import Accelerator, AxiLite
from vitamin.hw.bridge import Bridge, UartBridge
from vitamin.hw.ports import AxiRead, AxiWrite
from vitamin.hw.sdram import SdramBus, SdramController, SdramGeometry, SdramTiming

__all__ = ["AxiReadArbiter", "AxiWriteArbiter", "AxiReadSlice", "AxiWriteSlice", "AxiLiteSlice",
           "SpramMemory", "BoardCore"]


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
            # the burst's owner from registers only (``pick`` also depends on m0's arvalid)
            with m.If(busy & (sel == k)):
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
            # W and B from registers only: through ``pick``, m0's awvalid reached the write
            # beat's ready, and the STORE unit's burst FIFO behind it (routed model, 2da45db)
            with m.If(busy & (sel == k)):
                _fwd(m, mm, s, _W)
                m.d.comb += [s.wvalid.eq(mm.wvalid), mm.wready.eq(s.wready),
                             mm.bvalid.eq(s.bvalid), s.bready.eq(mm.bready)]
            m.d.comb += [mm.bresp.eq(s.bresp), mm.bid.eq(s.bid)]
        with m.If(s.awvalid & s.awready):
            m.d.sync += [busy.eq(1), sel.eq(pick)]
        with m.If(s.bvalid & s.bready):
            m.d.sync += busy.eq(0)
        return m


def _skid(m, name, src_valid, src_ready, src_data, dst_valid, dst_ready, dst_data):
    """One registered stage of a valid/ready channel, at full throughput.

    ``dst_valid``/``dst_data`` come from the output register and ``src_ready`` from a register
    (the skid entry is empty), so neither side's combinational logic reaches the other. A beat
    accepted while the output is stalled waits in the skid entry. One cycle of latency.
    """
    width = len(src_data)
    out_v = Signal(name=f"{name}_v")
    out_d = Signal(width, name=f"{name}_d")
    skid_v = Signal(name=f"{name}_skid_v")
    skid_d = Signal(width, name=f"{name}_skid_d")
    m.d.comb += [src_ready.eq(~skid_v), dst_valid.eq(out_v), dst_data.eq(out_d)]
    with m.If(~out_v | dst_ready):
        with m.If(skid_v):
            m.d.sync += [out_v.eq(1), out_d.eq(skid_d), skid_v.eq(0)]
        with m.Else():
            m.d.sync += [out_v.eq(src_valid), out_d.eq(src_data)]
    with m.Elif(src_valid & ~skid_v):
        m.d.sync += [skid_v.eq(1), skid_d.eq(src_data)]


class _Slice(wiring.Component):
    """A register stage (:func:`_skid`) on every channel of an AXI port, ``m`` from the master,
    ``s`` to the slave. ``CHANNELS``: (name, forward, payload fields); forward channels go from
    ``m`` to ``s``, the others back."""

    CHANNELS = ()

    def __init__(self, sig):
        super().__init__({"m": In(sig), "s": Out(sig)})

    def elaborate(self, platform):
        m = Module()
        for ch, forward, fields in self.CHANNELS:
            src, dst = (self.m, self.s) if forward else (self.s, self.m)
            _skid(m, ch, getattr(src, f"{ch}valid"), getattr(src, f"{ch}ready"),
                  Cat(getattr(src, n) for n in fields), getattr(dst, f"{ch}valid"),
                  getattr(dst, f"{ch}ready"), Cat(getattr(dst, n) for n in fields))
        return m


class AxiReadSlice(_Slice):
    """A register stage on both channels of an AXI4 read port: AR forward, R back, each one beat
    per cycle with one cycle of latency."""

    CHANNELS = (("ar", True, _AR + ("arid",)), ("r", False, ("rdata", "rresp", "rlast", "rid")))

    def __init__(self, data_bits=32, addr_bits=32):
        super().__init__(AxiRead(data_bits, addr_bits))


class AxiWriteSlice(_Slice):
    """A register stage on the three channels of an AXI4 write port: AW and W forward, B back."""

    CHANNELS = (("aw", True, _AW + ("awid",)), ("w", True, _W), ("b", False, ("bresp", "bid")))

    def __init__(self, data_bits=32, addr_bits=32):
        super().__init__(AxiWrite(data_bits, addr_bits))


class AxiLiteSlice(_Slice):
    """A register stage on the five channels of the accelerator's AXI4-Lite port (between the
    bridge and ``Accelerator.s_axil``): the host's register writes (CTRL.CLEAR, START) reached
    the memories' clear addresses through the bridge's state machine in one cycle."""

    CHANNELS = (("aw", True, ("awaddr", "awprot")), ("w", True, ("wdata", "wstrb")),
                ("b", False, ("bresp",)), ("ar", True, ("araddr", "arprot")),
                ("r", False, ("rdata", "rresp")))

    def __init__(self, addr_bits=12):
        super().__init__(AxiLite(addr_bits))


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
        lsl = m.submodules.lslice = AxiLiteSlice()
        wiring.connect(m, br.axil, lsl.m)
        wiring.connect(m, lsl.s, acc.s_axil)
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
        rsl = m.submodules.rslice = AxiReadSlice()
        wsl = m.submodules.wslice = AxiWriteSlice()
        wiring.connect(m, rarb.s, rsl.m)
        wiring.connect(m, warb.s, wsl.m)
        wiring.connect(m, rsl.s, mem.axi_r)
        wiring.connect(m, wsl.s, mem.axi_w)
        m.d.comb += self.irq.eq(acc.irq)
        return m
