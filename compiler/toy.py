"""Canonical IR graphs built directly in NumPy (no ONNX), for backend tests.

``vit_graph`` builds the graph the frontend produces for a pre-norm ViT: im2col patch embedding,
CLS row concatenation, position embedding, blocks of LayerNorm -> qkv linear -> attention ->
projection (+ residual) -> LayerNorm -> FC1 + GELU -> FC2 (+ residual), final LayerNorm, CLS row
selection and the classification head.
"""

from __future__ import annotations

import math

import numpy as np

from . import ir

__all__ = ["vit_graph"]


def vit_graph(img=8, patch=2, chans=1, dim=16, depth=1, heads=2, mlp=2, classes=10, seed=0,
              eps=1e-6) -> ir.Graph:
    rng = np.random.default_rng(seed)
    vals: dict = {}
    nodes: list = []

    def const(name, arr):
        vals[name] = ir.Value(name, tuple(arr.shape), np.asarray(arr, dtype=np.float32))
        return name

    def act(name, shape):
        vals[name] = ir.Value(name, tuple(shape))
        return name

    def node(op, ins, out, shape, **attrs):
        nodes.append(ir.Node(op, list(ins), [out], attrs, name=out))
        return act(out, shape)

    def lin(x, k, n, name, rows):
        w = const(f"{name}.w", rng.normal(0, 1 / math.sqrt(k), (k, n)))
        b = const(f"{name}.b", rng.normal(0, 0.02, n))
        return node("linear", [x, w, b], name, (rows, n))

    p = (img // patch) ** 2
    t = p + 1
    x = act("image", (1, chans, img, img))
    pe = node("im2col", [x], "patches", (p, chans * patch * patch), kernel=patch)
    pe = lin(pe, chans * patch * patch, dim, "patch_embed", p)
    cls = const("cls", rng.normal(0, 0.02, (1, dim)))
    tok = node("concat", [cls, pe], "tokens", (t, dim), axis=0)
    pos = const("pos", rng.normal(0, 0.02, (t, dim)))
    h = node("add", [tok, pos], "x0", (t, dim))
    d = dim // heads
    hid = dim * mlp
    for i in range(depth):
        def ln(x, name):
            g_ = const(f"{name}.g", 1 + rng.normal(0, 0.1, dim))
            b_ = const(f"{name}.b", rng.normal(0, 0.1, dim))
            return node("layernorm", [x, g_, b_], name, (t, dim), eps=eps)
        a = ln(h, f"b{i}.ln1")
        qkv = lin(a, dim, 3 * dim, f"b{i}.qkv", t)
        q = node("slice", [qkv], f"b{i}.q", (t, dim), axis=1, start=0, stop=dim)
        k = node("slice", [qkv], f"b{i}.k", (t, dim), axis=1, start=dim, stop=2 * dim)
        v = node("slice", [qkv], f"b{i}.v", (t, dim), axis=1, start=2 * dim, stop=3 * dim)
        o = node("attention", [q, k, v], f"b{i}.attn", (t, dim), heads=heads, head_dim=d,
                 scale=1 / math.sqrt(d), causal=False)
        o = lin(o, dim, dim, f"b{i}.proj", t)
        h = node("add", [o, h], f"b{i}.res1", (t, dim))
        a = ln(h, f"b{i}.ln2")
        f1 = lin(a, dim, hid, f"b{i}.fc1", t)
        f1 = node("gelu", [f1], f"b{i}.gelu", (t, hid), approximate="none")
        f2 = lin(f1, hid, dim, f"b{i}.fc2", t)
        h = node("add", [f2, h], f"b{i}.res2", (t, dim))
    gf = const("norm.g", 1 + rng.normal(0, 0.1, dim))
    bf = const("norm.b", rng.normal(0, 0.1, dim))
    h = node("layernorm", [h, gf, bf], "norm", (t, dim), eps=eps)
    c = node("gather", [h], "cls_out", (1, dim), axis=0, index=0)
    logits = lin(c, dim, classes, "head", 1)
    return ir.Graph(inputs=["image"], outputs=[logits], values=vals, nodes=nodes, name="toy_vit")
