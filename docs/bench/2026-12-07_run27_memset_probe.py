"""Run 27's probe (not yet run): which ops launch the ~280 memsets per DiT-XL/2 training step (run 26's profile:
0.2 ms of memsets and 0.5-1.0 ms of GPU idle before them, in the trainer's stack ``fast-cw``).

    python docs/bench/2026-12-07_run27_memset_probe.py [--model DiT-XL/2] [--batch 64] [--amp bf16]

The harness's ``fast-cw`` step (or ``--variant``) (tools/benchmark.py) is built without CUDA graphs (a graph replay hides which op
launched a kernel) and profiled for two steps; every memset on the device is charged to the chain of CPU ops that
launched it (innermost last). Printed: memsets per step by chain, most frequent first.
"""

import argparse
import collections
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from dit.benchmark import _cond_kwargs, _prepare  # noqa: E402
from dit.diffusion import create_diffusion  # noqa: E402
from dit.optim import AdamWEMA  # noqa: E402
from dit.utils import AUTOCAST_DTYPES  # noqa: E402


def chain(evt, depth: int = 5) -> str:
    names = []
    while evt is not None and len(names) < depth:
        names.append(evt.name[:70])
        evt = evt.cpu_parent
    return " < ".join(names)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="DiT-XL/2")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--amp", default="bf16", choices=sorted(AUTOCAST_DTYPES))
    p.add_argument("--variant", default="fast-cw", help="a tools/benchmark.py variant (fast-cw: the trainer's stack)")
    p.add_argument("--device", default="cuda", help="cpu: a dry run of the script (no memsets to find)")
    a = p.parse_args()
    device = torch.device(a.device)
    dtype = AUTOCAST_DTYPES[a.amp]
    model, _, _ = _prepare(a.model, a.variant, device, {})
    model.train()
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(a.batch, model.in_channels, model.input_size, model.input_size, device=device, generator=gen)
    cond = _cond_kwargs(model, a.batch, device, gen)
    diffusion = create_diffusion(timestep_respacing="", learn_sigma=model.learn_sigma)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, fused=device.type == "cuda")
    kernel = AdamWEMA(opt)
    if a.variant == "fast-cw":
        kernel.keep_compute_copies(model.set_compute_weights(dtype))
    if dtype == torch.float16:
        opt.grad_scale = torch.tensor(2.0**12, device=device)

    def loss_fn(x, t, cond):
        with torch.autocast(device.type, dtype=dtype):
            return diffusion.training_losses(model, x, t, model_kwargs=cond)["loss"].mean()

    with torch.no_grad():
        loss_fn(x, torch.zeros(a.batch, dtype=torch.long, device=device), cond)
    loss_fn = torch.compile(loss_fn, dynamic=False)  # the harness's whole-loss graph, without CUDA graphs

    def step():
        loss = loss_fn(x, torch.randint(0, 1000, (a.batch,), device=device, generator=gen), cond)
        (loss if dtype != torch.float16 else loss * opt.grad_scale).backward()
        kernel.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    from torch.profiler import ProfilerActivity, profile

    steps = 2
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        sync()
    counts, us = collections.Counter(), collections.Counter()
    for evt in prof.events():
        for k in evt.kernels:
            if "memset" in k.name.lower():
                c = chain(evt)
                counts[c] += 1
                us[c] += k.duration
    total = sum(counts.values())
    print(f"[memsets] {a.model} {a.amp} batch {a.batch}: {total / steps:.0f} memsets per step")
    for c, n in counts.most_common(25):
        print(f"[memsets] {n / steps:6.1f} per step, {us[c] / steps:7.1f} us: {c}")


if __name__ == "__main__":
    main()
