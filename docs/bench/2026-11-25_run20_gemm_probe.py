"""QuACK (CuTe DSL) sm90 GEMMs against cuBLAS/cuBLASLt at the DiT block's shapes: plain, bias, GELU-aux forward,
DGELU backward, fp32 weight gradients. Times (CUDA events, L2 warm, as the earlier probes) and errors vs fp32."""
import json
import os
import sys
import time

import torch

import dit.models.cublaslt as cl

T0 = time.time()
BUDGET = float(os.environ.get("BUDGET", "520"))
OUT = os.environ.get("OUT", "/tmp")
dev = torch.device("cuda", 0)
t = time.time()
from quack.gemm_interface import gemm, gemm_act, gemm_dact  # noqa: E402

print(f"import quack {time.time() - t:.1f}s", flush=True)
results = []


def bench(fn, it=30, rep=3):
    for _ in range(3):
        fn()
    best = 1e9
    for _ in range(rep):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(it):
            fn()
        e.record()
        e.synchronize()
        best = min(best, s.elapsed_time(e) / it)
    return best * 1e3  # us


def rel(a, ref):
    return ((a.float() - ref).norm() / ref.norm()).item()


def case(model, name, flop, ref, variants):
    """variants: list of (label, fn returning the output to check)."""
    row = {"model": model, "gemm": name, "gflop": flop / 1e9}
    for label, fn in variants:
        if time.time() - T0 > BUDGET:
            row[label] = "skipped (budget)"
            continue
        try:
            t1 = time.time()
            out = fn()
            torch.cuda.synchronize()
            first = time.time() - t1
            err = rel(out, ref)
            us = bench(fn)
            row[label] = {"us": round(us, 1), "tflops": round(flop / us / 1e6, 1), "err": float(f"{err:.2e}"),
                          "first_s": round(first, 1)}
        except Exception as exc:  # noqa: BLE001
            row[label] = f"error: {type(exc).__name__}: {str(exc)[:300]}"
        print(model, name, label, row[label], flush=True)
    results.append(row)
    with open(os.path.join(OUT, "q1.json"), "w") as f:
        json.dump(results, f, indent=1)


def run(model, m, c, f, tuned_list):
    g = torch.Generator(device=dev).manual_seed(0)

    def rn(*s, scale=1.0):
        return (torch.randn(*s, device=dev, generator=g) * scale).bfloat16()

    x = rn(m, c)
    w1, b1 = rn(f, c, scale=c ** -0.5), rn(f, scale=0.1)
    w2, b2 = rn(c, f, scale=f ** -0.5), rn(c, scale=0.1)
    wq, bq = rn(3 * c, c, scale=c ** -0.5), rn(3 * c, scale=0.1)
    dy = rn(m, c)
    dq = rn(m, 3 * c)
    h = (x.float() @ w1.float().t() + b1.float()).bfloat16()
    gl = torch.nn.functional.gelu(h.float(), approximate="tanh").bfloat16()
    dh = rn(m, f)
    tunes = [False] + ([True] if tuned_list else [])

    # fc1 forward with GELU: (M, C) x (C, F)
    ref = torch.nn.functional.gelu(x.float() @ w1.float().t() + b1.float(), approximate="tanh")
    v = [("torch_addmm_nogelu", lambda: torch.addmm(b1, x, w1.t())),
         ("cublaslt_gelu_aux", lambda: cl.gemm_gelu_aux(x, w1, b1)[0])]
    for tu in tunes:
        v.append((f"quack_act_tuned{int(tu)}", lambda tu=tu: gemm_act(
            x, w1.t(), bias=b1, activation="gelu_tanh_approx", store_preact=True, tuned=tu)[1]))
    case(model, "fc1 fwd +gelu", 2 * m * c * f, ref, v)

    # fc2 input gradient with DGELU: (M, C) x (C, F)
    ref = torch.ops.aten.gelu_backward(dy.float() @ w2.float(), h.float(), approximate="tanh")
    v = [("torch_mm_nodgelu", lambda: dy @ w2), ("cublaslt_dgelu", lambda: cl.gemm_dgelu(dy, w2, h))]
    for tu in tunes:
        v.append((f"quack_dact_tuned{int(tu)}", lambda tu=tu: gemm_dact(
            dy, w2, PreAct=h, activation="gelu_tanh_approx", tuned=tu)[0]))
    case(model, "fc2 dgrad +dgelu", 2 * m * c * f, ref, v)
    if os.environ.get("ONLY_GELU"):
        return

    # weight gradients, fp32 out
    for nm, a, b in [("fc1 wgrad dh^T x", dh, x), ("fc2 wgrad dy^T g", dy, gl), ("qkv wgrad dq^T x", dq, x)]:
        ref = a.float().t() @ b.float()
        v = [("torch_mm_fp32out", lambda a=a, b=b: torch.mm(a.t(), b, out_dtype=torch.float32))]
        for tu in tunes:
            v.append((f"quack_fp32out_tuned{int(tu)}", lambda a=a, b=b, tu=tu: gemm(
                a.t(), b, out_dtype=torch.float32, tuned=tu)))
        case(model, nm, 2 * m * a.shape[1] * b.shape[1], ref, v)

    # plain forward GEMMs with bias
    for nm, a, w, bb in [("qkv fwd", x, wq, bq), ("fc2 fwd", gl, w2, b2)]:
        ref = a.float() @ w.float().t() + bb.float()
        v = [("torch_addmm", lambda a=a, w=w, bb=bb: torch.addmm(bb, a, w.t()))]
        for tu in tunes:
            v.append((f"quack_bias_tuned{int(tu)}", lambda a=a, w=w, bb=bb, tu=tu: gemm(a, w.t(), bias=bb, tuned=tu)))
        case(model, nm, 2 * m * w.shape[0] * w.shape[1], ref, v)

    # input gradients
    for nm, a, w in [("qkv dgrad", dq, wq), ("fc1 dgrad", dh, w1)]:
        ref = a.float() @ w.float()
        v = [("torch_mm", lambda a=a, w=w: a @ w)]
        for tu in tunes:
            v.append((f"quack_tuned{int(tu)}", lambda a=a, w=w, tu=tu: gemm(a, w, tuned=tu)))
        case(model, nm, 2 * m * w.shape[0] * w.shape[1], ref, v)


print(torch.__version__, torch.cuda.get_device_name(), flush=True)
big = torch.randn(8192, 8192, device=dev).bfloat16()
us = bench(lambda: big @ big, it=10)
print(f"ceiling 8192^3: {2 * 8192 ** 3 / us / 1e6:.0f} TF/s", flush=True)
results.append({"ceiling_tflops": round(2 * 8192 ** 3 / us / 1e6, 1)})
big = None
which = sys.argv[1:] or ["XL", "S"]
for name in which:
    if name == "XL":
        run("XL", 16384, 1152, 4608, tuned_list=True)
    elif name == "S":
        run("S", 65536, 384, 1536, tuned_list=True)
print(f"done {time.time() - T0:.0f}s", flush=True)
