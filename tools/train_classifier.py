"""Train the small CNN classifier of the bundled shapes data (the offline evaluator), report val accuracy, save it.

    python tools/train_classifier.py --resolution 32 --out checkpoints/shapes_classifier.pt [--steps 600]
"""

from __future__ import annotations

import argparse
import time

import torch

from dit.eval.shapes_eval import save_classifier, train_shapes_classifier


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolution", type=int, default=32, help="dataset resolution (the samples' image size)")
    p.add_argument("--out", default="checkpoints/shapes_classifier.pt")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-train", type=int, default=4800, help="pre-rendered train-split images")
    p.add_argument("--num-val", type=int, default=1200, help="val-split images for the reported accuracy")
    p.add_argument("--lr", type=float, default=3e-3, help="peak AdamW lr (one-cycle: 10%% warm-up, cosine decay)")
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda if available")
    args = p.parse_args(argv)
    for name in ("steps", "batch_size", "num_train", "num_val", "width"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.time()
    model, acc = train_shapes_classifier(resolution=args.resolution, num_train=args.num_train, num_val=args.num_val,
                                         steps=args.steps, batch_size=args.batch_size, lr=args.lr, width=args.width,
                                         seed=args.seed, device=device, log_every=max(1, args.steps // 10))
    save_classifier(model, args.out, classes=model.classes, resolution=args.resolution, val_accuracy=acc)
    print(f"val accuracy {acc:.4f} ({args.num_val} val images) in {time.time() - t0:.0f}s; saved {args.out}")
    return acc


if __name__ == "__main__":
    main()
