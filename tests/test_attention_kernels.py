"""The packed self-attention for training (dit.models.attention_kernels): the reference formulas against autograd
through ``F.scaled_dot_product_attention`` in float64, the Triton backward in Triton's CPU interpreter against them,
a DiT trained through it against the plain one, and (on a GPU) bf16 against float64 next to cuDNN's backward."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dit.models import attention_kernels as A
from dit.models import create_model, layers
from helpers import assert_training_gradients_match_fp32

_NEED_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _sdpa(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    n, t, c3 = qkv.shape
    q, k, v = A._split(qkv, heads)
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, t, c3 // 3)


@pytest.mark.parametrize("n,t,heads,dh", [(2, 37, 3, 8), (1, 70, 2, 64), (3, 5, 4, 16)])
def test_packed_attention_is_sdpa_with_its_gradient(n, t, heads, dh):
    """Forward and the packed gradient equal autograd through SDPA on the q/k/v views (float64); the log-sum-exp is
    each softmax row's; the per-block column sums add up to the qkv bias gradient (T not a multiple of ROWS too)."""
    g = torch.Generator().manual_seed(0)
    qkv = (torch.randn(n, t, 3 * heads * dh, generator=g, dtype=torch.float64) * 2).requires_grad_()
    do = torch.randn(n, t, heads * dh, generator=g, dtype=torch.float64)
    o, lse = A.packed_attention_fwd(qkv, heads)
    want = _sdpa(qkv, heads)
    torch.testing.assert_close(o, want, rtol=1e-12, atol=1e-12)
    q, k, _ = A._split(qkv, heads)
    torch.testing.assert_close(lse, torch.logsumexp(q @ k.transpose(-1, -2) / dh**0.5, dim=-1), rtol=1e-12, atol=1e-12)
    (got,) = torch.autograd.grad(o, qkv, do)
    (ref,) = torch.autograd.grad(want, qkv, do)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    dqkv, part = A.packed_attention_bwd(qkv.detach(), o.detach(), lse, do, heads)
    torch.testing.assert_close(dqkv, ref, rtol=1e-10, atol=1e-12)
    assert part.shape == (n, -(-t // A.ROWS), 3 * heads * dh)
    torch.testing.assert_close(part.sum((0, 1)), ref.sum((0, 1)), rtol=1e-10, atol=1e-12)


def test_packed_attention_ops_pass_opcheck_and_reject_bad_shapes():
    qkv = torch.randn(2, 5, 3 * 2 * 4, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(A.packed_attention_fwd, (qkv, 2))
    o, lse = A.packed_attention_fwd(qkv.detach(), 2)
    torch.library.opcheck(A.packed_attention_bwd, (qkv.detach(), o, lse, torch.randn_like(o), 2))
    with pytest.raises(ValueError, match=r"packed_attention: qkv must be \(N, T, 3C\) with C divisible by heads=5"):
        A.packed_attention(qkv, 5)


def _fused_twin(model: torch.nn.Module) -> torch.nn.Module:
    """Randomise ``model``'s zero-initialised layers (so that every gradient is non-trivial) and return a copy with
    ``set_fused_attention``."""
    for p in model.parameters():
        if p.dim() > 1 and not p.any():
            torch.nn.init.normal_(p, std=0.05)
    fused = copy.deepcopy(model)
    fused.set_fused_attention(True)
    return fused


def _assert_trains_alike(fused, model, *inputs, **cond) -> None:
    """Same output and every parameter gradient (float64)."""
    out, ref = fused(*inputs, **cond), model(*inputs, **cond)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    out.square().mean().backward()
    ref.square().mean().backward()
    for (name, p), q in zip(fused.named_parameters(), model.parameters()):
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-8, atol=1e-12, msg=name)


def test_qkv_attention_trains_a_dit_like_the_plain_attention(monkeypatch):
    """A DiT with ``set_fused_attention`` (head dim 16, taken) gives the plain model's output and every parameter
    gradient (float64, the reference path); a head dim the kernels do not take (48) falls back to the plain path."""
    torch.manual_seed(0)
    model = create_model("DiT-S/4", input_size=8, hidden_size=64, depth=2, num_heads=4, num_classes=10).double().eval()
    fused = _fused_twin(model)
    calls = []
    monkeypatch.setattr(layers, "qkv_attention", lambda *a: (calls.append(1), A.qkv_attention(*a))[1])
    x, t, y = torch.randn(4, 4, 8, 8).double(), torch.randint(0, 1000, (4,)), torch.randint(0, 10, (4,))
    _assert_trains_alike(fused, model, x, t, y=y)
    assert len(calls) == 2  # one per block
    odd = create_model("DiT-S/4", input_size=8, hidden_size=48, depth=1, num_heads=1, num_classes=10).double()
    odd.set_fused_attention(True)  # head dim 48: not taken
    odd(x, t, y=y)
    assert len(calls) == 2


def test_qkv_attention_trains_a_unet_like_the_plain_attention():
    """The same for a UNet's attention blocks (ADM's 64-wide heads), through UNet.set_fused_attention."""
    torch.manual_seed(0)
    model = create_model("UNet-S", input_size=8, model_channels=64, num_res_blocks=1, num_classes=10,
                         attention_resolutions=(2,)).double().eval()
    fused = _fused_twin(model)
    assert any(m.fused_attention for m in fused.modules() if isinstance(m, layers.Attention))
    x, t, y = torch.randn(2, 4, 8, 8).double(), torch.randint(0, 1000, (2,)), torch.randint(0, 10, (2,))
    _assert_trains_alike(fused, model, x, t, y=y)


def test_head_dim_blocks_cover_the_head_with_power_of_two_tiles():
    """The kernels' head-dim blocks: a power-of-two main block and a power-of-two tail (>= 16 lanes, tl.dot's least K)
    that together cover the head without a second tail; DiT-XL's 72 is 64 + 16, not 128 lanes."""
    pow2 = lambda v: v & (v - 1) == 0  # noqa: E731
    for dh in range(8, 257, 8):
        main, tail = A._widths(dh)
        assert pow2(main) and main >= 16 and main <= max(16, dh), (dh, main)
        assert (tail == 0) == (main >= dh), (dh, tail)
        # the smallest such tail: no more lanes than the rest of the head needs
        rest = dh - main
        assert tail == 0 or (pow2(tail) and 16 <= tail <= main and rest <= tail and (tail == 16 or rest > tail // 2))
        padded, none = A._widths(dh, split=False)
        assert none == 0 and pow2(padded) and padded >= dh and (padded == 16 or dh > padded // 2), (dh, padded)
    assert A._widths(72) == (64, 16) and A._widths(72, split=False) == (128, 0) and A._widths(64) == (64, 0)


def test_backward_kernels_match_the_formulas_in_the_triton_interpreter():
    """Both Triton kernels run by Triton's CPU interpreter (in a subprocess) against the float64 formulas: several key
    and query blocks, a token count that is not a multiple of either block (masked rows, a partial last program), head
    dims 16, 32, 64, and 72 and 48 (a power-of-two block and a masked 16-wide tail; 72 also as one block padded to
    128 lanes), fp32 and fp16 inputs (the interpreter's bf16 matmul is not bf16's), the column-sum partials.
    """
    pytest.importorskip("triton")
    code = textwrap.dedent("""
        import torch
        from dit.models import attention_kernels as A
        g = torch.Generator().manual_seed(0)
        tiles = dict(dq=dict(BLOCK_N=32, num_warps=4, STAGES=2), dkdv=dict(BLOCK_M=16, num_warps=4, STAGES=2))
        # split=False: one block padded to a power of two; 72 and 48 otherwise take a masked 16-wide tail block
        for n, t, h, dh, dt, tol, split in [
                (2, 37, 3, 16, torch.float32, 1e-5, True), (1, 100, 2, 32, torch.float32, 1e-5, True),
                (2, 64, 2, 64, torch.float16, 2e-3, True), (1, 40, 2, 72, torch.float32, 1e-5, False),
                (2, 70, 2, 72, torch.float16, 2e-3, True), (1, 40, 2, 48, torch.float32, 1e-5, True)]:
            qkv = (torch.randn(n, t, 3 * h * dh, generator=g) * 1.5).to(dt)
            o, lse = A._forward_ref(qkv, h)
            do = torch.randn(n, t, h * dh, generator=g).to(dt)
            tiles["split"] = split
            got, part = A._backward_triton(qkv, o, lse.float(), do, h, tiles)
            want, wpart = A._backward_ref(qkv.double(), o.double(), lse.double(), do.double(), h)
            for i in range(3):
                a, b = got.view(n, t, 3, -1)[:, :, i].double(), want.view(n, t, 3, -1)[:, :, i]
                err = ((a - b).abs().max() / b.abs().max()).item()
                assert err < tol, (n, t, h, dh, dt, "qkv"[i], err)
            assert part.shape == wpart.shape
            err = ((part.double() - wpart).abs().max() / wpart.abs().max()).item()
            assert err < tol, (n, t, h, dh, dt, "partials", err)
        print("ok")
    """)
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b).norm() / b.norm()).item()


@_NEED_GPU
@pytest.mark.parametrize(
    "n,t,heads,dh", [(8, 256, 6, 64), (3, 100, 4, 64), (2, 64, 8, 32), (4, 256, 16, 72), (16, 16, 6, 64)]
)
def test_gpu_backward_in_bf16_is_as_accurate_as_cudnns(n, t, heads, dh):
    """On a GPU in bf16 (cuDNN's forward, the Triton backward): the gradient's error against float64 is cuDNN
    backward's, within 10%; the log-sum-exp is the float64 one (cuDNN returns natural-log statistics)."""
    from dit.benchmark import attention_errors

    e = attention_errors(n, t, heads, dh)
    assert e["lse"] < 1e-6
    assert e["bias"] < 5e-3
    for name in ("dq", "dk", "dv"):
        assert e[name] < 1.1 * e[name + "_cudnn"] + 1e-4, (name, e[name], e[name + "_cudnn"])


@_NEED_GPU
def test_gpu_forward_falls_back_to_memory_efficient_attention(monkeypatch):
    """Where cuDNN's attention is not used (before Hopper, or when it refuses the shapes), the forward is the
    memory-efficient kernel's, whose log-sum-exp (padded along T) must give the same backward: checked on this GPU by
    making it look like an A100, and by making cuDNN refuse."""
    g = torch.Generator(device="cuda").manual_seed(0)
    n, t, heads, dh = 3, 100, 4, 64
    qkv = (torch.randn(n, t, 3 * heads * dh, device="cuda", generator=g) * 1.5).bfloat16()
    do = torch.randn(n, t, heads * dh, device="cuda", generator=g).bfloat16()
    q64 = qkv.double().requires_grad_()
    o64, lse64 = A._forward_ref(q64, heads)
    (want,) = torch.autograd.grad(o64, q64, do.double())

    def refuse(*a, **k):
        raise RuntimeError("no cuDNN")

    for patch in ((torch.cuda, "get_device_capability", lambda *a: (8, 0)),
                  (torch.ops.aten, "_scaled_dot_product_cudnn_attention", refuse)):
        with monkeypatch.context() as m:
            m.setattr(A, "_CUDNN_FAILED", set())
            m.setattr(*patch)
            x = qkv.clone().requires_grad_()
            o, lse = A.packed_attention_fwd(x, heads)
            (got,) = torch.autograd.grad(o, x, do)
        assert lse.shape == (n, heads, t) and _rel(lse, lse64) < 1e-6
        assert _rel(o, o64) < 4e-3 and _rel(got, want) < 4e-3


@_NEED_GPU
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_dit_gradients_through_fused_attention_match_fp32(dtype):
    """Every parameter gradient of a DiT (head dim 64) trained in bf16 or fp16 through qkv_attention, eager and
    compiled, with the other fused training kernels, is as close to the fp32 gradient as the plain model's in that
    dtype."""
    def configure(model):
        model.set_fused_attention(True)
        model.fused_training = True

    assert_training_gradients_match_fp32(configure, dtype)


@_NEED_GPU
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_unet_gradients_through_its_training_kernels_match_fp32(dtype):
    """The UNet's training path on the GPU (channels-last, GroupNorm + AdaGN + SiLU in the Triton kernels, the
    attention's Triton backward) in bf16 or fp16: every parameter gradient as close to the fp32 gradient as the plain
    model's in that dtype, eager and compiled."""
    def configure(model):
        model.set_channels_last(True)
        model.set_moment_norm(True, kernels=True)
        model.set_fused_attention(True)

    assert_training_gradients_match_fp32(configure, dtype, "UNet-S", model_channels=64, channel_mult=(1, 2),
                                         num_res_blocks=1, attention_resolutions=(2,), num_classes=10)
