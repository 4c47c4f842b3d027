"""The bundled dataset: coloured geometric shapes, rendered on demand from (seed, index), no storage.

Classes are shape x colour (4 x 3 = 12): ``"red circle"``, ``"blue cross"``, ... Each image has one shape of a random
size (small / medium / large), position and rotation on a plain background whose colour never clashes with the
shape's colour. Items are a pure function of ``(seed, split, index)``: ``numpy.random.default_rng([seed, index])``
for the train split and ``default_rng([seed, index, 1])`` for val (a disjoint stream). Shapes are drawn with PIL at
``SUPERSAMPLE`` x the resolution and box-filtered down, which anti-aliases the edges.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "cross", "square", "triangle")
# Saturated primaries: far apart in hue, so the colour is readable at 16 px.
COLOURS: dict[str, tuple[int, int, int]] = {
    "blue": (40, 80, 230),
    "green": (30, 160, 60),
    "red": (220, 40, 40),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (15, 15, 15),
    "dark gray": (70, 70, 70),
    "light gray": (185, 185, 185),
    "white": (245, 245, 245),
    "beige": (230, 215, 175),
    "dark blue": (25, 30, 95),
    "dark green": (20, 65, 35),
}
# Background -> foreground colours it is never paired with (same hue family: a blue shape on dark blue is hard to see).
CLASHES: dict[str, frozenset[str]] = {
    "dark blue": frozenset({"blue"}),
    "dark green": frozenset({"green"}),
}
# Size class -> range of the shape's "size" R as a fraction of the image side (shape extents are ~R, see _outline).
SIZES: dict[str, tuple[float, float]] = {
    "small": (0.13, 0.18),
    "medium": (0.21, 0.27),
    "large": (0.31, 0.37),
}
MARGIN = 0.03  # gap (fraction of the side) kept between the shape's circumcircle and the image border
SUPERSAMPLE = 4
_VAL_STREAM = 1  # appended to the seed sequence for the val split: [seed, index] vs [seed, index, 1]
# Circumradius of each shape as a multiple of R, chosen so that the four shapes have similar areas (~2 R^2).
_EXTENT = {"circle": 0.85, "square": 1.0, "triangle": 1.15, "cross": math.hypot(1.0, 1.0 / 3.0)}


def class_names() -> list[str]:
    """The 12 class names in label order (sorted, so ``materialise``'s folder order equals the label order)."""
    return sorted(f"{c} {s}" for c in COLOURS for s in SHAPES)


def _outline(shape: str, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    """Polygon vertices (pixels) of ``shape`` with size ``r`` centred at (cx, cy), rotated by ``rot`` radians."""
    if shape == "square":
        pts = [(math.cos(a), math.sin(a)) for a in (math.pi / 4 + k * math.pi / 2 for k in range(4))]
    elif shape == "triangle":  # equilateral, circumradius 1.15 r
        pts = [(1.15 * math.cos(a), 1.15 * math.sin(a)) for a in (-math.pi / 2 + k * 2 * math.pi / 3 for k in range(3))]
    elif shape == "cross":  # plus sign: arms of half-length r and half-width r / 3
        w = 1.0 / 3.0
        pts = [(w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1),
               (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w), (-w, -1)]
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    c, s = math.cos(rot), math.sin(rot)
    return [(cx + r * (c * x - s * y), cy + r * (s * x + c * y)) for x, y in pts]


class ShapesDataset(torch.utils.data.Dataset):
    """Coloured geometric shapes, deterministic from (seed, split, index); labels balanced as ``index % 12``.

    Args:
        resolution: image side in pixels, 16..256.
        num_samples: dataset length (default 1000 per class for train, 100 per class for val).
        seed: non-negative integer seed; the same seed gives identical pixels.
        split: ``"train"`` or ``"val"`` (a disjoint random stream).

    Items: ``{"image": (3, H, W) float32 in [-1, 1], "label": int, "caption": str}``.
    """

    def __init__(self, *, resolution: int = 32, num_samples: int | None = None, seed: int = 0, split: str = "train"):
        if not isinstance(resolution, int) or not 16 <= resolution <= 256:
            raise ValueError(f"ShapesDataset resolution: expected an integer in 16..256, got {resolution!r}")
        if split not in ("train", "val"):
            raise ValueError(f"ShapesDataset split: expected 'train' or 'val', got {split!r}")
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"ShapesDataset seed: expected a non-negative integer, got {seed!r}")
        self.classes = class_names()
        if num_samples is None:
            num_samples = len(self.classes) * (1000 if split == "train" else 100)
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"ShapesDataset num_samples: expected a positive integer, got {num_samples!r}")
        self.resolution = resolution
        self.num_samples = num_samples
        self.seed = seed
        self.split = split

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def source(self) -> dict:
        """A JSON-able description (stored in latent manifests)."""
        return {"kind": "shapes", "resolution": self.resolution, "num_samples": self.num_samples,
                "seed": self.seed, "split": self.split}

    def __len__(self) -> int:
        return self.num_samples

    def _check_index(self, index: int) -> int:
        if not -self.num_samples <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for a ShapesDataset of {self.num_samples} items")
        return index % self.num_samples

    def describe(self, index: int) -> dict:
        """Ground truth of item ``index``: label, class, shape, colour, size, background, geometry.

        ``center`` is (x, y) and ``radius`` the size R, both as fractions of the side; ``rotation`` in degrees.
        """
        index = self._check_index(index)
        label = index % len(self.classes)
        colour, shape = self.classes[label].split(" ")
        entropy = [self.seed, index] if self.split == "train" else [self.seed, index, _VAL_STREAM]
        rng = np.random.default_rng(entropy)
        size = list(SIZES)[int(rng.integers(len(SIZES)))]
        lo, hi = SIZES[size]
        radius = float(rng.uniform(lo, hi))
        extent = radius * _EXTENT[shape] + MARGIN  # keep the whole circumcircle inside the image
        cx, cy = (float(v) for v in rng.uniform(extent, 1.0 - extent, size=2))
        rotation = float(rng.uniform(0.0, 360.0))
        allowed = [b for b in BACKGROUNDS if colour not in CLASHES.get(b, ())]
        background = allowed[int(rng.integers(len(allowed)))]
        return {"label": label, "class": self.classes[label], "shape": shape, "colour": colour, "size": size,
                "background": background, "center": (cx, cy), "radius": radius, "rotation": rotation}

    def caption(self, index: int) -> str:
        """E.g. ``"a small red triangle on a dark blue background"``."""
        d = self.describe(index)
        return f"a {d['size']} {d['colour']} {d['shape']} on a {d['background']} background"

    def render(self, index: int) -> Image.Image:
        """Item ``index`` as an RGB PIL image of side ``resolution``."""
        d = self.describe(index)
        big = self.resolution * SUPERSAMPLE
        img = Image.new("RGB", (big, big), BACKGROUNDS[d["background"]])
        draw = ImageDraw.Draw(img)
        cx, cy = d["center"][0] * big, d["center"][1] * big
        r = d["radius"] * big
        fill = COLOURS[d["colour"]]
        if d["shape"] == "circle":
            rc = r * _EXTENT["circle"]
            draw.ellipse([cx - rc, cy - rc, cx + rc, cy + rc], fill=fill)
        else:
            draw.polygon(_outline(d["shape"], cx, cy, r, math.radians(d["rotation"])), fill=fill)
        # BOX = exact area average over each SUPERSAMPLE x SUPERSAMPLE block: anti-aliased edges, flat interiors.
        return img.resize((self.resolution, self.resolution), Image.BOX)

    def __getitem__(self, index: int) -> dict:
        arr = np.asarray(self.render(index), dtype=np.float32)  # (H, W, 3) in 0..255
        image = torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1.0  # (3, H, W) in [-1, 1]
        index = self._check_index(index)
        return {"image": image.contiguous(), "label": index % len(self.classes), "caption": self.caption(index)}


def class_folder(name: str) -> str:
    """Folder name of a class: ``"red circle"`` -> ``"red_circle"``."""
    return name.replace(" ", "_")


def materialise(dataset: ShapesDataset, out_dir: str | os.PathLike, *, progress: bool = False) -> Path:
    """Write ``dataset`` as an ImageFolder: ``out_dir/<class_folder>/<index:06d>.png`` + ``captions.jsonl`` +
    ``classes.json``. Sorted folder order equals label order, so ``ImageFolderDataset(out_dir)`` gives the same labels.

    ``captions.jsonl`` lines are ``{"file": "red_circle/000002.png", "caption": ..., "label": 2}``; ``classes.json``
    is the list of class names in label order. Returns the output path.
    """
    out = Path(out_dir)
    folders = [class_folder(c) for c in dataset.classes]
    if folders != sorted(folders):  # guards the label <-> folder-order contract if the palette is ever renamed
        raise ValueError(f"class folders {folders} are not in sorted order; labels would not round-trip")
    out.mkdir(parents=True, exist_ok=True)
    for f in folders:
        (out / f).mkdir(exist_ok=True)
    indices = range(len(dataset))
    if progress:
        from tqdm import tqdm

        indices = tqdm(indices, desc=f"writing {out}", unit="img")
    lines = []
    for i in indices:
        label = i % dataset.num_classes
        rel = f"{folders[label]}/{i:06d}.png"
        dataset.render(i).save(out / rel)
        lines.append(json.dumps({"file": rel, "caption": dataset.caption(i), "label": label}))
    (out / "captions.jsonl").write_text("\n".join(lines) + "\n")
    (out / "classes.json").write_text(json.dumps(dataset.classes, indent=1) + "\n")
    return out
