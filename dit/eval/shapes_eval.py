"""Offline evaluator for the bundled shapes dataset: a small CNN classifier and what it measures.

* **conditional accuracy**: a sample generated for class c counts as right when the classifier predicts c;
* **FD-shapes**: the Frechet distance between Gaussians fitted to the classifier's penultimate features (128-d) of
  generated and real val images. It is the FID formula in a different feature space, *not* FID: its values are not
  comparable with FID numbers, only between runs evaluated with the same classifier file.

The classifier file (``tools/train_classifier.py``) is a ``.pt`` dict ``{"state_dict", "classes", "resolution",
"width", "arch", "val_accuracy"}``; ``arch`` (``num_stages``, ``norm``, ``pool``) is optional, and files without it
(written before it existed) load as the original 3-stage GroupNorm / mean-pool network.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .metrics import feature_statistics, frechet_distance


def _block(c_in: int, c_out: int, stride: int, norm: str) -> nn.Sequential:
    layer = nn.BatchNorm2d(c_out) if norm == "batch" else nn.GroupNorm(8, c_out)
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), layer, nn.SiLU())


def stages_for(resolution: int) -> int:
    """Stride-2 stages that leave a ~4x4 final map (16 px: 2, 32 px: 3, 64 px: 4, ..., 256 px: 6).

    Scaling the depth with the resolution keeps each stage's receptive field the same fraction of the image, so the
    training dynamics (and the few hundred steps it needs) do not change with the resolution.
    """
    return max(2, min(6, round(math.log2(resolution / 4))))


class ShapesClassifier(nn.Module):
    """Small CNN: ``num_stages`` stages of (conv, stride-2 conv), widths doubling up to 4 * width -> global pool -> linear.

    Input (N, 3, H, W) in [-1, 1] at any resolution; ``features`` gives the (N, 4 * width) penultimate features.
    The defaults (3 stages, GroupNorm, mean pool) are the original layout, kept so old classifier files still load;
    ``train_shapes_classifier`` builds the robust variant (depth from the resolution, BatchNorm, max pool).
    """

    def __init__(self, num_classes: int, width: int = 32, *, num_stages: int = 3, norm: str = "group",
                 pool: str = "mean"):
        super().__init__()
        if norm not in ("group", "batch") or pool not in ("mean", "max") or num_stages < 1:
            raise ValueError(f"ShapesClassifier: expected norm 'group'|'batch', pool 'mean'|'max', num_stages >= 1; "
                             f"got {norm!r}, {pool!r}, {num_stages}")
        self.num_classes, self.width = num_classes, width
        self.arch = {"num_stages": num_stages, "norm": norm, "pool": pool}
        layers, c_in = [], 3
        for k in range(num_stages):
            # The last stage always has 4 * width channels, so the feature size does not depend on the depth.
            c = width * 2 ** min(2, k + max(0, 3 - num_stages))
            layers += [_block(c_in, c, 1, norm), _block(c, c, 2, norm)]
            c_in = c
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(4 * width, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, 4 * width)."""
        h = self.body(x)  # (N, 4 * width, h, w)
        # Max pooling reports whether a part (a corner, an arm of a cross) is present anywhere, which is what tells the
        # shapes apart; a mean over a mostly-background map dilutes it and training then stalls on colour alone.
        return h.amax(dim=(2, 3)) if self.arch["pool"] == "max" else h.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> logits (N, num_classes)."""
        return self.head(self.features(x))


def render_split(resolution: int, num_samples: int, split: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Render ``num_samples`` shapes images: ((N, 3, R, R) float in [-1, 1], (N,) int64 labels)."""
    from dit.data.shapes import ShapesDataset

    ds = ShapesDataset(resolution=resolution, num_samples=num_samples, seed=seed, split=split)
    items = [ds[i] for i in range(len(ds))]
    return torch.stack([it["image"] for it in items]), torch.tensor([it["label"] for it in items])


@torch.no_grad()
def predict(model: ShapesClassifier, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Predicted labels of images (N, 3, H, W) in [-1, 1] -> (N,) int64 (resized to the classifier's resolution)."""
    return torch.cat([model(_prep(model, images[i : i + batch_size])).argmax(1).cpu()
                      for i in range(0, images.shape[0], batch_size)])


@torch.no_grad()
def penultimate_features(model: ShapesClassifier, images: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """Penultimate features of images (N, 3, H, W) in [-1, 1] -> (N, 4 * width) float64."""
    return torch.cat([model.features(_prep(model, images[i : i + batch_size])).double().cpu()
                      for i in range(0, images.shape[0], batch_size)]).numpy()


def _prep(model: ShapesClassifier, images: torch.Tensor) -> torch.Tensor:
    dev = next(model.parameters()).device
    x = images.to(dev).float()
    res = getattr(model, "resolution", None)
    if res is not None and x.shape[-1] != res:
        x = F.interpolate(x, size=(res, res), mode="bilinear", align_corners=False, antialias=True)
    return x


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and rotation by a multiple of 90 degrees per image (N, 3, R, R) -> (N, 3, R, R).

    Both keep every class: the shapes are mirror-symmetric and drawn at a uniformly random rotation anyway.
    """
    flip = torch.rand(x.shape[0], generator=gen) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1).to(x.device), x.flip(-1), x)
    quarter_turns = torch.randint(0, 4, (x.shape[0],), generator=gen)
    return torch.stack([torch.rot90(img, int(k), dims=(1, 2)) for img, k in zip(x, quarter_turns)])


def train_shapes_classifier(*, resolution: int = 32, num_train: int = 4800, num_val: int = 1200, steps: int = 600,
                            batch_size: int = 64, lr: float = 3e-3, width: int = 32, seed: int = 0,
                            device: str | torch.device = "cpu", log_every: int = 0) -> tuple[ShapesClassifier, float]:
    """Train the classifier on the train split (pre-rendered) and return (model in eval mode, val accuracy).

    What makes it reliable at 16..256 px within a few hundred steps (the original GroupNorm / mean-pool net sat at
    loss ~ln 4 = 1.39, colour right but shape at chance, for hundreds of steps): BatchNorm, global max pooling, a depth
    that grows with the resolution (``stages_for``), flip + 90-degree-rotation augmentation, and AdamW with a one-cycle
    schedule (10% linear warm-up to ``lr``, then cosine decay).
    """
    if steps < 1 or batch_size < 1 or num_train < 1 or num_val < 1:
        raise ValueError(f"train_shapes_classifier: steps, batch_size, num_train, num_val must be >= 1, got "
                         f"{steps}, {batch_size}, {num_train}, {num_val}")
    torch.manual_seed(seed)
    x_tr, y_tr = render_split(resolution, num_train, "train", seed)
    x_va, y_va = render_split(resolution, num_val, "val", seed)
    from dit.data.shapes import ShapesDataset

    classes = ShapesDataset(resolution=resolution, num_samples=1).classes
    model = ShapesClassifier(len(classes), width=width, num_stages=stages_for(resolution), norm="batch",
                             pool="max").to(device)
    model.resolution = resolution
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        idx = torch.randint(0, num_train, (batch_size,), generator=gen)
        x, y = _augment(x_tr[idx], gen).to(device), y_tr[idx].to(device)  # (B, 3, R, R), (B,)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log_every and (step + 1) % log_every == 0:
            print(f"step {step + 1}/{steps} loss {loss.item():.4f}")
    model.eval()
    acc = float((predict(model, x_va) == y_va).float().mean())
    model.classes = classes
    return model, acc


def save_classifier(model: ShapesClassifier, path: str | os.PathLike, *, classes: list[str], resolution: int,
                    val_accuracy: float | None = None) -> None:
    """Save ``{"state_dict", "classes", "resolution", "width", "arch", "val_accuracy"}`` to ``path``."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "classes": list(classes), "resolution": int(resolution),
                "width": model.width, "arch": dict(model.arch), "val_accuracy": val_accuracy}, path)


def load_classifier(path: str | os.PathLike, device: str | torch.device = "cpu") -> ShapesClassifier:
    """Load a classifier saved by ``save_classifier`` (eval mode; ``.classes`` and ``.resolution`` attached)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"shapes classifier {str(path)!r} not found; train one with tools/train_classifier.py")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or not {"state_dict", "classes", "resolution"} <= set(ckpt):
        raise ValueError(f"{path}: not a shapes classifier file (expected keys state_dict, classes, resolution)")
    arch = dict(ckpt.get("arch") or {})  # absent in files from before the robust variant: the original layout
    model = ShapesClassifier(len(ckpt["classes"]), width=int(ckpt.get("width", 32)),
                             num_stages=int(arch.get("num_stages", 3)), norm=str(arch.get("norm", "group")),
                             pool=str(arch.get("pool", "mean")))
    model.load_state_dict(ckpt["state_dict"])
    model.classes, model.resolution = list(ckpt["classes"]), int(ckpt["resolution"])
    model.val_accuracy = ckpt.get("val_accuracy")
    return model.eval().to(device)


def conditional_accuracy(model: ShapesClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of images (N, 3, H, W) in [-1, 1] generated for ``labels`` (N,) that the classifier assigns to them."""
    labels = torch.as_tensor(labels).long().cpu()
    if labels.shape != (images.shape[0],):
        raise ValueError(f"conditional_accuracy: {images.shape[0]} images but labels of shape {tuple(labels.shape)}")
    return float((predict(model, images) == labels).float().mean())


def accuracy_breakdown(classes: list[str], pred: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Conditional accuracy of predictions ``pred`` (N,) for ``labels`` (N,), and its two halves for class names of the
    form "<colour> <shape>": ``acc_colour`` (the predicted class has the asked colour) and ``acc_shape`` (the asked
    shape). A model that gets the colour right and the shape at chance scores acc_colour 1, acc 1/4 with 4 shapes."""
    pred, labels = torch.as_tensor(pred).long().cpu(), torch.as_tensor(labels).long().cpu()
    if pred.shape != labels.shape or pred.ndim != 1:
        raise ValueError(f"accuracy_breakdown: predictions {tuple(pred.shape)} vs labels {tuple(labels.shape)}")
    out = {"accuracy": float((pred == labels).float().mean())}
    parts = [c.split(" ", 1) for c in classes]
    if all(len(p) == 2 for p in parts):
        colour = torch.tensor([sorted({p[0] for p in parts}).index(p[0]) for p in parts])  # class -> colour id
        shape = torch.tensor([sorted({p[1] for p in parts}).index(p[1]) for p in parts])  # class -> shape id
        out["acc_colour"] = float((colour[pred] == colour[labels]).float().mean())
        out["acc_shape"] = float((shape[pred] == shape[labels]).float().mean())
    return out


def fd_shapes(model: ShapesClassifier, generated: torch.Tensor, real: torch.Tensor) -> float:
    """FD-shapes: Frechet distance of the classifier's penultimate features, generated vs real (both (N, 3, H, W))."""
    mu1, s1 = feature_statistics(penultimate_features(model, generated))
    mu2, s2 = feature_statistics(penultimate_features(model, real))
    return frechet_distance(mu1, s1, mu2, s2)


def uint8_to_model_range(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def evaluate_shapes_npz(npz_path: str | os.PathLike, classifier_path: str | os.PathLike, *, num_real: int = 1200,
                        seed: int = 0, device: str | torch.device = "cpu") -> dict[str, float]:
    """Conditional accuracy and FD-shapes of an ``.npz`` of samples (``arr_0`` uint8 NHWC, ``labels``) vs val data."""
    model = load_classifier(classifier_path, device=device)
    with np.load(npz_path) as data:
        if "labels" not in data.files:
            raise ValueError(f"{npz_path}: needs a 'labels' array for conditional accuracy")
        images, labels = uint8_to_model_range(data["arr_0"]), torch.from_numpy(data["labels"])
    real, _ = render_split(model.resolution, num_real, "val", seed)
    if labels.shape != (images.shape[0],):
        raise ValueError(f"{npz_path}: {images.shape[0]} images but labels of shape {tuple(labels.shape)}")
    return {**accuracy_breakdown(list(model.classes), predict(model, images), labels),
            "fd_shapes": fd_shapes(model, images, real), "num_samples": int(images.shape[0])}
