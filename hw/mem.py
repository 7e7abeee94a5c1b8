"""On-chip memories behind the port contracts of :mod:`vitamin.hw.ports`.

``Scratchpad`` is banked: ``spad_lanes`` banks of 16-bit words, element ``e`` in bank
``e % lanes`` at row ``e // lanes``, so any ``lanes`` consecutive elements sit in distinct banks and
one access of ``lanes`` words at any element address takes one cycle. Reads rotate the banks'
outputs into element order (latency ``SPAD_READ_LATENCY`` = 4: request register, bank read, the
bank's output register, then rotate register; a bank deeper than :data:`SPAD_PART_ROWS` is
split into blocks with an output register each, and the rotate stage also picks the block);
writes pass the same request register (they
land one cycle after the port presents them, so reads and writes keep their order) and rotate
the data and mask into bank order. A second write port (``second_writer``) has request
registers of its own; the choice between the two writes comes after the registers.

``AccMemory``, ``IdxMemory`` and ``RowStateMemory`` are plain one-read, one-write memories.
``AccMemory`` has a read latency of 1. ``IdxMemory`` and ``RowStateMemory`` register their read
data once more beside the block RAMs (``IDX_READ_LATENCY`` = ``RS_READ_LATENCY`` = 2): the block
RAM's clock-to-output, Yosys's read/write collision logic (a LUT per bit) and the way across the
chip to the reader were in one cycle (index memory: 13.9-15.6 ns in the routed builds; the row
state into SOFTMAX ONLINE's ``s_run``: 13.4 ns, the slowest path of the 90718e9 build).
These two also handle a read and a write at one address themselves: the write reaches the RAM
a cycle after the port's, and a read at the address being written then takes the write's data
(compared on registered addresses, in the data cycle). The synthesis script tells Yosys not to
add its own collision logic for them (:data:`YOSYS_BYPASSED_MEMORY`), which compared the
incoming read address, behind the units' adders and the port's owner multiplexer.

Initial contents: unless a test preloads them, these memories are declared without an
initialiser in the Verilog (attribute :data:`NOINIT_ATTR`); the accelerator clears them with
CTRL.CLEAR, and a program started without CLEAR sees what the previous one left.

Each memory serves ONE port (a unit's, granted by the controller); its ``port`` member is the
flipped port signature, so ``wiring.connect(m, unit.spad, spad.port)`` joins them. Tests preload
and inspect contents with :meth:`Scratchpad.init_words` or through :meth:`Scratchpad.word` in the
simulator.
"""

from __future__ import annotations

from amaranth import Array, Const, Module, Mux, Signal, signed
from amaranth.lib import data, memory, wiring
from amaranth.lib.wiring import In

from .ports import (
    IDX_READ_LATENCY,
    RS_READ_LATENCY,
    AccPort,
    IdxPort,
    RowStateLayout,
    RowStatePort,
    SpadPort,
    SpadWritePort,
    idx_entry_layout,
    spad_lanes,
)

__all__ = ["Scratchpad", "AccMemory", "IdxMemory", "RowStateMemory", "NOINIT_ATTR",
           "BYPASSED_MEMORY", "YOSYS_BYPASSED_MEMORY"]

#: Attribute of memories whose reset contents do not matter (``vitamin.sim.verilator`` strips
#: their initialisers from the Verilog): the accelerator's CTRL.CLEAR zeroes every on-chip memory
#: of this module before a program runs, which is the state the golden model starts from.
NOINIT_ATTR = "vitamin_noinit"

#: Name of the memories that handle a read and a write at one address in one cycle themselves
#: (index and row state memory): the synthesis script tells Yosys that such a collision's read
#: data is not used (``COLLISION_X_MASK``), so Yosys adds no collision logic of its own.
BYPASSED_MEMORY = "ram_bypassed"
#: The Yosys command (after reading the RTLIL, before ``synth_*``) that marks their read ports.
YOSYS_BYPASSED_MEMORY = ("setparam -set COLLISION_X_MASK 1 "
                         f"t:$memrd_v2 r:MEMID=*{BYPASSED_MEMORY} %i")

#: Rows of one block of a scratchpad bank: a bank deeper than this is split into blocks of this
#: many rows, each registered on its own (8192 x 16 bits is one column of eight DP16KD at
#: 8192 x 2 on the ECP5, with no multiplexer between the block RAMs and the register).
SPAD_PART_ROWS = 8192


def _noinit_attrs(init):
    """No initialiser needed when the caller gave no contents (the Amaranth simulator still
    starts such a memory from zeros; only the Verilog omits the per-word zeros)."""
    return {} if any(init) else {NOINIT_ATTR: 1}


class Scratchpad(wiring.Component):
    """Banked scratchpad of ``config.spad_words`` 16-bit words.

    Ports
    -----
    port : In(SpadPort(config))
        One read (latency 4) and one write per cycle, ``spad_lanes`` consecutive words each.
    port2 : In(SpadWritePort(config)), with ``second_writer``
        A second write request, registered apart from ``port``'s; when both write in one
        cycle, ``port``'s is taken unless ``port2.wr_prio`` is set. Its writes land like
        ``port``'s (one cycle later), so reads see them in the same order.
    """

    def __init__(self, config, init=None, *, part_rows=None, second_writer=False):
        self._cfg = config
        self._second = second_writer
        self._part = SPAD_PART_ROWS if part_rows is None else part_rows
        if self._part < 1 or self._part & (self._part - 1):
            raise ValueError(f"part_rows {self._part} is not a power of two")
        self._lanes = spad_lanes(config)
        if config.spad_words % self._lanes:
            raise ValueError(f"spad_words {config.spad_words} is not a multiple of the "
                             f"{self._lanes} scratchpad lanes")
        self._depth = config.spad_words // self._lanes
        self._init = list(init or [])
        members = {"port": In(SpadPort(config))}
        if second_writer:
            members["port2"] = In(SpadWritePort(config))
        super().__init__(members)
        self.banks = []

    @property
    def lanes(self) -> int:
        return self._lanes

    @property
    def part_rows(self) -> int:
        """Rows of one block of a bank (:data:`SPAD_PART_ROWS` unless given, or the bank's depth
        if smaller)."""
        return min(self._depth, self._part)

    def init_words(self, words):
        """Initial contents (element order), for simulation; call before elaboration."""
        self._init = list(words)

    def word(self, e):
        """The simulator's view of element ``e`` (after elaboration): bank ``e % lanes``, row
        ``e // lanes``, in that row's block of the bank."""
        row = e // self._lanes
        return self.banks[e % self._lanes][row // self.part_rows].data[row % self.part_rows]

    def elaborate(self, platform):
        m = Module()
        lanes, depth = self._lanes, self._depth
        part = self.part_rows
        n_parts = -(-depth // part)
        pb = max(1, (part - 1).bit_length())
        p = self.port
        lb = max(1, (lanes - 1).bit_length())
        # bank b = its blocks (memories of ``part`` rows each, the last one shorter)
        self.banks = []
        for b in range(lanes):
            blocks = []
            for j in range(n_parts):
                rows = range(j * part, min(depth, (j + 1) * part))
                init = [self._init[r * lanes + b] if r * lanes + b < len(self._init) else 0
                        for r in rows]
                mem = memory.Memory(shape=signed(16), depth=len(rows), init=init,
                                    attrs=_noinit_attrs(self._init))
                m.submodules[f"bank{b}" if n_parts == 1 else f"bank{b}_{j}"] = mem
                blocks.append(mem)
            self.banks.append(blocks)
        # request stage: the shared port's read address and write request are registered
        # here, so the wires from the units' address logic and the port multiplexer end at
        # a register, and the banks (spread over the device) are driven from one
        rq_ra = Signal.like(p.rd_addr, name="rq_rd_addr")
        rq_wa = Signal.like(p.wr_addr, name="rq_wr_addr")
        rq_we = Signal(name="rq_wr_en")
        rq_wd = Signal.like(p.wr_data, name="rq_wr_data")
        rq_wm = Signal.like(p.wr_mask, name="rq_wr_mask")
        m.d.sync += [rq_ra.eq(p.rd_addr), rq_wa.eq(p.wr_addr), rq_we.eq(p.wr_en),
                     rq_wd.eq(p.wr_data), rq_wm.eq(p.wr_mask)]
        if self._second:
            # the second writer's request has registers of its own, and the write is chosen
            # after them: in front of one register the choice (by the first port's late write
            # enable, the owner multiplexer's) was the slowest path into ``rq_wr_addr`` (12.3-12.7
            # ns routed, seed 4 of 0f1d11e)
            p2 = self.port2
            r2_wa = Signal.like(p2.wr_addr, name="rq2_wr_addr")
            r2_we = Signal(name="rq2_wr_en")
            r2_pr = Signal(name="rq2_wr_prio")
            r2_wd = Signal.like(p2.wr_data, name="rq2_wr_data")
            r2_wm = Signal.like(p2.wr_mask, name="rq2_wr_mask")
            m.d.sync += [r2_wa.eq(p2.wr_addr), r2_we.eq(p2.wr_en), r2_pr.eq(p2.wr_prio),
                         r2_wd.eq(p2.wr_data), r2_wm.eq(p2.wr_mask)]
            use2 = Signal(name="wr_use2")
            m.d.comb += use2.eq(r2_we & (r2_pr | ~rq_we))
            w_a = Signal.like(rq_wa, name="wr_addr_sel")
            w_e = Signal(name="wr_en_sel")
            w_d = Signal.like(rq_wd, name="wr_data_sel")
            w_m = Signal.like(rq_wm, name="wr_mask_sel")
            m.d.comb += [w_a.eq(Mux(use2, r2_wa, rq_wa)), w_e.eq(rq_we | r2_we),
                         w_d.eq(Mux(use2, r2_wd, rq_wd)), w_m.eq(Mux(use2, r2_wm, rq_wm))]
            rq_wa, rq_we, rq_wd, rq_wm = w_a, w_e, w_d, w_m
        # read: bank b serves element a + ((b - a) mod lanes)
        ra = rq_ra
        ra_lo = ra[:lb] if lanes > 1 else 0
        ra_hi = ra >> lb if lanes > 1 else ra
        outs = []
        for b, blocks in enumerate(self.banks):
            off = Signal(range(lanes), name=f"rd_off{b}")
            m.d.comb += off.eq((b - ra_lo) % lanes if lanes > 1 else 0)
            row = Signal(range(depth + 1), name=f"rd_row{b}")
            m.d.comb += row.eq(ra_hi + ((ra_lo + off) >> lb) if lanes > 1 else ra)
            # every block's output is registered beside it (its own block RAMs, no
            # multiplexer in between: one 24576-row bank was three block RAM columns behind a
            # multiplexer, 12.1 ns into its output register, 90718e9 build, routed); the
            # block is chosen after that register, in the rotate stage
            qs = []
            for j, mem in enumerate(blocks):
                rp = mem.read_port()
                # the banks read every cycle: ``rd_data`` is defined only READ_LATENCY cycles
                # after ``rd_en`` (hw/ports.py), and an enable would put the arbitration of the
                # shared port (which unit reads this cycle) in front of every bank
                m.d.comb += [rp.addr.eq(row[:pb] if n_parts > 1 else row), rp.en.eq(1)]
                q = Signal.like(rp.data, name=f"rd_q{b}" if n_parts == 1 else f"rd_q{b}_{j}")
                m.d.sync += q.eq(rp.data)
                qs.append(q)
            if n_parts == 1:
                outs.append(qs[0])
            else:
                sel_d = Signal(range(n_parts), name=f"rd_blk{b}_0")
                sel_q = Signal(range(n_parts), name=f"rd_blk{b}")
                m.d.sync += [sel_d.eq(row >> pb), sel_q.eq(sel_d)]
                outs.append(Array(qs)[sel_q])
        ra_lo_d = Signal(range(lanes), name="rd_rot0")
        rd_rot = Signal(range(lanes))
        m.d.sync += [ra_lo_d.eq(ra_lo), rd_rot.eq(ra_lo_d)]
        # rotate register: lane i <- bank (rot + i) % lanes
        rot = Signal(data.ArrayLayout(signed(16), lanes))
        for i in range(lanes):
            with m.Switch(rd_rot):
                for r in range(lanes):
                    with m.Case(r):
                        m.d.sync += rot[i].eq(outs[(r + i) % lanes])
        m.d.comb += p.rd_data.eq(rot)
        # write: lane i -> bank (a + i) % lanes at row (a + i) // lanes
        wa = rq_wa
        wa_lo = wa[:lb] if lanes > 1 else 0
        wa_hi = wa >> lb if lanes > 1 else wa
        for b, blocks in enumerate(self.banks):
            lane = Signal(range(lanes), name=f"wr_lane{b}")
            m.d.comb += lane.eq((b - wa_lo) % lanes if lanes > 1 else 0)
            row = Signal(range(depth + 1), name=f"wr_row{b}")
            m.d.comb += row.eq(wa_hi + ((wa_lo + lane) >> lb) if lanes > 1 else wa)
            for j, mem in enumerate(blocks):
                wp = mem.write_port()
                here = (row >> pb) == j if n_parts > 1 else 1
                m.d.comb += wp.addr.eq(row[:pb] if n_parts > 1 else row)
                with m.Switch(lane):
                    for i in range(lanes):
                        with m.Case(i):
                            m.d.comb += [wp.data.eq(rq_wd[i]),
                                         wp.en.eq(rq_we & rq_wm[i] & here)]
        return m


class _Plain(wiring.Component):
    def __init__(self, sig, shape, depth, init=None, always_read=False, out_reg=False):
        self._always_read = always_read
        self._out_reg = out_reg
        self._shape = shape
        self._depth = depth
        self._init = list(init or [])
        super().__init__({"port": In(sig)})
        self.mem = None

    @property
    def write_pending(self):
        """High while a write is on its way to the RAM (one cycle after the port's): a
        testbench that writes entries directly waits for it to land first."""
        return self._w[2] if self._out_reg else Const(0)

    def word(self, i):
        """Entry ``i`` as a read now would find it (including a write still on its way to the
        RAM), for a testbench's ``ctx.get`` after elaboration; write entries with
        ``ctx.set(mem.mem.data[i], ...)`` while no write is on its way."""
        if not self._out_reg:
            return self.mem.data[i]
        w_a, w_d, w_e = self._w
        return data.Layout.cast(self._shape)(
            Mux(w_e & (w_a == i), w_d.as_value(), self.mem.data[i].as_value()))

    def elaborate(self, platform):
        m = Module()
        self.mem = mem = memory.Memory(shape=self._shape, depth=self._depth,
                                       init=self._init[:self._depth],
                                       attrs=_noinit_attrs(self._init))
        # (the name marks the memories whose same-cycle read/write collisions are handled
        # here, for the synthesis script: see BYPASSED_MEMORY)
        m.submodules[BYPASSED_MEMORY if self._out_reg else "mem"] = mem
        rp = mem.read_port()
        wp = mem.write_port()
        p = self.port
        m.d.comb += [rp.addr.eq(p.rd_addr), rp.en.eq(1 if self._always_read else p.rd_en)]
        if not self._out_reg:
            m.d.comb += [wp.addr.eq(p.wr_addr), wp.data.eq(p.wr_data), wp.en.eq(p.wr_en),
                         p.rd_data.eq(rp.data)]
            return m
        # The write reaches the RAM one cycle late (w_*), so a read in the cycle of its write
        # gets the old contents from the RAM, as the port promises. A read in the next cycle,
        # at the address being written then, takes the write's data instead of the RAM's
        # output (undefined on a DP16KD when its two ports meet at one address). The compare
        # is made on registered addresses in the data cycle, beside the RAM's clock-to-output;
        # Yosys's own collision logic compared the incoming read address (the units' adders
        # and the port's owner multiplexer in front of it) in the address cycle: 11.7 ns
        # routed into index memory's, 90718e9 build.
        self._w = (w_a, w_d, w_e) = (Signal.like(p.wr_addr, name="w_addr"),
                                     Signal.like(p.wr_data, name="w_data"), Signal(name="w_en"))
        m.d.sync += [w_a.eq(p.wr_addr), w_d.eq(p.wr_data), w_e.eq(p.wr_en)]
        m.d.comb += [wp.addr.eq(w_a), wp.data.eq(w_d), wp.en.eq(w_e)]
        r_a = Signal.like(p.rd_addr, name="byp_rd_addr")
        b_a = Signal.like(p.wr_addr, name="byp_addr")
        b_d = Signal.like(p.wr_data, name="byp_data")
        b_e = Signal(name="byp_en")
        m.d.sync += [r_a.eq(p.rd_addr), b_a.eq(w_a), b_d.eq(w_d), b_e.eq(w_e)]
        hit = b_e & (r_a == b_a)
        m.d.sync += p.rd_data.eq(Mux(hit, b_d, rp.data))
        return m


class AccMemory(_Plain):
    """``acc_lines`` lines of ``cols`` accumulators; port: In(AccPort(config))."""

    def __init__(self, config, init=None):
        super().__init__(AccPort(config), data.ArrayLayout(signed(config.acc_bits), config.cols),
                         config.acc_lines, init)


class IdxMemory(_Plain):
    """``idx_entries`` entries of (a, b) signed 32-bit pairs; port: In(IdxPort(config))."""

    def __init__(self, config, init=None):
        # reads every cycle, like the scratchpad: the enable would come from the arbitration
        # of the shared port (every reader takes its data exactly IDX_READ_LATENCY later);
        # the read data is registered beside the block RAMs (the second cycle)
        assert IDX_READ_LATENCY == 2
        super().__init__(IdxPort(config), idx_entry_layout(), config.idx_entries, init,
                         always_read=True, out_reg=True)


class RowStateMemory(_Plain):
    """``rowstate_rows`` row states; port: In(RowStatePort(config))."""

    def __init__(self, config, init=None):
        # the read data is registered beside the block RAMs (the second cycle), like index
        # memory's; the read enable still comes from the port (a unit reads a row state only
        # in the cycles it asks for one)
        assert RS_READ_LATENCY == 2
        super().__init__(RowStatePort(config), RowStateLayout(), config.rowstate_rows, init,
                         out_reg=True)
