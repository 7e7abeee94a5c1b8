"""``make demo``: the main job on the shipped digits ViT.

Compiles models/digits_vit.onnx (a ViT trained by models/train_digits.py on scikit-learn's
bundled digits) for a preset, runs the whole test split on onnxruntime (float) and on the golden
model of the accelerator, and prints the accuracy of both, their top-1 agreement, the predicted
cycles per image and images per second at the preset's clock, and where the report is.
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
        "rtl": "not run: the RTL backend needs the complete accelerator gateware (hardware "
               "issue); today only its blocks exist and are tested",
    }
    (out / "demo.json").write_text(json.dumps(summary, indent=1))
    print(f"  float (onnxruntime) accuracy : {100 * acc_f:.2f} %")
    print(f"  accelerator (golden) accuracy: {100 * acc_a:.2f} %   top-1 agreement "
          f"{100 * agree:.2f} %, mean logit cosine {cos:.5f}, {sat} saturation events")
    print(f"  RTL vs golden                : {summary['rtl']}")
    print(f"  cycles per image (cost model): {rep['cycles']}  ({100 * rep['utilisation']:.1f} % "
          f"MAC utilisation) -> {rep['images_per_s']:.0f} images/s at {rep['clock_mhz']} MHz")
    print(f"  golden model {1e3 * t_gold:.1f} ms/image, onnxruntime {1e3 * t_ort:.2f} ms/image "
          f"on this CPU")
    print(f"  report: {out / 'report.json'}, plot: {out / 'utilisation.png'}, summary: "
          f"{out / 'demo.json'}")
    return 0 if acc_a >= acc_f - 0.01 else 1


if __name__ == "__main__":
    sys.exit(main())
