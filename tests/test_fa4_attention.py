"""The FlashAttention-4 attention backend (attention_kernels.fa4_attention_*, DiT.set_attention_backend): the ops'
formulas against float64 on CPU (their reference path), the DiT and trainer plumbing, and on an sm90+ GPU with
flash-attn-4 installed its kernels against fp32."""

import copy

import pytest
import torch
from torch.library import opcheck

import dit.models.attention_kernels as A
from dit.models import create_model
from helpers import assert_training_gradients_match_fp32

_NEED_FA4 = pytest.mark.skipif(not torch.cuda.is_available() or A.fa4_unavailable_reason("cuda") is not None,
                               reason="needs an sm90+ GPU and flash-attn-4")


def _attention64(qkv, heads):
    """softmax(q k^T / sqrt(Dh)) v written out in float64 -> (N, T, C)."""
    n, t, c3 = qkv.shape
    q, k, v = qkv.double().view(n, t, 3, heads, -1).permute(2, 0, 3, 1, 4)  # (N, H, T, Dh) each
    p = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    return (p @ v).transpose(1, 2).reshape(n, t, c3 // 3)


def test_fa4_ops_reference_formulas_block_sums_and_opcheck():
    """The ops' reference path (CPU, float64): o = attention(q, k, v), lse = logsumexp of the scaled scores, dqkv =
    the autograd gradient of the formula, the bias pieces = column sums per block of ROWS tokens (a token count that
    is not a multiple of ROWS: the last block is partial); torch.library's opcheck passes for both ops."""
    gen = torch.Generator().manual_seed(0)
    n, t, heads, dh = 2, 70, 3, 8
    qkv = torch.randn(n, t, 3 * heads * dh, generator=gen, dtype=torch.float64).requires_grad_()
    do = torch.randn(n, t, heads * dh, generator=gen, dtype=torch.float64)
    o, lse = A.fa4_attention_fwd(qkv, heads)
    want = _attention64(qkv, heads)
    torch.testing.assert_close(o, want, rtol=1e-12, atol=1e-12)
    q, k, _ = A._split(qkv, heads)
    torch.testing.assert_close(lse, torch.logsumexp(q @ k.transpose(-1, -2) / dh**0.5, dim=-1), rtol=1e-12,
                               atol=1e-12)
    (ref,) = torch.autograd.grad(want, qkv, do)
    (got,) = torch.autograd.grad(o, qkv, do)  # through the op's registered autograd
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    dqkv, part = A.fa4_attention_bwd(qkv.detach(), o.detach(), lse, do, heads)
    torch.testing.assert_close(dqkv, ref, rtol=1e-10, atol=1e-12)
    assert part.shape == (n, 2, 3 * heads * dh)  # 70 tokens = one block of 64 + one of 6
    torch.testing.assert_close(part[:, 0], ref[:, :64].sum(1), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(part[:, 1], ref[:, 64:].sum(1), rtol=1e-10, atol=1e-12)
    small = torch.randn(2, 5, 3 * 2 * 8, dtype=torch.float64, requires_grad=True)
    opcheck(A.fa4_attention_fwd, (small, 2))
    o, lse = A.fa4_attention_fwd(small.detach(), 2)
    opcheck(A.fa4_attention_bwd, (small.detach(), o, lse, torch.randn_like(o), 2))


def test_attention_backend_checks_give_one_line_errors():
    """An unknown backend, and FA4 off a CUDA GPU, are refused with a one-line message naming the backend."""
    with pytest.raises(ValueError, match="attention backend 'fa3': expected one of triton, fa4"):
        A.check_attention_backend("fa3", "cpu")
    with pytest.raises(ValueError, match="attention backend 'fa4': FlashAttention-4 needs a CUDA GPU"):
        A.check_attention_backend("fa4", "cpu")
    A.check_attention_backend("triton", "cpu")
    model = create_model("DiT-S/4", input_size=8, hidden_size=64, depth=1, num_heads=4, num_classes=10)
    with pytest.raises(ValueError, match="attention backend 'FA4'"):
        model.set_attention_backend("FA4")
    with pytest.raises(ValueError, match="attention backend 'cudnn'"):
        A.qkv_attention(torch.randn(1, 4, 64), model.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.bias, 4,
                        attention="cudnn")


def test_dit_on_the_fa4_backend_has_the_triton_backends_outputs_and_gradients(monkeypatch):
    """DiT.set_attention_backend("fa4") sends every block's training attention through the FA4 ops and nothing
    else: on CPU in float64 (the ops' reference path) the same output and parameter gradients as the default
    backend, with the FA4 forward and backward called once per block."""
    torch.manual_seed(0)
    model = create_model("DiT-S/4", input_size=8, hidden_size=64, depth=2, num_heads=4, num_classes=10).double()
    for p in model.parameters():  # adaLN-Zero layers random: every path carries gradient
        if p.dim() > 1 and not p.any():
            torch.nn.init.normal_(p, std=0.05)
    model.set_fused_attention(True)
    fa4 = copy.deepcopy(model)
    fa4.set_attention_backend("fa4")
    assert all(b.attn.attention_backend == "fa4" for b in fa4.blocks)
    assert all(b.attn.attention_backend == "triton" for b in model.blocks)
    calls = {"fwd": 0, "bwd": 0, "triton": 0}

    def counted(key, fn):
        def wrapper(*a):
            calls[key] += 1
            return fn(*a)
        return wrapper

    fwd, bwd = A._OPS["fa4"]
    monkeypatch.setitem(A._OPS, "fa4", (counted("fwd", fwd), counted("bwd", bwd)))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 4, 8, 8, generator=gen, dtype=torch.float64)
    t, y = torch.randint(0, 1000, (4,), generator=gen), torch.randint(0, 10, (4,), generator=gen)
    out = fa4(x, t, y=y)
    monkeypatch.setitem(A._OPS, "triton", tuple(counted("triton", f) for f in A._OPS["triton"]))
    out_ref = model(x, t, y=y)
    torch.testing.assert_close(out, out_ref, rtol=1e-12, atol=1e-12)
    out.square().mean().backward()
    out_ref.square().mean().backward()
    assert calls == {"fwd": 2, "bwd": 2, "triton": 4}  # two blocks; the default model kept the Triton ops
    for (name, p), q in zip(fa4.named_parameters(), model.parameters()):
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-14, msg=name)


@pytest.mark.skipif(torch.cuda.is_available() and A.fa4_unavailable_reason("cuda") is None,
                    reason="FlashAttention-4 runs here: nothing to refuse")
def test_trainer_refuses_the_fa4_backend_where_it_cannot_run(tmp_path):
    """model.attention_backend=fa4 where FA4 cannot run: a one-line ConfigError naming the option and the reason;
    an unknown value is refused when the config loads."""
    from dit.config import ConfigError, load_config
    from dit.train import train
    from test_train import tiny_overrides

    cfg = load_config(None, tiny_overrides(tmp_path) + ["model.attention_backend=fa4", "train.max_steps=1"])
    with pytest.raises(ConfigError, match="model.attention_backend=fa4: (FlashAttention-4 needs|the flash-attn-4)"):
        train(cfg)
    with pytest.raises(ConfigError, match="model.attention_backend must be"):
        load_config(None, tiny_overrides(tmp_path) + ["model.attention_backend=fa3"])


@_NEED_FA4
def test_fa4_ops_on_the_gpu_match_fp32():
    """FA4's kernels (bf16; DiT-S/B's head dim 64 and DiT-XL's 72; a token count that is not a tile multiple)
    against float64, within bf16 rounding; the backward repeats itself bit for bit (deterministic mode); the same
    results replayed from a CUDA graph (the trainer's reduce-overhead and step graph)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    for n, t, heads, dh in [(4, 256, 6, 64), (2, 256, 16, 72), (3, 77, 4, 64)]:
        qkv = torch.randn(n, t, 3 * heads * dh, device="cuda", generator=gen).bfloat16()
        do = torch.randn(n, t, heads * dh, device="cuda", generator=gen).bfloat16()
        x = qkv.double().requires_grad_()
        want = _attention64(x, heads)
        (dref,) = torch.autograd.grad(want, x, do.double())
        o, lse = A.fa4_attention_fwd(qkv, heads)
        assert ((o.double() - want).norm() / want.norm()).item() < 1e-2
        dqkv, part = A.fa4_attention_bwd(qkv, o, lse, do, heads)
        assert torch.isfinite(dqkv).all()
        assert ((dqkv.double() - dref).norm() / dref.norm()).item() < 1e-2
        torch.testing.assert_close(part.sum((0, 1)), dqkv.float().sum((0, 1)), rtol=1e-4, atol=1e-3)
        assert torch.equal(A.fa4_attention_bwd(qkv, o, lse, do, heads)[0], dqkv)  # deterministic, as ours
        out = {}
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out["o"], out["lse"] = A.fa4_attention_fwd(qkv, heads)
            out["dqkv"] = A.fa4_attention_bwd(qkv, out["o"], out["lse"], do, heads)[0]
        graph.replay()
        torch.testing.assert_close(out["o"], o, rtol=0, atol=0)
        torch.testing.assert_close(out["dqkv"], dqkv, rtol=0, atol=0)


@_NEED_FA4
def test_fa4_backend_training_gradients_on_the_gpu_match_fp32():
    """Every parameter gradient of a DiT trained on the FA4 attention backend (bf16 autocast, eager and compiled,
    with the fused LayerNorm, attention and epilogue paths) is as close to the fp32 gradient as the plain bf16
    model's."""
    def configure(model):
        model.set_mlp_epilogues(True)
        model.set_fused_attention(True)
        model.fused_training = True
        model.set_attention_backend("fa4")

    assert_training_gradients_match_fp32(configure, torch.bfloat16)
