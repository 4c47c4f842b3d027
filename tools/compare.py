"""Compare DiT and UNet models under one training budget: train, sample, score, and write one report.

    python tools/compare.py --models DiT-S/8,DiT-S/4,DiT-S/2,DiT-B/2,UNet-S,UNet-B \
        --config configs/compare_shapes.yaml --budget-images 1000000 --out runs/compare \
        --eval-classifier checkpoints/shapes_classifier.pt [--inception PATH --reference REF.npz] \
        [key=value ...] [MODEL:model.key=value ...]

``key=value`` overrides apply to every model (dotted config keys, as in tools/train.py); ``MODEL:model.key=value``
only to that model and only to ``model.*`` keys, e.g. ``UNet-S:model.overrides.model_channels=64``. Re-running the
same command resumes: finished models are skipped, an interrupted one continues from its newest checkpoint, cached
evaluations are reused. Writes ``<out>/report.md``, ``results.json`` and PNG plots. See docs/compare.md.
Configuration and input errors print one line to stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from dit.compare import CompareSettings, run_compare  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", required=True, help="comma-separated registry names, e.g. DiT-S/2,UNet-S")
    p.add_argument("--config", default=None, help="base YAML config shared by every model (default: built-ins)")
    p.add_argument("--out", default="runs/compare", help="output directory (one run directory per model inside)")
    p.add_argument("--budget-images", type=int, default=None, help="images seen per model")
    p.add_argument("--budget-minutes", type=float, default=None,
                   help="training minutes per model (turned into steps by a timed calibration run)")
    p.add_argument("--calibration-steps", type=int, default=30, help="timed steps per model for --budget-minutes")
    p.add_argument("--eval-points", type=int, default=1,
                   help="checkpoints evaluated per model, evenly spaced (1 = final only)")
    p.add_argument("--num-samples", type=int, default=1200, help="generated images per model and guidance scale")
    p.add_argument("--sample-batch", type=int, default=256)
    p.add_argument("--sample-seed", type=int, default=0)
    p.add_argument("--num-steps", type=int, default=None, help="sampler steps (default: the config's sample.num_steps)")
    p.add_argument("--sampler", choices=["ddim", "ddpm"], default=None, help="default: the config's sample.sampler")
    p.add_argument("--cfg-scale", type=float, default=None, help="guidance scale (default: the config's "
                                                                  "sample.cfg_scale); scale 1 is always scored too")
    p.add_argument("--eval-classifier", default=None, help="shapes classifier .pt (tools/train_classifier.py): "
                                                           "conditional accuracy and FD-shapes")
    p.add_argument("--num-real", type=int, default=1200, help="real val images for FD-shapes")
    p.add_argument("--inception", default=None, help="FID Inception weights (pt_inception-2015-12-05-*.pth)")
    p.add_argument("--reference", default=None, help="FID reference images: .npz (arr_0 uint8 NHWC) or a folder")
    p.add_argument("--text-encoder", default="minilm", help="text encoder of -T models if the config sets none")
    p.add_argument("--grid-size", type=int, default=4, help="samples.png shows grid-size^2 samples per model")
    p.add_argument("--device", default=None, help="sampling/evaluation device (default: cuda if available)")
    p.add_argument("--traceback", action="store_true", help="show full tracebacks for config/input errors")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    args = p.parse_args(argv)

    settings = CompareSettings(
        models=args.models, out_dir=args.out, budget_images=args.budget_images, budget_minutes=args.budget_minutes,
        calibration_steps=args.calibration_steps, eval_points=args.eval_points, num_samples=args.num_samples,
        sample_batch=args.sample_batch, sample_seed=args.sample_seed, num_steps=args.num_steps, sampler=args.sampler,
        cfg_scale=args.cfg_scale, eval_classifier=args.eval_classifier, num_real=args.num_real,
        inception=args.inception, reference=args.reference, text_encoder=args.text_encoder,
        grid_size=args.grid_size, device=args.device)
    try:
        results = run_compare(settings, args.config, args.overrides)
    except (ValueError, FileNotFoundError, NotADirectoryError) as e:
        if args.traceback:
            raise
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(f"compared {len(results['models'])} models; report: {Path(args.out) / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
