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
MOE_MODEL = ROOT / "models" / "digits_moe.onnx"
MOE_TASKS = ("digit", "odd")      # models/train_moe_digits.py


def moe_demo(config, x_test, y_test, x_cal, rtl_images, out) -> tuple[dict, bool]:
    """The two-task MoE ViT (models/digits_moe.onnx): one program, both tasks; accuracy float vs
    accelerator per task, the experts' load, the traffic patch reordering saves, and a few
    images per task on the Verilated RTL compared bit for bit."""
    import onnxruntime as ort

    from . import api
    from .compiler.cost import profile_program
    from .compiler.moe import moe_summary
    from .golden.isasim import run_program

    print(f"vitamin demo: {MOE_MODEL.name} (two tasks: {', '.join(MOE_TASKS)}; a mixture of "
          f"experts in block 1) on preset {config}")
    t0 = time.time()
    cal = [{"input": x[None], "task": np.array(i % len(MOE_TASKS))} for i, x in enumerate(x_cal)]
    prog = api.compile(MOE_MODEL, config, cal)
    prog.save(out / "digits_moe.vit")
    print(f"  compiled once for both tasks in {time.time() - t0:.1f} s: {prog.n_instr} "
          f"instructions -> {out / 'digits_moe.vit'}")
    sess = ort.InferenceSession(str(MOE_MODEL), providers=["CPUExecutionProvider"])
    out_name = prog.outputs[0].name
    s_out = prog.symbol(out_name).scale
    summary = {"tasks": {}}
    ok = True
    for task, tname in enumerate(MOE_TASKS):
        y = y_test if task == 0 else y_test % 2
        ncls = 10 if task == 0 else 2
        ref = np.stack([sess.run(None, {"input": x[None].astype(np.float32),
                                        "task": np.array(task, dtype=np.int64)})[0][0]
                        for x in x_test])
        preds, tokens, read, naive = [], None, 0, 0
        for x in x_test:
            ins, regs = api.task_regs(prog, {"input": x[None]}, task)
            q = api.quantize_inputs(prog, ins)
            res, raw = run_program(prog, q, regs=regs)
            res.check()
            preds.append((raw[out_name].reshape(-1) * s_out)[:ncls].argmax())
            (m,) = moe_summary(prog, profile_program(prog, q, regs))
            t = np.array([e["tokens"] for e in m["experts"]])
            tokens = t if tokens is None else tokens + t
            read += m["expert_weight_bytes_read"]
            naive += m["naive_per_token_weight_bytes"]
        acc_f = float((ref[:, :ncls].argmax(1) == y).mean())
        acc_a = float((np.array(preds) == y).mean())
        agree = float((ref[:, :ncls].argmax(1) == np.array(preds)).mean())
        load = (tokens / tokens.sum()).round(3).tolist()
        summary["tasks"][tname] = {"float_accuracy": acc_f, "accelerator_accuracy": acc_a,
                                   "top1_agreement": agree, "expert_token_share": load,
                                   "expert_weight_bytes_per_image": read / len(x_test),
                                   "naive_per_token_bytes_per_image": naive / len(x_test)}
        print(f"  task {task} ({tname}): float {100 * acc_f:.2f} %, accelerator "
              f"{100 * acc_a:.2f} %, agreement {100 * agree:.2f} %; tokens per expert "
              f"{' / '.join(f'{100 * v:.0f}%' for v in load)}; expert weights "
              f"{read / len(x_test) / 1024:.1f} KiB/image read vs "
              f"{naive / len(x_test) / 1024:.1f} KiB fetching per token "
              f"({naive / max(read, 1):.1f}x saved by patch reordering)")
        ok &= acc_a >= acc_f - 0.02
    if rtl_images:
        from .sim.rtl_backend import run_many
        exact = True
        for task in range(len(MOE_TASKS)):
            qs, regs = [], {}
            for x in x_test[:rtl_images]:
                ins, regs = api.task_regs(prog, {"input": x[None]}, task)
                qs.append(api.quantize_inputs(prog, ins))
            for q, (rres, raw) in zip(qs, run_many(prog, qs, regs=regs)):
                gres, graw = run_program(prog, q, regs=regs)
                exact &= bool(rres.ok and np.array_equal(rres.dram, gres.dram)
                              and all(np.array_equal(raw[k], graw[k]) for k in graw))
        summary["rtl"] = {"images_per_task": rtl_images, "bit_exact": exact}
        print(f"  RTL (Verilator) vs golden: {rtl_images} images x {len(MOE_TASKS)} tasks, "
              f"{'bit-exact' if exact else 'MISMATCH'} (whole DRAM image)")
        ok &= exact
    return summary, ok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="vitamin demo", description=__doc__)
    ap.add_argument("--config", default="tiny", help="preset (default: tiny)")
    ap.add_argument("--out", default=str(ROOT / "build" / "demo"), help="output folder")
    ap.add_argument("--limit", type=int, default=0, help="only the first N test images")
    ap.add_argument("--rtl-images", type=int, default=4,
                    help="images also run on the Verilated accelerator (0: none)")
    ap.add_argument("--no-moe", action="store_true", help="skip the two-task MoE model")
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
              f"(v2 decoupled hardware; {rtl['wall_s']:.1f} s incl. build)")
    print(f"  cycles per image (cost model of the v2 hardware): {rep['cycles']} "
          f"({100 * rep['utilisation']:.1f} % MAC utilisation) -> {rep['images_per_s']:.0f} "
          f"images/s at {rep['clock_mhz']} MHz; {rep['v1_cycles']} on the sequential v1 machine")
    print(f"  golden model {1e3 * t_gold:.1f} ms/image, onnxruntime {1e3 * t_ort:.2f} ms/image "
          f"on this CPU")
    print(f"  report: {out / 'report.json'}, plot: {out / 'utilisation.png'}, summary: "
          f"{out / 'demo.json'}")
    ok = acc_a >= acc_f - 0.01 and (not rtl["images"] or rtl["bit_exact"])
    if not args.no_moe:
        moe, moe_ok = moe_demo(args.config, x_test, y_test, x_cal, args.rtl_images, out)
        summary["moe"] = moe
        (out / "demo.json").write_text(json.dumps(summary, indent=1))
        ok &= moe_ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
