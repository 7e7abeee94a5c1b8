"""Sparse-attention sweep for ``make bench``: dense causal vs block top-k vs DHSA over sequence
length, on one configuration (DHSA chunks: ``T / 64`` chunk starts drawn at random, at least 16
tokens each, sink and recent windows of one block).

For each sequence length and mode it compiles the ONNX graph of :mod:`vitamin.compiler.
sparse_models`, runs it on the golden model (DRAM bytes from the counters, the data-dependent
schedule from one profile), estimates cycles with the cost model, and measures accuracy:
the output against onnxruntime running the SAME sparse graph, and against dense causal attention
(relative error, and the fraction of each row's dense attention mass the mask keeps).

``python -m vitamin.sparse_bench [--config zcu102] [--lengths 1024 2048 4096]`` prints a table
and writes ``bench/results/sparse.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

__all__ = ["sweep", "main"]


def _mass_kept(q, k, heads, kv_heads, mask):
    """Per row, the dense causal attention probability mass that ``mask`` keeps (min, mean)."""
    q = np.asarray(q, np.float64).reshape(q.shape[-2], -1)
    k = np.asarray(k, np.float64).reshape(k.shape[-2], -1)
    t = q.shape[0]
    d = q.shape[1] // heads
    causal = np.tril(np.ones((t, t), bool))
    kept = []
    for h in range(heads):
        g = h // (heads // kv_heads)
        s = q[:, h * d:(h + 1) * d] @ k[:, g * d:(g + 1) * d].T / np.sqrt(d)
        s = np.where(causal, s, -np.inf)
        p = np.exp(s - s.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        kept.append((p * mask).sum(1))
    kept = np.concatenate(kept)
    return float(kept.min()), float(kept.mean())


def sweep(config="zcu102", lengths=(1024, 2048, 4096), heads=2, kv_heads=1, d=64, block=128,
          budget=1024, seed=0, progress=print) -> list:
    """One dict per (length, mode): cycles (cost model, v2 and v1), DRAM bytes, MACs,
    accuracy. Ratios to dense causal at the same length are added."""
    import onnxruntime as ort

    import vitamin
    from vitamin.api import compare, quantize_inputs
    from vitamin.compiler import sparse
    from vitamin.compiler import sparse_models as sm
    from vitamin.compiler.cost import estimate, profile_program

    rows = []
    for t in lengths:
        rng = np.random.default_rng(seed)
        x = {n: rng.standard_normal((1, t, c)).astype(np.float32)
             for n, c in (("q", heads * d), ("k", kv_heads * d), ("v", kv_heads * d))}
        dense_out = None
        n_chunks = t // 64
        bnd = sm.dhsa_boundaries(t, n_chunks, seed=seed, min_len=16)
        models = {"dense_causal": sm.dense_causal(t, heads, kv_heads, d),
                  "block_topk": sm.block_topk(t, heads, kv_heads, d, block,
                                              topk=max(2, budget // block)),
                  "dhsa": sm.dhsa(t, heads, kv_heads, d, n_chunks, block, budget,
                                  sink=block, recent=block)}
        for mode, m in models.items():
            t0 = time.time()
            prog = vitamin.compile(m, config, block=block)
            t_compile = time.time() - t0
            kern = sparse.recognize(m, block=block)
            feeds = dict(x)
            ref_model = m
            if mode == "dhsa":      # onnxruntime runs the expansion with the DHSA mask
                ref_model = sm.dhsa_expanded(m)
                feeds["mask"] = kern.mask_for(x["q"], x["k"], bnd)
            sess = ort.InferenceSession(ref_model.SerializeToString(),
                                        providers=["CPUExecutionProvider"])
            t0 = time.time()
            ref = sess.run(None, feeds)[0]
            t_ort = time.time() - t0
            run_in = dict(x, boundaries=bnd) if mode == "dhsa" else x
            t0 = time.time()
            out = vitamin.run(prog, run_in)
            t_gold = time.time() - t0
            prof = profile_program(prog, quantize_inputs(prog, run_in))
            est2 = estimate(prog, prof, machine="v2")
            est1 = estimate(prog, prof, machine="v1")
            row = {"t": t, "mode": mode, "config": prog.config.name, "heads": heads,
                   "kv_heads": kv_heads, "head_dim": d, "block": block,
                   "budget": budget if mode != "dense_causal" else None,
                   "cycles_v2_estimate": est2.cycles, "cycles_v1_exact": est1.cycles,
                   "macs": int(out.counters["macs"]),
                   "dram_read_bytes": int(out.counters["dram_read_bytes"]),
                   "dram_write_bytes": int(out.counters["dram_write_bytes"]),
                   "cosine_vs_onnxruntime_same_graph": compare(out.outputs, {"o": ref})["o"][
                       "cosine"],
                   "compile_s": t_compile, "golden_s": t_gold, "onnxruntime_s": t_ort}
            y = out.outputs["o"].reshape(t, -1)
            if mode == "dense_causal":
                dense_out = y
            else:
                mask = kern.mask_for(x["q"], x["k"], bnd)
                row["rel_err_vs_dense"] = float(np.linalg.norm(y - dense_out)
                                                / np.linalg.norm(dense_out))
                row["mass_kept_min"], row["mass_kept_mean"] = _mass_kept(
                    x["q"], x["k"], heads, kv_heads, mask)
            rows.append(row)
            if progress:
                progress(f"  T={t:5d} {mode:<13} {row['cycles_v2_estimate']:>10} cycles (v2 est.) "
                         f"{row['cycles_v1_exact']:>10} (v1) "
                         f"{(row['dram_read_bytes'] + row['dram_write_bytes']) / 2**20:7.2f} MiB "
                         f"cos {row['cosine_vs_onnxruntime_same_graph']:.5f}")
    for r in rows:
        base = next(b for b in rows if b["t"] == r["t"] and b["mode"] == "dense_causal")
        r["cycles_ratio_vs_dense"] = r["cycles_v2_estimate"] / base["cycles_v2_estimate"]
        r["dram_ratio_vs_dense"] = (r["dram_read_bytes"] + r["dram_write_bytes"]) / \
            (base["dram_read_bytes"] + base["dram_write_bytes"])
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vitamin.sparse_bench", description=__doc__)
    ap.add_argument("--config", default="zcu102")
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--out", default="bench/results/sparse.json")
    args = ap.parse_args(argv)
    rows = sweep(args.config, tuple(args.lengths))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))
    print(f"{'T':>5} {'mode':<13} {'cycles x dense':>14} {'DRAM x dense':>12} "
          f"{'mass kept (min/mean)':>21} {'rel err vs dense':>16}")
    for r in rows:
        mk = f"{r['mass_kept_min']:.3f}/{r['mass_kept_mean']:.3f}" if "mass_kept_min" in r \
            else "-"
        re = f"{r['rel_err_vs_dense']:.4f}" if "rel_err_vs_dense" in r else "-"
        print(f"{r['t']:>5} {r['mode']:<13} {r['cycles_ratio_vs_dense']:>14.3f} "
              f"{r['dram_ratio_vs_dense']:>12.3f} {mk:>21} {re:>16}")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
