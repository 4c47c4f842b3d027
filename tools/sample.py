"""Sample images from a checkpoint: a PNG grid, or many samples into an ``.npz`` for evaluation.

    # a grid from one of our checkpoints (model, autoencoder, diffusion read from the checkpoint; EMA weights)
    python tools/sample.py --ckpt runs/shapes/checkpoints/step_0010000.pt --class-labels 0,1,2,3 --out grid.png
    # guidance only at middle noise levels (Kynkaenniemi et al. 2024), conditional model alone elsewhere
    python tools/sample.py --ckpt runs/shapes/checkpoints/step_0010000.pt --cfg-scale 2 --guidance-interval 0.28,5.42
    # the official DiT-XL/2 exactly as facebookresearch/DiT's sample.py (DDPM 250 steps, cfg 4, seed 0)
    python tools/sample.py --ckpt DiT-XL-2-256x256.pt --official-cfg --precision fp32
    # 50k samples for FID, resumable, on all GPUs
    accelerate launch tools/sample.py --ckpt ... --num-samples 50000 --npz samples.npz --batch-size 64
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from dit.sample import (PRECISIONS, SAMPLERS, compile_for_sampling, float8_for_sampling, guidance_interval_summary,
                        load_sampling_setup, parse_class_labels, parse_guidance_interval, sample_images, sample_to_npz,
                        save_grid)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=None, help="our checkpoint (.pt) or an official DiT .pt / .safetensors")
    p.add_argument("--model", default=None, help="model name; read from our checkpoints, inferred for official "
                   "ones, and checked if given (e.g. DiT-XL/2)")
    p.add_argument("--vae", default=None, help="autoencoder spec (default: the checkpoint's; "
                   "stabilityai/sd-vae-ft-ema for official checkpoints)")
    p.add_argument("--cfg-scale", type=float, default=None, help="classifier-free guidance scale "
                   "(default: the checkpoint's sample config, 4.0 for official)")
    p.add_argument("--guidance-interval", default=None, metavar="LO,HI",
                   help="guide only at noise levels sigma in (LO, HI] (EDM sigma = sqrt((1 - abar) / abar), "
                   "arXiv:2404.07724; e.g. 0.28,5.42), the conditional model alone elsewhere (default: the "
                   "checkpoint's sample.guidance_interval, else every step)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the checkpoint's, 250 official)")
    p.add_argument("--sampler", choices=SAMPLERS, default=None, help="default: the checkpoint's (ddpm for official)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta")
    p.add_argument("--class-labels", default=None, help="comma list of class ids or names, e.g. 1,2,3 or "
                   "'red circle,blue cross' (default: one per class, or the official eight for 1000 classes)")
    p.add_argument("--prompt", action="append", default=None, help="text prompt (text models); repeat for more")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="samples.png", help="PNG grid path")
    p.add_argument("--nrow", type=int, default=None, help="grid columns (default ceil(sqrt(n)))")
    p.add_argument("--image-size", type=int, default=None, help="checked against the checkpoint")
    p.add_argument("--num-classes", type=int, default=None, help="checked against the checkpoint")
    p.add_argument("--official-cfg", action="store_true", default=None,
                   help="facebookresearch/DiT guidance convention (doubled noise/batch, 3 guided channels); "
                   "default for official checkpoints with ddpm/ddim")
    p.add_argument("--no-official-cfg", dest="official_cfg", action="store_false")
    p.add_argument("--precision", choices=list(PRECISIONS), default=None,
                   help="network precision on GPU (default: fp16 for a checkpoint trained in fp16, else bf16; fp32 "
                        "with --official-cfg; bf16 with --fp8; fp16 keeps the output about 8x closer to fp32 than "
                        "bf16, docs/sampling.md); CPU is always fp32")
    p.add_argument("--use-model-weights", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--num-samples", type=int, default=None, help="write this many samples to --npz instead of a grid")
    p.add_argument("--npz", default=None, help="output .npz (arr_0 uint8 NHWC, labels); parts kept in <npz>.parts/")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch (and per part) for --npz")
    p.add_argument("--device", default=None, help="default: this process's GPU, else cpu")
    p.add_argument("--fp8", action="store_true",
                   help="FP8 GEMMs in the DiT blocks with scales calibrated on random latents (H100+; 1.34x for "
                        "DiT-XL/2 sampling; network error 4-5x bf16's: check FID, docs/sampling.md)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model (CUDA graphs on GPU): faster for many steps/batches, ~40 s to start")
    return p


def main(argv: list[str] | None = None):
    args = build_parser().parse_args(argv)
    if (args.num_samples is None) != (args.npz is None):
        print("error: --num-samples and --npz go together", file=sys.stderr)
        raise SystemExit(2)
    try:
        return _run(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def _run(args: argparse.Namespace):
    interval = parse_guidance_interval(args.guidance_interval) if args.guidance_interval is not None else None
    if args.device is not None:
        device = torch.device(args.device)
    elif args.npz is not None:
        from accelerate import PartialState

        device = PartialState().device
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    setup = load_sampling_setup(args.ckpt, model_name=args.model, vae=args.vae, image_size=args.image_size,
                                num_classes=args.num_classes, use_model_weights=args.use_model_weights,
                                device=device)
    sampler = args.sampler or setup.defaults["sampler"]
    official = args.official_cfg
    if official is None:
        official = setup.source == "official" and sampler in ("ddpm", "ddim")
    if args.precision is not None:
        precision = args.precision
    else:  # the FP8 GEMMs write bf16; an fp16-trained checkpoint of ours samples in fp16
        precision = "fp32" if official else "bf16" if args.fp8 else setup.defaults.get("precision", "bf16")
    if args.fp8:  # calibrated in the precision the sampler will run in, before compiling
        float8_for_sampling(setup, device, precision=precision)
    if args.compile:
        setup.model = compile_for_sampling(setup.model, device)
    if official and device.type == "cuda":
        # facebookresearch/DiT's sample.py enables TF32 at import; match it so the two runs do the same arithmetic.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    labels = parse_class_labels(args.class_labels, setup.class_names) if args.class_labels else None
    common = dict(sampler=sampler, steps=args.steps, cfg_scale=args.cfg_scale, eta=args.eta, precision=precision,
                  guidance_interval=interval)  # sample_images rejects an interval with the official convention
    summary = None if official else guidance_interval_summary(setup, sampler=sampler, steps=args.steps,
                                                              cfg_scale=args.cfg_scale, guidance_interval=interval)
    if args.npz is not None:
        if official:
            raise ValueError("--npz uses per-batch seeds (standard guidance); pass --no-official-cfg")
        if labels is not None:
            raise ValueError("--npz balances classes itself (sample i gets label i % num_classes); drop --class-labels")
        from accelerate import PartialState

        if summary and PartialState().is_main_process:
            print(summary)
        out = sample_to_npz(setup, args.npz, num_samples=args.num_samples, batch_size=args.batch_size,
                            seed=args.seed, prompts=args.prompt, **common)
        # Every process tears its process group down before exiting: a process that exits with a live gloo/NCCL
        # group while its peer is still working can abort (SIGABRT) instead of exiting 0.
        PartialState().destroy_process_group()
        return out
    if summary:
        print(summary)
    t0 = time.time()
    images = sample_images(setup, labels=labels, prompts=args.prompt, seed=args.seed, official_cfg=official,
                           progress=True, **common)
    path = save_grid(images, args.out, nrow=args.nrow)
    print(f"saved {path} ({images.shape[0]} images of {images.shape[1]}x{images.shape[2]}, {setup.model_name}, "
          f"{time.time() - t0:.1f}s)")
    return path


if __name__ == "__main__":
    main()
