"""DiT model zoo: shapes, adaLN-Zero init, official sizes and key names, embeddings, input checks, text variant."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dit.models import create_model, list_models
from dit.models.dit import DiT
from dit.models.layers import LabelEmbedder, get_2d_sincos_pos_embed, timestep_embedding
from dit.utils import forward_flops

TINY = dict(depth=1, hidden_size=32, num_heads=2, input_size=8)


def _tiny(name: str, **kw) -> DiT:
    extra = dict(context_dim=16) if name.endswith("-T") else dict(num_classes=10)
    return create_model(name, **{**TINY, **extra, **kw})


def _cond(model: DiT, n: int, gen: torch.Generator) -> dict:
    if model.conditioning == "class":
        return dict(y=torch.randint(0, model.num_classes + 1, (n,), generator=gen))
    if model.conditioning == "text":
        mask = torch.ones(n, 5, dtype=torch.bool)
        mask[0, 3:] = False
        return dict(context=torch.randn(n, 5, model.context_dim, generator=gen), context_mask=mask)
    return {}


def _randomize(model: torch.nn.Module, gen: torch.Generator, std: float = 0.2) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)


def test_registry_has_all_paper_names():
    names = set(list_models("DiT-*"))
    expected = {f"DiT-{s}/{p}{t}" for s in ("S", "B", "L", "XL") for p in (2, 4, 8) for t in ("", "-T")}
    assert names == expected


@pytest.mark.parametrize("name", [n for n in list_models("DiT-*")])
def test_every_config_tiny_forward_backward_zero_init(name):
    gen = torch.Generator().manual_seed(0)
    model = _tiny(name)
    assert model.patch_size == int(name.split("/")[1].split("-")[0])
    assert model.conditioning == ("text" if name.endswith("-T") else "class")
    assert model.out_channels == 2 * model.in_channels == 8
    x = torch.randn(2, 4, 8, 8, generator=gen)
    t = torch.tensor([3, 700])
    cond = _cond(model, 2, gen)
    out = model(x, t, **cond)
    assert out.shape == (2, 8, 8, 8)
    assert torch.isfinite(out).all()
    assert torch.equal(out, torch.zeros_like(out)), "adaLN-Zero: a fresh model must output exactly zero"
    out.sum().backward()  # at init only the zero final layer gets gradient (adaLN-Zero): learning can start
    assert model.final_layer.linear.weight.grad.abs().max() > 0
    model.zero_grad()
    _randomize(model, gen)
    out = model(x, t, **cond)
    assert out.abs().max() > 1e-3
    out.square().mean().backward()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.pos_embed.grad is None and not model.pos_embed.requires_grad


def test_unconditional_model():
    from dit.benchmark import _randomise_zero_init

    model = create_model("DiT-S/4", **TINY, num_classes=0, learn_sigma=False)
    assert model.conditioning == "none" and model.y_embedder is None and model.out_channels == 4
    _randomise_zero_init(model)  # adaLN-Zero: exactly zero output at init otherwise
    x, t = torch.randn(3, 4, 8, 8), torch.rand(3) * 999  # fractional timesteps are fine
    out = model(x, t)
    assert out.shape == (3, 4, 8, 8) and out.abs().amax() > 0
    assert not torch.allclose(model(x, t + 100), out)  # the timestep is used
    assert not torch.allclose(model(x.flip(-1), t), out)  # and the input


# Official parameter counts (facebookresearch/DiT train.py prints sum(p.numel() for p in model.parameters()),
# pos_embed included) at input_size=32, num_classes=1000, learn_sigma=True.
OFFICIAL_COUNTS = {"DiT-S/2": 32_963_360, "DiT-B/2": 130_512_416, "DiT-L/2": 458_102_816, "DiT-XL/2": 675_129_632}


def _count_formula(hidden: int, depth: int, patch: int, c_in: int = 4, classes: int = 1000, size: int = 32) -> int:
    """Closed form of the official parameter count (independent of the module code)."""
    d, tokens, c_out = hidden, (size // patch) ** 2, 2 * c_in
    patch_embed = d * c_in * patch * patch + d
    t_embed = 256 * d + d + d * d + d
    y_embed = (classes + 1) * d
    block = (6 * d * d + 6 * d) + (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d)
    final = (2 * d * d + 2 * d) + (patch * patch * c_out * d + patch * patch * c_out)
    return patch_embed + t_embed + y_embed + tokens * d + depth * block + final


@pytest.mark.parametrize("name", ["DiT-S/2", "DiT-B/2", "DiT-L/2", "DiT-XL/2", "DiT-S/4", "DiT-B/8", "DiT-XL/4",
                                  "DiT-XL/8"])
def test_parameter_counts_match_official(name):
    with torch.device("meta"):
        model = create_model(name)
    n = sum(p.numel() for p in model.parameters())
    size, p = name[4:].split("/")
    hidden, depth = {"S": (384, 12), "B": (768, 12), "L": (1024, 24), "XL": (1152, 28)}[size]
    assert n == _count_formula(hidden, depth, int(p))
    if name in OFFICIAL_COUNTS:
        assert n == OFFICIAL_COUNTS[name]


def test_official_key_names_dit_xl_2():
    with torch.device("meta"):
        sd = create_model("DiT-XL/2").state_dict()
    assert len(sd) == 292  # 2 patch + 4 time + 1 label + 1 pos + 28 * 10 block + 4 final
    expected_shapes = {
        "x_embedder.proj.weight": (1152, 4, 2, 2),
        "t_embedder.mlp.0.weight": (1152, 256),
        "t_embedder.mlp.2.weight": (1152, 1152),
        "y_embedder.embedding_table.weight": (1001, 1152),
        "pos_embed": (1, 256, 1152),
        "blocks.0.adaLN_modulation.1.weight": (6 * 1152, 1152),
        "blocks.0.attn.qkv.weight": (3 * 1152, 1152),
        "blocks.27.attn.proj.bias": (1152,),
        "blocks.0.mlp.fc1.weight": (4608, 1152),
        "blocks.0.mlp.fc2.weight": (1152, 4608),
        "final_layer.linear.weight": (32, 1152),
        "final_layer.adaLN_modulation.1.weight": (2304, 1152),
    }
    for k, shape in expected_shapes.items():
        assert tuple(sd[k].shape) == shape, k
    assert not any("norm" in k for k in sd)  # all LayerNorms are affine-free, as in the official model


def test_timestep_embedding_matches_formula_float64():
    t = torch.tensor([0.0, 1.0, 17.5, 500.0, 999.0])
    for dim, shift in [(256, 0.0), (256, 1.0), (33, 0.0)]:
        half = dim // 2
        i = torch.arange(half, dtype=torch.float64)
        w = 10000.0 ** (-i / (half - shift))  # (half,)
        arg = t.double()[:, None] * w[None]
        ref = torch.cat([torch.cos(arg), torch.sin(arg)], dim=1)
        if dim % 2:
            ref = torch.cat([ref, torch.zeros(len(t), 1, dtype=torch.float64)], dim=1)
        got = timestep_embedding(t, dim, downscale_freq_shift=shift)
        assert got.shape == (5, dim) and got.dtype == torch.float32
        torch.testing.assert_close(got.double(), ref, atol=2e-4, rtol=0)


def test_timestep_freq_shift_changes_embedding():
    t = torch.tensor([250.0])
    assert not torch.allclose(timestep_embedding(t, 256), timestep_embedding(t, 256, downscale_freq_shift=1.0))


def _mae_sincos_numpy(embed_dim: int, grid_size: int) -> np.ndarray:
    """Independent re-derivation of the MAE / official DiT 2-D sin-cos embedding (numpy, meshgrid with w first)."""
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.meshgrid(grid_w, grid_h)  # "xy" indexing: grid[0][i, j] = j, grid[1][i, j] = i
    grid = np.stack(grid, axis=0).reshape(2, 1, grid_size, grid_size)

    def one_d(d, pos):
        omega = np.arange(d // 2, dtype=np.float64) / (d / 2.0)
        omega = 1.0 / 10000**omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)


@pytest.mark.parametrize("dim,grid", [(16, 4), (64, 7), (1152, 16)])
def test_2d_sincos_matches_numpy_reference(dim, grid):
    ours = get_2d_sincos_pos_embed(dim, grid).numpy()
    np.testing.assert_allclose(ours, _mae_sincos_numpy(dim, grid), atol=1e-12, rtol=0)


def test_pos_embed_is_fixed_sincos_parameter():
    model = _tiny("DiT-S/2", input_size=16, hidden_size=64)
    assert isinstance(model.pos_embed, torch.nn.Parameter) and not model.pos_embed.requires_grad
    torch.testing.assert_close(model.pos_embed[0].double(), get_2d_sincos_pos_embed(64, 8), atol=1e-7, rtol=0)


def test_label_dropout_rate_and_force_drop():
    torch.manual_seed(0)
    emb = LabelEmbedder(num_classes=10, hidden_size=4, dropout_prob=0.3)
    labels = torch.randint(0, 10, (20000,))
    dropped = emb.token_drop(labels) == 10
    assert abs(dropped.float().mean().item() - 0.3) < 0.015
    force = torch.tensor([1, 0, 1, 0])
    out = emb.token_drop(torch.tensor([1, 2, 3, 4]), force_drop_ids=force)
    assert out.tolist() == [10, 2, 10, 4]
    # Through the model: eval mode never drops, train mode drops at the configured rate.
    model = _tiny("DiT-S/2", class_dropout_prob=0.5)
    y = torch.zeros(4000, dtype=torch.long)
    model.eval()
    assert torch.equal(model.y_embedder(y, model.training), model.y_embedder.embedding_table.weight[y])
    model.train()
    e = model.y_embedder(y, model.training)
    null = (e == model.y_embedder.embedding_table.weight[10]).all(dim=1).float().mean().item()
    assert abs(null - 0.5) < 0.04


def test_bad_inputs_give_clear_errors():
    model = _tiny("DiT-S/2")
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), torch.tensor([0, 1])
    with pytest.raises(ValueError, match=r"x must be \(N, 4, 8, 8\)"):
        model(torch.randn(2, 3, 8, 8), t, y)
    with pytest.raises(ValueError, match="does not match input_size=8"):
        model(torch.randn(2, 4, 16, 16), t, y)
    with pytest.raises(ValueError, match="needs y"):
        model(x, t)
    with pytest.raises(ValueError, match=r"t must be \(N,\)"):
        model(x, torch.tensor([1, 2, 3]), y)
    text = _tiny("DiT-S/2-T")
    with pytest.raises(ValueError, match="needs context"):
        text(x, t)
    with pytest.raises(ValueError, match=r"context must be \(N, L, 16\)"):
        text(x, t, context=torch.randn(2, 5, 8))
    with pytest.raises(ValueError, match="context_mask"):
        text(x, t, context=torch.randn(2, 5, 16), context_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="multiple of patch_size"):
        DiT(input_size=10, patch_size=4, hidden_size=32, depth=1, num_heads=2)
    with pytest.raises(ValueError, match="num_classes=0"):
        DiT(input_size=8, hidden_size=32, depth=1, num_heads=2, context_dim=16, num_classes=10)


def test_grad_checkpointing_gives_same_gradients():
    gen = torch.Generator().manual_seed(1)
    model = _tiny("DiT-S/2", depth=2).double().eval()
    _randomize(model, gen)
    x = torch.randn(2, 4, 8, 8, generator=gen, dtype=torch.float64)
    t, y = torch.tensor([10, 900]), torch.tensor([1, 3])

    def grads():
        model.zero_grad()
        out = model(x, t, y)
        (out * torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view_as(out)).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    out0, g0 = grads()
    model.set_grad_checkpointing(True)
    out1, g1 = grads()
    torch.testing.assert_close(out1, out0, rtol=0, atol=1e-12)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-10, atol=1e-12)


def test_low_precision_residual_keeps_the_stream_in_the_autocast_dtype_and_output_close():
    gen = torch.Generator().manual_seed(2)
    model = _tiny("DiT-S/2", depth=3).eval()
    _randomize(model, gen)
    x = torch.randn(4, 4, 8, 8, generator=gen)
    t, y = torch.tensor([10, 300, 600, 900]), torch.tensor([1, 3, 5, 7])
    with torch.no_grad():
        ref = model(x, t, y)  # fp32
        model.set_low_precision_residual(True)
        torch.testing.assert_close(model(x, t, y), ref, rtol=0, atol=0)  # no autocast: nothing changes
        dtypes = []
        hook = model.final_layer.register_forward_pre_hook(lambda m, args: dtypes.append(args[0].dtype))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x, t, y).float()
            model.set_low_precision_residual(False)
            default = model(x, t, y).float()
        model.set_low_precision_residual(True)
        with torch.autocast("cpu", dtype=torch.float16):
            half = model(x, t, y).float()
        model.set_low_precision_residual(False)
        hook.remove()
    # the stream between blocks: bf16, then the official fp32; under fp16 autocast fp16
    assert dtypes == [torch.bfloat16, torch.float32, torch.float16]
    err = lambda a: ((a - ref).norm() / ref.norm()).item()  # noqa: E731
    assert err(low) < 1e-2 and err(default) < err(low)  # within the bf16 target, and the fp32 stream is closer
    # fp16 has 3 more mantissa bits than bf16: its 16-bit stream is closer than bf16's fp32 one (docs/benchmarks.md)
    assert err(half) < err(default) / 2


def test_fused_inference_mlp_matches_the_two_kernel_path():
    from dit.models.layers import Mlp, linear_gelu_tanh

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 8, generator=gen, dtype=torch.float64)
    w, b = torch.randn(12, 8, generator=gen, dtype=torch.float64), torch.randn(12, generator=gen, dtype=torch.float64)
    u = x @ w.T + b  # GELU, tanh form (Hendrycks & Gimpel 2016), written out
    want = 0.5 * u * (1 + torch.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u**3)))
    torch.testing.assert_close(linear_gelu_tanh(x, w, b), want, rtol=1e-12, atol=1e-12)
    torch.library.opcheck(linear_gelu_tanh, (x.float(), w.float(), b.float()))  # schema + fake (compile) impl

    mlp = Mlp(8, 32).double()
    xs = torch.randn(2, 5, 8, generator=gen, dtype=torch.float64)
    two_kernels = mlp(xs)  # grad enabled: fc1, GELU, fc2
    calls = []
    with torch.no_grad():
        with torch.library._scoped_library("dit", "IMPL") as lib:  # count calls of the fused op
            lib.impl("linear_gelu_tanh", lambda *a: (calls.append(1), F.gelu(F.linear(*a), approximate="tanh"))[1],
                     "CPU")
            fused = mlp(xs)
        mlp.fused_inference = False
        plain = mlp(xs)
    assert calls == [1] and fused.shape == (2, 5, 8)
    torch.testing.assert_close(fused, two_kernels.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(plain, two_kernels.detach(), rtol=0, atol=0)
    eager = Mlp(8, 32)
    compiled = torch.compile(eager, backend="eager", fullgraph=True)  # no graph break around the custom op
    with torch.no_grad():
        torch.testing.assert_close(compiled(xs.float()), eager(xs.float()), rtol=0, atol=0)


def test_text_variant_ignores_padding_tokens():
    gen = torch.Generator().manual_seed(2)
    model = _tiny("DiT-S/2-T", depth=2).double().eval()
    _randomize(model, gen)
    x = torch.randn(2, 4, 8, 8, generator=gen, dtype=torch.float64)
    t = torch.tensor([5, 600])
    ctx = torch.randn(2, 6, 16, generator=gen, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    out = model(x, t, context=ctx, context_mask=mask)
    ctx2 = torch.where(mask[..., None], ctx, torch.randn(ctx.shape, generator=gen, dtype=torch.float64) * 10)
    torch.testing.assert_close(model(x, t, context=ctx2, context_mask=mask), out, rtol=0, atol=1e-12)
    # The real tokens matter (so the check above can fail), and without the mask the padding matters too.
    ctx3 = ctx.clone()
    ctx3[0, 1] += 1.0
    assert (model(x, t, context=ctx3, context_mask=mask) - out).abs().max() > 1e-6
    assert (model(x, t, context=ctx2) - model(x, t, context=ctx)).abs().max() > 1e-6
    # An explicit pooled vector replaces the masked mean.
    pooled = (ctx * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    torch.testing.assert_close(model(x, t, context=ctx, context_mask=mask, pooled=pooled), out, rtol=0, atol=1e-12)


def test_unpatchify_inverts_patchify_order():
    model = _tiny("DiT-S/4", input_size=16, learn_sigma=False)
    img = torch.randn(2, 4, 16, 16)
    p = 4
    # Row-major patches, each flattened as (p, q, c): the layout the final linear layer produces.
    tokens = img.reshape(2, 4, 4, p, 4, p).permute(0, 2, 4, 3, 5, 1).reshape(2, 16, p * p * 4)
    assert torch.equal(model.unpatchify(tokens), img)


@pytest.mark.parametrize("name,paper_gflops", [("DiT-S/2", 6.06), ("DiT-B/2", 23.01), ("DiT-XL/2", 118.64)])
def test_forward_flops_match_paper(name, paper_gflops):
    with torch.device("meta"):
        model = create_model(name)
    flops = forward_flops(model)  # 2 FLOPs per multiply-add
    assert math.isclose(flops / 2e9, paper_gflops, rel_tol=0.01)


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("fused", [False, True])
def test_compile_blocks_shares_one_graph_and_keeps_outputs(fused):
    """Regional compilation: all blocks run one compiled function (two on the fused path, whose first block has no
    pending residual update); outputs and every gradient equal the eager model's; hooks still run; state-dict keys
    and copies are unaffected."""
    import copy

    from helpers import regional_twin

    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    ref = _tiny("DiT-S/2", depth=3, num_classes=10)
    with torch.no_grad():  # adaLN-Zero would make every block the identity
        for p in ref.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    ref.fused_training = fused
    # float64: compiled and eager sum gradients in different orders. eval(): no label dropout (random); the fused
    # path still runs, it follows grad mode.
    ref.double().eval()
    seen = []
    ref.blocks[1].register_forward_hook(lambda *a: seen.append(1))  # copied into the twin
    x = torch.randn(2, 4, 8, 8, generator=gen, dtype=torch.float64)
    t = torch.randint(0, 1000, (2,), generator=gen)
    y = torch.randint(0, 10, (2,), generator=gen)
    model, out_ref, out, counter, n = regional_twin(ref, x, t, y)
    assert n == 3 and counter.frame_count == (2 if fused else 1)  # not one per block
    torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-12)
    g_ref, g = _grads(ref), _grads(model)
    assert g.keys() == g_ref.keys() and len(g) == sum(p.requires_grad for p in ref.parameters())
    for k in g:
        torch.testing.assert_close(g[k], g_ref[k], rtol=1e-10, atol=1e-12, msg=lambda m, k=k: f"{k}: {m}")
    assert seen == ([] if fused else [1, 1])  # the fused path calls forward_fused, past __call__ (as before)
    assert model.state_dict().keys() == ref.state_dict().keys()
    clone = copy.deepcopy(model)  # the EMA's way of copying: methods stay bound to their own block
    assert clone.blocks[2].forward.__self__ is clone.blocks[2]
    torch.testing.assert_close(clone(x, t, y), out)
    assert counter.frame_count == (2 if fused else 1)  # the copy reuses the graph too


def _tiny_fused_dit() -> DiT:
    torch.manual_seed(0)
    m = create_model("DiT-S/2", input_size=8, depth=2, num_classes=10)
    with torch.no_grad():  # adaLN-Zero: make every path carry a gradient
        for p in m.parameters():
            if p.abs().max() == 0:
                p.normal_(0, 0.02)
    m.fused_training = True
    m.set_mlp_epilogues(True)
    m.set_fused_attention(True)
    return m


def _bf16_loss_grads(m: DiT, x, t, y):
    m.zero_grad()
    torch.manual_seed(0)  # the same label dropout
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x, t, y)
    out.float().square().mean().backward()
    return out, {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


def test_compute_weights_change_nothing_but_where_the_cast_comes_from():
    """DiT.set_compute_weights(bf16): the fused training path reads bf16 copies of the blocks' weights instead of
    casting them, with the same output and the same fp32 gradients (bit for bit); the copies are not in the state
    dict, follow load_state_dict, are not carried into an EMA copy, and go with set_compute_weights(None). A stale
    copy is what the GEMMs read (so the optimizer must write them: dit.optim.AdamWEMA.keep_compute_copies)."""
    from dit.utils.ema import EMA

    ref, m = _tiny_fused_dit(), _tiny_fused_dit()
    pairs = m.set_compute_weights(torch.bfloat16)
    assert len(pairs) == 2 * 5 and all(c.dtype == torch.bfloat16 and torch.equal(c, w.bfloat16()) for w, c in pairs)
    assert list(m.state_dict()) == list(ref.state_dict())
    g = torch.Generator().manual_seed(1)
    x, t, y = torch.randn(3, 4, 8, 8, generator=g), torch.randint(0, 1000, (3,), generator=g), torch.tensor([1, 2, 3])
    o_ref, g_ref = _bf16_loss_grads(ref, x, t, y)
    o, grads = _bf16_loss_grads(m, x, t, y)
    assert torch.equal(o, o_ref) and grads.keys() == g_ref.keys()
    assert all(grads[k].dtype == torch.float32 and torch.equal(grads[k], g_ref[k]) for k in grads)
    # the copies are what the GEMMs read: a stale one changes the output, load_state_dict refreshes them
    with torch.no_grad():
        m.blocks[0].mlp.fc1.weight.add_(1.0)
    assert torch.equal(_bf16_loss_grads(m, x, t, y)[0], o_ref)
    m.load_state_dict(m.state_dict())
    assert not torch.equal(_bf16_loss_grads(m, x, t, y)[0], o_ref)
    assert torch.equal(m.blocks[0].mlp.fc1.weight_c, m.blocks[0].mlp.fc1.weight.bfloat16())
    assert not any("weight_c" in n for n, _ in EMA(m, 0.9).module.named_buffers())
    torch.save(m, io.BytesIO())  # the load hook keeps the model picklable
    assert m.set_compute_weights(None) == [] and not any("weight_c" in n for n, _ in m.named_buffers())


def test_weight_grad_cpu_paths():
    """kernels.weight_grad off CUDA: dy^T x in the operands' dtype when the weight has it, else the product cast to
    the weight's dtype (the bf16 product rounded once, as autograd's cast did)."""
    from dit.models.kernels import weight_grad

    g = torch.Generator().manual_seed(0)
    dy, x = torch.randn(32, 6, generator=g, dtype=torch.float64), torch.randn(32, 5, generator=g, dtype=torch.float64)
    out = weight_grad(dy, x, torch.float64)
    assert out.shape == (6, 5) and out.dtype == torch.float64
    torch.testing.assert_close(out, torch.einsum("mn,mk->nk", dy, x), rtol=1e-12, atol=1e-12)
    b_dy, b_x = dy.bfloat16(), x.bfloat16()
    out = weight_grad(b_dy, b_x, torch.float32)
    assert out.dtype == torch.float32
    assert torch.equal(out, (b_dy.t() @ b_x).float())
    torch.testing.assert_close(out, (b_dy.double().t() @ b_x.double()).float(), rtol=1e-2, atol=1e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_weight_gradients_are_written_in_fp32_by_the_gemm():
    """kernels.weight_grad on CUDA: bf16 operands, fp32 weight -> one GEMM with an fp32 output, equal to the exact
    (float64) product of the bf16 operands to fp32 rounding, where the bf16 product autocast used to cast is off by
    bf16 rounding."""
    from dit.models.kernels import weight_grad

    g = torch.Generator(device="cuda").manual_seed(0)
    dy = torch.randn(4096, 384, device="cuda", generator=g).bfloat16()
    x = torch.randn(4096, 1536, device="cuda", generator=g).bfloat16()
    exact = dy.double().t() @ x.double()
    ours = weight_grad(dy, x, torch.float32)
    rel = lambda a: ((a.double() - exact).norm() / exact.norm()).item()  # noqa: E731
    assert ours.dtype == torch.float32 and rel(ours) < 1e-5 < rel((dy.t() @ x).float())
