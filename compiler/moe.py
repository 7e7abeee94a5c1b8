"""Mixture-of-experts and multi-task graphs: the passes that recognise them, their float
semantics and their calibration.

Two canonical ops come from here (:mod:`vitamin.compiler.ir` evaluates them):

============  ==========================================  =====================================
op            inputs                                      semantics / attributes
============  ==========================================  =====================================
linear_task   x[T, K], W[n_tasks, K, N] (const),          ``x @ W[task] + b[task]``: a linear
              b[n_tasks, N] (const) or "", task           layer whose weights the run-time task
                                                          index selects (a task head, a gate)
moe           x[T, D], task or "", gate (const            per token: ``p = softmax(x @ G)``,
              [n_tasks, D, E] or [D, E]), then per        ``G = gate[task]``; the ``k`` largest
              expert e: W1 [D, H], b1 [H], W2 [H, D],     ``p`` (ties: lower expert first, as
              b2 [D] (consts)                             ONNX TopK) weight their experts'
                                                          ``fc2(act(fc1(x)))``, summed (not
                                                          renormalised); attrs ``k``,
                                                          ``n_experts``, ``act`` (gelu | relu)
============  ==========================================  =====================================

Accepted ONNX form (both PyTorch exporters produce it from :func:`vitamin.compiler.models.M3ViT`):
``Gather(stacked_gates, task)`` (or a constant gate) -> ``MatMul`` -> ``Softmax`` -> ``TopK`` ->
``ScatterElements`` of the top-k values into a constant zero ``[.., E]`` mask; for every expert
``e`` a column slice ``mask[..., e:e+1]`` multiplies that expert's ``Linear -> GELU (or ReLU) ->
Linear`` of the same input, and the products are summed by ``Add`` nodes. The data-dependent
form (``NonZero`` / ``index_select`` per expert) is not accepted: ``NonZero`` has no static shape.
"""

from __future__ import annotations

import numpy as np

from .ir import CompileError, Node

__all__ = ["fuse_task_linear", "fuse_moe", "eval_moe", "moe_route", "moe_amax",
           "task_count", "moe_summary"]


def _softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _act(x, kind):
    if kind == "relu":
        return np.maximum(x, 0)
    from scipy.special import erf
    return 0.5 * x * (1 + erf(x / np.sqrt(2.0)))


def _task(v) -> int:
    return 0 if v is None else int(np.asarray(v).reshape(-1)[0])


def moe_experts(node, ins):
    """``[(W1, b1, W2, b2)]`` of a ``moe`` node from its evaluated inputs."""
    rest = ins[3:]
    return [tuple(rest[4 * e:4 * e + 4]) for e in range(node.attrs["n_experts"])]


def moe_route(node, ins):
    """(probabilities [T, E], top-k experts [T, k]) of a ``moe`` node in float."""
    x, task, gate = ins[0], ins[1], ins[2]
    g = gate if gate.ndim == 2 else gate[_task(task)]
    p = _softmax(np.asarray(x, dtype=np.float64) @ g)
    # stable sort of -p: equal probabilities keep the lower expert first (ONNX TopK)
    top = np.argsort(-p, axis=-1, kind="stable")[:, :node.attrs["k"]]
    return p, top


def eval_moe(node, ins, stats=None):
    """Float output of a ``moe`` node; ``stats`` (a dict) receives per-expert maxima."""
    x = np.asarray(ins[0], dtype=np.float64)
    p, top = moe_route(node, ins)
    out = np.zeros((x.shape[0], np.asarray(ins[5]).shape[-1]))
    for e, (w1, b1, w2, b2) in enumerate(moe_experts(node, ins)):
        rows, slot = np.nonzero(top == e)
        if not len(rows):
            continue
        h = _act(x[rows] @ w1 + b1, node.attrs["act"])
        y = h @ w2 + b2
        out[rows] += p[rows, e][:, None] * y
        if stats is not None:
            stats.setdefault("hidden", {})[e] = max(stats.get("hidden", {}).get(e, 0.0),
                                                    float(np.abs(h).max()))
            stats["y"] = max(stats.get("y", 0.0), float(np.abs(y).max()))
    if stats is not None:
        g = ins[2] if ins[2].ndim == 2 else ins[2][_task(ins[1])]
        stats["logits"] = max(stats.get("logits", 0.0), float(np.abs(x @ g).max()))
    return out


def eval_linear_task(node, ins):
    x, w, b, task = ins
    t = _task(task)
    if not 0 <= t < w.shape[0]:
        raise CompileError(f"node {node.name!r}: task {t} outside 0..{w.shape[0] - 1}")
    y = np.asarray(x, dtype=np.float64) @ w[t]
    return [y if b is None else y + b[t]]


def moe_amax(node, env) -> dict:
    """Per-sample maxima inside a ``moe`` node (for calibration)."""
    stats: dict = {}
    eval_moe(node, [env[i] if i else None for i in node.inputs], stats)
    return stats


def task_count(graph, name) -> int:
    """Number of tasks an integer input selects among (the smallest table it indexes)."""
    counts = []
    for n in graph.nodes:
        if n.op in ("linear_task", "moe", "select") and name in n.inputs:
            tab = graph.values[n.inputs[1] if n.op == "linear_task" else
                               (n.inputs[2] if n.op == "moe" else n.inputs[0])].const
            if tab is not None and tab.ndim >= 3 - (n.op == "select"):
                counts.append(tab.shape[0])
    return min(counts) if counts else 1


# --------------------------------------------------------------------------------------------
# Passes
# --------------------------------------------------------------------------------------------

def _passes():
    from . import passes
    return passes


def _match_task_linear(g, idx, n):
    P = _passes()
    if n.op != "matmul":
        return False
    sel = idx.prod.get(n.inputs[1])
    if sel is None or sel.op != "select" or len(idx.consumers(n.inputs[1])) != 1:
        return False
    table = P._const(g, sel.inputs[0])
    if table is None or table.ndim != 3:
        return False
    task = sel.inputs[1]
    bias = ""
    out = n.outputs[0]
    cons = idx.consumers(out)
    last = n
    if len(cons) == 1 and cons[0].op == "add" and out not in g.outputs:
        other = cons[0].inputs[1] if cons[0].inputs[0] == out else cons[0].inputs[0]
        bsel = idx.prod.get(other)
        if bsel is not None and bsel.op == "select" and bsel.inputs[1] == task and \
                P._const(g, bsel.inputs[0]) is not None and \
                P._const(g, bsel.inputs[0]).ndim == 2 and \
                P._const(g, bsel.inputs[0]).shape == (table.shape[0], table.shape[2]):
            bias = bsel.inputs[0]
            last = cons[0]
    node = Node("linear_task", [n.inputs[0], sel.inputs[0], bias, task], list(last.outputs), {},
                n.name)
    P._replace(g, last, [node])
    if last is not n:
        P._replace(g, n, [])
    return True


def fuse_task_linear(g):
    """``MatMul(x, Gather(W_stack, task)) [+ Gather(b_stack, task)]`` -> ``linear_task``."""
    return _passes()._rewrite(g, _match_task_linear)


class _NoMatch(Exception):
    pass


def _match_moe(g, idx, sc):
    P = _passes()
    if sc.op != "scatter_elements":
        return False
    where = f"node {sc.name!r}"
    try:
        zeros = P._const(g, sc.inputs[0])
        if zeros is None or np.any(zeros != 0):
            raise _NoMatch("the routing mask must start from a constant zero tensor")
        tk = idx.prod.get(sc.inputs[1])
        if tk is None or tk.op != "topk" or tk.outputs[1] != sc.inputs[1] or \
                tk.outputs[0] != sc.inputs[2]:
            raise _NoMatch("the scattered indices and values must be one TopK's outputs")
        sm = idx.prod.get(tk.inputs[0])
        if sm is None or sm.op != "softmax":
            raise _NoMatch("TopK must select from a Softmax over the experts")
        gl = idx.prod.get(sm.inputs[0])
        if gl is not None and gl.op == "linear_task" and not gl.inputs[2]:
            x, gate, task = gl.inputs[0], gl.inputs[1], gl.inputs[3]
        elif gl is not None and gl.op == "linear" and (len(gl.inputs) < 3 or not gl.inputs[2]):
            x, gate, task = gl.inputs[0], gl.inputs[1], ""
        else:
            raise _NoMatch("the gate must be a bias-free MatMul of the MoE input with a "
                           "constant gate matrix or a per-task one (Gather on the task input)")
        ne = int(g.shape(sm.outputs[0])[-1])
        k = int(tk.attrs["k"])
        # mask columns -> expert terms
        terms = {}
        for c in idx.consumers(sc.outputs[0]):
            if c.op != "slice" or c.attrs["axis"] % len(g.shape(sc.outputs[0])) != \
                    len(g.shape(sc.outputs[0])) - 1 or c.attrs["stop"] - c.attrs["start"] != 1:
                raise _NoMatch("the routing mask may only be read one expert column at a time")
            e = c.attrs["start"]
            users = idx.consumers(c.outputs[0])
            if e in terms or len(users) != 1 or users[0].op != "mul":
                raise _NoMatch(f"mask column {e} must multiply exactly one expert output")
            mul = users[0]
            y = mul.inputs[0] if mul.inputs[1] == c.outputs[0] else mul.inputs[1]
            fc2 = idx.prod.get(y)
            act = idx.prod.get(fc2.inputs[0]) if fc2 is not None and fc2.op == "linear" else None
            fc1 = idx.prod.get(act.inputs[0]) if act is not None and act.op in ("gelu", "relu") \
                else None
            if fc1 is None or fc1.op != "linear" or fc1.inputs[0] != x:
                raise _NoMatch(f"expert {e} must be Linear -> GELU/ReLU -> Linear of the gate's "
                               f"input")
            if act.op == "gelu" and act.attrs.get("approximate", "none") != "none":
                raise _NoMatch(f"expert {e}: tanh-approximated GELU inside an expert")
            for v in (fc1.outputs[0], act.outputs[0], y):
                if len(idx.consumers(v)) != 1 or v in g.outputs:
                    raise _NoMatch(f"expert {e}'s intermediate {v!r} is used elsewhere")
            terms[e] = (mul, fc1, act, fc2)
        if sorted(terms) != list(range(ne)):
            raise _NoMatch(f"expected one term per expert 0..{ne - 1}, found {sorted(terms)}")
        # the sum of the terms
        pending = {terms[e][0].outputs[0] for e in terms}
        adds = []
        while len(pending) > 1:
            progress = False
            for v in list(pending):
                users = idx.consumers(v)
                if len(users) == 1 and users[0].op == "add" and v not in g.outputs and \
                        all(i in pending for i in users[0].inputs) and \
                        users[0].inputs[0] != users[0].inputs[1]:
                    a = users[0]
                    pending -= set(a.inputs)
                    pending.add(a.outputs[0])
                    adds.append(a)
                    progress = True
                    break
            if not progress:
                raise _NoMatch("the expert terms must be summed by Add nodes (and used nowhere "
                               "else)")
        out = pending.pop()
    except _NoMatch as e:
        raise CompileError(f"{where}: a mixture-of-experts gate that does not match the "
                           f"pattern: {e}") from None
    acts = {terms[e][2].op for e in terms}
    if len(acts) != 1:
        raise CompileError(f"{where}: experts mix GELU and ReLU")
    ins = [x, task, gate]
    for e in range(ne):
        _, fc1, _, fc2 = terms[e]
        for lin in (fc1, fc2):
            w = lin.inputs[1]
            b = lin.inputs[2] if len(lin.inputs) > 2 and lin.inputs[2] else \
                P._new_value(g, f"{lin.name}/zero_bias", None,
                             const=np.zeros(g.shape(w)[-1]))
            ins += [w, b]
    name = sc.name.rsplit("/", 1)[0] + "/moe" if "/" in sc.name else f"{sc.name}/moe"
    node = Node("moe", ins, [out], {"k": k, "n_experts": ne, "act": acts.pop()}, name)
    root = next(a for a in adds if a.outputs[0] == out) if adds else terms[0][0]
    P._replace(g, root, [node])
    return True


def fuse_moe(g):
    """Softmax -> TopK -> ScatterElements mask -> mask-weighted expert MLPs -> one ``moe``."""
    return _passes()._rewrite(g, _match_moe)


# --------------------------------------------------------------------------------------------
# Accounting of routed execution
# --------------------------------------------------------------------------------------------

def moe_summary(program, profile) -> list:
    """Per MoE layer of ``program``: tokens per expert, the experts run, the expert-weight
    bytes read against what the routing predicts, and the naive per-token fetch.

    ``profile`` is a :class:`vitamin.compiler.cost.DynamicProfile` of one run (it knows the
    queue lengths and the skipped instructions). Activations never leave the scratchpad inside
    a MoE layer, so its DRAM traffic is the gate and expert weights only.
    """
    out = []
    for lay in program.meta.get("moe", []):
        per_expert = []
        read = expected = naive = 0
        for ex in lay["experts"]:
            toks = max((profile.dyn_m.get(pc, 0) for pc in ex["fc1_pcs"]), default=0)
            ran = [pc for pc in ex["load_pcs"] if pc not in profile.skipped]
            nbytes = _load_bytes(program, ran)
            read += nbytes
            if toks:
                expected += ex["weight_bytes"]
            naive += toks * ex["weight_bytes"]
            per_expert.append({"expert": ex["expert"], "tokens": toks, "bytes_read": nbytes})
        gate = _load_bytes(program, [pc for pc in lay["gate_load_pcs"]
                                     if pc not in profile.skipped])
        out.append({"layer": lay["layer"], "name": lay["name"], "tokens": lay["tokens"],
                    "k": lay["k"], "n_experts": lay["n_experts"], "experts": per_expert,
                    "active_experts": sum(1 for e in per_expert if e["tokens"]),
                    "expert_weight_bytes_read": read, "expected_expert_weight_bytes": expected,
                    "gate_weight_bytes": gate, "activation_dram_bytes": 0,
                    "naive_per_token_weight_bytes": naive,
                    "traffic_reduction": naive / read if read else float("inf")})
    return out


def _load_bytes(program, pcs) -> int:
    from vitamin.golden.isasim import decode_program
    from vitamin.isa import DmaMode
    instrs = decode_program(program.dram_image(), program.n_instr)
    es = {0: 1, 1: 2, 2: 1, 3: 8}      # DType -> DRAM bytes per element (I8, I16, U8, I32)
    total = 0
    for pc in pcs:
        _, f = instrs[pc]
        n2 = f["n2"] if f["mode"] == DmaMode.STRIDED else 1
        total += f["run"] * es[int(f["dtype"].value)] * f["n0"] * f["n1"] * n2
    return total
