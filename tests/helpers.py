"""Helpers shared by test files (imported as ``helpers``: pytest puts this folder on ``sys.path``)."""

import importlib.util
from pathlib import Path


def load_tool(name: str):
    """Import ``tools/<name>.py`` (a script folder, not a package) as a module."""
    path = Path(__file__).resolve().parents[1] / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_tool_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def regional_twin(ref, *inputs):
    """A copy of ``ref`` with ``compile_blocks`` (dynamo + AOTAutograd, no code generation, graphs counted); runs
    forward and backward (sum of squares) of both on ``inputs``. Returns (twin, out_ref, out, compiled graphs,
    compiled blocks)."""
    import copy

    from torch._dynamo.testing import CompileCounterWithBackend

    twin = copy.deepcopy(ref)
    counter = CompileCounterWithBackend("aot_eager")
    n = twin.compile_blocks(backend=counter, dynamic=False)
    out_ref, out = ref(*inputs), twin(*inputs)
    out_ref.square().sum().backward()
    out.square().sum().backward()
    return twin, out_ref, out, counter, n


SMALL_DIT = dict(input_size=32, hidden_size=256, depth=2, num_heads=4, num_classes=10)  # 64-wide heads


def assert_training_gradients_match_fp32(configure, dtype, name="DiT-S/2", **overrides):
    """GPU: a small model (by default a DiT-S/2 of 2 blocks, width 256, 64-wide heads; ``name`` / ``overrides``
    another, with 10 classes at 32x32), zero-initialised layers randomised, with ``configure(model)`` applied runs
    forward and backward under ``dtype`` autocast, eager and compiled: every parameter gradient must be as close to
    the fp32 model's as the plain model's in ``dtype`` (within 2x, or 1e-2)."""
    import copy

    import torch

    from dit.benchmark import _randomise_zero_init
    from dit.models import create_model

    torch.manual_seed(0)
    dev = torch.device("cuda")
    ref_model = create_model(name, **(overrides or SMALL_DIT))
    _randomise_zero_init(ref_model)
    ref_model = ref_model.to(dev).eval()
    model = copy.deepcopy(ref_model)
    configure(model)
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(32, 4, 32, 32, device=dev, generator=g)
    t = torch.randint(0, 1000, (32,), device=dev, generator=g)
    y = torch.randint(0, 10, (32,), device=dev, generator=g)

    def grads(m, autocast, compiled):
        m.zero_grad(set_to_none=True)
        fn = torch.compile(m, dynamic=False) if compiled else m
        with torch.autocast("cuda", dtype=dtype, enabled=autocast):
            out = fn(x, t, y=y)
        out.float().square().mean().backward()
        return {n: p.grad.detach().double().clone() for n, p in m.named_parameters() if p.grad is not None}

    ref = grads(ref_model, False, False)
    low = grads(ref_model, True, False)
    for compiled in (False, True):
        got = grads(model, True, compiled)
        assert got.keys() == ref.keys()
        for name, r in ref.items():
            err = ((got[name] - r).norm() / r.norm()).item()
            low_err = ((low[name] - r).norm() / r.norm()).item()
            assert err < max(2 * low_err, 1e-2), (dtype, compiled, name, err, low_err)


def scaled_accelerator(init_scale: float = 2.0**20):
    """An ``accelerate.Accelerator`` subclass that runs train.mixed_precision=fp16 with a dynamic loss scale on any
    device (Accelerate gives fp16 autocast and a GradScaler on GPUs only): the scale starts at ``init_scale`` and grows
    every 2 clean steps, so a tiny model's fp16 gradients overflow within a few steps (skipped, scale backed off).
    Install it as ``accelerate.Accelerator``: dit.train imports that name when train() runs."""
    import accelerate
    import torch

    class Scaled(accelerate.Accelerator):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.native_amp = True
            self.scaler = torch.amp.GradScaler(self.device.type, init_scale=init_scale, growth_interval=2)

    return Scaled
