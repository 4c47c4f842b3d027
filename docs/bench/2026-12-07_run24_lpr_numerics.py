"""Run 24: DiT output error against fp32 with the residual stream in the autocast dtype (bf16 / fp16), CPU.

    PYTHONPATH=. python docs/bench/2026-12-07_run24_lpr_numerics.py DiT-XL/2
"""
import sys, torch
from dit.models import create_model
from dit.benchmark import _randomise_zero_init
name = sys.argv[1]
for seed in (0, 1):
    torch.manual_seed(seed)
    m = create_model(name).eval(); _randomise_zero_init(m, seed)
    g = torch.Generator().manual_seed(seed + 100)
    x = torch.randn(2, 4, 32, 32, generator=g); t = torch.randint(0, 1000, (2,), generator=g); y = torch.randint(0, 1000, (2,), generator=g)
    res = []
    with torch.no_grad():
        ref = m(x, t, y=y).double()
        for lpr in (False, True):
            m.set_low_precision_residual(lpr)
            for dt in (torch.bfloat16, torch.float16):
                with torch.autocast("cpu", dtype=dt):
                    out = m(x, t, y=y)
                res.append(f"{str(dt)[6:]}{' lpr' if lpr else ''} {((out.double() - ref).norm() / ref.norm()).item():.2e}")
            m.set_low_precision_residual(False)
    print(name, seed, " | ".join(res), flush=True)
