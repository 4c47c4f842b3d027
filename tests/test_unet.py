"""Tests of the ADM-style UNet baseline (dit/models/unet.py): interface, init, conditioning, FLOPs parity with DiT."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from dit.models import create_model, list_models
from dit.models.layers import group_norm_moments
from dit.models.unet import AttentionBlock, Downsample, ResBlock, UNet, Upsample, upsample_nearest2x

UNET_NAMES = [f"UNet-{s}{t}" for s in ("S", "B", "L", "XL") for t in ("", "-T")]
# Tiny shapes for any registered name: 2 levels (8x8, 4x4), attention at 4x4, 8-channel heads, 8 groups.
TINY = dict(
    input_size=8, model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,),
    num_head_channels=8, norm_groups=8,
)  # fmt: skip
CTX = 16  # tiny text width for the text variants


def tiny(name: str = "UNet-S", **kw) -> UNet:
    extra = dict(context_dim=CTX) if name.endswith("-T") else {}
    return create_model(name, **{**TINY, **extra, **kw})


def perturb_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give the zero-initialised layers random values, so every path of the network matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def inputs(model: UNet, n: int = 2, size: int = 8, seq: int = 5, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random (x, t, conditioning kwargs) for ``model``; text inputs have padding at the end of sample 0."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, model.in_channels, size, size, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    kw: dict = {}
    if model.conditioning == "class":
        kw["y"] = torch.randint(0, model.num_classes, (n,), generator=g)
    if model.conditioning == "text":
        kw["context"] = torch.randn(n, seq, model.context_dim, generator=g)
        mask = torch.ones(n, seq, dtype=torch.bool)
        mask[0, 3:] = False  # first sample has 2 padding tokens
        kw["context_mask"] = mask
    return x, t, kw


def test_registered_names_and_attributes():
    assert list_models("UNet-*") == sorted(UNET_NAMES)
    for name in UNET_NAMES:
        with torch.device("meta"):
            m = create_model(name)
        text = name.endswith("-T")
        assert (m.in_channels, m.out_channels, m.input_size, m.learn_sigma) == (4, 8, 32, True)
        assert m.conditioning == ("text" if text else "class")
        assert m.num_classes == (0 if text else 1000)
        assert m.context_dim == (384 if text else None)


@pytest.mark.parametrize("name", UNET_NAMES)
def test_tiny_forward_backward_zero_init(name):
    torch.manual_seed(0)
    model = tiny(name)
    x, t, kw = inputs(model)
    out = model(x, t, **kw)
    assert out.shape == (2, model.out_channels, 8, 8)
    assert torch.equal(out, torch.zeros_like(out)), "a fresh UNet must output exactly zero (zero-init out conv)"

    perturb_(model)
    out = model(x, t, **kw)
    assert torch.isfinite(out).all() and out.abs().mean() > 1e-3
    out.square().mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    missing = [n for n, g in grads.items() if g is None and "y_embedder" not in n]
    assert not missing, f"parameters without gradient: {missing}"
    assert all(torch.isfinite(g).all() for g in grads.values() if g is not None)
    assert grads["input_blocks.0.0.weight"].abs().sum() > 0, "the gradient must reach the first conv"


def test_learned_sigma_channels():
    for learn_sigma, expected in ((True, 8), (False, 4)):
        m = tiny(learn_sigma=learn_sigma)
        assert m.out_channels == expected
        x, t, kw = inputs(m)
        assert m(x, t, **kw).shape == (2, expected, 8, 8)
    m = tiny(in_channels=3)
    assert m(torch.randn(1, 3, 8, 8), torch.zeros(1), y=torch.zeros(1, dtype=torch.long)).shape == (1, 6, 8, 8)


def test_label_dropout_and_null_class():
    torch.manual_seed(0)
    m = perturb_(tiny(num_classes=10, class_dropout_prob=1.0))
    x, t, kw = inputs(m)
    null = torch.full_like(kw["y"], 10)
    m.eval()
    cond, uncond = m(x, t, **kw), m(x, t, y=null)
    assert not torch.allclose(cond, uncond), "the label must change the output"
    m.train()  # with p = 1 every label is replaced by the null class (index num_classes)
    assert torch.allclose(m(x, t, **kw), uncond, atol=1e-6)
    assert m.y_embedder.embedding_table.num_embeddings == 11
    # no null class without label dropout, as in DiT
    assert tiny(num_classes=10, class_dropout_prob=0.0).y_embedder.embedding_table.num_embeddings == 10


def test_unconditional_model():
    m = perturb_(tiny(num_classes=0))
    assert m.conditioning == "none" and m.y_embedder is None
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([1, 500])
    out = m(x, t)
    assert out.shape == (2, 8, 8, 8) and out.abs().amax() > 0
    assert not torch.allclose(m(x, t + 200), out)  # the timestep is used


def test_channels_last_same_output():
    torch.manual_seed(0)
    m = perturb_(tiny("UNet-B-T")).eval()
    x, t, kw = inputs(m)
    ref = m(x, t, **kw)
    m_cl = m.to(memory_format=torch.channels_last)
    out = m_cl(x.to(memory_format=torch.channels_last), t, **kw)
    assert torch.allclose(out, ref, atol=1e-5)


def test_set_channels_last_runs_nhwc_activations_with_same_output():
    """UNet.set_channels_last: the convolutions see NHWC activations (parameters keep their layout) and the output
    equals the NCHW model's in float64; off again, the input's layout is left alone."""
    torch.manual_seed(0)
    m = perturb_(tiny("UNet-B-T")).double().eval()
    x, t, kw = inputs(m)
    x = x.double()
    kw = {k: (v.double() if v.is_floating_point() else v) for k, v in kw.items()}
    ref = m(x, t, **kw)
    seen = []
    hook = m.input_blocks[1][0].in_conv.register_forward_pre_hook(
        lambda mod, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    m.set_channels_last(True)
    out = m(x, t, **kw)
    assert seen == [True] and x.is_contiguous()  # NHWC inside, the caller's tensor untouched
    assert all(p.is_contiguous() for p in m.parameters())
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    m.set_channels_last(False)
    m(x, t, **kw)
    hook.remove()
    assert seen == [True, False]


@pytest.mark.parametrize("channels_last", [False, True])
def test_group_norm_moments_matches_group_norm_adagn_silu_float64(channels_last):
    """layers.group_norm_moments = F.group_norm [* (1 + scale) + shift] [SiLU] in value and gradient (float64), in
    the input's memory format; with a mean 1e4 times the spread (the parallel-variance combination of shifted channel
    sums, where E[x^2] - E[x]^2 would cancel)."""
    g = torch.Generator().manual_seed(0)
    norm = torch.nn.GroupNorm(3, 12).double()
    with torch.no_grad():
        norm.weight.copy_(torch.randn(12, generator=g, dtype=torch.float64))
        norm.bias.copy_(torch.randn(12, generator=g, dtype=torch.float64))
    mf = torch.channels_last if channels_last else torch.contiguous_format
    for offset in (0.0, 1e4):
        x = (torch.randn(2, 12, 5, 3, generator=g, dtype=torch.float64) + offset).contiguous(memory_format=mf)
        scale, shift = torch.randn(2, 2, 12, generator=g, dtype=torch.float64).unbind(0)
        for kw in (dict(), dict(silu=True), dict(scale=scale, shift=shift, silu=True)):
            xs = [x.clone().requires_grad_(True) for _ in range(2)]
            ref = norm(xs[0].contiguous())  # torch's NCHW kernel: its channels-last one cancels at large means
            if "scale" in kw:
                ref = ref * (1 + kw["scale"][..., None, None]) + kw["shift"][..., None, None]
            if kw.get("silu"):
                ref = F.silu(ref)
            out = group_norm_moments(xs[1], norm, **kw)
            assert out.is_contiguous(memory_format=mf) and out.dtype == x.dtype
            torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
            w = torch.randn(ref.shape, generator=g, dtype=torch.float64)
            ref_grads = torch.autograd.grad((ref * w).sum(), [xs[0], norm.weight, norm.bias])
            grads = torch.autograd.grad((out * w).sum(), [xs[1], norm.weight, norm.bias])
            for a, b in zip(grads, ref_grads):
                torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-7 * (1 + offset))
    # bf16 activations: fp32 statistics, output in bf16 within its rounding of the fp32 result
    xb = torch.randn(2, 12, 4, 4, generator=g).to(torch.bfloat16)
    out = group_norm_moments(xb, norm.float(), silu=True)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), F.silu(norm.float()(xb.float())), rtol=8e-3, atol=8e-3)


def test_upsample_nearest2x_equals_interpolate_in_both_layouts():
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    for mf in (torch.contiguous_format, torch.channels_last):
        xi = x.contiguous(memory_format=mf).detach().requires_grad_(True)
        y = upsample_nearest2x(xi)
        ref = F.interpolate(x, scale_factor=2.0, mode="nearest")
        assert torch.equal(y, ref) and y.is_contiguous(memory_format=mf)
        w = torch.randn(ref.shape, dtype=torch.float64)
        (y * w).sum().backward()
        torch.testing.assert_close(xi.grad, w.unflatten(3, (5, 2)).unflatten(2, (4, 2)).sum((3, 5)))


@pytest.mark.parametrize("kernels", [False, True])
def test_set_moment_norm_same_outputs_and_gradients_float64(kernels):
    """UNet.set_moment_norm (with channels-last, as it is meant to run): every norm goes through group_norm_moments
    (or the group_norm_act op of the Triton kernels, here its reference) and the outputs and all gradients equal the
    plain model's in float64; for the text variant too."""
    for name in ("UNet-B", "UNet-S-T"):
        torch.manual_seed(0)
        ref = perturb_(tiny(name, use_scale_shift_norm=name == "UNet-B")).double()
        model = copy.deepcopy(ref)
        model.set_moment_norm(True, kernels=kernels)
        model.set_channels_last(True)
        blocks = [m for m in model.modules() if isinstance(m, (ResBlock, AttentionBlock))]
        assert blocks and all(m.moment_norm == ("kernels" if kernels else True) for m in blocks)
        x, t, kw = inputs(ref)
        x = x.double()
        kw = {k: (v.double() if v.is_floating_point() else v) for k, v in kw.items()}
        torch.manual_seed(1)  # label dropout draws the same way in both
        out_ref = ref(x, t, **kw)
        torch.manual_seed(1)
        out = model(x, t, **kw)
        torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-12)
        out_ref.square().sum().backward()
        out.square().sum().backward()
        for (k, p), p_ref in zip(model.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-8, atol=1e-10, msg=lambda m, k=k: f"{k}: {m}")


def test_text_variant_ignores_padding_tokens():
    torch.manual_seed(0)
    m = perturb_(tiny("UNet-S-T")).eval()
    x, t, kw = inputs(m)
    ref = m(x, t, **kw)
    ctx = kw["context"].clone()
    ctx[0, 3:] = 100 * torch.randn(2, CTX)  # padding positions of sample 0
    assert torch.allclose(m(x, t, **{**kw, "context": ctx}), ref, atol=1e-5)
    ctx = kw["context"].clone()
    ctx[0, 1] += 1.0  # a real token: must matter
    changed = m(x, t, **{**kw, "context": ctx})
    assert not torch.allclose(changed[0], ref[0], atol=1e-4)
    assert torch.allclose(changed[1], ref[1], atol=1e-6), "samples are independent"
    # a given pooled vector replaces the masked mean
    pooled = torch.randn(2, CTX)
    assert not torch.allclose(m(x, t, **kw, pooled=pooled), ref, atol=1e-4)


def test_bad_inputs_raise_clear_errors():
    m = tiny()
    x, t, kw = inputs(m)
    with pytest.raises(ValueError, match="x must be"):
        m(torch.randn(2, 3, 8, 8), t, **kw)
    with pytest.raises(ValueError, match="not divisible"):
        m(torch.randn(2, 4, 7, 8), t, **kw)
    with pytest.raises(ValueError, match="needs y"):
        m(x, t)
    with pytest.raises(ValueError, match="t must be"):
        m(x, t[:1], **kw)
    mt = tiny("UNet-S-T")
    with pytest.raises(ValueError, match="needs context"):
        mt(x, t)
    with pytest.raises(ValueError, match="context must be"):
        mt(x, t, context=torch.randn(2, 5, CTX + 1))
    with pytest.raises(ValueError, match="context_mask"):
        mt(x, t, context=torch.randn(2, 5, CTX), context_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="input_size"):
        tiny(input_size=9)
    with pytest.raises(ValueError, match="attention_resolutions"):
        tiny(attention_resolutions=(8,))
    with pytest.raises(ValueError, match="norm_groups"):
        tiny(model_channels=12)
    with pytest.raises(ValueError, match="num_head_channels"):
        tiny(num_head_channels=12)
    with pytest.raises(ValueError, match="num_classes=0"):
        tiny("UNet-S-T", num_classes=10)
    with pytest.raises(TypeError, match="Accepted keyword arguments"):
        create_model("UNet-S", hidden_size=3)


def test_grad_checkpointing_same_gradients():
    torch.manual_seed(0)
    m = perturb_(tiny("UNet-S-T", dropout=0.0)).train()
    x, t, kw = inputs(m)
    grads = []
    for ckpt in (False, True):
        m.zero_grad()
        m.set_grad_checkpointing(ckpt)
        out = m(x, t, **kw)
        out.square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
        grads[-1]["_out"] = out.detach()
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5), n


def test_variants_without_updown_and_scale_shift():
    variants = (
        dict(resblock_updown=False), dict(use_scale_shift_norm=False), dict(channel_mult=(1, 2, 2), input_size=16),
    )  # fmt: skip
    for kw in variants:
        m = perturb_(tiny(**kw))
        x, t, ykw = inputs(m, size=m.input_size)
        out = m(x, t, **ykw)
        assert out.shape == (2, 8, m.input_size, m.input_size) and torch.isfinite(out).all()
        blocks = [b for b in m.modules() if isinstance(b, ResBlock)]
        updown = [b for b in blocks if b.up or b.down]
        # resampling by ResBlocks (ADM's default) or by the plain Downsample / Upsample layers
        assert bool(updown) == kw.get("resblock_updown", True)
        assert any(isinstance(b, (Downsample, Upsample)) for b in m.modules()) == (not updown)
        scale_shift = kw.get("use_scale_shift_norm", True)
        assert all(b.emb_proj.out_features == b.out_norm.num_channels * (2 if scale_shift else 1) for b in blocks)


def test_bf16_model_takes_fp32_inputs():
    ref = perturb_(tiny("UNet-S-T")).eval()
    m = copy.deepcopy(ref).to(torch.bfloat16)
    x, t, kw = inputs(m)
    out = m(x, t, **kw)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    want = ref(x, t, **kw)  # the fp32 model on the same fp32 inputs: bf16 weights and activations, not a cast bug
    assert ((out.float() - want).norm() / want.norm()).item() < 5e-2


def test_resblock_adagn_matches_formula_float64():
    """AdaGN (ADM Sec. 3): out = skip(x) + conv2(drop(SiLU(GN(conv1(SiLU(GN(x)))) * (1 + s) + b)))."""
    torch.manual_seed(0)
    blk = perturb_(ResBlock(channels=8, emb_channels=6, out_channels=16, norm_groups=4)).double()
    x, emb = torch.randn(2, 8, 4, 4, dtype=torch.float64), torch.randn(2, 6, dtype=torch.float64)
    h = blk.in_conv(F.silu(F.group_norm(x, 4, blk.in_norm.weight, blk.in_norm.bias)))
    scale, shift = (F.silu(emb) @ blk.emb_proj.weight.T + blk.emb_proj.bias).chunk(2, dim=1)
    h = F.group_norm(h, 4, blk.out_norm.weight, blk.out_norm.bias)
    h = h * (1 + scale[..., None, None]) + shift[..., None, None]
    ref = blk.skip(x) + blk.out_conv(F.silu(h))
    torch.testing.assert_close(blk(x, emb), ref, rtol=1e-12, atol=1e-12)
    # BigGAN down block: both paths average-pooled, output at half resolution
    down = ResBlock(channels=8, emb_channels=6, out_channels=8, norm_groups=4, down=True).double()
    torch.testing.assert_close(down(x, emb), F.avg_pool2d(x, 2))  # zero-init branch -> pooled identity
    up = ResBlock(channels=8, emb_channels=6, norm_groups=4, up=True).double()
    torch.testing.assert_close(up(x, emb), x.repeat_interleave(2, 2).repeat_interleave(2, 3))


def test_attention_block_matches_softmax_float64():
    torch.manual_seed(0)
    blk = perturb_(AttentionBlock(channels=16, num_heads=2, norm_groups=4)).double()
    x = torch.randn(2, 16, 3, 5, dtype=torch.float64)
    tok = F.group_norm(x, 4, blk.norm.weight, blk.norm.bias).flatten(2).transpose(1, 2)  # (N, T, C)
    q, k, v = (tok @ blk.attn.qkv.weight.T + blk.attn.qkv.bias).chunk(3, dim=-1)
    heads = lambda z: z.view(2, 15, 2, 8).transpose(1, 2)  # noqa: E731  (N, H, T, Dh)
    w = torch.softmax(heads(q) @ heads(k).transpose(-1, -2) / math.sqrt(8), dim=-1)
    o = (w @ heads(v)).transpose(1, 2).reshape(2, 15, 16) @ blk.attn.proj.weight.T + blk.attn.proj.bias
    ref = x + o.transpose(1, 2).reshape(2, 16, 3, 5)
    torch.testing.assert_close(blk(x), ref, rtol=1e-12, atol=1e-12)


def _forward_gflops(name: str) -> float:
    """Forward FLOPs (2 per multiply-add) at batch 1 on 32x32x4 latents, on the meta device (no memory, no compute)."""
    with torch.device("meta"):
        model = create_model(name).eval()
        x, t, y = torch.randn(1, 4, 32, 32), torch.zeros(1), torch.zeros(1, dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        model(x, t, y=y)
    return counter.get_total_flops() / 1e9


@pytest.mark.parametrize("size", ["S", "B", "L", "XL"])
def test_flops_match_dit(size):
    dit, unet = _forward_gflops(f"DiT-{size}/2"), _forward_gflops(f"UNet-{size}")
    reference = dict(S=12.1, B=46.0, L=161.4, XL=237.3)[size]  # the DiT's documented forward GFLOPs
    assert abs(dit / reference - 1) < 0.02, f"DiT-{size}/2 counts {dit:.1f} GFLOP, expected ~{reference}"
    assert abs(unet / dit - 1) < 0.08, f"UNet-{size}: {unet:.1f} GFLOP vs DiT-{size}/2 {dit:.1f}"


def test_unet_s_convolutions_fill_tensor_core_tiles():
    """UNet-S's shape was chosen for speed (docs/benchmarks.md, run 23): apart from the input and output convolutions,
    every convolution's output width is a multiple of 128, unlike its former 96-channel shape."""
    def widths(**overrides):
        with torch.device("meta"):
            model = create_model("UNet-S", **overrides)
        convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
        assert convs[0].in_channels == 4 and convs[-1].out_channels == 8  # latents in, (eps, sigma) out
        return {m.out_channels for m in convs[:-1]}

    assert widths() == {128, 256, 384}
    assert 96 in widths(model_channels=96, channel_mult=(1, 2, 2, 2), num_res_blocks=4)


def test_compile_blocks_shares_graphs_between_equal_blocks():
    """UNet regional compilation: blocks of equal shape share a compiled graph (fewer graphs than blocks), the
    per-function graph limit is raised so none falls back to eager, and outputs and gradients equal eager."""
    from helpers import regional_twin

    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    ref = tiny(num_res_blocks=3)
    with torch.no_grad():  # zero-init output convs would hide the blocks
        for p in ref.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    ref.double().eval()  # float64: compiled and eager sum gradients in different orders; no label dropout
    x = torch.randn(2, 4, 8, 8, generator=gen, dtype=torch.float64)
    t = torch.randint(0, 1000, (2,), generator=gen)
    y = torch.randint(0, 1000, (2,), generator=gen)
    model, out_ref, out, counter, n = regional_twin(ref, x, t, y)
    res_blocks = sum(isinstance(m, ResBlock) for m in model.modules())
    assert n == res_blocks + sum(isinstance(m, AttentionBlock) for m in model.modules()) and res_blocks > 8
    assert torch._dynamo.config.recompile_limit >= res_blocks
    # Equal shapes share: 3 encoder blocks per level reuse one graph after the level's first.
    assert 0 < counter.frame_count < n
    torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-12)
    for (k, p), p_ref in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-10, atol=1e-12, msg=lambda m, k=k: f"{k}: {m}")
