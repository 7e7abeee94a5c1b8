"""Products with a register on each side of the multiplier blocks.

``a * b`` written in one stage (``p <= a * b``) maps to DSP blocks whose inputs come from the
registers that hold ``a`` and ``b`` and whose outputs go through the adder of the partial
products to ``p``. On a full FPGA the placer puts the DSP blocks where there are free ones, and
both routes (register -> DSP, DSP -> adder) cross the chip: on the LFE5U-85F (135 of 156
``MULT18X18D`` in use) the epilogue's product took 9.3 ns to reach its DSP and 5.6 ns to come
back, plus a 64-bit carry chain, 19.7 ns in all.

:func:`staged_product` spends :data:`PRODUCT_LATENCY` register stages instead of one:

1. copies of ``a`` and ``b`` that feed nothing but the multipliers (the placer can put them next
   to the DSP blocks; the long route is then register to register);
2. one partial product per ``LIMB``-bit piece of the wider operand (and of the narrower one,
   if it does not fit 18 bits), each one ``18 x 18`` signed multiplier (``MULT18X18D``, or a
   ``DSP48E2`` / ``SB_MAC16``), registered at the DSP's output;
3. the sum of the shifted partial products (one carry chain, register to register).

The result is ``a * b`` exactly, in the ``shape`` the caller gives (it must hold the product).
:func:`split_product` is stages 2 and 3 alone (:data:`SPLIT_LATENCY`), for operands that are
registers already and have no other load.
"""

from amaranth.hdl import Signal, Value, signed

__all__ = ["staged_product", "split_product", "partial_sum", "PRODUCT_LATENCY", "SPLIT_LATENCY",
           "LIMB"]

#: Enabled cycles from the operands to the product of :func:`staged_product`.
PRODUCT_LATENCY = 3
#: Enabled cycles from the operands to the product of :func:`split_product`.
SPLIT_LATENCY = 2
#: Bits of the wider operand per partial product: an unsigned 17-bit piece is an 18-bit signed
#: multiplier input.
LIMB = 17


def _fits(shape):
    """An operand of this shape is one 18-bit signed multiplier input."""
    return shape.width <= (18 if shape.signed else 17)


def _limbs(v, signed_):
    """``v`` cut into :data:`LIMB`-bit pieces, low first; the top one keeps ``v``'s sign."""
    n = max(1, -(-len(v) // LIMB))
    out = []
    for k in range(n):
        piece = v[k * LIMB:min((k + 1) * LIMB, len(v))]
        out.append(piece.as_signed() if k == n - 1 and signed_ else piece)
    return out


def staged_product(m, a, b, *, en, name, shape, addend=None):
    """Return a signal that holds ``a * b`` :data:`PRODUCT_LATENCY` cycles in which ``en`` is
    high after ``a`` and ``b`` were presented (the same enable as the caller's pipeline).

    An operand that fits an 18-bit signed multiplier input (``signed(<= 18)`` or
    ``unsigned(<= 17)``) is used whole; a wider one is cut into :data:`LIMB`-bit pieces, and
    every pair of pieces is one partial product. ``addend``, if given, is added to the product
    in its last stage: a value that holds while the pipeline runs (a register), so that the
    stage's sum has one more term and no later stage needs an adder for it."""
    a, b = Value.cast(a), Value.cast(b)
    if len(b) > len(a):
        a, b = b, a

    a_r = _reg(m, a, f"{name}_a", a.shape(), en)
    b_r = _reg(m, b, f"{name}_b", b.shape(), en)
    return split_product(m, a_r, b_r, en=en, name=name, shape=shape, addend=addend)


def _reg(m, value, name, shape, en):
    sig = Signal(shape, name=name, reset_less=True)
    with m.If(en):
        m.d.sync += sig.eq(value)
    return sig


def partial_sum(m, a, b, *, en, name, mul=None):
    """``a * b`` as an expression: the sum of its partial products, each one registered at its
    multiplier's output (one ``18 x 18`` block per pair of :data:`LIMB`-bit pieces, nothing
    between the block and its register). The expression is valid one enabled cycle after ``a``
    and ``b`` were presented; the caller registers it where it needs it (stage 3 of
    :func:`staged_product` without its register). ``mul(x, y)`` forms each piece's product
    (default ``x * y``; :func:`vitamin.hw.lutmul.lut_mul` marks them for logic mapping on
    flows that keep such products off DSP blocks)."""
    a, b = Value.cast(a), Value.cast(b)
    if len(b) > len(a):
        a, b = b, a
    mul = mul or (lambda x, y: x * y)
    a_l = _limbs(a, a.shape().signed)
    b_l = [b] if _fits(b.shape()) else _limbs(b, b.shape().signed)
    total = None
    for i, x in enumerate(a_l):
        for j, y in enumerate(b_l):
            sh = signed(len(x) + len(y) + 1)
            p = _reg(m, mul(x, y), f"{name}_pp{i}_{j}", sh, en) << ((i + j) * LIMB)
            total = p if total is None else total + p
    return total


def split_product(m, a, b, *, en, name, shape, addend=None):
    """Return a signal that holds ``a * b`` :data:`SPLIT_LATENCY` enabled cycles after ``a``
    and ``b`` were presented: stages 2 and 3 of :func:`staged_product` (the partial products,
    registered at the DSP blocks' outputs, then their sum), for operands that are already
    registers of their own."""
    a, b = Value.cast(a), Value.cast(b)
    if len(b) > len(a):
        a, b = b, a
    a_l = _limbs(a, a.shape().signed)
    b_l = [b] if _fits(b.shape()) else _limbs(b, b.shape().signed)
    parts = []
    for i, x in enumerate(a_l):
        for j, y in enumerate(b_l):
            sh = signed(len(x) + len(y) + 1)
            parts.append(((i + j) * LIMB, _reg(m, x * y, f"{name}_pp{i}_{j}", sh, en)))
    total = parts[0][1] << parts[0][0]
    for off, p in parts[1:]:
        total = total + (p << off)
    if addend is not None:
        # added in the sum stage (a register that is constant while the caller's pipeline runs,
        # such as a rounding term)
        total = total + addend
    return _reg(m, total, f"{name}_p", shape, en)
