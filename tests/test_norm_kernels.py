"""The UNet's GroupNorm (+ AdaGN + SiLU) op (dit.models.norm_kernels): its reference against torch's GroupNorm and
autograd in float64, its Triton kernels in Triton's CPU interpreter against that reference, and on a GPU."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

from dit.models.norm_kernels import group_norm_act, group_norm_act_backward


def _reference(x, w, b, scale, shift, groups, eps, silu):
    y = F.group_norm(x, groups, w, b, eps)
    if scale is not None:
        y = y * (1 + scale[..., None, None])
    if shift is not None:
        y = y + shift[..., None, None]
    return F.silu(y) if silu else y


def _args(gen, n=3, c=12, h=5, w=7, affine=True, ada=True, channels_last=True, mean=0.5, dtype=torch.float64):
    x = torch.randn(n, c, h, w, generator=gen, dtype=dtype) * 2 + mean
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(c, generator=gen, dtype=dtype) if affine else None
    bias = torch.randn(c, generator=gen, dtype=dtype) if affine else None
    scale = torch.randn(n, c, generator=gen, dtype=dtype) * 0.5 if ada else None
    shift = torch.randn(n, c, generator=gen, dtype=dtype) if ada else None
    return x, weight, bias, scale, shift


@pytest.mark.parametrize("channels_last,affine,ada,silu", list(itertools.product([True, False], repeat=4)))
def test_op_equals_group_norm_adagn_silu_in_value_and_gradient_float64(channels_last, affine, ada, silu):
    """12 channels in 4 groups (3 per group: not a power of two); every input's gradient against autograd."""
    gen = torch.Generator().manual_seed(0)
    args = _args(gen, affine=affine, ada=ada, channels_last=channels_last)
    inputs = [v.requires_grad_() for v in args if v is not None]
    y, st = group_norm_act(*args, 4, 1e-5, silu)
    want = _reference(*args, 4, 1e-5, silu)
    assert y.stride() == args[0].stride() and st.shape == (3, 5, 12)
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
    gy = torch.randn(want.shape, generator=gen, dtype=torch.float64)
    for got, ref in zip(torch.autograd.grad(y, inputs, gy), torch.autograd.grad(want, inputs, gy)):
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)


def test_large_mean_keeps_the_variance():
    """Statistics about each channel's first value: a mean 1e4 times the spread does not cancel the variance."""
    gen = torch.Generator().manual_seed(1)
    x, w, b, scale, shift = _args(gen, dtype=torch.float32)
    x = (x - 0.5) * 0.5 + 1e4
    y = group_norm_act(x, w, b, scale, shift, 4, 1e-5, True)[0]
    want = _reference(x.double(), w.double(), b.double(), scale.double(), shift.double(), 4, 1e-5, True)
    assert ((y.double() - want).norm() / want.norm()).item() < 1e-3


def test_ops_pass_torch_library_opcheck():
    gen = torch.Generator().manual_seed(2)
    for channels_last, ada in ((True, True), (False, False)):
        x, w, b, scale, shift = _args(gen, channels_last=channels_last, ada=ada, dtype=torch.float32)
        opcheck(group_norm_act, (x, w, b, scale, shift, 4, 1e-5, True))
        y, st = group_norm_act(x, w, b, scale, shift, 4, 1e-5, True)
        opcheck(group_norm_act_backward, (torch.randn(x.shape, generator=gen).to(memory_format=torch.channels_last),
                                          x, st, w, b, scale, 4, True))


def test_bad_shapes_raise_one_clear_error():
    gen = torch.Generator().manual_seed(3)
    x, w, b, scale, shift = _args(gen)
    with pytest.raises(ValueError, match="C divisible by groups=5"):
        group_norm_act(x, w, b, scale, shift, 5, 1e-5, True)
    with pytest.raises(ValueError, match=r"scale must be \(N, C\) = \(3, 12\)"):
        group_norm_act(x, w, b, scale[:, :6], shift, 4, 1e-5, True)


def test_kernels_match_the_reference_in_the_triton_interpreter():
    """The six Triton kernels (forward statistics, per-sample coefficients, normalisation; backward sums,
    coefficients, input gradient) run by Triton's CPU interpreter (in a subprocess) against the op's reference in
    float64: 3, 6 and 9 channels per group, with and without affine / AdaGN / SiLU, row blocks that do not divide the
    image, a large mean."""
    pytest.importorskip("triton")
    code = textwrap.dedent("""
        import torch
        from dit.models.norm_kernels import _backward_ref, _backward_triton, _forward_ref, _forward_triton

        def rel(a, b):
            return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()

        g = torch.Generator().manual_seed(0)
        for (n, c, h, w, groups, mean) in [(2, 12, 5, 7, 4, 0.5), (3, 96, 8, 8, 32, 3.0), (2, 288, 4, 4, 32, 1e3)]:
            for affine, ada, silu in [(True, True, True), (True, False, True), (False, False, False),
                                      (True, True, False)]:
                x = (torch.randn(n, c, h, w, generator=g) * 2 + mean).contiguous(memory_format=torch.channels_last)
                wt = torch.randn(c, generator=g) if affine else None
                b = torch.randn(c, generator=g) if affine else None
                sc = torch.randn(n, c, generator=g) * 0.5 if ada else None
                sh = torch.randn(n, c, generator=g) if ada else None
                dy = torch.randn(n, c, h, w, generator=g).contiguous(memory_format=torch.channels_last)
                d64 = [None if v is None else v.double() for v in (wt, b, sc, sh)]
                y, st = _forward_triton(x, wt, b, sc, sh, groups, 1e-5, silu, rows_per_program=16)
                y_ref, st_ref = _forward_ref(x.double(), *d64, groups, 1e-5, silu)
                got = _backward_triton(dy, x, st, wt, b, sc, groups, silu, rows_per_program=16)
                want = _backward_ref(dy.double(), x.double(), st_ref, *d64[:3], groups, silu)
                errs = [rel(y, y_ref)] + [rel(a, r) for a, r in zip(got, want)]
                assert y.is_contiguous(memory_format=torch.channels_last)
                assert max(errs) < 1e-4, (n, c, affine, ada, silu, errs)
        print("ok")
    """)
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (Triton kernels)")
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
def test_kernels_on_the_gpu_match_float64(dtype, tol):
    """bf16 / fp16 channels-last activations at UNet-S's widths (128 at 32x32, 384 and the 640-wide skip concat at
    8x8; 96 and 288, its widths before run 23): the kernels' outputs and gradients against float64 (fp16's 3 more
    mantissa bits: a tighter bound)."""
    gen = torch.Generator().manual_seed(4)
    for n, c, hw in [(16, 96, 32), (16, 288, 16), (16, 128, 32), (16, 384, 8), (16, 640, 8)]:
        x, w, b, scale, shift = (v.cuda() for v in _args(gen, n=n, c=c, h=hw, w=hw, dtype=torch.float32))
        x, scale, shift = x.to(dtype), scale.to(dtype), shift.to(dtype)
        inputs = [v.requires_grad_() for v in (x, w, b, scale, shift)]
        y = group_norm_act(x, w, b, scale, shift, 32, 1e-5, True)[0]
        want = _reference(*(v.double() for v in inputs), 32, 1e-5, True)
        gy = torch.randn(want.shape, device="cuda").to(dtype)
        assert ((y.double() - want).norm() / want.norm()).item() < tol
        for got, ref in zip(torch.autograd.grad(y, inputs, gy), torch.autograd.grad(want, inputs, gy.double())):
            assert ((got.double() - ref).norm() / ref.norm()).item() < tol
