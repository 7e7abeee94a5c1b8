"""vitamin.sim.placed_sta: the post-placement estimate on small hand-placed designs whose
arrival times are known (nextpnr's distance model, the cell delays, untimed pins and PLLs)."""

import json

import pytest

from vitamin.sim import placed_sta
from vitamin.sim.sta import DELAYS


def _cell(typ, bel, conns, dirs, params=None):
    return {"type": typ, "attributes": {"NEXTPNR_BEL": bel}, "parameters": params or {},
            "connections": conns, "port_directions": dirs}


def _design(x_far=10, y_far=0):
    # q0 (FF at X0/Y0) -> lut (X x_far) -> q1 (FF beside the LUT: F -> DI costs nothing);
    # lock (PLL, not timed) -> lut2 -> q2's LSR; a LUT with constant inputs -> q3.
    ff = {"CLK": "input", "DI": "input", "LSR": "input", "Q": "output"}
    lut = {"A": "input", "B": "input", "F": "output"}
    cells = {
        "q0": _cell("TRELLIS_FF", "X0/Y0/SLICEA.FF0", {"CLK": [2], "DI": [9], "Q": [3]}, ff),
        "lut": _cell("TRELLIS_COMB", f"X{x_far}/Y{y_far}/SLICEA.K0", {"A": [3], "F": [4]}, lut,
                     {"MODE": "LOGIC"}),
        "q1": _cell("TRELLIS_FF", f"X{x_far}/Y{y_far}/SLICEA.FF0",
                    {"CLK": [2], "DI": [4], "Q": [5]}, ff),
        "pll": _cell("EHXPLLL", "X1/Y1/PLL", {"LOCK": [6], "CLKOP": [2]},
                     {"LOCK": "output", "CLKOP": "output"}),
        "lut2": _cell("TRELLIS_COMB", "X3/Y3/SLICEB.K0", {"A": [6], "F": [7]}, lut,
                      {"MODE": "LOGIC"}),
        "q2": _cell("TRELLIS_FF", "X3/Y3/SLICEB.FF0", {"CLK": [2], "LSR": [7], "DI": [5],
                                                       "Q": [8]}, ff),
        "$PACKER_VCC": _cell("TRELLIS_COMB", "X9/Y9/SLICEA.K0", {"F": [9]}, {"F": "output"}),
        "lut3": _cell("TRELLIS_COMB", "X9/Y9/SLICEA.K1", {"A": [9], "F": [10]}, lut,
                      {"MODE": "LOGIC"}),
        "q3": _cell("TRELLIS_FF", "X9/Y9/SLICEA.FF1", {"CLK": [2], "DI": [10], "Q": [11]}, ff),
    }
    names = {"core.q0": [3], "core.q1": [5], "core.q2": [8], "core.q3": [11]}
    return {"modules": {"top": {"cells": cells,
                                "netnames": {k: {"bits": v} for k, v in names.items()}}}}


def test_net_delay_is_nextpnrs_distance_model():
    assert placed_sta.net_delay((0, 0), (0, 0)) == pytest.approx(0.36)
    assert placed_sta.net_delay((0, 0), (10, 0)) == pytest.approx(0.12 * (3 + 5 + 2 * 5))
    assert placed_sta.net_delay((40, 3), (0, 60)) == pytest.approx(0.12 * (3 + 35 + 52 + 20))
    assert placed_sta.net_delay((0, 0), (30, 30), "FCO", "FCI") == 0.0
    assert placed_sta.net_delay((0, 0), (30, 30), "F", "DI") == 0.0


@pytest.mark.parametrize("x_far,y_far", [(10, 0), (40, 60)])
def test_arrival_grows_with_distance(x_far, y_far):
    est = placed_sta.estimate_placed(_design(x_far, y_far))
    want = DELAYS["FF_CLK_Q"] + placed_sta.net_delay((0, 0), (x_far, y_far)) + DELAYS["LUT4"]
    got = {e.name: e.arrival_ns for e in est.endpoints}
    assert got["core.q1"] == pytest.approx(want)
    arr = [e.arrival_ns for e in est.endpoints]
    assert arr == sorted(arr, reverse=True) and est.worst_ns == max(arr)
    # q2's reset comes from the PLL's lock (not timed): only its data input (from q1) counts
    assert got["core.q2"] == pytest.approx(
        DELAYS["FF_CLK_Q"] + placed_sta.net_delay((x_far, y_far), (3, 3)))
    # a LUT of constants starts no path
    assert got["core.q3"] == 0.0
    assert [s[2] for s in est.paths["core.q1"]][0] == "core.q0"


def test_unplaced_design_and_cli_errors(tmp_path, capsys):
    d = _design()
    for c in d["modules"]["top"]["cells"].values():
        c["attributes"] = {}
    with pytest.raises(ValueError, match="NEXTPNR_BEL"):
        placed_sta.estimate_placed(d)
    bad = tmp_path / "x.json"
    bad.write_text(json.dumps({"creator": "not nextpnr"}))
    assert placed_sta.main([str(bad)]) == 2
    assert "no 'modules'" in capsys.readouterr().err
    good = tmp_path / "placed.json"
    good.write_text(json.dumps(_design()))
    assert placed_sta.main([str(good), "--path", "q1"]) == 0
    out = capsys.readouterr().out
    assert "post-placement estimate" in out and "path into core.q1" in out and "X10/Y0" in out
    assert placed_sta.main([str(good), "--path", "q(1"]) == 2
    assert "not a regular expression" in capsys.readouterr().err


def test_routed_net_model():
    """--routed: the fit to routed delays (0.70 + 0.058 per tile of Manhattan distance), cheaper
    than the placer's model over distance, still free on the carry chain and into a LUT's own
    register; estimate_placed and the CLI use it."""
    nd = placed_sta.net_delay
    assert nd((0, 0), (0, 0), routed=True) == pytest.approx(0.70)
    assert nd((0, 0), (50, 23), routed=True) == pytest.approx(0.70 + 0.058 * 73)
    assert nd((0, 0), (50, 23), routed=True) < nd((0, 0), (50, 23)) / 2
    assert nd((0, 0), (30, 30), "FCO", "FCI", routed=True) == 0.0
    assert nd((0, 0), (30, 30), "F", "DI", routed=True) == 0.0
    est = placed_sta.estimate_placed(_design(40, 60), routed=True)
    got = {e.name: e.arrival_ns for e in est.endpoints}
    assert got["core.q1"] == pytest.approx(
        DELAYS["FF_CLK_Q"] + nd((0, 0), (40, 60), routed=True) + DELAYS["LUT4"])


def test_cli_routed(tmp_path, capsys):
    good = tmp_path / "routed.json"
    good.write_text(json.dumps(_design(40, 60)))
    assert placed_sta.main([str(good)]) == 0
    placed = capsys.readouterr().out
    assert placed_sta.main([str(good), "--routed"]) == 0
    routed = capsys.readouterr().out
    assert "slowest register input" in routed and routed != placed


@pytest.mark.parametrize("reg_in,reg_out", [(True, True), (False, True), (False, False)])
def test_dsp_registers_cut_the_path(reg_in, reg_out):
    """A multiplier block with the registers of boards/dspregs.py starts and ends paths (its
    operand pins are endpoints); without registers it is combinational."""
    ff = {"CLK": "input", "DI": "input", "Q": "output"}
    dsp = {"A0": "input", "B0": "input", "CE0": "input", "P0": "output"}
    on = lambda b: "CLK0" if b else "NONE"  # noqa: E731
    params = {"REG_INPUTA_CLK": on(reg_in), "REG_INPUTB_CLK": on(reg_in),
              "REG_OUTPUT_CLK": on(reg_out)}
    cells = {
        "q0": _cell("TRELLIS_FF", "X0/Y0/SLICEA.FF0", {"CLK": [2], "DI": [9], "Q": [3]}, ff),
        "m": _cell("MULT18X18D", "X20/Y0/MULT18_R0C0", {"A0": [3], "B0": [3], "CE0": [3],
                                                       "P0": [4]}, dsp, params),
        "q1": _cell("TRELLIS_FF", "X30/Y5/SLICEA.FF0", {"CLK": [2], "DI": [4], "Q": [5]}, ff),
    }
    names = {"core.q0": [3], "core.q1": [5]}
    design = {"modules": {"top": {"cells": cells,
                                  "netnames": {k: {"bits": v} for k, v in names.items()}}}}
    got = {}
    for e in placed_sta.estimate_placed(design).endpoints:
        got[e.name] = max(got.get(e.name, 0.0), e.arrival_ns)
    to_m = DELAYS["FF_CLK_Q"] + placed_sta.net_delay((0, 0), (20, 0))
    from_m = placed_sta.net_delay((20, 0), (30, 5))
    if reg_in or reg_out:
        start = DELAYS["DSP_REG_CLK_P"] if reg_out else DELAYS["DSP_REG_IN_CLK_P"]
        assert got["core.q1"] == pytest.approx(start + from_m)
        assert got["m"] == pytest.approx(to_m + (0.0 if reg_in else DELAYS["MULT18X18D"]))
    else:
        assert "m" not in got
        assert got["core.q1"] == pytest.approx(to_m + DELAYS["MULT18X18D"] + from_m)


@pytest.mark.parametrize("far", [(2, 2), (80, 90)])
def test_a_global_buffer_costs_the_same_everywhere(far):
    # rst_src (FF at X0/Y0) -> DCCA (X40/Y0) -> the LSR of a register near and of one far away:
    # a global line, so both reset inputs arrive at the same time, whatever the distance
    ff = {"CLK": "input", "DI": "input", "LSR": "input", "Q": "output"}
    cells = {
        "src": _cell("TRELLIS_FF", "X0/Y0/SLICEA.FF0", {"CLK": [2], "Q": [3]}, ff),
        "gbuf": _cell("DCCA", "X40/Y0/DCC", {"CLKI": [3], "CLKO": [4]},
                      {"CLKI": "input", "CLKO": "output"}),
        "near": _cell("TRELLIS_FF", "X1/Y1/SLICEA.FF0", {"CLK": [2], "LSR": [4], "Q": [5]}, ff),
        "far": _cell("TRELLIS_FF", f"X{far[0]}/Y{far[1]}/SLICEA.FF0",
                     {"CLK": [2], "LSR": [4], "Q": [6]}, ff),
    }
    names = {"core.near": [5], "core.far": [6]}
    got = {e.name: e.arrival_ns for e in placed_sta.estimate_placed(
        {"modules": {"top": {"cells": cells,
                             "netnames": {k: {"bits": v} for k, v in names.items()}}}}).endpoints}
    want = DELAYS["FF_CLK_Q"] + placed_sta.net_delay((0, 0), (40, 0)) + DELAYS["GLOBAL"]
    assert got["core.near"] == pytest.approx(want) and got["core.far"] == pytest.approx(want)
