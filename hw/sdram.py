"""SDR SDRAM controller behind an AXI4 slave (32-bit data, 16-bit SDRAM, e.g. the ULX3S's 32 MB).

One AXI burst at a time. A burst opens its row (ACTIVE), then issues one READ or WRITE of burst
length 2 (two 16-bit words = one 32-bit beat) every two cycles while the beats stay in that row;
the last command of a row carries auto-precharge (A10). A burst that crosses a row boundary
continues with the next row. Between bursts the controller runs AUTO REFRESH when one is due
(every ``refresh`` cycles), so refreshes never interrupt a burst: a burst postpones them and the
controller catches up afterwards (JEDEC allows 8 postponed refreshes; a 256-beat burst takes
about 520 cycles, under one interval at 25 MHz). A master that holds a write burst without data
for more than 8 intervals would starve refresh; the accelerator's DMA streams its bursts.

Address map (byte address ``A``; half-word address ``h = A >> 1``): column = ``h[0:col_bits]``,
bank = the next 2 bits, row = the next ``row_bits``; addresses wrap at the capacity.

Read data pass through a small FIFO; a READ is issued only when the FIFO has room for it and
every READ in flight, so ``rready`` back-pressure never loses data. ``wstrb`` becomes DQM.

Timing (datasheet figures of an IS42S16160-class part, rounded up to cycles of ``clk_hz``):
tRP, tRCD 20 ns, tRC 66 ns, tRFC 66 ns, tWR 2 cycles, tMRD 2 cycles, 8192 refreshes per 64 ms,
200 us of power-up wait (``init_cycles`` overrides it for simulation).

Initialisation: CKE high, wait, PRECHARGE ALL, two AUTO REFRESH, LOAD MODE REGISTER (burst
length 2, sequential, CAS latency ``cas_latency``, burst writes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from amaranth import Cat, Const, Module, Signal
from amaranth.lib import fifo, wiring
from amaranth.lib.wiring import In, Out

from .ports import AxiRead, AxiWrite

__all__ = ["SdramGeometry", "SdramTiming", "SdramBus", "SdramController", "ULX3S_SDRAM",
           "CMD_NOP", "CMD_ACTIVE", "CMD_READ", "CMD_WRITE", "CMD_PRECHARGE", "CMD_REFRESH",
           "CMD_MODE"]

# (ras, cas, we) of each command, active high (the pins are active low)
CMD_NOP = (0, 0, 0)
CMD_ACTIVE = (1, 0, 0)
CMD_READ = (0, 1, 0)
CMD_WRITE = (0, 1, 1)
CMD_PRECHARGE = (1, 0, 1)
CMD_REFRESH = (1, 1, 0)
CMD_MODE = (1, 1, 1)


@dataclass(frozen=True)
class SdramGeometry:
    """Row and column address bits of a x16 SDR SDRAM with 4 banks."""
    row_bits: int = 13
    col_bits: int = 9

    def __post_init__(self):
        if not 1 <= self.row_bits <= 13 or not 2 <= self.col_bits <= 10:
            raise ValueError(f"row_bits must be 1..13 and col_bits 2..10, not "
                             f"{self.row_bits!r}, {self.col_bits!r}")

    @property
    def bytes(self) -> int:
        return 2 << (self.col_bits + 2 + self.row_bits)

    @property
    def addr_pins(self) -> int:
        return max(self.row_bits, 11)


#: The ULX3S's 32 MB part: 4 banks x 8192 rows x 512 columns x 16 bits.
ULX3S_SDRAM = SdramGeometry(13, 9)


@dataclass(frozen=True)
class SdramTiming:
    """Timing in clock cycles (see :meth:`from_clock`)."""
    t_rp: int
    t_rcd: int
    t_rc: int
    t_rfc: int
    t_wr: int
    t_mrd: int
    refresh: int
    init: int
    cas_latency: int

    @classmethod
    def from_clock(cls, clk_hz: float, cas_latency: int = 2, init_cycles: int | None = None):
        if cas_latency not in (2, 3):
            raise ValueError(f"cas_latency must be 2 or 3, not {cas_latency!r}")
        if not 1e6 <= clk_hz <= 143e6:
            raise ValueError(f"clk_hz must be 1..143 MHz for this controller, not {clk_hz!r}")

        def ns(t):
            return max(1, math.ceil(t * clk_hz / 1e9))
        return cls(t_rp=ns(20), t_rcd=ns(20), t_rc=ns(66), t_rfc=ns(66), t_wr=2, t_mrd=2,
                   refresh=int(64e-3 / 8192 * clk_hz) - 16,
                   init=ns(200_000) if init_cycles is None else init_cycles,
                   cas_latency=cas_latency)


class SdramBus(wiring.Signature):
    """Controller -> SDRAM pins (commands active high; the board inverts the ``_n`` pins).
    ``dq_o``/``dq_oe`` drive the data pins, ``dq_i`` is what they read."""

    def __init__(self, geometry: SdramGeometry = ULX3S_SDRAM):
        super().__init__({
            "cke": Out(1), "cs": Out(1), "ras": Out(1), "cas": Out(1), "we": Out(1),
            "ba": Out(2), "a": Out(geometry.addr_pins), "dqm": Out(2),
            "dq_o": Out(16), "dq_oe": Out(1), "dq_i": In(16),
        })


class SdramController(wiring.Component):
    """AXI4 slave (``axi_r``, ``axi_w``: 32-bit, INCR bursts) -> SDR SDRAM.

    Parameters
    ----------
    timing : SdramTiming
    geometry : SdramGeometry
    io_latency : int
        Extra cycles between a READ and its data at ``dq_i`` beyond the CAS latency: 1 for the
        controller's input register (always), plus the board's IO registers (0 in simulation).

    Ports
    -----
    axi_r : In(AxiRead(32)), axi_w : In(AxiWrite(32))
    sdram : Out(SdramBus(geometry))
    init_done : Out(1)
    refreshes : Out(32)
        AUTO REFRESH commands issued (for tests and the board's status).
    """

    def __init__(self, timing: SdramTiming, geometry: SdramGeometry = ULX3S_SDRAM, *,
                 io_latency: int = 0, addr_bits: int = 32):
        if not isinstance(timing, SdramTiming):
            raise ValueError(f"timing must be an SdramTiming, not {timing!r}")
        if io_latency not in (0, 1, 2):
            raise ValueError(f"io_latency must be 0, 1 or 2, not {io_latency!r}")
        self._t = timing
        self._g = geometry
        self._io = io_latency
        super().__init__({
            "axi_r": In(AxiRead(32, addr_bits)), "axi_w": In(AxiWrite(32, addr_bits)),
            "sdram": Out(SdramBus(geometry)), "init_done": Out(1), "refreshes": Out(32),
        })

    @property
    def read_latency(self) -> int:
        """Cycles from the FSM issuing a READ to its first word in the input register."""
        return self._t.cas_latency + 2 + self._io

    def elaborate(self, platform):
        t, g = self._t, self._g
        m = Module()
        ar, aw, pins = self.axi_r, self.axi_w, self.sdram
        cb, rb = g.col_bits, g.row_bits

        # ---- command registers (registered outputs) -----------------------------------------
        cmd = Signal(3)          # ras, cas, we
        ba = Signal(2)
        a = Signal(g.addr_pins)
        dq_o = Signal(16)
        dq_oe = Signal()
        dqm = Signal(2)
        m.d.sync += [cmd.eq(Cat(*reversed(CMD_NOP))), dq_oe.eq(0), dqm.eq(0)]
        m.d.comb += [pins.cke.eq(1), pins.cs.eq(1), pins.ras.eq(cmd[2]), pins.cas.eq(cmd[1]),
                     pins.we.eq(cmd[0]), pins.ba.eq(ba), pins.a.eq(a), pins.dq_o.eq(dq_o),
                     pins.dq_oe.eq(dq_oe), pins.dqm.eq(dqm)]

        def issue(c, bank=None, addr=None):
            ras, cas, we = c
            m.d.sync += cmd.eq(Cat(Const(we, 1), Const(cas, 1), Const(ras, 1)))
            if bank is not None:
                m.d.sync += ba.eq(bank)
            if addr is not None:
                m.d.sync += a.eq(addr)

        # ---- read data path: input register, latency line, FIFO -----------------------------
        dq_r = Signal(16)
        m.d.sync += dq_r.eq(pins.dq_i)
        lat = self.read_latency
        rd_line = Signal(lat + 2)           # bit k: a READ issued k cycles ago
        rd_issue = Signal()
        m.d.sync += rd_line.eq(Cat(rd_issue, rd_line[:-1]))
        lo = Signal(16)
        rfifo = m.submodules.rfifo = fifo.SyncFIFOBuffered(width=34, depth=8)
        last_line = Signal(lat + 2)         # the matching READ was the burst's last beat
        rd_last = Signal()
        m.d.sync += last_line.eq(Cat(rd_last, last_line[:-1]))
        with m.If(rd_line[lat - 1]):
            m.d.sync += lo.eq(dq_r)
        m.d.comb += [rfifo.w_en.eq(rd_line[lat]),
                     rfifo.w_data.eq(Cat(lo, dq_r, Const(0, 1), last_line[lat]))]
        m.d.comb += [ar.rvalid.eq(rfifo.r_rdy), ar.rdata.eq(rfifo.r_data[:32]),
                     ar.rlast.eq(rfifo.r_data[33]), ar.rresp.eq(0), rfifo.r_en.eq(ar.rready)]
        inflight = Signal(range(16))
        m.d.sync += inflight.eq(inflight + rd_issue - rfifo.w_en)
        room = (rfifo.level + inflight) < 6

        # ---- burst state ---------------------------------------------------------------------
        haddr = Signal(cb + 2 + rb)         # half-word address of the current beat
        left = Signal(9)                    # beats left
        is_read = Signal()
        rid = Signal(len(ar.rid))
        bid = Signal(len(aw.bid))
        col, bank, row = haddr[:cb], haddr[cb:cb + 2], haddr[cb + 2:]
        last_in_row = (col == (1 << cb) - 2) | (left == 1)
        m.d.comb += ar.rid.eq(rid)

        wait = Signal(range(max(t.init, t.refresh, 64) + 1))
        refresh_cnt = Signal(range(t.refresh + 1), init=t.refresh)
        # refreshes owed: a long burst postpones them (JEDEC allows up to 8), IDLE catches up
        owed = Signal(4)
        tick = refresh_cnt == 0
        refresh_now = Signal()
        with m.If(tick):
            m.d.sync += refresh_cnt.eq(t.refresh)
        with m.Elif(self.init_done):
            m.d.sync += refresh_cnt.eq(refresh_cnt - 1)
        m.d.sync += owed.eq(owed + tick - refresh_now)
        prefer_write = Signal()
        second = Signal()                   # second half-word of a write beat
        wdata_hi = Signal(16)
        wstrb_hi = Signal(2)
        init_step = Signal(3)
        b_pending = Signal()
        m.d.comb += [aw.bresp.eq(0), aw.bid.eq(bid), aw.bvalid.eq(b_pending)]
        with m.If(aw.bvalid & aw.bready):
            m.d.sync += b_pending.eq(0)

        # precharge-to-activate gap after an auto-precharged command
        gap_read = max(t.t_rp + 2, t.t_rc - t.t_rcd)
        gap_write = max(2 + t.t_wr + t.t_rp, t.t_rc - t.t_rcd)

        with m.FSM():
            with m.State("POWERUP"):
                m.d.sync += wait.eq(t.init)
                m.next = "INIT_WAIT"
            with m.State("INIT_WAIT"):
                with m.If(wait == 0):
                    with m.Switch(init_step):
                        with m.Case(0):
                            issue(CMD_PRECHARGE, addr=1 << 10)      # all banks
                            m.d.sync += wait.eq(t.t_rp)
                        with m.Case(1, 2):
                            issue(CMD_REFRESH)
                            m.d.sync += wait.eq(t.t_rfc)
                        with m.Case(3):
                            # burst length 2, sequential, CAS latency, burst writes
                            issue(CMD_MODE, bank=0, addr=(t.cas_latency << 4) | 0b001)
                            m.d.sync += wait.eq(t.t_mrd)
                        with m.Default():
                            m.d.sync += self.init_done.eq(1)
                            m.next = "IDLE"
                    m.d.sync += init_step.eq(init_step + 1)
                with m.Else():
                    m.d.sync += wait.eq(wait - 1)
            with m.State("IDLE"):
                with m.If(wait != 0):
                    m.d.sync += wait.eq(wait - 1)
                with m.Elif(owed != 0):
                    issue(CMD_REFRESH)
                    m.d.comb += refresh_now.eq(1)
                    m.d.sync += [wait.eq(t.t_rfc - 1), self.refreshes.eq(self.refreshes + 1)]
                with m.Elif(ar.arvalid & (~aw.awvalid | ~prefer_write) & ~b_pending):
                    m.d.comb += ar.arready.eq(1)
                    m.d.sync += [haddr.eq(ar.araddr >> 1), left.eq(ar.arlen + 1),
                                 is_read.eq(1), rid.eq(ar.arid), prefer_write.eq(1)]
                    m.next = "ACTIVATE"
                with m.Elif(aw.awvalid & ~b_pending):
                    m.d.comb += aw.awready.eq(1)
                    m.d.sync += [haddr.eq(aw.awaddr >> 1), left.eq(aw.awlen + 1),
                                 is_read.eq(0), bid.eq(aw.awid), prefer_write.eq(0)]
                    m.next = "ACTIVATE"
            with m.State("ACTIVATE"):
                issue(CMD_ACTIVE, bank=bank, addr=row)
                m.d.sync += wait.eq(t.t_rcd - 1)
                m.next = "RCD"
            with m.State("RCD"):
                with m.If(wait != 0):
                    m.d.sync += wait.eq(wait - 1)
                with m.Else():
                    m.next = "ACCESS"
            with m.State("ACCESS"):
                col_addr = Cat(col, Const(0, 10 - cb), last_in_row)     # A10: auto-precharge
                with m.If(is_read):
                    with m.If(room):
                        issue(CMD_READ, bank=bank, addr=col_addr)
                        m.d.comb += [rd_issue.eq(1), rd_last.eq(left == 1)]
                        m.d.sync += [haddr.eq(haddr + 2), left.eq(left - 1)]
                        with m.If(last_in_row):
                            m.d.sync += wait.eq(gap_read)
                            m.next = "CLOSE"
                        with m.Else():
                            m.next = "GAP"
                with m.Else():
                    m.d.comb += aw.wready.eq(1)
                    with m.If(aw.wvalid):
                        issue(CMD_WRITE, bank=bank, addr=col_addr)
                        m.d.sync += [dq_o.eq(aw.wdata[:16]), dq_oe.eq(1),
                                     dqm.eq(~aw.wstrb[:2]), wdata_hi.eq(aw.wdata[16:]),
                                     wstrb_hi.eq(~aw.wstrb[2:]),
                                     haddr.eq(haddr + 2), left.eq(left - 1)]
                        with m.If(last_in_row):
                            m.d.sync += wait.eq(gap_write)
                            m.next = "CLOSE"
                        with m.Else():
                            m.next = "GAP"
            with m.State("GAP"):            # second half-word of the burst of 2
                with m.If(~is_read):
                    m.d.sync += [dq_o.eq(wdata_hi), dq_oe.eq(1), dqm.eq(wstrb_hi)]
                m.next = "ACCESS"
            with m.State("CLOSE"):
                with m.If(~is_read & ~second):
                    m.d.sync += [dq_o.eq(wdata_hi), dq_oe.eq(1), dqm.eq(wstrb_hi),
                                 second.eq(1)]
                with m.If(wait != 0):
                    m.d.sync += wait.eq(wait - 1)
                with m.Else():
                    m.d.sync += second.eq(0)
                    with m.If(left == 0):
                        with m.If(~is_read):
                            m.d.sync += b_pending.eq(1)
                        m.next = "IDLE"
                    with m.Else():
                        m.next = "ACTIVATE"      # the burst continues in the next row
        return m
