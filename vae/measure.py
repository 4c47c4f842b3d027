"""Measure an autoencoder on real images: reconstruction quality, latent statistics, speed, normalisation.

Used by ``tools/measure_vae.py`` and the tests. PSNR/SSIM are computed on [0, 1] images; the recommended
normalisation follows LDM (Rombach et al. 2022, Sec. 4.3.2 / App. D.1): global ``scale = 1 / std`` of the raw
latents (no shift), or per channel ``shift_c = mean_c``, ``scale_c = 1 / std_c``.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F

from .base import Autoencoder

# Real colour photographs bundled with scikit-image (no download needed); "camera" is greyscale, replicated to RGB.
SKIMAGE_PHOTOS = (
    "astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "retina", "camera",
)  # fmt: skip
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def to_square_tensor(image: np.ndarray, size: int) -> torch.Tensor:
    """HxW[xC] uint8 array -> (3, size, size) float32 in [-1, 1]: centre square crop, antialiased bicubic resize."""
    a = np.asarray(image)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=-1)
    if a.ndim != 3 or a.shape[-1] not in (3, 4):
        raise ValueError(f"expected an HxW, HxWx3 or HxWx4 image, got shape {a.shape}")
    a = a[..., :3]
    h, w = a.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    x = torch.from_numpy(np.ascontiguousarray(a[top : top + s, left : left + s])).permute(2, 0, 1).float() / 255
    x = F.interpolate(x[None], size=(size, size), mode="bicubic", antialias=True, align_corners=False)[0]
    return x.clamp(0, 1).mul(2).sub(1)  # (3, size, size)


def skimage_photos(size: int = 256, names: Iterable[str] = SKIMAGE_PHOTOS) -> torch.Tensor:
    """The real photos of ``skimage.data`` -> (N, 3, size, size) in [-1, 1]."""
    import skimage.data

    out = []
    for name in names:
        loader = getattr(skimage.data, name, None)
        if loader is None:
            raise ValueError(f"skimage.data has no image {name!r}")
        out.append(to_square_tensor(loader(), size))
    return torch.stack(out)


def folder_images(folder: str | Path, size: int = 256, max_images: int | None = None) -> torch.Tensor:
    """Images in ``folder`` (recursively, sorted) -> (N, 3, size, size) in [-1, 1]."""
    from PIL import Image

    root = Path(folder).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[:max_images]
    if not files:
        raise FileNotFoundError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
    out = []
    for p in files:
        try:
            with Image.open(p) as im:
                out.append(to_square_tensor(np.asarray(im.convert("RGB")), size))
        except OSError as e:
            raise ValueError(f"{p}: not a readable image ({e})") from None
    return torch.stack(out)


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of two (N, 3, H, W) batches in [-1, 1], measured on the [0, 1] scale -> (N,)."""
    mse = ((a.double() - b.double()) / 2).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-20))


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (skimage, Gaussian-free default window, channels averaged) on [0, 1] images -> (N,)."""
    from skimage.metrics import structural_similarity

    a01 = ((a.double() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    b01 = ((b.double() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    return torch.tensor([structural_similarity(x, y, channel_axis=-1, data_range=1.0) for x, y in zip(a01, b01)])


class LatentStats:
    """Streaming per-channel mean/std of raw latents (float64 sums, so millions of latents stay exact enough)."""

    def __init__(self) -> None:
        self.n = 0
        self.sum: torch.Tensor | None = None
        self.sumsq: torch.Tensor | None = None

    def update(self, z: torch.Tensor) -> None:
        """z: (N, C, h, w) raw latents."""
        z = z.detach().double().cpu()
        s, sq = z.sum(dim=(0, 2, 3)), z.pow(2).sum(dim=(0, 2, 3))  # (C,)
        self.sum = s if self.sum is None else self.sum + s
        self.sumsq = sq if self.sumsq is None else self.sumsq + sq
        self.n += z.shape[0] * z.shape[2] * z.shape[3]

    def result(self) -> dict:
        """Per-channel and global mean/std (population std) and the recommended normalisations."""
        if self.sum is None or self.n == 0:
            raise ValueError("no latents were measured")
        mean = self.sum / self.n  # (C,)
        std = (self.sumsq / self.n - mean.pow(2)).clamp_min(0).sqrt()  # (C,)
        g_mean = float(self.sum.sum() / (self.n * mean.numel()))
        g_std = math.sqrt(max(float(self.sumsq.sum() / (self.n * mean.numel())) - g_mean**2, 0.0))
        return {
            "mean": mean.tolist(),
            "std": std.tolist(),
            "global_mean": g_mean,
            "global_std": g_std,
            "global": {"scale": 1.0 / g_std, "shift": None},
            "per_channel": {"scale": (1.0 / std).tolist(), "shift": mean.tolist()},
        }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_autoencoder(
    ae: Autoencoder, images: torch.Tensor, *, batch_size: int = 16, progress: bool = True, warmup: bool = True
) -> dict:
    """Round-trip ``images`` (N, 3, H, W) in [-1, 1] through ``ae`` in batches.

    Returns a JSON-able dict: ``psnr``/``ssim`` (means, dB / unitless) and per-image lists, raw latent ``stats``
    (see :class:`LatentStats`), ``encode_img_per_s`` / ``decode_img_per_s`` (after one warm-up batch), and the
    autoencoder's spec, fingerprint, latent shape and current normalisation.
    """
    from tqdm.auto import tqdm

    device = next((p.device for p in ae.parameters()), images.device)
    if warmup:  # first calls pay for cuDNN autotuning / lazy init
        _sync(device)
        ae.decode(ae.encode(images[:batch_size].to(device), raw=True), raw=True)
        _sync(device)
    stats = LatentStats()
    t_enc = t_dec = 0.0
    psnrs, ssims = [], []
    latent_shape = None
    for chunk in tqdm(images.split(batch_size), desc=f"measure {ae.spec}", disable=not progress):
        x = chunk.to(device)
        _sync(device)
        t0 = time.perf_counter()
        z = ae.encode(x, batch_size=batch_size, raw=True)  # (n, C, h, w) raw latents
        _sync(device)
        t1 = time.perf_counter()
        y = ae.decode(z, batch_size=batch_size, raw=True)  # (n, 3, H, W)
        _sync(device)
        t_enc, t_dec = t_enc + t1 - t0, t_dec + time.perf_counter() - t1
        latent_shape = list(z.shape[1:])
        stats.update(z)
        psnrs.append(psnr(y.cpu(), chunk))
        ssims.append(ssim(y.cpu(), chunk))
    n = images.shape[0]
    p, s = torch.cat(psnrs), torch.cat(ssims)
    scale = ae.scale.tolist() if isinstance(ae.scale, torch.Tensor) else ae.scale
    return {
        "spec": ae.spec,
        "fingerprint": ae.fingerprint(),
        "num_images": n,
        "image_size": list(images.shape[2:]),
        "latent_shape": latent_shape,
        "current_normalization": {"scale": scale, "shift": None if ae.shift is None else ae.shift.tolist()},
        "psnr": float(p.mean()),
        "ssim": float(s.mean()),
        "psnr_per_image": p.tolist(),
        "ssim_per_image": s.tolist(),
        "encode_img_per_s": n / max(t_enc, 1e-9),
        "decode_img_per_s": n / max(t_dec, 1e-9),
        "device": str(device),
        "stats": stats.result(),
    }


def write_normalization(result: dict, path: str | Path, *, per_channel: bool = False) -> Path:
    """Write ``result`` (from :func:`measure_autoencoder`) as JSON, with the top-level ``scale``/``shift`` that
    :func:`vae.load_autoencoder` reads: global ``1/std`` (default) or per-channel ``shift=mean, scale=1/std``."""
    norm = result["stats"]["per_channel" if per_channel else "global"]
    out = {"scale": norm["scale"], "shift": norm["shift"], "mode": "per_channel" if per_channel else "global", **result}
    p = Path(path).expanduser()
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(out, indent=2) + "\n")
    return p
