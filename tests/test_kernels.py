"""Fused ops (dit.models.kernels), the DiT's fused FP8 inference path and its fused training forward, on CPU.

The CUDA (Triton) kernels are checked against these same reference implementations on the GPU by
``scripts/check_kernels.py`` (docs/benchmarks.md, run 7); here the references are checked against float64 formulas,
and the block restructuring (residual updates deferred into the next LayerNorm) against the plain forward.
"""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch.library import opcheck

from dit.models import create_model
from dit.models.fp8 import E4M3, calibrate_float8, convert_to_float8
from dit.models.kernels import (add_layernorm_modulate, add_layernorm_modulate_backward, gelu_tanh_fp8,
                                layernorm_modulate, qkv_grad, rowwise_fp8)

TINY = dict(input_size=8, hidden_size=32, depth=3, num_heads=2, num_classes=4)


def _inputs(gen: torch.Generator, n=2, t=5, d=16, dtype=torch.float64):
    x = torch.randn(n, t, d, generator=gen, dtype=dtype) * 3 + 1
    o = torch.randn(n, t, d, generator=gen, dtype=dtype)
    mod = torch.randn(n, 6 * d, generator=gen, dtype=dtype)  # adaLN output: chunks are strided (N, D) views
    shift, scale, gate = mod[:, :d], mod[:, d:2 * d], mod[:, 2 * d:3 * d]
    return x, o, gate, shift, scale


def _ln_mod_formula(x, shift, scale, eps):
    """LayerNorm without affine parameters, then adaLN modulation (DiT Sec. 3.2), written out in float64."""
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)  # biased, as LayerNorm
    return (x - mean) / torch.sqrt(var + eps) * (1 + scale[:, None]) + shift[:, None]


def test_layernorm_modulate_and_residual_update_match_the_formulas():
    x, o, gate, shift, scale = _inputs(torch.Generator().manual_seed(0))
    want = _ln_mod_formula(x, shift, scale, 1e-6)
    torch.testing.assert_close(layernorm_modulate(x, shift, scale, 1e-6, None, torch.float64), want,
                               rtol=1e-12, atol=1e-12)
    x2, y = add_layernorm_modulate(x, o, gate, shift, scale, 1e-6, None, torch.float64)
    torch.testing.assert_close(x2, x + gate[:, None] * o, rtol=0, atol=0)
    torch.testing.assert_close(y, _ln_mod_formula(x + gate[:, None] * o, shift, scale, 1e-6), rtol=1e-12, atol=1e-12)
    # the output dtype is the next GEMM's input dtype; the stream keeps its own
    bias = torch.randn(x.shape[-1], dtype=torch.float64)  # o's linear layer's bias, left out of its GEMM
    x2, y = add_layernorm_modulate(x, o, gate, shift, scale, 1e-6, None, torch.float64, bias)
    torch.testing.assert_close(x2, x + gate[:, None] * (o + bias), rtol=0, atol=0)
    torch.testing.assert_close(y, _ln_mod_formula(x2, shift, scale, 1e-6), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"add_layernorm_modulate: bias must be a dense \(16,\) vector"):
        add_layernorm_modulate(x, o, gate, shift, scale, 1e-6, None, torch.float64, bias[:8])
    x32 = x.float()
    x2, y = add_layernorm_modulate(x32, o.float(), gate.float(), shift.float(), scale.float(), 1e-6, None,
                                   torch.bfloat16)
    assert x2.dtype == torch.float32 and y.dtype == torch.bfloat16


def test_fp8_outputs_are_the_saturating_e4m3_cast_of_the_scaled_values():
    x, o, gate, shift, scale = _inputs(torch.Generator().manual_seed(1))
    y = _ln_mod_formula(x, shift, scale, 1e-6)
    s = 448.0 / y.abs().amax().item() * 4  # a quarter of the range saturates
    got = layernorm_modulate(x, shift, scale, 1e-6, s, E4M3)
    assert got.dtype == E4M3
    want = (y * s).clamp(-448, 448).to(E4M3)
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    assert (got.double().abs() == 448).float().mean() > 0.05  # saturated, not inf/nan
    assert torch.isfinite(got.double()).all()

    h = torch.linspace(-6, 6, 2001, dtype=torch.float64).reshape(1, -1)
    gelu = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))  # tanh-GELU, written out
    for scale_ in (1.0, 30.0, 200.0):  # 200: GELU(6) * 200 > 448 saturates
        got = gelu_tanh_fp8(h, scale_)
        want = (gelu * scale_).clamp(-448, 448).to(E4M3)
        assert got.dtype == E4M3 and torch.equal(got.view(torch.uint8), want.view(torch.uint8))


def test_bad_output_arguments_raise_one_clear_error():
    x, o, gate, shift, scale = _inputs(torch.Generator().manual_seed(2))
    with pytest.raises(ValueError, match="out_scale is required for"):
        layernorm_modulate(x, shift, scale, 1e-6, None, E4M3)
    with pytest.raises(ValueError, match="out_scale is required for"):
        add_layernorm_modulate(x, o, gate, shift, scale, 1e-6, 2.0, torch.bfloat16)


def test_ops_pass_torch_library_opcheck():
    # fake (meta) kernels agree with the real ones, incl. a non-contiguous stream (which the kernels make dense)
    gen = torch.Generator().manual_seed(3)
    x, o, gate, shift, scale = _inputs(gen, dtype=torch.float32)
    xt = x.transpose(1, 2).contiguous().transpose(1, 2)
    bias = torch.randn(x.shape[-1], generator=gen)
    for args in ((xt, o, gate, shift, scale, 1e-6, 3.0, E4M3), (xt, o, gate, shift, scale, 1e-6, None, torch.float32),
                 (xt, o, gate, shift, scale, 1e-6, None, torch.bfloat16, bias)):
        opcheck(add_layernorm_modulate, args)
    opcheck(layernorm_modulate, (xt, shift, scale, 1e-6, None, torch.bfloat16))
    dy = torch.randn(x.shape, generator=gen)
    for dxn in (None, torch.randn(x.shape, generator=gen)):
        opcheck(add_layernorm_modulate_backward, (xt, o, gate, shift, scale, dy, dxn, 1e-6))
        opcheck(add_layernorm_modulate_backward, (xt, o, gate, shift, scale, dy, dxn, 1e-6, bias))
    opcheck(gelu_tanh_fp8, (torch.randn(4, 32, generator=gen), 2.0))
    opcheck(rowwise_fp8, (torch.randn(6, 48, generator=gen, dtype=torch.bfloat16),))
    opcheck(qkv_grad, tuple(torch.randn(2, 3, 5, 8, generator=gen) for _ in range(3)))


def _randomised(seed: int = 0, name: str = "DiT-S/2", **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    m = create_model(name, **{**TINY, **kw}).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name != "pos_embed":
                p.normal_(0, 0.1)
    return m


@pytest.mark.parametrize("text", [False, True])
def test_deferred_residual_blocks_equal_the_plain_forward_in_float64(text):
    """DiTBlock.forward_fused leaves each block's last residual update pending for the next block's first LayerNorm
    (text blocks: also through the cross-attention's affine LayerNorm): chained, the blocks must give the plain
    forward's stream exactly (no FP8 involved: float64 throughout)."""
    m = (_randomised(context_dim=8, num_classes=0) if text else _randomised()).double()
    gen = torch.Generator().manual_seed(4)
    h = torch.randn(3, 16, 32, generator=gen, dtype=torch.float64)  # (N, T, D) stream
    c = torch.randn(3, 32, generator=gen, dtype=torch.float64)
    ctx = torch.randn(3, 5, 32, generator=gen, dtype=torch.float64) if text else None  # projected tokens
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool) if text else None
    with torch.no_grad():
        want = h
        for block in m.blocks:
            want = block(want, c, ctx, mask)
        got, pending = h, None
        for block in m.blocks:
            got, pending = block.forward_fused(got, c, pending, torch.float64, ctx, mask)
        o, gate, bias = pending
        assert bias is None  # not training: no bias left out of a GEMM
        got = got + gate.unsqueeze(1) * o
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_layernorm_ops_gradients_pass_gradcheck_in_float64():
    x, o, gate, shift, scale = (v.clone().requires_grad_() for v in _inputs(torch.Generator().manual_seed(6)))
    assert torch.autograd.gradcheck(
        lambda *a: add_layernorm_modulate(*a, 1e-6, None, torch.float64), (x, o, gate, shift, scale))
    bias = torch.randn(x.shape[-1], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda b, *a: add_layernorm_modulate(*a, 1e-6, None, torch.float64, b), (bias, x, o, gate, shift, scale))
    assert torch.autograd.gradcheck(lambda *a: layernorm_modulate(*a, 1e-6, None, torch.float64), (x, shift, scale))
    with pytest.raises(RuntimeError, match="E4M3 output has no gradient"):
        layernorm_modulate(x.float(), shift.float(), scale.float(), 1e-6, 2.0, E4M3).float().sum().backward()


@pytest.mark.parametrize("text", [False, True])
@pytest.mark.parametrize("kernels", [False, True])
def test_fused_training_forward_gives_the_plain_models_gradients(text, kernels, monkeypatch):
    """DiT.fused_training runs forward_fused with autograd: loss and every parameter gradient equal the plain
    forward's (float64; the ops' backward formulas against autograd through nn.LayerNorm). With the attention and
    MLP kernels on, the attention's and the MLP's output biases leave their GEMMs for the residual updates
    (``forward_split_bias``): their gradients then come from add_layernorm_modulate's backward."""
    m = (_randomised(context_dim=8, num_classes=0) if text else _randomised()).double().train()
    biases = []
    if kernels:
        m.set_fused_attention(True)
        m.set_mlp_epilogues(True)
        import dit.models.dit as D
        real = D.add_layernorm_modulate
        monkeypatch.setattr(D, "add_layernorm_modulate", lambda *a: (biases.append(a[-1] is not None), real(*a))[1])
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(3, 4, 8, 8, generator=gen, dtype=torch.float64)
    t = torch.randint(0, 1000, (3,), generator=gen)
    kw = {"context": torch.randn(3, 5, 8, generator=gen, dtype=torch.float64),
          "context_mask": torch.tensor([[1, 1, 1, 0, 0]] * 3, dtype=torch.bool)} if text else {"y": torch.arange(3)}
    grads = []
    for fused in (False, True):
        m.fused_training = fused
        m.zero_grad(set_to_none=True)
        torch.manual_seed(0)  # label dropout draws the same
        (m(x, t, **kw) ** 2).mean().backward()
        grads.append({k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-9, atol=1e-12, msg=k)
    # the attention's bias in every block (into the update before norm2, or before the cross-attention's LayerNorm);
    # the MLP's in every block (the last block's into the final layer's LayerNorm)
    assert sum(biases) == (2 * len(m.blocks) if kernels else 0)


def test_backward_kernel_matches_the_formulas_in_the_triton_interpreter():
    """The Triton backward of add_layernorm_modulate (one pass, per-program column partial sums), run by Triton's
    CPU interpreter (TRITON_INTERPRET=1, so in a subprocess) against the float64 reference formulas: DiT-S's width
    (4 rows per step), an odd width and token count (masking, a partial last program), stride-0 (text) modulation
    rows, with and without a residual gradient, with and without a bias of o (and the forward kernel with it); and
    through the op with fp32 inputs, whose outputs must not alias."""
    pytest.importorskip("triton")
    code = textwrap.dedent("""
        import torch
        from dit.models import kernels as K
        g = torch.Generator().manual_seed(0)
        cases = [(2, 37, 72, False, True, True), (3, 20, 384, True, False, False), (1, 16, 40, False, True, False),
                 (3, 9, 48, False, False, True)]
        for n, t, d, stride0, with_dxn, with_bias in cases:
            x = torch.randn(n, t, d, generator=g) * 2 + 0.5
            o, dy = torch.randn(n, t, d, generator=g), torch.randn(n, t, d, generator=g)
            dxn = torch.randn(n, t, d, generator=g) if with_dxn else None
            mod = torch.randn(n, 3 * d, generator=g)
            gate, shift, scale = mod[:, :d], mod[:, d:2 * d], mod[:, 2 * d:]
            bias = torch.randn(d, generator=g) * 3 if with_bias else None  # large: a dgate without it is far off
            if stride0:
                shift, scale = shift[0].expand(n, d), scale[0].expand(n, d)
            got = K._add_ln_mod_bwd_triton(x, o, gate, scale, dy, dxn, 1e-6, bias,
                                           rows_per_program=6)  # not a whole step
            want = K.add_layernorm_modulate_backward(*(v.double() for v in (x, o, gate, shift, scale, dy)),
                                                     dxn.double() if with_dxn else None, 1e-6,
                                                     bias.double() if with_bias else None)
            assert (got[5] is None) == (not with_bias) and want[5].numel() == (d if with_bias else 0)
            for name, a, b in zip(("dx", "do", "dgate", "dshift", "dscale", "dbias"), got, want):
                if a is None:
                    continue
                err = ((a.double() - b).abs().max() / b.abs().max()).item()
                assert err < 1e-5, (n, t, d, name, err)
            # the (N, D) sums written in the modulation's dtype (bf16 under autocast) by the finishing kernel
            got16 = K._add_ln_mod_bwd_triton(x, o, gate, scale, dy, dxn, 1e-6, bias, (torch.bfloat16,) * 3)
            for a, b in zip(got16[2:5], got[2:5]):  # within one bf16 step: the interpreter's cast truncates
                assert a.dtype == torch.bfloat16, a.dtype
                torch.testing.assert_close(a.float(), b, rtol=2**-7, atol=0)
            # the forward kernel, with the same bias
            got = K._ln_mod_cuda(x, o, gate, shift, scale, 1e-6, None, torch.float32, bias)
            want = K.add_layernorm_modulate(*(v.double() for v in (x, o, gate, shift, scale)), 1e-6, None,
                                            torch.float64, bias.double() if with_bias else None)
            for name, a, b in zip(("x'", "y"), got, want):
                err = ((a.double() - b).abs().max() / b.abs().max()).item()
                assert err < 1e-5, (n, t, d, name, err)
        # through the op with fp32 inputs (training without autocast): torch checks that no output aliases another
        K._use_triton = lambda x: True
        outs = K.add_layernorm_modulate_backward(x, o, gate, shift, scale, dy, None, 1e-6, bias)
        assert len({v.untyped_storage().data_ptr() for v in outs}) == 6
        print("ok")
    """)
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


def test_qkv_grad_reference_is_autograds_gradient_of_the_qkv_output():
    """qkv_grad(dq, dk, dv) is the gradient autograd gives the qkv GEMM's output when q, k, v are its (N, H, T, Dh)
    views, and its bias gradient; a DiT with the fused qkv backward trains with the plain model's gradients."""
    gen = torch.Generator().manual_seed(0)
    n, t, h, dh = 2, 5, 3, 4
    qkv = torch.randn(n * t, 3 * h * dh, generator=gen, dtype=torch.float64, requires_grad=True)
    q, k, v = qkv.view(n, t, 3, h, dh).permute(2, 0, 3, 1, 4).unbind(0)
    grads = [torch.randn(q.shape, generator=gen, dtype=torch.float64) for _ in range(3)]
    (want,) = torch.autograd.grad((q, k, v), qkv, grads)
    got, db = qkv_grad(*grads)
    assert torch.equal(got, want)
    torch.testing.assert_close(db, want.sum(0), rtol=1e-12, atol=1e-12)
    torch.manual_seed(0)
    model = create_model("DiT-S/4", input_size=8, hidden_size=64, depth=2, num_heads=4, num_classes=10).eval()
    for p in model.parameters():
        if p.dim() > 1 and not p.any():
            torch.nn.init.normal_(p, std=0.05)
    fused = copy.deepcopy(model)
    fused.set_fused_qkv_backward(True)
    x, tt, y = torch.randn(4, 4, 8, 8), torch.randint(0, 1000, (4,)), torch.randint(0, 10, (4,))
    out, out_ref = fused(x, tt, y=y), model(x, tt, y=y)
    assert out.grad_fn is not None and torch.equal(out, out_ref)
    out.square().mean().backward()
    out_ref.square().mean().backward()
    for (name, p), q in zip(fused.named_parameters(), model.parameters()):
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-8, msg=name)


def test_qkv_grad_kernel_in_the_triton_interpreter():
    """The qkv-gradient Triton kernel run by Triton's CPU interpreter (in a subprocess): an exact copy into the qkv
    layout and fp32 column sums, with a partial last program, several row steps and column tiles, bf16 inputs laid
    out as the attention backward returns them and a transposed (non-dense) one."""
    pytest.importorskip("triton")
    code = textwrap.dedent("""
        import torch
        from dit.models import kernels as K
        g = torch.Generator().manual_seed(0)
        for n, t, h, dh in [(3, 37, 2, 64), (2, 16, 4, 48)]:
            grads = [torch.randn(n, t, h, dh, generator=g).to(torch.bfloat16).transpose(1, 2) for _ in range(3)]
            grads[2] = grads[2].contiguous()  # (N, H, T, Dh) dense: not the attention's layout, copied first
            got, db = K._qkv_grad_triton(*grads, rows_per_program=32, block_m=8)
            want = torch.stack(grads).permute(1, 3, 0, 2, 4).reshape(n * t, 3 * h * dh)
            assert torch.equal(got, want), (n, t, h, dh)
            err = (db.double() - want.double().sum(0)).abs().max() / want.double().sum(0).abs().max()
            assert err < 1e-2, err  # fp32 sums, rounded to bf16
        print("ok")
    """)
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


def test_rowwise_fp8_kernel_rows_and_scales_in_the_triton_interpreter():
    """The Triton kernel of rowwise_fp8 run by Triton's CPU interpreter (in a subprocess): each row's inverse scale
    is to_float8's (its amax found over exactly that row: several rows per program with a partial last one, one row
    of a power-of-2 width, an odd width with masked lanes), zero rows stay zero, signs are kept. (The interpreter's
    own fp32 -> E4M3 conversion misrounds near binade edges, 124.3 -> 64, so the codes are compared bit for bit on
    the GPU: tests/test_fp8.py.)"""
    pytest.importorskip("triton")
    code = textwrap.dedent("""
        import torch
        from dit.models import kernels as K
        from dit.models.fp8 import E4M3, to_float8
        g = torch.Generator().manual_seed(0)
        for m, n, dtype in [(37, 72, torch.float32), (5, 4096, torch.bfloat16), (9, 1000, torch.bfloat16)]:
            x = (torch.randn(m, n, generator=g) * torch.logspace(-4, 4, m)[:, None]).to(dtype)
            x[2] = 0
            y, inv = K._rowwise_fp8_triton(x)
            y_ref, inv_ref = to_float8(x, E4M3, dim=-1)
            assert y.dtype == E4M3 and inv.shape == (m, 1) and inv.dtype == torch.float32
            assert torch.equal(inv, inv_ref), (m, n)
            assert torch.equal(torch.sign(y.float()), torch.sign(y_ref.float())), (m, n)
            assert y[2].float().abs().max() == 0
        print("ok")
    """)
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


def _batch(n: int, gen: torch.Generator):
    """(x, t, y) for a TINY class model: 8x8x4 latents, random timesteps, labels cycling over 4 classes + null."""
    return torch.randn(n, 4, 8, 8, generator=gen), torch.randint(0, 1000, (n,), generator=gen), torch.arange(n) % 5


def _calibrated(model, x, t, y):
    m8 = copy.deepcopy(model)
    convert_to_float8(m8)
    with torch.no_grad():
        calibrate_float8(m8, lambda: m8(x, t, y=y))
    return m8


def test_fp8_model_takes_the_fused_path_with_the_plain_paths_accuracy(monkeypatch):
    ref = _randomised(seed=5)
    x, t, y = _batch(8, torch.Generator().manual_seed(5))
    m8 = _calibrated(ref, x, t, y)
    calls = []
    real = type(m8.blocks[0]).forward_fused
    monkeypatch.setattr(type(m8.blocks[0]), "forward_fused", lambda self, *a: calls.append(1) or real(self, *a))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fused = m8(x, t, y=y).float()
        assert len(calls) == TINY["depth"]  # every block, once
        m8.fused_inference = False
        plain = m8(x, t, y=y).float()
        assert len(calls) == TINY["depth"]  # the ablation switch really switches
    with torch.no_grad():
        exact = ref(x, t, y=y)
    err = lambda a: ((a - exact).norm() / exact.norm()).item()  # noqa: E731
    # same quantisation; only where bf16 rounding happens differs (no bf16 GELU output before the FP8 cast)
    assert 0 < err(fused) < 0.05 and err(fused) < 1.25 * err(plain), (err(fused), err(plain))

    bf16 = copy.deepcopy(ref)  # no static FP8 scales: the plain block forward, fused path never taken
    with torch.no_grad():
        bf16(x, t, y=y)
    assert len(calls) == TINY["depth"]


def test_inference_gemms_use_fast_accumulation_and_training_gemms_do_not(monkeypatch):
    ref = _randomised(seed=6)
    x, t, y = _batch(16, torch.Generator().manual_seed(6))
    m8 = _calibrated(ref, x, t, y)
    seen = []
    real = torch._scaled_mm
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **k: seen.append(k.get("use_fast_accum")) or real(*a, **k))
    with torch.no_grad():
        m8(x, t, y=y)
    assert seen and all(seen)
    seen.clear()
    m8.train()
    m8(x, t, y=y).sum().backward()
    assert seen and not any(seen)


def test_fused_path_falls_back_per_layer_when_rows_do_not_fit_fp8_gemms():
    # DiT-S/4 at 8x8: 4 tokens per image, 3 images = 12 rows, not a multiple of 16: the GEMMs run in the compute dtype
    ref = _randomised(seed=7, name="DiT-S/4")
    gen = torch.Generator().manual_seed(7)
    x, t, y = torch.randn(3, 4, 8, 8, generator=gen), torch.tensor([5, 500, 900]), torch.tensor([0, 1, 4])
    m8 = _calibrated(ref, *_batch(16, gen))
    with torch.no_grad():
        fused = m8(x, t, y=y)
        m8.fused_inference = False
        plain = m8(x, t, y=y)
        exact = ref(x, t, y=y)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)  # both unquantised at 12 rows
    torch.testing.assert_close(fused, exact, rtol=1e-5, atol=1e-5)
