"""Passes: every export variant of our ViTs becomes the canonical 2-D graph and still computes
what onnxruntime computes; hand-built ONNX graphs cover the pattern variants exporters produce.

Numerical bound: the IR is evaluated in float64, onnxruntime runs float32. Over a few blocks the
float32 rounding of onnxruntime stays around 1e-6 (measured: 4e-7 for vit_micro, 2e-6 for
DeiT-tiny on logits of magnitude ~3); the tests allow max |error| < 1e-4.
"""

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from vitamin.compiler import frontend, models, passes
from vitamin.compiler.ir import CompileError, Graph, Node, Value

TOL = 1e-4

VARIANTS = {
    "base": {},
    "tanh_gelu": {"gelu": "tanh"},
    "decomposed_ln": {"norm": "decomposed"},
    "sdpa": {"attn": "sdpa"},
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """``exported(preset, dynamo, variant, opset=None)`` -> path; each model is exported once."""
    root = tmp_path_factory.mktemp("onnx")
    cache = {}

    def get(preset, dynamo, variant="base", opset=None):
        key = (preset, dynamo, variant, opset)
        if key not in cache:
            model = getattr(models, preset)(**VARIANTS[variant])
            path = root / f"{preset}_{'dynamo' if dynamo else 'legacy'}_{variant}_{opset}.onnx"
            cache[key] = models.export_onnx(model, path, dynamo=dynamo, opset=opset)
        return cache[key]
    return get


def run_ort(model, feeds):
    sess = ort.InferenceSession(model if isinstance(model, str) else model.SerializeToString(),
                                providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def compare(model, graph, seed=0):
    """Max |IR - onnxruntime| over the outputs, for a random input."""
    rng = np.random.default_rng(seed)
    feeds = {i: rng.standard_normal(graph.values[i].shape).astype(np.float32)
             for i in graph.inputs}
    refs = run_ort(str(model) if not isinstance(model, onnx.ModelProto) else model, feeds)
    outs = passes.evaluate_graph(graph, feeds)
    err = 0.0
    for name, ref in zip(graph.outputs, refs, strict=True):
        assert outs[name].size == ref.size
        err = max(err, float(np.abs(outs[name].reshape(ref.shape) - ref).max()))
    return err


def op_counts(g):
    return collections.Counter(n.op for n in g.nodes)


def assert_canonical_vit(g, depth):
    ops = op_counts(g)
    assert set(ops) <= set(passes.CANONICAL_OPS), ops
    assert ops["attention"] == depth
    assert ops["layernorm"] == 2 * depth + 1
    assert ops["gelu"] == depth
    # patch embedding + (q, k, v, proj, fc1, fc2) per block + head
    assert ops["linear"] == 6 * depth + 2
    image = {n.inputs[0] for n in g.nodes if n.op == "im2col"}
    for n in g.nodes:
        for v in n.inputs + n.outputs:
            if v in g.values and not g.values[v].is_const and v not in image:
                assert len(g.shape(v)) == 2, (n.op, v, g.shape(v))


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
def test_vit_micro_variants(exported, dynamo, variant):
    path = exported("vit_micro", dynamo, variant)
    g = passes.run_pipeline(frontend.load_onnx(path))
    assert_canonical_vit(g, depth=2)
    assert compare(path, g) < TOL


@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
def test_vit_digits(exported, dynamo):
    path = exported("vit_digits", dynamo)
    g = passes.run_pipeline(frontend.load_onnx(path))
    assert_canonical_vit(g, depth=models.PRESETS["vit_digits"]["depth"])
    assert compare(path, g) < TOL


def test_sdpa_opset23_uses_onnx_attention(exported):
    """dynamo=True with opset 23 exports scaled_dot_product_attention as ONNX Attention."""
    path = exported("vit_micro", True, "sdpa", opset=23)
    assert "Attention" in {n.op_type for n in onnx.load(str(path)).graph.node}
    raw = frontend.load_onnx(path)
    assert op_counts(raw)["sdpa"] == 2
    g = passes.run_pipeline(raw)
    assert_canonical_vit(g, depth=2)
    assert compare(path, g) < TOL


def test_attention_attributes(exported):
    g = passes.run_pipeline(frontend.load_onnx(exported("vit_micro", False)))
    att = [n for n in g.nodes if n.op == "attention"]
    for n in att:
        assert n.attrs == {"heads": 2, "head_dim": 16, "scale": pytest.approx(16 ** -0.5),
                           "causal": False}
        assert all(g.shape(i) == (17, 32) for i in n.inputs)
        assert g.shape(n.outputs[0]) == (17, 32)
        # q, k, v are three linears of the same LayerNorm output (the split qkv projection)
        producers = [g.producer(i) for i in n.inputs]
        assert [p.op for p in producers] == ["linear"] * 3
        assert len({p.inputs[0] for p in producers}) == 1


def test_pipeline_is_ordered_named_and_pure(exported):
    names = [name for name, _ in passes.PIPELINE]
    assert names[0] == "fold_constants" and names[-1] == "check_canonical"
    assert len(set(names)) == len(names)
    assert all(fn.__doc__ for _, fn in passes.PIPELINE)
    raw = frontend.load_onnx(exported("vit_micro", False))
    before = [n.op for n in raw.nodes]
    timings = {}
    passes.run_pipeline(raw, timings=timings)
    assert [n.op for n in raw.nodes] == before           # the input graph is not modified
    assert list(timings) == names


def test_attention_evaluator_matches_sdpa():
    rng = np.random.default_rng(1)
    t, h, d = 5, 3, 4
    q, k, v = (rng.standard_normal((t, h * d)) for _ in range(3))
    for causal in (False, True):
        n = Node("attention", ["q", "k", "v"], ["y"], {"heads": h, "head_dim": d, "scale": 0.3,
                                                       "causal": causal})
        got = passes.eval_node(n, [q, k, v])[0]
        s = Node("sdpa", ["q", "k", "v"], ["y"], {"scale": 0.3, "causal": causal})

        def heads(x):
            return x.reshape(t, h, d).transpose(1, 0, 2)
        ref = passes.eval_node(s, [heads(q), heads(k), heads(v)])[0]
        np.testing.assert_allclose(got, ref.transpose(1, 0, 2).reshape(t, h * d), atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Hand-built ONNX graphs: pattern variants
# ---------------------------------------------------------------------------------------------

RNG = np.random.default_rng(42)


def w(*shape, scale=0.3):
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


class Builder:
    """A tiny ONNX graph builder for the pattern tests."""

    def __init__(self, opset=17):
        self.opset = opset
        self.nodes, self.inits = [], []
        self.count = 0

    def const(self, value, name=None):
        self.count += 1
        name = name or f"c{self.count}"
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op_type, *inputs, **attrs):
        self.count += 1
        out = f"{op_type.lower()}{self.count}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=f"n{self.count}",
                                           **attrs))
        return out

    def model(self, inputs, outputs):
        vi = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs]
        vo = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs]
        g = helper.make_graph(self.nodes, "test", vi, vo, self.inits)
        # Output shapes are left to shape inference (the checker wants them, ORT does not).
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", self.opset)])


def pipeline_vs_ort(m):
    g = passes.run_pipeline(frontend.load_onnx(m))
    assert compare(m, g) < TOL
    return g


def gelu_erf_a(b, x):        # 0.5 * (x * (1 + erf(x * (1/sqrt 2))))
    e = b.op("Erf", b.op("Mul", x, b.const(np.float32(0.70710678))))
    one_plus = b.op("Add", e, b.const(np.float32(1.0)))
    return b.op("Mul", b.const(np.float32(0.5)), b.op("Mul", x, one_plus))


def gelu_erf_b(b, x):        # (x * 0.5) * (1 + erf(x / sqrt 2))
    e = b.op("Erf", b.op("Div", x, b.const(np.float32(1.4142135))))
    return b.op("Mul", b.op("Mul", x, b.const(np.float32(0.5))),
                b.op("Add", b.const(np.float32(1.0)), e))


def gelu_erf_c(b, x):        # x * ((1 + erf(x / sqrt 2)) * 0.5)
    e = b.op("Erf", b.op("Div", x, b.const(np.float32(1.4142135))))
    return b.op("Mul", x, b.op("Mul", b.op("Add", e, b.const(np.float32(1.0))),
                               b.const(np.float32(0.5))))


def gelu_tanh_pow(b, x):     # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) with Pow
    cube = b.op("Pow", x, b.const(np.float32(3.0)))
    inner = b.op("Add", x, b.op("Mul", cube, b.const(np.float32(0.044715))))
    t = b.op("Tanh", b.op("Mul", inner, b.const(np.float32(0.7978845608))))
    half = b.op("Mul", x, b.const(np.float32(0.5)))
    return b.op("Mul", half, b.op("Add", t, b.const(np.float32(1.0))))


@pytest.mark.parametrize("variant", [gelu_erf_a, gelu_erf_b, gelu_erf_c, gelu_tanh_pow])
def test_gelu_pattern_variants(variant):
    b = Builder()
    h = b.op("Add", b.op("MatMul", "x", b.const(w(8, 16))), b.const(w(16)))
    y = b.op("MatMul", variant(b, h), b.const(w(16, 8)))
    g = pipeline_vs_ort(b.model([("x", [6, 8])], [y]))
    assert [n.op for n in g.nodes] == ["linear", "gelu", "linear"]
    expected = "tanh" if variant is gelu_tanh_pow else "none"
    assert g.nodes[1].attrs["approximate"] == expected


def test_layernorm_variant_mul_square_and_reciprocal():
    """var = mean(d*d); y = d * reciprocal(sqrt(var + eps)); no affine; opset 18 axes input."""
    b = Builder(opset=18)
    axes = b.const(np.array([-1], np.int64))
    mu = b.op("ReduceMean", "x", axes)
    d = b.op("Sub", "x", mu)
    var = b.op("ReduceMean", b.op("Mul", d, d), axes)
    r = b.op("Reciprocal", b.op("Sqrt", b.op("Add", var, b.const(np.float32(1e-5)))))
    y = b.op("MatMul", b.op("Mul", d, r), b.const(w(8, 4)))
    g = pipeline_vs_ort(b.model([("x", [1, 5, 8])], [y]))
    assert [n.op for n in g.nodes] == ["reshape", "layernorm", "linear"]   # [1, T, C] input
    assert g.nodes[1].attrs["eps"] == pytest.approx(1e-5)


def qkv_attention(b, x, t, heads, d, unbind):
    """timm-style fused qkv attention; ``unbind`` is "gather" (qkv[0]) or "split"."""
    c = heads * d
    qkv = b.op("Add", b.op("MatMul", x, b.const(w(c, 3 * c))), b.const(w(3 * c)))
    qkv = b.op("Transpose", b.op("Reshape", qkv, b.const(np.array([1, t, 3, heads, d]))),
               perm=[2, 0, 3, 1, 4])
    if unbind == "gather":
        q, k, v = (b.op("Gather", qkv, b.const(np.array(i, np.int64)), axis=0) for i in range(3))
    else:
        sq = b.const(np.array([0], np.int64))
        parts = [f"split_{i}" for i in range(3)]
        b.nodes.append(helper.make_node("Split", [qkv], parts, axis=0, num_outputs=3))
        q, k, v = (b.op("Squeeze", p, sq) for p in parts)
    s = b.op("Div", b.op("MatMul", q, b.op("Transpose", k, perm=[0, 1, 3, 2])),
             b.const(np.float32(np.sqrt(d))))
    o = b.op("MatMul", b.op("Softmax", s, axis=3), v)
    o = b.op("Reshape", b.op("Transpose", o, perm=[0, 2, 1, 3]), b.const(np.array([1, t, c])))
    return b.op("MatMul", o, b.const(w(c, c)))


@pytest.mark.parametrize("unbind", ["gather", "split"])
def test_fused_qkv_attention_variants(unbind):
    b = Builder(opset=18)
    y = qkv_attention(b, "x", t=7, heads=2, d=4, unbind=unbind)
    g = pipeline_vs_ort(b.model([("x", [1, 7, 8])], [y]))
    assert op_counts(g) == {"reshape": 1, "linear": 4, "attention": 1}
    att = next(n for n in g.nodes if n.op == "attention")
    assert att.attrs["scale"] == pytest.approx(0.5)      # Div by sqrt(4), positive softmax axis


@pytest.mark.parametrize("causal", [0, 1])
def test_onnx_attention_3d_separate_projections(causal):
    """ONNX Attention (opset 23) on [B, T, H*D] inputs from three separate projections."""
    b = Builder(opset=23)
    q, k, v = (b.op("MatMul", "x", b.const(w(12, 12))) for _ in range(3))
    a = b.op("Attention", q, k, v, q_num_heads=3, kv_num_heads=3, is_causal=causal)
    g = pipeline_vs_ort(b.model([("x", [1, 6, 12])], [a]))
    assert [n.op for n in g.nodes] == ["reshape", "linear", "linear", "linear", "attention"]
    att = g.nodes[-1]
    assert att.attrs == {"heads": 3, "head_dim": 4, "scale": pytest.approx(0.5),
                         "causal": bool(causal)}


def test_scale_folding_into_linear():
    """MatMul -> Add bias -> Mul 3 -> Div 4 -> Sub c: one linear with scaled weights and bias."""
    b = Builder()
    h = b.op("Add", b.const(w(5)), b.op("MatMul", "x", b.const(w(4, 5))))
    h = b.op("Div", b.op("Mul", b.const(np.float32(3.0)), h), b.const(np.float32(4.0)))
    y = b.op("Sub", h, b.const(w(5)))
    g = pipeline_vs_ort(b.model([("x", [3, 4])], [y]))
    assert [n.op for n in g.nodes] == ["linear"]


def test_scalar_mul_kept_when_not_after_linear():
    b = Builder()
    r = b.op("Relu", b.op("MatMul", "x", b.const(w(4, 5))))
    y = b.op("Div", r, b.const(np.float32(2.0)))
    g = pipeline_vs_ort(b.model([("x", [3, 4])], [y]))
    assert [n.op for n in g.nodes] == ["linear", "relu", "mul"]
    assert g.const(g.nodes[-1].inputs[1]) == pytest.approx(0.5)


def test_leftover_primitive_is_a_compile_error():
    """An Erf that is not a GELU and a product of two activations are reported together."""
    b = Builder()
    e = b.op("Erf", b.op("MatMul", "x", b.const(w(4, 4))))
    y = b.op("MatMul", e, b.op("Transpose", "x"))
    with pytest.raises(CompileError) as info:
        passes.run_pipeline(frontend.load_onnx(b.model([("x", [3, 4])], [y])))
    msg = str(info.value)
    assert "(erf)" in msg and "(matmul)" in msg and "GELU" in msg


def test_canonicalize_squeezes_batch_of_token_inputs():
    """A token-sequence input [1, T, C] (no patch embedding) is reshaped to [T, C] once."""
    b = Builder()
    y = b.op("LayerNormalization", b.op("MatMul", "x", b.const(w(4, 4))), b.const(w(4)),
             axis=-1)       # no bias input: beta = 0
    g = pipeline_vs_ort(b.model([("x", [1, 3, 4])], [y]))
    assert [n.op for n in g.nodes] == ["reshape", "linear", "layernorm"]
    assert g.shape(g.outputs[0]) == (3, 4)


def test_fold_constants_pass():
    g = Graph(inputs=["x"], outputs=["y"], nodes=[
        Node("transpose", ["w"], ["wt"], {"perm": (1, 0)}),
        Node("linear", ["x", "wt"], ["y"])],
        values={"x": Value("x", (2, 3)), "w": Value("w", (4, 3), const=w(4, 3)),
                "wt": Value("wt", (3, 4)), "y": Value("y", (2, 4))})
    out = passes.fold_constants(g)
    assert [n.op for n in out.nodes] == ["linear"]
    assert out.values["wt"].is_const and out.shape("wt") == (3, 4)
    assert "w" not in out.values
