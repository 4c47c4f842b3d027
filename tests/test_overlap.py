"""fc2's weight gradient on a second CUDA stream (cublaslt.gemm_dgelu_with_weight_grad): the op's formulas and
schema on CPU, the model's plumbing through it in float64, and on a GPU the sequential backward's values, also from
a CUDA graph and under torch.compile."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

import dit.models.cublaslt as cl
from dit.models import create_model
from dit.models.cublaslt import gemm_dgelu, gemm_dgelu_with_weight_grad, worth_overlapping

_NEED_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _operands(m, c, f, dtype, device="cpu"):
    """dy (M, C), w2 (C, F), pre (M, F), g = GELU(pre)."""
    gen = torch.Generator(device=device).manual_seed(0)
    dy = torch.randn(m, c, generator=gen, device=device).to(dtype)
    w2 = (torch.randn(c, f, generator=gen, device=device) * f**-0.5).to(dtype)
    pre = torch.randn(m, f, generator=gen, device=device).to(dtype)
    return dy, w2, pre, F.gelu(pre.float(), approximate="tanh").to(dtype)


def test_op_computes_the_sequential_formulas_and_passes_opcheck():
    """(dh, dW2) = ((dy W2) * GELU'(pre), dy^T g in the weight's dtype): float64 on CPU to rounding; opcheck (schema,
    fake tensors) in bf16 with an fp32 weight gradient."""
    dy, w2, pre, g = _operands(12, 8, 32, torch.float64)
    dh, dw2 = gemm_dgelu_with_weight_grad(dy, w2, pre, g, torch.float64)
    p = pre.clone().requires_grad_()
    (want,) = torch.autograd.grad(F.gelu(p, approximate="tanh"), p, dy @ w2)
    torch.testing.assert_close(dh, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dw2, dy.t() @ g, rtol=1e-12, atol=1e-12)
    opcheck(gemm_dgelu_with_weight_grad, (*(t.to(torch.bfloat16) for t in (dy, w2, pre, g)), torch.float32))


def test_overlap_is_chosen_for_large_cuda_gemms_with_the_flag_on():
    """The pair forks only on CUDA, with the flag on, for a weight gradient of at least OVERLAP_MIN_MACS
    multiply-adds: DiT-S/2's fc2 at batch 256 (65,536 x 384 x 1,536) does, at batch 8 (2,048 rows) it does not."""
    class Cuda:  # the two attributes worth_overlapping reads, without a GPU
        is_cuda = True

        def __init__(self, *shape):
            self.shape = shape

    big = (Cuda(65536, 384), Cuda(65536, 1536))
    assert worth_overlapping(*big, True)
    assert not worth_overlapping(*big, False)
    assert not worth_overlapping(Cuda(2048, 384), Cuda(2048, 1536), True)
    assert not worth_overlapping(torch.empty(65536, 384), torch.empty(65536, 1536), True)  # CPU


def test_dit_through_the_op_has_the_plain_models_gradients(monkeypatch):
    """With set_overlap_weight_grads on the MLP-epilogue path, every MLP backward goes through the op (forced here
    on CPU, where it runs in sequence): loss and every parameter gradient equal the plain model's in float64, and
    the op ran once per block."""
    calls = []
    real = gemm_dgelu_with_weight_grad
    monkeypatch.setattr(cl, "worth_overlapping", lambda dy, g, enable: enable)
    monkeypatch.setattr(cl, "gemm_dgelu_with_weight_grad", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    ref = create_model("DiT-S/4", input_size=8, hidden_size=64, depth=2, num_heads=4, num_classes=10).double().eval()
    for p in ref.parameters():  # no zero-initialised layers: every gradient non-trivial
        p.data.normal_(0, 0.2)
    model = copy.deepcopy(ref)
    model.fused_training = True
    model.set_mlp_epilogues(True)
    model.set_overlap_weight_grads(True)
    x = torch.randn(3, 4, 8, 8, dtype=torch.float64)
    t = torch.randint(0, 1000, (3,))
    y = torch.randint(0, 10, (3,))
    losses = []
    for m in (ref, model):
        loss = m(x, t, y=y).square().mean()
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-12)
    for (name, p), q in zip(ref.named_parameters(), model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-9, atol=1e-12, msg=name)
    assert len(calls) == 2


@_NEED_GPU
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_op_on_the_gpu_gives_the_sequential_bits(dtype):
    """On two streams the GEMMs give the sequential backward's bits, run directly and replayed from a CUDA graph
    (the fork and join inside the capture)."""
    dy, w2, pre, g = _operands(4096, 384, 1536, dtype, device="cuda")
    want = (gemm_dgelu(dy, w2, pre), torch.mm(dy.t(), g, out_dtype=torch.float32))

    def check(got):
        for name, a, b in zip(("dh", "dw2"), got, want):
            assert torch.equal(a, b), name

    check(gemm_dgelu_with_weight_grad(dy, w2, pre, g, torch.float32))
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up off the default stream, as torch.cuda.graph asks
        gemm_dgelu_with_weight_grad(dy, w2, pre, g, torch.float32)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = gemm_dgelu_with_weight_grad(dy, w2, pre, g, torch.float32)
    graph.replay()
    torch.cuda.synchronize()
    check(out)


@_NEED_GPU
def test_dit_training_gradients_with_overlap_on_the_gpu(monkeypatch):
    """A bf16 DiT whose MLPs run fc2's weight gradient on the second stream (the threshold lowered so the small
    model forks), eager and compiled, has the same gradients as without the overlap, and as close to fp32 as the
    plain model's."""
    from helpers import assert_training_gradients_match_fp32

    monkeypatch.setattr(cl, "OVERLAP_MIN_MACS", 0)

    def configure(model, enable=True):
        model.set_mlp_epilogues(True)
        model.set_fused_attention(True)
        model.set_overlap_weight_grads(enable)
        model.fused_training = True

    assert_training_gradients_match_fp32(configure, torch.bfloat16)
    torch.manual_seed(0)
    base = create_model("DiT-S/2", input_size=32, hidden_size=256, depth=2, num_heads=4, num_classes=10).cuda()
    for p in base.parameters():
        p.data.normal_(0, 0.05)
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(32, 4, 32, 32, device="cuda", generator=gen)
    t = torch.randint(0, 1000, (32,), device="cuda", generator=gen)
    y = torch.randint(0, 10, (32,), device="cuda", generator=gen)
    grads = []
    for enable in (False, True):
        m = copy.deepcopy(base).eval()  # eval: no label dropout, so both runs see the same labels
        configure(m, enable)
        for compiled in (False, True):
            fn = torch.compile(m, dynamic=False) if compiled else m
            m.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                fn(x, t, y=y).float().square().mean().backward()
            grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    for off, on in ((grads[0], grads[2]), (grads[1], grads[3])):
        assert on.keys() == off.keys()
        for name in off:
            assert torch.equal(on[name], off[name]), name
