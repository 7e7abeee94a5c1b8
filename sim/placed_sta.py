"""A post-placement timing estimate: the register paths of a placed ECP5 design, with wires.

``vitamin.sim.sta`` estimates a netlist before placement with a flat delay per net. On the
whole ``ecp5`` design that misses what decides its clock: the units and the memories are spread
over the LFE5U-85F, and a signal gathered from several units (which one uses a shared port this
cycle) crosses the chip two or three times in one cycle. This module reads the design that
``nextpnr-ecp5 --no-route --write placed.json`` writes after placement (cells packed into
TRELLIS_COMB / TRELLIS_FF / DP16KD / MULT18X18D, each with its ``NEXTPNR_BEL`` location) and
computes every register input's arrival with

* each net's delay from the distance between its driver and its sink as nextpnr-ecp5 predicts it
  while placing (speed grade 6): ``0.12 ns * (3 + max(dx - 5, 0) + max(dy - 5, 0)
  + 2 * (min(dx, 5) + min(dy, 5)))`` with dx, dy in tiles, and no delay on the carry chain
  (FCO -> FCI), into a wide-function mux (FXA/FXB) or from a LUT into its own register (F -> DI);
* the cell delays of ``vitamin.sim.sta.DELAYS`` (a LUT 0.24 ns, a LUT and PFUMX 0.41 ns, carry
  steps, a DSP 3.93 ns, clock to output 0.52 ns for a register and 5.83 ns for a DP16KD).

With ``routed=True`` (``--routed``) a net instead costs ``0.70 + 0.058 * (dx + dy)`` ns: a
least-squares fit to the 22 routed connections (1 to 203 tiles apart) that nextpnr printed on the
critical paths of two routed builds of the ``ecp5`` ULX3S top. Routing is much cheaper over
distance than the placer's prediction (50 + 23 tiles: 4.7 ns routed, 10.3 ns predicted), so this
model ranks logic depth and memory outputs above long wires, as the routed reports do.

It is a ranking tool, not a measurement. On two placements of the ``ecp5`` ULX3S top it put the
slowest path a third above nextpnr's own post-placement figure (50.4 ns against 38.0, 39.4 ns
against 29.6): its net model is cruder than nextpnr's timing analysis, but it names the paths,
which nextpnr does not print before routing. ``python -m vitamin.sim.placed_sta PLACED.json``
prints the summary (the same format as ``vitamin.sim.sta``), ``--path REGEX`` the slowest path of
the register groups matching REGEX with the location of every step.
"""

from __future__ import annotations

import argparse
import re
import sys

from .sta import (
    DELAYS,
    Endpoint,
    TimingEstimate,
    _bit_names,
    _dsp_regs,
    _load_top,
    _readable,
    _start_delay,
    _unit_of,
    format_estimate,
    print_paths,
)

__all__ = ["net_delay", "estimate_placed", "main"]

_CLOCKS = {"CLK", "CLKA", "CLKB", "WCK"}
# outputs not timed against the clock (pins, the PLL's lock): nextpnr reports them as <async>
_UNTIMED = {"TRELLIS_IO", "EHXPLLL"}
_NOT_TIMED = -1e9
_LOC = re.compile(r"X(\d+)/Y(\d+)/")


def net_delay(src, dst, src_port="", dst_port="", routed=False):
    """nextpnr-ecp5's placement-time prediction (ns) of a connection from tile ``src`` = (x, y)
    to tile ``dst`` for speed grade 6, or with ``routed`` the fit to routed delays (module
    docstring)."""
    if (src_port == "FCO" and dst_port == "FCI") or dst_port in ("FXA", "FXB") or \
            (src_port == "F" and dst_port == "DI"):
        return 0.0
    dx, dy = abs(src[0] - dst[0]), abs(src[1] - dst[1])
    if routed:
        return 0.70 + 0.058 * (dx + dy)
    return 0.12 * (3 + max(dx - 5, 0) + max(dy - 5, 0) + 2 * (min(dx, 5) + min(dy, 5)))


def _comb_delay(cell, ip, op):
    d = DELAYS
    t = cell["type"]
    if t == "MULT18X18D":
        return d["MULT18X18D"]
    if t != "TRELLIS_COMB":
        return 0.0                          # TRELLIS_RAMW and the clock buffers pass through
    mode = cell.get("parameters", {}).get("MODE", "LOGIC")
    if mode == "CCU2":
        if ip == "FCI":
            return d["CCU2C_CARRY"] if op == "FCO" else d["CCU2C_CARRY_SUM"]
        return d["CCU2C_LUT_CARRY"] if op == "FCO" else d["CCU2C_LUT_SUM"]
    if mode == "DPRAM":
        return d["DPR16X4_READ"]
    if op == "OFX":
        return d["L6MUX21"] if ip in ("FXA", "FXB") else d["LUT4"] + d["PFUMX"]
    return d["LUT4"]


def estimate_placed(placed, *, routed=False) -> TimingEstimate:
    """Arrival time at every register input of a placed design (a path to, or the parsed dict
    of, ``nextpnr-ecp5 --write`` JSON after placement or routing). Endpoints are named by the
    register's output net (a Yosys/Amaranth name where one survived packing), else by the cell.
    ``routed`` selects the net model fitted to routed delays (module docstring)."""
    top = _load_top(placed, "a nextpnr JSON design")
    cells = top["cells"]
    loc = {}
    for cn, c in cells.items():
        mm = _LOC.match(c.get("attributes", {}).get("NEXTPNR_BEL", ""))
        loc[cn] = (int(mm.group(1)), int(mm.group(2))) if mm else None
    if not any(loc.values()):
        raise ValueError("the design is not placed: no cell has a NEXTPNR_BEL location "
                         "(write it with nextpnr-ecp5 --write after placement)")
    driver = {}
    for cn, c in cells.items():
        for p, bits in c["connections"].items():
            if c.get("port_directions", {}).get(p) == "output":
                for b in bits:
                    if isinstance(b, int):
                        driver[b] = (cn, p)
    bitname = _bit_names(top)
    d = DELAYS
    start = {"TRELLIS_FF": d["FF_CLK_Q"], "DP16KD": d["DP16KD_CLK_Q"]}
    arrival, pred = {}, {}

    def is_const(cn):
        return cn.startswith("$PACKER_")

    def into(b, cn, port):
        """Arrival of net ``b`` at input ``port`` of cell ``cn`` (negative: not timed)."""
        dcn, dp = driver[b]
        if is_const(dcn):
            return 0.0
        t = cell_out(dcn, dp)
        if t < 0:
            return t
        if cells[dcn]["type"] == "DCCA":    # a global line: the same delay everywhere
            return t + d["GLOBAL"]
        a, c = loc[dcn], loc[cn]
        return t + (net_delay(a, c, dp, port, routed) if a and c else d["NET"])

    def cell_out(cn, port):
        key = (cn, port)
        if key in arrival:
            return arrival[key]
        c = cells[cn]
        if c["type"] in start:
            arrival[key] = start[c["type"]]
            return arrival[key]
        if c["type"] == "MULT18X18D" and any(_dsp_regs(c)):
            arrival[key] = _start_delay(c)  # registered (boards/dspregs.py): P starts a path
            return arrival[key]
        if c["type"] in _UNTIMED:
            arrival[key] = _NOT_TIMED
            return arrival[key]
        arrival[key] = 0.0                  # a combinational loop is cut here
        best, via = _NOT_TIMED, None
        for ip, bits in c["connections"].items():
            if c.get("port_directions", {}).get(ip) != "input" or ip in _CLOCKS:
                continue
            if c["type"] == "TRELLIS_COMB" and ip.startswith(("WAD", "WD", "WRE")):
                continue                    # a LUT RAM's write port ends a path (registered)
            for b in bits:
                if isinstance(b, int) and b in driver and not is_const(driver[b][0]):
                    t = into(b, cn, ip) + _comb_delay(c, ip, port)
                    if t > best:
                        best, via = t, (b, cn, ip)
        if via is None and best == _NOT_TIMED and not any(
                c.get("port_directions", {}).get(ip) == "input" and ip not in _CLOCKS and
                any(isinstance(b, int) and b in driver and not is_const(driver[b][0])
                    and cells[driver[b][0]]["type"] in _UNTIMED for b in bits)
                for ip, bits in c["connections"].items()):
            best = 0.0                      # constant inputs only
        arrival[key], pred[key] = best, via
        return best

    eps = []
    for cn, c in cells.items():
        t = c["type"]
        if t == "TRELLIS_FF" or t == "DP16KD" or \
                (t == "TRELLIS_COMB" and c.get("parameters", {}).get("MODE") == "DPRAM"):
            if t == "TRELLIS_FF":
                q = c["connections"].get("Q", [None])[0]
                name = _readable(bitname.get(q, "$")) or cn
            else:
                name = _readable(cn) or cn
            name = re.sub(r"\[\d+\]", "", name)
            for ip, bits in c["connections"].items():
                if c.get("port_directions", {}).get(ip) != "input" or ip in _CLOCKS:
                    continue
                if t == "TRELLIS_COMB" and not ip.startswith(("WAD", "WD", "WRE")):
                    continue                    # a LUT RAM's read address is not a register
                for b in bits:
                    if isinstance(b, int) and b in driver and not is_const(driver[b][0]):
                        t = into(b, cn, ip)
                        if t >= 0:
                            eps.append((t, name, cn, b, ip))
        elif t == "MULT18X18D" and any(_dsp_regs(c)):
            # a block with registers (boards/dspregs.py): its operand pins end a path, through
            # the multiplier when only the product is registered; so do its clock enables
            reg_in, _ = _dsp_regs(c)
            name = _readable(cn) or cn
            for ip, bits in c["connections"].items():
                is_op = ip[0] in "AB" and ip[1:].isdigit()
                if c.get("port_directions", {}).get(ip) != "input" or not (
                        is_op or ip.startswith("CE")):
                    continue
                for b in bits:
                    if isinstance(b, int) and b in driver and not is_const(driver[b][0]):
                        a = into(b, cn, ip)
                        if a >= 0:
                            eps.append((a + (d["MULT18X18D"] if is_op and not reg_in else 0.0),
                                        name, cn, b, ip))
    eps.sort(key=lambda e: -e[0])
    endpoints = [Endpoint(round(t, 3), name, _unit_of(name), cn) for t, name, cn, _b, _p in eps]
    est = TimingEstimate(endpoints)
    est.paths = {}
    for t, name, cn, b, ip in eps:
        if name not in est.paths:
            est.paths[name] = _trace(b, cn, ip, driver, pred, arrival, loc, cells, bitname)
    if eps:
        est.worst_path = [(a, typ, f"{net} @X{xy[0]}/Y{xy[1]}" if xy else net)
                          for a, typ, net, xy in est.paths[eps[0][1]]]
    return est


def _trace(b, cn, ip, driver, pred, arrival, loc, cells, bitname):
    steps = []
    cur = (b, cn, ip)
    for _ in range(10000):
        if cur is None:
            break
        b, scn, sp = cur
        dcn, dp = driver[b]
        net = _readable(bitname.get(b, "$")) or dcn
        steps.append((round(arrival.get((dcn, dp), 0.0), 2), cells[dcn]["type"], net, loc[dcn]))
        cur = pred.get((dcn, dp))
    return steps[::-1]


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m vitamin.sim.placed_sta",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("placed", help="nextpnr-ecp5 --write output after placement")
    ap.add_argument("--period", type=float, default=10.0, help="target clock period, ns")
    ap.add_argument("--top", type=int, default=25, help="groups to list")
    ap.add_argument("--path", metavar="REGEX", help="print the slowest path into the register "
                    "groups matching REGEX, with each step's location")
    ap.add_argument("--routed", action="store_true",
                    help="net delays fitted to routed designs instead of the placer's prediction")
    args = ap.parse_args(argv)
    try:
        est = estimate_placed(args.placed, routed=args.routed)
    except (OSError, ValueError, KeyError) as exc:
        print(f"error: cannot read {args.placed} as a placed nextpnr design: {exc}",
              file=sys.stderr)
        return 2
    print(format_estimate(est, args.period, args.top).replace(
        "pre-route estimate", "post-placement estimate", 1))
    def step(a, typ, net, xy):
        where = f"X{xy[0]}/Y{xy[1]}" if xy else "?"
        return f"  {a:6.2f}  {typ:13s} {where:10s} {net}"
    return print_paths(est, args.path, step)


if __name__ == "__main__":
    sys.exit(main())
