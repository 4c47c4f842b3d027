"""Typed run configuration: dataclasses <- YAML file + dotted command-line overrides.

A config file is a nested mapping whose sections mirror :class:`Config` (``model``, ``data``, ``autoencoder``,
``text``, ``diffusion``, ``train``, ``sample``, ``run``). Overrides such as ``train.lr=2e-4`` or
``model.overrides.hidden_size=192`` are applied on top; values are parsed with ``yaml.safe_load``. Every key is
checked against the dataclass fields (unknown keys name the closest valid key) and every value against the field's
type annotation, so a typo fails before any work starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml


class ConfigError(ValueError):
    """A bad config file, key or value. The message is one line naming the source and the key."""


@dataclass
class ModelConfig:
    """Which network to build. ``overrides`` are extra ``create_model`` keyword arguments (e.g. ``hidden_size``)."""

    name: str = "DiT-S/2"
    learn_sigma: bool = True
    class_dropout_prob: float = 0.1  # label dropout for classifier-free guidance (DiT paper: 0.1)
    overrides: dict = field(default_factory=dict)
    grad_checkpointing: bool = False
    # DiTs only: keep the residual stream in the autocast dtype (bf16/fp16) instead of fp32
    # (DiT.set_low_precision_residual). bf16: +4.8% training img/s on DiT-S/2, output error vs fp32 6.8e-3 (S/2) but
    # 1.3e-2 (XL/2), over the 1e-2 target (docs/benchmarks.md, run 5); fp16 (train.mixed_precision=fp16): DiT-XL/2
    # 1.9e-3 - 2.4e-3, 1.01x the bf16 default's img/s (run 25). Off: the official numerics (fp32 stream).
    low_precision_residual: bool = False
    # DiTs with model.compile=true: train with DiTBlock.forward_fused, each residual update + LayerNorm + modulation
    # in one Triton kernel, forward and backward (dit.models.kernels). Same results to fp32 rounding; +5.3% img/s
    # for DiT-XL/2, +6.7% for S/2 in the trainer (docs/benchmarks.md, run 8). Ignored without compile and by UNets.
    fused_training: bool = True
    # With model.fused_training: build each block's qkv gradient and qkv bias gradient from the attention's dq, dk, dv
    # in one Triton pass (DiT.set_fused_qkv_backward) instead of autograd's copy plus a second read; same values.
    fused_qkv_backward: bool = True
    # With model.compile (not FSDP): every self-attention's qkv projection + attention through
    # dit.models.attention_kernels.qkv_attention (DiT/UNet.set_fused_attention): cuDNN's forward, and a
    # FlashAttention-2 backward in Triton that reads q, k, v from the packed qkv GEMM output and writes their gradients
    # (and the bias gradient's pieces) straight into the packed gradient. Same formulas, fp32 accumulation. Head dims
    # 16/32/64/72 (DiT-S/B/L/XL, the UNets): in the trainer on an H100 DiT-S/2 1.051x, DiT-XL/2 1.018x
    # (docs/benchmarks.md, runs 16-17). None (the default): on where the Triton kernels run (CUDA).
    fused_attention: bool | None = None
    # DiTs on CUDA: train the blocks' MLPs with the GELU in cuBLASLt GEMM epilogues (DiT.set_mlp_epilogues,
    # dit.models.cublaslt): fc1's GEMM applies the GELU and keeps the pre-activation, fc2's input-gradient GEMM
    # applies the GELU's derivative. Same formulas (the GELU from the fp32 accumulator); +5.1% trainer img/s for
    # DiT-S/2, +3% for XL/2 on an H100 (docs/benchmarks.md, run 11). Ignored on CPU and by UNets.
    mlp_epilogues: bool = True
    # DiTs with model.fused_training on an sm90+ GPU: "quack" runs the blocks' qkv/proj/fc1/fc2 forward and
    # input-gradient GEMMs (the GELU and its derivative in their epilogues) on QuACK's CuTe DSL kernels
    # (`pip install quack-kernels`; DiT.set_gemm_backend, dit.models.quack_gemm) instead of cuBLAS/cuBLASLt. Same
    # formulas, fp32 accumulation; each kernel compiles on its first call (docs/benchmarks.md, run 20).
    gemm_backend: Literal["cublas", "quack"] = "cublas"
    # DiTs with model.fused_training, one process, bf16/fp16 on CUDA with the AdamW + EMA kernel: the blocks' GEMMs
    # read a bf16/fp16 copy of each weight that the optimizer kernel writes with its update
    # (DiT.set_compute_weights) instead of casting every fp32 weight on every step. Same values. None (the default):
    # on wherever that holds (and without model.grad_checkpointing); false: the casts (docs/benchmarks.md, run 18).
    compute_weights: bool | None = None
    # DiTs only: train the blocks' qkv/proj/fc1/fc2 GEMMs in FP8 (dit.models.fp8, Ada/Hopper or newer; CPU emulates):
    # "rowwise" (per-row scales, bf16 weight gradients; DiT-XL/2 1.045x img/s on an H100, DiT-S/2 0.93x) or
    # "tensorwise" (per-tensor scales, all three GEMMs; slower than bf16 at DiT widths). E4M3 operands change the
    # numerics: an opt-in to validate on your own run (docs/benchmarks.md, run 10).
    fp8_training: Literal["off", "rowwise", "tensorwise"] = "off"
    # UNets: carry the activations in channels-last memory format (UNet.set_channels_last): no NCHW <-> NHWC transposes
    # around cuDNN's convolutions. With model.moment_norm, UNet-B's compiled step is ~1.30x the NCHW one on an H100
    # (docs/benchmarks.md, run 13; add train.cudnn_benchmark and train.cuda_graph for the fastest steps). None (the
    # default): on for UNets compiled (model.compile) on CUDA, where it was measured, off otherwise (eager, torch's
    # GroupNorm is slower on channels-last input, docs/unet.md); true: always (refused for DiTs, whose one
    # convolution is the patch embedding); false: never.
    channels_last: bool | None = None
    # UNets with model.compile=true: compute every GroupNorm (with its AdaGN and SiLU) from per-channel moments
    # (UNet.set_moment_norm, dit.models.layers.group_norm_moments): the same function, but a channels-last activation
    # is never viewed as (N, G, -1), which Inductor implements as a copy to NCHW and back. UNet-B channels-last 1.21x
    # img/s in the benchmark harness on an H100 (docs/benchmarks.md, run 13). Applied under compile only, where it was
    # measured (eager, it is several small ops where torch's GroupNorm is one kernel); ignored by DiTs.
    moment_norm: bool = True
    # UNets with model.moment_norm, compiled on CUDA in channels-last: each GroupNorm (+ AdaGN + SiLU) in Triton
    # kernels, forward and backward (dit.models.norm_kernels: whole NHWC rows per pass, x read twice each way) instead
    # of Inductor's kernels for the same formula: UNet-S 1.037x, UNet-B 1.026x img/s in the benchmark harness on an
    # H100 (docs/benchmarks.md, runs 14-15). None (the default): on wherever the UNet runs in channels-last with
    # model.moment_norm (see model.channels_last), off otherwise; true: the same, but an error where it cannot apply;
    # false: Inductor's kernels.
    norm_kernels: bool | None = None
    # torch.compile. One process: the whole loss (network + diffusion terms) as one graph, which also removes the
    # host cost of the ~100 small eager ops around the network; several processes: the network only (inside DDP /
    # FSDP, whose hooks must stay outside the compiled region).
    compile: bool = False
    # What model.compile compiles. "loss": as above (the fastest steps; compilation takes about half a minute for
    # DiT-S/2 and a minute or more for DiT-XL/2 or a UNet on an H100). "blocks": regional compilation
    # (DiT.compile_blocks, UNet.compile_blocks): each block type compiled once and shared by the blocks of equal
    # shape, the rest eager; with train.cuda_graph=true the eager ops cost no launches. DiT-XL/2 starts in 20 s
    # instead of 58 s at 0.99x the img/s, DiT-S/2 17 s instead of 39 s at 0.97x; no shorter for UNets, whose blocks
    # come in ~20 shapes (docs/benchmarks.md, run 12). Not with train.fsdp (its per-block hooks would run inside the
    # compiled region).
    compile_scope: Literal["loss", "blocks"] = "loss"
    # torch.compile mode: "reduce-overhead" adds CUDA graphs (the compiled forward + backward replayed without
    # per-kernel launches; +2-3% for DiTs on an H100, docs/benchmarks.md), "max-autotune" also benchmarks Triton GEMM
    # templates per shape (minutes of compilation). Only with model.compile=true; CUDA graphs are measured with one
    # process (with several, the trainer warns and the network alone is compiled, inside DDP / FSDP).
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    # Inductor options for torch.compile(options=...), e.g. {combo_kernels: true}; only with compile_mode default
    # (torch.compile takes a mode or options, not both). Unknown names are refused by torch when compiling.
    compile_options: dict = field(default_factory=dict)


@dataclass
class DataConfig:
    """Training data. ``shapes`` is the bundled synthetic dataset (no files needed); ``latents`` are pre-extracted
    shards (``tools/extract_latents.py``); ``folder``/``captions`` are images encoded on the fly."""

    source: Literal["shapes", "folder", "captions", "latents"] = "shapes"
    path: str | None = None
    resolution: int = 32
    num_samples: int = 10000  # size of the bundled shapes dataset
    seed: int = 0  # generation seed of the bundled shapes dataset
    flip: bool = True  # random horizontal flip (ADM / DiT)
    num_workers: int = 2
    pin_memory: bool = True
    in_memory: bool | Literal["auto"] = "auto"  # latents: load the shards into RAM ("auto": when under 8 GiB)
    skip_bad: bool = False  # skip unreadable images (reported) instead of failing on the first one


@dataclass
class AutoencoderConfig:
    """``vae.load_autoencoder`` spec; ``scale``/``shift`` override the autoencoder's latent normalisation."""

    spec: str = "identity"
    scale: float | list[float] | None = None
    shift: float | list[float] | None = None


@dataclass
class TextConfig:
    """Text conditioning: ``encoder=None`` trains a class-conditional model."""

    encoder: str | None = None
    caption_dropout: float = 0.1  # probability of replacing a caption by the empty prompt (CFG's null condition)
    max_length: int = 32


@dataclass
class DiffusionConfig:
    """``dit.diffusion.create_diffusion`` arguments (``learn_sigma`` comes from the model config)."""

    noise_schedule: str = "linear"
    diffusion_steps: int = 1000
    prediction: str = "eps"
    loss: str = "hybrid"


@dataclass
class TrainConfig:
    """Optimisation, precision, logging and checkpoint cadence. Steps count optimizer updates."""

    global_batch_size: int = 256
    grad_accum_steps: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_steps: int = 0
    lr_schedule: Literal["constant", "cosine"] = "constant"
    min_lr: float = 0.0  # floor of the cosine schedule
    max_steps: int = 400_000
    # Max global grad norm; None = no clipping (the DiT paper does not clip). Without clipping (and without fp16, in
    # one process) the fused optimizer kernel takes the norm from its own pass, so a non-finite gradient element is
    # left out of the update instead of the whole step being skipped (a non-finite loss still skips it); a limit
    # above every norm, e.g. 1e30, keeps the whole-step skip (docs/benchmarks.md, run 30).
    grad_clip: float | None = None
    ema_decay: float = 0.9999
    # EMA warm-up: decay_k = min(ema_decay, (1 + k) / (10 + k)) at update k. Without it a short run's EMA is still
    # mostly the zero-output initialisation (0.999 ** 782 = 46% after 782 steps) and samples look like noise.
    ema_warmup: bool = True
    # fp16 keeps 3 more mantissa bits than bf16 at the same tensor-core speed, with a dynamic loss scale (GradScaler;
    # in the fused step updated on the device): the UNets' output is 1.4e-3 - 1.9e-3 from fp32 in fp16 against
    # 1.1e-2 - 1.5e-2 in bf16 (docs/benchmarks.md, run 24), and UNet-S trains as fast in fp16 (run 25), so the UNet
    # configs use it. bf16 needs no loss scale and has fp32's range (fp16 overflows past 65,504).
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    # Shard parameters, gradients and optimizer state across processes (FSDP2, dit/fsdp.py) instead of replicating
    # them (DDP): per-GPU memory for weights + grads + Adam drops from 16 to 16/N bytes per parameter, for models too
    # large to replicate. Needs several processes (ignored with one) and mixed_precision no or bf16.
    fsdp: bool = False
    seed: int = 0
    tf32: bool = True
    max_bad_steps: int = 10  # abort after this many non-finite steps in a row
    # On CUDA, AdamW's update and the EMA update in one Triton kernel (dit/optim.py; the same state and results as
    # torch's fused AdamW to fp32 rounding); false: torch's fused AdamW, then a separate EMA pass
    fused_adamw_ema: bool = True
    # CUDA, one process: capture the whole step (forward, backward, clipping, the AdamW + EMA kernel) in one CUDA
    # graph after train.cuda_graph_warmup direct steps (dit/utils/cuda_graph.py; fp16's loss scale is updated on the
    # device). Needs grad_accum_steps=1, fused_adamw_ema, and no CUDA graphs of its own in model.compile_mode.
    # None (the default): on wherever it applies to a compiled model (model.compile=true; not yet with
    # model.gemm_backend=quack, unmeasured there), off otherwise: the step then costs the host no launches, so a slow
    # host does not slow it down (DiT-S/2 on an H100 with a slow host: 7,898 img/s against 5,169 without,
    # docs/benchmarks.md run 30); true: an error where it cannot apply.
    cuda_graph: bool | None = None
    cuda_graph_warmup: int = 2
    # Launch each block's AdamW + EMA update as soon as the backward has finished that block's gradients, on a
    # low-priority CUDA stream that fills the SMs the backward leaves idle (dit.optim.UpdateDuringBackward), instead
    # of the whole update after the backward; the same results. Needs the norm taken in the optimizer kernel (CUDA,
    # one process, fused_adamw_ema, no grad_clip, no fp16) and grad_accum_steps=1; it overlaps only where the blocks'
    # gradients come one block at a time: model.compile=false or model.compile_scope=blocks (one compiled loss hands
    # all gradients over at its end). DiT-XL/2 on an H100: 593 img/s against 591 for the default compiled loss; the
    # update hides, but slows the backward's kernels beside it (docs/benchmarks.md, run 31).
    update_in_backward: bool = False
    # With train.update_in_backward: at most this many thread blocks per update launch, each looping over its share
    # (dit.optim.UpdateDuringBackward's max_ctas), so the update holds a bounded share of the SMs and memory bandwidth
    # beside the backward; null: one thread block per 2048 elements, all the SMs the backward leaves idle.
    update_in_backward_ctas: int | None = None
    # cuDNN times its convolution algorithms for each new shape and keeps the fastest (torch.backends.cudnn.benchmark,
    # set for the run). UNets in channels-last: convolutions 2.4 ms faster per UNet-B step (docs/benchmarks.md,
    # run 12); NCHW: no gain (run 7). The chosen algorithms can differ between runs, so a resumed run may not match
    # an uninterrupted one bit for bit.
    cudnn_benchmark: bool = False
    log_every: int = 100
    ckpt_every: int = 50_000
    sample_every: int = 0  # 0 = only at the end of the run
    keep_last: int = 2
    milestone_every: int = 0  # also keep every checkpoint at a multiple of this step (0 = none)
    resume: str | None = None  # None, "auto" (newest valid checkpoint in run.out_dir) or a checkpoint path


@dataclass
class SampleConfig:
    """Sample grids drawn from the EMA model during training."""

    cfg_scale: float = 4.0
    num_steps: int = 50
    sampler: Literal["ddim", "ddpm"] = "ddim"
    grid_size: int = 4  # grid_size x grid_size images; 0: no grids (latent training never loads the autoencoder)
    clip_denoised: bool | None = None  # clip predicted x0 to [-1, 1]; None = only in pixel space (identity AE)
    seed: int = 0
    # [sigma_lo, sigma_hi]: guide only at EDM noise levels sigma in (lo, hi] (Kynkaenniemi et al. 2024,
    # arXiv:2404.07724), the conditional model alone elsewhere; None = every step. Used by training grids and, as
    # the checkpoint's default, by tools/sample.py.
    guidance_interval: list[float] | None = None


@dataclass
class RunConfig:
    """Where outputs go and how the run reports."""

    out_dir: str = "runs/default"
    tensorboard: bool = True
    progress: bool = True  # tqdm bar on the main process
    cpu_threads: int | None = None  # torch intra-op threads (None = torch's default); 1 helps on busy small CPUs
    # Profile steps profile_from + 1 ... profile_from + profile_steps (main process; 0 = off) with torch.profiler:
    # GPU time per step by kernel category, the top kernels and where the GPU idles go to <out_dir>/profile.json and
    # the log, the trace (Perfetto, chrome://tracing) to <out_dir>/profile_trace.json.gz. Start after compilation
    # (e.g. profile_from=50); the log's rows of those steps are timed apart and marked "profiled" (their step_time
    # carries the profiler's overhead).
    profile_steps: int = 0
    profile_from: int = 0


@dataclass
class Config:
    """The whole run: one section per part of the system."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    text: TextConfig = field(default_factory=TextConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    run: RunConfig = field(default_factory=RunConfig)


# --------------------------------------------------------------------------------------------------------------------
# Type checking of values against the annotations
# --------------------------------------------------------------------------------------------------------------------

def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (inner,) = typing.get_args(tp)
        return f"a list of {_type_name(inner)}"
    if tp is type(None):
        return "null"
    return {bool: "a bool", int: "an int", float: "a float", str: "a string", dict: "a mapping"}.get(tp, str(tp))


_NO_MATCH = object()


# The spellings YAML 1.1 (PyYAML) reads as booleans, so `train.mixed_precision=no` reaches us as False.
_YAML_BOOLS = {False: {"no", "n", "off", "false"}, True: {"yes", "y", "on", "true"}}


def _coerce(value: Any, tp: Any) -> Any:
    """``value`` converted to annotation ``tp``, or ``_NO_MATCH``. Only lossless, unsurprising conversions:
    int -> float, numeric strings -> float (PyYAML reads ``1e-4`` without a dot as a string), and a YAML boolean
    -> the string choice it was spelled as (``no``, ``off``)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool):  # YAML 1.1 reads no/off (yes/on) as False (True): map back to the choice
            spelled = [c for c in choices if isinstance(c, str) and c.lower() in _YAML_BOOLS[value]]
            return spelled[0] if len(spelled) == 1 else _NO_MATCH
        return value if value in choices else _NO_MATCH
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):  # exact matches first, so 3 stays an int in "int | float"
            if _coerce_exact(value, arg):
                return value
        for arg in typing.get_args(tp):
            out = _coerce(value, arg)
            if out is not _NO_MATCH:
                return out
        return _NO_MATCH
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            return _NO_MATCH
        items = [_coerce(v, inner) for v in value]
        return _NO_MATCH if any(i is _NO_MATCH for i in items) else items
    if tp is type(None):
        return None if value is None else _NO_MATCH
    if tp is bool:
        return value if isinstance(value, bool) else _NO_MATCH
    if tp is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _NO_MATCH
    if tp is float:
        if isinstance(value, bool):
            return _NO_MATCH
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                return _NO_MATCH
        return _NO_MATCH
    if tp is str:
        return value if isinstance(value, str) else _NO_MATCH
    if tp is dict:
        return dict(value) if isinstance(value, dict) else _NO_MATCH
    raise TypeError(f"config annotation {tp!r} is not supported")  # a bug in this file, not a user error


def _coerce_exact(value: Any, tp: Any) -> bool:
    if tp is type(None):
        return value is None
    if tp in (bool, int, float, str, dict):
        return type(value) is tp
    return False


def _section_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _all_keys() -> list[str]:
    keys = []
    for sec in dataclasses.fields(Config):
        keys += [f"{sec.name}.{f.name}" for f in dataclasses.fields(_section_types(Config)[sec.name])]
    return keys


def _unknown_key(source: str, key: str) -> ConfigError:
    close = difflib.get_close_matches(key, _all_keys() + [f.name for f in dataclasses.fields(Config)], n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"{source}: unknown key {key!r}{hint}")


def _set_value(cfg: Config, key: str, value: Any, source: str) -> None:
    """Set dotted ``key`` (``section.field`` or ``section.<dict field>.sub.key``) with type checking."""
    parts = key.split(".")
    if len(parts) < 2 or not all(parts):
        raise _unknown_key(source, key)
    sec_name, field_name, rest = parts[0], parts[1], parts[2:]
    if sec_name not in {f.name for f in dataclasses.fields(Config)}:
        raise _unknown_key(source, key)
    section = getattr(cfg, sec_name)
    hints = _section_types(type(section))
    if field_name not in hints:
        raise _unknown_key(source, key)
    tp = hints[field_name]
    if rest:  # a sub-key inside a free-form mapping such as model.overrides.hidden_size
        if tp is not dict:
            raise _unknown_key(source, key)
        target = getattr(section, field_name)
        for p in rest[:-1]:
            target = target.setdefault(p, {})
            if not isinstance(target, dict):
                raise ConfigError(f"{source}: {key!r} goes through a non-mapping value")
        target[rest[-1]] = value
        return
    out = _coerce(value, tp)
    if out is _NO_MATCH:
        raise ConfigError(f"{source}: {sec_name}.{field_name} must be {_type_name(tp)}, got {value!r} "
                          f"({type(value).__name__})")
    setattr(section, field_name, out)


def _apply_mapping(cfg: Config, data: Any, source: str) -> None:
    if data is None:
        return
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of sections (model, data, train, ...), "
                          f"got {type(data).__name__}")
    for sec_name, sec in data.items():
        if not isinstance(sec_name, str) or sec_name not in {f.name for f in dataclasses.fields(Config)}:
            raise _unknown_key(source, str(sec_name))
        if sec is None:
            continue
        if not isinstance(sec, dict):
            raise ConfigError(f"{source}: section {sec_name!r} must be a mapping, got {sec!r}")
        for k, v in sec.items():
            _set_value(cfg, f"{sec_name}.{k}", v, source)


def parse_override(text: str) -> tuple[str, Any]:
    """``"train.lr=2e-4"`` -> ``("train.lr", "2e-4")`` with the value parsed by ``yaml.safe_load``."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. train.lr=2e-4")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({str(e).splitlines()[0]})") from None
    return key, value


def step_graph_missing(cfg: Config) -> list[str]:
    """The settings that ``train.cuda_graph`` (the whole step in one CUDA graph) needs and ``cfg`` lacks; empty if
    none (the device, the number of processes and the optimizer kernel are checked by the trainer)."""
    t = cfg.train
    need = {"train.grad_accum_steps=1": t.grad_accum_steps == 1,
            "train.fused_adamw_ema=true (the optimizer kernel that reads its learning rate from the device)":
                t.fused_adamw_ema,
            "model.compile_mode default or max-autotune-no-cudagraphs (the others make CUDA graphs of their own)":
                cfg.model.compile_mode in ("default", "max-autotune-no-cudagraphs"),
            "train.cuda_graph_warmup >= 1": t.cuda_graph_warmup >= 1}
    return [k for k, ok in need.items() if not ok]


def validate(cfg: Config, source: str = "config") -> None:
    """Cross-field checks that types alone cannot express."""
    t = cfg.train
    positive = {"train.global_batch_size": t.global_batch_size, "train.grad_accum_steps": t.grad_accum_steps,
                "train.max_steps": t.max_steps, "train.log_every": t.log_every, "train.ckpt_every": t.ckpt_every,
                "train.keep_last": t.keep_last, "train.max_bad_steps": t.max_bad_steps,
                "data.resolution": cfg.data.resolution, "sample.num_steps": cfg.sample.num_steps,
                "diffusion.diffusion_steps": cfg.diffusion.diffusion_steps,
                "text.max_length": cfg.text.max_length}
    for key, v in positive.items():
        if v <= 0:
            raise ConfigError(f"{source}: {key} must be positive, got {v}")
    for key, v in {"train.warmup_steps": t.warmup_steps, "train.sample_every": t.sample_every,
                   "sample.grid_size": cfg.sample.grid_size,
                   "train.milestone_every": t.milestone_every, "data.num_workers": cfg.data.num_workers,
                   "run.profile_steps": cfg.run.profile_steps, "run.profile_from": cfg.run.profile_from}.items():
        if v < 0:
            raise ConfigError(f"{source}: {key} must be >= 0, got {v}")
    if cfg.run.profile_steps and cfg.run.profile_from + cfg.run.profile_steps > t.max_steps:
        raise ConfigError(f"{source}: run.profile_from + run.profile_steps ({cfg.run.profile_from} + "
                          f"{cfg.run.profile_steps}) must be <= train.max_steps ({t.max_steps})")
    if cfg.model.compile_mode != "default" and not cfg.model.compile:
        raise ConfigError(f"{source}: model.compile_mode={cfg.model.compile_mode!r} needs model.compile=true")
    if cfg.model.norm_kernels and (not cfg.model.moment_norm or cfg.model.channels_last is False):
        raise ConfigError(f"{source}: model.norm_kernels=true needs model.moment_norm=true and channels-last "
                          f"activations (model.channels_last unset or true), got moment_norm={cfg.model.moment_norm}, "
                          f"channels_last={cfg.model.channels_last}")
    if cfg.model.compile_scope != "loss" and not cfg.model.compile:
        raise ConfigError(f"{source}: model.compile_scope={cfg.model.compile_scope!r} needs model.compile=true")
    if cfg.model.compile_scope == "blocks" and t.fsdp:
        raise ConfigError(f"{source}: model.compile_scope=blocks is not built for train.fsdp=true (use "
                          "model.compile_scope=loss, which compiles the sharded network)")
    if cfg.model.compile_options and (not cfg.model.compile or cfg.model.compile_mode != "default"):
        raise ConfigError(f"{source}: model.compile_options needs model.compile=true and model.compile_mode=default "
                          f"(torch.compile takes a mode or options), got compile={cfg.model.compile}, "
                          f"compile_mode={cfg.model.compile_mode!r}")
    if t.cuda_graph and (missing := step_graph_missing(cfg)):
        raise ConfigError(f"{source}: train.cuda_graph=true needs {'; '.join(missing)}")
    if t.update_in_backward and (missing := [k for k, ok in {
            "train.grad_accum_steps=1": t.grad_accum_steps == 1, "train.fused_adamw_ema=true": t.fused_adamw_ema,
            "no train.grad_clip": t.grad_clip is None, "train.mixed_precision no or bf16": t.mixed_precision != "fp16",
            "train.fsdp=false": not t.fsdp}.items() if not ok]):
        raise ConfigError(f"{source}: train.update_in_backward=true needs {'; '.join(missing)}")
    if t.update_in_backward_ctas is not None and (t.update_in_backward_ctas < 1 or not t.update_in_backward):
        raise ConfigError(f"{source}: train.update_in_backward_ctas must be a positive number with "
                          f"train.update_in_backward=true, got {t.update_in_backward_ctas} with "
                          f"update_in_backward={t.update_in_backward}")
    if t.global_batch_size % t.grad_accum_steps:
        raise ConfigError(f"{source}: train.global_batch_size ({t.global_batch_size}) must be divisible by "
                          f"train.grad_accum_steps ({t.grad_accum_steps})")
    if not 0.0 <= t.ema_decay <= 1.0:
        raise ConfigError(f"{source}: train.ema_decay must be in [0, 1], got {t.ema_decay}")
    if not 0.0 <= cfg.text.caption_dropout <= 1.0:
        raise ConfigError(f"{source}: text.caption_dropout must be in [0, 1], got {cfg.text.caption_dropout}")
    if len(t.betas) != 2:
        raise ConfigError(f"{source}: train.betas must have two values, got {t.betas}")
    if t.lr <= 0:
        raise ConfigError(f"{source}: train.lr must be positive, got {t.lr}")
    if cfg.data.source != "shapes" and not cfg.data.path:
        raise ConfigError(f"{source}: data.path is required for data.source={cfg.data.source!r}")
    if cfg.run.cpu_threads is not None and cfg.run.cpu_threads < 1:
        raise ConfigError(f"{source}: run.cpu_threads must be a positive int or null, got {cfg.run.cpu_threads}")
    if t.fsdp and t.mixed_precision == "fp16":
        raise ConfigError(f"{source}: train.fsdp does not support mixed_precision=fp16 (no sharded grad scaler); "
                          f"use mixed_precision=bf16 or no")
    gi = cfg.sample.guidance_interval
    if gi is not None and not (len(gi) == 2 and 0.0 <= gi[0] < gi[1]):  # NaN fails too
        raise ConfigError(f"{source}: sample.guidance_interval must be two sigmas [lo, hi] with 0 <= lo < hi, "
                          f"got {gi}")
    if t.resume is not None and not t.resume:
        raise ConfigError(f"{source}: train.resume must be null, 'auto' or a checkpoint path")


def from_dict(data: dict, source: str = "config") -> Config:
    """Build a validated :class:`Config` from a nested mapping (e.g. the ``config`` entry of a checkpoint)."""
    cfg = Config()
    _apply_mapping(cfg, data, source)
    validate(cfg, source)
    return cfg


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config (``None`` = all defaults), apply dotted ``overrides`` and validate.

    Raises :class:`ConfigError` (a ``ValueError``) naming the file/override and the key on any problem, and
    ``FileNotFoundError`` for a missing file.
    """
    cfg = Config()
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {str(path)!r} not found")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
        _apply_mapping(cfg, data, source)
    for text in overrides:
        key, value = parse_override(text)
        _set_value(cfg, key, value, f"override {text!r}")
    validate(cfg, source)
    return cfg


def to_dict(cfg: Config) -> dict:
    """Plain nested dict (only str/int/float/bool/None/list/dict), e.g. for YAML, checkpoints or TensorBoard."""
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (readable back with :func:`load_config`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1e-4}}`` -> ``{"train.lr": 1e-4}`` (lists and None become strings, for TensorBoard)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        elif isinstance(v, (bool, int, float, str)):
            out[key] = v
        else:
            out[key] = str(v)
    return out
