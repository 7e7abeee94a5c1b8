"""ONNX builders of long-context attention graphs (for tests and benchmarks).

Every builder returns an ``onnx.ModelProto`` (opset 23) with graph inputs ``q [1, T, H*D]``,
``k [1, T, Hkv*D]``, ``v [1, T, Hkv*D]`` and output ``o [1, T, H*D]``; heads are token-major
column groups, grouped-query attention when ``kv_heads < heads`` (query head ``h`` reads
key/value head ``h // (heads // kv_heads)``). onnxruntime runs all of them, so it is the
reference for the sparse patterns too.

``dense_causal``       Attention-23 with ``is_causal = 1``.
``static_blocks``      Attention-23 with a constant boolean mask: causal, plus a block pattern
                       (``sink`` first key blocks and ``local`` most recent key blocks per query
                       block, i.e. sink + sliding window at block granularity).
``block_topk``         the dynamic block-sparse baseline in standard ops: mean-pooled query and
                       key blocks (key heads repeated to the query heads), block scores summed
                       over heads, the ``topk - 1`` best EARLIER blocks (``TopK`` on the scores
                       with later blocks pushed to -1e9, ``ScatterElements`` into a zero
                       matrix, kept only where strictly earlier) plus the diagonal block,
                       expanded to tokens and combined with the token-level causal mask, then
                       Attention-23 with that boolean mask.
``ms_sparse_attention``  ``com.microsoft.SparseAttention`` with a constant CSR block layout
                       (local + vertical stride, as Phi-3-small); :func:`layout_mask` is its mask.
``dhsa``               DHSA (Dynamic Hierarchical Sparse Attention) as one custom-domain node
                       ``vitamin.DHSA(q, k, v, boundaries)``; :func:`dhsa_expanded` is the same
                       computation for onnxruntime (Attention-23 with the :func:`dhsa_mask`).
"""

from __future__ import annotations

import math

import numpy as np
from onnx import TensorProto, helper, numpy_helper

__all__ = ["dense_causal", "static_blocks", "block_topk", "static_block_mask",
           "block_topk_mask", "attention_reference", "dhsa", "dhsa_mask", "dhsa_expanded",
           "dhsa_boundaries", "ms_sparse_attention", "csr_layout", "layout_mask",
           "run_ms_sparse_attention"]

OPSET = 23


def _io(t, h, hkv, d):
    f = TensorProto.FLOAT
    return ([helper.make_tensor_value_info("q", f, [1, t, h * d]),
             helper.make_tensor_value_info("k", f, [1, t, hkv * d]),
             helper.make_tensor_value_info("v", f, [1, t, hkv * d])],
            [helper.make_tensor_value_info("o", f, [1, t, h * d])])


def _model(nodes, t, h, hkv, d, inits, name):
    ins, outs = _io(t, h, hkv, d)
    g = helper.make_graph(nodes, name, ins, outs, inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)])


def _attention(mask, h, hkv, d, causal=0):
    ins = ["q", "k", "v"] + ([mask] if mask else [])
    return helper.make_node("Attention", ins, ["o"], name="attention", q_num_heads=h,
                            kv_num_heads=hkv, is_causal=causal, scale=1.0 / math.sqrt(d))


def dense_causal(t: int, heads: int, kv_heads: int, d: int):
    """Dense causal self-attention (Attention-23, ``is_causal = 1``)."""
    return _model([_attention("", heads, kv_heads, d, causal=1)], t, heads, kv_heads, d, [],
                  "dense_causal")


def static_block_mask(t, block, sink, local):
    """Causal token mask restricted to key blocks ``< sink`` and the ``local`` latest blocks
    (the query's own block included)."""
    nb = t // block
    qb = np.arange(nb)[:, None]
    kb = np.arange(nb)[None, :]
    blocks = (kb <= qb) & ((kb < sink) | (kb > qb - local))
    m = np.repeat(np.repeat(blocks, block, 0), block, 1)
    return m & np.tril(np.ones((t, t), bool))


def static_blocks(t, heads, kv_heads, d, block=128, sink=1, local=4):
    """Sink + local (sliding window) attention at block granularity, as a constant mask."""
    m = numpy_helper.from_array(static_block_mask(t, block, sink, local), "mask")
    return _model([_attention("mask", heads, kv_heads, d)], t, heads, kv_heads, d, [m],
                  "static_blocks")


def block_topk_mask(q, k, heads, kv_heads, block, topk):
    """The boolean [T, T] mask :func:`block_topk` computes (float64 NumPy; TopK ties to the
    lower block, as ONNX)."""
    q = np.asarray(q, dtype=np.float64).reshape(q.shape[-2], -1)
    k = np.asarray(k, dtype=np.float64).reshape(k.shape[-2], -1)
    t = q.shape[0]
    d = q.shape[1] // heads
    nb = t // block
    krep = np.repeat(k.reshape(t, kv_heads, 1, d), heads // kv_heads, axis=2).reshape(t, -1)
    qp = q.reshape(nb, block, -1).mean(1)
    kp = krep.reshape(nb, block, -1).mean(1)
    s = qp @ kp.T
    later = np.arange(nb)[None, :] >= np.arange(nb)[:, None]
    s = np.where(later, -1e9, s)
    top = np.argsort(-s, axis=1, kind="stable")[:, :topk - 1]
    sel = np.zeros((nb, nb), bool)
    np.put_along_axis(sel, top, True, axis=1)
    blocks = (sel & ~later) | np.eye(nb, dtype=bool)
    m = np.repeat(np.repeat(blocks, block, 0), block, 1)
    return m & np.tril(np.ones((t, t), bool))


def block_topk(t, heads, kv_heads, d, block=128, topk=8):
    """Dynamic block top-k attention written with standard ONNX ops (see the module doc)."""
    if topk < 2:
        raise ValueError("topk counts the diagonal block: it must be >= 2")
    nb = t // block
    rep = heads // kv_heads
    c = {
        "shape_q": np.array([nb, block, heads * d], np.int64),
        "shape_k4": np.array([t, kv_heads, 1, d], np.int64),
        "shape_krep": np.array([t, kv_heads, rep, d], np.int64),
        "shape_k2": np.array([nb, block, heads * d], np.int64),
        "axes1": np.array([1], np.int64),
        "later": np.where(np.arange(nb)[None, :] >= np.arange(nb)[:, None], -1e9,
                          0).astype(np.float32),
        "kminus1": np.array([topk - 1], np.int64),
        "zeros": np.zeros((nb, nb), np.float32),
        "ones": np.ones((nb, topk - 1), np.float32),
        "earlier": (np.arange(nb)[None, :] < np.arange(nb)[:, None]).astype(np.float32),
        "eye": np.eye(nb, dtype=np.float32),
        "half": np.array(0.5, np.float32),
        "shape_b4": np.array([nb, 1, nb, 1], np.int64),
        "shape_exp": np.array([nb, block, nb, block], np.int64),
        "shape_tt": np.array([t, t], np.int64),
        "tril": np.tril(np.ones((t, t), bool)),
    }
    inits = [numpy_helper.from_array(v, n) for n, v in c.items()]
    n = helper.make_node
    nodes = [
        n("Reshape", ["q", "shape_q"], ["qb"], name="pool_q_reshape"),
        n("ReduceMean", ["qb", "axes1"], ["qp"], keepdims=0, name="pool_q"),
        n("Reshape", ["k", "shape_k4"], ["k4"], name="k_heads"),
        n("Expand", ["k4", "shape_krep"], ["krep4"], name="k_repeat"),
        n("Reshape", ["krep4", "shape_k2"], ["kb"], name="pool_k_reshape"),
        n("ReduceMean", ["kb", "axes1"], ["kp"], keepdims=0, name="pool_k"),
        n("Transpose", ["kp"], ["kpt"], perm=[1, 0], name="kp_t"),
        n("MatMul", ["qp", "kpt"], ["bs"], name="block_scores"),
        n("Add", ["bs", "later"], ["bsm"], name="block_causal"),
        n("TopK", ["bsm", "kminus1"], ["tv", "ti"], axis=-1, name="block_topk"),
        n("ScatterElements", ["zeros", "ti", "ones"], ["sel"], axis=-1, name="block_select"),
        n("Mul", ["sel", "earlier"], ["sel_e"], name="keep_earlier"),
        n("Add", ["sel_e", "eye"], ["blk"], name="plus_diagonal"),
        n("Greater", ["blk", "half"], ["blkb"], name="block_mask"),
        n("Reshape", ["blkb", "shape_b4"], ["b4"], name="mask_b4"),
        n("Expand", ["b4", "shape_exp"], ["bexp"], name="mask_expand"),
        n("Reshape", ["bexp", "shape_tt"], ["tok"], name="mask_tokens"),
        n("And", ["tok", "tril"], ["mask"], name="mask_causal"),
        _attention("mask", heads, kv_heads, d),
    ]
    return _model(nodes, t, heads, kv_heads, d, inits, "block_topk")


def attention_reference(q, k, v, heads, kv_heads, mask=None, causal=False):
    """Float64 attention of token-major ``q [T, H*D]``, ``k, v [T, Hkv*D]`` under a boolean
    mask (True = attend); a row without any key gives zeros (ONNX Attention-23)."""
    q = np.asarray(q, np.float64).reshape(q.shape[-2], -1)
    k = np.asarray(k, np.float64).reshape(k.shape[-2], -1)
    v = np.asarray(v, np.float64).reshape(v.shape[-2], -1)
    t, tk = q.shape[0], k.shape[0]
    d = q.shape[1] // heads
    m = np.ones((t, tk), bool) if mask is None else np.asarray(mask, bool)
    if causal:
        m = m & np.tril(np.ones((t, tk), bool))
    out = np.zeros((t, heads * d))
    for h in range(heads):
        g = h // (heads // kv_heads)
        s = q[:, h * d:(h + 1) * d] @ k[:, g * d:(g + 1) * d].T / math.sqrt(d)
        s = np.where(m, s, -np.inf)
        mx = np.max(s, axis=1, keepdims=True)
        e = np.where(m, np.exp(s - np.where(np.isfinite(mx), mx, 0)), 0)
        den = e.sum(1, keepdims=True)
        p = np.divide(e, den, out=np.zeros_like(e), where=den > 0)
        out[:, h * d:(h + 1) * d] = p @ v[:, g * d:(g + 1) * d]
    return out


# -- DHSA ---------------------------------------------------------------------------------------

DHSA_DOMAIN = "vitamin"


def dhsa(t, heads, kv_heads, d, n_chunks, block=128, budget=1024, sink=128, recent=128):
    """DHSA attention as one custom-domain node ``vitamin.DHSA(q, k, v, boundaries)``.

    ``boundaries`` (int64 ``[n_chunks]``, a graph input) are the chunk starts: ascending, the
    first 0; chunk c ends where c+1 starts, the last at T. Semantics: :func:`dhsa_mask`;
    onnxruntime runs the same computation through :func:`dhsa_expanded` (Attention-23 with the
    mask as an input).
    """
    ins, outs = _io(t, heads, kv_heads, d)
    ins.append(helper.make_tensor_value_info("boundaries", TensorProto.INT64, [n_chunks]))
    node = helper.make_node("DHSA", ["q", "k", "v", "boundaries"], ["o"], name="dhsa",
                            domain=DHSA_DOMAIN, q_num_heads=heads, kv_num_heads=kv_heads,
                            block=block, budget=budget, sink=sink, recent=recent,
                            scale=1.0 / math.sqrt(d))
    g = helper.make_graph([node], "dhsa", ins, outs)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET),
                                               helper.make_opsetid(DHSA_DOMAIN, 1)])


def dhsa_boundaries(t, n_chunks, seed=0, min_len=8):
    """A simple boundary rule for tests: ``n_chunks`` random chunk starts (first 0), every chunk
    at least ``min_len`` tokens."""
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.choice(np.arange(1, t // min_len), n_chunks - 1, replace=False))
    return np.concatenate([[0], cuts * min_len]).astype(np.int64)


def dhsa_mask(q, k, boundaries, heads, kv_heads, block, budget, sink, recent):
    """The boolean [T, T] DHSA mask (float64): per query block, the mean query of each head
    summed over heads against every key (token scores), chunk scores = sum of the chunk's token
    scores (clipped to the causal limit) / sqrt(length), then sink + recent tokens and the best
    chunks (descending, ties to the lower chunk, the last one cut) up to ``budget`` tokens,
    with the token-level causal mask."""
    q = np.asarray(q, np.float64).reshape(q.shape[-2], -1)
    k = np.asarray(k, np.float64).reshape(k.shape[-2], -1)
    t = q.shape[0]
    d = q.shape[1] // heads
    rep = heads // kv_heads
    starts = [int(b) for b in np.asarray(boundaries).reshape(-1)]
    mask = np.zeros((t, t), bool)
    for qb in range(t // block):
        limit = (qb + 1) * block
        qbar = q[qb * block:limit].mean(0).reshape(heads, d)
        qsum = qbar.reshape(kv_heads, rep, d).sum(1).reshape(-1)
        s = k[:limit] @ qsum
        chunks = []
        for c, a in enumerate(starts):
            if a >= limit:
                break
            e = min(starts[c + 1] if c + 1 < len(starts) else t, limit)
            chunks.append((s[a:e].sum() / math.sqrt(e - a), a, e))
        sk, rs = min(sink, limit), max(0, limit - recent)
        keep = np.zeros(limit, bool)
        keep[:sk] = True
        keep[rs:] = True
        left = budget - int(keep.sum())
        for c in sorted(range(len(chunks)), key=lambda c: (-chunks[c][0], c)):
            if left <= 0:
                break
            _, a, e = chunks[c]
            lo, hi = max(a, sk), min(e, rs)
            n = min(left, max(0, hi - lo))
            keep[lo:lo + n] = True
            left -= n
        mask[qb * block:limit, :limit] = keep[None, :]
    return mask & np.tril(np.ones((t, t), bool))


def dhsa_expanded(model):
    """The reference of a :func:`dhsa` model for onnxruntime: Attention-23 with the mask as an
    input (compute it with :func:`dhsa_mask`)."""
    node = model.graph.node[0]
    at = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    ins = list(model.graph.input[:3])
    t = ins[0].type.tensor_type.shape.dim[1].dim_value
    ins.append(helper.make_tensor_value_info("mask", TensorProto.BOOL, [t, t]))
    att = helper.make_node("Attention", ["q", "k", "v", "mask"], ["o"], name="attention",
                           q_num_heads=at["q_num_heads"], kv_num_heads=at["kv_num_heads"],
                           scale=at["scale"])
    g = helper.make_graph([att], "dhsa_reference", ins, list(model.graph.output))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)])


# -- com.microsoft.SparseAttention (fixed block layouts) ------------------------------------------

def csr_layout(nb, local, vertical_stride):
    """A Phi-3-small-style causal block layout in CSR form: each query block keeps its ``local``
    latest key blocks and every ``vertical_stride``-th block. Returns (row_indices [nb + 1],
    col_indices [nnz]) as int32."""
    rows, cols = [0], []
    for i in range(nb):
        keep = [j for j in range(i + 1) if i - j < local or (j + 1) % vertical_stride == 0]
        cols += keep
        rows.append(len(cols))
    return np.array(rows, np.int32), np.array(cols, np.int32)


def layout_mask(t, block, rows, cols):
    """The causal token mask of a CSR block layout (one layout for all heads)."""
    nb = t // block
    blocks = np.zeros((nb, nb), bool)
    for i in range(nb):
        for j in cols[rows[i]:rows[i + 1]]:
            if j >= 0:
                blocks[i, j] = True
    m = np.repeat(np.repeat(blocks, block, 0), block, 1)
    return m & np.tril(np.ones((t, t), bool))


def ms_sparse_attention(t, heads, kv_heads, d, block=64, local=4, vertical_stride=8):
    """``com.microsoft.SparseAttention`` with a constant CSR layout (prefill: the past key/value
    inputs are empty caches, ``total_sequence_length = T``; the present caches are graph outputs
    as the op requires). onnxruntime's CPU kernel runs it when the caches share buffers
    (:func:`run_ms_sparse_attention`)."""
    rows, cols = csr_layout(t // block, local, vertical_stride)
    ins, outs = _io(t, heads, kv_heads, d)
    # the KV cache inputs are required by the op's schema; a prefill passes empty caches
    ins += [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, kv_heads, t, d])
            for n in ("past_key", "past_value")]
    inits = [numpy_helper.from_array(rows[None], "block_row_indices"),
             numpy_helper.from_array(cols[None], "block_col_indices"),
             numpy_helper.from_array(np.array(t, np.int32), "total_sequence_length"),
             numpy_helper.from_array(np.array([t], np.int32), "key_total_sequence_lengths")]
    node = helper.make_node(
        "SparseAttention", ["q", "k", "v", "past_key", "past_value", "block_row_indices",
                            "block_col_indices",
                            "total_sequence_length", "key_total_sequence_lengths"],
        ["o", "present_key", "present_value"],
        name="sparse_attention", domain="com.microsoft", num_heads=heads,
        kv_num_heads=kv_heads, sparse_block_size=block, scale=1.0 / math.sqrt(d))
    outs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, kv_heads, t, d])
             for n in ("present_key", "present_value")]
    g = helper.make_graph([node], "ms_sparse_attention", ins, outs, inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET),
                                               helper.make_opsetid("com.microsoft", 1)])


def run_ms_sparse_attention(model, q, k, v):
    """Run a :func:`ms_sparse_attention` model on onnxruntime (CPU) with empty KV caches bound
    in place, as the kernel requires; returns the attention output."""
    import onnxruntime as ort
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    shp = [d.dim_value for d in model.graph.input[3].type.tensor_type.shape.dim]
    b = sess.io_binding()
    b.bind_output("o")
    for n, x in (("q", q), ("k", k), ("v", v)):
        b.bind_cpu_input(n, np.ascontiguousarray(x, dtype=np.float32))
    for past, present in (("past_key", "present_key"), ("past_value", "present_value")):
        cache = ort.OrtValue.ortvalue_from_numpy(np.zeros(shp, np.float32))
        b.bind_ortvalue_input(past, cache)
        b.bind_ortvalue_output(present, cache)
    sess.run_with_iobinding(b)
    return b.copy_outputs_to_cpu()[0]
