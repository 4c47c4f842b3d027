"""Measure an autoencoder: PSNR / SSIM of round trips, raw latent mean/std, encode/decode img/s, and the
recommended latent normalisation, written as JSON (readable by ``vae.load_autoencoder(..., norm_file=...)``; name
it ``latent_norm.json`` beside the weights to make it the default).

    python tools/measure_vae.py taef2:/work/shared/weights/taef2 --skimage --size 256 --out latent_norm.json
    python tools/measure_vae.py kl:stabilityai/sd-vae-ft-ema --images path/to/folder --device cuda --dtype bf16
"""

import argparse
import json
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vae import load_autoencoder  # noqa: E402
from vae.measure import folder_images, measure_autoencoder, skimage_photos, write_normalization  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("spec", help="autoencoder spec: identity, taef2:<dir>, taesd:<dir|hub id>, kl:<dir|file|hub id>")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", type=Path, help="folder of images (searched recursively)")
    src.add_argument("--skimage", action="store_true", help="use the real photos bundled with scikit-image")
    p.add_argument("--size", type=int, default=256, help="centre-crop and resize images to SIZE x SIZE")
    p.add_argument("--max-images", type=int, default=None)
    p.add_argument("--repeat", type=int, default=1, help="tile the image set N times (for steadier img/s)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="autocast dtype on CUDA: bf16 or fp16 (default float32)")
    p.add_argument("--per-channel", action="store_true", help="write per-channel shift/scale instead of global scale")
    p.add_argument("--out", type=Path, default=None, help="JSON output (default: print only)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)

    with warnings.catch_warnings():  # measuring is how one gets the normalisation the warning asks for
        warnings.simplefilter("ignore")
        ae = load_autoencoder(a.spec, device=a.device, dtype=a.dtype)
    images = skimage_photos(a.size) if a.skimage else folder_images(a.images, a.size, a.max_images)
    if a.max_images is not None:
        images = images[: a.max_images]
    if a.repeat < 1:
        p.error(f"--repeat: expected a positive integer, got {a.repeat}")
    images = images.repeat(a.repeat, 1, 1, 1)
    result = measure_autoencoder(ae, images, batch_size=a.batch_size, progress=not a.no_progress)
    st = result["stats"]
    print(f"{a.spec}: {result['num_images']} images {a.size}x{a.size} -> latents {result['latent_shape']}")
    print(f"PSNR {result['psnr']:.2f} dB, SSIM {result['ssim']:.4f}")
    print(f"encode {result['encode_img_per_s']:.1f} img/s, decode {result['decode_img_per_s']:.1f} img/s "
          f"({result['device']})")
    print(f"raw latents: global mean {st['global_mean']:.4f}, std {st['global_std']:.4f} "
          f"-> scale {st['global']['scale']:.5f}")
    print("per-channel mean: " + json.dumps([round(v, 3) for v in st["mean"]]))
    print("per-channel std:  " + json.dumps([round(v, 3) for v in st["std"]]))
    if a.out is not None:
        print(f"wrote {write_normalization(result, a.out, per_channel=a.per_channel)}")
    return result


if __name__ == "__main__":
    main()
