"""How steadily the epilogue GEMMs' algorithm tuner (``dit.models.cublaslt``) picks the fastest candidate, at DiT-XL/2's
MLP shapes (bf16, CUDA). docs/benchmarks.md, run 32:

    python scripts/probe_gemm_choice.py [--trials 8]

First, at once (the GPU as a training run finds it on its first forward): the earlier rule (one sweep of 3 calls per
candidate, no warm-up) and the current one (``_time_candidates`` + ``choose_algorithm``), each ``--trials`` times;
then every candidate's time over many calls. A steady tuner picks the same, fastest, candidate in every trial.
"""

import argparse
import collections

import torch

import dit.models.cublaslt as cl


def old_rule(runnable, run) -> int:
    """Sessions 19-41's tuner: one warm-up and 3 timed calls per candidate, in order; 0.97 margin."""
    times = []
    for i, plan in runnable:
        run(plan)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(3):
            run(plan)
        end.record()
        end.synchronize()
        times.append((start.elapsed_time(end), i))
    t_first = times[0][0] if times and times[0][1] == 0 else float("inf")
    t_best, i_best = min(times, default=(0.0, 0))
    return i_best if t_best < 0.97 * t_first else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=8)
    a = ap.parse_args()
    if not cl.gelu_epilogues_available("cuda"):
        raise SystemExit("probe_gemm_choice.py: needs a CUDA GPU with cuBLASLt")
    lt, dev = cl._cublaslt(), torch.device("cuda", 0)
    m, c, f = 64 * 256, 1152, 4608  # DiT-XL/2 at batch 64: tokens, width, MLP width
    x = torch.randn(m, c, device=dev, dtype=torch.bfloat16)
    w1 = torch.randn(f, c, device=dev, dtype=torch.bfloat16) * c**-0.5
    b1 = torch.randn(f, device=dev, dtype=torch.bfloat16)
    g, h = torch.empty(m, f, device=dev, dtype=torch.bfloat16), torch.empty(m, f, device=dev, dtype=torch.bfloat16)
    dy = torch.randn(m, c, device=dev, dtype=torch.bfloat16)
    w2 = torch.randn(c, f, device=dev, dtype=torch.bfloat16) * f**-0.5
    dh = torch.empty(m, f, device=dev, dtype=torch.bfloat16)
    problems = {  # name: (key, run) as gemm_gelu_aux / gemm_dgelu build them
        "fc1 GELU_AUX_BIAS (forward)": ((dev, cl.EPILOGUE_GELU_AUX_BIAS, cl._R_16BF, f, m, c, cl._OP_T, cl._OP_N, c, c),
                                        lambda p: lt.matmul(p, w1, x, g, b1, h)),
        "fc2 dgrad DGELU (backward)": ((dev, cl.EPILOGUE_DGELU, cl._R_16BF, f, m, c, cl._OP_N, cl._OP_N, f, c),
                                       lambda p: lt.matmul(p, w2, dy, dh, None, h)),
    }
    for name, (key, run) in problems.items():
        runnable = lt.runnable_plans(key, run)
        old = collections.Counter(old_rule(runnable, run) for _ in range(a.trials))
        new = collections.Counter(cl.choose_algorithm(cl._time_candidates(runnable, run)) for _ in range(a.trials))
        steady = cl._time_candidates(runnable, lambda p: [run(p) for _ in range(10)])  # 30 calls per round
        ms = {i: min(t) / 30 for i, t in steady.items()}
        print(f"{name}: {len(runnable)} runnable candidates; picks over {a.trials} trials: "
              f"earlier rule {dict(old)}, current rule {dict(new)}")
        for i in sorted(ms, key=ms.__getitem__):
            print(f"  candidate {i:2d}: {ms[i]:.4f} ms{'  (heuristic first)' if i == 0 else ''}")


if __name__ == "__main__":
    main()
