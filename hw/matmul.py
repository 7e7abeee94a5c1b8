"""The MATMUL unit: sequencer, MAC array, accumulator read-modify-write and fused epilogue.

Executes one MATMUL instruction (docs/ISA.md, ``golden.isasim.Machine.op_matmul``) bit for bit,
including the error codes, in the golden model's order, and its count of saturation events.

Dataflow
--------
Everything behind the sequencer is a fixed-latency pipeline without backpressure: the sequencer
issues one *slot* per cycle, each slot makes at most one scratchpad read, and every consumer
(MAC array, accumulator, epilogue, scratchpad write port) accepts one item per cycle. The order
of the slots guarantees that the array's weight shadow is complete before the first A line of a
tile and free when the next tile's weights arrive, so no stream ever stalls (a simulation-only
``protocol_error`` flag checks this and the FIFO levels)::

    sequencer ------> slot and its IDX / row-state addresses registered
              --S0--> IDX and row-state reads (queue entry; c, r, k; the data of both
                      registered beside the block RAMs)
              --S0b-> (the memories' output registers)
              --S1--> row * stride operands (the token row from IDX) into registers
              --S1b-> row * stride partial products (two 24 x 22-bit multipliers)
              --S1c-> their sums
              --S2--> scratchpad read address (the range checks of the check phase at S2 + 1)
              --D---> weight line -> MacArray.w_stream      (B^T: transpose buffer first)
                      A line      -> MacArray.a_stream
                      channel table / residual / SPAD_ADD destination words -> FIFOs
    MacArray  --R0--> ACC (and EXT) data of the line (read three cycles before, registered twice)
              --R1--> acc_in = SCALE: old * c as 17-bit pieces' products
              --R2--> the pieces' sum; base + partial sum
              --R3--> last K slice: sat_acc -> ACC write (out = ACC) or Epilogue input;
                      otherwise the partial sum goes back to ACC
    Epilogue  ------> scratchpad write (lanes masked for a partial column tile)

For each column tile ``nt`` (``cols`` outputs) and K slice ``kt`` (``rows`` of K) the sequencer
issues: the weight slots (``rows`` lines of B, or ``cols`` rows of B^T followed by ``rows`` idle
slots while the transpose buffer shifts into the array), on the last K slice of an epilogue
instruction the channel-table slots (``max(1, 4 * cols / lanes)``), a few idle slots if the tile
is so short that a line would be read again before its previous partial sum is written back
(``HAZARD_SLOTS``), then per row: on the last K slice of an epilogue instruction a residual slot
(``res_en``) and a destination slot (``SPAD_ADD``), and the A slot. Weight loading cannot overlap
the A lines: both need the unit's single scratchpad read port.

Exact accumulation
------------------
The golden model adds the whole product ``P`` to the old accumulator with ONE saturation,
``sat_acc(old + P)``. Partial sums over K slices therefore must not saturate. ``|P| <= 2^30 *
max_k <= 2^(acc_bits - 2)`` (Config), so ``old + partial`` always fits ``acc_bits + 1`` bits: the
unit keeps the extra top bit of every accumulator in a private ``EXT`` memory (``acc_lines`` x
``cols`` bits) beside the accumulator memory while the K slices of a line are summed, and
saturates once on the last slice.

Accumulator validity
--------------------
The golden model faults (``BAD_FIELD``) when ``acc_in != ZERO`` reads accumulator lines that hold
no partial sums, and an epilogue MATMUL leaves the lines it may use as scratch undefined. The
unit keeps that state as one flip-flop per accumulator line (cleared by reset), in words of
``VALID_WORD`` bits: the check phase scans the lines an instruction reads, ``out = ACC`` sets the
lines it writes, and an epilogue instruction clears its scratch range while it computes.

An epilogue MATMUL with more than one K slice (``k > rows``) keeps its partial sums in those
lines (its own lines with ``acc_in != ZERO``, lines ``acc_addr ..`` with ``ZERO``). The golden
model invalidates the lines but keeps their old contents; the two differ only if a later
``out = ACC`` instruction with a partial column tile (``n`` not a multiple of ``cols``)
makes such a line valid again and a later instruction reads its unwritten lanes.

Not modelled: overlapping regions
---------------------------------
The golden model reads all of an instruction's operands before it writes its output. The unit
streams: output rows are written while later A rows, weight tiles, residual and destination rows
are still being read. An output region that overlaps the A, B, channel-table or residual region
of the same instruction (other than a residual row read at exactly its own output row), or a
``SPAD_ADD`` queue that names a token twice, gives a different result.

Check phase
-----------
Before anything is written, the unit evaluates every check of the golden model: the static
field checks (one cycle), then queue entries (gather/scatter rows through the S1 multipliers),
the channel table's shifts (scratchpad reads) and the accumulator validity scan, in parallel.
The first failing check in the golden order sets ``error``. A failing instruction changes no
state and counts no MACs or saturation events.

Cycle count
-----------
From the ``start`` cycle to the ``done`` cycle, for an instruction that passes its checks
(``T = ceil(n / cols)``, ``KT = ceil(k / rows)``, ``L`` rows; :meth:`MatmulUnit.cycles`
computes it exactly)::

    cycles = 6 + check + sum over the T * KT tiles of (W + CH + PAD + L * P) + drain

    check = 2 + (L with gather or scatter) + (ceil(4 n / lanes) with an epilogue and chan_en)
            + CHECK_DRAIN (11)      -- or the validity scan if longer (acc_in != ZERO:
                                       about T * (L / 16 + 1) cycles)
    W     = rows  (b_trans: cols + rows)
    CH    = max(1, 4 cols / lanes) on the last K slice of an epilogue with chan_en, else 0
    PAD   = max(0, HAZARD_SLOTS - L - W - CH) when KT > 1, else 0
    side  = res_en + (out = SPAD_ADD) on the last K slice of an epilogue, else 0
    P     = max(1 + side, epi_ratio) on the last K slice of an epilogue, else 1 (slots per row;
            ``epi_ratio = cols / epi_lanes``: a narrow epilogue takes that many cycles per line,
            so the sequencer leaves idle slots between those rows)
    drain = 15 + log2(rows) (out = ACC); epilogue: that + Epilogue.latency (29 for tiny)

For a plain MATMUL (``L = m``, ``m + rows >= HAZARD_SLOTS``) this is ``T * KT * (m + rows) + 34 +
log2(rows) + Epilogue.latency`` (``34 + log2(rows)`` for ``out = ACC``), against a first-order
cost of ``T * KT * m`` plus a fixed fill: the weight tile costs ``rows`` slots per
tile because it shares the single scratchpad read port with the A lines, and the fixed part is
the check phase plus the pipeline depth (the controller's contract has no early ``done``).
"""

from __future__ import annotations

from amaranth import Array, Cat, Const, Module, Mux, Signal, Value, signed, unsigned
from amaranth.lib import data, enum, wiring
from amaranth.lib.fifo import SyncFIFO
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from vitamin import isa
from vitamin.config import Config, get_config
from vitamin.isa import AccIn, ErrorCode, OutMode

from .dspmul import SPLIT_LATENCY, split_product
from .epilogue import _popcount, _saturate, epilogue_events_max, make_epilogue
from .mac_array import MacArray
from .ports import (
    ACC_READ_LATENCY,
    IDX_READ_LATENCY,
    RS_READ_LATENCY,
    SPAD_READ_LATENCY,
    AccPort,
    IdxPort,
    QueuePort,
    RowStatePort,
    SpadPort,
    UnitControl,
    spad_lanes,
)

__all__ = ["MatmulUnit", "HAZARD_SLOTS", "VALID_WORD"]

# The pipeline below is written for these port latencies (the stage names S0..D and R0..R3).
assert SPAD_READ_LATENCY >= 1 and ACC_READ_LATENCY == 1
assert IDX_READ_LATENCY == 2 and RS_READ_LATENCY == 2

#: Accumulator lines are read three cycles before R0 (the data is registered twice before R0,
#: so the SCALE multipliers' operand registers are fed by a register and go into the DSP
#: blocks' input registers) and written back at R3; a line read again before R3 + 1 would miss
#: its own update, so the same line's slots of consecutive K slices are at least this many slots
#: apart.
HAZARD_SLOTS = 7
#: Bits per word of the accumulator-validity flip-flops (the check scans a word per cycle).
VALID_WORD = 16
# Rows, tokens and columns enter the address multipliers as 24-bit signed values: a token
# outside [-2^22, 2^22) with a non-zero stride always leaves the 22-bit scratchpad.
_ROW_BITS = 24
_ADDR_BITS = 50         # signed width of address sums (row * stride + base + offset)
_INSTR_LAYOUT = data.Layout.cast(isa.Matmul)


def _bits(n: int) -> int:
    return max(1, (n - 1).bit_length())


def _log2(n: int) -> int:
    assert n & (n - 1) == 0, n
    return n.bit_length() - 1


class _Op(enum.Enum, shape=4):
    """Slot kinds issued by the sequencer."""
    NOP = 0
    W = 1        # weight line: row koff + i of B, columns noff ..
    BT = 2       # transposed weight column: row noff + i of B^T, elements koff ..
    A = 3        # A line: row i (or token i), elements koff ..
    CHAN = 4     # chunk i of the channel-table words of column tile noff
    RES = 5      # residual words of output row i
    OLD = 6      # SPAD_ADD destination words of output row i
    CHK_AO = 7   # check: A rows 0 .. L-1, output and residual rows 0 .. L-1 (no queue)
    CHK_B = 8    # check: the B (or B^T) region
    CHK_Q = 9    # check: the A and output rows of queue entry i
    CHK_C = 10   # check: the shifts of channel-table chunk i


class MatmulUnit(wiring.Component):
    """Executes one MATMUL instruction on a weight-stationary MAC array.

    Parameters
    ----------
    config : :class:`~vitamin.config.Config` or str
        Hardware configuration or preset name.

    Attributes
    ----------
    ctl : ``In(UnitControl())``
        ``start`` + instruction word in; ``busy``, ``done``, ``error``, ``sat_inc`` out. ``busy``
        is high from the cycle after ``start`` up to the cycle before ``done``; ``start`` is
        accepted while idle, including the ``done`` cycle.
    spad : ``Out(SpadPort(config))``
        A, B, channel table, residual and SPAD_ADD reads; output writes.
    acc : ``Out(AccPort(config))``
        Partial sums (read-modify-write, one line per cycle).
    rs : ``Out(RowStatePort(config))``
        Row state ``c`` (``acc_in = SCALE``) and ``r``, ``k`` (``row_norm``); read only.
    idx : ``Out(IdxPort(config))``
        Queue entries (token, probability) for ``gather``, ``scatter``, ``SPAD_ADD``; read only.
    queues : ``Out(QueuePort(config))``
        Queue offsets and lengths; read only.
    macs_inc : ``Out(range(rows * cols + 1))``
        MACs of the golden model's count done this cycle (valid rows of K x valid columns).
    """

    def __init__(self, config):
        if isinstance(config, str):
            config = get_config(config)  # raises ConfigError for an unknown preset
        if not isinstance(config, Config):
            raise TypeError(f"MatmulUnit needs a Config or a preset name, not {config!r}")
        self._cfg = config
        self._lanes = spad_lanes(config)
        self._mac = MacArray(config)
        self._epi = make_epilogue(config, row_norm=True, spad_add=True)
        super().__init__({
            "ctl": In(UnitControl()),
            "spad": Out(SpadPort(config)),
            "acc": Out(AccPort(config)),
            "rs": Out(RowStatePort(config)),
            "idx": Out(IdxPort(config)),
            "queues": Out(QueuePort(config)),
            "macs_inc": Out(range(config.rows * config.cols + 1)),
        })
        #: Simulation aid, not part of the contract: goes (and stays) high if a stream the
        #: schedule relies on ever stalls or a FIFO over- or underflows.
        self.protocol_error = Signal()

    @property
    def config(self):
        return self._cfg

    # -- derived figures ---------------------------------------------------------------------

    @property
    def chan_slots(self) -> int:
        """Scratchpad reads of one column tile's channel-table words (4 per column)."""
        return max(1, 4 * self._cfg.cols // self._lanes)

    @property
    def events_per_cycle_max(self) -> int:
        """Most saturation events MATMUL can count in one cycle: one per lane of an accumulator
        write-back, plus those of the epilogue's output line."""
        return self._cfg.cols + epilogue_events_max(self._cfg, row_norm=True, spad_add=True)

    @property
    def acc_drain(self) -> int:
        """Cycles from the last issued slot to the last accumulator write (``out = ACC``)."""
        return 6 + SPAD_READ_LATENCY + self._mac.latency + 3

    @property
    def run_drain(self) -> int:
        """Cycles from the last issued slot to the last scratchpad write (epilogue)."""
        return self.acc_drain + self._epi.latency

    #: Cycles from the last check slot to its flags (S0, S0b, S1, S1b, S1c, S2 + scratchpad
    #: latency + flag register: the channel-table flag is set at D; the range flags, at S2 + 1,
    #: are not later).
    CHECK_DRAIN = 6 + SPAD_READ_LATENCY + 1

    def tile_slots(self, *, k, n, rows_l, b_trans=False, epilogue=True, chan_en=False,
                   res_en=False, spad_add=False):
        """Issue slots of the compute phase (see the module docstring)."""
        cfg = self._cfg
        t_n = -(-n // cfg.cols)
        t_k = -(-k // cfg.rows)
        total = 0
        for _ in range(t_n):
            for kt in range(t_k):
                epi = kt == t_k - 1 and epilogue
                fixed = (cfg.cols + cfg.rows) if b_trans else cfg.rows
                fixed += self.chan_slots if (epi and chan_en) else 0
                pad = max(0, HAZARD_SLOTS - rows_l - fixed) if t_k > 1 else 0
                side = (int(res_en) + int(spad_add)) if epi else 0
                per_row = max(1 + side, cfg.epi_ratio) if epi else 1
                total += fixed + pad + rows_l * per_row
        return total

    def _walk_words(self, ranges):
        """Cycles of the validity walker over line ranges [lo, hi)."""
        lw = _log2(VALID_WORD)
        return sum(((hi - 1) >> lw) - (lo >> lw) + 1 for lo, hi in ranges if hi > lo)

    def cycles(self, f, rows=None):
        """Cycles from the ``start`` cycle to the ``done`` cycle of an instruction that passes
        its checks.

        Parameters
        ----------
        f : dict
            The decoded fields (:func:`vitamin.isa.decode`).
        rows : int, optional
            Rows processed, ``L``: the queue length with ``gather``, ``scatter`` or
            ``SPAD_ADD``; ``m`` when omitted.
        """
        cfg = self._cfg
        m, k, n = f["m"], f["k"], f["n"]
        rows_l = m if rows is None else rows
        epilogue = f["out"] != OutMode.ACC
        t_n = -(-n // cfg.cols)
        # check phase: 2 static-region slots, queue entries, channel-table chunks, then the
        # flags' latency; the validity scan of acc_in != ZERO runs beside them
        slots = 2 + (rows_l if (f["gather"] or f["scatter"]) else 0)
        if epilogue and f["chan_en"]:
            slots += -(-4 * n // self._lanes)
        check = slots + self.CHECK_DRAIN
        if f["acc_in"] != AccIn.ZERO:
            lo = f["acc_addr"]
            scan = self._walk_words([(lo + t * m, lo + t * m + rows_l) for t in range(t_n)])
            check = max(check, scan + 2)
        run = self.tile_slots(k=k, n=n, rows_l=rows_l, b_trans=f["b_trans"],
                              epilogue=epilogue, chan_en=f["chan_en"], res_en=f["res_en"],
                              spad_add=f["out"] == OutMode.SPAD_ADD)
        run += self.run_drain if epilogue else self.acc_drain
        if epilogue:
            arch = f["acc_in"] != AccIn.ZERO
            used = (t_n if arch else min(t_n, 2)) * m
            run = max(run, self._walk_words([(f["acc_addr"], f["acc_addr"] + used)]) + 2)
        # start -> STATIC -> USED (SPLIT_LATENCY cycles) -> DECIDE -> check -> RUN -> FINISH
        # -> done
        return 4 + SPLIT_LATENCY + check + run

    # -- gateware -----------------------------------------------------------------------------

    def elaborate(self, platform):
        m = Module()
        cfg = self._cfg
        rows, cols, lanes = cfg.rows, cfg.cols, self._lanes
        ab = cfg.acc_bits
        spw = cfg.spad_words
        s_aw = _bits(spw)
        a_aw = _bits(cfg.acc_lines)
        nch = self.chan_slots

        m.submodules.mac = mac = self._mac
        m.submodules.epi = epi = self._epi
        lm = mac.latency
        assert lm >= 1, "the accumulator read is issued one stage before the array output"

        ctl = self.ctl
        err_flag = Signal()     # sticky protocol error (simulation aid)
        m.d.comb += self.protocol_error.eq(err_flag)

        def protocol(cond):
            with m.If(cond):
                m.d.sync += err_flag.eq(1)

        # -- instruction and static decode --------------------------------------------------------
        # Reset-less, as the operand registers of multipliers below (the build flow moves only
        # plain flip-flops into the DSP blocks): the reset is the power-on one, and these
        # registers load only while the unit runs, so they hold their initial value through it.
        f = Signal(isa.Matmul, reset_less=True)
        acc_in = f.acc_in.as_value()
        out = f.out.as_value()
        act = f.act.as_value()
        is_zero = acc_in == AccIn.ZERO.value
        is_scale = acc_in == AccIn.SCALE.value
        out_acc = out == OutMode.ACC.value
        out_add = out == OutMode.SPAD_ADD.value
        epi_i = ~out_acc
        qmode = f.gather | f.scatter | out_add
        # "arch": the accumulator lines are architectural state (read or kept), golden's rule.
        arch = out_acc | ~is_zero

        # the expert queue's (offset, length), registered with the instruction: the queue
        # registers sit in the controller, and their selection by the queue field ran on
        # across the chip into STATIC's checks (`rs_base + L > rowstate_rows`) in one cycle
        q_ent = Signal(self.queues.q.shape().elem_shape)
        L = Signal(17)          # rows processed
        T = Signal(17)          # column tiles
        KT = Signal(17)         # K slices
        # tiles whose accumulator lines the instruction may touch
        used_t = Signal(17, reset_less=True)
        qoff = Signal.like(q_ent.off)
        st = Signal(data.StructLayout({
            "field": 1, "queue": 1, "idx": 1, "rows": 1, "add": 1, "rs": 1,
            "scatter": 1, "chan": 1, "shift": 1}))
        # flags of the check phase
        bad_a = Signal()
        bad_b = Signal()
        bad_o = Signal()
        bad_cs = Signal()
        stale = Signal()
        code = Signal(ErrorCode)

        t_static = (f.n + cols - 1) >> _log2(cols)
        kt_static = (f.k + rows - 1) >> _log2(rows)
        l_static = Mux(qmode, q_ent.len, f.m)
        used_tiles = Mux(arch, t_static, Mux(t_static > 2, 2, t_static))
        # accumulator lines the instruction may touch: used_t * m, a split product (DSP blocks
        # with registers on both sides, SPLIT_LATENCY cycles: the USED state waits for it). As
        # one stage from the instruction register through the tile count's adder and a DSP
        # it was the 94e8aa3 build's routed critical path (15.69 ns).
        used = split_product(m, used_t, f.m, en=1, name="used", shape=unsigned(33))
        # acc_lines - acc_addr, a register loaded every cycle from the latched fields (DECIDE
        # comes several cycles after the start): DECIDE compares ``used`` with it, one compare
        # instead of an adder and a compare in front of the validity walk's start (14.3 ns into
        # ``walking``, e30bab3 build, routed)
        acc_room = Signal(signed(len(f.acc_addr) + 2), name="acc_room")
        m.d.sync += acc_room.eq(cfg.acc_lines - f.acc_addr)
        chk_last = Signal(19)

        # -- pipeline tag layouts -----------------------------------------------------------------
        tag_layout = data.StructLayout({
            "kind": _Op, "i": 17, "first": 1, "kt_first": 1, "kt_last": 1, "row_last": 1,
            "epi": 1, "koff": 17, "noff": 17, "kval": range(rows + 1), "nval": range(cols + 1),
            "line": a_aw, "prob": signed(32), "c": 17, "r": 17, "k": 7, "oaddr": s_aw,
        })
        ptag_layout = data.StructLayout({
            "valid": 1, "kt_first": 1, "kt_last": 1, "row_last": 1, "epi": 1,
            "nval": range(cols + 1), "line": a_aw, "prob": signed(32), "c": 17, "r": 17, "k": 7,
            "oaddr": s_aw,
        })

        t0 = Signal(tag_layout)         # the slot issued this cycle (comb, from the sequencer)
        t0q = Signal(tag_layout)        # S0: the issued slot, registered; reads index memory
        t0r = Signal(tag_layout)        # S0b: the memories' output registers hold the read data
        t1 = Signal(tag_layout)
        t1b = Signal(tag_layout)        # S1b: the row products' partial products ...
        t1c = Signal(tag_layout)        # S1c: ... and their sums
        t2 = Signal(tag_layout)
        # S2 + 1 .. D: the slot waits for its scratchpad data (SPAD_READ_LATENCY stages)
        t_rd = [Signal(tag_layout, name=f"t{3 + i}") for i in range(SPAD_READ_LATENCY)]
        t3, t4 = t_rd[0], t_rd[-1]      # t4 = D: scratchpad data of the slot is valid
        m.d.sync += [t0q.eq(t0), t0r.eq(t0q), t1.eq(t0r), t3.eq(t2)]
        m.d.sync += [b.eq(a) for a, b in zip(t_rd, t_rd[1:])]

        # -- sequencer ----------------------------------------------------------------------------
        fsm_busy = Signal()
        m.d.comb += ctl.busy.eq(fsm_busy)
        done = Signal()
        m.d.comb += [ctl.done.eq(done), ctl.error.eq(code)]
        m.d.sync += done.eq(0)

        cnt = Signal(19)
        drain = Signal(range(self.run_drain + 2))
        # drain >= need - 1 (need: the drain of this instruction's output kind) as a sticky
        # register, set when drain reaches need - 2: the compare against a limit chosen by the
        # instruction's out field ran into the state register (14.1 ns, routed, 9168795)
        assert self.acc_drain >= 2
        drain_ok = Signal()
        drain_m2 = Signal.like(drain)
        # compute-phase counters
        ph = Signal(range(5))
        PH_W, PH_BUB, PH_CHAN, PH_PAD, PH_ROWS = range(5)
        row = Signal(17)
        sub = Signal(range(max(4, cfg.epi_ratio + 1)))
        kt = Signal(17)
        nt = Signal(17)
        koff = Signal(17)
        noff = Signal(17)
        accb = Signal(a_aw + 1)
        issuing_done = Signal()

        # kt == 0 and kt == KT - 1 as registers set with kt: they steer the slot issued this
        # cycle, whose index-memory address is registered with it
        kt_first = Signal()
        kt_last = Signal()
        # kt_last & epi_i as a register set with kt_last: it selects the tile's slot counts, and
        # from the latched instruction's decode it ran through that multiplexer and the row
        # slot compare into nt/koff/noff/ph/lim (12.9 ns, pre-route estimate of 0601e72)
        epi_t = Signal()
        k_rem = f.k - koff
        n_rem = f.n - noff
        kval = Mux(k_rem > rows, rows, k_rem)
        nval = Mux(n_rem > cols, cols, n_rem)
        wslots = Mux(f.b_trans, cols, rows)
        # A tile's slot counts depend on the fields, L and KT (constant from DECIDE to the end
        # of RUN) and on epi_t: both variants are registered (long before RUN) and epi_t
        # selects one, so the sequencer's decisions start from registers (the sums,
        # comparisons and the phase choice ran into nt/koff/noff in one cycle)
        tile_l = data.StructLayout({"cs_m1": 17, "pad_m1": 17, "side": range(4),
                                    "a_sub": sub.shape(), "after_bub": ph.shape(),
                                    "after_chan": ph.shape()})
        tile_v = [Signal(tile_l, name=f"tile_epi{e}") for e in (0, 1)]
        L1 = Signal(17)                   # L - 1
        T1 = Signal(17)                   # T - 1
        L2 = Signal(18)                   # L - 2 and T - 2: row + 1 == L - 1 as one compare
        T2 = Signal(18)
        KT2 = Signal(18)                  # KT - 2: kt + 2 == KT as one compare
        m.d.sync += [L1.eq(L - 1), T1.eq(T - 1), L2.eq(L - 2), T2.eq(T - 2), KT2.eq(KT - 2)]
        for e, tv in enumerate(tile_v):
            cs_e = Mux(f.chan_en, nch, 0) if e else Const(0, 1)
            # the tile's fixed slots and L + fixed, registered one after the other (from the
            # fields through two additions, the compare and the padding's subtraction ran
            # into tile_epi1 in one cycle: 11.7 ns, pre-route estimate of 9168795). The fields
            # are set on IDLE's exit and L, KT in STATIC; RUN comes at least SPLIT_LATENCY + 4
            # cycles later, and tile_v is registered once more behind these.
            fixed_e = Signal(range(cols + rows + nch + 1), name=f"fixed_epi{e}")
            lf_e = Signal(18, name=f"lf_epi{e}")       # L (17 bits) + fixed_e
            m.d.sync += [fixed_e.eq(wslots + Mux(f.b_trans, rows, 0) + cs_e),
                         lf_e.eq(L + fixed_e)]
            pad_e = Mux((KT > 1) & (lf_e < HAZARD_SLOTS), HAZARD_SLOTS - lf_e, 0)
            side_e = (f.res_en + out_add) if e else Const(0, 1)
            # the slot of a row's A line: after its side reads, and with a narrow epilogue
            # (epi_ratio > 1) no earlier than epi_ratio - 1 idle slots after the previous row's
            if cfg.epi_ratio > 1 and e:
                a_sub_e = Mux(side_e < cfg.epi_ratio - 1, cfg.epi_ratio - 1, side_e)
            else:
                a_sub_e = side_e
            m.d.sync += [
                tv.cs_m1.eq(cs_e - 1), tv.pad_m1.eq(pad_e - 1),
                tv.side.eq(side_e), tv.a_sub.eq(a_sub_e),
                tv.after_bub.eq(Mux(cs_e != 0, PH_CHAN, Mux(pad_e != 0, PH_PAD, PH_ROWS))),
                tv.after_chan.eq(Mux(pad_e != 0, PH_PAD, PH_ROWS)),
            ]
        tile = Signal(tile_l)
        m.d.comb += tile.eq(Mux(epi_t, tile_v[1], tile_v[0]))
        side = tile.side
        a_sub = tile.a_sub

        # common fields of compute slots
        def slot(kind, i):
            m.d.comb += [
                t0.kind.eq(kind), t0.i.eq(i), t0.kt_first.eq(kt_first), t0.kt_last.eq(kt_last),
                t0.epi.eq(epi_t), t0.koff.eq(koff), t0.noff.eq(noff), t0.kval.eq(kval),
                t0.nval.eq(nval), t0.line.eq(accb + i), t0.row_last.eq(i == L - 1),
                t0.first.eq((kind == _Op.A) & (i == 0)),
            ]

        after_bub = tile.after_bub
        after_chan = tile.after_chan

        # The last cnt of the RUN phase (W, BUB, CHAN, PAD) is a register set with the phase:
        # the phase's own compare target (a field multiplexer or tile's epi_t multiplexer in
        # front of a 17-bit compare) ran into cnt and ph (13.1 ns, pre-route estimate).
        lim = Signal(17)
        # CHK_WAIT's cnt >= CHECK_DRAIN - 1 as a register (cnt is 0 on entry, so it is 0 there;
        # the 19-bit compare ran into every tile register CHK_WAIT sets: 14.3 ns, pre-route
        # estimate)
        chk_ok = Signal()
        assert self.CHECK_DRAIN >= 2
        m.d.sync += chk_ok.eq(0)
        # row == L1 and nt == T1 as registers set with row and nt (their 17-bit compares sat
        # in front of kt_last, nt, noff, koff and accb: 12.5-12.7 ns, pre-route estimate)
        row_last = Signal()
        nt_last = Signal()

        def lim_of(phase):
            phase = Value.cast(phase)
            return Mux(phase == PH_W, wslots - 1,
                       Mux(phase == PH_BUB, rows - 1,
                           Mux(phase == PH_CHAN, tile.cs_m1, tile.pad_m1)))

        def goto(phase):
            m.d.sync += [ph.eq(phase), cnt.eq(0), lim.eq(lim_of(phase))]

        # validity walker (scan / clear) control
        vw_start_scan = Signal()
        vw_start_clear = Signal()
        vw_busy = Signal()

        sat_pend = Signal(32)   # saturation events carried over (only if > 255 per cycle)
        ev_r = Signal(range(self.events_per_cycle_max + 1))  # this cycle's, registered
        sat_clear = ((sat_pend == 0) & (ev_r <= 255) if self.events_per_cycle_max > 255
                     else Const(1))
        finishing = Signal()

        with m.FSM():
            with m.State("IDLE"):
                with m.If(ctl.start):
                    f_in = data.View(isa.Matmul, ctl.instr[:_INSTR_LAYOUT.size])
                    m.d.sync += [f.eq(f_in), q_ent.eq(self.queues.q[f_in.queue])]
                    m.next = "STATIC"
            with m.State("STATIC"):
                m.d.comb += fsm_busy.eq(1)
                max_dim, max_k = cfg.max_dim, cfg.max_k
                m.d.sync += [
                    L.eq(l_static), T.eq(t_static), KT.eq(kt_static), qoff.eq(q_ent.off),
                    used_t.eq(used_tiles), cnt.eq(0),
                    st.field.eq((acc_in == 3) | (out == 3) | (act == 3)
                                | (f.m == 0) | (f.m > max_dim) | (f.n == 0) | (f.n > max_dim)
                                | (f.k == 0) | (f.k > max_k)),
                    st.queue.eq(qmode & (f.queue >= cfg.max_experts)),
                    st.idx.eq(qmode & (q_ent.off + q_ent.len > cfg.idx_entries)),
                    st.rows.eq(qmode & (q_ent.len > f.m)),
                    st.add.eq(out_add & ~f.scatter),
                    st.rs.eq((is_scale | f.row_norm) & (f.rs_base + l_static > cfg.rowstate_rows)),
                    st.scatter.eq(out_acc & f.scatter),
                    st.chan.eq(f.chan_en & (f.chan_addr + 4 * f.n > spw)),
                    st.shift.eq((~f.chan_en & (f.shift > 62)) | (f.act_shift > 62)
                                | (f.res_shift > 62)),
                    # the last channel-table chunk (the CHK_C compare's operand)
                    chk_last.eq(((4 * f.n + lanes - 1) >> _log2(lanes)) - 1),
                    bad_a.eq(0), bad_b.eq(0), bad_o.eq(0), bad_cs.eq(0),
                ]
                m.next = "USED"
            with m.State("USED"):
                m.d.comb += fsm_busy.eq(1)
                m.d.sync += cnt.eq(cnt + 1)
                with m.If(cnt == SPLIT_LATENCY - 1):
                    m.next = "DECIDE"
            with m.State("DECIDE"):
                m.d.comb += fsm_busy.eq(1)
                with m.If(st.field | st.queue | st.rows | st.add):
                    m.d.sync += code.eq(ErrorCode.BAD_FIELD)
                    m.next = "FINISH"
                with m.Elif(st.idx):
                    m.d.sync += code.eq(ErrorCode.IDX_RANGE)
                    m.next = "FINISH"
                with m.Elif(used > acc_room):
                    m.d.sync += code.eq(ErrorCode.ACC_RANGE)
                    m.next = "FINISH"
                with m.Else():
                    m.d.comb += vw_start_scan.eq(~is_zero)
                    m.d.sync += cnt.eq(0)
                    m.next = "CHK_AO"
            with m.State("CHK_AO"):
                m.d.comb += [fsm_busy.eq(1), t0.kind.eq(_Op.CHK_AO)]
                m.next = "CHK_B"
            with m.State("CHK_B"):
                m.d.comb += [fsm_busy.eq(1), t0.kind.eq(_Op.CHK_B)]
                with m.If((f.gather | f.scatter) & (L != 0)):
                    m.next = "CHK_Q"
                with m.Elif(epi_i & f.chan_en & ~st.chan):
                    m.next = "CHK_C"
                with m.Else():
                    m.next = "CHK_WAIT"
            with m.State("CHK_Q"):
                m.d.comb += [fsm_busy.eq(1), t0.kind.eq(_Op.CHK_Q), t0.i.eq(cnt)]
                m.d.sync += cnt.eq(cnt + 1)
                with m.If(cnt == L1):
                    m.d.sync += cnt.eq(0)
                    with m.If(epi_i & f.chan_en & ~st.chan):
                        m.next = "CHK_C"
                    with m.Else():
                        m.next = "CHK_WAIT"
            with m.State("CHK_C"):
                m.d.comb += [fsm_busy.eq(1), t0.kind.eq(_Op.CHK_C), t0.i.eq(cnt)]
                m.d.sync += cnt.eq(cnt + 1)
                with m.If(cnt == chk_last):
                    m.d.sync += cnt.eq(0)
                    m.next = "CHK_WAIT"
            with m.State("CHK_WAIT"):
                m.d.comb += fsm_busy.eq(1)
                m.d.sync += [cnt.eq(cnt + 1), chk_ok.eq(cnt + 1 >= self.CHECK_DRAIN - 1)]
                # the tile registers are set in every CHK_WAIT cycle (nothing reads them before
                # RUN, and their values are fixed here): with the exit condition in their
                # enables, the validity walker's busy ran into nt/kt/koff/noff (12.0 ns,
                # pre-route estimate of e30bab3)
                m.d.sync += [kt_first.eq(1), kt_last.eq(KT == 1), epi_t.eq((KT == 1) & epi_i)]
                m.d.sync += [ph.eq(PH_W), lim.eq(wslots - 1), row.eq(0),
                             row_last.eq(L1 == 0), nt_last.eq(T1 == 0), sub.eq(0), kt.eq(0),
                             nt.eq(0), koff.eq(0), noff.eq(0), accb.eq(f.acc_addr),
                             issuing_done.eq(L == 0), drain.eq(0), drain_ok.eq(0),
                             drain_m2.eq(Mux(out_acc, self.acc_drain, self.run_drain) - 2)]
                with m.If(chk_ok & ~vw_busy):
                    m.d.sync += cnt.eq(0)
                    # the golden order of the remaining checks
                    with m.If(bad_a | bad_b):
                        m.d.sync += code.eq(ErrorCode.SPAD_RANGE)
                        m.next = "FINISH"
                    with m.Elif(st.rs):
                        m.d.sync += code.eq(ErrorCode.ROWSTATE_RANGE)
                        m.next = "FINISH"
                    with m.Elif(~is_zero & stale):
                        m.d.sync += code.eq(ErrorCode.BAD_FIELD)
                        m.next = "FINISH"
                    with m.Elif(st.scatter):
                        m.d.sync += code.eq(ErrorCode.BAD_FIELD)
                        m.next = "FINISH"
                    with m.Elif(epi_i & st.chan):
                        m.d.sync += code.eq(ErrorCode.SPAD_RANGE)
                        m.next = "FINISH"
                    with m.Elif(epi_i & (st.shift | (f.chan_en & bad_cs))):
                        m.d.sync += code.eq(ErrorCode.BAD_FIELD)
                        m.next = "FINISH"
                    with m.Elif(epi_i & bad_o):
                        m.d.sync += code.eq(ErrorCode.SPAD_RANGE)
                        m.next = "FINISH"
                    with m.Else():
                        m.d.sync += code.eq(ErrorCode.OK)
                        m.d.comb += vw_start_clear.eq(epi_i)
                        m.next = "RUN"
            with m.State("RUN"):
                m.d.comb += fsm_busy.eq(1)
                with m.If(issuing_done):
                    m.d.sync += drain.eq(drain + 1)
                    with m.If(drain == drain_m2):
                        m.d.sync += drain_ok.eq(1)
                    with m.If(drain_ok & ~vw_busy & sat_clear):
                        m.next = "FINISH"
                with m.Else():
                    m.d.sync += cnt.eq(cnt + 1)
                    with m.Switch(ph):
                        with m.Case(PH_W):
                            slot(Mux(f.b_trans, _Op.BT, _Op.W), cnt)
                            with m.If(cnt == lim):
                                goto(Mux(f.b_trans, PH_BUB, after_bub))
                        with m.Case(PH_BUB):
                            with m.If(cnt == lim):
                                goto(after_bub)
                        with m.Case(PH_CHAN):
                            slot(_Op.CHAN, cnt)
                            with m.If(cnt == lim):
                                goto(after_chan)
                        with m.Case(PH_PAD):
                            with m.If(cnt == lim):
                                goto(PH_ROWS)
                        with m.Case(PH_ROWS):
                            with m.If(sub == a_sub):
                                slot(_Op.A, row)
                                m.d.sync += [sub.eq(0), row.eq(row + 1),
                                             row_last.eq(row == L2)]
                                with m.If(row_last):
                                    m.d.sync += [row.eq(0), row_last.eq(L1 == 0)]
                                    goto(PH_W)
                                    with m.If(~kt_last):
                                        m.d.sync += [kt.eq(kt + 1), koff.eq(koff + rows),
                                                     kt_first.eq(0), kt_last.eq(kt == KT2),
                                                     epi_t.eq((kt == KT2) & epi_i)]
                                    with m.Elif(nt_last):
                                        m.d.sync += issuing_done.eq(1)
                                    with m.Else():
                                        m.d.sync += [kt_first.eq(1), kt_last.eq(KT == 1),
                                                     epi_t.eq((KT == 1) & epi_i)]
                                        m.d.sync += [kt.eq(0), koff.eq(0), nt.eq(nt + 1),
                                                     nt_last.eq(nt == T2),
                                                     noff.eq(noff + cols)]
                                        with m.If(arch):
                                            m.d.sync += accb.eq(accb + f.m)
                            with m.Else():
                                with m.If(sub < side):
                                    slot(Mux((sub == 0) & f.res_en, _Op.RES, _Op.OLD), row)
                                m.d.sync += sub.eq(sub + 1)
            with m.State("FINISH"):
                m.d.comb += [fsm_busy.eq(1), finishing.eq(1)]
                m.d.sync += done.eq(1)
                m.next = "IDLE"

        # -- S0, S0b: queue entry and row state reads -----------------------------------------
        # The addresses are registered with the slot (the sequencer's multiplexers and these
        # sums do not reach the shared memories' ports in the same cycle). Index memory's and
        # the row state's data come IDX_READ_LATENCY = RS_READ_LATENCY = 2 cycles later: both
        # arrive at S1.
        idx_a0 = Signal.like(self.idx.rd_addr)
        rs_a0 = Signal.like(self.rs.rd_addr)
        m.d.sync += [idx_a0.eq(qoff + t0.i), rs_a0.eq(f.rs_base + t0.i)]
        m.d.comb += [
            self.idx.rd_en.eq(1), self.idx.rd_addr.eq(idx_a0),
            self.rs.rd_en.eq(1), self.rs.rd_addr.eq(rs_a0),
        ]

        # -- S1: row * stride products ------------------------------------------------------------
        k1 = t1.kind
        tok = self.idx.rd_data.a
        tok_row = tok[:_ROW_BITS - 1].as_signed()
        use_tok_a = ((k1 == _Op.A) & f.gather) | (k1 == _Op.CHK_Q)
        use_tok_o = (((k1 == _Op.A) | (k1 == _Op.RES) | (k1 == _Op.OLD)) & f.scatter) \
            | (k1 == _Op.CHK_Q)
        w_side = (k1 == _Op.W) | (k1 == _Op.BT) | (k1 == _Op.CHK_B)
        row_a = Signal(17)
        with m.Switch(k1):
            with m.Case(_Op.W):
                m.d.comb += row_a.eq(t1.koff + t1.i)
            with m.Case(_Op.BT):
                m.d.comb += row_a.eq(t1.noff + t1.i)
            with m.Case(_Op.CHK_AO):
                m.d.comb += row_a.eq(L - 1)
            with m.Case(_Op.CHK_B):
                m.d.comb += row_a.eq(Mux(f.b_trans, f.n, f.k) - 1)
            with m.Default():
                m.d.comb += row_a.eq(t1.i)
        row_o = Mux(k1 == _Op.CHK_AO, L - 1, t1.i)
        ra = Signal(signed(_ROW_BITS))
        ro = Signal(signed(_ROW_BITS))
        m.d.comb += [ra.eq(Mux(use_tok_a, tok_row, row_a)), ro.eq(Mux(use_tok_o, tok_row, row_o))]
        stride_a = Mux(w_side, f.b_stride, f.a_stride)
        # S1 registers the operands (the token row arrives from index memory in this cycle),
        # S1b multiplies: no operand multiplexer in front of the DSP blocks
        ra1 = Signal(signed(_ROW_BITS), reset_less=True)
        ro1 = Signal(signed(_ROW_BITS), reset_less=True)
        sa1 = Signal(stride_a.shape(), reset_less=True)
        # "the token row does not fit" is decided in S1b from registered inputs: the token's
        # top bits, read from index memory in this cycle (block RAM clock-to-output, the way
        # across the chip, then the wide compare: 15.1 ns into far_a1, e30bab3 build, routed)
        tok_hi1 = Signal(len(tok) - (_ROW_BITS - 2))
        use_a1 = Signal()
        use_o1 = Signal()
        m.d.sync += [
            ra1.eq(ra), ro1.eq(ro), sa1.eq(stride_a),
            tok_hi1.eq(tok[_ROW_BITS - 2:]), use_a1.eq(use_tok_a & (stride_a != 0)),
            use_o1.eq(use_tok_o & (f.out_stride != 0)),
            t1b.eq(t1),
            t1b.prob.eq(self.idx.rd_data.b),
            t1b.c.eq(self.rs.rd_data.c), t1b.r.eq(self.rs.rd_data.r), t1b.k.eq(self.rs.rd_data.k),
        ]
        # S1b, S1c: the products, partial products registered at the DSP blocks (as one stage,
        # from ``ro1`` to the DSP blocks and back through a 50-bit sum, 16.0 ns into ``po2``;
        # routed model of the dc9338d build)
        assert SPLIT_LATENCY == 2
        pa2 = split_product(m, ra1, sa1, en=1, name="pa", shape=signed(_ADDR_BITS))
        po2 = split_product(m, ro1, f.out_stride, en=1, name="po", shape=signed(_ADDR_BITS))
        far_a1c = Signal()
        far_o1c = Signal()
        far_a2 = Signal()
        far_o2 = Signal()
        tok_fits1 = (tok_hi1 == 0) | tok_hi1.all()
        m.d.sync += [
            far_a1c.eq(use_a1 & ~tok_fits1), far_o1c.eq(use_o1 & ~tok_fits1), t1c.eq(t1b),
            far_a2.eq(far_a1c), far_o2.eq(far_o1c), t2.eq(t1c),
        ]

        # -- S2: addresses, scratchpad read, range checks -----------------------------------------
        # Everything of the addresses but the products is registered at S1c from the slot's
        # kind and offsets (the kind's decode, a three-term sum and the kind's address
        # multiplexer in one cycle ran through the scratchpad's port multiplexer into its read
        # address: 12.8 ns, routed, 9168795); so are the address choice and the read enable.
        k1c, k2 = t1c.kind, t2.kind
        w1c = (k1c == _Op.W) | (k1c == _Op.BT) | (k1c == _Op.CHK_B)
        off_a1c = Mux(k1c == _Op.W, t1c.noff,
                      Mux((k1c == _Op.A) | (k1c == _Op.BT), t1c.koff, 0))
        base_a2 = Signal(signed(_ADDR_BITS))
        base_o2 = Signal(signed(_ADDR_BITS))
        base_r2 = Signal(signed(_ADDR_BITS))
        addr_c = Signal(signed(_ADDR_BITS))
        sel_r2, sel_o2, sel_c2, rd_en2 = Signal(), Signal(), Signal(), Signal()
        m.d.sync += [
            base_a2.eq(Mux(w1c, f.b_addr, f.a_addr) + off_a1c),
            base_o2.eq(f.out_addr + t1c.noff),
            base_r2.eq(f.res_addr + t1c.noff),
            addr_c.eq(f.chan_addr + (t1c.noff << 2) + t1c.i * lanes),
            sel_r2.eq(k1c == _Op.RES), sel_o2.eq(k1c == _Op.OLD),
            sel_c2.eq((k1c == _Op.CHAN) | (k1c == _Op.CHK_C)),
            rd_en2.eq((k1c == _Op.A) | (k1c == _Op.W) | (k1c == _Op.BT) | (k1c == _Op.RES)
                      | (k1c == _Op.OLD) | (k1c == _Op.CHAN) | (k1c == _Op.CHK_C)),
        ]
        addr_a = Signal(signed(_ADDR_BITS))
        addr_o = Signal(signed(_ADDR_BITS))
        addr_r = Signal(signed(_ADDR_BITS))
        m.d.comb += [addr_a.eq(base_a2 + pa2), addr_o.eq(base_o2 + po2),
                     addr_r.eq(base_r2 + po2)]
        rd_addr = Signal(signed(_ADDR_BITS))
        m.d.comb += rd_addr.eq(Mux(sel_r2, addr_r, Mux(sel_o2, addr_o,
                                                       Mux(sel_c2, addr_c, addr_a))))
        m.d.comb += [self.spad.rd_en.eq(rd_en2), self.spad.rd_addr.eq(rd_addr)]
        m.d.sync += t3.oaddr.eq(addr_o)

        def outside(addr, length):
            return (addr < 0) | (addr + length - 1 >= spw)

        # The range checks of a check slot run one stage later (S2 + 1), on registered
        # addresses: the three-term address sums and the end compare in one cycle were 15.8 ns
        # into ``bad_a`` (routed model of the dc9338d build). The flags are still set before
        # the channel-table check's (at D), which CHECK_DRAIN already waits for.
        chk_a = Signal(signed(_ADDR_BITS))
        chk_o = Signal(signed(_ADDR_BITS))
        chk_r = Signal(signed(_ADDR_BITS))
        chk_len = Signal(17)
        far_a3 = Signal()
        far_o3 = Signal()
        m.d.sync += [chk_a.eq(addr_a), chk_o.eq(addr_o), chk_r.eq(addr_r),
                     chk_len.eq(Mux(k2 == _Op.CHK_B, Mux(f.b_trans, f.k, f.n), f.k)),
                     far_a3.eq(far_a2), far_o3.eq(far_o2)]
        k3 = t3.kind
        a_bad = outside(chk_a, chk_len) | far_a3
        o_bad = outside(chk_o, f.n) | far_o3 | (f.res_en & outside(chk_r, f.n))
        with m.If((k3 == _Op.CHK_AO) & (L != 0)):
            with m.If(~f.gather & a_bad):
                m.d.sync += bad_a.eq(1)
            with m.If(~f.scatter & o_bad):
                m.d.sync += bad_o.eq(1)
        with m.If((k3 == _Op.CHK_B) & a_bad):
            m.d.sync += bad_b.eq(1)
        with m.If(k3 == _Op.CHK_Q):
            with m.If(f.gather & a_bad):
                m.d.sync += bad_a.eq(1)
            with m.If(f.scatter & o_bad):
                m.d.sync += bad_o.eq(1)

        # -- D: scratchpad data -------------------------------------------------------------------
        k4 = t4.kind
        rd = self.spad.rd_data

        # channel-table shift check: words 4j + 3 of the table, j < n
        with m.If(k4 == _Op.CHK_C):
            remain = 4 * f.n - t4.i * lanes      # words of the table from this chunk on
            for p in range(lanes):
                if lanes >= 4:
                    is_shift = (p % 4) == 3
                else:
                    is_shift = ((t4.i * lanes + p) & 3) == 3
                word = rd[p]
                with m.If(is_shift & (remain > p) & ((word < 0) | (word > 62))):
                    m.d.sync += bad_cs.eq(1)

        # weights: B rows straight into the array, B^T rows through the transpose buffer
        w_in = mac.w_stream
        tbuf = [[Signal(signed(16), name=f"tbuf_{c}_{r}") for r in range(rows)]
                for c in range(cols)]
        pushing = Signal()
        push_r = Signal(range(rows))
        # Which words of the slot are kept and which transpose-buffer column takes them, as
        # registers set from the stage before t4: the scratchpad's read data crosses the chip
        # from its rotate register, and the compares and decodes in front of ``tbuf`` were
        # MATMUL's slowest path (tbuf_2_*, 12.6-12.7 ns routed, e000a2e seed 4)
        t_pre = t_rd[-2]
        w_keep = Signal(cols)
        bt_col = Signal(cols)
        bt_keep = [Signal(rows, name=f"bt_keep{c}") for c in range(cols)]
        m.d.sync += [w_keep.eq(Cat(*[(t_pre.i < t_pre.kval) & (j < t_pre.nval)
                                     for j in range(cols)])),
                     bt_col.eq(Cat(*[(t_pre.kind == _Op.BT) & (t_pre.i == c)
                                     for c in range(cols)]))]
        m.d.sync += [bt_keep[c].eq(Cat(*[(r < t_pre.kval) & (c < t_pre.nval)
                                         for r in range(rows)])) for c in range(cols)]
        with m.If(k4 == _Op.W):
            m.d.comb += w_in.valid.eq(1)
            for j in range(cols):
                m.d.comb += w_in.payload[j].eq(Mux(w_keep[j], rd[j], 0))
        with m.Elif(pushing):
            m.d.comb += w_in.valid.eq(1)
            for j in range(cols):
                m.d.comb += w_in.payload[j].eq(Array(tbuf[j])[push_r])
            m.d.sync += push_r.eq(push_r + 1)
            with m.If(push_r == rows - 1):
                m.d.sync += [pushing.eq(0), push_r.eq(0)]
        protocol(w_in.valid & ~w_in.ready)
        for c in range(cols):
            with m.If(bt_col[c]):
                for r in range(rows):
                    m.d.sync += tbuf[c][r].eq(Mux(bt_keep[c][r], rd[r], 0))
        with m.If(k4 == _Op.BT):
            with m.If(t4.i == cols - 1):
                m.d.sync += [pushing.eq(1), push_r.eq(0)]

        # A lines
        a_in = mac.a_stream
        # the slot's MAC count, registered from the stage before t4 (the product at t4 went
        # from t4 to a multiplier block and on to the controller's counter increment in one
        # cycle: 13.9 ns, routed, d52dd61's critical path); reset-less, so the block takes the
        # register
        assert len(t_rd) >= 2
        macs_q = Signal(range(rows * cols + 1), reset_less=True)
        m.d.sync += macs_q.eq(t_rd[-2].kval * t_rd[-2].nval)
        with m.If(k4 == _Op.A):
            m.d.comb += [a_in.valid.eq(1), a_in.payload.first.eq(t4.first),
                         self.macs_inc.eq(macs_q)]
        # The line's words whatever the slot (the array multiplies every cycle and only valid
        # lines reach its output): zero outside A slots would make Yosys give the array's ``a``
        # registers a synchronous reset, and the build flow moves only plain flip-flops into
        # the DSP blocks' input registers.
        for r in range(rows):
            m.d.comb += a_in.payload.data[r].eq(rd[r])
        protocol(a_in.valid & ~a_in.ready)

        # channel table of a column tile -> FIFO of per-lane (bias, mult, shift)
        chan_lane = data.StructLayout({"bias": signed(32), "mult": signed(16), "shift": 6})
        chan_entry = data.ArrayLayout(chan_lane, cols)
        m.submodules.chan_fifo = chan_fifo = SyncFIFO(
            width=chan_entry.size, depth=self._fifo_depth(per_tile=True))
        words = 4 * cols
        per_chunk = min(lanes, words)
        chan_buf = [Signal(signed(16), name=f"chan_w{w}") for w in range(words)]
        cur = []     # the table words including the chunk arriving now
        for w in range(words):
            q, p = divmod(w, per_chunk)
            cur.append(Mux(t4.i == q, rd[p], chan_buf[w]) if nch > 1 else rd[p])
        with m.If(k4 == _Op.CHAN):
            for w in range(words):
                m.d.sync += chan_buf[w].eq(cur[w])
        chan_w = data.View(chan_entry, chan_fifo.w_data)
        for c in range(cols):
            m.d.comb += [
                chan_w[c].bias.eq(Cat(cur[4 * c][:16], cur[4 * c + 1][:16]).as_signed()),
                chan_w[c].mult.eq(cur[4 * c + 2]),
                chan_w[c].shift.eq(cur[4 * c + 3][:6]),
            ]
        m.d.comb += chan_fifo.w_en.eq((k4 == _Op.CHAN) & (t4.i == nch - 1))
        protocol(chan_fifo.w_en & ~chan_fifo.w_rdy)

        words_layout = data.ArrayLayout(signed(16), cols)
        m.submodules.res_fifo = res_fifo = SyncFIFO(width=words_layout.size,
                                                    depth=self._fifo_depth())
        m.submodules.old_fifo = old_fifo = SyncFIFO(width=words_layout.size,
                                                    depth=self._fifo_depth())
        m.d.comb += [
            res_fifo.w_data.eq(Cat(rd[c] for c in range(cols))),
            res_fifo.w_en.eq(k4 == _Op.RES),
            old_fifo.w_data.eq(Cat(rd[c] for c in range(cols))),
            old_fifo.w_en.eq(k4 == _Op.OLD),
        ]
        protocol(res_fifo.w_en & ~res_fifo.w_rdy)
        protocol(old_fifo.w_en & ~old_fifo.w_rdy)

        # -- tags of A lines through the array ----------------------------------------------------
        pt = [Signal(ptag_layout, name=f"ptag_{s}") for s in range(lm + 1)]
        m.d.comb += [
            pt[0].valid.eq(k4 == _Op.A), pt[0].kt_first.eq(t4.kt_first),
            pt[0].kt_last.eq(t4.kt_last), pt[0].row_last.eq(t4.row_last), pt[0].epi.eq(t4.epi),
            pt[0].nval.eq(t4.nval), pt[0].line.eq(t4.line), pt[0].prob.eq(t4.prob),
            pt[0].c.eq(t4.c), pt[0].r.eq(t4.r), pt[0].k.eq(t4.k), pt[0].oaddr.eq(t4.oaddr),
        ]
        m.d.sync += [pt[s + 1].eq(pt[s]) for s in range(lm)]
        p_tag = pt[lm]
        o_mac = mac.o_stream
        m.d.comb += o_mac.ready.eq(1)
        protocol(o_mac.valid != p_tag.valid)

        # -- R0..R3: accumulator read-modify-write ------------------------------------------------
        ext = Memory(shape=cols, depth=cfg.acc_lines, init=[])
        m.submodules.ext = ext
        ext_rd = ext.read_port()
        ext_wr = ext.write_port()
        # The read is issued with the tag three stages before the array's output (R0 - 3) and
        # its data registered twice before R0 (``old_a``, ``old0``): the block RAM's output goes
        # through the memory's read multiplexer into ``old_a`` (about 7.5 ns, pre-route), too
        # late for the build flow to move that register into the SCALE blocks' input
        # registers, and the route from such a register to the blocks was 13.8 ns into
        # ``sc17_2_1`` (101b217 build, routed). ``old0`` is fed by a register and goes into
        # the blocks; the products are registered at R1 and their sum at R2.
        assert lm >= 3
        q_tag = pt[lm - 3]
        m.d.comb += [
            self.acc.rd_en.eq(q_tag.valid), self.acc.rd_addr.eq(q_tag.line),
            ext_rd.en.eq(q_tag.valid), ext_rd.addr.eq(q_tag.line),
        ]
        r1 = Signal(ptag_layout)
        r2 = Signal(ptag_layout)
        r3 = Signal(ptag_layout)
        m.d.sync += [r1.eq(p_tag), r2.eq(r1), r3.eq(r2)]
        psum1 = [Signal(signed(ab), name=f"psum1_{c}") for c in range(cols)]
        psum2 = [Signal(signed(ab), name=f"psum2_{c}") for c in range(cols)]
        old2 = [Signal(signed(ab), name=f"old2_{c}") for c in range(cols)]
        old3 = [Signal(signed(ab), name=f"old3_{c}") for c in range(cols)]
        ext_a = Signal(cols)
        ext0 = Signal(cols)
        ext1 = Signal(cols)
        ext2 = Signal(cols)
        # (reset-less: the build flow moves only plain flip-flops into a DSP block)
        old_a = [Signal(signed(ab), name=f"old_a_{c}", reset_less=True) for c in range(cols)]
        old0 = [Signal(signed(ab), name=f"old0_{c}", reset_less=True) for c in range(cols)]
        c0 = Signal.like(p_tag.c, name="scale_c0", reset_less=True)    # p_tag.c, plain
        m.d.sync += c0.eq(pt[lm - 1].c)
        old1 = [Signal(signed(ab), name=f"old1_{c}") for c in range(cols)]
        # old * c as registered partial products at R1, one per 17-bit piece of old (one DSP
        # block each, nothing between the block and its register), and their sum registered at
        # R2. (The product and its adder in one cycle were the 2da45db build's slowest MATMUL
        # path in the routed model, 20 ns, most of it the way to the DSPs; a 31-bit piece
        # needed two blocks and their adder before its register, 15.7 ns into ``sc_hi2``,
        # e30bab3 build, routed; the pieces' sum in the addition of R2 was 13.5 ns into
        # ``sum3_1``, 101b217 build, routed.)
        assert ab > 17 and len(p_tag.c) <= 17
        scaled = [Signal(signed(ab + 18), name=f"scaled_{c}") for c in range(cols)]
        sum3 = [Signal(signed(ab + 4), name=f"sum3_{c}") for c in range(cols)]
        m.d.sync += [ext_a.eq(ext_rd.data), ext0.eq(ext_a), ext1.eq(ext0), ext2.eq(ext1)]
        # R2's choice of addend as registers set at R1 (decoding acc_in and kt_first in front of
        # the adder was 7.6 ns into ``sum3``, pre-route, from the instruction register)
        sel_scale = Signal()        # kt_first, acc_in = SCALE: the scaled old value
        sel_zero = Signal()         # kt_first, acc_in = ZERO: 0
        sel_old = Signal()          # kt_first otherwise: old; later K slices: old with EXT
        m.d.sync += [sel_scale.eq(r1.kt_first & is_scale), sel_zero.eq(r1.kt_first & is_zero),
                     sel_old.eq(r1.kt_first)]
        for c in range(cols):
            m.d.sync += [
                old_a[c].eq(self.acc.rd_data[c]),
                old0[c].eq(old_a[c]),
                old1[c].eq(old0[c]),
                psum1[c].eq(o_mac.payload.data[c]),
                psum2[c].eq(psum1[c]),
                old2[c].eq(old1[c]),
                old3[c].eq(old2[c]),
            ]
            sc_parts = []     # (register, shift)
            for lo in range(0, ab, 17):
                piece = old0[c][lo:lo + 17]
                top = lo + 17 >= ab
                if top:
                    piece = piece.as_signed()
                sc = Signal(signed(len(piece) + 18) if top else 34, name=f"sc{lo}_1_{c}",
                            reset_less=True)
                m.d.sync += sc.eq(piece * c0)
                sc_parts.append((sc, lo))
            m.d.sync += scaled[c].eq(sum(sc << lo for sc, lo in sc_parts))
            # R2: what the products are added to; scaled: rnd(old * c >> 15) + psum
            # = (sum of the pieces' products + psum * 2^15 + 2^14) >> 15, exact, one sum
            base = Signal(signed(ab + 4), name=f"base_{c}")
            with m.If(sel_zero):
                m.d.comb += base.eq(0)
            with m.Elif(sel_old):
                m.d.comb += base.eq(old2[c])
            with m.Else():
                m.d.comb += base.eq(Cat(old2[c], ext2[c]).as_signed())
            with m.If(sel_scale):
                # (psum * 2^15 + 2^14: the constant fills the low bits, no adder)
                m.d.sync += sum3[c].eq((scaled[c] + Cat(Const(1 << 14, 15), psum2[c]).as_signed())
                                       >> 15)
            with m.Else():
                m.d.sync += sum3[c].eq(base + psum2[c])

        # R3: saturate on the last K slice; write back or hand to the epilogue
        fin = []
        ev_rmw = []
        acc_wr = []
        for c in range(cols):
            v, ev = _saturate(sum3[c], ab)
            fin.append(v)
            lane_ok = c < r3.nval
            ev_rmw.append(r3.valid & r3.kt_last & ~is_zero & lane_ok & ev)
            acc_wr.append(Mux(lane_ok, Mux(r3.kt_last, v, sum3[c][:ab]), old3[c]))
        m.d.comb += [
            self.acc.wr_en.eq(r3.valid & (~r3.kt_last | out_acc)),
            self.acc.wr_addr.eq(r3.line),
            ext_wr.en.eq(r3.valid & ~r3.kt_last),
            ext_wr.addr.eq(r3.line),
            ext_wr.data.eq(Cat(sum3[c][ab] for c in range(cols))),
        ]
        for c in range(cols):
            m.d.comb += self.acc.wr_data[c].eq(acc_wr[c])

        # -- epilogue -----------------------------------------------------------------------------
        e_in = epi.i_stream
        e_go = r3.valid & r3.kt_last & r3.epi
        chan_r = data.View(chan_entry, chan_fifo.r_data)
        res_r = data.View(words_layout, res_fifo.r_data)
        old_r = data.View(words_layout, old_fifo.r_data)
        m.d.comb += [
            e_in.valid.eq(e_go),
            e_in.payload.op.act.eq(f.act),
            e_in.payload.op.act_mult.eq(f.act_mult.as_signed()),
            e_in.payload.op.act_shift.eq(f.act_shift),
            e_in.payload.op.res_en.eq(f.res_en),
            e_in.payload.op.res_mult.eq(f.res_mult.as_signed()),
            e_in.payload.op.res_shift.eq(f.res_shift),
            e_in.payload.op.row_norm.eq(f.row_norm),
            e_in.payload.op.add.eq(out_add),
            e_in.payload.r.eq(r3.r),
            e_in.payload.k.eq(r3.k),
            e_in.payload.prob.eq(r3.prob),
            chan_fifo.r_en.eq(e_go & f.chan_en & r3.row_last),
            res_fifo.r_en.eq(e_go & f.res_en),
            old_fifo.r_en.eq(e_go & out_add),
        ]
        protocol(chan_fifo.r_en & ~chan_fifo.r_rdy)
        protocol(res_fifo.r_en & ~res_fifo.r_rdy)
        protocol(old_fifo.r_en & ~old_fifo.r_rdy)
        protocol(e_in.valid & ~e_in.ready)
        # Columns beyond n get neutral operands (0 in, 0 out, no saturation event).
        for c in range(cols):
            lane = e_in.payload.lanes[c]
            ok = c < r3.nval
            m.d.comb += [
                lane.acc.eq(Mux(ok, fin[c], 0)),
                lane.bias.eq(Mux(ok & f.chan_en, chan_r[c].bias, 0)),
                lane.mult.eq(Mux(ok, Mux(f.chan_en, chan_r[c].mult, f.mult.as_signed()), 0)),
                lane.shift.eq(Mux(ok, Mux(f.chan_en, chan_r[c].shift, f.shift), 0)),
                lane.res.eq(Mux(ok, res_r[c], 0)),
                lane.old.eq(Mux(ok, old_r[c], 0)),
            ]

        # output address and lane mask travel beside the epilogue
        wr_layout = data.StructLayout({"addr": s_aw, "nval": range(cols + 1)})
        m.submodules.wr_fifo = wr_fifo = SyncFIFO(width=wr_layout.size,
                                                  depth=1 << _bits(self._epi.latency + 2))
        wr_w = data.View(wr_layout, wr_fifo.w_data)
        wr_r = data.View(wr_layout, wr_fifo.r_data)
        m.d.comb += [wr_w.addr.eq(r3.oaddr), wr_w.nval.eq(r3.nval), wr_fifo.w_en.eq(e_go)]
        protocol(wr_fifo.w_en & ~wr_fifo.w_rdy)

        e_out = epi.o_stream
        m.d.comb += [
            e_out.ready.eq(1),
            wr_fifo.r_en.eq(e_out.valid),
            self.spad.wr_en.eq(e_out.valid),
            self.spad.wr_addr.eq(wr_r.addr),
        ]
        protocol(wr_fifo.r_en & ~wr_fifo.r_rdy)
        for c in range(cols):
            m.d.comb += [self.spad.wr_data[c].eq(e_out.payload.data[c]),
                         self.spad.wr_mask[c].eq(c < wr_r.nval)]

        # -- saturation events --------------------------------------------------------------------
        # Counted in the cycle they happen and reported in the next one (a register after the
        # popcount). More than 255 in one cycle can only happen when cols * (1 + epilogue
        # events) > 255 (cols >= 37); then the excess is carried over to the next cycles.
        # Otherwise there is no carry register at all (its 32-bit add, compare and subtract
        # were a 12.1 ns routed path on the ULX3S build).
        m.d.sync += ev_r.eq(_popcount(ev_rmw) + Mux(e_out.valid, e_out.payload.sat, 0))
        if self.events_per_cycle_max > 255:
            ev_all = Signal(32)
            m.d.comb += ev_all.eq(sat_pend + ev_r)
            sat_out = Mux(ev_all > 255, 255, ev_all)
            m.d.comb += ctl.sat_inc.eq(sat_out)
            m.d.sync += sat_pend.eq(ev_all - sat_out)
        else:
            m.d.comb += ctl.sat_inc.eq(ev_r)

        # -- accumulator validity -----------------------------------------------------------------
        self._validity(m, f, L, T, used, is_zero, out_acc, r3, vw_start_scan, vw_start_clear,
                       vw_busy, stale)

        # nothing is left in the pipeline when an instruction ends
        in_flight = Cat(*(t.kind.as_value() != _Op.NOP.value for t in (t0q, t0r, t1, t1b, t1c,
                                                                       t2, *t_rd)),
                        *(p.valid for p in pt[1:]), r1.valid, r2.valid, r3.valid, pushing)
        protocol(finishing & ((chan_fifo.level != 0) | (res_fifo.level != 0)
                              | (old_fifo.level != 0) | (wr_fifo.level != 0) | in_flight.any()))

        # unused write ports of read-only memories
        m.d.comb += [self.idx.wr_en.eq(0), self.rs.wr_en.eq(0), self.queues.wr_en.eq(0)]
        return m

    def _fifo_depth(self, per_tile=False):
        """Entries that can be in flight between a side read and its line's epilogue input.

        A side read (residual, destination, channel chunk) is issued before its A slot, and the
        line reaches the epilogue input ``2 + mac.latency + 3`` cycles after the A line's data;
        a row has at least two slots when a side read exists, a column tile at least three.
        """
        span = SPAD_READ_LATENCY + self._mac.latency + 3 + 4
        need = span // 3 + 2 if per_tile else span // 2 + 2
        return 1 << _bits(need + 1)

    def _validity(self, m, f, L, T, used, is_zero, out_acc, r3, start_scan, start_clear, busy,
                  stale):
        """Flip-flops of accumulator-line validity and the word-per-cycle scan/clear walker."""
        cfg = self._cfg
        vw = VALID_WORD
        lvw = _log2(vw)
        n_words = -(-cfg.acc_lines // vw)
        words = [Signal(vw, name=f"acc_valid_{i}") for i in range(n_words)]
        wa = max(1, (n_words - 1).bit_length())

        lo = Signal(18)         # current line range [lo, hm1] (hm1 = hi - 1, kept as a register)
        hm1 = Signal(18)
        w = Signal(18)          # current word
        tiles = Signal(17)      # ranges left including the current one
        clear = Signal()
        walking = Signal()
        # a scanned word and its mask are registered, then compared: `busy` covers that stage
        cmp_v = Signal()
        cmp_word = Signal(vw)
        cmp_mask = Signal(vw)
        # a cleared word's mask is registered before it is applied: `busy` covers that stage
        clr_v = Signal()
        clr_w = Signal(18)
        clr_mask = Signal(vw)
        # walking == (tiles != 0), kept as a register: the 17-bit compare in front of `busy` ran
        # into the sequencer's CHK_WAIT and on into nt/noff/koff/accb (13.9 ns, pre-route
        # estimate of 0fb80e8)
        m.d.comb += busy.eq(walking | cmp_v | clr_v)

        w_lo = lo >> lvw
        w_hi = hm1 >> lvw
        b_lo = Mux(w == w_lo, lo[:lvw], 0)
        b_hi = Mux(w == w_hi, hm1[:lvw], vw - 1)
        mask = Signal(vw)
        m.d.comb += mask.eq(Cat((b >= b_lo) & (b <= b_hi) for b in range(vw)))
        cur = Array(words)[w[:wa]]

        with m.If(start_scan):
            m.d.sync += [lo.eq(f.acc_addr), hm1.eq(f.acc_addr + L - 1), w.eq(f.acc_addr >> lvw),
                         tiles.eq(Mux(L == 0, 0, T)), walking.eq((L != 0) & (T != 0)),
                         clear.eq(0), stale.eq(0)]
        with m.Elif(start_clear):
            m.d.sync += [lo.eq(f.acc_addr), hm1.eq(f.acc_addr + used - 1),
                         w.eq(f.acc_addr >> lvw), tiles.eq(1), walking.eq(1), clear.eq(1)]
        with m.Elif(walking):
            with m.If(w == w_hi):
                m.d.sync += [tiles.eq(tiles - 1), walking.eq(tiles != 1), lo.eq(lo + f.m),
                             hm1.eq(hm1 + f.m),
                             w.eq((lo + f.m) >> lvw)]
            with m.Else():
                m.d.sync += w.eq(w + 1)

        m.d.sync += [cmp_v.eq(walking & ~clear & ~start_scan & ~start_clear),
                     cmp_word.eq(cur), cmp_mask.eq(mask)]
        with m.If(cmp_v & ((cmp_word & cmp_mask) != cmp_mask)):
            m.d.sync += stale.eq(1)

        # out = ACC marks every line it writes on the last K slice
        set_en = r3.valid & r3.kt_last & out_acc
        set_w = r3.line >> lvw
        set_b = r3.line[:lvw]
        m.d.sync += [clr_v.eq(walking & clear), clr_w.eq(w), clr_mask.eq(mask)]
        for i, word in enumerate(words):
            clr = Mux(clr_v & (clr_w == i), clr_mask, 0)
            setv = Mux(set_en & (set_w == i), Const(1, vw) << set_b, 0)
            m.d.sync += word.eq((word & ~clr) | setv)
