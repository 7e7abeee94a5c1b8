"""The compiler's intermediate representation: a static-shape float dataflow graph.

The ONNX frontend turns a model into a :class:`Graph` of canonical ops (the table below); named
passes rewrite it (pattern matching GELU, LayerNorm, attention, fusion); quantisation annotates
it; the backend lowers it to vitamin instructions. :func:`evaluate` runs the graph in float NumPy,
which is how every frontend rewrite is checked against onnxruntime.

Canonical ops (all shapes static; broadcasting as NumPy):

============  =================================  ===========================================
op            inputs                             semantics / attributes
============  =================================  ===========================================
linear        x[..., K], W[K, N] (const), b?     x @ W + b
matmul        a[..., M, K], b[..., K, N]         batched matmul of two activations
add, sub      a, b                               element-wise (b may be a constant)
mul, div      a, b                               element-wise (b may be a constant)
gelu          x                                  approximate = "none" (erf) | "tanh"
relu          x
softmax       x                                  axis = -1 only
layernorm     x, gamma, beta (const)             axis = -1, eps
reshape       x                                  shape (static, no -1 left)
transpose     x                                  perm
concat        inputs...                          axis
slice         x                                  axis, start, stop, step (one axis)
gather        x                                  axis, index (int const, scalar or 1-D)
im2col        x[C, H, W] or [1, C, H, W]         kernel, stride = kernel: -> [P, C*k*k]
                                                 (patch rows in raster order, C-major)
topk          x                                  k, axis=-1: outputs values, indices
attention     q, k, v [T, H*D] token-major       heads, head_dim, scale, causal: per head h
                                                 (columns h*D..h*D+D-1) softmax(scale q k^T) v
                                                 -> [T, H*D]
linear_task   x, W[tasks, K, N], b?, task        x @ W[task] + b[task] (see compiler/moe.py)
moe           x, task?, gate, experts' weights   mixture of experts (see compiler/moe.py)
============  =================================  ===========================================

Integer graph inputs (a multi-task model's task index) have ``dtype`` ``"int64"``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["Value", "Node", "Graph", "evaluate", "CompileError", "OPS"]


class CompileError(ValueError):
    """A model the compiler cannot take; the message names the node(s) and the problem."""


OPS = ("linear", "matmul", "add", "sub", "mul", "div", "gelu", "relu", "softmax", "layernorm",
       "reshape", "transpose", "concat", "slice", "gather", "im2col", "topk", "attention",
       "linear_task", "moe")


@dataclass
class Value:
    """A tensor: a graph input, a constant, or a node output."""
    name: str
    shape: tuple
    const: np.ndarray | None = None
    dtype: str = "float32"

    @property
    def is_const(self) -> bool:
        return self.const is not None


@dataclass
class Node:
    op: str
    inputs: list
    outputs: list
    attrs: dict = field(default_factory=dict)
    name: str = ""          # the ONNX node this came from (for error messages)


@dataclass
class Graph:
    inputs: list                      # names of graph inputs (activations)
    outputs: list                     # names of graph outputs
    values: dict                      # name -> Value
    nodes: list                       # topologically ordered
    name: str = "model"

    def producer(self, name: str):
        for n in self.nodes:
            if name in n.outputs:
                return n
        return None

    def consumers(self, name: str) -> list:
        return [n for n in self.nodes if name in n.inputs]

    def shape(self, name: str) -> tuple:
        return self.values[name].shape

    def const(self, name: str):
        return self.values[name].const


def _im2col(x, k):
    if x.ndim == 4:
        assert x.shape[0] == 1
        x = x[0]
    c, h, w = x.shape
    ph, pw = h // k, w // k
    x = x[:, :ph * k, :pw * k].reshape(c, ph, k, pw, k)
    return x.transpose(1, 3, 0, 2, 4).reshape(ph * pw, c * k * k)


def _erf(x):
    # scipy's erf is exact to double precision and vectorised (math.erf per element was the
    # bottleneck of calibrating DeiT-tiny).
    from scipy.special import erf
    return erf(x)


def _eval_node(n: Node, ins: list) -> list:
    a = n.attrs
    op = n.op
    if op == "linear":
        y = ins[0] @ ins[1]
        if len(ins) > 2 and ins[2] is not None:
            y = y + ins[2]
        return [y]
    if op == "matmul":
        return [np.matmul(ins[0], ins[1])]
    if op == "add":
        return [ins[0] + ins[1]]
    if op == "sub":
        return [ins[0] - ins[1]]
    if op == "mul":
        return [ins[0] * ins[1]]
    if op == "div":
        return [ins[0] / ins[1]]
    if op == "gelu":
        x = ins[0]
        if a.get("approximate", "none") == "tanh":
            return [0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))]
        return [0.5 * x * (1 + _erf(x / np.sqrt(2.0)))]
    if op == "relu":
        return [np.maximum(ins[0], 0)]
    if op == "softmax":
        x = ins[0]
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        return [e / e.sum(axis=-1, keepdims=True)]
    if op == "layernorm":
        x, g, b = ins
        mu = x.mean(axis=-1, keepdims=True)
        var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)
        return [(x - mu) / np.sqrt(var + a["eps"]) * g + b]
    if op == "reshape":
        return [ins[0].reshape(a["shape"])]
    if op == "transpose":
        return [ins[0].transpose(a["perm"])]
    if op == "concat":
        return [np.concatenate(ins, axis=a["axis"])]
    if op == "slice":
        sl = [slice(None)] * ins[0].ndim
        sl[a["axis"]] = slice(a["start"], a["stop"], a.get("step", 1))
        return [ins[0][tuple(sl)]]
    if op == "gather":
        return [np.take(ins[0], a["index"], axis=a["axis"])]
    if op == "im2col":
        return [_im2col(ins[0], a["kernel"])]
    if op == "attention":
        q, k, v = ins
        h, d = a["heads"], a["head_dim"]
        tq, tk = q.shape[0], k.shape[0]
        dv = v.shape[1] // h
        qh = q.reshape(tq, h, d).transpose(1, 0, 2)
        kh = k.reshape(tk, h, d).transpose(1, 0, 2)
        vh = v.reshape(tk, h, dv).transpose(1, 0, 2)
        s = np.matmul(qh, kh.transpose(0, 2, 1)) * a["scale"]
        if a.get("causal"):
            s = np.where(np.triu(np.ones((tq, tk), dtype=bool), 1), -np.inf, s)
        e = np.exp(s - s.max(axis=-1, keepdims=True))
        p = e / e.sum(axis=-1, keepdims=True)
        return [np.matmul(p, vh).transpose(1, 0, 2).reshape(tq, h * dv)]
    if op == "topk":
        x = ins[0]
        k = a["k"]
        idx = np.argsort(-x, axis=-1, kind="stable")[..., :k]
        return [np.take_along_axis(x, idx, axis=-1), idx]
    if op == "linear_task":
        from .moe import eval_linear_task
        return eval_linear_task(n, ins)
    if op == "moe":
        from .moe import eval_moe
        return [eval_moe(n, ins)]
    raise CompileError(f"node {n.name!r}: no evaluator for op {op!r}")


def evaluate(graph: Graph, inputs: dict, *, keep: bool = False, evaluators=None) -> dict:
    """Run the graph in float64 NumPy. Returns the outputs (all values with ``keep``).

    ``evaluators`` maps extra op names (e.g. the frontend's primitives) to ``f(node, inputs)``.
    """
    extra = evaluators or {}
    env = {}
    for name, v in graph.values.items():
        if v.is_const:
            env[name] = np.asarray(v.const, dtype=np.float64) if v.const.dtype.kind == "f" \
                else v.const
    for name in graph.inputs:
        if name not in inputs:
            raise CompileError(f"missing input {name!r}; inputs: {', '.join(graph.inputs)}")
        env[name] = np.asarray(inputs[name], dtype=np.float64)
    for n in graph.nodes:
        ins = [env[i] if i else None for i in n.inputs]
        outs = extra[n.op](n, ins) if n.op in extra else _eval_node(n, ins)
        for o, v in zip(n.outputs, outs):
            env[o] = v
    if keep:
        return env
    return {o: env[o] for o in graph.outputs}
