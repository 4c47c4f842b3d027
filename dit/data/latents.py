"""Pre-extracted latent shards: a directory with ``manifest.json`` and ``shard_00000.safetensors``, ...

Each shard holds ``latents`` (M, C, h, w) in bf16/fp16/fp32, ``labels`` (M,) int64 and optionally
``latents_flip`` (latents of the horizontally flipped images), ``text_tokens`` (M, L, D) fp16, ``text_mask``
(M, L) uint8 and ``text_pooled`` (M, D) fp16. Shard metadata records what made it (autoencoder fingerprint, source
digest, index range) and a CRC32 of every tensor, so a resumed extraction can tell a finished shard from a stale or
damaged one. The manifest is written last; ``LatentDataset`` refuses a directory without one.
"""

from __future__ import annotations

import json
import mmap
import os
import warnings
import zlib
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_MAX_OPEN_SHARDS = 64  # LRU of open shard handles (ImageNet has ~1300 shards; stay well under the fd limit)
IN_MEMORY_AUTO_BYTES = 8 * 2**30  # in_memory="auto" loads the shards into RAM when they total less than this
_MASK64 = (1 << 64) - 1


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



def _signed64(c: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits (torch has no general uint64 arithmetic)."""
    c &= _MASK64
    return c - (1 << 64) if c >= 1 << 63 else c


_SM_ADD, _SM_MUL1, _SM_MUL2 = (_signed64(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))


def _lsr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bits (``>>`` on int64 is arithmetic: mask off the copied sign bits)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def flip_mask(seed: int, epoch: int, indices: torch.Tensor) -> torch.Tensor:
    """``flip_decision(seed, epoch, i)`` for every i of ``indices`` (B,) int64 at once -> (B,) bool.

    The same SplitMix64 chain as ``dit.data.flip.hash_unit`` in wrapping int64 arithmetic (two's complement, so the
    bits equal uint64 arithmetic). ``hash_unit < 0.5`` keeps the top 53 bits, so it holds iff bit 63 is clear, i.e.
    iff the int64 result is >= 0.
    """
    from dit.data.flip import _splitmix64

    prefix = _splitmix64(_splitmix64(int(seed) & _MASK64) ^ (int(epoch) & _MASK64))  # keys 1-2 are per batch
    x = indices.to(torch.int64) ^ _signed64(prefix)
    x = x + _SM_ADD
    x = (x ^ _lsr(x, 30)) * _SM_MUL1
    x = (x ^ _lsr(x, 27)) * _SM_MUL2
    x = x ^ _lsr(x, 31)
    return x >= 0


_NP_DTYPES = {"BF16": np.int16, "F16": np.float16, "F32": np.float32, "F64": np.float64, "I64": np.int64,
              "I32": np.int32, "U8": np.uint8, "BOOL": np.bool_}  # BF16: same bits as int16 (numpy has no bf16)


def map_shard(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read-only zero-copy numpy views of every tensor in a safetensors file (bf16 as int16 bits).

    One ``mmap`` of the file: rows are paged in on first use and the page cache is shared by all processes (DDP
    ranks, DataLoader workers), so shards larger than RAM still read at memory speed once cached.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable safetensors shard ({type(e).__name__}: {e})") from None
    views = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _NP_DTYPES:
            raise ValueError(f"{path}: tensor {name} has dtype {info['dtype']}, expected one of {sorted(_NP_DTYPES)}")
        dt = np.dtype(_NP_DTYPES[info["dtype"]])
        begin, end = info["data_offsets"]
        views[name] = np.frombuffer(mm, dtype=dt, count=(end - begin) // dt.itemsize,
                                    offset=8 + n + begin).reshape(info["shape"])
    return views


def gather_rows(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``t[idx]`` along dim 0 for a CPU tensor: (N, ...) x (B,) -> (B, ...).

    Copies rows with numpy's ``take`` in the calling thread: a gather of a few MB gains nothing from torch's intra-op
    thread pool, and on a busy host the contended pool made ``index_select`` ~50x slower (12 ms instead of 0.25 ms
    for 256 rows of 32x16x16 bf16 on 2 shared cores; tools/bench_data.py).
    """
    bf16 = t.dtype == torch.bfloat16
    src = (t.view(torch.int16) if bf16 else t).numpy()  # numpy has no bf16: move the same bits as int16
    out = torch.from_numpy(np.take(src, idx.numpy(), axis=0))
    return out.view(torch.bfloat16) if bf16 else out


class LatentDataset(torch.utils.data.Dataset):
    """Items ``{"latent": (C, h, w) float32, "label": int}`` from a latent directory, plus ``"context"`` (L, D),
    ``"context_mask"`` (L,) bool and ``"pooled"`` (D,) float32 when text embeddings were extracted.

    ``in_memory``: True loads every shard into contiguous RAM tensors at construction (the flipped copies after the
    originals, so a flipped row is one more offset); False reads rows lazily from memory-mapped shard files
    (an LRU of mapped shards: no RAM up front, the page cache is shared by all processes, works in DataLoader
    workers); ``"auto"`` loads when the shard files total less than ``IN_MEMORY_AUTO_BYTES`` (8 GiB).
    ``get_batch(indices)`` returns a whole batch of stacked tensors (one row gather per field in memory) equal to
    collating the items one by one.

    With ``flip=True`` and flipped copies present, item i in epoch e returns ``latents_flip`` iff
    ``flip_decision(seed, e, i)``; call ``set_epoch`` every epoch. ``expect`` is passed to ``check_manifest``
    (e.g. ``{"autoencoder": "identity", "resolution": 32}``).
    """

    def __init__(self, root, *, flip: bool = True, expect: dict | None = None, seed: int = 0,
                 in_memory: bool | str = "auto"):
        if in_memory not in (True, False, "auto"):
            raise ValueError(f"LatentDataset: in_memory must be True, False or 'auto', got {in_memory!r}")
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
        if in_memory == "auto":
            total = sum((self.root / shard_name(i)).stat().st_size for i in range(self.num_shards))
            in_memory = total < IN_MEMORY_AUTO_BYTES
        self.in_memory = bool(in_memory)
        self._mem: dict[str, torch.Tensor] = self._load_all() if self.in_memory else {}

    def _load_all(self) -> dict[str, torch.Tensor]:
        """Every shard -> contiguous tensors: ``latents`` (N or 2N, C, h, w) in the stored dtype (rows N + i are the
        flipped copies when ``flip``), ``labels`` (N,) int64, and ``text_tokens`` (N, L, D), ``text_mask`` (N, L)
        bool, ``text_pooled`` (N, D) when text was extracted."""
        n = self.count
        keys = ["latents", "labels"] + (["text_tokens", "text_mask", "text_pooled"] if self.has_text else [])
        mem: dict[str, torch.Tensor] = {}
        for s in range(self.num_shards):
            path = self.root / shard_name(s)
            lo, hi = s * self.shard_size, min(n, (s + 1) * self.shard_size)
            with safe_open(str(path), framework="pt") as f:
                for key in keys + (["latents_flip"] if self.flip else []):
                    if key not in f.keys():
                        raise ValueError(f"{path} has no tensor {key!r} although {self.root / MANIFEST_NAME} "
                                         "says it should (re-extract that shard)")
                    t = f.get_tensor(key)
                    if t.shape[0] != hi - lo:
                        raise ValueError(f"{path}: {key} has {t.shape[0]} rows, expected {hi - lo} from the manifest "
                                         f"(count {n}, shard_size {self.shard_size})")
                    if key == "text_mask":
                        t = t.bool()
                    dst = "latents" if key == "latents_flip" else key
                    if dst not in mem:  # allocate once the first shard tells the row shape and dtype
                        rows = 2 * n if (dst == "latents" and self.flip) else n
                        mem[dst] = torch.empty((rows, *t.shape[1:]), dtype=t.dtype)
                    off = n if key == "latents_flip" else 0
                    mem[dst][off + lo: off + hi] = t
        return mem

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

    def __getstate__(self):  # memory maps do not pickle; each DataLoader worker maps the shards itself
        state = self.__dict__.copy()
        state["_handles"] = OrderedDict()
        return state

    def _views(self, shard: int) -> dict[str, np.ndarray]:
        """Memory-mapped views of one shard's tensors (an LRU of ``_MAX_OPEN_SHARDS`` mapped files)."""
        v = self._handles.get(shard)
        if v is None:
            v = map_shard(self.root / shard_name(shard))
            self._handles[shard] = v
            if len(self._handles) > _MAX_OPEN_SHARDS:
                self._handles.popitem(last=False)
        else:
            self._handles.move_to_end(shard)
        return v

    def _check_indices(self, idx: torch.Tensor) -> torch.Tensor:
        """(B,) int64 in [-count, count) -> the same indices in [0, count); IndexError names the bad one."""
        if idx.numel() and (int(idx.min()) < -self.count or int(idx.max()) >= self.count):
            bad = idx[(idx < -self.count) | (idx >= self.count)][0]
            raise IndexError(f"index {int(bad)} out of range for {self.count} latents in {self.root}")
        return torch.where(idx < 0, idx + self.count, idx)

    def _read_rows(self, idx: torch.Tensor, flips: torch.Tensor) -> dict[str, torch.Tensor]:
        """Rows ``idx`` (B,) from the memory-mapped shards, stacked in the stored dtypes; ``flips`` (B,) bool picks
        ``latents_flip``. One row copy per field and item (no per-item tensors, no collate)."""
        fields = {"latent": "latents", "label": "labels"}
        if self.has_text:
            fields.update(context="text_tokens", context_mask="text_mask", pooled="text_pooled")
        out: dict[str, np.ndarray] = {}
        for j, (i, f) in enumerate(zip(idx.tolist(), flips.tolist())):
            shard, row = divmod(i, self.shard_size)
            v = self._views(shard)
            for field, key in fields.items():
                src = v["latents_flip" if f and key == "latents" else key]
                if field not in out:  # allocate once the first row tells the shape and dtype
                    out[field] = np.empty((len(idx), *src.shape[1:]), dtype=src.dtype)
                out[field][j] = src[row]
        batch = {k: torch.from_numpy(a) for k, a in out.items()}
        if batch.get("latent") is not None and batch["latent"].dtype == torch.int16:  # map_shard's bf16 bits
            batch["latent"] = batch["latent"].view(torch.bfloat16)
        if "context_mask" in batch:
            batch["context_mask"] = batch["context_mask"].bool()
        return batch

    def get_batch(self, indices, *, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Items ``indices`` (B,) stacked: ``latent`` (B, C, h, w), ``label`` (B,) int64, and with text ``context``
        (B, L, D), ``context_mask`` (B, L) bool, ``pooled`` (B, D); flips exactly as ``self[i]`` in this epoch.

        ``dtype`` converts the float fields (``torch.float32`` gives what collating ``self[i]`` gives); None keeps
        the stored dtype (bf16 shards: half the bytes to pin and copy to the GPU, which converts them).
        """
        idx = self._check_indices(torch.as_tensor(indices, dtype=torch.int64).reshape(-1))  # (B,)
        if self.in_memory:
            mem = self._mem
            rows = idx + self.count * flip_mask(self.seed, self.epoch, idx) if self.flip else idx  # (B,)
            batch = {"latent": gather_rows(mem["latents"], rows), "label": gather_rows(mem["labels"], idx)}
            if self.has_text:
                batch["context"] = gather_rows(mem["text_tokens"], idx)  # (B, L, D)
                batch["context_mask"] = gather_rows(mem["text_mask"], idx)  # (B, L)
                batch["pooled"] = gather_rows(mem["text_pooled"], idx)  # (B, D)
        else:
            flips = flip_mask(self.seed, self.epoch, idx) if self.flip else torch.zeros(len(idx), dtype=torch.bool)
            batch = self._read_rows(idx, flips)
        if dtype is not None:
            batch = {k: v.to(dtype) if v.is_floating_point() else v for k, v in batch.items()}
        return batch

    def __getitem__(self, index: int) -> dict:
        if not -self.count <= index < self.count:
            raise IndexError(f"index {index} out of range for {self.count} latents in {self.root}")
        index %= self.count
        item = {k: v[0] for k, v in self.get_batch([index], dtype=torch.float32).items()}
        item["label"] = int(item["label"])
        return item


def make_synthetic_latents(root: str | os.PathLike, *, count: int, shape: tuple[int, int, int], shard_size: int,
                           num_classes: int = 1000, seed: int = 0) -> Path:
    """A latent directory of random bf16 latents (with flipped copies) in the format ``LatentDataset`` reads, for
    benchmarks (``tools/bench_data.py``, ``tools/bench_trainer.py``): autoencoder spec ``"synthetic"``. Returns root."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    num_shards = -(-count // shard_size)
    for s in range(num_shards):
        m = min(count, (s + 1) * shard_size) - s * shard_size
        lat = torch.randn((m, *shape), generator=g).to(torch.bfloat16)  # (M, C, h, w)
        write_shard(root / shard_name(s), {"latents": lat, "latents_flip": lat.flip(-1),
                                           "labels": torch.randint(0, num_classes, (m,), generator=g)},
                    {"index": str(s)})
    # resolution: the image size of an 8x-downsampling autoencoder (sd-vae: 4x32x32 latents <- 256 px)
    write_manifest(root, {"format_version": FORMAT_VERSION, "autoencoder": {"spec": "synthetic"},
                          "resolution": 8 * shape[-1],
                          "latent_shape": list(shape), "count": count, "shard_size": shard_size,
                          "num_shards": num_shards, "dtype": "bf16",
                          "class_names": [str(i) for i in range(num_classes)], "has_flip": True,
                          "text_encoder": None, "source": "synthetic"})
    return root
