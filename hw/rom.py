"""Interpolated lookup tables: the ROMs behind exp, 1/x, 1/sqrt(x) and GELU.

Every table of :mod:`vitamin.golden.tables` is read the same way, ``T[i] + rnd((T[i+1] - T[i]) *
frac >> in_frac)`` with ``i = u >> in_frac`` and ``frac = u & (2^in_frac - 1)``
(:func:`vitamin.golden.tables.interp`). The ROM contents come from
:func:`vitamin.golden.tables.make_table`, the function that also gives the golden model its
tables, so the two cannot disagree.

Both ends of the interval come from one read: entry ``i`` of the ROM holds ``T[i]`` and
``d[i] = T[i+1] - T[i]`` side by side (``value_bits + value_bits + 1`` bits), so a lookup is one
read port and the block RAM's output goes straight to a register. (The ROM had two banks, the
even and the odd entries, and stage B selected ``T[i]`` and ``T[i+1]`` from them and subtracted:
from the block RAM's output through the multiplexer and the 17-bit subtractor to ``d`` was 13.1 ns
in the d52dd61 build on the LFE5U-85F, routed, among the slowest paths of the design.) Two
lookups share one memory with a read port each, a true dual-port block RAM of 18-bit ports, two
of them side by side for the 33-bit word: as many block RAMs as the two banks took.

Pipeline of one lookup (one register level per stage, all under one enable)::

    stage A: ROM read (the read port's data register), frac
    stage B: T[i], d[i] registered from the ROM word
    stage C: p = d * frac                                      (one DSP)
    stage D: T[i] + ((p + 2^(in_frac-1)) >> in_frac)           (arithmetic shift: d < 0 for
                                                                decreasing tables)
"""

from amaranth.hdl import Module, Signal, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from vitamin.config import Config, get_config
from vitamin.golden.tables import TABLE_NAMES, make_table, table_spec

__all__ = ["TableInterp", "build_interp", "interp_input_bits", "INTERP_LATENCY"]

#: Register stages of :func:`build_interp` (A .. D in the module docstring).
INTERP_LATENCY = 4


def interp_input_bits(spec):
    """Width of the unsigned table input ``u`` for a :class:`~vitamin.golden.tables.TableSpec`.

    Every value of that width is a legal input: ``i = u >> in_frac`` is at most
    ``entries - 2``.
    """
    return spec.index_bits + spec.in_frac


def _check_spec(spec):
    # The input width must cover exactly the interpolation intervals: with entries = 2^b + 1,
    # the largest u of b + in_frac bits has i = 2^b - 1 = entries - 2.
    if spec.entries != (1 << spec.index_bits) + 1:
        raise ValueError(f"table {spec.name!r} must have 2^index_bits + 1 entries, "
                         f"not {spec.entries!r}")
    if spec.in_frac < 1:
        raise ValueError(f"table {spec.name!r} needs in_frac >= 1, not {spec.in_frac!r}")


def build_interp(m, spec, contents, inputs, enable, *, name):
    """Add the ROM and interpolation pipelines for ``inputs`` to module ``m``.

    All lookups share one memory, with one read port per lookup (pass at most two inputs to
    keep it dual-port block RAMs).

    Parameters
    ----------
    m : amaranth.hdl.Module
    spec : :class:`~vitamin.golden.tables.TableSpec`
    contents : sequence of int
        ``spec.entries`` unsigned table entries (from :func:`~vitamin.golden.tables.make_table`).
    inputs : list of Value
        Unsigned table inputs ``u`` (``interp_input_bits(spec)`` bits), sampled on the clock edge
        where ``enable`` is high.
    enable : Value
        Pipeline enable: every stage (including the read ports) advances when it is high and
        holds otherwise.
    name : str
        Prefix of the memories and signals.

    Returns
    -------
    list of Signal
        ``unsigned(spec.value_bits)`` results, :data:`INTERP_LATENCY` enabled cycles after the
        inputs.
    """
    _check_spec(spec)
    contents = [int(v) for v in contents]
    if len(contents) != spec.entries:
        raise ValueError(f"table {spec.name!r} needs {spec.entries} entries, "
                         f"not {len(contents)}")
    vshape = unsigned(spec.value_bits)
    layout = data.StructLayout({"base": vshape, "delta": signed(spec.value_bits + 1)})
    rom = Memory(shape=layout, depth=spec.entries - 1,
                 init=[{"base": contents[i], "delta": contents[i + 1] - contents[i]}
                       for i in range(spec.entries - 1)])
    m.submodules[f"{name}_rom"] = rom

    def reg(value, sig_name, shape):
        sig = Signal(shape, name=f"{name}_{sig_name}", reset_less=True)
        with m.If(enable):
            m.d.sync += sig.eq(value)
        return sig

    in_frac = spec.in_frac
    outs = []
    for k, u in enumerate(inputs):
        i = u[in_frac:in_frac + spec.index_bits]
        # stage A: the read port's data register is this stage's register.
        rd = rom.read_port()
        m.d.comb += [rd.addr.eq(i), rd.en.eq(enable)]
        frac_a = reg(u[:in_frac], f"frac_a{k}", unsigned(in_frac))
        # stage B: the ROM word, registered
        t0_b = reg(rd.data.base, f"t0_b{k}", vshape)
        d_b = reg(rd.data.delta, f"d_b{k}", signed(spec.value_bits + 1))
        frac_b = reg(frac_a, f"frac_b{k}", unsigned(in_frac))
        # stage C: the product (one multiplier of (value_bits + 1) x in_frac bits).
        t0_c = reg(t0_b, f"t0_c{k}", vshape)
        p_c = reg(d_b * frac_b, f"p_c{k}", signed(spec.value_bits + 2 + in_frac))
        # stage D: round half up; `>>` of a signed value is arithmetic. The result lies between
        # T[i] and T[i+1], so it fits value_bits unsigned bits.
        half = 1 << (in_frac - 1)
        outs.append(reg(t0_c + ((p_c + half) >> in_frac), f"out{k}", vshape))
    return outs


class TableInterp(wiring.Component):
    """Pipelined interpolated lookup of one table of :mod:`vitamin.golden.tables`.

    Computes ``interp(make_table(name, config), u, in_frac)`` exactly, one input per cycle.

    Parameters
    ----------
    config : :class:`~vitamin.config.Config` or str
        Hardware configuration or preset name (uses the table parameters).
    name : str
        Table name, one of :data:`vitamin.golden.tables.TABLE_NAMES`.

    Attributes
    ----------
    i_stream : ``In(stream.Signature(unsigned(interp_input_bits(spec))))``
        Table inputs ``u``; every value of the width is legal.
    o_stream : ``Out(stream.Signature(unsigned(spec.value_bits)))``
        One interpolated value per input, in order, :attr:`latency` cycles after the input is
        accepted when the output does not stall.
    """

    def __init__(self, config, name):
        if isinstance(config, str):
            config = get_config(config)  # raises ConfigError for an unknown preset
        if not isinstance(config, Config):
            raise TypeError(f"TableInterp needs a Config or a preset name, not {config!r}")
        if name not in TABLE_NAMES:
            raise ValueError(f"TableInterp table must be one of {', '.join(TABLE_NAMES)}, "
                             f"not {name!r}")
        spec = table_spec(name, config)
        _check_spec(spec)
        self._config = config
        self._spec = spec
        super().__init__({
            "i_stream": In(stream.Signature(unsigned(interp_input_bits(spec)))),
            "o_stream": Out(stream.Signature(unsigned(spec.value_bits))),
        })

    @property
    def config(self):
        """The :class:`~vitamin.config.Config` the table was generated for."""
        return self._config

    @property
    def spec(self):
        """The :class:`~vitamin.golden.tables.TableSpec` of the table."""
        return self._spec

    @property
    def latency(self):
        """Cycles from accepting an input to its result being valid, without stalls."""
        return INTERP_LATENCY

    def elaborate(self, platform):
        m = Module()
        i_in, o_out = self.i_stream, self.o_stream

        # One enable for the whole pipeline: a stalled consumer freezes every stage.
        advance = Signal()
        m.d.comb += [
            advance.eq(~o_out.valid | o_out.ready),
            i_in.ready.eq(advance),
        ]
        valid = [Signal(name=f"valid_{s}") for s in range(INTERP_LATENCY)]
        with m.If(advance):
            m.d.sync += valid[0].eq(i_in.valid)
            m.d.sync += [valid[s].eq(valid[s - 1]) for s in range(1, INTERP_LATENCY)]

        contents = make_table(self._spec.name, self._config)
        [out] = build_interp(m, self._spec, contents, [i_in.payload], advance,
                             name=self._spec.name)
        m.d.comb += [
            o_out.valid.eq(valid[-1]),
            o_out.payload.eq(out),
        ]
        return m
