"""ONNX frontend: read a model, make its shapes static, fold constant subgraphs, convert to IR.

:func:`load_onnx` runs four steps:

1. **read** the file (with its external data files), or take a ``ModelProto``;
2. **fix the input shapes**: symbolic dimensions come from ``input_shapes`` or the load fails,
   naming them;
3. **fold constants** at the ONNX level: shape inference (with data propagation), then every node
   whose inputs are all constant, and every ``Shape``/``Size`` of a statically shaped tensor, is
   evaluated (small NumPy folders below, ``onnx.reference`` for the rest) until no node folds.
   This removes the Shape/Gather/Concat/Reshape arithmetic of TorchScript exports;
4. **convert** each remaining node with the handler registered for its op type
   (``@handler("MatMul", ...)``) into canonical IR ops (:mod:`vitamin.compiler.ir`) and the
   primitive ops of :data:`PRIMITIVES`.

Every node that cannot be converted is collected and reported in one :class:`~ir.CompileError`,
one line per node with its name, op type and the model's opset, at import time.

Primitive ops: the handlers keep ONNX's elementwise building blocks (``erf``, ``tanh``, ``sqrt``,
``pow``, ``reciprocal``, ``reduce_mean``) and ONNX Attention (``sdpa``, heads-major 4-D tensors)
as private IR ops with the NumPy evaluators registered here. The passes
(:mod:`vitamin.compiler.passes`) fuse them into ``gelu``, ``layernorm`` and ``attention``; one left
after the pipeline is a compile error.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .ir import CompileError, Graph, Node, Value

__all__ = ["load_onnx", "handler", "HANDLERS", "primitive", "PRIMITIVES", "Unsupported",
           "supported_ops"]


# --------------------------------------------------------------------------------------------
# Primitive (private) IR ops and their evaluators
# --------------------------------------------------------------------------------------------

#: Private IR op -> evaluator ``fn(node, inputs) -> list of outputs`` (float64 NumPy).
PRIMITIVES: dict[str, Callable] = {}


def primitive(op: str):
    """Register the NumPy evaluator of a private IR op (one the passes must fuse away)."""
    def deco(fn):
        if op in PRIMITIVES:
            raise ValueError(f"primitive op {op!r} registered twice")
        PRIMITIVES[op] = fn
        return fn
    return deco


def _erf(x):
    from scipy.special import erf
    return erf(x)


@primitive("erf")
def _p_erf(n, ins):
    return [_erf(ins[0])]


@primitive("tanh")
def _p_tanh(n, ins):
    return [np.tanh(ins[0])]


@primitive("sqrt")
def _p_sqrt(n, ins):
    return [np.sqrt(ins[0])]


@primitive("reciprocal")
def _p_reciprocal(n, ins):
    return [1.0 / ins[0]]


@primitive("pow")
def _p_pow(n, ins):
    return [np.power(ins[0], ins[1])]


@primitive("reduce_mean")
def _p_reduce_mean(n, ins):
    return [np.mean(ins[0], axis=tuple(n.attrs["axes"]), keepdims=bool(n.attrs["keepdims"]))]


def softmax(x):
    """Softmax over the last axis (float64 NumPy)."""
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def causal_mask(tq: int, tk: int) -> np.ndarray:
    """True where query i may not attend key j (ONNX Attention: upper-left aligned)."""
    return np.arange(tk)[None, :] > np.arange(tq)[:, None]


@primitive("sdpa")
def _p_sdpa(n, ins):
    """softmax(q @ k^T * scale) @ v on heads-major tensors ``[..., T, D]``."""
    q, k, v = ins
    s = np.matmul(q, np.swapaxes(k, -1, -2)) * n.attrs["scale"]
    if n.attrs.get("causal", False):
        s = np.where(causal_mask(s.shape[-2], s.shape[-1]), -np.inf, s)
    return [np.matmul(softmax(s), v)]


@primitive("select")
def _p_select(n, ins):
    """``table[index]``: a constant table indexed by a run-time integer (the task of a
    multi-task model)."""
    table, index = ins
    i = int(np.asarray(index).reshape(-1)[0])
    if not 0 <= i < table.shape[0]:
        raise CompileError(f"node {n.name!r}: index {i} outside 0..{table.shape[0] - 1}")
    return [np.asarray(table[i], dtype=np.float64)]


@primitive("scatter_elements")
def _p_scatter_elements(n, ins):
    """ONNX ScatterElements (no reduction) along ``axis``."""
    data, idx, upd = ins
    out = np.array(data, dtype=np.float64, copy=True)
    np.put_along_axis(out, np.asarray(idx, dtype=np.int64), upd, axis=n.attrs["axis"])
    return [out]


# --------------------------------------------------------------------------------------------
# Handler registry
# --------------------------------------------------------------------------------------------

#: ONNX op type -> handler ``fn(cx: _Converter, node: onnx.NodeProto) -> None``.
HANDLERS: dict[str, Callable] = {}


def handler(*op_types: str):
    """Register the converter of one or more ONNX op types (default domain)."""
    def deco(fn):
        for t in op_types:
            if t in HANDLERS:
                raise ValueError(f"ONNX op {t!r} has two handlers")
            HANDLERS[t] = fn
        return fn
    return deco


def supported_ops() -> list:
    """ONNX op types with a handler (constant-only subgraphs of any op are folded as well)."""
    return sorted(HANDLERS)


class Unsupported(Exception):
    """Raised by a handler for a node it cannot take; the message says why (and what works)."""


# Ops without a handler, with what to say instead of a bare "not supported".
_RECURRENT = "recurrent layers are not supported; vitamin runs Vision Transformers"
_POOL = ("pooling is not supported; vitamin runs Vision Transformers (classify from the CLS "
         "token)")
_HINTS = {
    "LSTM": _RECURRENT, "GRU": _RECURRENT, "RNN": _RECURRENT,
    "MaxPool": _POOL, "AveragePool": _POOL, "GlobalAveragePool": _POOL, "GlobalMaxPool": _POOL,
    "LpPool": _POOL,
    "BatchNormalization": "BatchNorm is not supported; fold it into the preceding layer before "
                          "export (LayerNormalization is supported)",
    "InstanceNormalization": "only LayerNormalization (over the last axis) is supported",
    "GroupNormalization": "only LayerNormalization (over the last axis) is supported",
    "ConvTranspose": "transposed convolutions are not supported; only the patch-embedding Conv "
                     "(kernel == stride) is",
    "Resize": "resizing is not supported; export the model at its input resolution",
    "Upsample": "resizing is not supported; export the model at its input resolution",
    "Loop": "control flow is not supported; export a static graph",
    "If": "control flow is not supported; export a static graph",
    "Scan": "control flow is not supported; export a static graph",
    "Sigmoid": "this activation is not supported; GELU and ReLU are",
    "HardSigmoid": "this activation is not supported; GELU and ReLU are",
    "HardSwish": "this activation is not supported; GELU and ReLU are",
    "LeakyRelu": "this activation is not supported; GELU and ReLU are",
    "Elu": "this activation is not supported; GELU and ReLU are",
    "Einsum": "Einsum is not supported; export attention with MatMul/Transpose or "
              "scaled_dot_product_attention",
    "LogSoftmax": "LogSoftmax is not supported; Softmax (last axis) is",
    "NonMaxSuppression": "detection post-processing is not supported",
}


# --------------------------------------------------------------------------------------------
# Reading, input shapes
# --------------------------------------------------------------------------------------------

def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _read(source) -> tuple[onnx.ModelProto, str]:
    if isinstance(source, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(source)
        return model, source.graph.name or "model"
    if not isinstance(source, (str, Path)):
        raise TypeError(f"load_onnx takes a path or an onnx.ModelProto, not {type(source)!r}")
    path = Path(source)
    if not path.exists():
        raise CompileError(f"cannot read ONNX model '{path}': no such file")
    if not path.is_file():
        raise CompileError(f"cannot read ONNX model '{path}': not a file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf DecodeError, OSError, ...
        raise CompileError(f"'{path}' is not a valid ONNX model: {_first_line(e)}") from None
    if model.ir_version == 0 or not model.graph.node or not model.opset_import:
        raise CompileError(f"'{path}' is not a valid ONNX model: no graph, IR version or opset")
    # External data: say which file is missing instead of a traceback from deep inside onnx.
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data
    missing = set()
    for t in onnx.external_data_helper._get_all_tensors(model):
        if uses_external_data(t):
            loc = ExternalDataInfo(t).location
            if not (path.parent / loc).is_file():
                missing.add(loc)
    if missing:
        raise CompileError(f"'{path}' keeps its weights in external data file(s) "
                           f"{', '.join(sorted(missing))}, not found next to it")
    try:
        onnx.external_data_helper.load_external_data_for_model(model, str(path.parent))
    except Exception as e:
        raise CompileError(f"cannot read the external data of '{path}': {_first_line(e)}") \
            from None
    return model, path.stem


def _default_opset(model) -> int:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return o.version
    raise CompileError("the model imports no version of the default ONNX opset")


def _graph_inputs(model):
    inits = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def _dims(vi) -> list:
    t = vi.type.tensor_type
    if not t.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
            for d in t.shape.dim]


def _fix_input_shapes(model, input_shapes):
    inputs = _graph_inputs(model)
    names = [i.name for i in inputs]
    given = dict(input_shapes or {})
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise CompileError(f"input_shapes names {', '.join(map(repr, unknown))}, not an input of "
                           f"the model; its inputs: {', '.join(map(repr, names))}")
    symbolic = []
    for vi in inputs:
        dims = _dims(vi)
        if vi.name in given:
            try:
                shape = tuple(int(d) for d in given[vi.name])
            except (TypeError, ValueError):
                raise CompileError(f"input shape of {vi.name!r} must be a sequence of ints, not "
                                   f"{given[vi.name]!r}") from None
            if dims is not None:
                if len(shape) != len(dims):
                    raise CompileError(f"input {vi.name!r} has rank {len(dims)} {dims}, but the "
                                       f"given shape {list(shape)} has rank {len(shape)}")
                for d, s in zip(dims, shape, strict=True):
                    if isinstance(d, int) and d > 0 and d != s:
                        raise CompileError(f"input {vi.name!r} has static shape {dims}; the given "
                                           f"shape {list(shape)} contradicts it")
            if any(s <= 0 for s in shape):
                raise CompileError(f"input shape of {vi.name!r} must be positive, not "
                                   f"{list(shape)}")
            t = vi.type.tensor_type
            t.ClearField("shape")
            for s in shape:
                t.shape.dim.add().dim_value = s
        elif dims is None or any(not isinstance(d, int) or d <= 0 for d in dims):
            symbolic.append((vi.name, dims))
    if symbolic:
        shown = "; ".join(f"{n!r}: {dims if dims is not None else 'unknown rank'}"
                          for n, dims in symbolic)
        fixed = {n: tuple(d if isinstance(d, int) and d > 0 else 1 for d in dims or ())
                 for n, dims in symbolic}
        flags = " ".join(f"--input-shape {n}={','.join(map(str, s)) or 'N,C,H,W'}"
                         for n, s in fixed.items())
        raise CompileError(f"the model has symbolic input dimensions ({shown}); vitamin compiles "
                           f"static shapes: pass {flags} (from Python: input_shapes={fixed})")
    # Shapes recorded for intermediate values and outputs may still be symbolic: recompute them.
    del model.graph.value_info[:]
    for o in model.graph.output:
        o.type.tensor_type.ClearField("shape")


# --------------------------------------------------------------------------------------------
# Constant folding (ONNX level)
# --------------------------------------------------------------------------------------------

def _attrs(node) -> dict:
    out = {}
    for a in node.attribute:
        v = helper.get_attribute_value(a)
        if isinstance(v, bytes):
            v = v.decode()
        out[a.name] = v
    return out


def _constant_value(node):
    a = _attrs(node)
    if "value" in a:
        return numpy_helper.to_array(a["value"])
    if "value_float" in a:
        return np.array(a["value_float"], dtype=np.float32)
    if "value_floats" in a:
        return np.array(a["value_floats"], dtype=np.float32)
    if "value_int" in a:
        return np.array(a["value_int"], dtype=np.int64)
    if "value_ints" in a:
        return np.array(a["value_ints"], dtype=np.int64)
    raise ValueError(f"Constant with attributes {sorted(a)}")


def onnx_slice(start: int, end: int, step: int, dim: int) -> slice:
    """ONNX Slice bounds (clamped, negative = from the end) as a Python slice of a ``dim`` axis."""
    if step == 0:
        raise ValueError("Slice step 0")
    if start < 0:
        start += dim
    if end < 0:
        end += dim
    if step > 0:
        start, end = min(max(start, 0), dim), min(max(end, 0), dim)
        return slice(start, end, step)
    start, end = min(max(start, 0), dim - 1), min(max(end, -1), dim - 1)
    return slice(start, None if end < 0 else end, step)


def _slice_params(node, ins, opset, rank):
    """(axes, starts, ends, steps) of a Slice with constant parameters."""
    if opset < 10:
        a = _attrs(node)
        starts, ends = list(a["starts"]), list(a["ends"])
        axes = list(a.get("axes", range(len(starts))))
        steps = [1] * len(starts)
    else:
        starts, ends = [int(v) for v in ins[1]], [int(v) for v in ins[2]]
        axes = [int(v) for v in ins[3]] if len(ins) > 3 and ins[3] is not None \
            else list(range(len(starts)))
        steps = [int(v) for v in ins[4]] if len(ins) > 4 and ins[4] is not None \
            else [1] * len(starts)
    axes = [a % rank for a in axes]
    return axes, starts, ends, steps


def _int_div(a, b):
    if np.issubdtype(np.result_type(a, b), np.integer):
        return np.trunc(np.true_divide(a, b)).astype(np.result_type(a, b))
    return np.divide(a, b)


def _fold_reshape(node, ins, opset):
    x, shape = ins[0], [int(s) for s in ins[1]]
    allowzero = _attrs(node).get("allowzero", 0)
    if not allowzero:
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return [x.reshape(shape)]


def _fold_unsqueeze(node, ins, opset):
    axes = _attrs(node)["axes"] if opset < 13 else [int(a) for a in ins[1]]
    return [np.expand_dims(ins[0], tuple(axes))]


def _fold_squeeze(node, ins, opset):
    if opset < 13:
        axes = _attrs(node).get("axes")
    else:
        axes = [int(a) for a in ins[1]] if len(ins) > 1 and ins[1] is not None else None
    return [np.squeeze(ins[0], axis=None if axes is None else tuple(axes))]


def _fold_slice(node, ins, opset):
    x = ins[0]
    sl = [slice(None)] * x.ndim
    for ax, s, e, st in zip(*_slice_params(node, ins, opset, x.ndim), strict=False):
        sl[ax] = onnx_slice(s, e, st, x.shape[ax])
    return [x[tuple(sl)]]


def _fold_cast(node, ins, opset):
    return [ins[0].astype(helper.tensor_dtype_to_np_dtype(_attrs(node)["to"]))]


def _fold_constant_of_shape(node, ins, opset):
    v = _attrs(node).get("value")
    v = numpy_helper.to_array(v) if v is not None else np.zeros(1, np.float32)
    return [np.full([int(d) for d in ins[0]], v.reshape(-1)[0], dtype=v.dtype)]


def _fold_expand(node, ins, opset):
    shape = np.broadcast_shapes(ins[0].shape, tuple(int(d) for d in ins[1]))
    return [np.broadcast_to(ins[0], shape).copy()]


def _fold_transpose(node, ins, opset):
    return [np.transpose(ins[0], _attrs(node).get("perm"))]


def _fold_gather(node, ins, opset):
    return [np.take(ins[0], ins[1], axis=_attrs(node).get("axis", 0))]


def _fold_concat(node, ins, opset):
    return [np.concatenate(ins, axis=_attrs(node)["axis"])]


def _fold_range(node, ins, opset):
    start, limit, delta = (np.asarray(v).reshape(()) for v in ins)
    return [np.arange(start, limit, delta, dtype=start.dtype)]


# NumPy folders for the ops TorchScript shape arithmetic is made of; other ops with constant
# inputs go through onnx.reference (slower, but complete).
_FOLDERS = {
    "Identity": lambda n, i, o: [i[0]],
    "Cast": _fold_cast,
    "Reshape": _fold_reshape,
    "Unsqueeze": _fold_unsqueeze,
    "Squeeze": _fold_squeeze,
    "Slice": _fold_slice,
    "Gather": _fold_gather,
    "Concat": _fold_concat,
    "ConstantOfShape": _fold_constant_of_shape,
    "Expand": _fold_expand,
    "Transpose": _fold_transpose,
    "Range": _fold_range,
    "Equal": lambda n, i, o: [np.equal(i[0], i[1])],
    "Where": lambda n, i, o: [np.where(i[0], i[1], i[2])],
    "Add": lambda n, i, o: [np.add(i[0], i[1])],
    "Sub": lambda n, i, o: [np.subtract(i[0], i[1])],
    "Mul": lambda n, i, o: [np.multiply(i[0], i[1])],
    "Div": lambda n, i, o: [_int_div(i[0], i[1])],
    "Neg": lambda n, i, o: [np.negative(i[0])],
    "Sqrt": lambda n, i, o: [np.sqrt(i[0])],
}

# Never evaluated at compile time, even with constant inputs.
_NO_FOLD = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
            "Multinomial", "Bernoulli", "Loop", "If", "Scan"}


def _reference_fold(node, ins, opset):
    from onnx.reference import ReferenceEvaluator
    ref = ReferenceEvaluator(node, opsets={"": opset})
    feeds = {name: v for name, v in zip(node.input, ins, strict=False) if name}
    return [np.asarray(v) for v in ref.run(None, feeds)]


def _try_fold(node, consts, shapes, opset):
    """Outputs of ``node`` if they are compile-time constants, else None."""
    if node.domain not in ("", "ai.onnx") or node.op_type in _NO_FOLD:
        return None
    op = node.op_type
    if op == "Constant":
        try:
            return [_constant_value(node)]
        except Exception:
            return None     # e.g. a sparse constant: reported as an unsupported node
    if op in ("Shape", "Size"):
        shape = shapes.get(node.input[0])
        if shape is None or any(d is None for d in shape):
            return None
        if op == "Size":
            return [np.array(math.prod(shape), dtype=np.int64)]
        a = _attrs(node)
        r = len(shape)
        start, end = a.get("start", 0), a.get("end", r)
        start = min(max(start + r if start < 0 else start, 0), r)
        end = min(max(end + r if end < 0 else end, 0), r)
        return [np.array(shape[start:end], dtype=np.int64)]
    names = [i for i in node.input if i]
    if not names or any(i not in consts for i in names):
        return None
    ins = [consts[i] if i else None for i in node.input]
    try:
        if op in _FOLDERS:
            return _FOLDERS[op](node, ins, opset)
        return _reference_fold(node, ins, opset)
    except Exception:
        return None     # left as a node: its handler (or the unsupported-op report) takes it


def _value_shapes(model) -> tuple[dict, dict]:
    shapes, types = {}, {}
    g = model.graph
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        t = vi.type.tensor_type
        if vi.type.HasField("tensor_type") and t.HasField("shape"):
            shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0
                                    else None for d in t.shape.dim)
        if vi.type.HasField("tensor_type") and t.elem_type:
            types[vi.name] = t.elem_type
    for init in g.initializer:
        shapes[init.name] = tuple(init.dims)
        types[init.name] = init.data_type
    return shapes, types


def _infer(model):
    try:
        return onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception as e:
        raise CompileError(f"ONNX shape inference failed: {_first_line(e)}") from None


def _fold(model, opset):
    """Fold constant subgraphs; returns (remaining nodes, constants, shapes, element types)."""
    consts = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    for _round in range(8):
        inferred = _infer(model)
        shapes, types = _value_shapes(inferred)
        for name, v in consts.items():
            shapes[name] = tuple(v.shape)
        keep, folded = [], False
        for node in model.graph.node:
            outs = _try_fold(node, consts, shapes, opset)
            if outs is None:
                keep.append(node)
                continue
            folded = True
            for name, v in zip(node.output, outs, strict=False):
                if name:
                    consts[name] = np.asarray(v)
                    shapes[name] = tuple(np.shape(v))
        pending = [o for n in keep for o in n.output
                   if o and (shapes.get(o) is None or None in shapes[o])]
        if not folded or not pending:
            return keep, consts, shapes, types
        # Folding resolved some shape inputs: infer again with the new constants.
        g = model.graph
        used = {i for n in keep for i in n.input} | {o.name for o in g.output}
        new_inits = [numpy_helper.from_array(np.asarray(v), name) for name, v in consts.items()
                     if name in used]
        model = helper.make_model(
            helper.make_graph(keep, g.name, list(_graph_inputs(model)), list(g.output),
                              new_inits),
            opset_imports=list(model.opset_import), ir_version=model.ir_version)
    return keep, consts, shapes, types


# --------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------

_INT_TYPES = {onnx.TensorProto.INT64, onnx.TensorProto.INT32, onnx.TensorProto.INT16,
              onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.UINT16,
              onnx.TensorProto.UINT32}
_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
                onnx.TensorProto.BFLOAT16}


class _Converter:
    """State of one conversion: the IR being built and what is known about ONNX values."""

    def __init__(self, opset, consts, shapes, types, outputs):
        self.opset = opset
        self.consts = consts
        self.shapes = shapes
        self.types = types
        self.graph_outputs = set(outputs)
        self.values: dict[str, Value] = {}
        self.nodes: list[Node] = []
        self.alias: dict[str, str] = {}
        self.node_name = ""
        self._taken = set(consts) | set(shapes)
        self.index: set[str] = set()     # integer run-time scalars (a multi-task model's task)

    # -- looking at ONNX values
    def name(self, v: str) -> str:
        while v in self.alias:
            v = self.alias[v]
        return v

    def const(self, v: str):
        """The constant behind ONNX value ``v`` (None for activations and absent inputs)."""
        if not v:
            return None
        return self.consts.get(self.name(v))

    def shape(self, v: str) -> tuple:
        v = self.name(v)
        if v in self.values:
            return self.values[v].shape
        s = self.shapes.get(v)
        if s is None or None in s:
            raise Unsupported(f"no static shape for {v!r} (shape inference gave {s})")
        return tuple(s)

    def rank(self, v: str) -> int:
        return len(self.shape(v))

    def attrs(self, node) -> dict:
        return _attrs(node)

    # -- building IR
    def fresh(self, base: str) -> str:
        name, i = base, 1
        while name in self._taken or name in self.values:
            name, i = f"{base}_{i}", i + 1
        self._taken.add(name)
        return name

    def inp(self, v: str) -> str:
        """IR value name for ONNX input ``v``; registers constants on first use."""
        v = self.name(v)
        if v in self.values:
            return v
        if v in self.consts:
            c = self.consts[v]
            self.values[v] = Value(v, tuple(c.shape), const=c, dtype=str(c.dtype))
            return v
        raise Unsupported(f"input {v!r} is neither a converted activation nor a constant")

    def add_const(self, base: str, array) -> str:
        array = np.asarray(array)
        name = self.fresh(base)
        self.values[name] = Value(name, tuple(array.shape), const=array, dtype=str(array.dtype))
        return name

    def emit(self, op: str, inputs: list, attrs: dict | None = None, *, out: str | None = None,
             shape: tuple | None = None) -> str:
        """Append an IR node; ``out`` is an ONNX output (shape inferred) or a fresh value."""
        if out is None:
            if shape is None:
                raise ValueError("a fresh value needs its shape")
            out = self.fresh(f"{self.node_name}/{op}")
            shape = tuple(int(d) for d in shape)
        else:
            shape = self.shape(out) if shape is None else tuple(shape)
        self.values[out] = Value(out, shape)
        self.nodes.append(Node(op, [self.inp(i) if i else "" for i in inputs], [out],
                               dict(attrs or {}), self.node_name))
        return out

    def identity(self, src: str, out: str):
        """``out`` is ``src``: alias it, or copy it when ``out`` is a graph output."""
        if out in self.graph_outputs:
            self.emit("reshape", [src], {"shape": self.shape(src)}, out=out)
        else:
            self.alias[out] = self.name(src)


def _unused(cx, names) -> bool:
    return all(not n or n not in cx.used for n in names)


# -- linear algebra -------------------------------------------------------------------------

@handler("MatMul")
def _h_matmul(cx, node):
    a, b = node.input
    y = node.output[0]
    ca, cb = cx.const(a), cx.const(b)
    if cb is not None:
        if cb.ndim != 2:
            raise Unsupported(f"MatMul with a constant operand of rank {cb.ndim}; weights must be "
                              f"2-D")
        if cx.rank(a) < 2:
            raise Unsupported("MatMul of a 1-D activation")
        cx.emit("linear", [a, b], out=y)
    elif ca is not None:
        # C @ X = (X^T @ C^T)^T; only for 2-D X, the only case a ViT could produce.
        if ca.ndim != 2 or cx.rank(b) != 2:
            raise Unsupported("MatMul with a constant left operand (only 2-D is supported)")
        k, n = cx.shape(b)
        xt = cx.emit("transpose", [b], {"perm": (1, 0)}, shape=(n, k))
        lt = cx.emit("linear", [xt, cx.add_const(f"{a}_T", ca.T)], shape=(n, ca.shape[0]))
        cx.emit("transpose", [lt], {"perm": (1, 0)}, out=y)
    else:
        if cx.rank(a) < 2 or cx.rank(b) < 2:
            raise Unsupported("MatMul of a 1-D activation")
        cx.emit("matmul", [a, b], out=y)


@handler("Gemm")
def _h_gemm(cx, node):
    at = cx.attrs(node)
    a, b = node.input[:2]
    c = node.input[2] if len(node.input) > 2 else ""
    y = node.output[0]
    wb = cx.const(b)
    if wb is None:
        raise Unsupported("Gemm with a computed B operand; weights must be constant")
    w = (wb.T if at.get("transB", 0) else wb) * np.float32(at.get("alpha", 1.0))
    w = w.astype(wb.dtype)
    x = a
    m = cx.shape(a)[1 if at.get("transA", 0) else 0]
    if at.get("transA", 0):
        x = cx.emit("transpose", [a], {"perm": (1, 0)}, shape=cx.shape(a)[::-1])
    n = w.shape[1]
    ins = [x, cx.add_const(f"{b}_gemm", w)]
    bias = cx.const(c)
    beta = at.get("beta", 1.0)
    if c and bias is None:
        lin = cx.emit("linear", ins, shape=(m, n))
        cb = lin
        if beta != 1.0:
            raise Unsupported("Gemm with a computed C operand and beta != 1")
        cx.emit("add", [cb, c], out=y)
        return
    if bias is not None:
        bias = (bias * np.float32(beta)).astype(bias.dtype)
        if bias.size == n and (bias.ndim == 1 or bias.shape[-1] == n):
            ins.append(cx.add_const(f"{c}_bias", bias.reshape(n)))
        else:   # a [M, N] or [M, 1] C: add it after the product
            lin = cx.emit("linear", ins, shape=(m, n))
            cx.emit("add", [lin, cx.add_const(f"{c}_C", bias)], out=y)
            return
    cx.emit("linear", ins, out=y)


@handler("Conv")
def _h_conv(cx, node):
    at = cx.attrs(node)
    x, w = node.input[:2]
    b = node.input[2] if len(node.input) > 2 else ""
    wc = cx.const(w)
    if wc is None:
        raise Unsupported("Conv with computed weights")
    if wc.ndim != 4:
        raise Unsupported(f"{wc.ndim - 2}-D Conv; only the 2-D patch embedding is supported")
    k = tuple(at.get("kernel_shape", wc.shape[2:]))
    strides = tuple(at.get("strides", (1, 1)))
    pads = tuple(at.get("pads", (0, 0, 0, 0)))
    dil = tuple(at.get("dilations", (1, 1)))
    group = at.get("group", 1)
    auto_pad = at.get("auto_pad", "NOTSET")
    if (k[0] != k[1] or strides != k or any(pads) or dil != (1, 1) or group != 1
            or auto_pad not in ("NOTSET", "VALID")):
        raise Unsupported(f"Conv with kernel {list(k)}, strides {list(strides)}, pads "
                          f"{list(pads)}, dilations {list(dil)}, group {group}: only patch "
                          f"embeddings (square kernel == stride, no padding, group 1) are "
                          f"supported")
    n, c, h, wd = cx.shape(x)
    if n != 1:
        raise Unsupported(f"batch {n}: vitamin compiles batch-1 models")
    kk = k[0]
    o = wc.shape[0]
    ph, pw = h // kk, wd // kk
    cols = cx.emit("im2col", [x], {"kernel": kk}, shape=(ph * pw, c * kk * kk))
    ins = [cols, cx.add_const(f"{w}_im2col", wc.reshape(o, c * kk * kk).T.copy())]
    bc = cx.const(b)
    if b and bc is None:
        raise Unsupported("Conv with a computed bias")
    if bc is not None:
        ins.append(cx.add_const(f"{b}_bias", bc.reshape(o)))
    lin = cx.emit("linear", ins, shape=(ph * pw, o))
    t = cx.emit("transpose", [lin], {"perm": (1, 0)}, shape=(o, ph * pw))
    cx.emit("reshape", [t], {"shape": (1, o, ph, pw)}, out=node.output[0])


# -- elementwise ----------------------------------------------------------------------------

@handler("Add", "Sub", "Mul", "Div")
def _h_binary(cx, node):
    cx.emit(node.op_type.lower(), list(node.input), out=node.output[0])


@handler("Erf", "Tanh", "Sqrt", "Reciprocal", "Relu")
def _h_unary(cx, node):
    cx.emit(node.op_type.lower(), [node.input[0]], out=node.output[0])


@handler("Pow")
def _h_pow(cx, node):
    if cx.const(node.input[1]) is None:
        raise Unsupported("Pow with a computed exponent")
    cx.emit("pow", list(node.input), out=node.output[0])


@handler("Gelu")
def _h_gelu(cx, node):
    approx = cx.attrs(node).get("approximate", "none")
    if approx not in ("none", "tanh"):
        raise Unsupported(f"Gelu approximate={approx!r}")
    cx.emit("gelu", [node.input[0]], {"approximate": approx}, out=node.output[0])


@handler("ReduceMean")
def _h_reduce_mean(cx, node):
    at = cx.attrs(node)
    r = cx.rank(node.input[0])
    if cx.opset < 18:
        axes = at.get("axes")
    else:
        axes = None
        if len(node.input) > 1 and node.input[1]:
            ax = cx.const(node.input[1])
            if ax is None:
                raise Unsupported("ReduceMean with computed axes")
            axes = [int(a) for a in ax.reshape(-1)]
        if not axes and at.get("noop_with_empty_axes", 0):
            cx.identity(node.input[0], node.output[0])
            return
    axes = tuple(sorted(a % r for a in (axes if axes else range(r))))
    cx.emit("reduce_mean", [node.input[0]], {"axes": axes, "keepdims": at.get("keepdims", 1)},
            out=node.output[0])


# -- normalisation, softmax -----------------------------------------------------------------

@handler("LayerNormalization")
def _h_layernorm(cx, node):
    at = cx.attrs(node)
    x = node.input[0]
    r = cx.rank(x)
    if at.get("axis", -1) % r != r - 1:
        raise Unsupported(f"LayerNormalization over axes {at.get('axis')}..{r - 1}; only the "
                          f"last axis is supported")
    if any(node.output[1:]) and not _unused(cx, node.output[1:]):
        raise Unsupported("LayerNormalization with its Mean/InvStdDev outputs in use")
    g = cx.const(node.input[1])
    if g is None:
        raise Unsupported("LayerNormalization with a computed scale")
    c = cx.shape(x)[-1]
    bname = node.input[2] if len(node.input) > 2 else ""
    b = cx.const(bname)
    if bname and b is None:
        raise Unsupported("LayerNormalization with a computed bias")
    def vector(name, v):        # the initializer itself when it already is a [C] vector
        return name if v.shape == (c,) else cx.add_const(name, np.broadcast_to(v, (c,)).copy())
    gamma = vector(node.input[1], g)
    beta = cx.add_const(f"{node.output[0]}_beta", np.zeros(c, g.dtype)) if b is None \
        else vector(bname, b)
    cx.emit("layernorm", [x, gamma, beta], {"eps": float(at.get("epsilon", 1e-5))},
            out=node.output[0])


@handler("Softmax")
def _h_softmax(cx, node):
    r = cx.rank(node.input[0])
    axis = cx.attrs(node).get("axis", -1 if cx.opset >= 13 else 1)
    if axis % r != r - 1:
        raise Unsupported(f"Softmax over axis {axis} of a rank-{r} tensor; only the last axis is "
                          f"supported")
    cx.emit("softmax", [node.input[0]], {"axis": -1}, out=node.output[0])


# -- data movement --------------------------------------------------------------------------

def _index_alias(cx, node) -> bool:
    """Shape ops on a task index (one integer) keep it an index: alias the output to it."""
    if cx.name(node.input[0]) in cx.index:
        if math.prod(cx.shape(node.output[0])) != 1:
            raise Unsupported(f"{node.op_type} of the integer input {cx.name(node.input[0])!r} to "
                              f"shape {list(cx.shape(node.output[0]))}; an integer input can only "
                              f"select a task (one index)")
        cx.alias[node.output[0]] = cx.name(node.input[0])
        return True
    return False


@handler("Reshape", "Flatten", "Squeeze", "Unsqueeze")
def _h_reshape(cx, node):
    if _index_alias(cx, node):
        return
    y = node.output[0]
    cx.emit("reshape", [node.input[0]], {"shape": cx.shape(y)}, out=y)


@handler("Identity", "Dropout")
def _h_identity(cx, node):
    if node.op_type == "Dropout" and len(node.output) > 1 and not _unused(cx, node.output[1:]):
        raise Unsupported("Dropout with its mask output in use")
    cx.identity(node.input[0], node.output[0])


@handler("Cast")
def _h_cast(cx, node):
    if _index_alias(cx, node):
        return
    to = cx.attrs(node)["to"]
    if to not in _FLOAT_TYPES or cx.types.get(cx.name(node.input[0])) not in _FLOAT_TYPES:
        raise Unsupported(f"Cast of an activation to {onnx.TensorProto.DataType.Name(to)}; "
                          f"only float activations are supported")
    cx.identity(node.input[0], node.output[0])


@handler("Transpose")
def _h_transpose(cx, node):
    r = cx.rank(node.input[0])
    perm = tuple(cx.attrs(node).get("perm", range(r - 1, -1, -1)))
    cx.emit("transpose", [node.input[0]], {"perm": perm}, out=node.output[0])


@handler("Concat")
def _h_concat(cx, node):
    r = cx.rank(node.output[0])
    cx.emit("concat", list(node.input), {"axis": cx.attrs(node)["axis"] % r}, out=node.output[0])


@handler("Slice")
def _h_slice(cx, node):
    x = node.input[0]
    shape = list(cx.shape(x))
    ins = [None] + [cx.const(i) for i in node.input[1:]]
    if any(v is None for v, name in zip(ins[1:], node.input[1:], strict=True) if name):
        raise Unsupported("Slice with computed bounds")
    steps = []
    for ax, s, e, st in zip(*_slice_params(node, ins, cx.opset, len(shape)), strict=False):
        if st <= 0:
            raise Unsupported(f"Slice with step {st}; only positive steps are supported")
        sl = onnx_slice(s, e, st, shape[ax])
        start, stop, step = sl.indices(shape[ax])
        if (start, stop, step) != (0, shape[ax], 1):
            steps.append((ax, start, stop, step))
    if not steps:
        cx.identity(x, node.output[0])
        return
    cur = x
    for i, (ax, start, stop, step) in enumerate(steps):
        shape[ax] = len(range(start, stop, step))
        last = i == len(steps) - 1
        cur = cx.emit("slice", [cur], {"axis": ax, "start": start, "stop": stop, "step": step},
                      out=node.output[0] if last else None, shape=None if last else shape)


@handler("Split")
def _h_split(cx, node):
    x = node.input[0]
    shape = cx.shape(x)
    at = cx.attrs(node)
    ax = at.get("axis", 0) % len(shape)
    if cx.opset >= 13 and len(node.input) > 1 and node.input[1]:
        sizes = cx.const(node.input[1])
        if sizes is None:
            raise Unsupported("Split with computed sizes")
        sizes = [int(s) for s in sizes]
    elif "split" in at:
        sizes = list(at["split"])
    else:
        parts = at.get("num_outputs", len(node.output))
        chunk = -(-shape[ax] // parts)
        sizes = [min(chunk, shape[ax] - i * chunk) for i in range(parts)]
    start = 0
    for out, size in zip(node.output, sizes, strict=False):
        if out:
            cx.emit("slice", [x], {"axis": ax, "start": start, "stop": start + size, "step": 1},
                    out=out)
        start += size


@handler("Gather")
def _h_gather(cx, node):
    data, idx = node.input
    ic = cx.const(idx)
    if cx.name(data) in cx.index:          # [task][0] as the dynamo exporter writes task
        if ic is None or math.prod(cx.shape(node.output[0])) != 1:
            raise Unsupported("Gather on the integer input with a computed index")
        cx.alias[node.output[0]] = cx.name(data)
        return
    if ic is None and cx.name(idx) in cx.index:
        table = cx.const(data)
        if table is None:
            raise Unsupported(f"Gather of an activation at the integer input "
                              f"{cx.name(idx)!r}; only constant tables (per-task weights) can "
                              f"be selected by the task")
        if cx.attrs(node).get("axis", 0) % table.ndim != 0:
            raise Unsupported("Gather of a per-task table along an axis other than 0")
        cx.emit("select", [data, cx.name(idx)], out=node.output[0])
        return
    if ic is None:
        raise Unsupported("Gather with a computed index (embedding lookup) is not supported")
    if ic.ndim > 1:
        raise Unsupported(f"Gather with a rank-{ic.ndim} index")
    r = cx.rank(data)
    ax = cx.attrs(node).get("axis", 0) % r
    dim = cx.shape(data)[ax]
    index = np.asarray(ic, dtype=np.int64) % dim
    cx.emit("gather", [data], {"axis": ax, "index": int(index) if index.ndim == 0 else index},
            out=node.output[0])


# -- mixture of experts ----------------------------------------------------------------------

@handler("TopK")
def _h_topk(cx, node):
    at = cx.attrs(node)
    x = node.input[0]
    r = cx.rank(x)
    if cx.opset < 10:
        k = at["k"]
    else:
        kc = cx.const(node.input[1])
        if kc is None:
            raise Unsupported("TopK with a computed k")
        k = int(np.asarray(kc).reshape(-1)[0])
    if at.get("axis", -1) % r != r - 1:
        raise Unsupported(f"TopK along axis {at.get('axis')}; only the last axis is supported")
    if not at.get("largest", 1):
        raise Unsupported("TopK with largest=0 (smallest values)")
    n = cx.shape(x)[-1]
    if not 1 <= k <= n:
        raise Unsupported(f"TopK with k = {k} but only {n} values (experts) along the axis")
    shape = tuple(cx.shape(x)[:-1]) + (k,)
    outs = []
    for o in node.output[:2]:
        name = o if o else cx.fresh(f"{cx.node_name}/topk")
        cx.values[name] = Value(name, shape)
        outs.append(name)
    cx.nodes.append(Node("topk", [cx.inp(x)], outs, {"k": k, "axis": -1}, cx.node_name))


@handler("ScatterElements")
def _h_scatter_elements(cx, node):
    at = cx.attrs(node)
    data = node.input[0]
    if at.get("reduction", "none") not in ("none", b"none"):
        raise Unsupported(f"ScatterElements with reduction {at.get('reduction')!r}")
    r = cx.rank(data)
    if at.get("axis", 0) % r != r - 1:
        raise Unsupported("ScatterElements along an axis other than the last")
    if cx.const(data) is None:
        raise Unsupported("ScatterElements into an activation; only a constant (zero) mask is "
                          "supported (the dense routing mask of a mixture of experts)")
    cx.emit("scatter_elements", [data, node.input[1], node.input[2]], {"axis": -1},
            out=node.output[0])


# -- attention ------------------------------------------------------------------------------

@handler("Attention")
def _h_attention(cx, node):
    at = cx.attrs(node)
    ins = list(node.input) + [""] * (6 - len(node.input))
    if any(ins[3:]):
        raise Unsupported("Attention with attn_mask, past key/value or nonpad lengths; only "
                          "unmasked self-attention (optionally causal) is supported")
    if any(node.output[1:]) and not _unused(cx, node.output[1:]):
        raise Unsupported("Attention with present key/value or qk outputs in use")
    if at.get("softcap", 0.0):
        raise Unsupported("Attention with softcap")
    q, k, v = ins[:3]
    y = node.output[0]
    if cx.rank(q) == 4:
        b, hq, tq, d = cx.shape(q)
        hk, dv = cx.shape(k)[1], cx.shape(v)[3]
        q4, k4, v4 = q, k, v
    elif cx.rank(q) == 3:
        hq, hk = at.get("q_num_heads"), at.get("kv_num_heads")
        if not hq or not hk:
            raise Unsupported("3-D Attention without q_num_heads/kv_num_heads")
        b, tq, _ = cx.shape(q)
        d = cx.shape(q)[2] // hq
        dv = cx.shape(v)[2] // hk

        def heads(x, h, dh):
            bb, t, _ = cx.shape(x)
            r = cx.emit("reshape", [x], {"shape": (bb, t, h, dh)}, shape=(bb, t, h, dh))
            return cx.emit("transpose", [r], {"perm": (0, 2, 1, 3)}, shape=(bb, h, t, dh))
        q4, k4, v4 = heads(q, hq, d), heads(k, hk, d), heads(v, hk, dv)
    else:
        raise Unsupported(f"Attention with rank-{cx.rank(q)} inputs")
    if hq != hk:
        raise Unsupported(f"grouped-query Attention ({hq} query heads, {hk} key/value heads)")
    scale = at.get("scale")
    attrs = {"scale": float(1 / math.sqrt(d) if scale is None else scale),
             "causal": bool(at.get("is_causal", 0))}
    if cx.rank(q) == 4:
        cx.emit("sdpa", [q4, k4, v4], attrs, out=y)
    else:
        o = cx.emit("sdpa", [q4, k4, v4], attrs, shape=(b, hq, tq, dv))
        t = cx.emit("transpose", [o], {"perm": (0, 2, 1, 3)}, shape=(b, tq, hq, dv))
        cx.emit("reshape", [t], {"shape": cx.shape(y)}, out=y)


# --------------------------------------------------------------------------------------------
# load_onnx
# --------------------------------------------------------------------------------------------

def _node_label(node, i) -> str:
    return node.name or f"{node.op_type}_{i}"


def load_onnx(path_or_model, input_shapes: dict | None = None) -> Graph:
    """Load an ONNX model as an IR :class:`~vitamin.compiler.ir.Graph`.

    Parameters
    ----------
    path_or_model : str, Path or onnx.ModelProto
        The model file (external data files are read from its folder) or a loaded model.
    input_shapes : dict, optional
        ``{input name: shape}`` for inputs with symbolic dimensions (e.g. a dynamic batch).

    Returns
    -------
    Graph
        Canonical IR ops and the primitive ops of :data:`PRIMITIVES`, in ONNX layout (batch
        dimension kept); :func:`vitamin.compiler.passes.run_pipeline` makes it canonical.

    Raises
    ------
    CompileError
        Missing or corrupt file (one line), symbolic input dimensions without ``input_shapes``,
        or every node the frontend cannot convert (one line each: name, op type, opset, why).
    """
    model, label = _read(path_or_model)
    opset = _default_opset(model)
    if model.functions:
        from onnx import inliner  # (`import onnx.inliner` would make `onnx` local here)
        model = inliner.inline_local_functions(model)
    _fix_input_shapes(model, input_shapes)
    nodes, consts, shapes, types = _fold(model, opset)

    inputs = _graph_inputs(model)
    outputs = [o.name for o in model.graph.output]
    cx = _Converter(opset, consts, shapes, types, outputs)
    cx.used = {i for n in nodes for i in n.input} | set(outputs)
    problems = []
    for vi in inputs:
        shape = tuple(shapes[vi.name])
        et = vi.type.tensor_type.elem_type
        if et in _INT_TYPES and math.prod(shape) == 1:
            cx.index.add(vi.name)          # a task index: only Gather on constants may use it
            cx.values[vi.name] = Value(vi.name, shape, dtype="int64")
            continue
        if et not in _FLOAT_TYPES:
            dtype = onnx.TensorProto.DataType.Name(et)
            problems.append(f"input {vi.name!r}: element type {dtype} of shape {list(shape)}; "
                            f"only float inputs and one integer scalar (a task index) are "
                            f"supported")
        cx.values[vi.name] = Value(vi.name, shape)

    for i, node in enumerate(nodes):
        label_i = _node_label(node, i)
        cx.node_name = label_i
        where = f"node {label_i!r} ({node.op_type}, opset {opset})"
        if node.domain not in ("", "ai.onnx"):
            problems.append(f"node {label_i!r} ({node.domain}.{node.op_type}): operators outside "
                            f"the default ONNX domain are not supported")
            continue
        fn = HANDLERS.get(node.op_type)
        reason = None
        if fn is None:
            reason = _HINTS.get(node.op_type, "not supported")
        else:
            start = len(cx.nodes)
            try:
                fn(cx, node)
            except Unsupported as e:
                del cx.nodes[start:]
                reason = str(e)
        if reason is not None:
            problems.append(f"{where}: {reason}")
            # Stand-ins with the inferred shapes let the later nodes be checked as well.
            for o in node.output:
                s = shapes.get(o)
                if o and s is not None and None not in s and o not in cx.values:
                    cx.values[o] = Value(o, tuple(s))
    for o in outputs:
        if cx.name(o) in consts and o not in cx.values:
            problems.append(f"output {o!r} is a constant; there is nothing to compute")
    if problems:
        raise CompileError(
            f"cannot compile {label!r} (ONNX opset {opset}): {len(problems)} "
            f"problem{'s' if len(problems) > 1 else ''}:\n  " + "\n  ".join(problems)
            + "\nsupported ONNX ops: " + ", ".join(supported_ops()))

    values = {k: v for k, v in cx.values.items()}
    return Graph(inputs=[vi.name for vi in inputs], outputs=outputs, values=values,
                 nodes=cx.nodes, name=label)
