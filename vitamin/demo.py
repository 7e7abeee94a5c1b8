"""``make demo``: the main job on the shipped digits ViT.

Compiles models/digits_vit.onnx (a ViT trained by models/train_digits.py on scikit-learn's
bundled digits) for a preset, runs the whole test split on onnxruntime (float) and on the golden
model of the accelerator, and prints the accuracy of both, their top-1 agreement, the predicted
cycles per image and images per second at the preset's clock, runs a few images on the Verilated
RTL of the accelerator and checks them bit for bit against the golden model, and says where the
report is.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "digits_vit.onnx"
DATA = ROOT / "models" / "digits_data.npz"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="vitamin demo", description=__doc__)
    ap.add_argument("--config", default="tiny", help="preset (default: tiny)")
    ap.add_argument("--out", default=str(ROOT / "build" / "demo"), help="output folder")
    ap.add_argument("--limit", type=int, default=0, help="only the first N test images")
    ap.add_argument("--rtl-images", type=int, default=4,
                    help="images also run on the Verilated accelerator (0: none)")
    args = ap.parse_args(argv)

    import onnxruntime as ort

    from . import api
    from .commands import _plot, build_report
    from .golden.isasim import run_program

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = np.load(DATA)
    x_test, y_test, x_cal = data["x_test"], data["y_test"], data["x_cal"]
    if args.limit:
        x_test, y_test = x_test[:args.limit], y_test[:args.limit]
    print(f"vitamin demo: {MODEL.name} ({len(x_test)} test images) on preset {args.config}")

    t0 = time.time()
    prog = api.compile(MODEL, args.config, {"input": x_cal[:, None] if x_cal.ndim == 3 else
                                            x_cal})
    prog_path = out / "digits_vit.vit"
    prog.save(prog_path)
    print(f"  compiled in {time.time() - t0:.1f} s: {prog.n_instr} instructions -> {prog_path}")

    sess = ort.InferenceSession(str(MODEL), providers=["CPUExecutionProvider"])
    t0 = time.time()
    ref = np.stack([sess.run(None, {"input": x[None].astype(np.float32)})[0][0]
                    for x in x_test])
    t_ort = (time.time() - t0) / len(x_test)

    sym_in = prog.symbol("input")
    out_name = prog.outputs[0].name
    s_out = prog.symbol(out_name).scale
    t0 = time.time()
    logits = []
    sat = 0
    for x in x_test:
        q = api.quantize_inputs(prog, {"input": x[None]})
        res, raw = run_program(prog, q)
        res.check()
        sat += res.counters["sat_events"]
        logits.append(raw[out_name].reshape(-1) * s_out)
    logits = np.stack(logits)
    t_gold = (time.time() - t0) / len(x_test)
    _ = sym_in

    # a few images on the Verilated accelerator, compared bit for bit with the golden model
    rtl = {"images": 0}
    if args.rtl_images:
        from .sim.rtl_backend import run_many
        t0 = time.time()
        qs = [api.quantize_inputs(prog, {"input": x[None]}) for x in x_test[:args.rtl_images]]
        exact = True
        cyc = []
        for i, (rres, raw) in enumerate(run_many(prog, qs)):
            gres, graw = run_program(prog, qs[i])
            exact &= bool(rres.ok and np.array_equal(rres.dram, gres.dram)
                          and all(np.array_equal(raw[k], graw[k]) for k in graw))
            cyc.append(int(rres.counters["cycles"]))
        rtl = {"images": len(qs), "bit_exact": exact, "cycles_per_image": int(np.mean(cyc)),
               "wall_s": time.time() - t0}
    acc_f = float((ref.argmax(1) == y_test).mean())
    acc_a = float((logits.argmax(1) == y_test).mean())
    agree = float((ref.argmax(1) == logits.argmax(1)).mean())
    cos = float(np.mean([a @ b / np.linalg.norm(a) / np.linalg.norm(b)
                         for a, b in zip(logits, ref)]))
    rep = build_report(prog)
    _plot(rep, out / "utilisation.png")
    (out / "report.json").write_text(json.dumps(rep, indent=1))
    summary = {
        "config": prog.config.name, "test_images": int(len(x_test)),
        "float_accuracy": acc_f, "accelerator_accuracy": acc_a, "top1_agreement": agree,
        "mean_logit_cosine": cos, "saturation_events": int(sat),
        "cycles_per_image": rep["cycles"], "mac_utilisation": rep["utilisation"],
        "clock_mhz": rep["clock_mhz"], "images_per_s": rep["images_per_s"],
        "golden_ms_per_image": 1e3 * t_gold, "onnxruntime_ms_per_image": 1e3 * t_ort,
        "rtl": rtl,
    }
    (out / "demo.json").write_text(json.dumps(summary, indent=1))
    print(f"  float (onnxruntime) accuracy : {100 * acc_f:.2f} %")
    print(f"  accelerator (golden) accuracy: {100 * acc_a:.2f} %   top-1 agreement "
          f"{100 * agree:.2f} %, mean logit cosine {cos:.5f}, {sat} saturation events")
    if rtl["images"]:
        clk = prog.config.clock_mhz
        print(f"  RTL (Verilator) vs golden    : {rtl['images']} images, "
              f"{'bit-exact' if rtl['bit_exact'] else 'MISMATCH'} (DRAM image and outputs), "
              f"{rtl['cycles_per_image']} cycles/image measured -> "
              f"{clk * 1e6 / rtl['cycles_per_image']:.0f} images/s at {clk} MHz "
              f"(v1 sequential issue; {rtl['wall_s']:.1f} s incl. build)")
    print(f"  cycles per image (cost model): {rep['cycles']} for the v1 RTL "
          f"({100 * rep['utilisation']:.1f} % MAC utilisation) -> {rep['images_per_s']:.0f} "
          f"images/s at {rep['clock_mhz']} MHz; {rep['v2_cycles']} for the planned decoupled v2 "
          f"-> {rep['clock_mhz'] * 1e6 / max(rep['v2_cycles'], 1):.0f} images/s")
    print(f"  golden model {1e3 * t_gold:.1f} ms/image, onnxruntime {1e3 * t_ort:.2f} ms/image "
          f"on this CPU")
    print(f"  report: {out / 'report.json'}, plot: {out / 'utilisation.png'}, summary: "
          f"{out / 'demo.json'}")
    ok = acc_a >= acc_f - 0.01 and (not rtl["images"] or rtl["bit_exact"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
