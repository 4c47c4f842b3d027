"""The weight gradients on a second CUDA stream (dit.models.overlap, cublaslt.mlp_grads): the ops' formulas and
schemas on CPU, the model's plumbing through them in float64, and on a GPU the same values as the sequential
backward, also from a CUDA graph and under torch.compile."""

import copy

import pytest
import torch
from torch.library import opcheck

import dit.models.overlap as overlap
from dit.models import create_model
from dit.models.cublaslt import gemm_dgelu, mlp_grads
from dit.models.overlap import linear_grads, worth_overlapping

_NEED_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _mlp_operands(m, c, f, dtype, device="cpu", seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)

    def r(*shape, s=1.0):
        return (torch.randn(*shape, generator=gen, device=device) * s).to(dtype)

    x, dy, h = r(m, c), r(m, c), r(m, f)
    g = torch.nn.functional.gelu(h.float(), approximate="tanh").to(dtype)
    return dy, x, r(f, c, s=c**-0.5), r(c, f, s=f**-0.5), g, h


def _sequential_mlp_grads(dy, x, w1, w2, g, h):
    """The GPU backward ``_FusedMlp`` runs without the overlap, fp32 weights: (dx, dw1, db1, dw2)."""
    dh = gemm_dgelu(dy, w2, h)
    return (dh @ w1, torch.mm(dh.t(), x, out_dtype=torch.float32), dh.sum(0, dtype=torch.float32),
            torch.mm(dy.t(), g, out_dtype=torch.float32))


def test_grad_ops_compute_the_sequential_formulas_and_pass_opcheck():
    """linear_grads = (dy W, dy^T x in the weight's dtype); mlp_grads = the MLP backward's (dx, dW1, db1, dW2) with
    dh = (dy W2) * GELU'(h); float64 on CPU to rounding, and both ops pass opcheck (schema, fake tensors)."""
    dy, x, w1, w2, g, h = _mlp_operands(12, 8, 32, torch.float64)
    dx, dw = linear_grads(dy, h, w2, torch.float64, "cublas")  # a (F -> C) layer: x (M, F), w (C, F)
    torch.testing.assert_close(dx, dy @ w2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dw, dy.t() @ h, rtol=1e-12, atol=1e-12)
    got = mlp_grads(dy, x, w1, w2, g, h, torch.float64, torch.float64, torch.float64)
    hh = h.clone().requires_grad_()
    (dh,) = torch.autograd.grad(torch.nn.functional.gelu(hh, approximate="tanh"), hh, dy @ w2)
    want = (dh @ w1, dh.t() @ x, dh.sum(0), dy.t() @ g)
    for name, a, b in zip(("dx", "dw1", "db1", "dw2"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)
    bf = [t.to(torch.bfloat16) for t in (dy, x, w1, w2, g, h)]
    opcheck(linear_grads, (bf[0], bf[5], bf[3], torch.float32, "cublas"))
    opcheck(mlp_grads, (*bf, torch.float32, torch.float32, torch.float32))


def test_overlap_is_chosen_for_large_cuda_gemms_with_the_flag_on():
    """A pair forks only on CUDA, with the flag on, for weight gradients of at least MIN_MACS multiply-adds:
    DiT-S/2's attention projection (65,536 x 384 x 384) does, DiT-XL/2's adaLN modulation (64 x 1,152 x 6,912)
    does not."""
    class Cuda:  # the two attributes worth_overlapping reads, without a GPU
        is_cuda = True

        def __init__(self, *shape):
            self.shape = shape

    proj = (Cuda(65536, 384), Cuda(65536, 384))
    assert worth_overlapping(*proj, True)
    assert not worth_overlapping(*proj, False)
    assert not worth_overlapping(Cuda(64, 6912), Cuda(64, 1152), True)
    assert not worth_overlapping(torch.empty(65536, 384), torch.empty(65536, 384), True)  # CPU


def test_dit_through_the_overlapped_ops_has_the_plain_models_gradients(monkeypatch):
    """With set_overlap_weight_grads (and the fused attention and MLP paths it rides on), every block GEMM's
    backward goes through linear_grads / mlp_grads (forced here on CPU, where they run in sequence): the loss and
    every parameter gradient equal the plain model's in float64 to rounding, and the ops ran once per GEMM pair."""
    import dit.models.attention_kernels as ak
    import dit.models.cublaslt as cl
    import dit.models.layers as layers

    calls = {"linear": 0, "mlp": 0}

    def counted(fn, key):
        def wrapper(*a):
            calls[key] += 1
            return fn(*a)
        return wrapper

    forced = lambda dy, x, enable: enable  # noqa: E731 - every pair, on the CPU too
    for mod in (overlap, cl):
        monkeypatch.setattr(mod, "worth_overlapping", forced)
    monkeypatch.setattr(overlap, "linear_grads", counted(linear_grads, "linear"))
    monkeypatch.setattr(cl, "mlp_grads", counted(mlp_grads, "mlp"))
    assert layers.input_and_weight_grads is overlap.input_and_weight_grads is ak.input_and_weight_grads

    torch.manual_seed(0)
    ref = create_model("DiT-S/4", input_size=8, hidden_size=64, depth=2, num_heads=4, num_classes=10).double().eval()
    for p in ref.parameters():  # no zero-initialised layers: every gradient non-trivial
        p.data.normal_(0, 0.2)
    model = copy.deepcopy(ref)
    model.fused_training = True
    model.set_fused_attention(True)
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
    # per block: the qkv and proj pairs, one MLP backward
    assert calls == {"linear": 2 * 2, "mlp": 2}, calls


@_NEED_GPU
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_overlapped_grads_on_the_gpu_equal_the_sequential_ones(dtype):
    """On two streams the GEMMs give the sequential backward's bits (fc1's bias gradient, an fp32 column sum by
    another kernel, to 1e-6), run directly and replayed from a CUDA graph (a fork and join inside the capture)."""
    operands = _mlp_operands(4096, 384, 1536, dtype, device="cuda")
    dy, w2, h = operands[0], operands[3], operands[5]
    want_l = (dy @ w2, torch.mm(dy.t(), h, out_dtype=torch.float32))
    want_m = _sequential_mlp_grads(*operands)

    def run():
        return (*linear_grads(dy, h, w2, torch.float32, "cublas"),
                *mlp_grads(*operands, torch.float32, torch.float32, torch.float32))

    def check(got):
        for name, a, b in zip(("dx", "dw", "mlp dx", "dw1", "db1", "dw2"), got, (*want_l, *want_m)):
            if name == "db1":
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=name)
            else:
                assert torch.equal(a, b), name

    check(run())
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up off the default stream, as torch.cuda.graph asks
        run()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    graph.replay()
    torch.cuda.synchronize()
    check(out)


@_NEED_GPU
def test_dit_training_gradients_with_overlap_on_the_gpu(monkeypatch):
    """A bf16 DiT trained with every block GEMM pair on two streams (MIN_MACS lowered so the small model forks),
    eager and compiled, has the gradients of the same model without the overlap (to fp32 rounding of fc1's bias
    gradient), and both are as close to fp32 as the plain model's."""
    from helpers import assert_training_gradients_match_fp32

    monkeypatch.setattr(overlap, "MIN_MACS", 0)

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
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(32, 4, 32, 32, device="cuda", generator=g)
    t = torch.randint(0, 1000, (32,), device="cuda", generator=g)
    y = torch.randint(0, 10, (32,), device="cuda", generator=g)
    grads = []
    for enable in (False, True):
        m = copy.deepcopy(base)
        configure(m, enable)
        for compiled in (False, True):
            fn = torch.compile(m, dynamic=False) if compiled else m
            m.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                fn(x, t, y=y).float().square().mean().backward()
            grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    for off, on in ((grads[0], grads[2]), (grads[1], grads[3])):
        for name in off:
            torch.testing.assert_close(on[name], off[name], rtol=1e-5, atol=1e-7, msg=name)
