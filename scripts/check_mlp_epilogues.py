"""GPU check and timing of a DiT MLP trained through cuBLASLt's GELU epilogues (``dit.models.cublaslt``) against the
same MLP compiled by Inductor (GEMMs + GELU forward/backward + bias-gradient kernels), at each model's training
shape; plus each epilogue GEMM against the plain GEMM of its shape and against cuBLASLt's other candidate
algorithms (is the heuristic's first choice the fastest?).

    python scripts/check_mlp_epilogues.py                                   # CUDA only; about a minute on an H100
    python scripts/check_mlp_epilogues.py --models DiT-S/2:256,DiT-XL/2:64 --candidates 128
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from dit.benchmark import time_fn
from dit.models import cublaslt
from dit.models.registry import model_defaults


def _plain(x, w1, b1, w2, b2):
    return F.linear(F.gelu(F.linear(x, w1, b1), approximate="tanh"), w2, b2)


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref.double()).norm() / ref.double().norm()).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="DiT-S/2:256,DiT-B/2:256,DiT-L/2:64,DiT-XL/2:64",
                    help="comma-separated NAME:BATCH (256 px images: 32x32 latents)")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--candidates", type=int, default=cublaslt._CANDIDATES,
                    help="algorithms asked of cuBLASLt's heuristic (it returns at most as many as exist)")
    a = ap.parse_args()
    cublaslt._CANDIDATES = a.candidates
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU (cuBLASLt)")
    dev = torch.device("cuda")
    if not cublaslt.gelu_epilogues_available(dev):
        ap.error("this cuBLASLt has no GELU epilogues")
    torch.backends.cuda.matmul.allow_tf32 = False
    bf = torch.bfloat16
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| model | rows x C x 4C | Inductor MLP fwd+bwd ms | epilogues, compiled ms | epilogues, eager ms | speed-up "
          "| err y / dx / dW1 / db1 (epilogues) | same, Inductor bf16 |")
    print("|---|---|---:|---:|---:|---:|---|---|")
    gemm_rows = []
    for item in a.models.split(","):
        name, batch = item.split(":")
        arch = model_defaults(name)
        c = arch["hidden_size"]
        f = 4 * c
        m = int(batch) * (32 // arch["patch_size"]) ** 2
        g = torch.Generator(device=dev).manual_seed(0)
        x32 = torch.randn(m, c, device=dev, generator=g)
        w1 = torch.randn(f, c, device=dev, generator=g) * c**-0.5
        b1 = torch.randn(f, device=dev, generator=g) * 0.1
        w2 = torch.randn(c, f, device=dev, generator=g) * f**-0.5
        b2 = torch.randn(c, device=dev, generator=g) * 0.1
        dy32 = torch.randn(m, c, device=dev, generator=g)
        params32 = [t.clone().requires_grad_() for t in (x32, w1, b1, w2, b2)]
        params = [t.to(bf).requires_grad_() for t in (x32, w1, b1, w2, b2)]
        dy = dy32.to(bf)

        def grads(fn, ps, d):
            out = fn(*ps)
            return (out, *torch.autograd.grad(out, ps, d))

        ref = grads(_plain, params32, dy32)  # fp32 (TF32 off)
        plain_c = torch.compile(_plain, dynamic=False)
        fused_c = torch.compile(cublaslt.fused_mlp, dynamic=False)
        errs = {}
        for label, fn in (("fused", fused_c), ("plain", plain_c)):
            got = grads(fn, params, dy)
            errs[label] = " / ".join(f"{_rel(got[i], ref[i]):.1e}" for i in (0, 1, 2, 3))
        times = {}
        for label, fn in (("plain", plain_c), ("fused", fused_c), ("eager", cublaslt.fused_mlp)):
            times[label] = time_fn(lambda: grads(fn, params, dy), dev, warmup=5, iters=a.iters) * 1e3
        print(f"| {name} b{batch} | {m} x {c} x {f} | {times['plain']:.3f} | {times['fused']:.3f} | "
              f"{times['eager']:.3f} | {times['plain'] / times['fused']:.2f}x | {errs['fused']} | {errs['plain']} |")

        # each epilogue GEMM against the plain GEMM of its shape, and every candidate algorithm of the heuristic
        x, w1b, b1b, w2b = (t.to(bf) for t in (x32, w1, b1, w2))
        _, h = cublaslt.gemm_gelu_aux(x, w1b, b1b)
        lt = cublaslt._cublaslt()
        out_g, out_h = torch.empty_like(h), torch.empty_like(h)
        dh, db = torch.empty_like(h), torch.empty(f, device=dev, dtype=bf)
        N_, T_ = cublaslt._OP_N, cublaslt._OP_T
        for label, epi, trans, lda, ldb, args, plain in (
            ("fc1 fwd + GELU_AUX_BIAS", cublaslt.EPILOGUE_GELU_AUX_BIAS, T_, c, c,
             (w1b, x, out_g, b1b, out_h), lambda: torch.addmm(b1b, x, w1b.t())),
            ("fc2 dgrad + DGELU_BGRAD", cublaslt.EPILOGUE_DGELU_BGRAD, N_, f, c,
             (w2b, dy, dh, db, h), lambda: dy @ w2b),
            ("fc2 dgrad + DGELU", cublaslt.EPILOGUE_DGELU, N_, f, c, (w2b, dy, dh, None, h), lambda: dy @ w2b),
        ):
            plain_ms = time_fn(plain, dev, warmup=5, iters=a.iters) * 1e3
            n_algos = lt.plan(dev, epi, cublaslt._R_16BF, f, m, c, trans, N_, lda, ldb)[-2]
            algo_ms = []
            for i in range(n_algos):
                plan = lt.plan(dev, epi, cublaslt._R_16BF, f, m, c, trans, N_, lda, ldb, algo_index=i)
                algo_ms.append(time_fn(lambda: lt.matmul(plan, *args), dev, warmup=3, iters=a.iters) * 1e3)
            gemm_rows.append((name, label, plain_ms, algo_ms, 2 * m * c * f))
        # DGELU alone: check against the formula
        lt.matmul(lt.plan(dev, cublaslt.EPILOGUE_DGELU, cublaslt._R_16BF, f, m, c, N_, N_, f, c), w2b, dy, dh, None, h)
        dh_ref = torch.ops.aten.gelu_backward(dy.float() @ w2b.float(), h.float(), approximate="tanh")
        print(f"{name}: DGELU dh error {_rel(dh, dh_ref):.1e}")
        # weight-gradient GEMMs with the bias gradient (sums of B over k, the rows) in the epilogue: BGRADB
        g_act = out_g
        dw1, dw2 = torch.empty(f, c, device=dev, dtype=bf), torch.empty(c, f, device=dev, dtype=bf)
        db2 = torch.empty(c, device=dev, dtype=bf)
        for label, mm, nn_, lda, ldb, args, plain, sep in (
            # dW1 (F, C) = dh^T x: column-major D (C x F) = x^T (C x M) @ dh (M x F)
            ("fc1 wgrad + BGRADB (db1)", c, f, c, f, (x, dh, dw1, db), lambda: dh.t() @ x, lambda: dh.sum(0)),
            # dW2 (C, F) = dy^T g: column-major D (F x C) = g^T (F x M) @ dy (M x C)
            ("fc2 wgrad + BGRADB (db2)", f, c, f, c, (g_act, dy, dw2, db2), lambda: dy.t() @ g_act,
             lambda: dy.sum(0)),
        ):
            plain_ms = time_fn(plain, dev, warmup=5, iters=a.iters) * 1e3
            sep_ms = time_fn(sep, dev, warmup=5, iters=a.iters) * 1e3
            algo_ms = []
            for epi in (cublaslt.EPILOGUE_DEFAULT, cublaslt.EPILOGUE_BGRADB):
                plan = lt.plan(dev, epi, cublaslt._R_16BF, mm, nn_, m, N_, T_, lda, ldb)
                algo_ms.append(time_fn(lambda: lt.matmul(plan, *args), dev, warmup=3, iters=a.iters) * 1e3)
            a_, b_, d_, bias_ = args
            torch.testing.assert_close(d_.float(), plain().float(), rtol=2e-2, atol=1e-1)
            bias_ref = b_.float().sum(0)
            print(f"{name}: {label}: torch GEMM {plain_ms:.3f} ms + separate bias sum {sep_ms:.3f} ms; cuBLASLt "
                  f"default {algo_ms[0]:.3f} ms, BGRADB {algo_ms[1]:.3f} ms; bias error {_rel(bias_, bias_ref):.1e}")
        gb_ms = time_fn(lambda: torch.ops.aten.gelu_backward(dy @ w2b, h, approximate="tanh"), dev, warmup=5,
                        iters=a.iters) * 1e3
        print(f"{name}: torch dgrad GEMM + eager GELU backward: {gb_ms:.3f} ms")
    print("\n| model | GEMM | plain GEMM ms (torch) | epilogue GEMM ms, heuristic's choice | other candidates ms | "
          "TFLOP/s (choice) |")
    print("|---|---|---:|---:|---|---:|")
    for name, label, plain_ms, algo_ms, flops in gemm_rows:
        others = ", ".join(f"{t:.3f}" for t in algo_ms[1:]) or "-"
        print(f"| {name} | {label} | {plain_ms:.3f} | {algo_ms[0]:.3f} | {others} | {flops / algo_ms[0] / 1e9:.0f} |")


if __name__ == "__main__":
    main()
