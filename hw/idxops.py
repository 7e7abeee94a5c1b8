"""Index-memory units: ROUTE (MoE token queues) and SPANS (block-sparse gather lists).

Both units execute one instruction per ``ctl.start`` pulse (docs/ISA.md, ROUTE and SPANS; the
golden model is ``Machine.op_route`` / ``op_spans`` with ``golden.units.route`` / ``spans``).
Every field and range check happens before the first write, so a faulting instruction leaves the
index memory, the registers and the queue registers as they were.

Control (``hw/ports.py``, ``UnitControl``): ``busy`` is high from the cycle after ``start``
up to the last cycle of the instruction; ``done`` is a one-cycle pulse in the cycle after that
(``busy`` is already low); ``error`` holds the instruction's :class:`~vitamin.isa.ErrorCode`
from the ``done`` cycle until the next ``start``. A ``start`` while busy is ignored.

ROUTE: a counting sort
----------------------
The ``m * k`` routing entries ``(expert, probability)`` are read twice::

    CHECK   the fields (BAD_FIELD); CHECK1 the input's range (IDX_RANGE)
    COUNT   read every entry, cnt[e] += 1 (e >= 0), check -1 <= e < n_experts, count nq
    CHECK2  ROUTE_RANGE, queue entries and queue table (IDX_RANGE), overlap (BAD_FIELD)
    PREFIX  for e < n_experts: ptr[e] = q_addr + run; queue register e = (q_addr + run, cnt[e])
    PLACE   read every entry again, IDX[ptr[e]++] = (token, probability) (e >= 0);
            meanwhile the queue registers of experts n_experts .. max_experts-1 are cleared
    TABLE   for e < n_experts: IDX[qtab_addr + e] = (q_addr + run, cnt[e]); cnt[e] = 0

Entries are read in token order, so each queue fills in ascending token order; the experts'
queues are laid out in ascending expert order by the prefix sums. ``cnt`` and ``ptr`` are
``max_experts``-deep memories (one read, one write port; the read port is transparent, so that
consecutive entries of one expert see each other's increments). ``cnt`` is all zero between
instructions: TABLE clears it, and so does a CLEAR scan after a fault found in CHECK2; after a
reset (which may cut an instruction short) an INIT scan clears all ``max_experts`` counts, and a
``start`` that arrives meanwhile waits for it. The queue
table is written last, after the queue entries, as the golden model does, so the two may
overlap. Cycles from ``start`` to ``done`` of a successful ROUTE (:meth:`RouteUnit.cycles`)::

    2 + (m*k + 4) + 1 + (n_experts + 1) + max(m*k + 4, max_experts - n_experts + 1)
      + (n_experts + 1) + 1
    = 2 * m * k + 2 * n_experts + 14     unless clearing the unused queue registers is longer

e.g. 197 tokens, top-2, 16 experts: 834 cycles. A fault is reported after CHECK (2 cycles),
CHECK1 (3 cycles) or after COUNT and CLEAR (``m*k + n_experts + 9``).

Restriction (the golden model must mirror it): PLACE re-reads the routing input while it writes
queue entries, so the queue entries ``q_addr .. q_addr + nq - 1`` (``nq`` = entries with an
expert >= 0) must not overlap the input ``idx_addr .. idx_addr + m*k - 1``; otherwise ROUTE
faults with ``BAD_FIELD``, checked after the queue table's ``IDX_RANGE``. (The alternative, a copy
of the input, would be as large as the index memory.)

SPANS: a merge over a sorted walk
---------------------------------
The ``k`` block entries are first copied into a local 128-entry list (only blocks >= 0), so the
span output may overlap the input (it is read completely before the first write, as in the golden
model). The selected set is the union of three kinds of pieces: the sink ``[0, sink)``, the
diagonal ``[max(diag_lo, 0), diag_lo + diag_n)`` and one ``[b, b + 1)`` per listed block. A walk
keeps ``x``, the first block not handled yet, and ``L``, the smallest listed block ``>= x`` (found
by a scan of the list; a rescan is needed only after ``L`` itself has been used, because no listed
block lies in ``[x_old, L)``). Each step takes the piece that starts first (``s``; the longest of
those starting at ``s``, ending at ``e``), computes the rows ``s * block`` and ``e * block`` with
one shared 32 x 16 multiplier, stops when ``s * block >= limit``, extends the open span when it
ends at row ``s * block`` and otherwise emits it, and continues from ``x = e``. An emitted span
``[rs, re)`` is written as ``(rs, min(re, limit) - rs)``. This is exactly the golden model's
ascending merge, with no bound on block indices, ``sink``, ``diag_n`` or ``limit``.

The number of spans is at most ``n_l + 2`` (``n_l`` = listed blocks >= 0): every span starts at
block 0, at ``max(diag_lo, 0)`` or at a listed block. When ``out_addr + n_l + 2 <=
idx_entries`` no span can fault, and the walk writes as it goes (one pass); otherwise a first
walk only counts, the count is range-checked (``IDX_RANGE``) and a second walk writes. Cycles
from ``start`` to ``done`` (:meth:`SpansUnit.max_cycles` bounds them)::

    1 + (k + 3)                 check, copy the list (1 cycle for k = 0)
    walk:  (r + 1) * S          scans of the list, S = n_l + 2 (1 when n_l = 0); r = rescans
                                <= distinct listed blocks used
         + 6 * steps + 2        steps <= r + 3 (one per piece taken, plus the final one);
                                6 = SPANS_STEP_CYCLES
    + 3                         registers, done

with two walks when the output lies within ``n_l + 2`` entries of the end of the index memory.
E.g. 8 distinct listed blocks, a sink block and 2 diagonal blocks: 173 cycles (k = 16: 445,
k = 32: 1,373; the scans make it quadratic in k).

Widths: span starts and lengths are written as 32-bit words and ``REG[rows_reg]`` is a signed
32-bit register; ``limit`` must be below 2^31 (``BAD_FIELD`` otherwise, as in the golden model),
so every row number, length and count is exact.
"""

from amaranth.hdl import Cat, Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from vitamin.config import get_config
from vitamin.isa import INSTR_BITS, ErrorCode, Route, Spans

from .dspmul import PRODUCT_LATENCY, staged_product
from .lutmul import lut_mul
from .onehot import onehot_best, onehot_pick
from .ports import IDX_READ_LATENCY, IdxPort, QueuePort, RegPort, UnitControl

__all__ = ["RouteUnit", "SpansUnit", "SPANS_LIST_DEPTH", "SPANS_STEP_CYCLES"]

#: Entries of the SPANS unit's local block list: the ``k`` field has 7 bits.
SPANS_LIST_DEPTH = 1 << data.Layout.cast(Spans)["k"].width
#: Cycles of one step of a SPANS walk: CAND, MUL_S, MUL_E, MUL_W, MUL_P (the staged product's
#: PRODUCT_LATENCY), DECIDE.
SPANS_STEP_CYCLES = 3 + PRODUCT_LATENCY


def _bits(n: int) -> int:
    # Same as hw/ports.py: address bits of an n-entry memory (at least 1).
    return max(1, (n - 1).bit_length())


def _view(fmt, instr):
    """The instruction register seen through its format (the format is narrower than 512)."""
    return data.View(fmt, instr[:data.Layout.cast(fmt).size])


class _Control:
    """Instruction latch, ``busy``/``done``/``error`` of one unit (see the module docstring)."""

    def __init__(self, m, ctl, fmt):
        # reset-less: loaded only at start (it holds its initial value through the power-on
        # reset), and the build flow moves only plain flip-flops into the DSP blocks
        self.instr = Signal(INSTR_BITS, reset_less=True)
        self.f = _view(fmt, self.instr)
        self.done = Signal()
        self.err = Signal(ErrorCode)
        self._m = m
        m.d.sync += self.done.eq(0)
        m.d.comb += [ctl.done.eq(self.done), ctl.error.eq(self.err), ctl.sat_inc.eq(0)]

    def idle(self, ctl, first_state):
        """Body of the IDLE state."""
        m = self._m
        with m.If(ctl.start):
            m.d.sync += [self.instr.eq(ctl.instr), self.err.eq(ErrorCode.OK)]
            m.next = first_state

    def finish(self, code=None):
        """End the instruction (from inside a state): ``done`` next cycle, with ``code``."""
        m = self._m
        m.d.sync += self.done.eq(1)
        if code is not None:
            m.d.sync += self.err.eq(code)
        m.next = "IDLE"


class RouteUnit(wiring.Component):
    """ROUTE: per-expert token queues from top-k routing entries (a counting sort).

    Parameters
    ----------
    config : Config or str
        The accelerator configuration (``idx_entries``, ``max_experts``, ``max_topk``,
        ``max_dim``).

    Ports
    -----
    ctl : In(UnitControl())
        One ROUTE instruction per ``start`` pulse.
    idx : Out(IdxPort(config))
        Index memory: routing input, queue entries, queue table.
    queues : Out(QueuePort(config))
        Expert queue registers; every expert's ``(offset, length)`` is written, experts
        ``>= n_experts`` get ``(0, 0)``. ``queues.q`` is not read.
    """

    def __init__(self, config):
        self._cfg = get_config(config)
        super().__init__({
            "ctl": In(UnitControl()),
            "idx": Out(IdxPort(self._cfg)),
            "queues": Out(QueuePort(self._cfg)),
        })

    def cycles(self, m: int, k: int, n_experts: int) -> int:
        """Cycles from ``start`` to ``done`` of a ROUTE that does not fault."""
        mk = m * k
        place = max(mk + 4, self._cfg.max_experts - n_experts + 1)
        # CHECK, CHECK1, COUNT, CHECK2, PREFIX, PLACE, TABLE, then the done cycle.
        return 2 + (mk + 4) + 1 + (n_experts + 1) + place + (n_experts + 1) + 1

    def elaborate(self, platform):
        cfg = self._cfg
        m = Module()
        n_ent = cfg.idx_entries
        aw = _bits(n_ent) + 1           # counts and addresses 0 .. idx_entries (QueuePort width)
        ctl = _Control(m, self.ctl, Route)
        f = ctl.f
        idx, qp = self.idx, self.queues

        m.submodules.cnt = cnt = Memory(shape=unsigned(aw), depth=cfg.max_experts, init=[])
        m.submodules.ptr = ptr = Memory(shape=unsigned(aw), depth=cfg.max_experts, init=[])
        cnt_w = cnt.write_port()
        cnt_r = cnt.read_port(transparent_for=(cnt_w,))
        ptr_w = ptr.write_port()
        ptr_r = ptr.read_port(transparent_for=(ptr_w,))

        # reset-less: the ECP5 flow moves only plain registers into a DSP block's output
        # register (boards/dspregs.py); loaded in CHECK before any use
        mk = Signal(range(cfg.max_dim * cfg.max_topk + 1), reset_less=True)
        in_room = Signal(signed(len(f.idx_addr) + 2), name="in_room")
        m.d.sync += in_room.eq(n_ent - f.idx_addr)
        ri = Signal.like(mk)                        # entries read so far
        r_go = Signal()                             # == in COUNT or PLACE and ri < mk
        tok = Signal(range(cfg.max_dim))            # token and slot of entry ri
        slot = Signal(range(cfg.max_topk))
        nq = Signal(aw)                             # entries with an expert >= 0
        bad_expert = Signal()
        sc = Signal(range(cfg.max_experts + 1))     # expert scan (PREFIX, TABLE, CLEAR)
        zq = Signal(range(cfg.max_experts + 1))     # queue registers cleared in PLACE
        run = Signal(aw)                            # prefix sum of the queue lengths
        # Pipeline: s1 = the read issued in the previous cycle, s1a = its data in index
        # memory's output register (IDX_READ_LATENCY = 2), s1b = that data registered; s2 =
        # cnt/ptr data.
        assert IDX_READ_LATENCY == 2
        s1_v = Signal()
        s1_tok = Signal.like(tok)
        s1a_v = Signal()
        s1a_tok = Signal.like(tok)
        s2_v = Signal()
        s2_e = Signal(range(cfg.max_experts))
        s2_tok = Signal.like(tok)
        s2_p = Signal(signed(32))
        p_v = Signal()                              # scan pipeline (cnt data valid)
        p_e = Signal(range(cfg.max_experts))
        m.d.sync += [s1_v.eq(0), s2_v.eq(0), p_v.eq(0)]
        # s1b: the entry registered beside this unit before its checks and the cnt/ptr reads
        # (the index memory's data crosses the chip from the shared port)
        s1b_v = Signal()
        s1b_tok = Signal.like(tok)
        e_in = Signal(signed(32))
        p_in = Signal(signed(32))
        m.d.sync += [s1a_v.eq(s1_v), s1a_tok.eq(s1_tok),
                     s1b_v.eq(s1a_v), s1b_tok.eq(s1a_tok), e_in.eq(idx.rd_data.a),
                     p_in.eq(idx.rd_data.b)]
        ne = f.n_experts
        # The entry's checks are flags registered with it (from e_in's compares, the 32-bit
        # ``e_in >= ne`` ran into nq's enable: 12.1 ns routed, seed 5 of 0f1d11e). ne is in
        # 1 .. max_experts here (checked in CHECK), so e >= ne is e >= 0 and (a high bit set
        # or the low bits >= ne).
        ew = cfg.max_experts.bit_length()
        e_rd = idx.rd_data.a
        e_ge0 = Signal()                            # e_in >= 0
        e_bad = Signal()                            # e_in < -1 or e_in >= ne
        m.d.sync += [e_ge0.eq(~e_rd[31]),
                     e_bad.eq(Mux(e_rd[31], ~e_rd.all(),
                                  (e_rd[ew:31] != 0) | (e_rd[:ew] >= ne[:ew])))]
        # The read address (idx_addr + ri) and the read enable (in COUNT or PLACE and ri < mk)
        # are registers set with ri: the enable selects the shared index port, and the
        # compare and adder in front of it reached on through the DMA units' grant.
        issue = Signal()
        r_a = Signal.like(idx.rd_addr)
        m.d.comb += [idx.rd_addr.eq(r_a), issue.eq(r_go), idx.rd_en.eq(r_go)]

        def read_entries():
            with m.If(issue):
                m.d.sync += [ri.eq(ri + 1), r_a.eq(r_a + 1), r_go.eq(ri + 1 < mk), s1_v.eq(1),
                             s1_tok.eq(tok)]
                with m.If(slot == f.k - 1):
                    m.d.sync += [slot.eq(0), tok.eq(tok + 1)]
                with m.Else():
                    m.d.sync += slot.eq(slot + 1)

        def scan_experts():
            """Issue cnt reads for experts 0 .. ne-1; returns "the scan is over"."""
            m.d.comb += cnt_r.addr.eq(sc)
            with m.If(sc < ne):
                m.d.sync += [sc.eq(sc + 1), p_v.eq(1), p_e.eq(sc)]
            # The last expert's data is used in the cycle in which the scan is over.
            return sc == ne

        pend = Signal()     # a start arrived during INIT
        with m.FSM(init="INIT") as fsm:
            with m.State("INIT"):
                # After reset, cnt holds whatever an instruction cut short by the reset left
                # in it (memories are not reset): clear all of it. A start is kept for later.
                m.d.comb += [cnt_w.en.eq(1), cnt_w.addr.eq(sc), cnt_w.data.eq(0)]
                m.d.sync += sc.eq(sc + 1)
                with m.If(self.ctl.start & ~pend):
                    m.d.sync += [ctl.instr.eq(self.ctl.instr), ctl.err.eq(ErrorCode.OK),
                                 pend.eq(1)]
                with m.If(sc == cfg.max_experts - 1):
                    m.d.sync += pend.eq(0)
                    with m.If(pend | self.ctl.start):
                        m.next = "CHECK"
                    with m.Else():
                        m.next = "IDLE"

            with m.State("IDLE"):
                ctl.idle(self.ctl, "CHECK")

            with m.State("CHECK"):
                m.d.sync += [mk.eq(lut_mul(f.m, f.k)), ri.eq(0), tok.eq(0), slot.eq(0), nq.eq(0),
                             bad_expert.eq(0)]
                with m.If((f.m < 1) | (f.m > cfg.max_dim) | (f.k < 1) | (f.k > cfg.max_topk)
                          | (ne < 1) | (ne > cfg.max_experts)):
                    ctl.finish(ErrorCode.BAD_FIELD)
                with m.Else():
                    m.next = "CHECK1"

            with m.State("CHECK1"):
                # The input's range, from the registered m * k: computing the product here
                # (on a DSP block) put it between the instruction register and the state
                # (16.9 ns in the c399bc6 build's routed model).
                # ... compared with n_ent - idx_addr, a register loaded every cycle from the
                # latched fields: ``mk`` sits in its DSP block's output register (the ECP5 flow
                # moves it there), and the adder and compare behind it ran into the state and
                # the instruction register (13.7 ns, 88efb0c build, routed)
                with m.If(mk > in_room):
                    ctl.finish(ErrorCode.IDX_RANGE)
                with m.Else():
                    m.d.sync += [r_a.eq(f.idx_addr), r_go.eq(mk != 0)]
                    m.next = "COUNT"

            with m.State("COUNT"):
                read_entries()
                with m.If(s1b_v):
                    with m.If(e_bad):
                        m.d.sync += bad_expert.eq(1)
                    with m.Elif(e_ge0):
                        m.d.comb += cnt_r.addr.eq(e_in)
                        m.d.sync += [s2_v.eq(1), s2_e.eq(e_in), nq.eq(nq + 1)]
                m.d.comb += [cnt_w.en.eq(s2_v), cnt_w.addr.eq(s2_e),
                             cnt_w.data.eq(cnt_r.data + 1)]
                with m.If(~issue & ~s1_v & ~s1a_v & ~s1b_v):   # the last increment (s2) is
                    # written now
                    m.next = "CHECK2"

            with m.State("CHECK2"):
                m.d.sync += [sc.eq(0), run.eq(0)]
                overlap = ((nq != 0) & (f.q_addr < f.idx_addr + mk)
                           & (f.idx_addr < f.q_addr + nq))
                with m.If(bad_expert):
                    m.d.sync += ctl.err.eq(ErrorCode.ROUTE_RANGE)
                    m.next = "CLEAR"
                with m.Elif((f.q_addr + nq > n_ent) | (f.qtab_addr + ne > n_ent)):
                    m.d.sync += ctl.err.eq(ErrorCode.IDX_RANGE)
                    m.next = "CLEAR"
                with m.Elif(overlap):
                    m.d.sync += ctl.err.eq(ErrorCode.BAD_FIELD)
                    m.next = "CLEAR"
                with m.Else():
                    m.next = "PREFIX"

            with m.State("PREFIX"):
                over = scan_experts()
                with m.If(p_v):
                    m.d.comb += [qp.wr_en.eq(1), qp.wr_addr.eq(p_e),
                                 qp.wr_off.eq(f.q_addr + run), qp.wr_len.eq(cnt_r.data),
                                 ptr_w.en.eq(1), ptr_w.addr.eq(p_e),
                                 ptr_w.data.eq(f.q_addr + run)]
                    m.d.sync += run.eq(run + cnt_r.data)
                with m.If(over):
                    m.d.sync += [ri.eq(0), r_a.eq(f.idx_addr), r_go.eq(mk != 0), tok.eq(0),
                                 slot.eq(0), zq.eq(ne)]
                    m.next = "PLACE"

            with m.State("PLACE"):
                read_entries()
                with m.If(s1b_v & e_ge0):
                    m.d.comb += ptr_r.addr.eq(e_in)
                    m.d.sync += [s2_v.eq(1), s2_e.eq(e_in), s2_tok.eq(s1b_tok), s2_p.eq(p_in)]
                with m.If(s2_v):
                    m.d.comb += [idx.wr_en.eq(1), idx.wr_addr.eq(ptr_r.data),
                                 idx.wr_data.a.eq(s2_tok), idx.wr_data.b.eq(s2_p),
                                 ptr_w.en.eq(1), ptr_w.addr.eq(s2_e),
                                 ptr_w.data.eq(ptr_r.data + 1)]
                with m.If(zq < cfg.max_experts):
                    m.d.comb += [qp.wr_en.eq(1), qp.wr_addr.eq(zq), qp.wr_off.eq(0),
                                 qp.wr_len.eq(0)]
                    m.d.sync += zq.eq(zq + 1)
                with m.If(~issue & ~s1_v & ~s1a_v & ~s1b_v & (zq == cfg.max_experts)):
                    m.d.sync += [sc.eq(0), run.eq(0)]
                    m.next = "TABLE"

            with m.State("TABLE"):
                over = scan_experts()
                with m.If(p_v):
                    m.d.comb += [idx.wr_en.eq(1), idx.wr_addr.eq(f.qtab_addr + p_e),
                                 idx.wr_data.a.eq(f.q_addr + run), idx.wr_data.b.eq(cnt_r.data),
                                 cnt_w.en.eq(1), cnt_w.addr.eq(p_e), cnt_w.data.eq(0)]
                    m.d.sync += run.eq(run + cnt_r.data)
                with m.If(over):
                    ctl.finish()

            with m.State("CLEAR"):
                # After a fault found in CHECK2: zero the counts of COUNT (experts < ne only).
                m.d.comb += [cnt_w.en.eq(sc < ne), cnt_w.addr.eq(sc), cnt_w.data.eq(0)]
                m.d.sync += sc.eq(sc + 1)
                with m.If(sc >= ne):
                    ctl.finish()

        m.d.comb += self.ctl.busy.eq(~fsm.ongoing("IDLE") & ~fsm.ongoing("INIT") | pend)
        return m


class SpansUnit(wiring.Component):
    """SPANS: selected blocks -> ascending merged row spans (a sorted walk, see module docstring).

    Parameters
    ----------
    config : Config or str
        The accelerator configuration (``idx_entries``).

    Ports
    -----
    ctl : In(UnitControl())
        One SPANS instruction per ``start`` pulse.
    idx : Out(IdxPort(config))
        Index memory: block list input, span output.
    regs : Out(RegPort())
        ``REG[dst_reg]`` <- number of spans, then ``REG[rows_reg]`` <- total rows (a register
        field of 0 is not written). ``regs.regs`` is not read.
    """

    def __init__(self, config):
        self._cfg = get_config(config)
        super().__init__({
            "ctl": In(UnitControl()),
            "idx": Out(IdxPort(self._cfg)),
            "regs": Out(RegPort()),
        })

    @staticmethod
    def max_cycles(k: int, walks: int = 2) -> int:
        """Upper bound of the cycles from ``start`` to ``done`` of a SPANS of ``k`` entries
        (``walks = 1`` when ``out_addr + k + 2 <= idx_entries``)."""
        walk = (k + 1) * (k + 2) + SPANS_STEP_CYCLES * (k + 3) + 2
        return 1 + (k + 3) + walks * walk + 3

    def elaborate(self, platform):
        cfg = self._cfg
        m = Module()
        n_ent = cfg.idx_entries
        ctl = _Control(m, self.ctl, Spans)
        f = ctl.f
        idx, rp = self.idx, self.regs
        depth = SPANS_LIST_DEPTH

        m.submodules.lst = lst = Memory(shape=unsigned(31), depth=depth, init=[])
        lst_w = lst.write_port()
        lst_r = lst.read_port()

        diag_lo = f.diag_lo.as_signed()
        block = f.block
        limit = f.limit

        ri = Signal(range(depth + 1))      # entries of IDX read (LOAD), list entries read (SCAN)
        s1_v = Signal()
        n_l = Signal(range(depth + 1))     # listed blocks >= 0
        emit = Signal()                    # this walk writes its spans
        x = Signal(32)                     # first block not handled yet
        lo = Signal(31)                    # smallest listed block >= x, when lo_ok
        lo_ok = Signal()
        e = Signal(32)
        has = Signal()
        ps = Signal(48)                    # s * block, e * block
        pe = Signal(48)
        open_ = Signal()                   # a span [rs, re) (rows, re unclipped) is open
        rs = Signal(48)
        re = Signal(48)
        count = Signal(range(depth + 3))
        walk_over = Signal()               # out_addr + count > idx_entries, for the end
        rows = Signal(32)
        m.d.sync += s1_v.eq(0)
        l_v = Signal()                     # LOAD: a read issued in the previous cycle
        m.d.sync += l_v.eq(0)
        s2_v = Signal()                    # lst_d holds the entry read two cycles ago
        lst_d = Signal(31)
        m.d.sync += [s2_v.eq(s1_v), lst_d.eq(lst_r.data)]

        # Pieces starting at or after x: sink [x, sink), diagonal [max(x, dlo), dend), list
        # [lo, lo + 1). All values are below 2^32 (dend <= 2^31 - 1 + 65535).
        # dlo, dend and dlo < dend are registers loaded every cycle from the fields (constant
        # while the unit runs; CAND comes three or more cycles after the start): the adder and
        # compare from the instruction register ran into ``s`` (12.3 ns, pre-route estimate)
        dlo = Signal(32)
        dend = Signal(signed(34))
        diag_ok = Signal()
        m.d.sync += [dlo.eq(Mux(diag_lo < 0, 0, diag_lo)), dend.eq(diag_lo + f.diag_n)]
        m.d.sync += diag_ok.eq(dlo < dend)
        x_gt_dlo = Signal()
        m.d.comb += x_gt_dlo.eq(x > dlo)
        pieces = [
            (x < f.sink, x, f.sink),
            ((x < dend) & diag_ok, Mux(x_gt_dlo, x, dlo), dend[:32]),
            (lo_ok, lo, lo + 1),
        ]
        # c_s: the smallest start of a present piece; c_e: the largest end among the pieces
        # starting there. Every comparison runs in parallel (one-hot selection): as chains of
        # running minima and maxima they were the unit's slowest path.
        first = onehot_best([(h, st) for h, st, _ in pieces])
        c_has = pieces[0][0] | pieces[1][0] | pieces[2][0]
        # The end is chosen a cycle later (MUL_S, for MUL_E) from the pieces as CAND registered
        # them: start and end selection in one cycle were the unit's slowest path (16.8 ns
        # before placement).
        pr = [(Signal(name=f"pc_h{i}"), Signal(33, name=f"pc_s{i}"), Signal(33, name=f"pc_e{i}"))
              for i in range(len(pieces))]
        first_r = [Signal(name=f"pc_first{i}") for i in range(len(pieces))]
        cand_regs = [r.eq(v) for (rh, rs_, re_), (h, st, en) in zip(pr, pieces)
                     for r, v in ((rh, h), (rs_, st), (re_, en))]
        cand_regs += [r.eq(w) for r, w in zip(first_r, first)]
        # The pieces' pairwise relations, registered in CAND with them: equal starts and
        # larger ends (compared in MUL_S from the registered pieces, the 33-bit compares and
        # the selection behind them were 11.4-11.7 ns into ``e_sel``, pre-route estimate).
        # The diagonal's start max(x, dlo) is compared as both of its values, and the compare
        # ``x > dlo`` picks the result (the carry chain, the 32-bit selection and the
        # equality in a row were 10.9 ns into ``pc_seq12``, pre-route estimate).
        start_eq = {(0, 1): x_gt_dlo | (x == dlo), (0, 2): x == lo,
                    (1, 2): Mux(x_gt_dlo, x == lo, dlo == lo)}
        n_pc = len(pieces)
        s_eq, e_gt = {}, {}
        for i in range(n_pc):
            for j in range(n_pc):
                if i < j:
                    s_eq[i, j] = s_eq[j, i] = Signal(name=f"pc_seq{i}{j}")
                    cand_regs.append(s_eq[i, j].eq(start_eq[i, j]))
                if i != j:
                    e_gt[i, j] = Signal(name=f"pc_egt{i}{j}")
                    cand_regs.append(e_gt[i, j].eq(pieces[i][2] > pieces[j][2]))
        # MUL_S registers which piece's end that is (e_sel, one-hot), MUL_E picks it: the
        # compares and the 33-bit selection into ``e`` in one cycle were 15.8-16.1 ns in the
        # 94e8aa3 build's routed model.
        e_sel = Signal(len(pr))
        sel_next = Const(0, len(pr))
        for i in range(n_pc):
            # among the pieces that start where piece i does, the largest end (candidates are
            # piece numbers; ``better`` looks their ends' relation up)
            ends = onehot_best([(pr[j][0] & (s_eq[i, j] if j != i else 1), j)
                                for j in range(n_pc)],
                               better=lambda a, b: e_gt[a, b])
            sel_next = sel_next | Mux(first_r[i], Cat(*ends), 0)
        c_e = onehot_pick(list(e_sel), [e for _, _, e in pr], 33)
        # The step's piece starts at c_s, picked in MUL_S from the pieces as CAND registered
        # them (its flags ``first_r`` too): picked in CAND, after the compares that choose the
        # pieces and those that choose the first, it was 15.3 ns into ``s`` (e30bab3 build,
        # routed). When no piece is left (``has`` = 0) the product is not used.
        c_s = onehot_pick(first_r, [st for _, st, _ in pr], 33)

        # DECIDE's three conditions, registered in MUL_P (has, open_, re, lo, lo_ok and e, set
        # in MUL_E, do not change before DECIDE): the 48-bit compares of ps, in front of the
        # index memory's write enable and LOAD's write grant, were 16.7 ns in the c399bc6
        # build's routed model
        d_stop = Signal()                  # ~has | ps >= limit: the walk is over
        d_ext = Signal()                   # the piece extends the open span
        d_rescan = Signal()                # the list must be scanned again from e
        # c_s * block and e * block: one staged product (a register on each side of its DSP
        # blocks, PRODUCT_LATENCY cycles). In one combinational stage (the state selecting the
        # operand, the DSP 3.2 ns away, 3.3 ns back, a 48-bit carry chain into pe) it was the
        # dc9338d build's routed critical path (16.87 ns).
        assert PRODUCT_LATENCY == 3     # MUL_S, MUL_E, MUL_W, MUL_P below
        mul_a = Signal(32)
        # c_s unless MUL_E sets c_e (the product of other states is not used): with 0 as the
        # default, Yosys gave the operand register a synchronous reset, and the build flow
        # moves only plain flip-flops into the DSP blocks
        m.d.comb += mul_a.eq(c_s)
        prod = staged_product(m, mul_a, block, en=1, name="span_prod", shape=unsigned(48))
        m.d.comb += pe.eq(prod)         # e * block, in DECIDE

        # The span write: its enable is a register (wr_go), set in the state before the one
        # that writes (MUL_P for DECIDE, DECIDE for FLUSH), and the address and data are on the
        # port in every state: from the state decode, the enable reached the shared port's
        # multiplexer and LOAD's write grant (12.5 ns, pre-route estimate).
        wr_go = Signal()
        m.d.sync += wr_go.eq(0)
        # The open span's clipped length, a register computed from rs and re in every cycle:
        # they never change in the cycle before a span is written or counted (MUL_P before
        # DECIDE, DECIDE with d_stop before FLUSH), so it is current whenever it is used. (The
        # compare, the clip and the subtraction in front of ``rows + length`` were 14.8 ns
        # into ``rows``, e30bab3 build, routed.)
        length = Signal(32)
        m.d.sync += length.eq(Mux(re < limit, re, limit) - rs)
        m.d.comb += [idx.wr_en.eq(wr_go), idx.wr_addr.eq(f.out_addr + count),
                     idx.wr_data.a.eq(rs[:32]), idx.wr_data.b.eq(length)]

        def emit_span():
            m.d.sync += [count.eq(count + 1), rows.eq(rows + length)]

        def start_walk():
            m.d.sync += [x.eq(0), lo_ok.eq(0), open_.eq(0), count.eq(0), rows.eq(0), ri.eq(0)]
            m.next = "SCAN"

        # The index memory's read address is a register (idx_addr + ri), on the port in every
        # state (the memory reads every cycle; only LOAD takes the data): the state decode, the
        # adder and the compare in front of the shared port's multiplexer were 14.1 ns into
        # the block RAMs' address (pre-route estimate of 0fb80e8).
        # Its read enable, which selects the shared port's address for this unit, is a register
        # too: rd_go == (in LOAD and ri < k).
        rd_a = Signal.like(idx.rd_addr)
        rd_go = Signal()
        m.d.comb += [idx.rd_addr.eq(rd_a), idx.rd_en.eq(rd_go)]   # outside the state machine

        # The register-file writes (REG_DST, REG_ROWS) leave registers set in the state before:
        # from the state decode through the register file's owner multiplexer and address
        # decode they were 13.8 ns into the register file (502 flip-flops; 88efb0c build,
        # routed). count and rows are final one state before each write.
        rg_en = Signal(name="rg_en")
        rg_addr = Signal.like(rp.wr_addr, name="rg_addr")
        rg_data = Signal.like(rp.wr_data, name="rg_data")
        m.d.sync += rg_en.eq(0)
        m.d.comb += [rp.wr_en.eq(rg_en), rp.wr_addr.eq(rg_addr), rp.wr_data.eq(rg_data)]

        with m.FSM() as fsm:
            with m.State("IDLE"):
                ctl.idle(self.ctl, "CHECK")

            with m.State("CHECK"):
                m.d.sync += [ri.eq(0), n_l.eq(0), rd_a.eq(f.idx_addr)]
                with m.If((block == 0) | limit[31]):   # limit must be below 2^31 (golden)
                    ctl.finish(ErrorCode.BAD_FIELD)
                with m.Elif(f.idx_addr + f.k > n_ent):
                    ctl.finish(ErrorCode.IDX_RANGE)
                with m.Else():
                    m.d.sync += rd_go.eq(f.k != 0)
                    m.next = "LOAD"

            with m.State("LOAD"):
                # l_v: a read issued in the previous cycle; s1_v: its data on the port
                # (IDX_READ_LATENCY = 2, the second cycle in index memory's output register)
                assert IDX_READ_LATENCY == 2
                m.d.sync += s1_v.eq(l_v)
                with m.If(rd_go):
                    m.d.sync += [ri.eq(ri + 1), rd_a.eq(rd_a + 1), rd_go.eq(ri + 1 < f.k),
                                 l_v.eq(1)]
                with m.If(s1_v & (idx.rd_data.a >= 0)):
                    m.d.comb += [lst_w.en.eq(1), lst_w.addr.eq(n_l),
                                 lst_w.data.eq(idx.rd_data.a)]
                    m.d.sync += n_l.eq(n_l + 1)
                # all k read: ~rd_go (rd_go == ri < k, and ri <= k here); the 16-bit compare
                # ri == k ran through start_walk's enables into ``x`` (11.4 ns pre-route)
                with m.If(~rd_go & ~l_v & ~s1_v):
                    m.d.sync += emit.eq(f.out_addr + n_l + 2 <= n_ent)
                    start_walk()

            with m.State("SCAN"):
                # lo = smallest listed block >= x (lo_ok = 0 on entry). The entry read is
                # registered (lst_d, s2_v) before the compares: the list RAM's clock-to-output
                # time and both 32-bit compares in one cycle were 17.0 ns (routed model of
                # the f892a67 build).
                m.d.comb += lst_r.addr.eq(ri)
                with m.If(ri < n_l):
                    m.d.sync += [ri.eq(ri + 1), s1_v.eq(1)]
                with m.If(s2_v & (lst_d >= x) & (~lo_ok | (lst_d < lo))):
                    m.d.sync += [lo.eq(lst_d), lo_ok.eq(1)]
                with m.If((ri == n_l) & ~s1_v):     # the last entry is compared now
                    m.next = "CAND"

            with m.State("CAND"):
                m.d.sync += [has.eq(c_has)] + cand_regs
                m.next = "MUL_S"

            with m.State("MUL_S"):
                m.d.sync += e_sel.eq(sel_next)
                m.next = "MUL_E"

            with m.State("MUL_E"):
                m.d.comb += mul_a.eq(c_e)
                m.d.sync += e.eq(c_e)
                m.next = "MUL_W"

            with m.State("MUL_W"):
                m.next = "MUL_P"

            with m.State("MUL_P"):
                # prod = s * block now (e * block in DECIDE)
                stop = ~has | (prod >= limit)
                ext = open_ & (prod == re)
                m.d.sync += [ps.eq(prod), d_stop.eq(stop), d_ext.eq(ext),
                             d_rescan.eq(lo_ok & (lo < e)),
                             wr_go.eq(~stop & ~ext & open_ & emit)]   # DECIDE's emit_span()
                m.next = "DECIDE"

            with m.State("DECIDE"):
                with m.If(d_stop):
                    m.d.sync += wr_go.eq(open_ & emit)                # FLUSH's emit_span()
                    m.next = "FLUSH"
                with m.Else():
                    with m.If(d_ext):
                        m.d.sync += re.eq(pe)
                    with m.Else():
                        with m.If(open_):
                            emit_span()
                        m.d.sync += [rs.eq(ps), re.eq(pe), open_.eq(1)]
                    m.d.sync += x.eq(e)
                    with m.If(d_rescan):
                        m.d.sync += [ri.eq(0), lo_ok.eq(0)]
                        m.next = "SCAN"
                    with m.Else():
                        m.next = "CAND"

            with m.State("FLUSH"):
                with m.If(open_):
                    emit_span()
                # WALKED's range check, from the count as it will be there (+1 for the span
                # emitted now): in WALKED, the adder and compare chose the next state and
                # start_walk's clears (11.8 ns into SPANS' ``x``, 90718e9 build, routed)
                m.d.sync += walk_over.eq(f.out_addr + count + open_ > n_ent)
                m.next = "WALKED"

            with m.State("WALKED"):
                with m.If(emit):
                    m.d.sync += [rg_en.eq(f.dst_reg != 0), rg_addr.eq(f.dst_reg),
                                 rg_data.eq(count)]
                    m.next = "REG_DST"
                with m.Elif(walk_over):
                    ctl.finish(ErrorCode.IDX_RANGE)
                with m.Else():
                    m.d.sync += emit.eq(1)
                    start_walk()

            with m.State("REG_DST"):
                m.d.sync += [rg_en.eq(f.rows_reg != 0), rg_addr.eq(f.rows_reg),
                             rg_data.eq(rows)]
                m.next = "REG_ROWS"

            with m.State("REG_ROWS"):
                ctl.finish()

        m.d.comb += self.ctl.busy.eq(~fsm.ongoing("IDLE"))
        return m
