"""``make bench``: measured figures, written to bench/results/ (bench.json + bench.md).

Measures, on this machine, for each benchmark model and preset: compile time, the golden
simulator's wall time, the cost model's cycles, MAC utilisation, DRAM traffic and predicted
latency at the preset's clock, the accuracy against onnxruntime, and onnxruntime's own latency on
this CPU as a reference point. Cycles come from the cost model (compiler/cost.py) until the RTL
backend exists; the report says so.
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
    meta = {"machine": platform.platform(), "python": sys.version.split()[0],
            "cpu_count": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "edge_moe_reference": EDGE_MOE}
    (OUT / "bench.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
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
    (OUT / "bench.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"written: {OUT / 'bench.json'}, {OUT / 'bench.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
