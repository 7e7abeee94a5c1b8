"""Subcommands ``compile``, ``run`` and ``report`` (registered in :mod:`vitamin.cli`)."""

from __future__ import annotations

import json
import sys
import time

import numpy as np

from .cli import command


def _parse_shapes(items):
    shapes = {}
    for it in items or []:
        if "=" not in it:
            raise ValueError(f"--input-shape {it!r}: expected NAME=D0,D1,...")
        name, dims = it.split("=", 1)
        try:
            shapes[name] = tuple(int(d) for d in dims.replace("x", ",").split(","))
        except ValueError:
            raise ValueError(f"--input-shape {it!r}: dimensions must be integers") from None
    return shapes


def _compile_args(p):
    p.add_argument("model", help="ONNX model file")
    p.add_argument("--config", default="ecp5", help="configuration preset (default: ecp5)")
    p.add_argument("-o", "--output", help="program file to write (default: MODEL.vit)")
    p.add_argument("--calibration", help=".npz with sample inputs, keyed by input name")
    p.add_argument("--input-shape", action="append", metavar="NAME=D0,D1,...",
                   help="static shape for an input with symbolic dimensions")


@command("compile", "compile an ONNX model to a vitamin program", arguments=_compile_args)
def _compile(args):
    from pathlib import Path

    from . import api
    t0 = time.time()
    cal = api.load_calibration(args.calibration) if args.calibration else None
    prog = api.compile(args.model, args.config, cal, input_shapes=_parse_shapes(args.input_shape),
                       progress=lambda stage, dt: print(f"  {stage} ({dt:.1f} s)", flush=True))
    out = args.output or str(Path(args.model).with_suffix(".vit"))
    prog.save(out)
    dt = time.time() - t0
    layers = prog.meta.get("layers", [])
    qrep = {e["layer"]: e for e in prog.meta.get("quant_report", [])}
    print(f"{'#':>4} {'layer':<36} {'op':<10} {'MMACs':>9} {'sat':>5} {'max err':>9} "
          f"{'rel err':>8}")
    for i, layer in enumerate(layers):
        q = qrep.get(i, {})
        err = f"{q['max_abs_err']:>9.2e} {q['rel_err']:>8.1e}" if "max_abs_err" in q else \
            f"{'':>9} {'':>8}"
        print(f"{i:>4} {layer['name'][:36]:<36} {layer['op']:<10} {layer['macs'] / 1e6:>9.3f} "
              f"{q.get('sat_events', 0):>5} {err}")
    print("(sat: saturation events, err: quantised result vs float, on one calibration sample)")
    total = sum(layer["macs"] for layer in layers)
    print(f"compiled {args.model} for {prog.config.name} in {dt:.1f} s: {prog.n_instr} "
          f"instructions, {total / 1e6:.1f} M MACs, {len(prog.consts) / 1024:.0f} KiB constants, "
          f"DRAM window {prog.dram_size / 1024:.0f} KiB -> {out}")
    return 0


def _run_args(p):
    p.add_argument("program", help="program file (.vit)")
    p.add_argument("--input", help=".npz with the inputs, keyed by input name (default: random)")
    p.add_argument("--backend", default="golden", choices=["golden", "rtl"])
    p.add_argument("--device", help="run on a device through the host runtime instead of a "
                   "backend: sim (golden board model), sim:rtl (Verilated board: UART bridge + "
                   "accelerator + SDRAM model), serial:/dev/ttyUSB0[@BAUD], zynq")
    p.add_argument("--timeout", type=float, default=30.0,
                   help="seconds to wait for the device (with --device)")
    p.add_argument("--compare", metavar="MODEL.onnx",
                   help="also run onnxruntime on the same input and report the agreement")
    p.add_argument("--task", type=int, help="task index (multi-task models)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random input")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--trace", action="store_true", help="record/compare after every instruction")
    p.add_argument("--vcd", help="waveform file (rtl backend)")


def _onnx_reference(model, inputs):
    import onnxruntime as ort
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    feeds = {}
    for i in sess.get_inputs():
        if i.name not in inputs:
            raise ValueError(f"--compare: the model's input {i.name!r} is not in the program")
        v = np.asarray(inputs[i.name])
        dt = np.float32 if "float" in i.type else np.int64
        feeds[i.name] = v.astype(dt)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


def _program_inputs(prog, args) -> dict:
    """Inputs from ``--input`` (.npz) or random N(0, 1) with ``--seed``; the task input of a
    multi-task program is taken from the file when it is there."""
    from . import api
    task = prog.meta.get("task", {}).get("input")
    if getattr(args, "input", None):
        data = api.load_calibration(args.input)
        missing = [s.name for s in prog.inputs if s.name not in data]
        if missing:
            raise ValueError(f"{args.input}: missing input(s) {', '.join(missing)}; the file "
                             f"has {', '.join(data) or 'nothing'}")
        inputs = {s.name: data[s.name] for s in prog.inputs}
        if task and task in data:
            inputs[task] = data[task]
        return inputs
    rng = np.random.default_rng(getattr(args, "seed", 0))
    return {s.name: rng.standard_normal(s.shape) for s in prog.inputs}


@command("run", "run a program on the golden model or the RTL simulation", arguments=_run_args)
def _run(args):
    from . import api
    from .program import Program
    prog = Program.load(args.program)
    inputs = _program_inputs(prog, args)
    _, regs = api.task_regs(prog, inputs, args.task)
    opts = {"vcd": args.vcd} if args.vcd else {}
    t0 = time.time()
    if args.device:
        from .runtime import run_on_device
        out = run_on_device(prog, inputs, args.device, task=args.task, timeout=args.timeout)
    else:
        out = api.run(prog, inputs, backend=args.backend, task=args.task, trace=args.trace,
                      **opts)
    wall = time.time() - t0
    where = f"device {args.device}" if args.device else args.backend
    report = {"backend": where, "wall_s": wall, "cycles": out.cycles, **out.counters}
    status = 0
    if args.compare:
        feeds = dict(inputs)
        if prog.meta.get("task"):
            feeds[prog.meta["task"]["input"]] = np.array(regs[prog.meta["task"]["register"]],
                                                         dtype=np.int64)
        ref = _onnx_reference(args.compare, feeds)
        cmp = api.compare(out.outputs, ref)
        report["compare"] = cmp
        for name, c in cmp.items():
            for k in ("max_abs_err", "cosine", "top1_agreement"):
                if k in c:
                    report.setdefault(k, c[k])
            if not c["finite"]:
                status = 1
    for name, v in out.outputs.items():
        if not np.isfinite(v).all():
            status = 1
    if args.json:
        report["outputs"] = {k: np.asarray(v).tolist() for k, v in out.outputs.items()}
        json.dump(report, sys.stdout)
        print()
    else:
        print(f"ran {args.program} on {where} in {wall:.2f} s")
        for k, v in report.items():
            if k not in ("compare", "backend", "wall_s") and v is not None:
                print(f"  {k:<20} {v}")
        for name, v in out.outputs.items():
            flat = np.asarray(v).ravel()
            print(f"  output {name} {tuple(np.shape(v))}: "
                  f"{np.array2string(flat[:10], precision=4)}{' ...' if flat.size > 10 else ''}")
        for name, c in report.get("compare", {}).items():
            print(f"  vs onnxruntime {name}: max_abs_err {c['max_abs_err']:.4g} cosine "
                  f"{c['cosine']:.6f}" + (f" top1 {c['top1_agreement']:.0f}"
                                          if "top1_agreement" in c else ""))
    return status


def _report_args(p):
    p.add_argument("program", help="program file (.vit)")
    p.add_argument("--clock", type=float, help="clock in MHz (default: the preset's nominal clock)")
    p.add_argument("--html", metavar="DIR", help="write report.html, report.json and a PNG plot")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--input", help="data-dependent programs (MoE): .npz input to profile "
                   "(default: random with --seed)")
    p.add_argument("--task", type=int, help="task of a multi-task program (default 0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random profiling input")


def build_report(prog, clock_mhz=None, inputs=None, task=None) -> dict:
    """Per-layer cycles, MACs, utilisation and DRAM bytes from the cost model of the default
    hardware (v2, decoupled LOAD/COMPUTE/STORE: within 0.2 % of the RTL on every benchmark
    model); ``v1_cycles``: the sequential machine (``issue="v1"`` builds, cycle-exact).

    A program whose timing depends on its data (MoE routing) is first run on the golden model
    with ``inputs`` (float, default N(0, 1)) and ``task`` (default 0) to learn its expert queues
    and skipped instructions; the report then has a ``moe`` section per MoE layer."""
    from . import api
    from .compiler.cost import estimate, profile_program
    from .compiler.moe import moe_summary
    cfg = prog.config
    prof = None
    if prog.meta.get("moe"):
        if inputs is None:
            rng = np.random.default_rng(0)
            inputs = {s.name: rng.standard_normal(s.shape) for s in prog.inputs}
        if prog.meta.get("task") and task is None and \
                prog.meta["task"]["input"] not in inputs:
            task = 0
        ins, regs = api.task_regs(prog, inputs, task)
        prof = profile_program(prog, api.quantize_inputs(prog, ins), regs)
    est = estimate(prog, prof)
    clk = clock_mhz or cfg.clock_mhz
    extra = {}
    if prof is not None:
        extra["moe"] = moe_summary(prog, prof)
        extra["task"] = regs.get(prog.meta["task"]["register"]) if prog.meta.get("task") \
            else None
    return {**extra,
        "model": prog.meta.get("model", ""), "config": cfg.name, "clock_mhz": clk,
        "cycles": est.cycles, "macs": est.macs, "utilisation": est.utilisation(cfg),
        "latency_ms": est.cycles / (clk * 1e3), "images_per_s": clk * 1e6 / max(est.cycles, 1),
        "dram_read_bytes": est.dram_read_bytes, "dram_write_bytes": est.dram_write_bytes,
        "busy": est.busy, "layers": est.layers, "machine": est.machine,
        "v2_cycles": est.v2_cycles, "v1_cycles": est.v1_cycles,
        "source": ("cost model of the v1 RTL (sequential issue, cycle-exact)" if est.machine ==
                   "v1" else "cost model of the v2 RTL (decoupled modules)") +
        " (compiler/cost.py)",
    }


def _plot(rep, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    layers = [lay for lay in rep["layers"] if lay["macs_executed"]]
    fig, ax = plt.subplots(figsize=(max(6, 0.18 * len(layers)), 3.5))
    ax.bar(range(len(layers)), [100 * lay["utilisation"] for lay in layers])
    ax.set_xticks(range(len(layers)))
    ax.set_xticklabels([lay["name"] for lay in layers], rotation=90, fontsize=6)
    ax.set_ylabel("MAC utilisation (%)")
    ax.set_ylim(0, 105)
    ax.set_title(f"{rep['model']} on {rep['config']}: {100 * rep['utilisation']:.1f}% overall")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@command("report", "per-layer performance report of a program (cost model)",
         arguments=_report_args)
def _report(args):
    from pathlib import Path

    from .program import Program
    prog = Program.load(args.program)
    inputs = _program_inputs(prog, args) if prog.meta.get("moe") else None
    rep = build_report(prog, args.clock, inputs, args.task)
    if args.html:
        d = Path(args.html)
        d.mkdir(parents=True, exist_ok=True)
        (d / "report.json").write_text(json.dumps(rep, indent=1))
        _plot(rep, d / "utilisation.png")
        rows = "".join(
            f"<tr><td>{i}</td><td>{lay['name']}</td><td>{lay['op']}</td><td>{lay['cycles']}</td>"
            f"<td>{lay['macs_executed']}</td><td>{100 * lay['utilisation']:.1f}</td>"
            f"<td>{lay['dram_bytes']}</td></tr>" for i, lay in enumerate(rep["layers"]))
        (d / "report.html").write_text(
            f"<html><body><h1>{rep['model']} on {rep['config']}</h1>"
            f"<p>{rep['cycles']} cycles, {100 * rep['utilisation']:.1f}% MAC utilisation, "
            f"{rep['latency_ms']:.3f} ms at {rep['clock_mhz']} MHz ({rep['source']})</p>"
            f"<img src='utilisation.png'><table border=1><tr><th>#</th><th>layer</th><th>op</th>"
            f"<th>cycles</th><th>MACs</th><th>util %</th><th>DRAM bytes</th></tr>{rows}</table>"
            f"</body></html>")
    if args.json:
        json.dump(rep, sys.stdout)
        print()
        return 0
    print(f"{rep['model']} on {rep['config']} ({rep['source']})")
    print(f"{'#':>4} {'layer':<32} {'op':<10} {'cycles':>10} {'MMACs':>9} {'util%':>6} "
          f"{'DRAM KiB':>9}")
    for i, lay in enumerate(rep["layers"]):
        print(f"{i:>4} {lay['name'][:32]:<32} {lay['op']:<10} {lay['cycles']:>10} "
              f"{lay['macs_executed'] / 1e6:>9.3f} {100 * lay['utilisation']:>6.1f} "
              f"{lay['dram_bytes'] / 1024:>9.1f}")
    print(f"total: {rep['cycles']} cycles, {rep['macs'] / 1e6:.1f} M MACs, "
          f"{100 * rep['utilisation']:.1f}% MAC utilisation, {rep['latency_ms']:.3f} ms "
          f"({rep['images_per_s']:.1f} images/s) at {rep['clock_mhz']} MHz; DRAM read "
          f"{rep['dram_read_bytes'] / 1024:.0f} KiB")
    if rep.get("v1_cycles"):
        print(f"sequential v1 machine (issue='v1' builds): {rep['v1_cycles']} cycles "
              f"({rep['v1_cycles'] / (rep['clock_mhz'] * 1e3):.3f} ms)")
    for m in rep.get("moe", []):
        load = " ".join(str(e["tokens"]) for e in m["experts"])
        print(f"MoE {m['name']} (task {rep['task']}): {m['active_experts']}/{m['n_experts']} "
              f"experts ran, tokens per expert [{load}]; expert weights read "
              f"{m['expert_weight_bytes_read'] / 1024:.1f} KiB (routing predicts "
              f"{m['expected_expert_weight_bytes'] / 1024:.1f} KiB), gate "
              f"{m['gate_weight_bytes'] / 1024:.1f} KiB, activations 0 (on chip); naive "
              f"per-token expert fetch {m['naive_per_token_weight_bytes'] / 1024:.1f} KiB = "
              f"{m['traffic_reduction']:.1f}x more")
    if args.html:
        print(f"report written to {args.html}/report.html")
    return 0


def _demo_args(p):
    p.add_argument("--config", default="tiny", help="preset (default: tiny)")
    p.add_argument("--limit", type=int, default=0, help="only the first N test images")
    p.add_argument("--no-moe", action="store_true", help="skip the two-task MoE model")


@command("demo", "the main job on the shipped digits ViT and two-task MoE ViT (make demo)",
         arguments=_demo_args)
def _demo(args):
    from . import demo
    argv = ["--config", args.config] + (["--limit", str(args.limit)] if args.limit else []) + \
        (["--no-moe"] if args.no_moe else [])
    return demo.main(argv)


#: Extra lint waivers for the whole accelerator, all of them properties of generated code: range
#: checks that a small preset makes constant (CMPCONST, UNSIGNED: e.g. ``k <= 15`` on a 4-bit
#: field) and Amaranth's constant-driven ``always @*`` blocks (ALWNEVER). Errors are never waived.
LINT_WAIVERS = ("ALWNEVER", "CMPCONST", "UNSIGNED")


def _rtl_args(p):
    p.add_argument("--config", default="ecp5", help="configuration preset (default: ecp5)")
    p.add_argument("-o", "--output", default="accel.v", help="Verilog file to write")
    p.add_argument("--no-lint", action="store_true", help="skip `verilator --lint-only`")


@command("rtl", "write the Verilog of the whole accelerator and lint it", arguments=_rtl_args)
def _rtl(args):
    import subprocess
    from pathlib import Path

    from .config import get_config
    cfg = get_config(args.config)
    from .hw.accel import Accelerator
    from .sim.verilator import VERILATOR_WARNINGS_OFF, ensure_verilator_on_path, write_verilog
    t0 = time.time()
    out = Path(args.output)
    name = out.stem.replace("-", "_") or "vitamin_accel"
    path = write_verilog(Accelerator(cfg), out.parent if str(out.parent) else ".", name=name)
    if path != out:
        path.replace(out)
        path = out
    text = path.read_text()
    print(f"{path}: {len(text.splitlines())} lines of Verilog, {len(text) / 1024:.0f} KiB, "
          f"module {name} for preset {cfg.name} ({cfg.rows}x{cfg.cols} MACs), "
          f"{time.time() - t0:.1f} s")
    if args.no_lint:
        return 0
    exe = ensure_verilator_on_path()
    waived = (*VERILATOR_WARNINGS_OFF, *LINT_WAIVERS)
    cmd = [exe, "--lint-only", *[f"-Wno-{w}" for w in waived], str(path)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        print(r.stderr[-4000:], file=sys.stderr)
        raise ValueError(f"verilator --lint-only failed on {path} (exit {r.returncode})")
    print(f"verilator --lint-only: clean (waived warnings of generated code: "
          f"{', '.join(waived)})")
    return 0
