"""ONNX models end to end: export (both PyTorch paths) -> compile -> golden model, compared with
onnxruntime; the shipped demo model's accuracy; and the command line's error paths."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import vitamin
from vitamin import api
from vitamin.compiler.models import deit_tiny, export_onnx, vit_micro

ROOT = Path(__file__).resolve().parent.parent


def _ort(path, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.astype(np.float32)})[0]


def _cos(a, b):
    a, b = np.ravel(a), np.ravel(b)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def micro_models(tmp_path_factory):
    d = tmp_path_factory.mktemp("micro")
    model = vit_micro(seed=3)
    return {dyn: export_onnx(model, d / f"micro_{'dynamo' if dyn else 'legacy'}.onnx", dynamo=dyn)
            for dyn in (False, True)}


@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
@pytest.mark.parametrize("preset", ["tiny", "ecp5"])
def test_vit_micro_golden_matches_onnxruntime(micro_models, dynamo, preset):
    path = micro_models[dynamo]
    rng = np.random.default_rng(0)
    cal = {"input": rng.standard_normal((8, 1, 3, 32, 32))}
    prog = vitamin.compile(path, preset, cal)
    for _ in range(3):
        x = rng.standard_normal((1, 3, 32, 32))
        ref = _ort(path, x)
        out = vitamin.run(prog, {"input": x})
        y = out.outputs[prog.outputs[0].name]
        assert _cos(y, ref) >= 0.999
        assert np.argmax(y) == np.argmax(ref)
        assert out.counters["sat_events"] == 0


@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
def test_deit_tiny_compiles_and_matches(tmp_path, dynamo):
    """DeiT-tiny (224x224, 197 tokens, 12 blocks, random weights) for zcu102: golden logits with
    cosine >= 0.99 against onnxruntime. (Its compile time is measured by `make bench`.)"""
    path = export_onnx(deit_tiny(seed=1), tmp_path / "deit.onnx", dynamo=dynamo)
    rng = np.random.default_rng(1)
    prog = vitamin.compile(path, "zcu102")
    x = rng.standard_normal((1, 3, 224, 224))
    out = vitamin.run(prog, {"input": x})
    ref = _ort(path, x)
    y = out.outputs[prog.outputs[0].name]
    assert _cos(y, ref) >= 0.99
    # every MAC of DeiT-tiny once: 12 blocks of qkv, attention, proj, MLP, plus patch embed, head
    t, d = 197, 192
    blocks = 12 * (t * d * 3 * d + 2 * 3 * t * t * 64 + t * d * d + 2 * t * d * 4 * d)
    assert out.counters["macs"] == blocks + 196 * 768 * d + d * 1000


def test_demo_model_accuracy():
    """The shipped digits ViT on the whole test split: top-1 agreement with onnxruntime >= 99%,
    accuracy within 1 point of float."""
    data = np.load(ROOT / "models" / "digits_data.npz")
    model = ROOT / "models" / "digits_vit.onnx"
    prog = vitamin.compile(model, "tiny", {"input": data["x_cal"]})
    # the per-layer quantisation report: every layer measured, no saturation, small errors
    qrep = prog.meta["quant_report"]
    assert len(qrep) == len(prog.meta["layers"])
    measured = [e for e in qrep if "rel_err" in e]
    assert len(measured) >= 30
    assert all(e["sat_events"] == 0 for e in qrep)
    assert max(e["rel_err"] for e in measured) < 0.05
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    agree = correct_f = correct_a = 0
    for x, y in zip(data["x_test"], data["y_test"]):
        ref = sess.run(None, {"input": x[None]})[0]
        out = vitamin.run(prog, {"input": x[None]}).outputs[prog.outputs[0].name]
        agree += int(np.argmax(ref) == np.argmax(out))
        correct_f += int(np.argmax(ref) == y)
        correct_a += int(np.argmax(out) == y)
    n = len(data["y_test"])
    assert agree / n >= 0.99
    assert abs(correct_a - correct_f) / n <= 0.01
    assert correct_f / n >= 0.9        # the model is a real classifier, not noise


# -- command line and bad input ------------------------------------------------------------------

def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "vitamin", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=600)


def test_cli_compile_run_compare_report(micro_models, tmp_path):
    prog = tmp_path / "m.vit"
    r = _cli("compile", str(micro_models[False]), "--config", "tiny", "-o", str(prog))
    assert r.returncode == 0, r.stderr
    assert "compiled" in r.stdout and prog.exists()
    r = _cli("run", str(prog), "--compare", str(micro_models[False]), "--json")
    assert r.returncode == 0, r.stderr
    import json
    rep = json.loads(r.stdout)
    assert rep["cosine"] >= 0.999 and rep["top1_agreement"] == 1.0
    assert rep["max_abs_err"] < 0.05
    assert rep["macs"] > 0 and "dram_read_bytes" in rep
    r = _cli("report", str(prog), "--html", str(tmp_path / "rep"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "rep" / "utilisation.png").stat().st_size > 1000
    assert "MAC utilisation" in r.stdout


def _assert_clean_error(r, *words):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    assert r.stderr.startswith("vitamin: error:")
    for w in words:
        assert w in r.stderr, (w, r.stderr)


def test_cli_corrupt_model(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage" * 10)
    _assert_clean_error(_cli("compile", str(bad), "--config", "tiny"), "bad.onnx")


def test_cli_unsupported_ops_listed_together(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    w = helper.make_tensor("W", TensorProto.FLOAT, [1, 32, 8], np.zeros(256).tolist())
    r_ = helper.make_tensor("R", TensorProto.FLOAT, [1, 32, 8], np.zeros(256).tolist())
    nodes = [helper.make_node("LSTM", ["x", "W", "R"], ["h"], name="my_lstm", hidden_size=8),
             helper.make_node("Hardmax", ["h"], ["y"], name="my_hardmax")]
    g = helper.make_graph(nodes, "g", [x], [y], initializer=[w, r_])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "lstm.onnx"
    onnx.save(m, path)
    r = _cli("compile", str(path), "--config", "tiny")
    _assert_clean_error(r, "my_lstm", "LSTM", "my_hardmax", "Hardmax", "17")


def test_cli_model_too_large(tmp_path):
    path = export_onnx(deit_tiny(seed=0), tmp_path / "deit.onnx", dynamo=False)
    _assert_clean_error(_cli("compile", str(path), "--config", "tiny"),
                        "too large for the configuration")


def test_cli_missing_input(micro_models, tmp_path):
    prog = tmp_path / "m.vit"
    assert _cli("compile", str(micro_models[False]), "--config", "tiny", "-o",
                str(prog)).returncode == 0
    np.savez(tmp_path / "in.npz", wrong_name=np.zeros((1, 3, 32, 32)))
    _assert_clean_error(_cli("run", str(prog), "--input", str(tmp_path / "in.npz")),
                        "missing input", "input")


def test_api_rejects_bad_inputs(micro_models):
    prog = vitamin.compile(micro_models[False], "tiny")
    with pytest.raises(ValueError, match="shape"):
        api.quantize_inputs(prog, {"input": np.zeros((1, 3, 16, 16))})
    with pytest.raises(ValueError, match="non-finite"):
        api.quantize_inputs(prog, {"input": np.full((1, 3, 32, 32), np.nan)})
    with pytest.raises(ValueError, match="unknown backend"):
        vitamin.run(prog, {"input": np.zeros((1, 3, 32, 32))}, backend="fpga")


def test_rtl_backend_bit_exact_on_compiled_vit(micro_models):
    """A compiled ViT (both export paths' graphs are the same after the passes; legacy here) on
    the Verilated accelerator: outputs and counters bit-identical with the golden model."""
    from vitamin.golden.isasim import run_program
    from vitamin.sim.rtl_backend import run_many
    prog = vitamin.compile(micro_models[False], "tiny")
    rng = np.random.default_rng(7)
    ins = [api.quantize_inputs(prog, {"input": rng.standard_normal((1, 3, 32, 32))})
           for _ in range(2)]
    for q, (rres, raw) in zip(ins, run_many(prog, ins)):
        gres, graw = run_program(prog, q)
        assert rres.ok and gres.ok
        np.testing.assert_array_equal(rres.dram, gres.dram)
        for name in graw:
            np.testing.assert_array_equal(raw[name], graw[name])
        for key in ("instructions", "macs", "dram_read_bytes", "dram_write_bytes",
                    "sat_events", "skipped"):
            assert rres.counters[key] == gres.counters[key], key
        assert rres.counters["cycles"] > 0
