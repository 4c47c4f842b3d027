"""Run 26's probe: where the GPU's fused fp16 step departs from the GradScaler path (run 25's failing test).

    python docs/bench/2026-12-07_run26_fp16_step_probe.py

The tiny model of tests/test_train.py trains 6 steps twice per setting: once through the fused step (the trainer's
default on CUDA), once with torch's foreach AdamW (Accelerate's GradScaler path), a checkpoint after every step.
Printed per step: the largest |difference| over the weights and the EMA, and the tensor it is in. Settings: fp16
with our AdamW + EMA kernel (the test), fp16 with torch's fused AdamW (train.fused_adamw_ema=false: is it our
kernel?), and bf16 and fp32 (is it fp16's?). Beside each: the plain path against itself with the learning rate
1e-6 off, which shows how far a rounding-sized change in the updates carries in 6 steps on this device.
"""

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import accelerate  # noqa: E402

from dit.config import load_config  # noqa: E402
from dit.train import train  # noqa: E402
from helpers import scaled_accelerator  # noqa: E402
from test_train import tiny_overrides  # noqa: E402


def run(out: Path, *extra: str, plain: bool) -> None:
    real = torch.optim.AdamW
    if plain:
        torch.optim.AdamW = lambda *a, **k: real(*a, **{**k, "fused": None})
    try:
        train(load_config(None, tiny_overrides(out) + ["train.ckpt_every=1", "sample.grid_size=0",
                                                       "train.grad_clip=0.1", "train.keep_last=6", *extra]))
    finally:
        torch.optim.AdamW = real


def worst(x: dict, y: dict) -> tuple[float, tuple]:
    """The largest |x - y| over the weights and the EMA, and where it is."""
    errors = {(k, n): (x[k][n].double() - y[k][n].double()).abs().max().item() for k in ("model", "ema") for n in x[k]}
    where = max(errors, key=errors.get)
    return errors[where], where


def main() -> None:
    torch.backends.cudnn.deterministic = True
    tmp = Path("/tmp/probe26")
    settings = {"fp16 kernel": ["train.mixed_precision=fp16"],
                "fp16 torch fused": ["train.mixed_precision=fp16", "train.fused_adamw_ema=false"],
                "bf16 kernel": ["train.mixed_precision=bf16"],
                "fp32 kernel": ["train.mixed_precision='no'"]}
    original = accelerate.Accelerator
    for name, extra in settings.items():
        # as the test: a dynamic loss scale from 2^20 that grows every 2 clean steps, so step 5 overflows
        accelerate.Accelerator = scaled_accelerator() if "fp16" in name else original
        d = tmp / name.replace(" ", "_")
        try:
            run(d / "fused", *extra, plain=False)
            run(d / "plain", *extra, plain=True)
            run(d / "nudged", *extra, "train.lr=1.000001e-3", plain=True)  # the floor: lr 1e-6 off
        except Exception as e:  # noqa: BLE001 - report and go on to the next setting
            print(f"[probe] {name}: failed: {type(e).__name__}: {str(e)[:200]}")
            continue
        for step in range(1, 7):
            a, b, c = (torch.load(d / k / "checkpoints" / f"step_{step:07d}.pt", weights_only=True)
                       for k in ("fused", "plain", "nudged"))
            (e, where), (f, _) = worst(a, b), worst(c, b)
            scales = [x["scaler"]["scale"] if x.get("scaler") else None for x in (a, b)]
            print(f"[probe] {name:17s} step {step}: max |fused - plain| {e:.3g} in {where}; "
                  f"max |nudged - plain| {f:.3g}; loss scales {scales}")


if __name__ == "__main__":
    main()
