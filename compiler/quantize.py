"""Post-training quantisation: calibrate activation ranges, choose scales and weight formats.

Activations are symmetric per-tensor integers of ``config.act_bits`` bits; a tensor's scale is
``amax * margin / act_max`` where ``amax`` is the largest magnitude seen on the calibration inputs.
Tensors that share storage (a concatenation and its parts, slices, row selections, reshapes)
share one scale. Weights are symmetric per output channel with ``config.weight_bits`` bits.
Attention score matrices get their own calibrated scale.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import ir
from .moe import moe_amax

__all__ = ["QuantPlan", "calibrate", "default_calibration", "quantize_weight", "MARGIN"]

MARGIN = 2.0           # headroom above the calibrated range (int16 activations keep 14 bits)
ALIAS_OPS = ("reshape", "slice", "gather", "concat")


@dataclass
class QuantPlan:
    amax: dict = field(default_factory=dict)        # value -> max |x| on calibration data
    scale: dict = field(default_factory=dict)       # value -> float scale
    score_scale: dict = field(default_factory=dict)  # attention node name -> score scale
    moe: dict = field(default_factory=dict)          # moe node name -> {"logits", "hidden"}
    samples: int = 0


def default_calibration(graph: ir.Graph, n: int = 8, seed: int = 0) -> list:
    """Documented default when no calibration data is given: ``n`` inputs drawn from N(0, 1)."""
    from .moe import task_count
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        smp = {}
        for name in graph.inputs:
            if graph.values[name].dtype.startswith("int"):      # task index: every task in turn
                smp[name] = np.array(i % task_count(graph, name))
            else:
                smp[name] = rng.standard_normal(graph.shape(name))
        out.append(smp)
    return out


def _attention_scores_amax(node, env):
    q, k = env[node.inputs[0]], env[node.inputs[1]]
    h, d = node.attrs["heads"], node.attrs["head_dim"]
    m = 0.0
    for i in range(h):
        sl = slice(i * d, (i + 1) * d)
        s = node.attrs["scale"] * (q[:, sl] @ k[:, sl].T)
        m = max(m, float(np.abs(s).max()))
    return m


class _UnionFind:
    def __init__(self):
        self.p = {}

    def find(self, x):
        self.p.setdefault(x, x)
        while self.p[x] != x:
            self.p[x] = self.p[self.p[x]]
            x = self.p[x]
        return x

    def union(self, a, b):
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.p[ra] = rb


def calibrate(graph: ir.Graph, samples: list, config, evaluate=ir.evaluate) -> QuantPlan:
    """Run the float graph on every sample and derive the scales (see module docstring)."""
    if not samples:
        raise ir.CompileError("calibration needs at least one input sample")
    plan = QuantPlan(samples=len(samples))
    amax: dict = {}
    for smp in samples:
        env = evaluate(graph, smp, keep=True)
        for name, v in env.items():
            if graph.values.get(name) is not None and (graph.values[name].is_const or
                                                       graph.values[name].dtype.startswith("int")):
                continue
            a = float(np.abs(np.asarray(v, dtype=np.float64)).max()) if np.size(v) else 0.0
            amax[name] = max(amax.get(name, 0.0), a)
        for node in graph.nodes:
            if node.op == "attention":
                plan.score_scale[node.name] = max(plan.score_scale.get(node.name, 0.0),
                                                  _attention_scores_amax(node, env))
            if node.op == "moe":
                st = moe_amax(node, env)
                acc = plan.moe.setdefault(node.name, {"logits": 0.0, "hidden": {}, "y": 0.0})
                acc["logits"] = max(acc["logits"], st.get("logits", 0.0))
                acc["y"] = max(acc["y"], st.get("y", 0.0))
                for e, a in st.get("hidden", {}).items():
                    acc["hidden"][e] = max(acc["hidden"].get(e, 0.0), a)
    # An expert's output y is added into the MoE output (and the residual sum it may be fused
    # with) at that output's scale: the scale must hold y.
    for node in graph.nodes:
        if node.op == "moe":
            out = node.outputs[0]
            y = plan.moe[node.name]["y"]
            amax[out] = max(amax.get(out, 0.0), y)
            cons = graph.consumers(out)
            if len(cons) == 1 and cons[0].op == "add":
                amax[cons[0].outputs[0]] = max(amax.get(cons[0].outputs[0], 0.0), y)
    uf = _UnionFind()
    for node in graph.nodes:
        if node.op in ALIAS_OPS:
            for i in node.inputs:
                if i and not graph.values[i].is_const:
                    uf.union(i, node.outputs[0])
            if node.op == "concat":
                for i in node.inputs:
                    if graph.values[i].is_const:
                        amax[node.outputs[0]] = max(amax.get(node.outputs[0], 0.0),
                                                    float(np.abs(graph.values[i].const).max()))
    group_max: dict = {}
    for name, a in amax.items():
        r = uf.find(name)
        group_max[r] = max(group_max.get(r, 0.0), a)
    qmax = (1 << (config.act_bits - 1)) - 1
    for name in amax:
        a = group_max[uf.find(name)]
        plan.amax[name] = a
        plan.scale[name] = max(a, 1e-6) * MARGIN / qmax
    for k, a in plan.score_scale.items():
        plan.score_scale[k] = max(a, 1e-6) * MARGIN / qmax
    for st in plan.moe.values():
        st["logits_scale"] = max(st["logits"], 1e-6) * MARGIN / qmax
        st["hidden_scale"] = {e: max(a, 1e-6) * MARGIN / qmax for e, a in st["hidden"].items()}
    return plan


def quantize_weight(w: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-output-channel quantisation of W[K, N]: (integers, scales[N])."""
    qmax = (1 << (bits - 1)) - 1
    amax = np.abs(w).max(axis=0)
    s = np.where(amax > 0, amax / qmax, 1.0)
    q = np.clip(np.round(w / s), -qmax, qmax).astype(np.int64)
    return q, s
