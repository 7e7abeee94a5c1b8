"""A pre-route timing estimate of a ``synth_ecp5`` netlist: which registers are slow, in seconds.

A routed ULX3S build of the whole ``ecp5`` design takes about 70 minutes on two cores; Yosys
takes about 4. This module reads the netlist Yosys writes (``write_json``) and computes the
arrival time of every register input with a fixed delay model, so that the slow paths can be
found, fixed and re-checked without placing and routing:

* a LUT4 is 0.24 ns, a PFUMX 0.17 ns, an L6MUX21 0.20 ns; a CCU2C 0.44-0.45 ns from its LUT
  inputs, 0.07 ns per carry step and 0.40 ns from the carry-in to a sum; a MULT18X18D 3.93 ns
  (unregistered); clock to output 0.52 ns for a TRELLIS_FF and 5.83 ns for a DP16KD without
  its output register; a MULT18X18D with its registers (``vitamin.boards.dspregs``) ends paths
  at its inputs (plus the multiplier when only its output is registered) and starts them at
  ``P``, 3.86 ns after the clock through the multiplier from its input registers, about
  0.64 ns from its output register (test designs routed by nextpnr-ecp5);
* every net costs 0.7 ns plus 0.01 ns per sink (up to 100 sinks), 1.5 ns into or out of a
  DSP; the carry chain's dedicated wires cost nothing; a net behind a global buffer (DCCA:
  the ULX3S top's reset) 3.5 ns to every sink (routed: 3.43-3.53 ns to 1,732 set/reset pins),
  plus a net from the register in front of the buffer.

The figures are nextpnr-ecp5's for the LFE5U-85F speed grade 6 as its path reports print them.
The estimate ignores placement: on the whole ``ecp5`` design it put the slowest path at
24.4 MHz where the routed design reached 29.09 MHz, and it does not rank paths within a few
nanoseconds of each other reliably. It is for finding structure (a 40-level ripple, a late
grant feeding a barrel shifter), not for sign-off: nextpnr's report is the measurement.

Endpoints are grouped by the register's name (Amaranth's signal name, indices dropped), or for
an unnamed register by the first named signal on its slowest input path, and by unit (the first
three levels of the hierarchy). ``python -m vitamin.sim.sta NETLIST.json`` prints the summary,
``--path REGEX`` the slowest path into the register groups that match, step by step.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys
from dataclasses import dataclass, field

__all__ = ["DELAYS", "Endpoint", "TimingEstimate", "connectivity", "estimate", "format_estimate",
           "main", "print_paths"]

#: The delay model (ns), see the module docstring.
DELAYS = {
    "LUT4": 0.24, "PFUMX": 0.17, "L6MUX21": 0.20,
    "CCU2C_LUT_SUM": 0.44, "CCU2C_LUT_CARRY": 0.45, "CCU2C_CARRY": 0.07, "CCU2C_CARRY_SUM": 0.40,
    "MULT18X18D": 3.93, "DPR16X4_READ": 0.5,
    "FF_CLK_Q": 0.52, "DP16KD_CLK_Q": 5.83, "DSP_REG_IN_CLK_P": 3.86, "DSP_REG_CLK_P": 0.64,
    "NET": 0.7, "NET_PER_SINK": 0.01, "NET_SINK_CAP": 100, "NET_DSP": 1.5, "GLOBAL": 3.5,
}

_ENDPOINT_PORTS = {"TRELLIS_FF": ("DI", "CE", "LSR"), "TRELLIS_DPR16X4": ("DI", "WAD", "WRE"),
                   "DP16KD": None, "MULT18X18D": None}


@dataclass(frozen=True)
class Endpoint:
    """A register input: its estimated arrival (ns), register name, unit and Yosys cell."""

    arrival_ns: float
    name: str
    unit: str
    cell: str


@dataclass
class TimingEstimate:
    """All register endpoints of a netlist, slowest first, and the path to the slowest."""

    endpoints: list
    worst_path: list = field(default_factory=list)   # [(arrival ns, cell type, net name)]
    paths: dict = field(default_factory=dict)        # register group -> its slowest path

    @property
    def worst_ns(self):
        return self.endpoints[0].arrival_ns if self.endpoints else 0.0

    @property
    def fmax_mhz(self):
        return 1000.0 / self.worst_ns if self.worst_ns else float("inf")

    def count_over(self, ns):
        return sum(1 for e in self.endpoints if e.arrival_ns > ns)

    def groups(self, key="name"):
        """{group: (worst ns, endpoints)} by register ``name`` or by ``unit``, slowest first."""
        out = collections.defaultdict(list)
        for e in self.endpoints:
            out[getattr(e, key)].append(e)
        return dict(sorted(((k, (v[0].arrival_ns, len(v))) for k, v in out.items()),
                           key=lambda kv: -kv[1][0]))


def _unit_of(name):
    parts = name.split(".")
    return ".".join(parts[:3]) if len(parts) > 3 else ".".join(parts[:-1]) or name


def connectivity(cells):
    """(driver, loads) of a Yosys JSON netlist's cells: {bit: (cell, output port)} and
    {bit: [(cell, input port), ...]} (a ``defaultdict(list)``)."""
    driver, loads = {}, collections.defaultdict(list)
    for cn, c in cells.items():
        for p, bits in c["connections"].items():
            out = c["port_directions"].get(p) == "output"
            for b in bits:
                if isinstance(b, int):
                    if out:
                        driver[b] = (cn, p)
                    else:
                        loads[b].append((cn, p))
    return driver, loads


def estimate(netlist) -> TimingEstimate:
    """Estimate the arrival time at every register input of ``netlist`` (a path to, or the
    parsed dict of, Yosys' ``write_json`` output after ``synth_ecp5``; the biggest module is
    taken as the flattened top)."""
    top = _load_top(netlist, "a Yosys JSON netlist")
    cells = top["cells"]
    bitname = _bit_names(top)
    driver, loads = connectivity(cells)
    sinks = collections.Counter({b: len(v) for b, v in loads.items()})
    d = DELAYS
    arrival, pred = {}, {}

    def net_arrival(b):
        drv = driver.get(b)
        if drv is None:
            return 0.0
        cn, p = drv
        t = cell_out(cn, p)
        if cells[cn]["type"] == "CCU2C" and p == "COUT":
            return t                                   # dedicated carry wire
        if cells[cn]["type"] == "MULT18X18D":
            return t + d["NET_DSP"]
        return t + d["NET"] + d["NET_PER_SINK"] * min(sinks[b], d["NET_SINK_CAP"])

    def cell_out(cn, port):
        # iterative depth-first evaluation (netlists are far deeper than Python's recursion)
        stack = [(cn, port)]
        while stack:
            key = stack[-1]
            if key in arrival:
                stack.pop()
                continue
            c = cells[key[0]]
            arcs = _arcs(c, key[1])
            pending = [driver[b] for b, _ in arcs if b in driver and driver[b] not in arrival
                       and not _is_start(cells[driver[b][0]], driver[b][1])]
            pending = [k for k in pending if k != key and k not in stack]
            if pending:
                stack.extend(pending)
                continue
            best, via = _start_delay(c), None
            for b, dl in arcs:
                t = (0.0 if b not in driver else
                     (arrival_of_start(b) if _is_start(cells[driver[b][0]], driver[b][1])
                      else net_arrival(b))) + dl
                if c["type"] == "MULT18X18D" and b in driver:
                    t += d["NET_DSP"] - d["NET"] - d["NET_PER_SINK"] * min(
                        sinks[b], d["NET_SINK_CAP"])
                if t > best:
                    best, via = t, b
            arrival[key], pred[key] = best, via
            stack.pop()
        return arrival[(cn, port)]

    def arrival_of_start(b):
        cn, p = driver[b]
        t = _start_delay(cells[cn])
        if cells[cn]["type"] == "MULT18X18D":
            return t + d["NET_DSP"]
        if cells[cn]["type"] == "DCCA":
            return t + d["GLOBAL"]
        return t + d["NET"] + d["NET_PER_SINK"] * min(sinks[b], d["NET_SINK_CAP"])

    endpoints = []
    for cn, c in cells.items():
        t = c["type"]
        if t not in _ENDPOINT_PORTS:
            continue
        extra = 0.0
        if t == "MULT18X18D":
            # a block with its registers (vitamin.boards.dspregs) ends paths at A and B: at its
            # input registers, or through the multiplier at its output register
            reg_in, reg_out = _dsp_regs(c)
            if not (reg_in or reg_out):
                continue
            extra = d["NET_DSP"] - d["NET"] + (0.0 if reg_in else d["MULT18X18D"])
            ports = [p for p in c["connections"] if p[0] in "AB" and p[1:].isdigit()]
        else:
            ports = _ENDPOINT_PORTS[t] or [p for p, dirn in c["port_directions"].items()
                                           if dirn == "input" and not p.startswith("CLK")]
        worst, wb = -1.0, None
        for p in ports:
            for b in c["connections"].get(p, []):
                if isinstance(b, int) and b in driver:
                    a = (arrival_of_start(b) if _is_start(cells[driver[b][0]], driver[b][1])
                         else net_arrival(b)) + extra
                    if a > worst:
                        worst, wb = a, b
        if wb is None:
            continue
        q = (c["connections"].get("Q") or c["connections"].get("DO0")
             or c["connections"].get("DOA0") or c["connections"].get("P0") or [None])[0]
        name = _readable(bitname.get(q, "$")) if isinstance(q, int) else None
        if not name:
            src = [x for x in c.get("attributes", {}).get("src", "").split("|") if ".py:" in x]
            name = _first_named(wb, driver, pred, bitname) or (
                cn if not cn.startswith("$") else
                f"(unnamed {t} at {src[0].split('/')[-1]})" if src else f"(unnamed {t})")
        name = re.sub(r"\[\d+\]", "", name.split("$")[0].rstrip(".")) or f"(unnamed {t})"
        endpoints.append(Endpoint(round(worst, 2), name, _unit_of(name), cn))
    endpoints.sort(key=lambda e: -e.arrival_ns)

    def trace(cn):
        c = cells[cn]
        b = max((b for p in (_ENDPOINT_PORTS.get(c["type"]) or c["connections"])
                  for b in c["connections"].get(p, []) if isinstance(b, int) and b in driver),
                 key=lambda b: net_arrival(b) if not _is_start(
                     cells[driver[b][0]], driver[b][1]) else arrival_of_start(b), default=None)
        path = []
        while b is not None and b in driver:
            key = driver[b]
            path.append((round(arrival.get(key, _start_delay(cells[key[0]])), 2),
                         cells[key[0]]["type"], bitname.get(b, "?")))
            b = pred.get(key)
        return path[::-1]

    paths = {}
    for e in endpoints:
        if e.name not in paths:
            paths[e.name] = trace(e.cell)
    worst_path = paths[endpoints[0].name] if endpoints else []
    return TimingEstimate(endpoints, worst_path, paths)


def _dsp_regs(c):
    """(inputs registered, output registered) of a MULT18X18D (vitamin.boards.dspregs)."""
    prm = c.get("parameters", {})
    on = lambda r: str(prm.get(f"REG_{r}_CLK", "NONE")).strip() != "NONE"  # noqa: E731
    return on("INPUTA") and on("INPUTB"), on("OUTPUT")


def _is_start(c, port):
    if c["type"] == "MULT18X18D":
        return any(_dsp_regs(c))
    return c["type"] in ("TRELLIS_FF", "DP16KD") or (
        c["type"] not in ("LUT4", "PFUMX", "L6MUX21", "CCU2C", "TRELLIS_DPR16X4"))


def _start_delay(c):
    if c["type"] == "MULT18X18D":
        reg_in, reg_out = _dsp_regs(c)
        return (DELAYS["DSP_REG_CLK_P"] if reg_out else
                DELAYS["DSP_REG_IN_CLK_P"] if reg_in else 0.0)
    if c["type"] == "DCCA":                 # a global buffer behind a register
        return DELAYS["FF_CLK_Q"] + DELAYS["NET"]
    return {"TRELLIS_FF": DELAYS["FF_CLK_Q"], "DP16KD": DELAYS["DP16KD_CLK_Q"]}.get(c["type"], 0.0)


def _arcs(c, port):
    """[(input bit, delay to ``port``)] of a combinational cell."""
    t, con, d = c["type"], c["connections"], DELAYS

    def bits(ports, dl):
        return [(b, dl) for p in ports for b in con.get(p, []) if isinstance(b, int)]
    if t == "LUT4":
        return bits("ABCD", d["LUT4"])
    if t == "PFUMX":
        return bits(("ALUT", "BLUT", "C0"), d["PFUMX"])
    if t == "L6MUX21":
        return bits(("D0", "D1", "SD"), d["L6MUX21"])
    if t == "CCU2C":
        lo, hi = ("A0", "B0", "C0", "D0"), ("A1", "B1", "C1", "D1")
        if port == "COUT":
            return bits(lo + hi, d["CCU2C_LUT_CARRY"]) + bits(("CIN",), d["CCU2C_CARRY"])
        if port == "S0":
            return bits(lo, d["CCU2C_LUT_SUM"]) + bits(("CIN",), d["CCU2C_CARRY_SUM"])
        return (bits(hi, d["CCU2C_LUT_SUM"]) + bits(lo, d["CCU2C_LUT_CARRY"])
                + bits(("CIN",), d["CCU2C_CARRY_SUM"]))
    if t == "MULT18X18D":
        if any(_dsp_regs(c)):
            return []                     # registered: P starts a path
        return bits([p for p in con if p[0] in "AB" and p[1:].isdigit()], d["MULT18X18D"])
    if t == "TRELLIS_DPR16X4":
        return bits(("RAD",), d["DPR16X4_READ"])
    return []


def _load_top(design, what):
    """The biggest module (the flattened top) of a JSON design given as a path or a dict."""
    if not isinstance(design, dict):
        with open(design) as f:
            design = json.load(f)
    mods = design.get("modules") if isinstance(design, dict) else None
    if not isinstance(mods, dict) or not mods:
        raise ValueError(f"not {what}: no 'modules' object")
    return max(mods.values(), key=lambda mod: len(mod.get("cells", {})))


def _bit_names(top):
    """{net bit: the most readable of its names} (a named signal before a generated name, then
    the shorter)."""
    bitname = {}
    for n, info in top.get("netnames", {}).items():
        for b in info["bits"]:
            if not isinstance(b, int):
                continue
            old = bitname.get(b)
            if old is None or ((not _readable(old), len(old)) > (not _readable(n), len(n))):
                bitname[b] = n
    return bitname


def _readable(n):
    """A signal name in a Yosys net name: ``core.x.y`` as is, ``$\\core.mem$rdreg[0]$q``
    (a memory's read register) as ``core.mem``; None for a generated name."""
    if n.startswith("$\\"):
        n = n[2:].split("$")[0]
    return n if n and not n.startswith("$") and "$" not in n.split(".")[-1] else None


def _first_named(b, driver, pred, bitname):
    for _ in range(64):
        if b is None:
            return None
        n = _readable(bitname.get(b, "$"))
        if n:
            return n
        key = driver.get(b)
        b = pred.get(key) if key else None
    return None


def format_estimate(est, period_ns=10.0, top=25):
    """A text summary: endpoint counts over a few delays, the slowest register groups and units,
    and the slowest path's named steps."""
    lines = [f"pre-route estimate: slowest register input {est.worst_ns:.1f} ns "
             f"({est.fmax_mhz:.1f} MHz), {len(est.endpoints)} endpoints",
             "endpoints over " + ", ".join(f"{ns} ns: {est.count_over(ns)}"
                                           for ns in (25, 20, 15, period_ns))]
    lines.append("slowest registers (ns, endpoints):")
    for k, (w, n) in list(est.groups("name").items())[:top]:
        lines.append(f"  {w:6.1f} {n:5d}  {k}")
    lines.append("units (worst ns, endpoints over the period):")
    per_unit = collections.Counter(e.unit for e in est.endpoints if e.arrival_ns > period_ns)
    for k, (w, _n) in list(est.groups("unit").items())[:top]:
        lines.append(f"  {w:6.1f} {per_unit[k]:5d}  {k}")
    lines.append("slowest path (named steps):")
    for t, typ, net in est.worst_path:
        if not net.startswith("$"):
            lines.append(f"  {t:6.2f}  {typ:11s} {net}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m vitamin.sim.sta", description=__doc__.split(
        "\n")[0])
    ap.add_argument("netlist", help="Yosys write_json output of synth_ecp5")
    ap.add_argument("--period", type=float, default=10.0, help="target clock period, ns")
    ap.add_argument("--top", type=int, default=25, help="groups to list")
    ap.add_argument("--path", metavar="REGEX", help="print the slowest path into the register "
                    "groups matching REGEX (up to three), every step")
    args = ap.parse_args(argv)
    try:
        est = estimate(args.netlist)
    except (OSError, ValueError, KeyError) as exc:
        print(f"error: cannot read {args.netlist} as a Yosys JSON netlist: {exc}",
              file=sys.stderr)
        return 2
    print(format_estimate(est, args.period, args.top))
    return print_paths(est, args.path, lambda t, typ, net: f"  {t:6.2f}  {typ:11s} {net}")


def print_paths(est, regex, step):
    """The CLIs' ``--path REGEX``: print the slowest path of up to three register groups whose
    name matches ``regex``, one ``step(*entry)`` line per path entry. Returns the exit status
    (2 when ``regex`` is not a regular expression; nothing to do when it is None)."""
    if regex is None:
        return 0
    try:
        pat = re.compile(regex)
    except re.error as exc:
        print(f"error: --path {regex!r} is not a regular expression: {exc}", file=sys.stderr)
        return 2
    shown = [k for k in est.groups("name") if pat.search(k)][:3]
    if not shown:
        print(f"no register group matches {regex!r}")
    for k in shown:
        print(f"path into {k}:")
        for entry in est.paths[k]:
            print(step(*entry))
    return 0


if __name__ == "__main__":
    sys.exit(main())
