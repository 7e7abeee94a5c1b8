"""The ``rtl`` backend of ``vitamin run``: a program on the Verilator model of the accelerator.

:func:`run` builds (once, cached under ``build/rtl/<config>-<hash>/``, see
:func:`vitamin.sim.simtop.build`) the simulation top of the program's configuration, runs the
program's DRAM image through it with the host registers, and reads the outputs back from the
final DRAM image. The simulated RAM is :func:`vitamin.sim.simtop.default_ram_bytes` (the
configuration's window, at most 64 MiB), so that every program of a configuration shares one
build; a larger program gets a larger RAM.

This module is also the cocotb test module of those runs (:func:`rtl_backend_jobs`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import cocotb
import numpy as np

from vitamin.api import RunOutput
from vitamin.golden.isasim import Fault, RunResult
from vitamin.isa import ErrorCode

from . import simtop
from .simtop import default_ram_bytes, run_jobs

__all__ = ["run", "run_image", "run_many"]

# ``simtop.build`` is looked up at each call (not imported by name), so that a test that
# replaces it for a while cannot leave this module bound to its replacement.


def _ram_bytes(config, n: int) -> int:
    size = default_ram_bytes(config)
    while size < n:
        size <<= 1
    return size


def run_image(config, image, n_instr, *, regs=None, trace=False, vcd=None, throttle=False,
              timeout_cycles=50_000_000, window=None):
    """Run a DRAM image (code at address 0) on the RTL; returns ``(RunResult, cycles)``.

    The :class:`~vitamin.golden.isasim.RunResult` holds the final DRAM window, the status, the
    faulting instruction, the hardware counters (golden names plus ``cycles``, ``busy_*``,
    ``fetch_cycles``, ...) and, with ``trace``, ``{"pc", "cycle"}`` per retired instruction
    (``cycle`` counts from the host's start write, including the memory clear).
    """
    image = np.asarray(image, dtype=np.uint8)
    window = len(image) if window is None else int(window)
    sim = simtop.build(config, dram_bytes=_ram_bytes(config, max(len(image), window)),
                waves=vcd is not None)
    res = sim.run([{"image": image.tobytes(), "n_instr": n_instr, "window": window,
                    "regs": dict(regs or {}), "trace": trace, "throttle": int(throttle),
                    "timeout_cycles": timeout_cycles}])[0]
    if vcd is not None:
        shutil.copy(Path(sim.build_dir) / "dump.vcd", vcd)
    if res["status"] is None:
        raise TimeoutError(f"the RTL did not halt within {timeout_cycles} cycles")
    status = ErrorCode(res["status"])
    out = RunResult(dram=np.frombuffer(res["dram"], dtype=np.uint8).copy(), status=status,
                    error_pc=res["error_pc"] if status != ErrorCode.OK else -1,
                    message="" if status == ErrorCode.OK else
                    f"{status.name} reported by the RTL at instruction {res['error_pc']}",
                    counters=res["counters"], trace=res["trace"])
    return out, res["counters"]["cycles"]


def run(program, int_inputs, regs=None, trace=False, vcd=None, **options) -> RunOutput:
    """Run ``program`` on integer inputs ``{name: array}``; outputs as :func:`vitamin.api.run`.

    A fault raises :class:`vitamin.golden.isasim.Fault` like the golden backend. ``options``:
    ``throttle`` (random bus stalls), ``timeout_cycles``.
    """
    img = program.dram_image()
    for name, v in (int_inputs or {}).items():
        program.write_tensor(img, name, v)
    res, cycles = run_image(program.config, img, program.n_instr, regs=regs, trace=trace,
                            vcd=vcd, **options)
    if not res.ok:
        raise Fault(res.status, res.error_pc, res.message)
    raw = {s.name: program.read_tensor(res.dram, s.name) for s in program.outputs}
    outs = {name: raw[name].astype(np.float64) * program.symbol(name).scale for name in raw}
    return RunOutput(outputs=outs, raw=raw, counters=dict(res.counters), cycles=cycles,
                     result=res)


def run_many(program, inputs_list, regs=None, timeout_cycles=50_000_000):
    """Run ``program`` once per integer-input dict in ``inputs_list`` in ONE simulator process.

    Returns a list of ``(RunResult, raw outputs {name: array})``.
    """
    jobs, images = [], []
    for ins in inputs_list:
        img = program.dram_image()
        for name, v in ins.items():
            program.write_tensor(img, name, v)
        images.append(img)
        jobs.append({"image": img.tobytes(), "n_instr": program.n_instr, "window": len(img),
                     "regs": dict(regs or {}), "trace": False, "throttle": 0,
                     "timeout_cycles": timeout_cycles})
    sim = simtop.build(program.config, dram_bytes=_ram_bytes(program.config, max(map(len, images))))
    out = []
    for res in sim.run(jobs):
        if res["status"] is None:
            raise TimeoutError(f"the RTL did not halt within {timeout_cycles} cycles")
        status = ErrorCode(res["status"])
        rr = RunResult(dram=np.frombuffer(res["dram"], dtype=np.uint8).copy(), status=status,
                       error_pc=res["error_pc"] if status != ErrorCode.OK else -1,
                       counters=res["counters"])
        raw = {s.name: program.read_tensor(rr.dram, s.name) for s in program.outputs}
        out.append((rr, raw))
    return out


@cocotb.test()
async def rtl_backend_jobs(dut):
    """cocotb entry of :func:`run_image` (runs the jobs of ``$VITAMIN_JOBS``)."""
    await run_jobs(dut)
