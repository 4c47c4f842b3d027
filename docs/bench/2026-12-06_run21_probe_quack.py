"""Prepared in run 21 (2026-12-06) and not run: that session had no device time left. Run it beside
2026-12-06_run21_dgelu_dbias.patch (``git apply`` it first: the backend then uses ``dgelu_dbias_mod``).

QuACK's fc2 input-gradient epilogues and split-K weight gradients against cuBLAS/cuBLASLt at DiT block shapes.

    PYTHONPATH=. python docs/bench/2026-12-06_run21_probe_quack.py [XL] [S] [--out probe.json]

Rows (bf16 operands, CUDA events, L2 warm, best of three 30-call loops; errors against fp32 formulas):
- fc2's input gradient with the GELU derivative, and what the backward needs beside it (GELU(h) for fc2's weight
  gradient where the forward did not keep it, the column sums for fc1's bias gradient): cuBLASLt's DGELU GEMM + a
  column sum (the cuBLAS backend), QuACK's ``gemm_dact`` (dh, g) + a column sum (run 20's QuACK backend), QuACK's
  ``dact_dbias_mod`` (dh, db) and ``dgelu_dbias_mod`` (dh, g, db: the backend with the patch).
- the fp32 weight gradients ``dy^T x`` of qkv, proj, fc1 and fc2: torch's ``mm(out_dtype=float32)`` (cuBLAS) against
  QuACK's ``gemm`` with split-K 1, 2 and 4 (serial, deterministic).
"""

import argparse
import json
import time

import torch
import torch.nn.functional as F

from dit.benchmark import time_back_to_back
from dit.models import cublaslt as cl


def bench(fn, it=30, rep=3):
    """Best of ``rep`` back-to-back loops of ``it`` calls, microseconds."""
    return min(time_back_to_back(fn, iters=it, warmup=3 if r == 0 else 0) for r in range(rep)) * 1e3


def rel(a, ref):
    return ((a.float() - ref).norm() / ref.norm()).item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="*", default=["XL", "S"])
    p.add_argument("--out", default=None)
    a = p.parse_args()
    from quack.epilogue.library import dact_dbias_mod, dgelu_dbias_mod
    from quack.gemm_interface import gemm, gemm_dact

    dact_dbias = dact_dbias_mod("gelu_tanh_approx")
    dev = torch.device("cuda")
    rows = []
    big = torch.randn(8192, 8192, device=dev).bfloat16()
    ceiling = 2 * 8192**3 / bench(lambda: big @ big, it=10) / 1e6
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__}; matmul ceiling {ceiling:.0f} TFLOP/s", flush=True)
    del big
    shapes = {"XL": (16384, 1152, 4608), "S": (65536, 384, 1536)}
    for model in a.models:
        m, c, f = shapes[model]
        gen = torch.Generator(device=dev).manual_seed(0)

        def rn(*s, scale=1.0):
            return (torch.randn(*s, device=dev, generator=gen) * scale).bfloat16()

        x, dy, w2 = rn(m, c), rn(m, c), rn(c, f, scale=f**-0.5)
        h = rn(m, f)
        dh_ref = torch.ops.aten.gelu_backward(dy.float() @ w2.float(), h.float(), approximate="tanh")
        db_ref, g_ref = dh_ref.sum(0), F.gelu(h.float(), approximate="tanh")
        flop = 2 * m * c * f

        def check(label, fn, flop=flop):
            out = fn()
            torch.cuda.synchronize()
            us = bench(fn)
            row = {"model": model, "gemm": label, "us": round(us, 1), "tflops": round(flop / us / 1e6, 1)}
            dh, g, db = out
            row["err_dh"] = float(f"{rel(dh, dh_ref):.2e}")
            if g is not None:
                row["err_g"] = float(f"{rel(g, g_ref):.2e}")
            row["err_db"] = float(f"{rel(db, db_ref):.2e}")
            rows.append(row)
            print(row, flush=True)

        def cublaslt_dgelu():
            d = cl.gemm_dgelu(dy, w2, h)
            return d, None, d.sum(0, dtype=torch.float32)

        def quack_dact():
            d, g = gemm_dact(dy, w2, PreAct=h, activation="gelu_tanh_approx", tuned=False)
            return d, g, d.sum(0, dtype=torch.float32)

        def quack_dact_dbias():
            r = dact_dbias(dy, w2, h, tuned=False)
            return r["D"], None, r["dwb"].reshape(-1)

        def quack_dgelu_dbias():
            r = dgelu_dbias_mod(dy, w2, h, tuned=False)
            return r["D"], r["postact"], r["dbias"].reshape(-1)

        check("fc2 dgrad: cuBLASLt DGELU + column sum", cublaslt_dgelu)
        check("fc2 dgrad: QuACK gemm_dact (dh, g) + column sum", quack_dact)
        check("fc2 dgrad: QuACK dact_dbias_mod (dh, db)", quack_dact_dbias)
        check("fc2 dgrad: QuACK dgelu_dbias_mod (dh, g, db)", quack_dgelu_dbias)
        for name, n_out in (("qkv", 3 * c), ("proj", c), ("fc1", f), ("fc2", c)):
            k_in = f if name == "fc2" else c
            go, inp = rn(m, n_out), rn(m, k_in)
            ref = go.float().t() @ inp.float()
            wflop = 2 * m * n_out * k_in
            variants = [("cuBLAS mm fp32 out", lambda: torch.mm(go.t(), inp, out_dtype=torch.float32))]
            for sk in (1, 2, 4):
                variants.append((f"QuACK split_k={sk}", lambda sk=sk: gemm(go.t(), inp, out_dtype=torch.float32,
                                                                              split_k=sk, tuned=False)))
            for label, fn in variants:
                try:
                    out = fn()
                    torch.cuda.synchronize()
                    us = bench(fn)
                    row = {"model": model, "gemm": f"{name} wgrad: {label}", "us": round(us, 1),
                           "tflops": round(wflop / us / 1e6, 1), "err": float(f"{rel(out, ref):.2e}")}
                except Exception as exc:  # noqa: BLE001 - a probe reports what failed and goes on
                    row = {"model": model, "gemm": f"{name} wgrad: {label}", "error": f"{type(exc).__name__}: {exc}"[:300]}
                rows.append(row)
                print(row, flush=True)
    if a.out:
        with open(a.out, "w") as fh:
            json.dump({"ceiling_tflops": round(ceiling, 1), "date": time.strftime("%Y-%m-%d"),
                       "torch": torch.__version__, "device": torch.cuda.get_device_name(), "rows": rows}, fh, indent=1)
    print("\n| model | GEMM | us | TFLOP/s |\n|---|---|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['gemm']} | {r.get('us', '-')} | {r.get('tflops', r.get('error', '-'))} |")


if __name__ == "__main__":
    main()
