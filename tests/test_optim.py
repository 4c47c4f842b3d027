"""The one-pass AdamW + EMA step (dit.optim.AdamWEMA) against torch.optim.AdamW followed by a lerp.

The Triton kernel runs here in Triton's CPU interpreter (``TRITON_INTERPRET=1``, set before Triton is imported, so
in a subprocess); scripts/check_adamw_ema.py checks the compiled kernel on a GPU against torch's fused AdamW.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from dit.optim import AdamWEMA

ROOT = Path(__file__).resolve().parents[1]

# Parameter shapes: aligned sizes (the kernel's vectorised path) and odd ones (masking), one tensor over several
# blocks, and a frozen one without a gradient.
CASE = textwrap.dedent("""
    import copy

    import torch
    from dit.optim import AdamWEMA

    SHAPES = [(37, 5), (3000,), (64, 8), (12,)]

    def make():
        torch.manual_seed(0)
        return [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]

    def run(fused_kernel, steps=6, force=True):
        params = make()
        ema = [p.detach().clone() * 0.5 for p in params]
        opt = torch.optim.AdamW(params, lr=3e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1, foreach=False)
        step = AdamWEMA(opt, ema, block=256, force_triton=force) if fused_kernel else None
        for k in range(steps):
            g = torch.Generator().manual_seed(100 + k)
            for i, p in enumerate(params):
                p.grad = None if (i == 1 and k == 2) or i == 3 else torch.randn(p.shape, generator=g)
            skip = k == 3
            scale = torch.tensor(1.0 + k)  # a gradient-clipping factor, as clip_in_fused_step sets it
            w = 0.9 if k == 0 else 0.01  # both forms of torch.lerp
            if step is not None:
                assert step.fused, step.reason
                opt.grad_scale, opt.found_inf = scale, torch.tensor(float(skip))
                step.step(w)
            elif not skip:  # the reference: unscale, torch's AdamW, then the EMA lerp
                for p in params:
                    if p.grad is not None:
                        p.grad /= scale
                opt.step()
                torch._foreach_lerp_(ema, [p.detach() for p in params], w)
        return params, ema, opt
""")


def _run_interpreted(body: str) -> str:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", CASE + textwrap.dedent(body)], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")


@needs_triton
def test_kernel_matches_torch_adamw_then_lerp_in_the_triton_interpreter():
    out = _run_interpreted("""
        ref, mine = run(False), run(True)
        for name, a, b in [("param", ref[0], mine[0]), ("ema", ref[1], mine[1])]:
            for i, (x, y) in enumerate(zip(a, b)):
                err = ((x - y).abs().max() / x.abs().max()).item()
                assert err < 2e-6, (name, i, err)
        for i, (p, q) in enumerate(zip(ref[0], mine[0])):
            s_ref, s_mine = ref[2].state.get(p, {}), mine[2].state[q]
            if i == 3:  # never had a gradient: moments untouched, no step counted
                assert s_mine["step"].item() == 0 and s_mine["exp_avg"].abs().max() == 0, i
                assert not s_ref
                continue
            # 6 steps, one skipped; tensor 1 had no gradient once
            assert s_mine["step"].item() == s_ref["step"].item() == (4 if i == 1 else 5), i
            for k in ("exp_avg", "exp_avg_sq"):
                err = ((s_ref[k] - s_mine[k]).abs().max() / s_ref[k].abs().max()).item()
                assert err < 2e-6, (i, k, err)
        # the frozen tensor's EMA moved towards it anyway (the trainer's EMA covers every parameter)
        assert not torch.equal(mine[1][3], mine[0][3].detach() * 0.5)
        print("ok")
    """)
    assert out.strip().endswith("ok")


@needs_triton
def test_first_updates_match_torch_adamw_to_float32_rounding():
    """DiT's betas (0.9, 0.999) from zero weights, so the weights hold the updates (of about lr) to float32's
    rounding: the bias corrections' cancellation (1 - 0.999^t) must not show. Run 27: with float64 bias corrections of
    the exact 0.999 beside float32 moments of 0.99900001, the first update was 7e-6 lr off; with float32's exp2 on a
    GPU, up to 1e-4."""
    out = _run_interpreted("""
        runs = []
        for fused_kernel in (False, True):
            params = [torch.nn.Parameter(torch.zeros(3000))]
            opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, foreach=False)
            step = AdamWEMA(opt, None, block=256, force_triton=True) if fused_kernel else None
            trace = []
            for k in range(3):
                params[0].grad = torch.randn(3000, generator=torch.Generator().manual_seed(k))
                step.step() if step is not None else opt.step()
                trace.append(params[0].detach().clone())
            runs.append(trace)
        for k, (ref, mine) in enumerate(zip(*runs)):
            err = (mine - ref).abs().max().item() / 1e-3  # in units of lr, the size of one update
            assert err < 1e-6, (k, err)
        print("ok")
    """)
    assert out.strip().endswith("ok")


@needs_triton
def test_kernel_state_is_torch_adamws_and_a_skipped_step_changes_nothing():
    out = _run_interpreted("""
        params, ema, opt = run(True, steps=3)
        # a plain AdamW loads the state and continues exactly as the kernel does
        plain = make()
        for p, q in zip(plain, params):
            p.data.copy_(q.detach())
        plain_opt = torch.optim.AdamW(plain, lr=3e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1, foreach=False)
        plain_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # load_state_dict would share the tensors
        step = AdamWEMA(opt, ema, block=256, force_triton=True)
        before = [p.detach().clone() for p in params] + [e.clone() for e in ema]
        moments = [t.clone() for s in opt.state.values() for t in (s["exp_avg"], s["exp_avg_sq"], s["step"])]
        for p in params:
            p.grad = torch.full_like(p, float("nan"))
        opt.found_inf, opt.grad_scale = torch.tensor(1.0), None
        step.step(0.5)  # skipped: nothing moves, not even the step counters
        after = [p.detach() for p in params] + ema
        assert all(torch.equal(a, b) for a, b in zip(before, after))
        assert all(torch.equal(a, b) for a, b in zip(moments,
                   [t for s in opt.state.values() for t in (s["exp_avg"], s["exp_avg_sq"], s["step"])]))
        g = [torch.randn(p.shape, generator=torch.Generator().manual_seed(7)) for p in params]
        for p, q, gi in zip(params, plain, g):
            p.grad, q.grad = gi.clone(), gi.clone()
        opt.found_inf = None
        step.step(0.0)
        plain_opt.step()
        for p, q in zip(params, plain):
            assert ((p - q).abs().max() / q.abs().max()).item() < 2e-6
        print("ok")
    """)
    assert out.strip().endswith("ok")


@needs_triton
def test_kernel_gives_the_gradient_norm_and_guards_non_finite_elements():
    """launch(grad_norm=True): the global L2 norm of the gradients from the update's own pass, the update unchanged;
    an element with a non-finite gradient keeps its weight, moments and EMA while the rest update, and the norm is
    then non-finite; found_inf still skips everything (norm 0); with a grad_scale it refuses."""
    out = _run_interpreted("""
        params, ema, opt = run(True, steps=2)
        ref_params, ref_ema, ref_opt = copy.deepcopy((params, ema, opt))
        step = AdamWEMA(opt, ema, block=256, force_triton=True)
        ref_step = AdamWEMA(ref_opt, ref_ema, block=256, force_triton=True)
        opt.found_inf = opt.grad_scale = ref_opt.found_inf = ref_opt.grad_scale = None
        g = [torch.randn(p.shape, generator=torch.Generator().manual_seed(9)) if i != 3 else None
             for i, p in enumerate(params)]
        for p, q, gi in zip(params, ref_params, g):
            p.grad, q.grad = (None, None) if gi is None else (gi.clone(), gi.clone())
        for s in (step, ref_step):
            s.set_hyperparameters(0.25)
        norm = step.launch(grad_norm=True)
        assert ref_step.launch() is None
        want = torch.linalg.vector_norm(torch.cat([x.flatten() for x in g if x is not None]))
        assert abs(norm.item() - want.item()) < 1e-5 * want.item(), (norm, want)
        for a, b in zip(params + ema, ref_params + ref_ema):
            assert torch.equal(a.detach(), b.detach())
        # one non-finite element in tensor 2, one inf in tensor 0
        before = copy.deepcopy((params, ema, opt.state_dict()))
        for p, q, gi in zip(params, ref_params, g):
            p.grad, q.grad = (None, None) if gi is None else (gi.clone(), gi.clone())
        params[2].grad[5, 3] = float("nan")
        params[0].grad[0, 0] = float("inf")
        norm = step.launch(grad_norm=True)
        ref_step.launch()
        assert not torch.isfinite(norm)
        state, ref_state = opt.state_dict()["state"], ref_opt.state_dict()["state"]
        old_params, old_ema, old_state = before
        for i, (a, b, e, re) in enumerate(zip(params, ref_params, ema, ref_ema)):
            guarded = {0: (0, 0), 2: (5, 3)}.get(i)
            mask = torch.zeros(a.shape, dtype=torch.bool)
            if guarded:
                mask[guarded] = True
                assert a[guarded] == old_params[i][guarded] and e[guarded] == old_ema[i][guarded], i
                for k in ("exp_avg", "exp_avg_sq"):
                    assert state[i][k][guarded] == old_state["state"][i][k][guarded], (i, k)
            assert torch.equal(a.detach()[~mask], b.detach()[~mask]) and torch.equal(e[~mask], re[~mask]), i
        # a skipped step: nothing moves, the norm is 0
        frozen = [p.detach().clone() for p in params] + [e.clone() for e in ema]
        opt.found_inf = torch.tensor(1.0)
        assert step.launch(grad_norm=True).item() == 0.0
        assert all(torch.equal(a, b) for a, b in zip(frozen, [p.detach() for p in params] + ema))
        opt.found_inf, opt.grad_scale = None, torch.tensor(2.0)
        try:
            step.launch(grad_norm=True)
        except ValueError as exc:
            assert "grad_scale" in str(exc)
        else:
            raise AssertionError("grad_norm with a grad_scale was accepted")
        print("ok")
    """)
    assert out.strip().endswith("ok")


@needs_triton
def test_a_capped_grid_gives_the_uncapped_update_and_norm_bit_for_bit():
    """launch_bucket(max_ctas=k): k thread blocks looping over the 16 blocks of the update (the persistent form that
    UpdateDuringBackward can use) write exactly what one thread block per block writes: weights, moments, EMA and
    the norm's partial sums, with and without a gradient scale, and found_inf still skips everything."""
    out = _run_interpreted("""
        params, ema, opt = run(True, steps=2)
        runs = {}
        for ctas in (None, 3, 1):
            p2, e2, o2 = copy.deepcopy((params, ema, opt))
            step = AdamWEMA(o2, e2, block=256, force_triton=True)
            norms = []
            for k in range(4):
                g = torch.Generator().manual_seed(50 + k)
                for i, p in enumerate(p2):
                    p.grad = None if i == 3 else torch.randn(p.shape, generator=g)
                o2.found_inf = torch.tensor(float(k == 2))
                o2.grad_scale = torch.tensor(2.0) if k == 3 else None
                step.set_hyperparameters(0.1)
                step.launch_bucket(0, grad_norm=k < 3, max_ctas=ctas)
                if k < 3:
                    norms.append(step.grad_norm())
                    assert ctas is not None or step._norm_partials.numel() == 16
            runs[ctas] = ([p.detach() for p in p2] + e2, o2.state_dict()["state"], torch.stack(norms))
        ref = runs[None]
        assert ref[2][2] == 0.0 and ref[2][0] > 0  # the skipped step's norm; a real one
        for ctas in (3, 1):
            got = runs[ctas]
            assert all(torch.equal(a, b) for a, b in zip(ref[0], got[0])), ctas
            assert all(torch.equal(ref[1][i][k], got[1][i][k]) for i in ref[1] for k in ref[1][i]), ctas
            assert torch.equal(ref[2], got[2]), (ctas, ref[2], got[2])
        print("ok")
    """)
    assert out.strip().endswith("ok")


@needs_triton
def test_kernel_resumes_from_a_saved_state_exactly():
    """3 steps, the state saved (as the trainer's checkpoint holds it) and loaded into a fresh AdamW + AdamWEMA,
    then 3 more steps == 6 steps uninterrupted, bit for bit."""
    out = _run_interpreted("""
        import io
        full_p, full_e, _ = run(True, steps=6)

        params, ema, opt = run(True, steps=3)
        buf = io.BytesIO()
        torch.save({"p": [p.detach() for p in params], "e": ema, "opt": opt.state_dict()}, buf)
        buf.seek(0)
        saved = torch.load(buf)
        params = [torch.nn.Parameter(p.clone()) for p in saved["p"]]
        ema = [e.clone() for e in saved["e"]]
        opt = torch.optim.AdamW(params, lr=3e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1, foreach=False)
        opt.load_state_dict(saved["opt"])
        step = AdamWEMA(opt, ema, block=256, force_triton=True)
        for k in range(3, 6):  # the same draws as run()'s steps 3..5
            g = torch.Generator().manual_seed(100 + k)
            for i, p in enumerate(params):
                p.grad = None if i == 3 else torch.randn(p.shape, generator=g)
            opt.grad_scale, opt.found_inf = torch.tensor(1.0 + k), torch.tensor(float(k == 3))
            step.step(0.01)
        assert all(torch.equal(a, b) for a, b in zip(params, full_p))
        assert all(torch.equal(a, b) for a, b in zip(ema, full_e))
        print("ok")
    """)
    assert out.strip().endswith("ok")


@needs_triton
def test_kernel_writes_the_compute_copies_of_the_new_weights():
    """keep_compute_copies: after each update the kernel writes each chosen parameter, rounded to bf16 (fp16), into
    its copy (what DiT.set_compute_weights' layers compute with): equal to casting the new weights, untouched by a
    skipped step and for parameters without a copy; the updates themselves are unchanged. Bad pairs are refused."""
    out = _run_interpreted("""
        for dtype in (torch.bfloat16, torch.float16):
            ref = run(True, steps=3)[0]
            params = make()
            ema = [p.detach().clone() * 0.5 for p in params]
            opt = torch.optim.AdamW(params, lr=3e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1, foreach=False)
            step = AdamWEMA(opt, ema, block=256, force_triton=True)
            copies = [torch.full(p.shape, 7.0, dtype=dtype) for p in params[:3]]  # the last parameter: no copy
            step.keep_compute_copies(list(zip(params[:3], copies)))
            for k in range(3):
                g = torch.Generator().manual_seed(100 + k)
                for i, p in enumerate(params):
                    p.grad = None if (i == 1 and k == 2) or i == 3 else torch.randn(p.shape, generator=g)
                opt.grad_scale, opt.found_inf = torch.tensor(1.0 + k), torch.tensor(0.0)
                step.step(0.9 if k == 0 else 0.01)
                for i, (p, c) in enumerate(zip(params, copies)):
                    # within one unit in the last place of the new weight (the interpreter rounds bf16 towards
                    # zero, a GPU to nearest: tests/test_optim.py's GPU case checks equality with torch's cast);
                    # near zero the unit is the subnormals' spacing (fp16: 6e-8)
                    fi = torch.finfo(dtype)
                    err = (c.float() - p.detach()).abs() - (p.detach().abs() * fi.eps).clamp_min(fi.tiny * fi.eps)
                    assert err.max() <= 0, (dtype, k, i, err.max())
            for p, q in zip(params, ref):
                assert torch.equal(p, q)  # the copies change nothing else
            before = [c.clone() for c in copies]
            opt.found_inf = torch.tensor(1.0)
            for p in params:
                p.grad = torch.ones_like(p)
            step.step(0.5)  # skipped: the copies stay
            assert all(torch.equal(a, b) for a, b in zip(before, copies))
        print("ok")
    """)
    assert out.strip().endswith("ok")
    params = _tiny()
    step = AdamWEMA(torch.optim.AdamW(params, lr=0.1, fused=True))
    with pytest.raises(ValueError, match="must all be bf16 or all fp16"):
        step.keep_compute_copies([(params[0], params[0].detach().bfloat16()), (params[1], params[1].detach().half())])
    with pytest.raises(ValueError, match=r"copy 0 is \(3, 5\) on cpu, expected a contiguous tensor of shape \(5, 3\)"):
        step.keep_compute_copies([(params[0], params[0].detach().bfloat16().t())])
    with pytest.raises(ValueError, match="pair 0 names a tensor the optimizer does not update"):
        step.keep_compute_copies([(torch.zeros(2), torch.zeros(2, dtype=torch.bfloat16))])
    # the fallback (CPU: torch's step) copies after the step
    copy = torch.zeros(5, 3, dtype=torch.bfloat16)
    step.keep_compute_copies([(params[0], copy)])
    for p in params:
        p.grad = torch.ones_like(p)
    step.step()
    assert torch.equal(copy, params[0].detach().bfloat16())


def _tiny(seed=0):
    torch.manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]


def test_fallback_is_the_optimizer_step_then_a_lerp_and_skips_without_a_host_sync():
    params, ref = _tiny(), _tiny()
    ema, ema_ref = [p.detach().clone() for p in params], [p.detach().clone() for p in ref]
    opt = torch.optim.AdamW(params, lr=0.1, fused=True)
    opt_ref = torch.optim.AdamW(ref, lr=0.1, fused=True)
    step = AdamWEMA(opt, ema)
    assert not step.fused and step.reason  # CPU tensors (or no Triton)
    for k, skip in enumerate([0.0, 1.0, 0.0]):
        for p, q in zip(params, ref):
            p.grad = torch.full_like(p, 0.5 + k)
            q.grad = p.grad.clone()
        opt.found_inf = torch.tensor(skip)
        step.step(0.25)
        if not skip:
            opt_ref.step()
            torch._foreach_lerp_(ema_ref, [q.detach() for q in ref], 0.25)
        assert all(torch.equal(a, b) for a, b in zip(params + ema, ref + ema_ref)), k
    assert opt.state[params[0]]["step"].item() == 2
    plain = AdamWEMA(torch.optim.AdamW(_tiny(), lr=0.1, foreach=True), [p.detach().clone() for p in _tiny()])
    plain.optimizer.found_inf = torch.tensor(0.0)
    with pytest.raises(ValueError, match="read by torch's fused AdamW only"):
        plain.step(0.25)  # an unfused AdamW would ignore found_inf and step anyway


def test_unsupported_settings_are_named_and_bad_ema_lists_rejected():
    params = _tiny()
    assert "amsgrad" in AdamWEMA(torch.optim.AdamW(params, amsgrad=True), force_triton=True).reason
    assert "not torch.optim.AdamW" in AdamWEMA(torch.optim.Adam(params), force_triton=True).reason
    with pytest.raises(ValueError, match="1 EMA tensors for 2 parameters"):
        AdamWEMA(torch.optim.AdamW(params), [params[0].detach()])
    with pytest.raises(ValueError, match=r"EMA tensor 1 has shape \(3,\), its parameter \(7,\)"):
        AdamWEMA(torch.optim.AdamW(params), [params[0].detach(), torch.zeros(3)])


@needs_triton
def test_hyperparameters_come_from_the_device_and_follow_a_schedule():
    """set_hyperparameters + launch (what a CUDA graph of the training step replays, dit.utils.cuda_graph) follows a
    learning rate and an EMA weight that change every step: equal to torch's AdamW + lerp with the same schedule, and
    launch before any set_hyperparameters is refused."""
    out = _run_interpreted("""
        def sched(split):
            params = make()
            ema = [p.detach().clone() for p in params]
            opt = torch.optim.AdamW(params, lr=1.0, weight_decay=0.1, foreach=False)
            kernel = AdamWEMA(opt, ema, block=256, force_triton=True) if split is not None else None
            if split:
                try:
                    kernel.launch()
                except RuntimeError as e:
                    print("refused:", e)
            for k in range(4):
                for i, p in enumerate(params):
                    p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(10 * k + i))
                opt.param_groups[0]["lr"] = 1e-2 / (1 + k)
                w = 0.5 / (1 + k)
                if kernel is None:
                    opt.step()
                    torch._foreach_lerp_(ema, [p.detach() for p in params], w)
                elif split:
                    kernel.set_hyperparameters(w)
                    kernel.launch()
                else:
                    kernel.step(w)
            return params, ema
        (pa, ea), (pb, eb), (pr, er) = sched(True), sched(False), sched(None)
        print("split==step", all(torch.equal(a, b) for a, b in zip(pa + ea, pb + eb)))
        print("vs torch", max(((a - r).abs().max() / r.abs().max()).item() for a, r in zip(pa + ea, pr + er)))
    """)
    assert "refused: AdamWEMA.launch: call set_hyperparameters first" in out
    assert "split==step True" in out
    assert float(out.split("vs torch")[1]) < 1e-6


@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_kernel_compute_copies_equal_torchs_cast():
    """On a GPU the kernel rounds the new weights to nearest, as ``tensor.to(bf16)`` does: the copies equal that
    cast bit for bit, for aligned and odd sizes."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in [(64, 48), (37, 5), (3001,)]]
    opt = torch.optim.AdamW(params, lr=1e-2, fused=True)
    step = AdamWEMA(opt)
    assert step.fused, step.reason
    copies = [torch.zeros_like(p, dtype=torch.bfloat16) for p in params]
    step.keep_compute_copies(list(zip(params, copies)))
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        step.step()
        assert all(torch.equal(c, p.detach().bfloat16()) for p, c in zip(params, copies))


@needs_triton
def test_update_during_the_backward_equals_the_update_after_it():
    """UpdateDuringBackward: each bucket (update_buckets: one per block, per other child module, and the model's own
    parameters) is launched while the backward runs, as soon as its last gradient is accumulated, the blocks from
    the last to the first; a bucket without gradients at finish(); a frozen parameter in a bucket with others, left
    as it was. Three steps give the weights, moments and EMA of AdamWEMA.launch after the backward bit for bit,
    across two parameter groups, and the same gradient norm; so do launches capped at one thread block
    (max_ctas=1)."""
    out = _run_interpreted("""
        from torch import nn
        from dit.optim import UpdateDuringBackward, update_buckets

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.embed = nn.Linear(6, 8)
                self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.GELU()) for _ in range(3))
                self.head = nn.Linear(8, 3)
                self.unused = nn.Linear(2, 2)  # never gets a gradient
                self.scale = nn.Parameter(torch.ones(3))
                # frozen, as the DiT's pos_embed: the optimizer's, but no gradient and no hook
                self.pos = nn.Parameter(torch.linspace(-1, 1, 8), requires_grad=False)

            def forward(self, x):
                h = self.embed(x) + self.pos
                for b in self.blocks:
                    h = h + b(h)
                return self.head(h) * self.scale

        def train(during, steps=3, ctas=None):
            torch.manual_seed(0)
            net = Net()
            params = list(net.parameters())
            groups = [{"params": [p for p in params if p.ndim == 2]},
                      {"params": [p for p in params if p.ndim == 1], "weight_decay": 0.0}]
            opt = torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.1, foreach=False)
            ema = [p.detach().clone() for g in groups for p in g["params"]]
            step = AdamWEMA(opt, ema, block=32, force_triton=True)
            buckets = update_buckets(net, params)
            owner = {id(p): n.split(".")[0] + (n.split(".")[1] if n.startswith("blocks") else "")
                     for n, p in net.named_parameters()}
            assert [sorted({owner[id(p)] for p in b}) for b in buckets] == [
                ["embed"], ["blocks0"], ["blocks1"], ["blocks2"], ["head"], ["unused"], ["pos", "scale"]], buckets
            log, norms = [], []
            if during:
                upd = UpdateDuringBackward(step, buckets, max_ctas=ctas)
                launch = step.launch_bucket
                step.launch_bucket = lambda b, grad_norm=False, max_ctas=None: (
                    log.append((b, phase[0], max_ctas)), launch(b, grad_norm, max_ctas))
            for k in range(steps):
                x = torch.randn(5, 6, generator=torch.Generator().manual_seed(k))
                step.set_hyperparameters(0.1)
                opt.found_inf = torch.tensor(0.0)
                loss = net(x).square().mean()
                if during:
                    upd.arm()
                    phase = ["backward"]
                    loss.backward()
                    phase = ["finish"]
                    norms.append(upd.finish())
                else:
                    loss.backward()
                    norms.append(step.launch(grad_norm=True))
                opt.zero_grad(set_to_none=True)
            assert torch.equal(net.pos, torch.linspace(-1, 1, 8))  # frozen: no gradient, no update
            if during:
                upd.remove()
                # the blocks from the last to the first while the backward runs; the gradient-less bucket at finish
                order = [b for b, ph, _ in log[:7] if ph == "backward"]
                assert order[:5] == [6, 4, 3, 2, 1] and set(order) == {0, 1, 2, 3, 4, 6}, log[:7]
                assert log[6] == (5, "finish", ctas) and {c for *_, c in log} == {ctas}, log
            return [p.detach() for p in params], ema, opt.state_dict()["state"], torch.stack(norms)

        a = train(False)
        for b in (train(True), train(True, ctas=1)):  # ctas=1: one looping thread block per launch
            assert all(torch.equal(x, y) for x, y in zip(a[0] + a[1], b[0] + b[1]))
            assert all(torch.equal(a[2][i][k], b[2][i][k]) for i in a[2] for k in a[2][i])
            assert torch.allclose(a[3], b[3], rtol=1e-6, atol=0), (a[3], b[3])
        print("ok")
    """)
    assert out.strip().endswith("ok")


def test_update_buckets_must_cover_every_parameter_once():
    params = [torch.nn.Parameter(torch.zeros(4)) for _ in range(3)]
    step = AdamWEMA(torch.optim.AdamW(params), force_triton=True)
    with pytest.raises(ValueError, match="bucket 1 is in an earlier bucket"):
        step.set_buckets([[params[0], params[1]], [params[1], params[2]]])
    with pytest.raises(ValueError, match="hold 2 of the optimizer's 3 parameters"):
        step.set_buckets([[params[0]], [params[2]]])
    with pytest.raises(ValueError, match="bucket 0 names a tensor the optimizer does not update"):
        step.set_buckets([[torch.zeros(2)] + params])
