"""Image datasets on disk: class-subfolder ImageFolders and image + caption folders.

Preprocessing is ADM's / DiT's ``center_crop_arr``. Every file is checked up front (PIL header ``verify()``, plus an
end-of-image marker check for JPEGs) so that a bad file is reported before a long run starts, not hours into it.
Grayscale, palette and 16-bit images are converted to RGB; transparency is composited on white.
"""

from __future__ import annotations

import json
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from dit.data.flip import flip_decision

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
# Files that may sit next to images and are not images: never reported.
_SIDECAR_EXTENSIONS = (".txt", ".json", ".jsonl", ".csv", ".md")


class BadImageError(ValueError):
    """An image file that cannot be read (missing, truncated, not an image)."""


def center_crop_arr(pil_image: Image.Image, image_size: int) -> Image.Image:
    """ADM / DiT preprocessing: resize so the short side is ``image_size``, then centre-crop a square.

    While the short side is at least ``2 * image_size`` the image is halved with a BOX filter (cheap, alias-free
    2x2 averaging); one BICUBIC resize then brings the short side to exactly ``image_size`` (sizes rounded), and
    the centre ``image_size`` square is cut out (offsets floored). Matches ``guided_diffusion`` /
    ``facebookresearch/DiT`` pixel for pixel. Returns an ``image_size`` x ``image_size`` PIL image.
    """
    img = pil_image
    while min(img.size) >= 2 * image_size:
        img = img.resize((img.size[0] // 2, img.size[1] // 2), resample=Image.BOX)
    ratio = image_size / min(img.size)
    img = img.resize((round(img.size[0] * ratio), round(img.size[1] * ratio)), resample=Image.BICUBIC)
    arr = np.asarray(img)  # (H, W[, C])
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[top : top + image_size, left : left + image_size])


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: transparency composited on white, 16-bit grayscale scaled (not clipped) to 8 bits."""
    if img.mode == "RGB":
        return img
    if img.mode == "P":  # palette: may carry a transparent index
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode in ("L", "RGB") and "transparency" in img.info:  # tRNS colour key
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if img.mode.startswith("I") or img.mode == "F":
        arr = np.asarray(img).astype(np.float64)
        if img.mode.startswith("I;16") or (img.mode == "I" and arr.max(initial=0) > 255):
            arr = arr / 257.0  # 0..65535 -> 0..255
        gray = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def _check_file(path: str) -> tuple[str | None, str]:
    """Cheap validity check -> (reason it is bad or None, PIL mode)."""
    try:
        with Image.open(path) as im:
            mode, fmt = im.mode, im.format
            if "transparency" in im.info:
                mode += "+transparency"
            im.verify()  # PNG: chunk CRCs through the whole file; other formats: header sanity
    except FileNotFoundError:
        return "file not found", ""
    except UnidentifiedImageError:
        return "not an image file PIL can read", ""
    except Exception as e:  # truncated / corrupt data: PIL raises SyntaxError, OSError, struct.error, ...
        return f"corrupt or truncated ({type(e).__name__}: {e})", ""
    if fmt == "JPEG":
        # JPEG verify() only parses the header; a complete file ends with the EOI marker FF D9 (maybe plus padding).
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - 4096))
            if b"\xff\xd9" not in f.read():
                return "truncated JPEG (no end-of-image marker)", mode
    return None, mode


def load_image(path: str) -> Image.Image:
    """Fully decode ``path`` to an RGB PIL image; raises ``BadImageError`` naming the file."""
    try:
        with Image.open(path) as im:
            im.load()
            return to_rgb(im)
    except FileNotFoundError:
        raise FileNotFoundError(f"image file {path} does not exist (was it deleted after the dataset was scanned?)")
    except UnidentifiedImageError:
        raise BadImageError(f"bad image file {path}: not an image file PIL can read") from None
    except Exception as e:
        raise BadImageError(f"bad image file {path}: corrupt or truncated ({type(e).__name__}: {e})") from None


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


class _ImageListDataset(torch.utils.data.Dataset):
    """Shared machinery: a checked list of (file, label, caption), ADM centre crop, deterministic flip."""

    def __init__(self, root, *, resolution: int, flip: bool, skip_bad: bool, seed: int):
        if not isinstance(resolution, int) or resolution < 1:
            raise ValueError(f"resolution: expected a positive integer, got {resolution!r}")
        self.root = Path(root)
        if not self.root.exists():
            raise FileNotFoundError(f"dataset path {self.root} does not exist")
        if not self.root.is_dir():
            raise NotADirectoryError(f"dataset path {self.root} is not a directory")
        self.resolution = resolution
        self.flip = bool(flip)
        self.skip_bad = bool(skip_bad)
        self.seed = int(seed)
        self.epoch = 0
        self.files: list[str] = []
        self.labels: list[int] = []
        self.captions: list[str] = []
        self.bad_files: list[tuple[str, str]] = []  # (path, reason) of skipped files (skip_bad=True)

    def _scan(self, files: list[str], labels: list[int], captions: list[str]) -> None:
        """Check every file up front; raise on the first bad one, or drop bad ones with ``skip_bad``."""
        workers = min(16, 2 * (os.cpu_count() or 1))
        with ThreadPoolExecutor(max_workers=workers) as pool:  # I/O bound: threads overlap the reads
            results = list(pool.map(_check_file, files))
        modes: dict[str, int] = {}
        for path, label, caption, (reason, mode) in zip(files, labels, captions, results):
            if reason is not None:
                if not self.skip_bad:
                    raise BadImageError(
                        f"bad image file {path}: {reason} (skip_bad=True / --skip-bad skips such files)")
                self.bad_files.append((path, reason))
                continue
            self.files.append(path)
            self.labels.append(label)
            self.captions.append(caption)
            if mode != "RGB":
                modes[mode] = modes.get(mode, 0) + 1
        if self.bad_files:
            first = self.bad_files[0]
            warnings.warn(f"{self.root}: skipped {len(self.bad_files)} bad file(s) (see .bad_files), "
                          f"first {first[0]}: {first[1]}", stacklevel=3)
        if not self.files:
            raise ValueError(f"dataset {self.root} has no readable images")
        if modes:
            summary = ", ".join(f"{n} {m}" for m, n in sorted(modes.items()))
            warnings.warn(f"{self.root}: converting non-RGB images to RGB ({summary}; transparency is composited "
                          "on white)", stacklevel=3)

    def set_epoch(self, epoch: int) -> None:
        """Select the flip pattern of ``epoch`` (call once per epoch, e.g. with the sampler's epoch)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        img = center_crop_arr(load_image(self.files[index]), self.resolution)
        arr = np.asarray(img, dtype=np.float32)  # (H, W, 3) in 0..255
        if self.flip and flip_decision(self.seed, self.epoch, index):
            arr = arr[:, ::-1]
        image = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1) / 127.5 - 1.0  # (3, H, W) in [-1, 1]
        return {"image": image.contiguous(), "label": self.labels[index], "caption": self.captions[index]}


class ImageFolderDataset(_ImageListDataset):
    """``root/<class>/<image>`` -> items ``{"image": (3, R, R) in [-1, 1], "label": int, "caption": class name}``.

    Labels follow the sorted class folder names, or ``class_names`` when given (e.g. the list saved with a model,
    so a val folder with fewer classes keeps the training labels). ``.classes`` is the class list. Files are
    searched recursively inside each class folder. ``flip=True`` flips item i in epoch e iff
    ``flip_decision(seed, e, i)``. Bad files raise ``BadImageError`` at construction, or are skipped and listed
    in ``.bad_files`` with ``skip_bad=True``. The caption of an item is its class name with ``_`` -> space.
    """

    def __init__(self, root, *, resolution: int, flip: bool = False, skip_bad: bool = False,
                 class_names: list[str] | None = None, seed: int = 0):
        super().__init__(root, resolution=resolution, flip=flip, skip_bad=skip_bad, seed=seed)
        folders = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not folders:
            raise ValueError(
                f"image folder {self.root} has no class subfolders (expected {self.root}/<class>/<images>)")
        if class_names is None:
            self.classes = folders
        else:
            self.classes = list(class_names)
            unknown = [f for f in folders if f not in self.classes]
            if unknown:
                raise ValueError(f"image folder {self.root} has class folders {unknown} that are not in class_names")
        files, labels, captions = [], [], []
        for folder in folders:
            found = sorted(
                os.path.join(d, n)
                for d, _, names in os.walk(self.root / folder)
                for n in names
                if _is_image(n) and not n.startswith(".")
            )
            if not found:
                raise ValueError(
                    f"class folder {self.root / folder} contains no images ({', '.join(IMAGE_EXTENSIONS)})")
            label = self.classes.index(folder)
            files += found
            labels += [label] * len(found)
            captions += [folder.replace("_", " ")] * len(found)
        self._scan(files, labels, captions)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def source(self) -> dict:
        return {"kind": "image_folder", "root": str(self.root.resolve()), "resolution": self.resolution,
                "num_images": len(self.files), "num_skipped": len(self.bad_files)}


class CaptionDataset(_ImageListDataset):
    """Images with captions -> items ``{"image": (3, R, R) in [-1, 1], "label": int, "caption": str}``.

    Captions come from ``root/captions.jsonl`` (one ``{"file": path relative to root, "caption": str[, "label":
    int]}`` per line) when it exists, otherwise from a sidecar ``<image stem>.txt`` next to every image (searched
    recursively). Labels are those of the jsonl when every line has one (``.classes`` then read from
    ``root/classes.json`` if present), else 0 for every item (``.classes`` is None). Bad files and missing
    captions raise, or are skipped into ``.bad_files`` with ``skip_bad=True``.
    """

    def __init__(self, root, *, resolution: int, flip: bool = False, skip_bad: bool = False, seed: int = 0,
                 captions_file: str = "captions.jsonl"):
        super().__init__(root, resolution=resolution, flip=flip, skip_bad=skip_bad, seed=seed)
        jsonl = self.root / captions_file
        if jsonl.is_file():
            files, labels, captions = self._from_jsonl(jsonl)
        else:
            files, labels, captions = self._from_sidecars()
        if not files:
            raise ValueError(f"caption dataset {self.root} has no images with captions")
        self.classes: list[str] | None = None
        if labels is None:
            labels = [0] * len(files)
        else:
            classes_file = self.root / "classes.json"
            if classes_file.is_file():
                self.classes = json.loads(classes_file.read_text())
        self._scan(files, labels, captions)

    def _skip_or_raise(self, path: str, reason: str, exc: type[Exception] = ValueError) -> None:
        if not self.skip_bad:
            raise exc(f"image {path} {reason} (skip_bad=True / --skip-bad skips such files)")
        self.bad_files.append((path, reason))

    def _from_jsonl(self, jsonl: Path):
        files, labels, captions = [], [], []
        all_labelled = True
        for n, line in enumerate(jsonl.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{jsonl} line {n}: not valid JSON ({e.msg})") from None
            if not (isinstance(rec, dict) and isinstance(rec.get("file"), str) and isinstance(rec.get("caption"), str)):
                raise ValueError(
                    f'{jsonl} line {n}: expected {{"file": str, "caption": str[, "label": int]}}, got {line[:120]}')
            path = str(self.root / rec["file"])
            if not os.path.isfile(path):
                self._skip_or_raise(path, f"is listed in {jsonl.name} line {n} but does not exist", FileNotFoundError)
                continue
            files.append(path)
            captions.append(rec["caption"])
            if isinstance(rec.get("label"), int):
                labels.append(rec["label"])
            else:
                all_labelled = False
        return files, (labels if all_labelled else None), captions

    def _from_sidecars(self):
        files, captions = [], []
        images = sorted(os.path.join(d, n) for d, _, names in os.walk(self.root) for n in names
                        if _is_image(n) and not n.startswith("."))
        for path in images:
            txt = os.path.splitext(path)[0] + ".txt"
            if not os.path.isfile(txt):
                self._skip_or_raise(path, f"has no caption: no captions.jsonl in {self.root} and no sidecar {txt}")
                continue
            files.append(path)
            captions.append(Path(txt).read_text(encoding="utf-8").strip())
        return files, None, captions

    @property
    def source(self) -> dict:
        return {"kind": "captions", "root": str(self.root.resolve()), "resolution": self.resolution,
                "num_images": len(self.files), "num_skipped": len(self.bad_files)}
