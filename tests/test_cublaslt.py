"""The MLP with its GELU in cuBLASLt GEMM epilogues (dit.models.cublaslt): formulas against float64 autograd on CPU,
the cuBLASLt path against fp32 on a GPU, the model and trainer plumbing."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

from dit.models import create_model
from dit.models.cublaslt import fused_mlp, gelu_epilogues_available, gemm_dgelu, gemm_gelu_aux
from helpers import assert_training_gradients_match_fp32

_NEED_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (cuBLASLt)")


def _mlp_params(m, c, f, dtype, gen, device="cpu"):
    def r(*shape, s=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * s).to(device, dtype).requires_grad_()

    return r(m, c), r(f, c, s=c**-0.5), r(f, s=0.5), r(c, f, s=f**-0.5), r(c, s=0.5)


def _plain_mlp(x, w1, b1, w2, b2):
    return F.linear(F.gelu(F.linear(x, w1, b1), approximate="tanh"), w2, b2)


def test_fused_mlp_equals_the_plain_mlp_in_float64_forward_and_backward():
    """Output and all five gradients equal fc2(GELU_tanh(fc1(x)))'s autograd to float64 rounding; gradcheck too."""
    gen = torch.Generator().manual_seed(0)
    args = _mlp_params(24, 16, 64, torch.float64, gen)
    y = fused_mlp(*args)
    ref_args = [a.detach().clone().requires_grad_() for a in args]
    y_ref = _plain_mlp(*ref_args)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    dy = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad(y, args, dy)
    grads_ref = torch.autograd.grad(y_ref, ref_args, dy)
    for name, g, r in zip(("x", "w1", "b1", "w2", "b2"), grads, grads_ref):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12, msg=name)
    small = _mlp_params(6, 8, 16, torch.float64, gen)
    assert torch.autograd.gradcheck(fused_mlp, small)


def test_epilogue_ops_reference_formulas_and_opcheck():
    """The ops' torch path (CPU): (g, h) = (GELU(x W^T + b), x W^T + b); dh = (dy W) * GELU'(h); both pass
    torch.library's opcheck (fake tensors, schema, autograd registration)."""
    gen = torch.Generator().manual_seed(1)
    x, w, b = (torch.randn(s, generator=gen, dtype=torch.float64) for s in ((10, 8), (24, 8), (24,)))
    g, h = gemm_gelu_aux(x, w, b)
    torch.testing.assert_close(h, x @ w.T + b)
    torch.testing.assert_close(g, 0.5 * h * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (h + 0.044715 * h**3))))
    dy, w2 = (torch.randn(s, generator=gen, dtype=torch.float64) for s in ((10, 8), (8, 24)))
    dh = gemm_dgelu(dy, w2, h)
    hh = h.clone().requires_grad_()
    (gelu_grad,) = torch.autograd.grad(F.gelu(hh, approximate="tanh"), hh, dy @ w2)
    torch.testing.assert_close(dh, gelu_grad)
    bf = [t.to(torch.bfloat16) for t in (x, w, b)]
    opcheck(gemm_gelu_aux, tuple(bf))
    opcheck(gemm_dgelu, (dy.to(torch.bfloat16), w2.to(torch.bfloat16), h.to(torch.bfloat16)))


def test_dit_with_mlp_epilogues_has_the_plain_models_gradients(monkeypatch):
    """DiT.set_mlp_epilogues routes every block's MLP through fused_mlp in training and nowhere else: same loss and
    parameter gradients as the plain model (fp32, CPU), the sampling forward unchanged."""
    import dit.models.cublaslt as cl

    torch.manual_seed(0)
    model = create_model("DiT-S/4", input_size=8, hidden_size=64, depth=2, num_heads=4, num_classes=10).eval()
    for p in model.parameters():  # adaLN-Zero layers random: every path carries gradient
        if p.dim() > 1 and not p.any():
            torch.nn.init.normal_(p, std=0.05)
    fused = copy.deepcopy(model)  # (eval: no random label dropout; autograd decides the MLP path)
    fused.set_mlp_epilogues(True)
    assert all(b.mlp.gemm_epilogues for b in fused.blocks)
    calls = {"fwd": 0, "bwd": 0}

    def counted(name, fn):
        def wrapper(*a):
            calls[name] += 1
            return fn(*a)
        return wrapper

    monkeypatch.setattr(cl, "gemm_gelu_aux", counted("fwd", cl.gemm_gelu_aux))
    monkeypatch.setattr(cl, "gemm_dgelu", counted("bwd", cl.gemm_dgelu))
    x, t, y = torch.randn(4, 4, 8, 8), torch.randint(0, 1000, (4,)), torch.randint(0, 10, (4,))
    out, out_ref = fused(x, t, y=y), model(x, t, y=y)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-6)
    out.square().mean().backward()
    out_ref.square().mean().backward()
    assert calls == {"fwd": 2, "bwd": 2}  # one of each per block
    for (name, p), q in zip(fused.named_parameters(), model.parameters()):
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-7, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(fused(x, t, y=y), model(x, t, y=y), rtol=1e-5, atol=1e-6)
    assert calls == {"fwd": 2, "bwd": 2}  # sampling keeps the inference path


def test_epilogues_are_unavailable_off_cuda_and_count_their_flops():
    """No cuBLASLt off CUDA; torch's FLOP counter sees the fused MLP's six GEMMs as the plain MLP's (benchmark MFU)."""
    from torch.utils.flop_counter import FlopCounterMode

    assert not gelu_epilogues_available("cpu")
    gen = torch.Generator().manual_seed(0)
    counts = []
    for fn in (fused_mlp, _plain_mlp):
        args = _mlp_params(32, 16, 64, torch.float32, gen)
        with FlopCounterMode(display=False) as fc:
            fn(*args).sum().backward()
        counts.append(fc.get_total_flops())
    assert counts[0] == counts[1] == 6 * 2 * 32 * 16 * 64


@_NEED_GPU
def test_cublaslt_epilogue_ops_on_the_gpu_match_fp32():
    """The cuBLASLt GEMMs (bf16, DiT-S and DiT-XL MLP widths, a row count that is not a tile multiple) against the
    fp32 formulas: within bf16 rounding (2^-8 relative) of the operands and outputs."""
    assert gelu_epilogues_available("cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    for m, c, f in [(1000, 384, 1536), (512, 1152, 4608)]:
        x = torch.randn(m, c, device="cuda", generator=gen).bfloat16()
        w1 = (torch.randn(f, c, device="cuda", generator=gen) * c**-0.5).bfloat16()
        b1 = (torch.randn(f, device="cuda", generator=gen) * 0.5).bfloat16()
        g, h = gemm_gelu_aux(x, w1, b1)
        h_ref = x.float() @ w1.float().T + b1.float()
        g_ref = F.gelu(h_ref, approximate="tanh")
        for got, ref in ((h, h_ref), (g, g_ref)):
            assert ((got.float() - ref).norm() / ref.norm()).item() < 4e-3
        dy = torch.randn(m, c, device="cuda", generator=gen).bfloat16()
        w2 = (torch.randn(c, f, device="cuda", generator=gen) * f**-0.5).bfloat16()
        dh = gemm_dgelu(dy, w2, h)
        dh_ref = torch.ops.aten.gelu_backward(dy.float() @ w2.float(), h.float(), approximate="tanh")
        assert ((dh.float() - dh_ref).norm() / dh_ref.norm()).item() < 4e-3
        # the algorithm is chosen once per shape (timed on the first call) and kept: the same result again
        torch.testing.assert_close(gemm_dgelu(dy, w2, h), dh, rtol=0, atol=0)


@_NEED_GPU
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mlp_epilogue_training_gradients_on_the_gpu_match_fp32(dtype):
    """Every parameter gradient of a DiT trained through the epilogue GEMMs (bf16 or fp16 autocast, eager and
    compiled, with the fused LayerNorm and qkv-gradient kernels) is as close to the fp32 gradient as the plain
    model's in that dtype."""
    def configure(model):
        model.set_mlp_epilogues(True)
        model.set_fused_qkv_backward(True)  # and the qkv gradient kernel (dit.models.kernels.qkv_grad)
        model.fused_training = True

    assert_training_gradients_match_fp32(configure, dtype)


def test_algorithm_choices_round_trip_through_a_checkpoint(monkeypatch):
    """The tuned algorithm per GEMM problem is what a checkpoint saves and a resumed run restores; a restored choice
    is used without timing (checked with a stub library that records the algorithm each plan asks for)."""
    import dit.models.cublaslt as cl

    monkeypatch.setattr(cl, "_CHOICES", {})
    key = (torch.device("cuda", 0), cl.EPILOGUE_DGELU, cl._R_16BF, 1536, 65536, 384, cl._OP_N, cl._OP_N, 1536, 384)
    cl.set_algorithm_choices({cl._choice_name(key): 3})
    assert cl.algorithm_choices() == {"192,14,1536,65536,384,0,0,1536,384": 3}

    class Stub(cl._CublasLt):
        def __init__(self):
            self.tuned, self.asked = {}, []

        def plan(self, *k, algo_index=0):
            self.asked.append(algo_index)
            return (None,) * 8 + (5, algo_index)  # 5 candidates

    lt = Stub()
    ran = []
    assert lt.fastest_plan(key, ran.append)[-1] == 3 and not ran  # restored: no timing runs
    assert lt.fastest_plan(key, ran.append)[-1] == 3 and lt.asked == [0, 3]  # then cached per process


def test_algorithm_choice_takes_each_candidates_best_round_and_keeps_the_first_within_the_margin():
    """The tuner's rule (``choose_algorithm``): a candidate's best round counts, so one stalled round does not hide
    the fastest algorithm; the heuristic's first choice (index 0) stays unless another is clearly faster."""
    from dit.models.cublaslt import choose_algorithm

    # 1 had one stalled round (30 ms) but the fastest best round; 2 is steadier and slower
    assert choose_algorithm({0: [10.0, 10.1], 1: [30.0, 8.0], 2: [9.9, 9.8]}) == 1
    assert choose_algorithm({0: [10.0, 10.2], 1: [9.8, 9.9]}) == 0  # 2% faster: within the 3% margin
    assert choose_algorithm({0: [10.0], 1: [9.6]}) == 1  # 4% faster
    assert choose_algorithm({1: [5.0], 2: [4.0]}) == 2  # the first choice could not run these operands
    assert choose_algorithm({}) == 0 and choose_algorithm({0: [], 1: []}) == 0


@_NEED_GPU
def test_algorithm_tuning_times_every_runnable_candidate_in_rounds():
    """``_time_candidates`` on the GPU: a warm-up of the first candidate, then every runnable candidate once per
    round, the rounds interleaved; ``fastest_plan`` skips a candidate that raises and records the choice."""
    import dit.models.cublaslt as cl

    calls = []
    x = torch.randn(256, 256, device="cuda")

    def run(plan):
        calls.append(plan)
        x.mul_(1.0)

    times = cl._time_candidates([(0, "a"), (2, "b")], run)
    assert set(times) == {0, 2} and all(len(t) == cl._TUNE_ROUNDS for t in times.values())
    timed = calls[-2 * cl._TUNE_ROUNDS * cl._TUNE_CALLS:]
    assert timed == (["a"] * cl._TUNE_CALLS + ["b"] * cl._TUNE_CALLS) * cl._TUNE_ROUNDS
    assert all(t > 0 for ts in times.values() for t in ts)
