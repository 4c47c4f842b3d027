"""Encode an image dataset once into latent shards (the logic behind ``tools/extract_latents.py``).

Multi-process through Accelerate: shard i is handled by process ``i % world_size``. Resumable: a shard that is
present, made by the same autoencoder / source / settings and passes its CRC32 check is skipped; every shard is
written to a temp file and ``os.replace``d; the manifest is written last by the main process after a barrier.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch.utils.data import DataLoader, Subset

from dit.data.latents import (
    DTYPES,
    FORMAT_VERSION,
    MANIFEST_NAME,
    check_manifest,
    read_manifest,
    shard_name,
    shard_problem,
    write_manifest,
    write_shard,
)


def _jsonable(v):
    """Tensors / tuples -> JSON values (per-channel scale / shift become lists)."""
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, (tuple, list)):
        return [_jsonable(x) for x in v]
    return v


def autoencoder_info(autoencoder) -> dict:
    """The manifest's ``autoencoder`` record: spec, fingerprint, scale, shift, latent_channels, downsample_factor."""
    fp = autoencoder.fingerprint() if hasattr(autoencoder, "fingerprint") else None
    return {
        "spec": autoencoder.spec,
        "fingerprint": fp,
        "scale": _jsonable(autoencoder.scale),
        "shift": _jsonable(autoencoder.shift),
        "latent_channels": int(autoencoder.latent_channels),
        "downsample_factor": int(autoencoder.downsample_factor),
    }


def text_encoder_info(text_encoder) -> dict | None:
    """The manifest's ``text_encoder`` record (spec, dim, max_length[, fingerprint]) or None."""
    if text_encoder is None:
        return None
    info = {"spec": text_encoder.spec, "dim": int(text_encoder.dim), "max_length": int(text_encoder.max_length)}
    if hasattr(text_encoder, "fingerprint"):
        info["fingerprint"] = text_encoder.fingerprint()
    return info


def _digest(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def extract_latents(
    dataset,
    autoencoder,
    out_dir: str | os.PathLike,
    *,
    batch_size: int = 64,
    shard_size: int = 1000,
    dtype: str = "bf16",
    flip: bool = False,
    text_encoder=None,
    num_workers: int = 0,
    accelerator=None,
    progress: bool = True,
) -> dict:
    """Encode ``dataset`` (items with "image" (3, R, R) in [-1, 1], "label", "caption") into shards in ``out_dir``.

    ``autoencoder``: a ``vae`` autoencoder already on ``accelerator.device``; ``text_encoder`` (optional) stores
    caption embeddings; ``flip`` also stores latents of the horizontally flipped images. Returns stats of this run:
    ``{"images": encoded this run (all processes), "seconds", "img_per_s", "written": [shard ids], "skipped":
    [shard ids], "num_shards"}``. Raises ``ValueError`` if ``out_dir`` holds a manifest made differently.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {sorted(DTYPES)}, got {dtype!r}")
    if shard_size < 1 or batch_size < 1:
        raise ValueError(f"shard_size and batch_size must be positive, got {shard_size} and {batch_size}")
    if len(dataset) == 0:
        raise ValueError("extract_latents: the dataset is empty")
    if accelerator is None:
        accelerator = Accelerator()
    out = Path(out_dir)
    rank, world = accelerator.process_index, accelerator.num_processes
    ae_info = autoencoder_info(autoencoder)
    te_info = text_encoder_info(text_encoder)
    source = getattr(dataset, "source", {"kind": type(dataset).__name__, "num_samples": len(dataset)})
    count = len(dataset)
    num_shards = math.ceil(count / shard_size)
    resolution = int(getattr(dataset, "resolution"))
    f = ae_info["downsample_factor"]
    if resolution % f:
        raise ValueError(f"resolution {resolution} is not a multiple of the autoencoder's downsample factor {f}")
    latent_shape = [ae_info["latent_channels"], resolution // f, resolution // f]
    class_names = getattr(dataset, "classes", None)

    if (out / MANIFEST_NAME).is_file():  # a finished (or resumed-and-finished) run: refuse to mix two extractions
        try:
            check_manifest(read_manifest(out), {"autoencoder": ae_info, "text_encoder": te_info, "dtype": dtype,
                                                "has_flip": flip, "count": count, "latent_shape": latent_shape,
                                                "source": source}, where=out)
        except ValueError as e:
            raise ValueError(f"{e} (refusing to mix two extractions: choose another output directory or delete "
                             f"{out})") from None
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()

    # Everything a shard's content depends on; a shard whose metadata differs is stale and is redone.
    run_meta = {
        "format_version": str(FORMAT_VERSION),
        "autoencoder": _digest(ae_info),
        "text_encoder": _digest(te_info),
        "source": _digest(source),
        "dtype": dtype,
        "has_flip": str(int(flip)),
        "shard_size": str(shard_size),
        "count": str(count),
    }
    mine = [i for i in range(num_shards) if i % world == rank]
    todo, skipped = [], []
    for i in mine:
        (skipped if shard_problem(out / shard_name(i), {**run_meta, "index": str(i)}) is None else todo).append(i)

    n_todo = sum(min(count, (i + 1) * shard_size) - i * shard_size for i in todo)
    bar = None
    if progress and accelerator.is_main_process:
        from tqdm import tqdm

        bar = tqdm(total=n_todo, unit="img", desc=f"encoding ({world} process{'es' if world > 1 else ''})")
    device = accelerator.device
    store = DTYPES[dtype]
    t0 = time.perf_counter()
    encoded = 0
    for i in todo:
        start, stop = i * shard_size, min(count, (i + 1) * shard_size)
        loader = DataLoader(Subset(dataset, range(start, stop)), batch_size=batch_size, shuffle=False,
                            num_workers=num_workers, pin_memory=device.type == "cuda", drop_last=False)
        parts: dict[str, list[torch.Tensor]] = {}
        for batch in loader:
            x = batch["image"].to(device, non_blocking=True)  # (B, 3, R, R) in [-1, 1]
            n = x.shape[0]
            with torch.inference_mode():
                if flip:  # one forward pass for both orientations
                    z = autoencoder.encode(torch.cat([x, torch.flip(x, dims=[-1])]))  # (2B, C, h, w)
                    z, z_flip = z[:n], z[n:]
                    parts.setdefault("latents_flip", []).append(z_flip.to("cpu", store))
                else:
                    z = autoencoder.encode(x)  # (B, C, h, w)
                if list(z.shape[1:]) != latent_shape:
                    raise ValueError(f"autoencoder {ae_info['spec']} returned latents of shape {list(z.shape[1:])}, "
                                     f"expected {latent_shape}")
                parts.setdefault("latents", []).append(z.to("cpu", store))
                parts.setdefault("labels", []).append(torch.as_tensor(batch["label"], dtype=torch.int64))
                if text_encoder is not None:
                    emb = text_encoder.encode(list(batch["caption"]))
                    parts.setdefault("text_tokens", []).append(emb["tokens"].to("cpu", torch.float16))  # (B, L, D)
                    parts.setdefault("text_mask", []).append(emb["mask"].to("cpu", torch.uint8))  # (B, L)
                    parts.setdefault("text_pooled", []).append(emb["pooled"].to("cpu", torch.float16))  # (B, D)
            encoded += n
            if bar is not None:
                bar.update(n)
        tensors = {k: torch.cat(v) for k, v in parts.items()}
        write_shard(out / shard_name(i), tensors,
                    {**run_meta, "index": str(i), "start": str(start), "written_by": f"{rank}/{world}"})
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - t0

    # Totals over processes, then the manifest, written last by the main process once every shard is in place.
    stats = torch.tensor([[encoded, seconds]], dtype=torch.float64, device=device)  # (1, 2)
    stats = accelerator.gather(stats) if world > 1 else stats  # (world, 2)
    n_total, secs = int(stats[:, 0].sum().item()), float(stats[:, 1].max().item())
    written = sorted(gather_object(todo)) if world > 1 else todo
    skipped_all = sorted(gather_object(skipped)) if world > 1 else skipped
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        bad = [(i, p) for i in range(num_shards)
               if (p := shard_problem(out / shard_name(i), {**run_meta, "index": str(i)}, check_data=False))]
        if bad:
            raise RuntimeError(f"{out}: shard {shard_name(bad[0][0])} is {bad[0][1]} after extraction; "
                               "not writing the manifest (re-run to redo it)")
        write_manifest(out, {
            "format_version": FORMAT_VERSION,
            "autoencoder": ae_info,
            "resolution": resolution,
            "latent_shape": latent_shape,
            "count": count,
            "shard_size": shard_size,
            "num_shards": num_shards,
            "dtype": dtype,
            "class_names": class_names,
            "has_flip": bool(flip),
            "text_encoder": te_info,
            "source": source,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        })
    accelerator.wait_for_everyone()
    return {"images": n_total, "seconds": secs, "img_per_s": n_total / secs if secs > 0 else 0.0,
            "written": written, "skipped": skipped_all, "num_shards": num_shards}


def check_data(data: str) -> None:
    """Raise a one-line FileNotFoundError unless ``--data`` is ``"shapes"`` or an existing folder (cheap: no scan)."""
    if data != "shapes" and not Path(data).is_dir():
        raise FileNotFoundError(f"--data {data}: no such directory (expected 'shapes' or a dataset folder)")


def open_dataset(data: str, *, resolution: int, num_samples: int | None = None, seed: int = 0,
                 split: str = "train", captions: bool = False, skip_bad: bool = False):
    """The dataset named by ``--data``: ``"shapes"`` (bundled), a caption folder (``captions=True`` or a
    ``captions.jsonl`` in it) or an ImageFolder. Never flips (flipped copies are encoded separately)."""
    from dit.data.folders import CaptionDataset, ImageFolderDataset
    from dit.data.shapes import ShapesDataset

    check_data(data)
    if data == "shapes":
        return ShapesDataset(resolution=resolution, num_samples=num_samples, seed=seed, split=split)
    root = Path(data)
    if captions or (root / "captions.jsonl").is_file():
        return CaptionDataset(root, resolution=resolution, skip_bad=skip_bad)
    return ImageFolderDataset(root, resolution=resolution, skip_bad=skip_bad)
