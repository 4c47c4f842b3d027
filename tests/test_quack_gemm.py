"""The QuACK GEMM backend (dit.models.quack_gemm): the ops' formulas against float64 on CPU (their torch path),
the DiT and trainer plumbing, and on an sm90+ GPU with quack-kernels installed the QuACK kernels against fp32."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

import dit.models.quack_gemm as qg
from dit.models import create_model
from helpers import assert_training_gradients_match_fp32

_NEED_QUACK = pytest.mark.skipif(not torch.cuda.is_available() or qg.unavailable_reason("cuda") is not None,
                                 reason="needs an sm90+ GPU and quack-kernels")


def _gelu(h):
    return 0.5 * h * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (h + 0.044715 * h**3)))


def test_quack_ops_reference_formulas_and_opcheck():
    """The ops' torch path (CPU, float64): linear = x W^T + b (with and without bias), mm = a b,
    (g, h) = (GELU_tanh(x W^T + b), x W^T + b), (dh, g) = ((dy W) * GELU_tanh'(h), GELU_tanh(h)); torch.library's
    opcheck passes for each (fake tensors, schema)."""
    gen = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(s, generator=gen, dtype=torch.float64) for s in ((10, 8), (24, 8), (24,)))
    torch.testing.assert_close(qg.quack_linear(x, w, b), x @ w.T + b[None], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(qg.quack_linear(x, w, None), x @ w.T, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(qg.quack_mm(x, w.T.contiguous()), x @ w.T, rtol=1e-12, atol=1e-12)
    g, h = qg.quack_gemm_gelu_aux(x, w, b)
    torch.testing.assert_close(h, x @ w.T + b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g, _gelu(h), rtol=1e-12, atol=1e-12)
    dy, w2 = (torch.randn(s, generator=gen, dtype=torch.float64) for s in ((10, 8), (8, 24)))
    dh, g2 = qg.quack_gemm_dgelu(dy, w2, h)
    hh = h.clone().requires_grad_()
    (ref,) = torch.autograd.grad(_gelu(hh), hh, dy @ w2)
    torch.testing.assert_close(dh, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g2, g, rtol=1e-12, atol=1e-12)
    bf = lambda *ts: tuple(t.to(torch.bfloat16) for t in ts)  # noqa: E731
    opcheck(qg.quack_linear, bf(x, w, b))
    opcheck(qg.quack_linear, (*bf(x, w), None))
    opcheck(qg.quack_mm, bf(x, w.T.contiguous()))
    opcheck(qg.quack_gemm_gelu_aux, bf(x, w, b))
    opcheck(qg.quack_gemm_dgelu, bf(dy, w2, h))


def test_backend_checks_give_one_line_errors():
    """An unknown backend and QuACK off a CUDA GPU are refused with a one-line message naming the backend."""
    with pytest.raises(ValueError, match="gemm backend 'cutlass': expected one of cublas, quack"):
        qg.check_backend("cutlass", "cpu")
    with pytest.raises(ValueError, match="gemm backend 'quack': QuACK's GEMMs need a CUDA GPU"):
        qg.check_backend("quack", "cpu")
    qg.check_backend("cublas", "cpu")
    model = create_model("DiT-S/4", input_size=8, hidden_size=64, depth=1, num_heads=4, num_classes=10)
    with pytest.raises(ValueError, match="gemm backend 'Quack'"):
        model.set_gemm_backend("Quack")


def _small_dit():
    torch.manual_seed(0)
    model = create_model("DiT-S/4", input_size=8, hidden_size=64, depth=2, num_heads=4, num_classes=10).eval()
    for p in model.parameters():  # adaLN-Zero layers random: every path carries gradient
        if p.dim() > 1 and not p.any():
            torch.nn.init.normal_(p, std=0.05)
    model.set_mlp_epilogues(True)
    model.set_fused_attention(True)
    return model


def test_dit_on_the_quack_backend_has_the_cublas_backends_outputs_and_gradients(monkeypatch):
    """DiT.set_gemm_backend("quack") sends the blocks' qkv/proj/fc1/fc2 forward and input-gradient GEMMs (and the
    GELU epilogues) through the QuACK ops and nothing else: on CPU in float64 (the ops' torch path) the same output
    and parameter gradients as the default backend, and the ops called as often as the blocks have GEMMs."""
    model = _small_dit().double()
    quack = copy.deepcopy(model)
    quack.set_gemm_backend("quack")
    assert all(b.attn.gemm_backend == b.mlp.gemm_backend == "quack" for b in quack.blocks)
    calls = {}

    def counted(name, fn):
        def wrapper(*a):
            calls[name] = calls.get(name, 0) + 1
            return fn(*a)
        return wrapper

    for name in ("quack_linear", "quack_mm", "quack_gemm_gelu_aux", "quack_gemm_dgelu"):
        monkeypatch.setattr(qg, name, counted(name, getattr(qg, name)))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 4, 8, 8, generator=gen, dtype=torch.float64)
    t, y = torch.randint(0, 1000, (4,), generator=gen), torch.randint(0, 10, (4,), generator=gen)
    out, out_ref = quack(x, t, y=y), model(x, t, y=y)
    torch.testing.assert_close(out, out_ref, rtol=1e-12, atol=1e-12)
    out.square().mean().backward()
    out_ref.square().mean().backward()
    # per block: forward qkv, proj, fc2 (linear) and fc1 (gelu_aux); backward qkv, proj, fc1 (mm) and fc2 (dgelu)
    assert calls == {"quack_linear": 6, "quack_gemm_gelu_aux": 2, "quack_mm": 6, "quack_gemm_dgelu": 2}
    for (name, p), q in zip(quack.named_parameters(), model.parameters()):
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-14, msg=name)


@pytest.mark.skipif(torch.cuda.is_available() and qg.unavailable_reason("cuda") is None,
                    reason="QuACK runs here: nothing to refuse")
def test_trainer_refuses_the_quack_backend_where_it_cannot_run(tmp_path):
    """model.gemm_backend=quack where QuACK cannot run: a one-line ConfigError naming the option and the reason."""
    from dit.config import ConfigError, load_config
    from dit.train import train
    from test_train import tiny_overrides

    cfg = load_config(None, tiny_overrides(tmp_path) + ["model.gemm_backend=quack", "train.max_steps=1"])
    with pytest.raises(ConfigError, match="model.gemm_backend=quack: (QuACK's GEMMs need|the quack-kernels)"):
        train(cfg)
    with pytest.raises(ConfigError, match="model.gemm_backend must be"):
        load_config(None, tiny_overrides(tmp_path) + ["model.gemm_backend=cutlass"])


@_NEED_QUACK
def test_quack_ops_on_the_gpu_match_fp32():
    """QuACK's kernels (bf16, DiT-S and DiT-XL widths, a row count that is not a tile multiple) against the fp32
    formulas, within bf16 rounding of the operands and outputs."""
    gen = torch.Generator(device="cuda").manual_seed(0)

    def r(*s, scale=1.0):
        return (torch.randn(*s, device="cuda", generator=gen) * scale).bfloat16()

    def rel(a, ref):
        return ((a.float() - ref).norm() / ref.norm()).item()

    for m, c, f in [(1000, 384, 1536), (512, 1152, 4608)]:
        x, w1, b1 = r(m, c), r(f, c, scale=c**-0.5), r(f, scale=0.5)
        w2, dy = r(c, f, scale=f**-0.5), r(m, c)
        h_ref = x.float() @ w1.float().T + b1.float()
        assert rel(qg.quack_linear(x, w1, b1), h_ref) < 4e-3
        assert rel(qg.quack_linear(x, w1, None), h_ref - b1.float()) < 4e-3
        assert rel(qg.quack_mm(dy, w2), dy.float() @ w2.float()) < 4e-3
        g, h = qg.quack_gemm_gelu_aux(x, w1, b1)
        assert rel(h, h_ref) < 4e-3 and rel(g, F.gelu(h_ref, approximate="tanh")) < 4e-3
        dh, g2 = qg.quack_gemm_dgelu(dy, w2, h)
        dh_ref = torch.ops.aten.gelu_backward(dy.float() @ w2.float(), h.float(), approximate="tanh")
        assert rel(dh, dh_ref) < 4e-3 and rel(g2, F.gelu(h.float(), approximate="tanh")) < 4e-3
        # inside a CUDA graph (the trainer's reduce-overhead and step graph): the same results on replay
        out = {}
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out["y"] = qg.quack_linear(x, w1, b1)
            out["dh"] = qg.quack_gemm_dgelu(dy, w2, h)[0]
        graph.replay()
        torch.testing.assert_close(out["y"], qg.quack_linear(x, w1, b1), rtol=0, atol=0)
        torch.testing.assert_close(out["dh"], dh, rtol=0, atol=0)


@_NEED_QUACK
def test_quack_backend_training_gradients_on_the_gpu_match_fp32():
    """Every parameter gradient of a DiT trained on the QuACK backend (bf16 autocast, eager and compiled, with the
    fused LayerNorm, attention and epilogue paths) is as close to the fp32 gradient as the plain bf16 model's."""
    def configure(model):
        model.set_mlp_epilogues(True)
        model.set_fused_attention(True)
        model.fused_training = True
        model.set_gemm_backend("quack")

    assert_training_gradients_match_fp32(configure, torch.bfloat16)
