"""Tests for the autoencoder interface (``vae``): real TAEF2 round trips on photos, tiny diffusers models, errors."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vae import (
    NORM_FILENAME,
    SD_VAE_SCALE,
    SDXL_VAE_SCALE,
    TAEF2,
    IdentityAutoencoder,
    KLAutoencoder,
    TinyAutoencoder,
    load_autoencoder,
    parse_spec,
)
from vae.measure import LatentStats, folder_images, psnr, skimage_photos, ssim, write_normalization

# Measured on 4 skimage photos (astronaut, coffee, chelsea, rocket) centre-cropped and resized to 128x128 on CPU:
# PSNR 26.10 / 29.62 / 29.74 / 32.06 dB (mean 29.38), SSIM mean 0.923. The pins leave ~1 dB / 0.02 of margin; a
# wrongly wired midblock-GN residual (applied after the block) drops the mean to ~26 dB.
TAEF2_PSNR_128 = 29.38
TAEF2_SSIM_128 = 0.923


def _shared_dir() -> Path:
    env = os.environ.get("DIT_SHARED_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared"


TAEF2_DIR = _shared_dir() / "weights" / "taef2"
needs_taef2 = pytest.mark.skipif(
    not (TAEF2_DIR / "taef2_encoder.pth").is_file(), reason=f"TAEF2 weights not found in {TAEF2_DIR}"
)


@pytest.fixture(scope="module")
def taef2() -> TAEF2:
    if not (TAEF2_DIR / "taef2_encoder.pth").is_file():
        pytest.skip(f"TAEF2 weights not found in {TAEF2_DIR}")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no normalisation given: intended here
        return load_autoencoder(f"taef2:{TAEF2_DIR}")


@pytest.fixture(scope="module")
def photos128() -> torch.Tensor:
    return skimage_photos(128, names=("astronaut", "coffee", "chelsea", "rocket"))  # (4, 3, 128, 128)


@pytest.fixture(scope="module")
def taef2_round_trip(taef2, photos128):
    raw = taef2.encode(photos128, raw=True)  # (4, 32, 16, 16)
    recon = taef2.decode(raw, raw=True)  # (4, 3, 128, 128)
    return raw, recon


def _tiny_kl(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    ).eval()


def _tiny_taesd(seed: int = 0):
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    return AutoencoderTiny(
        encoder_block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8),
        num_encoder_blocks=(1, 1),
        num_decoder_blocks=(1, 1),
        latent_channels=4,
    ).eval()


def _images(n: int = 2, size: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1  # (n, 3, size, size) in [-1, 1]


# ---------------------------------------------------------------------------------------------------------- TAEF2
def test_taef2_latent_shape(taef2):
    assert taef2.latent_channels == 32 and taef2.downsample_factor == 8 and taef2.midblock_gn
    z = taef2.encode(_images(2, 32))
    assert z.shape == (2, 32, 4, 4) and z.dtype == torch.float32
    x = taef2.decode(z)
    assert x.shape == (2, 3, 32, 32) and x.min() >= -1 and x.max() <= 1
    assert sum(p.numel() for p in taef2.encoder.parameters()) == pytest.approx(1.34e6, rel=0.01)
    assert not any(p.requires_grad for p in taef2.parameters()) and not taef2.training


def test_taef2_round_trip_on_photos(taef2_round_trip, photos128):
    raw, recon = taef2_round_trip
    assert raw.shape == (4, 32, 16, 16) and recon.shape == photos128.shape
    p, s = psnr(recon, photos128), ssim(recon, photos128)
    assert p.mean() > TAEF2_PSNR_128 - 1.0, p.tolist()
    assert p.min() > 25.0, p.tolist()
    assert s.mean() > TAEF2_SSIM_128 - 0.02, s.tolist()
    # the decoder's range convention directly: a [0, 1] <-> [-1, 1] slip would move the mean by ~0.5 or halve the spread
    assert abs(recon.mean().item() - photos128.mean().item()) < 0.05
    assert 0.9 < (recon.std() / photos128.std()).item() < 1.1


def test_taef2_measured_normalisation_whitens_latents(taef2, taef2_round_trip, photos128):
    raw, _ = taef2_round_trip
    stats = LatentStats()
    stats.update(raw[:2])
    stats.update(raw[2:])
    st = stats.result()
    ref = raw.double().transpose(0, 1).flatten(1)  # (C, N*h*w)
    torch.testing.assert_close(torch.tensor(st["mean"]), ref.mean(1).float(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(torch.tensor(st["std"]), ref.std(1, unbiased=False).float(), atol=1e-6, rtol=1e-6)
    assert st["global_std"] == pytest.approx(float(ref.std(unbiased=False)), rel=1e-9)
    # raw FLUX.2 latents are not unit-scale per channel (this is why the normalisation must be measured)
    assert max(st["std"]) / min(st["std"]) > 1.3
    pc = st["per_channel"]
    taef2.set_normalization(scale=pc["scale"], shift=pc["shift"])
    try:
        z = taef2.normalize(raw).transpose(0, 1).flatten(1)  # (C, N*h*w)
        torch.testing.assert_close(z.mean(1), torch.zeros(32), atol=1e-4, rtol=0)
        torch.testing.assert_close(z.std(1, unbiased=False), torch.ones(32), atol=1e-4, rtol=0)
    finally:
        taef2.set_normalization(scale=1.0, shift=None)


def test_normalisation_round_trip(taef2):
    x = _images(2, 16)
    g = torch.Generator().manual_seed(1)
    scale, shift = torch.rand(32, generator=g) + 0.5, torch.randn(32, generator=g)
    taef2.set_normalization(scale=scale, shift=shift)
    try:
        raw = taef2.encode(x, raw=True)  # (2, 32, 2, 2)
        z = taef2.encode(x)
        expected = (raw.double() - shift.double()[:, None, None]) * scale.double()[:, None, None]  # (2, 32, 2, 2)
        torch.testing.assert_close(z.double(), expected)
        torch.testing.assert_close(taef2.denormalize(z), raw, atol=1e-5, rtol=1e-5)
        # encode -> decode equals decoding the raw latents obtained by de-normalising
        torch.testing.assert_close(taef2.decode(z), taef2.decode(taef2.denormalize(z), raw=True), atol=1e-5, rtol=0)
        torch.testing.assert_close(taef2.decode(z), taef2.decode(raw, raw=True), atol=1e-4, rtol=0)
    finally:
        taef2.set_normalization(scale=1.0, shift=None)


def test_taef2_batching_is_invisible(taef2):
    x = _images(3, 16)
    torch.testing.assert_close(taef2.encode(x, batch_size=1), taef2.encode(x, batch_size=3), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------- KL
def test_kl_loads_from_dir_and_round_trips(tmp_path):
    vae = _tiny_kl()
    vae.save_pretrained(tmp_path / "kl")
    ae = load_autoencoder(f"kl:{tmp_path / 'kl'}")
    assert isinstance(ae, KLAutoencoder) and ae.stochastic
    assert ae.latent_channels == 4 and ae.downsample_factor == 2 and ae.spec == f"kl:{tmp_path / 'kl'}"
    assert ae.scale == SD_VAE_SCALE and ae.shift is None  # SD 1.x convention by default
    x = _images(3, 16)
    z = ae.encode(x, batch_size=2)
    assert z.shape == (3, 4, 8, 8)
    with torch.no_grad():
        ref_mean = vae.encode(x).latent_dist.mean
        ref_img = vae.decode(ref_mean).sample.clamp(-1, 1)
    torch.testing.assert_close(z, ref_mean * SD_VAE_SCALE, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ae.encode(x, batch_size=2), z, atol=0, rtol=0)  # posterior mean: deterministic
    y = ae.decode(z, batch_size=2)
    assert y.shape == (3, 3, 16, 16)
    torch.testing.assert_close(y, ref_img, atol=1e-5, rtol=1e-5)
    # a bare directory spec means KL; a pipeline folder with vae/ works too
    assert isinstance(load_autoencoder(str(tmp_path / "kl")), KLAutoencoder)
    vae.save_pretrained(tmp_path / "pipe" / "vae")
    torch.testing.assert_close(load_autoencoder(f"kl:{tmp_path / 'pipe'}").encode(x), z)


def test_kl_posterior_sampling(tmp_path):
    vae = _tiny_kl()
    vae.save_pretrained(tmp_path)
    ae = load_autoencoder(f"kl:{tmp_path}")
    x = _images(2, 16)
    mean = ae.encode(x)
    s1 = ae.encode(x, sample_posterior=True, generator=torch.Generator().manual_seed(1))
    s1b = ae.encode(x, sample_posterior=True, generator=torch.Generator().manual_seed(1))
    s2 = ae.encode(x, sample_posterior=True, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(s1, s1b, atol=0, rtol=0)
    assert not torch.allclose(s1, mean) and not torch.allclose(s1, s2)
    # z = mean + std * eps with eps drawn from the generator (LDM reparameterisation)
    with torch.no_grad():
        std = vae.encode(x).latent_dist.std
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(s1, mean + SD_VAE_SCALE * std * eps, atol=1e-5, rtol=1e-5)
    # the constructor option makes sampling the default
    ae_s = load_autoencoder(f"kl:{tmp_path}", sample_posterior=True)
    assert not torch.allclose(ae_s.encode(x), mean)


def test_kl_json_and_explicit_normalisation(tmp_path):
    _tiny_kl().save_pretrained(tmp_path)
    (tmp_path / NORM_FILENAME).write_text(json.dumps({"scale": [1.0, 2.0, 3.0, 4.0], "shift": 0.5}))
    ae = load_autoencoder(f"kl:{tmp_path}")
    torch.testing.assert_close(ae.scale, torch.tensor([1.0, 2.0, 3.0, 4.0]))
    torch.testing.assert_close(ae.shift, torch.full((4,), 0.5))
    ae2 = load_autoencoder(f"kl:{tmp_path}", scale=SDXL_VAE_SCALE)  # explicit beats the JSON
    assert ae2.scale == SDXL_VAE_SCALE and ae2.shift is None


def test_constants_match_diffusers_defaults():
    import inspect

    from diffusers import AutoencoderKL

    assert SD_VAE_SCALE == 0.18215 and SDXL_VAE_SCALE == 0.13025
    # diffusers' KL default scaling_factor is the SD 1.x constant
    assert inspect.signature(AutoencoderKL.__init__).parameters["scaling_factor"].default == SD_VAE_SCALE


# ---------------------------------------------------------------------------------------------------------- TAESD
def test_taesd_loads_and_uses_minus_one_one_convention(tmp_path):
    vae = _tiny_taesd()
    vae.save_pretrained(tmp_path)
    ae = load_autoencoder(f"taesd:{tmp_path}")
    assert isinstance(ae, TinyAutoencoder) and not ae.stochastic
    assert ae.latent_channels == 4 and ae.downsample_factor == 2 and ae.scale == 1.0
    x = _images(2, 16)
    z = ae.encode(x)
    assert z.shape == (2, 4, 8, 8)
    torch.testing.assert_close(ae.encode(x), z, atol=0, rtol=0)
    # TAESD nets work in [0, 1]: the encoder sees (x + 1) / 2 and the decoder's [0, 1] output is mapped to [-1, 1]
    with torch.no_grad():
        torch.testing.assert_close(z, vae.encoder.layers((x + 1) / 2), atol=1e-6, rtol=1e-6)
        ref = (vae.decoder.layers(torch.tanh(z / 3) * 3) * 2 - 1).clamp(-1, 1)
    y = ae.decode(z)
    assert y.shape == (2, 3, 16, 16)
    torch.testing.assert_close(y, ref, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="deterministic"):
        ae.encode(x, sample_posterior=True)
    with pytest.raises(ValueError, match="deterministic"):
        load_autoencoder(f"taesd:{tmp_path}", sample_posterior=True)


# ---------------------------------------------------------------------------------------------------------- identity
def test_identity_is_exact():
    ae = load_autoencoder("identity")
    assert isinstance(ae, IdentityAutoencoder) and ae.latent_channels == 3 and ae.downsample_factor == 1
    x = _images(3, 8).double()
    z = ae.encode(x, batch_size=2)
    assert z.dtype == torch.float64 and torch.equal(z, x) and torch.equal(ae.decode(z), x)
    x32 = x.float()
    assert torch.equal(ae.decode(ae.encode(x32)), x32)
    shift, scale = torch.tensor([0.1, -0.2, 0.3]), torch.tensor([2.0, 0.5, 4.0])
    ae2 = load_autoencoder("identity", scale=scale, shift=shift)
    z2 = ae2.encode(x)
    torch.testing.assert_close(z2, (x - shift.double()[:, None, None]) * scale.double()[:, None, None])
    torch.testing.assert_close(ae2.decode(z2), x, atol=1e-12, rtol=0)


# ---------------------------------------------------------------------------------------------------------- fingerprint
def test_fingerprints(tmp_path):
    a, b = load_autoencoder("identity"), load_autoencoder("identity", scale=0.5)
    assert len(a.fingerprint()) == 16 and a.fingerprint() == load_autoencoder("identity").fingerprint()
    assert a.fingerprint() != b.fingerprint()
    assert a.fingerprint() != load_autoencoder("identity", shift=[0.0, 0.0, 0.1]).fingerprint()
    _tiny_kl(0).save_pretrained(tmp_path / "k0")
    _tiny_kl(1).save_pretrained(tmp_path / "k1")
    k0, k1 = load_autoencoder(f"kl:{tmp_path / 'k0'}"), load_autoencoder(f"kl:{tmp_path / 'k1'}")
    assert k0.fingerprint() == load_autoencoder(str(tmp_path / "k0")).fingerprint()  # stable across loads
    assert k0.fingerprint() != k1.fingerprint()  # different weights
    fp = k0.fingerprint()
    k0.set_normalization(scale=0.2)
    assert k0.fingerprint() != fp  # different normalisation


@needs_taef2
def test_taef2_fingerprint_and_normalisation_sources(taef2, tmp_path):
    with pytest.warns(UserWarning, match="measure_vae"):  # no normalisation given: warned, scale 1
        again = load_autoencoder(f"taef2:{TAEF2_DIR}")
    assert again.scale == 1.0 and again.shift is None
    assert again.fingerprint() == taef2.fingerprint()  # stable across loads
    norm = tmp_path / "norm.json"
    norm.write_text(json.dumps({"scale": 0.7, "shift": None}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scaled = load_autoencoder(f"taef2:{TAEF2_DIR}", norm_file=norm)
    assert scaled.scale == 0.7 and scaled.fingerprint() != taef2.fingerprint()


# ---------------------------------------------------------------------------------------------------------- errors
def test_spec_parsing_and_bad_specs(tmp_path):
    assert parse_spec("identity") == ("identity", "")
    assert parse_spec("taef2:/w") == ("taef2", "/w")
    assert parse_spec("stabilityai/sd-vae-ft-ema") == ("kl", "stabilityai/sd-vae-ft-ema")
    with pytest.raises(ValueError, match="unknown backend 'vqgan'"):
        load_autoencoder("vqgan:/x")
    with pytest.raises(ValueError, match="expected 'kl:<path or hub id>'"):
        load_autoencoder("kl:")
    with pytest.raises(ValueError, match="non-empty"):
        load_autoencoder("")
    with pytest.raises(ValueError, match="dtype"):
        load_autoencoder("identity", dtype="int8")


def test_bad_paths(tmp_path):
    missing = tmp_path / "nope"
    for spec in (f"taef2:{missing}", f"kl:{missing}", f"taesd:{missing}", str(missing), f"kl:{missing}.safetensors"):
        with pytest.raises(FileNotFoundError, match="nope"):
            load_autoencoder(spec)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="taef2_encoder.pth"):
        load_autoencoder(f"taef2:{empty}")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_autoencoder(f"kl:{empty}")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "taef2_encoder.pth").write_bytes(b"not a checkpoint")
    (bad / "taef2_decoder.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="taef2_encoder.pth: not a readable"):
        load_autoencoder(f"taef2:{bad}")
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    torch.save({"0.weight": torch.zeros(64, 3, 3, 3)}, wrong / "taef2_encoder.pth")
    torch.save({"0.weight": torch.zeros(1)}, wrong / "taef2_decoder.pth")
    with pytest.raises(ValueError, match="taef2_encoder.pth: not a TAESD-family"):
        load_autoencoder(f"taef2:{wrong}")
    junk = tmp_path / "vae.safetensors"
    junk.write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match="vae.safetensors: could not load"):
        load_autoencoder(f"kl:{junk}")
    with pytest.raises(FileNotFoundError, match="norm.json"):
        load_autoencoder("identity", norm_file=tmp_path / "norm.json")
    (tmp_path / "norm.json").write_text("{oops")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_autoencoder("identity", norm_file=tmp_path / "norm.json")


def test_bad_inputs():
    ae = load_autoencoder("identity", scale=[1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        ae.encode(torch.zeros(2, 4, 8, 8))
    with pytest.raises(ValueError, match=r"in \[-1, 1\]"):
        ae.encode(torch.full((1, 3, 8, 8), 255.0))
    with pytest.raises(ValueError, match="float"):
        ae.encode(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\(N, 3, h, w\)"):
        ae.decode(torch.zeros(1, 4, 8, 8))
    with pytest.raises(ValueError, match="scale"):
        load_autoencoder("identity", scale=[1.0, 2.0])
    with pytest.raises(ValueError, match="positive"):
        load_autoencoder("identity", scale=-1.0)
    ae8 = IdentityAutoencoder()
    ae8.downsample_factor = 8  # any backend with f=8 rejects sizes that are not multiples of 8
    with pytest.raises(ValueError, match="divisible by the downsample factor 8"):
        ae8.encode(torch.zeros(1, 3, 12, 16))


# ---------------------------------------------------------------------------------------------------------- measure
def test_measure_and_cli_on_identity(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    tool_path = Path(__file__).resolve().parents[1] / "tools" / "measure_vae.py"
    spec = importlib.util.spec_from_file_location("measure_vae", tool_path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / "norm.json"
    res = tool.main(["identity", "--images", str(folder), "--size", "16", "--batch-size", "2", "--out", str(out),
                     "--per-channel", "--no-progress"])
    assert res["num_images"] == 3 and res["latent_shape"] == [3, 16, 16]
    assert res["psnr"] > 150 and res["ssim"] == pytest.approx(1.0)  # identity is lossless
    data = json.loads(out.read_text())
    assert data["mode"] == "per_channel" and len(data["scale"]) == 3 and len(data["shift"]) == 3
    ae = load_autoencoder("identity", norm_file=out)
    z = ae.encode(folder_images(folder, 16)).transpose(0, 1).flatten(1)  # (3, N*h*w)
    torch.testing.assert_close(z.mean(1), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std(1, unbiased=False), torch.ones(3), atol=1e-5, rtol=0)
    glob = write_normalization(res, tmp_path / "g.json")
    assert json.loads(glob.read_text())["scale"] == pytest.approx(1 / res["stats"]["global_std"])
    assert math.isfinite(res["encode_img_per_s"]) and res["encode_img_per_s"] > 0
