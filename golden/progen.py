"""Random valid programs, for differential tests of the RTL against the golden model.

:func:`random_program` draws instructions at random (shapes within the configuration, random
strides, epilogue options, predication, ...) and keeps only those that the golden model executes
without a fault: each candidate runs on a provisional :class:`~vitamin.golden.isasim.Machine`
that holds the program's DRAM tensors, and a candidate that faults is rolled back and redrawn.
Data-dependent constraints (span lists produced by SPANS, expert queues produced by ROUTE,
accumulator lines holding partial sums, registers written by SPANS) are therefore respected
without being modelled here.

Dependency tokens are the ones a compiler for the decoupled machine must emit: every
instruction records what it reads and writes (DRAM byte ranges, scratchpad and index-memory
ranges, the registers and queue registers); when an instruction conflicts with an earlier one of
another module, the last instruction of that module pushes a token and this one pops it. LOAD
and STORE have no token queue between them, so such a dependency is relayed by a MARK on the
COMPUTE module. Every push is popped by the next instruction that needs it, so no token is left
at END; :func:`vitamin.golden.isasim.check_tokens` accepts every generated program.

Two golden behaviours that streaming hardware does not reproduce are avoided (docs/ISA.md leaves
them to the program): a STORE whose DRAM elements overlap partially (golden writes byte planes),
and an instruction whose output region overlaps one of its own input regions unless
``allow_overlap=True``. A SPANS-mode LOAD never overwrites its own span list.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
from amaranth.lib import data

from vitamin import isa
from vitamin.asm import Assembler, Ref
from vitamin.config import get_config
from vitamin.isa import AccIn, Act, DmaMode, DType, Mem, Opcode, OutMode, SmMode, VecOp

from .isasim import Fault, Machine, check_tokens

__all__ = ["RandomProgram", "random_program", "GENERATED_OPCODES", "DEFAULT_OPCODES"]

#: Opcodes :func:`random_program` can draw (MARK also relays LOAD <-> STORE dependencies).
GENERATED_OPCODES = (Opcode.LOAD, Opcode.STORE, Opcode.MATMUL, Opcode.SOFTMAX,
                     Opcode.LAYERNORM, Opcode.TOPK, Opcode.ROUTE, Opcode.SPANS, Opcode.VEC,
                     Opcode.MARK, Opcode.SELECT)

#: Opcodes drawn when :func:`random_program` is not told which: every generated opcode but
#: SELECT. SELECT is drawn only on request (``opcodes=GENERATED_OPCODES``, as the RTL
#: differential tests do) until the v1 cost model (compiler/cost.py), whose exactness tests run
#: default programs, has a figure for it; leaving it out keeps those programs as they were.
DEFAULT_OPCODES = tuple(op for op in GENERATED_OPCODES if op != Opcode.SELECT)

_ES = {DType.I8: 1, DType.U8: 1, DType.I16: 2, DType.I32: 8}
_BASE = 4096      # provisional DRAM address of the first tensor (the linker's is 4 KiB aligned)


@dataclass
class RandomProgram:
    """A generated program with its integer inputs and host registers."""
    program: object
    inputs: dict
    regs: dict
    ops: list = field(default_factory=list)     # opcode names of the drawn instructions


@dataclass
class _Tensor:
    name: str
    kind: str
    dtype: str
    shape: tuple
    addr: int          # provisional DRAM address
    nbytes: int


@dataclass
class _Instr:
    op: Opcode
    fields: dict       # encodable fields, dram_addr as an absolute provisional address
    tensor: str | None
    fp: dict           # resource -> [(lo, hi, write)]
    unit: int


def _span(lo, hi, w):
    return (int(lo), int(hi), bool(w))


def _region(addr, rows, stride, cols):
    """[lo, hi) of a row-major scratchpad region (rows may be a row-index array)."""
    rows = np.atleast_1d(np.asarray(rows, dtype=np.int64))
    if rows.size == 0 or cols == 0:
        return (addr, addr)
    return (addr + int(rows.min()) * stride, addr + int(rows.max()) * stride + cols)


def _overlap(a, b):
    return a[0] < b[1] and b[0] < a[1]


class _Gen:
    def __init__(self, cfg, rng, opcodes, allow_overlap, dump=False):
        self.cfg = cfg
        self.rng = rng
        self.opcodes = [op for op in GENERATED_OPCODES if op in opcodes]
        self.allow_overlap = allow_overlap
        self.tensors = {}
        self.inputs = {}
        self.instrs: list[_Instr] = []
        self.ops = []
        top = _BASE

        def tensor(name, kind, shape, dtype, data=None):
            nonlocal top
            nb = int(np.prod(shape)) * {"i8": 1, "u8": 1, "i16": 2, "i32": 4}[dtype]
            self.tensors[name] = _Tensor(name, kind, dtype, tuple(shape), top, nb)
            top = -(-(top + nb) // 64) * 64
            if data is not None:
                self.inputs[name] = data

        r = rng
        small = r.integers(-3000, 3001, size=2048)
        small[r.integers(0, 2048, size=40)] = r.choice([-32768, 32767, -1, 0], size=40)
        tensor("in16", "input", (2048,), "i16", small.astype(np.int64))
        tensor("in8", "input", (1024,), "i8", r.integers(-128, 128, size=1024))
        tensor("inu8", "input", (512,), "u8", r.integers(0, 256, size=512))
        # channel tables / LayerNorm parameters: rows of 4 words with valid shifts
        ch = np.zeros((64, 4), dtype=np.int64)
        ch[:, 0] = r.integers(-30000, 30000, size=64)
        ch[:, 1] = r.integers(-3, 3, size=64)
        ch[:, 2] = r.integers(-32768, 32768, size=64)
        ch[:, 3] = r.integers(0, 24, size=64)
        tensor("chan", "input", (64, 4), "i16", ch)
        # index entries: span lists (start, length) with small rows, then generic entries
        idx = np.zeros((128, 2), dtype=np.int64)
        for s in range(0, 64, 8):
            starts = np.sort(r.choice(np.arange(0, 40), size=8, replace=False))
            idx[s:s + 8, 0] = starts
            idx[s:s + 8, 1] = r.integers(0, 4, size=8)
        idx[64:, 0] = r.integers(-1, 12, size=64)
        idx[64:, 1] = r.integers(-20000, 20000, size=64)
        tensor("inidx", "input", (128, 2), "i32", idx)
        tensor("out16", "output", (2048,), "i16")
        tensor("out8", "output", (1024,), "i8")
        tensor("outidx", "output", (128, 2), "i32")
        if dump:
            tensor("dump_spad", "output", (cfg.spad_words,), "i16")
            tensor("dump_idx", "output", (cfg.idx_entries, 2), "i32")
        self.size = top

        self.regs = {1: int(r.integers(0, 4)), 2: int(r.integers(0, 9)),
                     3: int(r.integers(1, 6)), 4: int(r.integers(0, 3))}
        dram = np.zeros(self.size, dtype=np.uint8)
        for name, v in self.inputs.items():
            t = self.tensors[name]
            dt = {"i8": "<i1", "u8": "u1", "i16": "<i2", "i32": "<i4"}[t.dtype]
            raw = np.asarray(v).astype(dt).tobytes()
            dram[t.addr:t.addr + len(raw)] = np.frombuffer(raw, np.uint8)
        self.mach = Machine(cfg, dram, dict(self.regs))
        self.last = {0: None, 1: None, 2: None}
        self.acc_parts = []      # (acc_addr, m, n) of MATMULs that left partial sums

    # -- helpers -------------------------------------------------------------------------------

    def ri(self, lo, hi):
        """Random integer in [lo, hi]."""
        return int(self.rng.integers(lo, hi + 1))

    def chance(self, p):
        return bool(self.rng.random() < p)

    def spad_place(self, size, avoid=()):
        """A scratchpad base for ``size`` words not overlapping the ``avoid`` intervals."""
        lim = self.cfg.spad_words
        for _ in range(20):
            # cluster addresses in the low 4 K words so that instructions share data
            hi = min(lim, 4096) if self.chance(0.8) else lim
            if size > hi:
                hi = lim
            if size > hi:
                return None
            a = self.ri(0, hi - size)
            if self.allow_overlap or not any(_overlap((a, a + size), v) for v in avoid):
                return a
        return None

    # -- instruction generators: return (fields, tensor name or None) or None --------------------

    def gen_load(self, store=False):
        cfg = self.cfg
        to_idx = self.chance(0.2)
        if to_idx:
            dt, mem = DType.I32, Mem.IDX
            tname = "outidx" if (store or self.chance(0.2)) else "inidx"
        else:
            dt = [DType.I16, DType.I16, DType.I8, DType.U8][self.ri(0, 3)]
            mem = Mem.SPAD
            if dt == DType.I16:
                tname = "out16" if (store or self.chance(0.2)) else "in16"
            else:
                tname = "out8" if (store or self.chance(0.2)) else \
                    ("in8" if dt == DType.I8 else "inu8")
        t = self.tensors[tname]
        es = _ES[dt]
        lim = cfg.spad_words if mem == Mem.SPAD else cfg.idx_entries
        spans_mode = self.chance(0.2)
        f = {"mem": mem, "dtype": dt, "mode": DmaMode.SPANS if spans_mode else DmaMode.STRIDED,
             "idx_addr": 0, "count_reg": 0, "blk_reg": 0, "blk_stride": 0,
             "ds2": 0, "ss2": 0}
        run = self.ri(1, 4) if mem == Mem.IDX else self.ri(1, 24)
        f["run"] = run
        row = run * es
        if spans_mode:
            lst = self.find_span_list(max_rows=40, min_rows=1 if self.chance(0.8) else 0)
            if lst is None:
                return None
            f["idx_addr"], cnt = lst
            f["n2"] = cnt
            same = [r for r in range(1, 16) if int(self.mach.regs[r]) == cnt]
            if same and self.chance(0.5):
                f["count_reg"] = same[self.ri(0, len(same) - 1)]
                f["n2"] = self.ri(0, 3)        # not used when count_reg != 0
            f["n0"] = 1
            f["n1"] = self.ri(1, 2)
            f["ds0"] = row + es * self.ri(0, 2)
            f["ds1"] = f["ds0"] * self.ri(0, 2)
            f["ss0"] = run + self.ri(0, 2)
            f["ss1"] = self.ri(0, 64)
        else:
            ns = [self.ri(1, 3), self.ri(1, 3), self.ri(1, 2)]
            f["n0"], f["n1"], f["n2"] = ns
            for i in range(3):
                c = self.rng.random()
                if c < 0.4:
                    ds = row * (1 if i == 0 else ns[0] if i == 1 else ns[0] * ns[1])
                elif c < 0.55:
                    ds = -row * self.ri(1, 2)
                elif c < 0.65:
                    ds = 0
                else:
                    ds = self.ri(0, 3 * row + 16)
                if store:
                    ds = ds // es * es      # whole elements: no partial overlaps
                f[f"ds{i}"] = ds
                f[f"ss{i}"] = run * (1 if i == 0 else ns[0] if i == 1 else ns[0] * ns[1]) \
                    if self.chance(0.6) else self.ri(0, 2 * run + 8)
        if self.chance(0.15):
            f["blk_reg"] = self.ri(1, 4)
            f["blk_stride"] = self.ri(0, 16) * es
        # place DRAM side inside the tensor, on-chip side inside the memory
        if spans_mode:
            rows = self.span_rows(f["idx_addr"], f["n2"] if not f["count_reg"]
                                  else int(self.mach.regs[f["count_reg"]]))
            if rows is None:
                return None
            rmax = max(rows) if rows else 0
            lo = min(0, (f["n1"] - 1) * f["ds1"])
            hi = max(0, (f["n1"] - 1) * f["ds1"]) + rmax * f["ds0"] + row
            total = len(rows)
            shi = (f["n1"] - 1) * f["ss1"] + max(total - 1, 0) * f["ss0"] + run
        else:
            lo = sum(min(0, (n - 1) * f[f"ds{i}"]) for i, n in enumerate(ns))
            hi = sum(max(0, (n - 1) * f[f"ds{i}"]) for i, n in enumerate(ns)) + row
            shi = sum((n - 1) * f[f"ss{i}"] for i, n in enumerate(ns)) + run
        blk = int(self.mach.regs[f["blk_reg"]]) * f["blk_stride"] if f["blk_reg"] else 0
        if hi - lo > t.nbytes or shi > lim:
            return None
        base = t.addr - lo + self.ri(0, (t.nbytes - (hi - lo)) // es) * es
        f["dram_addr"] = base - blk
        if f["dram_addr"] < 0:
            return None
        if mem == Mem.IDX and spans_mode and not store:
            # never overwrite the span list being read
            lst_iv = (f["idx_addr"], f["idx_addr"] + max(f["n2"], 8))
            for _ in range(10):
                a = self.ri(0, lim - shi)
                if not _overlap((a, a + shi), lst_iv):
                    break
            else:
                return None
            f["spad_addr"] = a
        else:
            f["spad_addr"] = self.ri(0, min(lim, 4096) - shi) if shi <= min(lim, 4096) else \
                self.ri(0, lim - shi)
        return f, tname

    def gen_store(self):
        return self.gen_load(store=True)

    def find_span_list(self, max_rows, min_rows=0):
        """(idx_addr, count) of a valid span list currently in index memory (lists that
        select at least ``min_rows`` rows preferred)."""
        idx = self.mach.idx
        cands = []
        for a in range(0, self.cfg.idx_entries - 8, 4):
            for cnt in (8, 4, 2, 1, 0):
                ent = idx[a:a + cnt]
                if cnt == 0 or ((ent[:, 1] >= 0).all() and (ent[:, 0] >= 0).all()
                                and int(ent[:, 1].sum()) <= max_rows
                                and int((ent[:, 0] + ent[:, 1]).max()) <= 64):
                    if cnt or self.chance(0.05):
                        cands.append((a, cnt))
                    break
        rows = {c: int(idx[c[0]:c[0] + c[1], 1].sum()) for c in cands}
        cands = [c for c in cands if c[1] > 0 and rows[c] >= min_rows] or \
            ([] if min_rows else cands)
        if not cands:
            return None
        return cands[self.ri(0, len(cands) - 1)]

    def span_rows(self, addr, cnt):
        if cnt < 0 or addr + cnt > self.cfg.idx_entries:
            return None
        ent = self.mach.idx[addr:addr + cnt]
        if cnt and ((ent[:, 1] < 0).any() or (ent[:, 0] < 0).any()
                    or int(ent[:, 1].sum()) > 64 or int((ent[:, 0] + ent[:, 1]).max()) > 64):
            return None
        return [r for a, n in ent for r in range(int(a), int(a + n))]

    def gen_vec(self):
        op = VecOp(self.ri(0, 3))
        m, n = self.ri(1, 6), self.ri(1, 20)
        group = self.ri(1, 3) if op == VecOp.POOL else self.ri(0, 2)
        a_rows = m * group if op == VecOp.POOL else m
        a_stride = n + self.ri(0, 4)
        b_stride = n + self.ri(0, 4)
        out_stride = n + self.ri(0, 4)
        a = self.spad_place((a_rows - 1) * a_stride + n)
        b = self.spad_place((m - 1) * b_stride + n)
        if a is None or b is None:
            return None
        ins = [(a, a + (a_rows - 1) * a_stride + n)]
        if op in (VecOp.ADD, VecOp.MUL):
            ins.append((b, b + (m - 1) * b_stride + n))
        o = self.spad_place((m - 1) * out_stride + n, ins)
        if o is None:
            return None
        ma = int(self.rng.integers(-32768, 32768)) if self.chance(0.3) else self.ri(-300, 300)
        return {"op": op, "m": m, "n": n, "group": group, "a_addr": a, "a_stride": a_stride,
                "b_addr": b, "b_stride": b_stride, "out_addr": o, "out_stride": out_stride,
                "ma": ma, "sa": self.ri(0, 20), "mb": self.ri(-500, 500),
                "sb": self.ri(0, 20)}, None

    def gen_matmul(self):
        cfg = self.cfg
        m, k, n = self.ri(1, 6), self.ri(1, 16), self.ri(1, 12)
        tiles = -(-n // cfg.cols)
        f = {"m": m, "k": k, "n": n, "b_trans": int(self.chance(0.4)),
             "acc_in": AccIn.ZERO, "out": OutMode.SPAD, "act": Act(self.ri(0, 2)),
             "chan_en": 0, "res_en": 0, "row_norm": 0, "gather": 0, "scatter": 0, "queue": 0,
             "mult": self.ri(-32768, 32767), "shift": self.ri(8, 30),
             "act_mult": self.ri(-32768, 32767), "act_shift": self.ri(0, 20),
             "res_mult": self.ri(-32768, 32767), "res_shift": self.ri(0, 20), "rs_base": 0}
        if self.chance(0.25):
            f["out"] = OutMode.ACC
        parts = [p for p in self.acc_parts if self.mach.acc_valid[p[0]]]
        if self.chance(0.4) and parts:
            # accumulate onto the partial sums of an earlier out = ACC MATMUL (same m, n)
            f["acc_addr"], m, n = parts[self.ri(0, len(parts) - 1)]
            f["m"], f["n"] = m, n
            tiles = -(-n // cfg.cols)
            f["acc_in"] = AccIn.SCALE if self.chance(0.3) else AccIn.ACC
        else:
            used = tiles * m if (f["out"] == OutMode.ACC) else min(tiles, 2) * m
            if used > cfg.acc_lines:
                return None
            f["acc_addr"] = self.ri(0, cfg.acc_lines - used)
        if f["acc_in"] == AccIn.SCALE or self.chance(0.15):
            f["row_norm"] = int(f["out"] != OutMode.ACC and self.chance(0.7))
            f["rs_base"] = self.ri(0, max(0, cfg.rowstate_rows - m))
        if self.chance(0.2):
            f["chan_en"] = 1
        rows = np.arange(m)
        qn = [q for q in range(cfg.max_experts) if self.mach.qlen[q] > 0]
        if qn and self.chance(0.35):
            q = qn[self.ri(0, len(qn) - 1)]
            f["queue"] = q
            f["gather"] = int(self.chance(0.6))
            f["scatter"] = int(f["out"] != OutMode.ACC and self.chance(0.6))
            if f["scatter"] and self.chance(0.5):
                f["out"] = OutMode.SPAD_ADD
            toks = self.mach.idx[int(self.mach.qoff[q]):
                                 int(self.mach.qoff[q] + self.mach.qlen[q]), 0]
            if len(toks) > m or (toks < 0).any() or (toks > 64).any():
                return None
            a_rows = toks if f["gather"] else np.arange(len(toks))
            out_rows = toks if f["scatter"] else np.arange(len(toks))
        else:
            a_rows = out_rows = rows
        a_stride = k + self.ri(0, 3)
        f["a_stride"] = a_stride
        b_rows, b_cols = (n, k) if f["b_trans"] else (k, n)
        f["b_stride"] = b_cols + self.ri(0, 3)
        f["out_stride"] = n + self.ri(0, 3)
        a_sz = _region(0, a_rows, a_stride, k)[1]
        b_sz = (b_rows - 1) * f["b_stride"] + b_cols
        f["a_addr"] = self.spad_place(a_sz)
        f["b_addr"] = self.spad_place(b_sz)
        f["chan_addr"] = self.spad_place(4 * n)
        f["res_addr"] = self.spad_place(_region(0, out_rows, f["out_stride"], n)[1])
        ins = [(f["a_addr"], f["a_addr"] + a_sz), (f["b_addr"], f["b_addr"] + b_sz)]
        if f["chan_en"]:
            ins.append((f["chan_addr"], f["chan_addr"] + 4 * n))
        if f["res_en"]:
            ins.append((f["res_addr"], f["res_addr"] + _region(0, out_rows, f["out_stride"],
                                                                 n)[1]))
        f["out_addr"] = self.spad_place(_region(0, out_rows, f["out_stride"], n)[1], ins)
        if any(f[x] is None for x in ("a_addr", "b_addr", "chan_addr", "res_addr", "out_addr")):
            return None
        f["res_en"] = int(self.chance(0.2))
        if f["res_en"] and not self.allow_overlap and _overlap(
                (f["res_addr"], f["res_addr"] + _region(0, out_rows, f["out_stride"], n)[1]),
                (f["out_addr"], f["out_addr"] + _region(0, out_rows, f["out_stride"], n)[1])):
            f["res_en"] = 0
        return f, None

    def gen_softmax(self):
        cfg = self.cfg
        m, n = self.ri(1, 6), self.ri(1, 24)
        online = self.chance(0.4)
        f = {"mode": SmMode.ONLINE if online else SmMode.FULL, "first": int(self.chance(0.5)),
             "last": int(self.chance(0.5)), "causal": int(self.chance(0.4)),
             "kpos_spans": 0, "count_reg": 0, "m": m, "n": n,
             "in_stride": n + self.ri(0, 3), "out_stride": n + self.ri(0, 3),
             "mult": self.ri(0, 32767), "shift": self.ri(0, 24),
             "q_pos": self.ri(0, 40), "k_pos": self.ri(0, 40), "idx_addr": 0, "n_spans": 0,
             "rs_base": self.ri(0, max(0, cfg.rowstate_rows - m))}
        if self.chance(0.3):
            lst = self.find_span_list(max_rows=64, min_rows=1)
            rows = self.span_rows(*lst) if lst is not None else None
            if rows:
                # n key positions come from the span list: at most as many as it covers
                f["kpos_spans"] = 1
                f["idx_addr"], f["n_spans"] = lst
                f["n"] = n = self.ri(1, min(n, len(rows)))
                f["in_stride"] = n + self.ri(0, 3)
                f["out_stride"] = n + self.ri(0, 3)
        f["in_addr"] = self.spad_place((m - 1) * f["in_stride"] + n)
        if f["in_addr"] is None:
            return None
        ins = [(f["in_addr"], f["in_addr"] + (m - 1) * f["in_stride"] + n)]
        f["out_addr"] = self.spad_place((m - 1) * f["out_stride"] + n, ins)
        if f["out_addr"] is None:
            return None
        return f, None

    def gen_layernorm(self):
        m, n = self.ri(1, 5), self.ri(1, 24)
        f = {"m": m, "n": n, "in_stride": n + self.ri(0, 3), "out_stride": n + self.ri(0, 3),
             "eps_m": self.ri(0, 65535), "eps_e": self.ri(0, 20), "shift": self.ri(0, 20)}
        f["in_addr"] = self.spad_place((m - 1) * f["in_stride"] + n)
        f["param_addr"] = self.spad_place(4 * n)
        if f["in_addr"] is None or f["param_addr"] is None:
            return None
        ins = [(f["in_addr"], f["in_addr"] + (m - 1) * f["in_stride"] + n),
               (f["param_addr"], f["param_addr"] + 4 * n)]
        f["out_addr"] = self.spad_place((m - 1) * f["out_stride"] + n, ins)
        if f["out_addr"] is None:
            return None
        return f, None

    def gen_topk(self):
        cfg = self.cfg
        m, n = self.ri(1, 6), self.ri(1, 16)
        k = self.ri(1, min(cfg.max_topk, n))
        f = {"causal": int(self.chance(0.3)), "k": k, "m": m, "n": n,
             "in_stride": n + self.ri(0, 3), "q_pos": self.ri(0, 20)}
        f["in_addr"] = self.spad_place((m - 1) * f["in_stride"] + n)
        if f["in_addr"] is None or m * k > cfg.idx_entries:
            return None
        f["idx_addr"] = self.ri(0, cfg.idx_entries - m * k)
        return f, None

    def gen_route(self):
        cfg = self.cfg
        m, k = self.ri(1, 8), self.ri(1, min(cfg.max_topk, 3))
        ne = self.ri(1, cfg.max_experts)
        # inputs: entries whose experts lie in -1 .. ne - 1 (TOPK results or loaded entries)
        idx = self.mach.idx
        def ok(a):
            e = idx[a:a + m * k, 0]
            if not ((e >= -1) & (e < ne)).all():
                return False
            # a token selects an expert at most once (a SPAD_ADD queue must not repeat a token)
            rows = e.reshape(m, k)
            return all(len(set(r[r >= 0])) == int((r >= 0).sum()) for r in rows)

        starts = self.rng.permutation(cfg.idx_entries - m * k + 1)[:96]
        cands = [int(a) for a in starts if ok(a)]
        if not cands:
            return None
        ia = cands[self.ri(0, len(cands) - 1)]
        n_q = m * k
        for _ in range(10):
            qa = self.ri(0, cfg.idx_entries - n_q)
            ta = self.ri(0, cfg.idx_entries - ne)
            iv_in = (ia, ia + m * k)
            if self.allow_overlap or not (_overlap((qa, qa + n_q), iv_in) or
                                          _overlap((ta, ta + ne), iv_in) or
                                          _overlap((qa, qa + n_q), (ta, ta + ne))):
                break
        else:
            return None
        return {"k": k, "n_experts": ne, "m": m, "idx_addr": ia, "q_addr": qa,
                "qtab_addr": ta}, None

    def gen_spans(self):
        cfg = self.cfg
        k = self.ri(0, 6)
        f = {"k": k, "idx_addr": self.ri(0, cfg.idx_entries - k), "block": self.ri(1, 8),
             "sink": self.ri(0, 2), "diag_lo": self.ri(-2, 5), "diag_n": self.ri(0, 3),
             "limit": self.ri(1, 64), "dst_reg": self.ri(5, 7) if self.chance(0.8) else 0,
             "rows_reg": self.ri(8, 9) if self.chance(0.5) else 0}
        worst = k + f["sink"] + f["diag_n"] + 1
        for _ in range(10):
            oa = self.ri(0, cfg.idx_entries - worst)
            if self.allow_overlap or not _overlap((oa, oa + worst),
                                                  (f["idx_addr"], f["idx_addr"] + k)):
                f["out_addr"] = oa
                return f, None
        return None

    def find_chunk_list(self):
        """(chunk_addr, count) of entries whose w0 are >= 0 and strictly ascending (SELECT);
        lists of several chunks preferred."""
        w0 = self.mach.idx[:, 0]
        n_ent = self.cfg.idx_entries
        ok = (w0 >= 0) & (w0 < 64)
        asc = np.concatenate([w0[1:] > w0[:-1], [False]])
        cands = []
        for a in np.flatnonzero(ok):
            a = int(a)
            cnt = 1
            while cnt < 8 and a + cnt < n_ent and ok[a + cnt] and asc[a + cnt - 1]:
                cnt += 1
            cands.append((a, cnt))
        longer = [c for c in cands if c[1] >= 2]
        if longer and self.chance(0.8):
            cands = longer
        if not cands or self.chance(0.05):
            return self.ri(0, n_ent), 0
        a, cnt = cands[self.ri(0, len(cands) - 1)]
        return a, (cnt if self.chance(0.7) else self.ri(1, cnt))

    def gen_select(self):
        cfg = self.cfg
        ca, cnt = self.find_chunk_list()
        limit = self.ri(0, 64) if self.chance(0.9) else 0
        f = {"n_chunks": cnt, "count_reg": 0, "chunk_addr": ca, "limit": limit,
             "seq": limit + self.ri(0, 8), "sink": self.ri(0, 3) if self.chance(0.6) else 0,
             "recent": self.ri(0, 5) if self.chance(0.6) else 0, "budget": self.ri(1, limit + 4),
             "dst_reg": self.ri(5, 7) if self.chance(0.8) else 0,
             "rows_reg": self.ri(8, 9) if self.chance(0.5) else 0}
        same = [r for r in range(1, 16) if int(self.mach.regs[r]) == cnt]
        if same and self.chance(0.4):
            f["count_reg"] = same[self.ri(0, len(same) - 1)]
            f["n_chunks"] = self.ri(0, 3)        # not used when count_reg != 0
        f["in_addr"] = self.spad_place(max(limit, 1))
        if f["in_addr"] is None:
            return None
        worst = cnt + 2
        f["out_addr"] = self.ri(0, cfg.idx_entries - worst)
        return f, None

    def gen_mark(self):
        return {"id": self.ri(0, 65535)}, None

    # -- footprints and tokens -----------------------------------------------------------------

    def footprint(self, op, f, mach):
        """What the instruction reads and writes: {resource: [(lo, hi, write)]} (conservative)."""
        fp = {"dram": [], "spad": [], "idx": [], "ctl": []}
        if f.get("pred_en"):
            fp["ctl"].append(_span(0, 1, False))
        if op in (Opcode.LOAD, Opcode.STORE):
            es = _ES[f["dtype"]]
            d, s = mach._dma_addrs(f, es)
            chip = "spad" if f["mem"] == Mem.SPAD else "idx"
            load = op == Opcode.LOAD
            if d.size:
                fp["dram"].append(_span(d.min(), d.max() + es, not load))
                fp[chip].append(_span(s.min(), s.max() + 1, load))
            if f["mode"] == DmaMode.SPANS:
                cnt = int(mach.regs[f["count_reg"]]) if f["count_reg"] else f["n2"]
                fp["idx"].append(_span(f["idx_addr"], f["idx_addr"] + cnt, False))
            if f["blk_reg"] or (f["mode"] == DmaMode.SPANS and f["count_reg"]):
                fp["ctl"].append(_span(0, 1, False))
        elif op == Opcode.VEC:
            ar = f["m"] * (f["group"] if f["op"] == VecOp.POOL else 1)
            fp["spad"].append(_span(*_region(f["a_addr"], np.arange(ar), f["a_stride"],
                                             f["n"]), False))
            if f["op"] in (VecOp.ADD, VecOp.MUL):
                fp["spad"].append(_span(*_region(f["b_addr"], np.arange(f["m"]), f["b_stride"],
                                                 f["n"]), False))
            fp["spad"].append(_span(*_region(f["out_addr"], np.arange(f["m"]), f["out_stride"],
                                             f["n"]), True))
        elif op == Opcode.MATMUL:
            uses_q = f["gather"] or f["scatter"] or f["out"] == OutMode.SPAD_ADD
            rows = np.arange(f["m"])
            a_rows = out_rows = rows
            if uses_q:
                q = f["queue"]
                off, ln = int(mach.qoff[q]), int(mach.qlen[q])
                toks = mach.idx[off:off + ln, 0]
                fp["idx"].append(_span(off, off + ln, False))
                fp["ctl"].append(_span(0, 1, False))
                a_rows = toks if f["gather"] else np.arange(ln)
                out_rows = toks if f["scatter"] else np.arange(ln)
            k, n = f["k"], f["n"]
            fp["spad"].append(_span(*_region(f["a_addr"], a_rows, f["a_stride"], k), False))
            b_rows, b_cols = (n, k) if f["b_trans"] else (k, n)
            fp["spad"].append(_span(*_region(f["b_addr"], np.arange(b_rows), f["b_stride"],
                                             b_cols), False))
            if f["out"] != OutMode.ACC:
                if f["chan_en"]:
                    fp["spad"].append(_span(f["chan_addr"], f["chan_addr"] + 4 * n, False))
                if f["res_en"]:
                    fp["spad"].append(_span(*_region(f["res_addr"], out_rows, f["out_stride"],
                                                     n), False))
                fp["spad"].append(_span(*_region(f["out_addr"], out_rows, f["out_stride"], n),
                                        True))
        elif op == Opcode.SOFTMAX:
            m, n = f["m"], f["n"]
            fp["spad"].append(_span(*_region(f["in_addr"], np.arange(m), f["in_stride"], n),
                                    False))
            fp["spad"].append(_span(*_region(f["out_addr"], np.arange(m), f["out_stride"], n),
                                    True))
            if f["kpos_spans"]:
                cnt = int(mach.regs[f["count_reg"]]) if f["count_reg"] else f["n_spans"]
                fp["idx"].append(_span(f["idx_addr"], f["idx_addr"] + cnt, False))
                if f["count_reg"]:
                    fp["ctl"].append(_span(0, 1, False))
        elif op == Opcode.LAYERNORM:
            m, n = f["m"], f["n"]
            fp["spad"].append(_span(*_region(f["in_addr"], np.arange(m), f["in_stride"], n),
                                    False))
            fp["spad"].append(_span(f["param_addr"], f["param_addr"] + 4 * n, False))
            fp["spad"].append(_span(*_region(f["out_addr"], np.arange(m), f["out_stride"], n),
                                    True))
        elif op == Opcode.TOPK:
            m, n, k = f["m"], f["n"], f["k"]
            fp["spad"].append(_span(*_region(f["in_addr"], np.arange(m), f["in_stride"], n),
                                    False))
            fp["idx"].append(_span(f["idx_addr"], f["idx_addr"] + m * k, True))
        elif op == Opcode.ROUTE:
            m, k, ne = f["m"], f["k"], f["n_experts"]
            fp["idx"].append(_span(f["idx_addr"], f["idx_addr"] + m * k, False))
            fp["idx"].append(_span(f["q_addr"], f["q_addr"] + m * k, True))
            fp["idx"].append(_span(f["qtab_addr"], f["qtab_addr"] + ne, True))
            fp["ctl"].append(_span(0, 1, True))
        elif op == Opcode.SELECT:
            cnt = int(mach.regs[f["count_reg"]]) if f["count_reg"] else f["n_chunks"]
            fp["idx"].append(_span(f["chunk_addr"], f["chunk_addr"] + cnt, False))
            fp["spad"].append(_span(f["in_addr"], f["in_addr"] + f["limit"], False))
            fp["idx"].append(_span(f["out_addr"], f["out_addr"] + cnt + 2, True))
            if f["count_reg"]:
                fp["ctl"].append(_span(0, 1, False))
            if f["dst_reg"] or f["rows_reg"]:
                fp["ctl"].append(_span(0, 1, True))
        elif op == Opcode.SPANS:
            k = f["k"]
            fp["idx"].append(_span(f["idx_addr"], f["idx_addr"] + k, False))
            worst = k + f["sink"] + f["diag_n"] + 1
            fp["idx"].append(_span(f["out_addr"], f["out_addr"] + worst, True))
            if f["dst_reg"] or f["rows_reg"]:
                fp["ctl"].append(_span(0, 1, True))
        return fp

    @staticmethod
    def conflict(a, b):
        for res, ivs in a.items():
            for lo, hi, w in ivs:
                for lo2, hi2, w2 in b.get(res, ()):
                    if (w or w2) and lo < hi2 and lo2 < hi:
                        return True
        return False

    def depend(self, j_unit, fp):
        """Token bits for a new instruction of ``j_unit`` with footprint ``fp``; may first
        append a relay MARK. Returns the header fields of the new instruction."""
        hdr = {}
        need = {u: False for u in (0, 1, 2) if u != j_unit}
        for ins in self.instrs:
            if ins.unit != j_unit and self.conflict(ins.fp, fp):
                need[ins.unit] = True
        far = [u for u in need if need[u] and abs(u - j_unit) == 2]
        if far:
            # relay through COMPUTE: a MARK waits for the far module, then signals this one
            relay_hdr = self.edge(far[0], 1)
            mark = {"id": 0xFFFF, **relay_hdr}
            self.instrs.append(_Instr(Opcode.MARK, mark, None, {}, 1))
            self.last[1] = len(self.instrs) - 1
            need[1] = True
        for u in (0, 1, 2):
            if u != j_unit and abs(u - j_unit) == 1 and need[u]:
                hdr.update(self.edge(u, j_unit))
        return hdr

    def edge(self, u, v):
        """Make the last instruction of module ``u`` push a token to ``v``; returns the pop
        bits for the (next) instruction of ``v``."""
        li = self.last[u]
        if li is None:
            return {}
        push = "push_next" if v > u else "push_prev"
        pop = "pop_prev" if u < v else "pop_next"
        ins = self.instrs[li]
        if ins.fields.get(push):
            # already pushed to v, and that token was popped by an earlier instruction of v,
            # which (in order) precedes this one: the dependency holds already
            return {}
        ins.fields[push] = 1
        return {pop: 1}

    # -- main loop ------------------------------------------------------------------------------

    def add(self, op, f, tname):
        """Try ``op`` with fields ``f`` on the provisional machine; keep it when it runs."""
        mach = self.mach
        fields = dict(f)
        if op in (Opcode.LOAD, Opcode.STORE):
            fields.setdefault("n0", 1)
            fields.setdefault("n1", 1)
            fields.setdefault("n2", 1)
        for name, _ in data_fields(op):
            fields.setdefault(name, 0)
        try:
            word = isa.encode(op, **fields)
        except ValueError:
            return False
        _, dec = isa.decode(word)
        # golden's view of the fields (signed fields decoded) drives footprint and execution
        saved = copy.deepcopy((mach.spad, mach.acc, mach.acc_valid, mach.idx, mach.regs,
                               mach.qoff, mach.qlen, mach.rs.__dict__, mach.sat.events,
                               mach.counters))
        dram_saved = mach.dram.copy() if op == Opcode.STORE else None
        try:
            fp = self.footprint(op, dec, mach)
            if op in (Opcode.LOAD, Opcode.STORE) and fp["dram"]:
                t = self.tensors[tname]
                lo, hi, _ = fp["dram"][0]
                if lo < t.addr or hi > t.addr + t.nbytes:
                    raise Fault(isa.ErrorCode.DRAM_RANGE, 0, "outside the tensor")
            mach.pc = len(self.instrs)
            mach.step(op, dec)
        except Fault:
            (mach.spad, mach.acc, mach.acc_valid, mach.idx, mach.regs, mach.qoff, mach.qlen,
             rsd, mach.sat.events, mach.counters) = saved
            mach.rs.__dict__.update(rsd)
            if dram_saved is not None:
                mach.dram[:] = dram_saved
            return False
        unit = isa.UNIT_OF[op].value
        hdr = self.depend(unit, fp)
        fields.update(hdr)
        self.instrs.append(_Instr(op, fields, tname, fp, unit))
        self.last[unit] = len(self.instrs) - 1
        self.ops.append(op.name)
        if op == Opcode.MATMUL and dec["out"] == OutMode.ACC:
            self.acc_parts.append((dec["acc_addr"], dec["m"], dec["n"]))
        return True

    def dump(self):
        """STOREs of the whole scratchpad and index memory, so that a comparison of the final
        DRAM sees every on-chip result."""
        cfg = self.cfg
        run = min(cfg.spad_words, 1 << 15)
        ok = self.add(Opcode.STORE, {"mem": Mem.SPAD, "dtype": DType.I16, "run": run,
                                     "n0": cfg.spad_words // run, "ds0": 2 * run, "ss0": run,
                                     "dram_addr": self.tensors["dump_spad"].addr,
                                     "spad_addr": 0}, "dump_spad")
        ok &= self.add(Opcode.STORE, {"mem": Mem.IDX, "dtype": DType.I32,
                                      "run": cfg.idx_entries,
                                      "dram_addr": self.tensors["dump_idx"].addr,
                                      "spad_addr": 0}, "dump_idx")
        assert ok, "the state dump must always be valid"

    def draw(self):
        op = self.opcodes[self.ri(0, len(self.opcodes) - 1)]
        gen = getattr(self, f"gen_{op.name.lower()}")
        for _ in range(12):
            got = gen()
            if got is None:
                continue
            f, tname = got
            if self.chance(0.1):
                f["pred_en"] = 1
                f["pred_q"] = self.ri(0, self.cfg.max_experts - 1)
            if self.add(op, f, tname):
                return True
        return False


def data_fields(op):
    """(name, field) of the non-header fields of ``op``'s format."""
    return [(n, f) for n, f in data.Layout.cast(isa.FORMATS[op]) if n != "hdr"]


def random_program(config, rng, n_instr=30, *, opcodes=None, allow_overlap=False,
                   dump=False, name="progen") -> RandomProgram:
    """A random program of about ``n_instr`` instructions that golden runs without a fault.

    Parameters
    ----------
    config : Config or str
    rng : numpy.random.Generator or int
    n_instr : int
        Instructions drawn (relay MARKs and END come on top).
    opcodes : iterable of Opcode, optional
        Opcodes to draw from (default :data:`DEFAULT_OPCODES`; at most
        :data:`GENERATED_OPCODES`); restrict it to the units an accelerator build has.
    allow_overlap : bool
        Allow an instruction's output region to overlap its own inputs.
    dump : bool
        End with STOREs of the whole scratchpad (output ``dump_spad``) and index memory
        (``dump_idx``), so that comparing the final DRAM compares every on-chip result.
    """
    cfg = get_config(config)
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    ops = set(DEFAULT_OPCODES if opcodes is None else (Opcode(o) for o in opcodes))
    unknown = ops - set(GENERATED_OPCODES) - {Opcode.END}
    if unknown:
        raise ValueError(f"cannot generate {sorted(o.name for o in unknown)}")
    ops.discard(Opcode.END)
    gen = _Gen(cfg, rng, ops, allow_overlap, dump)
    if gen.opcodes:
        for _ in range(n_instr):
            gen.draw()
    if dump:
        gen.dump()

    asm = Assembler(cfg)
    for t in gen.tensors.values():
        asm.tensor(t.name, t.kind, t.shape, t.dtype)
    for r in sorted(gen.regs):
        asm.reg(f"r{r}", r, gen.regs[r], gen.regs[r])
    for ins in gen.instrs:
        f = dict(ins.fields)
        if ins.tensor is not None:
            t = gen.tensors[ins.tensor]
            f["dram_addr"] = Ref(t.name, f["dram_addr"] - t.addr)
        asm.emit(ins.op, **f)
    asm.end()
    prog = asm.link()
    prog.meta["generator"] = name
    # the token protocol must be acceptable to golden (raises Fault otherwise)
    check_tokens([isa.decode(prog.code[i * 64:(i + 1) * 64]) for i in range(prog.n_instr)], cfg)
    return RandomProgram(prog, gen.inputs, dict(gen.regs), gen.ops)

