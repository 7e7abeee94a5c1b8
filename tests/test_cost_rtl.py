"""The v1 cost model (compiler/cost.py, ``machine="v1"``) against the Verilator model of the v1 RTL.

The accelerator's default issue scheme is v2 (decoupled modules; its model is tested in
tests/test_cost_v2.py); the exact cycle model of the sequential machine is the one of the v1
elaboration (``Accelerator(issue="v1")``), which is what this file builds.

Every program runs once on the RTL (one simulator process for all of them; the build is cached
under build/rtl/). The model is exact: its total must equal the RTL's ``cycles`` counter, and
its predicted counters (``fetch_cycles``, ``busy_<op>``, instruction counts) must equal the
RTL's (a model that is a cycle off on one unit fails here, not only a 5 % error).
"""

from pathlib import Path

import numpy as np
import pytest

import vitamin
from vitamin import get_config
from vitamin.api import quantize_inputs
from vitamin.compiler import toy
from vitamin.compiler.cost import estimate, profile_program
from vitamin.compiler.lower import lower
from vitamin.compiler.quantize import calibrate, default_calibration
from vitamin.golden.progen import random_program
from vitamin.sim.simtop import build, default_ram_bytes

ROOT = Path(__file__).resolve().parent.parent
TINY = get_config("tiny")
RANDOM_SEEDS = (0, 1, 2, 3)


def _toy(**kw):
    g = toy.vit_graph(**kw)
    return lower(g, TINY, calibrate(g, default_calibration(g, 4), TINY))


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """{name: (program, profile or None, RTL counters)}."""
    from vitamin.compiler.models import export_onnx, vit_micro
    cases = {}    # name -> (program, integer inputs, regs, profile?)
    data = np.load(ROOT / "models" / "digits_data.npz")
    digits = vitamin.compile(ROOT / "models" / "digits_vit.onnx", TINY, {"input": data["x_cal"]})
    x = data["x_cal"][:1].reshape(digits.inputs[0].shape)
    cases["digits_vit"] = (digits, quantize_inputs(digits, {"input": x}), {}, False)
    path = export_onnx(vit_micro(seed=3), tmp_path_factory.mktemp("micro") / "micro.onnx",
                       dynamo=False)
    rng = np.random.default_rng(0)
    micro = vitamin.compile(path, TINY, {"input": rng.standard_normal((8, 1, 3, 32, 32))})
    cases["vit_micro"] = (micro, quantize_inputs(micro, {"input": rng.standard_normal(
        micro.inputs[0].shape)}), {}, False)
    for i, kw in enumerate([dict(img=8, patch=2, chans=1, dim=16, depth=2, heads=2),
                            dict(img=8, patch=4, chans=1, dim=32, depth=1, heads=4, mlp=4)]):
        prog = _toy(**kw)
        cases[f"toy{i}"] = (prog, quantize_inputs(prog, {"image": rng.standard_normal(
            prog.inputs[0].shape)}), {}, False)
    for seed in RANDOM_SEEDS:
        rp = random_program(TINY, seed, n_instr=40, dump=seed % 2 == 0)
        cases[f"progen{seed}"] = (rp.program, rp.inputs, rp.regs, True)

    jobs = []
    for prog, ins, regs, _ in cases.values():
        img = prog.dram_image()
        for name, v in ins.items():
            prog.write_tensor(img, name, v)
        jobs.append({"image": img.tobytes(), "n_instr": prog.n_instr, "window": len(img),
                     "regs": dict(regs), "timeout_cycles": 5_000_000})
    # the exact model is the v1 (sequential issue) machine's: build that one
    sim = build(TINY, dram_bytes=default_ram_bytes(TINY), issue="v1")
    results = sim.run(jobs)
    out = {}
    for (name, (prog, ins, regs, dynamic)), res in zip(cases.items(), results):
        assert res["status"] == 0, (name, res["status"], res["error_pc"])
        prof = profile_program(prog, ins, regs) if dynamic else None
        out[name] = (prog, prof, res["counters"])
    return out


NAMES = ["digits_vit", "vit_micro", "toy0", "toy1"] + [f"progen{s}" for s in RANDOM_SEEDS]


@pytest.mark.parametrize("name", NAMES)
def test_total_cycles_exact(measured, name):
    prog, prof, ctr = measured[name]
    est = estimate(prog, prof, machine="v1")
    assert est.machine == "v1"
    assert est.cycles == ctr["cycles"], (name, est.cycles, ctr["cycles"])
    assert est.counters["cycles"] == est.cycles == est.v1_cycles
    # the decoupled machine overlaps DMA with compute: it is faster than v1
    assert est.v2_cycles < est.cycles


@pytest.mark.parametrize("name", NAMES)
def test_unit_counters_agree(measured, name):
    prog, prof, ctr = measured[name]
    est = estimate(prog, prof, machine="v1")
    pred = est.counters
    # the controller's own counts are exact by construction
    for key in ("instructions", "marks", "skipped", "fetch_cycles"):
        assert pred[key] == ctr[key], (name, key, pred[key], ctr[key])
    busy = [k for k in ctr if k.startswith("busy_")]
    assert busy and set(busy) <= set(pred)
    for key in busy:
        assert pred[key] == ctr[key], (name, key, pred[key], ctr[key])
    # the estimate's per-opcode busy cycles are the counters' figures
    for op, cyc in est.busy.items():
        assert pred[f"busy_{op.lower()}"] == cyc


def test_layers_and_the_v2_figure(measured):
    prog, _, ctr = measured["digits_vit"]
    est = estimate(prog, machine="v1")
    assert est.layers and all(lay["cycles"] > 0 for lay in est.layers)
    # layers run from their MARK to the next one: they tile the timeline after the first MARK
    covered = sum(lay["cycles"] for lay in est.layers)
    assert 0.95 * est.cycles <= covered <= est.cycles
    assert est.macs == ctr["macs"] and est.dram_read_bytes == ctr["dram_read_bytes"]
    v2 = estimate(prog)                   # the default: the machine the default hardware is
    assert v2.machine == "v2" and v2.cycles == v2.v2_cycles == est.v2_cycles
    assert v2.v1_cycles == est.cycles
    assert (v2.macs, v2.dram_read_bytes) == (est.macs, est.dram_read_bytes)
    with pytest.raises(ValueError, match="unknown machine"):
        estimate(prog, machine="v3")
