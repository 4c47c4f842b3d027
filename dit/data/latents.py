"""Pre-extracted latent shards: a directory with ``manifest.json`` and ``shard_00000.safetensors``, ...

Each shard holds ``latents`` (M, C, h, w) in bf16/fp16/fp32, ``labels`` (M,) int64 and optionally
``latents_flip`` (latents of the horizontally flipped images), ``text_tokens`` (M, L, D) fp16, ``text_mask``
(M, L) uint8 and ``text_pooled`` (M, D) fp16. Shard metadata records what made it (autoencoder fingerprint, source
digest, index range) and a CRC32 of every tensor, so a resumed extraction can tell a finished shard from a stale or
damaged one. The manifest is written last; ``LatentDataset`` refuses a directory without one.
"""

from __future__ import annotations

import json
import os
import warnings
import zlib
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dit.data.flip import flip_decision

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_MAX_OPEN_SHARDS = 64  # LRU of open shard handles (ImageNet has ~1300 shards; stay well under the fd limit)


def shard_name(index: int) -> str:
    """``shard_00042.safetensors``."""
    return f"shard_{index:05d}.safetensors"


def tensor_crc32(t: torch.Tensor) -> str:
    """CRC32 of a CPU tensor's raw bytes, as 8 hex digits."""
    raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    return f"{zlib.crc32(raw) & 0xFFFFFFFF:08x}"


def write_shard(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Atomically write a shard: save to a temp file in the same directory, then ``os.replace`` it into place.

    A ``crc32`` entry (JSON of tensor name -> CRC32) is added to ``metadata``.
    """
    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = dict(metadata)
    meta["crc32"] = json.dumps({k: tensor_crc32(v) for k, v in sorted(tensors.items())})
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the complete new one, never a partial one


def shard_problem(path: str | os.PathLike, expected_metadata: dict[str, str], *, check_data: bool = True) -> str | None:
    """Why the shard at ``path`` is unusable (missing, unreadable, made by something else, damaged), or None.

    ``expected_metadata`` entries must all match the shard's metadata; ``check_data`` also re-computes CRC32s.
    """
    path = Path(path)
    if not path.is_file():
        return "missing"
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            for k, v in expected_metadata.items():
                if meta.get(k) != v:
                    return f"metadata {k}={meta.get(k)!r}, expected {v!r}"
            crcs = json.loads(meta.get("crc32", "{}"))
            if sorted(crcs) != sorted(f.keys()):
                return f"tensors {sorted(f.keys())} do not match the recorded {sorted(crcs)}"
            if check_data:
                for k, crc in crcs.items():
                    if tensor_crc32(f.get_tensor(k)) != crc:
                        return f"tensor {k} is damaged (CRC32 mismatch)"
    except Exception as e:  # truncated header, bad JSON, short file: safetensors raises various errors
        return f"unreadable ({type(e).__name__}: {e})"
    return None


def read_manifest(root: str | os.PathLike) -> dict:
    """Load ``root/manifest.json``; clear errors for a missing directory / manifest / wrong format version."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"latent directory {root} does not exist (make it with tools/extract_latents.py)")
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {root} is not a finished latent directory "
                                "(run or resume tools/extract_latents.py)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} has format_version {manifest.get('format_version')!r}; this code reads "
                         f"version {FORMAT_VERSION}")
    return manifest


def write_manifest(root: str | os.PathLike, manifest: dict) -> None:
    """Atomically write ``root/manifest.json``."""
    path = Path(root) / MANIFEST_NAME
    tmp = path.with_name(f".{MANIFEST_NAME}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, path)


def _fmt_ae(ae: dict | None) -> str:
    if not ae:
        return "none"
    fp = ae.get("fingerprint")
    return f"{ae.get('spec')}" + (f" (fingerprint {fp})" if fp else "")


def _normalise(v):
    """JSON round trip so tuples / lists / ints / floats compare the way they are stored."""
    return json.loads(json.dumps(v))


def check_manifest(manifest: dict, expected: dict, *, where: str | os.PathLike | None = None) -> None:
    """Raise one ``ValueError`` naming every field where ``manifest`` differs from ``expected``.

    ``expected`` keys (all optional): ``autoencoder`` (a spec string, or a dict of any of spec / fingerprint /
    scale / shift / latent_channels / downsample_factor), ``text_encoder`` (spec string, dict, or None for "no
    text"), and any top-level manifest field (``resolution``, ``latent_shape``, ``dtype``, ``has_flip``, ``count``,
    ``class_names``), plus ``num_classes`` (compared with ``len(class_names)``) and ``latent_channels`` /
    ``downsample_factor`` (compared with the autoencoder's).
    E.g. "latents at X were made with autoencoder taef2:/w (fingerprint ab12), but the config asks for identity".
    """
    where = where if where is not None else manifest.get("root", "?")
    problems: list[str] = []
    ae_have = manifest.get("autoencoder") or {}
    for key, want in expected.items():
        if key == "autoencoder":
            want_d = {"spec": want} if isinstance(want, str) else dict(want)
            diff = [k for k, v in want_d.items() if _normalise(v) != _normalise(ae_have.get(k))]
            if diff:
                want_s = _fmt_ae(want_d) if set(want_d) <= {"spec", "fingerprint"} else json.dumps(want_d)
                have_s = _fmt_ae(ae_have) + (
                    "" if set(diff) <= {"spec", "fingerprint"} else f" {json.dumps({k: ae_have.get(k) for k in diff})}")
                problems.append(f"autoencoder {have_s}, but the config asks for {want_s}")
        elif key == "text_encoder":
            have = manifest.get("text_encoder")
            if want is None or have is None:
                if (want is None) != (have is None):
                    have_s = "no text encoder" if have is None else f"text encoder {have.get('spec')}"
                    want_s = "none" if want is None else (want if isinstance(want, str) else want.get("spec"))
                    problems.append(f"{have_s}, but the config asks for {want_s}")
                continue
            want_d = {"spec": want} if isinstance(want, str) else dict(want)
            diff = {k: have.get(k) for k, v in want_d.items() if _normalise(v) != _normalise(have.get(k))}
            if diff:
                problems.append(f"text encoder {json.dumps(diff)}, but the config asks for "
                                f"{json.dumps({k: want_d[k] for k in diff})}")
        elif key == "num_classes":
            have = len(manifest.get("class_names") or [])
            if have != want:
                problems.append(f"{have} classes, but the config asks for {want}")
        elif key in ("latent_channels", "downsample_factor"):
            if ae_have.get(key) != want:
                problems.append(f"{key} {ae_have.get(key)}, but the config asks for {want}")
        elif key in manifest:
            if _normalise(manifest[key]) != _normalise(want):
                problems.append(f"{key} {json.dumps(manifest[key])}, but the config asks for {json.dumps(want)}")
        else:
            raise ValueError(f"check_manifest: unknown expected field {key!r}; manifest fields are "
                             f"{sorted(manifest)} plus num_classes, latent_channels, downsample_factor")
    if problems:
        raise ValueError(f"latents at {where} were made with " + "; ".join(problems))


class LatentDataset(torch.utils.data.Dataset):
    """Items ``{"latent": (C, h, w) float32, "label": int}`` from a latent directory, plus ``"context"`` (L, D),
    ``"context_mask"`` (L,) bool and ``"pooled"`` (D,) float32 when text embeddings were extracted.

    Rows are read lazily through memory-mapped ``safe_open`` handles (an LRU of open shards), so the dataset costs
    no RAM up front and works in DataLoader workers. With ``flip=True`` and flipped copies present, item i in epoch
    e returns ``latents_flip`` iff ``flip_decision(seed, e, i)``; call ``set_epoch`` every epoch. ``expect`` is
    passed to ``check_manifest`` (e.g. ``{"autoencoder": "identity", "resolution": 32}``).
    """

    def __init__(self, root, *, flip: bool = True, expect: dict | None = None, seed: int = 0):
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        if expect:
            check_manifest(self.manifest, expect, where=self.root)
        m = self.manifest
        self.count = int(m["count"])
        self.shard_size = int(m["shard_size"])
        self.num_shards = int(m["num_shards"])
        missing = [shard_name(i) for i in range(self.num_shards) if not (self.root / shard_name(i)).is_file()]
        if missing:
            raise FileNotFoundError(f"latent directory {self.root} is missing {len(missing)} shard(s), e.g. "
                                    f"{missing[0]} (resume tools/extract_latents.py to redo them)")
        self.has_flip = bool(m.get("has_flip"))
        if flip and not self.has_flip:
            warnings.warn(f"latents at {self.root} have no flipped copies (extract with --flip); flip=True has no "
                          "effect", stacklevel=2)
        self.flip = bool(flip) and self.has_flip
        self.has_text = m.get("text_encoder") is not None
        self.seed = int(seed)
        self.epoch = 0
        self._handles: OrderedDict[int, object] = OrderedDict()

    @property
    def class_names(self) -> list[str] | None:
        return self.manifest.get("class_names")

    @property
    def num_classes(self) -> int:
        return len(self.class_names or [])

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return tuple(self.manifest["latent_shape"])

    def set_epoch(self, epoch: int) -> None:
        """Select the flip pattern of ``epoch``."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.count

    def __getstate__(self):  # open file handles do not pickle; each DataLoader worker opens its own
        state = self.__dict__.copy()
        state["_handles"] = OrderedDict()
        return state

    def _handle(self, shard: int):
        h = self._handles.get(shard)
        if h is None:
            h = safe_open(str(self.root / shard_name(shard)), framework="pt")
            self._handles[shard] = h
            if len(self._handles) > _MAX_OPEN_SHARDS:
                self._handles.popitem(last=False)
        else:
            self._handles.move_to_end(shard)
        return h

    def __getitem__(self, index: int) -> dict:
        if not -self.count <= index < self.count:
            raise IndexError(f"index {index} out of range for {self.count} latents in {self.root}")
        index %= self.count
        shard, row = divmod(index, self.shard_size)
        h = self._handle(shard)
        key = "latents_flip" if self.flip and flip_decision(self.seed, self.epoch, index) else "latents"
        item = {
            "latent": h.get_slice(key)[row : row + 1][0].float(),  # (C, h, w)
            "label": int(h.get_slice("labels")[row : row + 1][0]),
        }
        if self.has_text:
            item["context"] = h.get_slice("text_tokens")[row : row + 1][0].float()  # (L, D)
            item["context_mask"] = h.get_slice("text_mask")[row : row + 1][0].bool()  # (L,)
            item["pooled"] = h.get_slice("text_pooled")[row : row + 1][0].float()  # (D,)
        return item
