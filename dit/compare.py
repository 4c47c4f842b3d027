"""The UNet-vs-DiT comparison study as one function: train every model under one budget, sample and score them the
same way, and write one report (``report.md``, ``results.json``, PNG plots).

What "the same way" means here:

* **training**: one base config (data, autoencoder, diffusion, optimiser, seed, batch size) for every model; only
  ``model.*`` keys may differ per model. The budget is a number of images seen (``ceil(N / global_batch_size)``
  optimizer steps for every model) and/or GPU minutes (converted to a step count per model by a short timed
  calibration run of the real trainer, recorded in ``plan.json``). Each model trains in its own run directory with
  ``train.resume=auto``: a finished model (``compare_train.json`` present for the same step budget) is skipped, an
  interrupted one resumes from its newest checkpoint.
* **sampling**: the EMA weights, the same sampler / steps / CFG scale, the same initial noise per sample index
  (sample i starts from ``randn`` seeded by ``(seed, i)``, whatever the batch size) and balanced labels
  (label of sample i = ``i % num_classes``); text models (``-T``) get the prompt ``"a <class name>"``, e.g.
  ``"a red circle"``, and the empty prompt as the unconditional branch.
* **scores**: conditional accuracy and FD-shapes (Frechet distance in the bundled-shapes classifier's feature
  space; *not* FID and not comparable with FID numbers) with ``--eval-classifier``, each without guidance (scale 1)
  and with guidance; FID / sFID / IS / precision / recall with user-supplied Inception weights and a reference set.

Compute axis: ``training compute = forward GFLOPs x 3 x images seen`` (forward + backward ~ 3 forwards, as in the DiT
paper, Peebles & Xie 2023, Fig. 9); FLOPs are counted by ``dit.utils.flops`` at 2 FLOPs per multiply-add, so they are
twice the paper's "Gflops".

Sampling uses the diffusion core and ``dit.diffusion.guidance`` directly (a small adapter, ``generate``), so the study
does not depend on a particular sampling front end.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import json
import logging
import math
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dit import checkpointing
from dit.config import Config, load_config, parse_override, to_dict, validate
from dit.utils import AUTOCAST_DTYPES

logger = logging.getLogger("dit.compare")

TRAIN_MARKER = "compare_train.json"  # written in a model's run directory when its training budget is done
PLAN_FILE = "plan.json"


# --------------------------------------------------------------------------------------------------------------------
# Settings, names, overrides
# --------------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class CompareSettings:
    """Everything the study needs besides the base training config.

    budget_images / budget_minutes: at least one; with both, each model stops at whichever comes first.
    eval_points: checkpoints evaluated per model, evenly spaced over training (1 = the final one only).
    """

    models: list[str]
    out_dir: str = "runs/compare"
    budget_images: int | None = None
    budget_minutes: float | None = None
    calibration_steps: int = 30  # timed trainer steps per model that turn --budget-minutes into a step count
    eval_points: int = 1
    num_samples: int = 1200  # generated images per model and guidance scale
    sample_batch: int = 256
    sample_seed: int = 0
    num_steps: int | None = None  # sampler steps; None = the config's sample.num_steps
    sampler: str | None = None  # "ddim" | "ddpm"; None = the config's sample.sampler
    cfg_scale: float | None = None  # None = the config's sample.cfg_scale
    eval_classifier: str | None = None  # shapes classifier (.pt from tools/train_classifier.py)
    num_real: int = 1200  # real val-split images for FD-shapes
    inception: str | None = None  # FID Inception weights (pt_inception-2015-12-05-*.pth)
    reference: str | None = None  # reference images for FID (.npz arr_0 uint8 NHWC, or an image folder)
    text_encoder: str = "minilm"  # for -T models when the base config sets no text.encoder
    grid_size: int = 4  # grid_size x grid_size samples per model in samples.png
    device: str | None = None  # sampling / evaluation device (default: cuda if available)


def run_dir_name(model: str) -> str:
    """Run directory of a model: ``"DiT-S/2"`` -> ``"DiT-S_2"``."""
    return model.replace("/", "_")


def parse_models(text: str | list[str]) -> list[str]:
    """``"DiT-S/8,UNet-S"`` -> ``["DiT-S/8", "UNet-S"]``, each checked against the registry (its ``ValueError``
    lists the valid names). Duplicates and an empty list are errors."""
    from dit.models import model_defaults

    names = [n.strip() for n in text.split(",")] if isinstance(text, str) else [str(n).strip() for n in text]
    names = [n for n in names if n]
    if not names:
        raise ValueError("--models: expected a comma-separated list of model names, e.g. DiT-S/2,UNet-S")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"--models: {', '.join(dup)} listed more than once")
    for n in names:
        model_defaults(n)  # raises the registry's "unknown model ... Valid names: ..." message
    return names


def split_overrides(overrides: list[str], models: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """Split CLI overrides into common ones (``key=value``) and per-model ones (``MODEL:key=value``).

    Per-model overrides may only touch ``model.*`` keys (architecture size, dropout, compile, ...): data, diffusion,
    optimiser, seed and budget are shared by construction. Keys and values are checked later by ``load_config``.
    """
    common: list[str] = []
    per_model: dict[str, list[str]] = {m: [] for m in models}
    for text in overrides:
        head, sep, rest = text.partition(":")
        key_part = text.split("=", 1)[0]
        if sep and ":" in key_part:  # "DiT-S/8:model.overrides.depth=2" (a ':' inside the value does not count)
            if head not in per_model:
                raise ValueError(f"override {text!r}: {head!r} is not one of --models ({', '.join(models)})")
            key, _ = parse_override(rest)
            if not key.startswith("model."):
                raise ValueError(f"override {text!r}: per-model overrides may only set model.* keys (data, diffusion, "
                                 f"optimiser, seed and budget are shared by every model)")
            if key == "model.name":
                raise ValueError(f"override {text!r}: model.name comes from --models")
            per_model[head].append(rest)
        else:
            key, _ = parse_override(text)
            if key in ("model.name", "run.out_dir", "train.max_steps", "train.resume"):
                raise ValueError(f"override {text!r}: {key} is set by the comparison (use --models, --out, "
                                 f"--budget-images / --budget-minutes; resuming is automatic)")
            common.append(text)
    return common, per_model


def is_text_model(name: str) -> bool:
    from dit.models import model_defaults

    return model_defaults(name).get("context_dim") is not None


def model_configs(config_path: str | None, settings: CompareSettings, common: list[str],
                  per_model: dict[str, list[str]], max_steps: dict[str, int] | None = None) -> dict[str, Config]:
    """One validated :class:`Config` per model: base file + common overrides + the model's own ``model.*`` overrides
    + what the study fixes (name, run directory, automatic resume, text encoder, step budget, milestones)."""
    base = load_config(config_path, common)
    out: dict[str, Config] = {}
    for name in settings.models:
        cfg = load_config(config_path, common + per_model.get(name, []))
        cfg.model.name = name
        cfg.run.out_dir = str(Path(settings.out_dir) / run_dir_name(name))
        cfg.train.resume = "auto"
        # Class-conditional models refuse a text encoder and text models need one (the trainer checks both).
        cfg.text.encoder = (base.text.encoder or settings.text_encoder) if is_text_model(name) else None
        if max_steps is not None:
            cfg.train.max_steps = int(max_steps[name])
            if settings.eval_points > 1:  # keep evenly spaced milestone checkpoints to evaluate
                cfg.train.milestone_every = milestone_every(cfg.train.max_steps, settings.eval_points)
        validate(cfg, f"{config_path or 'defaults'} ({name})")
        out[name] = cfg
    return out


def milestone_every(max_steps: int, points: int) -> int:
    """Spacing of ``points`` evenly spaced evaluation checkpoints over ``max_steps`` steps (the last is the final)."""
    return max(1, math.ceil(max_steps / points))


def eval_steps(max_steps: int, points: int) -> list[int]:
    """The checkpoint steps evaluated: multiples of ``milestone_every`` below ``max_steps``, then ``max_steps``."""
    every = milestone_every(max_steps, points)
    return sorted({s for s in range(every, max_steps, every)} | {max_steps}) if points > 1 else [max_steps]


# --------------------------------------------------------------------------------------------------------------------
# Budget
# --------------------------------------------------------------------------------------------------------------------

def steps_for_images(budget_images: int, global_batch_size: int) -> int:
    """Optimizer steps that see at least ``budget_images`` images: ``ceil(N / B)``."""
    if budget_images < 1:
        raise ValueError(f"--budget-images must be a positive integer, got {budget_images}")
    return math.ceil(budget_images / global_batch_size)


def steps_for_minutes(minutes: float, img_per_s: float, global_batch_size: int) -> int:
    """Optimizer steps that fit in ``minutes`` at a measured ``img_per_s`` (at least 1)."""
    if minutes <= 0:
        raise ValueError(f"--budget-minutes must be positive, got {minutes}")
    if not img_per_s > 0:
        raise ValueError(f"calibration measured a non-positive throughput ({img_per_s} img/s)")
    return max(1, int(minutes * 60.0 * img_per_s / global_batch_size))


def read_log(run_dir: str | Path) -> list[dict]:
    """Rows of a run's ``train_log.jsonl`` (``[]`` if there is none)."""
    path = Path(run_dir) / "train_log.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def log_throughput(rows: list[dict], global_batch_size: int, skip: int = 3) -> float | None:
    """Median training img/s over logged steps (``B / step_time``), skipping the first ``skip`` warm-up steps when
    there are enough rows. None without rows."""
    times = [r["step_time"] for r in rows if r.get("step_time")]
    if len(times) > 2 * skip:
        times = times[skip:]
    if not times:
        return None
    return global_batch_size / statistics.median(times)


def calibrate(cfg: Config, steps: int, scratch: Path) -> float:
    """Training img/s of ``cfg``'s model measured by running the real trainer for ``steps`` steps in ``scratch``."""
    from dit.train import train

    c = copy.deepcopy(cfg)  # a short run with no side outputs
    c.train.max_steps, c.train.resume, c.train.milestone_every = steps, None, 0
    c.train.ckpt_every, c.train.sample_every, c.train.log_every = steps, 0, steps
    c.sample.grid_size, c.sample.num_steps = 1, 2  # (the end-of-run grid; ddim1 is not a valid respacing)
    c.run.out_dir, c.run.tensorboard = str(scratch), False
    train(c)
    img_s = log_throughput(read_log(scratch), c.train.global_batch_size)
    for _, p in checkpointing.list_checkpoints(checkpointing.checkpoint_dir(scratch)):
        p.unlink(missing_ok=True)  # only the timing is wanted
    if img_s is None:
        raise RuntimeError(f"calibration of {cfg.model.name} wrote no timed steps in {scratch}")
    return img_s


def plan_budget(settings: CompareSettings, configs: dict[str, Config]) -> dict:
    """Steps per model for the budget, reusing ``plan.json`` when the budget arguments are unchanged (so a resumed
    study keeps the calibration it started with)."""
    if settings.budget_images is None and settings.budget_minutes is None:
        raise ValueError("give a budget: --budget-images N and/or --budget-minutes M")
    out = Path(settings.out_dir)
    plan_path = out / PLAN_FILE
    budget = {"budget_images": settings.budget_images, "budget_minutes": settings.budget_minutes,
              "calibration_steps": settings.calibration_steps}
    old = json.loads(plan_path.read_text()) if plan_path.is_file() else {}
    if old.get("budget") != budget:
        old = {}
    plan = {"budget": budget, "max_steps": dict(old.get("max_steps", {})),
            "calibration_img_per_s": dict(old.get("calibration_img_per_s", {}))}
    for name, cfg in configs.items():
        if name in plan["max_steps"]:
            continue
        b = cfg.train.global_batch_size
        candidates = []
        if settings.budget_images is not None:
            candidates.append(steps_for_images(settings.budget_images, b))
        if settings.budget_minutes is not None:
            if settings.calibration_steps < 1:
                raise ValueError(f"--calibration-steps must be >= 1, got {settings.calibration_steps}")
            img_s = calibrate(cfg, settings.calibration_steps, out / "_calibration" / run_dir_name(name))
            plan["calibration_img_per_s"][name] = img_s
            candidates.append(steps_for_minutes(settings.budget_minutes, img_s, b))
        plan["max_steps"][name] = min(candidates)
        _write_json(plan_path, plan)  # after every model: an interrupted calibration keeps what it measured
    _write_json(plan_path, plan)
    return plan


# --------------------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------------------

def train_model(cfg: Config) -> dict:
    """Train (or resume, or skip) one model to ``cfg.train.max_steps``; returns its ``compare_train.json`` content."""
    from dit.train import train

    run_dir = Path(cfg.run.out_dir)
    marker = run_dir / TRAIN_MARKER
    if marker.is_file():
        done = json.loads(marker.read_text())
        if done.get("max_steps") == cfg.train.max_steps:
            logger.info("%s: finished earlier (%d steps), skipping training", cfg.model.name, done["max_steps"])
            done["skipped"] = True
            return done
        raise ValueError(f"{marker}: {cfg.model.name} was trained for {done.get('max_steps')} steps but this budget "
                         f"asks for {cfg.train.max_steps}; use a new --out directory for a different budget")
    cuda = torch.cuda.is_available()
    _free_memory()  # the previous model's tensors must not count towards this model's peak
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    summary = train(cfg)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    _free_memory()
    done = {"model": cfg.model.name, "max_steps": cfg.train.max_steps, "steps": summary["steps"],
            "images_seen": summary["images_seen"], "resumed_from": summary.get("resumed_from"),
            "peak_mem_gib": peak,
            "seconds": summary.get("seconds"), "checkpoint": summary.get("checkpoint")}
    _write_json(marker, done)
    done["skipped"] = False
    return done


# --------------------------------------------------------------------------------------------------------------------
# Sampling (adapter over the diffusion core) and evaluation
# --------------------------------------------------------------------------------------------------------------------

def load_ema_model(state: dict, device: torch.device) -> torch.nn.Module:
    """The EMA network of a training checkpoint, in eval mode on ``device``."""
    from dit.models import create_model

    model = create_model(state["model_name"], **state["model_kwargs"])
    model.load_state_dict(state["ema"])
    return model.eval().requires_grad_(False).to(device)


def sample_noise(n: int, shape: tuple[int, ...], seed: int, start: int = 0) -> torch.Tensor:
    """Initial noise of samples ``start .. start+n-1``: (n, *shape), sample i drawn from a generator seeded by
    (seed, i), so a sample's noise does not depend on the batch it is drawn in."""
    from dit.train import step_seed

    g = torch.Generator()
    return torch.stack([torch.randn(shape, generator=g.manual_seed(step_seed(seed, start + i, 0xC0DE)))
                        for i in range(n)])


def can_guide(state: dict) -> bool:
    """Whether a checkpoint's model has an unconditional branch: text models (empty prompt) always, class models
    only when trained with label dropout."""
    kw = state["model_kwargs"]
    return "num_classes" not in kw or int(kw.get("num_classes") or 0) == 0 or \
        float(kw.get("class_dropout_prob", 0.0)) > 0


def conditions(state: dict, labels: torch.Tensor, device: torch.device, text_encoder: Any = None
               ) -> tuple[dict, dict | None]:
    """(cond, uncond) model kwargs for ``labels`` (N,): class labels + the null class, or the prompts
    ``"a <class name>"`` + the empty prompt for text models. ``uncond`` is None when the model cannot be guided
    (a class model trained without label dropout)."""
    if text_encoder is not None:
        names = state["class_names"]
        enc = text_encoder.encode([f"a {names[int(i)]}" for i in labels])
        empty = text_encoder.empty_prompt(1)
        cond = {"context": enc["tokens"].to(device).float(), "context_mask": enc["mask"].to(device).bool(),
                "pooled": enc["pooled"].to(device).float()}
        uncond = {"context": empty["tokens"].to(device).float(), "context_mask": empty["mask"].to(device).bool(),
                  "pooled": empty["pooled"].to(device).float()}
        return cond, uncond
    kw = state["model_kwargs"]
    num_classes = int(kw["num_classes"])
    cond = {"y": labels.to(device)}
    if float(kw.get("class_dropout_prob", 0.0)) <= 0:
        return cond, None
    return cond, {"y": torch.full_like(labels, num_classes).to(device)}


@torch.no_grad()
def generate(model: torch.nn.Module, diffusion: Any, ae: Any, *, state: dict, labels: torch.Tensor, scale: float,
             sampler: str, seed: int, batch_size: int, device: torch.device, text_encoder: Any = None,
             autocast_dtype: torch.dtype | None = None) -> np.ndarray:
    """Generate one image per label (N,) with guidance ``scale`` (1 = none) and decode: uint8 (N, H, W, 3)."""
    from dit.diffusion.guidance import classifier_free_guidance

    latent_shape = (int(model.in_channels), int(model.input_size), int(model.input_size))
    out = []
    for start in range(0, labels.shape[0], batch_size):
        lab = labels[start: start + batch_size]
        n = lab.shape[0]
        noise = sample_noise(n, latent_shape, seed, start).to(device)  # (n, C, h, w)
        cond, uncond = conditions(state, lab, device, text_encoder)
        fn: Any = model
        if scale != 1.0:
            if uncond is None:
                raise ValueError(f"{state['model_name']}: guidance scale {scale} needs a model trained with label "
                                 f"dropout (model.class_dropout_prob > 0)")
            fn = classifier_free_guidance(model, scale, uncond, pred_channels=latent_shape[0])
        amp = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
               else contextlib.nullcontext())
        with amp:
            if sampler == "ddim":
                z = diffusion.ddim_sample_loop(fn, noise.shape, noise=noise, model_kwargs=cond, device=device, eta=0.0)
            else:
                g = torch.Generator(device=device).manual_seed(seed + start)
                z = diffusion.p_sample_loop(fn, noise.shape, noise=noise, model_kwargs=cond, device=device,
                                            generator=g)
            images = ae.decode(z.float()).float()  # (n, 3, H, W) in [-1, 1]
        u8 = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (n, 3, H, W)
        out.append(u8.permute(0, 2, 3, 1).cpu().numpy())  # (n, H, W, 3)
    return np.concatenate(out)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Evaluator:
    """Shared evaluation resources (classifier, real features, Inception), loaded once for all models."""

    def __init__(self, settings: CompareSettings, device: torch.device):
        self.settings, self.device = settings, device
        self.classifier = None
        self.real_images: dict[int, torch.Tensor] = {}
        self.inception = None
        if settings.eval_classifier is not None:
            from dit.eval.shapes_eval import load_classifier

            self.classifier = load_classifier(settings.eval_classifier, device=device)
        if (settings.inception is None) != (settings.reference is None):
            raise ValueError("FID needs both --inception (weights) and --reference (images .npz or folder)")
        if settings.reference is not None and not Path(settings.reference).exists():
            raise FileNotFoundError(f"--reference {settings.reference!r} does not exist")
        if settings.inception is not None:
            from dit.eval import load_fid_inception

            self.inception = load_fid_inception(settings.inception, device=device)

    def check_classes(self, class_names: list[str]) -> None:
        if self.classifier is not None and list(self.classifier.classes) != list(class_names):
            raise ValueError(f"--eval-classifier {self.settings.eval_classifier!r} knows classes "
                             f"{self.classifier.classes[:4]}... but the models were trained on {class_names[:4]}...; "
                             f"train a classifier on the same data (tools/train_classifier.py)")

    def real(self, resolution: int) -> torch.Tensor:
        """Real val-split images (num_real, 3, R, R) in [-1, 1] rendered at the samples' resolution, so real and
        generated images reach the classifier through the same resize (rendered once per resolution)."""
        if resolution not in self.real_images:
            from dit.eval.shapes_eval import render_split

            self.real_images[resolution], _ = render_split(resolution, self.settings.num_real, "val", 0)
        return self.real_images[resolution]

    def score(self, images: np.ndarray, labels: torch.Tensor, npz_path: Path) -> dict:
        """Metrics of uint8 (N, H, W, 3) samples generated for ``labels`` (N,); ``npz_path`` holds them for FID."""
        m: dict[str, float] = {}
        if self.classifier is not None:
            from dit.eval.shapes_eval import accuracy_breakdown, fd_shapes, predict, uint8_to_model_range

            x = uint8_to_model_range(images)  # the same quantised images any npz-based evaluation would see
            m.update(accuracy_breakdown(list(self.classifier.classes), predict(self.classifier, x), labels))
            m["fd_shapes"] = fd_shapes(self.classifier, x, self.real(int(x.shape[-1])))
        if self.inception is not None:
            from dit.eval import evaluate_sources
            from dit.eval.features import extractor_id

            fid = evaluate_sources(npz_path, self.settings.reference, self.inception,
                                   extractor=extractor_id(self.settings.inception),
                                   cache_dir=Path(self.settings.out_dir) / "fid_cache", device=self.device)
            m.update({k: fid[k] for k in ("fid", "sfid", "is", "precision", "recall")})
        return m


def eval_key(settings: CompareSettings, sampler: str, steps: int, scale: float) -> dict:
    """What an evaluation depends on besides the checkpoint (a cached result is reused only if this matches)."""
    return {"num_samples": settings.num_samples, "seed": settings.sample_seed, "sampler": sampler, "steps": steps,
            "cfg_scale": scale, "classifier": settings.eval_classifier, "num_real": settings.num_real,
            "inception": settings.inception, "reference": settings.reference}


def evaluate_checkpoint(ckpt: Path, cfg: Config, settings: CompareSettings, evaluator: Evaluator,
                        device: torch.device) -> dict:
    """Sample a checkpoint's EMA model without and with guidance and score both; cached in ``<run>/compare/``."""
    from dit.diffusion import create_diffusion
    from vae import load_autoencoder

    sampler = settings.sampler or cfg.sample.sampler
    steps = settings.num_steps or cfg.sample.num_steps
    scale = cfg.sample.cfg_scale if settings.cfg_scale is None else settings.cfg_scale
    state = checkpointing.load_checkpoint(ckpt)
    step = int(state["step"])
    out = Path(cfg.run.out_dir) / "compare"
    cache = out / f"eval_step{step:07d}.json"
    key = eval_key(settings, sampler, steps, scale)
    if cache.is_file():
        cached = json.loads(cache.read_text())
        if cached.get("key") == key:
            return cached
    evaluator.check_classes(state["class_names"])
    model = load_ema_model(state, device)
    info = state["autoencoder"]
    ae = load_autoencoder(info["spec"], device=device, scale=info.get("scale"), shift=info.get("shift"))
    respacing = f"ddim{steps}" if sampler == "ddim" else str(steps)
    diffusion = create_diffusion(timestep_respacing=respacing, **state["diffusion"])
    text_encoder = None
    if model.conditioning == "text":
        from dit.text import load_text_encoder

        text_encoder = load_text_encoder(state["text_encoder"], device=device,
                                         max_length=int(state["config"]["text"]["max_length"]))
    num_classes = max(1, len(state["class_names"]))
    labels = torch.arange(settings.num_samples) % num_classes  # balanced labels, the same for every model
    mp = state["config"]["train"]["mixed_precision"]
    autocast = AUTOCAST_DTYPES.get(mp) if device.type == "cuda" else None
    result: dict[str, Any] = {"key": key, "step": step, "images_seen": int(state["images_seen"]), "metrics": {}}
    scales = [1.0] + ([scale] if scale != 1.0 else [])
    for s in scales:
        if s != 1.0 and not can_guide(state):
            logger.warning("%s: trained without label dropout, no guided samples", state["model_name"])
            continue
        _sync(device)
        t0 = time.perf_counter()
        images = generate(model, diffusion, ae, state=state, labels=labels, scale=s, sampler=sampler,
                          seed=settings.sample_seed, batch_size=settings.sample_batch, device=device,
                          text_encoder=text_encoder, autocast_dtype=autocast)
        _sync(device)
        seconds = time.perf_counter() - t0
        npz = out / f"samples_step{step:07d}_cfg{s:g}.npz"
        npz.parent.mkdir(parents=True, exist_ok=True)
        np.savez(npz, arr_0=images, labels=labels.numpy())
        metrics = evaluator.score(images, labels, npz)
        metrics["sample_img_per_s"] = images.shape[0] / max(seconds, 1e-9)
        metrics["npz"] = str(npz)
        result["metrics"][f"{s:g}"] = metrics
    result["cfg_scale"] = scale
    _write_json(cache, result)
    del model, ae, text_encoder
    _free_memory()
    return result


# --------------------------------------------------------------------------------------------------------------------
# Static measurements
# --------------------------------------------------------------------------------------------------------------------

def model_cost(state: dict) -> dict:
    """Parameter count and forward GFLOPs per image (2 FLOPs per multiply-add) of a checkpoint's architecture,
    measured on a meta-device copy (no memory, no compute)."""
    from dit.models import create_model
    from dit.utils.flops import forward_flops

    with torch.device("meta"):
        model = create_model(state["model_name"], **state["model_kwargs"])
    params = sum(p.numel() for p in model.parameters())
    context_len = int(state.get("config", {}).get("text", {}).get("max_length", 32))
    return {"params": int(params), "gflops": forward_flops(model, batch_size=1, context_len=context_len) / 1e9}


# --------------------------------------------------------------------------------------------------------------------
# The study
# --------------------------------------------------------------------------------------------------------------------

def run_compare(settings: CompareSettings, config_path: str | None = None, overrides: list[str] | tuple = ()) -> dict:
    """Train, sample, evaluate every model of ``settings.models`` and write the report; returns ``results.json``'s
    content. All names, options and configs are checked before anything trains."""
    settings.models = parse_models(settings.models)
    for name, v in (("--num-samples", settings.num_samples), ("--sample-batch", settings.sample_batch),
                    ("--eval-points", settings.eval_points), ("--grid-size", settings.grid_size)):
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    if settings.num_steps is not None and settings.num_steps < 1:
        raise ValueError(f"--num-steps must be >= 1, got {settings.num_steps}")
    if settings.num_samples < 2 and settings.eval_classifier is not None:
        raise ValueError("--num-samples must be >= 2 for FD-shapes (a covariance needs two samples)")
    if settings.budget_images is None and settings.budget_minutes is None:
        raise ValueError("give a budget: --budget-images N and/or --budget-minutes M")
    if settings.budget_images is not None:
        steps_for_images(settings.budget_images, 1)  # validates
    if settings.budget_minutes is not None and settings.budget_minutes <= 0:
        raise ValueError(f"--budget-minutes must be positive, got {settings.budget_minutes}")
    if settings.sampler not in (None, "ddim", "ddpm"):
        raise ValueError(f"--sampler must be 'ddim' or 'ddpm', got {settings.sampler!r}")
    if settings.eval_classifier is not None and not Path(settings.eval_classifier).is_file():
        raise FileNotFoundError(f"--eval-classifier {settings.eval_classifier!r} not found; train one with "
                                f"tools/train_classifier.py")
    common, per_model = split_overrides(list(overrides), settings.models)
    configs = model_configs(config_path, settings, common, per_model)  # validates every config before training
    device = torch.device(settings.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    evaluator = Evaluator(settings, device)  # loads classifier / Inception: fail now, not after hours of training

    out = Path(settings.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plan = plan_budget(settings, configs)
    configs = model_configs(config_path, settings, common, per_model, plan["max_steps"])

    trained = {name: train_model(cfg) for name, cfg in configs.items()}

    rows = []
    for name, cfg in configs.items():
        run_dir = Path(cfg.run.out_dir)
        ckpts = dict(checkpointing.list_checkpoints(checkpointing.checkpoint_dir(run_dir)))
        wanted = [s for s in eval_steps(cfg.train.max_steps, settings.eval_points) if s in ckpts]
        if cfg.train.max_steps not in ckpts:
            raise FileNotFoundError(f"{run_dir}: no checkpoint at the final step {cfg.train.max_steps}")
        final_state = checkpointing.load_checkpoint(ckpts[cfg.train.max_steps])
        cost = model_cost(final_state)
        evals = []
        for s in wanted:
            r = evaluate_checkpoint(ckpts[s], cfg, settings, evaluator, device)
            r["train_compute_gflop"] = cost["gflops"] * 3 * r["images_seen"]
            evals.append(r)
        log = read_log(run_dir)
        losses = [r["loss"] for r in log if r.get("loss") is not None and math.isfinite(r["loss"])]
        rows.append({
            "model": name, "run_dir": str(run_dir), **cost,
            "max_steps": cfg.train.max_steps, "images_seen": int(final_state["images_seen"]),
            "train_compute_gflop": cost["gflops"] * 3 * int(final_state["images_seen"]),
            "train_img_per_s": log_throughput(log, cfg.train.global_batch_size),
            "train_seconds": sum(r.get("step_time") or 0.0 for r in log),
            "peak_mem_gib": trained[name].get("peak_mem_gib"),
            "final_loss": statistics.fmean(losses[-20:]) if losses else None,
            "skipped_training": trained[name]["skipped"], "resumed_from": trained[name].get("resumed_from"),
            "evals": evals,
        })
    first = configs[settings.models[0]]
    shared = to_dict(first)
    shared.pop("model")
    shared["run"].pop("out_dir")
    shared["text"].pop("encoder")  # per model (None for class-conditional models), in model_config
    results = {
        "settings": {**dataclasses.asdict(settings),
                     "sampler": settings.sampler or first.sample.sampler,
                     "num_steps": settings.num_steps or first.sample.num_steps,
                     "cfg_scale": first.sample.cfg_scale if settings.cfg_scale is None else settings.cfg_scale,
                     "config_file": config_path, "overrides": list(overrides), "device": str(device)},
        "plan": plan, "shared_config": shared,
        "model_config": {n: {**to_dict(c)["model"], "text_encoder": c.text.encoder} for n, c in configs.items()},
        "models": rows,
    }
    _write_json(out / "results.json", results)
    write_report(results, out)
    return results


# --------------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------------

def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    if isinstance(v, int):
        return f"{v:,}"
    return f"{v:.{digits}g}" if abs(v) < 1e4 else f"{v:,.0f}"


def _final_metrics(row: dict) -> dict[str, dict]:
    return row["evals"][-1]["metrics"] if row["evals"] else {}


def write_report(results: dict, out_dir: str | Path) -> Path:
    """``report.md`` with the table and the four plots (``loss_curves.png``, ``score_vs_compute.png``,
    ``score_vs_gflops.png``, ``samples.png``) from ``results``."""
    out = Path(out_dir)
    s = results["settings"]
    scale = s["cfg_scale"]
    rows = results["models"]
    guided = f"{scale:g}"
    metric_names = [k for k in ("accuracy", "acc_colour", "acc_shape", "fd_shapes", "fid") if any(
        k in m for r in rows for m in _final_metrics(r).values())]
    label = {"accuracy": "acc", "acc_colour": "colour", "acc_shape": "shape", "fd_shapes": "FD-shapes", "fid": "FID"}
    header = ["model", "params (M)", "GFLOPs", "train compute (PFLOP)", "images seen", "train img/s", "train time (min)",
              f"sample img/s (cfg {guided})", "peak mem (GiB)", "final loss"]
    for k in metric_names:
        header += [label[k], f"{label[k]} (cfg {guided})"] if scale != 1.0 else [label[k]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        fm = _final_metrics(r)
        samp = (fm.get(guided) or fm.get("1") or {}).get("sample_img_per_s")
        cells = [r["model"], _fmt(r["params"] / 1e6), _fmt(r["gflops"]), _fmt(r["train_compute_gflop"] / 1e6),
                 _fmt(r["images_seen"]), _fmt(r["train_img_per_s"]), _fmt(r["train_seconds"] / 60),
                 _fmt(samp), _fmt(r["peak_mem_gib"]),
                 _fmt(r["final_loss"], 4)]
        for k in metric_names:
            cells.append(_fmt(fm.get("1", {}).get(k), 4))
            if scale != 1.0:
                cells.append(_fmt(fm.get(guided, {}).get(k), 4))
        lines.append("| " + " | ".join(cells) + " |")

    plots = {"loss_curves": plot_losses(rows, out / "loss_curves.png"),
             "score_vs_compute": plot_scores(rows, metric_names, scale, out / "score_vs_compute.png", x="compute"),
             "score_vs_gflops": plot_scores(rows, metric_names, scale, out / "score_vs_gflops.png", x="gflops"),
             "samples": plot_samples(rows, scale, s["grid_size"], out / "samples.png")}
    budget = results["plan"]["budget"]
    budget_text = ", ".join(x for x in (
        f"{budget['budget_images']:,} images" if budget["budget_images"] is not None else "",
        f"{budget['budget_minutes']:g} minutes (calibrated, see plan.json)" if budget["budget_minutes"] else "") if x)
    sc = results["shared_config"]
    text = [
        "# DiT vs UNet comparison", "",
        f"Budget per model: {budget_text}. Shared: data `{sc['data']['source']}` at {sc['data']['resolution']} px, "
        f"autoencoder `{sc['autoencoder']['spec']}`, batch {sc['train']['global_batch_size']}, "
        f"lr {sc['train']['lr']:g}, "
        f"seed {sc['train']['seed']}, diffusion `{sc['diffusion']['noise_schedule']}`/{sc['diffusion']['loss']}.",
        f"Sampling: {s['num_samples']} samples per model and scale, {s['sampler']} {s['num_steps']} steps, EMA "
        f"weights, balanced labels, noise seeded per sample index (seed {s['sample_seed']}); guidance scale "
        f"{guided} (columns without 'cfg' use no guidance).", "",
        *lines, "",
        "- GFLOPs: forward pass per image, 2 FLOPs per multiply-add (twice the DiT paper's 'Gflops'); "
        "train compute = GFLOPs x 3 x images seen.",
        "- train img/s: median over logged steps; train time: sum of logged step times; peak mem: CUDA peak of the "
        "training run (n/a on CPU); sample img/s: guided sampling including decoding.",
        "- acc: conditional accuracy of the shapes classifier on the samples (colour / shape: the predicted class "
        "has the asked colour / shape; chance 1/3 and 1/4 for the bundled shapes); FD-shapes: Frechet distance of the "
        "classifier's penultimate features, generated vs real val images. FD-shapes is *not* FID: compare it only "
        "between runs scored with the same classifier file."
        if any(k in metric_names for k in ("accuracy", "fd_shapes"))
        else "- No --eval-classifier was given: no accuracy / FD-shapes.",
        "- FID: Inception pool features vs the --reference set (sFID/IS/precision/recall in results.json)."
        if "fid" in metric_names else "- No --inception/--reference given: no FID.", "",
    ]
    for title, p in plots.items():
        if p is not None:
            text += [f"![{title}]({p.name})", ""]
    path = out / "report.md"
    path.write_text("\n".join(text))
    return path


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # headless; selected only when a report is drawn
    import matplotlib.pyplot as plt

    return plt


def plot_losses(rows: list[dict], path: Path) -> Path | None:
    """Training loss (moving average) of every model against images seen, on one log-scale axis."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    drawn = False
    for r in rows:
        log = [x for x in read_log(r["run_dir"]) if x.get("loss") is not None and math.isfinite(x["loss"])]
        if not log:
            continue
        xs, ys = [x["images_seen"] for x in log], [x["loss"] for x in log]
        win = max(1, len(ys) // 50)
        cs = np.cumsum([0.0] + ys)
        smooth = [(cs[i + 1] - cs[max(0, i - win + 1)]) / (i + 1 - max(0, i - win + 1)) for i in range(len(ys))]
        ax.plot(xs, smooth, lw=1.5, label=r["model"])
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_yscale("log")
    ax.set_xlabel("images seen")
    ax.set_ylabel("training loss (moving average)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_scores(rows: list[dict], metric_names: list[str], scale: float, path: Path, x: str) -> Path | None:
    """One panel per metric, unguided (solid) and guided (dashed). ``x="compute"``: score against training compute
    over the evaluated checkpoints; ``x="gflops"``: final score against forward GFLOPs per image."""
    if not metric_names:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(metric_names), figsize=(5 * len(metric_names), 4), dpi=100, squeeze=False)
    scales = ["1"] + ([f"{scale:g}"] if scale != 1.0 else [])
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, k in zip(axes[0], metric_names):
        for i, r in enumerate(rows):
            c = colours[i % len(colours)]
            for sc in scales:
                style = "-o" if sc == "1" else "--s"
                if x == "compute":
                    pts = [(e["train_compute_gflop"] / 1e6, e["metrics"].get(sc, {}).get(k)) for e in r["evals"]]
                else:
                    pts = [(r["gflops"], _final_metrics(r).get(sc, {}).get(k))]
                pts = [(a, b) for a, b in pts if b is not None]
                if pts:
                    name = r["model"] + ("" if sc == "1" else f" cfg {sc}")
                    ax.plot(*zip(*pts), style, color=c, ms=4, label=name)
            if x == "gflops" and _final_metrics(r).get("1", {}).get(k) is not None:
                ax.annotate(r["model"], (r["gflops"], _final_metrics(r)["1"][k]), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("training compute (PFLOP)" if x == "compute" else "forward GFLOPs per image")
        ax.set_ylabel({"accuracy": "conditional accuracy", "acc_colour": "colour accuracy",
                       "acc_shape": "shape accuracy", "fd_shapes": "FD-shapes (not FID)", "fid": "FID"}[k])
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_samples(rows: list[dict], scale: float, grid_size: int, path: Path) -> Path | None:
    """The first ``grid_size**2`` guided samples (unguided if there are none) of every model's final checkpoint,
    side by side: same labels and initial noise in every panel."""
    grids = []
    for r in rows:
        fm = _final_metrics(r)
        m = fm.get(f"{scale:g}") or fm.get("1")
        if not m or not Path(m["npz"]).is_file():
            continue
        with np.load(m["npz"]) as d:
            imgs = d["arr_0"][: grid_size * grid_size]  # (n, H, W, 3) uint8
        n, h, w, _ = imgs.shape
        cols = min(grid_size, n)
        rows_n = math.ceil(n / cols)
        canvas = np.full((rows_n * (h + 1) + 1, cols * (w + 1) + 1, 3), 255, np.uint8)
        for i in range(n):
            y0, x0 = 1 + (i // cols) * (h + 1), 1 + (i % cols) * (w + 1)
            canvas[y0: y0 + h, x0: x0 + w] = imgs[i]
        grids.append((r["model"], canvas))
    if not grids:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(grids), figsize=(3 * len(grids), 3.4), dpi=120, squeeze=False)
    for ax, (name, canvas) in zip(axes[0], grids):
        ax.imshow(canvas, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _write_json(path: Path, data: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpointing.atomic_write(path, lambda f: f.write((json.dumps(data, indent=1, default=str) + "\n").encode()))
