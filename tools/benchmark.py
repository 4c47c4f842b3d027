"""Benchmark registered models: training / forward img/s, memory, MFU, numerics; writes a report and plots.

    python tools/benchmark.py --models DiT-S/2,DiT-XL/2,UNet-S,UNet-XL --variants eager-bf16,fast \
        --out docs/bench/run.md --plot docs/bench/run.png
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dit.benchmark import VARIANTS, kernel_table, markdown_table, plot, run_benchmarks, sampling_table  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="DiT-S/2,DiT-B/2,DiT-L/2,DiT-XL/2,UNet-S,UNet-B,UNet-L,UNet-XL")
    p.add_argument("--variants", default="ref-tf32,eager-bf16,compile,fast", help=f"comma list of: {', '.join(VARIANTS)}")
    p.add_argument("--train-batch", type=int, default=64)
    p.add_argument("--train-batch-small", type=int, default=256, help="training batch for S models")
    p.add_argument("--fwd-batch", type=int, default=256)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--input-size", type=int, default=32)
    p.add_argument("--out", type=Path, default=Path("docs/bench/latest.md"))
    p.add_argument("--plot", type=Path, default=Path("docs/bench/latest.png"))
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--profile", action="store_true",
                   help="also profile the training step (GPU): kernel ms per step by category, top kernels")
    p.add_argument("--train-only", action="store_true",
                   help="skip the forward measurements and the numerics check (shorter exploratory runs)")
    a = p.parse_args()
    models = [m for m in a.models.split(",") if m]
    tb = {m: (a.train_batch_small if m.endswith("-S") or "-S/" in m else a.train_batch) for m in models}
    env, results = run_benchmarks(models, a.variants.split(","), train_batch=tb, fwd_batch=a.fwd_batch,
                                  iters=a.iters, warmup=a.warmup, overrides={"input_size": a.input_size},
                                  json_out=a.json, profile=a.profile, do_fwd=not a.train_only)
    table = markdown_table(results) + "\n\n" + sampling_table(results, env["matmul_tflops"])
    if a.profile:
        table += "\n\nGPU kernel time per training step (ms):\n\n" + kernel_table(results)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    cmd = "python tools/benchmark.py " + " ".join(sys.argv[1:])
    a.out.write_text(f"Command: `{cmd}`\n\nEnvironment: {env}\n\nVariants: "
                     + "; ".join(f"`{k}`: {v}" for k, v in VARIANTS.items()) + f"\n\n{table}\n")
    plot(results, a.plot)
    print(table)


if __name__ == "__main__":
    main()
