"""Train the demo model: a small ViT on scikit-learn's bundled 8x8 digits (no download).

Writes, next to this script:
  digits_vit.onnx      the trained model (legacy exporter, opset 17, batch 1)
  digits_data.npz      the test split (x_test [N,1,8,8] float32, y_test [N]) and 64 calibration
                       images from the training split (x_cal)
  digits_vit.json      preprocessing, split, training settings and float accuracy

Run: .venv/bin/python models/train_digits.py   (about a minute on 2 CPU cores)
The committed files were produced by this script with the default seed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SEED = 0


def preprocess(images: np.ndarray) -> np.ndarray:
    """sklearn digits pixels (0..16) -> the model's input: [N, 1, 8, 8], zero mean, unit range."""
    return (np.asarray(images, dtype=np.float32).reshape(-1, 1, 8, 8) / 16.0 - 0.5) * 2.0


def load_split():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    d = load_digits()
    x = preprocess(d.images)
    return train_test_split(x, d.target, test_size=0.25, random_state=SEED, stratify=d.target)


def main(epochs: int = 60) -> dict:
    import torch

    from vitamin.compiler.models import export_onnx, vit_digits

    torch.manual_seed(SEED)
    torch.set_num_threads(2)
    x_tr, x_te, y_tr, y_te = load_split()
    model = vit_digits(seed=SEED)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    xt, yt = torch.tensor(x_tr), torch.tensor(y_tr)
    g = torch.Generator().manual_seed(SEED)
    t0 = time.time()
    for _ in range(epochs):
        perm = torch.randperm(len(xt), generator=g)
        for i in range(0, len(xt), 64):
            idx = perm[i:i + 64]
            xb = xt[idx]
            # light augmentation: one-pixel shifts
            sh = torch.randint(-1, 2, (2,), generator=g)
            xb = torch.roll(xb, shifts=(int(sh[0]), int(sh[1])), dims=(2, 3))
            loss = torch.nn.functional.cross_entropy(model(xb), yt[idx], label_smoothing=0.05)
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        acc = float((model(torch.tensor(x_te)).argmax(1).numpy() == y_te).mean())
    export_onnx(model, HERE / "digits_vit.onnx", dynamo=False)
    np.savez_compressed(HERE / "digits_data.npz", x_test=x_te.astype(np.float32),
                        y_test=y_te.astype(np.int64), x_cal=x_tr[:64].astype(np.float32))
    info = {"model": "vit_digits", "preprocess": "(pixel / 16 - 0.5) * 2", "seed": SEED,
            "epochs": epochs, "train_images": int(len(x_tr)), "test_images": int(len(x_te)),
            "float_test_accuracy": acc, "train_seconds": round(time.time() - t0, 1)}
    (HERE / "digits_vit.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


if __name__ == "__main__":
    print(json.dumps(main(), indent=1))
