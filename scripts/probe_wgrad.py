"""Weight-gradient GEMMs (dy^T x) at the DiT MLP and attention shapes: ``torch.mm`` against every cuBLASLt heuristic
candidate, each timed alone (bf16, CUDA). docs/benchmarks.md, run 15:

    python scripts/probe_wgrad.py
"""

import torch

import dit.models.cublaslt as cl
from dit.benchmark import time_back_to_back as bench


def main() -> None:
    if not cl.gelu_epilogues_available("cuda"):
        raise SystemExit("probe_wgrad.py: needs a CUDA GPU with cuBLASLt")
    lt = cl._cublaslt()
    dev = torch.device("cuda", 0)
    for name, m, n, k in [("XL fc2 wgrad dy^T g", 16384, 1152, 4608), ("XL fc1 wgrad dh^T x", 16384, 4608, 1152),
                          ("XL proj wgrad", 16384, 1152, 1152), ("XL qkv wgrad", 16384, 3456, 1152),
                          ("S fc2 wgrad", 65536, 384, 1536), ("S fc1 wgrad", 65536, 1536, 384),
                          ("B fc1 wgrad", 16384, 3072, 768), ("B fc2 wgrad", 16384, 768, 3072)]:
        # D (n, k) row-major = dy^T (n, m) @ x (m, k)
        dy = torch.randn(m, n, device=dev).bfloat16()
        x = torch.randn(m, k, device=dev).bfloat16()
        ref = dy.t() @ x
        flop = 2 * m * n * k
        t_torch = bench(lambda: dy.t() @ x)
        d = torch.empty(n, k, device=dev, dtype=torch.bfloat16)
        key = (dev, cl.EPILOGUE_DEFAULT, cl._R_16BF, k, n, m, cl._OP_N, cl._OP_T, k, n)
        first = lt.plan(*key)
        res = []
        for i in range(first[-2]):
            p = lt.plan(*key, algo_index=i)
            try:
                lt.matmul(p, x, dy, d)
            except RuntimeError:  # an algorithm that cannot run these operands
                res.append((i, None))
                continue
            torch.cuda.synchronize()
            err = ((d.float() - ref.float()).norm() / ref.float().norm()).item()
            res.append((i, bench(lambda: lt.matmul(p, x, dy, d)), err))
        ok = [r for r in res if r[1] is not None]
        best = min(ok, key=lambda r: r[1])
        print(f"{name}: torch {t_torch*1e3:.1f} us ({flop/t_torch/1e9:.0f} TF/s); lt#0 {ok[0][1]*1e3:.1f} us; "
              f"best lt#{best[0]} {best[1]*1e3:.1f} us ({flop/best[1]/1e9:.0f} TF/s, err {best[2]:.1e}); "
              f"all: " + " ".join(f"{r[0]}:{r[1]*1e3:.0f}" for r in ok), flush=True)


if __name__ == "__main__":
    main()
