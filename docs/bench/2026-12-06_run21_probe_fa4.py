"""Prepared in run 21 (2026-12-06); run in run 22 on an H100 (docs/benchmarks.md "Run 22": FA4 wrong at head dim 72,
slower at 64 and 72; the backend was then removed, so the "op fa4_attention_*" rows need commit 9ba031a's tree).

FlashAttention-4's CuTe DSL kernels for Hopper (``flash-attn-4``, pure Python on the same nvidia-cutlass-dsl stack
as QuACK; sm90 forward and backward, head dims 8-256 in steps of 8) against what the DiTs train with now: cuDNN's
forward (``attention_kernels._forward_cuda``) and our two Triton FlashAttention-2 backward kernels on the packed qkv
(``attention_kernels._backward_triton``, which also writes the qkv bias gradient's partial sums). Run 20 left the
attention backward at 10.7 ms of DiT-XL/2's 104 ms step (about 125 TFLOP/s at 256 tokens, head dim 72): an
FA3-class backward is one of the two levers left for 660 img/s.

    PYTHONPATH=. python docs/bench/2026-12-06_run21_probe_fa4.py --out $OUT/fa4.json

For DiT-XL/2 (64 x 256 tokens, 16 heads of 72), DiT-B/2 (64 x 256, 12 of 64) and DiT-S/2 (256 x 256, 6 of 64):
errors against float64 (o, dq, dk, dv) and times (CUDA events, best of three 20-call loops) of
- ours: cuDNN forward + Triton backward (the packed dqkv and the bias partials);
- FA4 through its autograd function on q, k, v views of the packed qkv (dq, dk, dv separate tensors, then
  concatenated into the packed dqkv, and the bias gradient's column sum: what a drop-in would cost);
- FA4's forward and backward functions directly, writing dq, dk, dv into one packed dqkv buffer (no concatenation),
  if its kernels take those strided outputs, with dQ accumulated by free atomics and in deterministic order;
- the ops ``model.attention_backend=fa4`` trains with (``attention_kernels.fa4_attention_fwd`` / ``_bwd``: the
  direct calls plus the bias gradient's per-block sums).
"""

import argparse
import json
import math
import time

import torch

from dit.benchmark import time_back_to_back
from dit.models import attention_kernels as A

SHAPES = {"XL": (64, 256, 16, 72), "B": (64, 256, 12, 64), "S": (256, 256, 6, 64)}


def bench(fn):
    return min(time_back_to_back(fn, iters=20, warmup=3 if r == 0 else 0) for r in range(3)) * 1e3  # us


def rel(a, ref):
    return float(f"{((a.double() - ref).norm() / ref.norm()).item():.2e}")


def reference(qkv, do, heads):
    """float64 o (N, T, C) and dqkv (N, T, 3C) of softmax(q k^T / sqrt(Dh)) v."""
    x = qkv.double().requires_grad_()
    q, k, v = A._split(x, heads)  # (N, H, T, Dh)
    p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    o = (p @ v).transpose(1, 2).reshape(do.shape)
    (dqkv,) = torch.autograd.grad(o, x, do.double())
    return o.detach(), dqkv


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="*", default=["XL", "B", "S"])
    p.add_argument("--out", default=None)
    a = p.parse_args()
    from flash_attn.cute import flash_attn_func
    from flash_attn.cute.interface import _flash_attn_bwd, _flash_attn_fwd

    rows = []
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__}", flush=True)
    for name in a.models:
        n, t, h, dh = SHAPES[name]
        c = h * dh
        flop_fwd = 4 * n * h * t * t * dh
        gen = torch.Generator(device="cuda").manual_seed(0)
        qkv = torch.randn(n, t, 3 * c, device="cuda", generator=gen).bfloat16()
        do = torch.randn(n, t, c, device="cuda", generator=gen).bfloat16()
        o_ref, dqkv_ref = reference(qkv, do, h)
        row = {"model": name, "shape": [n, t, h, dh]}

        def record(label, fn, flop, check=None):
            try:
                out = fn()
                torch.cuda.synchronize()
                us = bench(fn)
                row[label] = {"us": round(us, 1), "tflops": round(flop / us / 1e6, 1),
                              **({} if check is None else check(out))}
            except Exception as exc:  # noqa: BLE001 - a probe reports what failed and goes on
                row[label] = f"error: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
            print(name, label, row[label], flush=True)

        # ours
        o, lse = A._forward_cuda(qkv, h)
        record("ours fwd (cuDNN)", lambda: A._forward_cuda(qkv, h), flop_fwd, lambda r: {"err_o": rel(r[0], o_ref)})
        record("ours bwd (Triton, packed + bias partials)", lambda: A._backward_triton(qkv, o, lse, do, h),
               2.5 * flop_fwd, lambda r: {"err_dqkv": rel(r[0], dqkv_ref)})

        # FA4, autograd function on views of the packed qkv: (N, T, H, Dh) each
        def views(z):
            return z.view(n, t, 3, h, dh).unbind(2)

        def fa4_fwd():
            q, k, v = views(qkv)
            return flash_attn_func(q, k, v)

        record("FA4 fwd (flash_attn_func)", fa4_fwd, flop_fwd,
               lambda r: {"err_o": rel((r[0] if isinstance(r, tuple) else r).reshape(n, t, c), o_ref)})
        x = qkv.detach().clone().requires_grad_()
        q, k, v = views(x)
        out = flash_attn_func(q, k, v)
        out = out[0] if isinstance(out, tuple) else out
        do4 = do.view(n, t, h, dh)

        def fa4_bwd_dropin():
            dq, dk, dv = torch.autograd.grad(out, (q, k, v), do4, retain_graph=True)
            dqkv = torch.stack((dq, dk, dv), dim=2).reshape(n, t, 3 * c)  # the packed layout the qkv GEMM takes
            return dqkv, dqkv.sum((0, 1), dtype=torch.float32)  # + the qkv bias gradient

        record("FA4 bwd (autograd + pack + bias sum)", fa4_bwd_dropin, 2.5 * flop_fwd,
               lambda r: {"err_dqkv": rel(r[0], dqkv_ref)})

        # FA4's functions directly, the gradients written into one packed buffer
        q, k, v = views(qkv)
        try:
            res = _flash_attn_fwd(q, k, v, return_lse=True)
            o4, lse4 = res[0], res[1]
        except Exception as exc:  # noqa: BLE001
            o4 = lse4 = None
            row["FA4 fwd (direct)"] = f"error: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
        if o4 is not None:
            dqkv = torch.empty_like(qkv)
            dq, dk, dv = views(dqkv)

            for det in (False, True):
                def fa4_bwd_packed(det=det):
                    _flash_attn_bwd(q, k, v, o4, do4, lse4, dq=dq, dk=dk, dv=dv, deterministic=det)
                    return dqkv

                record(f"FA4 bwd (direct, packed dqkv out, deterministic={det})", fa4_bwd_packed, 2.5 * flop_fwd,
                       lambda r: {"err_dqkv": rel(r, dqkv_ref)})
        # the ops the trainer runs with model.attention_backend=fa4 (the bias pieces summed by torch)
        o5, lse5 = A.fa4_attention_fwd(qkv, h)
        record("op fa4_attention_fwd", lambda: A.fa4_attention_fwd(qkv, h), flop_fwd,
               lambda r: {"err_o": rel(r[0], o_ref)})
        record("op fa4_attention_bwd", lambda: A.fa4_attention_bwd(qkv, o5, lse5, do, h), 2.5 * flop_fwd,
               lambda r: {"err_dqkv": rel(r[0], dqkv_ref)})
        rows.append(row)
        del o_ref, dqkv_ref
        torch.cuda.empty_cache()
    if a.out:
        with open(a.out, "w") as fh:
            json.dump({"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
                       "device": torch.cuda.get_device_name(), "rows": rows}, fh, indent=1)
    print("\n| model | path | us | TFLOP/s | error |\n|---|---|---:|---:|---|")
    for r in rows:
        for k, v in r.items():
            if isinstance(v, dict):
                errs = ", ".join(f"{kk} {vv}" for kk, vv in v.items() if kk.startswith("err"))
                print(f"| {r['model']} | {k} | {v['us']} | {v['tflops']} | {errs} |")
            elif isinstance(v, str):
                print(f"| {r['model']} | {k} | - | - | {v} |")


if __name__ == "__main__":
    main()
