"""Weight-stationary MAC array: the matrix engine of vitamin.

Architecture
------------
``rows x cols`` processing elements (PEs). PE ``(r, c)`` holds two 16-bit weights: an *active*
weight ``W[r][c]`` that multiplies, and a *shadow* weight that is being loaded for the next tile
(double buffering). The shadow registers of a column form a shift chain fed from the bottom row:
a weight line enters at row ``rows - 1`` and moves up one row per loaded line, so after ``rows``
lines the first line sent sits in row 0. Loading therefore needs no row decoder and only
nearest-neighbour wiring.

An A line (``rows`` words: one row of A restricted to a K-slice) is broadcast along the rows: word
``a[r]`` goes to every PE of row ``r``. Each column reduces its ``rows`` products with a pipelined
binary adder tree, giving ``out[c] = sum_r a[r] * W[r][c]`` exactly.

Pipeline (one stage per line, all stages share one clock enable)::

    stage 0          stage 1                 stages 2 .. 1 + log2(rows)
    a[r] register -> a[r] * W[r][c] register -> adder tree level registers -> o_stream

Mapping to DSPs: each PE is one 16x16 signed multiplier (ECP5 ``MULT18X18D``, iCE40
``SB_MAC16``, Xilinx ``DSP48E2``), between the broadcast ``a`` register and the product register.
The adder trees are fabric adders (widths 33 .. 32 + log2(rows)). We chose an adder tree over a
systolic (cascaded post-adder) chain because the open ECP5 flow does not infer ``ALU54B``
cascades, so a chain would cost the same LUT adders plus ``rows``-deep input/output skew
registers; the tree has ``log2(rows)`` latency and no skew. On UltraScale+ a ``PCIN`` cascade
would save the tree's LUTs; that is a possible later variant with the same ports.

Flow control: every stage advances when the output stage is empty or being consumed
(``advance = ~o_stream.valid | o_stream.ready``), so a stalled consumer freezes the whole pipeline
and nothing is lost. ``a_stream.ready`` therefore depends combinationally on ``o_stream.ready``.
"""

from amaranth.hdl import Module, Signal, signed
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from vitamin.config import Config, get_config

__all__ = ["MacArray", "WORD", "weight_line_layout", "a_line_layout", "psum_line_layout"]

#: Shape of every operand word (scratchpad words are signed 16-bit).
WORD = signed(16)

# Width of one exact product of two WORDs: |-32768 * -32768| = 2**30 needs 32 signed bits.
_PRODUCT_BITS = 32


def weight_line_layout(config):
    """Layout of one weight line: row ``r`` of a weight tile, ``cols`` words."""
    config = get_config(config)
    return data.ArrayLayout(WORD, config.cols)


def a_line_layout(config):
    """Layout of one A line.

    Fields
    ------
    data : ``ArrayLayout(signed(16), rows)``
        One row of A restricted to a ``rows``-long K-slice.
    first : 1 bit
        Switch to the preloaded (shadow) weight tile before this line. The line is held until
        the shadow tile is complete.
    last : 1 bit
        Marks the last line of a tile. Not used by the array; carried through to the output for
        the accumulator.
    """
    config = get_config(config)
    return data.StructLayout({
        "data": data.ArrayLayout(WORD, config.rows),
        "first": 1,
        "last": 1,
    })


def psum_line_layout(config):
    """Layout of one output line: ``cols`` partial sums plus the A line's ``first``/``last``."""
    config = get_config(config)
    return data.StructLayout({
        "data": data.ArrayLayout(signed(config.acc_bits), config.cols),
        "first": 1,
        "last": 1,
    })


class MacArray(wiring.Component):
    """Weight-stationary ``rows x cols`` array of signed 16x16-bit MACs.

    Computes, for every A line, ``out[c] = sum_r a[r] * W[r][c]`` exactly (the products and sums
    are never truncated; the result is sign-extended to ``config.acc_bits``).

    Usage: send ``rows`` lines on ``w_stream`` (row 0 first) to fill the shadow tile, then send
    A lines; the first A line of the tile has ``first`` set, which makes the shadow tile active
    (and frees the shadow registers for the next tile, which may then load while this tile
    computes). A ``first`` line waits until the shadow tile is complete; ``w_stream`` waits while
    a complete shadow tile has not been switched in yet. Before any tile is switched in, the
    active weights are zero.

    Parameters
    ----------
    config : :class:`~vitamin.config.Config` or str
        Hardware configuration or preset name; uses ``rows``, ``cols`` and ``acc_bits``.

    Attributes
    ----------
    w_stream : ``In(stream.Signature(weight_line_layout(config)))``
        Weight lines, ``rows`` per tile, row 0 first.
    a_stream : ``In(stream.Signature(a_line_layout(config)))``
        A lines.
    o_stream : ``Out(stream.Signature(psum_line_layout(config)))``
        One partial-sum line per A line, in order, ``latency`` cycles after the A line is
        accepted when the output does not stall.
    """

    def __init__(self, config):
        if isinstance(config, str):
            config = get_config(config)  # raises ConfigError for an unknown preset
        if not isinstance(config, Config):
            raise TypeError(f"MacArray needs a Config or a preset name, not {config!r}")
        # The adder tree halves the operand count per level; Config guarantees a power of two,
        # but a hand-built duck-typed config would silently drop products.
        if config.rows & (config.rows - 1):
            raise ValueError(f"MacArray rows must be a power of two, not {config.rows!r}")
        self._config = config
        super().__init__({
            "w_stream": In(stream.Signature(weight_line_layout(config))),
            "a_stream": In(stream.Signature(a_line_layout(config))),
            "o_stream": Out(stream.Signature(psum_line_layout(config))),
        })

    @property
    def config(self):
        """The :class:`~vitamin.config.Config` this array was built for."""
        return self._config

    @property
    def tree_levels(self):
        """Pipelined adder-tree levels per column: ``log2(rows)``."""
        return self._config.rows.bit_length() - 1

    @property
    def latency(self):
        """Cycles from accepting an A line to its output line being valid, without stalls.

        One ``a`` register, one product register and one register per adder-tree level.
        Throughput is one line per cycle.
        """
        return 2 + self.tree_levels

    def elaborate(self, platform):
        m = Module()
        rows, cols = self._config.rows, self._config.cols
        n_stages = self.latency

        w_in, a_in, o_out = self.w_stream, self.a_stream, self.o_stream

        # -- weights: shadow shift chain and active registers -----------------------------------
        # Weight and data registers have no reset: it would cost a LUT per bit on the FPGA and
        # keep yosys from folding the registers into the DSP input/output registers.
        shadow = [[Signal(WORD, name=f"w_shadow_{r}_{c}", reset_less=True) for c in range(cols)]
                  for r in range(rows)]
        active = [[Signal(WORD, name=f"w_active_{r}_{c}", reset_less=True) for c in range(cols)]
                  for r in range(rows)]
        shadow_count = Signal(range(rows + 1))
        shadow_full = Signal()
        m.d.comb += shadow_full.eq(shadow_count == rows)

        m.d.comb += w_in.ready.eq(~shadow_full)
        with m.If(w_in.valid & w_in.ready):
            m.d.sync += shadow_count.eq(shadow_count + 1)
            for c in range(cols):
                m.d.sync += shadow[rows - 1][c].eq(w_in.payload[c])
                for r in range(rows - 1):
                    m.d.sync += shadow[r][c].eq(shadow[r + 1][c])

        # -- pipeline control --------------------------------------------------------------------
        valid = [Signal(name=f"valid_{s}") for s in range(n_stages)]
        first = [Signal(name=f"first_{s}", reset_less=True) for s in range(n_stages)]
        last = [Signal(name=f"last_{s}", reset_less=True) for s in range(n_stages)]

        advance = Signal()
        # A `first` line must not pass before the shadow tile is complete.
        can_accept = Signal()
        m.d.comb += [
            advance.eq(~valid[-1] | o_out.ready),
            can_accept.eq(~a_in.payload.first | shadow_full),
            a_in.ready.eq(advance & can_accept),
        ]

        # -- stage 0: broadcast register of the A line -------------------------------------------
        a_reg = [Signal(WORD, name=f"a_{r}", reset_less=True) for r in range(rows)]
        with m.If(advance):
            m.d.sync += [
                valid[0].eq(a_in.valid & can_accept),
                first[0].eq(a_in.payload.first),
                last[0].eq(a_in.payload.last),
            ]
            m.d.sync += [a_reg[r].eq(a_in.payload.data[r]) for r in range(rows)]
            for s in range(1, n_stages):
                m.d.sync += [
                    valid[s].eq(valid[s - 1]),
                    first[s].eq(first[s - 1]),
                    last[s].eq(last[s - 1]),
                ]
            # Switching tiles in the same cycle as the `first` line enters stage 0 means the
            # multiply stage sees the new weights exactly from that line on: the line ahead of it
            # is multiplied with the old weights on this same clock edge.
            with m.If(a_in.valid & a_in.ready & a_in.payload.first):
                m.d.sync += shadow_count.eq(0)
                m.d.sync += [active[r][c].eq(shadow[r][c])
                             for r in range(rows) for c in range(cols)]

        # -- stage 1: products (one DSP each) ----------------------------------------------------
        # level[c] is the list of registered operands of column c at the current tree level.
        level = []
        for c in range(cols):
            column = []
            for r in range(rows):
                p = Signal(signed(_PRODUCT_BITS), name=f"p_{r}_{c}", reset_less=True)
                with m.If(advance):
                    m.d.sync += p.eq(a_reg[r] * active[r][c])
                column.append(p)
            level.append(column)

        # -- stages 2 ..: adder tree, one register per level -------------------------------------
        for lvl in range(1, self.tree_levels + 1):
            width = _PRODUCT_BITS + lvl
            next_level = []
            for c in range(cols):
                column = []
                for i in range(len(level[c]) // 2):
                    s = Signal(signed(width), name=f"sum_l{lvl}_{i}_{c}", reset_less=True)
                    with m.If(advance):
                        m.d.sync += s.eq(level[c][2 * i] + level[c][2 * i + 1])
                    column.append(s)
                next_level.append(column)
            level = next_level

        # -- output ------------------------------------------------------------------------------
        m.d.comb += [
            o_out.valid.eq(valid[-1]),
            o_out.payload.first.eq(first[-1]),
            o_out.payload.last.eq(last[-1]),
        ]
        # Sign extension to acc_bits happens in the assignment (signed source).
        m.d.comb += [o_out.payload.data[c].eq(level[c][0]) for c in range(cols)]

        return m
