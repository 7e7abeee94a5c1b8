"""The vitamin accelerator top level: host registers, instruction fetch, control, memories, units.

v1 issues instructions SEQUENTIALLY: fetch one 64-byte instruction over the AXI4 read channel,
decode it, start the unit registered for its opcode, wait for ``done``, repeat. A program whose
dependency tokens pass :func:`vitamin.golden.isasim.check_tokens` therefore runs in program order
exactly like the golden model, and v1 ignores the token bits (it only rejects tokens towards a
module that does not exist, as golden does). v2 will dispatch into the three module queues of
docs/ARCHITECTURE.md and use the tokens to overlap LOAD, COMPUTE and STORE; the LOAD and STORE
units are already separate modules with their own AXI channels for that reason.

Units
-----
``units`` maps :class:`~vitamin.isa.Opcode` to a factory ``f(config) -> wiring.Component``; one
factory object mapped to several opcodes is instantiated once. By default
(:func:`discover_units`) every unit class found in ``vitamin.hw.dma``, ``vitamin.hw.matmul``,
``vitamin.hw.rowops`` and ``vitamin.hw.idxops`` is used: a ``wiring.Component`` subclass defined
in that module with an ``OPCODES`` tuple, or else named ``<Opcode>...Unit`` (``MatmulUnit``,
``LayerNormRowUnit``, ``TopKUnit``, ...). A module that does not exist yet is skipped; an opcode
without a unit halts the machine with ``ILLEGAL_OPCODE`` when it is fetched.

A unit's signature must have ``ctl: In(UnitControl())``, and may have any of ``spad``, ``acc``,
``idx``, ``rs``, ``regs``, ``queues`` (the port signatures of :mod:`vitamin.hw.ports`, as
``Out``), ``axi_r: Out(AxiRead)``, ``axi_w: Out(AxiWrite)``, ``window: In(...)`` (DRAM window in
bytes), and the counter outputs ``dram_rd_inc``, ``dram_wr_inc``, ``macs_inc`` (added to the
counters every cycle). The top owns the scratchpad, accumulator, index and row-state memories
(only those some unit uses), the register file and the expert queue registers, and gives each
memory port to the unit that is running.

Host interface (AXI4-Lite slave ``s_axil``, 32-bit registers, byte offsets)
-----------------------------------------------------------------------------
======  ==============  ==  ===========================================================
offset  name            rw  meaning
======  ==============  ==  ===========================================================
0x000   CTRL            w   bit 0 START: run the program (ignored while busy); bit 1 CLEAR:
                            zero the on-chip memories first (all of them, one word/line per
                            cycle; the golden model starts from zeros). Reads 0.
0x004   STATUS          r   bit 0 BUSY, bit 1 DONE (halted since the last START), bit 2
                            CLEARING, bits 7:4 ERROR (:class:`~vitamin.isa.ErrorCode`)
0x008   ERROR_PC        r   instruction index of the fault (valid when ERROR != OK)
0x00C   PC              r   current instruction index
0x010   PROG_BASE       rw  AXI byte address of the DRAM window; the program's code is at
                            window address 0 and every DMA address is window-relative. Must
                            be 4 KiB aligned (bits 11:0 are ignored) so that bursts that do
                            not cross 4 KiB in the window do not cross it on the bus.
0x014   PROG_LEN        rw  number of instructions (fetching pc >= PROG_LEN -> NO_END)
0x018   WINDOW          rw  DRAM window size in bytes (the program's ``dram_size``); 0 means
                            ``config.dram_bytes``, larger values are clamped to it
0x01C   WATCHDOG        rw  stall limit in cycles (reset: ``config.watchdog_cycles``; 0: off)
0x020   ID              r   0x5649544D ("VITM")
0x024   FP_LO, FP_HI    r   configuration fingerprint (``Config.fingerprint()``, little-endian)
0x02C   LAST_MARK       r   ``id`` of the last MARK executed
0x030   MARKS           r   number of MARKs executed
0x034   UNITS           r   bit ``op`` set when opcode ``op`` has a unit (MARK, END always)
0x040   REG0..REG15     rw  REG[r] at 0x040 + 4 r; REG0 reads 0; writes ignored while busy
0x080   counters        r   64-bit counters, low word first, 8 bytes each (:data:`COUNTERS`)
======  ==============  ==  ===========================================================

START resets the status, the counters, the pc and the expert queue registers (all queues
empty, as in the golden model); the host registers keep what the host wrote. The counters
(:data:`COUNTERS`) match the golden model's where they share a name: ``instructions`` counts
every instruction reached, including skipped ones, MARK and END; ``dram_read_bytes`` counts
LOAD element bytes (not instruction fetches).

Watchdog: while a unit is running or an instruction is being fetched, a counter of cycles
without progress (no AXI handshake, no memory access by the running unit) halts the machine with
``WATCHDOG`` when it reaches the WATCHDOG register. v1 leaves the unit as it is: reset the
accelerator after a WATCHDOG error.

Ports
-----
s_axil : In(AxiLite())
    Host registers (slave).
m_axi_r : Out(AxiRead(config.bus_bits))
    Instruction fetch and LOAD (master, absolute AXI addresses).
m_axi_w : Out(AxiWrite(config.bus_bits))
    STORE (master).
irq : Out(1)
    High while STATUS.DONE is set.
dbg_retire, dbg_pc, dbg_cycle : Out(1), Out(32), Out(32)
    ``dbg_retire`` pulses when instruction ``dbg_pc`` completes (or is skipped) in cycle
    ``dbg_cycle`` (the low bits of the ``cycles`` counter); for traces.
"""

from __future__ import annotations

import enum as py_enum
import importlib

from amaranth import Cat, Const, Module, Mux, Signal, signed
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out

from vitamin import isa
from vitamin.config import get_config
from vitamin.isa import ErrorCode, Opcode, OutMode

from .dma import WINDOW_BITS, instr_view
from .mem import AccMemory, IdxMemory, RowStateMemory, Scratchpad
from .ports import (
    N_REGS,
    AccPort,
    AxiRead,
    AxiWrite,
    IdxPort,
    QueuePort,
    RowStatePort,
    SpadPort,
    spad_lanes,
)

__all__ = ["Accelerator", "AxiLite", "COUNTERS", "REGISTERS", "UNIT_MODULES", "discover_units",
           "ACCEL_ID", "CTRL_START", "CTRL_CLEAR", "CTRL_SEQUENTIAL", "ISSUE_MODES",
           "DEFAULT_ISSUE"]

ACCEL_ID = 0x5649544D   # "VITM"

#: Host register byte offsets (see the module docstring).
REGISTERS = {
    "CTRL": 0x000, "STATUS": 0x004, "ERROR_PC": 0x008, "PC": 0x00C, "PROG_BASE": 0x010,
    "PROG_LEN": 0x014, "WINDOW": 0x018, "WATCHDOG": 0x01C, "ID": 0x020, "FP_LO": 0x024,
    "FP_HI": 0x028, "LAST_MARK": 0x02C, "MARKS": 0x030, "UNITS": 0x034, "REG0": 0x040,
}
CTRL_START = 1 << 0
CTRL_CLEAR = 1 << 1
CTRL_SEQUENTIAL = 1 << 2     # v2: run in program order (trace mode); v1 always does
#: Issue schemes: "v2" decoupled LOAD/COMPUTE/STORE modules with tokens (hw/accel_v2.py), "v1"
#: one instruction at a time.
ISSUE_MODES = ("v2", "v1")
DEFAULT_ISSUE = "v2"
STATUS_BUSY = 1 << 0
STATUS_DONE = 1 << 1
STATUS_CLEARING = 1 << 2
STATUS_ERROR_SHIFT = 4

_UNIT_OPS = (Opcode.LOAD, Opcode.STORE, Opcode.MATMUL, Opcode.SOFTMAX, Opcode.LAYERNORM,
             Opcode.TOPK, Opcode.ROUTE, Opcode.SPANS, Opcode.VEC)

#: 64-bit counters: name -> byte offset of the low word. Names shared with the golden model's
#: ``RunResult.counters`` mean the same thing.
COUNTERS = {
    "cycles": 0x080,             # cycles from START to the halt
    "instructions": 0x088,
    "macs": 0x090,
    "dram_read_bytes": 0x098,
    "dram_write_bytes": 0x0A0,
    "skipped": 0x0A8,
    "sat_events": 0x0B0,
    "fetch_cycles": 0x0B8,       # cycles spent fetching instructions
    **{f"busy_{op.name.lower()}": 0x0C0 + 8 * i for i, op in enumerate(_UNIT_OPS)},
    "stall_cycles": 0x110,       # cycles without progress while fetching or running a unit
}

#: Modules searched by :func:`discover_units`, in this order.
UNIT_MODULES = ("vitamin.hw.dma", "vitamin.hw.matmul", "vitamin.hw.rowops", "vitamin.hw.idxops",
                "vitamin.hw.select")


def host_read_map(cfg, units_mask, regfile, cnt, *, status, error_pc, pc, prog_base, prog_len,
                  window, watchdog, last_mark, marks):
    """{byte offset: value} of every readable host register (``REGISTERS``, ``REG1..``,
    ``COUNTERS`` as two 32-bit words), shared by the v1 and v2 controllers."""
    fp = int.from_bytes(cfg.fingerprint(), "little")
    read_map = {
        REGISTERS["STATUS"]: status, REGISTERS["ERROR_PC"]: error_pc, REGISTERS["PC"]: pc,
        REGISTERS["PROG_BASE"]: prog_base, REGISTERS["PROG_LEN"]: prog_len,
        REGISTERS["WINDOW"]: window, REGISTERS["WATCHDOG"]: watchdog,
        REGISTERS["ID"]: Const(ACCEL_ID, 32),
        REGISTERS["FP_LO"]: Const(fp & 0xFFFFFFFF, 32),
        REGISTERS["FP_HI"]: Const(fp >> 32, 32), REGISTERS["LAST_MARK"]: last_mark,
        REGISTERS["MARKS"]: marks, REGISTERS["UNITS"]: Const(units_mask, 32),
    }
    for r in range(1, N_REGS):
        read_map[REGISTERS["REG0"] + 4 * r] = regfile[r]
    for name, off in COUNTERS.items():
        read_map[off] = cnt[name][:32]
        read_map[off + 4] = cnt[name][32:]
    return read_map


class AxiLite(wiring.Signature):
    """AXI4-Lite, master side (the accelerator's ``s_axil`` is ``In(AxiLite())``)."""

    def __init__(self, addr_bits: int = 12):
        super().__init__({
            "awvalid": Out(1), "awready": In(1), "awaddr": Out(addr_bits), "awprot": Out(3),
            "wvalid": Out(1), "wready": In(1), "wdata": Out(32), "wstrb": Out(4),
            "bvalid": In(1), "bready": Out(1), "bresp": In(2),
            "arvalid": Out(1), "arready": In(1), "araddr": Out(addr_bits), "arprot": Out(3),
            "rvalid": In(1), "rready": Out(1), "rdata": In(32), "rresp": In(2),
        })


def _unit_opcodes(cls):
    ops = getattr(cls, "OPCODES", None)
    if ops is not None:
        return tuple(Opcode(o) for o in ops)
    name = cls.__name__.lower()
    if name.endswith("unit"):
        for op in _UNIT_OPS:
            if name.startswith(op.name.lower()):
                return (op,)
    return ()


def discover_units(modules=UNIT_MODULES) -> dict:
    """``{Opcode: unit class}`` of every unit class in ``modules`` that can be imported.

    A module that does not exist is skipped (that unit is not written yet); any other import
    error is raised, so a broken unit is never silently left out.
    """
    found = {}
    for name in modules:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:
                continue
            raise
        for obj in vars(mod).values():
            if (isinstance(obj, type) and issubclass(obj, wiring.Component)
                    and obj.__module__ == mod.__name__):
                for op in _unit_opcodes(obj):
                    if op in found and found[op] is not obj:
                        raise ValueError(f"opcode {op.name} has two units: "
                                         f"{found[op].__qualname__} and {obj.__qualname__}")
                    found[op] = obj
    return found


def _enum_checks(word):
    """``(opcode, bad)`` pairs: ``bad`` is true when an enum field of that format holds a value
    that is not a member (golden's decoder faults with BAD_FIELD)."""
    out = []
    for op, fmt in isa.FORMATS.items():
        terms = []
        for name, field in data.Layout.cast(fmt):
            shape = field.shape
            if isinstance(shape, type) and issubclass(shape, py_enum.Enum) and name != "hdr":
                values = {m.value for m in shape}
                if len(values) < (1 << field.width):
                    v = word[field.offset:field.offset + field.width]
                    terms.append(~Cat(*[v == x for x in sorted(values)]).any())
        if terms:
            out.append((op, Cat(*terms).any()))
    return out


class Accelerator(wiring.Component):
    """The accelerator (see the module docstring for the register map and the unit rules)."""

    def __init__(self, config, units=None, issue=DEFAULT_ISSUE):
        if issue not in ISSUE_MODES:
            raise ValueError(f"issue must be one of {', '.join(ISSUE_MODES)}, not {issue!r}")
        self._issue = issue
        self._cfg = cfg = get_config(config)
        if units is None:
            units = discover_units()
        self._units_map = {}
        for op, fac in dict(units).items():
            op = Opcode(op)
            if op in (Opcode.MARK, Opcode.END):
                raise ValueError(f"{op.name} is executed by the controller, not by a unit")
            if not callable(fac):
                raise ValueError(f"unit for {op.name} must be a factory, not {fac!r}")
            self._units_map[op] = fac
        super().__init__({
            "s_axil": In(AxiLite()),
            "m_axi_r": Out(AxiRead(cfg.bus_bits)),
            "m_axi_w": Out(AxiWrite(cfg.bus_bits)),
            "irq": Out(1),
            "dbg_retire": Out(1), "dbg_pc": Out(32), "dbg_cycle": Out(32),
        })

    @property
    def config(self):
        return self._cfg

    @property
    def issue(self) -> str:
        """The issue scheme: ``"v2"`` (decoupled modules) or ``"v1"`` (sequential)."""
        return self._issue

    @property
    def opcodes(self) -> tuple:
        """Opcodes executed by this accelerator (units, MARK and END)."""
        return tuple(sorted(set(self._units_map) | {Opcode.MARK, Opcode.END},
                            key=lambda o: o.value))

    def elaborate(self, platform):
        if self._issue == "v2":
            from .accel_v2 import elaborate_v2
            return elaborate_v2(self, platform)
        cfg = self._cfg
        m = Module()

        # ---- units ------------------------------------------------------------------------
        instances = []          # unit components, in order of first appearance
        by_factory = {}
        unit_of = {}            # opcode -> instance index
        for op in sorted(self._units_map, key=lambda o: o.value):
            fac = self._units_map[op]
            if fac not in by_factory:
                unit = fac(cfg)
                if "ctl" not in unit.signature.members:
                    raise ValueError(f"unit {type(unit).__qualname__} has no 'ctl' port")
                by_factory[fac] = len(instances)
                instances.append(unit)
                m.submodules[f"u{len(instances) - 1}_{type(unit).__name__.lower()}"] = unit
            unit_of[op] = by_factory[fac]
        n_units = len(instances)

        def has(u, name):
            return name in u.signature.members

        # ---- state ------------------------------------------------------------------------
        regfile = Signal(data.ArrayLayout(signed(32), N_REGS))
        qsig = QueuePort(cfg)
        qstate = Signal(qsig.members["q"].shape)

        prog_base = Signal(32)
        prog_len = Signal(32)
        window_reg = Signal(32)
        watchdog_lim = Signal(32, init=min(cfg.watchdog_cycles, (1 << 32) - 1))
        window = Signal(WINDOW_BITS)
        m.d.comb += window.eq(Mux((window_reg == 0) | (window_reg > cfg.dram_bytes),
                                  cfg.dram_bytes, window_reg))

        busy = Signal()
        done = Signal()
        clearing = Signal()
        error = Signal(ErrorCode)
        error_pc = Signal(32)
        pc = Signal(32)
        last_mark = Signal(16)
        marks = Signal(32)
        m.d.comb += self.irq.eq(done)

        CLEAR_OWNER, NOBODY = n_units, n_units + 1
        owner = Signal(range(n_units + 2), init=NOBODY)   # who holds the memory ports
        active_op = Signal(Opcode, init=Opcode.END)

        # ---- memories and their port multiplexers -----------------------------------------
        mem_kinds = [("spad", SpadPort, Scratchpad), ("acc", AccPort, AccMemory),
                     ("idx", IdxPort, IdxMemory), ("rs", RowStatePort, RowStateMemory)]
        depths = {"spad": cfg.spad_words // spad_lanes(cfg), "acc": cfg.acc_lines,
                  "idx": cfg.idx_entries, "rs": cfg.rowstate_rows}
        clear_ports = {}
        for kind, sig_cls, mem_cls in mem_kinds:
            users = [i for i, u in enumerate(instances) if has(u, kind)]
            if not users:
                continue
            mem = mem_cls(cfg)
            m.submodules[f"mem_{kind}"] = mem
            sig = sig_cls(cfg)
            clr = sig.create(path=(f"clear_{kind}",))
            clear_ports[kind] = clr
            sources = [(i, getattr(instances[i], kind)) for i in users] + [(CLEAR_OWNER, clr)]
            for name, member in sig.members.items():
                mp = getattr(mem.port, name)
                if member.flow == Out:
                    with m.Switch(owner):
                        for idx_, port in sources:
                            with m.Case(idx_):
                                m.d.comb += mp.eq(getattr(port, name))
                else:
                    for _, port in sources:
                        m.d.comb += getattr(port, name).eq(mp)

        # clear engine: one address per cycle in every memory, all zero data, full masks
        clr_len = max([depths[k] for k in clear_ports], default=1)
        clr_addr = Signal(range(clr_len + 1))
        for kind, clr in clear_ports.items():
            in_range = clr_addr < depths[kind]
            m.d.comb += clr.wr_en.eq((owner == CLEAR_OWNER) & in_range)
            if kind == "spad":
                m.d.comb += [clr.wr_addr.eq(clr_addr * spad_lanes(cfg)),
                             clr.wr_mask.eq((1 << spad_lanes(cfg)) - 1)]
            else:
                m.d.comb += clr.wr_addr.eq(clr_addr)

        # register file and queues
        reg_users = [i for i, u in enumerate(instances) if has(u, "regs")]
        for i in reg_users:
            m.d.comb += instances[i].regs.regs.eq(regfile)
        q_users = [i for i, u in enumerate(instances) if has(u, "queues")]
        for i in q_users:
            m.d.comb += instances[i].queues.q.eq(qstate)

        # window, instruction word
        for u in instances:
            if has(u, "window"):
                m.d.comb += u.window.eq(window)
        instr = Signal(isa.INSTR_BITS)
        hdr = instr_view(isa.Header, instr)
        for u in instances:
            m.d.comb += u.ctl.instr.eq(instr)

        # ---- counters ---------------------------------------------------------------------
        cnt = {name: Signal(64, name=f"cnt_{name}") for name in COUNTERS}
        sat_sum = sum((u.ctl.sat_inc for u in instances), Const(0, 1))
        rd_sum = sum((u.dram_rd_inc for u in instances if has(u, "dram_rd_inc")), Const(0, 1))
        wr_sum = sum((u.dram_wr_inc for u in instances if has(u, "dram_wr_inc")), Const(0, 1))
        macs_units = [u for u in instances if has(u, "macs_inc")]
        macs_sum = sum((u.macs_inc for u in macs_units), Const(0, 1))
        macs_done = Signal(48)     # controller-computed MATMUL MACs (units without macs_inc)
        m.d.sync += [cnt["sat_events"].eq(cnt["sat_events"] + sat_sum),
                     cnt["dram_read_bytes"].eq(cnt["dram_read_bytes"] + rd_sum),
                     cnt["dram_write_bytes"].eq(cnt["dram_write_bytes"] + wr_sum)]
        with m.If(busy):
            m.d.sync += cnt["cycles"].eq(cnt["cycles"] + 1)

        # ---- AXI read: fetch or the running unit ------------------------------------------
        fetch = AxiRead(cfg.bus_bits).create(path=("fetch",))
        rd_masters = [(NOBODY, fetch)] + [(i, u.axi_r) for i, u in enumerate(instances)
                                          if has(u, "axi_r")]
        rd_owner = Signal(range(n_units + 2), init=NOBODY)   # NOBODY: fetch
        base = Cat(Const(0, 12), prog_base[12:])
        mr = self.m_axi_r
        for name, member in AxiRead(cfg.bus_bits).members.items():
            if member.flow == Out:
                with m.Switch(rd_owner):
                    for key, port in rd_masters:
                        with m.Case(key):
                            val = getattr(port, name)
                            if name == "araddr":
                                val = val + base
                            m.d.comb += getattr(mr, name).eq(val)
            else:
                for key, port in rd_masters:
                    v = getattr(mr, name)
                    if name in ("arready", "rvalid"):
                        v = v & (rd_owner == key)
                    m.d.comb += getattr(port, name).eq(v)
        mw = self.m_axi_w
        wr_masters = [(i, u.axi_w) for i, u in enumerate(instances) if has(u, "axi_w")]
        for name, member in AxiWrite(cfg.bus_bits).members.items():
            if member.flow == Out:
                with m.Switch(owner):
                    for key, port in wr_masters:
                        with m.Case(key):
                            val = getattr(port, name)
                            if name == "awaddr":
                                val = val + base
                            m.d.comb += getattr(mw, name).eq(val)
            else:
                for key, port in wr_masters:
                    v = getattr(mw, name)
                    if name in ("awready", "wready", "bvalid"):
                        v = v & (owner == key)
                    m.d.comb += getattr(port, name).eq(v)

        # progress, for the watchdog: any AXI handshake or any access by the running unit
        progress = Signal()
        hs = [mr.arvalid & mr.arready, mr.rvalid & mr.rready, mw.awvalid & mw.awready,
              mw.wvalid & mw.wready, mw.bvalid & mw.bready]
        for kind in ("spad", "acc", "idx", "rs"):
            if kind in clear_ports:
                port = m.submodules[f"mem_{kind}"].port
                hs += [port.rd_en, port.wr_en]
        m.d.comb += progress.eq(Cat(*hs).any())
        stall = Signal(32)

        # ---- register writes by units -----------------------------------------------------
        with m.Switch(owner):
            for i in reg_users:
                with m.Case(i):
                    rp = instances[i].regs
                    with m.If(rp.wr_en & (rp.wr_addr != 0)):
                        m.d.sync += regfile[rp.wr_addr].eq(rp.wr_data)
            for i in q_users:
                with m.Case(i):
                    qp = instances[i].queues
                    with m.If(qp.wr_en):
                        m.d.sync += [qstate[qp.wr_addr].off.eq(qp.wr_off),
                                     qstate[qp.wr_addr].len.eq(qp.wr_len)]

        # ---- AXI4-Lite slave --------------------------------------------------------------
        sl = self.s_axil
        start_after_clear = Signal()
        b_pend = Signal()
        m.d.comb += [sl.awready.eq(sl.awvalid & sl.wvalid & ~b_pend),
                     sl.wready.eq(sl.awvalid & sl.wvalid & ~b_pend),
                     sl.bvalid.eq(b_pend), sl.bresp.eq(0)]
        wr = sl.awvalid & sl.wvalid & ~b_pend
        with m.If(wr):
            m.d.sync += b_pend.eq(1)
        with m.If(b_pend & sl.bready):
            m.d.sync += b_pend.eq(0)
        waddr = sl.awaddr[2:]
        with m.If(wr & ~busy):
            with m.Switch(waddr):
                with m.Case(REGISTERS["PROG_BASE"] >> 2):
                    m.d.sync += prog_base.eq(sl.wdata)
                with m.Case(REGISTERS["PROG_LEN"] >> 2):
                    m.d.sync += prog_len.eq(sl.wdata)
                with m.Case(REGISTERS["WINDOW"] >> 2):
                    m.d.sync += window_reg.eq(sl.wdata)
                with m.Case(REGISTERS["WATCHDOG"] >> 2):
                    m.d.sync += watchdog_lim.eq(sl.wdata)
                for r in range(1, N_REGS):
                    with m.Case((REGISTERS["REG0"] >> 2) + r):
                        m.d.sync += regfile[r].eq(sl.wdata)

        r_pend = Signal()
        rdata = Signal(32)
        m.d.comb += [sl.arready.eq(~r_pend), sl.rvalid.eq(r_pend), sl.rdata.eq(rdata),
                     sl.rresp.eq(0)]
        with m.If(r_pend & sl.rready):
            m.d.sync += r_pend.eq(0)
        units_mask = sum(1 << op.value for op in self.opcodes)
        with m.If(sl.arvalid & ~r_pend):
            m.d.sync += r_pend.eq(1)
            read_map = host_read_map(
                cfg, units_mask, regfile, cnt, status=Cat(busy, done, clearing, Const(0, 1), error),
                error_pc=error_pc, pc=pc, prog_base=prog_base, prog_len=prog_len,
                window=window_reg, watchdog=watchdog_lim, last_mark=last_mark, marks=marks)
            m.d.sync += rdata.eq(0)
            with m.Switch(sl.araddr[2:]):
                for off, val in read_map.items():
                    with m.Case(off >> 2):
                        m.d.sync += rdata.eq(val)

        # ---- controller -------------------------------------------------------------------
        beats = max(1, isa.INSTR_BITS // cfg.bus_bits)
        beat_no = Signal(range(beats + 1))
        bb_log = (cfg.bus_bytes).bit_length() - 1
        m.d.comb += [fetch.araddr.eq(pc << 6), fetch.arlen.eq(beats - 1),
                     fetch.arsize.eq(bb_log), fetch.arburst.eq(1), fetch.arid.eq(0)]
        start_sig = [Signal(name=f"start_{i}") for i in range(n_units)]
        for i, u in enumerate(instances):
            m.d.comb += u.ctl.start.eq(start_sig[i])
        enum_bad = _enum_checks(instr)
        unit_done = Signal()
        unit_err = Signal(ErrorCode)
        with m.Switch(owner):
            for i, u in enumerate(instances):
                with m.Case(i):
                    m.d.comb += [unit_done.eq(u.ctl.done), unit_err.eq(u.ctl.error)]

        # MATMUL MACs computed by the controller when the MATMUL unit does not count them
        mm_unit = unit_of.get(Opcode.MATMUL)
        count_mm = mm_unit is not None and not has(instances[mm_unit], "macs_inc")
        mm_rows_k = Signal(33)
        if count_mm:
            mmf = instr_view(isa.Matmul, instr)
            uses_q = mmf.gather | mmf.scatter | (mmf.out == OutMode.SPAD_ADD)
            qbits = max(1, (cfg.max_experts - 1).bit_length())
            qlen = qstate[mmf.queue[:qbits]].len
            rows = Mux(uses_q & (mmf.queue < cfg.max_experts), qlen, mmf.m)
            m.d.sync += [mm_rows_k.eq(rows * mmf.k), macs_done.eq(mm_rows_k * mmf.n)]
        m.d.sync += cnt["macs"].eq(cnt["macs"] + macs_sum)

        def halt(code):
            m.d.sync += [error.eq(code), error_pc.eq(pc), busy.eq(0), done.eq(1),
                         owner.eq(NOBODY), rd_owner.eq(NOBODY)]
            m.next = "IDLE"

        m.d.comb += [self.dbg_pc.eq(pc), self.dbg_cycle.eq(cnt["cycles"][:32])]

        def next_instr():
            m.d.comb += self.dbg_retire.eq(1)
            m.d.sync += pc.eq(pc + 1)
            m.next = "FETCH"

        watch = Signal()
        wd_fire = (watchdog_lim != 0) & (stall >= watchdog_lim)
        with m.If(watch & ~progress):
            m.d.sync += [stall.eq(stall + 1), cnt["stall_cycles"].eq(cnt["stall_cycles"] + 1)]
        with m.Else():
            m.d.sync += stall.eq(0)

        ctrl_wr = wr & (waddr == REGISTERS["CTRL"] >> 2)
        with m.FSM():
            with m.State("IDLE"):
                with m.If(ctrl_wr & (sl.wdata[0] | sl.wdata[1])):
                    m.d.sync += [done.eq(0), error.eq(ErrorCode.OK), error_pc.eq(0), busy.eq(1)]
                    with m.If(sl.wdata[1]):
                        m.d.sync += [clearing.eq(1), owner.eq(CLEAR_OWNER), clr_addr.eq(0),
                                     start_after_clear.eq(sl.wdata[0])]
                        m.next = "CLEAR"
                    with m.Else():
                        m.next = "START"
            with m.State("CLEAR"):
                m.d.sync += clr_addr.eq(clr_addr + 1)
                with m.If(clr_addr == clr_len - 1):
                    m.d.sync += [clearing.eq(0), owner.eq(NOBODY)]
                    with m.If(start_after_clear):
                        m.next = "START"
                    with m.Else():
                        m.d.sync += busy.eq(0)
                        m.next = "IDLE"
            with m.State("START"):
                m.d.sync += [pc.eq(0), stall.eq(0), last_mark.eq(0), marks.eq(0),
                             qstate.eq(0)]
                m.d.sync += [c.eq(0) for c in cnt.values()]
                m.next = "FETCH"
            with m.State("FETCH"):
                with m.If(pc >= prog_len):
                    halt(ErrorCode.NO_END)
                with m.Elif((pc << 6) + 64 > window):
                    halt(ErrorCode.DRAM_RANGE)
                with m.Else():
                    m.d.sync += [rd_owner.eq(NOBODY), beat_no.eq(0)]
                    m.next = "FETCH_AR"
            with m.State("FETCH_AR"):
                m.d.comb += [fetch.arvalid.eq(1), watch.eq(1)]
                m.d.sync += cnt["fetch_cycles"].eq(cnt["fetch_cycles"] + 1)
                with m.If(fetch.arready):
                    m.next = "FETCH_R"
                with m.If(wd_fire):
                    halt(ErrorCode.WATCHDOG)
            with m.State("FETCH_R"):
                m.d.comb += [fetch.rready.eq(1), watch.eq(1)]
                m.d.sync += cnt["fetch_cycles"].eq(cnt["fetch_cycles"] + 1)
                with m.If(fetch.rvalid):
                    if beats == 1:
                        m.d.sync += instr.eq(fetch.rdata)
                    else:
                        with m.Switch(beat_no):
                            for b in range(beats):
                                with m.Case(b):
                                    m.d.sync += instr.word_select(b, cfg.bus_bits).eq(
                                        fetch.rdata)
                    m.d.sync += beat_no.eq(beat_no + 1)
                    with m.If(beat_no == beats - 1):
                        m.next = "DECODE"
                with m.If(wd_fire):
                    halt(ErrorCode.WATCHDOG)
            with m.State("DECODE"):
                op = hdr.opcode.as_value()
                # an opcode of the ISA without a unit in this build is illegal here
                known = [o for o in Opcode if o in unit_of or o in (Opcode.MARK, Opcode.END)]
                legal = Cat(*[op == o.value for o in known]).any()
                bad_enum = Const(0, 1)
                for fop, bad in enum_bad:
                    bad_enum = bad_enum | ((op == fop.value) & bad)
                is_load, is_store = op == Opcode.LOAD.value, op == Opcode.STORE.value
                bad_tok = ((is_load & (hdr.pop_prev | hdr.push_prev)) |
                           (is_store & (hdr.pop_next | hdr.push_next)))
                qbits = max(1, (cfg.max_experts - 1).bit_length())
                m.d.sync += active_op.eq(hdr.opcode)
                with m.If(~legal):
                    halt(ErrorCode.ILLEGAL_OPCODE)
                with m.Elif(bad_enum | bad_tok):
                    halt(ErrorCode.BAD_FIELD)
                with m.Else():
                    m.d.sync += cnt["instructions"].eq(cnt["instructions"] + 1)
                    with m.If(hdr.pred_en & (hdr.pred_q >= cfg.max_experts)):
                        halt(ErrorCode.BAD_FIELD)
                    with m.Elif(hdr.pred_en & (qstate[hdr.pred_q[:qbits]].len == 0)):
                        m.d.sync += cnt["skipped"].eq(cnt["skipped"] + 1)
                        next_instr()
                    with m.Elif(hdr.opcode == Opcode.MARK):
                        mark = instr_view(isa.Mark, instr)
                        m.d.sync += [last_mark.eq(mark.id), marks.eq(marks + 1)]
                        next_instr()
                    with m.Elif(hdr.opcode == Opcode.END):
                        halt(ErrorCode.OK)
                    with m.Else():
                        # the unit gets the memory ports one cycle before its start pulse
                        with m.Switch(hdr.opcode):
                            for uop, i in unit_of.items():
                                with m.Case(uop):
                                    m.d.sync += [owner.eq(i), rd_owner.eq(i)]
                                    m.next = "DISPATCH"
            with m.State("DISPATCH"):
                with m.Switch(owner):
                    for i in range(n_units):
                        with m.Case(i):
                            m.d.comb += start_sig[i].eq(1)
                m.next = "RUN"
            with m.State("RUN"):
                m.d.comb += watch.eq(1)
                for i, op_ in enumerate(_UNIT_OPS):
                    if op_ in unit_of:
                        with m.If(active_op == op_):
                            name = f"busy_{op_.name.lower()}"
                            m.d.sync += cnt[name].eq(cnt[name] + 1)
                with m.If(unit_done):
                    m.d.sync += [owner.eq(NOBODY), rd_owner.eq(NOBODY)]
                    if count_mm:
                        with m.If((active_op == Opcode.MATMUL) & (unit_err == ErrorCode.OK)):
                            m.d.sync += cnt["macs"].eq(cnt["macs"] + macs_sum + macs_done)
                    with m.If(unit_err != ErrorCode.OK):
                        halt(unit_err)
                    with m.Else():
                        next_instr()
                with m.Elif(wd_fire):
                    halt(ErrorCode.WATCHDOG)
        return m
