"""cocotb bench of the whole accelerator (run by tests/test_hw_accel.py through SimBuild.run).

The pytest side writes the jobs (DRAM images, instruction counts, host registers) to a JSON file
named by ``VITAMIN_JOBS``; :func:`vitamin.sim.simtop.run_jobs` loads each image through the RAM
backdoor, programs the host registers with cocotbext-axi's ``AxiLiteMaster``, starts the
accelerator and awaits its interrupt while Verilator runs free, then reads the status, the
counters and the DRAM window back for the pytest side to compare with the golden model.
"""

import cocotb

from vitamin.sim.simtop import run_jobs


@cocotb.test()
async def accel_jobs(dut):
    """Run every job of $VITAMIN_JOBS on the simulated accelerator."""
    await run_jobs(dut)
