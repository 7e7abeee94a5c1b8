"""The v2 cost model against the v2 RTL on the benchmark models (slow; ``make bench``).

Each model runs through :func:`vitamin.bench.bench_model` (the path ``make bench`` reports), whose
RTL runs are cached by :func:`vitamin.bench.rtl_counters`, so the report reuses these runs. The
requirement (issue 8): the estimate within 5 % of the RTL's cycles on every benchmark model.
Measured when this was written (model - RTL): M3ViT-tiny on zcu102 +169 cycles of 4.62 M (task
0) and +225 (task 1), DeiT-tiny on zcu102 +356 of 5.93 M, digits MoE on tiny +0.19 % (task 0) and
+0.18 % (task 1).
"""

from pathlib import Path

import numpy as np
import pytest

from vitamin import bench

ROOT = Path(__file__).resolve().parent.parent
#: The issue's requirement on every benchmark model.
TOL_MODELS = 0.05

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]


def _check(recs, n):
    assert len(recs) == n
    for r in recs:
        assert "error" not in r and "rtl_error" not in r, r
        assert r["cycles_source"] == "RTL"
        # the cost model counts the MACs and DRAM bytes the RTL's counters count
        assert r["macs"] == r["rtl_macs"]
        assert r["dram_read_bytes"] == r["rtl_dram_read_bytes"]
        assert abs(r["model_error"]) <= TOL_MODELS, (r["model"], r.get("task"),
                                                     r["model_cycles"], r["rtl_cycles"])
        # the decoupled RTL is faster than the sequential machine
        assert r["rtl_cycles"] < r["v1_cycles"]


def test_digits_moe_both_tasks():
    data = np.load(ROOT / "models" / "digits_data.npz")
    cal = [{"input": x[None], "task": np.array(i % 2)} for i, x in enumerate(data["x_cal"])]
    _check(bench.bench_model("digits_moe", ROOT / "models" / "digits_moe.onnx", "tiny", cal,
                             data["x_test"][:1], tasks=(0, 1), golden=False), 2)


def test_m3vit_tiny_zcu102_both_tasks(tmp_path):
    from vitamin.compiler.models import export_onnx, m3vit_tiny
    path = export_onnx(m3vit_tiny(), tmp_path / "m3vit_tiny.onnx", dynamo=False)
    x = np.random.default_rng(1).standard_normal((1, 3, 128, 256)).astype(np.float32)
    _check(bench.bench_model("m3vit_tiny", path, "zcu102", None, x, tasks=(0, 1),
                             golden=False), 2)


def test_deit_tiny_zcu102(tmp_path):
    from vitamin.compiler.models import deit_tiny, export_onnx
    path = export_onnx(deit_tiny(seed=0), tmp_path / "deit_tiny.onnx", dynamo=False)
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    _check(bench.bench_model("deit_tiny", path, "zcu102", None, x, golden=False), 1)
