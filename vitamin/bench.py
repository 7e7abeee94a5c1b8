"""``make bench``: measured figures, written to bench/results/ (bench.json, bench.md, PNG plots).

Per benchmark model (M3ViT-tiny and DeiT-tiny on ``zcu102``, DeiT-tiny on ``ecp5`` when it
compiles, the shipped digits ViT and two-task digits MoE on ``tiny``): compile time, the cost
model's cycles and per-layer breakdown (compiler/cost.py, the v2 machine), the RTL's cycles
(Verilator model of the v2 accelerator, one run per task; results cached by
:func:`rtl_counters`), MAC utilisation = useful MACs / (MACs per cycle x RTL cycles), DRAM
bytes, latency at the preset's clock, the cost model's agreement with the RTL, the RTL's
simulation speed and wall time, the golden simulator's wall time and onnxruntime's latency on
this CPU as a reference point. M3ViT-tiny is set against Edge-MoE (34.64 ms, 10.4 M cycles at
300 MHz on 256 MACs) and the ideal 3.06 M cycles (782.7 M MACs / 256).

Per preset, the hardware section measures the accelerator itself: lines of Verilog, a fresh
Verilator build, simulated cycles per second and the MAC busy fraction of the long matmul
workload on the v2 RTL, and Yosys resource counts (``VITAMIN_BENCH_SYNTH``, which takes long: the
whole design, or per unit when the whole design cannot be synthesised) next to the resource
model's estimate.

Plots: per-layer MAC utilisation of the zcu102 models, and a roofline (arithmetic intensity in
MACs x 2 per DRAM byte against achieved GOPS, per layer, per preset). The README's results table
is generated from the same records (:func:`readme_table`, :func:`update_readme`).

Environment: ``VITAMIN_BENCH_RTL=0`` skips the RTL runs of the zcu102 models (about 5 minutes per
run), ``VITAMIN_BENCH_HW=0`` the hardware section; ``VITAMIN_BENCH_SYNTH`` lists the presets
synthesised (default ``tiny``; ``all``, or ``0`` for none).
"""

from __future__ import annotations

import hashlib
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
RTL_CACHE = ROOT / "build" / "rtl_cache"
README = ROOT / "README.md"
README_BEGIN = "<!-- bench:begin -->"
README_END = "<!-- bench:end -->"

# Published reference points (../shared/reference/edge-moe.md, peers.md).
EDGE_MOE = {"latency_ms": 34.64, "cycles": 10.4e6, "clock_mhz": 300, "macs": 256,
            "ideal_cycles": 3.06e6, "model_macs": 782.7e6}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ---- RTL runs (cached) ------------------------------------------------------------------------

def rtl_counters(prog, int_inputs, regs=None, timeout_cycles=200_000_000) -> dict:
    """RTL counters (``cycles``, ``busy_*``, ``macs``, DRAM bytes, ...), ``status``, ``wall_s``
    of one run of ``prog`` on the Verilator model of the default (v2) accelerator.

    A run is deterministic: its result is cached under ``build/rtl_cache/`` by the hash of the
    DRAM image, the registers, the configuration and the Verilog of the simulation build (the
    build is brought up to date first), so ``make bench``'s slow tests and report share one run.
    """
    from vitamin.sim import simtop
    from vitamin.sim.rtl_backend import _ram_bytes
    img = prog.dram_image()
    for name, v in (int_inputs or {}).items():
        prog.write_tensor(img, name, v)
    regs = {int(k): int(v) for k, v in (regs or {}).items()}
    cfg = prog.config
    sim = simtop.build(cfg, dram_bytes=_ram_bytes(cfg, len(img)))
    stamp = Path(sim.build_dir) / "built.json"
    verilog = json.loads(stamp.read_text()).get("verilog_hash", "") if stamp.exists() else ""
    h = hashlib.sha256()
    h.update(img.tobytes())
    h.update(json.dumps({"n": prog.n_instr, "regs": sorted(regs.items()),
                         "config": cfg.to_dict(), "issue": sim.issue, "verilog": verilog,
                         "dram": sim.dram_bytes}, sort_keys=True).encode())
    path = RTL_CACHE / f"{cfg.name}-{h.hexdigest()[:24]}.json"
    if path.exists():
        return {**json.loads(path.read_text()), "cached": True}
    res = sim.run([{"image": img.tobytes(), "n_instr": prog.n_instr, "window": len(img),
                    "regs": regs, "timeout_cycles": timeout_cycles}])[0]
    out = {"status": res["status"], "counters": res["counters"], "wall_s": res["wall_s"],
           "build_s": sim.build_seconds}
    if res["status"] is not None:
        RTL_CACHE.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out))
    return {**out, "cached": False}


# ---- one model on one preset -------------------------------------------------------------------

def _ort_latency(path, feeds, reps=5):
    import onnxruntime as ort
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    sess.run(None, feeds)
    t0 = time.perf_counter()
    for _ in range(reps):
        out = sess.run(None, feeds)[0]
    return (time.perf_counter() - t0) / reps, out


def bench_model(label, path, preset, calibration=None, x=None, tasks=(None,), rtl=True,
                golden=True):
    """Figures of ``label`` (ONNX at ``path``) on ``preset``; one record per task."""
    import vitamin
    from vitamin.api import quantize_inputs, task_regs
    from vitamin.compiler.cost import estimate, profile_program
    from vitamin.config import get_config
    cfg = get_config(preset)
    base = {"model": label, "config": preset, "clock_mhz": cfg.clock_mhz, "macs_per_cycle":
            cfg.macs}
    t0 = time.perf_counter()
    try:
        prog = vitamin.compile(path, preset, calibration)
    except ValueError as e:
        return [{**base, "error": str(e).splitlines()[0]}]
    base["compile_s"] = time.perf_counter() - t0
    base["instructions"] = prog.n_instr
    task_in = (prog.meta.get("task") or {}).get("input")
    image = next(s for s in prog.inputs if s.name != task_in)
    x = np.random.default_rng(0).standard_normal(image.shape) if x is None else \
        np.asarray(x, dtype=np.float32).reshape(image.shape)
    recs = []
    for task in tasks:
        rec = dict(base, task=task)
        ins, regs = task_regs(prog, {image.name: x}, task)
        q = quantize_inputs(prog, ins)
        t0 = time.perf_counter()
        prof = profile_program(prog, q, regs)
        rec["profile_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        est = estimate(prog, prof)
        rec["estimate_s"] = time.perf_counter() - t0
        rec.update(model_cycles=est.cycles, v1_cycles=est.v1_cycles, macs=est.macs,
                   model_utilisation=est.utilisation(cfg),
                   dram_read_bytes=est.dram_read_bytes, dram_write_bytes=est.dram_write_bytes,
                   layers=[{k: lay[k] for k in ("name", "op", "cycles", "macs_executed",
                                                "dram_bytes", "utilisation") if k in lay}
                           for lay in est.layers])
        if golden:
            t0 = time.perf_counter()
            out = vitamin.run(prog, dict(ins), task=task)
            rec["golden_run_s"] = time.perf_counter() - t0
            rec["golden_macs_per_s"] = est.macs / rec["golden_run_s"]
            feeds = {k: np.asarray(v, dtype=np.float32) for k, v in ins.items()}
            if task_in:
                feeds[task_in] = np.array(task or 0, dtype=np.int64)
            try:
                t_ort, ref = _ort_latency(path, feeds)
                y = out.outputs[prog.outputs[0].name].reshape(ref.shape)
                rec["onnxruntime_ms"] = 1e3 * t_ort
                rec["cosine_vs_onnxruntime"] = float(
                    y.ravel() @ ref.ravel() / np.linalg.norm(y) / np.linalg.norm(ref))
            except Exception as e:  # noqa: BLE001 - a reference point, reported if missing
                rec["onnxruntime_error"] = str(e).splitlines()[0][:200]
        if rtl:
            r = rtl_counters(prog, q, regs)
            if r["status"] != 0:
                rec["rtl_error"] = f"status {r['status']}"
            else:
                c = r["counters"]
                rec.update(rtl_cycles=c["cycles"], rtl_macs=c["macs"],
                           rtl_dram_read_bytes=c["dram_read_bytes"],
                           rtl_dram_write_bytes=c["dram_write_bytes"],
                           rtl_busy_matmul=c["busy_matmul"], rtl_wall_s=r["wall_s"],
                           rtl_cycles_per_s=c["cycles"] / r["wall_s"] if r["wall_s"] else None,
                           rtl_cached=r["cached"],
                           model_error=(est.cycles - c["cycles"]) / c["cycles"])
        cyc = rec.get("rtl_cycles", rec["model_cycles"])
        rec["cycles"] = cyc
        rec["cycles_source"] = "RTL" if "rtl_cycles" in rec else "cost model"
        rec["utilisation"] = rec["macs"] / (cfg.macs * cyc)
        rec["latency_ms"] = cyc / (cfg.clock_mhz * 1e3)
        recs.append(rec)
        print(json.dumps({k: v for k, v in rec.items() if k != "layers"}), flush=True)
    return recs


# ---- hardware: Verilog size, Verilator build, simulation speed, overlap, synthesis ------------

#: Synthesis family per preset (sim/synth.py FAMILIES).
SYNTH_FAMILY = {"tiny": "ecp5", "ecp5": "ecp5", "zcu102": "xcup"}


def _synth_counts(cfg, family, timeout):
    """Resource counts of the whole accelerator; when Yosys cannot synthesise it (the
    WebAssembly build's 4 GiB memory), the sum over its units and memories, labelled so."""
    from vitamin.hw.accel import Accelerator, discover_units
    from vitamin.hw.mem import AccMemory, IdxMemory, RowStateMemory, Scratchpad
    from vitamin.sim import synth as _synth
    from vitamin.sim.synth import SynthError, synthesize
    whole = family
    if family == "ecp5":
        # synth_ecp5's last step, AUTONAME, fails on the whole accelerator (Yosys 0.64): stop
        # the script after its check pass; the cells are mapped by then, only names are not
        whole = "ecp5-no-autoname"
        _synth.FAMILIES.setdefault(whole, "synth_ecp5 -top {top} -run begin:check")
    with tempfile.TemporaryDirectory() as d:
        try:
            r = synthesize(Accelerator(cfg), whole, d, name="accel", timeout=timeout)
            return {"scope": "whole accelerator" + (" (synth_ecp5 -run begin:check)"
                                                    if whole != family else ""),
                    "cells": r.cells, "seconds": r.seconds}
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
    overlap figures (v2 RTL counters) of ``preset``; optionally Yosys resource counts, next to
    the resource model's estimate (vitamin/explore.py)."""
    from vitamin.config import get_config
    from vitamin.explore import estimate_resources
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
    try:
        est = estimate_resources(cfg, SYNTH_FAMILY[preset])
        rec["resource_estimate"] = {k: est[k] for k in ("LUT", "FF", "DSP", "BRAM")}
        rec["resource_estimate_scaled_from"] = est.get("scaled_from")
    except ValueError as e:
        rec["resource_estimate_error"] = str(e)
    if synth:
        rec["synth"] = {"family": SYNTH_FAMILY[preset],
                        **_synth_counts(cfg, SYNTH_FAMILY[preset], synth_timeout)}
    return rec


def _run_long_matmul(rec, cfg, sim):
    from vitamin.compiler.cost import estimate
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
    est = estimate(prog, other=False)
    rec.update(long_matmul_bit_exact=bool(ok), long_matmul_cycles=c["cycles"],
               long_matmul_model_cycles=est.cycles,
               mac_busy=c["busy_matmul"] / c["cycles"],
               mac_utilisation=c["macs"] / (cfg.macs * c["cycles"]),
               sim_wall_s=res["wall_s"], sim_cycles_per_s=c["cycles"] / res["wall_s"])


# ---- plots -------------------------------------------------------------------------------------

def plot_layers(recs, path):
    """Per-layer MAC utilisation bars (cost model timeline) of each record with layers."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    recs = [r for r in recs if r.get("layers")]
    if not recs:
        return None
    fig, axes = plt.subplots(len(recs), 1, figsize=(12, 2.6 * len(recs)), squeeze=False)
    for ax, r in zip(axes[:, 0], recs):
        lay = [la for la in r["layers"] if la["macs_executed"]]
        ax.bar(range(len(lay)), [100 * la["utilisation"] for la in lay], width=0.8)
        ax.set_ylim(0, 105)
        ax.set_ylabel("MAC util %")
        task = "" if r.get("task") is None else f" task {r['task']}"
        ax.set_title(f"{r['model']}{task} on {r['config']}: {100 * r['utilisation']:.1f} % "
                     f"end to end ({r['cycles_source']} cycles)", fontsize=9)
        ax.set_xticks(range(len(lay)))
        ax.set_xticklabels([la["name"][:18] for la in lay], rotation=90, fontsize=4)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def roofline_points(rec):
    """(ops per DRAM byte, achieved GOPS) per layer with MACs (2 ops per MAC; layers that read
    nothing from DRAM are placed at the right edge of the plot by the caller)."""
    clk = rec["clock_mhz"] * 1e6
    pts = []
    for la in rec.get("layers", []):
        if not la["macs_executed"] or la["cycles"] <= 0:
            continue
        ops = 2 * la["macs_executed"]
        pts.append((ops / la["dram_bytes"] if la["dram_bytes"] else float("inf"),
                    ops / (la["cycles"] / clk) / 1e9))
    return pts


def plot_roofline(recs, path):
    """Roofline per preset: peak GOPS (2 x MACs x clock) and the DRAM bus's bandwidth
    (bus bytes per cycle x clock); one marker per layer of each model."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vitamin.config import get_config
    recs = [r for r in recs if r.get("layers")]
    if not recs:
        return None
    presets = sorted({r["config"] for r in recs})
    fig, axes = plt.subplots(1, len(presets), figsize=(5.5 * len(presets), 4), squeeze=False)
    for ax, preset in zip(axes[0], presets):
        cfg = get_config(preset)
        peak = 2 * cfg.macs * cfg.clock_mhz / 1e3
        bw = cfg.bus_bytes * cfg.clock_mhz / 1e3          # GB/s
        xs = np.logspace(-1, 5, 200)
        ax.loglog(xs, np.minimum(peak, bw * xs), "k-", lw=1, label=f"roof: {peak:.3g} GOPS, "
                  f"{bw:.3g} GB/s")
        for i, r in enumerate(x for x in recs if x["config"] == preset):
            pts = roofline_points(r)
            if not pts:
                continue
            xi = [min(p[0], 1e5) for p in pts]
            task = "" if r.get("task") is None else f" t{r['task']}"
            ax.scatter(xi, [p[1] for p in pts], s=8, color=f"C{i}",
                       label=f"{r['model']}{task}")
        ax.set_xlabel("ops per DRAM byte")
        ax.set_ylabel("achieved GOPS (cost model)")
        ax.set_title(f"{preset}: {cfg.rows}x{cfg.cols} MACs at {cfg.clock_mhz:g} MHz",
                     fontsize=9)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---- report ------------------------------------------------------------------------------------

def sparse_attention_section(rows: list[dict]) -> list[str]:
    """Markdown of the sparse-attention sweep (dense vs block-sparse vs DHSA cycles and DRAM
    bytes over sequence length). ``rows``: dicts with ``pattern``, ``seq_len``, ``config``,
    ``cycles``, ``dram_bytes`` and optionally ``rtl_cycles``, ``ratio_vs_dense``; an empty list
    gives an empty section. The hook for the sparse-attention benchmark (:func:`sparse_rows`)."""
    if not rows:
        return []
    lines = ["## Sparse attention", "",
             "| pattern | sequence | preset | cycles | DRAM bytes | vs dense |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        ratio = r.get("ratio_vs_dense")
        lines.append(f"| {r['pattern']} | {r['seq_len']} | {r.get('config', '')} | "
                     f"{r['cycles']:,} | {r['dram_bytes']:,} | "
                     f"{'' if ratio is None else f'{ratio:.2f}x'} |")
    return lines + [""]


def sparse_rows() -> list[dict]:
    """Rows of the sparse-attention sweep (see :func:`sparse_attention_section`): dense causal,
    block top-k and DHSA at 1k/2k/4k tokens on zcu102 (:func:`vitamin.sparse_bench.sweep`;
    set ``VITAMIN_BENCH_SPARSE=0`` to skip). Also written to ``sparse.json``."""
    if os.environ.get("VITAMIN_BENCH_SPARSE", "1") == "0":
        return []
    from vitamin.sparse_bench import sweep
    raw = sweep("zcu102", (1024, 2048, 4096), progress=print)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "sparse.json").write_text(json.dumps(raw, indent=1))
    return [{"pattern": r["mode"], "seq_len": r["t"], "config": r["config"],
             "cycles": r["cycles_v2_estimate"],
             "dram_bytes": r["dram_read_bytes"] + r["dram_write_bytes"],
             "ratio_vs_dense": r["cycles_ratio_vs_dense"]} for r in raw]


def _fmt(v, spec, missing="n/a"):
    return missing if v is None else format(v, spec)


def headline(results) -> dict:
    """The figures the README quotes: M3ViT-tiny and DeiT-tiny on zcu102 (per task)."""
    out = {}
    for r in results:
        if "error" in r or r["config"] != "zcu102":
            continue
        key = r["model"] + ("" if r.get("task") is None else f" task {r['task']}")
        out[key] = r
    return out


def readme_table(results) -> str:
    """The short results table of the README (generated from the bench records)."""
    lines = ["| model | preset | cycles | source | MAC util | ms @ clock | DRAM MB | "
             "cost model vs RTL | vs Edge-MoE |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['config']} | does not compile | | | | | | |")
            continue
        task = "" if r.get("task") is None else f" (task {r['task']})"
        err = r.get("model_error")
        moe = ""
        if r["model"].startswith("m3vit_tiny") and r["config"] == "zcu102":
            moe = f"{EDGE_MOE['cycles'] / r['cycles']:.2f}x fewer cycles"
        lines.append(
            f"| {r['model']}{task} | {r['config']} | {r['cycles']:,} | {r['cycles_source']} | "
            f"{100 * r['utilisation']:.1f} % | {r['latency_ms']:.2f} @ {r['clock_mhz']:g} MHz | "
            f"{r['dram_read_bytes'] / 1e6:.2f} | "
            f"{'' if err is None else f'{100 * err:+.2f} %'} | {moe} |")
    return "\n".join(lines)


def update_readme(table: str, path=README, stamp="") -> bool:
    """Replace the text between the bench markers of ``path`` with ``table`` (and a line saying
    where it comes from); False when the markers are missing."""
    text = Path(path).read_text()
    if README_BEGIN not in text or README_END not in text:
        return False
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    body = (f"{README_BEGIN}\n_Generated by `make bench` (vitamin/bench.py){stamp}; full report: "
            f"[bench/results/bench.md](bench/results/bench.md)._\n\n{table}\n{README_END}")
    Path(path).write_text(head + body + tail)
    return True


def markdown(meta, results, hardware, sparse) -> list[str]:
    lines = ["# vitamin benchmark results", "",
             f"Machine: {meta['cpu']} ({meta['cpu_count']} CPUs, shared), {meta['machine']}, "
             f"Python {meta['python']}, {meta['date']}. Cycles: the Verilator model of the v2 "
             "RTL where it ran (`source` RTL), else the cost model (compiler/cost.py, v2). MAC "
             "utilisation = useful MACs / (MACs per cycle x cycles).", ""]
    hd = headline(results)
    m3 = [r for k, r in hd.items() if k.startswith("m3vit_tiny")]
    if m3:
        lines += ["## M3ViT-tiny on zcu102 vs Edge-MoE", "",
                  f"Edge-MoE: {EDGE_MOE['latency_ms']} ms = {EDGE_MOE['cycles'] / 1e6:.1f} M "
                  f"cycles at {EDGE_MOE['clock_mhz']} MHz on {EDGE_MOE['macs']} MACs; ideal "
                  f"{EDGE_MOE['ideal_cycles'] / 1e6:.2f} M cycles "
                  f"({EDGE_MOE['model_macs'] / 1e6:.1f} M MACs / 256). Goal: >= 85 % MAC "
                  "utilisation (<= 3.6 M cycles).", "",
                  "| task | cycles | source | MAC util | ms @ 300 MHz | vs Edge-MoE | vs ideal | "
                  "DRAM read MB |", "|---|---|---|---|---|---|---|---|"]
        for r in m3:
            lines.append(f"| {r['task']} | {r['cycles']:,} | {r['cycles_source']} | "
                         f"{100 * r['utilisation']:.1f} % | {r['latency_ms']:.2f} | "
                         f"{EDGE_MOE['cycles'] / r['cycles']:.2f}x fewer cycles | "
                         f"{r['cycles'] / EDGE_MOE['ideal_cycles']:.2f}x | "
                         f"{r['dram_read_bytes'] / 1e6:.2f} |")
        lines.append("")
    lines += ["## Models", "",
              "| model | preset | compile s | cycles | source | MAC util | ms @ clock | DRAM MB "
              "| cost model | model vs RTL | RTL wall s | RTL cycles/s | golden s | ORT ms "
              "(CPU) | cosine vs ORT |", "|" + "---|" * 15]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['config']} | does not compile: "
                         f"{r['error'][:100]} |" + " |" * 13)
            continue
        task = "" if r.get("task") is None else f" t{r['task']}"
        err = r.get("model_error")
        lines.append(
            f"| {r['model']}{task} | {r['config']} | {r['compile_s']:.1f} | {r['cycles']:,} | "
            f"{r['cycles_source']} | {100 * r['utilisation']:.1f} % | {r['latency_ms']:.3f} @ "
            f"{r['clock_mhz']:g} | {r['dram_read_bytes'] / 1e6:.2f} | {r['model_cycles']:,} | "
            f"{'' if err is None else f'{100 * err:+.2f} %'} | {_fmt(r.get('rtl_wall_s'), '.0f')}"
            f" | {_fmt(r.get('rtl_cycles_per_s'), ',.0f')} | "
            f"{_fmt(r.get('golden_run_s'), '.2f')} | {_fmt(r.get('onnxruntime_ms'), '.2f')} | "
            f"{_fmt(r.get('cosine_vs_onnxruntime'), '.4f')} |")
    lines += ["", "ORT ms: onnxruntime (CPU provider) on this machine, float model, as a "
              "reference; the accelerator's ms are at its clock. Golden s: the bit-exact NumPy "
              "golden model's wall time for one inference.", ""]
    errs = [abs(r["model_error"]) for r in results if r.get("model_error") is not None]
    if errs:
        lines += [f"Cost model (v2) vs RTL: worst {100 * max(errs):.2f} % over {len(errs)} runs "
                  "(requirement: 5 %).", ""]
    lines += sparse
    if hardware:
        lines += ["## Hardware (v2 RTL, Verilator)", "",
                  "Long matmul: A resident, weight tiles streamed from DRAM double-buffered with "
                  "tokens (vitamin/sim/workloads.py); MAC busy = busy_matmul / cycles, from the "
                  "RTL counters. Resource estimate: vitamin/explore.py.", "",
                  "| preset | Verilog lines | Verilator build s | sim cycles/s | long matmul "
                  "cycles (model) | MAC busy | MAC util | bit-exact | resource estimate | "
                  "Yosys cells |", "|" + "---|" * 10]
        for r in hardware:
            syn = r.get("synth")
            top = sorted(syn["cells"].items(), key=lambda kv: -kv[1])[:6] if syn else []
            cells = "not run" if syn is None else (
                f"{syn['family']} ({syn['scope'][:60]}): " +
                ", ".join(f"{k} {v}" for k, v in top))
            est = r.get("resource_estimate")
            est_s = ", ".join(f"{k} {v:,}" for k, v in est.items()) if est else "n/a"
            lines.append(f"| {r['config']} | {r['verilog_lines']:,} | "
                         f"{r['verilator_build_s'] or 0:.0f} | {r['sim_cycles_per_s']:,.0f} | "
                         f"{r['long_matmul_cycles']:,} ({r['long_matmul_model_cycles']:,}) | "
                         f"{100 * r['mac_busy']:.2f}% | {100 * r['mac_utilisation']:.2f}% | "
                         f"{r['long_matmul_bit_exact']} | {est_s} | {cells} |")
        lines.append("")
    lines += ["Plots: [per-layer utilisation](layers.png), [roofline](roofline.png).", ""]
    return lines


def write_report(meta, results, hardware, sparse_rows_=()) -> list[str]:
    """bench.json, bench.md, the plots and the README table from the records."""
    OUT.mkdir(parents=True, exist_ok=True)
    sparse = sparse_attention_section(list(sparse_rows_))
    plot_layers([r for r in results if r["config"] == "zcu102"], OUT / "layers.png")
    plot_roofline(results, OUT / "roofline.png")
    (OUT / "bench.json").write_text(json.dumps({"meta": meta, "results": results,
                                                "hardware": hardware,
                                                "sparse_attention": list(sparse_rows_)},
                                               indent=1, default=float))
    lines = markdown(meta, results, hardware, sparse)
    (OUT / "bench.md").write_text("\n".join(lines) + "\n")
    update_readme(readme_table(results), stamp=f" on {meta['date'][:10]}, {meta['cpu']} "
                  f"({meta['cpu_count']} CPUs)")
    return lines


def main(argv=None) -> int:
    """``python -m vitamin.bench`` measures and writes the report; ``--from-json`` only renders
    the report again from bench/results/bench.json."""
    argv = sys.argv[1:] if argv is None else argv
    if "--from-json" in argv:
        d = json.loads((OUT / "bench.json").read_text())
        print("\n".join(write_report(d["meta"], d["results"], d["hardware"],
                                     d.get("sparse_attention") or sparse_rows())))
        return 0
    from vitamin.compiler.models import deit_tiny, export_onnx, m3vit_tiny
    OUT.mkdir(parents=True, exist_ok=True)
    rtl = os.environ.get("VITAMIN_BENCH_RTL", "1") != "0"
    results = []
    data = np.load(ROOT / "models" / "digits_data.npz")
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        m3 = export_onnx(m3vit_tiny(), Path(d) / "m3vit_tiny.onnx", dynamo=False)
        x = np.random.default_rng(1).standard_normal((1, 3, 128, 256)).astype(np.float32)
        for r in bench_model("m3vit_tiny", m3, "zcu102", None, x, tasks=(0, 1), rtl=rtl):
            r["export_s"] = time.perf_counter() - t0
            results.append(r)
        deit = export_onnx(deit_tiny(seed=0), Path(d) / "deit_tiny.onnx", dynamo=False)
        x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
        results += bench_model("deit_tiny", deit, "zcu102", None, x, rtl=rtl)
        # ecp5: the cost model only (an RTL run of ~10 M cycles of the ecp5 model is too long)
        results += bench_model("deit_tiny", deit, "ecp5", None, x, rtl=False, golden=False)
    digits = ROOT / "models" / "digits_vit.onnx"
    results += bench_model("digits_vit", digits, "tiny", {"input": data["x_cal"]},
                           data["x_test"][:1])
    cal = [{"input": xi[None], "task": np.array(i % 2)} for i, xi in enumerate(data["x_cal"])]
    results += bench_model("digits_moe", ROOT / "models" / "digits_moe.onnx", "tiny", cal,
                           data["x_test"][:1], tasks=(0, 1))
    hardware = []
    if os.environ.get("VITAMIN_BENCH_HW", "1") != "0":
        # Yosys on the larger presets takes hours under the WebAssembly build: tiny by default
        synth = os.environ.get("VITAMIN_BENCH_SYNTH", "tiny")
        synth = {"0": (), "1": ("tiny", "ecp5", "zcu102"), "all": ("tiny", "ecp5", "zcu102")}.get(
            synth, tuple(synth.split(",")))
        for preset in ("tiny", "ecp5", "zcu102"):
            r = bench_hardware(preset, synth=preset in synth)
            hardware.append(r)
            print(json.dumps(r), flush=True)
    meta = {"machine": platform.platform(), "cpu": _cpu_name(),
            "python": sys.version.split()[0], "cpu_count": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "edge_moe_reference": EDGE_MOE}
    lines = write_report(meta, results, hardware, sparse_rows())
    print("\n".join(lines))
    print(f"written: {OUT / 'bench.json'}, {OUT / 'bench.md'}, layers.png, roofline.png; "
          f"README table updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
