"""``make bench``: measured figures, written to bench/results/ (bench.json + bench.md).

Measures, on this machine, for each benchmark model and preset: compile time, the golden
simulator's wall time, the cost model's cycles, MAC utilisation, DRAM traffic and predicted
latency at the preset's clock, the accuracy against onnxruntime, and onnxruntime's own latency on
this CPU as a reference point. Cycles of the models come from the cost model (compiler/cost.py).
Per preset, the hardware section measures the accelerator itself: lines of Verilog, Verilator
build time, simulated cycles per second and the MAC busy fraction of the long matmul workload on
the v2 RTL, and Yosys resource counts (``VITAMIN_BENCH_SYNTH=0`` skips synthesis, which takes
long: the whole design, or per unit when the whole design cannot be synthesised).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results"

# Published reference points (../shared/reference/edge-moe.md, peers.md).
EDGE_MOE = {"latency_ms": 34.64, "cycles": 10.4e6, "clock_mhz": 300, "macs": 256}


def _ort_latency(path, x, reps=5):
    import onnxruntime as ort
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    sess.run(None, {name: x})
    t0 = time.perf_counter()
    for _ in range(reps):
        out = sess.run(None, {name: x})[0]
    return (time.perf_counter() - t0) / reps, out


def bench_model(label, path, preset, calibration=None, x=None):
    import vitamin
    from vitamin.commands import build_report
    rec = {"model": label, "config": preset}
    t0 = time.perf_counter()
    try:
        prog = vitamin.compile(path, preset, calibration)
    except ValueError as e:
        rec["error"] = str(e)
        return rec
    rec["compile_s"] = time.perf_counter() - t0
    rep = build_report(prog)
    rec.update(cycles=rep["cycles"], macs=rep["macs"], utilisation=rep["utilisation"],
               dram_read_bytes=rep["dram_read_bytes"], latency_ms=rep["latency_ms"],
               clock_mhz=rep["clock_mhz"], instructions=prog.n_instr,
               cycles_source="cost model")
    if x is not None:
        t0 = time.perf_counter()
        out = vitamin.run(prog, {prog.inputs[0].name: x})
        rec["golden_run_s"] = time.perf_counter() - t0
        t_ort, ref = _ort_latency(path, x.astype(np.float32))
        y = out.outputs[prog.outputs[0].name].reshape(ref.shape)
        rec["onnxruntime_ms"] = 1e3 * t_ort
        rec["cosine_vs_onnxruntime"] = float(y.ravel() @ ref.ravel() / np.linalg.norm(y)
                                             / np.linalg.norm(ref))
        rec["top1_agreement"] = bool(np.argmax(y) == np.argmax(ref))
        assert out.counters["macs"] == rep["macs"], "cost model and simulator disagree on MACs"
    return rec


# ---- hardware: Verilog size, Verilator build, simulation speed, overlap, synthesis ------------

#: Synthesis family per preset (sim/synth.py FAMILIES).
SYNTH_FAMILY = {"tiny": "ecp5", "ecp5": "ecp5", "zcu102": "xcup"}


def _synth_counts(cfg, family, timeout):
    """Resource counts of the whole accelerator; when Yosys cannot synthesise it (the
    WebAssembly build's 4 GiB memory), the sum over its units and memories, labelled so."""
    from vitamin.hw.accel import Accelerator, discover_units
    from vitamin.hw.mem import AccMemory, IdxMemory, RowStateMemory, Scratchpad
    from vitamin.sim.synth import SynthError, synthesize
    with tempfile.TemporaryDirectory() as d:
        try:
            r = synthesize(Accelerator(cfg), family, d, name="accel", timeout=timeout)
            return {"scope": "whole accelerator", "cells": r.cells, "seconds": r.seconds}
        except SynthError as e:
            whole_err = str(e).splitlines()[0]
        total, parts, t = {}, {}, 0.0
        blocks = {cls.__name__: cls for cls in set(discover_units().values())}
        blocks.update({c.__name__: c for c in (Scratchpad, AccMemory, IdxMemory,
                                               RowStateMemory)})
        for name, cls in sorted(blocks.items()):
            try:
                r = synthesize(cls(cfg), family, d, name=name.lower(), timeout=timeout)
            except SynthError as e:
                parts[name] = {"error": str(e).splitlines()[0]}
                continue
            parts[name] = r.cells
            t += r.seconds
            for k, v in r.cells.items():
                total[k] = total.get(k, 0) + v
        return {"scope": "sum of units and memories (whole design failed: " + whole_err + ")",
                "cells": total, "parts": parts, "seconds": t}


def bench_hardware(preset, synth=True, synth_timeout=3600):
    """Verilog lines, Verilator build time, simulated cycles per second and the long-matmul
    overlap figures (v2 RTL counters) of ``preset``; optionally Yosys resource counts."""
    from vitamin.config import get_config
    from vitamin.hw.accel import Accelerator
    from vitamin.sim import simtop
    from vitamin.sim.verilator import convert_verilog
    cfg = get_config(preset)
    rec = {"config": preset}
    t0 = time.perf_counter()
    text = convert_verilog(Accelerator(cfg), name="accel")
    rec["verilog_lines"] = len(text.splitlines())
    rec["verilog_s"] = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as broot:
        # a fresh build (Verilog generation, Verilator, C++ compile), not the cached one
        sim = simtop.build(cfg, build_root=broot)
        rec["verilator_build_s"] = sim.build_seconds
        _run_long_matmul(rec, cfg, sim)
    if synth:
        rec["synth"] = {"family": SYNTH_FAMILY[preset],
                        **_synth_counts(cfg, SYNTH_FAMILY[preset], synth_timeout)}
    return rec


def _run_long_matmul(rec, cfg, sim):
    from vitamin.golden.isasim import simulate
    from vitamin.sim.workloads import long_matmul
    prog, ins = long_matmul(cfg)
    img = prog.dram_image()
    for name, v in ins.items():
        prog.write_tensor(img, name, v)
    gold = simulate(cfg, img, prog.n_instr)
    res = sim.run([{"image": img, "n_instr": prog.n_instr, "timeout_cycles": 20_000_000}])[0]
    c = res["counters"]
    ok = res["status"] == 0 and bytes(res["dram"]) == gold.dram.tobytes()
    rec.update(long_matmul_bit_exact=bool(ok), long_matmul_cycles=c["cycles"],
               mac_busy=c["busy_matmul"] / c["cycles"],
               mac_utilisation=c["macs"] / (cfg.macs * c["cycles"]),
               sim_wall_s=res["wall_s"], sim_cycles_per_s=c["cycles"] / res["wall_s"])


def main() -> int:
    from vitamin.compiler.models import deit_tiny, export_onnx
    OUT.mkdir(parents=True, exist_ok=True)
    results = []
    rng = np.random.default_rng(0)
    data = np.load(ROOT / "models" / "digits_data.npz")
    digits = ROOT / "models" / "digits_vit.onnx"
    for preset in ("tiny", "ecp5", "zcu102"):
        r = bench_model("digits_vit", digits, preset, {"input": data["x_cal"]},
                        data["x_test"][:1])
        results.append(r)
        print(json.dumps(r))
    with tempfile.TemporaryDirectory() as d:
        for dyn in (False, True):
            t0 = time.perf_counter()
            path = export_onnx(deit_tiny(seed=0), Path(d) / f"deit_{dyn}.onnx", dynamo=dyn)
            export_s = time.perf_counter() - t0
            x = rng.standard_normal((1, 3, 224, 224))
            for preset in ("zcu102", "ecp5"):
                r = bench_model(f"deit_tiny ({'dynamo' if dyn else 'legacy'} export)", path,
                                preset, None, x)
                r["export_s"] = export_s
                results.append(r)
                print(json.dumps(r))
    hardware = []
    synth = os.environ.get("VITAMIN_BENCH_SYNTH", "1") != "0"
    for preset in ("tiny", "ecp5", "zcu102"):
        r = bench_hardware(preset, synth=synth)
        hardware.append(r)
        print(json.dumps(r))
    meta = {"machine": platform.platform(), "python": sys.version.split()[0],
            "cpu_count": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "edge_moe_reference": EDGE_MOE}
    (OUT / "bench.json").write_text(json.dumps({"meta": meta, "results": results,
                                                "hardware": hardware}, indent=1))
    lines = ["# vitamin benchmark results", "",
             f"Machine: {meta['machine']}, {meta['cpu_count']} CPUs, Python {meta['python']}, "
             f"{meta['date']}. Cycles come from the cost model (compiler/cost.py); RTL cycles "
             "replace them once the RTL backend exists.", "",
             "| model | preset | compile s | cycles | MAC util | latency ms @clock | DRAM MB "
             "| cosine vs ORT | ORT ms (CPU) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['config']} | does not compile: "
                         f"{r['error'][:90]} | | | | | | |")
            continue
        lines.append(
            f"| {r['model']} | {r['config']} | {r['compile_s']:.2f} | {r['cycles']:,} | "
            f"{100 * r['utilisation']:.1f}% | {r['latency_ms']:.3f} @ {r['clock_mhz']:.0f} MHz | "
            f"{r['dram_read_bytes'] / 1e6:.2f} | {r.get('cosine_vs_onnxruntime', float('nan')):.4f}"
            f" | {r.get('onnxruntime_ms', float('nan')):.2f} |")
    lines += ["", "## Hardware (v2 RTL, Verilator)", "",
              "Long matmul: A resident, weight tiles streamed from DRAM double-buffered with "
              "tokens (vitamin/sim/workloads.py); MAC busy = busy_matmul / cycles, MAC "
              "utilisation = macs / (rows * cols * cycles), from the RTL counters.", "",
              "| preset | Verilog lines | Verilator build s | sim cycles/s | long matmul cycles "
              "| MAC busy | MAC util | bit-exact | Yosys cells |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in hardware:
        syn = r.get("synth")
        top = sorted(syn["cells"].items(), key=lambda kv: -kv[1])[:6] if syn else []
        cells = "not run" if syn is None else (
            f"{syn['family']} ({syn['scope'][:40]}): " + ", ".join(f"{k} {v}" for k, v in top))
        lines.append(f"| {r['config']} | {r['verilog_lines']:,} | "
                     f"{r['verilator_build_s'] or 0:.0f} | "
                     f"{r['sim_cycles_per_s']:,.0f} | {r['long_matmul_cycles']:,} | "
                     f"{100 * r['mac_busy']:.2f}% | {100 * r['mac_utilisation']:.2f}% | "
                     f"{r['long_matmul_bit_exact']} | {cells} |")
    (OUT / "bench.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"written: {OUT / 'bench.json'}, {OUT / 'bench.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
