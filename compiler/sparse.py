"""Long-context attention kernels: dense causal, static block-sparse and dynamic block top-k
attention compiled from ONNX, with K and V streamed from DRAM by blocks or spans.

A model whose graph is ONE ONNX ``Attention`` (opset 23) reading the graph inputs ``q [1, T,
H*D]``, ``k, v [1, T, Hkv*D]`` (3-D, ``q_num_heads`` / ``kv_num_heads``) and writing the graph
output is an attention kernel (:func:`recognize`); everything else goes through the ViT pipeline.
The kernel's mask decides the schedule:

``dense``       no mask (``is_causal`` 0 or 1): every query block reads the key blocks it may
                see; causal attention never computes the masked half (key blocks after the
                query block are not loaded, the diagonal block is masked token by token).
``static``      a constant boolean mask: folded at compile time into a per-query-block list of
                key blocks; each block must be all-true, all-false or the causal diagonal
                (otherwise: an error naming the block size and the first offending block).
``block_topk``  a mask computed from q and k by the block top-k pattern (mean-pooled blocks,
                block scores, TopK, ScatterElements, diagonal, causal; :mod:`.sparse_models`):
                recognised by structure (the TopK's k, the block count) and CHECKED numerically
                against :func:`sparse_models.block_topk_mask` on random inputs before it is
                accepted. On the device: mean-pooled key blocks once per head (VEC POOL), per
                query block the pooled query (VEC POOL), block scores (MATMUL), TOPK over the
                earlier blocks, SPANS (plus the diagonal block) -> a span list, and K/V rows
                gathered by SPANS-mode LOADs: unselected blocks are never read.

Per query block (``block`` rows) and head: S = Q K^T (MATMUL, ``b_trans``), SOFTMAX (FULL when
the keys fit one chunk, ONLINE over chunks of at most ``chunk`` keys otherwise; causal masking by
key position, from the span list for gathered keys), O = P V (MATMUL; ONLINE: ``acc_in =
SCALE`` and ``row_norm`` on the last chunk). Loads of the next unit overlap the current compute
(two buffers per operand, dependency tokens); outputs are stored per query block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from vitamin.asm import Assembler
from vitamin.golden.numerics import requant_params
from vitamin.isa import AccIn, DType, Opcode, OutMode, SmMode

from .ir import CompileError
from .sparse_models import DHSA_DOMAIN, attention_reference, block_topk_mask, dhsa_mask

__all__ = ["Kernel", "recognize", "compile_kernel", "kernel_reference"]

MARGIN = 2.0


@dataclass
class Kernel:
    """What :func:`recognize` found: shapes, heads, the schedule and its parameters."""
    name: str
    t: int
    heads: int
    kv_heads: int
    d: int
    scale: float
    causal: bool
    mode: str                       # "dense" | "static" | "block_topk"
    block: int = 0
    topk: int = 0                   # block_topk: blocks per query block, diagonal included
    mask: np.ndarray | None = None  # static: the constant [T, T] mask
    blocks: list = field(default_factory=list)   # static: key blocks per query block
    budget: int = 0                 # dhsa: tokens per query block, sink and recent included
    sink: int = 0
    recent: int = 0
    n_chunks: int = 0               # dhsa: length of the boundaries input

    def mask_for(self, q, k, boundaries=None) -> np.ndarray | None:
        """The boolean [T, T] mask of this kernel for inputs q, k (None: dense)."""
        if self.mode == "static":
            return self.mask
        if self.mode == "block_topk":
            return block_topk_mask(q, k, self.heads, self.kv_heads, self.block, self.topk)
        if self.mode == "dhsa":
            return dhsa_mask(q, k, boundaries, self.heads, self.kv_heads, self.block,
                             self.budget, self.sink, self.recent)
        return None


def _attrs(node):
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _shape(vi):
    return [d.dim_value for d in vi.type.tensor_type.shape.dim]


def recognize(model, block: int | None = None) -> Kernel | None:
    """The attention kernel of ``model`` (path or ModelProto), or None if it is not one."""
    if not isinstance(model, onnx.ModelProto):
        try:
            model = onnx.load(str(model), load_external_data=False)
        except Exception:  # noqa: BLE001 - a missing or corrupt file: the frontend says why
            return None
    g = model.graph
    dh = [n for n in g.node if n.op_type == "DHSA" and n.domain == DHSA_DOMAIN]
    if dh:
        return _recognize_dhsa(model, dh, block)
    ms = [n for n in g.node if n.op_type == "SparseAttention" and n.domain == "com.microsoft"]
    if ms:
        return _recognize_ms_sparse(model, ms)
    att = [n for n in g.node if n.op_type == "Attention" and n.domain in ("", "ai.onnx")]
    if len(att) != 1:
        return None
    n = att[0]
    inputs = {i.name: i for i in g.input if i.name not in {x.name for x in g.initializer}}
    q, k, v = n.input[:3]
    if not all(x in inputs for x in (q, k, v)) or len(g.output) != 1 or \
            g.output[0].name != n.output[0]:
        return None
    where = f"node {n.name or 'Attention'!r}"
    at = _attrs(n)
    sq, sk, sv = (_shape(inputs[x]) for x in (q, k, v))
    if len(sq) != 3 or sq[0] != 1 or not at.get("q_num_heads"):
        raise CompileError(f"{where}: long-context attention takes 3-D inputs [1, T, H*D] with "
                           f"q_num_heads / kv_num_heads, not {sq}")
    h, hkv = int(at["q_num_heads"]), int(at["kv_num_heads"])
    t, d = sq[1], sq[2] // h
    if sk != [1, t, hkv * d] or sv != [1, t, hkv * d] or h % hkv:
        raise CompileError(f"{where}: inconsistent head counts or shapes: q {sq} with {h} heads, "
                           f"k {sk}, v {sv} with {hkv} key/value heads")
    scale = float(at.get("scale", 1 / math.sqrt(d)))
    causal = bool(at.get("is_causal", 0))
    if any(x for x in n.input[4:]) or (len(n.output) > 1 and any(n.output[1:])):
        raise CompileError(f"{where}: past key/value, nonpad lengths and extra outputs are not "
                           f"supported by long-context attention")
    kern = Kernel(g.name or "attention", t, h, hkv, d, scale, causal, "dense")
    mask = n.input[3] if len(n.input) > 3 else ""
    if not mask:
        kern.block = _pick_block(t, block)
        return kern
    const = _constant(model, mask)
    if const is not None:
        kern.mode = "static"
        kern.mask = np.broadcast_to(const.astype(bool), (t, t)).copy()
        if const.dtype != np.bool_:
            raise CompileError(f"{where}: only boolean attention masks are supported")
        kern.block = _pick_block(t, block)
        kern.blocks, kern.causal = _fold_static(kern, where)
        return kern
    return _recognize_topk(model, n, kern, mask, where)


def _recognize_dhsa(model, nodes, block):
    g = model.graph
    n = nodes[0]
    where = f"node {n.name or 'DHSA'!r} (vitamin.DHSA)"
    if len(nodes) != 1 or len(g.node) != 1:
        raise CompileError(f"{where}: a DHSA model must be that one node")
    if len(n.input) < 4 or not n.input[3]:
        raise CompileError(f"{where}: the boundaries input (chunk starts) is missing")
    inputs = {i.name: i for i in g.input}
    q, k, v, bnd = n.input[:4]
    for x in (q, k, v, bnd):
        if x not in inputs:
            raise CompileError(f"{where}: input {x!r} must be a graph input")
    at = _attrs(n)
    sq, sk, sv = (_shape(inputs[x]) for x in (q, k, v))
    h, hkv = int(at.get("q_num_heads", 0)), int(at.get("kv_num_heads", 0))
    if len(sq) != 3 or not h or not hkv or h % hkv or sq[2] % h:
        raise CompileError(f"{where}: inconsistent head counts or shapes: q {sq} with {h} heads, "
                           f"{hkv} key/value heads")
    t, d = sq[1], sq[2] // h
    if sk != [1, t, hkv * d] or sv != [1, t, hkv * d]:
        raise CompileError(f"{where}: inconsistent head counts or shapes: q {sq}, k {sk}, "
                           f"v {sv} with {h} / {hkv} heads")
    if inputs[bnd].type.tensor_type.elem_type not in (onnx.TensorProto.INT64,
                                                        onnx.TensorProto.INT32):
        raise CompileError(f"{where}: boundaries must be an integer tensor")
    nch = _shape(inputs[bnd])
    if len(nch) != 1 or nch[0] < 1:
        raise CompileError(f"{where}: boundaries must have a static shape [n_chunks]")
    b = _pick_block(t, block or int(at.get("block", 128)))
    kern = Kernel(g.name or "dhsa", t, h, hkv, d, float(at.get("scale", 1 / math.sqrt(d))),
                  True, "dhsa", block=b, budget=int(at.get("budget", 1024)),
                  sink=int(at.get("sink", 0)), recent=int(at.get("recent", 0)),
                  n_chunks=nch[0])
    if kern.budget > t:
        raise CompileError(f"{where}: budget {kern.budget} is larger than the sequence ({t})")
    if kern.budget < kern.sink + kern.recent:
        raise CompileError(f"{where}: budget {kern.budget} is smaller than sink + recent "
                           f"({kern.sink} + {kern.recent})")
    return kern


def _recognize_ms_sparse(model, nodes):
    """com.microsoft.SparseAttention with constant CSR layouts -> a static kernel."""
    from .sparse_models import layout_mask
    g = model.graph
    n = nodes[0]
    where = f"node {n.name or 'SparseAttention'!r} (com.microsoft.SparseAttention)"
    if len(nodes) != 1 or len(g.node) != 1:
        raise CompileError(f"{where}: a SparseAttention model must be that one node")
    ins = list(n.input) + [""] * (11 - len(n.input))
    inputs = {i.name: i for i in g.input}
    q, k, v = ins[:3]
    if not all(x in inputs for x in (q, k, v)):
        raise CompileError(f"{where}: query, key and value must be separate graph inputs "
                           f"(packed QKV is not supported)")
    total = _constant(model, ins[7])
    if ins[9] or ins[10] or total is None or int(np.asarray(total).reshape(-1)[0]) != \
            _shape(inputs[q])[1]:
        raise CompileError(f"{where}: only prefill from empty key/value caches "
                           f"(total_sequence_length = the query length, constant) without "
                           f"rotary caches is supported")
    extra = [o.name for o in g.output if o.name != n.output[0]]
    if any(o not in n.output[1:] for o in extra):
        raise CompileError(f"{where}: graph outputs other than the op's are not supported")
    at = _attrs(n)
    if at.get("do_rotary", 0):
        raise CompileError(f"{where}: do_rotary is not supported")
    rows, cols = _constant(model, ins[5]), _constant(model, ins[6])
    if rows is None or cols is None:
        raise CompileError(f"{where}: the block layout (block_row_indices, block_col_indices) "
                           f"must be constant")
    rows, cols = np.atleast_2d(rows), np.atleast_2d(cols)
    if any(not (np.array_equal(rows[0], r) and np.array_equal(cols[0], c))
           for r, c in zip(rows, cols)):
        raise CompileError(f"{where}: per-head layouts differ; one layout for all heads is "
                           f"supported")
    sq, sk = _shape(inputs[q]), _shape(inputs[k])
    h, hkv = int(at.get("num_heads", 0)), int(at.get("kv_num_heads", 0))
    if len(sq) != 3 or not h or not hkv or h % hkv or sq[2] % h or \
            sk != [1, sq[1], hkv * (sq[2] // h)]:
        raise CompileError(f"{where}: inconsistent head counts or shapes: q {sq}, k {sk}, "
                           f"{h} / {hkv} heads")
    t, d = sq[1], sq[2] // h
    blk = int(at.get("sparse_block_size", 0))
    if blk not in (16, 32, 64, 128) or t % blk:
        raise CompileError(f"{where}: sparse_block_size {blk} must be 16, 32, 64 or 128 and "
                           f"divide T = {t}")
    if len(rows[0]) != t // blk + 1:
        raise CompileError(f"{where}: block_row_indices has {len(rows[0])} entries for "
                           f"{t // blk} query blocks")
    kern = Kernel(g.name or "sparse_attention", t, h, hkv, d,
                  float(at.get("scale", 1 / math.sqrt(d))), True, "static", block=blk)
    kern.mask = layout_mask(t, blk, rows[0], cols[0])
    kern.blocks, _ = _fold_static(kern, where)
    return kern


def _pick_block(t, block):
    b = block or min(128, t)
    if t % b or b & (b - 1):
        raise CompileError(f"block size {b} must be a power of two dividing the sequence length "
                           f"{t}")
    return b


def _constant(model, name):
    for i in model.graph.initializer:
        if i.name == name:
            return numpy_helper.to_array(i)
    for nd in model.graph.node:
        if nd.op_type == "Constant" and nd.output[0] == name:
            return numpy_helper.to_array(_attrs(nd)["value"])
    return None


def _fold_static(kern, where):
    """Per query block the key blocks with any allowed entry; each block must be all-true,
    all-false or (the diagonal) causal."""
    b, nb = kern.block, kern.t // kern.block
    m = kern.mask & (np.tril(np.ones((kern.t, kern.t), bool)) if kern.causal else True)
    tri = np.tril(np.ones((b, b), bool))
    blocks, causal = [], False
    for qb in range(nb):
        row = []
        for kb in range(nb):
            sub = m[qb * b:(qb + 1) * b, kb * b:(kb + 1) * b]
            if not sub.any():
                continue
            if sub.all():
                if kb > qb and causal:
                    raise CompileError(f"{where}: the mask allows key block {kb} for query "
                                       f"block {qb} but masks the diagonal causally")
                row.append(kb)
            elif kb == qb and np.array_equal(sub, tri):
                causal = True
                row.append(kb)
            else:
                raise CompileError(f"{where}: the mask is not block-aligned at block size {b}: "
                                   f"query block {qb}, key block {kb} is partly masked (only "
                                   f"whole blocks and the causal diagonal can be skipped or "
                                   f"kept); give another block size")
        blocks.append(row)
    if causal and any(kb > qb for qb, row in enumerate(blocks) for kb in row):
        raise CompileError(f"{where}: a causal diagonal with later key blocks is not supported")
    return blocks, causal


def _recognize_topk(model, att, kern, mask, where):
    g = model.graph
    prod = {o: nd for nd in g.node for o in nd.output}
    sub, stack, seen = [], [mask], set()
    while stack:
        v = stack.pop()
        if v in seen or v not in prod:
            continue
        seen.add(v)
        nd = prod[v]
        sub.append(nd)
        stack.extend(i for i in nd.input if i)
    topks = [nd for nd in sub if nd.op_type == "TopK"]
    if len(topks) != 1:
        raise CompileError(f"{where}: a computed attention mask must be the block top-k pattern "
                           f"(pooled blocks -> MatMul -> TopK -> ScatterElements -> mask); "
                           f"found {len(topks)} TopK nodes")
    tk = topks[0]
    kc = _constant(model, tk.input[1])
    scores = next((vi for vi in onnx.shape_inference.infer_shapes(model).graph.value_info
                   if vi.name == tk.input[0]), None)
    if kc is None or scores is None:
        raise CompileError(f"{where}: the block top-k mask needs a constant k and static shapes")
    nb = _shape(scores)[-1]
    kern.mode = "block_topk"
    kern.topk = int(np.asarray(kc).reshape(-1)[0]) + 1
    kern.block = kern.t // max(nb, 1)
    if kern.topk > nb:
        raise CompileError(f"{where}: a budget of {kern.topk} blocks ({kern.topk - 1} selected "
                           f"+ the diagonal) is larger than the sequence ({nb} blocks of "
                           f"{kern.block} tokens)")
    if nb < 1 or kern.t % nb or kern.block & (kern.block - 1):
        raise CompileError(f"{where}: {nb} key blocks do not tile {kern.t} tokens in power-of-two "
                           f"blocks")
    # the mask subgraph must compute exactly the block top-k mask: check it on random inputs
    ins = [i for i in g.input if i.name in {x for nd in sub for x in nd.input}]
    out = onnx.helper.make_tensor_value_info(mask, onnx.TensorProto.BOOL, [kern.t, kern.t])
    keep = {id(nd) for nd in sub}
    subg = onnx.helper.make_graph([nd for nd in g.node if id(nd) in keep], "mask", ins, [out],
                                  list(g.initializer))
    subm = onnx.helper.make_model(subg, opset_imports=model.opset_import)
    import onnxruntime as ort
    sess = ort.InferenceSession(subm.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for _ in range(3):
        feeds = {i.name: rng.standard_normal(_shape(i)).astype(np.float32) for i in ins}
        got = sess.run(None, feeds)[0]
        want = block_topk_mask(feeds.get("q", feeds.get(att.input[0])),
                               feeds.get("k", feeds.get(att.input[1])), kern.heads,
                               kern.kv_heads, kern.block, kern.topk)
        if got.shape != want.shape or not np.array_equal(got.astype(bool), want):
            raise CompileError(f"{where}: the computed mask has a TopK but is not the block "
                               f"top-k pattern vitamin executes (pooled query/key blocks, "
                               f"scores summed over heads, top-{kern.topk - 1} earlier blocks "
                               f"plus the diagonal, causal)")
    kern.causal = True
    return kern


def kernel_reference(kern: Kernel, q, k, v, boundaries=None) -> np.ndarray:
    """Float64 output [T, H*D] of the kernel (the same as onnxruntime's)."""
    return attention_reference(q, k, v, kern.heads, kern.kv_heads,
                               kern.mask_for(q, k, boundaries), kern.causal)


# --------------------------------------------------------------------------------------------
# Lowering
# --------------------------------------------------------------------------------------------

def _calibrate(kern, samples):
    """Scales of q, k, v, the scores, the block scores and the output."""
    amax = {"q": 0.0, "k": 0.0, "v": 0.0, "s": 0.0, "bs": 0.0, "o": 0.0, "tok": 0.0}
    h, hkv, d = kern.heads, kern.kv_heads, kern.d
    for smp in samples:
        q, k, v = (np.asarray(smp[x], np.float64).reshape(kern.t, -1) for x in "qkv")
        for x, a in (("q", q), ("k", k), ("v", v)):
            amax[x] = max(amax[x], float(np.abs(a).max()))
        for hh in range(h):
            gg = hh // (h // hkv)
            s = q[:, hh * d:(hh + 1) * d] @ k[:, gg * d:(gg + 1) * d].T * kern.scale
            amax["s"] = max(amax["s"], float(np.abs(s).max()))
        if kern.mode == "block_topk":
            nb = kern.t // kern.block
            krep = np.repeat(k.reshape(kern.t, hkv, 1, d), h // hkv, 2).reshape(kern.t, -1)
            bs = q.reshape(nb, kern.block, -1).mean(1) @ krep.reshape(nb, kern.block, -1).mean(1).T
            amax["bs"] = max(amax["bs"], float(np.abs(bs).max()))
        bnd = smp.get("boundaries")
        if kern.mode == "dhsa":
            rep = h // hkv
            for qb in range(kern.t // kern.block):
                lim = (qb + 1) * kern.block
                qbar = q[qb * kern.block:lim].mean(0).reshape(hkv, rep, d).sum(1).reshape(-1)
                amax["tok"] = max(amax["tok"], float(np.abs(k[:lim] @ qbar).max()))
        amax["o"] = max(amax["o"], float(np.abs(kernel_reference(kern, q, k, v, bnd)).max()))
    return {x: max(a, 1e-6) * MARGIN / 32767 for x, a in amax.items()}


class _Emitter:
    """Program emission with the token discipline of the module docstring: a load group pops
    one COMPUTE -> LOAD token pushed by a MARK right before it (everything emitted on COMPUTE
    before it is done) and pushes one LOAD -> COMPUTE token, popped by its compute unit."""

    def __init__(self, cfg):
        self.a = Assembler(cfg)
        self.groups = 0
        self.popped = 0
        self.open = None

    def load_group(self, loads, *, wait: bool):
        if wait:
            self.a.mark(0xFFFD, push_prev=1)
        for i, f in enumerate(loads):
            extra = {}
            if i == 0 and wait:
                extra["pop_next"] = 1
            if i == len(loads) - 1:
                extra["push_next"] = 1
            self.a.load(**f, **extra)
        self.groups += 1
        return self.groups

    def wait(self, group) -> dict:
        while self.popped < group - 1:
            self.a.mark(0xFFFF, pop_prev=1)
            self.popped += 1
        if self.popped < group:
            self.popped += 1
            return {"pop_prev": 1}
        return {}


def compile_kernel(kern: Kernel, config, calibration=None, *, chunk: int | None = None):
    """Lower an attention kernel to a program for ``config``."""
    cfg = config
    t, h, hkv, d, b = kern.t, kern.heads, kern.kv_heads, kern.d, kern.block
    nb = t // b
    rep = h // hkv
    if calibration is None:
        rng = np.random.default_rng(0)
        calibration = [{x: rng.standard_normal((t, (h if x == "q" else hkv) * d))
                        for x in "qkv"} for _ in range(2)]
        if kern.mode == "dhsa":
            from .sparse_models import dhsa_boundaries
            for i, smp in enumerate(calibration):
                smp["boundaries"] = dhsa_boundaries(t, kern.n_chunks, seed=i,
                                                    min_len=max(1, t // (2 * kern.n_chunks)))
    sc = _calibrate(kern, calibration)
    lanes_align = max(cfg.row_lanes, 16)

    def al(x):
        return -(-x // lanes_align) * lanes_align
    # per-unit key capacity: the scores, two K and two V buffers must fit with Q and O
    if kern.mode == "block_topk":
        lmax = kern.topk * b
    elif kern.mode == "static":
        lmax = max(len(r) for r in kern.blocks) * b
    elif kern.mode == "dhsa":
        lmax = min(kern.budget, t)
    else:
        lmax = t
    cap = chunk or lmax
    gathered = kern.mode in ("block_topk", "dhsa")
    fixed = 2 * al(b * h * d) * 2 + (al(nb * h * d) + al(h * d) + al(nb)) * \
        (kern.mode == "block_topk") + \
        (al(t * hkv * d) + al(h * d) + al(hkv * d) + al(t)) * (kern.mode == "dhsa")
    while cap > b and fixed + al(b * cap) + 4 * al(cap * d) > cfg.spad_words:
        cap //= 2
    cap = max(b, cap // b * b)
    if gathered and cap < lmax:
        raise CompileError(f"attention {kern.name!r}: the {lmax} gathered keys of a query block "
                           f"({kern.mode}) with {h} heads of {d} do not fit the "
                           f"scratchpad of {cfg.name!r} ({cfg.spad_words} words); use a smaller "
                           f"block or budget, or a larger configuration")
    if fixed + al(b * cap) + 4 * al(cap * d) > cfg.spad_words:
        raise CompileError(f"attention {kern.name!r}: a query block of {b} rows with {d}-wide "
                           f"heads does not fit the scratchpad of {cfg.name!r} "
                           f"({cfg.spad_words} words); use a smaller block")
    acc_pv = -(-d // cfg.cols) * b
    # ONLINE (several key chunks) keeps every head of a group in the accumulator and row state
    multi = not gathered and cap < lmax
    live = rep if multi else 1
    # not enough for every head of a group at once: one head per unit (K/V read per head)
    split = multi and (rep * acc_pv + 2 * b > cfg.acc_lines or rep * b > cfg.rowstate_rows)
    if split:
        live = 1
    if live * acc_pv + 2 * b > cfg.acc_lines or live * b > cfg.rowstate_rows or \
            b > cfg.max_dim:
        raise CompileError(f"attention {kern.name!r}: block {b} with {live} live heads needs "
                           f"{live * acc_pv + 2 * b} accumulator lines and {live * b} row-state "
                           f"rows; {cfg.name!r} has {cfg.acc_lines} and {cfg.rowstate_rows}: "
                           f"use a smaller block")
    if kern.mode == "block_topk" and (kern.topk - 1 > cfg.max_topk or nb > cfg.max_dim):
        raise CompileError(f"attention {kern.name!r}: top-{kern.topk - 1} block selection, the "
                           f"configuration's TOPK takes k <= {cfg.max_topk}")
    # scratchpad map
    addr = [0]

    def buf(words):
        a0 = addr[0]
        addr[0] += al(words)
        return a0
    QS = [buf(b * h * d), buf(b * h * d)]
    OS = [buf(b * h * d), buf(b * h * d)]
    KS = [buf(cap * d), buf(cap * d)]
    VS = [buf(cap * d), buf(cap * d)]
    S = buf(b * cap)
    if kern.mode == "block_topk":
        KBAR, QBAR, BS = buf(nb * h * d), buf(h * d), buf(nb)
    if kern.mode == "dhsa":
        KRES, QBAR, QSUM, SROW = buf(t * hkv * d), buf(h * d), buf(hkv * d), buf(t)
    assert addr[0] <= cfg.spad_words
    e = _Emitter(cfg)
    a = e.a
    a.meta["model"] = kern.name
    a.meta["attention"] = {"mode": kern.mode, "t": t, "heads": h, "kv_heads": hkv, "d": d,
                           "block": b, "topk": kern.topk, "chunk": cap}
    qref = a.tensor("q", "input", (t, h * d), "i16", sc["q"])
    kref = a.tensor("k", "input", (t, hkv * d), "i16", sc["k"])
    vref = a.tensor("v", "input", (t, hkv * d), "i16", sc["v"])
    oref = a.tensor("o", "output", (t, h * d), "i16", sc["o"])
    rowq, rowk = 2 * h * d, 2 * hkv * d
    mq, shq = requant_params(kern.scale * sc["q"] * sc["k"] / sc["s"])
    smm, sms = requant_params(sc["s"] * math.log2(math.e) * 2 ** 16)
    mo_full = requant_params(2.0 ** -(cfg.act_bits - 1) * sc["v"] / sc["o"])
    mo_onl = requant_params(sc["v"] / sc["o"])
    slot_n = max(64, kern.n_chunks + 2)
    spans_idx = [0, slot_n]                 # span lists of the two in-flight query blocks
    topk_idx = 2 * slot_n                   # block_topk: TOPK output; dhsa: the chunk starts
    if topk_idx + max(nb, kern.n_chunks) > cfg.idx_entries:
        raise CompileError(f"attention {kern.name!r}: the selection needs "
                           f"{topk_idx + max(nb, kern.n_chunks)} index entries; {cfg.name!r} "
                           f"has {cfg.idx_entries}")
    regs = [(2, 3), (4, 5)]                 # (span count, rows) registers per slot
    # static span lists (static mode): one IDX list per query block, loaded once
    static_lists = {}
    if kern.mode == "static":
        for qb, row in enumerate(kern.blocks):
            sp = []
            for kb in row:
                if sp and sp[-1][0] + sp[-1][1] == kb * b:
                    sp[-1][1] += b
                else:
                    sp.append([kb * b, b])
            static_lists[qb] = (None, sp)

    if kern.mode == "dhsa":
        # the chunk starts (index entries (start, 0)) and every key row, resident on chip for
        # the token scores of the selection
        bref = a.tensor("boundaries", "input", (kern.n_chunks, 2), "i32", 1.0)
        a.meta["index_inputs"] = {"boundaries": {"seq": t}}
        a.load(mem=1, dram_addr=bref, spad_addr=topk_idx, run=kern.n_chunks, dtype=DType.I32)
        a.load(dram_addr=kref, spad_addr=KRES, run=hkv * d, n0=t, ds0=rowk, ss0=hkv * d,
               dtype=DType.I16)

    # ---- units: (kind, qb, g, head list, key spans or None (gathered), chunk index, chunks)
    units = []
    if kern.mode == "block_topk":
        pool_rows = (cap * d) // (hkv * d) // b * b
        if pool_rows < b:
            raise CompileError(f"attention {kern.name!r}: pooling a block of {b} keys with "
                               f"{hkv} key heads does not fit the key buffer; use a smaller "
                               f"block")
        for r0 in range(0, t, pool_rows):
            units.append({"kind": "pool", "r0": r0, "rows": min(pool_rows, t - r0)})
    for qb in range(nb):
        groups = [(gg, [hh]) for gg in range(hkv) for hh in range(gg * rep, (gg + 1) * rep)] \
            if split else [(gg, list(range(gg * rep, (gg + 1) * rep))) for gg in range(hkv)]
        for gg, heads_g in groups:
            if gathered:
                L = (min(kern.topk - 1, qb) + 1) * b if kern.mode == "block_topk" else \
                    min(kern.budget, (qb + 1) * b)
                units.append({"kind": "att", "qb": qb, "g": gg, "heads": heads_g,
                              "gather": True, "spans": None, "L": L, "ci": 0, "nc": 1})
                continue
            if kern.mode == "static":
                sp = static_lists[qb][1]
            else:
                sp = [[0, (qb + 1) * b if kern.causal else t]]
            keys = [(s0 + j) for s0, ln in sp for j in range(0, ln, b)]
            chunks = [keys[i:i + cap // b] for i in range(0, len(keys), cap // b)]
            for ci, ck in enumerate(chunks):
                cs = []
                for k0 in ck:
                    if cs and cs[-1][0] + cs[-1][1] == k0:
                        cs[-1][1] += b
                    else:
                        cs.append([k0, b])
                units.append({"kind": "att", "qb": qb, "g": gg, "heads": heads_g,
                              "gather": False, "spans": cs, "L": len(ck) * b, "ci": ci,
                              "nc": len(chunks)})
    # static units whose keys are several spans: their key positions come from a constant span
    # list in index memory, loaded once at the start
    ent = []
    for u in units:
        if u["kind"] == "att" and not u["gather"] and len(u["spans"]) > 1:
            u["kpos_idx"] = 2 * slot_n + len(ent)
            ent += u["spans"]
    if ent:
        if 2 * slot_n + len(ent) > cfg.idx_entries:
            raise CompileError(f"attention {kern.name!r}: the static span lists need "
                               f"{2 * slot_n + len(ent)} index entries; {cfg.name!r} has "
                               f"{cfg.idx_entries}")
        ref = a.const("static_spans", np.array(ent, np.int64).reshape(-1, 2), "i32")
        a.load(mem=1, dram_addr=ref, spad_addr=2 * slot_n, run=len(ent), dtype=DType.I32)
    first_of_qb = {}
    last_of_qb = {}
    for i, u in enumerate(units):
        if u["kind"] == "att":
            first_of_qb.setdefault(u["qb"], i)
            last_of_qb[u["qb"]] = i
    sel_done = set()

    def selection(qb):
        """COMPUTE: the key selection of query block ``qb`` (its Q block is in QS[qb % 2],
        loaded by the group of its first unit) -> span list and registers of slot qb % 2."""
        slot = qb % 2
        if kern.mode == "dhsa":
            lim = (qb + 1) * b
            pm, ps = requant_params(1.0 / b)
            a.vec(op=3, m=1, n=h * d, group=b, a_addr=QS[slot], a_stride=h * d, out_addr=QBAR,
                  out_stride=h * d, ma=pm, sa=ps)
            src = QBAR
            if rep > 1:         # sum the query heads of each key/value head, scaled by 1/rep
                am, ash = requant_params(1.0 / rep)
                for gg in range(hkv):
                    base = QBAR + gg * rep * d
                    a.vec(op=0, m=1, n=d, a_addr=base, a_stride=d, out_addr=QSUM + gg * d,
                          out_stride=d, ma=am, sa=ash)
                    for r in range(1, rep):
                        a.vec(op=1, m=1, n=d, a_addr=QSUM + gg * d, a_stride=d,
                              b_addr=base + r * d, b_stride=d, out_addr=QSUM + gg * d,
                              out_stride=d, ma=1, sa=0, mb=am, sb=ash)
                src = QSUM
            tm, tsh = requant_params(rep * sc["q"] * sc["k"] / sc["tok"])
            a.matmul(m=1, k=hkv * d, n=lim, a_addr=src, a_stride=hkv * d, b_addr=KRES,
                     b_stride=hkv * d, b_trans=1, out=OutMode.SPAD, out_addr=SROW,
                     out_stride=lim, mult=tm, shift=tsh, acc_addr=acc_pv)
            a.emit(Opcode.SELECT, n_chunks=kern.n_chunks, chunk_addr=topk_idx, seq=t,
                   limit=lim, in_addr=SROW, sink=kern.sink, recent=kern.recent,
                   budget=kern.budget, out_addr=spans_idx[slot], dst_reg=regs[slot][0],
                   rows_reg=regs[slot][1])
            sel_done.add(qb)
            return
        k_ = min(kern.topk - 1, qb)
        if k_:
            a.vec(op=3, m=1, n=h * d, group=b, a_addr=QS[slot], a_stride=h * d, out_addr=QBAR,
                  out_stride=h * d, ma=requant_params(1.0 / b)[0], sa=requant_params(1.0 / b)[1])
            bm, bsh = requant_params(sc["q"] * sc["k"] / sc["bs"])
            a.matmul(m=1, k=h * d, n=qb, a_addr=QBAR, a_stride=h * d, b_addr=KBAR,
                     b_stride=h * d, b_trans=1, out=OutMode.SPAD, out_addr=BS, out_stride=qb,
                     mult=bm, shift=bsh, acc_addr=acc_pv)
            a.topk(m=1, n=qb, k=k_, in_addr=BS, in_stride=qb, idx_addr=topk_idx)
        a.spans(k=k_, idx_addr=topk_idx, block=b, sink=0, diag_lo=qb, diag_n=1,
                limit=(qb + 1) * b, out_addr=spans_idx[slot], dst_reg=regs[slot][0],
                rows_reg=regs[slot][1])
        sel_done.add(qb)

    def loads_of(i):
        u = units[i]
        slot = i % 2
        ls = []
        if u["kind"] == "pool":
            ls.append(dict(dram_addr=kref + u["r0"] * rowk, spad_addr=KS[slot], run=hkv * d,
                           n0=u["rows"], ds0=rowk, ss0=hkv * d, dtype=DType.I16))
            return ls
        qb, gg = u["qb"], u["g"]
        if i == first_of_qb[qb]:
            ls.append(dict(dram_addr=qref + qb * b * rowq, spad_addr=QS[qb % 2], run=h * d,
                           n0=b, ds0=rowq, ss0=h * d, dtype=DType.I16))
        if u["gather"]:
            sl = qb % 2
            for ref_, dst in ((kref, KS[slot]), (vref, VS[slot])):
                ls.append(dict(mode=1, dram_addr=ref_ + gg * d * 2, spad_addr=dst, run=d, n0=1,
                               ds0=rowk, ss0=d, idx_addr=spans_idx[sl], count_reg=regs[sl][0],
                               dtype=DType.I16))
        else:
            row = 0
            for s0, ln in u["spans"]:
                for ref_, dst in ((kref, KS[slot]), (vref, VS[slot])):
                    ls.append(dict(dram_addr=ref_ + s0 * rowk + gg * d * 2,
                                   spad_addr=dst + row * d, run=d, n0=ln, ds0=rowk, ss0=d,
                                   dtype=DType.I16))
                row += ln
        return ls

    def emit_load(i):
        u = units[i]
        if u["kind"] == "att" and u["gather"] and u["qb"] not in sel_done:
            # the Q block first (the selection reads it), then the gathers after SELECTION
            qload = loads_of(i)[0]
            grp_q = e.load_group([qload], wait=i >= 2)
            u["q_group"] = grp_q
            tok = e.wait(grp_q)
            if tok:
                a.mark(0xFFFF, **tok)
            selection(u["qb"])
            u["group"] = e.load_group(loads_of(i)[1:], wait=True)
            return
        u["group"] = e.load_group(loads_of(i), wait=i >= 2)

    stored = set()

    def emit_compute(i):
        u = units[i]
        slot = i % 2
        tok = e.wait(u["group"])
        if u["kind"] == "pool":
            rows = u["rows"]
            for hh in range(h):
                gg = hh // rep
                ma, sa = requant_params(1.0 / b)
                a.vec(op=3, m=rows // b, n=d, group=b, a_addr=KS[slot] + gg * d,
                      a_stride=hkv * d, out_addr=KBAR + (u["r0"] // b) * h * d + hh * d,
                      out_stride=h * d, ma=ma, sa=sa, **tok)
                tok = {}
            return
        qb, L = u["qb"], u["L"]
        qs = QS[qb % 2]
        os_ = OS[qb % 2]
        if i == first_of_qb[qb] and qb >= 2 and (qb - 2) in stored:
            tok["pop_next"] = 1             # the STORE of qb - 2 has read OS[qb % 2]
        spans_kw = {}
        if u["gather"]:
            sl = qb % 2
            spans_kw = dict(kpos_spans=1, idx_addr=spans_idx[sl], count_reg=regs[sl][0])
        elif len(u["spans"]) > 1:
            spans_kw = dict(kpos_spans=1, idx_addr=u["kpos_idx"], n_spans=len(u["spans"]))
        else:
            spans_kw = dict(k_pos=u["spans"][0][0])
        causal = 1 if kern.causal else 0
        last_unit = i == last_of_qb[qb]
        for j, hh in enumerate(u["heads"]):
            push = {"push_next": 1} if last_unit and j == len(u["heads"]) - 1 else {}
            a.matmul(m=b, k=d, n=L, a_addr=qs + hh * d, a_stride=h * d, b_addr=KS[slot],
                     b_stride=d, b_trans=1, out=OutMode.SPAD, out_addr=S, out_stride=L,
                     mult=mq, shift=shq, acc_addr=live * acc_pv, **tok)
            tok = {}
            if u["nc"] == 1:
                a.softmax(mode=SmMode.FULL, m=b, n=L, in_addr=S, in_stride=L, out_addr=S,
                          out_stride=L, mult=smm, shift=sms, causal=causal, q_pos=qb * b,
                          **spans_kw)
                a.matmul(m=b, k=L, n=d, a_addr=S, a_stride=L, b_addr=VS[slot], b_stride=d,
                         out=OutMode.SPAD, out_addr=os_ + hh * d, out_stride=h * d,
                         mult=mo_full[0], shift=mo_full[1], **push)
                continue
            first, last = u["ci"] == 0, u["ci"] == u["nc"] - 1
            a.softmax(mode=SmMode.ONLINE, first=int(first), last=int(last), m=b, n=L,
                      in_addr=S, in_stride=L, out_addr=S, out_stride=L, mult=smm, shift=sms,
                      causal=causal, q_pos=qb * b, rs_base=j * b, **spans_kw)
            mm = dict(m=b, k=L, n=d, a_addr=S, a_stride=L, b_addr=VS[slot], b_stride=d,
                      acc_addr=j * acc_pv, rs_base=j * b,
                      acc_in=AccIn.ZERO if first else AccIn.SCALE)
            if last:
                a.matmul(row_norm=1, out=OutMode.SPAD, out_addr=os_ + hh * d,
                         out_stride=h * d, mult=mo_onl[0], shift=mo_onl[1], **mm, **push)
            else:
                a.matmul(out=OutMode.ACC, **mm)
        if last_unit:
            extra = {"push_prev": 1} if qb + 2 < nb else {}
            a.store(dram_addr=oref + qb * b * rowq, spad_addr=os_, run=h * d, n0=b, ds0=rowq,
                    ss0=h * d, dtype=DType.I16, pop_prev=1, **extra)
            stored.add(qb)

    # emission: L0, L1, C0, L2, C1, L3, ... (a load group waits for all compute before it)
    n_u = len(units)
    for i in range(min(2, n_u)):
        emit_load(i)
    for i in range(n_u):
        emit_compute(i)
        if i + 2 < n_u:
            emit_load(i + 2)
    e.wait(e.groups)
    a.end()
    return a.link()
