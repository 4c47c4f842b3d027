"""Checkpoint loading: official-DiT parity (timm reference), diffusers conversion, training dicts, clear errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dit.models import create_model
from dit.models.checkpoint import (
    convert_diffusers_dit,
    dit_kwargs_from_state_dict,
    extract_state_dict,
    guess_model_name,
    load_dit_from_diffusers,
    load_model_weights,
    load_weights_file,
)
from dit.models.dit import DiT
from dit.models.layers import get_2d_sincos_pos_embed

TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10)


def _randomize(model: nn.Module, seed: int, std: float = 0.2) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("pos_embed"):
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)
    return model


# --------------------------------------------------------------------------------------------------------------------
# An independent reference DiT written the way facebookresearch/DiT builds it: timm's Attention, Mlp, PatchEmbed.
# --------------------------------------------------------------------------------------------------------------------


class _RefTimestepEmbedder(nn.Module):
    def __init__(self, hidden: int, freq: int = 256):
        super().__init__()
        self.freq = freq
        self.mlp = nn.Sequential(nn.Linear(freq, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t):
        half = self.freq // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(0, half, dtype=torch.float32) / half)
        args = t[:, None].float() * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class _RefLabelEmbedder(nn.Module):
    def __init__(self, num_classes: int, hidden: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden)

    def forward(self, y):
        return self.embedding_table(y)


def _ref_modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class _RefBlock(nn.Module):
    def __init__(self, hidden: int, heads: int):
        from timm.layers import Mlp
        from timm.models.vision_transformer import Attention

        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden, num_heads=heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden, hidden_features=4 * hidden, act_layer=lambda: nn.GELU(approximate="tanh"), drop=0)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def forward(self, x, c):
        sm, cm, gm, sf, cf, gf = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gm.unsqueeze(1) * self.attn(_ref_modulate(self.norm1(x), sm, cm))
        return x + gf.unsqueeze(1) * self.mlp(_ref_modulate(self.norm2(x), sf, cf))


class _RefFinal(nn.Module):
    def __init__(self, hidden: int, patch: int, out_ch: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, patch * patch * out_ch)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(_ref_modulate(self.norm_final(x), shift, scale))


class _RefDiT(nn.Module):
    def __init__(self, input_size, patch_size, in_channels, hidden_size, depth, num_heads, num_classes):
        from timm.layers import PatchEmbed

        super().__init__()
        self.out_channels, self.p = 2 * in_channels, patch_size
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = _RefTimestepEmbedder(hidden_size)
        self.y_embedder = _RefLabelEmbedder(num_classes, hidden_size)
        grid = input_size // patch_size
        self.pos_embed = nn.Parameter(
            get_2d_sincos_pos_embed(hidden_size, grid).float().unsqueeze(0), requires_grad=False
        )
        self.blocks = nn.ModuleList([_RefBlock(hidden_size, num_heads) for _ in range(depth)])
        self.final_layer = _RefFinal(hidden_size, patch_size, self.out_channels)

    def forward(self, x, t, y):
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y)
        for b in self.blocks:
            x = b(x, c)
        x = self.final_layer(x, c)
        n, T, _ = x.shape
        h = int(T**0.5)
        x = x.reshape(n, h, h, self.p, self.p, self.out_channels)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(n, self.out_channels, h * self.p, h * self.p)


def test_official_layout_parity_with_timm_reference(tmp_path):
    kw = {k: v for k, v in TINY.items()}
    ref = _randomize(_RefDiT(**kw), seed=0).double().eval()
    path = tmp_path / "DiT-tiny.pt"
    torch.save({k: v.float() for k, v in ref.state_dict().items()}, path)  # a flat tensor dict like the release files
    ref = ref.float().double()  # same (float32-rounded) weights as the file
    ours = load_model_weights(DiT(**kw), path).double().eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 8, 8, generator=gen, dtype=torch.float64)
    t = torch.tensor([0, 250, 999])
    y = torch.tensor([0, 7, 10])  # 10 = the null class
    with torch.no_grad():
        expected, got = ref(x, t, y), ours(x, t, y)
    assert expected.abs().max() > 1e-2  # non-trivial outputs
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)
    assert guess_model_name(ref.state_dict()) is None  # tiny width: not a paper config


# --------------------------------------------------------------------------------------------------------------------
# diffusers
# --------------------------------------------------------------------------------------------------------------------


def _tiny_diffusers(seed: int = 0, norm_eps: float = 1e-5):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    m = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                              num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_eps=norm_eps)
    _randomize(m, seed)
    # Converted official checkpoints carry identical embedder copies in every block: make it so.
    with torch.no_grad():
        for k, v in m.state_dict().items():
            if ".norm1.emb." in k and not k.startswith("transformer_blocks.0."):
                v.copy_(m.state_dict()["transformer_blocks.0." + k.split(".", 2)[2]])
    return m.eval()


def _compare_with_diffusers(dm, ours):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 8, 8, generator=gen, dtype=torch.float64)
    t, y = torch.tensor([13, 871]), torch.tensor([2, 10])
    dm, ours = dm.double(), ours.double().eval()
    with torch.no_grad():
        expected = dm(x, timestep=t, class_labels=y).sample
        got = ours(x, t, y)
    assert expected.abs().max() > 1e-2
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)


def test_diffusers_conversion_parity():
    dm = _tiny_diffusers(norm_eps=1e-6)
    sd = convert_diffusers_dit(dm.state_dict(), input_size=8)
    assert "blocks.1.attn.qkv.weight" in sd and sd["blocks.1.attn.qkv.weight"].shape == (96, 32)
    ours = DiT(**{**TINY, "num_classes": 10}, timestep_freq_shift=1.0)
    load_model_weights(ours, sd)
    _compare_with_diffusers(dm, ours)
    # Without the frequency shift the outputs differ: the option matters.
    plain = load_model_weights(DiT(**TINY), sd)
    with torch.no_grad():
        x, t, y = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.tensor([1])
        assert (plain(x, t, y) - ours.float()(x, t, y)).abs().max() > 1e-4


def test_load_diffusers_directory(tmp_path):
    dm = _tiny_diffusers(seed=4)  # default norm_eps=1e-5 on the pre-MLP norm
    dm.save_pretrained(tmp_path / "pipe" / "transformer")
    model, kwargs = load_dit_from_diffusers(tmp_path / "pipe")
    assert kwargs["timestep_freq_shift"] == 1.0 and kwargs["mlp_norm_eps"] == 1e-5 and kwargs["num_classes"] == 10
    assert kwargs["hidden_size"] == 32 and kwargs["depth"] == 2 and kwargs["learn_sigma"] is True
    _compare_with_diffusers(dm, model)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_dit_from_diffusers(tmp_path)


def test_diffusers_differing_block_embedders_rejected():
    dm = _tiny_diffusers()
    sd = dict(dm.state_dict())
    k = "transformer_blocks.1.norm1.emb.timestep_embedder.linear_1.weight"
    sd[k] = sd[k] + 1.0
    with pytest.raises(ValueError, match="per-block copies of t_embedder.mlp.0.weight differ"):
        convert_diffusers_dit(sd, input_size=8)


# --------------------------------------------------------------------------------------------------------------------
# Training checkpoints, prefixes, formats
# --------------------------------------------------------------------------------------------------------------------


def test_training_checkpoint_picks_ema_or_model(tmp_path):
    a, b = _randomize(DiT(**TINY), 1), _randomize(DiT(**TINY), 2)
    ckpt = {"model": a.state_dict(), "ema": b.state_dict(), "config": {"lr": 1e-4}, "model_name": "DiT-S/2",
            "model_kwargs": dict(TINY), "step": 7}
    path = tmp_path / "ckpt.pt"
    torch.save(ckpt, path)
    got = load_model_weights(DiT(**TINY), path)
    assert torch.equal(got.blocks[0].attn.qkv.weight, b.blocks[0].attn.qkv.weight)
    got = load_model_weights(DiT(**TINY), path, prefer="model")
    assert torch.equal(got.blocks[0].attn.qkv.weight, a.blocks[0].attn.qkv.weight)
    # No EMA saved: fall back to the model weights.
    assert torch.equal(extract_state_dict({"model": a.state_dict(), "ema": None})["pos_embed"], a.pos_embed)
    with pytest.raises(ValueError, match="prefer must be"):
        extract_state_dict(ckpt, prefer="best")
    with pytest.raises(ValueError, match="no state dict found"):
        extract_state_dict({"step": 3, "config": {}})


def test_official_training_checkpoint_with_namespace_args(tmp_path):
    import argparse

    a = _randomize(DiT(**TINY), 5)
    path = tmp_path / "0400000.pt"
    torch.save({"model": {}, "ema": a.state_dict(), "opt": {}, "args": argparse.Namespace(model="DiT-XL/2")}, path)
    got = load_model_weights(DiT(**TINY), path)
    assert torch.equal(got.final_layer.linear.weight, a.final_layer.linear.weight)


def test_ddp_and_compile_prefixes_are_stripped(tmp_path):
    a = _randomize(DiT(**TINY), 6)
    wrapped = {f"module._orig_mod.{k}": v for k, v in a.state_dict().items()}
    got = load_model_weights(DiT(**TINY), {"ema": wrapped})
    assert torch.equal(got.blocks[1].mlp.fc2.weight, a.blocks[1].mlp.fc2.weight)


def test_safetensors_file(tmp_path):
    from safetensors.torch import save_file

    a = _randomize(DiT(**TINY), 7)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in a.state_dict().items()}, str(path))
    got = load_model_weights(DiT(**TINY), path)
    assert torch.equal(got.x_embedder.proj.weight, a.x_embedder.proj.weight)


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_file_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt does not exist"):
        load_weights_file(tmp_path / "nope.pt")
    (tmp_path / "w.npz").write_bytes(b"x")
    with pytest.raises(ValueError, match="unknown extension '.npz'"):
        load_weights_file(tmp_path / "w.npz")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="could not read weights file .*bad.pt"):
        load_weights_file(tmp_path / "bad.pt")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00\x01garbage")
    with pytest.raises(ValueError, match="could not read safetensors file"):
        load_weights_file(tmp_path / "bad.safetensors")
    with open(tmp_path / "evil.pt", "wb") as f:
        torch.save({"x": _Evil()}, f)
    with pytest.raises(ValueError, match="safely"):
        load_weights_file(tmp_path / "evil.pt")


def test_wrong_size_checkpoint_names_what_it_looks_like():
    with torch.device("meta"):  # shapes only: nothing is allocated or copied before the check fails
        sd_512 = create_model("DiT-XL/2", input_size=64).state_dict()
        model_256 = create_model("DiT-XL/2")
    with pytest.raises(ValueError) as e:
        load_model_weights(model_256, sd_512)
    msg = str(e.value)
    assert "shape mismatches (1): pos_embed: file (1, 1024, 1152) vs model (1, 256, 1152)" in msg
    assert "DiT-XL/2 checkpoint with input_size=64 (512px" in msg and "create_model('DiT-XL/2', input_size=64" in msg
    with torch.device("meta"):
        sd_b4 = create_model("DiT-B/4").state_dict()
        model_s2 = create_model("DiT-S/2")
    with pytest.raises(ValueError, match=r"shape mismatches \(132\)") as e:  # S and B share depth 12: same keys
        load_model_weights(model_s2, sd_b4)
    assert "DiT-B/4 checkpoint" in str(e.value) and "create_model('DiT-B/4')" in str(e.value)
    with pytest.raises(ValueError, match="missing keys"):
        load_model_weights(DiT(**TINY), {k: v for k, v in DiT(**TINY).state_dict().items() if "blocks.1" not in k})


def test_kwargs_inference_and_name_guess():
    kw = dict(TINY, input_size=16, patch_size=4, learn_sigma=False)
    inferred = dit_kwargs_from_state_dict(DiT(**kw).state_dict(), num_heads=2)
    assert inferred == {**kw, "mlp_ratio": 4.0}
    for name in ("DiT-XL/2", "DiT-L/4", "DiT-S/8-T", "DiT-B/2"):
        with torch.device("meta"):
            sd = create_model(name).state_dict()
        assert guess_model_name(sd) == name
    with torch.device("meta"):
        inferred = dit_kwargs_from_state_dict(create_model("DiT-S/2-T").state_dict())
    assert inferred["context_dim"] == 384 and inferred["num_classes"] == 0 and inferred["num_heads"] == 6
    with pytest.raises(ValueError, match="not a DiT state dict"):
        dit_kwargs_from_state_dict({"foo": torch.zeros(1)})
