"""GPU check of the fused kernels (dit.models.kernels): correctness against their PyTorch references, the DiT-XL/2
fused FP8 path against the plain one and fp32, the training backward kernel at DiT-XL/2's and DiT-S/2's training
shapes, and each kernel's time against what Inductor generates from the same code (inference kernels at DiT-XL/2's
sampling shape, 512 rows x 256 tokens).

    python scripts/check_kernels.py                    # CUDA only; about 2 minutes on an H100
    python scripts/check_kernels.py --parts backward   # one part: ops, model, text, backward, qkv, time
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from dit.benchmark import _calibration_passes, _randomise_zero_init, time_fn
from dit.models import create_model
from dit.models import kernels as K
from dit.models.fp8 import E4M3, calibrate_float8, convert_to_float8
from dit.models.layers import modulate


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def mismatch(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fraction of E4M3 codes that differ (nan for other dtypes)."""
    return (a.view(torch.uint8) != b.view(torch.uint8)).float().mean().item() if a.dtype == E4M3 else float("nan")


def check_ops(dev: torch.device, g: torch.Generator) -> None:
    """CUDA kernels vs the CPU reference implementations, at DiT widths and at odd sizes (masking)."""
    for n, t, d in [(4, 256, 1152), (8, 256, 384), (3, 17, 72), (2, 64, 768)]:
        x = torch.randn(n, t, d, device=dev, generator=g) * 2 + 0.3
        o = torch.randn(n, t, d, device=dev, generator=g).bfloat16()
        mod = (torch.randn(n, 6 * d, device=dev, generator=g) * 0.5).bfloat16()
        sh, sc, ga = mod[:, :d], mod[:, d:2 * d], mod[:, 2 * d:3 * d]
        if d == 72:  # an affine LayerNorm's (D,) parameters shared by all images: stride-0 rows (text blocks)
            sh, sc = sh[0].expand(n, d), sc[0].expand(n, d)
        cpu = [v.cpu() for v in (x, o, ga, sh, sc)]
        for out_scale, out_dtype in [(None, torch.bfloat16), (None, torch.float32), (20.0, E4M3)]:
            y = K.layernorm_modulate(x, sh, sc, 1e-6, out_scale, out_dtype)
            yr = K.layernorm_modulate(cpu[0], cpu[3], cpu[4], 1e-6, out_scale, out_dtype).to(dev)
            x2, y2 = K.add_layernorm_modulate(x, o, ga, sh, sc, 1e-6, out_scale, out_dtype)
            x2r, y2r = (v.to(dev) for v in K.add_layernorm_modulate(*cpu, 1e-6, out_scale, out_dtype))
            print(f"[check] ln-modulate {n}x{t}x{d} -> {out_dtype}: rel {rel(y.float(), yr.float()):.1e}, E4M3 codes "
                  f"differing {mismatch(y, yr):.1e}; with residual: x' {rel(x2, x2r):.1e}, y "
                  f"{rel(y2.float(), y2r.float()):.1e}, codes differing {mismatch(y2, y2r):.1e}", flush=True)
        bias = torch.randn(d, device=dev, generator=g)  # o's linear layer's fp32 bias, added here (training)
        x2, y2 = K.add_layernorm_modulate(x, o, ga, sh, sc, 1e-6, None, torch.bfloat16, bias)
        x2r, y2r = (v.to(dev) for v in K.add_layernorm_modulate(*cpu, 1e-6, None, torch.bfloat16, bias.cpu()))
        print(f"[check] add-ln-modulate with o's bias {n}x{t}x{d}: x' {rel(x2, x2r):.1e}, y "
              f"{rel(y2.float(), y2r.float()):.1e}", flush=True)
        h = (torch.randn(n * t, 4 * d, device=dev, generator=g) * 2).bfloat16()
        y8, y8r = K.gelu_tanh_fp8(h, 30.0), K.gelu_tanh_fp8(h.cpu(), 30.0).to(dev)
        print(f"[check] gelu-fp8 {n * t}x{4 * d}: E4M3 codes differing {mismatch(y8, y8r):.1e}", flush=True)


def check_model(dev: torch.device, g: torch.Generator) -> None:
    """DiT-XL/2 (randomised weights): fused FP8 inference vs the plain FP8 forward vs fp32, eager and compiled."""
    torch.backends.cuda.matmul.allow_tf32 = False
    m = create_model("DiT-XL/2")
    _randomise_zero_init(m)
    m = m.to(dev).eval()
    x = torch.randn(32, 4, 32, 32, device=dev, generator=g)
    t = torch.randint(0, 1000, (32,), device=dev, generator=g)
    y = torch.randint(0, 1001, (32,), device=dev, generator=g)
    with torch.no_grad():
        ref = m(x, t, y).float()
        with torch.autocast("cuda", torch.bfloat16):
            print(f"[check] DiT-XL/2 bf16 vs fp32: {rel(m(x, t, y).float(), ref):.2e}", flush=True)
        convert_to_float8(m)
        calibrate_float8(m, lambda: _calibration_passes(m, dev))
        out = {}
        for fused in (False, True):
            m.fused_inference = fused
            with torch.autocast("cuda", torch.bfloat16):
                out[fused] = m(x, t, y).float()
        compiled = torch.compile(m, mode="reduce-overhead", dynamic=False)
        with torch.autocast("cuda", torch.bfloat16):
            for _ in range(3):
                oc = compiled(x, t, y).float()
    print(f"[check] DiT-XL/2 FP8 vs fp32: plain {rel(out[False], ref):.2e}, fused {rel(out[True], ref):.2e}, "
          f"fused compiled {rel(oc, ref):.2e}; fused vs plain {rel(out[True], out[False]):.2e}", flush=True)


def _ms_per_call(fn, dev: torch.device, calls: int = 10) -> float:
    """GPU ms per call of ``fn``, ``calls`` back to back per timed interval: the queue stays full, so the host's
    dispatch and launch cost (which CUDA graphs remove in the sampler) is not counted."""
    return time_fn(lambda: [fn() for _ in range(calls)], dev, warmup=2, iters=10) * 1e3 / calls


def check_text_model(dev: torch.device, g: torch.Generator) -> None:
    """A text DiT (cross-attention blocks): fused FP8 inference vs the plain FP8 forward vs fp32."""
    m = create_model("DiT-B/2-T")
    _randomise_zero_init(m)
    m = m.to(dev).eval()
    x = torch.randn(16, 4, 32, 32, device=dev, generator=g)
    t = torch.randint(0, 1000, (16,), device=dev, generator=g)
    ctx = torch.randn(16, 12, 384, device=dev, generator=g)
    mask = torch.arange(12, device=dev)[None] < torch.randint(1, 13, (16, 1), device=dev, generator=g)
    kw = dict(context=ctx, context_mask=mask)
    with torch.no_grad():
        ref = m(x, t, **kw).float()
        convert_to_float8(m)
        with torch.autocast("cuda", torch.bfloat16):
            calibrate_float8(m, lambda: m(x, t, **kw))
            out = {}
            for fused in (False, True):
                m.fused_inference = fused
                out[fused] = m(x, t, **kw).float()
    print(f"[check] DiT-B/2-T FP8 vs fp32: plain {rel(out[False], ref):.2e}, fused {rel(out[True], ref):.2e}; "
          f"fused vs plain {rel(out[True], out[False]):.2e}", flush=True)


def time_kernels(dev: torch.device) -> None:
    """Each kernel vs Inductor's code for the same computation, written as the model writes it."""
    n, t, d = 512, 256, 1152
    h = (torch.randn(n * t, 4 * d, device=dev) * 1.5).bfloat16()
    s = 448.0 / 6.0
    inductor_gelu = torch.compile(lambda h: (F.gelu(h, approximate="tanh").float() * s).clamp(-448, 448).to(E4M3))
    gb = h.numel() * 3 / 1e9  # bf16 in, E4M3 out
    with torch.no_grad():
        for name, fn in (("inductor", lambda: inductor_gelu(h)), ("dit.models.kernels", lambda: K.gelu_tanh_fp8(h, s))):
            ms = _ms_per_call(fn, dev)
            print(f"[time] GELU + E4M3 cast, {n * t}x{4 * d}, {name}: {ms:.3f} ms ({gb / ms:.2f} TB/s)", flush=True)
        del h
        x = torch.randn(n, t, d, device=dev) * 2 + 0.5
        o = torch.randn(n, t, d, device=dev).bfloat16()
        mod = (torch.randn(n, 6 * d, device=dev) * 0.5).bfloat16()
        sh, sc, ga = mod[:, :d], mod[:, d:2 * d], mod[:, 2 * d:3 * d]
        for out_scale, out_dtype in ((20.0, E4M3), (None, torch.bfloat16)):

            def plain(x, o, sh, sc, ga):
                x = x + ga.unsqueeze(1) * o
                yy = modulate(F.layer_norm(x, (d,), eps=1e-6), sh, sc)
                if out_dtype == E4M3:
                    return x, (yy.float() * out_scale).clamp(-448, 448).to(E4M3)
                return x, yy.to(out_dtype)

            inductor_ln = torch.compile(plain)
            gb = x.numel() * (4 + 2 + 4 + out_dtype.itemsize) / 1e9  # fp32 stream in/out, bf16 o, y out
            for name, fn in (("inductor", lambda: inductor_ln(x, o, sh, sc, ga)),
                             ("dit.models.kernels",
                              lambda: K.add_layernorm_modulate(x, o, ga, sh, sc, 1e-6, out_scale, out_dtype))):
                ms = _ms_per_call(fn, dev)
                print(f"[time] residual + LayerNorm + modulate -> {out_dtype}, {n}x{t}x{d}, {name}: {ms:.3f} ms "
                      f"({gb / ms:.2f} TB/s)", flush=True)


def check_backward(dev: torch.device, g: torch.Generator) -> None:
    """The Triton backward of add_layernorm_modulate against its float64 reference at the training shapes of DiT-XL/2
    (batch 64) and DiT-S/2 (batch 256), and its time against Inductor's kernels for the same formulas."""
    from dit.models.kernels import _add_ln_mod_bwd_triton, _ln_modulate_backward

    def inductor_formula(x, o, gate, shift, scale, dy, dxn):
        dx, dshift, dscale = _ln_modulate_backward(x, shift, scale, 1e-6, dy)
        dx = dx + dxn
        return dx, (dx * gate.float().unsqueeze(1)).to(o.dtype), (dx * o.float()).sum(1), dshift, dscale

    compiled = torch.compile(inductor_formula)
    for n, t, d in [(64, 256, 1152), (256, 256, 384)]:
        x = torch.randn(n, t, d, device=dev, generator=g) * 2 + 0.3
        o, dy = (torch.randn(n, t, d, device=dev, generator=g).bfloat16() for _ in range(2))
        dxn = torch.randn(n, t, d, device=dev, generator=g) * 0.1
        mod = (torch.randn(n, 6 * d, device=dev, generator=g) * 0.5).bfloat16()
        ga, sh, sc = mod[:, :d], mod[:, d:2 * d], mod[:, 2 * d:3 * d]
        bias = torch.randn(d, device=dev, generator=g) * 0.1  # the fp32 bias of o's linear layer (training)
        want = K.add_layernorm_modulate_backward(*(v.cpu().double() for v in (x, o, ga, sh, sc, dy, dxn)), 1e-6,
                                                 bias.cpu().double())
        got = K.add_layernorm_modulate_backward(x, o, ga, sh, sc, dy, dxn, 1e-6, bias)
        errs = ", ".join(f"{k} {rel(a.cpu(), b):.1e}" for k, a, b in zip(("dx", "do", "dgate", "dshift", "dscale",
                                                                            "dbias"), got, want))
        print(f"[bwd] {n}x{t}x{d} vs float64: {errs}", flush=True)
        gb = x.numel() * (4 + 2 + 2 + 4 + 4 + 2) / 1e9  # x, o, dy, dx_new in; dx, do out
        ms = _ms_per_call(lambda: compiled(x, o, ga, sh, sc, dy, dxn), dev)
        print(f"[bwd] {n}x{t}x{d} inductor: {ms:.3f} ms ({gb / ms:.2f} TB/s)", flush=True)
        ms = _ms_per_call(lambda: _add_ln_mod_bwd_triton(x, o, ga, sc, dy, dxn, 1e-6), dev)
        print(f"[bwd] {n}x{t}x{d} triton, default tile: {ms:.3f} ms ({gb / ms:.2f} TB/s)", flush=True)
        ms = _ms_per_call(lambda: _add_ln_mod_bwd_triton(x, o, ga, sc, dy, dxn, 1e-6, bias), dev)
        print(f"[bwd] {n}x{t}x{d} triton with the bias gradient, default tile: {ms:.3f} ms ({gb / ms:.2f} TB/s)",
              flush=True)
        for sub in (1, 2, 4):
            for rpp in (16, 32, 64):
                for warps in (2, 4, 8):
                    for stages in (1, 3):
                        if sub * d > 2048 * 2 or rpp < sub:
                            continue
                        ms = _ms_per_call(lambda: _add_ln_mod_bwd_triton(x, o, ga, sc, dy, dxn, 1e-6,
                                                                         rows_per_program=rpp, num_warps=warps,
                                                                         sub=sub, stages=stages), dev)
                        print(f"[bwd] {n}x{t}x{d} triton, {sub} rows x {rpp} per program, {warps} warps, {stages} "
                              f"stages: {ms:.3f} ms ({gb / ms:.2f} TB/s)", flush=True)


def check_qkv_grad(dev: torch.device, g: torch.Generator) -> None:
    """The qkv-gradient kernel (``kernels.qkv_grad``) on the attention backward's real outputs at DiT-S/2's and
    DiT-XL/2's training shapes: exact copy, fp32 bias sums; time against Inductor's copy + column sum of the same
    (what autograd and the qkv linear's backward compile to), over a sweep of its tile."""
    from dit.models.kernels import _qkv_grad_triton

    def inductor(dq, dk, dv):
        n, h, t, dh = dq.shape
        g3 = torch.stack([dq, dk, dv]).permute(1, 3, 0, 2, 4).reshape(n * t, 3 * h * dh)
        return g3, g3.sum(0)

    compiled = torch.compile(inductor, dynamic=False)
    for n, h, dh in [(256, 6, 64), (64, 16, 72)]:
        t, c = 256, h * dh
        qkv = torch.randn(n, t, 3, h, dh, device=dev, generator=g, dtype=torch.bfloat16).permute(2, 0, 3, 1, 4)
        q, k, v = (z.detach().requires_grad_() for z in qkv)
        out = F.scaled_dot_product_attention(q, k, v)
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
        want, want_b = compiled(dq, dk, dv)
        got, got_b = K.qkv_grad(dq, dk, dv)
        ref_b = want.double().sum(0)
        print(f"[qkv] {n}x{t}x{c}: dq strides {tuple(dq.stride())}; copy exact: {torch.equal(got, want)}; bias error "
              f"{rel(got_b, ref_b):.1e} (Inductor {rel(want_b, ref_b):.1e})", flush=True)
        gb = 2 * want.numel() * 2 / 1e9
        ms = _ms_per_call(lambda: compiled(dq, dk, dv), dev)
        print(f"[qkv] {n}x{t}x{c} inductor: {ms:.3f} ms ({gb / ms:.2f} TB/s of copy)", flush=True)
        for rows in (64, 128, 256, 512):
            for block_m in (16, 32, 64):
                for warps in (4, 8):
                    if block_m > rows:
                        continue
                    ms = _ms_per_call(lambda: _qkv_grad_triton(dq, dk, dv, rows, block_m, warps), dev)
                    print(f"[qkv] {n}x{t}x{c} triton, {rows} rows per program, {block_m} per step, {warps} warps: "
                          f"{ms:.3f} ms ({gb / ms:.2f} TB/s)", flush=True)


def main() -> None:
    parts = {"ops": check_ops, "model": check_model, "text": check_text_model, "backward": check_backward,
             "qkv": check_qkv_grad, "time": lambda dev, g: time_kernels(dev)}
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default=",".join(parts), help=f"comma list of: {', '.join(parts)}")
    chosen = ap.parse_args().parts.split(",")
    if unknown := [p for p in chosen if p not in parts]:
        ap.error(f"unknown part(s) {unknown}; valid: {', '.join(parts)}")
    if not torch.cuda.is_available():
        raise SystemExit("check_kernels.py: needs a CUDA GPU (the CPU paths are tested by tests/test_kernels.py)")
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    for p in chosen:
        parts[p](dev, g)


if __name__ == "__main__":
    main()
