"""Launched by tests/test_train.py: ``accelerate launch --num_processes 2 --cpu tests/ddp_train_script.py OUT``.

Trains a tiny DiT for a few steps on every rank and writes ``OUT/rank<k>.json`` with the rank's weight digest.
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
    cfg = load_config(None, tiny_overrides(out / "run") + ["train.max_steps=3", "train.grad_accum_steps=2"])
    summary = train(cfg)
    (out / f"rank{summary['rank']}.json").write_text(json.dumps(summary))
