"""FID / sFID / Inception Score / precision / recall of generated samples against a reference set.

    python tools/evaluate.py samples.npz reference.npz --inception pt_inception-2015-12-05-6726825d.pth \
        [--batch-size 64] [--cache-dir cache/] [--json metrics.json]

SAMPLE and REF are ``.npz`` files with ``arr_0`` = uint8 (N, H, W, 3) images (the ADM evaluation-suite layout, as
written by ``tools/sample.py --npz``) or folders of images. Reference statistics are cached in ``--cache-dir``.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from dit.eval import evaluate_sources, load_fid_inception
from dit.eval.features import extractor_id, write_json


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sample", help="generated images: .npz (arr_0 uint8 NHWC) or image folder")
    p.add_argument("ref", help="reference images: .npz (arr_0 uint8 NHWC) or image folder")
    p.add_argument("--inception", default=None, help="path to pt_inception-2015-12-05-6726825d.pth")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--cache-dir", default=None, help="cache statistics here (keyed by source and extractor)")
    p.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    p.add_argument("--fd-method", choices=["sqrtm", "eigh"], default="sqrtm",
                   help="matrix square root for FID/sFID: scipy sqrtm (reference) or eigh (same value, much faster)")
    p.add_argument("--device", default=None, help="default: cuda if available")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error(f"--batch-size must be >= 1, got {args.batch_size}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        net = load_fid_inception(args.inception, device=device)
        metrics = evaluate_sources(args.sample, args.ref, net, extractor=extractor_id(args.inception),
                                   cache_dir=args.cache_dir, batch_size=args.batch_size, device=device, progress=True,
                                   fd_method=args.fd_method)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(json.dumps(metrics, indent=2))
    if args.json:
        write_json(metrics, args.json)
    return metrics


if __name__ == "__main__":
    main()
