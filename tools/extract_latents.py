#!/usr/bin/env python
"""Encode a dataset once into latent shards for training (see dit/data/extract.py).

    python tools/extract_latents.py --data shapes --resolution 64 --autoencoder taef2:/path/to/taef2 --out latents/
    accelerate launch --num_processes 8 tools/extract_latents.py --data /data/imagenet/train --resolution 256 \\
        --autoencoder stabilityai/sd-vae-ft-ema --flip --out latents/in256
    # several CPU processes (gloo), e.g. for testing:
    accelerate launch --multi_gpu --num_processes 2 tools/extract_latents.py --cpu --data shapes ...
"""

from __future__ import annotations

import argparse
import sys

from accelerate import Accelerator

from dit.data.extract import check_data, extract_latents, open_dataset
from dit.data.latents import DTYPES
from vae import load_autoencoder


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="'shapes' (bundled dataset), an ImageFolder or a caption folder")
    p.add_argument("--out", required=True, help="output directory (resumes if it holds finished shards)")
    p.add_argument("--autoencoder", required=True, help="autoencoder spec: identity, taef2:<dir>, hub id / dir")
    p.add_argument("--resolution", type=int, required=True, help="image side in pixels")
    p.add_argument("--captions", action="store_true", help="read --data as a caption folder (sidecar .txt files)")
    p.add_argument("--text-encoder", default=None, help="also store caption embeddings from this text encoder")
    p.add_argument("--flip", action="store_true", help="also store latents of horizontally flipped images")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="latent storage dtype")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--shard-size", type=int, default=1000, help="images per shard file")
    p.add_argument("--num-workers", type=int, default=4, help="DataLoader worker processes")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable images (listed) instead of stopping")
    p.add_argument("--cpu", action="store_true", help="run on CPU (multi-process launches then use gloo)")
    p.add_argument("--ae-dtype", default=None, choices=["bf16", "fp16"], help="autocast dtype of the autoencoder")
    p.add_argument("--num-samples", type=int, default=None, help="shapes only: dataset length")
    p.add_argument("--seed", type=int, default=0, help="shapes only: dataset seed")
    p.add_argument("--split", default="train", choices=["train", "val"], help="shapes only: split")
    args = p.parse_args(argv)

    accelerator = Accelerator(cpu=args.cpu)
    check_data(args.data)  # before anything is loaded
    # The encoders first: a mistyped --autoencoder fails in seconds, not after a scan of every image file.
    autoencoder = load_autoencoder(args.autoencoder, device=accelerator.device, dtype=args.ae_dtype)
    text_encoder = None
    if args.text_encoder:
        from dit.text import load_text_encoder

        text_encoder = load_text_encoder(args.text_encoder, device=accelerator.device)
    dataset = open_dataset(args.data, resolution=args.resolution, num_samples=args.num_samples, seed=args.seed,
                           split=args.split, captions=args.captions, skip_bad=args.skip_bad)
    bad = getattr(dataset, "bad_files", [])
    if bad and accelerator.is_main_process:
        print(f"skipping {len(bad)} unreadable file(s):", *(f"  {path}: {why}" for path, why in bad), sep="\n")
    stats = extract_latents(dataset, autoencoder, args.out, batch_size=args.batch_size, shard_size=args.shard_size,
                            dtype=args.dtype, flip=args.flip, text_encoder=text_encoder,
                            num_workers=args.num_workers, accelerator=accelerator)
    if accelerator.is_main_process:
        print(f"{args.out}: {stats['num_shards']} shards ({len(stats['written'])} written, "
              f"{len(stats['skipped'])} already done); encoded {stats['images']} images in {stats['seconds']:.1f} s "
              f"= {stats['img_per_s']:.1f} img/s")
    # Tears the process group down on every process before exit (an exit with a live gloo group while the peer is
    # still running can abort with SIGABRT: seen once in tests/test_latents.py's 2-process run).
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, FileNotFoundError, ImportError) as e:  # bad input: one clear line, no traceback
        sys.exit(f"extract_latents: error: {e}")
