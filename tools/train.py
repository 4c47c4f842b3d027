"""Train a DiT / UNet: ``python tools/train.py --config configs/demo.yaml [key=value ...] [--resume auto|PATH]``.

Multi-GPU: ``accelerate launch --multi_gpu --num_processes N tools/train.py --config ...``. Several CPU processes
(gloo): ``ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N tools/train.py ...`` (in accelerate
1.x ``accelerate launch --cpu`` starts only one process).
Overrides are dotted config keys, e.g. ``train.lr=2e-4 model.name=DiT-B/2 run.out_dir=runs/b2``.
Configuration and input errors print one line to stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from dit.config import load_config  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML config (default: the built-in defaults)")
    parser.add_argument("--resume", default=None, help="'auto' (newest valid checkpoint in run.out_dir) or a "
                                                         "checkpoint file / directory; same as train.resume=...")
    parser.add_argument("--out-dir", default=None, help="same as run.out_dir=...")
    parser.add_argument("--traceback", action="store_true", help="show full tracebacks for config/input errors")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    args = parser.parse_args(argv)

    overrides = list(args.overrides)
    if args.resume is not None:
        overrides.append(f"train.resume={args.resume}")
    if args.out_dir is not None:
        overrides.append(f"run.out_dir={args.out_dir}")

    from dit.train import TrainingAborted, train

    try:
        cfg = load_config(args.config, overrides)
        summary = train(cfg)
    except (ValueError, FileNotFoundError, NotADirectoryError) as e:
        # Bad config / data / checkpoint: the message already names the file and key; no traceback.
        if args.traceback:
            raise
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except TrainingAborted as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"trained {summary['steps']} steps ({summary['images_seen']} images) in {summary['seconds']:.0f} s; "
          f"outputs in {summary['out_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
