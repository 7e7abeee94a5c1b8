"""The benchmark report's generators (vitamin/bench.py): the README table between the bench
markers, the markdown report, the sparse-attention hook, the roofline points and the RTL cache
key. The measured figures themselves come from ``make bench``."""

import json

import pytest

from vitamin import bench


def _rec(model, config, cycles, macs, task=None, rtl=True):
    from vitamin.config import get_config
    cfg = get_config(config)
    r = {"model": model, "config": config, "task": task, "clock_mhz": cfg.clock_mhz,
         "macs_per_cycle": cfg.macs, "compile_s": 1.5, "instructions": 10, "macs": macs,
         "model_cycles": cycles + 50, "v1_cycles": 2 * cycles, "dram_read_bytes": 3_000_000,
         "dram_write_bytes": 1000, "layers": [
             {"name": "blk0.fc1", "op": "linear", "cycles": cycles // 2, "macs_executed": macs,
              "dram_bytes": 1000, "utilisation": 0.5},
             {"name": "blk0.ln", "op": "layernorm", "cycles": cycles // 2, "macs_executed": 0,
              "dram_bytes": 0, "utilisation": 0.0}]}
    if rtl:
        r.update(rtl_cycles=cycles, model_error=50 / cycles, rtl_wall_s=2.0,
                 rtl_cycles_per_s=cycles / 2.0)
    r["cycles"] = cycles
    r["cycles_source"] = "RTL" if rtl else "cost model"
    r["utilisation"] = macs / (cfg.macs * cycles)
    r["latency_ms"] = cycles / (cfg.clock_mhz * 1e3)
    return r


RECS = [_rec("m3vit_tiny", "zcu102", 4_000_000, 782_700_000, task=0),
        _rec("deit_tiny", "ecp5", 12_000_000, 1_250_000_000, rtl=False),
        {"model": "big", "config": "tiny", "error": "does not fit"}]


def test_readme_table_is_generated_from_the_records():
    table = bench.readme_table(RECS)
    rows = table.splitlines()
    assert len(rows) == 2 + len(RECS)
    m3 = rows[2]
    assert "m3vit_tiny (task 0)" in m3 and "4,000,000" in m3 and "RTL" in m3
    util = 782_700_000 / (256 * 4_000_000)
    assert f"{100 * util:.1f} %" in m3
    assert f"{10.4e6 / 4e6:.2f}x fewer cycles" in m3          # vs Edge-MoE's 10.4 M cycles
    assert f"{100 * 50 / 4e6:+.2f} %" in m3                    # cost model vs RTL
    assert "cost model" in rows[3] and "12,000,000" in rows[3]
    assert "does not compile" in rows[4]


def test_update_readme_replaces_only_between_markers(tmp_path):
    p = tmp_path / "README.md"
    p.write_text(f"# x\nbefore\n{bench.README_BEGIN}\nold table\n{bench.README_END}\nafter\n")
    assert bench.update_readme("NEW TABLE", p, stamp=" on today")
    text = p.read_text()
    assert text.startswith("# x\nbefore\n") and text.endswith("after\n")
    assert "old table" not in text and "NEW TABLE" in text and "on today" in text
    assert text.count(bench.README_BEGIN) == text.count(bench.README_END) == 1
    # idempotent: a second update leaves one table
    assert bench.update_readme("NEWER", p)
    assert "NEW TABLE" not in p.read_text() and p.read_text().count("NEWER") == 1
    q = tmp_path / "nomarkers.md"
    q.write_text("no markers\n")
    assert not bench.update_readme("T", q) and q.read_text() == "no markers\n"


def test_repository_readme_has_the_markers():
    text = bench.README.read_text()
    assert text.count(bench.README_BEGIN) == 1 and text.count(bench.README_END) == 1
    assert text.index(bench.README_BEGIN) < text.index(bench.README_END)


def test_markdown_report_and_sparse_hook():
    assert bench.sparse_attention_section([]) == []
    rows = [{"pattern": "dense", "seq_len": 1024, "config": "zcu102", "cycles": 1000,
             "dram_bytes": 2000, "ratio_vs_dense": 1.0},
            {"pattern": "dhsa", "seq_len": 1024, "config": "zcu102", "cycles": 500,
             "dram_bytes": 900, "ratio_vs_dense": 0.5}]
    sec = bench.sparse_attention_section(rows)
    assert sec[0] == "## Sparse attention" and sum(ln.startswith("| dhsa") for ln in sec) == 1
    assert "0.50x" in sec[-2]
    meta = {"cpu": "cpu", "cpu_count": 2, "machine": "m", "python": "3", "date": "d"}
    md = "\n".join(bench.markdown(meta, RECS, [], sec))
    assert "M3ViT-tiny on zcu102 vs Edge-MoE" in md and "## Sparse attention" in md
    assert f"worst {100 * 50 / 4e6:.2f} %" in md


def test_roofline_points():
    r = RECS[0]
    (pt,) = bench.roofline_points(r)          # the layer without MACs is left out
    lay = r["layers"][0]
    assert pt[0] == pytest.approx(2 * lay["macs_executed"] / lay["dram_bytes"])
    assert pt[1] == pytest.approx(2 * lay["macs_executed"] / (lay["cycles"] / 300e6) / 1e9)


def test_plots_are_written(tmp_path):
    assert bench.plot_layers(RECS[:1], tmp_path / "l.png").stat().st_size > 1000
    assert bench.plot_roofline(RECS[:2], tmp_path / "r.png").stat().st_size > 1000


def test_rtl_cache_is_used(tmp_path, monkeypatch):
    """A cached run is returned without simulating; the key covers the image and registers."""
    from vitamin import get_config
    from vitamin.sim.workloads import long_matmul
    monkeypatch.setattr(bench, "RTL_CACHE", tmp_path)
    prog, ins = long_matmul(get_config("tiny"))
    calls = []

    class FakeSim:
        build_seconds = 0.0
        build_dir = tmp_path / "build"
        issue = "v2"
        dram_bytes = 1 << 20

        def run(self, jobs):
            calls.append(jobs)
            return [{"status": 0, "counters": {"cycles": 123}, "wall_s": 0.5}]

    monkeypatch.setattr("vitamin.sim.simtop.build", lambda *a, **k: FakeSim())
    a = bench.rtl_counters(prog, ins)
    b = bench.rtl_counters(prog, ins)
    assert not a["cached"] and b["cached"] and len(calls) == 1
    assert b["counters"]["cycles"] == 123
    assert len(list(tmp_path.glob("*.json"))) == 1
    # another Verilog (the gateware changed): another run
    FakeSim.build_dir.mkdir()
    (FakeSim.build_dir / "built.json").write_text(json.dumps({"verilog_hash": "abc"}))
    assert not bench.rtl_counters(prog, ins)["cached"] and len(calls) == 2
    bench.rtl_counters(prog, ins, regs={1: 5})          # other registers: another run
    assert len(calls) == 3
    json.loads(next(tmp_path.glob("*.json")).read_text())
