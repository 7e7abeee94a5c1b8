"""The public Python API: compile a model, run a program, compare with onnxruntime.

>>> import vitamin
>>> prog = vitamin.compile("model.onnx", "ecp5")
>>> prog.save("model.vit")
>>> out = vitamin.run(prog, {"input": x})          # float in, float out
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .config import get_config
from .program import Program

__all__ = ["compile", "run", "RunOutput", "quantize_inputs", "load_calibration", "compare",
           "BACKENDS", "task_regs"]

BACKENDS = ("golden", "rtl")


def load_calibration(path) -> list:
    """Calibration samples from an ``.npz`` file: one array per graph input name, with the
    samples stacked along a new leading axis (or a single sample without it)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{path}: no such calibration file")
    try:
        data = dict(np.load(p))
    except Exception as e:  # noqa: BLE001 - numpy raises many types for a bad file
        raise ValueError(f"{path}: not a readable .npz file ({e})") from None
    return data


def task_regs(program: Program, inputs: dict, task=None, regs=None) -> tuple[dict, dict]:
    """Split the task index off the inputs of a multi-task program.

    Returns ``(inputs without the task, registers)``: the task (``task``, or the model's task
    input in ``inputs``) goes to the program's task register. One program serves every task;
    only the registers change.
    """
    meta = program.meta.get("task")
    inputs = dict(inputs)
    regs = dict(regs or {})
    if meta is None:
        if task is not None:
            raise ValueError(f"the program {program.meta.get('model', '')!r} has no task input; "
                             f"it is not a multi-task model")
        return inputs, regs
    given = inputs.pop(meta["input"], None)
    if task is None:
        task = given
    if task is None:
        raise ValueError(f"the program is multi-task: give the task (0..{meta['tasks'] - 1}) "
                         f"with --task or as the input {meta['input']!r}")
    arr = np.asarray(task)
    if arr.size != 1 or not (np.issubdtype(arr.dtype, np.integer) or
                             float(arr.reshape(-1)[0]).is_integer()):
        raise ValueError(f"task must be one integer, not {task!r}")
    t = int(arr.reshape(-1)[0])
    if not 0 <= t < meta["tasks"]:
        raise ValueError(f"task {t} out of range: the program has tasks 0..{meta['tasks'] - 1}")
    regs[meta["register"]] = t
    return inputs, regs


def _samples_from(graph, data) -> list:
    if isinstance(data, list):
        return data
    missing = [n for n in graph.inputs if n not in data]
    if missing:
        raise ValueError(f"calibration data lacks input(s) {', '.join(missing)}; it has "
                         f"{', '.join(data) or 'nothing'}")
    out = []
    first = data[graph.inputs[0]]
    shape = tuple(graph.shape(graph.inputs[0]))
    n = 1 if tuple(first.shape) == shape else first.shape[0]
    for i in range(n):
        smp = {}
        for name in graph.inputs:
            arr = np.asarray(data[name])
            want = tuple(graph.shape(name))
            smp[name] = arr.reshape(want) if tuple(arr.shape) == want else \
                arr[i].reshape(want)
        out.append(smp)
    return out


def compile(model, config, calibration=None, *, input_shapes=None, name=None,
            progress=None, block=None) -> Program:
    """Compile an ONNX model (path or ``onnx.ModelProto``) for ``config`` (preset or Config).

    ``calibration`` is a dict {input name: array of samples} (as in an .npz file), a list of
    {input name: array} samples, or None for the documented default (8 samples of N(0, 1)).
    ``progress(stage, seconds)`` is called after each stage (import, passes, calibration,
    lowering, quantisation report). A model that is one long-context ONNX Attention (dense,
    static mask, block top-k; :mod:`vitamin.compiler.sparse`) is compiled as an attention kernel
    with query blocks of ``block`` rows (default 128, or T when shorter).
    """
    import time
    t0 = [time.perf_counter()]

    def step(stage):
        if progress is not None:
            now = time.perf_counter()
            progress(stage, now - t0[0])
            t0[0] = now

    from .compiler import frontend, passes
    from .compiler.lower import lower
    from .compiler.quantize import calibrate, default_calibration

    cfg = get_config(config)
    from .compiler import sparse
    kern = sparse.recognize(model, block=block) if isinstance(model, (str, Path)) or \
        hasattr(model, "graph") else None
    if kern is not None:        # a long-context attention kernel (compiler/sparse.py)
        step(f"recognised {kern.mode} attention ({kern.t} tokens, {kern.heads} heads)")
        cal = None
        if calibration is not None:
            keys = "qkv" if kern.mode != "dhsa" else ("q", "k", "v", "boundaries")
            cal = [{x: np.asarray(smp[x]).reshape(kern.t, -1) if x != "boundaries"
                    else np.asarray(smp[x]) for x in keys}
                   for smp in (calibration if isinstance(calibration, list) else
                               [{x: np.asarray(calibration[x])[i] for x in keys}
                                for i in range(len(calibration["q"]))])]
        prog = sparse.compile_kernel(kern, cfg, cal)
        prog.meta["model"] = name or (Path(model).stem if isinstance(model, (str, Path))
                                      else kern.name)
        step(f"lowered to {prog.n_instr} instructions")
        return prog
    graph = frontend.load_onnx(model, input_shapes=input_shapes)
    step(f"imported ONNX ({len(graph.nodes)} nodes)")
    graph = passes.run_pipeline(graph)
    step(f"passes ({len(graph.nodes)} canonical nodes)")
    samples = default_calibration(graph) if calibration is None else \
        _samples_from(graph, calibration)
    plan = calibrate(graph, samples, cfg, evaluate=_evaluator())
    step(f"calibrated on {len(samples)} samples")
    label = name or (Path(model).stem if isinstance(model, (str, Path)) else graph.name)
    prog = lower(graph, cfg, plan, name=label)
    step(f"lowered to {prog.n_instr} instructions")
    prog.meta["quant_report"] = quant_report(prog, graph, samples[0])
    step("measured per-layer quantisation error")
    return prog


def quant_report(prog, graph, sample) -> list:
    """Per layer: saturation events and error of its quantised result against float, measured
    by running the golden model on one calibration sample (scratchpad snapshots at the layer
    boundaries) next to the float graph."""
    from .golden.isasim import simulate
    env = _evaluator()(graph, sample, keep=True)
    img = prog.dram_image()
    ins, regs = task_regs(prog, {n: sample[n] for n in graph.inputs})
    for name, v in quantize_inputs(prog, ins).items():
        prog.write_tensor(img, name, v)
    res = simulate(prog.config, img, prog.n_instr, regs=regs, snapshot_spad=True)
    if not res.ok:
        raise ValueError(f"the compiled program faults on a calibration sample: {res.message}")
    layers = prog.meta.get("layers", [])
    snaps = {}
    for lid, snap in res.marks:
        snaps.setdefault(lid, snap)
    end = snaps.get(0xFFFE)
    rep = []
    prev_sat = 0
    for i, layer in enumerate(layers):
        after = snaps.get(i + 1, end) if i + 1 < len(layers) else end
        if after is None:
            continue
        entry = {"layer": i, "name": layer["name"], "op": layer["op"],
                 "sat_events": int(after["sat_events"] - prev_sat)}
        prev_sat = after["sat_events"]
        out = layer.get("out")
        if out and out["value"] in env:
            ref = np.asarray(env[out["value"]], dtype=np.float64).reshape(out["rows"], -1)
            idx = out["addr"] + np.arange(out["rows"])[:, None] * out["stride"] + \
                np.arange(out["cols"])[None, :]
            got = after["spad"][idx] * out["scale"]
            amax = float(np.abs(ref).max()) or 1.0
            entry["max_abs_err"] = float(np.abs(got - ref).max())
            entry["rel_err"] = entry["max_abs_err"] / amax
        rep.append(entry)
    return rep


def _evaluator():
    from .compiler import passes
    return passes.evaluate_graph


@dataclass
class RunOutput:
    outputs: dict                       # name -> float array (dequantised)
    raw: dict                           # name -> integer array
    counters: dict = field(default_factory=dict)
    cycles: int | None = None
    result: object = None


def quantize_inputs(program: Program, inputs: dict) -> dict:
    """Float inputs -> integers at each input symbol's scale (round half to even, saturate)."""
    out = {}
    names = [s.name for s in program.inputs]
    for name in names:
        if name not in inputs:
            raise ValueError(f"missing input {name!r}; the program's inputs are "
                             f"{', '.join(names)}")
    index_inputs = program.meta.get("index_inputs", {})
    for name, v in inputs.items():
        sym = program.symbol(name)
        if sym.kind != "input":
            raise ValueError(f"{name!r} is not an input of the program")
        if name in index_inputs:        # chunk starts -> index-memory entries (start, 0)
            out[name] = _index_entries(name, v, sym, index_inputs[name])
            continue
        v = np.asarray(v, dtype=np.float64)
        if v.size != int(np.prod(sym.shape)):
            raise ValueError(f"input {name!r}: shape {v.shape} does not match the program's "
                             f"{tuple(sym.shape)}")
        if not np.isfinite(v).all():
            raise ValueError(f"input {name!r} holds non-finite values")
        info = np.iinfo({"i8": np.int8, "u8": np.uint8, "i16": np.int16,
                         "i32": np.int32}[sym.dtype])
        q = np.clip(np.rint(v / sym.scale), info.min, info.max).astype(np.int64)
        out[name] = q.reshape(sym.shape)
    return out


def _index_entries(name, v, sym, info):
    b = np.asarray(v).reshape(-1)
    n = int(sym.shape[0])
    if b.size != n or not np.all(np.equal(np.mod(b, 1), 0)):
        raise ValueError(f"input {name!r}: {n} integer chunk starts expected, got shape "
                         f"{np.shape(v)}")
    b = b.astype(np.int64)
    if b[0] != 0 or np.any(np.diff(b) <= 0) or b[-1] >= info["seq"]:
        raise ValueError(f"input {name!r}: chunk starts must begin at 0 and ascend strictly "
                         f"below {info['seq']}, not {b.tolist()[:8]}...")
    return np.stack([b, np.zeros_like(b)], axis=1)


def run(program, inputs: dict, backend: str = "golden", *, task=None, regs=None, trace=False,
        **backend_options) -> RunOutput:
    """Run ``program`` (Program or path) on float ``inputs``; returns dequantised outputs.

    ``task`` selects the task of a multi-task program (or give the model's task input in
    ``inputs``). A hardware fault raises :class:`vitamin.golden.isasim.Fault` naming the
    instruction.
    """
    if not isinstance(program, Program):
        program = Program.load(program)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; backends: {', '.join(BACKENDS)}")
    inputs, regs = task_regs(program, inputs, task, regs)
    q = quantize_inputs(program, inputs)
    if backend == "golden":
        from .golden.isasim import run_program
        res, raw = run_program(program, q, regs=regs, trace=trace)
        res.check()
        outs = {name: raw[name].astype(np.float64) * program.symbol(name).scale for name in raw}
        return RunOutput(outputs=outs, raw=raw, counters=res.counters, result=res)
    try:
        from .sim import rtl_backend
    except ImportError:
        raise ValueError("the rtl backend is not available in this version: the accelerator "
                         "gateware (hw/) is not complete yet; use --backend golden") from None
    return rtl_backend.run(program, q, regs=regs, trace=trace, **backend_options)


def compare(outputs: dict, reference: dict, classifier: bool | None = None) -> dict:
    """Per output: max abs error, cosine similarity, and top-1 agreement for classifiers."""
    rep = {}
    for name, ref in reference.items():
        if name not in outputs:
            raise ValueError(f"reference output {name!r} missing from the accelerator outputs")
        y = np.asarray(outputs[name], dtype=np.float64)
        r = np.asarray(ref, dtype=np.float64)
        if y.size != r.size:
            raise ValueError(f"output {name!r}: accelerator shape {y.shape} vs reference "
                             f"{r.shape}")
        y = y.reshape(r.shape)
        nrm = np.linalg.norm(y) * np.linalg.norm(r)
        entry = {"max_abs_err": float(np.abs(y - r).max()),
                 "cosine": float((y.ravel() @ r.ravel()) / nrm) if nrm > 0 else
                 float(np.array_equal(y, r)),
                 "finite": bool(np.isfinite(y).all())}
        is_cls = classifier if classifier is not None else (r.ndim <= 2 and r.shape[-1] > 1
                                                            and r.size == r.shape[-1])
        if is_cls:
            entry["top1_agreement"] = float(np.argmax(y.reshape(-1, r.shape[-1]), axis=-1)[0]
                                            == np.argmax(r.reshape(-1, r.shape[-1]), axis=-1)[0])
        rep[name] = entry
    return rep
