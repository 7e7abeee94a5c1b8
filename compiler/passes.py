"""Named graph passes: from the frontend's IR to vitamin's canonical 2-D token-major graph.

:data:`PIPELINE` lists the passes in the order :func:`run_pipeline` applies them. Each pass is a
function ``Graph -> Graph`` (it rewrites the graph it is given and returns it) that matches a
pattern, rewrites each match in place (new nodes take over the output name of the subgraph they
replace, so nothing downstream is renamed), then drops dead nodes. After the pipeline:

* every activation is 2-D, ``[T, C]`` (tokens x channels), the batch axis squeezed;
* the only ops are :data:`CANONICAL_OPS`: ``im2col``, ``linear``, ``add``, ``mul`` (by a scalar
  constant), ``gelu``, ``relu``, ``layernorm``, ``attention``, ``softmax``, ``concat`` (axis 0),
  ``gather`` (axis 0, one row) and ``reshape`` that keeps the 2-D layout;
* anything else is a :class:`~ir.CompileError` listing the nodes.

``attention`` is the op this module adds to the IR:

============  =================================  ===========================================
attention     q[Tq, H*D], k[Tk, H*D], v[Tk, H*D]  per head h (columns h*D..(h+1)*D):
                                                 softmax(q_h k_h^T * scale) v_h, heads
                                                 concatenated -> [Tq, H*D]; attrs heads,
                                                 head_dim, scale, causal
============  =================================  ===========================================

:func:`evaluate_graph` runs graphs with ``attention`` and the frontend's primitive ops and
delegates every other op to the IR's evaluator.

Several matchers work on *index maps*: a chain of data-movement ops (reshape, transpose, slice,
gather) is applied to ``arange(size).reshape(shape)`` of its source, which says exactly where
each element came from. That recognises the qkv reshape/permute/unbind of every exporter, and
the reshape/transpose round trips around the patch embedding, without one pattern per exporter.
"""

from __future__ import annotations

import copy
import math
import time

import numpy as np

from . import ir
from .frontend import PRIMITIVES
from .ir import CompileError, Graph, Node, Value

__all__ = ["PIPELINE", "run_pipeline", "evaluate_graph", "eval_node", "CANONICAL_OPS",
           "fold_constants", "fuse_bias", "fuse_gelu", "fuse_layernorm", "fuse_sdpa",
           "lower_attention", "fold_scales", "collapse_layout", "canonicalize_2d",
           "split_qkv", "check_canonical"]

CANONICAL_OPS = ("im2col", "linear", "add", "mul", "gelu", "relu", "layernorm", "attention",
                 "softmax", "concat", "gather", "reshape", "linear_task", "moe")


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------

#: Evaluators of the frontend's primitive ops, which ``ir._eval_node`` does not know.
EVALUATORS = dict(PRIMITIVES)


def eval_node(n: Node, ins: list) -> list:
    """Evaluate one node: the frontend's primitives here, canonical ops by the IR."""
    fn = EVALUATORS.get(n.op)
    return fn(n, ins) if fn is not None else ir._eval_node(n, ins)


def evaluate_graph(graph: Graph, inputs: dict, *, keep: bool = False) -> dict:
    """:func:`ir.evaluate` with the frontend's primitive ops too."""
    return ir.evaluate(graph, inputs, keep=keep, evaluators=EVALUATORS)


# --------------------------------------------------------------------------------------------
# Graph helpers
# --------------------------------------------------------------------------------------------

class _Index:
    """Producer and consumers of every value (rebuilt after each rewrite)."""

    def __init__(self, g: Graph):
        self.prod, self.cons = {}, {}
        self.alive = set()
        for n in g.nodes:
            self.alive.add(id(n))
            for o in n.outputs:
                self.prod[o] = n
            for i in n.inputs:
                lst = self.cons.setdefault(i, [])
                if not any(c is n for c in lst):
                    lst.append(n)
        self.outputs = set(g.outputs)

    def consumers(self, v):
        return self.cons.get(v, [])

    def sole_consumer(self, v):
        """The only consumer of ``v`` (None if several, none, or ``v`` is a graph output)."""
        c = self.cons.get(v, [])
        return c[0] if len(c) == 1 and v not in self.outputs else None


def _const(g, v):
    val = g.values.get(v) if v else None
    return None if val is None else val.const


def _scalar(g, v):
    c = _const(g, v)
    if c is None or c.size != 1 or c.dtype.kind not in "fiu":
        return None
    return float(c.reshape(()))


def _is_act(g, v):
    return bool(v) and v in g.values and not g.values[v].is_const


def _fresh(g, base):
    name, i = base, 1
    while name in g.values:
        name, i = f"{base}_{i}", i + 1
    return name


def _new_value(g, base, shape, const=None):
    name = _fresh(g, base)
    if const is not None:
        const = np.asarray(const)
        g.values[name] = Value(name, tuple(const.shape), const=const, dtype=str(const.dtype))
    else:
        g.values[name] = Value(name, tuple(int(d) for d in shape))
    return name


def _replace(g, old: Node, new: list):
    """Put ``new`` nodes where ``old`` was (their inputs are all upstream of ``old``)."""
    for i, n in enumerate(g.nodes):
        if n is old:
            g.nodes[i:i + 1] = new
            return
    raise ValueError(f"node {old.name!r} is not in the graph")


def _dce(g):
    live = set(g.outputs)
    keep = []
    for n in reversed(g.nodes):
        if any(o in live for o in n.outputs):
            keep.append(n)
            live.update(i for i in n.inputs if i)
    g.nodes = keep[::-1]
    used = live | set(g.inputs) | {o for n in g.nodes for o in n.outputs}
    g.values = {k: v for k, v in g.values.items() if k in used}


def _toposort(g):
    """Stable topological order (Kahn's algorithm, ties broken by current position)."""
    import heapq
    prod = {o: i for i, n in enumerate(g.nodes) for o in n.outputs}
    deps = [{prod[v] for v in n.inputs if v in prod} for n in g.nodes]
    users = [[] for _ in g.nodes]
    for i, ds in enumerate(deps):
        for d in ds:
            users[d].append(i)
    count = [len(d) for d in deps]
    ready = [i for i, c in enumerate(count) if c == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(g.nodes[i])
        for u in users[i]:
            count[u] -= 1
            if count[u] == 0:
                heapq.heappush(ready, u)
    if len(order) != len(g.nodes):
        raise CompileError("the graph has a cycle")
    g.nodes = order


def _finish(g):
    _toposort(g)
    _dce(g)
    return g


def _rewrite(g, match):
    """Apply ``match(g, idx, node) -> bool`` to every node until no match rewrites anything."""
    changed = True
    while changed:
        changed = False
        idx = _Index(g)
        for n in list(g.nodes):
            if id(n) not in idx.alive:
                continue
            if match(g, idx, n):
                changed = True
                _dce(g)
                idx = _Index(g)
    return _finish(g)


def _row_vector(c, n, rank):
    """``c`` as a length-``n`` vector if it broadcasts along the last axis only, else None."""
    if c is None or c.ndim > rank or c.size not in (1, n):
        return None
    if c.size == n and n > 1 and c.shape[-1] != n:
        return None
    return np.broadcast_to(c.reshape(-1), (n,)).astype(c.dtype)


# --------------------------------------------------------------------------------------------
# fold_constants, fuse_bias
# --------------------------------------------------------------------------------------------

def fold_constants(g: Graph) -> Graph:
    """Evaluate every node whose inputs are all constants; its outputs become constants."""
    keep = []
    for n in g.nodes:
        ins = [i for i in n.inputs if i]
        if ins and all(g.values[i].is_const for i in ins):
            outs = eval_node(n, [g.values[i].const if i else None for i in n.inputs])
            for o, v in zip(n.outputs, outs, strict=False):
                v = np.asarray(v)
                g.values[o] = Value(o, tuple(v.shape), const=v, dtype=str(v.dtype))
        else:
            keep.append(n)
    g.nodes = keep
    return _finish(g)


def _match_bias(g, idx, n):
    if n.op != "add":
        return False
    for y, c in (n.inputs, n.inputs[::-1]):
        lin = idx.prod.get(y)
        if lin is None or lin.op != "linear" or idx.sole_consumer(y) is not n:
            continue
        width = g.shape(y)[-1]
        vec = _row_vector(_const(g, c), width, len(g.shape(y)))
        if vec is None:
            continue
        old = _const(g, lin.inputs[2]) if len(lin.inputs) > 2 and lin.inputs[2] else 0
        b = _new_value(g, f"{lin.name}/bias", None, const=(vec + old).astype(vec.dtype))
        _replace(g, n, [Node("linear", [lin.inputs[0], lin.inputs[1], b], [n.outputs[0]], {},
                             lin.name)])
        return True
    return False


def fuse_bias(g: Graph) -> Graph:
    """``add(linear(x, W), b)`` with a constant row vector ``b`` -> ``linear(x, W, b)``."""
    return _rewrite(g, _match_bias)


# --------------------------------------------------------------------------------------------
# fuse_gelu
# --------------------------------------------------------------------------------------------

_ELEMENTWISE = {"add", "sub", "mul", "div", "pow", "erf", "tanh", "sqrt", "reciprocal"}
_T = np.linspace(-5.0, 5.0, 41)
_GELU_REF = {
    "none": 0.5 * _T * (1 + PRIMITIVES["erf"](None, [_T / math.sqrt(2)])[0]),
    "tanh": 0.5 * _T * (1 + np.tanh(math.sqrt(2 / math.pi) * (_T + 0.044715 * _T ** 3))),
}


def _expression(g, idx, top, x, limit=24):
    """Nodes computing ``top`` from ``x`` and scalar constants only, or None."""
    nodes, stack, seen = {}, [top], set()
    while stack:
        v = stack.pop()
        if v == x or v in seen or _scalar(g, v) is not None:
            continue
        seen.add(v)
        p = idx.prod.get(v)
        if p is None or p.op not in _ELEMENTWISE or len(nodes) >= limit:
            return None
        nodes[id(p)] = p
        stack.extend(i for i in p.inputs if i)
    return nodes


def _eval_expression(g, nodes, x, top, t):
    env = {x: t}
    for n in g.nodes:
        if id(n) in nodes:
            ins = [env[i] if i in env else _scalar(g, i) for i in n.inputs]
            env[n.outputs[0]] = eval_node(n, ins)[0]
    return env[top]


def _match_gelu(g, idx, n):
    if n.op not in ("erf", "tanh"):
        return False
    approx = "none" if n.op == "erf" else "tanh"
    # Candidate inputs x: activations upstream through elementwise ops, nearest first.
    xs, frontier = [], [n.inputs[0]]
    for _ in range(6):
        nxt = []
        for v in frontier:
            if _is_act(g, v) and v not in xs:
                xs.append(v)
                p = idx.prod.get(v)
                if p is not None and p.op in _ELEMENTWISE:
                    nxt.extend(p.inputs)
        frontier = nxt
    # Candidate outputs F: downstream through elementwise ops, nearest first.
    fs, frontier = [], [n.outputs[0]]
    for _ in range(5):
        nxt = []
        for v in frontier:
            for c in idx.consumers(v):
                if c.op in _ELEMENTWISE and c.outputs[0] not in fs:
                    fs.append(c.outputs[0])
                    nxt.append(c.outputs[0])
        frontier = nxt
    for x in xs:
        for f in fs:
            if g.shape(f) != g.shape(x):
                continue
            nodes = _expression(g, idx, f, x)
            if nodes is None or id(n) not in nodes:
                continue
            with np.errstate(all="ignore"):
                y = _eval_expression(g, nodes, x, f, _T)
            ref = _GELU_REF[approx]
            if np.all(np.abs(y - ref) <= 1e-5 * np.maximum(1, np.abs(ref))):
                _replace(g, idx.prod[f], [Node("gelu", [x], [f], {"approximate": approx},
                                                n.name)])
                return True
    return False


def fuse_gelu(g: Graph) -> Graph:
    """Erf and tanh GELU written out elementwise -> ``gelu``.

    Any arrangement of ``0.5 * x * (1 + erf(x / sqrt(2)))`` (or ``x * 0.7071...``) and of
    ``0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))`` is accepted: the subgraph from
    ``x`` to the candidate output must use only ``x``, scalar constants and elementwise ops, and
    must equal GELU numerically on a test vector.
    """
    return _rewrite(g, _match_gelu)


# --------------------------------------------------------------------------------------------
# fuse_layernorm
# --------------------------------------------------------------------------------------------

def _consumer(idx, v, op, pred=lambda n: True):
    for c in idx.consumers(v):
        if c.op == op and pred(c):
            return c
    return None


def _other(n, v):
    """The input of binary node ``n`` that is not ``v``."""
    a, b = n.inputs
    return b if a == v else a


def _match_layernorm(g, idx, m1):
    if m1.op != "reduce_mean" or not m1.attrs.get("keepdims"):
        return False
    x = m1.inputs[0]
    r = len(g.shape(x))
    last = (r - 1,)
    if tuple(m1.attrs["axes"]) != last:
        return False
    mu = m1.outputs[0]
    sub = _consumer(idx, mu, "sub", lambda c: c.inputs == [x, mu])
    if sub is None:
        return False
    d = sub.outputs[0]
    sq = (_consumer(idx, d, "pow", lambda c: c.inputs[0] == d and _scalar(g, c.inputs[1]) == 2)
          or _consumer(idx, d, "mul", lambda c: c.inputs == [d, d]))
    if sq is None:
        return False
    m2 = _consumer(idx, sq.outputs[0], "reduce_mean",
                   lambda c: tuple(c.attrs["axes"]) == last and c.attrs.get("keepdims"))
    if m2 is None:
        return False
    var, eps = m2.outputs[0], 0.0
    add = _consumer(idx, var, "add", lambda c: _scalar(g, _other(c, var)) is not None)
    if add is not None:
        eps, var = _scalar(g, _other(add, var)), add.outputs[0]
    # d / sqrt(var), d * reciprocal(sqrt(var)), d * pow(var, -0.5)
    yn = None
    sqrt = _consumer(idx, var, "sqrt")
    if sqrt is not None:
        s = sqrt.outputs[0]
        yn = _consumer(idx, s, "div", lambda c: c.inputs == [d, s])
        rec = _consumer(idx, s, "reciprocal")
        if yn is None and rec is not None:
            yn = _consumer(idx, rec.outputs[0], "mul", lambda c: d in c.inputs)
    if yn is None:
        p = _consumer(idx, var, "pow", lambda c: _scalar(g, c.inputs[1]) == -0.5)
        if p is not None:
            yn = _consumer(idx, p.outputs[0], "mul", lambda c: d in c.inputs)
    if yn is None:
        return False
    width = g.shape(x)[-1]
    y = yn.outputs[0]
    dtype = np.float32
    gamma, beta = np.ones(width, dtype), np.zeros(width, dtype)
    mul = idx.sole_consumer(y)
    if mul is not None and mul.op == "mul":
        vec = _row_vector(_const(g, _other(mul, y)), width, r)
        if vec is not None:
            gamma, y = vec, mul.outputs[0]
    add = idx.sole_consumer(y)
    if add is not None and add.op == "add":
        vec = _row_vector(_const(g, _other(add, y)), width, r)
        if vec is not None:
            beta, y = vec, add.outputs[0]
    if g.shape(y) != g.shape(x):
        return False
    gname = _new_value(g, f"{m1.name}/gamma", None, const=gamma)
    bname = _new_value(g, f"{m1.name}/beta", None, const=beta)
    _replace(g, idx.prod[y], [Node("layernorm", [x, gname, bname], [y], {"eps": eps},
                                   m1.name)])
    return True


def fuse_layernorm(g: Graph) -> Graph:
    """Decomposed LayerNorm (ReduceMean, Sub, Pow/Mul, ReduceMean, Add eps, Sqrt, Div, then an
    optional Mul by gamma and Add of beta, all over the last axis) -> ``layernorm``."""
    return _rewrite(g, _match_layernorm)


# --------------------------------------------------------------------------------------------
# fuse_sdpa, lower_attention
# --------------------------------------------------------------------------------------------

def _scalar_operand(g, n):
    """(activation, factor) if ``n`` multiplies/divides an activation by a scalar constant."""
    if n.op == "mul":
        for a, c in (n.inputs, n.inputs[::-1]):
            s = _scalar(g, c)
            if s is not None and _is_act(g, a):
                return a, s
    if n.op == "div":
        s = _scalar(g, n.inputs[1])
        if s is not None and s != 0 and _is_act(g, n.inputs[0]):
            return n.inputs[0], 1.0 / s
    return None


def _match_sdpa(g, idx, sm):
    if sm.op != "softmax":
        return False
    cur, scale = sm.inputs[0], 1.0
    while True:
        p = idx.prod.get(cur)
        if p is None or idx.sole_consumer(cur) is None:
            return False
        so = _scalar_operand(g, p)
        if so is None:
            break
        cur, scale = so[0], scale * so[1]
    m1 = p
    m2 = idx.sole_consumer(sm.outputs[0])
    if m1.op != "matmul" or m2 is None or m2.op != "matmul" or m2.inputs[0] != sm.outputs[0]:
        return False
    q, kt = m1.inputs
    v = m2.inputs[1]
    sq, skt, sv = g.shape(q), g.shape(kt), g.shape(v)
    if not (len(sq) == len(skt) == len(sv) >= 2 and sq[:-2] == skt[:-2] == sv[:-2]
            and sq[-1] == skt[-2] and skt[-1] == sv[-2]):
        return False
    r = len(sq)
    k = _new_value(g, f"{m1.name}/k", skt[:-2] + (skt[-1], skt[-2]))
    _replace(g, m2, [
        Node("transpose", [kt], [k], {"perm": tuple(range(r - 2)) + (r - 1, r - 2)}, m1.name),
        Node("sdpa", [q, k, v], [m2.outputs[0]], {"scale": scale, "causal": False}, m2.name)])
    return True


def fuse_sdpa(g: Graph) -> Graph:
    """``matmul(q, kT) [* or / scalar] -> softmax -> matmul(., v)`` -> ``sdpa(q, k, v)``.

    ``sdpa`` is the frontend's heads-major attention op (ONNX Attention maps to it directly);
    :func:`lower_attention` turns it into token-major ``attention``.
    """
    return _rewrite(g, _match_sdpa)


_MOVES = ("reshape", "transpose", "slice", "gather")


def _strip(shape):
    """Shape without its leading 1s."""
    shape = tuple(shape)
    while shape and shape[0] == 1:
        shape = shape[1:]
    return shape


def _index_map(chain, src_shape):
    """Where each element of the chain's output comes from, as flat indices into the source."""
    a = np.arange(math.prod(src_shape), dtype=np.int64).reshape(src_shape)
    for n in chain:
        if n.op in _MOVES:
            a = ir._eval_node(n, [a])[0]
    return a


def _trace_back(g, idx, v):
    """The data-movement and scalar-scale nodes above ``v``, nearest first."""
    chain, cur = [], v
    while True:
        p = idx.prod.get(cur)
        if p is None:
            break
        if p.op in _MOVES:
            nxt = p.inputs[0]
        else:
            so = _scalar_operand(g, p)
            if so is None:
                break
            nxt = so[0]
        chain.append(p)
        cur = nxt
    return chain


def _token_major_source(g, idx, v, heads, t, d):
    """Find X with ``v[h, t, d] == X2[t, off + h*D + d]`` (X2: X as [T, C]); farthest X wins.

    Returns (X, off, C, scale) or None; ``scale`` multiplies the scalar factors on the way.
    """
    chain = _trace_back(g, idx, v)
    want = _strip((heads, t, d))
    for j in range(len(chain), -1, -1):
        sub = chain[:j][::-1]                       # from the candidate source down to v
        src = sub[0].inputs[0] if sub else v
        if sub and sub[0].op in ("mul", "div"):
            src = _scalar_operand(g, sub[0])[0]
        if not _is_act(g, src):
            continue
        s2 = _strip(g.shape(src))
        if len(s2) == 1:
            s2 = (1,) + s2
        if len(s2) != 2 or s2[0] != t:
            continue
        imap = _index_map(sub, g.shape(src))
        if _strip(imap.shape) != want:
            continue
        imap = imap.reshape(heads, t, d)
        c = s2[1]
        off = int(imap[0, 0, 0])
        expect = (off + np.arange(t)[None, :, None] * c + np.arange(heads)[:, None, None] * d
                  + np.arange(d)[None, None, :])
        if off + heads * d <= c and np.array_equal(imap, expect):
            scale = 1.0
            for n in sub:
                so = _scalar_operand(g, n) if n.op in ("mul", "div") else None
                if so is not None:
                    scale *= so[1]
            return src, off, c, scale
    return None


def _match_attention(g, idx, n):
    if n.op != "sdpa":
        return False
    q, k, v = n.inputs
    sq, sk, sv = g.shape(q), g.shape(k), g.shape(v)
    if any(s != 1 for s in sq[:-3]) or len(sq) < 2:
        return False
    heads = sq[-3] if len(sq) >= 3 else 1
    tq, d = sq[-2:]
    tk, dv = sk[-2], sv[-1]
    if dv != d:
        return False
    srcs = [_token_major_source(g, idx, q, heads, tq, d),
            _token_major_source(g, idx, k, heads, tk, d),
            _token_major_source(g, idx, v, heads, tk, d)]
    if any(s is None for s in srcs):
        return False
    # The output: follow single-consumer reshape/transpose nodes to a token-major [Tq, H*D].
    out = n.outputs[0]
    expect = np.arange(heads * tq * d).reshape(heads, tq, d).transpose(1, 0, 2)
    expect = expect.reshape(tq, heads * d)
    chain, cur, target = [], out, None
    while True:
        if _strip(g.shape(cur)) == _strip((tq, heads * d)):
            imap = _index_map(chain, g.shape(out))
            if np.array_equal(imap.reshape(tq, heads * d), expect):
                target = cur
                break
        c = idx.sole_consumer(cur)
        if c is None or c.op not in ("reshape", "transpose"):
            break
        chain.append(c)
        cur = c.outputs[0]
    if target is None:
        return False
    new, ins, scale, flat = [], [], n.attrs["scale"], {}
    for (src, off, width, s), role in zip(srcs, "qkv", strict=True):
        t = tq if role == "q" else tk
        x2 = src
        if g.shape(src) != (t, width):
            if src not in flat:
                flat[src] = _new_value(g, f"{src}/2d", (t, width))
                new.append(Node("reshape", [src], [flat[src]], {"shape": (t, width)}, n.name))
            x2 = flat[src]
        if (off, off + heads * d) != (0, width):
            x2s = _new_value(g, f"{n.name}/{role}", (t, heads * d))
            new.append(Node("slice", [x2], [x2s], {"axis": 1, "start": off,
                                                     "stop": off + heads * d, "step": 1},
                            n.name))
            x2 = x2s
        ins.append(x2)
        if role in "qk":
            scale *= s
    v_scale = srcs[2][3]
    attrs = {"heads": heads, "head_dim": d, "scale": float(scale),
             "causal": bool(n.attrs.get("causal", False))}
    direct = g.shape(target) == (tq, heads * d)     # no reshape needed after the attention
    a = target if direct and v_scale == 1 else _new_value(g, f"{n.name}/attention",
                                                            (tq, heads * d))
    new.append(Node("attention", ins, [a], attrs, n.name))
    if v_scale != 1:    # softmax rows sum to 1: a scale on v scales the output
        sc = _new_value(g, f"{n.name}/v_scale", None, const=np.float32(v_scale))
        a2 = target if direct else _new_value(g, f"{n.name}/scaled", (tq, heads * d))
        new.append(Node("mul", [a, sc], [a2], {}, n.name))
        a = a2
    if not direct:
        new.append(Node("reshape", [a], [target], {"shape": g.shape(target)}, n.name))
    _replace(g, idx.prod[target], new)
    return True


def lower_attention(g: Graph) -> Graph:
    """``sdpa`` on heads-major views of token-major tensors -> one ``attention`` node.

    q, k and v are traced back through reshape/transpose/slice/gather (and scalar scales) to a
    tensor X viewed as ``[T, C]`` with head h at columns ``off + h*D .. off + (h+1)*D``: the
    attention inputs become ``slice(X, axis=1, off, off + H*D)`` (a fused qkv linear gives three
    slices; :func:`split_qkv` later splits the linear). The output is followed through
    reshape/transpose to the token-major ``[T, H*D]`` tensor the projection reads.
    """
    return _rewrite(g, _match_attention)


# --------------------------------------------------------------------------------------------
# fold_scales
# --------------------------------------------------------------------------------------------

def _match_scale(g, idx, n):
    if n.op == "sub" and _is_act(g, n.inputs[0]) and _const(g, n.inputs[1]) is not None:
        c = _new_value(g, f"{n.name}/neg", None, const=-_const(g, n.inputs[1]))
        _replace(g, n, [Node("add", [n.inputs[0], c], n.outputs, {}, n.name)])
        return True
    if n.op == "div" and _is_act(g, n.inputs[0]) and _const(g, n.inputs[1]) is not None:
        cv = _const(g, n.inputs[1])
        c = _new_value(g, f"{n.name}/recip", None, const=(1 / cv).astype(cv.dtype))
        _replace(g, n, [Node("mul", [n.inputs[0], c], n.outputs, {}, n.name)])
        return True
    if n.op != "mul":
        return False
    for y, c in (n.inputs, n.inputs[::-1]):
        cv = _const(g, c)
        if cv is None or not _is_act(g, y):
            continue
        lin = idx.prod.get(y)
        if lin is not None and lin.op == "linear" and idx.sole_consumer(y) is n:
            width = g.shape(y)[-1]
            vec = _row_vector(cv, width, len(g.shape(y)))
            if vec is not None and g.shape(n.outputs[0]) == g.shape(y):
                w = _const(g, lin.inputs[1])
                ins = [lin.inputs[0], _new_value(g, f"{lin.name}/W", None,
                                                 const=(w * vec[None, :]).astype(w.dtype))]
                if len(lin.inputs) > 2 and lin.inputs[2]:
                    b = _const(g, lin.inputs[2])
                    ins.append(_new_value(g, f"{lin.name}/bias", None,
                                          const=(b * vec).astype(b.dtype)))
                _replace(g, n, [Node("linear", ins, n.outputs, {}, lin.name)])
                return True
        if c == n.inputs[0] and cv.size == 1:       # canonical operand order: mul(x, s)
            n.inputs = [y, c]
            return True
    return False


def fold_scales(g: Graph) -> Graph:
    """Scale constants into weights: ``mul(linear(x, W, b), s)`` -> ``linear(x, W*s, b*s)``
    (scalar or per-output-channel ``s``, when the linear feeds only the mul); ``div`` by a
    constant becomes ``mul`` by its reciprocal and ``sub`` of a constant ``add`` of its
    negation, so the remaining scalings are canonical ``mul(x, s)``; a constant row added to a
    linear after such a rewrite joins its bias as in :func:`fuse_bias`."""
    return _rewrite(g, lambda g, idx, n: _match_scale(g, idx, n) or _match_bias(g, idx, n))


# --------------------------------------------------------------------------------------------
# collapse_layout, canonicalize_2d
# --------------------------------------------------------------------------------------------

def _match_collapse(g, idx, n):
    if n.op not in ("reshape", "transpose"):
        return False
    nodes = [n]
    while True:
        p = idx.prod.get(nodes[-1].inputs[0])
        if p is None or p.op not in ("reshape", "transpose"):
            break
        nodes.append(p)
    out = n.outputs[0]
    for j in range(len(nodes) - 1, -1, -1):
        src = nodes[j].inputs[0]
        if j == 0 and n.op == "reshape":
            return False                            # already one reshape
        imap = _index_map(nodes[j::-1], g.shape(src))
        if np.array_equal(imap.reshape(-1), np.arange(imap.size)):
            _replace(g, n, [Node("reshape", [src], [out], {"shape": g.shape(out)}, n.name)])
            return True
    return False


def collapse_layout(g: Graph) -> Graph:
    """A chain of reshape/transpose nodes that leaves the elements in row-major order (such as
    the patch embedding's ``[P, C] -> [C, P] -> [1, C, h, w] -> [1, C, P] -> [1, P, C]``)
    becomes one ``reshape``."""
    return _rewrite(g, _match_collapse)


def _squeeze(shape):
    """Drop leading 1s down to rank 2: ``[1, T, C] -> [T, C]``, ``[1, C]`` stays."""
    shape = tuple(shape)
    while len(shape) > 2 and shape[0] == 1:
        shape = shape[1:]
    return shape


def _zeros(shape):
    return np.broadcast_to(np.zeros((), np.float64), shape)


def canonicalize_2d(g: Graph) -> Graph:
    """Squeeze the batch axis: every activation becomes rank 2 (``[T, C]``).

    Axis attributes move with the squeezed axes, constants lose their leading 1s, transposes that
    only move unit axes and reshapes between equal shapes disappear. The image input of
    ``im2col`` keeps its shape. A node that works along the batch axis is a compile error.
    """
    old = {k: v.shape for k, v in g.values.items()}
    problems = []
    squeezed_consts = {}

    def sq_const(name, rank):
        c = _const(g, name)
        if c.ndim <= rank:
            return name
        if any(d != 1 for d in c.shape[:c.ndim - rank]):
            raise ValueError
        key = (name, rank)
        if key not in squeezed_consts:
            squeezed_consts[key] = _new_value(g, f"{name}_{rank}d", None,
                                              const=c.reshape(c.shape[c.ndim - rank:]))
        return squeezed_consts[key]

    rename = {}
    new_nodes = []
    im2col_only = {i for i in g.inputs
                   if all(n.op == "im2col" for n in g.nodes if i in n.inputs)}
    for i in g.inputs:
        s = g.shape(i)
        if i not in im2col_only and _squeeze(s) != s:
            flat = _new_value(g, f"{i}/2d", _squeeze(s))
            new_nodes.append(Node("reshape", [i], [flat], {"shape": _squeeze(s)},
                                  "canonicalize_2d"))
            rename[i] = flat
    for n in g.nodes:
        orig = list(n.inputs)
        if n.op != "im2col":
            n.inputs = [rename.get(i, i) for i in n.inputs]
        for o in n.outputs:
            g.values[o].shape = _squeeze(g.values[o].shape)
        where = f"node {n.name!r} ({n.op})"
        acts = [k for k, i in enumerate(n.inputs) if _is_act(g, i)]
        # Axis attributes refer to the rank the input had before (under its original name).
        old_in = old[orig[acts[0]]] if acts else ()
        a0 = n.inputs[acts[0]] if acts else None
        shift = len(old_in) - len(g.shape(a0)) if acts else 0
        out_shape = g.shape(n.outputs[0])
        try:
            if n.op in ("add", "sub", "mul", "div", "pow"):
                n.inputs = [i if _is_act(g, i) or not i else sq_const(i, len(out_shape))
                            for i in n.inputs]
            elif n.op in ("concat", "slice", "gather"):
                axis = n.attrs["axis"] % len(old_in) - shift
                if axis < 0:
                    raise ValueError
                n.attrs["axis"] = axis
                if n.op == "concat":
                    n.inputs = [i if _is_act(g, i) else sq_const(i, len(out_shape))
                                for i in n.inputs]
                if n.op == "gather":
                    idx_ = np.asarray(n.attrs["index"])
                    got = np.take(_zeros(g.shape(a0)), idx_, axis=axis).shape
                    if got != out_shape and idx_.ndim == 0:
                        n.attrs["index"] = idx_.reshape(1)
                        got = np.take(_zeros(g.shape(a0)), n.attrs["index"], axis=axis).shape
                    if got != out_shape:
                        raise ValueError
            elif n.op == "reduce_mean":
                axes = tuple(a - shift for a in n.attrs["axes"])
                if any(a < 0 for a in axes):
                    raise ValueError
                n.attrs["axes"] = axes
            elif n.op == "reshape":
                n.attrs["shape"] = out_shape
            elif n.op == "transpose":
                s_in = old_in
                perm = n.attrs["perm"]
                moved = [p for p in perm if s_in[p] != 1]
                if moved == sorted(moved):              # only unit axes move: a reshape
                    n.op, n.attrs = "reshape", {"shape": out_shape}
                else:
                    keep = [p for p in perm if p >= shift]
                    if len(keep) != len(g.shape(a0)):
                        raise ValueError
                    n.attrs["perm"] = tuple(p - shift for p in keep)
            elif n.op in ("matmul", "sdpa") and any(
                    len(old[orig[k]]) != len(g.shape(n.inputs[k])) for k in acts):
                raise ValueError
        except ValueError:
            problems.append(f"{where}: works along the batch axis, which vitamin squeezes")
        if n.op == "reshape" and g.shape(n.inputs[0]) == out_shape:
            src, dst = n.inputs[0], n.outputs[0]
            if dst not in g.outputs:
                rename[dst] = src
                continue
            # A graph output: the producer of src takes over the output's name instead.
            p = next((m for m in new_nodes if src in m.outputs), None)
            if p is not None and src not in g.outputs:
                p.outputs = [dst if o == src else o for o in p.outputs]
                for m in new_nodes:
                    m.inputs = [dst if i == src else i for i in m.inputs]
                rename[src] = dst
                continue
        new_nodes.append(n)
    if problems:
        raise CompileError("cannot make the graph 2-D:\n  " + "\n  ".join(problems))
    g.nodes = new_nodes
    return _finish(g)


# --------------------------------------------------------------------------------------------
# split_qkv, check_canonical
# --------------------------------------------------------------------------------------------

def _match_split(g, idx, lin):
    if lin.op != "linear" or not _is_act(g, lin.inputs[0]):
        return False
    y = lin.outputs[0]
    width = g.shape(y)[-1]
    users = idx.consumers(y)
    if not users or y in g.outputs or any(
            u.op != "slice" or u.attrs["axis"] % len(g.shape(y)) != len(g.shape(y)) - 1
            or u.attrs.get("step", 1) != 1 for u in users):
        return False
    w = _const(g, lin.inputs[1])
    b = _const(g, lin.inputs[2]) if len(lin.inputs) > 2 and lin.inputs[2] else None
    for u in users:
        a, z = slice(u.attrs["start"], u.attrs["stop"]).indices(width)[:2]
        ins = [lin.inputs[0], _new_value(g, f"{lin.name}/W[{a}:{z}]", None,
                                         const=w[:, a:z].copy())]
        if b is not None:
            ins.append(_new_value(g, f"{lin.name}/bias[{a}:{z}]", None, const=b[a:z].copy()))
        _replace(g, u, [Node("linear", ins, u.outputs, {}, f"{lin.name}[{a}:{z}]")])
    return True


def split_qkv(g: Graph) -> Graph:
    """A linear read only through column slices (the fused qkv projection feeding attention's
    q, k and v) -> one linear per slice, with the matching columns of W and b."""
    return _rewrite(g, _match_split)


_LEFTOVER = {
    "erf": "an Erf that is not part of a GELU",
    "tanh": "a Tanh that is not part of a GELU",
    "pow": "a Pow that is not part of a LayerNorm or GELU",
    "sqrt": "a Sqrt that is not part of a LayerNorm",
    "reciprocal": "a Reciprocal that is not part of a LayerNorm",
    "reduce_mean": "a ReduceMean that is not part of a LayerNorm",
    "matmul": "a product of two activations that is not part of a recognised attention",
    "sdpa": "attention whose q/k/v or output are not token-major views of [T, H*D] tensors",
    "transpose": "a transpose that changes the token-major layout",
    "slice": "a slice that is not a q/k/v column split of a linear",
    "sub": "a subtraction that is not a constant offset",
    "div": "a division that is not by a constant",
    "topk": "a TopK that is not the routing of a mixture of experts (Softmax -> TopK -> "
            "ScatterElements into a zero mask whose columns weight expert MLPs)",
    "scatter_elements": "a ScatterElements that is not a mixture-of-experts routing mask",
    "select": "a per-task table (Gather at the task input) that is not the weight of a "
              "MatMul (task head or gate)",
}


def check_canonical(g: Graph) -> Graph:
    """Fail with every node that is not canonical (op, operands, 2-D shapes); else return g."""
    problems = []
    for n in g.nodes:
        # Graph inputs keep their shape: an image read by im2col, or tokens [1, T, C] reshaped.
        exempt = set(g.inputs) if n.op in ("im2col", "reshape") else set()
        where = f"node {n.name!r} ({n.op})"
        if n.op not in CANONICAL_OPS:
            problems.append(f"{where}: {_LEFTOVER.get(n.op, 'not a canonical op')}")
            continue
        a = n.attrs
        if n.op == "mul" and not (len(n.inputs) == 2 and _is_act(g, n.inputs[0])
                                  and _scalar(g, n.inputs[1]) is not None):
            problems.append(f"{where}: only multiplication by a scalar constant is supported")
        elif n.op == "concat" and a["axis"] != 0:
            problems.append(f"{where}: concatenation along axis {a['axis']}, not the token axis")
        elif n.op == "gather" and (a["axis"] != 0 or np.asarray(a["index"]).size != 1):
            problems.append(f"{where}: only selecting one token (row) is supported")
        elif n.op == "softmax" and a.get("axis", -1) not in (-1, len(g.shape(n.inputs[0])) - 1):
            problems.append(f"{where}: softmax along axis {a['axis']}")
        elif n.op == "reshape":
            si, so = g.shape(n.inputs[0]), g.shape(n.outputs[0])
            if si[-1:] != so[-1:] or _strip(si) != _strip(so):
                problems.append(f"{where}: reshape {list(si)} -> {list(so)} changes the 2-D "
                                f"layout")
        exempt |= {i for i in g.inputs if g.values[i].dtype.startswith("int")}   # task index
        for v in [i for i in n.inputs if _is_act(g, i) and i not in exempt] + n.outputs:
            if len(g.shape(v)) != 2:
                problems.append(f"{where}: {v!r} has shape {list(g.shape(v))}, not [T, C]")
                break
    if problems:
        raise CompileError(f"{g.name!r} is not a Vision Transformer vitamin can run; "
                           f"{len(problems)} node(s) left after the passes:\n  "
                           + "\n  ".join(problems))
    return g


# --------------------------------------------------------------------------------------------
# Pipeline
# --------------------------------------------------------------------------------------------

from .moe import fuse_moe, fuse_task_linear  # noqa: E402  (moe uses this module's helpers)

#: The passes of :func:`run_pipeline`, in order.
PIPELINE = [
    ("fold_constants", fold_constants),
    ("fuse_bias", fuse_bias),
    ("fuse_gelu", fuse_gelu),
    ("fuse_layernorm", fuse_layernorm),
    ("fuse_task_linear", fuse_task_linear),
    ("fuse_moe", fuse_moe),
    ("fuse_sdpa", fuse_sdpa),
    ("lower_attention", lower_attention),
    ("fold_scales", fold_scales),
    ("collapse_layout", collapse_layout),
    ("canonicalize_2d", canonicalize_2d),
    ("split_qkv", split_qkv),
    ("check_canonical", check_canonical),
]


def run_pipeline(graph: Graph, passes=None, *, timings: dict | None = None) -> Graph:
    """Run ``passes`` (default :data:`PIPELINE`) on a copy of ``graph``; return the result.

    ``timings``, if given, receives the seconds each pass took, by name.
    """
    g = copy.deepcopy(graph)
    for name, fn in PIPELINE if passes is None else passes:
        t0 = time.perf_counter()
        g = fn(g)
        if timings is not None:
            timings[name] = time.perf_counter() - t0
    return g
