"""The ISA simulator: executes a program on a DRAM image, instruction by instruction.

This is the specification the RTL is compared with. Instructions execute in program order (the
decoupled modules of the hardware must produce the same result for every program whose
dependency tokens order all conflicting accesses; :func:`check_tokens` verifies that the token
protocol cannot deadlock with the configured queue depths).
"""

from __future__ import annotations

import zlib
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from vitamin import isa
from vitamin.isa import (
    AccIn,
    Act,
    DmaMode,
    DType,
    ErrorCode,
    Mem,
    Opcode,
    OutMode,
    SmMode,
    Unit,
    VecOp,
)

from . import units
from .numerics import Sat, rshift_round

__all__ = ["Fault", "RunResult", "Machine", "simulate", "check_tokens", "run_program"]

N_REGS = 16


class Fault(Exception):
    """A hardware fault: the machine halts with ``code`` at instruction ``pc``."""

    def __init__(self, code: ErrorCode, pc: int, message: str):
        super().__init__(f"{code.name} at instruction {pc}: {message}")
        self.code = code
        self.pc = pc
        self.message = message


@dataclass
class RunResult:
    dram: np.ndarray
    status: ErrorCode = ErrorCode.OK
    error_pc: int = -1
    message: str = ""
    counters: dict = field(default_factory=dict)
    marks: list = field(default_factory=list)
    trace: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == ErrorCode.OK

    def check(self) -> RunResult:
        if not self.ok:
            raise Fault(self.status, self.error_pc, self.message)
        return self


def _fetch(dram: np.ndarray, pc: int, n_instr: int):
    if pc >= n_instr:
        raise Fault(ErrorCode.NO_END, pc, f"no END within the program's {n_instr} instructions")
    lo = pc * isa.INSTR_BYTES
    if lo + isa.INSTR_BYTES > len(dram):
        raise Fault(ErrorCode.DRAM_RANGE, pc, f"instruction fetch at {lo:#x} outside DRAM")
    word = dram[lo:lo + isa.INSTR_BYTES].tobytes()
    raw = int.from_bytes(word, "little")
    try:
        return isa.decode(raw)
    except isa.DecodeError as e:
        code = ErrorCode.ILLEGAL_OPCODE if "opcode" in str(e) else ErrorCode.BAD_FIELD
        raise Fault(code, pc, str(e)) from None


def decode_program(dram: np.ndarray, n_instr: int):
    """Decode the instruction stream up to and including END (faults on illegal words)."""
    out = []
    pc = 0
    while True:
        op, f = _fetch(dram, pc, n_instr)
        out.append((op, f))
        if op == Opcode.END:
            return out
        pc += 1


def check_tokens(instrs, config) -> None:
    """Check that the dependency-token protocol is well formed and completes.

    1. Program order: the n-th pop from a token queue must come after the n-th push into it in
       program order, so that program-order execution (this simulator) and the decoupled
       hardware order every pair of dependent instructions the same way (BAD_FIELD otherwise).
    2. Progress: models the fetch unit dispatching in program order into per-module queues of
       ``cmd_depth`` instructions, and the four token queues of ``token_depth``; a module's head
       instruction pops its tokens (waiting until they are there), executes, then pushes
       (waiting while the token queue is full). Raises ``Fault(DEADLOCK)`` naming the stuck
       instructions, or when tokens are left unconsumed at END.
    Also ``Fault(BAD_FIELD)`` for a token towards a module that does not exist.
    """
    units_of = [isa.UNIT_OF[op] for op, _ in instrs]
    for pc, ((op, f), u) in enumerate(zip(instrs, units_of)):
        if u == Unit.LOAD and (f["pop_prev"] or f["push_prev"]):
            raise Fault(ErrorCode.BAD_FIELD, pc, "LOAD has no previous module for a token")
        if u == Unit.STORE and (f["pop_next"] or f["push_next"]):
            raise Fault(ErrorCode.BAD_FIELD, pc, "STORE has no next module for a token")

    def pops(pc):
        u = units_of[pc].value
        f = instrs[pc][1]
        return ([(u - 1, u)] if f["pop_prev"] else []) + ([(u + 1, u)] if f["pop_next"] else [])

    def pushes(pc):
        u = units_of[pc].value
        f = instrs[pc][1]
        return ([(u, u - 1)] if f["push_prev"] else []) + ([(u, u + 1)] if f["push_next"] else [])

    names = {0: "LOAD", 1: "COMPUTE", 2: "STORE"}
    total = {(0, 1): 0, (1, 0): 0, (1, 2): 0, (2, 1): 0}
    for pc in range(len(instrs)):
        for k in pushes(pc):
            total[k] += 1
    pushed = {(0, 1): 0, (1, 0): 0, (1, 2): 0, (2, 1): 0}
    npop = {(0, 1): 0, (1, 0): 0, (1, 2): 0, (2, 1): 0}
    for pc in range(len(instrs)):
        for k in pops(pc):
            pushed[k] -= 1
            npop[k] += 1
            if npop[k] > total[k]:
                raise Fault(ErrorCode.DEADLOCK, pc,
                            f"dependency tokens deadlock: {instrs[pc][0].name} pops a "
                            f"{names[k[0]]}->{names[k[1]]} token that is never pushed")
            if pushed[k] < 0:
                raise Fault(ErrorCode.BAD_FIELD, pc,
                            f"{instrs[pc][0].name} pops a {names[k[0]]}->{names[k[1]]} token that "
                            f"no earlier instruction (in program order) pushes")
        for k in pushes(pc):
            pushed[k] += 1

    tok = {(0, 1): 0, (1, 0): 0, (1, 2): 0, (2, 1): 0}
    queues = [deque(), deque(), deque()]
    popped = [False, False, False]      # head of each module queue has taken its tokens
    fetch = 0
    n = len(instrs)
    depth, tdepth = config.cmd_depth, config.token_depth
    while True:
        progress = False
        while fetch < n and len(queues[units_of[fetch].value]) < depth:
            queues[units_of[fetch].value].append(fetch)
            fetch += 1
            progress = True
        for ui, q in enumerate(queues):
            while q:
                pc = q[0]
                if instrs[pc][0] == Opcode.END and (fetch < n or any(x for x in queues
                                                                     if x is not q)):
                    break
                if not popped[ui]:
                    if any(tok[k] == 0 for k in pops(pc)):
                        break
                    for k in pops(pc):
                        tok[k] -= 1
                    popped[ui] = True
                    progress = True
                if any(tok[k] >= tdepth for k in pushes(pc)):
                    break
                for k in pushes(pc):
                    tok[k] += 1
                q.popleft()
                popped[ui] = False
                progress = True
        if fetch == n and not any(queues):
            break
        if not progress:
            heads = [q[0] for q in queues if q]
            desc = ", ".join(f"{instrs[pc][0].name}@{pc}" for pc in heads)
            raise Fault(ErrorCode.DEADLOCK, heads[0] if heads else fetch,
                        f"dependency tokens deadlock; stuck: {desc}"
                        + (" (fetch blocked on a full instruction queue)" if fetch < n else ""))
    left = {f"{names[a]}->{names[b]}": c for (a, b), c in tok.items() if c}
    if left:
        raise Fault(ErrorCode.DEADLOCK, n - 1, f"tokens left unconsumed at END: {left}")


_ESIZE = {DType.I8: 1, DType.U8: 1, DType.I16: 2, DType.I32: 8}


class Machine:
    """Architectural state: DRAM, scratchpad, accumulators, index memory, row state, registers."""

    def __init__(self, config, dram: np.ndarray, regs=None):
        self.cfg = config
        self.dram = dram
        self.spad = np.zeros(config.spad_words, dtype=np.int64)
        self.acc = np.zeros((config.acc_lines, config.cols), dtype=np.int64)
        self.acc_valid = np.zeros(config.acc_lines, dtype=bool)   # lines holding partial sums
        self.idx = np.zeros((config.idx_entries, 2), dtype=np.int64)
        self.rs = units.RowState(config.rowstate_rows)
        self.regs = np.zeros(N_REGS, dtype=np.int64)
        if regs:
            for r, v in regs.items():
                if not 1 <= r < N_REGS:
                    raise ValueError(f"register {r} is not a host register (1..{N_REGS - 1})")
                self.regs[r] = int(v)
        self.qoff = np.zeros(config.max_experts, dtype=np.int64)
        self.qlen = np.zeros(config.max_experts, dtype=np.int64)
        self.sat = Sat()
        self.counters = {"instructions": 0, "macs": 0, "dram_read_bytes": 0,
                         "dram_write_bytes": 0, "skipped": 0}
        self.pc = 0
        self.writes = []

    # -- helpers -----------------------------------------------------------------------------

    def fault(self, code, msg):
        raise Fault(code, self.pc, msg)

    def field_check(self, cond, msg):
        if not cond:
            self.fault(ErrorCode.BAD_FIELD, msg)

    def spad_idx(self, base, rows, row_stride, cols, what):
        """Element addresses [rows, cols] of a row-major region; range-checked."""
        r = np.arange(rows, dtype=np.int64)[:, None] if np.ndim(rows) == 0 else \
            np.asarray(rows, dtype=np.int64)[:, None]
        a = base + r * row_stride + np.arange(cols, dtype=np.int64)[None, :]
        if a.size and (a.min() < 0 or a.max() >= self.cfg.spad_words):
            bad = int(a.max() if a.max() >= self.cfg.spad_words else a.min())
            self.fault(ErrorCode.SPAD_RANGE, f"{what}: scratchpad address {bad:#x} outside "
                       f"0..{self.cfg.spad_words - 1:#x}")
        return a

    def idx_check(self, lo, n, what):
        if n < 0:
            self.fault(ErrorCode.BAD_FIELD, f"{what}: negative count {n}")
        if lo < 0 or lo + n > self.cfg.idx_entries:
            self.fault(ErrorCode.IDX_RANGE, f"{what}: index entries {lo}..{lo + n - 1} outside "
                       f"0..{self.cfg.idx_entries - 1}")

    def shift_ok(self, s, what):
        s = np.asarray(s)
        if s.size and (s.min() < 0 or s.max() > 62):
            self.fault(ErrorCode.BAD_FIELD, f"{what}: shift {int(s.max())} outside 0..62")

    def dim_ok(self, v, what, lo=1):
        self.field_check(lo <= v <= self.cfg.max_dim, f"{what} = {v} outside {lo}.."
                         f"{self.cfg.max_dim}")

    def queue(self, q):
        if q >= self.cfg.max_experts:
            self.fault(ErrorCode.BAD_FIELD, f"queue {q} outside 0..{self.cfg.max_experts - 1}")
        off, ln = int(self.qoff[q]), int(self.qlen[q])
        self.idx_check(off, ln, f"queue {q}")
        return self.idx[off:off + ln, 0].copy(), self.idx[off:off + ln, 1].copy()

    # -- execution ---------------------------------------------------------------------------

    def step(self, op, f):
        self.counters["instructions"] += 1
        if f["pred_en"]:
            q = f["pred_q"]
            if q >= self.cfg.max_experts:
                self.fault(ErrorCode.BAD_FIELD, f"predicate queue {q} outside "
                           f"0..{self.cfg.max_experts - 1}")
            if self.qlen[q] == 0:
                self.counters["skipped"] += 1
                return False
        getattr(self, "op_" + op.name.lower())(f)
        return True

    def op_end(self, f):
        pass

    def op_mark(self, f):
        pass

    # LOAD / STORE ---------------------------------------------------------------------------

    def _dma_addrs(self, f, esize):
        """(dram byte addresses of each element's first byte, on-chip element addresses)."""
        blk = int(self.regs[f["blk_reg"]]) * f["blk_stride"] if f["blk_reg"] else 0
        run = f["run"]
        base = f["dram_addr"] + blk
        e = np.arange(run, dtype=np.int64)
        if f["mode"] == DmaMode.STRIDED:
            # range-check from the loops' extreme values before building any address array
            lo = hi = base
            for cnt, st in ((f["n2"], f["ds2"]), (f["n1"], f["ds1"]), (f["n0"], f["ds0"])):
                ext = (cnt - 1) * st
                lo, hi = lo + min(0, ext), hi + max(0, ext)
            hi += run * esize
            if lo < 0 or hi > len(self.dram):
                bad = lo if lo < 0 else hi - esize
                self.fault(ErrorCode.DRAM_RANGE, f"DRAM address {bad:#x} outside the window "
                           f"0..{len(self.dram) - 1:#x}")
            lim = self.cfg.spad_words if f["mem"] == Mem.SPAD else self.cfg.idx_entries
            shi = f["spad_addr"]
            for cnt, st in ((f["n2"], f["ss2"]), (f["n1"], f["ss1"]), (f["n0"], f["ss0"])):
                shi += (cnt - 1) * st
            shi += run - 1
            if shi >= lim:
                code = ErrorCode.SPAD_RANGE if f["mem"] == Mem.SPAD else ErrorCode.IDX_RANGE
                self.fault(code, f"{f['mem'].name} address {shi:#x} outside 0..{lim - 1:#x}")
            i2, i1, i0 = np.meshgrid(np.arange(f["n2"]), np.arange(f["n1"]), np.arange(f["n0"]),
                                     indexing="ij")
            i2, i1, i0 = (x.reshape(-1, 1).astype(np.int64) for x in (i2, i1, i0))
            d = base + i2 * f["ds2"] + i1 * f["ds1"] + i0 * f["ds0"] + e * esize
            s = f["spad_addr"] + i2 * f["ss2"] + i1 * f["ss1"] + i0 * f["ss0"] + e
        else:
            count = int(self.regs[f["count_reg"]]) if f["count_reg"] else f["n2"]
            self.idx_check(f["idx_addr"], count, "span list")
            sp = self.idx[f["idx_addr"]:f["idx_addr"] + count]
            if (sp[:, 1] < 0).any():
                self.fault(ErrorCode.BAD_FIELD, "span with negative length")
            total = int(sp[:, 1].sum()) if count else 0
            lim = self.cfg.spad_words if f["mem"] == Mem.SPAD else self.cfg.idx_entries
            if total > lim or (count and (sp[:, 0].min() < 0 or
                                          base + (int((sp[:, 0] + sp[:, 1]).max()) + 1) * f["ds0"]
                                          > len(self.dram) + abs(f["ds0"]) * 2)):
                self.fault(ErrorCode.DRAM_RANGE if total <= lim else ErrorCode.SPAD_RANGE,
                           f"span list selects rows outside the window ({total} rows)")
            rows = np.concatenate([np.arange(a, a + n, dtype=np.int64) for a, n in sp]) \
                if count else np.zeros(0, dtype=np.int64)
            q = np.arange(len(rows), dtype=np.int64)
            i1 = np.arange(f["n1"], dtype=np.int64)
            d = (base + i1[:, None, None] * f["ds1"] + rows[None, :, None] * f["ds0"]
                 + e[None, None, :] * esize).reshape(-1, run)
            s = (f["spad_addr"] + i1[:, None, None] * f["ss1"] + q[None, :, None] * f["ss0"]
                 + e[None, None, :]).reshape(-1, run)
        d = d.reshape(-1)
        s = s.reshape(-1)
        if d.size:
            lo, hi = int(d.min()), int(d.max()) + esize
            if lo < 0 or hi > len(self.dram):
                bad = lo if lo < 0 else hi - esize
                self.fault(ErrorCode.DRAM_RANGE, f"DRAM address {bad:#x} outside the window "
                           f"0..{len(self.dram) - 1:#x}")
            lim = self.cfg.spad_words if f["mem"] == Mem.SPAD else self.cfg.idx_entries
            code = ErrorCode.SPAD_RANGE if f["mem"] == Mem.SPAD else ErrorCode.IDX_RANGE
            if s.min() < 0 or s.max() >= lim:
                bad = int(s.max() if s.max() >= lim else s.min())
                self.fault(code, f"{f['mem'].name} address {bad:#x} outside 0..{lim - 1:#x}")
        return d, s

    def _dma_check(self, f):
        self.field_check(f["run"] >= 1, "run must be >= 1")
        self.field_check(f["n0"] >= 1 and f["n1"] >= 1, "n0 and n1 must be >= 1")
        self.field_check(f["mode"] == DmaMode.SPANS or f["n2"] >= 1, "n2 must be >= 1")
        if f["mem"] == Mem.IDX:
            self.field_check(f["dtype"] == DType.I32, "index-memory transfers must use dtype I32")
        else:
            self.field_check(f["dtype"] != DType.I32, "dtype I32 is for index memory only")

    def op_load(self, f):
        self._dma_check(f)
        es = _ESIZE[f["dtype"]]
        d, s = self._dma_addrs(f, es)
        dram = self.dram
        if f["dtype"] == DType.I8:
            v = dram[d].astype(np.int8).astype(np.int64)
        elif f["dtype"] == DType.U8:
            v = dram[d].astype(np.int64)
        elif f["dtype"] == DType.I16:
            v = (dram[d].astype(np.int64) | (dram[d + 1].astype(np.int64) << 8))
            v = np.where(v >= 32768, v - 65536, v)
        else:
            b = [dram[d + i].astype(np.int64) for i in range(8)]
            lo = b[0] | (b[1] << 8) | (b[2] << 16) | (b[3] << 24)
            hi = b[4] | (b[5] << 8) | (b[6] << 16) | (b[7] << 24)
            lo = np.where(lo >= 1 << 31, lo - (1 << 32), lo)
            hi = np.where(hi >= 1 << 31, hi - (1 << 32), hi)
        if f["mem"] == Mem.SPAD:
            self.spad[s] = v
        else:
            self.idx[s, 0] = lo
            self.idx[s, 1] = hi
        self.counters["dram_read_bytes"] += int(d.size) * es

    def op_store(self, f):
        self._dma_check(f)
        es = _ESIZE[f["dtype"]]
        d, s = self._dma_addrs(f, es)
        if f["mem"] == Mem.SPAD:
            v = self.spad[s]
            if f["dtype"] == DType.I8:
                raw = [self.sat(v, 8) & 0xFF]
            elif f["dtype"] == DType.U8:
                raw = [self.sat.unsigned(v, 8)]
            else:
                v = v & 0xFFFF
                raw = [v & 0xFF, v >> 8]
        else:
            a = self.idx[s, 0] & 0xFFFFFFFF
            b = self.idx[s, 1] & 0xFFFFFFFF
            raw = [(a >> (8 * i)) & 0xFF for i in range(4)] + [(b >> (8 * i)) & 0xFF
                                                                for i in range(4)]
        for i, r in enumerate(raw):
            self.dram[d + i] = r.astype(np.uint8)
        self.counters["dram_write_bytes"] += int(d.size) * es
        if self.writes is not None and d.size:
            self.writes.append((int(d.min()), int(d.max()) + es))

    # MATMUL ---------------------------------------------------------------------------------

    def op_matmul(self, f):
        cfg = self.cfg
        m, k, n = f["m"], f["k"], f["n"]
        self.dim_ok(m, "m")
        self.dim_ok(n, "n")
        self.field_check(1 <= k <= cfg.max_k, f"k = {k} outside 1..{cfg.max_k}")
        toks = probs = None
        rows = m
        if f["gather"] or f["scatter"] or f["out"] == OutMode.SPAD_ADD:
            toks, probs = self.queue(f["queue"])
            rows = len(toks)
            self.field_check(rows <= m, f"queue {f['queue']} holds {rows} tokens, more than "
                             f"m = {m}")
        self.field_check(not (f["out"] == OutMode.SPAD_ADD and not f["scatter"]),
                         "out = SPAD_ADD needs scatter = 1")
        tiles = -(-n // cfg.cols)
        # Architectural ACC region: tiles*m lines when partial sums are read or kept; an
        # instruction that neither reads nor keeps them uses min(tiles, 2)*m lines as scratch.
        arch = f["out"] == OutMode.ACC or f["acc_in"] != AccIn.ZERO
        used = (tiles if arch else min(tiles, 2)) * m
        if f["acc_addr"] + used > cfg.acc_lines:
            self.fault(ErrorCode.ACC_RANGE, f"accumulator lines {f['acc_addr']}.."
                       f"{f['acc_addr'] + used - 1} outside 0..{cfg.acc_lines - 1}")
        a_rows = toks if f["gather"] else np.arange(rows)
        a = self.spad[self.spad_idx(f["a_addr"], a_rows, f["a_stride"], k, "A")]
        if f["b_trans"]:
            b = self.spad[self.spad_idx(f["b_addr"], n, f["b_stride"], k, "B^T")].T
        else:
            b = self.spad[self.spad_idx(f["b_addr"], k, f["b_stride"], n, "B")]
        # ACC lines: element (i, j) at line acc_addr + (j // cols) * m + i, lane j % cols
        j = np.arange(n)
        lines = f["acc_addr"] + (j // cfg.cols)[None, :] * m + np.arange(rows)[:, None]
        lanes = np.broadcast_to(j % cfg.cols, lines.shape)
        rs_rows = None
        if f["acc_in"] == AccIn.SCALE or f["row_norm"]:
            lo = f["rs_base"]
            if lo + rows > cfg.rowstate_rows:
                self.fault(ErrorCode.ROWSTATE_RANGE, f"row state {lo}..{lo + rows - 1} outside "
                           f"0..{cfg.rowstate_rows - 1}")
            rs_rows = slice(lo, lo + rows)
        if f["acc_in"] != AccIn.ZERO:
            stale = ~self.acc_valid[np.unique(lines)]
            if stale.any():
                self.fault(ErrorCode.BAD_FIELD, "MATMUL reads accumulator lines that hold no "
                           "partial sums (never written, or clobbered by an epilogue MATMUL)")
        if f["acc_in"] not in (AccIn.ZERO, AccIn.ACC, AccIn.SCALE):
            self.fault(ErrorCode.BAD_FIELD, f"acc_in {f['acc_in']}")
        # every check comes before any state changes: a faulting instruction changes nothing
        if f["out"] == OutMode.ACC:
            self.field_check(not f["scatter"], "scatter needs an epilogue output")
        else:
            if f["chan_en"]:
                ch = self.spad[self.spad_idx(f["chan_addr"], n, 4, 4, "channel table")]
                bias = (ch[:, 1] << 16) | (ch[:, 0] & 0xFFFF)
                mult, shift = ch[:, 2], ch[:, 3]
            else:
                bias = np.zeros(n, dtype=np.int64)
                mult = np.full(n, f["mult"], dtype=np.int64)
                shift = np.full(n, f["shift"], dtype=np.int64)
            self.shift_ok(shift, "requantisation")
            self.shift_ok(f["act_shift"], "act_shift")
            self.shift_ok(f["res_shift"], "res_shift")
            out_rows = toks if f["scatter"] else np.arange(rows)
            residual = None
            if f["res_en"]:
                residual = self.spad[self.spad_idx(f["res_addr"], out_rows, f["out_stride"], n,
                                                   "residual")]
            act = {Act.NONE: "none", Act.GELU: "gelu", Act.RELU: "relu"}.get(f["act"])
            if act is None:
                self.fault(ErrorCode.BAD_FIELD, f"act {f['act']}")
            if f["out"] not in (OutMode.SPAD, OutMode.SPAD_ADD):
                self.fault(ErrorCode.BAD_FIELD, f"out {f['out']}")
            dst = self.spad_idx(f["out_addr"], out_rows, f["out_stride"], n, "output")
        prod = units.matmul_exact(a, b)
        if f["acc_in"] == AccIn.ZERO:
            acc = prod
        elif f["acc_in"] == AccIn.ACC:
            acc = self.sat(self.acc[lines, lanes] + prod, cfg.acc_bits)
        else:
            c = self.rs.c[rs_rows]
            acc = self.sat(rshift_round(self.acc[lines, lanes] * c[:, None], 15) + prod,
                           cfg.acc_bits)
        self.counters["macs"] += rows * k * n
        if f["out"] == OutMode.ACC:
            self.acc[lines, lanes] = acc
            self.acc_valid[np.unique(lines)] = True
            return
        # an epilogue MATMUL leaves the accumulator lines it used undefined
        self.acc_valid[f["acc_addr"]:f["acc_addr"] + used] = False
        row_r = row_k = None
        if f["row_norm"]:
            row_r, row_k = self.rs.r[rs_rows], self.rs.k[rs_rows]
        y = units.epilogue(acc, cfg, self.sat, bias=bias, mult=mult, shift=shift, act=act,
                           act_mult=f["act_mult"], act_shift=f["act_shift"], residual=residual,
                           res_mult=f["res_mult"], res_shift=f["res_shift"], row_r=row_r,
                           row_k=row_k)
        if f["out"] == OutMode.SPAD_ADD:
            y2 = rshift_round(y * probs[:, None], cfg.act_bits - 1)
            self.spad[dst] = self.sat(self.spad[dst] + y2, cfg.act_bits)
        else:
            self.spad[dst] = y

    # Row units ------------------------------------------------------------------------------

    def _mask(self, f, m, n):
        if f["kpos_spans"]:
            cnt = int(self.regs[f["count_reg"]]) if f["count_reg"] else f["n_spans"]
            self.idx_check(f["idx_addr"], cnt, "key spans")
            sp = self.idx[f["idx_addr"]:f["idx_addr"] + cnt]
            parts, have = [], 0
            for a, b in sp:                     # only the first n positions are needed
                if have >= n:
                    break
                take = int(max(0, min(b, n - have)))
                parts.append(np.arange(a, a + take, dtype=np.int64))
                have += take
            kpos = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
            if len(kpos) < n:
                self.fault(ErrorCode.BAD_FIELD, f"key spans cover {len(kpos)} positions, fewer "
                           f"than n = {n}")
            kpos = kpos[:n]
        else:
            kpos = f["k_pos"] + np.arange(n, dtype=np.int64)
        if not f["causal"]:
            return np.ones((m, n), dtype=bool)
        qpos = f["q_pos"] + np.arange(m, dtype=np.int64)
        return kpos[None, :] <= qpos[:, None]

    def op_softmax(self, f):
        m, n = f["m"], f["n"]
        self.dim_ok(m, "m")
        self.dim_ok(n, "n")
        self.field_check(f["mult"] >= 0, f"softmax mult must be >= 0, not {f['mult']}")
        self.shift_ok(f["shift"], "softmax shift")
        x = self.spad[self.spad_idx(f["in_addr"], m, f["in_stride"], n, "softmax input")]
        valid = self._mask(f, m, n)
        dst = self.spad_idx(f["out_addr"], m, f["out_stride"], n, "softmax output")
        if f["mode"] == SmMode.FULL:
            self.spad[dst] = units.softmax_full(x, valid, f["mult"], f["shift"], self.cfg,
                                                self.sat)
        else:
            lo = f["rs_base"]
            if lo + m > self.cfg.rowstate_rows:
                self.fault(ErrorCode.ROWSTATE_RANGE, f"row state {lo}..{lo + m - 1} outside "
                           f"0..{self.cfg.rowstate_rows - 1}")
            self.spad[dst] = units.softmax_online(x, valid, f["mult"], f["shift"], self.cfg,
                                                  self.sat, self.rs, slice(lo, lo + m),
                                                  first=bool(f["first"]), last=bool(f["last"]))

    def op_layernorm(self, f):
        m, n = f["m"], f["n"]
        self.dim_ok(m, "m")
        self.dim_ok(n, "n")
        self.shift_ok(f["shift"], "layernorm shift")
        self.field_check(f["eps_e"] <= 40, f"eps_e = {f['eps_e']} outside 0..40")
        x = self.spad[self.spad_idx(f["in_addr"], m, f["in_stride"], n, "layernorm input")]
        p = self.spad[self.spad_idx(f["param_addr"], n, 4, 4, "layernorm parameters")]
        gamma = p[:, 0]
        beta = (p[:, 2] << 16) | (p[:, 1] & 0xFFFF)
        dst = self.spad_idx(f["out_addr"], m, f["out_stride"], n, "layernorm output")
        self.spad[dst] = units.layernorm(x, gamma, beta, f["eps_m"], f["eps_e"], f["shift"],
                                         self.cfg, self.sat)

    def op_topk(self, f):
        m, n, k = f["m"], f["n"], f["k"]
        self.dim_ok(m, "m")
        self.dim_ok(n, "n")
        self.field_check(1 <= k <= min(self.cfg.max_topk, n),
                         f"k = {k} outside 1..{min(self.cfg.max_topk, n)}")
        x = self.spad[self.spad_idx(f["in_addr"], m, f["in_stride"], n, "topk input")]
        valid = None
        if f["causal"]:
            valid = np.arange(n)[None, :] <= (f["q_pos"] + np.arange(m))[:, None]
        idx, val = units.topk(x, k, valid)
        self.idx_check(f["idx_addr"], m * k, "topk output")
        self.idx[f["idx_addr"]:f["idx_addr"] + m * k, 0] = idx.reshape(-1)
        self.idx[f["idx_addr"]:f["idx_addr"] + m * k, 1] = val.reshape(-1)

    def op_route(self, f):
        m, k, ne = f["m"], f["k"], f["n_experts"]
        self.dim_ok(m, "m")
        self.field_check(1 <= k <= self.cfg.max_topk, f"k = {k} outside 1..{self.cfg.max_topk}")
        self.field_check(1 <= ne <= self.cfg.max_experts,
                         f"n_experts = {ne} outside 1..{self.cfg.max_experts}")
        self.idx_check(f["idx_addr"], m * k, "routing input")
        ent = self.idx[f["idx_addr"]:f["idx_addr"] + m * k]
        try:
            toks, ps, offs, lens = units.route(ent[:, 0].reshape(m, k), ent[:, 1].reshape(m, k),
                                               ne)
        except ValueError as e:
            self.fault(ErrorCode.ROUTE_RANGE, str(e))
        self.idx_check(f["q_addr"], len(toks), "expert queues")
        self.idx_check(f["qtab_addr"], ne, "queue table")
        qa, ia, nq = f["q_addr"], f["idx_addr"], len(toks)
        # the hardware's second pass re-reads the input while it writes the queues
        self.field_check(nq == 0 or qa >= ia + m * k or ia >= qa + nq,
                         f"expert queues {qa}..{qa + nq - 1} overlap the routing input "
                         f"{ia}..{ia + m * k - 1}")
        self.idx[qa:qa + len(toks), 0] = toks
        self.idx[qa:qa + len(toks), 1] = ps
        self.idx[f["qtab_addr"]:f["qtab_addr"] + ne, 0] = offs + qa
        self.idx[f["qtab_addr"]:f["qtab_addr"] + ne, 1] = lens
        self.qoff[:] = 0
        self.qlen[:] = 0
        self.qoff[:ne] = offs + qa
        self.qlen[:ne] = lens

    def op_spans(self, f):
        k = f["k"]
        self.field_check(f["block"] >= 1, "block must be >= 1")
        # spans lie in [0, limit): keeping limit below 2^31 keeps every start, length and row
        # count inside the 32-bit index entries and registers
        self.field_check(f["limit"] < (1 << 31), f"limit = {f['limit']} must be below 2^31")
        self.idx_check(f["idx_addr"], k, "block list")
        blocks = self.idx[f["idx_addr"]:f["idx_addr"] + k, 0]
        sp = units.spans(blocks, f["block"], f["sink"], f["diag_lo"], f["diag_n"], f["limit"])
        self.idx_check(f["out_addr"], len(sp), "span output")
        for i, (a, b) in enumerate(sp):
            self.idx[f["out_addr"] + i] = (a, b)
        if f["dst_reg"]:
            self.regs[f["dst_reg"]] = len(sp)
        if f["rows_reg"]:
            self.regs[f["rows_reg"]] = sum(b for _, b in sp)

    def op_select(self, f):
        cfg = self.cfg
        limit = f["limit"]
        self.field_check(f["budget"] >= 1, "budget must be >= 1")
        self.field_check(limit <= f["seq"], f"limit = {limit} exceeds seq = {f['seq']}")
        self.field_check(limit < (1 << 31), f"limit = {limit} must be below 2^31")
        cnt = int(self.regs[f["count_reg"]]) if f["count_reg"] else f["n_chunks"]
        self.idx_check(f["chunk_addr"], cnt, "chunk list")
        if limit > 0 and f["in_addr"] + limit > cfg.spad_words:
            self.fault(ErrorCode.SPAD_RANGE, f"chunk scores {f['in_addr']:#x}.."
                       f"{f['in_addr'] + limit - 1:#x} outside 0..{cfg.spad_words - 1:#x}")
        starts = self.idx[f["chunk_addr"]:f["chunk_addr"] + cnt, 0].copy()
        if cnt and (starts[0] < 0 or (np.diff(starts) <= 0).any()):
            self.fault(ErrorCode.BAD_FIELD, "chunk starts must be >= 0 and strictly ascending")
        s = self.spad[f["in_addr"]:f["in_addr"] + limit] if limit > 0 else \
            np.zeros(0, dtype=np.int64)
        sp = units.select(starts, f["seq"], limit, s, f["sink"], f["recent"], f["budget"], cfg)
        self.idx_check(f["out_addr"], len(sp), "span output")
        for i, (a, b) in enumerate(sp):
            self.idx[f["out_addr"] + i] = (a, b)
        if f["dst_reg"]:
            self.regs[f["dst_reg"]] = len(sp)
        if f["rows_reg"]:
            self.regs[f["rows_reg"]] = sum(b for _, b in sp)

    def op_vec(self, f):
        m, n, op = f["m"], f["n"], f["op"]
        self.dim_ok(m, "m")
        self.dim_ok(n, "n")
        self.shift_ok(f["sa"], "sa")
        self.shift_ok(f["sb"], "sb")
        group = f["group"]
        if op == VecOp.POOL:
            self.field_check(group >= 1, "POOL needs group >= 1")
            a = self.spad[self.spad_idx(f["a_addr"], m * group, f["a_stride"], n, "vec A")]
        else:
            a = self.spad[self.spad_idx(f["a_addr"], m, f["a_stride"], n, "vec A")]
        b = None
        if op in (VecOp.ADD, VecOp.MUL):
            b = self.spad[self.spad_idx(f["b_addr"], m, f["b_stride"], n, "vec B")]
        name = {VecOp.COPY: "copy", VecOp.ADD: "add", VecOp.MUL: "mul", VecOp.POOL: "pool"}[op]
        y = units.vec(name, a, b, f["ma"], f["sa"], f["mb"], f["sb"], max(group, 1), self.cfg,
                      self.sat)
        self.spad[self.spad_idx(f["out_addr"], m, f["out_stride"], n, "vec output")] = y

    def snapshot(self) -> dict:
        c = dict(self.counters)
        c["sat_events"] = self.sat.events
        return c


def simulate(config, dram: np.ndarray, n_instr: int, *, regs=None, trace: bool = False,
             check: bool = True, snapshot_spad: bool = False) -> RunResult:
    """Run the program in ``dram`` (code at address 0, ``n_instr`` instructions at most).

    Returns a :class:`RunResult` with the final DRAM image (a copy), the status (a fault halts the
    machine and is reported, never raised), the counters, the MARK snapshots and, with
    ``trace``, one record per executed instruction: pc, opcode, the DRAM byte ranges it wrote and
    a CRC of the DRAM after it. With ``snapshot_spad`` each MARK snapshot also holds a copy of
    the scratchpad (``counters["spad"]``), for per-layer reports.
    """
    dram = np.array(dram, dtype=np.uint8, copy=True)
    mach = Machine(config, dram, regs)
    res = RunResult(dram=dram)
    try:
        # The token protocol is checked over the decodable prefix of the program before anything
        # runs (a deadlocking program would hang the hardware until its watchdog fires). An
        # undecodable word faults when execution reaches it, after the instructions before it
        # have executed, as in the hardware.
        prefix = []
        try:
            prefix = decode_program(dram, n_instr)
        except Fault:
            prefix = None
        if check and prefix is not None:
            check_tokens(prefix, config)
        pc = 0
        while True:
            mach.pc = pc
            op, f = prefix[pc] if prefix is not None else _fetch(dram, pc, n_instr)
            mach.writes = []
            executed = mach.step(op, f)
            if op == Opcode.MARK and executed:
                snap = mach.snapshot()
                if snapshot_spad:
                    snap["spad"] = mach.spad.copy()
                res.marks.append((f["id"], snap))
            if trace:
                res.trace.append({"pc": pc, "op": op.name, "writes": list(mach.writes),
                                  "dram_crc": zlib.crc32(dram.tobytes())})
            if op == Opcode.END:
                break
            pc += 1
    except Fault as e:
        res.status, res.error_pc, res.message = e.code, e.pc, e.message
    res.counters = mach.snapshot()
    return res


def run_program(program, inputs=None, *, regs=None, trace=False) -> tuple[RunResult, dict]:
    """Run a :class:`vitamin.program.Program` with integer ``inputs`` {name: array}.

    Returns the result and the integer outputs {name: array}.
    """
    img = program.dram_image()
    for name, v in (inputs or {}).items():
        program.write_tensor(img, name, v)
    res = simulate(program.config, img, program.n_instr, regs=regs, trace=trace)
    outs = {s.name: program.read_tensor(res.dram, s.name) for s in program.outputs}
    return res, outs
