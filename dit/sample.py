"""Sampling API: load any checkpoint (ours, official DiT, UNet), draw latents with any sampler and classifier-free
guidance, decode, and write PNG grids or ADM-layout ``.npz`` files (resumable, multi-process).

Two guidance conventions:

* standard (``classifier_free_guidance``): one model call on ``[x; x]`` with ``[cond; uncond]`` per step, all
  prediction channels guided, one noise draw per sample: what our models are trained and evaluated with;
* official (``official_cfg``): facebookresearch/DiT's ``sample.py`` step for step (doubled noise, doubled batch,
  ``forward_with_cfg`` guiding the first 3 channels, the first half kept), so that an official checkpoint with the
  same seed and settings gives the same latents (``docs/sampling.md`` says how to check this).

The standard convention can guide in a limited interval of noise levels only (Kynkaenniemi et al. 2024,
arXiv:2404.07724): ``guidance_interval=(sigma_lo, sigma_hi)`` in EDM sigma units guides the steps with
``sigma_lo < sigma_t <= sigma_hi`` and runs the conditional model alone (batch N, not 2N) on the others.

Typical use::

    setup = load_sampling_setup("runs/shapes/checkpoints/0010000.pt")
    images = sample_images(setup, labels=[0, 1, 2], seed=0)      # uint8 (3, H, W, 3)
    save_grid(images, "grid.png")
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from dit.utils import AUTOCAST_DTYPES

OFFICIAL_LABELS = [207, 360, 387, 974, 88, 979, 417, 279]  # facebookresearch/DiT sample.py
OFFICIAL_VAE = "stabilityai/sd-vae-ft-ema"
OFFICIAL_VAE_SCALE = 0.18215
OFFICIAL_URL = "https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt"
SAMPLERS = ("ddpm", "ddim", "dpm-solver++", "euler")

NO_CKPT_MESSAGE = (
    "no checkpoint given (--ckpt). Either train a model first, e.g. `python tools/train.py` (checkpoints are written "
    "to <run dir>/checkpoints/*.pt; pass one with --ckpt), or download the official DiT-XL/2 weights "
    f"({OFFICIAL_URL}) and pass --ckpt DiT-XL-2-256x256.pt (the SD VAE {OFFICIAL_VAE} is then fetched from the "
    "Hugging Face hub, or pass --vae with a local copy)."
)


# ----------------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class SamplingSetup:
    """Everything needed to sample from a checkpoint.

    ``source``: ``"ours"`` (trainer checkpoint) or ``"official"`` (facebookresearch/DiT weights, no metadata).
    ``defaults``: sampler / steps / cfg_scale (and for ours the GPU precision, bf16 or the fp16 it trained in) the
    checkpoint suggests (its training config, or the official ones).
    """

    model: nn.Module
    autoencoder: Any
    diffusion_kwargs: dict
    source: str
    model_name: str | None = None
    class_names: list[str] = field(default_factory=list)
    text_encoder_spec: str | None = None
    text_max_length: int = 32
    defaults: dict = field(default_factory=dict)
    ckpt_path: str | None = None

    @property
    def conditioning(self) -> str:
        """``"class"``, ``"text"`` or ``"none"``."""
        return self.model.conditioning

    @property
    def num_classes(self) -> int:
        return int(getattr(self.model, "num_classes", 0) or 0)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of the model's input."""
        s = int(self.model.input_size)
        return int(self.model.in_channels), s, s

    @property
    def image_size(self) -> int:
        return int(self.model.input_size) * int(self.autoencoder.downsample_factor)


def _check_same(what: str, given: Any, found: Any, path: str) -> None:
    if given is not None and given != found:
        raise ValueError(f"{path}: --{what} {given} was given but the checkpoint's model has {what} {found}")


def resolve_checkpoint_path(ckpt: str | os.PathLike) -> str:
    """A checkpoint file from what users pass: a file, a run directory or its ``checkpoints/`` folder (newest
    checkpoint), or the ``checkpoints/latest`` pointer the trainer writes."""
    from dit import checkpointing

    p = Path(ckpt)
    if p.is_file() and p.name == "latest":  # the trainer's pointer: one line naming the newest checkpoint file
        p = p.parent / p.read_text().strip()
    elif p.is_dir():
        found = checkpointing.list_checkpoints(p if p.name == "checkpoints" else checkpointing.checkpoint_dir(p))
        if not found:
            raise FileNotFoundError(f"no checkpoint (*.pt) under {str(p)!r}. {NO_CKPT_MESSAGE.split('. ', 1)[1]}")
        p = found[-1][1]  # the newest step
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint {str(p)!r} does not exist. {NO_CKPT_MESSAGE.split('. ', 1)[1]}")
    return str(p)


def load_sampling_setup(ckpt: str | os.PathLike | None, *, model_name: str | None = None, vae: str | None = None,
                        image_size: int | None = None, num_classes: int | None = None,
                        use_model_weights: bool = False, device: str | torch.device = "cpu",
                        vae_dtype: torch.dtype | None = None) -> SamplingSetup:
    """Build the model (EMA weights unless ``use_model_weights``) and autoencoder of a checkpoint.

    Our checkpoints carry the model name, kwargs, autoencoder and diffusion settings; ``model_name``,
    ``image_size``, ``num_classes`` are then only checked. Official DiT files are flat state dicts: the architecture
    is read off the tensor shapes (and checked against ``model_name`` when given); the autoencoder defaults to
    ``stabilityai/sd-vae-ft-ema`` with scale 0.18215. Every mismatch raises ``ValueError`` naming what differs.
    """
    from dit.models import create_model, model_defaults
    from dit.models.checkpoint import (dit_kwargs_from_state_dict, extract_state_dict, guess_model_name,
                                       load_model_weights, load_weights_file)

    if ckpt is None:
        raise FileNotFoundError(NO_CKPT_MESSAGE)
    path = resolve_checkpoint_path(ckpt)
    obj = load_weights_file(path)
    prefer = "model" if use_model_weights else "ema"

    if "model_name" in obj and "model_kwargs" in obj:  # ours
        name = str(obj["model_name"])
        if model_name is not None and model_name != name:
            raise ValueError(f"{path} holds a {name} model, but --model {model_name} was given (drop --model to use "
                             "the checkpoint's)")
        kwargs = dict(obj["model_kwargs"])
        model = create_model(name, **kwargs)
        load_model_weights(model, obj, prefer=prefer)
        ae_info = dict(obj.get("autoencoder") or {})
        spec = vae or ae_info.get("spec") or "identity"
        norm = {}
        if spec == ae_info.get("spec"):  # the latent normalisation the model was trained with
            norm = {k: ae_info[k] for k in ("scale", "shift") if ae_info.get(k) is not None}
        cfg = obj.get("config") or {}
        sample_cfg = cfg.get("sample") or {}
        defaults = {"sampler": sample_cfg.get("sampler", "ddim"), "steps": int(sample_cfg.get("num_steps", 50)),
                    "cfg_scale": float(sample_cfg.get("cfg_scale", 4.0))}
        if sample_cfg.get("guidance_interval") is not None:  # sample.guidance_interval, in sigma units
            defaults["guidance_interval"] = tuple(float(v) for v in sample_cfg["guidance_interval"])
        # A model trained in fp16 (the UNet configs) samples in fp16 too: bf16 would put its output 1e-2 from fp32.
        defaults["precision"] = "fp16" if (cfg.get("train") or {}).get("mixed_precision") == "fp16" else "bf16"
        setup = SamplingSetup(
            model=model, autoencoder=None, diffusion_kwargs=dict(obj.get("diffusion") or {}), source="ours",
            model_name=name, class_names=list(obj.get("class_names") or []),
            text_encoder_spec=obj.get("text_encoder"),
            text_max_length=int((cfg.get("text") or {}).get("max_length", 32)),
            defaults=defaults, ckpt_path=path,
        )
    else:  # official release file or official training checkpoint: the shapes say what it is
        sd = extract_state_dict(obj, prefer=prefer)
        guessed = guess_model_name(sd)
        if guessed is None:
            raise ValueError(f"{path}: not one of our checkpoints (no model_name) and its tensors match no registered "
                             "DiT architecture; pass a checkpoint written by tools/train.py or an official DiT file")
        if model_name is not None and model_name != guessed:
            raise ValueError(f"{path}: the weights are a {guessed} (from the tensor shapes), but --model {model_name} "
                             "was given")
        arch = dit_kwargs_from_state_dict(sd, num_heads=model_defaults(guessed)["num_heads"])
        kwargs = {k: arch[k] for k in ("input_size", "in_channels", "num_classes", "learn_sigma") if k in arch}
        model = create_model(guessed, **kwargs)
        load_model_weights(model, sd)
        spec = vae or OFFICIAL_VAE
        norm = {"scale": OFFICIAL_VAE_SCALE} if spec == OFFICIAL_VAE else {}
        setup = SamplingSetup(
            model=model, autoencoder=None, diffusion_kwargs={"learn_sigma": bool(arch["learn_sigma"])},
            source="official", model_name=guessed,
            defaults={"sampler": "ddpm", "steps": 250, "cfg_scale": 4.0}, ckpt_path=path,
        )
    if num_classes is not None and setup.conditioning == "class":
        _check_same("num-classes", num_classes, setup.num_classes, path)

    from vae import load_autoencoder

    ae = load_autoencoder(spec, device=device, dtype=vae_dtype, **norm)
    if int(ae.latent_channels) != setup.latent_shape[0]:
        raise ValueError(f"autoencoder {spec!r} has {ae.latent_channels} latent channels but the model in {path} "
                         f"takes in_channels={setup.latent_shape[0]}; pass the --vae the model was trained with")
    setup.autoencoder = ae
    if image_size is not None and image_size != setup.image_size:
        raise ValueError(f"{path}: --image-size {image_size} was given but the model makes {setup.image_size}px images "
                         f"(latent {setup.latent_shape[1]} x {ae.downsample_factor}x autoencoder)")
    setup.model = setup.model.to(device).eval().requires_grad_(False)
    return setup


def compile_for_sampling(model: nn.Module, device: torch.device) -> nn.Module:
    """``torch.compile`` the model for sampling: static shapes and, on CUDA, CUDA graphs (every step calls the model
    with the same shapes, so replaying the captured kernels removes their launch cost; a guidance interval uses two
    batch shapes, N and 2N, so two graphs). The first steps pay the compilation (~40 s for DiT-XL/2 on an H100).
    Attributes (``conditioning``, ``in_channels``, ...) still read through to the wrapped module."""
    return torch.compile(model, mode="reduce-overhead" if device.type == "cuda" else None, dynamic=False)


def uses_float8(model: nn.Module) -> bool:
    """Whether ``float8_for_sampling`` converted ``model`` (compiled or not)."""
    from dit.models.fp8 import Float8Linear

    return any(isinstance(m, Float8Linear) for m in model.modules())


@torch.no_grad()
def float8_for_sampling(setup: SamplingSetup, device: torch.device, *, precision: str = "bf16", batch: int = 32,
                        timesteps: int = 8, seed: int = 0) -> int:
    """Run the DiT blocks' qkv/proj/fc1/fc2 GEMMs in FP8 with static scales (``dit.models.fp8``), in place.

    The scales come from forward passes over random unit-variance latents (what a sampler's x_t is, up to the data
    part) at ``timesteps`` timesteps spread over the schedule, with random class labels including the null class
    (unconditional models: none; text models: the empty prompt, the unconditional branch). Call before
    ``compile_for_sampling``. On a GPU it needs FP8 tensor cores (compute capability 8.9+; ValueError otherwise); on
    the CPU it runs (slowly) for testing.
    Returns the number of layers converted. 1.34x per guided DiT-XL/2 step on an H100, with the fused kernels the
    calibrated model then runs (``dit.models.kernels``; docs/benchmarks.md, run 7).
    """
    from dit.models.fp8 import calibrate_float8, convert_to_float8

    if precision == "fp16":  # the FP8 GEMMs and their fused casts write bf16 (dit.models.fp8)
        raise ValueError("--fp8: runs with --precision bf16 (or fp32), not fp16")
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        major, minor = torch.cuda.get_device_capability(device)
        raise ValueError(f"--fp8: needs FP8 tensor cores (compute capability 8.9 or newer: L4, L40, H100, ...); "
                         f"{torch.cuda.get_device_name(device)} is sm_{major}{minor}")
    model = setup.model
    if convert_to_float8(model) == 0:
        raise ValueError(f"--fp8: {setup.model_name or type(model).__name__} has no transformer blocks to run in FP8 "
                         "(DiTs only)")
    gen = torch.Generator(device=device).manual_seed(seed)
    if setup.conditioning == "class":
        cond = {"y": torch.randint(0, setup.num_classes + 1, (batch,), device=device, generator=gen)}
    elif setup.conditioning == "text":
        cond, _ = make_conditions(setup, prompts=[""] * batch, device=device)
    else:
        cond = {}
    fn = _autocast_model(model, device, precision)
    num_t = int(setup.diffusion_kwargs.get("diffusion_steps", 1000))

    def passes() -> None:
        for t in torch.linspace(0, num_t - 1, timesteps).round().long().tolist():
            x = torch.randn((batch, *setup.latent_shape), device=device, generator=gen)
            fn(x, torch.full((batch,), t, device=device), **cond)

    return calibrate_float8(model, passes)


# ----------------------------------------------------------------------------------------------------------------------
# Conditions
# ----------------------------------------------------------------------------------------------------------------------


def parse_class_labels(text: str, class_names: list[str] | None = None) -> list[int]:
    """``"1,2,3"`` or class names ``"red circle,blue cross"`` (any mix) -> label ints."""
    names = {n.lower(): i for i, n in enumerate(class_names or [])}
    out = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        if item.lstrip("-").isdigit():
            out.append(int(item))
        elif item.lower() in names:
            out.append(names[item.lower()])
        else:
            known = f"; known names: {', '.join(class_names)}" if class_names else ""
            raise ValueError(f"--class-labels: {item!r} is neither an integer nor a class name{known}")
    if not out:
        raise ValueError(f"--class-labels: no labels in {text!r}")
    return out


def check_conditions(setup: SamplingSetup, labels: list[int] | None, prompts: list[str] | None) -> None:
    """One clear ``ValueError`` for labels/prompts that do not fit the model's conditioning."""
    kind = setup.conditioning
    what = {"class": "class-conditional", "text": "text-conditional", "none": "unconditional"}.get(kind, kind)
    if prompts and kind != "text":
        hint = "pass --class-labels instead" if kind == "class" else "it takes no condition"
        raise ValueError(f"--prompt was given but the model is {what} ({setup.model_name}); {hint}")
    if labels is not None and kind != "class":
        hint = "pass --prompt instead" if kind == "text" else "it takes no condition"
        raise ValueError(f"--class-labels was given but the model is {what} ({setup.model_name}); {hint}")
    if labels is not None:
        bad = [y for y in labels if not 0 <= y < setup.num_classes]
        if bad:
            names = f" ({', '.join(setup.class_names)})" if setup.class_names and len(setup.class_names) <= 20 else ""
            raise ValueError(f"class label(s) {bad} out of range: the model has {setup.num_classes} classes, "
                             f"labels 0..{setup.num_classes - 1}{names}")
    if kind == "text" and not prompts:
        raise ValueError(f"the model ({setup.model_name}) is text-conditional: pass --prompt")


def default_labels(setup: SamplingSetup) -> list[int] | None:
    """The official eight labels for 1000-class models, else one of each class (at most 16); None if unconditional."""
    if setup.conditioning != "class":
        return None
    if setup.num_classes == 1000:
        return list(OFFICIAL_LABELS)
    return list(range(min(setup.num_classes, 16)))


class _TextConditions:
    """Encodes prompts once with the checkpoint's text encoder (loaded lazily)."""

    def __init__(self, setup: SamplingSetup, device: torch.device):
        from dit.text import load_text_encoder

        if not setup.text_encoder_spec:
            raise ValueError(f"{setup.ckpt_path}: a text model but the checkpoint names no text encoder")
        self.encoder = load_text_encoder(setup.text_encoder_spec, device=device, max_length=setup.text_max_length)

    def __call__(self, prompts: list[str]) -> tuple[dict, dict]:
        enc = self.encoder.encode(list(prompts))
        empty = self.encoder.empty_prompt(len(prompts))
        cond = {"context": enc["tokens"], "context_mask": enc["mask"], "pooled": enc["pooled"]}
        uncond = {"context": empty["tokens"], "context_mask": empty["mask"], "pooled": empty["pooled"]}
        return cond, uncond


def make_conditions(setup: SamplingSetup, *, labels: list[int] | None = None, prompts: list[str] | None = None,
                    device: torch.device | str = "cpu",
                    text: _TextConditions | None = None) -> tuple[dict, dict | None]:
    """Model kwargs for the conditional and the unconditional (null) branch: ``({"y": (N,)}, {"y": (N,) null})``,
    text ``context``/``context_mask``/``pooled``, or ``({}, None)`` for unconditional models."""
    device = torch.device(device)
    if setup.conditioning == "class":
        y = torch.tensor(labels, dtype=torch.long, device=device)
        return {"y": y}, {"y": torch.full_like(y, setup.num_classes)}
    if setup.conditioning == "text":
        text = text or _TextConditions(setup, device)
        cond, uncond = text(prompts)
        return ({k: v.to(device) for k, v in cond.items()}, {k: v.to(device) for k, v in uncond.items()})
    return {}, None


# ----------------------------------------------------------------------------------------------------------------------
# Guidance interval
# ----------------------------------------------------------------------------------------------------------------------


def parse_guidance_interval(text: str) -> tuple[float, float]:
    """``"0.28,5.42"`` -> ``(0.28, 5.42)``: an EDM sigma range ``(lo, hi]`` with ``0 <= lo < hi`` (hi may be inf)."""
    return _check_sigma_interval(str(text).split(","), shown=repr(text))


def _check_sigma_interval(interval: Any, shown: str | None = None) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in interval)
    except (TypeError, ValueError):
        lo = hi = math.nan
    if not 0.0 <= lo < hi:  # NaN fails too
        raise ValueError(f"--guidance-interval: expected two sigmas LO,HI with 0 <= LO < HI (e.g. 0.28,5.42), "
                         f"got {shown or repr(interval)}")
    return lo, hi


def guidance_timestep_interval(setup: SamplingSetup, sigma_interval: tuple[float, float]) -> tuple[int, int]:
    """A sigma range ``(lo, hi]`` -> ``(t_lo, t_hi)`` in the checkpoint schedule's original timesteps (what the
    guided model receives under every sampler; see ``dit.diffusion.guidance``)."""
    from dit.diffusion import guidance_timesteps

    lo, hi = _check_sigma_interval(sigma_interval)
    try:
        return guidance_timesteps(lo, hi, **setup.diffusion_kwargs)
    except ValueError as e:
        raise ValueError(f"--guidance-interval: {e}") from None


def sampler_timesteps(setup: SamplingSetup, sampler: str, steps: int) -> list[int]:
    """The original timesteps at which ``sample_latents`` calls the model (one call per step), in sampling order."""
    from dit.diffusion import create_diffusion, make_scheduler
    from dit.diffusion.diffusers_samplers import model_timestep

    respacing = _respacing(sampler, steps)
    if sampler in ("ddpm", "ddim"):
        return create_diffusion(timestep_respacing=respacing, **setup.diffusion_kwargs).timestep_map[::-1]
    full = create_diffusion(**setup.diffusion_kwargs)
    scheduler = make_scheduler({"dpm-solver++": "dpmsolver++"}.get(sampler, sampler), full.betas, full.prediction)
    scheduler.set_timesteps(steps)
    return [model_timestep(t, full.num_timesteps) for t in scheduler.timesteps]


def guidance_interval_summary(setup: SamplingSetup, *, sampler: str | None = None, steps: int | None = None,
                              cfg_scale: float | None = None,
                              guidance_interval: tuple[float, float] | None = None) -> str | None:
    """One line for logs, ``"guidance on 97 of 250 steps (sigma in (0.28, 5.42])"``, for standard-convention
    sampling with these settings (unset ones from ``setup.defaults``); None when no interval applies (none set, an
    unconditional model or ``cfg_scale == 1``)."""
    from dit.diffusion import guided_fraction

    sampler = sampler or setup.defaults.get("sampler", "ddim")
    steps = steps or setup.defaults.get("steps", 50)
    cfg_scale = setup.defaults.get("cfg_scale", 4.0) if cfg_scale is None else cfg_scale
    sigmas = guidance_interval if guidance_interval is not None else setup.defaults.get("guidance_interval")
    if sigmas is None or setup.conditioning == "none" or cfg_scale == 1.0:
        return None
    lo, hi = _check_sigma_interval(sigmas)
    ts = sampler_timesteps(setup, sampler, steps)
    guided = round(guided_fraction(ts, guidance_timestep_interval(setup, (lo, hi))) * len(ts))
    return f"guidance on {guided} of {len(ts)} steps (sigma in ({lo:g}, {hi:g}])"


# ----------------------------------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------------------------------


# --precision -> the network's autocast dtype on CUDA (None: fp32). fp16 keeps 3 more mantissa bits than bf16: the
# UNets' output is 1.4e-3 - 1.9e-3 from fp32 in fp16 against 1.1e-2 - 1.5e-2 in bf16 (docs/benchmarks.md, run 24).
PRECISIONS: dict[str, torch.dtype | None] = {**AUTOCAST_DTYPES, "fp32": None}


def _autocast_model(model: Callable, device: torch.device, precision: str) -> Callable:
    """Run the network under bf16 / fp16 autocast on CUDA (``precision``, a ``PRECISIONS`` key), returning float32;
    the diffusion math stays fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"--precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    dtype = PRECISIONS[precision]
    if dtype is None or device.type != "cuda":
        return model

    def run(x: torch.Tensor, t: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        with torch.autocast("cuda", dtype=dtype):
            return model(x, t, **kwargs).float()

    return run


def _respacing(sampler: str, steps: int) -> str:
    if sampler not in SAMPLERS:
        raise ValueError(f"--sampler: expected one of {', '.join(SAMPLERS)}, got {sampler!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"--steps must be a positive integer, got {steps!r}")
    # ddpm/ddim: ADM/DiT even spacing over the 1000 steps (official sample.py uses create_diffusion(str(steps)) for
    # both); diffusers samplers pick their own timesteps from the full schedule.
    return str(steps) if sampler in ("ddpm", "ddim") else ""


def _run_sampler(diffusion, fn: Callable, sampler: str, steps: int, noise: torch.Tensor, model_kwargs: dict,
                 generator: torch.Generator | None, eta: float, progress: bool) -> torch.Tensor:
    device = noise.device
    if sampler == "ddpm":
        return diffusion.p_sample_loop(fn, noise.shape, noise, model_kwargs=model_kwargs, device=device,
                                       progress=progress, generator=generator)
    if sampler == "ddim":
        return diffusion.ddim_sample_loop(fn, noise.shape, noise, model_kwargs=model_kwargs, device=device,
                                          progress=progress, eta=eta, generator=generator)
    from dit.diffusion import sample_with_diffusers

    name = {"dpm-solver++": "dpmsolver++"}.get(sampler, sampler)  # the diffusion core's scheduler names
    return sample_with_diffusers(fn, diffusion, name, steps, noise.shape, noise=noise, model_kwargs=model_kwargs,
                                 generator=generator, progress=progress, device=device)


@torch.no_grad()
def sample_latents(setup: SamplingSetup, cond: dict, uncond: dict | None, n: int, *, sampler: str = "ddim",
                   steps: int = 50, cfg_scale: float = 4.0, generator: torch.Generator | None = None,
                   noise: torch.Tensor | None = None, eta: float = 0.0, precision: str = "fp32",
                   progress: bool = False, guidance_interval: tuple[float, float] | None = None) -> torch.Tensor:
    """Standard-convention sampling of n latents (n, C, h, w); noise from ``generator`` (initial and per step).

    Guidance (``classifier_free_guidance`` on the prediction channels) is used when ``uncond`` is given and
    ``cfg_scale != 1``; ``guidance_interval=(sigma_lo, sigma_hi)`` limits it to the steps with sigma_t in that range
    (arXiv:2404.07724); the other steps run the conditional model alone. None: guide every step.
    """
    from dit.diffusion import create_diffusion
    from dit.diffusion.guidance import classifier_free_guidance

    device = next(setup.model.parameters()).device
    diffusion = create_diffusion(timestep_respacing=_respacing(sampler, steps), **setup.diffusion_kwargs)
    fn = _autocast_model(setup.model, device, precision)
    interval = None if guidance_interval is None else guidance_timestep_interval(setup, guidance_interval)
    if uncond is not None and cfg_scale != 1.0:
        fn = classifier_free_guidance(fn, cfg_scale, uncond, pred_channels=setup.latent_shape[0], interval=interval)
    if noise is None:
        noise = torch.randn((n, *setup.latent_shape), generator=generator, device=device)
    return _run_sampler(diffusion, fn, sampler, steps, noise, cond, generator, eta, progress)


@torch.no_grad()
def sample_official(setup: SamplingSetup, labels: list[int], *, seed: int | None = 0, steps: int = 250,
                    cfg_scale: float = 4.0, sampler: str = "ddpm", eta: float = 0.0, precision: str = "fp32",
                    progress: bool = False) -> torch.Tensor:
    """facebookresearch/DiT ``sample.py``, step for step: ``torch.manual_seed(seed)``; ``z = randn(n, C, h, w)`` on the
    model's device from the global RNG; ``z = cat([z, z])``, ``y = cat([labels, null])``; ``p_sample_loop`` with
    ``forward_with_cfg`` (first 3 channels guided) drawing its per-step noise from the global RNG; keep the first
    half. Returns (n, C, h, w). ``seed=None`` leaves the global RNG as it is.
    """
    from dit.diffusion import create_diffusion
    from dit.diffusion.guidance import official_cfg_forward

    if sampler not in ("ddpm", "ddim"):
        raise ValueError(f"the official guidance convention supports --sampler ddpm or ddim, got {sampler!r}")
    check_conditions(setup, labels, None)
    device = next(setup.model.parameters()).device
    diffusion = create_diffusion(timestep_respacing=_respacing(sampler, steps), **setup.diffusion_kwargs)
    if seed is not None:
        torch.manual_seed(seed)
    n = len(labels)
    z = torch.randn(n, *setup.latent_shape, device=device)
    y = torch.tensor(labels, device=device)
    z = torch.cat([z, z], 0)  # (2n, C, h, w)
    y = torch.cat([y, torch.full_like(y, setup.num_classes)], 0)  # (2n,) cond then null
    fn = official_cfg_forward(_autocast_model(setup.model, device, precision), cfg_scale)
    out = _run_sampler(diffusion, fn, sampler, steps, z, {"y": y}, None, eta, progress)
    return out.chunk(2, dim=0)[0]


@torch.no_grad()
def decode_to_uint8(autoencoder: Any, latents: torch.Tensor) -> np.ndarray:
    """Latents (N, C, h, w) -> uint8 images (N, H, W, 3) with the ADM/DiT ``clamp(127.5 x + 128, 0, 255)`` rule."""
    images = autoencoder.decode(latents.float()).float()  # (N, 3, H, W) in [-1, 1]
    return torch.clamp(127.5 * images + 128.0, 0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def save_grid(images: np.ndarray, path: str | os.PathLike, nrow: int | None = None, padding: int = 2) -> Path:
    """Save uint8 (N, H, W, 3) images as a PNG grid (``nrow`` columns, default ceil(sqrt(N)); black padding)."""
    from PIL import Image

    n, h, w, _ = images.shape
    cols = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * (h + padding) + padding, cols * (w + padding) + padding, 3), dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        y0, x0 = padding + r * (h + padding), padding + c * (w + padding)
        grid[y0 : y0 + h, x0 : x0 + w] = images[i]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)
    return path


def sample_images(setup: SamplingSetup, *, labels: list[int] | None = None, prompts: list[str] | None = None,
                  seed: int = 0, sampler: str | None = None, steps: int | None = None, cfg_scale: float | None = None,
                  official_cfg: bool | None = None, eta: float = 0.0, precision: str = "fp32",
                  progress: bool = False, guidance_interval: tuple[float, float] | None = None) -> np.ndarray:
    """Sample and decode one batch: uint8 (N, H, W, 3). Unset sampler/steps/cfg_scale/guidance_interval come from
    ``setup.defaults`` (pass ``(0, inf)`` to guide every step regardless); ``official_cfg=None`` means: official
    convention for official checkpoints with ddpm/ddim, which has no guidance interval."""
    sampler = sampler or setup.defaults.get("sampler", "ddim")
    steps = steps or setup.defaults.get("steps", 50)
    cfg_scale = setup.defaults.get("cfg_scale", 4.0) if cfg_scale is None else cfg_scale
    if labels is None and setup.conditioning == "class":
        labels = default_labels(setup)
    check_conditions(setup, labels, prompts)
    if official_cfg is None:
        official_cfg = setup.source == "official" and sampler in ("ddpm", "ddim")
    if official_cfg:
        if guidance_interval is not None:
            raise ValueError("--guidance-interval is not supported with the official DiT guidance convention "
                             "(--official-cfg, the default for official checkpoints with ddpm/ddim); "
                             "pass --no-official-cfg")
        if setup.conditioning != "class":
            raise ValueError("--official-cfg needs a class-conditional model (DiT's forward_with_cfg takes labels)")
        z = sample_official(setup, labels, seed=seed, steps=steps, cfg_scale=cfg_scale, sampler=sampler, eta=eta,
                            precision=precision, progress=progress)
    else:
        device = next(setup.model.parameters()).device
        cond, uncond = make_conditions(setup, labels=labels, prompts=prompts, device=device)
        n = len(labels) if labels is not None else (len(prompts) if prompts else 1)
        g = torch.Generator(device=device).manual_seed(seed)
        if guidance_interval is None:
            guidance_interval = setup.defaults.get("guidance_interval")
        z = sample_latents(setup, cond, uncond, n, sampler=sampler, steps=steps, cfg_scale=cfg_scale, generator=g,
                           eta=eta, precision=precision, progress=progress, guidance_interval=guidance_interval)
    return decode_to_uint8(setup.autoencoder, z)


# ----------------------------------------------------------------------------------------------------------------------
# Many samples -> .npz (ADM evaluation-suite layout), resumable and split over processes
# ----------------------------------------------------------------------------------------------------------------------


def batch_seed(seed: int, batch_index: int) -> int:
    """Seed of index-batch ``batch_index``: independent of how many processes share the work."""
    state = np.random.SeedSequence([int(seed), int(batch_index)]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 32 | int(state[1])


def _atomic_savez(path: Path, **arrays: np.ndarray) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:  # a file object: np.savez appends no extension
        np.savez(f, **arrays)
    os.replace(tmp, path)  # atomic: a killed run never leaves a half-written part


def _check_meta(parts: Path, meta: dict) -> None:
    meta_path = parts / "meta.json"
    if meta_path.is_file():
        old = json.loads(meta_path.read_text())
        # over both key sets: a setting recorded only when on (fp8) must match when it is off, too
        diff = {k: (old.get(k), meta.get(k)) for k in [*meta, *(k for k in old if k not in meta)]
                if old.get(k) != meta.get(k)}
        if diff:
            what = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"{parts} holds parts made with other settings ({what}); delete it or choose another "
                             "--npz to start over")
        return
    tmp = meta_path.with_name(f"meta.json.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, meta_path)


def sample_npz_parts(setup: SamplingSetup, npz: str | os.PathLike, *, num_samples: int, batch_size: int = 64,
                     seed: int = 0, sampler: str | None = None, steps: int | None = None,
                     cfg_scale: float | None = None, prompts: list[str] | None = None, eta: float = 0.0,
                     precision: str = "fp32", rank: int = 0, world_size: int = 1, progress: bool = False,
                     guidance_interval: tuple[float, float] | None = None) -> list[int]:
    """Sample this process's share of ``num_samples`` images into ``<npz>.parts/batch_XXXXXX.npz``.

    Global sample i has class label ``i % num_classes`` (prompt ``i % len(prompts)`` for text models). Batch b
    (indices ``b*batch_size ..``) is done by rank ``b % world_size`` with its own generator seeded from
    ``(seed, b)``, so the images do not depend on the number of processes. Finished parts are skipped (resume).
    ``guidance_interval`` (sigma units) defaults to the checkpoint's, as in ``sample_images``.
    Returns the batch indices sampled by this call.
    """
    if num_samples < 1 or batch_size < 1:
        raise ValueError(f"--num-samples and --batch-size must be positive, got {num_samples} and {batch_size}")
    sampler = sampler or setup.defaults.get("sampler", "ddim")
    steps = steps or setup.defaults.get("steps", 50)
    cfg_scale = setup.defaults.get("cfg_scale", 4.0) if cfg_scale is None else cfg_scale
    if guidance_interval is None:
        guidance_interval = setup.defaults.get("guidance_interval")
    if guidance_interval is not None:
        guidance_interval = _check_sigma_interval(guidance_interval)
    check_conditions(setup, [0] if setup.conditioning == "class" else None, prompts)
    parts = Path(f"{npz}.parts")
    parts.mkdir(parents=True, exist_ok=True)
    meta = {"ckpt": str(Path(setup.ckpt_path).resolve()) if setup.ckpt_path else None,
            "num_samples": num_samples, "batch_size": batch_size, "seed": seed, "sampler": sampler,
            "steps": steps, "cfg_scale": cfg_scale, "eta": eta, "prompts": prompts, "precision": precision,
            "guidance_interval": None if guidance_interval is None else list(guidance_interval)}
    if uses_float8(setup.model):  # recorded only when on, so parts written before this key existed still resume
        meta["fp8"] = True
    _check_meta(parts, meta)
    num_batches = math.ceil(num_samples / batch_size)
    mine = [b for b in range(rank, num_batches, world_size) if not (parts / f"batch_{b:06d}.npz").is_file()]
    device = next(setup.model.parameters()).device
    text = _TextConditions(setup, device) if setup.conditioning == "text" else None
    bar = None
    if progress:
        from tqdm import tqdm

        todo = sum(min(batch_size, num_samples - b * batch_size) for b in mine)
        bar = tqdm(total=todo, unit="img", desc=f"rank {rank}", dynamic_ncols=True)
    for b in mine:
        idx = np.arange(b * batch_size, min((b + 1) * batch_size, num_samples))
        labels = None
        if setup.conditioning == "class":
            labels = (idx % setup.num_classes).tolist()
            stored = np.asarray(labels, dtype=np.int64)
        elif setup.conditioning == "text":
            stored = idx % len(prompts)
        else:
            stored = np.full(len(idx), -1, dtype=np.int64)
        cond, uncond = make_conditions(setup, labels=labels, device=device, text=text,
                                       prompts=[prompts[i] for i in stored] if text is not None else None)
        g = torch.Generator(device=device).manual_seed(batch_seed(seed, b))
        z = sample_latents(setup, cond, uncond, len(idx), sampler=sampler, steps=steps, cfg_scale=cfg_scale,
                           generator=g, eta=eta, precision=precision, guidance_interval=guidance_interval)
        _atomic_savez(parts / f"batch_{b:06d}.npz", images=decode_to_uint8(setup.autoencoder, z), labels=stored,
                      indices=idx)
        if bar is not None:
            bar.update(len(idx))
    if bar is not None:
        bar.close()
    return mine


def gather_npz_parts(npz: str | os.PathLike, *, num_samples: int, batch_size: int) -> Path:
    """Concatenate ``<npz>.parts/`` into ``npz``: ``arr_0`` uint8 (N, H, W, 3) and ``labels`` (N,), after checking
    that every global index 0..N-1 was produced exactly once."""
    parts = Path(f"{npz}.parts")
    num_batches = math.ceil(num_samples / batch_size)
    missing = [b for b in range(num_batches) if not (parts / f"batch_{b:06d}.npz").is_file()]
    if missing:
        raise ValueError(f"{parts}: {len(missing)} of {num_batches} batches are missing (first: {missing[:5]}); "
                         "run the sampling again to finish them")
    images, labels, indices = [], [], []
    for b in range(num_batches):
        with np.load(parts / f"batch_{b:06d}.npz") as d:
            images.append(d["images"])
            labels.append(d["labels"])
            indices.append(d["indices"])
    idx = np.concatenate(indices)
    if not np.array_equal(np.sort(idx), np.arange(num_samples)) or len(idx) != num_samples:
        raise ValueError(f"{parts}: the parts do not hold every index 0..{num_samples - 1} exactly once")
    order = np.argsort(idx, kind="stable")
    out = Path(npz)
    out.parent.mkdir(parents=True, exist_ok=True)
    _atomic_savez(out, arr_0=np.concatenate(images)[order], labels=np.concatenate(labels)[order])
    return out


def sample_to_npz(setup: SamplingSetup, npz: str | os.PathLike, *, num_samples: int, batch_size: int = 64,
                  seed: int = 0, progress: bool = True, **kwargs: Any) -> Path | None:
    """Multi-process ``.npz`` sampling through ``accelerate`` (single process without a launcher): every process
    samples its share, then the main process gathers. Returns the ``.npz`` path on the main process, else None."""
    from accelerate import PartialState

    state = PartialState()
    t0 = time.time()
    done = sample_npz_parts(setup, npz, num_samples=num_samples, batch_size=batch_size, seed=seed,
                            rank=state.process_index, world_size=state.num_processes,
                            progress=progress and state.is_local_main_process, **kwargs)
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    out = gather_npz_parts(npz, num_samples=num_samples, batch_size=batch_size)
    if progress:
        print(f"wrote {out} ({num_samples} images; {len(done)} batches sampled by the main process in "
              f"{time.time() - t0:.0f}s)")
    return out


__all__ = [
    "NO_CKPT_MESSAGE", "OFFICIAL_LABELS", "SAMPLERS", "SamplingSetup", "batch_seed", "check_conditions",
    "decode_to_uint8", "default_labels", "gather_npz_parts", "guidance_interval_summary", "guidance_timestep_interval",
    "load_sampling_setup", "make_conditions", "parse_class_labels", "parse_guidance_interval", "sample_images",
    "sample_latents", "sample_npz_parts", "sample_official", "sample_to_npz", "sampler_timesteps", "save_grid",
]
