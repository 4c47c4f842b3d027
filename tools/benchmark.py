"""Benchmark registered models: training / forward img/s, memory, MFU, numerics; writes a report and plots.

    python tools/benchmark.py --models DiT-S/2,DiT-XL/2,UNet-S,UNet-XL --variants eager-bf16,fast \
        --out docs/bench/run.md --plot docs/bench/run.png
    python tools/benchmark.py --sampling --models DiT-XL/2 --variants eager-bf16,fast-cg --json sampling.json

``--step-ops`` times the work around the network on a model's parameters (EMA update, gradient clipping with the
AdamW step, the MLP's fc1 GEMM with and without its GELU epilogue):

    python tools/benchmark.py --step-ops --models DiT-XL/2 --json step_ops.json

``--sampling`` times the DDPM sampler loop with and without classifier-free guidance and the sd-vae decoder, and
reports GPU-hours for 50,000 images x 250 steps, guided at every step and (``--guidance-interval``) on an interval.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dit.benchmark import (VARIANTS, kernel_table, markdown_table, plot, plot_kernel_breakdown,  # noqa: E402
                           parse_model_overrides, run_benchmarks, sampling_table, unknown_names_error)
from dit.utils import AUTOCAST_DTYPES  # noqa: E402


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
    p.add_argument("--model-overrides", default=None, metavar="YAML",
                   help="constructor keywords for every model, a YAML mapping, e.g. \"{model_channels: 96, "
                        "num_res_blocks: 4}\" (a variant of a registered size, GFLOPs and MFU counted on it)")
    p.add_argument("--out", type=Path, default=Path("docs/bench/latest.md"))
    p.add_argument("--plot", type=Path, default=Path("docs/bench/latest.png"))
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--profile", action="store_true",
                   help="also profile the training step (with --sampling: a guided sampler step and the model call "
                        "alone) on a GPU: kernel ms per step by category, top kernels")
    p.add_argument("--profile-top", type=int, default=40, help="kernels listed per profiled step (JSON, log)")
    p.add_argument("--train-only", action="store_true",
                   help="skip the forward measurements and the numerics check (shorter exploratory runs)")
    p.add_argument("--fwd-only", action="store_true",
                   help="skip the training measurements (numerics check and forward img/s only)")
    p.add_argument("--amp-dtype", choices=list(AUTOCAST_DTYPES), default="bf16",
                   help="autocast dtype of every variant but ref-tf32 (fp16: a static loss scale in the training "
                        "steps; the trainer's train.mixed_precision=fp16 uses a dynamic one)")
    p.add_argument("--sampling", action="store_true", help="measure sampling (see above) instead of training")
    p.add_argument("--step-ops", action="store_true",
                   help="time the EMA, clipping + AdamW and MLP kernels on each model's parameters (see above)")
    p.add_argument("--sampling-batch", type=int, default=256)
    p.add_argument("--sampling-steps", type=int, default=20, help="DDPM steps timed per loop")
    p.add_argument("--guidance-interval", action="append", default=[], metavar="LO,HI",
                   help="also plan with guidance only for sigma in (LO, HI]; repeatable")
    a = p.parse_args()
    if a.train_only and a.fwd_only:
        p.error("--train-only and --fwd-only exclude each other")
    models = [m for m in a.models.split(",") if m]
    variants = [v for v in a.variants.split(",") if v]
    from dit.models import list_models

    for error in (unknown_names_error("--models", models, list_models()),
                  unknown_names_error("--variants", variants, VARIANTS)):
        if error:
            p.error(error)
    try:
        a.overrides = {"input_size": a.input_size, **parse_model_overrides(a.model_overrides, models)}
    except ValueError as e:
        p.error(str(e))
    if a.amp_dtype != "bf16" and (a.sampling or a.step_ops):
        p.error("--amp-dtype fp16 applies to the training / forward measurements, not --sampling or --step-ops")
    if a.sampling:
        return sampling_main(a, models, variants)
    if a.step_ops:
        return step_ops_main(a, models)
    tb = {m: (a.train_batch_small if m.endswith("-S") or "-S/" in m else a.train_batch) for m in models}
    env, results = run_benchmarks(models, variants, train_batch=tb, fwd_batch=a.fwd_batch,
                                  iters=a.iters, warmup=a.warmup, overrides=a.overrides,
                                  json_out=a.json, profile=a.profile, do_fwd=not a.train_only, do_train=not a.fwd_only,
                                  profile_top=a.profile_top, amp=a.amp_dtype)
    table = markdown_table(results) + "\n\n" + sampling_table(results, env["matmul_tflops"])
    if kernel_table(results):  # --profile on a GPU
        table += "\n\nGPU kernel time per training step (ms):\n\n" + kernel_table(results)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    cmd = "python tools/benchmark.py " + " ".join(sys.argv[1:])
    a.out.write_text(f"Command: `{cmd}`\n\nEnvironment: {env}\n\nVariants: "
                     + "; ".join(f"`{k}`: {v}" for k, v in VARIANTS.items()) + f"\n\n{table}\n")
    plot(results, a.plot)
    if a.profile:
        plot_kernel_breakdown(results, a.plot.with_name(a.plot.stem + "_kernels.png"))
    print(table)


def step_ops_main(a: argparse.Namespace, models: list[str]) -> None:
    import json

    import torch

    from dit.benchmark import bench_step_ops, environment

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env, rows = environment(), {}
    for name in models:
        rows[name] = bench_step_ops(name, device=device, warmup=a.warmup, iters=a.iters,
                                    overrides=a.overrides)
        for op, ms in rows[name].items():
            print(f"[step-ops] {name}: {op}: {ms:.2f} ms", flush=True)
    if a.json is not None:
        a.json.write_text(json.dumps({"env": env, "results": rows}, indent=1))


def interval_fraction(lo: float, hi: float, steps: int = 250) -> float:
    """Fraction of DiT's ``steps``-step DDPM sampler (linear schedule, 1000 training steps) guided on (lo, hi]."""
    from dit.diffusion import create_diffusion, guidance_timesteps, guided_fraction

    return guided_fraction(create_diffusion(str(steps)).timestep_map, guidance_timesteps(lo, hi))


def sampling_main(a: argparse.Namespace, models: list[str], variants: list[str]) -> None:
    import dataclasses
    import json

    import torch

    from dit.benchmark import bench_sampling, environment, plot_sampling, sampling_plan

    intervals = []
    for text in a.guidance_interval:
        try:
            lo, hi = (float(v) for v in text.split(","))
        except ValueError:
            sys.exit(f"error: --guidance-interval {text!r}: expected LO,HI (two numbers)")
        intervals.append((lo, hi))
    fractions = {"every step": 1.0}
    for lo, hi in intervals:
        fractions[f"sigma in ({lo:g}, {hi:g}]"] = interval_fraction(lo, hi)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env, rows = environment(), []
    for name in models:
        for v in variants:
            try:
                r = bench_sampling(name, v, device=device, batch=a.sampling_batch, steps=a.sampling_steps,
                                   overrides=a.overrides, profile=a.profile,
                                   profile_top=a.profile_top)
            except Exception as e:  # one broken variant must not cost the rest of a (paid) GPU session
                print(f"[sampling] {name} {v}: FAILED {type(e).__name__}: {' '.join(str(e).split())[:300]}",
                      flush=True)
                continue
            plans = {k: sampling_plan(r, guided_fraction=f) for k, f in fractions.items()}
            rows.append({**dataclasses.asdict(r), "plans": plans})
            print(f"[sampling] {name} {v}: guided step {r.guided_step_s * 1e3:.1f} ms, conditional step "
                  f"{r.cond_step_s * 1e3:.1f} ms (batch {r.batch}), decode {r.decode_img_s:,.0f} img/s; 50k x 250: "
                  + "; ".join(f"{k} {pl['gpu_hours']:.2f} GPU-h ({pl['guided_steps']} guided)"
                              for k, pl in plans.items()), flush=True)
            for label, cats in (("guided step", r.guided_kernels_ms), ("model alone", r.model_kernels_ms)):
                if cats:
                    print(f"[sampling] {name} {v} {label}, GPU ms per step: "
                          + ", ".join(f"{k} {ms:.1f}" for k, ms in cats.items()), flush=True)
            if a.json is not None:
                a.json.write_text(json.dumps({"env": env, "results": rows}, indent=1))
    if rows:
        plot_sampling(rows, a.plot)


if __name__ == "__main__":
    main()
