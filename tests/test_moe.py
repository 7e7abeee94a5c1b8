"""Mixture of experts end to end: M3ViT-style ONNX (both exporters) -> routed program; golden
model vs onnxruntime for both tasks, skipped experts, traffic accounting, RTL bit-exact, errors."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import vitamin
from vitamin.api import compare, quantize_inputs, task_regs
from vitamin.compiler import frontend, models, passes
from vitamin.compiler.cost import estimate, profile_program
from vitamin.compiler.ir import CompileError
from vitamin.compiler.moe import moe_summary
from vitamin.golden.isasim import check_tokens, run_program
from vitamin.isa import Opcode

ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    d = tmp_path_factory.mktemp("moe")
    m = models.m3vit_micro()
    return {dyn: models.export_onnx(m, d / f"micro_{int(dyn)}.onnx", dynamo=dyn)
            for dyn in (False, True)}


@pytest.fixture(scope="module")
def prog_tiny(micro):
    return vitamin.compile(micro[False], "tiny")


def _x(seed):
    return np.random.default_rng(seed).standard_normal((1, 3, 16, 32)).astype(np.float32)


def _ref(path, x, task):
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(None, {"input": x, "task": np.array(task, dtype=np.int64)})[0]


@pytest.mark.parametrize("dynamo", [False, True])
def test_frontend_fuses_one_moe_node(micro, dynamo):
    g = passes.run_pipeline(frontend.load_onnx(micro[dynamo]))
    ops = [n.op for n in g.nodes]
    assert ops.count("moe") == 1
    assert not {"topk", "scatter_elements", "select", "matmul"} & set(ops)
    moe = next(n for n in g.nodes if n.op == "moe")
    assert moe.attrs == {"k": 2, "n_experts": 4, "act": "gelu"}
    x = _x(3)
    for task in (0, 1):
        got = passes.evaluate_graph(g, {"input": x, "task": np.array(task)})
        ref = _ref(micro[dynamo], x, task)
        np.testing.assert_allclose(list(got.values())[0].reshape(ref.shape), ref, atol=2e-5)


@pytest.mark.parametrize("config", ["tiny", "zcu102"])
@pytest.mark.parametrize("dynamo", [False, True])
def test_both_tasks_match_onnxruntime(micro, config, dynamo):
    prog = vitamin.compile(micro[dynamo], config)
    assert prog.meta["task"] == {"input": "task", "register": 1, "tasks": 2}
    for seed in (1, 2):
        x = _x(seed)
        for task in (0, 1):
            out = vitamin.run(prog, {"input": x}, task=task)
            cos = compare(out.outputs, {"logits": _ref(micro[dynamo], x, task)})["logits"]
            assert cos["cosine"] >= 0.99, (seed, task, cos)


def test_task_switches_gate_weights_only(prog_tiny):
    """One program: the task changes a register, which offsets the gate (and head) loads."""
    x = _x(1)
    outs = [vitamin.run(prog_tiny, {"input": x}, task=t).outputs["logits"] for t in (0, 1)]
    assert not np.array_equal(outs[0], outs[1])
    # the task may also come as the model's task input
    same = vitamin.run(prog_tiny, {"input": x, "task": np.array(1)}).outputs["logits"]
    np.testing.assert_array_equal(same, outs[1])
    from vitamin.golden.isasim import decode_program
    instrs = decode_program(prog_tiny.dram_image(), prog_tiny.n_instr)
    blk = [f for op, f in instrs if op == Opcode.LOAD and f["blk_reg"]]
    assert blk and all(f["blk_reg"] == 1 and f["blk_stride"] > 0 for f in blk)


def test_task_errors(prog_tiny):
    with pytest.raises(ValueError, match="task 2 out of range"):
        vitamin.run(prog_tiny, {"input": _x(1)}, task=2)
    with pytest.raises(ValueError, match="multi-task"):
        vitamin.run(prog_tiny, {"input": _x(1)})
    with pytest.raises(ValueError, match="task -1 out of range"):
        vitamin.run(prog_tiny, {"input": _x(1), "task": np.array(-1)})


def _profile(prog, x, task):
    ins, regs = task_regs(prog, {"input": x}, task)
    q = quantize_inputs(prog, ins)
    return q, regs, profile_program(prog, q, regs)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_expert_traffic_is_what_routing_predicts(prog_tiny, seed):
    """Counter check: the DRAM bytes read equal the static loads plus, per MoE layer, the
    weights of exactly the experts that received tokens; experts without tokens are skipped."""
    x = _x(seed)
    for task in (0, 1):
        q, regs, prof = _profile(prog_tiny, x, task)
        res, _ = run_program(prog_tiny, q, regs=regs)
        res.check()
        (m,) = moe_summary(prog_tiny, prof)
        assert sum(e["tokens"] for e in m["experts"]) == m["tokens"] * m["k"]
        assert m["expert_weight_bytes_read"] == m["expected_expert_weight_bytes"]
        meta = prog_tiny.meta["moe"][0]
        idle = [e for e in m["experts"] if e["tokens"] == 0]
        for e in idle:
            assert e["bytes_read"] == 0
            assert set(meta["experts"][e["expert"]]["load_pcs"]) <= prof.skipped
        all_experts = sum(e["weight_bytes"] for e in meta["experts"])
        static = res.counters["dram_read_bytes"] - m["expert_weight_bytes_read"]
        # the same program with every expert active reads the static part plus all experts
        assert static + all_experts - sum(meta["experts"][e["expert"]]["weight_bytes"]
                                          for e in idle) == res.counters["dram_read_bytes"]
        assert m["naive_per_token_weight_bytes"] > m["expert_weight_bytes_read"]


def test_some_expert_is_skipped_on_some_input(prog_tiny):
    skipped = 0
    for seed in range(1, 6):
        for task in (0, 1):
            _, _, prof = _profile(prog_tiny, _x(seed), task)
            skipped += moe_summary(prog_tiny, prof)[0]["active_experts"] < 4
    assert skipped > 0


def test_tokens_protocol_and_cost_model(prog_tiny):
    from vitamin.golden.isasim import decode_program
    check_tokens(decode_program(prog_tiny.dram_image(), prog_tiny.n_instr), prog_tiny.config)
    _, _, prof = _profile(prog_tiny, _x(1), 0)
    est = estimate(prog_tiny, prof)
    lay = next(la for la in est.layers if la["op"] == "moe")
    assert lay["cycles"] > 0 and lay["macs_executed"] > 0


def test_rtl_bit_exact_both_tasks(prog_tiny):
    """The Verilated accelerator and the golden model agree bit for bit, for both tasks."""
    pytest.importorskip("cocotb")
    x = _x(4)
    for task in (0, 1):
        gold = vitamin.run(prog_tiny, {"input": x}, task=task)
        rtl = vitamin.run(prog_tiny, {"input": x}, backend="rtl", task=task)
        for name in gold.raw:
            np.testing.assert_array_equal(rtl.raw[name], gold.raw[name])
        for c in ("dram_read_bytes", "skipped", "macs"):
            assert rtl.counters[c] == gold.counters[c], c


# -- bad input --------------------------------------------------------------------------------

def _moe_graph(k=2, experts=4, mask_from_const_gate=False, break_pattern=None):
    """A hand-written MoE layer in ONNX (one task, constant gate)."""
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    t, d, h = 5, 8, 8
    inits = [numpy_helper.from_array(rng.standard_normal((d, experts)).astype(np.float32), "G"),
             numpy_helper.from_array(np.zeros((t, experts), np.float32), "Z"),
             numpy_helper.from_array(np.array([k], np.int64), "K")]
    nodes = [helper.make_node("MatMul", ["x", "G"], ["l"], name="gate"),
             helper.make_node("Softmax", ["l"], ["p"], axis=-1, name="sm"),
             helper.make_node("TopK", ["p", "K"], ["v", "i"], axis=-1, name="topk"),
             helper.make_node("ScatterElements", ["Z", "i", "v"], ["mask"], axis=-1,
                              name="scatter")]
    terms = []
    for e in range(experts):
        for n, shp in ((f"W1_{e}", (d, h)), (f"W2_{e}", (h, d))):
            inits.append(numpy_helper.from_array(
                (rng.standard_normal(shp) / 3).astype(np.float32), n))
        for name, c in ((f"s{e}", [e]), (f"e{e}", [e + 1]), (f"ax{e}", [1])):
            inits.append(numpy_helper.from_array(np.array(c, np.int64), name))
        act = "Relu" if break_pattern != "act" else "Sigmoid"
        nodes += [helper.make_node("MatMul", ["x", f"W1_{e}"], [f"h{e}"]),
                  helper.make_node(act, [f"h{e}"], [f"a{e}"]),
                  helper.make_node("MatMul", [f"a{e}", f"W2_{e}"], [f"y{e}"]),
                  helper.make_node("Slice", ["mask", f"s{e}", f"e{e}", f"ax{e}"], [f"m{e}"]),
                  helper.make_node("Mul", [f"y{e}", f"m{e}"], [f"t{e}"])]
        terms.append(f"t{e}")
    acc = terms[0]
    for e in range(1, experts if break_pattern != "missing_term" else experts - 1):
        nodes.append(helper.make_node("Add", [acc, terms[e]], [f"sum{e}"]))
        acc = f"sum{e}"
    nodes.append(helper.make_node("Identity", [acc], ["out"]))
    g = helper.make_graph(nodes, "moe", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                       [t, d])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, [t, d])],
                          inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_handwritten_single_task_moe_compiles_and_matches():
    model = _moe_graph()
    prog = vitamin.compile(model, "tiny")
    assert "task" not in prog.meta
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(5).standard_normal((5, 8)).astype(np.float32)
    out = vitamin.run(prog, {"x": x})
    ref = s.run(None, {"x": x})[0]
    assert compare(out.outputs, {"out": ref})["out"]["cosine"] >= 0.99


def test_topk_larger_than_experts_names_the_node():
    model = _moe_graph(k=5)
    with pytest.raises(CompileError, match=r"'topk'.*k = 5 but only 4"):
        vitamin.compile(model, "tiny")


def test_more_experts_than_queues_names_the_node():
    from dataclasses import replace

    from vitamin.config import get_config
    cfg = replace(get_config("tiny"), max_experts=2)
    with pytest.raises(CompileError, match=r"moe.*4 experts, more than the configuration's 2"):
        vitamin.compile(_moe_graph(), cfg)


@pytest.mark.parametrize("brk, msg", [("act", "Sigmoid"),
                                       ("missing_term", "mixture-of-experts gate that does not "
                                                        "match the pattern")])
def test_gate_not_matching_the_pattern_names_the_node(brk, msg):
    with pytest.raises(CompileError, match=msg):
        vitamin.compile(_moe_graph(break_pattern=brk), "tiny")


def test_exported_model_declares_task_input(micro):
    m = onnx.load(str(micro[False]))
    names = {i.name: i.type.tensor_type.elem_type for i in m.graph.input}
    assert names["task"] == onnx.TensorProto.INT64


# -- the shipped two-task demo model and M3ViT-tiny ---------------------------------------------

ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent


def test_moe_demo_model_both_tasks():
    """models/digits_moe.onnx, one program for both tasks, on 150 test images per task:
    accuracy within 2 points of float, top-1 agreement >= 97%, RTL bit-exact on one image per
    task, patch reordering reads fewer expert bytes than fetching per token."""
    from vitamin.demo import moe_demo
    data = np.load(ROOT / "models" / "digits_data.npz")
    summary, ok = moe_demo("tiny", data["x_test"][:150], data["y_test"][:150], data["x_cal"], 1,
                           __import__("pathlib").Path(
                               __import__("tempfile").mkdtemp(prefix="moe_demo")))
    assert ok
    assert summary["rtl"]["bit_exact"]
    for name, t in summary["tasks"].items():
        assert t["top1_agreement"] >= 0.97, name
        assert abs(t["accelerator_accuracy"] - t["float_accuracy"]) <= 0.02, name
        assert t["float_accuracy"] >= 0.85, name      # a real classifier for each task
        assert abs(sum(t["expert_token_share"]) - 1) < 0.01
        assert t["naive_per_token_bytes_per_image"] > 2 * t["expert_weight_bytes_per_image"]


@pytest.mark.slow
def test_m3vit_tiny_zcu102_both_tasks(tmp_path):
    """M3ViT-tiny (Edge-MoE's model) on zcu102: cosine of the 129 x 192 output >= 0.99 for both
    tasks; every MoE layer reads exactly the weights of the experts its routing chose."""
    path = models.export_onnx(models.m3vit_tiny(), tmp_path / "m3vit_tiny.onnx", dynamo=False)
    prog = vitamin.compile(path, "zcu102")
    x = np.random.default_rng(1).standard_normal((1, 3, 128, 256)).astype(np.float32)
    for task in (0, 1):
        out = vitamin.run(prog, {"input": x}, task=task)
        ref = _ref(path, x, task)
        assert ref.shape == (1, 129, 192)
        assert compare(out.outputs, {"logits": ref})["logits"]["cosine"] >= 0.99
        _, _, prof = _profile(prog, x, task)
        layers = moe_summary(prog, prof)
        assert len(layers) == 6
        for m in layers:
            assert m["expert_weight_bytes_read"] == m["expected_expert_weight_bytes"]
