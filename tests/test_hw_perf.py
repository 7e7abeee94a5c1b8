"""DMA/compute overlap of the v2 accelerator, from its cycle counters (not wall time).

The long matmul workload (:func:`vitamin.sim.workloads.long_matmul`: A resident, weight tiles
streamed from DRAM through two token-ordered buffers, outputs stored behind) runs on the
Verilator model; the result must be bit-exact with the golden model, and the MATMUL unit (the
MAC array's only user) must be busy in at least :data:`MAC_BUSY_GOAL` of all cycles for the
``zcu102`` preset (the issue's goal; ``make bench``). The fast suite runs the same workload on the
``tiny`` preset.
"""

import numpy as np
import pytest

from vitamin import get_config
from vitamin.golden.isasim import simulate
from vitamin.sim import simtop
from vitamin.sim.workloads import long_matmul

#: The goal: fraction of cycles in which the MAC array's MATMUL unit is busy.
MAC_BUSY_GOAL = 0.95


def run_long_matmul(preset, issue="v2"):
    """(golden RunResult, RTL result, program) of the long matmul workload on ``preset``."""
    cfg = get_config(preset)
    prog, inputs = long_matmul(cfg)
    img = prog.dram_image()
    for name, v in inputs.items():
        prog.write_tensor(img, name, v)
    gold = simulate(cfg, img, prog.n_instr)
    sim = simtop.build(cfg, issue=issue)
    res = sim.run([{"image": img, "n_instr": prog.n_instr, "timeout_cycles": 20_000_000}])[0]
    assert res["status"] == 0 and gold.ok, (res["status"], res["error_pc"], gold.message)
    got = np.frombuffer(res["dram"], dtype=np.uint8)
    assert np.array_equal(got, gold.dram), "DRAM differs from the golden model"
    for name in ("instructions", "macs", "dram_read_bytes", "dram_write_bytes", "sat_events"):
        assert res["counters"][name] == gold.counters[name], name
    return gold, res, prog


def mac_figures(counters, cfg):
    """(MATMUL busy fraction, MAC utilisation = macs / (rows * cols * cycles))."""
    cyc = counters["cycles"]
    return counters["busy_matmul"] / cyc, counters["macs"] / (cfg.macs * cyc)


def _check_overlap(res, cfg):
    c = res["counters"]
    busy, util = mac_figures(c, cfg)
    print(f"{cfg.name}: {c['cycles']} cycles, MATMUL busy {100 * busy:.2f} %, MAC utilisation "
          f"{100 * util:.2f} %, busy LOAD {c['busy_load']} STORE {c['busy_store']}")
    # the modules overlapped: their busy cycles add up to more than the run took
    assert c["busy_load"] + c["busy_matmul"] + c["busy_store"] > c["cycles"]
    assert util <= busy <= 1
    return busy


def test_long_matmul_overlaps_dma_tiny():
    cfg = get_config("tiny")
    gold, res, prog = run_long_matmul(cfg)
    busy = _check_overlap(res, cfg)
    # tiny's bus moves 4 bytes per cycle and its array is 2x4, so the exposed DMA (first A
    # block, output drain) is a larger share than on zcu102; still most of the run computes
    assert busy >= 0.90


@pytest.mark.slow
def test_long_matmul_mac_busy_zcu102():
    cfg = get_config("zcu102")
    gold, res, prog = run_long_matmul(cfg)
    busy = _check_overlap(res, cfg)
    assert busy >= MAC_BUSY_GOAL, f"MATMUL busy {100 * busy:.2f} % < {100 * MAC_BUSY_GOAL} %"
