"""Launched by tests/test_train.py: ``accelerate launch --num_processes 2 --cpu tests/ddp_train_script.py OUT [fp16]``.

Trains a tiny DiT for a few steps on every rank and writes ``OUT/rank<k>.json`` with the rank's weight digest.
``fp16``: under fp16 autocast with a dynamic loss scale that overflows once (Accelerate's GradScaler, forced onto the
CPU by helpers.scaled_accelerator), to check that every rank skips the same steps and keeps the same scale.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_train import tiny_overrides  # noqa: E402

from dit.config import load_config  # noqa: E402
from dit.train import train  # noqa: E402

if __name__ == "__main__":
    out = Path(sys.argv[1])
    extra = ["train.max_steps=3", "train.grad_accum_steps=2"]
    if sys.argv[2:] == ["fp16"]:
        import accelerate
        from helpers import scaled_accelerator

        accelerate.Accelerator = scaled_accelerator(2.0**20)  # overflows at step 5, as in one process
        extra = ["train.max_steps=6", "train.mixed_precision=fp16", "train.grad_clip=0.1", "train.ckpt_every=6"]
    cfg = load_config(None, tiny_overrides(out / "run") + extra)
    summary = train(cfg)
    (out / f"rank{summary['rank']}.json").write_text(json.dumps(summary))
