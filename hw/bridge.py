"""UART bridge: the host reads and writes the accelerator's memory and registers over a serial line.

The protocol (framing, commands, statuses, CRC-16/CCITT-FALSE) is defined once, in
:mod:`vitamin.runtime` (its module docstring); this module is its device side:

* :class:`UartRx`, :class:`UartTx`: 8N1 at ``clk / divisor`` baud, byte streams;
* :class:`Bridge`: the frame parser and executor between two byte streams, an AXI4-Lite master
  (the accelerator's host registers) and an AXI4 master (memory, single 32-bit beats);
* :class:`UartBridge`: both together, with ``rx``/``tx`` pins.

A request is executed only after its CRC has been checked (write payloads wait in a buffer of
:data:`~vitamin.runtime.MAX_WORDS` words), so a corrupted frame changes nothing and is answered
``BAD_CRC``. A frame whose bytes stop arriving for ``timeout_cycles`` is answered ``TIMEOUT``.
Read data is gathered in the same buffer before the response starts, so the status byte tells
whether a bus error occurred. Bytes that arrive while a request executes or its response is sent
are dropped; after a NAK the host waits for the line to go idle before it retries. The bridge
handles one request at a time; the host waits for each response.
"""

from __future__ import annotations

from amaranth import Cat, Const, Module, Mux, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from vitamin.runtime import BRIDGE_ID, MAX_WORDS, SYNC_REQ, SYNC_RSP, Cmd, Status

from .accel import AxiLite
from .ports import AxiRead, AxiWrite

__all__ = ["UartRx", "UartTx", "Bridge", "UartBridge", "crc16_step"]


def crc16_step(crc, byte):
    """CRC-16/CCITT-FALSE of one more byte, as an Amaranth expression (8 unrolled steps)."""
    c = crc ^ Cat(Const(0, 8), byte)
    for _ in range(8):
        c = Mux(c[15], (c << 1)[:16] ^ 0x1021, (c << 1)[:16])
    return c[:16]


def _check_divisor(divisor):
    if not isinstance(divisor, int) or divisor < 4:
        raise ValueError(f"divisor (clock cycles per bit) must be an integer >= 4, not "
                         f"{divisor!r}")


class UartRx(wiring.Component):
    """8N1 receiver.

    Ports
    -----
    rx : In(1)
        The line (idle high); synchronised here.
    o : Out(stream.Signature(8))
        Received bytes. No backpressure: a byte not taken before the next one arrives is lost
        (``overrun`` pulses).
    frame_error : Out(1)
        Pulses when a stop bit is low (the byte is dropped).
    overrun : Out(1)
    """

    def __init__(self, divisor: int):
        _check_divisor(divisor)
        self._div = divisor
        super().__init__({"rx": In(1, init=1), "o": Out(stream.Signature(8)),
                          "frame_error": Out(1), "overrun": Out(1)})

    def elaborate(self, platform):
        m = Module()
        s1, s2 = Signal(init=1), Signal(init=1)
        m.d.sync += [s1.eq(self.rx), s2.eq(s1)]
        cnt = Signal(range(self._div * 2))
        bit = Signal(range(10))
        sr = Signal(8)
        with m.If(self.o.ready):
            m.d.sync += self.o.valid.eq(0)
        m.d.sync += [self.frame_error.eq(0), self.overrun.eq(0)]
        with m.FSM():
            with m.State("IDLE"):
                with m.If(~s2):
                    m.d.sync += cnt.eq(self._div // 2)
                    m.next = "START"
            with m.State("START"):
                with m.If(cnt == 0):
                    with m.If(s2):          # a glitch, not a start bit
                        m.next = "IDLE"
                    with m.Else():
                        m.d.sync += [cnt.eq(self._div - 1), bit.eq(0)]
                        m.next = "DATA"
                with m.Else():
                    m.d.sync += cnt.eq(cnt - 1)
            with m.State("DATA"):
                with m.If(cnt == 0):
                    m.d.sync += [sr.eq(Cat(sr[1:], s2)), bit.eq(bit + 1),
                                 cnt.eq(self._div - 1)]
                    with m.If(bit == 7):
                        m.next = "STOP"
                with m.Else():
                    m.d.sync += cnt.eq(cnt - 1)
            with m.State("STOP"):
                with m.If(cnt == 0):
                    with m.If(s2):
                        m.d.sync += [self.o.payload.eq(sr), self.o.valid.eq(1)]
                        with m.If(self.o.valid & ~self.o.ready):
                            m.d.sync += self.overrun.eq(1)
                    with m.Else():
                        m.d.sync += self.frame_error.eq(1)
                    m.next = "IDLE"
                with m.Else():
                    m.d.sync += cnt.eq(cnt - 1)
        return m


class UartTx(wiring.Component):
    """8N1 transmitter.

    Ports
    -----
    i : In(stream.Signature(8))
    tx : Out(1)
        The line (idle high).
    """

    def __init__(self, divisor: int):
        _check_divisor(divisor)
        self._div = divisor
        super().__init__({"i": In(stream.Signature(8)), "tx": Out(1, init=1)})

    def elaborate(self, platform):
        m = Module()
        cnt = Signal(range(self._div))
        sr = Signal(10, init=0x3FF)
        left = Signal(range(11))
        m.d.comb += [self.tx.eq(sr[0]), self.i.ready.eq(left == 0)]
        with m.If(self.i.valid & self.i.ready):
            m.d.sync += [sr.eq(Cat(Const(0, 1), self.i.payload, Const(1, 1))), left.eq(10),
                         cnt.eq(self._div - 1)]
        with m.Elif(left != 0):
            with m.If(cnt == 0):
                m.d.sync += [sr.eq(Cat(sr[1:], Const(1, 1))), left.eq(left - 1),
                             cnt.eq(self._div - 1)]
            with m.Else():
                m.d.sync += cnt.eq(cnt - 1)
        return m


class Bridge(wiring.Component):
    """The bridge protocol between byte streams and the AXI masters.

    Parameters
    ----------
    timeout_cycles : int
        Cycles without a byte after which a partial request is answered ``TIMEOUT``.
    reg_addr_bits : int
        Address width of the AXI4-Lite master (the accelerator's is 12).

    Ports
    -----
    i : In(stream.Signature(8))
        Request bytes.
    o : Out(stream.Signature(8))
        Response bytes.
    axil : Out(AxiLite(reg_addr_bits))
        Register accesses (READ_REG, WRITE_REG).
    axi_r, axi_w : Out(AxiRead(32)), Out(AxiWrite(32))
        Memory accesses (READ_MEM, WRITE_MEM), one 32-bit beat per transaction.
    busy : Out(1)
        High from the first byte of a request to the last byte of its response.
    """

    def __init__(self, timeout_cycles: int = 1 << 20, reg_addr_bits: int = 12):
        if not isinstance(timeout_cycles, int) or timeout_cycles < 16:
            raise ValueError(f"timeout_cycles must be an integer >= 16, not {timeout_cycles!r}")
        self._timeout = timeout_cycles
        self._ab = reg_addr_bits
        super().__init__({
            "i": In(stream.Signature(8)), "o": Out(stream.Signature(8)),
            "axil": Out(AxiLite(reg_addr_bits)), "axi_r": Out(AxiRead(32)),
            "axi_w": Out(AxiWrite(32)), "busy": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        buf = m.submodules.buf = Memory(shape=32, depth=MAX_WORDS, init=[])
        rd = buf.read_port(domain="sync")
        wr = buf.write_port()

        cmd = Signal(8)
        addr = Signal(32)
        count = Signal(8)
        crc = Signal(16, init=0xFFFF)
        rx_crc = Signal(16)
        nbytes = Signal(range(4 * 256 + 1))     # payload bytes received / to receive
        idx = Signal(range(4 * 256 + 1))
        hdr = Signal(range(7))
        word = Signal(32)
        status = Signal(8)
        widx = Signal(range(MAX_WORDS + 1))      # word index of bus transfers / response
        bcnt = Signal(2)
        idle = Signal(range(self._timeout + 1))
        aw_done, w_done = Signal(), Signal()
        # "cmd is a write", registered with cmd (decoded from it, in front of the header's
        # last byte it was the bridge's 12.5 ns path into hdr, pre-route estimate)
        is_write = Signal()
        # "cmd is a register access" (READ_REG or WRITE_REG), likewise: decoded from cmd in
        # front of the AXI4-Lite / AXI4 channel selection and their ready, it was 11.2 ns into
        # the state register, pre-route estimate
        is_reg = Signal()
        has_data = Signal()                      # the response carries count words
        # idx + 1 == nbytes (the payload's last byte), a register set with idx (the compare
        # in front of the state register was 13.3 ns into the state, pre-route estimate)
        pay_last = Signal()

        i, o = self.i, self.o
        byte_in = i.valid & i.ready
        m.d.comb += rd.addr.eq(widx)
        # Always ready, like the UART it sits behind: bytes that arrive while a request is
        # executed or answered are dropped (the host sends nothing then, unless it is noise).
        m.d.comb += i.ready.eq(1)

        # inter-byte timeout while a request is being received
        receiving = Signal()
        with m.If(~receiving | byte_in):
            m.d.sync += idle.eq(0)
        with m.Elif(idle != self._timeout):
            m.d.sync += idle.eq(idle + 1)
        timed_out = receiving & (idle == self._timeout)

        axil, ar, aw = self.axil, self.axi_r, self.axi_w
        m.d.comb += [ar.arlen.eq(0), ar.arsize.eq(2), ar.arburst.eq(1), ar.arid.eq(0),
                     aw.awlen.eq(0), aw.awsize.eq(2), aw.awburst.eq(1), aw.awid.eq(0),
                     aw.wstrb.eq(0xF), aw.wlast.eq(1), axil.wstrb.eq(0xF)]
        bus_addr = addr + (widx << 2)

        def respond(st, data):
            m.d.sync += [status.eq(st), has_data.eq(data), crc.eq(0xFFFF)]
            m.next = "TX_SYNC"

        with m.FSM():
            with m.State("IDLE"):
                with m.If(byte_in & (i.payload == SYNC_REQ)):
                    m.d.sync += [crc.eq(0xFFFF), hdr.eq(0)]
                    m.next = "HEADER"
            with m.State("HEADER"):
                m.d.comb += [receiving.eq(1), self.busy.eq(1)]
                with m.If(byte_in):
                    m.d.sync += [crc.eq(crc16_step(crc, i.payload)), hdr.eq(hdr + 1)]
                    with m.Switch(hdr):
                        with m.Case(0):
                            m.d.sync += [cmd.eq(i.payload),
                                         is_write.eq((i.payload == Cmd.WRITE_REG) |
                                                     (i.payload == Cmd.WRITE_MEM)),
                                         is_reg.eq((i.payload == Cmd.READ_REG) |
                                                   (i.payload == Cmd.WRITE_REG))]
                        for k in range(4):
                            with m.Case(1 + k):
                                m.d.sync += addr.word_select(k, 8).eq(i.payload)
                        with m.Case(5):
                            # (nbytes is a multiple of 4: byte 0 is never the last)
                            m.d.sync += [count.eq(i.payload), idx.eq(0), pay_last.eq(0),
                                         nbytes.eq(Mux(is_write, i.payload << 2, 0))]
                            with m.If(is_write & (i.payload != 0)):
                                m.next = "PAYLOAD"
                            with m.Else():
                                m.next = "CRC0"
                with m.If(timed_out):
                    respond(Status.TIMEOUT, 0)
            with m.State("PAYLOAD"):
                m.d.comb += [receiving.eq(1), self.busy.eq(1)]
                with m.If(byte_in):
                    m.d.sync += [crc.eq(crc16_step(crc, i.payload)), idx.eq(idx + 1),
                                 pay_last.eq(idx + 2 == nbytes),
                                 word.eq(Cat(word[8:], i.payload))]
                    # the buffer keeps the first MAX_WORDS words; a longer frame is BAD_LEN
                    m.d.comb += [wr.addr.eq(idx >> 2), wr.data.eq(Cat(word[8:], i.payload)),
                                 wr.en.eq((idx[:2] == 3) & (idx < 4 * MAX_WORDS))]
                    with m.If(pay_last):
                        m.next = "CRC0"
                with m.If(timed_out):
                    respond(Status.TIMEOUT, 0)
            with m.State("CRC0"):
                m.d.comb += [receiving.eq(1), self.busy.eq(1)]
                with m.If(byte_in):
                    m.d.sync += rx_crc[:8].eq(i.payload)
                    m.next = "CRC1"
                with m.If(timed_out):
                    respond(Status.TIMEOUT, 0)
            with m.State("CRC1"):
                m.d.comb += [receiving.eq(1), self.busy.eq(1)]
                with m.If(byte_in):
                    m.d.sync += rx_crc[8:].eq(i.payload)
                    m.next = "CHECK0"
                with m.If(timed_out):
                    respond(Status.TIMEOUT, 0)
            # The request's checks are registered in CHECK0 and acted on in CHECK (one cycle
            # per request; the register-space bound's adder and the priority of the checks in
            # front of the CRC and status registers were the bridge's 13.0 ns path, pre-route
            # estimate of 0fb80e8).
            bad_crc, bad_cmd, bad_len, bad_align, bad_reg = (Signal(name=n) for n in (
                "bad_crc", "bad_cmd", "bad_len", "bad_align", "bad_reg"))
            with m.State("CHECK0"):
                m.d.comb += self.busy.eq(1)
                known = (cmd == Cmd.PING) | (cmd == Cmd.READ_REG) | (cmd == Cmd.WRITE_REG) | \
                    (cmd == Cmd.READ_MEM) | (cmd == Cmd.WRITE_MEM)
                m.d.sync += [
                    bad_crc.eq(rx_crc != crc),
                    bad_cmd.eq(~known),
                    bad_len.eq((count == 0) | (count > MAX_WORDS) |
                               ((cmd == Cmd.PING) & (count != 1))),
                    bad_align.eq(addr[:2] != 0),
                    bad_reg.eq(is_reg &
                               ((addr >> self._ab != 0) |
                                (addr[:self._ab] + (count << 2) > (1 << self._ab)))),
                ]
                m.next = "CHECK"
            with m.State("CHECK"):
                m.d.comb += self.busy.eq(1)
                m.d.sync += widx.eq(0)
                with m.If(bad_crc):
                    respond(Status.BAD_CRC, 0)
                with m.Elif(bad_cmd):
                    respond(Status.BAD_CMD, 0)
                with m.Elif(bad_len):
                    respond(Status.BAD_LEN, 0)
                with m.Elif(bad_align):
                    respond(Status.BAD_ALIGN, 0)
                with m.Elif(bad_reg):
                    respond(Status.BUS_ERROR, 0)     # outside the register space: no access
                with m.Elif(cmd == Cmd.PING):
                    m.d.comb += [wr.addr.eq(0), wr.data.eq(BRIDGE_ID), wr.en.eq(1)]
                    respond(Status.OK, 1)
                with m.Elif(is_write):
                    m.next = "W_FETCH"
                with m.Else():
                    m.next = "R_ADDR"
            # ---- reads: count words into the buffer ----------------------------------------
            with m.State("R_ADDR"):
                m.d.comb += self.busy.eq(1)
                with m.If(is_reg):          # READ_REG (a read state)
                    m.d.comb += [axil.arvalid.eq(1), axil.araddr.eq(bus_addr)]
                    with m.If(axil.arready):
                        m.next = "R_DATA"
                with m.Else():
                    m.d.comb += [ar.arvalid.eq(1), ar.araddr.eq(bus_addr)]
                    with m.If(ar.arready):
                        m.next = "R_DATA"
            with m.State("R_DATA"):
                m.d.comb += self.busy.eq(1)
                got, data, resp = Signal(), Signal(32), Signal(2)
                with m.If(is_reg):          # READ_REG (a read state)
                    m.d.comb += [axil.rready.eq(1), got.eq(axil.rvalid), data.eq(axil.rdata),
                                 resp.eq(axil.rresp)]
                with m.Else():
                    m.d.comb += [ar.rready.eq(1), got.eq(ar.rvalid), data.eq(ar.rdata),
                                 resp.eq(ar.rresp)]
                with m.If(got):
                    m.d.comb += [wr.addr.eq(widx), wr.data.eq(data), wr.en.eq(1)]
                    m.d.sync += widx.eq(widx + 1)
                    with m.If(resp != 0):
                        m.d.sync += widx.eq(0)
                        respond(Status.BUS_ERROR, 0)
                    with m.Elif(widx + 1 == count):
                        m.d.sync += widx.eq(0)
                        respond(Status.OK, 1)
                    with m.Else():
                        m.next = "R_ADDR"
            # ---- writes: count words from the buffer ---------------------------------------
            with m.State("W_FETCH"):        # rd.addr = widx from now: data next cycle
                m.d.comb += self.busy.eq(1)
                m.next = "W_LATCH"
            with m.State("W_LATCH"):
                m.d.comb += self.busy.eq(1)
                m.d.sync += [word.eq(rd.data), aw_done.eq(0), w_done.eq(0)]
                m.next = "W_BUS"
            with m.State("W_BUS"):
                m.d.comb += self.busy.eq(1)
                aw_ok, w_ok = Signal(), Signal()
                with m.If(is_reg):          # WRITE_REG (a write state)
                    m.d.comb += [axil.awvalid.eq(~aw_done), axil.awaddr.eq(bus_addr),
                                 axil.wvalid.eq(~w_done), axil.wdata.eq(word),
                                 aw_ok.eq(aw_done | axil.awready), w_ok.eq(w_done | axil.wready)]
                with m.Else():
                    m.d.comb += [aw.awvalid.eq(~aw_done), aw.awaddr.eq(bus_addr),
                                 aw.wvalid.eq(~w_done), aw.wdata.eq(word),
                                 aw_ok.eq(aw_done | aw.awready), w_ok.eq(w_done | aw.wready)]
                m.d.sync += [aw_done.eq(aw_ok), w_done.eq(w_ok)]
                # leave on the registered handshakes (one more cycle per word): with the
                # slave's ready in the next-state logic, the path from ``cmd`` through wready
                # into the state register and ``hdr`` was the bridge's 12.3 ns (pre-route
                # estimate of e30bab3)
                with m.If(aw_done & w_done):
                    m.next = "W_RESP"
            with m.State("W_RESP"):
                m.d.comb += self.busy.eq(1)
                got, resp = Signal(), Signal(2)
                with m.If(is_reg):          # WRITE_REG (a write state)
                    m.d.comb += [axil.bready.eq(1), got.eq(axil.bvalid), resp.eq(axil.bresp)]
                with m.Else():
                    m.d.comb += [aw.bready.eq(1), got.eq(aw.bvalid), resp.eq(aw.bresp)]
                with m.If(got):
                    with m.If(resp != 0):
                        m.d.sync += widx.eq(0)
                        respond(Status.BUS_ERROR, 0)
                    with m.Elif(widx + 1 == count):
                        m.d.sync += widx.eq(0)
                        respond(Status.OK, 0)
                    with m.Else():
                        m.d.sync += widx.eq(widx + 1)
                        m.next = "W_FETCH"
            # ---- response ------------------------------------------------------------------
            with m.State("TX_SYNC"):
                m.d.comb += [self.busy.eq(1), o.valid.eq(1), o.payload.eq(SYNC_RSP)]
                with m.If(o.ready):
                    m.next = "TX_STATUS"
            with m.State("TX_STATUS"):
                m.d.comb += [self.busy.eq(1), o.valid.eq(1), o.payload.eq(status)]
                with m.If(o.ready):
                    m.d.sync += crc.eq(crc16_step(crc, status))
                    with m.If(has_data & (status == Status.OK)):
                        m.next = "TX_LOAD"
                    with m.Else():
                        m.next = "TX_CRC0"
            with m.State("TX_LOAD"):
                m.d.comb += self.busy.eq(1)
                m.d.sync += [word.eq(rd.data), bcnt.eq(0)]   # rd.addr = widx since last cycle
                m.next = "TX_DATA"
            with m.State("TX_DATA"):
                m.d.comb += [self.busy.eq(1), o.valid.eq(1), o.payload.eq(word[:8])]
                with m.If(o.ready):
                    m.d.sync += [crc.eq(crc16_step(crc, word[:8])), word.eq(word >> 8),
                                 bcnt.eq(bcnt + 1)]
                    with m.If(bcnt == 3):
                        m.d.sync += widx.eq(widx + 1)
                        with m.If(widx + 1 == count):
                            m.next = "TX_CRC0"
                        with m.Else():
                            m.next = "TX_WAIT"
            with m.State("TX_WAIT"):         # rd.addr moved to the next word: one cycle
                m.d.comb += self.busy.eq(1)
                m.next = "TX_LOAD"
            with m.State("TX_CRC0"):
                m.d.comb += [self.busy.eq(1), o.valid.eq(1), o.payload.eq(crc[:8])]
                with m.If(o.ready):
                    m.next = "TX_CRC1"
            with m.State("TX_CRC1"):
                m.d.comb += [self.busy.eq(1), o.valid.eq(1), o.payload.eq(crc[8:])]
                with m.If(o.ready):
                    m.next = "IDLE"
        return m


class UartBridge(wiring.Component):
    """:class:`UartRx` -> :class:`Bridge` -> :class:`UartTx`.

    Parameters
    ----------
    divisor : int
        Clock cycles per bit (e.g. 25 MHz / 1 Mbaud = 25).
    timeout_bytes : int
        Inter-byte timeout in byte times (10 bits each).

    Ports
    -----
    rx : In(1), tx : Out(1)
    axil, axi_r, axi_w : as :class:`Bridge`
    """

    def __init__(self, divisor: int, timeout_bytes: int = 64, reg_addr_bits: int = 12):
        _check_divisor(divisor)
        self._div = divisor
        self._timeout = divisor * 10 * timeout_bytes
        self._ab = reg_addr_bits
        super().__init__({
            "rx": In(1, init=1), "tx": Out(1, init=1),
            "axil": Out(AxiLite(reg_addr_bits)), "axi_r": Out(AxiRead(32)),
            "axi_w": Out(AxiWrite(32)),
        })

    def elaborate(self, platform):
        m = Module()
        urx = m.submodules.rx = UartRx(self._div)
        utx = m.submodules.tx = UartTx(self._div)
        br = m.submodules.bridge = Bridge(self._timeout, self._ab)
        m.d.comb += [urx.rx.eq(self.rx), self.tx.eq(utx.tx)]
        wiring.connect(m, producer=urx.o, consumer=br.i)
        wiring.connect(m, producer=br.o, consumer=utx.i)
        wiring.connect(m, wiring.flipped(self.axil), br.axil)
        wiring.connect(m, wiring.flipped(self.axi_r), br.axi_r)
        wiring.connect(m, wiring.flipped(self.axi_w), br.axi_w)
        return m
