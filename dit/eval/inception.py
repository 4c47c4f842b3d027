"""The FID Inception-v3 network (the TF 2015-12-05 graph ported to PyTorch), as a feature extractor.

The weights file is the standard ``pt_inception-2015-12-05-*.pth`` used by pytorch-fid and torch-fidelity: a plain
state dict in torchvision's ``Inception3`` layout with a 1008-way ``fc``. The graph differs from torchvision's
Inception-v3 in four places, reproduced here by overriding the blocks' forward passes:

* Mixed_5b/c/d (A) and Mixed_6b..e (C) and Mixed_7b (E, first): the branch-pool average pooling does not count padding
  (TF ``AvgPool`` with SAME padding), i.e. ``count_include_pad=False``;
* Mixed_7c (E, second): the branch pool is a *max* pool (a quirk of the TF graph).

Outputs (``forward`` returns a dict):

* ``pool``    (N, 2048): pool_3 features, for FID and precision/recall;
* ``spatial`` (N, 2023): the ``mixed_6/conv`` activations (Mixed_6d's 1x1 branch, 17x17) limited to the first 7
  channels and flattened in NHWC order, as ADM's evaluator does for sFID (Nash et al. 2021);
* ``logits``  (N, 1008): ``pool @ fc.weight.T`` *without* the bias, the "unbiased" logits ADM's evaluator and
  torch-fidelity use for the Inception Score.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import inception as tvi

FID_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
)


class _FIDInceptionA(tvi.InceptionA):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False))
        return torch.cat([b1, b5, b3, bp], dim=1)


class _FIDInceptionC(tvi.InceptionC):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        bd = self.branch7x7dbl_5(self.branch7x7dbl_4(self.branch7x7dbl_3(self.branch7x7dbl_2(bd))))
        bp = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False))
        return torch.cat([b1, b7, bd, bp], dim=1)


class _FIDInceptionE(tvi.InceptionE):
    """Mixed_7b (``max_pool=False``) and Mixed_7c (``max_pool=True``)."""

    def __init__(self, in_channels: int, max_pool: bool = False, conv_block=None):
        super().__init__(in_channels, conv_block=conv_block)
        self.max_pool = max_pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], dim=1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], dim=1)
        if self.max_pool:
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        else:
            pooled = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)
        return torch.cat([b1, b3, bd, self.branch_pool(pooled)], dim=1)


class FIDInceptionV3(nn.Module):
    """FID Inception-v3. Input: (N, 3, H, W) float in [0, 1] (any size; resized to 299x299 bilinearly, as pytorch-fid).

    ``forward`` returns ``{"pool": (N, 2048), "spatial": (N, 2023), "logits": (N, 1008)}``.
    """

    def __init__(self, resize: bool = True):
        super().__init__()
        self.resize = resize
        net = tvi.Inception3(
            num_classes=1008,
            aux_logits=False,
            transform_input=False,
            init_weights=False,
            inception_blocks=[tvi.BasicConv2d, _FIDInceptionA, tvi.InceptionB, _FIDInceptionC, tvi.InceptionD,
                              _FIDInceptionE, tvi.InceptionAux],
        )
        net.Mixed_7c = _FIDInceptionE(2048, max_pool=True)
        # Keep the torchvision module names so that the standard weights file loads with strict keys.
        for name in ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
                     "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e",
                     "Mixed_7a", "Mixed_7b", "Mixed_7c", "fc"]:
            self.add_module(name, getattr(net, name))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"FIDInceptionV3 expects (N, 3, H, W) images in [0, 1], got shape {tuple(images.shape)}")
        x = images.float()
        if self.resize and x.shape[-2:] != (299, 299):
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1  # the TF graph takes [-1, 1]
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (N, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # (N, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (N, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # (N, 288, 35, 35)
        x = self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(x)))  # (N, 768, 17, 17)
        # "mixed_6/conv" of the TF graph is Mixed_6d's 1x1 branch (after BN + ReLU); ADM keeps its first 7 channels.
        spatial = self.Mixed_6d.branch1x1(x)[:, :7]  # (N, 7, 17, 17)
        spatial = spatial.permute(0, 2, 3, 1).flatten(1)  # (N, 2023), NHWC order like the TF graph
        x = self.Mixed_6e(self.Mixed_6d(x))  # (N, 768, 17, 17)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))  # (N, 2048, 8, 8)
        pool = x.mean(dim=(2, 3))  # (N, 2048)
        logits = pool @ self.fc.weight.t()  # (N, 1008), no bias (ADM / torch-fidelity "logits_unbiased")
        return {"pool": pool, "spatial": spatial, "logits": logits}


def load_fid_inception(path: str | os.PathLike | None, device: torch.device | str | None = None) -> FIDInceptionV3:
    """Build the FID Inception and load ``pt_inception-2015-12-05-*.pth`` from ``path`` (eval mode).

    ``path=None`` or a missing file raises ``FileNotFoundError`` saying where to download the weights.
    """
    if path is None or not os.path.isfile(path):
        where = "no --inception path was given" if path is None else f"{str(path)!r} does not exist"
        raise FileNotFoundError(
            f"FID Inception weights: {where}. Download {FID_WEIGHTS_URL} (the pytorch-fid / torch-fidelity "
            "'pt_inception-2015-12-05' weights) and pass its path with --inception."
        )
    net = FIDInceptionV3()
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    try:
        net.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"{path}: not a pt_inception-2015-12-05 state dict ({str(e).splitlines()[0]})") from None
    return net.eval().to(device)
