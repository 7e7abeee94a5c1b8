"""Subcommands ``estimate`` and ``explore`` (performance without RTL; registered in
:mod:`vitamin.cli` through ``COMMAND_MODULES``).

``vitamin estimate MODEL.onnx --config PRESET``
    compiles the model and runs the cost model (compiler/cost.py, the v2 machine the default
    hardware is): cycles, MAC utilisation, latency at the preset's clock, DRAM bytes, on-chip
    memory use, and a resource estimate (vitamin/explore.py) -- in seconds, no RTL, no synthesis.
``vitamin explore MODEL.onnx --board B | --part P``
    sweeps configurations with the cost model under the part's limits, prints the Pareto front
    and writes a plot (vitamin/explore.py); ``--scheduler ADDRESS`` runs the points on a Dask
    distributed cluster instead of local processes.
"""

from __future__ import annotations

import json
import sys
import time

from .cli import command


def _estimate_args(p):
    p.add_argument("model", help="ONNX model file (or a compiled .vit program)")
    p.add_argument("--config", default="ecp5", help="configuration preset (default: ecp5)")
    p.add_argument("--calibration", help=".npz with sample inputs, keyed by input name")
    p.add_argument("--task", type=int, help="task of a multi-task model (default 0)")
    p.add_argument("--clock", type=float, help="clock in MHz (default: the preset's)")
    p.add_argument("--family", choices=("ecp5", "xcup"),
                   help="FPGA family of the resource estimate (default: the preset's)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")


def estimate_model(model, config, calibration=None, task=None, clock_mhz=None,
                   family=None) -> dict:
    """Compile (unless ``model`` is a ``.vit`` program) and estimate: the figures of
    ``vitamin estimate`` as a dict."""
    from pathlib import Path

    from . import api
    from .commands import build_report
    from .explore import estimate_resources
    t0 = time.perf_counter()
    if str(model).endswith(".vit"):
        from .program import Program
        prog = Program.load(model)
    else:
        prog = api.compile(model, config, calibration)
    compile_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    inputs = None
    rep = build_report(prog, clock_mhz, inputs, task)
    est_s = time.perf_counter() - t1
    cfg = prog.config
    try:
        res = estimate_resources(cfg, family)
    except ValueError as e:                   # no calibration for the family
        res = {"error": str(e)}
    peak = 2 * int(prog.meta.get("spad_peak_words", 0))       # 16-bit words
    return {
        "model": Path(str(model)).name, "config": cfg.name, "machine": rep["machine"],
        "cycles": rep["cycles"], "macs": rep["macs"],
        "mac_utilisation": rep["utilisation"], "clock_mhz": rep["clock_mhz"],
        "latency_ms": rep["latency_ms"], "dram_read_bytes": rep["dram_read_bytes"],
        "dram_write_bytes": rep["dram_write_bytes"],
        "onchip": {"spad_peak_bytes": peak, "spad_bytes": cfg.spad_bytes,
                   "spad_use": peak / cfg.spad_bytes if cfg.spad_bytes else 0.0,
                   "acc_bytes": cfg.acc_bytes, "onchip_bytes": cfg.onchip_bytes,
                   "weight_tiles": prog.meta.get("weight_tiles")},
        "resources": res, "instructions": prog.n_instr, "compile_s": compile_s,
        "estimate_s": est_s, "layers": rep["layers"], "moe": rep.get("moe"),
    }


@command("estimate", "compile and estimate cycles, utilisation, DRAM bytes, memory and "
         "resources (cost model, no RTL)", arguments=_estimate_args)
def _estimate(args):
    from . import api
    cal = api.load_calibration(args.calibration) if args.calibration else None
    r = estimate_model(args.model, args.config, cal, args.task, args.clock, args.family)
    if args.json:
        json.dump(r, sys.stdout, default=float)
        print()
        return 0
    res = r["resources"]
    oc = r["onchip"]
    print(f"{r['model']} on {r['config']} (cost model of the {r['machine']} RTL, "
          f"compiler/cost.py; compiled in {r['compile_s']:.1f} s, estimated in "
          f"{r['estimate_s']:.2f} s)")
    print(f"  cycles          {r['cycles']:,}  ({r['latency_ms']:.3f} ms at "
          f"{r['clock_mhz']:g} MHz)")
    print(f"  MACs            {r['macs'] / 1e6:,.1f} M  ->  MAC utilisation "
          f"{100 * r['mac_utilisation']:.1f} %")
    print(f"  DRAM            read {r['dram_read_bytes'] / 1024:,.0f} KiB, write "
          f"{r['dram_write_bytes'] / 1024:,.0f} KiB")
    print(f"  on-chip memory  scratchpad peak {oc['spad_peak_bytes'] / 1024:,.0f} of "
          f"{oc['spad_bytes'] / 1024:,.0f} KiB ({100 * oc['spad_use']:.0f} %), accumulators "
          f"{oc['acc_bytes'] / 1024:,.0f} KiB, all memories {oc['onchip_bytes'] / 1024:,.0f} KiB")
    src = f", scaled from {res['scaled_from']}" if "scaled_from" in res else ""
    if "error" in res:
        print(f"  resources       n/a: {res['error']}")
    else:
        print(f"  resources       LUT {res['LUT']:,}  FF {res['FF']:,}  DSP {res['DSP']:,}  "
              f"BRAM {res['BRAM']:,}  ({res['family']} estimate{src}; vitamin/explore.py)")
        if res.get("caveat"):
            print(f"                  note: {res['caveat']}")
    return 0


def _explore_args(p):
    p.add_argument("model", help="ONNX model file")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--board", help="board (ulx3s, zcu102, ...)")
    g.add_argument("--part", help="FPGA part (lfe5u-85f, xczu9eg, ...)")
    p.add_argument("--base", help="preset the sweep starts from (default: the part's family's)")
    p.add_argument("--shapes", help="array shapes, e.g. 4x4,8x8,8x16")
    p.add_argument("--spad-kib", help="scratchpad sizes in KiB, e.g. 64,96,256")
    p.add_argument("--row-lanes", help="row-unit lanes, e.g. 4,8")
    p.add_argument("--acc-bits", help="accumulator widths, e.g. 40,48")
    p.add_argument("--calibration", help=".npz with sample inputs, keyed by input name")
    p.add_argument("--scheduler", help="Dask distributed scheduler address (default: local "
                   "processes)")
    p.add_argument("--workers", type=int, help="local worker processes")
    p.add_argument("-o", "--output", default="explore", help="directory for front.json and "
                   "pareto.png (default: explore)")
    p.add_argument("--json", action="store_true", help="print the front as JSON")


def _ints(text, scale=1):
    return [int(t) * scale for t in text.split(",")] if text else None


def run_explore(model, part, base=None, shapes=None, spad_words=None, row_lanes=None,
                acc_bits=None, calibration=None, scheduler=None, workers=None):
    """The sweep of ``vitamin explore`` (an :class:`~vitamin.explore.ExploreResult`)."""
    from .config import get_config
    from .explore import PARTS, candidate_configs, make_executor, sweep
    if part not in PARTS:
        raise ValueError(f"unknown part {part!r}; parts: {', '.join(PARTS)}")
    base_cfg = get_config(base or ("zcu102" if PARTS[part]["family"] == "xcup" else "ecp5"))
    cfgs = candidate_configs(base_cfg, shapes, spad_words, row_lanes, acc_bits)
    if not cfgs:
        raise ValueError("no valid configuration in the sweep")
    ex = make_executor(scheduler, workers)
    try:
        return sweep(model, part, cfgs, ex, calibration)
    finally:
        ex.close()


@command("explore", "sweep configurations with the cost model under a part's resources; "
         "Pareto front of latency vs resources", arguments=_explore_args)
def _explore(args):
    from pathlib import Path

    from . import api
    from .explore import BOARDS, plot_front
    part = args.part or BOARDS.get(args.board)
    if part is None:
        raise ValueError(f"unknown board {args.board!r}; boards: {', '.join(BOARDS)}")
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")] \
        if args.shapes else None
    cal = api.load_calibration(args.calibration) if args.calibration else None
    res = run_explore(args.model, part, args.base, shapes, _ints(args.spad_kib, 512),
                      _ints(args.row_lanes), _ints(args.acc_bits), cal, args.scheduler,
                      args.workers)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "front.json").write_text(json.dumps({"part": res.part, "executor": res.executor,
                                                "points": res.points, "front": res.front},
                                               indent=1, default=float))
    plot_front(res, out / "pareto.png")
    if args.json:
        json.dump(res.front, sys.stdout, default=float)
        print()
        return 0
    ok = sum("cycles" in p for p in res.points)
    print(f"{len(res.points)} points on {part} ({ok} feasible) in {res.seconds:.1f} s via "
          f"{res.executor}; Pareto front (latency vs largest resource share):")
    print(f"  {'array':>7} {'spad KiB':>8} {'lanes':>5} {'acc':>4} {'cycles':>12} {'ms':>8} "
          f"{'util%':>6} {'LUT':>8} {'DSP':>5} {'BRAM':>5} {'share%':>6}")
    for p in res.front:
        r = p["resources"]
        print(f"  {p['rows']:>3}x{p['cols']:<3} {p['spad_words'] // 512:>8} "
              f"{p['row_lanes']:>5} {p['acc_bits']:>4} {p['cycles']:>12,} "
              f"{p['latency_ms']:>8.3f} {100 * p['utilisation']:>6.1f} {int(r['LUT']):>8,} "
              f"{int(r['DSP']):>5} {int(r['BRAM']):>5} {100 * p['resource_cost']:>6.1f}")
    print(f"written: {out / 'front.json'}, {out / 'pareto.png'}")
    return 0
