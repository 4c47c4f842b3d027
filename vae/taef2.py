"""TAEF2: our implementation of the tiny autoencoder (TAESD family) for the FLUX.2 latent space.

Loads the original ``taef2_encoder.pth`` / ``taef2_decoder.pth`` (plain state_dicts of two ``nn.Sequential`` stacks).
The layer stack mirrors TAESD's (madebyollin/taesd): every stage is 64 channels wide, a ``Block`` is a
conv-ReLU-conv-ReLU-conv residual, and the three innermost blocks of each side have an extra "midblock GroupNorm"
residual (1x1 conv -> GroupNorm(4) -> ReLU -> 1x1 conv) applied before the block. The networks work on images in
[0, 1]; the wrapper converts from and to the project's [-1, 1].

Latent channels and the midblock-GN variant are read from the state dict, so other TAESD-family ``.pth`` pairs
(taesd, taesdxl, taef1: 4/16 channels, no midblock GN) load with the same code.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .base import Autoencoder

WIDTH = 64  # every TAESD-family stage is 64 channels wide
N_DOWN = 3  # 8x down/upsampling
BLOCKS_PER_STAGE = 3
ENCODER_FILE = "taef2_encoder.pth"
DECODER_FILE = "taef2_decoder.pth"


def _conv3(c_in: int, c_out: int, *, stride: int = 1, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=bias)


class SoftClamp(nn.Module):
    """``tanh(x / 3) * 3``: keeps out-of-range latents (e.g. from a diffusion sampler) from blowing up the decoder."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class TAEBlock(nn.Module):
    """``relu(conv(x) + x)`` with ``conv`` = conv3-ReLU-conv3-ReLU-conv3, optionally preceded by the midblock-GN
    residual ``x + pool(x)`` (pool = 1x1 conv to 4C -> GroupNorm(4) -> ReLU -> 1x1 conv back to C)."""

    def __init__(self, channels: int, midblock_gn: bool = False):
        super().__init__()
        c = channels
        self.conv = nn.Sequential(_conv3(c, c), nn.ReLU(), _conv3(c, c), nn.ReLU(), _conv3(c, c))
        self.pool = (
            nn.Sequential(
                nn.Conv2d(c, 4 * c, 1, bias=False),
                nn.GroupNorm(4, 4 * c),
                nn.ReLU(),
                nn.Conv2d(4 * c, c, 1, bias=False),
            )
            if midblock_gn
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, C, H, W) -> (N, C, H, W)."""
        if self.pool is not None:
            x = x + self.pool(x)
        return F.relu(self.conv(x) + x)


def build_encoder(latent_channels: int, midblock_gn: bool) -> nn.Sequential:
    """Image (N, 3, H, W) in [0, 1] -> raw latent (N, latent_channels, H/8, W/8).

    Layout (Sequential indices): conv(3,64), Block, then 3 x [stride-2 conv (no bias), Block x3], conv(64, latent);
    the last stage's blocks carry the midblock GN.
    """
    layers: list[nn.Module] = [_conv3(3, WIDTH), TAEBlock(WIDTH)]
    for stage in range(N_DOWN):
        gn = midblock_gn and stage == N_DOWN - 1
        layers.append(_conv3(WIDTH, WIDTH, stride=2, bias=False))
        layers += [TAEBlock(WIDTH, gn) for _ in range(BLOCKS_PER_STAGE)]
    layers.append(_conv3(WIDTH, latent_channels))
    return nn.Sequential(*layers)


def build_decoder(latent_channels: int, midblock_gn: bool) -> nn.Sequential:
    """Raw latent (N, latent_channels, h, w) -> image (N, 3, 8h, 8w), nominally in [0, 1].

    Layout: SoftClamp, conv(latent,64), ReLU, then 3 x [Block x3, Upsample x2 (nearest), conv (no bias)], Block,
    conv(64, 3); the first stage's blocks carry the midblock GN.
    """
    layers: list[nn.Module] = [SoftClamp(), _conv3(latent_channels, WIDTH), nn.ReLU()]
    for stage in range(N_DOWN):
        gn = midblock_gn and stage == 0
        layers += [TAEBlock(WIDTH, gn) for _ in range(BLOCKS_PER_STAGE)]
        layers += [nn.Upsample(scale_factor=2), _conv3(WIDTH, WIDTH, bias=False)]
    layers += [TAEBlock(WIDTH), _conv3(WIDTH, 3)]
    return nn.Sequential(*layers)


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"TAEF2 weights not found: {path} (expected a state_dict saved with torch.save)")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle / zip errors come in many types
        raise ValueError(f"{path}: not a readable torch state_dict ({type(e).__name__}: {e})") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path}: expected a plain state_dict (dict of tensors), got {type(sd).__name__}")
    return sd


def _check_and_load(module: nn.Module, sd: dict[str, torch.Tensor], path: Path) -> None:
    expected = module.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    bad = [k for k in expected.keys() & sd.keys() if expected[k].shape != sd[k].shape]
    if missing or unexpected or bad:
        raise ValueError(
            f"{path}: not a TAESD-family {type(module).__name__} state_dict "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}, wrong shapes {bad[:3]})"
        )
    module.load_state_dict(sd)


def find_weight_files(directory: str | Path) -> tuple[Path, Path]:
    """``(encoder.pth, decoder.pth)`` in ``directory``: ``taef2_*.pth``, else the only ``*encoder.pth`` pair."""
    d = Path(directory).expanduser()
    if not d.is_dir():
        raise FileNotFoundError(
            f"TAEF2 directory not found: {d} (expected a folder with {ENCODER_FILE}, {DECODER_FILE})"
        )
    enc, dec = d / ENCODER_FILE, d / DECODER_FILE
    if enc.is_file() and dec.is_file():
        return enc, dec
    encs = sorted(d.glob("*encoder.pth"))
    if len(encs) == 1 and encs[0].with_name(encs[0].name.replace("encoder.pth", "decoder.pth")).is_file():
        return encs[0], encs[0].with_name(encs[0].name.replace("encoder.pth", "decoder.pth"))
    raise FileNotFoundError(f"{d}: expected {ENCODER_FILE} and {DECODER_FILE} (or one *encoder.pth/*decoder.pth pair)")


class TAEF2(Autoencoder):
    """Tiny autoencoder for the FLUX.2 latent space (32 channels, f=8), deterministic.

    Built with :func:`TAEF2.from_dir` or directly from two state dicts. Normalisation constants are not built in:
    FLUX.2 latents are not unit-scale, so pass ``scale``/``shift`` measured with ``tools/measure_vae.py``.
    """

    def __init__(
        self,
        encoder_state: dict[str, torch.Tensor],
        decoder_state: dict[str, torch.Tensor],
        *,
        spec: str = "taef2",
        encoder_path: Path | None = None,
        decoder_path: Path | None = None,
        **kwargs,
    ):
        enc_path = encoder_path or Path("<encoder state_dict>")
        dec_path = decoder_path or Path("<decoder state_dict>")
        last = max((int(m.group(1)) for k in encoder_state if (m := re.match(r"(\d+)\.weight$", k))), default=None)
        if last is None:
            raise ValueError(f"{enc_path}: not a TAESD-family encoder state_dict (no top-level conv weights)")
        latent_channels = encoder_state[f"{last}.weight"].shape[0]
        midblock_gn = any(".pool." in k for k in encoder_state)
        super().__init__(spec=spec, latent_channels=latent_channels, downsample_factor=2**N_DOWN, **kwargs)
        self.midblock_gn = midblock_gn
        self.encoder = build_encoder(latent_channels, midblock_gn)
        self.decoder = build_decoder(latent_channels, midblock_gn)
        _check_and_load(self.encoder, encoder_state, enc_path)
        _check_and_load(self.decoder, decoder_state, dec_path)
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_dir(cls, directory: str | Path, **kwargs) -> "TAEF2":
        """Load ``taef2_encoder.pth`` / ``taef2_decoder.pth`` from ``directory``."""
        enc, dec = find_weight_files(directory)
        return cls(_load_state_dict(enc), _load_state_dict(dec), encoder_path=enc, decoder_path=dec, **kwargs)

    def _encode_raw(self, images: torch.Tensor, sample: bool, generator: torch.Generator | None) -> torch.Tensor:
        # The TAESD family works on [0, 1] images.
        return self.encoder(images.add(1).mul(0.5))  # (n, C, H/8, W/8)

    def _decode_raw(self, raw: torch.Tensor) -> torch.Tensor:
        return self.decoder(raw).mul(2).sub(1)  # (n, 3, 8h, 8w) in ~[-1, 1]
