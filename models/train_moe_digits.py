"""Train the MoE demo model: a two-task mixture-of-experts ViT on scikit-learn's 8x8 digits.

Task 0 classifies the digit (10 classes); task 1 says whether the digit is odd (2 classes, the
first two logits of the task's head). Both tasks share every weight except their gate in each
MoE block and their head (``m3vit_digits``: 2 blocks, the second a mixture of 4 experts, top-2).
Uses the same split and preprocessing as train_digits.py. Writes, next to this script:
  digits_moe.onnx      the trained model (legacy exporter, opset 17; inputs ``input``, ``task``)
  digits_moe.json      tasks, training settings and float accuracy per task

Run: .venv/bin/python models/train_moe_digits.py   (about a minute on 2 CPU cores)
The committed files were produced by this script with the default seed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SEED = 0
TASKS = ("digit", "odd")


def labels(y: np.ndarray, task: int) -> np.ndarray:
    """Label of task ``task`` for digits ``y``."""
    return y if task == 0 else y % 2


def main(epochs: int = 60) -> dict:
    import torch
    from train_digits import load_split  # noqa: I001  (this folder's sibling script)

    from vitamin.compiler.models import MOE_PRESETS, M3ViT, export_onnx

    torch.manual_seed(SEED)
    torch.set_num_threads(2)
    x_tr, x_te, y_tr, y_te = load_split()
    model = M3ViT(**MOE_PRESETS["m3vit_digits"], seed=SEED)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    xt = torch.tensor(x_tr)
    ys = [torch.tensor(labels(y_tr, t)) for t in range(len(TASKS))]
    g = torch.Generator().manual_seed(SEED)
    t0 = time.time()
    for _ in range(epochs):
        perm = torch.randperm(len(xt), generator=g)
        for i in range(0, len(xt), 64):
            idx = perm[i:i + 64]
            xb = xt[idx]
            sh = torch.randint(-1, 2, (2,), generator=g)
            xb = torch.roll(xb, shifts=(int(sh[0]), int(sh[1])), dims=(2, 3))
            loss = 0
            for t in range(len(TASKS)):
                loss = loss + torch.nn.functional.cross_entropy(
                    model(xb, torch.tensor(t)), ys[t][idx], label_smoothing=0.05)
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    model.eval()
    acc = {}
    with torch.no_grad():
        for t, name in enumerate(TASKS):
            pred = model(torch.tensor(x_te), torch.tensor(t)).argmax(1).numpy()
            acc[name] = float((pred == labels(y_te, t)).mean())
    export_onnx(model, HERE / "digits_moe.onnx", dynamo=False)
    info = {"model": "m3vit_digits", "tasks": {n: i for i, n in enumerate(TASKS)},
            "task_labels": {"digit": "0..9", "odd": "1 if the digit is odd else 0"},
            "preprocess": "(pixel / 16 - 0.5) * 2", "data": "digits_data.npz (same split)",
            "seed": SEED, "epochs": epochs, "train_images": int(len(x_tr)),
            "test_images": int(len(x_te)), "float_test_accuracy": acc,
            "train_seconds": round(time.time() - t0, 1)}
    (HERE / "digits_moe.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


if __name__ == "__main__":
    print(json.dumps(main(), indent=1))
