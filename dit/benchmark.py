"""Throughput benchmarks for every registered model: training and sampling img/s, memory, MFU.

Every figure is measured next to a baseline of the same model in the same run (plain eager bf16 autocast), so the
report is a table of ratios as well as absolute numbers; a bf16 matmul ceiling measured in the same run turns
FLOP rates into MFU. Run on a GPU through ``tools/benchmark.py``; on CPU it only exercises the plumbing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import platform
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
import yaml
from torch.utils.flop_counter import FlopCounterMode

from dit.diffusion import create_diffusion
from dit.models import create_model
from dit.models.layers import Mlp, linear_gelu_tanh
from dit.utils import AUTOCAST_DTYPES
from dit.utils.cuda_graph import StepGraph
from dit.utils.profiling import KERNEL_CATEGORIES, summarize

# Variants: name -> (description). Each is built by ``_prepare``; "bf16" in a name is the autocast dtype, fp16 with
# run_benchmarks(amp="fp16") (tools/benchmark.py --amp-dtype fp16).
VARIANTS = {
    "ref-tf32": "as the official repo ships: fp32 weights, TF32 matmuls, eager, foreach AdamW",
    "eager-bf16": "baseline: bf16 autocast, eager, foreach AdamW",
    "compile": "bf16 autocast, torch.compile of the model, fused AdamW",
    "fast": "bf16 autocast, torch.compile of the whole loss (model + diffusion terms), fused AdamW",
    "fast-cg": "as fast, plus CUDA graphs (mode='reduce-overhead') for the training forward + backward",
    "fast-cudnn": "as fast-cg, with only the cuDNN fused-attention SDPA backend allowed",
    "fast-flash": "as fast-cg, with only the flash-attention (FA2) SDPA backend allowed",
    "fast-cd": "as fast-cg, with Inductor's coordinate-descent tuning and autotuning of the fused pointwise and "
               "reduction kernels (block sizes benchmarked per kernel while compiling)",
    "fast-cl": "as fast-cg, with the model and inputs in channels-last memory format (no NCHW <-> NHWC transposes "
               "around cuDNN convolutions: the UNet)",
    "fast-bf16r": "as fast-cg, with the DiT's residual stream in bf16 (DiT.set_low_precision_residual) instead of "
                  "fp32: half the traffic of the memory-bound norm/elementwise kernels",
    "fast-lnk": "as fast-cg, with the DiT's residual update + LayerNorm + modulation in one Triton kernel for training "
                "too (DiT.fused_training: DiTBlock.forward_fused with autograd; the backward in one Triton kernel too)",
    "fast-mlp": "as fast-lnk, with the MLP's GELU in cuBLASLt GEMM epilogues for training (DiT.set_mlp_epilogues: "
                "GELU + pre-activation stored by fc1's GEMM, the GELU derivative in fc2's input-gradient GEMM)",
    "fast-mlpq": "as fast-mlp, with the qkv projection's gradient and bias gradient assembled from dq, dk, dv in one "
                 "Triton pass (DiT.set_fused_qkv_backward)",
    "fast-fa": "as fast-mlp, with the self-attention on the packed qkv GEMM output: cuDNN's forward, a Triton "
               "FlashAttention-2 backward writing the packed qkv gradient (DiT.set_fused_attention)",
    "fast-fao": "as fast-fa, with the trainer's optimizer kernel (dit.optim.AdamWEMA, here without an EMA) instead "
                "of torch's fused AdamW",
    "fast-cw": "as fast-fao, with the blocks' weights also kept in bf16 by that kernel and read by their GEMMs "
               "instead of a cast per step (DiT.set_compute_weights, the trainer's model.compute_weights)",
    "fast-cwr": "as fast-cw, with the DiT's residual stream in the autocast dtype (as fast-bf16r; in fp16 the "
                "fastest DiT-XL/2 trainer setting within the 1e-2 numerics bound, docs/benchmarks.md run 25)",
    "fast-quack": "as fast-cw, with the blocks' forward and input-gradient GEMMs (GELU epilogues included) on "
                  "QuACK's CuTe DSL kernels (DiT.set_gemm_backend('quack'), the trainer's model.gemm_backend=quack)",
    "fast-sg": "as fast-lnk (UNets: fast-cg), with the whole training step (compiled forward + backward and the "
               "fused AdamW step) captured in one CUDA graph (dit.utils.cuda_graph.StepGraph, the trainer's "
               "train.cuda_graph) instead of cudagraph trees around the forward and the backward",
    "fast-sgcl": "as fast-sg, with the model and inputs in channels-last memory format (UNets: as fast-cl, in one "
                 "graph of the whole step)",
    "fast-sgclbm": "as fast-sgcl, with cuDNN's convolution algorithms chosen by timing each shape "
                   "(torch.backends.cudnn.benchmark)",
    "fast-sggn": "as fast-sg, with every GroupNorm (+ AdaGN + SiLU) computed from per-channel moments "
                 "(UNet.set_moment_norm), in NCHW",
    "fast-sgclgn": "as fast-sgclbm, with every GroupNorm (+ AdaGN + SiLU) computed from per-channel moments "
                   "(UNet.set_moment_norm: no NCHW copy of the channels-last activations around each norm)",
    "fast-sgclgk": "as fast-sgclgn, with every GroupNorm (+ AdaGN + SiLU) in Triton kernels, forward and backward "
                   "(UNet.set_moment_norm(kernels=True): dit.models.norm_kernels.group_norm_act)",
    "fast-sgclgkfa": "as fast-sgclgk, with the attention blocks' backward in Triton kernels on the packed qkv output "
                     "(UNet.set_fused_attention, as the DiTs' fast-fa)",
    "fast-sgc": "as fast-sg, with Inductor's combo kernels (independent small kernels of the step horizontally fused "
                "into one launch; model.compile_options={combo_kernels: true})",
    "fast-sga": "as fast-sg, with Inductor's aggressive fusion (nodes fused even without shared reads; "
                "model.compile_options={aggressive_fusion: true})",
    "fast-unfused-gelu": "as fast-cg, with the inference MLP's fc1 GEMM and GELU as two kernels (Mlp.fused_inference "
                         "= False), the ablation of the cuBLASLt GELU epilogue",
    "fast-mea": "as fast-cg, with only the memory-efficient (CUTLASS) SDPA backend allowed",
    "fast-fp8": "as fast-cg, with the DiT blocks' qkv/proj/fc1/fc2 GEMMs in FP8 (dit.models.fp8.Float8Linear: "
                "E4M3 activations and weights, E5M2 gradients, dynamic per-tensor scales), forward and backward",
    "fast-fp8r": "as fast-lnk, with the DiT blocks' qkv/proj/fc1/fc2 GEMMs trained in FP8 with per-row scales "
                 "(Float8Linear recipe 'rowwise': E4M3 forward and input-gradient GEMMs, bf16 weight gradient)",
    "fast-fp8s": "as fast-fp8, with static FP8 scales for inference (dit.models.fp8.calibrate_float8 on 8 timesteps "
                 "of random latents, weights cast once): forward and sampling; training scales dynamically",
    "fast-fp8s-unfused": "as fast-fp8s, with the DiT's plain block forward at inference (DiT.fused_inference = "
                         "False): Inductor's LayerNorm/GELU/FP8-cast kernels (run 6's fast-fp8s)",
    "fast-fp8s-promoted": "as fast-fp8s, with the inference GEMMs accumulating with fp32 promotion "
                          "(Float8Linear.fast_accum = False; run 6's GEMMs)",
    "fast-bm": "as fast-cg, with cuDNN's convolution algorithms chosen by benchmarking each shape "
               "(torch.backends.cudnn.benchmark = True) instead of its heuristics (the UNet)",
    "fast-mk": "as fast-cg, with Inductor's multi-kernel reductions (persistent and looped variants compiled, the "
               "faster chosen by benchmarking at run time)",
    "fast-at": "as fast-cg, with max-autotune: Triton GEMM templates benchmarked against cuBLAS per shape, "
               "epilogues (bias, GELU, residual) fused into the chosen GEMMs",
}

@dataclasses.dataclass
class Result:
    model: str
    variant: str
    params_m: float
    gflops: float  # forward GFLOP per image (2 per multiply-add)
    train_img_s: float = float("nan")
    train_peak_gib: float = float("nan")
    train_mfu: float = float("nan")
    fwd_img_s: float = float("nan")
    fwd_peak_gib: float = float("nan")
    fwd_mfu: float = float("nan")
    rel_err: float = float("nan")  # the variant's output (autocast in `amp`) vs fp32 eager output, ||a - b|| / ||b||
    amp: str = "bf16"  # the autocast dtype of every variant but ref-tf32 (run_benchmarks' amp)
    compile_s: float = 0.0
    # --profile: GPU kernel time per training step by category (ms), the step's wall time, the top kernels
    train_kernels_ms: dict = dataclasses.field(default_factory=dict)
    train_top_kernels: list = dataclasses.field(default_factory=list)
    train_gaps: dict = dataclasses.field(default_factory=dict)  # --profile: ``timeline_gaps`` of the training step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> float:
    """Median seconds per call over ``iters`` timed calls (CUDA events on GPU), after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def time_back_to_back(fn: Callable[[], object], iters: int = 20, warmup: int = 3) -> float:
    """Milliseconds per call of ``fn`` over ``iters`` back-to-back calls between two CUDA events, after ``warmup``
    calls: a kernel's throughput when nothing waits between launches (the probes in scripts/). GPU only."""
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters


def attention_errors(n: int, t: int, heads: int, dh: int, seed: int = 0) -> dict[str, float]:
    """GPU: relative Frobenius errors against float64 of ``attention_kernels.packed_attention`` in bf16 (cuDNN's
    forward, the Triton backward) and of cuDNN's own backward through SDPA, on random qkv (N, T, 3 * H * Dh) and
    output gradient. Keys: lse, o, bias (the partials' sum), dq/dk/dv (ours), dq/dk/dv_cudnn."""
    from dit.models import attention_kernels as A

    g = torch.Generator(device="cuda").manual_seed(seed)
    qkv = (torch.randn(n, t, 3 * heads * dh, device="cuda", generator=g) * 1.5).bfloat16().requires_grad_()
    do = torch.randn(n, t, heads * dh, device="cuda", generator=g).bfloat16()
    o, lse = A.packed_attention_fwd(qkv, heads)
    (ours,) = torch.autograd.grad(o, qkv, do)
    _, part = A.packed_attention_bwd(qkv.detach(), o.detach(), lse, do, heads)
    q64 = qkv.detach().double().requires_grad_()
    o64, lse64 = A._forward_ref(q64, heads)
    (want,) = torch.autograd.grad(o64, q64, do.double())
    q, k, v = A._split(qkv, heads)
    (cudnn,) = torch.autograd.grad(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, t, -1), qkv, do)

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a.double() - b).norm() / b.norm()).item()

    errs = {"lse": rel(lse, lse64), "o": rel(o, o64), "bias": rel(part.sum((0, 1)), want.sum((0, 1)))}
    for i, name in enumerate(("dq", "dk", "dv")):
        ref = want.view(n, t, 3, -1)[:, :, i]
        errs[name] = rel(ours.view(n, t, 3, -1)[:, :, i], ref)
        errs[name + "_cudnn"] = rel(cudnn.view(n, t, 3, -1)[:, :, i], ref)
    return errs


def kernel_breakdown(fn: Callable[[], object], device: torch.device, iters: int = 3, top: int = 12,
                     gaps: dict | None = None) -> tuple[dict[str, float], list[tuple[str, float, int]]]:
    """Profile ``iters`` calls of ``fn``: device kernel ms per call by ``KERNEL_CATEGORIES`` (plus ``wall`` = CUDA-event
    ms per call and ``idle`` = wall - sum of kernels, i.e. where the GPU waited), and the ``top`` kernels as
    (name, ms per call, launches per call). ``gaps``: a dict to fill with ``timeline_gaps`` of the same profile (which
    activities the idle time precedes). Call after warm-up (compiled graphs built). GPU only."""
    from torch.profiler import ProfilerActivity, profile

    _sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        wall = time_back_to_back(fn, iters, warmup=0)
    cats, kernels, timeline = summarize(prof, iters, top=top)
    if gaps is not None:
        gaps.update(timeline)
    cats["idle"] = wall - sum(cats.values())
    cats["wall"] = wall
    return cats, kernels


def matmul_ceiling(device: torch.device, n: int = 8192) -> float:
    """Measured bf16 dense matmul rate in TFLOP/s (random operands, median of 20)."""
    if device.type != "cuda":
        n = 512
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    sec = time_fn(lambda: a @ b, device, warmup=5, iters=20)
    return 2 * n**3 / sec / 1e12


def _cond_kwargs(model: torch.nn.Module, n: int, device: torch.device, gen: torch.Generator) -> dict:
    if model.conditioning == "class":
        return {"y": torch.randint(0, model.num_classes, (n,), device=device, generator=gen)}
    if model.conditioning == "text":
        L = 32
        ctx = torch.randn(n, L, model.context_dim, device=device, generator=gen)
        mask = torch.ones(n, L, dtype=torch.bool, device=device)
        return {"context": ctx, "context_mask": mask}
    return {}


def forward_gflops(model: torch.nn.Module, device: torch.device) -> float:
    """Forward GFLOP per image at the model's input size (torch's counter: 2 FLOPs per multiply-add)."""
    x = torch.randn(1, model.in_channels, model.input_size, model.input_size, device=device)
    t = torch.zeros(1, dtype=torch.long, device=device)
    cond = _cond_kwargs(model, 1, device, torch.Generator(device=device).manual_seed(0))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x, t, **cond)
    return counter.get_total_flops() / 1e9


def _randomise_zero_init(model: torch.nn.Module, seed: int = 0) -> None:
    """adaLN-Zero models output exactly zero at init; give every parameter a small random value for numerics checks."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and p.abs().max() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


# Variants that build on one another (VARIANTS' "as ..."): each group holds its base and everything derived from it.
_COMPUTE_WEIGHTS = ("fast-cw", "fast-cwr", "fast-quack")  # the optimizer kernel's 16-bit weight copies
_LOW_PRECISION_RESIDUAL = ("fast-bf16r", "fast-cwr")  # the DiT's residual stream in the autocast dtype
_OPTIMIZER_KERNEL = ("fast-fao", *_COMPUTE_WEIGHTS)  # the trainer's AdamW kernel
_FUSED_ATTENTION = ("fast-fa", *_OPTIMIZER_KERNEL)  # cuDNN / Triton attention on the packed qkv
_MLP_EPILOGUES = ("fast-mlp", "fast-mlpq", *_FUSED_ATTENTION)  # cuBLASLt GELU epilogues
_FUSED_TRAINING = ("fast-lnk", "fast-fp8r", *_MLP_EPILOGUES)  # the fused LayerNorm-modulate block


def unknown_names_error(option: str, names: list[str], valid) -> str | None:
    """The one-line message for ``names`` given to ``option`` that are not in ``valid`` (or for none given), else
    None: the tools check their lists before any (paid) GPU time starts."""
    unknown = [n for n in names if n not in valid]
    if unknown or not names:
        return f"{option}: unknown {', '.join(map(repr, unknown)) or 'none given'}; valid: {', '.join(valid)}"
    return None


def parse_model_overrides(text: str | None, models: list[str]) -> dict:
    """``--model-overrides`` (a YAML mapping of constructor keywords, or None) as a dict, checked by building every
    model with it on the meta device (no memory); a one-line ValueError for YAML that is not a mapping or for
    keywords a model does not take."""
    if text is None:
        return {}
    try:
        overrides = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(f"--model-overrides: not valid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(overrides, dict):
        raise ValueError(f"--model-overrides: expected a YAML mapping such as \"{{depth: 6}}\", got {text!r}")
    for name in models:
        try:
            with torch.device("meta"):
                create_model(name, **overrides)
        except (TypeError, ValueError, AssertionError) as e:
            raise ValueError(f"--model-overrides {text!r} for {name}: {' '.join(str(e).split())}") from None
    return overrides


def _prepare(name: str, variant: str, device: torch.device, overrides: dict):
    torch.backends.cuda.matmul.allow_tf32 = variant == "ref-tf32"
    torch.backends.cudnn.allow_tf32 = variant == "ref-tf32"
    torch.backends.cudnn.benchmark = variant in ("fast-bm", "fast-sgclbm", "fast-sgclgn", "fast-sgclgk",
                                                 "fast-sgclgkfa")
    with torch.random.fork_rng(devices=[]):  # the same weights for every variant (and run), the caller's RNG untouched
        torch.manual_seed(0)
        model = create_model(name, **overrides)
    _randomise_zero_init(model)
    model = model.to(device)
    if variant in _CHANNELS_LAST:
        model = model.to(memory_format=torch.channels_last)
    if variant in ("fast-sggn", "fast-sgclgn", "fast-sgclgk", "fast-sgclgkfa"):
        if not hasattr(model, "set_moment_norm"):
            raise ValueError(f"variant {variant}: {name} has no GroupNorm to compute from moments (UNets only)")
        model.set_moment_norm(True, kernels=variant in ("fast-sgclgk", "fast-sgclgkfa"))
    if variant == "fast-sgclgkfa":
        model.set_fused_attention(True)
    if variant == "fast-unfused-gelu":
        for m in model.modules():
            if isinstance(m, Mlp):
                m.fused_inference = False
    if variant == "fast-fp8s-unfused":
        if not hasattr(model, "fused_inference"):
            raise ValueError(f"variant {variant}: {name} has no fused inference path (DiTs only)")
        model.fused_inference = False
    if variant in ("fast-fp8", "fast-fp8s", "fast-fp8s-unfused", "fast-fp8s-promoted"):
        from dit.models.fp8 import calibrate_float8, convert_to_float8

        if convert_to_float8(model) == 0:
            raise ValueError(f"variant {variant}: {name} has no DiT block linears to convert (DiTs only)")
        if variant != "fast-fp8":
            calibrate_float8(model, lambda: _calibration_passes(model, device))
        if variant == "fast-fp8s-promoted":
            for m in model.modules():
                if hasattr(m, "fast_accum"):
                    m.fast_accum = False
    if variant == "fast-fp8r":
        from dit.models.fp8 import convert_to_float8

        if convert_to_float8(model, recipe="rowwise") == 0:
            raise ValueError(f"variant {variant}: {name} has no DiT block linears to convert (DiTs only)")
    if variant in _MLP_EPILOGUES:
        from dit.models.cublaslt import gelu_epilogues_available

        if not hasattr(model, "set_mlp_epilogues"):
            raise ValueError(f"variant {variant}: {name} has no MLP epilogue option (DiTs only)")
        if not gelu_epilogues_available(device):
            raise ValueError(f"variant {variant}: cuBLASLt GELU epilogues unavailable on {device}")
        model.set_mlp_epilogues(True)
    if variant == "fast-mlpq":
        model.set_fused_qkv_backward(True)
    if variant in _FUSED_ATTENTION:
        model.set_fused_attention(True)
    if variant == "fast-quack":
        from dit.models.quack_gemm import check_backend

        check_backend("quack", device)
        model.set_gemm_backend("quack")
    if variant in _FUSED_TRAINING:
        if not hasattr(model, "fused_training"):
            raise ValueError(f"variant {variant}: {name} has no fused training forward (DiTs only)")
        model.fused_training = True
    if variant.startswith("fast-sg") and hasattr(model, "fused_training"):  # DiTs: as fast-lnk; UNets: as fast-cg
        model.fused_training = True
    if variant in _LOW_PRECISION_RESIDUAL:
        if not hasattr(model, "set_low_precision_residual"):
            raise ValueError(f"variant {variant}: {name} has no low-precision residual option (DiTs only)")
        model.set_low_precision_residual(True)
    # dynamic=False: the numerics check (batch 8) and the timed runs use different batch sizes; a dynamic-shape
    # recompile of the whole loss failed on DiT-XL/2 in torch 2.11 (symbolic batch size in randn).
    if variant == "compile":
        fwd = torch.compile(model, dynamic=False)
    elif variant.startswith("fast"):
        # Sampling calls the same shapes again and again: CUDA graphs remove the per-kernel launch cost.
        fwd = torch.compile(model, dynamic=False, **compile_settings(variant, device, training=False))
    else:
        fwd = model
    autocast = variant != "ref-tf32"
    return model, fwd, autocast


def _calibration_passes(model: torch.nn.Module, device: torch.device, batch: int = 32, steps: int = 8) -> None:
    """Forward passes (bf16 autocast, eval) over random latents at ``steps`` timesteps spread over [0, 999], drawn
    from their own generator (not the numerics check's inputs): what ``calibrate_float8`` records."""
    gen = torch.Generator(device=device).manual_seed(1234)
    was_training = model.training
    model.eval()
    C, S = model.in_channels, model.input_size
    with torch.autocast(device.type, dtype=torch.bfloat16):
        for t in torch.linspace(0, 999, steps).round().long().tolist():
            x = torch.randn(batch, C, S, S, device=device, generator=gen)
            model(x, torch.full((batch,), t, device=device), **_cond_kwargs(model, batch, device, gen))
    model.train(was_training)


def compile_settings(variant: str, device: torch.device, *, training: bool) -> dict:
    """``torch.compile`` keyword arguments (``mode`` or ``options``) of a ``fast*`` variant.

    Every variant but training-``fast`` uses CUDA graphs (cudagraph trees): sampling and, for ``fast-*``, the training
    forward + backward replay their kernels without per-kernel launches; the fused AdamW step stays outside the graph.
    ``fast-cd`` adds coordinate-descent tuning and pointwise/reduction autotuning (the memory-bound kernels that are
    ~45% of a DiT-S/2 step); ``fast-at`` is max-autotune (Triton GEMM templates with fused prologues/epilogues,
    benchmarked against cuBLAS per shape: minutes of compilation).
    """
    if device.type != "cuda" or (training and variant == "fast"):
        return {}
    if training and variant in _STEP_GRAPH_OPTIONS:  # one CUDA graph of its own (StepGraph), no cudagraph trees
        return {"options": _STEP_GRAPH_OPTIONS[variant]} if _STEP_GRAPH_OPTIONS[variant] else {}
    if variant == "fast-at":
        return {"mode": "max-autotune"}
    if variant == "fast-mk":
        return {"options": {"triton.cudagraphs": True, "triton.multi_kernel": 1}}
    if variant == "fast-cd":
        return {"options": {"triton.cudagraphs": True, "coordinate_descent_tuning": True,
                            "max_autotune_pointwise": True}}
    return {"mode": "reduce-overhead"}


_SDPA_ONLY = {"fast-cudnn": "cudnn", "fast-flash": "flash", "fast-mea": "efficient"}
_STEP_GRAPH_OPTIONS = {"fast-sg": {}, "fast-sgcl": {}, "fast-sgclbm": {}, "fast-sggn": {}, "fast-sgclgn": {},
                       "fast-sgclgk": {}, "fast-sgclgkfa": {},
                       "fast-sgc": {"combo_kernels": True},
                       "fast-sga": {"aggressive_fusion": True}}
_CHANNELS_LAST = ("fast-cl", "fast-sgcl", "fast-sgclbm", "fast-sgclgn", "fast-sgclgk", "fast-sgclgkfa")


@contextlib.contextmanager
def attention_backend(variant: str, device: torch.device):
    """fast-cudnn / fast-flash: only that fused-attention kernel may serve SDPA (flags read when the graph is
    traced, so they are set around the whole measurement)."""
    only = _SDPA_ONLY.get(variant)
    if only is None or device.type != "cuda":
        yield
        return
    flags = (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled(),
             torch.backends.cuda.math_sdp_enabled(), torch.backends.cuda.cudnn_sdp_enabled())
    torch.backends.cuda.enable_flash_sdp(only == "flash")
    torch.backends.cuda.enable_mem_efficient_sdp(only == "efficient")
    torch.backends.cuda.enable_math_sdp(False)
    torch.backends.cuda.enable_cudnn_sdp(only == "cudnn")
    try:
        yield
    finally:
        torch.backends.cuda.enable_flash_sdp(flags[0])
        torch.backends.cuda.enable_mem_efficient_sdp(flags[1])
        torch.backends.cuda.enable_math_sdp(flags[2])
        torch.backends.cuda.enable_cudnn_sdp(flags[3])


def bench_one(name: str, variant: str, *, device: torch.device, **kwargs) -> Result:
    """Measure one (model, variant): numerics vs fp32, forward img/s and training img/s (see ``_bench_one``)."""
    with attention_backend(variant, device):
        return _bench_one(name, variant, device=device, **kwargs)


def _bench_one(
    name: str,
    variant: str,
    *,
    device: torch.device,
    train_batch: int,
    fwd_batch: int,
    ceiling_tflops: float,
    overrides: dict,
    warmup: int = 5,
    iters: int = 20,
    do_train: bool = True,
    do_fwd: bool = True,
    profile: bool = False,
    profile_top: int = 12,
    amp: str = "bf16",
) -> Result:
    model, fwd, autocast = _prepare(name, variant, device, overrides)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    gflops = forward_gflops(model, device)
    res = Result(model=name, variant=variant, params_m=params, gflops=gflops, amp=amp)
    amp_dtype = AUTOCAST_DTYPES[amp]
    gen = torch.Generator(device=device).manual_seed(0)
    diffusion = create_diffusion(timestep_respacing="", learn_sigma=model.learn_sigma)
    amp = torch.autocast(device.type, dtype=amp_dtype, enabled=autocast)
    C, S = model.in_channels, model.input_size
    # channels-last measured slower for the UNet in eager mode (docs/unet.md); fast-cl tries it compiled
    mf = torch.channels_last if variant in _CHANNELS_LAST else torch.contiguous_format

    # Numerics: the variant's output against the fp32 eager model (same weights), relative L2 error. eval() so that
    # label dropout (random in train mode) does not differ between the two calls. Checked at the forward batch size,
    # so a compiled variant's graph (static shapes) is the one timed below, not a second compilation.
    if do_fwd:  # training-only runs (exploration) skip this, the forward compilation and timing
        model.eval()
        nb = fwd_batch
        with torch.no_grad():
            x = torch.randn(nb, C, S, S, device=device, generator=gen)
            t = torch.randint(0, 1000, (nb,), device=device, generator=gen)
            cond = _cond_kwargs(model, nb, device, gen)
            torch.backends.cuda.matmul.allow_tf32 = False
            ref = model(x, t, **cond).float()
            torch.backends.cuda.matmul.allow_tf32 = variant == "ref-tf32"
            t0 = time.perf_counter()
            with amp:
                out = fwd(x.contiguous(memory_format=mf), t, **cond).float()
            res.compile_s = time.perf_counter() - t0
            res.rel_err = ((out - ref).norm() / ref.norm()).item()

    if do_fwd:
        x = torch.randn(fwd_batch, C, S, S, device=device, generator=gen).contiguous(memory_format=mf)
        t = torch.randint(0, 1000, (fwd_batch,), device=device, generator=gen)
        cond = _cond_kwargs(model, fwd_batch, device, gen)

        def fwd_step():
            with torch.inference_mode(), amp:
                fwd(x, t, **cond)

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        sec = time_fn(fwd_step, device, warmup, iters)
        res.fwd_img_s = fwd_batch / sec
        res.fwd_mfu = gflops * 1e9 * fwd_batch / sec / (ceiling_tflops * 1e12)
        if device.type == "cuda":
            res.fwd_peak_gib = torch.cuda.max_memory_allocated(device) / 2**30

    if do_train:
        model.train()
        fused = device.type == "cuda" and variant != "ref-tf32" and variant != "eager-bf16"
        step_graph = variant in _STEP_GRAPH_OPTIONS and device.type == "cuda"
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, fused=fused, foreach=not fused,
                                capturable=step_graph)
        x = torch.randn(train_batch, C, S, S, device=device, generator=gen).contiguous(memory_format=mf)
        cond = _cond_kwargs(model, train_batch, device, gen)

        def loss_fn(x, t, cond):
            with amp:
                return diffusion.training_losses(model if whole_loss else fwd, x, t, model_kwargs=cond)[
                    "loss"].mean()

        whole_loss = variant.startswith("fast")
        if whole_loss:
            with torch.no_grad():  # fill the diffusion's per-device coefficient tables outside the traced region
                loss_fn(x, torch.zeros(train_batch, dtype=torch.long, device=device), cond)
            # One graph for the network and the diffusion terms (q_sample, MSE, VLB): fuses the small elementwise
            # ops around the model that eager mode launches one by one.
            # fast-cg: CUDA graphs replay the forward and backward kernels without per-kernel launches (cudagraph
            # trees); the fused AdamW step stays outside the graph.
            loss_fn = torch.compile(loss_fn, dynamic=False, **compile_settings(variant, device, training=True))

        step_fn = opt.step
        if variant in _OPTIMIZER_KERNEL and device.type == "cuda":  # the trainer's optimizer kernel
            from dit.optim import AdamWEMA

            kernel = AdamWEMA(opt)
            if not kernel.fused:
                raise ValueError(f"variant {variant}: the AdamW kernel does not run here ({kernel.reason})")
            if variant in _COMPUTE_WEIGHTS:
                kernel.keep_compute_copies(model.set_compute_weights(amp_dtype))
            step_fn = kernel.step
        # fp16: a static loss scale keeps the small gradients representable; the fused optimizers divide it out as
        # they read the gradients (the trainer's GradScaler does the same with a dynamic scale). The unfused
        # baselines step on unscaled fp16 gradients: the same kernels, so the same timing.
        loss_scale = None
        if amp_dtype == torch.float16 and autocast and fused:
            loss_scale = opt.grad_scale = torch.tensor(2.0**12, device=device)

        def update(t):
            loss = loss_fn(x, t, cond)
            (loss if loss_scale is None else loss * loss_scale).backward()
            step_fn()
            opt.zero_grad(set_to_none=True)

        graphed = StepGraph(update) if step_graph else update

        def train_step():
            graphed(t=torch.randint(0, diffusion.num_timesteps, (train_batch,), device=device))

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        sec = time_fn(train_step, device, warmup, iters)
        res.train_img_s = train_batch / sec
        # Training costs about 3x the forward (forward + backward of activations and weights).
        res.train_mfu = 3 * gflops * 1e9 * train_batch / sec / (ceiling_tflops * 1e12)
        if device.type == "cuda":
            res.train_peak_gib = torch.cuda.max_memory_allocated(device) / 2**30
        if profile and device.type == "cuda":
            res.train_kernels_ms, res.train_top_kernels = kernel_breakdown(train_step, device, top=profile_top,
                                                                           gaps=res.train_gaps)
        del opt
    del model, fwd
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return res


def environment() -> dict:
    env = {
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu",
    }
    if torch.cuda.is_available():
        env["cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version()
    return env


def markdown_table(results: list[Result], baseline: str = "eager-bf16") -> str:
    base = {r.model: r for r in results if r.variant == baseline}
    rows = [
        "| model | variant | params (M) | fwd GFLOP | train img/s | x base | train MFU | train mem GiB "
        "| fwd img/s | x base | fwd MFU | rel err vs fp32 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        b = base.get(r.model)
        tr = r.train_img_s / b.train_img_s if b and b.train_img_s == b.train_img_s else float("nan")
        fr = r.fwd_img_s / b.fwd_img_s if b and b.fwd_img_s == b.fwd_img_s else float("nan")
        rows.append(
            f"| {r.model} | {r.variant}{'' if r.amp == 'bf16' else f' ({r.amp})'} | {r.params_m:.1f} | {r.gflops:.1f} "
            f"| {r.train_img_s:,.0f} | {tr:.2f} "
            f"| {r.train_mfu:.1%} | {r.train_peak_gib:.1f} | {r.fwd_img_s:,.0f} | {fr:.2f} | {r.fwd_mfu:.1%} "
            f"| {r.rel_err:.1e} |"
        )
    return "\n".join(rows)


def kernel_table(results: list[Result]) -> str:
    """Markdown: GPU kernel time per training step by category (``--profile``), one row per (model, variant)."""
    prof = [r for r in results if r.train_kernels_ms]
    if not prof:
        return ""
    cats = [c for c, _ in KERNEL_CATEGORIES] + ["other", "idle"]
    rows = ["| model | variant | step ms | " + " | ".join(cats) + " |", "|---|---|" + "---:|" * (len(cats) + 1)]
    for r in prof:
        k = r.train_kernels_ms
        rows.append(f"| {r.model} | {r.variant} | {k['wall']:.1f} | "
                    + " | ".join(f"{k.get(c, 0.0):.1f}" for c in cats) + " |")
    return "\n".join(rows)


def _pyplot():
    """matplotlib's pyplot on the headless Agg backend (set here, when a plot is made, never at import)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_kernel_breakdown(results: list[Result], path: Path) -> Path | None:
    """Stacked bars: GPU ms per training step by kernel category (``--profile``), one bar per (model, variant)."""
    prof = [r for r in results if r.train_kernels_ms]
    if not prof:
        return None
    plt = _pyplot()
    cats = [c for c, _ in KERNEL_CATEGORIES] + ["other", "idle"]
    fig, ax = plt.subplots(figsize=(3.8 + 1.3 * len(prof), 4.5))
    labels = [f"{r.model}\n{r.variant}" for r in prof]
    bottom = [0.0] * len(prof)
    for c in cats:
        # shares of the step, so models of different sizes fit one axis
        vals = [max(r.train_kernels_ms.get(c, 0.0), 0.0) / r.train_kernels_ms["wall"] * 100 for r in prof]
        if any(v > 0 for v in vals):
            ax.bar(labels, vals, bottom=bottom, label=c)
            bottom = [b + v for b, v in zip(bottom, vals)]
    for i, r in enumerate(prof):
        ax.annotate(f"{r.train_kernels_ms['wall']:.0f} ms", (i, min(bottom[i], 100) + 1), ha="center", fontsize=8)
    ax.set_ylabel("% of the training step (GPU kernel time)")
    ax.set_ylim(0, 112)
    ax.set_title("Where a training step's GPU time goes")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    _save(fig, path)
    return path


def plot_sampling(rows: list[dict], path: Path) -> Path:
    """Bars: GPU-hours for 50k images x 250 DDPM steps + decode, per (model, variant) and guidance plan."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(2.5 + 1.6 * sum(len(r["plans"]) for r in rows), 4.2))
    labels, hours = [], []
    for r in rows:
        for name, plan in r["plans"].items():
            labels.append(f"{r['model']} {r['variant']}\n{name}")
            hours.append(plan["gpu_hours"])
    bars = ax.bar(labels, hours, color="tab:blue")
    for b, h in zip(bars, hours):
        ax.annotate(f"{h:.2f}", (b.get_x() + b.get_width() / 2, h), ha="center", va="bottom", fontsize=8)
    ax.axhline(2.0, color="tab:red", ls="--", lw=1, label="target: 2 GPU-hours")
    ax.set_ylabel("GPU-hours, 50k images x 250 steps + decode")
    ax.tick_params(axis="x", labelsize=7)
    ax.legend(fontsize=8)
    _save(fig, path)
    return path


def plot(results: list[Result], path: Path) -> None:
    """img/s and memory vs forward GFLOPs, DiT vs UNet, best variant per model."""
    plt = _pyplot()
    best: dict[str, Result] = {}
    for r in results:
        if r.model not in best or (r.train_img_s > best[r.model].train_img_s):
            best[r.model] = r
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for fam, marker in (("DiT", "o"), ("UNet", "s")):
        rs = sorted((r for r in best.values() if r.model.startswith(fam)), key=lambda r: r.gflops)
        if not rs:
            continue
        g = [r.gflops for r in rs]
        axes[0].plot(g, [r.train_img_s for r in rs], marker=marker, label=fam)
        axes[1].plot(g, [r.fwd_img_s for r in rs], marker=marker, label=fam)
        axes[2].plot(g, [r.train_peak_gib for r in rs], marker=marker, label=fam)
        for r in rs:
            axes[0].annotate(r.model, (r.gflops, r.train_img_s), fontsize=7)
    for ax, title in zip(axes, ("training img/s (best variant)", "forward img/s (bf16)", "training peak memory GiB")):
        ys = [y for line in ax.get_lines() for y in line.get_ydata() if y == y and y > 0]
        if not ys:  # nothing measured (e.g. --train-only leaves the forward empty; memory is GPU only)
            ax.set_title(title + ": not measured")
            continue
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("forward GFLOP / image")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    _save(fig, path)


def run_benchmarks(
    models: list[str],
    variants: list[str],
    *,
    train_batch: dict[str, int] | int = 64,
    fwd_batch: int = 256,
    iters: int = 20,
    warmup: int = 5,
    overrides: dict | None = None,
    json_out: Path | None = None,
    profile: bool = False,
    do_fwd: bool = True,
    do_train: bool = True,
    profile_top: int = 12,
    amp: str = "bf16",
) -> tuple[dict, list[Result]]:
    """Measure every (model, variant) pair, every variant but ref-tf32 under autocast in ``amp`` (an
    ``AUTOCAST_DTYPES`` name: bf16 or fp16); returns (environment incl. matmul ceiling, results)."""
    if amp not in AUTOCAST_DTYPES:
        raise ValueError(f"amp: expected one of {', '.join(AUTOCAST_DTYPES)}, got {amp!r}")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; valid: {', '.join(VARIANTS)}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = environment()
    env["matmul_tflops"] = matmul_ceiling(device)
    print(f"[bench] {env}", flush=True)
    results = []
    for name in models:
        for v in variants:
            tb = train_batch.get(name, 64) if isinstance(train_batch, dict) else train_batch
            t0 = time.perf_counter()
            try:
                r = bench_one(name, v, device=device, train_batch=tb, fwd_batch=fwd_batch,
                              ceiling_tflops=env["matmul_tflops"], overrides=overrides or {}, warmup=warmup,
                              iters=iters, profile=profile, do_fwd=do_fwd, do_train=do_train,
                              profile_top=profile_top, amp=amp)
            except torch.cuda.OutOfMemoryError:
                print(f"[bench] {name} {v}: out of memory", flush=True)
                torch.cuda.empty_cache()
                continue
            except Exception as e:  # one broken variant must not cost the rest of a (paid) GPU session
                print(f"[bench] {name} {v}: FAILED {type(e).__name__}: {' '.join(str(e).split())[:300]}", flush=True)
                continue
            results.append(r)
            print(f"[bench] {name:10s} {v:11s} train {r.train_img_s:9.1f} img/s (b={tb}, MFU {r.train_mfu:.1%}) "
                  f"fwd {r.fwd_img_s:9.1f} img/s (MFU {r.fwd_mfu:.1%}) err {r.rel_err:.1e} "
                  f"[{time.perf_counter() - t0:.0f}s]", flush=True)
            if r.train_kernels_ms:
                print(f"[bench] {name} {v} kernel ms per training step: "
                      + ", ".join(f"{k} {ms:.1f}" for k, ms in r.train_kernels_ms.items()), flush=True)
                for kname, ms, count in r.train_top_kernels:
                    print(f"[bench]     {ms:7.2f} ms  x{count:<4d} {kname}", flush=True)
            if r.train_gaps:
                g = r.train_gaps
                print(f"[bench] {name} {v} GPU gaps per step: {g['gap_ms']:.2f} ms; by size "
                      + ", ".join(f"{k} {c:g} x = {ms:.2f} ms" for k, (c, ms) in g["buckets"].items())
                      + "; most idle before: " + "; ".join(f"{n[:60]} {ms:.2f} ms" for n, ms in g["before"][:3]),
                      flush=True)
            if json_out is not None:
                json_out.write_text(json.dumps({"env": env, "results": [dataclasses.asdict(x) for x in results]},
                                               indent=1))
    return env, results


def bench_step_ops(name: str, *, device: torch.device, warmup: int = 3, iters: int = 20, mlp_rows: int = 512,
                   overrides: dict | None = None) -> dict[str, float]:
    """Milliseconds per call (median) of the per-step work around the network, on ``name``'s real parameter set.

    EMA updates and gradient clipping as the trainer does them against the simpler forms they replaced (each with a
    fused AdamW step, since the clip factor now rides in the step), and, for models with a transformer MLP, the fc1
    GEMM with and without the GELU epilogue at a sampling batch of ``mlp_rows`` images (bf16).
    """
    from dit.optim import AdamWEMA
    from dit.train import clip_in_fused_step, ema_update_unless
    from dit.utils.ema import EMA, shard_pairs

    torch.manual_seed(0)
    model = create_model(name, **(overrides or {})).to(device)
    ema = EMA(model, 0.9999)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = torch.optim.AdamW(params, lr=1e-9, fused=device.type in ("cuda", "cpu"))
    dst, src = shard_pairs(ema.module, model)
    skip = torch.zeros((), dtype=torch.bool, device=device)

    def ema_three_ops():  # the trainer's update before run 5
        w = (~skip).float() * 1e-4
        diff = torch._foreach_sub(src, dst)
        torch._foreach_mul_(diff, w)
        torch._foreach_add_(dst, diff)

    def clip_then_step():
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        opt.step()

    def clip_in_step():
        clip_in_fused_step(params, 1.0, opt)
        opt.step()

    ema_of = dict(zip(model.parameters(), dst))
    one_pass = AdamWEMA(opt, [ema_of[p] for p in params])

    def step_then_ema():  # train.fused_adamw_ema=false
        clip_in_fused_step(params, 1.0, opt)
        opt.found_inf = skip.float()
        opt.step()
        ema_update_unless(ema, model, 0.9999, skip, (dst, src))

    def step_with_ema():  # the trainer on CUDA
        clip_in_fused_step(params, 1.0, opt)
        opt.found_inf = skip.float()
        one_pass.step(1e-4)

    ops = {
        "ema: sub + mul + add, device weight": ema_three_ops,
        "ema: one lerp, device weight (trainer)": lambda: ema_update_unless(ema, model, 0.9999, skip, (dst, src)),
        "ema: one lerp, float weight (cannot skip)": lambda: ema.update(model, 0.9999),
        "clip_grad_norm_ + AdamW step": clip_then_step,
        "norm + AdamW step with grad_scale (trainer before run 8)": clip_in_step,
        "norm + AdamW step, then EMA lerp (fused_adamw_ema=false)": step_then_ema,
    }
    if one_pass.fused:
        ops["norm + AdamW + EMA in one kernel (trainer)"] = step_with_ema
    mlp = next((m for m in model.modules() if isinstance(m, Mlp)), None)
    if mlp is not None and hasattr(model, "x_embedder"):
        dt = torch.bfloat16 if device.type == "cuda" else torch.float32
        rows = mlp_rows * model.x_embedder.num_patches
        x = torch.randn(rows, mlp.fc1.in_features, device=device, dtype=dt)
        w1, b1 = mlp.fc1.weight.detach().to(dt), mlp.fc1.bias.detach().to(dt)
        h = F.linear(x, w1, b1)
        ops.update({
            "mlp: fc1 GEMM + bias": lambda: F.linear(x, w1, b1),
            "mlp: fc1 GEMM + bias + GELU epilogue (sampling)": lambda: linear_gelu_tanh(x, w1, b1),
            "mlp: GELU kernel alone": lambda: F.gelu(h, approximate="tanh"),
        })
    with torch.no_grad():
        out = {k: 1e3 * time_fn(fn, device, warmup, iters) for k, fn in ops.items()}
    del model, ema, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


@dataclasses.dataclass
class SamplingResult:
    """Measured cost of one sampling step (DDPM, the full sampler loop around the model) and of decoding."""

    model: str
    variant: str
    batch: int  # images per batch (a guided step runs the model on 2 x batch)
    guided_step_s: float  # seconds per step with classifier-free guidance
    cond_step_s: float  # seconds per step with the conditional model alone (outside a guidance interval)
    decode_img_s: float = float("nan")  # autoencoder decode rate (bf16)
    decoder: str = ""
    # profile=True (GPU): kernel ms per guided step by category (+ wall, idle) and the top kernels, for the sampler
    # step and for the model call alone on the same 2 x batch rows (the difference is the sampler loop's own work)
    guided_kernels_ms: dict = dataclasses.field(default_factory=dict)
    model_kernels_ms: dict = dataclasses.field(default_factory=dict)
    guided_top_kernels: list = dataclasses.field(default_factory=list)


def sd_vae_decoder_for_timing() -> torch.nn.Module:
    """sd-vae-ft-ema's architecture (diffusers ``AutoencoderKL``: 4 levels 128-512 channels, 4 latent channels) with
    random weights: decode speed does not depend on the weights, and this works without the hub."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                         block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, sample_size=256)


def bench_sampling(name: str, variant: str, *, device: torch.device, batch: int = 256, steps: int = 20,
                   cfg_scale: float = 1.5, overrides: dict | None = None, decode: bool = True,
                   decode_batch: int = 64, repeats: int = 2, profile: bool = False,
                   profile_top: int = 25) -> SamplingResult:
    """Time ``steps`` DDPM steps of the real sampler loop (``p_sample_loop``) at ``batch`` images, once with
    classifier-free guidance at every step and once with the conditional model alone (what a step outside a guidance
    interval costs), after one untimed loop of each (compilation, CUDA-graph capture); plus the bf16 decode rate of
    sd-vae's decoder architecture when the model works on 4-channel latents. ``profile`` (GPU): where a guided
    step's GPU time goes, and the same for the model call alone (``kernel_breakdown``, per step)."""
    from dit.diffusion.guidance import classifier_free_guidance

    model, fwd, autocast = _prepare(name, variant, device, overrides or {})
    model.eval()
    diffusion = create_diffusion(timestep_respacing=str(steps), learn_sigma=model.learn_sigma)
    C, S = model.in_channels, model.input_size
    gen = torch.Generator(device=device).manual_seed(0)
    cond = _cond_kwargs(model, batch, device, gen)
    uncond = {"y": torch.full((batch,), model.num_classes, device=device)} if "y" in cond else {}
    guided = classifier_free_guidance(fwd, cfg_scale, uncond, pred_channels=C) if uncond else fwd
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast)

    def loop(fn) -> float:
        with torch.inference_mode(), amp:
            _sync(device)
            t0 = time.perf_counter()
            diffusion.p_sample_loop(fn, (batch, C, S, S), model_kwargs=cond, device=device, generator=gen)
            _sync(device)
            return time.perf_counter() - t0

    per_step = {}
    for key, fn in (("guided", guided), ("cond", fwd)):
        loop(fn)  # compile / capture
        per_step[key] = min(loop(fn) for _ in range(repeats)) / steps
    res = SamplingResult(model=name, variant=variant, batch=batch, guided_step_s=per_step["guided"],
                         cond_step_s=per_step["cond"])
    if profile and device.type == "cuda":
        rows = 2 * batch if uncond else batch  # what one guided step feeds the model
        x2 = torch.randn(rows, C, S, S, device=device, generator=gen)
        t2 = torch.full((rows,), diffusion.num_timesteps // 2, device=device)
        cond2 = {k: torch.cat([v, uncond[k]]) for k, v in cond.items()} if uncond else cond

        def model_steps():
            with torch.inference_mode(), amp:
                for _ in range(steps):
                    fwd(x2, t2, **cond2)

        model_steps()  # the model alone is another call pattern: let it settle first
        per = lambda d: {k: v / steps for k, v in d.items()}  # noqa: E731  (per loop -> per step)
        cats, top = kernel_breakdown(lambda: loop(guided), device, iters=1, top=profile_top)
        res.guided_kernels_ms = per(cats)
        res.guided_top_kernels = [(k, ms / steps, n / steps) for k, ms, n in top]
        res.model_kernels_ms = per(kernel_breakdown(model_steps, device, iters=1)[0])
    del model, fwd, guided
    if decode and C == 4 and device.type == "cuda":
        vae = sd_vae_decoder_for_timing().to(device).eval().to(memory_format=torch.channels_last)
        z = torch.randn(decode_batch, 4, S, S, device=device)

        def dec():
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
                vae.decode(z)

        res.decode_img_s = decode_batch / time_fn(dec, device, warmup=2, iters=5)
        res.decoder = f"sd-vae-ft-ema architecture, bf16, batch {decode_batch}, {8 * S} px"
        del vae
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return res


def sampling_plan(r: SamplingResult, *, n: int = 50_000, steps: int = 250, guided_fraction: float = 1.0) -> dict:
    """GPU-hours to sample ``n`` images with ``steps`` DDPM steps, a ``guided_fraction`` of them with guidance
    (1.0: every step; a guidance interval lowers it), plus decoding, from a ``bench_sampling`` measurement."""
    if not 0.0 <= guided_fraction <= 1.0:
        raise ValueError(f"guided_fraction must be in [0, 1], got {guided_fraction}")
    batches = n / r.batch
    step_s = guided_fraction * r.guided_step_s + (1.0 - guided_fraction) * r.cond_step_s
    sample_h = batches * steps * step_s / 3600
    decode_h = n / r.decode_img_s / 3600 if r.decode_img_s == r.decode_img_s else 0.0
    return {"sampling_gpu_hours": sample_h, "decode_gpu_hours": decode_h, "gpu_hours": sample_h + decode_h,
            "guided_steps": round(guided_fraction * steps)}


def sampling_budget(gflops: float, img_s_fwd: float, ceiling_tflops: float, n: int = 50_000, steps: int = 250,
                    cfg: bool = True) -> dict:
    """GPU-hours to sample ``n`` images with ``steps`` model calls each (CFG doubles the batch) at a measured forward
    rate, and the floor at 100% of the matmul ceiling."""
    calls = n * steps * (2 if cfg else 1)
    return {"forward_calls": calls, "gpu_hours": calls / img_s_fwd / 3600,
            "floor_gpu_hours": calls * gflops * 1e9 / (ceiling_tflops * 1e12) / 3600}


def sampling_table(results: list[Result], ceiling_tflops: float) -> str:
    """Markdown: GPU-hours for 50k images x 250 guided steps per (model, variant), measured and at the ceiling."""
    rows = ["| model | variant | fwd img/s | 50k x 250 guided steps (GPU-h) | floor at matmul ceiling (GPU-h) |",
            "|---|---|---:|---:|---:|"]
    for r in results:
        if r.fwd_img_s == r.fwd_img_s:  # not NaN
            b = sampling_budget(r.gflops, r.fwd_img_s, ceiling_tflops)
            rows.append(f"| {r.model} | {r.variant} | {r.fwd_img_s:,.0f} | {b['gpu_hours']:.1f} "
                        f"| {b['floor_gpu_hours']:.1f} |")
    return "\n".join(rows)
