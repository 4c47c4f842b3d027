#!/usr/bin/env python
"""Write the bundled shapes dataset to disk as an ImageFolder (+ captions.jsonl, classes.json).

    python tools/make_dataset.py --out data/shapes64 --resolution 64 --per-class 100
"""

from __future__ import annotations

import argparse
import sys

from dit.data.shapes import ShapesDataset, class_names, materialise


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--resolution", type=int, default=64, help="image side, 16..256")
    p.add_argument("--per-class", type=int, default=100, help="images per class")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default="train", choices=["train", "val"])
    args = p.parse_args(argv)
    if args.per_class < 1:
        raise ValueError(f"--per-class: expected a positive integer, got {args.per_class}")
    ds = ShapesDataset(resolution=args.resolution, num_samples=args.per_class * len(class_names()), seed=args.seed,
                       split=args.split)
    out = materialise(ds, args.out, progress=True)
    print(f"wrote {len(ds)} images of {ds.num_classes} classes to {out}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, OSError) as e:
        sys.exit(f"make_dataset: error: {e}")
