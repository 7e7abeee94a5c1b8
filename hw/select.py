"""SELECT: DHSA budgeted key selection (docs/ISA.md, SELECT; golden ``Machine.op_select`` with
``golden.units.select``).

One instruction per ``ctl.start`` pulse, with the ``busy``/``done``/``error`` handshake of the
index-memory units (:mod:`vitamin.hw.idxops`): ``busy`` from the cycle after ``start`` up to the
last cycle of the instruction, ``done`` one cycle after that. Every check happens before the
first write, so a faulting SELECT leaves the index memory and the registers as they were.

Micro-architecture (sequential, one memory of chunk entries)
-------------------------------------------------------------
A local memory ``chunks`` of ``cfg.idx_entries`` entries (the largest chunk list: the whole index
memory, so no extra limit) holds per candidate chunk ``(avail, score, lo, n, t)``. Phases::

    CHECK   (two cycles: the count and the field checks are registered, then checked) fields
            (BAD_FIELD), count register >= 0 (BAD_FIELD), chunk list (IDX_RANGE), score
            region (SPAD_RANGE); F = [0, sk) U [rs, limit) and R = budget - |F|
    LIST    read the cnt chunk starts (one per cycle, each registered before its checks),
            check >= 0 and strictly ascending; chunk c = [a_c, min(a_(c+1), limit)) with
            a_c < limit goes to chunks[c] as (lo = a_c, n = length); N = number of candidates
            (a prefix of the list)
    LAST    the last chunk (ends at seq); BAD_FIELD here if a start was out of order
    SCORE   (one cycle to register the first entry; each next entry is read ahead)
            for c < N: scratchpad reads of spad_lanes words from in_addr + a_c (ceil(l /
            spad_lanes) reads, lanes beyond the chunk masked), summed exactly; then
            (r, k) = rsqrt_norm(l) from the shared interpolated ROM (hw/rom.py, contents from
            golden/tables.py), score = rnd(S * r, 15 + k); chunks[c] <- (n' > 0, score, lo',
            n', 0) with [lo', lo' + n') the chunk's tokens outside F. Chunks follow each other
            without a gap; the score pipeline is fully pipelined (one chunk per cycle).
    SELECT  while R > 0: scan the N entries (one per cycle) for the best available one
            (highest score, the first of equal ones); take t = min(R, n') of it
            (chunks[c].t <- t, avail <- 0), R -= t; stop when R = 0 or none is left
    WALK    merge the pieces [0, sk), [lo'_c, lo'_c + t_c) (c ascending), [rs, limit) into
            spans (each entry registered before the merge): a first walk counts them
            (out_addr + spans <= idx_entries, else IDX_RANGE), a second one writes them
    REGS    REG[dst_reg] <- spans, then REG[rows_reg] <- rows (rows win when equal)

Cycles from ``start`` to ``done`` of a SELECT that does not fault (:meth:`SelectUnit.cycles`,
exact; :func:`select_cycles` derives its arguments from the instruction and the data)::

    4 + (cnt + 1 + 3 * (cnt > 0))                   CHECK, CHECK2, LIST, LAST, first entry
    + (N > 0) * (1 + sum_c ceil(l_c / spad_lanes) + SCORE_DRAIN)    SCORE
    + 1 + iters * (N + 3)                           SELECT: start, scans
    + 2 * (N + 5 + (N > 0))                         two walks
    + 3                                             registers, done
    = cnt + 9 + 3 * (cnt > 0) + (N > 0) * (sum_c ceil(l_c / spad_lanes) + 19) + iters * (N + 3)
      + 2 * (N + 5)

with ``l_c`` the clipped chunk lengths, ``SCORE_DRAIN`` the depth of the score pipeline (16) and
``iters`` the number of scans: 0 when ``R <= 0`` or ``N = 0``, else the number of chunks that
give tokens plus 1 when the budget is not used up by them. A fault is reported after CHECK2
(3 cycles), after LAST (``cnt + 5 + 3 * (cnt > 0)``) or after the counting walk. E.g. 32
chunks of 128 tokens (4096 keys, all below the limit), budget 1024 with 128 sink and 128 recent
tokens, 16 lanes: 44 + SCORE 32 * 8 + 19 + 6 scans of 35 + walks 74 = 603 cycles.

Watchdog: the SELECT scans and the walks' reads use only the unit's own memory, which the
accelerator's watchdog does not see as progress. A SELECT whose selection phase exceeds the
WATCHDOG register (reset value ``cfg.watchdog_cycles``, 2^20) halts with ``WATCHDOG``: e.g. more
than about 1000 candidate chunks that are all taken. DHSA sizes are far below (4096 keys in
16-token chunks, budget 1024: at most 64 scans of 259 cycles). Such a program must raise or
disable (0) the watchdog. The scans are quadratic in the chunk count; a sorting network would
make them linear if large chunk counts become common.

Widths: chunk lengths are at most ``spad_words`` (the score region lies in the scratchpad), so
a chunk sum fits ``17 + bits(spad_words)`` bits and ``|score| < 2^28``; starts, lengths and the
row count are below ``limit < 2^31``.
"""

from amaranth.hdl import Cat, Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from vitamin.config import get_config
from vitamin.golden import units
from vitamin.golden.tables import make_table, table_spec
from vitamin.isa import ErrorCode, Opcode, Select

from .idxops import _Control
from .lutmul import lut_mul
from .mem import NOINIT_ATTR
from .onehot import msb_index
from .ports import (
    IDX_READ_LATENCY,
    SPAD_READ_LATENCY,
    IdxPort,
    RegPort,
    SpadPort,
    UnitControl,
    spad_lanes,
)
from .rom import INTERP_LATENCY, build_interp, interp_input_bits

__all__ = ["SelectUnit", "select_cycles", "SCORE_DRAIN"]

#: Cycles from the last scratchpad read of the SCORE phase to the end of the phase: the request
#: register, read latency, the masked words' register, the sum, the table pipeline, the
#: product, the rounding, the entry write.
SCORE_DRAIN = 1 + SPAD_READ_LATENCY + 4 + INTERP_LATENCY + 2 + 1


def _bits(n: int) -> int:
    return max(1, (n - 1).bit_length())


def select_cycles(config, fields, starts, scores) -> int:
    """Cycles of a SELECT that does not fault: ``fields`` as decoded (``count`` taken from
    ``len(starts)``), ``starts`` the ``cnt`` chunk starts, ``scores`` the token scores
    ``SPAD[in_addr + j]`` (at least ``limit`` of them)."""
    cfg = get_config(config)
    limit = fields["limit"]
    chunks = units.select_scores(starts, fields["seq"], limit, scores, cfg)
    sk = min(fields["sink"], limit)
    rs = max(0, limit - fields["recent"])
    left = fields["budget"] - (limit if sk >= rs else sk + limit - rs)
    iters = 0
    if left > 0 and chunks:
        avail = [max(0, min(e, rs) - max(a, sk)) for _, a, e in chunks]
        order = sorted((c for c in range(len(chunks)) if avail[c]),
                       key=lambda c: (-chunks[c][0], c))
        for c in order:
            iters += 1
            left -= min(left, avail[c])
            if left == 0:
                break
        else:
            iters += 1
    return SelectUnit.cycles(cfg, len(starts), [e - a for _, a, e in chunks], iters)


class SelectUnit(wiring.Component):
    """SELECT: chunk scores, budgeted selection and the merged span list (module docstring).

    Parameters
    ----------
    config : Config or str
        The accelerator configuration (``idx_entries``, ``spad_words``, the rsqrt table).

    Ports
    -----
    ctl : In(UnitControl())
        One SELECT instruction per ``start`` pulse.
    spad : Out(SpadPort(config))
        Reads the token scores (never writes).
    idx : Out(IdxPort(config))
        Reads the chunk list, writes the spans.
    regs : Out(RegPort())
        Reads ``REG[count_reg]``; writes ``REG[dst_reg]`` and ``REG[rows_reg]``.
    """

    OPCODES = (Opcode.SELECT,)

    def __init__(self, config):
        self._cfg = get_config(config)
        super().__init__({
            "ctl": In(UnitControl()),
            "spad": Out(SpadPort(self._cfg)),
            "idx": Out(IdxPort(self._cfg)),
            "regs": Out(RegPort()),
        })

    @property
    def config(self):
        return self._cfg

    @staticmethod
    def cycles(config, cnt: int, lens, iters: int) -> int:
        """Cycles from ``start`` to ``done`` of a SELECT that does not fault: ``cnt`` chunks in
        the list, ``lens`` the clipped lengths of the ``N`` candidate chunks, ``iters`` the
        selection scans (module docstring)."""
        lanes = spad_lanes(get_config(config))
        n = len(lens)
        score = 1 + sum(-(-int(v) // lanes) for v in lens) + SCORE_DRAIN if n else 0
        return (4 + (cnt + 1 + 3 * (cnt > 0)) + score + 1 + iters * (n + 3) + 2 * (n + 5 + (n > 0))
                + 3)

    def elaborate(self, platform):
        cfg = self._cfg
        m = Module()
        n_ent = cfg.idx_entries
        lanes = spad_lanes(cfg)
        ctl = _Control(m, self.ctl, Select)
        f = ctl.f
        idx, sp, rp = self.idx, self.spad, self.regs

        lw = cfg.spad_words.bit_length()          # lengths 0 .. spad_words
        sw = 17 + lw                              # |chunk sum| <= 2^15 * spad_words
        # The taken count t is stored as "t_nz" (t != 0) and "e" (lo + t), written in
        # SEL_DECIDE (every other write has t = 0: t_nz = 0, and its e is never read): the walk
        # (W_CHUNKS) takes them straight from the block RAM's output, where the compare and the
        # 32-bit adder behind the RAM's 5.8 ns clock-to-output were 10.1-10.3 ns into w_v and
        # w_e (pre-route estimate)
        ent = data.StructLayout({"avail": 1, "score": signed(32), "lo": unsigned(31),
                                 "n": unsigned(lw), "t_nz": 1, "e": unsigned(32)})
        # every entry an instruction reads it has written first: no initialiser in the Verilog
        m.submodules.chunks = mem = Memory(shape=ent, depth=n_ent, init=[],
                                           attrs={NOINIT_ATTR: 1})
        self.chunk_mem = mem
        mw = mem.write_port()
        mr = mem.read_port()
        rd = mr.data
        # the read port's enable resets to 1: hold the data unless a state reads
        m.d.comb += mr.en.eq(0)

        limit = f.limit[:31]
        nb = _bits(n_ent + 1) + 1
        cnt = Signal(nb)                  # chunks in the list
        ncand = Signal(nb)                # N: candidate chunks
        ri = Signal(nb)                   # read counter (LIST, SELECT scans, walks)
        s1_v = Signal()                   # data of the read issued last cycle
        s1_i = Signal(nb)
        s2_v = Signal()                   # SELECT scans: the entry read two cycles ago
        s2_i = Signal(nb)
        s2 = Signal(ent)
        m.d.sync += [s1_v.eq(0), s2_v.eq(0)]
        prev = Signal(signed(32))         # last chunk start read
        lptr = Signal.like(idx.rd_addr)   # LIST: index-memory address of the next start
        # LIST's read enable as a register (it selects the shared index port, and through the
        # grant it reached into STORE's sequencer: 13.0 ns, pre-route estimate), and the
        # address on the port in every state (the memory reads every cycle)
        l_go = Signal()
        m.d.comb += [idx.rd_addr.eq(lptr), idx.rd_en.eq(l_go)]   # outside the state machine
        lb_v = Signal()                   # LIST: a start in index memory's output register
        lb_i = Signal(nb)
        l2_v = Signal()                   # LIST: a start registered from index memory
        l2_i = Signal(nb)
        l2_a = Signal(signed(32))
        # the start's comparisons one stage later, from l2_a (a_rd < limit straight from
        # index memory's block RAM was 14.1 ns into `l2_lt` in the bd79d12 build, routed)
        l3_v = Signal()
        l3_i = Signal(nb)
        l3_a = Signal(signed(32))
        l3_neg = Signal()
        l3_lt = Signal()
        bad = Signal()
        sk = Signal(31)                   # F = [0, sk) U [rs, limit)
        rs = Signal(31)
        left = Signal(signed(34))         # R
        emit = Signal()                   # the walk writes spans

        # -- CHECK ----------------------------------------------------------------------------
        # CHECK registers the count (a register file read) and the field checks; CHECK2 checks
        # the count and computes R from registers (one cycle for all of it ran through the
        # register file's multiplexer, two adders and the error priority into `error`)
        reg_cnt = rp.regs[f.count_reg]
        cnt_r = Signal(signed(33))
        # idx_entries - chunk_addr, a register loaded every cycle from the latched fields: the
        # list check compares the count with it (the adder in front of the compare and the
        # error priority was 13.3 ns into SELECT's instruction register, 88efb0c build, routed)
        list_room = Signal(signed(len(f.chunk_addr) + 2), name="list_room")
        m.d.sync += list_room.eq(n_ent - f.chunk_addr)
        bad_f = Signal()
        bad_sp = Signal()
        # |F| registered in CHECK2, R = budget - |F| in LIST (nothing reads R before SEL_INIT):
        # the compare, the two sums and the difference in one cycle were 13.5 ns into ``left``
        # (f357767 build, routed)
        nf = Signal(32)
        checks = [
            (bad_f, ErrorCode.BAD_FIELD),
            (cnt_r < 0, ErrorCode.BAD_FIELD),
            (cnt_r[:32] > list_room, ErrorCode.IDX_RANGE),
            (bad_sp, ErrorCode.SPAD_RANGE),
        ]
        err = Const(ErrorCode.OK.value, 4)
        for cond, code in reversed(checks):
            err = Mux(cond, code.value, err)

        # -- SCORE datapath ---------------------------------------------------------------------
        # the chunk being read, registered from the read port (its entry comes out of a block
        # RAM; the next chunk's entry is read ahead and waits on the read port)
        a_cur = Signal(31)
        l_cur = Signal(lw)
        rem = Signal(lw + 1)              # its words not requested yet
        c_cur = Signal(nb)
        c_last = Signal()                 # c_cur + 1 == ncand, registered with c_cur (the
        # compare was in front of SELECT's state register: 14.2 ns, pre-route estimate)
        off = Signal(lw + 1)
        # rem <= lanes and c_cur + 2 as registers, set with rem and c_cur (the compare and the
        # adder were in front of the chunk memory's read address: 10.6-10.7 ns into
        # ``mr__addr``, pre-route estimate of e000a2e)
        rem_last = Signal()
        c_cur2 = Signal(nb)
        sc_issue = Signal()
        tag = data.StructLayout({"valid": 1, "first": 1, "last": 1, "c": nb, "a": 31,
                                 "l": lw, "mask": lanes})
        # tags[0]: the read decided this cycle; tags[1]: presented to the scratchpad (the
        # request is registered: the chunk entry comes from a block RAM, and its address sum
        # would otherwise run on through the shared port's multiplexer); tags[-1]: its data
        tags = [Signal(tag, name=f"tag{i}") for i in range(SPAD_READ_LATENCY + 2)]
        for i in range(SPAD_READ_LATENCY + 1):
            m.d.sync += tags[i + 1].eq(tags[i])
        t0, ta = tags[0], tags[-1]
        sp_en = Signal()
        sp_addr = Signal.like(sp.rd_addr)
        m.d.sync += [sp_en.eq(sc_issue), sp_addr.eq(f.in_addr + a_cur + off)]
        m.d.comb += [
            sp.rd_en.eq(sp_en),
            sp.rd_addr.eq(sp_addr),
            t0.valid.eq(sc_issue), t0.first.eq(off == 0), t0.last.eq(rem_last),
            t0.c.eq(c_cur), t0.a.eq(a_cur), t0.l.eq(l_cur),
            t0.mask.eq(Cat(rem > i for i in range(lanes))),
        ]
        # the chunk's words, masked, are registered before they are summed (tb): the
        # scratchpad's read data crosses the chip, and with the masks and the three-term sum
        # behind it the path into the chunk sum was 14.6 ns (e30bab3 build, routed)
        tb = Signal(tag)
        words = [Signal(sp.rd_data[i].shape(), name=f"sc_word{i}") for i in range(lanes)]
        m.d.sync += [tb.eq(ta)] + [words[i].eq(Mux(ta.mask[i], sp.rd_data[i], 0))
                                   for i in range(lanes)]
        acc = Signal(signed(sw))
        lane_sum = sum(words)
        acc_n = Signal(signed(sw))
        m.d.comb += acc_n.eq(Mux(tb.first, 0, acc) + lane_sum)
        with m.If(tb.valid):
            m.d.sync += acc.eq(acc_n)
        # P0: a finished chunk sum
        pipe = data.StructLayout({"valid": 1, "s": signed(sw), "c": nb, "a": 31, "l": lw,
                                  "k": 5})
        p0 = Signal(pipe)
        m.d.sync += [p0.valid.eq(tb.valid & tb.last), p0.s.eq(acc_n), p0.c.eq(tb.c),
                     p0.a.eq(tb.a), p0.l.eq(tb.l)]
        # rsqrt_norm(l): k = (bitlen(l) - 1) // 2 (P0 -> P0b, registered), then
        # u = l * 2^(16 - 2k) (truncating) into the table: the leading-one search and the
        # shifter took one cycle together with the table's address (20 ns on the LFE5U-85F)
        # k0 = (bitlen(l) - 1) // 2 = top-bit index // 2; 31 for l = 0 (as (0 - 1) >> 1 in
        # five bits), without the +1 / -1 adders
        l_any, l_msb = msb_index(p0.l)
        k0 = Signal(5)
        m.d.comb += k0.eq(Mux(l_any, l_msb >> 1, 31))
        p0b = Signal(pipe)
        # the shift's direction and amount are registered with k (as a subtraction and a
        # compare of p0b.k in front of the shifter and the table address they were SELECT's
        # rd_even path, 13.2 ns pre-route estimate)
        p0b_right = Signal()
        p0b_amt = Signal(6)
        m.d.sync += [p0b.eq(p0), p0b.k.eq(k0), p0b_right.eq(2 * k0 >= 16),
                     p0b_amt.eq(Mux(2 * k0 >= 16, (2 * k0 - 16)[:6], (16 - 2 * k0)[:6]))]
        spec = table_spec("rsqrt", cfg)
        ub = interp_input_bits(spec)
        # u is registered (P0c) before the table: the shifter in front of the table's index
        # adder and LUT-ROM was SELECT's rd_even / rd_odd path (12.2 ns, pre-route estimate of
        # e30bab3)
        u = Signal(ub)
        with m.If(p0b_right):
            m.d.sync += u.eq(p0b.l >> p0b_amt)
        with m.Else():
            m.d.sync += u.eq(p0b.l << p0b_amt)
        p0c = Signal(pipe)
        m.d.sync += p0c.eq(p0b)
        [r_out] = build_interp(m, spec, make_table("rsqrt", cfg), [u], Const(1, 1), name="rsqrt")
        dl = [p0c]
        for i in range(INTERP_LATENCY):
            d = Signal(pipe, name=f"d{i + 1}")
            m.d.sync += d.eq(dl[-1])
            dl.append(d)
        d4 = dl[-1]
        # d4.s again as a plain register, and the product as one: the build flow moves only
        # flip-flops without a reset into the DSP blocks (operand and product registers)
        s4 = Signal(signed(sw), name="s4", reset_less=True)
        m.d.sync += s4.eq(dl[-2].s)
        # The chunk's tokens outside F, [max(a, sk), min(a + l, rs)), along the delay line (sk
        # and rs are fixed since CHECK): in P6, after the sum and two compares, the length was
        # SELECT's slowest routed path (14.7 ns into p6, e30bab3 build)
        assert INTERP_LATENCY >= 3
        e1 = Signal(32, name="out_e1")
        lo1 = Signal(31, name="out_lo1")
        m.d.sync += [e1.eq(p0c.a + p0c.l), lo1.eq(Mux(p0c.a > sk, p0c.a, sk))]
        hi2 = Signal(32, name="out_hi2")
        lo2 = Signal(31, name="out_lo2")
        m.d.sync += [hi2.eq(Mux(e1 < rs, e1, rs)), lo2.eq(lo1)]
        lo_n = [(Signal(31, name=f"out_lo{i}"), Signal(lw, name=f"out_n{i}"))
                for i in range(3, INTERP_LATENCY + 2)]
        m.d.sync += [lo_n[0][0].eq(lo2), lo_n[0][1].eq(Mux(hi2 > lo2, hi2 - lo2, 0))]
        for (lo_a, n_a), (lo_b, n_b) in zip(lo_n, lo_n[1:]):
            m.d.sync += [lo_b.eq(lo_a), n_b.eq(n_a)]
        lo5, n5 = lo_n[-1]                # aligned with p5
        # P5: the product; P6: the rounded score and the chunk's tokens outside F
        p5 = Signal(data.StructLayout({"valid": 1, "c": nb, "a": 31, "l": lw, "k": 5}))
        prod5 = Signal(signed(sw + 17), name="prod5", reset_less=True)
        m.d.sync += [p5.valid.eq(d4.valid), prod5.eq(lut_mul(s4, r_out)), p5.c.eq(d4.c),
                     p5.a.eq(d4.a), p5.l.eq(d4.l), p5.k.eq(d4.k)]
        score = ((prod5 >> (14 + p5.k)) + 1) >> 1
        p6 = Signal(data.StructLayout({"valid": 1, "score": signed(32), "c": nb, "lo": 31,
                                       "n": lw}))
        m.d.sync += [p6.valid.eq(p5.valid), p6.score.eq(score), p6.c.eq(p5.c), p6.lo.eq(lo5),
                     p6.n.eq(n5)]
        pipe_busy = Cat(*[t.valid for t in tags[1:]], tb.valid, p0.valid, p0b.valid, p0c.valid,
                        *[d.valid for d in dl[1:]], p5.valid, p6.valid).any()

        # -- SELECT state ---------------------------------------------------------------------
        have = Signal()
        best = Signal(signed(32))
        bi = Signal(nb)
        b_lo = Signal(31)
        b_n = Signal(lw)
        # the take min(left, n) of the best entry and whether it ends the selection: registered
        # with the entry in SEL_SCAN (``left`` does not change there), so SEL_DECIDE's write,
        # budget update and next state start at registers
        take = Signal(lw)
        take_all = Signal()

        # -- WALK state -----------------------------------------------------------------------
        open_ = Signal()
        sp_s = Signal(31)
        sp_e = Signal(32)
        count = Signal(nb + 1)
        walk_over = Signal()               # out_addr + count > idx_entries, for the end
        rows = Signal(32)
        w_v = Signal()                    # a chunk's piece [w_lo, w_e) for the merge
        w_lo = Signal(31)
        w_e = Signal(32)
        m.d.sync += w_v.eq(0)

        # span writes are registered: they reach index memory one cycle after the walk emits
        # them (the last one in W_END, before the registers are written), so the walk's
        # comparisons of chunk entries end at a register, not at the shared port
        iw = Signal(data.StructLayout({"en": 1, "addr": idx.wr_addr.shape(),
                                       "a": 32, "b": 32}))
        m.d.sync += iw.en.eq(0)
        m.d.comb += [idx.wr_en.eq(iw.en), idx.wr_addr.eq(iw.addr),
                     idx.wr_data.a.eq(iw.a), idx.wr_data.b.eq(iw.b)]

        # the open span's length, a register set with sp_s and sp_e: as sp_e - sp_s it sat
        # between the merge's compare and the ``rows`` adder (14.0 ns into rows, 88efb0c build,
        # routed)
        sp_len = Signal(32)
        # a span's length is added to ``rows`` one cycle after it is emitted (rows_add,
        # rows_add_v): the merge's 32-bit compares chose the adder's enable, 11.8 ns into rows
        # (90718e9 build, routed). The last span is emitted in W_FLUSH, rows is read in REG_DST
        # (two cycles later), and start_walk (after the pending add, below) clears both.
        rows_add = Signal(32)
        rows_add_v = Signal()
        m.d.sync += rows_add_v.eq(0)
        with m.If(rows_add_v):
            m.d.sync += rows.eq(rows + rows_add)

        def emit_span():
            length = sp_len
            with m.If(emit):
                m.d.sync += [iw.en.eq(1), iw.addr.eq(f.out_addr + count),
                             iw.a.eq(sp_s), iw.b.eq(length)]
            m.d.sync += [count.eq(count + 1), rows_add.eq(length), rows_add_v.eq(1)]

        def piece(s, e):
            """Merge the piece [s, e) (s ascending) into the open span."""
            with m.If(open_ & (s <= sp_e)):
                with m.If(e > sp_e):
                    m.d.sync += [sp_e.eq(e), sp_len.eq(e - sp_s)]
            with m.Else():
                with m.If(open_):
                    emit_span()
                m.d.sync += [sp_s.eq(s), sp_e.eq(e), sp_len.eq(e - s), open_.eq(1)]

        # ri < ncand as a register, set with ri in the scans and walks (ncand is final before
        # them): the compare was in the chunk memory's read enable and the next state
        ri_more = Signal()

        def start_walk():
            m.d.sync += [open_.eq(0), count.eq(0), rows.eq(0), rows_add_v.eq(0), ri.eq(0),
                         ri_more.eq(ncand != 0)]
            m.next = "W_SINK"

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
                m.d.sync += [
                    cnt_r.eq(Mux(f.count_reg != 0, reg_cnt, f.n_chunks)),
                    sk.eq(Mux(f.sink < limit, f.sink, limit)),
                    rs.eq(Mux(limit > f.recent, limit - f.recent, 0)),
                    bad_f.eq((f.budget == 0) | (f.limit > f.seq) | f.limit[31]),
                    bad_sp.eq((limit != 0) & (f.in_addr + limit > cfg.spad_words)),
                ]
                m.next = "CHECK2"

            with m.State("CHECK2"):
                m.d.sync += [cnt.eq(cnt_r[:nb]), ri.eq(0), ncand.eq(0), bad.eq(0),
                             nf.eq(Mux(sk >= rs, limit, sk + (limit - rs))),
                             lptr.eq(f.chunk_addr)]
                with m.If(err != ErrorCode.OK):
                    ctl.finish(err)
                with m.Else():
                    m.d.sync += l_go.eq(cnt_r[:nb] != 0)
                    m.next = "LIST"

            with m.State("LIST"):
                # the read address from a pointer register; each start read from index
                # memory is registered (with its comparisons against 0 and the limit) before
                # the checks and the entry write
                issue = l_go                    # == ri < cnt in LIST
                m.d.sync += left.eq(f.budget - nf)
                with m.If(issue):
                    m.d.sync += [ri.eq(ri + 1), lptr.eq(lptr + 1), s1_v.eq(1), s1_i.eq(ri),
                                 l_go.eq(ri + 1 < cnt)]
                a_rd = idx.rd_data.a
                assert IDX_READ_LATENCY == 2
                m.d.sync += [lb_v.eq(s1_v), lb_i.eq(s1_i), l2_v.eq(lb_v), l2_i.eq(lb_i),
                             l2_a.eq(a_rd),
                             l3_v.eq(l2_v), l3_i.eq(l2_i), l3_a.eq(l2_a), l3_neg.eq(l2_a < 0),
                             l3_lt.eq(l2_a < limit)]
                with m.If(l3_v):
                    m.d.sync += prev.eq(l3_a)
                    with m.If(l3_i == 0):
                        with m.If(l3_neg):
                            m.d.sync += bad.eq(1)
                    with m.Else():
                        with m.If(l3_a <= prev):
                            m.d.sync += bad.eq(1)
                        with m.If(prev < limit):
                            e_in = Mux(l3_lt, l3_a, limit)
                            m.d.comb += [mw.en.eq(1), mw.addr.eq(l3_i - 1),
                                         mw.data.lo.eq(prev), mw.data.n.eq(e_in - prev)]
                            m.d.sync += ncand.eq(l3_i)
                with m.If(~issue & ~s1_v & ~lb_v & ~l2_v):
                    m.next = "LAST"

            with m.State("LAST"):
                with m.If((cnt != 0) & (prev < limit)):
                    m.d.comb += [mw.en.eq(1), mw.addr.eq(cnt - 1), mw.data.lo.eq(prev),
                                 mw.data.n.eq(limit - prev)]
                    m.d.sync += ncand.eq(cnt)
                with m.If(bad):
                    ctl.finish(ErrorCode.BAD_FIELD)
                with m.Else():
                    m.next = "SC_FETCH"

            with m.State("SC_FETCH"):
                m.d.comb += [mr.en.eq(1), mr.addr.eq(0)]
                m.d.sync += [c_cur.eq(0), c_cur2.eq(2), c_last.eq(ncand == 1), off.eq(0)]
                with m.If(ncand == 0):
                    m.next = "SEL_INIT"
                with m.Else():
                    m.next = "SC_LATCH"

            with m.State("SC_LATCH"):
                m.d.comb += [mr.en.eq(1), mr.addr.eq(1)]
                m.d.sync += [a_cur.eq(rd.lo), l_cur.eq(rd.n), rem.eq(rd.n),
                             rem_last.eq(rd.n <= lanes)]
                m.next = "SC_ISSUE"

            with m.State("SC_ISSUE"):
                m.d.comb += sc_issue.eq(1)
                with m.If(rem_last):
                    # (beyond the last candidate the read-ahead returns an unused entry)
                    m.d.comb += [mr.en.eq(1), mr.addr.eq(c_cur2)]
                    m.d.sync += [c_cur.eq(c_cur + 1), c_cur2.eq(c_cur2 + 1),
                                 c_last.eq(c_cur2 == ncand), off.eq(0),
                                 a_cur.eq(rd.lo), l_cur.eq(rd.n), rem.eq(rd.n),
                                 rem_last.eq(rd.n <= lanes)]
                    with m.If(c_last):
                        m.next = "SC_DRAIN"
                with m.Else():
                    m.d.sync += [off.eq(off + lanes), rem.eq(rem - lanes),
                                 rem_last.eq(rem <= 2 * lanes)]

            with m.State("SC_DRAIN"):
                with m.If(~pipe_busy):
                    m.next = "SEL_INIT"

            with m.State("SEL_INIT"):
                # every score entry is written (SC_DRAIN waits for the last write)
                m.d.sync += [ri.eq(0), ri_more.eq(ncand != 0), have.eq(0)]
                with m.If((left <= 0) | (ncand == 0)):
                    start_walk()
                with m.Else():
                    m.next = "SEL_SCAN"

            with m.State("SEL_SCAN"):
                issue = ri_more
                m.d.comb += [mr.en.eq(issue), mr.addr.eq(ri)]
                with m.If(issue):
                    m.d.sync += [ri.eq(ri + 1), ri_more.eq(ri + 1 < ncand), s1_v.eq(1),
                                 s1_i.eq(ri)]
                # the entry is registered before the compare (the block RAM's data into the
                # 32-bit compare and the best-entry registers was 15.6 ns into ``have``: routed
                # model of the dc9338d build)
                m.d.sync += [s2_v.eq(s1_v), s2_i.eq(s1_i), s2.eq(rd)]
                with m.If(s2_v & s2.avail & (~have | (s2.score > best))):
                    m.d.sync += [have.eq(1), best.eq(s2.score), bi.eq(s2_i), b_lo.eq(s2.lo),
                                 b_n.eq(s2.n), take.eq(Mux(left < s2.n, left[:lw], s2.n)),
                                 take_all.eq(left <= s2.n)]
                with m.If(~issue & ~s1_v):
                    m.next = "SEL_DECIDE"

            with m.State("SEL_DECIDE"):
                m.d.sync += [ri.eq(0), ri_more.eq(ncand != 0), have.eq(0)]
                with m.If(have):
                    m.d.comb += [mw.en.eq(1), mw.addr.eq(bi), mw.data.avail.eq(0),
                                 mw.data.score.eq(best), mw.data.lo.eq(b_lo),
                                 mw.data.n.eq(b_n), mw.data.t_nz.eq(take != 0),
                                 mw.data.e.eq(b_lo + take)]
                    m.d.sync += left.eq(left - take)
                    with m.If(take_all):
                        start_walk()
                    with m.Else():
                        m.next = "SEL_SCAN"
                with m.Else():
                    start_walk()

            with m.State("W_SINK"):
                with m.If(sk != 0):
                    m.d.sync += [open_.eq(1), sp_s.eq(0), sp_e.eq(sk), sp_len.eq(sk)]
                m.next = "W_CHUNKS"

            with m.State("W_CHUNKS"):
                issue = ri_more
                m.d.comb += [mr.en.eq(issue), mr.addr.eq(ri)]
                with m.If(issue):
                    m.d.sync += [ri.eq(ri + 1), ri_more.eq(ri + 1 < ncand), s1_v.eq(1)]
                # the entry read last cycle is registered before the merge
                m.d.sync += [w_v.eq(s1_v & rd.t_nz), w_lo.eq(rd.lo), w_e.eq(rd.e)]
                with m.If(w_v):
                    piece(w_lo, w_e)
                with m.If(~issue & ~s1_v):
                    m.next = "W_RECENT"

            with m.State("W_RECENT"):
                with m.If(rs < limit):
                    piece(rs, limit)
                m.next = "W_FLUSH"

            with m.State("W_FLUSH"):
                with m.If(open_):
                    emit_span()
                # W_END's range check, from the count as it will be there (+1 for the span
                # emitted now): in W_END, the adder and compare chose the next state and
                # start_walk's clears (SPANS had the same path, 11.8 ns routed into its ``x``)
                m.d.sync += walk_over.eq(f.out_addr + count + open_ > n_ent)
                m.next = "W_END"

            with m.State("W_END"):
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

        # the SCORE pipeline writes finished chunks (only SCORE/SC_DRAIN/SEL_INIT run it)
        with m.If(p6.valid):
            m.d.comb += [mw.en.eq(1), mw.addr.eq(p6.c), mw.data.avail.eq(p6.n != 0),
                         mw.data.score.eq(p6.score), mw.data.lo.eq(p6.lo),
                         mw.data.n.eq(p6.n), mw.data.t_nz.eq(0)]
        with m.If(fsm.ongoing("CHECK")):
            m.d.sync += emit.eq(0)

        m.d.comb += self.ctl.busy.eq(~fsm.ongoing("IDLE"))
        return m
