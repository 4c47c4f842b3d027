"""GPU check of the one-pass AdamW + EMA kernel (dit.optim.AdamWEMA) on a DiT's real parameter set: the weights,
Adam moments and EMA after several steps (clipping through grad_scale, a skipped step, a parameter without a
gradient) against torch's fused AdamW followed by a foreach lerp, and the time of both per step, for a few launch
configurations.

    python scripts/check_adamw_ema.py --model DiT-XL/2        # CUDA only; under a minute on an H100
"""

from __future__ import annotations

import argparse

import torch

from dit.benchmark import time_fn
from dit.models import create_model
from dit.optim import AdamWEMA
from dit.train import clip_in_fused_step


def build(name: str, dev: torch.device, fused_kernel: bool, **kw):
    torch.manual_seed(0)
    model = create_model(name).to(dev)
    ema = [p.detach().clone() for p in model.parameters()]
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.03, fused=True)
    return model, params, ema, opt, (AdamWEMA(opt, ema, **kw) if fused_kernel else None)


def rel(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    num = sum(((x.double() - y.double()) ** 2).sum() for x, y in zip(a, b)) ** 0.5
    return (num / sum((y.double() ** 2).sum() for y in b) ** 0.5).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="DiT-XL/2")
    ap.add_argument("--steps", type=int, default=6)
    a = ap.parse_args()
    dev = torch.device("cuda")
    ref, mine = build(a.model, dev, False), build(a.model, dev, True)
    assert mine[4].fused, mine[4].reason
    n_params = sum(p.numel() for p in ref[1])
    for step in range(a.steps):
        gen = torch.Generator(device=dev).manual_seed(step)
        grads = [torch.randn(p.shape, device=dev, generator=gen) * 1e-2 for p in ref[1]]
        skip = torch.tensor(float(step == 3), device=dev)
        w = 1.0 - min(0.9999, (1 + step) / (10 + step))  # the trainer's warm-up decay: w >= 0.5 at first
        runs = ((ref, "ref"), (mine, "mine"))
        before = {tag: [p.detach().clone() for p in run[1]] for run, tag in runs}
        for (model, params, ema, opt, fused), tag in runs:
            for i, (p, g) in enumerate(zip(params, grads)):
                p.grad = None if (step == 2 and i == 0) else g.clone()
            clip_in_fused_step([p for p in params if p.grad is not None], 1.0, opt)
            opt.found_inf = skip
            if fused is None:
                opt.step()
                torch._foreach_lerp_(ema, [p.detach() for p in params], [(1 - skip) * w] * len(ema))
            else:
                fused.step(w)
        # the update itself (the weights hide its errors: lr 1e-3 against weights of 1e-2 and more), e.g. the
        # bias corrections' in the first steps; a skipped step moves nothing (0)
        moved = {tag: [p.detach() - b for p, b in zip(run[1], before[tag])] for run, tag in runs}
        update_diff = rel(moved["mine"], moved["ref"]) if step != 3 else 0.0
        print(f"[adamw_ema] step {step}: rel. diff params {rel(mine[1], ref[1]):.1e}, "
              f"exp_avg {rel([mine[3].state[p]['exp_avg'] for p in mine[1]], [ref[3].state[p]['exp_avg'] for p in ref[1]]):.1e}, "
              f"exp_avg_sq {rel([mine[3].state[p]['exp_avg_sq'] for p in mine[1]], [ref[3].state[p]['exp_avg_sq'] for p in ref[1]]):.1e}, "
              f"ema {rel(mine[2], ref[2]):.1e}, this step's update {update_diff:.1e}", flush=True)
    steps_m = [mine[3].state[p]["step"].item() for p in mine[1]]
    steps_r = [ref[3].state[p]["step"].item() for p in ref[1]]
    print(f"[adamw_ema] step counters equal: {steps_m == steps_r} (first {steps_m[0]}, param 0 {steps_m[0]}, "
          f"others {steps_m[1]})", flush=True)
    del ref, mine
    torch.cuda.empty_cache()

    # memory traffic per parameter: the norm reads the gradient (4 bytes), AdamW reads 4 and writes 3 fp32 tensors
    # (28), a separate EMA pass reads 2 and writes 1 (12), the fused EMA only reads and writes the EMA (8)
    model, params, ema, opt, _ = build(a.model, dev, False)
    for p in params:
        p.grad = torch.randn_like(p) * 1e-2
    opt.param_groups[0]["lr"] = 1e-9
    skip = torch.zeros((), device=dev)

    def separate():
        clip_in_fused_step(params, 1.0, opt)
        opt.found_inf = skip
        opt.step()
        torch._foreach_lerp_(ema, [p.detach() for p in params], [(1 - skip) * 1e-4] * len(ema))

    ms = 1e3 * time_fn(separate, dev, 3, 20)
    print(f"[adamw_ema] {a.model} ({n_params / 1e6:.0f} M params) norm + fused AdamW + lerp EMA: {ms:.2f} ms "
          f"({44 * n_params / ms / 1e9:.2f} TB/s: 44 B/param)", flush=True)
    for block, warps in [(1024, 4), (2048, 4), (2048, 8), (4096, 8), (8192, 8)]:
        fused = AdamWEMA(opt, ema, block=block, num_warps=warps)

        def one_pass():
            clip_in_fused_step(params, 1.0, opt)
            opt.found_inf = skip
            fused.step(1e-4)

        ms = 1e3 * time_fn(one_pass, dev, 3, 20)
        print(f"[adamw_ema] norm + AdamWEMA block {block} warps {warps}: {ms:.2f} ms "
              f"({40 * n_params / ms / 1e9:.2f} TB/s: 40 B/param)", flush=True)


if __name__ == "__main__":
    main()
