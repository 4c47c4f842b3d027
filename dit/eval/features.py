"""Image sources (``.npz`` in the ADM layout or image folders), Inception activations and cached statistics."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image

from .metrics import feature_statistics, frechet_distance, inception_score, precision_recall

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def _folder_files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def count_images(source: str | os.PathLike) -> int:
    """Number of images in an ``.npz`` (``arr_0``) or an image folder (recursive)."""
    path = Path(source)
    if path.suffix == ".npz":
        with np.load(path, mmap_mode="r") as data:
            return int(_npz_images(data, path).shape[0])
    return len(_folder_files(path))


def _npz_images(data, path: Path) -> np.ndarray:
    if "arr_0" not in data.files:
        raise ValueError(f"{path}: expected an 'arr_0' array of uint8 NHWC images, found keys {data.files}")
    arr = data["arr_0"]
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"{path}: 'arr_0' must be uint8 (N, H, W, 3) images, got {arr.dtype} {arr.shape}")
    return arr


def iter_images(source: str | os.PathLike, batch_size: int) -> Iterator[np.ndarray]:
    """Yield uint8 (B, H, W, 3) batches from ``source``: an ``.npz`` with ``arr_0`` NHWC uint8, or an image folder.

    Folder images of different sizes are yielded one per batch (the network resizes each to 299x299 anyway).
    """
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such .npz file or image folder")
    if path.is_file():
        if path.suffix != ".npz":
            raise ValueError(f"{path}: expected an .npz file (arr_0 = uint8 NHWC images) or an image folder")
        with np.load(path) as data:
            arr = _npz_images(data, path)
        for i in range(0, arr.shape[0], batch_size):
            yield arr[i : i + batch_size]
        return
    files = _folder_files(path)
    if not files:
        raise ValueError(f"{path}: the folder holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    batch: list[np.ndarray] = []
    for f in files:
        img = np.asarray(Image.open(f).convert("RGB"), dtype=np.uint8)
        if batch and img.shape != batch[0].shape:
            yield np.stack(batch)
            batch = []
        batch.append(img)
        if len(batch) == batch_size:
            yield np.stack(batch)
            batch = []
    if batch:
        yield np.stack(batch)


@torch.no_grad()
def compute_activations(source: str | os.PathLike, network: torch.nn.Module, batch_size: int = 64,
                        device: torch.device | str | None = None, progress: bool = False) -> dict[str, np.ndarray]:
    """Run ``network`` (e.g. ``FIDInceptionV3``) over every image of ``source``.

    Returns ``{"pool": (N, 2048), "spatial": (N, 2023), "logits": (N, 1008)}`` float32 arrays (whatever keys the
    network's output dict has).
    """
    from tqdm import tqdm

    device = torch.device(device) if device is not None else next(network.parameters()).device
    outs: dict[str, list[np.ndarray]] = {}
    it = iter_images(source, batch_size)
    for batch in tqdm(it, desc=f"features {Path(source).name}", unit="batch", disable=not progress):
        x = torch.from_numpy(np.ascontiguousarray(batch)).to(device).permute(0, 3, 1, 2).float() / 255.0  # (B, 3, H, W)
        for key, val in network(x).items():
            outs.setdefault(key, []).append(val.float().cpu().numpy())
    return {k: np.concatenate(v) for k, v in outs.items()}


def _source_key(source: str | os.PathLike, extractor_id: str) -> str:
    """Cache key: absolute path + size + mtime of the source (every file for folders) + the feature extractor id."""
    path = Path(source).resolve()
    h = hashlib.sha1(f"{path}|{extractor_id}".encode())
    files = [path] if path.is_file() else _folder_files(path)
    for f in files:
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def extractor_id(weights_path: str | os.PathLike | None) -> str:
    """Identify a feature extractor by its weights file name and size (``"random"`` when unweighted)."""
    if weights_path is None:
        return "random"
    p = Path(weights_path)
    return f"{p.name}:{p.stat().st_size}"


def reference_statistics(source: str | os.PathLike, network: torch.nn.Module, *, extractor: str,
                         cache_dir: str | os.PathLike | None = None, batch_size: int = 64,
                         device: torch.device | str | None = None, progress: bool = False) -> dict[str, np.ndarray]:
    """``mu``/``sigma`` (pool), ``mu_s``/``sigma_s`` (spatial), ``pool`` features and ``logits`` of a source.

    With ``cache_dir`` the result is stored as ``<cache_dir>/<name>-<key>.npz``, keyed by the source (path, sizes,
    mtimes) and ``extractor`` (see ``extractor_id``), and reused on the next call.
    """
    cache_file = None
    if cache_dir is not None:
        cache_file = Path(cache_dir) / f"{Path(source).stem}-{_source_key(source, extractor)}.npz"
        if cache_file.is_file():
            with np.load(cache_file) as data:
                return {k: data[k] for k in data.files}
    acts = compute_activations(source, network, batch_size=batch_size, device=device, progress=progress)
    mu, sigma = feature_statistics(acts["pool"])
    mu_s, sigma_s = feature_statistics(acts["spatial"])
    stats = {"mu": mu, "sigma": sigma, "mu_s": mu_s, "sigma_s": sigma_s, "pool": acts["pool"], "logits": acts["logits"]}
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(".tmp.npz")
        np.savez(tmp, **stats)
        os.replace(tmp, cache_file)  # atomic: a crash never leaves a truncated cache entry
    return stats


def evaluate_sources(sample: str | os.PathLike, reference: str | os.PathLike, network: torch.nn.Module, *,
                     extractor: str, cache_dir: str | os.PathLike | None = None, batch_size: int = 64,
                     device: torch.device | str | None = None, progress: bool = False,
                     pr_k: int = 3, fd_method: str = "sqrtm") -> dict[str, float]:
    """FID, sFID, Inception Score and precision/recall of ``sample`` against ``reference`` (ADM evaluator metrics).

    ``fd_method``: ``"sqrtm"`` (scipy, the reference) or ``"eigh"`` (same value, much faster; see ``frechet_distance``).
    """
    ref = reference_statistics(reference, network, extractor=extractor, cache_dir=cache_dir, batch_size=batch_size,
                               device=device, progress=progress)
    smp = reference_statistics(sample, network, extractor=extractor, cache_dir=cache_dir, batch_size=batch_size,
                               device=device, progress=progress)
    is_mean, is_std = inception_score(smp["logits"], splits=min(10, smp["logits"].shape[0]))
    precision, recall = precision_recall(ref["pool"], smp["pool"], k=pr_k)
    return {
        "fid": frechet_distance(smp["mu"], smp["sigma"], ref["mu"], ref["sigma"], method=fd_method),
        "sfid": frechet_distance(smp["mu_s"], smp["sigma_s"], ref["mu_s"], ref["sigma_s"], method=fd_method),
        "is": is_mean,
        "is_std": is_std,
        "precision": precision,
        "recall": recall,
        "num_samples": int(smp["pool"].shape[0]),
        "num_reference": int(ref["pool"].shape[0]),
    }


def write_json(metrics: dict, path: str | os.PathLike) -> None:
    """Write metrics as indented JSON."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(metrics, indent=2) + "\n")
