"""Backend (calibration, quantisation, lowering, cost model) on IR graphs built in NumPy."""

import numpy as np
import pytest

from vitamin import get_config
from vitamin.compiler import ir, toy
from vitamin.compiler.cost import estimate
from vitamin.compiler.lower import lower
from vitamin.compiler.quantize import calibrate, default_calibration
from vitamin.golden.isasim import check_tokens, decode_program, run_program
from vitamin.isa import Opcode


def _compile(cfg_name, **kw):
    cfg = get_config(cfg_name)
    g = toy.vit_graph(**kw)
    plan = calibrate(g, default_calibration(g, 4), cfg)
    return g, lower(g, cfg, plan)


def _run(g, prog, x):
    s = prog.symbol("image").scale
    xq = np.clip(np.round(x / s), -32768, 32767).astype(np.int64)
    res, outs = run_program(prog, {"image": xq})
    assert res.ok, res.message
    out = g.outputs[0]
    return res, outs[out] * prog.symbol(out).scale


@pytest.mark.parametrize("cfg_name,kw", [
    ("tiny", dict(img=8, patch=2, chans=1, dim=16, depth=2, heads=2)),
    ("tiny", dict(img=8, patch=4, chans=1, dim=32, depth=1, heads=4, mlp=4)),
    ("ecp5", dict(img=16, patch=4, chans=3, dim=64, depth=2, heads=2, mlp=4)),
])
def test_toy_vit_matches_float(cfg_name, kw):
    g, prog = _compile(cfg_name, **kw)
    rng = np.random.default_rng(3)
    for _ in range(3):
        x = rng.standard_normal(g.shape("image"))
        ref = ir.evaluate(g, {"image": x})[g.outputs[0]]
        res, y = _run(g, prog, x)
        cos = float(y.ravel() @ ref.ravel() / np.linalg.norm(y) / np.linalg.norm(ref))
        assert cos >= 0.999, cos
        assert y.argmax() == ref.argmax()
        assert res.counters["sat_events"] == 0


def test_macs_and_tokens():
    g, prog = _compile("tiny", img=8, patch=2, chans=1, dim=16, depth=2, heads=2)
    # every MAC of the float graph is executed once, no more
    t, dim, hid = 17, 16, 32
    expect = 16 * 4 * dim + 2 * (t * dim * 3 * dim + 2 * t * t * dim + t * dim * dim
                                 + 2 * t * dim * hid) + dim * 10
    res, _ = _run(g, prog, np.zeros(g.shape("image")))
    assert res.counters["macs"] == expect
    instrs = decode_program(prog.dram_image(), prog.n_instr)
    check_tokens(instrs, prog.config)      # raises on a deadlock or unbalanced tokens
    # weights are read from DRAM exactly once
    wbytes = sum(np.prod(v.const.shape) for v in g.values.values()
                 if v.is_const and v.name.endswith(".w"))
    loads = [f for op, f in instrs if op == Opcode.LOAD and f["dtype"].name == "I8"]
    assert sum(f["run"] * f["n0"] * f["n1"] * f["n2"] for f in loads) == wbytes


def test_cost_model_agrees_with_simulator_counters():
    g, prog = _compile("ecp5", img=16, patch=4, chans=3, dim=64, depth=2, heads=2, mlp=4)
    res, _ = _run(g, prog, np.zeros(g.shape("image")))
    est = estimate(prog)
    assert est.macs == res.counters["macs"]
    assert est.dram_read_bytes == res.counters["dram_read_bytes"]
    assert est.dram_write_bytes == res.counters["dram_write_bytes"]
    assert 0 < est.utilisation(prog.config) <= 1
    assert est.cycles >= max(est.busy.values())
    assert sum(layer["macs_executed"] for layer in est.layers) == est.macs


def test_weight_loads_overlap_compute():
    """The double-buffered weight stream: most of the LOAD module's busy time overlaps COMPUTE's
    busy time on the cost model's timeline (weights of tile t+2 load while tile t+1 computes)."""
    g, prog = _compile("zcu102", img=128, patch=16, chans=3, dim=192, depth=2, heads=3, mlp=4)
    est = estimate(prog, machine="v2")    # the decoupled machine the compiler targets
    instrs = decode_program(prog.dram_image(), prog.n_instr)
    comp = [(est.starts[pc], est.ends[pc]) for pc, (op, _) in enumerate(instrs)
            if op not in (Opcode.LOAD, Opcode.STORE)]
    loads = [(est.starts[pc], est.ends[pc]) for pc, (op, f) in enumerate(instrs)
             if op == Opcode.LOAD and f["pop_next"]]
    assert loads
    busy = sum(b - a for a, b in loads)
    overlap = sum(max(0, min(b, d) - max(a, c)) for a, b in loads for c, d in comp)
    assert overlap >= 0.8 * busy, (overlap, busy)


def test_too_large_model_is_rejected_with_sizes():
    g = toy.vit_graph(img=32, patch=2, chans=3, dim=128, depth=1, heads=2, mlp=4)
    cfg = get_config("tiny")
    plan = calibrate(g, default_calibration(g, 1), cfg)
    with pytest.raises(ir.CompileError, match="too large for the configuration"):
        lower(g, cfg, plan)
