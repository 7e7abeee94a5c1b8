"""The contracts between the accelerator's blocks: memory ports, unit control, AXI4 channels.

Every execution unit (LOAD, STORE, MATMUL, row units, ...) is a ``wiring.Component`` whose
signature is built from the signatures below, so that units written separately plug into the same
controller and memories.

Conventions
-----------
* Memory ports are seen from the unit (the initiator): ``Out`` members drive the memory.
* Reads have a FIXED latency and no backpressure: ``rd_data`` is valid exactly ``*_READ_LATENCY``
  cycles after the cycle in which ``rd_en`` was high, and only then: the data in any other
  cycle is undefined (the scratchpad and the index memory read every cycle). A unit owns its
  memory ports while it is busy (the controller grants them), so no arbitration stalls are
  possible.
* Writes take effect at the clock edge in which ``wr_en`` is high, except in the scratchpad,
  which registers its requests (read address and write alike) before the banks: a scratchpad
  write lands one cycle later, and so does every read, so an access still sees every write
  requested before it.
* Scratchpad accesses move ``spad_lanes(config)`` consecutive 16-bit words starting at ANY element
  address (the scratchpad is banked and rotates internally); ``wr_mask`` selects the lanes
  written. Lanes whose element address would be >= ``spad_words`` must be masked off by the unit
  (the unit range-checks before it starts and raises SPAD_RANGE instead).
* Unit control: the controller presents the raw 512-bit instruction word on ``instr`` and pulses
  ``start`` for one cycle; the unit raises ``busy`` from the next cycle until it pulses ``done``
  (one cycle, ``busy`` low from then on). ``error`` (an :class:`vitamin.isa.ErrorCode`) is read
  by the controller in the ``done`` cycle; non-OK halts the machine. ``sat_inc`` adds to the
  saturation-event counter every cycle (0 when idle).
"""

from __future__ import annotations

from amaranth import signed, unsigned
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out

from vitamin.isa import INSTR_BITS, ErrorCode

__all__ = [
    "spad_lanes", "SPAD_READ_LATENCY", "ACC_READ_LATENCY", "IDX_READ_LATENCY", "RS_READ_LATENCY",
    "SpadPort", "SpadWritePort", "AccPort", "IdxPort", "RowStateLayout", "RowStatePort",
    "UnitControl", "RegPort", "QueuePort", "AxiRead", "AxiWrite", "idx_entry_layout", "N_REGS",
]

SPAD_READ_LATENCY = 4
ACC_READ_LATENCY = 1
IDX_READ_LATENCY = 2
RS_READ_LATENCY = 2
N_REGS = 16


def spad_lanes(config) -> int:
    """Words per scratchpad access: enough for an A line, an output line and a row-unit chunk."""
    return max(config.rows, config.cols, config.row_lanes)


def _bits(n: int) -> int:
    return max(1, (n - 1).bit_length())


class SpadPort(wiring.Signature):
    """Unit -> scratchpad (banked, unaligned, ``spad_lanes`` words per access)."""

    def __init__(self, config):
        lanes = spad_lanes(config)
        aw = _bits(config.spad_words)
        word = data.ArrayLayout(signed(16), lanes)
        super().__init__({
            "rd_en": Out(1), "rd_addr": Out(aw), "rd_data": In(word),
            "wr_en": Out(1), "wr_addr": Out(aw), "wr_data": Out(word), "wr_mask": Out(lanes),
        })


class SpadWritePort(wiring.Signature):
    """Unit -> scratchpad, a second write request (:class:`~vitamin.hw.mem.Scratchpad` with
    ``second_writer``): registered beside the first port's, so the choice between them is made
    after the registers. ``wr_prio`` makes this write win over the first port's; otherwise the
    first port's write wins and this one is dropped (the caller's grant says so)."""

    def __init__(self, config):
        lanes = spad_lanes(config)
        aw = _bits(config.spad_words)
        super().__init__({
            "wr_en": Out(1), "wr_prio": Out(1), "wr_addr": Out(aw),
            "wr_data": Out(data.ArrayLayout(signed(16), lanes)), "wr_mask": Out(lanes),
        })


class AccPort(wiring.Signature):
    """Unit -> accumulator memory: one line of ``cols`` accumulators per access."""

    def __init__(self, config):
        line = data.ArrayLayout(signed(config.acc_bits), config.cols)
        aw = _bits(config.acc_lines)
        super().__init__({
            "rd_en": Out(1), "rd_addr": Out(aw), "rd_data": In(line),
            "wr_en": Out(1), "wr_addr": Out(aw), "wr_data": Out(line),
        })


def idx_entry_layout():
    """An index-memory entry: two signed 32-bit words (a, b)."""
    return data.StructLayout({"a": signed(32), "b": signed(32)})


class IdxPort(wiring.Signature):
    """Unit -> index memory: one entry per access."""

    def __init__(self, config):
        aw = _bits(config.idx_entries)
        ent = idx_entry_layout()
        super().__init__({
            "rd_en": Out(1), "rd_addr": Out(aw), "rd_data": In(ent),
            "wr_en": Out(1), "wr_addr": Out(aw), "wr_data": Out(ent),
        })


class RowStateLayout(data.StructLayout):
    """Row state of the online softmax (golden.units.RowState)."""

    def __init__(self):
        super().__init__({
            "have": 1, "m": signed(17), "s": unsigned(40), "c": unsigned(17),
            "r": unsigned(17), "k": unsigned(7),
        })


class RowStatePort(wiring.Signature):
    def __init__(self, config):
        aw = _bits(config.rowstate_rows)
        st = RowStateLayout()
        super().__init__({
            "rd_en": Out(1), "rd_addr": Out(aw), "rd_data": In(st),
            "wr_en": Out(1), "wr_addr": Out(aw), "wr_data": Out(st),
        })


class RegPort(wiring.Signature):
    """Unit -> register file: all 16 registers readable, one write per cycle (REG[0] stays 0)."""

    def __init__(self):
        super().__init__({
            "regs": In(data.ArrayLayout(signed(32), N_REGS)),
            "wr_en": Out(1), "wr_addr": Out(4), "wr_data": Out(signed(32)),
        })


class QueuePort(wiring.Signature):
    """Unit -> expert queue registers (offset, length per expert)."""

    def __init__(self, config):
        aw = _bits(config.idx_entries) + 1
        q = data.ArrayLayout(data.StructLayout({"off": unsigned(aw), "len": unsigned(aw)}),
                             config.max_experts)
        super().__init__({
            "q": In(q),
            "wr_en": Out(1), "wr_addr": Out(_bits(config.max_experts)),
            "wr_off": Out(unsigned(aw)), "wr_len": Out(unsigned(aw)),
        })


class UnitControl(wiring.Signature):
    """Controller -> unit: start one instruction, wait for done (see module docstring)."""

    def __init__(self):
        super().__init__({
            "start": Out(1), "instr": Out(INSTR_BITS),
            "busy": In(1), "done": In(1), "error": In(ErrorCode), "sat_inc": In(8),
        })


class AxiRead(wiring.Signature):
    """AXI4 read address + read data channels, master side (INCR bursts only)."""

    def __init__(self, data_bits: int, addr_bits: int = 32, id_bits: int = 1):
        super().__init__({
            "arvalid": Out(1), "arready": In(1), "araddr": Out(addr_bits), "arlen": Out(8),
            "arsize": Out(3), "arburst": Out(2), "arid": Out(id_bits),
            "rvalid": In(1), "rready": Out(1), "rdata": In(data_bits), "rresp": In(2),
            "rlast": In(1), "rid": In(id_bits),
        })


class AxiWrite(wiring.Signature):
    """AXI4 write address + write data + write response channels, master side."""

    def __init__(self, data_bits: int, addr_bits: int = 32, id_bits: int = 1):
        super().__init__({
            "awvalid": Out(1), "awready": In(1), "awaddr": Out(addr_bits), "awlen": Out(8),
            "awsize": Out(3), "awburst": Out(2), "awid": Out(id_bits),
            "wvalid": Out(1), "wready": In(1), "wdata": Out(data_bits),
            "wstrb": Out(data_bits // 8), "wlast": Out(1),
            "bvalid": In(1), "bready": Out(1), "bresp": In(2), "bid": In(id_bits),
        })
