"""The DMA units: LOAD (DRAM -> scratchpad / index memory) and STORE (the other way).

Both execute the ``Dma`` instruction format (docs/ISA.md, "LOAD and STORE") bit for bit like
:meth:`vitamin.golden.isasim.Machine.op_load` / ``op_store``, including the order of the range
checks and their error codes, and both are AXI4 masters of ``config.bus_bits`` data width.

Structure (shared by both units)::

    DmaSequencer   decode, range checks (before any access), then the address sequence:
                   one *run* (DRAM byte address, on-chip address, element count) per innermost
                   loop iteration (STRIDED) or per gathered row (SPANS)
      |
    run queue      two entries (its ready and valid are registers: the sequencer and the
      |            unit's queues sit apart on the chip)
    LoadUnit:  runs -> AR issuer (INCR bursts <= 256 beats, never across 4 KiB)
                       R beats -> byte aligner -> element packer -> lanes-wide masked writes
    StoreUnit: runs -> AW issuer (same burst rule)
                    -> chunk reader (lanes words / one entry per read, credit-based so the fixed
                       read latency never overflows) -> saturating converter -> byte packer
                    -> W beats with strobes for unaligned first/last bytes; B responses counted

The range checks need the extreme addresses of the loops (``(n - 1) * stride`` products,
``REG * blk_stride``, span rows times ``ds0``): they are computed by ONE registered multiplier
that the check sequence (and the per-span row address in SPANS mode) uses one product per cycle,
so the checks cost about ten cycles per instruction and a handful of DSPs, not nine multipliers.

Shared memory ports: ``spad_gnt``, ``idx_rd_gnt`` and ``idx_wr_gnt`` (inputs, 1 unless driven)
say that this unit may use the scratchpad / index-memory port in this cycle. The v2 top drives
them low while the COMPUTE module uses the port (compute pipelines have no backpressure, so they
always win): LOAD's two-entry write queue then holds its packed elements (and, once the queue
and the byte buffer are full, AXI ``rready``), STORE repeats its read request (its read
pipeline has a fixed latency from the granted read), and the span-list reads of the sequencer
wait. The grants arrive late in the cycle, so both units take them into registers only (LOAD's
queue read side, STORE's ``gnt_q``, the sequencer's ``g_acc``), never into their buffers or
address counters.

v1 limits (performance only, never results): each run is its own burst sequence (contiguous
runs are not merged), and a run's bytes are packed before the next run's beats are accepted.
"""

from __future__ import annotations

import functools
import operator

from amaranth import Array, Cat, Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, fifo, stream, wiring
from amaranth.lib.wiring import In, Out

from vitamin import isa
from vitamin.config import get_config
from vitamin.isa import DmaMode, DType, ErrorCode, Mem

from .dspmul import SPLIT_LATENCY, split_product
from .ports import (
    IDX_READ_LATENCY,
    N_REGS,
    SPAD_READ_LATENCY,
    AxiRead,
    AxiWrite,
    IdxPort,
    RegPort,
    SpadPort,
    UnitControl,
    spad_lanes,
)

__all__ = ["DmaSequencer", "LoadUnit", "StoreUnit", "run_layout", "instr_view", "WINDOW_BITS"]

#: Width of the ``window`` input (bytes; a window of 4 GiB needs 33 bits).
WINDOW_BITS = 33
# Signed width of every DRAM-side range computation: dram_addr (32 bits) + REG (s32) * blk_stride
# (u32) is 66 bits; span rows (up to 2^32 + 1) times ds0 add 67. 72 leaves margin.
_DW = 72


def run_layout(config):
    """One run: ``n`` consecutive elements from DRAM byte ``dram`` / on-chip address ``chip``."""
    return data.StructLayout({"dram": 32, "chip": isa.SPAD_ADDR, "n": isa.COUNT})


def _es_log(dtype):
    """log2 of the DRAM element size: I8/U8 -> 0, I16 -> 1, I32 (two words) -> 3."""
    return Mux(dtype == DType.I32, 3, Mux(dtype == DType.I16, 1, 0))


class _Fifo:
    """A SyncFIFO whose entries are ``layout`` values (``w_data``/``r_data`` are views);
    ``buffered=False``: an entry is readable the cycle after its write (``SyncFIFO``)."""

    def __init__(self, m, name, layout, depth, buffered=True):
        cls = fifo.SyncFIFOBuffered if buffered else fifo.SyncFIFO
        self.fifo = cls(width=data.Layout.cast(layout).size, depth=depth)
        m.submodules[name] = self.fifo
        self.w_data = data.View(layout, self.fifo.w_data)
        self.r_data = data.View(layout, self.fifo.r_data)
        self.w_en, self.w_rdy = self.fifo.w_en, self.fifo.w_rdy
        self.r_en, self.r_rdy = self.fifo.r_en, self.fifo.r_rdy
        self.empty = self.fifo.level == 0


class _GrantedQueue:
    """A small queue of ``layout`` entries whose head waits for a late grant (``gnt``, given
    with :meth:`grant`), which goes only into a register (``acc``: the entry presented in the
    previous cycle was taken): the entry presented now is the one after it if ``acc`` is set,
    and the pop lands a cycle late. Cycle for cycle the same as a ``SyncFIFO`` (an entry is
    presented the cycle after its write) popped by ``r_rdy & gnt``, without the grant in its
    pointers and level (LOAD's ``wrq.level``, 12.4 ns routed, seed 4 of 0f1d11e)."""

    def __init__(self, m, name, layout, depth):
        assert depth >= 2 and depth & (depth - 1) == 0
        self._m = m
        width = data.Layout.cast(layout).size
        self._slots = [Signal(width, name=f"{name}_slot{i}") for i in range(depth)]
        self._rd = Signal(range(depth), name=f"{name}_rd")
        self._wr = Signal(range(depth), name=f"{name}_wr")
        self.level = Signal(range(depth + 1), name=f"{name}_level")
        self.acc = Signal(name=f"{name}_acc")
        self.w_data = data.View(layout, Signal(width, name=f"{name}_w_data"))
        self.w_en = Signal(name=f"{name}_w_en")
        self.w_rdy = Signal(name=f"{name}_w_rdy")
        self.r_rdy = Signal(name=f"{name}_r_rdy")
        head = Signal(range(depth), name=f"{name}_head")
        r_data = Signal(width, name=f"{name}_r_data")
        self.r_data = data.View(layout, r_data)
        m.d.comb += [self.w_rdy.eq(self.level - self.acc < depth),
                     self.r_rdy.eq(self.level > self.acc),
                     head.eq(self._rd + self.acc),
                     r_data.eq(Array(self._slots)[head])]
        m.d.sync += [self.level.eq(self.level + self.w_en - self.acc),
                     self._rd.eq(self._rd + self.acc)]
        with m.If(self.w_en):
            m.d.sync += [Array(self._slots)[self._wr].eq(self.w_data.as_value()),
                         self._wr.eq(self._wr + 1)]

    def grant(self, gnt):
        """The head is taken in this cycle if presented (``r_rdy``) and ``gnt``."""
        self._m.d.sync += self.acc.eq(self.r_rdy & gnt)


def instr_view(fmt, word):
    """A ``fmt`` view (an :mod:`vitamin.isa` Struct) of the low bits of a 512-bit word."""
    return data.View(fmt, word[:data.Layout.cast(fmt).size])


def _bytes_of(value, n):
    return [value.word_select(j, 8) for j in range(n)]


def _shift_in(m, buf, cnt, consumed, new, cap, skip=None):
    """Byte FIFO update: drop ``consumed`` bytes from the front of ``buf`` (``cnt`` valid bytes)
    and append the bytes of ``new`` (from byte ``skip`` on, if given) behind the kept ones. Bytes
    at and above the new count are don't-care (they are always overwritten before they are
    read)."""
    keep = Signal(range(cap + 1))
    m.d.comb += keep.eq(cnt - consumed)
    old = Signal(cap * 8)
    ins = Signal(cap * 8)
    m.d.comb += old.eq(buf >> (consumed << 3))
    if skip is None:
        m.d.comb += ins.eq(new << (keep << 3))
    else:
        # byte j of ins is byte j - keep + skip of new: ONE shifter of the raw bytes behind
        # cap zero bytes, by cap - keep + skip (not a shift by skip and then one by keep)
        n_new = len(new) // 8
        u = Signal(range(cap + n_new + 1))
        m.d.comb += [u.eq(cap - keep + skip),
                     ins.eq((Cat(Const(0, cap * 8), new) >> (u << 3))[:cap * 8])]
    out = Cat(*[Mux(j < keep, o, i) for j, (o, i) in
                enumerate(zip(_bytes_of(old, cap), _bytes_of(ins, cap)))])
    return out


class DmaSequencer(wiring.Component):
    """Range checks and address sequence of one LOAD/STORE instruction.

    Ports
    -----
    start : In(1)
        Pulse: latch ``instr`` and begin.
    instr : In(INSTR_BITS)
        The instruction word (a ``Dma`` view is taken of the latched copy).
    window : In(WINDOW_BITS)
        DRAM window size in bytes; every byte of every element must lie below it.
    regs : In(ArrayLayout(signed(32), 16))
        The register file (``blk_reg``, ``count_reg``).
    idx_rd_en, idx_rd_addr : Out
        Span-list reads (SPANS mode); the owner of the index-memory port gives them priority.
    idx_rd_data : In(idx entry)
        ``IDX_READ_LATENCY`` cycles after ``idx_rd_en``.
    idx_rd_gnt : In(1), default 1
        The index-memory read port is free this cycle (the v2 top shares it with COMPUTE, which
        has priority); ``idx_rd_en`` is only raised together with it.
    runs : Out(stream.Signature(run_layout))
        The runs, in golden loop order.
    finished : Out(1)
        One-cycle pulse: checks failed (``error`` != OK, nothing was emitted) or the last run has
        been accepted (``error`` = OK).
    error : Out(ErrorCode)
        Valid with ``finished``.
    busy : Out(1)

    Cycles (the cost model reads these figures): STRIDED offers its first run
    :attr:`STRIDED_FIRST` cycles after ``start`` and one run per cycle after that. SPANS with
    ``c`` spans in its list scans them in ``c +`` :attr:`SCAN_TAIL` cycles (1 when ``c = 0``);
    it finishes
    :attr:`SPANS_EMPTY` cycles after ``start`` when the list is empty, :attr:`SPANS_NO_ROWS`
    plus the scan when no span has rows, and otherwise starts generating
    :attr:`SPANS_FIRST` plus the scan cycles after ``start``. Generation, per span of each
    ``n1`` pass: G_RD, G_RD2, G_SPAN and G_MUL; for a span with rows :attr:`SPANS_ROW_WAIT` more
    cycles (G_WAIT0, G_WAIT, G_ROW), then one G_EMIT per row (each waits for ``ready``); then
    G_NEXT.
    """

    #: Cycles from ``start`` to the first run offered (STRIDED): IDLE, FIELDS, BLK, BLK2, the
    #: seven product states S_BASE .. S_S0, CMP and CMP2 come before S_GEN.
    STRIDED_FIRST = 13
    #: SPANS, empty span list: start to ``finished``.
    SPANS_EMPTY = 8
    #: SPANS, no span with rows: start to ``finished`` without the scan.
    SPANS_NO_ROWS = 9
    #: SPANS: start to the first G_RD without the scan.
    SPANS_FIRST = 15
    #: SPANS generation: cycles between G_MUL and the first G_EMIT of a span with rows.
    SPANS_ROW_WAIT = 3
    #: SPANS scan of ``c > 0`` spans: ``c + SCAN_TAIL`` cycles (the read, index memory's
    #: output register, the registered entry, its registered end, the last update).
    SCAN_TAIL = 5
    #: SPANS generation: cycles per span before G_MUL (G_RD, G_RD2, G_SPAN).
    SPANS_READ_STEPS = 3

    def __init__(self, config):
        self._cfg = cfg = get_config(config)
        idx_sig = IdxPort(cfg)
        super().__init__({
            "start": In(1), "instr": In(isa.INSTR_BITS), "window": In(WINDOW_BITS),
            "regs": In(data.ArrayLayout(signed(32), N_REGS)),
            "idx_rd_en": Out(1), "idx_rd_addr": Out(idx_sig.members["rd_addr"].shape),
            "idx_rd_data": In(idx_sig.members["rd_data"].shape),
            "idx_rd_gnt": In(1, init=1),
            "idx_rd_req": Out(1),          # the read this cycle if granted (before the grant)
            "runs": Out(stream.Signature(run_layout(cfg))),
            "finished": Out(1), "error": Out(ErrorCode), "busy": Out(1),
        })

    def elaborate(self, platform):
        cfg = self._cfg
        m = Module()

        instr = Signal(isa.INSTR_BITS)
        f = instr_view(isa.Dma, instr)
        with m.If(self.start):
            m.d.sync += instr.eq(self.instr)

        es_log = Signal(2)
        m.d.comb += es_log.eq(_es_log(f.dtype))
        lim = Signal(range(max(cfg.spad_words, cfg.idx_entries) + 1))
        m.d.comb += lim.eq(Mux(f.mem == Mem.SPAD, cfg.spad_words, cfg.idx_entries))
        range_err = Mux(f.mem == Mem.SPAD, ErrorCode.SPAD_RANGE, ErrorCode.IDX_RANGE)
        ds0, ds1, ds2 = f.ds0.as_signed(), f.ds1.as_signed(), f.ds2.as_signed()
        # n - 1 of each level as registers loaded every cycle from the latched instruction
        # (every state that reads them comes two or more cycles after the start): the
        # subtractions sat in front of the operand multiplexer (mul_a_r, 12.4 ns pre-route)
        nm1 = []
        for k, n_k in enumerate((f.n0, f.n1, f.n2)):
            r = Signal((n_k - 1).shape(), name=f"n{k}_m1")
            m.d.sync += r.eq(n_k - 1)
            nm1.append(r)
        n0m1, n1m1, n2m1 = nm1

        # -- the shared multiplier: one product per state, registered at the end of the state.
        # Its operands are registers that the PREVIOUS state loads ("ops for the next state"),
        # so no state decode or operand mux sits in front of the DSPs (that was ~10 ns of the
        # product's path on the LFE5U-85F). The register-file value (FIELDS) and a span start
        # from index memory (G_SPAN) are loaded into the operand register too, a state before
        # their product: both come from across the chip (the index memory's read data was the
        # whole ecp5 design's third-slowest path into ``prod``).
        # The product takes two cycles (SPLIT_LATENCY): the partial products are registered at
        # the DSP blocks, then summed. Operands loaded in state X give ``prod`` in state X + 3,
        # so each state loads the operands of the product that the state three later uses.
        # (In one cycle, register -> DSP blocks -> 70-bit sum was 16.1 ns into ``prod``: routed
        # model of the dc9338d build.)
        blk_v = Mux(f.blk_reg == 0, 0, self.regs[f.blk_reg])
        # reset-less (loaded by the state before their product is used), so that the ECP5
        # flow can move them into the multiplier blocks' input registers (boards/dspregs.py
        # takes plain flip-flops only)
        mul_a_r = Signal(signed(36), reset_less=True)
        mul_b = Signal(signed(34), reset_less=True)
        assert SPLIT_LATENCY == 2
        # 36 x 34: 4 DSPs, ~3.4k LUT4 as logic
        prod = split_product(m, mul_a_r, mul_b, en=1, name="prod", shape=signed(70))
        # The product's sign, from the operands (exact: 70 bits hold every product). As
        # "prod > 0" the comparison was a 70-bit carry chain in front of the 72-bit lo/hi adders
        # (18.1 ns, LOAD's ``hi`` in the routed model of the 5c44745 build).
        # (A zero product may get either sign: it adds 0 to lo or hi.)
        neg_pp = Signal()
        prod_neg = Signal()
        m.d.sync += [neg_pp.eq(mul_a_r[-1] ^ mul_b[-1]), prod_neg.eq(neg_pp)]

        # The operand registers' inputs: the states' operands through one multiplexer, and the
        # span start through a last two-input one (G_MUL, flagged by a register). The start is
        # registered as read from index memory (``g_a``, G_SPAN) and taken from there: the
        # block RAM's data crosses the chip (with the state multiplexer in front: 16.4-17.3 ns
        # into ``mul_a_r``, bfbcf4d build; through the last multiplexer alone, 15.6 ns, the
        # f357767 build's critical path; both routed).
        nxt_a = Signal.like(mul_a_r)
        nxt_b = Signal.like(mul_b)
        nxt_a_en = Signal()
        nxt_b_en = Signal()
        from_idx = Signal()                # this cycle is G_MUL: mul_a_r <- the span start
        m.d.sync += from_idx.eq(0)         # (G_SPAN sets it when it goes to G_MUL)
        g_a = Signal(signed(32))           # the span start, registered in G_SPAN
        with m.If(from_idx):
            m.d.sync += mul_a_r.eq(g_a)
        with m.Elif(nxt_a_en):
            m.d.sync += mul_a_r.eq(nxt_a)
        with m.If(nxt_b_en):
            m.d.sync += mul_b.eq(nxt_b)

        # The operand multiplexers are built after the state machine as AND-OR trees over the
        # states' decodes (``fsm.ongoing``): written in the states, Yosys chained them as a
        # priority multiplexer, ten LUTs from the state register into ``mul_a_r`` (12.5 ns,
        # STORE, pre-route estimate of 01c5135).
        ops_a, ops_b = [], []

        def ops_next(state, a, b=None):
            ops_a.append((state, a))
            if b is not None:
                ops_b.append((state, b))

        base = Signal(signed(_DW))
        lo = Signal(signed(_DW))
        hi = Signal(signed(_DW))
        # window - run bytes, set at decode: the last-byte check "hi + run > window" becomes
        # "hi > wlim", so no step adds three terms (a three-term 72-bit add mapped to a chain of
        # ~28 LUTs, STORE's slowest path)
        wlim = Signal(signed(_DW))
        cmp_dram = Signal()                # CMP's registered range checks
        cmp_spad = Signal()
        # SPANS' coarse check "base + prod > window + 2|ds0|" as "prod > wcoarse": window + 2|ds0|
        # at decode, minus base once base is known (P_TOTAL). Written as one compare of two sums
        # it was the whole ecp5 design's slowest path (34 ns: a 30-LUT ripple into ``err``).
        wpad = Signal(signed(_DW))
        wcoarse = Signal(signed(_DW))
        shi = Signal(unsigned(48))         # largest on-chip address
        p_save = Signal(signed(70))
        p_min = Signal(signed(70))
        p_max = Signal(signed(70))

        # SPANS scan results
        count = Signal(signed(33))
        cnt_r = Signal(32)                 # the span count as read in BLK
        # its checks, registers (cnt_r is set in BLK, they are read in P_BASE after BLK2): the
        # 32-bit sum and compares into the state were 11.4 ns into LOAD's ``finished``,
        # pre-route estimate
        cnt_neg = Signal()
        cnt_over = Signal()
        m.d.sync += [cnt_neg.eq(cnt_r.as_signed() < 0),
                     cnt_over.eq(f.idx_addr + cnt_r > cfg.idx_entries)]
        scan_t = Signal(unsigned(33))
        scan_t1 = Signal(unsigned(33))     # scan_t + 1 (see ird_a1)
        scan_pend = Signal()               # a span-list read is in flight (first cycle)
        scan_pend2 = Signal()              # ... its second cycle (IDX_READ_LATENCY = 2)
        scan_v = Signal()                  # the span read three cycles ago is in scan_a/scan_ln
        scan_a = Signal(signed(32))
        scan_ln = Signal(signed(32))
        neg_len = Signal()
        # the span's end, a register of its own (outside the state machine: the state decode
        # stood in front of the adder, LOAD's rhi, 13.0 ns pre-route estimate of 0fb80e8); the
        # sums and compares take the span one cycle later (scan_v2, scan_a2, scan_ln2): the
        # adder in front of the compares into rhi was 15.2 ns (STORE, e30bab3 build, routed)
        scan_v2 = Signal()
        scan_a2 = Signal(signed(32))
        scan_ln2 = Signal(signed(32))
        scan_end = Signal(signed(34))
        m.d.sync += [scan_v2.eq(scan_v), scan_a2.eq(scan_a), scan_ln2.eq(scan_ln),
                     scan_end.eq(scan_a + scan_ln)]
        total = Signal(range((1 << 23) + 1))   # saturating sum of span lengths
        min_start = Signal(signed(32))
        max_end = Signal(signed(34))
        max_end_p1 = Signal(signed(35))    # max_end + 1, set with it (P_TOTAL's operand)
        rlo = Signal(signed(32))
        rhi = Signal(signed(34))
        any_rows = Signal()

        # generation state
        # iterations left after the current one, per level (count-down: the generation steps
        # branch on ``!= 0`` of a register; ``i + 1 < n`` compares in front of the 32-bit
        # address multiplexers were LOAD's d1/i1/c1 paths, 15.4-15.7 ns in the 94e8aa3 build's
        # routed model)
        r0 = Signal(isa.COUNT)
        r1 = Signal(isa.COUNT)
        r2 = Signal(isa.COUNT)
        d0 = Signal(32)
        d1 = Signal(32)
        d2 = Signal(32)
        c0 = Signal(isa.SPAD_ADDR + 1)
        c1 = Signal(isa.SPAD_ADDR + 1)
        c2 = Signal(isa.SPAD_ADDR + 1)
        rows_left = Signal(32)
        q_left = Signal.like(total)
        total_m1 = Signal(signed(25))      # total - 1 (P_S0's operand; total is final by then)
        m.d.sync += total_m1.eq(total - 1)
        span_t = Signal(unsigned(33))
        # Index memory reads (P_SCAN, G_RD): the address idx_addr + scan_t / span_t and the
        # request are registers, set with scan_t / span_t (in front of the shared port's
        # multiplexer and the block RAMs' collision logic, the state decode and the adders
        # were 14.9 ns, pre-route estimate).
        #
        # The grant arrives late (the running COMPUTE unit's read enable through the owner
        # multiplexer, from anywhere on the chip: 12.8 ns routed into STORE's ird_a enable,
        # seed 4 of 0f1d11e), so P_SCAN takes it only into a register (gnt_q), as the chunk
        # reader does: ird_a / ird_req / scan_t hold the request presented in the previous
        # cycle, ird_a1 / ird_req1 / scan_t1 its successor, and ``s_acc`` (that request was
        # granted) picks the one presented now. Cycle for cycle the same reads as taking the
        # grant into the counters directly.
        ird_a = Signal.like(self.idx_rd_addr)
        ird_req = Signal()
        ird_a1 = Signal.like(self.idx_rd_addr)
        ird_req1 = Signal()
        s_req = Signal()                   # P_SCAN presented a request in the previous cycle
        gnt_q = Signal()
        s_acc = Signal()                   # ... and it was granted
        m.d.sync += [s_req.eq(0), gnt_q.eq(self.idx_rd_gnt)]
        m.d.comb += s_acc.eq(s_req & gnt_q)
        ird_a_c = Signal.like(self.idx_rd_addr)
        ird_req_c = Signal()
        m.d.comb += [ird_a_c.eq(Mux(s_acc, ird_a1, ird_a)),
                     ird_req_c.eq(Mux(s_acc, ird_req1, ird_req))]
        m.d.comb += [self.idx_rd_addr.eq(ird_a_c), self.idx_rd_req.eq(ird_req_c),
                     self.idx_rd_en.eq(ird_req_c & self.idx_rd_gnt)]   # outside the FSM
        # span_t + 1 < count as a register, from span_t in every cycle: span_t changes only in
        # CMP2 and G_NEXT, and G_NEXT comes three or more cycles after either (the 33-bit
        # compare ran through G_NEXT's branches into r1, d1, c1: 14.4 ns into STORE's r1,
        # e30bab3 build, routed)
        span_more = Signal()
        m.d.sync += span_more.eq(span_t + 1 < count.as_unsigned())
        g_acc = Signal()                   # G_RD's read was granted
        g_ln = Signal(signed(32))          # the span's length, registered in G_SPAN

        err = Signal(ErrorCode)
        m.d.comb += self.error.eq(err)

        def ext_lohi():
            m.d.sync += [lo.eq(lo + Mux(prod_neg, prod, 0)), hi.eq(hi + Mux(prod_neg, 0, prod))]

        def fail(code):
            m.d.sync += err.eq(code)
            m.next = "FINISH"


        runs = self.runs
        m.d.comb += [runs.p.dram.eq(d0), runs.p.chip.eq(c0), runs.p.n.eq(f.run)]

        with m.FSM() as fsm:
            with m.State("IDLE"):
                # no operands are loaded here: nothing uses the product of this state's
                # operands (BLK2), and ``start`` comes from the command queue's output (with the
                # operand enable it was STORE's mul_a_r path, 12.4 ns pre-route estimate)
                with m.If(self.start):
                    m.d.sync += err.eq(ErrorCode.OK)
                    m.next = "FIELDS"

            with m.State("FIELDS"):
                m.d.comb += self.busy.eq(1)
                # REG * blk_stride; the register is read here (a unit may write it in the
                # start cycle), blk_stride from the latched instruction (from the command
                # queue's output in the start cycle, it was LOAD's mul_b path: 13.3 ns,
                # pre-route estimate)
                ops_next("FIELDS", blk_v, f.blk_stride)
                m.next = "BLK"

            with m.State("BLK"):                    # REG * blk_stride
                m.d.comb += self.busy.eq(1)
                ops_next("BLK", n2m1, ds2)             # S_D2
                # SPANS' span count, for P_BASE's checks: the register file's value is selected
                # here and registered (selected and compared in one cycle it was the ecp5
                # design's LOAD ``error`` path, 21 ns routed)
                m.d.sync += cnt_r.eq(Mux(f.count_reg == 0, f.n2, self.regs[f.count_reg]))
                bad = ((f.run == 0) | (f.n0 == 0) | (f.n1 == 0) |
                       ((f.mode == DmaMode.STRIDED) & (f.n2 == 0)))
                dt_bad = Mux(f.mem == Mem.IDX, f.dtype != DType.I32, f.dtype == DType.I32)
                m.d.sync += [shi.eq(f.spad_addr + f.run - 1),
                             wlim.eq(self.window - (f.run << es_log)),
                             wpad.eq(self.window + (Mux(ds0 < 0, -ds0, ds0) << 1))]
                with m.If(bad | dt_bad):
                    fail(ErrorCode.BAD_FIELD)
                with m.Else():
                    m.next = "BLK2"
            with m.State("BLK2"):                   # the product's second cycle
                m.d.comb += self.busy.eq(1)
                ops_next("BLK2", n1m1, ds1)             # S_D1
                with m.If(f.mode == DmaMode.STRIDED):
                    m.next = "S_BASE"
                with m.Else():
                    m.next = "P_BASE"

            # ---- STRIDED checks ---------------------------------------------------------------
            with m.State("S_BASE"):
                m.d.comb += self.busy.eq(1)
                m.d.sync += [base.eq(f.dram_addr + prod), lo.eq(f.dram_addr + prod),
                             hi.eq(f.dram_addr + prod)]
                ops_next("S_BASE", n0m1, ds0)             # S_D0
                m.next = "S_D2"
            with m.State("S_D2"):
                m.d.comb += self.busy.eq(1)
                ext_lohi()
                ops_next("S_D2", n2m1, f.ss2)           # S_S2
                m.next = "S_D1"
            with m.State("S_D1"):
                m.d.comb += self.busy.eq(1)
                ext_lohi()
                ops_next("S_D1", n1m1, f.ss1)           # S_S1
                m.next = "S_D0"
            with m.State("S_D0"):
                m.d.comb += self.busy.eq(1)
                ext_lohi()
                ops_next("S_D0", n0m1, f.ss0)           # S_S0
                m.next = "S_S2"
            with m.State("S_S2"):
                m.d.comb += self.busy.eq(1)
                m.d.sync += shi.eq(shi + prod)
                m.next = "S_S1"
            with m.State("S_S1"):
                m.d.comb += self.busy.eq(1)
                m.d.sync += shi.eq(shi + prod)
                m.next = "S_S0"
            with m.State("S_S0"):
                m.d.comb += self.busy.eq(1)
                m.d.sync += shi.eq(shi + prod)
                m.next = "CMP"

            with m.State("CMP"):
                # the range checks are registered first (cmp_dram, cmp_spad), then branched on:
                # 72-bit compares into the error and state registers were STORE's slowest
                # path in the 2da45db build's routed model (19.4 ns)
                m.d.comb += self.busy.eq(1)
                m.d.sync += [cmp_dram.eq((lo < 0) | (hi > wlim)), cmp_spad.eq(shi >= lim)]
                m.next = "CMP2"
            with m.State("CMP2"):
                m.d.comb += self.busy.eq(1)
                with m.If(cmp_dram):
                    fail(ErrorCode.DRAM_RANGE)
                with m.Elif(cmp_spad):
                    fail(range_err)
                with m.Elif(f.mode == DmaMode.STRIDED):
                    m.d.sync += [r0.eq(n0m1), r1.eq(n1m1), r2.eq(n2m1),
                                 d0.eq(base), d1.eq(base), d2.eq(base),
                                 c0.eq(f.spad_addr), c1.eq(f.spad_addr), c2.eq(f.spad_addr)]
                    m.next = "S_GEN"
                with m.Else():
                    m.d.sync += [r1.eq(n1m1), span_t.eq(0), d1.eq(base), c1.eq(f.spad_addr),
                                 c0.eq(f.spad_addr), q_left.eq(total),
                                 ird_a.eq(f.idx_addr), ird_req.eq(1)]
                    m.next = "G_RD"

            # ---- STRIDED generation -----------------------------------------------------------
            with m.State("S_GEN"):
                m.d.comb += [self.busy.eq(1), runs.valid.eq(1)]
                with m.If(runs.ready):
                    with m.If(r0 != 0):
                        m.d.sync += [r0.eq(r0 - 1), d0.eq(d0 + ds0), c0.eq(c0 + f.ss0)]
                    with m.Elif(r1 != 0):
                        m.d.sync += [r0.eq(n0m1), r1.eq(r1 - 1), d1.eq(d1 + ds1),
                                     d0.eq(d1 + ds1), c1.eq(c1 + f.ss1), c0.eq(c1 + f.ss1)]
                    with m.Elif(r2 != 0):
                        m.d.sync += [r0.eq(n0m1), r1.eq(n1m1), r2.eq(r2 - 1),
                                     d2.eq(d2 + ds2), d1.eq(d2 + ds2), d0.eq(d2 + ds2),
                                     c2.eq(c2 + f.ss2), c1.eq(c2 + f.ss2), c0.eq(c2 + f.ss2)]
                    with m.Else():
                        m.next = "FINISH"

            # ---- SPANS checks -----------------------------------------------------------------
            with m.State("P_BASE"):
                m.d.comb += self.busy.eq(1)
                m.d.sync += base.eq(f.dram_addr + prod)
                cnt = cnt_r
                m.d.sync += [count.eq(cnt), scan_t.eq(0), scan_t1.eq(1), scan_pend2.eq(0),
                             max_end_p1.eq(-(1 << 33) + 1),
                             neg_len.eq(0),
                             total.eq(0), min_start.eq((1 << 31) - 1), max_end.eq(-(1 << 33)),
                             rlo.eq((1 << 31) - 1), rhi.eq(-(1 << 33)), any_rows.eq(0)]
                with m.If(cnt_neg):
                    fail(ErrorCode.BAD_FIELD)
                with m.Elif(cnt_over):
                    fail(ErrorCode.IDX_RANGE)
                with m.Else():
                    m.d.sync += [ird_a.eq(f.idx_addr), ird_req.eq(cnt != 0)]
                    m.next = "P_SCAN"
            with m.State("P_SCAN"):
                m.d.comb += self.busy.eq(1)
                # P_TOTAL's operands: max_end is final in the last P_SCAN cycle (no read pending)
                ops_next("P_SCAN", max_end_p1, ds0)
                # one read per cycle; IDX_READ_LATENCY = 2, so the data of the read issued two
                # cycles ago is on idx_rd_data now
                assert IDX_READ_LATENCY == 2
                # ird_req_c == (the presented scan_t) < count here; the successor's compare is
                # made for both outcomes from registers and picked by s_acc
                m.d.comb += scan_pend.eq(s_acc)
                m.d.sync += [scan_pend2.eq(scan_pend), s_req.eq(ird_req_c),
                             ird_a.eq(ird_a_c), ird_req.eq(ird_req_c),
                             ird_a1.eq(Mux(s_acc, ird_a1, ird_a) + 1),
                             scan_t.eq(Mux(s_acc, scan_t1, scan_t)),
                             scan_t1.eq(Mux(s_acc, scan_t1 + 1, scan_t1)),
                             ird_req1.eq(Mux(s_acc, scan_t1 + 1 < count.as_unsigned(),
                                             scan_t1 < count.as_unsigned()))]
                # the span is registered before the sums and comparisons (the index memory's
                # data crosses the chip from the shared port)
                m.d.sync += [scan_v.eq(scan_pend2), scan_a.eq(self.idx_rd_data.a),
                             scan_ln.eq(self.idx_rd_data.b)]
                with m.If(scan_v2):
                    a = scan_a2
                    ln = scan_ln2
                    end = scan_end
                    with m.If(ln < 0):
                        m.d.sync += neg_len.eq(1)
                    with m.Else():
                        m.d.sync += total.eq(Mux(total + ln > (1 << 23), 1 << 23, total + ln))
                    with m.If(a < min_start):
                        m.d.sync += min_start.eq(a)
                    with m.If(end > max_end):
                        m.d.sync += [max_end.eq(end), max_end_p1.eq(end + 1)]
                    with m.If(ln > 0):
                        m.d.sync += any_rows.eq(1)
                        with m.If(a < rlo):
                            m.d.sync += rlo.eq(a)
                        with m.If(end - 1 > rhi):
                            m.d.sync += rhi.eq(end - 1)
                with m.If(~ird_req_c & ~scan_pend & ~scan_pend2 & ~scan_v & ~scan_v2):
                    m.next = "P_TOTAL"
            with m.State("P_TOTAL"):
                m.d.comb += self.busy.eq(1)
                ops_next("P_TOTAL", n1m1, ds1)             # P_D1
                m.d.sync += wcoarse.eq(wpad - base)
                with m.If(neg_len):
                    fail(ErrorCode.BAD_FIELD)
                with m.Elif(total > lim):
                    fail(ErrorCode.SPAD_RANGE)          # golden: SPAD_RANGE for IDX too
                with m.Elif(count == 0):
                    m.next = "FINISH"
                with m.Elif(min_start < 0):
                    fail(ErrorCode.DRAM_RANGE)
                with m.Else():
                    m.next = "P_WAIT"
            with m.State("P_WAIT"):                 # P_COARSE's product, second cycle
                m.d.comb += self.busy.eq(1)
                ops_next("P_WAIT", rlo, ds0)                  # P_RLO
                m.next = "P_COARSE"
            with m.State("P_COARSE"):
                m.d.comb += self.busy.eq(1)
                ops_next("P_COARSE", rhi, ds0)                  # P_RHI
                m.d.sync += [lo.eq(base), hi.eq(base)]
                with m.If(prod > wcoarse):          # base + prod > window + 2 |ds0|
                    fail(ErrorCode.DRAM_RANGE)
                with m.Elif(total == 0):
                    m.next = "FINISH"
                with m.Else():
                    m.next = "P_D1"
            with m.State("P_D1"):
                m.d.comb += self.busy.eq(1)
                ext_lohi()
                ops_next("P_D1", n1m1, f.ss1)           # P_S1
                m.next = "P_RLO"
            with m.State("P_RLO"):
                m.d.comb += self.busy.eq(1)
                m.d.sync += p_save.eq(prod)
                ops_next("P_RLO", total_m1, f.ss0)          # P_S0
                m.next = "P_RHI"
            with m.State("P_RHI"):
                m.d.comb += self.busy.eq(1)
                # the smaller and the larger row offset are registered and added in P_S1 (a
                # 72-bit compare, select and add in one cycle was STORE's ``hi`` path)
                m.d.sync += [p_min.eq(Mux(prod < p_save, prod, p_save)),
                             p_max.eq(Mux(prod > p_save, prod, p_save))]
                m.next = "P_S1"
            with m.State("P_S1"):
                m.d.comb += self.busy.eq(1)
                m.d.sync += [shi.eq(shi + prod), lo.eq(lo + p_min), hi.eq(hi + p_max)]
                m.next = "P_S0"
            with m.State("P_S0"):
                m.d.comb += self.busy.eq(1)
                m.d.sync += shi.eq(shi + prod)
                m.next = "CMP"

            # ---- SPANS generation -------------------------------------------------------------
            with m.State("G_RD"):
                m.d.comb += self.busy.eq(1)
                # ird_req == 1 here: idx_rd_en is the grant
                m.d.sync += ird_req.eq(0)
                # the late grant goes into a register, not into the state: G_SPAN goes back
                # here if the read was not granted
                m.d.sync += g_acc.eq(self.idx_rd_gnt)
                m.next = "G_RD2"
            with m.State("G_RD2"):                  # index memory's output register
                m.d.comb += self.busy.eq(1)
                m.next = "G_SPAN"
            with m.State("G_SPAN"):
                m.d.comb += self.busy.eq(1)
                # The span as read: its start and its length into registers; nothing branches
                # on index memory's read data in this cycle (the block RAM's clock-to-out and
                # the way across the chip left no time for a 33-bit compare: LOAD's state
                # register, 21 ns routed).
                m.d.sync += [g_a.eq(self.idx_rd_data.a), g_ln.eq(self.idx_rd_data.b)]
                # G_ROW: a * ds0 (a, the span start, through ``from_idx`` in G_MUL)
                ops_b.append(("G_SPAN", ds0))
                with m.If(~g_acc):
                    m.d.sync += ird_req.eq(1)
                    m.next = "G_RD"
                with m.Else():
                    m.d.sync += from_idx.eq(1)
                    m.next = "G_MUL"
            with m.State("G_MUL"):
                m.d.comb += self.busy.eq(1)
                # The rows of one n1 pass never exceed the checked total, even if a LOAD into
                # index memory has overwritten its own span list (see LoadUnit): bounded work.
                m.d.sync += rows_left.eq(Mux(g_ln > q_left, q_left, g_ln))
                with m.If((g_ln > 0) & (q_left != 0)):
                    m.next = "G_WAIT0"
                with m.Else():
                    m.next = "G_NEXT"
            with m.State("G_WAIT0"):                # the product's first cycle
                m.d.comb += self.busy.eq(1)
                m.next = "G_WAIT"
            with m.State("G_WAIT"):                 # the product's second cycle
                m.d.comb += self.busy.eq(1)
                m.next = "G_ROW"
            with m.State("G_ROW"):
                m.d.comb += self.busy.eq(1)
                m.d.sync += d0.eq(d1 + prod)
                m.next = "G_EMIT"
            with m.State("G_EMIT"):
                m.d.comb += [self.busy.eq(1), runs.valid.eq(1)]
                with m.If(runs.ready):
                    m.d.sync += [d0.eq(d0 + ds0), c0.eq(c0 + f.ss0),
                                 rows_left.eq(rows_left - 1), q_left.eq(q_left - 1)]
                    with m.If(rows_left == 1):
                        m.next = "G_NEXT"
            with m.State("G_NEXT"):
                m.d.comb += self.busy.eq(1)
                with m.If(span_more):
                    m.d.sync += [span_t.eq(span_t + 1), ird_a.eq(ird_a + 1), ird_req.eq(1)]
                    m.next = "G_RD"
                with m.Elif(r1 != 0):
                    m.d.sync += [span_t.eq(0), ird_a.eq(f.idx_addr), ird_req.eq(1),
                                 r1.eq(r1 - 1), d1.eq(d1 + ds1),
                                 c1.eq(c1 + f.ss1), c0.eq(c1 + f.ss1), q_left.eq(total)]
                    m.next = "G_RD"
                with m.Else():
                    m.next = "FINISH"

            with m.State("FINISH"):
                m.d.comb += self.finished.eq(1)
                m.next = "IDLE"

        # the operand multiplexers (see ops_next): one term per state, ORed
        for target, en, pairs in ((nxt_a, nxt_a_en, ops_a), (nxt_b, nxt_b_en, ops_b)):
            terms = []
            for state, v in pairs:
                t = Signal.like(target, name=f"{target.name}_{state.lower()}")
                m.d.comb += t.eq(Mux(fsm.ongoing(state), v, 0))
                terms.append(t)
            m.d.comb += [target.eq(functools.reduce(operator.or_, terms)),
                         en.eq(Cat(*(fsm.ongoing(st) for st, _ in pairs)).any())]
        return m


def _burst_beats(m, addr, left, bb):
    """Beats of the INCR burst starting at ``addr`` (any byte), ``left`` beats (the issuer's
    register) before the run's end: stops at the end, at a 4 KiB boundary, or after 256 beats.
    Returns (beats, next_addr, start, step): the issuer adds ``start(dram)`` to its statements
    where it loads ``addr`` with a run's first byte address, and ``step()`` where it issues a
    burst. The run ends with this burst when ``beats == left``.

    (The issuers count the beats left instead of comparing the address with the run's end
    address: the 33-bit subtraction and compares were LOAD's AR and STORE's AW paths, 16-17 ns
    in the routed model of the 5c44745 build. The beats to the next 4 KiB boundary are a
    register too, set with the address: computed from it, the subtraction and the compares
    were 8 levels from the address register to the board's AR/AW register slices, through
    the arbiters, 10.6 ns pre-route estimate.)"""
    bb_log = bb.bit_length() - 1
    page = 4096 // bb
    al = Signal(33)
    m.d.comb += al.eq(addr & ~(bb - 1))
    to_4k = Signal(range(page + 1), init=page)   # beats from addr to the next 4 KiB boundary
    beats = Signal(range(257))
    lim = min(256, page)
    with m.If((left <= to_4k) & (left <= lim)):
        m.d.comb += beats.eq(left)
    with m.Elif(to_4k <= lim):
        m.d.comb += beats.eq(to_4k)
    with m.Else():
        m.d.comb += beats.eq(lim)
    nxt = Signal(33)
    m.d.comb += nxt.eq(al + (beats << bb_log))

    def start(dram):
        return [to_4k.eq((4096 - (dram[:12] & ~(bb - 1))) >> bb_log)]

    def step():
        # After a burst that does not end the run: one that stopped at the boundary
        # (to_4k <= lim) leaves the next one a whole page, one of lim beats to_4k - lim.
        return [to_4k.eq(Mux(to_4k <= lim, page, to_4k - lim))]

    return beats, nxt, start, step


def _run_beats(dram, nbytes, bb):
    """Beats of a run of ``nbytes`` bytes from byte address ``dram``: the ``left`` of
    :func:`_burst_beats` for its first burst."""
    bb_log = bb.bit_length() - 1
    if bb_log == 0:
        return nbytes
    return (dram[:bb_log] + nbytes + (bb - 1)) >> bb_log


class _DmaUnit(wiring.Component):
    def __init__(self, config, axi_name, axi_sig, counter_name):
        self._cfg = cfg = get_config(config)
        self._lanes = spad_lanes(cfg)
        self._bb = cfg.bus_bytes
        self._chunk = max(2 * self._lanes, 8)     # most bytes of one on-chip access
        super().__init__({
            "ctl": In(UnitControl()),
            axi_name: Out(axi_sig),
            "spad": Out(SpadPort(cfg)),
            "idx": Out(IdxPort(cfg)),
            "regs": Out(RegPort()),
            "window": In(WINDOW_BITS),
            counter_name: Out(range(self._chunk + 1)),
            # grants of the shared memory ports (v2 top; 1 when the unit owns the ports)
            "spad_gnt": In(1, init=1), "idx_rd_gnt": In(1, init=1), "idx_wr_gnt": In(1, init=1),
            # LOAD: the write this cycle if granted (``wr_en`` = ``wr_req`` & grant), so the v2
            # top can form the memories' write enables without the late grant
            "spad_wr_req": Out(1), "idx_wr_req": Out(1),
            # the sequencer's span-list read this cycle if granted
            "idx_rd_req": Out(1),
        })

    @property
    def config(self):
        return self._cfg

    def _sequencer(self, m):
        seq = m.submodules.seq = DmaSequencer(self._cfg)
        m.d.comb += [seq.start.eq(self.ctl.start), seq.instr.eq(self.ctl.instr),
                     seq.window.eq(self.window), seq.regs.eq(self.regs.regs),
                     seq.idx_rd_gnt.eq(self.idx_rd_gnt)]
        instr = Signal(isa.INSTR_BITS)
        f = instr_view(isa.Dma, instr)
        with m.If(self.ctl.start):
            m.d.sync += instr.eq(self.ctl.instr)
        # The runs pass through a two-entry queue (``SyncFIFO``: its ready and valid are its
        # level register, so no path runs from the unit's queues through the sequencer's
        # ``ready`` into its address counters, or back). The sequencer sits by the register
        # file and index memory, the queues by the AXI port: through ``ready`` the queues'
        # levels reached the sequencer's ``d0`` and its state across the chip (12.3-12.8 ns
        # routed, STORE's ``finished`` and ``seq.d0``, e000a2e seed 4). One cycle more from
        # the sequencer to the unit, full throughput.
        runs = _Fifo(m, "runslice", run_layout(self._cfg), 2, buffered=False)
        m.d.comb += [runs.w_data.eq(seq.runs.p), runs.w_en.eq(seq.runs.valid & runs.w_rdy),
                     seq.runs.ready.eq(runs.w_rdy)]
        return seq, f, runs


class LoadUnit(_DmaUnit):
    """LOAD: DRAM -> scratchpad (I8, U8, I16) or index memory (I32).

    Ports
    -----
    ctl : In(UnitControl())
    axi_r : Out(AxiRead(config.bus_bits))
        AXI4 read master; addresses are relative to the DRAM window (the top adds the base).
    spad : Out(SpadPort(config))
        Lanes-wide masked writes.
    idx : Out(IdxPort(config))
        Span-list reads (SPANS mode) and entry writes (I32).
    regs : Out(RegPort())
        Read only (``blk_reg``, ``count_reg``).
    window : In(WINDOW_BITS)
        DRAM window size in bytes.
    dram_rd_inc : Out
        Bytes of loaded elements this cycle (the ``dram_read_bytes`` counter).
    """

    OPCODES = (isa.Opcode.LOAD,)

    def __init__(self, config):
        cfg = get_config(config)
        super().__init__(cfg, "axi_r", AxiRead(cfg.bus_bits), "dram_rd_inc")

    def elaborate(self, platform):
        lanes, bb, chunk = self._lanes, self._bb, self._chunk
        bb_log = bb.bit_length() - 1
        cap = bb + chunk
        m = Module()
        seq, f, runs = self._sequencer(m)
        es_log = Signal(2)
        m.d.comb += es_log.eq(_es_log(f.dtype))
        ctl = self.ctl
        ax = self.axi_r

        is_idx = f.mem == Mem.IDX

        def chunk_of(n):
            """Elements of a chunk when ``n`` are left: 1 (index memory) or min(n, lanes)."""
            return Mux(is_idx, 1, Mux(n < lanes, n, lanes))

        # run descriptors for the data path, pushed when a run's first burst is issued
        # (need0: the run's first chunk in bytes, computed on the way in: from ``n`` behind the
        # queue it ran into ``enough``, 10.9 ns pre-route estimate)
        rd_layout = data.StructLayout({"off": range(bb), "nbytes": 20, "chip": isa.SPAD_ADDR,
                                       "n": isa.COUNT, "need0": range(chunk + 1)})
        dq = _Fifo(m, "runq", rd_layout, 4)

        # ---- AR issuer ----------------------------------------------------------------------
        ar_busy = Signal()
        ar_addr = Signal(33)
        ar_left = Signal(21)            # beats of the run not issued yet
        beats, nxt, b_start, b_step = _burst_beats(m, ar_addr, ar_left, bb)
        m.d.comb += [ax.araddr.eq(ar_addr & ~(bb - 1)), ax.arlen.eq(beats - 1),
                     ax.arsize.eq(bb_log), ax.arburst.eq(1), ax.arid.eq(0),
                     ax.arvalid.eq(ar_busy)]
        run = runs.r_data
        nbytes = Signal(20)
        m.d.comb += nbytes.eq(run.n << es_log)
        run_acc = Signal()
        m.d.comb += [run_acc.eq(runs.r_rdy & ~ar_busy & dq.w_rdy), runs.r_en.eq(run_acc)]
        m.d.comb += [dq.w_data.off.eq(run.dram[:bb_log] if bb_log else 0),
                     dq.w_data.nbytes.eq(nbytes), dq.w_data.chip.eq(run.chip),
                     dq.w_data.n.eq(run.n), dq.w_en.eq(run_acc),
                     dq.w_data.need0.eq(chunk_of(run.n) << es_log)]
        with m.If(run_acc):
            m.d.sync += [ar_busy.eq(1), ar_addr.eq(run.dram),
                         ar_left.eq(_run_beats(run.dram, nbytes, bb))] + b_start(run.dram)
        with m.If(ax.arvalid & ax.arready):
            m.d.sync += [ar_addr.eq(nxt), ar_left.eq(ar_left - beats)] + b_step()
            with m.If(ar_left == beats):
                m.d.sync += ar_busy.eq(0)

        # ---- R beats -> byte buffer -> elements ---------------------------------------------
        have = Signal()                 # a run is loaded into the data path
        first = Signal()
        off = Signal(range(bb))
        rx_left = Signal(20)            # bytes of the run still to receive
        rx_more = Signal()              # rx_left != 0, a register (R ready -> take -> cnt)
        el_left = Signal(isa.COUNT + 1)  # elements still to write
        # el_left != 0 as a register (the compare in front of ``want`` and the byte buffer's
        # select was LOAD's ``buf`` path, 12.8 ns pre-route estimate)
        el_nz = Signal()
        chip = Signal(isa.SPAD_ADDR)
        buf = Signal(cap * 8)
        cnt = Signal(range(cap + 1))

        # element chunk of this cycle: k = 1 (index memory) or min(el_left, lanes), kept as a
        # register beside el_left (it steers the byte shifters, whose path it would lengthen)
        k = Signal(range(lanes + 1))

        # need = k << es_log (the chunk's bytes) is a register too, and so is ``enough``
        # (cnt >= need), computed from the next values: with the shift and the compare in
        # front of ``emit``, which selects the whole byte buffer, the path from ``k`` into
        # ``buf`` was 16.6 ns (routed model of the f892a67 build).
        need = Signal(range(chunk + 1))
        need_next = Signal.like(need)     # need's next value (set below)
        enough = Signal(init=1)
        # nb: the bytes the next R beat brings, min(rx_left, bb - skip), a register updated
        # with rx_left (the compare sat between R valid and the count, 16.4 ns into ``room``)
        nb = Signal(range(bb + 1))

        def min_(a, b):
            return Mux(a < b, a, b)

        with m.If(~have & dq.r_rdy):
            m.d.comb += dq.r_en.eq(1)
            m.d.sync += [nb.eq(min_(dq.r_data.nbytes, bb - dq.r_data.off)),
                         have.eq(1), first.eq(1), off.eq(dq.r_data.off),
                         rx_left.eq(dq.r_data.nbytes), rx_more.eq(dq.r_data.nbytes != 0),
                         el_left.eq(dq.r_data.n), el_nz.eq(dq.r_data.n != 0),
                         k.eq(chunk_of(dq.r_data.n)), chip.eq(dq.r_data.chip)]
        m.d.sync += need.eq(need_next)
        # The packed elements go into a two-entry write queue, which writes them when the port
        # is granted: the late grant (the running COMPUTE unit's write enable, through the
        # owner multiplexer) only moves the queue's read side, not the byte buffer, and the
        # memories' write request is a register. Each write lands one cycle later than it is
        # packed; with the port free, one write per cycle.
        wq_layout = data.StructLayout({"idx": 1, "addr": isa.SPAD_ADDR, "mask": lanes,
                                       "data": self.spad.wr_data.shape(), "entry": 64})
        wrq = _GrantedQueue(m, "wrq", wq_layout, 2)
        w_in, w_hd = wrq.w_data, wrq.r_data
        emit = Signal()
        want = Signal()
        m.d.comb += [want.eq(have & el_nz & enough),
                     emit.eq(want & wrq.w_rdy), wrq.w_en.eq(emit)]
        consumed = Signal(range(chunk + 1))
        m.d.comb += consumed.eq(Mux(emit, need, 0))

        # incoming beat
        skip = Signal(range(bb))
        m.d.comb += skip.eq(Mux(first, off, 0))
        # room: "cnt + bb <= cap" for this cycle's cnt, registered from the next value. R
        # ready goes to the SDRAM side and comes back as ``take`` into cnt; computed from cnt
        # in the same cycle, this round trip was LOAD's slowest path (18.6 ns, routed model of
        # the 5c44745 build).
        room = Signal(init=1)
        m.d.comb += ax.rready.eq(have & rx_more & room)
        take = Signal()
        m.d.comb += take.eq(ax.rvalid & ax.rready)

        # Both outcomes of this cycle's write are prepared and ``emit`` picks one at the end.
        m.d.sync += buf.eq(Mux(emit, _shift_in(m, buf, cnt, need, ax.rdata, cap, skip),
                               _shift_in(m, buf, cnt, 0, ax.rdata, cap, skip)))
        # el_left - k, the elements after this chunk, is a register kept one chunk ahead (the
        # subtraction from k, in front of the next chunk's size and ``enough``, was 12.4 ns
        # into ``enough``, pre-route estimate)
        el_next = Signal.like(el_left)
        with m.If(emit):
            m.d.sync += el_next.eq(el_next - chunk_of(el_next))
        with m.If(~have & dq.r_rdy):
            m.d.sync += el_next.eq(dq.r_data.n - chunk_of(dq.r_data.n))
        # The count, ``room`` and ``enough`` for both outcomes of the R beat: ``take`` (R valid
        # through the board's read arbiter) picks them at the end. Adding the beat's bytes
        # after it was 9 LUTs from the arbiter's state into ``enough`` (11.2 ns pre-route
        # estimate). ``enough`` is prepared for both outcomes of the write too (``emit``, from
        # the write queue's level, also picks the next chunk's size): four compares in parallel.
        need_e = Signal.like(need)        # the next chunk's bytes when this cycle writes ...
        need_n = Signal.like(need)        # ... and when it does not
        cnt_e = Signal.like(cnt)          # the count after this cycle's write, before the beat
        m.d.comb += [need_e.eq(chunk_of(el_next) << es_log), cnt_e.eq(cnt - need),
                     need_n.eq(Mux(~have & dq.r_rdy, dq.r_data.need0, need)),
                     need_next.eq(Mux(emit, need_e, need_n))]
        kept = Signal.like(cnt)           # the count before the beat, either way
        kept_got = Signal.like(cnt)
        m.d.comb += [kept.eq(Mux(emit, cnt_e, cnt)), kept_got.eq(kept + nb)]
        m.d.sync += [cnt.eq(Mux(take, kept_got, kept)),
                     room.eq(Mux(take, kept_got <= cap - bb, kept <= cap - bb))]
        m.d.sync += enough.eq(Mux(emit,
                                  Mux(take, cnt_e + nb >= need_e, cnt_e >= need_e),
                                  Mux(take, cnt + nb >= need_n, cnt >= need_n)))
        with m.If(take):
            m.d.sync += [rx_left.eq(rx_left - nb), rx_more.eq(rx_left != nb), first.eq(0),
                         nb.eq(min_(rx_left - nb, bb))]

        # writes: packed into the queue entry ...
        bytes_ = _bytes_of(buf, cap)
        m.d.comb += [w_in.idx.eq(is_idx), w_in.addr.eq(chip),
                     w_in.mask.eq(Cat(*[i < k for i in range(lanes)])),
                     w_in.entry.eq(Cat(*bytes_[0:8]))]
        for i in range(lanes):
            b8 = Cat(bytes_[i]) if i < len(bytes_) else Const(0, 8)
            w16 = Cat(bytes_[2 * i], bytes_[2 * i + 1]) if 2 * i + 1 < cap else Const(0, 16)
            with m.Switch(f.dtype):
                with m.Case(DType.I8):
                    m.d.comb += w_in.data[i].eq(b8.as_signed())
                with m.Case(DType.U8):
                    m.d.comb += w_in.data[i].eq(b8)
                with m.Default():
                    m.d.comb += w_in.data[i].eq(w16.as_signed())
        # ... and written from the queue's head when granted
        sp, ix = self.spad, self.idx
        gnt = Mux(w_hd.idx, self.idx_wr_gnt, self.spad_gnt)
        wrq.grant(gnt)
        m.d.comb += [self.spad_wr_req.eq(wrq.r_rdy & ~w_hd.idx),
                     self.idx_wr_req.eq(wrq.r_rdy & w_hd.idx),
                     sp.wr_en.eq(wrq.r_rdy & ~w_hd.idx & self.spad_gnt),
                     sp.wr_addr.eq(w_hd.addr), sp.wr_mask.eq(w_hd.mask),
                     sp.wr_data.eq(w_hd.data),
                     ix.wr_en.eq(wrq.r_rdy & w_hd.idx & self.idx_wr_gnt),
                     ix.wr_addr.eq(w_hd.addr),
                     ix.wr_data.a.eq(w_hd.entry[:32]), ix.wr_data.b.eq(w_hd.entry[32:])]
        m.d.comb += self.dram_rd_inc.eq(consumed)
        with m.If(emit):
            m.d.sync += [chip.eq(chip + k), el_left.eq(el_next), el_nz.eq(el_left != k),
                         k.eq(chunk_of(el_next))]
            with m.If(el_left == k):
                m.d.sync += have.eq(0)

        # span-list reads of the sequencer
        m.d.comb += [ix.rd_en.eq(seq.idx_rd_en), ix.rd_addr.eq(seq.idx_rd_addr),
                     self.idx_rd_req.eq(seq.idx_rd_req),
                     seq.idx_rd_data.eq(ix.rd_data)]

        # ---- control ------------------------------------------------------------------------
        busy = Signal()
        gen_done = Signal()
        err = Signal(ErrorCode)
        bus_err = Signal()
        with m.If(take & (ax.rresp[1] != 0)):
            m.d.sync += bus_err.eq(1)
        m.d.comb += [ctl.busy.eq(busy), ctl.sat_inc.eq(0),
                     ctl.error.eq(Mux(bus_err & (err == ErrorCode.OK), ErrorCode.DRAM_RANGE, err))]
        with m.If(ctl.start):
            m.d.sync += [busy.eq(1), gen_done.eq(0), err.eq(ErrorCode.OK), bus_err.eq(0)]
        with m.If(seq.finished):
            m.d.sync += [gen_done.eq(1), err.eq(seq.error)]
        drained = gen_done & runs.empty & ~ar_busy & dq.empty & ~have & ~wrq.r_rdy
        with m.If(busy & drained):
            m.d.comb += ctl.done.eq(1)
            m.d.sync += busy.eq(0)
        return m


class StoreUnit(_DmaUnit):
    """STORE: scratchpad (I8, U8 saturating; I16) or index memory (I32) -> DRAM.

    Ports
    -----
    ctl : In(UnitControl())
        ``sat_inc`` counts the I8/U8 elements that saturate.
    axi_w : Out(AxiWrite(config.bus_bits))
        AXI4 write master; addresses are relative to the DRAM window.
    spad : Out(SpadPort(config))
        Lanes-wide reads.
    idx : Out(IdxPort(config))
        Span-list and entry reads.
    regs : Out(RegPort())
        Read only.
    window : In(WINDOW_BITS)
    dram_wr_inc : Out
        Bytes of stored elements this cycle (the ``dram_write_bytes`` counter).
    """

    OPCODES = (isa.Opcode.STORE,)

    #: Cycles from an index-memory entry read to its chunk in the chunk FIFO's write port: the
    #: memory's read latency and a register. The memory's read data, across the chip from the
    #: shared port, went through the element-type multiplexer into the FIFO's LUT RAM in one
    #: cycle (17.3 ns in the 94e8aa3 build's routed model).
    IDX_DATA_LATENCY = IDX_READ_LATENCY + 1

    def __init__(self, config):
        cfg = get_config(config)
        super().__init__(cfg, "axi_w", AxiWrite(cfg.bus_bits), "dram_wr_inc")

    def elaborate(self, platform):
        cfg, lanes, bb, chunk = self._cfg, self._lanes, self._bb, self._chunk
        bb_log = bb.bit_length() - 1
        cap = bb + chunk
        m = Module()
        seq, f, runs = self._sequencer(m)
        es_log = Signal(2)
        m.d.comb += es_log.eq(_es_log(f.dtype))
        ctl = self.ctl
        ax = self.axi_w
        is_idx = f.mem == Mem.IDX

        rl = run_layout(cfg)
        awq = _Fifo(m, "awq", rl, 4)      # runs for the AW issuer
        rdq = _Fifo(m, "rdq", rl, 4)      # runs for the chunk reader
        push = Signal()
        m.d.comb += [push.eq(runs.r_rdy & awq.w_rdy & rdq.w_rdy), runs.r_en.eq(push)]
        m.d.comb += [awq.w_data.eq(runs.r_data), rdq.w_data.eq(runs.r_data),
                     awq.w_en.eq(push), rdq.w_en.eq(push)]

        # per run: first-beat offset, bytes, and the first beat's bytes min(nbytes, bb - off)
        # (computed on the way in: in front of the strobes it was 11.8 ns, pre-route estimate)
        wrun_layout = data.StructLayout({"off": range(bb), "nbytes": 20, "nb0": range(bb + 1)})
        wq = _Fifo(m, "wrunq", wrun_layout, 4)
        # per burst: its last beat's number (beats - 1), so that wlast is one compare of
        # registers (beat_no + 1 == beats, an adder before it, ran into the queue's level:
        # 12.4 ns pre-route estimate)
        bq = _Fifo(m, "burstq", data.StructLayout({"last": 8}), 8)

        # ---- AW issuer ----------------------------------------------------------------------
        aw_busy = Signal()
        aw_addr = Signal(33)
        aw_left = Signal(21)            # beats of the run not issued yet
        beats, nxt, b_start, b_step = _burst_beats(m, aw_addr, aw_left, bb)
        outstanding = Signal(range(1 << 16))
        m.d.comb += [ax.awaddr.eq(aw_addr & ~(bb - 1)), ax.awlen.eq(beats - 1),
                     ax.awsize.eq(bb_log), ax.awburst.eq(1), ax.awid.eq(0),
                     ax.awvalid.eq(aw_busy & bq.w_rdy)]
        nbytes = Signal(20)
        m.d.comb += nbytes.eq(awq.r_data.n << es_log)
        off_in = Signal(range(bb))
        m.d.comb += off_in.eq(awq.r_data.dram[:bb_log] if bb_log else 0)
        with m.If(~aw_busy & awq.r_rdy & wq.w_rdy):
            m.d.comb += [awq.r_en.eq(1), wq.w_en.eq(1),
                         wq.w_data.off.eq(off_in), wq.w_data.nbytes.eq(nbytes),
                         wq.w_data.nb0.eq(Mux(nbytes < bb - off_in, nbytes, bb - off_in))]
            m.d.sync += ([aw_busy.eq(1), aw_addr.eq(awq.r_data.dram),
                         aw_left.eq(_run_beats(awq.r_data.dram, nbytes, bb))] +
                        b_start(awq.r_data.dram))
        aw_go = ax.awvalid & ax.awready
        m.d.comb += [bq.w_en.eq(aw_go), bq.w_data.last.eq(beats - 1)]
        with m.If(aw_go):
            m.d.sync += [aw_addr.eq(nxt), aw_left.eq(aw_left - beats)] + b_step()
            with m.If(aw_left == beats):
                m.d.sync += aw_busy.eq(0)
        m.d.comb += ax.bready.eq(1)
        b_go = ax.bvalid & ax.bready
        m.d.sync += outstanding.eq(outstanding + aw_go - b_go)
        bus_err = Signal()
        with m.If(b_go & (ax.bresp[1] != 0)):
            m.d.sync += bus_err.eq(1)

        # ---- chunk reader -------------------------------------------------------------------
        lat = SPAD_READ_LATENCY
        depth = lat + 3
        chunk_layout = data.StructLayout({"data": chunk * 8, "nbytes": range(chunk + 1)})
        cq = _Fifo(m, "chunkq", chunk_layout, depth)
        credits = Signal(range(depth + 1), init=depth)
        # The grant arrives late (the running COMPUTE unit's read enable, through the owner
        # multiplexer, from anywhere on the chip), so it only lands in a register (gnt_q): a
        # read request goes out from the state *as of the previous request's outcome*. The
        # registers hold the state before that outcome and its successor if it was accepted
        # (r_chip_k, r_left_k, last_q); ``acc`` picks one. Cycle for cycle the same reads as
        # taking the grant into the state directly.
        r_have = Signal()
        r_chip = Signal(isa.SPAD_ADDR)
        r_left = Signal(isa.COUNT + 1)
        r_chip_k = Signal(isa.SPAD_ADDR)
        r_left_k = Signal(isa.COUNT + 1)
        last_q = Signal()
        req_q = Signal()
        gnt_q = Signal()
        k_q = Signal(range(lanes + 1))
        acc = Signal()                     # the previous cycle's request was granted
        m.d.comb += acc.eq(req_q & gnt_q)
        have_e = Signal()
        chip_e = Signal(isa.SPAD_ADDR)
        left_e = Signal(isa.COUNT + 1)
        m.d.comb += [have_e.eq(r_have & ~(acc & last_q)),
                     chip_e.eq(Mux(acc, r_chip_k, r_chip)),
                     left_e.eq(Mux(acc, r_left_k, r_left))]
        credits_ok = Mux(acc, credits > 1, credits != 0)

        def k_of(left):
            return Mux(is_idx, 1, Mux(left < lanes, left, lanes))

        # The request's element count for both outcomes of the previous request, picked by
        # ``acc``. The successor state (r_chip_k, r_left_k) is used only if this request is
        # not the run's last, and then its count is a full one (``step``): so it is the
        # state plus or minus ``step`` for both outcomes, picked at the end. Through ``acc``,
        # ``left_e``'s compare and the count, the addition ran into r_chip_k (12.9 ns, routed,
        # 9168795).
        k0, k1 = k_of(r_left), k_of(r_left_k)
        k = Signal(range(lanes + 1))
        m.d.comb += k.eq(Mux(acc, k1, k0))
        step = Mux(is_idx, 1, lanes)

        def last_of(left):
            # left == k (this request is the run's last), without k: computed for both
            # values of left_e and picked by ``acc`` (through k it was 10.6 ns into last_q)
            return Mux(is_idx, left == 1, left <= lanes)

        issue = Signal()                   # a read request (granted or not)
        m.d.comb += issue.eq(have_e & credits_ok & ~seq.idx_rd_req)
        m.d.sync += [req_q.eq(issue), gnt_q.eq(Mux(is_idx, self.idx_rd_gnt, self.spad_gnt)),
                     k_q.eq(k), last_q.eq(Mux(acc, last_of(r_left_k), last_of(r_left))),
                     r_chip_k.eq(Mux(acc, r_chip_k + step, r_chip + step)),
                     r_left_k.eq(Mux(acc, r_left_k - step, r_left - step))]
        with m.If(~have_e & rdq.r_rdy):
            m.d.comb += rdq.r_en.eq(1)
            m.d.sync += [r_have.eq(1), r_chip.eq(rdq.r_data.chip), r_left.eq(rdq.r_data.n)]
        with m.Else():
            m.d.sync += [r_have.eq(have_e), r_chip.eq(chip_e), r_left.eq(left_e)]
        m.d.sync += credits.eq(credits - acc + cq.r_en)
        sp, ix = self.spad, self.idx
        m.d.comb += [sp.rd_en.eq(issue & ~is_idx), sp.rd_addr.eq(chip_e)]
        m.d.comb += self.idx_rd_req.eq(seq.idx_rd_req)    # (the v2 top's watchdog reads it)
        m.d.comb += [ix.rd_en.eq(Mux(seq.idx_rd_req, seq.idx_rd_en, issue & is_idx)),
                     ix.rd_addr.eq(Mux(seq.idx_rd_req, seq.idx_rd_addr, chip_e)),
                     seq.idx_rd_data.eq(ix.rd_data)]
        # delay line of (valid, k) to the read data: SPAD_READ_LATENCY for the scratchpad,
        # IDX_DATA_LATENCY (the read data registered) for index memory
        assert self.IDX_DATA_LATENCY <= lat
        ix_q = Signal.like(ix.rd_data)
        m.d.sync += ix_q.eq(ix.rd_data)
        pipe_v = [Signal(name=f"pv{i}") for i in range(lat)]
        pipe_k = [Signal(range(lanes + 1), name=f"pk{i}") for i in range(lat)]
        m.d.comb += [pipe_v[0].eq(acc), pipe_k[0].eq(k_q)]
        for i in range(1, lat):
            m.d.sync += [pipe_v[i].eq(pipe_v[i - 1]), pipe_k[i].eq(pipe_k[i - 1])]
        arr_v = Mux(is_idx, pipe_v[self.IDX_DATA_LATENCY - 1], pipe_v[lat - 1])
        arr_k = Mux(is_idx, pipe_k[self.IDX_DATA_LATENCY - 1], pipe_k[lat - 1])

        # conversion
        sat = Signal(range(lanes + 1))
        conv = Signal(chunk * 8)
        sat_terms = []
        with m.Switch(f.dtype):
            with m.Case(DType.I8, DType.U8):
                lo_, hi_ = Mux(f.dtype == DType.I8, -128, 0), Mux(f.dtype == DType.I8, 127, 255)
                for i in range(lanes):
                    v = sp.rd_data[i]
                    under, over = v < lo_, v > hi_
                    m.d.comb += conv.word_select(i, 8).eq(Mux(under, lo_, Mux(over, hi_, v)))
                    sat_terms.append((under | over) & (i < arr_k))
                m.d.comb += sat.eq(sum(sat_terms))
            with m.Case(DType.I16):
                for i in range(lanes):
                    m.d.comb += conv.word_select(i, 16).eq(sp.rd_data[i])
            with m.Case(DType.I32):
                m.d.comb += conv[:64].eq(Cat(ix_q.a, ix_q.b))
        m.d.comb += [cq.w_en.eq(arr_v), cq.w_data.data.eq(conv),
                     cq.w_data.nbytes.eq(arr_k << es_log)]
        m.d.comb += [ctl.sat_inc.eq(Mux(arr_v, sat, 0)),
                     self.dram_wr_inc.eq(Mux(arr_v, arr_k << es_log, 0))]

        # ---- byte packer -> W beats ---------------------------------------------------------
        w_have = Signal()
        tx_left = Signal(20)      # bytes still to send as beats
        # tx_left != 0 as a register: the 20-bit compare in front of wvalid, and so of the
        # byte buffer's 96-bit select, was STORE's ``buf`` path (15.4 ns pre-route estimate)
        tx_nz = Signal()
        acc_left = Signal(20)     # bytes still to take from the chunk FIFO
        # acc_left != 0 as a register (the 20-bit compare in front of ``take``, and so of the
        # count's adders, was the start of STORE's ``cnt`` path, 11.3 ns pre-route estimate)
        acc_nz = Signal()
        # The byte buffer is a ring of a power of two of byte slots (at least cap; at most cap
        # bytes are held): a chunk's bytes are written at the write pointer, a W beat reads
        # its bytes at the read pointer, and no byte moves. As a shift register (drop the
        # beat's bytes, append the chunk's behind the kept ones, both shifts chosen by
        # wvalid & wready) it was the slowest path of the pre-route estimates, 12.5-14.5 ns
        # into ``buf``.
        ring_n = 1 << (cap - 1).bit_length()
        pb = ring_n.bit_length() - 1
        ring = [Signal(8, name=f"ring{j}") for j in range(ring_n)]
        rd_ptr = Signal(pb)
        wr_ptr = Signal(pb)       # wr_ptr - rd_ptr == cnt (mod ring_n)
        cnt = Signal(range(cap + 1))
        beat_no = Signal(9)
        # bytes of the next beat, min(tx_left, bb - skip), kept in a register
        nb = Signal(range(bb + 1))
        nb0 = wq.r_data.nb0        # the first beat's bytes (nb's value when an entry is taken)
        with m.If(~w_have & wq.r_rdy):
            m.d.comb += wq.r_en.eq(1)
            m.d.sync += [w_have.eq(1),
                         tx_left.eq(wq.r_data.nbytes), acc_left.eq(wq.r_data.nbytes),
                         tx_nz.eq(wq.r_data.nbytes != 0), acc_nz.eq(wq.r_data.nbytes != 0)]
            m.d.sync += nb.eq(nb0)
        # The beat's byte k is the buffer's byte rd_ptr + k - skip (skip: the first beat's
        # offset, 0 after it) where its strobe is set, else 0 (so W data stays stable while
        # wvalid waits). The strobes and each lane's slot number are registers, set with
        # ``nb`` and ``rd_ptr``: selecting the bytes at rd_ptr, masking them to ``nb`` and
        # shifting them by ``skip`` after the slot multiplexers was 9 LUTs from rd_ptr to the
        # board's W register slice, through the write arbiter (11.2 ns pre-route estimate).
        strb = Signal(bb)
        lane_slot = [Signal(pb, name=f"lane_slot{k}") for k in range(bb)]

        def _mask(n):
            return (Const(1, bb + 1) << n) - 1

        with m.If(~w_have & wq.r_rdy):
            m.d.sync += [strb.eq(_mask(nb0) << wq.r_data.off)]
            m.d.sync += [s_k.eq(rd_ptr - wq.r_data.off + k) for k, s_k in enumerate(lane_slot)]
        m.d.comb += [ax.wvalid.eq(w_have & tx_nz & (cnt >= nb) & bq.r_rdy),
                     ax.wdata.eq(Cat(*[Mux(strb[k], Array(ring)[s_k], 0)
                                       for k, s_k in enumerate(lane_slot)])),
                     ax.wstrb.eq(strb),
                     ax.wlast.eq(beat_no == bq.r_data.last)]
        w_go = ax.wvalid & ax.wready
        take = Signal()
        m.d.comb += take.eq(w_have & cq.r_rdy & acc_nz &
                            (cnt + cq.r_data.nbytes <= cap))
        m.d.comb += cq.r_en.eq(take)
        # a taken chunk's byte i lands in slot wr_ptr + i; slot j takes byte j - wr_ptr
        assert chunk & (chunk - 1) == 0 and chunk <= ring_n
        cbits = chunk.bit_length() - 1
        new_bytes = _bytes_of(cq.r_data.data, chunk)
        for j, slot in enumerate(ring):
            i_j = Signal(pb, name=f"ring_i{j}")
            m.d.comb += i_j.eq(j - wr_ptr)
            with m.If(take & (i_j < cq.r_data.nbytes)):
                m.d.sync += slot.eq(Array(new_bytes)[i_j[:cbits]] if cbits else new_bytes[0])
        with m.If(take):
            m.d.sync += wr_ptr.eq(wr_ptr + cq.r_data.nbytes)
        with m.If(w_go):
            m.d.sync += rd_ptr.eq(rd_ptr + nb)
        # the count's four outcomes are summed from registers and the late ``w_go`` (W ready,
        # through the write arbiter) and ``take`` pick one at the end (adding after them was
        # the rest of the ``cnt`` path)
        cnt_w = Signal.like(cnt)
        cnt_wt = Signal.like(cnt)
        cnt_t = Signal.like(cnt)
        m.d.comb += [cnt_w.eq(cnt - nb), cnt_wt.eq(cnt - nb + cq.r_data.nbytes),
                     cnt_t.eq(cnt + cq.r_data.nbytes)]
        m.d.sync += cnt.eq(Mux(w_go, Mux(take, cnt_wt, cnt_w), Mux(take, cnt_t, cnt)))
        with m.If(take):
            m.d.sync += [acc_left.eq(acc_left - cq.r_data.nbytes),
                         acc_nz.eq(acc_left != cq.r_data.nbytes)]
        with m.If(w_go):
            rem = tx_left - nb
            nb1 = Signal.like(nb)
            m.d.comb += nb1.eq(Mux(rem < bb, rem, bb))
            m.d.sync += [tx_left.eq(rem), tx_nz.eq(tx_left != nb), beat_no.eq(beat_no + 1),
                         nb.eq(nb1), strb.eq(_mask(nb1))]
            m.d.sync += [s_k.eq(rd_ptr + nb + k) for k, s_k in enumerate(lane_slot)]
            with m.If(ax.wlast):
                m.d.comb += bq.r_en.eq(1)
                m.d.sync += beat_no.eq(0)
            with m.If(tx_left == nb):
                m.d.sync += w_have.eq(0)

        # ---- control ------------------------------------------------------------------------
        busy = Signal()
        gen_done = Signal()
        err = Signal(ErrorCode)
        m.d.comb += [ctl.busy.eq(busy), ctl.error.eq(Mux(bus_err & (err == ErrorCode.OK),
                                                         ErrorCode.DRAM_RANGE, err))]
        with m.If(ctl.start):
            m.d.sync += [busy.eq(1), gen_done.eq(0), err.eq(ErrorCode.OK), bus_err.eq(0)]
        with m.If(seq.finished):
            m.d.sync += [gen_done.eq(1), err.eq(seq.error)]
        drained = (gen_done & runs.empty & awq.empty & rdq.empty & ~aw_busy & ~r_have & cq.empty &
                   ~w_have & wq.empty & bq.empty & (outstanding == 0) &
                   ~Cat(*pipe_v).any())
        with m.If(busy & drained):
            m.d.comb += ctl.done.eq(1)
            m.d.sync += busy.eq(0)
        return m
