"""Lowering: canonical IR graph + quantisation plan -> vitamin program.

Strategy (activation-resident, weight-streaming):

* Every activation lives in the scratchpad for its lifetime (allocated first-fit, freed after its
  last use). A model whose live activations do not fit is rejected with the node and the sizes.
* Weights stream from DRAM in column tiles through two scratchpad buffers (double buffering):
  the load of tile t+2 is issued after the last MATMUL of tile t and waits for that MATMUL's
  "buffer free" token, so weight loads overlap compute, across layer boundaries too.
* Small constants (LayerNorm parameters, position embeddings, CLS rows) are loaded once at start.
* Fusion: linear -> (gelu | relu) -> add(residual) and linear -> mul(scalar) become one MATMUL with
  its epilogue; row selection, column slices, reshapes and concatenation are views (no copies).
* Attention: per head, S = Q_h K_h^T (scores stay on chip), softmax in place, O_h = P V_h written
  to the head's columns of the output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from vitamin.asm import Assembler
from vitamin.golden.numerics import requant_params
from vitamin.isa import Act, DType, OutMode

from . import ir
from .quantize import QuantPlan, quantize_weight

__all__ = ["lower", "View", "TASK_REG"]

#: Register that holds the task index of a multi-task program (set by the host before START).
TASK_REG = 1


@dataclass
class View:
    """A 2-D activation in the scratchpad."""
    addr: int
    rows: int
    cols: int
    stride: int
    buf: int            # id of the owning buffer


class _Alloc:
    """First-fit allocator of scratchpad words."""

    def __init__(self, base: int, limit: int, align: int):
        self.free = [(base, limit)]
        self.align = align
        self.base, self.limit = base, limit
        self.peak = 0

    def alloc(self, size: int, what: str) -> int:
        size = -(-max(size, 1) // self.align) * self.align
        for i, (a, b) in enumerate(self.free):
            if b - a >= size:
                self.free[i] = (a + size, b)
                if self.free[i][0] == self.free[i][1]:
                    self.free.pop(i)
                self.peak = max(self.peak, self.used())
                return a
        raise ir.CompileError(
            f"model too large for the configuration: {what} needs {size} scratchpad words, "
            f"but only {self.largest()} contiguous words are free of {self.limit - self.base} "
            f"for activations (weights use the rest); choose a larger preset")

    def release(self, addr: int, size: int):
        size = -(-max(size, 1) // self.align) * self.align
        self.free.append((addr, addr + size))
        self.free.sort()
        merged = []
        for a, b in self.free:
            if merged and merged[-1][1] == a:
                merged[-1] = (merged[-1][0], b)
            else:
                merged.append((a, b))
        self.free = merged

    def largest(self) -> int:
        return max((b - a for a, b in self.free), default=0)

    def used(self) -> int:
        return (self.limit - self.base) - sum(b - a for a, b in self.free)


def _as2d(shape) -> tuple[int, int]:
    shape = tuple(int(s) for s in shape)
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return 1, shape[0]
    lead = int(np.prod(shape[:-1]))
    return lead, shape[-1]


def _chan_words(bias, mult, shift):
    bias = np.asarray(bias, dtype=np.int64)
    t = np.zeros((len(bias), 4), dtype=np.int64)
    lo = bias & 0xFFFF
    t[:, 0] = np.where(lo >= 32768, lo - 65536, lo)
    t[:, 1] = bias >> 16
    t[:, 2] = mult
    t[:, 3] = shift
    return t


class _Lowering:
    def __init__(self, graph: ir.Graph, config, plan: QuantPlan, name: str):
        self.g = graph
        self.cfg = config
        self.plan = plan
        self.asm = Assembler(config)
        self.asm.meta["model"] = name
        self.views: dict = {}
        self.buf_size: dict = {}
        self.buf_refs: dict = {}
        self.nbuf = 0
        self.layers = []          # per MARK id: {"name", "op", "macs"}
        # token bookkeeping
        self.l2c_groups = 0       # load groups whose token has been pushed
        self.l2c_popped = 0
        self.open_group = False   # loads emitted since the last push
        self.last_load = None
        self.c2s_pushed = False

    # -- helpers -----------------------------------------------------------------------------

    def scale(self, v: str) -> float:
        if v not in self.plan.scale:
            raise ir.CompileError(f"no calibrated range for {v!r}")
        return self.plan.scale[v]

    def const(self, v: str):
        return self.g.values[v].const

    def is_const(self, v: str) -> bool:
        return self.g.values[v].is_const

    def new_buf(self, rows, cols, what) -> View:
        size = rows * cols
        addr = self.alloc.alloc(size, what)
        b = self.nbuf
        self.nbuf += 1
        self.buf_size[b] = (addr, size)
        self.buf_refs[b] = 0
        return View(addr, rows, cols, cols, b)

    def load(self, **f):
        self.asm.load(**f)
        self.last_load = len(self.asm.instrs) - 1
        self.open_group = True

    def push_group(self) -> int:
        """Close the open load group with a token; returns its sequence number (1-based)."""
        if self.open_group:
            op, f = self.asm.instrs[self.last_load]
            f["push_next"] = 1
            self.l2c_groups += 1
            self.open_group = False
        return self.l2c_groups

    def wait_group(self, seq: int) -> dict:
        """Token fields for a compute instruction that needs load group ``seq``."""
        while self.l2c_popped < seq - 1:
            self.asm.mark(0xFFFF, pop_prev=1)
            self.l2c_popped += 1
        if self.l2c_popped < seq:
            self.l2c_popped += 1
            return {"pop_prev": 1}
        return {}

    # -- planning ----------------------------------------------------------------------------

    def plan_fusion(self):
        g = self.g
        self.absorbed = set()
        self.fused = {}
        for n in g.nodes:
            if n.op == "moe":
                out = n.outputs[0]
                info = {"res": None, "out": out}
                cons = g.consumers(out)
                if len(cons) == 1 and cons[0].op == "add" and out not in g.outputs:
                    other = [i for i in cons[0].inputs if i != out]
                    if len(other) == 1 and not self.is_const(other[0]) and \
                            _as2d(g.shape(other[0])) == _as2d(g.shape(out)):
                        info["res"] = other[0]
                        info["out"] = cons[0].outputs[0]
                        self.absorbed.add(id(cons[0]))
                self.fused[id(n)] = info
                continue
            if n.op not in ("linear", "linear_task"):
                continue
            out = n.outputs[0]
            info = {"act": None, "factor": 1.0, "res": None, "out": out}
            cons = g.consumers(out)
            if len(cons) == 1 and cons[0].op in ("mul", "div") and \
                    self.is_const(cons[0].inputs[1]) and \
                    np.size(self.const(cons[0].inputs[1])) == 1 and cons[0].inputs[0] == out:
                c = float(np.asarray(self.const(cons[0].inputs[1])).reshape(()))
                info["factor"] = c if cons[0].op == "mul" else 1.0 / c
                self.absorbed.add(id(cons[0]))
                out = cons[0].outputs[0]
                cons = g.consumers(out)
            if len(cons) == 1 and cons[0].op in ("gelu", "relu") and \
                    cons[0].attrs.get("approximate", "none") in ("none",):
                info["act"] = cons[0].op
                self.absorbed.add(id(cons[0]))
                out = cons[0].outputs[0]
                cons = g.consumers(out)
            if len(cons) == 1 and cons[0].op == "add" and out not in g.outputs:
                other = [i for i in cons[0].inputs if i != out]
                if len(other) == 1 and _as2d(g.shape(other[0])) == _as2d(g.shape(out)):
                    info["res"] = other[0]
                    self.absorbed.add(id(cons[0]))
                    out = cons[0].outputs[0]
            info["out"] = out
            self.fused[id(n)] = info

    def plan_lifetimes(self):
        """Last node index at which each value (through its aliases) is read."""
        g = self.g
        self.alias_of = {}          # view value -> base value
        for n in g.nodes:
            if n.op in ("reshape", "slice", "gather") and not self.is_const(n.inputs[0]):
                self.alias_of[n.outputs[0]] = self.root(n.inputs[0])
        self.last_use = {}
        for idx, n in enumerate(g.nodes):
            for i in n.inputs:
                if i and not self.is_const(i):
                    self.last_use[self.root(i)] = idx
        for o in g.outputs:
            self.last_use[self.root(o)] = len(g.nodes)
        # concat targets: an input produced for a concat is written straight into it
        self.concat_into = {}
        for n in g.nodes:
            if n.op == "concat":
                if n.attrs.get("axis", 0) not in (0, -2) and \
                        len(g.shape(n.outputs[0])) >= 2 and n.attrs.get("axis") != \
                        len(g.shape(n.outputs[0])) - 2:
                    raise ir.CompileError(f"node {n.name!r}: concat along axis "
                                          f"{n.attrs.get('axis')} is not supported (rows only)")
                row = 0
                for i in n.inputs:
                    r, _ = _as2d(g.shape(i))
                    if not self.is_const(i):
                        self.concat_into[i] = (n.outputs[0], row)
                    row += r
        # an input written into its concat's buffer lives as long as that buffer: its uses
        # extend the buffer's life, and it releases nothing itself
        for i, (cv, _) in self.concat_into.items():
            if i in self.last_use:
                r = self.root(cv)
                self.last_use[r] = max(self.last_use.get(r, -1), self.last_use.pop(i))

    def root(self, v):
        while v in self.alias_of:
            v = self.alias_of[v]
        return v

    # -- emission ----------------------------------------------------------------------------

    def run(self):
        cfg = self.cfg
        g = self.g
        self.plan_fusion()
        self.plan_lifetimes()
        # weight tiles of every linear, in program order
        self.tiles = []
        self.routed = set()           # moe nodes whose ROUTE has been emitted
        self.deferred = []            # expert tiles whose load waits for their ROUTE
        for n in g.nodes:
            if n.op in ("linear", "linear_task"):
                self.tiles.extend(self.make_tiles(n))
            elif n.op == "moe":
                self.tiles.extend(self.moe_tiles(n))
        wmax = max((t["k"] * t["nt"] for t in self.tiles), default=0)
        cmax = max((4 * t["nt"] for t in self.tiles), default=0)
        align = max(cfg.rows * cfg.cols, cfg.row_lanes, 16)
        wsz = -(-wmax // align) * align
        csz = -(-cmax // align) * align
        self.wbuf = [0, wsz]
        self.cbuf = [2 * wsz, 2 * wsz + csz]
        base = 2 * wsz + 2 * csz
        if base >= cfg.spad_words:
            raise ir.CompileError(f"model too large for the configuration: weight tiles need "
                                  f"{base} of {cfg.spad_words} scratchpad words")
        self.alloc = _Alloc(base, cfg.spad_words, align)
        # inputs
        for name in g.inputs:
            self.emit_input(name)
        # resident constants (loaded in the first group)
        self.resident = {}
        self.prepare_residents()
        # first two weight tiles
        self.next_tile = 0
        for _ in range(2):
            self.emit_tile_load()
        for idx, n in enumerate(g.nodes):
            self.idx = idx
            if id(n) in self.absorbed:
                self.release_dead(idx)
                continue
            nlayers = len(self.layers)
            getattr(self, "lower_" + n.op)(n)
            if len(self.layers) > nlayers:
                # where the layer's result lives, for the per-layer quantisation report
                out = self.fused[id(n)]["out"] if id(n) in self.fused else n.outputs[0]
                v = self.views.get(out)
                if v is not None and out in self.plan.scale:
                    self.layers[-1]["out"] = {"value": out, "addr": v.addr, "rows": v.rows,
                                              "cols": v.cols, "stride": v.stride,
                                              "scale": self.plan.scale[out]}
            self.release_dead(idx)
        self.wait_group(self.l2c_groups)     # every load token is consumed before END
        self.emit_outputs()
        self.asm.meta["layers"] = self.layers
        self.asm.meta["spad_peak_words"] = self.alloc.peak + base
        self.asm.meta["weight_tiles"] = len(self.tiles)
        return self.asm.link()

    def release_dead(self, idx):
        for v, last in list(self.last_use.items()):
            if last == idx and v in self.views and v not in self.g.outputs:
                b = self.views[v].buf
                self.buf_refs[b] -= 1
                if self.buf_refs[b] <= 0 and b in self.buf_size:
                    addr, size = self.buf_size.pop(b)
                    self.alloc.release(addr, size)
                del self.last_use[v]

    def bind(self, v: str, view: View):
        self.views[v] = view
        if v not in self.alias_of:
            self.buf_refs[view.buf] = self.buf_refs.get(view.buf, 0) + 1

    def out_view(self, v: str, rows: int, cols: int, what: str) -> View:
        """The view a node writes ``v`` into: a slice of a concat buffer or a new buffer."""
        if v in self.concat_into:
            cv, row = self.concat_into[v]
            if cv not in self.views:
                r, c = _as2d(self.g.shape(cv))
                self.bind(cv, self.new_buf(r, c, f"concat {cv!r}"))
            base = self.views[cv]
            view = View(base.addr + row * base.stride, rows, cols, base.stride, base.buf)
            self.views[v] = view
            self.alias_of[v] = cv
            return view
        view = self.new_buf(rows, cols, what)
        self.bind(v, view)
        return view

    def mark(self, n, macs=0, **tokens):
        lid = len(self.layers)
        self.layers.append({"name": n.name or n.outputs[0], "op": n.op, "macs": int(macs)})
        self.asm.mark(lid, **tokens)

    # inputs and outputs ---------------------------------------------------------------------

    def emit_input(self, name):
        g = self.g
        if g.values[name].dtype.startswith("int"):
            return          # the task index: a register, not data (see task_input)
        shape = g.shape(name)
        s = self.scale(name)
        ref = self.asm.tensor(name, "input", shape, "i16", s)
        cons = g.consumers(name)
        if len(cons) == 1 and cons[0].op == "im2col":
            self.emit_im2col(cons[0], name, ref)
            return
        rows, cols = _as2d(shape)
        view = self.new_buf(rows, cols, f"input {name!r}")
        self.bind(name, view)
        self.load(dram_addr=ref, spad_addr=view.addr, run=cols, n0=rows, ds0=2 * cols,
                  ss0=view.stride, dtype=DType.I16)

    def lower_im2col(self, n):
        if n.outputs[0] not in self.views:
            raise ir.CompileError(f"node {n.name!r}: im2col must read a graph input")
        self.mark(n)

    def emit_im2col(self, n, name, ref):
        """Patch extraction by the DMA: one 3-level strided LOAD per row of patches."""
        g = self.g
        shape = g.shape(name)
        c, h, w = shape[-3:]
        k = n.attrs["kernel"]
        ph, pw = h // k, w // k
        rows, cols = ph * pw, c * k * k
        view = self.out_view(n.outputs[0], rows, cols, f"patches of {name!r}")
        self.scale_alias(n.outputs[0], name)
        for py in range(ph):
            self.load(dram_addr=ref + 2 * (py * k * w), spad_addr=view.addr + py * pw * view.stride,
                      run=k, n0=k, ds0=2 * w, ss0=k, n1=c, ds1=2 * h * w, ss1=k * k,
                      n2=pw, ds2=2 * k, ss2=view.stride, dtype=DType.I16)

    def scale_alias(self, v, src):
        if v not in self.plan.scale:
            self.plan.scale[v] = self.plan.scale[src]
        elif abs(self.plan.scale[v] - self.plan.scale[src]) > 1e-12 * self.plan.scale[src]:
            raise ir.CompileError(f"internal: {v!r} and {src!r} share storage but not a scale")

    def emit_outputs(self):
        # one token from COMPUTE to STORE covers every output (they are final)
        self.asm.mark(0xFFFE, push_next=1)
        first = True
        for name in self.g.outputs:
            view = self.views[name]
            shape = self.g.shape(name)
            ref = self.asm.tensor(name, "output", shape, "i16", self.scale(name))
            self.asm.store(dram_addr=ref, spad_addr=view.addr, run=view.cols, n0=view.rows,
                           ds0=2 * view.cols, ss0=view.stride, dtype=DType.I16,
                           pop_prev=1 if first else 0)
            first = False
        self.asm.end()

    # constants ------------------------------------------------------------------------------

    def prepare_residents(self):
        """Load LayerNorm tables, constant residuals/additions and concat constants."""
        g = self.g
        for n in g.nodes:
            if n.op == "layernorm":
                self.resident_ln(n)
            elif n.op == "concat":
                out = n.outputs[0]
                if out not in self.views:
                    r, c = _as2d(g.shape(out))
                    self.bind(out, self.new_buf(r, c, f"concat {out!r}"))
                base = self.views[out]
                row = 0
                for i in n.inputs:
                    r, c = _as2d(g.shape(i))
                    if self.is_const(i):
                        q = self.quant_act_const(self.const(i).reshape(r, c), self.scale(out))
                        ref = self.asm.const(f"{i}@{out}", q, "i16")
                        self.load(dram_addr=ref, spad_addr=base.addr + row * base.stride,
                                  run=c, n0=r, ds0=2 * c, ss0=base.stride, dtype=DType.I16)
                    row += r
            elif n.op in ("add", "sub") or (n.op == "linear" and id(n) in self.fused):
                cands = n.inputs if n.op != "linear" else \
                    ([self.fused[id(n)]["res"]] if self.fused[id(n)]["res"] else [])
                for i in cands:
                    if i and self.is_const(i) and i not in self.resident:
                        cval = np.asarray(self.const(i), dtype=np.float64)
                        target = n.outputs[0] if n.op != "linear" else self.fused[id(n)]["out"]
                        r, c = _as2d(g.shape(target))
                        cval = np.broadcast_to(cval.reshape(-1, cval.shape[-1]) if cval.ndim
                                               else cval.reshape(1, 1), (r, c))
                        s = max(float(np.abs(cval).max()), 1e-9) / self.cfg.act_max
                        q = self.quant_act_const(cval, s)
                        ref = self.asm.const(i, q, "i16")
                        view = self.new_buf(r, c, f"constant {i!r}")
                        self.load(dram_addr=ref, spad_addr=view.addr, run=c, n0=r, ds0=2 * c,
                                  ss0=c, dtype=DType.I16)
                        self.resident[i] = (view, s)
        self.push_group()

    def quant_act_const(self, x, s):
        q = np.round(np.asarray(x, dtype=np.float64) / s)
        return np.clip(q, self.cfg.act_min, self.cfg.act_max).astype(np.int64)

    def resident_ln(self, n):
        g = self.g
        x, gamma, beta = n.inputs
        c = int(g.shape(x)[-1])
        s_x, s_y = self.scale(x), self.scale(n.outputs[0])
        gam = np.asarray(self.const(gamma), dtype=np.float64).reshape(-1)
        bet = np.asarray(self.const(beta), dtype=np.float64).reshape(-1)
        gmax = max(float(np.abs(gam).max()), 1e-12)
        # out = (x_hat_Q12 * g + b) >> shift  ==  gamma * x_hat + beta  at scale s_y
        shift = int(math.floor(math.log2(32767 * s_y * 4096 / gmax)))
        shift = min(max(shift, 0), 40)
        gq = np.round(gam * 2.0 ** shift / (s_y * 4096)).astype(np.int64)
        bq = np.round(bet * 2.0 ** shift / s_y).astype(np.int64)
        if np.abs(gq).max() > 32767:
            raise ir.CompileError(f"node {n.name!r}: LayerNorm gamma does not fit the output "
                                  f"scale")
        if np.abs(bq).max() >= 2 ** 31:
            raise ir.CompileError(f"node {n.name!r}: LayerNorm beta too large for its scale")
        tab = np.zeros((c, 4), dtype=np.int64)
        tab[:, 0] = gq
        lo = bq & 0xFFFF
        tab[:, 1] = np.where(lo >= 32768, lo - 65536, lo)
        tab[:, 2] = bq >> 16
        eps = float(n.attrs.get("eps", 1e-5))
        eps_val = c * c * eps / (s_x * s_x)
        eps_e = max(0, math.ceil(math.log2(max(eps_val, 1.0))) - 15)
        eps_m = max(1, min(65535, round(eps_val / 2 ** eps_e)))
        if eps_e > 40:
            raise ir.CompileError(f"node {n.name!r}: LayerNorm epsilon out of range for the "
                                  f"input scale")
        ref = self.asm.const(f"{n.name or n.outputs[0]}.ln", tab, "i16")
        view = self.new_buf(c, 4, f"LayerNorm parameters of {n.name!r}")
        self.load(dram_addr=ref, spad_addr=view.addr, run=4 * c, dtype=DType.I16)
        self.resident[id(n)] = (view, eps_m, eps_e, shift)

    # linear ---------------------------------------------------------------------------------

    def make_tiles(self, n):
        """Weight tiles of a ``linear`` or ``linear_task`` node."""
        info = self.fused[id(n)]
        w = np.asarray(self.const(n.inputs[1]), dtype=np.float64)
        tasks = n.op == "linear_task"
        if w.ndim != (3 if tasks else 2):
            raise ir.CompileError(f"node {n.name!r}: linear weight must be "
                                  f"{'3' if tasks else '2'}-D, not {w.shape}")
        ws = list(w) if tasks else [w]
        nn = ws[0].shape[1]
        bias = None if len(n.inputs) < 3 or not n.inputs[2] else \
            np.asarray(self.const(n.inputs[2]), dtype=np.float64)
        bs = [np.zeros(nn) if bias is None else (bias[t] if tasks else bias.reshape(-1))
              for t in range(len(ws))]
        if tasks:
            self.task_input(n.inputs[3], len(ws), n)
        return self.build_tiles(id(n), n.name or n.outputs[0], ws, bs, self.scale(n.inputs[0]),
                                self.scale(info["out"]), info["act"], info["factor"])

    def build_tiles(self, key, label, ws, bs, s_x, s_y, act, fac, *, pred=None, moe=None,
                    role=None):
        """Column tiles of ``x @ W + b`` for one weight matrix per task (``ws``, ``bs``).

        DRAM holds the weights tile by tile ([k x nt] blocks, each contiguous, so that every tile
        is one burst-friendly transfer), task after task; with several tasks the tile loads add
        ``REG[TASK_REG] * stride`` (the task's block). ``pred`` predicates the loads on an
        expert queue; ``moe`` makes the load wait for that MoE layer's ROUTE.
        """
        cfg = self.cfg
        k, nn = ws[0].shape
        if k > cfg.max_k:
            raise ir.CompileError(f"node {label!r}: reduction length {k} exceeds the "
                                  f"configuration's max_k={cfg.max_k}")
        budget = cfg.spad_words // 8
        nt = (budget // k) // cfg.cols * cfg.cols
        if nt < cfg.cols:
            raise ir.CompileError(f"model too large for the configuration: node {label!r} needs a "
                                  f"weight tile of {k} x {cfg.cols} words, more than the weight "
                                  f"buffer budget of {budget} scratchpad words; choose a larger "
                                  f"preset")
        nt = min(nt, -(-nn // cfg.cols) * cfg.cols, cfg.max_dim)
        wdt = "i8" if cfg.weight_bits <= 8 else "i16"
        wblocks, chans = [], []
        for w, b in zip(ws, bs):
            wq, sw = quantize_weight(w, cfg.weight_bits)
            bias_q = np.round(b / (s_x * sw)).astype(np.int64)
            if np.abs(bias_q).max(initial=0) >= 2 ** 31:
                raise ir.CompileError(f"node {label!r}: bias too large for its accumulator "
                                      f"scale")
            if act == "gelu":
                rq = [requant_params(fac * s_x * sw[j] * 2 ** 16) for j in range(nn)]
            else:
                rq = [requant_params(fac * s_x * sw[j] / s_y) for j in range(nn)]
            chans.append(_chan_words(bias_q, [m for m, _ in rq], [s for _, s in rq]))
            wblocks += [wq[:, j0:j0 + nt].reshape(-1) for j0 in range(0, nn, nt)]
        wref = self.asm.const(f"{label}.W", np.concatenate(wblocks), wdt)
        cref = self.asm.const(f"{label}.chan", np.concatenate(chans), "i16")
        wb = 1 if wdt == "i8" else 2
        tasks = len(ws) > 1 or self.asm.meta.get("task", {}).get("node") == key
        tiles = []
        for j0 in range(0, nn, nt):
            w_ = min(nt, nn - j0)
            tiles.append({"node": key, "k": k, "n": nn, "j0": j0, "nt": w_, "wref": wref,
                          "cref": cref, "wbytes": wb, "pred": pred, "moe": moe, "role": role,
                          "wstride": wb * k * nn if tasks else 0,
                          "cstride": 8 * nn if tasks else 0})
        return tiles

    def task_input(self, name, count, n):
        """Record the task input (a run-time index selecting per-task weights)."""
        t = self.asm.meta.setdefault("task", {"input": name, "register": TASK_REG,
                                              "tasks": count})
        if t["input"] != name:
            raise ir.CompileError(f"node {n.name!r}: a second task input {name!r} (the model "
                                  f"already selects by {t['input']!r})")
        if count != t["tasks"]:
            raise ir.CompileError(f"node {n.name!r}: {count} per-task tables, but another node "
                                  f"has {t['tasks']}; every per-task table needs one entry per "
                                  f"task")

    def tile_ready(self, t: int) -> bool:
        """Can the load of tile ``t`` be issued now (an expert's waits for its ROUTE)?"""
        return t >= len(self.tiles) or self.tiles[t]["moe"] is None or \
            self.tiles[t]["moe"] in self.routed

    def emit_tile_load(self, *, after_route: bool = False):
        t = self.next_tile
        if t >= len(self.tiles):
            return
        self.next_tile += 1
        if not after_route and not self.tile_ready(t):
            # its predicate reads the queue registers ROUTE writes: issued after the ROUTE,
            # popping a token the ROUTE side pushes (see lower_moe)
            self.deferred.append(t)
            return
        self.load_tile(t, pop=after_route or t >= 2)

    def load_tile(self, t: int, *, pop: bool):
        tile = self.tiles[t]
        slot = t % 2
        extra = {"pop_next": 1} if pop else {}
        if tile["pred"] is not None:
            extra.update(pred_en=1, pred_q=tile["pred"])
        wb = tile["wbytes"]
        wblk = dict(blk_reg=TASK_REG, blk_stride=tile["wstride"]) if tile["wstride"] else {}
        cblk = dict(blk_reg=TASK_REG, blk_stride=tile["cstride"]) if tile["cstride"] else {}
        self.load(dram_addr=tile["wref"] + wb * tile["k"] * tile["j0"],
                  spad_addr=self.wbuf[slot], run=tile["nt"], n0=tile["k"],
                  ds0=wb * tile["nt"], ss0=tile["nt"],
                  dtype=DType.I8 if wb == 1 else DType.I16, **extra, **wblk)
        pred = {k: v for k, v in extra.items() if k.startswith("pred")}
        self.load(dram_addr=tile["cref"] + 8 * tile["j0"], spad_addr=self.cbuf[slot],
                  run=4 * tile["nt"], dtype=DType.I16, **pred, **cblk)
        tile["pcs"] = [len(self.asm.instrs) - 2, len(self.asm.instrs) - 1]
        tile["bytes"] = wb * tile["k"] * tile["nt"] + 8 * tile["nt"]
        tile["group"] = self.push_group()

    def lower_linear(self, n):
        cfg = self.cfg
        g = self.g
        info = self.fused[id(n)]
        x = self.views[n.inputs[0]]
        k = int(g.shape(n.inputs[1])[-2])
        nn = int(g.shape(n.inputs[1])[-1])
        if x.cols != k:
            raise ir.CompileError(f"node {n.name!r}: input has {x.cols} features, weight {k}")
        out = info["out"]
        s_y = self.scale(out)
        res = info["res"]
        res_view = None
        res_fields = {}
        if res is not None:
            if res in self.resident:
                res_view, s_r = self.resident[res]
            else:
                res_view, s_r = self.views[res], self.scale(res)
            rm, rs = requant_params(s_r / s_y)
            res_fields = dict(res_en=1, res_mult=rm, res_shift=rs)
        # in place over a residual that dies here
        if res is not None and res not in self.resident and res_view.stride == nn and \
                self.last_use.get(self.root(res)) == self.idx and out not in self.concat_into \
                and out not in g.outputs and self.root(res) == res:
            y = View(res_view.addr, x.rows, nn, nn, res_view.buf)
            self.bind(out, y)
            self.buf_refs[y.buf] += 1
        else:
            y = self.out_view(out, x.rows, nn, f"output of {n.name!r}")
        act_fields = {}
        if info["act"] == "gelu":
            am, ash = requant_params(2.0 ** -16 / s_y)
            act_fields = dict(act=Act.GELU, act_mult=am, act_shift=ash)
        elif info["act"] == "relu":
            act_fields = dict(act=Act.RELU)
        mlim = max(1, min(cfg.max_dim, cfg.acc_lines // 2))
        self.mark(n, macs=x.rows * k * nn)
        tiles = [t for t in self.tiles if t["node"] == id(n)]
        for t in tiles:
            ti = self.tiles.index(t)
            slot = ti % 2
            chunks = list(range(0, x.rows, mlim))
            for ci, r0 in enumerate(chunks):
                m = min(mlim, x.rows - r0)
                tok = self.wait_group(t["group"]) if ci == 0 else {}
                last = ci == len(chunks) - 1
                if last and ti + 2 < len(self.tiles) and self.tile_ready(ti + 2):
                    tok["push_prev"] = 1
                fields = dict(m=m, k=k, n=t["nt"], a_addr=x.addr + r0 * x.stride,
                              a_stride=x.stride, b_addr=self.wbuf[slot], b_stride=t["nt"],
                              out=OutMode.SPAD, out_addr=y.addr + r0 * y.stride + t["j0"],
                              out_stride=y.stride, chan_en=1, chan_addr=self.cbuf[slot],
                              **act_fields, **tok)
                if res_view is not None:
                    fields.update(res_addr=res_view.addr + r0 * res_view.stride + t["j0"],
                                  **res_fields)
                    if res_view.stride != y.stride:
                        raise ir.CompileError(f"node {n.name!r}: residual layout differs from "
                                              f"the output's")
                self.asm.matmul(**fields)
            if ti + 2 < len(self.tiles):
                self.emit_tile_load()

    # element-wise and row ops ---------------------------------------------------------------

    def lower_layernorm(self, n):
        x = self.views[n.inputs[0]]
        view, eps_m, eps_e, shift = self.resident[id(n)]
        y = self.out_view(n.outputs[0], x.rows, x.cols, f"output of {n.name!r}")
        self.mark(n)
        tok = self.wait_group(1)
        self.asm.layernorm(m=x.rows, n=x.cols, in_addr=x.addr, in_stride=x.stride,
                           out_addr=y.addr, out_stride=y.stride, param_addr=view.addr,
                           eps_m=eps_m, eps_e=eps_e, shift=shift, **tok)

    def lower_add(self, n, sub=False):
        a, b = n.inputs
        out = n.outputs[0]
        s_y = self.scale(out)
        va, sa_ = (self.resident[a] if a in self.resident else (self.views[a], self.scale(a)))
        vb, sb_ = (self.resident[b] if b in self.resident else (self.views[b], self.scale(b)))
        if (va.rows, va.cols) != (vb.rows, vb.cols):
            raise ir.CompileError(f"node {n.name!r}: element-wise operands of shapes "
                                  f"{(va.rows, va.cols)} and {(vb.rows, vb.cols)} are not "
                                  f"supported (only equal 2-D shapes)")
        ma, sa = requant_params(sa_ / s_y)
        mb, sb = requant_params((-1 if sub else 1) * sb_ / s_y)
        y = self.out_view(out, va.rows, va.cols, f"output of {n.name!r}")
        self.mark(n)
        tok = self.wait_group(1)
        self.asm.vec(op=1, m=va.rows, n=va.cols, a_addr=va.addr, a_stride=va.stride,
                     b_addr=vb.addr, b_stride=vb.stride, out_addr=y.addr, out_stride=y.stride,
                     ma=ma, sa=sa, mb=mb, sb=sb, **tok)

    def lower_sub(self, n):
        self.lower_add(n, sub=True)

    def lower_mul(self, n):
        a, b = n.inputs
        if not self.is_const(b) or np.size(self.const(b)) != 1:
            raise ir.CompileError(f"node {n.name!r}: only multiplication by a scalar constant is "
                                  f"supported outside a linear layer")
        c = float(np.asarray(self.const(b)).reshape(()))
        if n.op == "div":
            c = 1.0 / c
        va = self.views[a]
        mm, ss = requant_params(c * self.scale(a) / self.scale(n.outputs[0]))
        y = self.out_view(n.outputs[0], va.rows, va.cols, f"output of {n.name!r}")
        self.mark(n)
        self.asm.vec(op=0, m=va.rows, n=va.cols, a_addr=va.addr, a_stride=va.stride,
                     out_addr=y.addr, out_stride=y.stride, ma=mm, sa=ss)

    def lower_div(self, n):
        self.lower_mul(n)

    def lower_softmax(self, n):
        x = self.views[n.inputs[0]]
        sm, ss = requant_params(self.scale(n.inputs[0]) * math.log2(math.e) * 2 ** 16)
        y = self.out_view(n.outputs[0], x.rows, x.cols, f"output of {n.name!r}")
        self.plan.scale[n.outputs[0]] = 2.0 ** -(self.cfg.act_bits - 1)
        self.mark(n)
        self.asm.softmax(m=x.rows, n=x.cols, in_addr=x.addr, in_stride=x.stride,
                         out_addr=y.addr, out_stride=y.stride, mult=sm, shift=ss)

    def lower_gelu(self, n):
        raise ir.CompileError(f"node {n.name!r}: GELU must follow a linear layer (it runs in the "
                              f"MAC array's output lane)")

    def lower_relu(self, n):
        raise ir.CompileError(f"node {n.name!r}: ReLU must follow a linear layer (it runs in the "
                              f"MAC array's output lane)")

    # views ----------------------------------------------------------------------------------

    def lower_reshape(self, n):
        src = self.views[n.inputs[0]]
        r, c = _as2d(self.g.shape(n.outputs[0]))
        if (r, c) != (src.rows, src.cols):
            raise ir.CompileError(f"node {n.name!r}: reshape from {(src.rows, src.cols)} to "
                                  f"{(r, c)} changes the token-major layout; not supported")
        self.views[n.outputs[0]] = src
        self.scale_alias(n.outputs[0], n.inputs[0])

    def lower_slice(self, n):
        src = self.views[n.inputs[0]]
        shape = self.g.shape(n.inputs[0])
        axis = n.attrs["axis"] % len(shape)
        start, stop, step = n.attrs["start"], n.attrs["stop"], n.attrs.get("step", 1)
        if step != 1:
            raise ir.CompileError(f"node {n.name!r}: slices with step {step} are not supported")
        if axis == len(shape) - 1:
            v = View(src.addr + start, src.rows, stop - start, src.stride, src.buf)
        elif int(np.prod(shape[axis + 1:-1])) == 1 and all(s == 1 for s in shape[:axis]):
            v = View(src.addr + start * src.stride, stop - start, src.cols, src.stride, src.buf)
        else:
            raise ir.CompileError(f"node {n.name!r}: slice along axis {axis} of {shape} is not "
                                  f"supported")
        self.views[n.outputs[0]] = v
        self.scale_alias(n.outputs[0], n.inputs[0])

    def lower_gather(self, n):
        src = self.views[n.inputs[0]]
        shape = self.g.shape(n.inputs[0])
        axis = n.attrs["axis"] % len(shape)
        idx = np.asarray(n.attrs["index"]).reshape(-1)
        if len(idx) != 1 or axis != len(shape) - 2 or any(s != 1 for s in shape[:axis]):
            raise ir.CompileError(f"node {n.name!r}: only the selection of one row (token) is "
                                  f"supported, not index {idx.tolist()} on axis {axis}")
        r = int(idx[0]) % src.rows
        self.views[n.outputs[0]] = View(src.addr + r * src.stride, 1, src.cols, src.stride,
                                        src.buf)
        self.scale_alias(n.outputs[0], n.inputs[0])

    def lower_concat(self, n):
        out = n.outputs[0]
        base = self.views[out]
        row = 0
        for i in n.inputs:
            r, c = _as2d(self.g.shape(i))
            if not self.is_const(i) and self.views[i].addr != base.addr + row * base.stride:
                raise ir.CompileError(f"node {n.name!r}: concat input {i!r} was not produced in "
                                      f"place")
            row += r
        self.mark(n)

    # attention ------------------------------------------------------------------------------

    def lower_attention(self, n):
        cfg = self.cfg
        q, k, v = (self.views[i] for i in n.inputs)
        sq, sk, sv = (self.scale(i) for i in n.inputs)
        out = n.outputs[0]
        so = self.scale(out)
        h, d = n.attrs["heads"], n.attrs["head_dim"]
        t, tk = q.rows, k.rows
        s_s = self.plan.score_scale[n.name]
        y = self.out_view(out, t, h * d, f"output of {n.name!r}")
        sbuf = self.new_buf(t, tk, f"attention scores of {n.name!r}")
        mlim = max(1, min(cfg.max_dim, cfg.acc_lines // 2))
        mq, shq = requant_params(n.attrs["scale"] * sq * sk / s_s)
        smm, sms = requant_params(s_s * math.log2(math.e) * 2 ** 16)
        p_scale = 2.0 ** -(cfg.act_bits - 1)
        mo, sho = requant_params(p_scale * sv / so)
        self.mark(n, macs=2 * h * t * tk * d)
        causal = 1 if n.attrs.get("causal") else 0
        for hh in range(h):
            for r0 in range(0, t, mlim):
                m = min(mlim, t - r0)
                self.asm.matmul(m=m, k=d, n=tk, a_addr=q.addr + r0 * q.stride + hh * d,
                                a_stride=q.stride, b_addr=k.addr + hh * d, b_stride=k.stride,
                                b_trans=1, out=OutMode.SPAD, out_addr=sbuf.addr + r0 * tk,
                                out_stride=tk, mult=mq, shift=shq)
            self.asm.softmax(m=t, n=tk, in_addr=sbuf.addr, in_stride=tk, out_addr=sbuf.addr,
                             out_stride=tk, mult=smm, shift=sms, causal=causal)
            for r0 in range(0, t, mlim):
                m = min(mlim, t - r0)
                self.asm.matmul(m=m, k=tk, n=d, a_addr=sbuf.addr + r0 * tk, a_stride=tk,
                                b_addr=v.addr + hh * d, b_stride=v.stride, out=OutMode.SPAD,
                                out_addr=y.addr + r0 * y.stride + hh * d, out_stride=y.stride,
                                mult=mo, shift=sho)
        addr, size = self.buf_size.pop(sbuf.buf)
        self.alloc.release(addr, size)

    def lower_linear_task(self, n):
        self.lower_linear(n)

    # mixture of experts ---------------------------------------------------------------------

    def moe_tiles(self, n):
        """Tiles of a ``moe`` node: the gate (per task), then fc1 and fc2 of each expert."""
        cfg = self.cfg
        label = n.name or n.outputs[0]
        ne, k = n.attrs["n_experts"], n.attrs["k"]
        if ne > cfg.max_experts:
            raise ir.CompileError(f"node {label!r}: {ne} experts, more than the "
                                  f"configuration's {cfg.max_experts} expert queues "
                                  f"(max_experts)")
        if not 1 <= k <= min(cfg.max_topk, ne):
            raise ir.CompileError(f"node {label!r}: top-{k} routing; the configuration "
                                  f"selects 1..{min(cfg.max_topk, ne)} experts per token")
        st = self.plan.moe.get(n.name)
        if st is None:
            raise ir.CompileError(f"node {label!r}: no calibration of the MoE gate")
        s_x = self.scale(n.inputs[0])
        gate = np.asarray(self.const(n.inputs[2]), dtype=np.float64)
        gates = list(gate) if gate.ndim == 3 else [gate]
        if n.inputs[1]:
            self.task_input(n.inputs[1], len(gates), n)
        key = id(n)
        tiles = self.build_tiles((key, "gate"), f"{label}.gate", gates,
                                 [np.zeros(ne)] * len(gates), s_x, st["logits_scale"], None, 1.0)
        known = list(st["hidden_scale"].values())
        s_out = self.scale(self.fused[key]["out"])
        ins = n.inputs[3:]
        for e in range(ne):
            w1, b1, w2, b2 = (np.asarray(self.const(v), dtype=np.float64)
                              for v in ins[4 * e:4 * e + 4])
            # an expert no calibration token chose gets the largest scale of the others
            s_h = st["hidden_scale"].get(e, max(known, default=1.0))
            tiles += self.build_tiles((key, "fc1", e), f"{label}.expert{e}.fc1", [w1],
                                      [b1.reshape(-1)], s_x, s_h, n.attrs["act"], 1.0, pred=e,
                                      moe=key, role=("fc1", e, s_h))
            tiles += self.build_tiles((key, "fc2", e), f"{label}.expert{e}.fc2", [w2],
                                      [b2.reshape(-1)], s_h, s_out, None, 1.0, pred=e,
                                      moe=key, role=("fc2", e, s_h))
        return tiles

    def run_tile(self, ti, fields):
        """Emit the MATMUL of tile ``ti`` (one row chunk) and schedule the load two ahead."""
        t = self.tiles[ti]
        slot = ti % 2
        tok = self.wait_group(t["group"])
        if ti + 2 < len(self.tiles) and self.tile_ready(ti + 2):
            tok["push_prev"] = 1
        pred = {"pred_en": 1, "pred_q": t["pred"]} if t["pred"] is not None else {}
        t["mm_pc"] = self.asm.matmul(k=t["k"], n=t["nt"], b_addr=self.wbuf[slot],
                                     b_stride=t["nt"], chan_en=1, chan_addr=self.cbuf[slot],
                                     **fields, **tok, **pred)
        if ti + 2 < len(self.tiles):
            self.emit_tile_load()

    def lower_moe(self, n):
        """Routed execution (Edge-MoE's patch reordering): gate MATMUL, SOFTMAX, TOPK, ROUTE,
        then per expert with a non-empty queue (predication skips the others, loads included):
        fc1 + activation on the gathered rows, fc2 scaled by the gate probability and
        scatter-added into the output, which starts as the (requantised) residual."""
        cfg = self.cfg
        key = id(n)
        label = n.name or n.outputs[0]
        info = self.fused[key]
        x = self.views[n.inputs[0]]
        tokens, d = x.rows, x.cols
        ne, k = n.attrs["n_experts"], n.attrs["k"]
        mlim = max(1, min(cfg.max_dim, cfg.acc_lines // 2))
        if tokens > mlim:
            raise ir.CompileError(f"node {label!r}: {tokens} tokens, but a routed expert "
                                  f"MATMUL handles at most {mlim} rows on this configuration "
                                  f"(acc_lines / 2)")
        ia, qa, qt = 0, tokens * k, 2 * tokens * k
        if qt + ne > cfg.idx_entries:
            raise ir.CompileError(f"node {label!r}: routing needs {qt + ne} index-memory "
                                  f"entries, the configuration has {cfg.idx_entries}")
        st = self.plan.moe[n.name]
        hidden = int(np.asarray(self.const(n.inputs[4])).shape[-1])
        out = info["out"]
        s_y = self.scale(out)
        y = self.out_view(out, tokens, d, f"output of {label!r}")
        logits = self.new_buf(tokens, ne, f"gate logits of {label!r}")
        hbuf = self.new_buf(tokens, hidden, f"expert hidden rows of {label!r}")
        self.mark(n, macs=tokens * d * ne + 2 * tokens * k * d * hidden)
        tok = self.wait_group(1)
        if info["res"] is not None:
            r = self.views[info["res"]]
            ma, sa = requant_params(self.scale(info["res"]) / s_y)
            self.asm.vec(op=0, m=tokens, n=d, a_addr=r.addr, a_stride=r.stride, out_addr=y.addr,
                         out_stride=y.stride, ma=ma, sa=sa, **tok)
        else:
            self.asm.vec(op=0, m=tokens, n=d, a_addr=y.addr, a_stride=y.stride, out_addr=y.addr,
                         out_stride=y.stride, ma=0, sa=0, **tok)
        mine = [i for i, t in enumerate(self.tiles) if t["node"] == (key, "gate")]
        for ti in mine:
            t = self.tiles[ti]
            self.run_tile(ti, dict(m=tokens, a_addr=x.addr, a_stride=x.stride, out=OutMode.SPAD,
                                   out_addr=logits.addr + t["j0"], out_stride=ne))
        sm, ss = requant_params(st["logits_scale"] * math.log2(math.e) * 2 ** 16)
        self.asm.softmax(m=tokens, n=ne, in_addr=logits.addr, in_stride=ne,
                         out_addr=logits.addr, out_stride=ne, mult=sm, shift=ss)
        self.asm.topk(m=tokens, n=ne, k=k, in_addr=logits.addr, in_stride=ne, idx_addr=ia)
        self.asm.route(m=tokens, k=k, n_experts=ne, idx_addr=ia, q_addr=qa, qtab_addr=qt)
        self.routed.add(key)
        # the expert loads held back until now: one token each from COMPUTE, after the ROUTE
        for t in self.deferred:
            self.asm.mark(0xFFFD, push_prev=1)
            self.load_tile(t, pop=True)
        self.deferred = []
        for e in range(ne):
            for ti in [i for i, t in enumerate(self.tiles) if t["node"] == (key, "fc1", e)]:
                t = self.tiles[ti]
                s_h = t["role"][2]
                am, ash = requant_params(2.0 ** -16 / s_h)
                act = dict(act=Act.GELU, act_mult=am, act_shift=ash) \
                    if n.attrs["act"] == "gelu" else dict(act=Act.RELU)
                self.run_tile(ti, dict(m=tokens, a_addr=x.addr, a_stride=x.stride, gather=1,
                                       queue=e, out=OutMode.SPAD, out_addr=hbuf.addr + t["j0"],
                                       out_stride=hidden, **act))
            for ti in [i for i, t in enumerate(self.tiles) if t["node"] == (key, "fc2", e)]:
                t = self.tiles[ti]
                self.run_tile(ti, dict(m=tokens, a_addr=hbuf.addr, a_stride=hidden, scatter=1,
                                       queue=e, out=OutMode.SPAD_ADD, out_addr=y.addr + t["j0"],
                                       out_stride=y.stride))
        for b in (logits.buf, hbuf.buf):
            addr, size = self.buf_size.pop(b)
            self.alloc.release(addr, size)
        # what reports and tests need to account the routed execution
        experts = []
        for e in range(ne):
            ts = [t for t in self.tiles if t["node"] in ((key, "fc1", e), (key, "fc2", e))]
            experts.append({"expert": e, "load_pcs": [p for t in ts for p in t["pcs"]],
                            "weight_bytes": sum(t["bytes"] for t in ts),
                            "fc1_pcs": [t["mm_pc"] for t in ts if t["node"][1] == "fc1"]})
        gate = [t for t in self.tiles if t["node"] == (key, "gate")]
        self.asm.meta.setdefault("moe", []).append({
            "layer": len(self.layers) - 1, "name": label, "tokens": tokens, "dim": d,
            "hidden": hidden, "k": k, "n_experts": ne, "experts": experts,
            "gate_load_pcs": [p for t in gate for p in t["pcs"]],
            "gate_bytes": sum(t["bytes"] for t in gate)})

    def lower_matmul(self, n):
        raise ir.CompileError(f"node {n.name!r}: a MatMul of two activations outside a "
                              f"recognised attention pattern is not supported")

    def lower_transpose(self, n):
        raise ir.CompileError(f"node {n.name!r}: Transpose left after canonicalisation is not "
                              f"supported")

    def lower_topk(self, n):
        raise ir.CompileError(f"node {n.name!r}: TopK outside a mixture-of-experts gate is not "
                              f"supported")


def lower(graph: ir.Graph, config, plan: QuantPlan, name: str = "model"):
    """Lower a canonical graph with its quantisation plan to a :class:`vitamin.program.Program`."""
    return _Lowering(graph, config, plan, name).run()

