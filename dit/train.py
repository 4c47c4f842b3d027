"""The training loop: one explicit loop over optimizer steps, on any number of processes through Accelerate.

``train(cfg)`` builds data, autoencoder, (text encoder), model, EMA, diffusion and optimizer from a
:class:`dit.config.Config`, optionally resumes, and runs ``cfg.train.max_steps`` optimizer steps of
``global_batch_size`` images each (``grad_accum_steps`` micro-batches per process per step).

Determinism (so that a stopped and resumed run continues exactly like an uninterrupted one):
- data order is a function of (seed, epoch): the epoch's permutation is ``randperm`` under a generator seeded from
  both, and the loader state is just ``(epoch, position)``;
- every micro-step reseeds a private generator (flips, caption dropout, timesteps, noise) and the global torch RNG
  (the model's internal label dropout, autoencoder sampling) from ``hash(seed, rank, micro_step)``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, default_collate

from dit import checkpointing
from dit.config import Config, ConfigError, flatten, save_config, step_graph_missing, to_dict
from dit.models import cublaslt, quack_gemm
from dit.models.kernels import has_triton
from dit.optim import AdamWEMA, UpdateDuringBackward, update_buckets
from dit.utils import AUTOCAST_DTYPES, profiling
from dit.utils.cuda_graph import StepGraph
from dit.utils.ema import EMA, buffer_pairs, copy_buffers, ema_decay_at, shard_pairs

logger = logging.getLogger("dit.train")


class TrainingAborted(RuntimeError):
    """Training stopped on purpose (e.g. too many non-finite losses in a row); the message says why."""


# --------------------------------------------------------------------------------------------------------------------
# Randomness and data order
# --------------------------------------------------------------------------------------------------------------------

def step_seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers (e.g. ``(seed, rank, micro_step)``); stable across runs and platforms."""
    digest = hashlib.blake2b(":".join(str(int(p)) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order in which epoch ``epoch`` visits ``n`` items: (n,) int64, a function of (seed, epoch) only."""
    g = torch.Generator().manual_seed(step_seed(seed, epoch, 0x5EED))
    return torch.randperm(n, generator=g)


class EpochBatches(Dataset):
    """Batch-level view of a dataset: item ``(epoch, start)`` is process ``rank``'s share of the global micro-batch
    ``perm[start : start + G]`` of that epoch (``perm = epoch_permutation(n, seed, epoch)``,
    G = ``global_micro_batch``), as one collated dict.

    Datasets with ``get_batch(indices)`` (e.g. ``LatentDataset``) return the stacked batch directly (one gather per
    field); others are read item by item and collated. The epoch travels with the key and the dataset's
    ``set_epoch`` is called wherever the batch is made (main process or a worker), so one DataLoader with
    persistent workers can span all epochs and still give every (seed, epoch, position) the same data and flips.
    """

    def __init__(self, dataset: Dataset, *, seed: int, global_micro_batch: int, rank: int, per_process: int):
        self.dataset, self.seed, self.global_micro_batch = dataset, seed, global_micro_batch
        self.rank, self.per_process = rank, per_process
        self.n = len(dataset)
        self._perm_epoch: int | None = None
        self._perm = torch.empty(0, dtype=torch.int64)
        self._dataset_epoch: int | None = None

    def __len__(self) -> int:  # keys are (epoch, start) pairs, not 0..len-1; the sampler decides what is read
        return self.n // self.global_micro_batch

    def indices(self, epoch: int, start: int) -> torch.Tensor:
        """(per_process,) int64 dataset indices of this rank's share of the micro-batch at (epoch, start)."""
        if self._perm_epoch != epoch:  # one randperm per epoch (per worker), not per batch
            self._perm, self._perm_epoch = epoch_permutation(self.n, self.seed, epoch), epoch
        lo = start + self.rank * self.per_process
        return self._perm[lo: lo + self.per_process]

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, start = key
        idx = self.indices(epoch, start)
        if hasattr(self.dataset, "set_epoch") and self._dataset_epoch != epoch:
            self.dataset.set_epoch(epoch)
            self._dataset_epoch = epoch
        get_batch = getattr(self.dataset, "get_batch", None)
        if get_batch is not None:
            return get_batch(idx)
        return default_collate([self.dataset[i] for i in idx.tolist()])


def batch_keys(n: int, global_micro_batch: int, epoch: int, position: int) -> Iterator[tuple[int, int]]:
    """Endless ``(epoch, start)`` of the global micro-batches from ``(epoch, position)`` on; each epoch's tail that
    does not fill a micro-batch is dropped."""
    while True:
        if position + global_micro_batch > n:
            epoch, position = epoch + 1, 0
        yield epoch, position
        position += global_micro_batch


def _pin(batch: dict) -> dict:
    """Page-locked copies of a batch's tensors, so ``.to(cuda, non_blocking=True)`` neither blocks the host nor waits
    for the GPU (a copy from pageable memory synchronises the stream first)."""
    return {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def micro_batches(dataset: Dataset, *, seed: int, epoch: int, position: int, global_micro_batch: int, rank: int,
                  per_process: int, num_workers: int = 0, pin_memory: bool = False
                  ) -> Iterator[tuple[dict, int, int]]:
    """Endless stream of this process's micro-batches, starting at ``(epoch, position)``.

    Global micro-batch k of an epoch covers ``perm[k*G : (k+1)*G]`` (G = ``global_micro_batch``, the tail that does
    not fill a batch is dropped); process ``rank`` takes its ``per_process`` slice. Yields
    ``(batch, epoch, position_after)``: resuming from ``(epoch, position_after)`` continues with the next batch.

    Batches of an in-memory dataset (``dataset.in_memory``) are gathered in this process (a gather of a few MB takes
    about a millisecond, less than handing it over from a worker: see tools/bench_data.py). Otherwise
    ``num_workers > 0`` uses one DataLoader over all epochs whose workers stay alive from epoch to epoch.
    """
    n = len(dataset)
    if n < global_micro_batch:
        raise ValueError(f"the dataset has {n} items, fewer than one global micro-batch ({global_micro_batch}); "
                         f"lower train.global_batch_size or add data")
    view = EpochBatches(dataset, seed=seed, global_micro_batch=global_micro_batch, rank=rank, per_process=per_process)
    keys = batch_keys(n, global_micro_batch, epoch, position)
    if num_workers == 0 or getattr(dataset, "in_memory", False):
        for key in keys:
            batch = view[key]
            yield (_pin(batch) if pin_memory else batch), key[0], key[1] + global_micro_batch
        return
    # The loader's sampler and `keys` are two copies of the same deterministic sequence: the loader keeps order.
    loader = DataLoader(view, sampler=batch_keys(n, global_micro_batch, epoch, position), batch_size=None,
                        num_workers=num_workers, pin_memory=pin_memory, prefetch_factor=4)
    for key, batch in zip(keys, loader):
        yield batch, key[0], key[1] + global_micro_batch


def lr_factor(step: int, *, warmup_steps: int, max_steps: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the base learning rate at optimizer step ``step``: linear warm-up, then constant or cosine decay
    to ``min_ratio`` (Loshchilov & Hutter, SGDR eq. 5 without restarts)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


# --------------------------------------------------------------------------------------------------------------------
# Building the parts
# --------------------------------------------------------------------------------------------------------------------

@dataclass
class DataBundle:
    """What the loop needs to know about the data."""

    dataset: Dataset
    kind: str  # "images" (encode on the fly) or "latents"
    latent_shape: tuple[int, int, int]  # (C, h, w) the model sees
    class_names: list[str]
    has_text: bool  # items carry captions (images) or token embeddings (latents)
    autoencoder_info: dict = field(default_factory=dict)
    manifest: dict | None = None


def _as_plain(v: Any) -> Any:
    """Tensor/number normalisation constants -> float or list of floats (checkpoint-safe)."""
    if isinstance(v, torch.Tensor):
        v = v.detach().cpu().double()
        return v.item() if v.numel() == 1 else v.flatten().tolist()
    return v


def autoencoder_info(ae: Any) -> dict:
    """The ``autoencoder`` entry of a checkpoint: spec, scale, shift, latent_channels, downsample_factor."""
    return {"spec": str(ae.spec), "scale": _as_plain(ae.scale), "shift": _as_plain(ae.shift),
            "latent_channels": int(ae.latent_channels), "downsample_factor": int(ae.downsample_factor)}


def load_autoencoder(cfg: Config, device: torch.device) -> Any:
    from vae import load_autoencoder as _load

    kwargs = {k: getattr(cfg.autoencoder, k) for k in ("scale", "shift") if getattr(cfg.autoencoder, k) is not None}
    ae = _load(cfg.autoencoder.spec, device=device, **kwargs)
    if isinstance(ae, nn.Module):
        ae.eval().requires_grad_(False)
    return ae


def _check_path(cfg: Config) -> Path:
    path = Path(cfg.data.path)
    if not path.exists():
        raise FileNotFoundError(f"data.path {str(path)!r} does not exist (data.source={cfg.data.source!r})")
    return path


def build_data(cfg: Config, ae: Any | None) -> DataBundle:
    """The training dataset for ``cfg.data`` (``ae`` is the loaded autoencoder, needed for image sources)."""
    d = cfg.data
    if d.source == "latents":
        from dit.data import LatentDataset

        root = _check_path(cfg)
        manifest_path = root / "manifest.json"
        if not manifest_path.is_file():
            raise FileNotFoundError(f"data.path {str(root)!r} has no manifest.json (make latents with "
                                    f"tools/extract_latents.py)")
        manifest = json.loads(manifest_path.read_text())
        ds = LatentDataset(root, flip=d.flip, expect=expected_manifest(cfg), seed=cfg.train.seed,
                           in_memory=d.in_memory)
        ae_m = dict(manifest.get("autoencoder") or {})
        info = {"spec": ae_m.get("spec", cfg.autoencoder.spec), "scale": ae_m.get("scale"),
                "shift": ae_m.get("shift"), "latent_channels": int(manifest["latent_shape"][0]),
                "downsample_factor": int(ae_m.get("downsample_factor", 1))}
        return DataBundle(ds, "latents", tuple(int(s) for s in manifest["latent_shape"]),
                          list(manifest.get("class_names") or []), bool(manifest.get("text_encoder")), info, manifest)

    if ae is None:
        raise ValueError("build_data: image sources need the autoencoder")
    if d.resolution % ae.downsample_factor:
        raise ConfigError(f"data.resolution ({d.resolution}) must be divisible by the autoencoder's downsample "
                          f"factor ({ae.downsample_factor})")
    if d.source == "shapes":
        from dit.data import ShapesDataset

        ds = ShapesDataset(resolution=d.resolution, num_samples=d.num_samples, seed=d.seed)
        class_names = list(ds.classes)
    elif d.source == "folder":
        from dit.data import ImageFolderDataset

        ds = ImageFolderDataset(_check_path(cfg), resolution=d.resolution, flip=False, skip_bad=d.skip_bad)
        class_names = list(ds.classes)
    else:  # captions
        from dit.data import CaptionDataset

        ds = CaptionDataset(_check_path(cfg), resolution=d.resolution, flip=False, skip_bad=d.skip_bad)
        class_names = list(getattr(ds, "classes", []) or [])
    h = d.resolution // ae.downsample_factor
    return DataBundle(ds, "images", (int(ae.latent_channels), h, h), class_names, d.source != "folder",
                      autoencoder_info(ae))


def expected_manifest(cfg: Config) -> dict:
    """What the config expects of a latent manifest (checked by ``dit.data.check_manifest``)."""
    exp: dict[str, Any] = {"resolution": cfg.data.resolution, "autoencoder": {"spec": cfg.autoencoder.spec}}
    if cfg.text.encoder is not None:
        exp["text_encoder"] = {"spec": cfg.text.encoder, "max_length": cfg.text.max_length}
    return exp


def model_kwargs_for(cfg: Config, data: DataBundle, context_dim: int | None) -> dict:
    """Keyword arguments for ``create_model(cfg.model.name, **kwargs)``: the data decides sizes and conditioning;
    ``model.overrides`` win."""
    from dit.models import model_defaults

    defaults = model_defaults(cfg.model.name)
    is_text = defaults.get("context_dim") is not None
    c, h, _ = data.latent_shape
    kwargs: dict[str, Any] = {"input_size": h, "in_channels": c, "learn_sigma": cfg.model.learn_sigma}
    if is_text:
        if context_dim is None:
            raise ConfigError(f"model.name={cfg.model.name!r} is a text model: set text.encoder (e.g. minilm)")
        kwargs["context_dim"] = context_dim
    else:
        if context_dim is not None:
            raise ConfigError(f"text.encoder is set but model.name={cfg.model.name!r} is class-conditional; "
                              f"use a text variant such as {cfg.model.name}-T")
        if not data.class_names:
            raise ConfigError(f"model.name={cfg.model.name!r} is class-conditional but data.source="
                              f"{cfg.data.source!r} has no class names")
        kwargs["num_classes"] = len(data.class_names)
        kwargs["class_dropout_prob"] = cfg.model.class_dropout_prob
    kwargs.update(cfg.model.overrides)
    return kwargs


def diffusion_kwargs(cfg: Config) -> dict:
    """The ``create_diffusion`` arguments stored in checkpoints (training uses all steps: no respacing)."""
    return {"noise_schedule": cfg.diffusion.noise_schedule, "diffusion_steps": cfg.diffusion.diffusion_steps,
            "learn_sigma": cfg.model.learn_sigma, "prediction": cfg.diffusion.prediction,
            "loss": cfg.diffusion.loss}


def configure_tf32(enabled: bool) -> None:
    """The one place TF32 matmuls/convolutions are switched (Ampere+ GPUs; no effect on CPU)."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    logger.info("TF32 matmul/cudnn: %s", "on" if enabled else "off")


# --------------------------------------------------------------------------------------------------------------------
# Samples and plots
# --------------------------------------------------------------------------------------------------------------------

def grid_guidance_interval(cfg: Config) -> tuple[int, int] | None:
    """``sample.guidance_interval`` (EDM sigmas) as the training schedule's timesteps ``(t_lo, t_hi)`` for
    ``classifier_free_guidance(interval=...)``; None when unset. A range that holds no timestep is a config error."""
    if cfg.sample.guidance_interval is None:
        return None
    from dit.diffusion import guidance_timesteps

    try:
        return guidance_timesteps(*cfg.sample.guidance_interval, **diffusion_kwargs(cfg))
    except ValueError as e:
        raise ConfigError(f"sample.guidance_interval={list(cfg.sample.guidance_interval)}: {e}") from None


@torch.no_grad()
def sample_grid(model: nn.Module, *, cfg: Config, model_kwargs: dict, latent_shape: tuple[int, int, int],
                ae: Any, device: torch.device, path: Path, cond: dict, uncond: dict | None) -> Path:
    """Draw ``grid_size**2`` samples with the diffusion core's DDIM/DDPM (``sample.num_steps`` steps) and CFG (on
    ``sample.guidance_interval`` if set), decode them with the autoencoder and save a PNG grid. ``cond``/``uncond``:
    model kwargs, batch-sized."""
    from torchvision.utils import save_image

    from dit.diffusion import create_diffusion
    from dit.diffusion.guidance import classifier_free_guidance

    s = cfg.sample
    n = s.grid_size ** 2
    respacing = f"ddim{s.num_steps}" if s.sampler == "ddim" else str(s.num_steps)
    diffusion = create_diffusion(timestep_respacing=respacing, **diffusion_kwargs(cfg))
    fn: Any = model
    if uncond is not None and s.cfg_scale != 1.0:
        fn = classifier_free_guidance(model, s.cfg_scale, uncond, pred_channels=latent_shape[0],
                                      interval=grid_guidance_interval(cfg))
    # Pixel-space predictions of x0 live in [-1, 1], so clipping them (ADM's clip_denoised) only removes error;
    # normalised latents have no such bound (DiT samples latents unclipped).
    clip = s.clip_denoised if s.clip_denoised is not None else str(ae.spec) == "identity"
    g = torch.Generator(device=device).manual_seed(s.seed)
    noise = torch.randn((n, *latent_shape), generator=g, device=device)
    if s.sampler == "ddim":
        z = diffusion.ddim_sample_loop(fn, noise.shape, noise=noise, model_kwargs=cond, device=device, eta=0.0,
                                       clip_denoised=clip)
    else:
        z = diffusion.p_sample_loop(fn, noise.shape, noise=noise, model_kwargs=cond, device=device, generator=g,
                                    clip_denoised=clip)
    images = ae.decode(z.float()).float()  # (n, 3, H, W) in [-1, 1]
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image((images.clamp(-1, 1) + 1) / 2, path, nrow=s.grid_size, padding=1)
    return path


def plot_loss_curve(log_path: Path, out_path: Path) -> Path | None:
    """Loss per step (and a moving average) from ``train_log.jsonl`` to a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # headless; called only here, never at import
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()] if log_path.exists() else []
    rows = [r for r in rows if r.get("loss") is not None and math.isfinite(r["loss"])]
    if not rows:
        return None
    steps = [r["step"] for r in rows]
    losses = [r["loss"] for r in rows]
    win = max(1, len(losses) // 50)
    smooth = [sum(losses[max(0, i - win + 1): i + 1]) / len(losses[max(0, i - win + 1): i + 1])
              for i in range(len(losses))]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(steps, losses, lw=0.5, alpha=0.4, label="loss")
    ax.plot(steps, smooth, lw=1.5, label=f"moving average ({win})")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path)
    plt.close(fig)
    return out_path


def _truncate_log(log_path: Path, step: int) -> None:
    """Drop log rows after ``step`` (they belong to a run continued past the checkpoint we resume from)."""
    if not log_path.exists():
        return
    keep = []
    for line in log_path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):  # a line cut short when the run was killed
            continue
    checkpointing.atomic_write(log_path, lambda f: f.write("".join(line + "\n" for line in keep).encode()))


# --------------------------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------------------------

def train(cfg: Config) -> dict:
    """Train ``cfg`` and return a summary dict (steps, images_seen, first/last loss, paths, timings)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from tqdm.auto import tqdm

    from dit.diffusion import create_diffusion
    from dit.models import create_model

    tc = cfg.train
    out_dir = Path(cfg.run.out_dir)
    if cfg.data.source != "shapes":
        _check_path(cfg)  # fail before anything is built
    # Accelerate keeps one state per process and refuses another precision in a later Accelerator: a second train()
    # in the same process (a notebook, a sweep, the tests) starts from a fresh one. The distributed state
    # (PartialState: process group, device) is kept.
    if AcceleratorState._shared_state:
        AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(mixed_precision=tc.mixed_precision, gradient_accumulation_steps=tc.grad_accum_steps,
                              log_with="tensorboard" if cfg.run.tensorboard else None, project_dir=str(out_dir))
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    is_main = accelerator.is_main_process
    if is_main:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    fsdp = tc.fsdp and world > 1
    if tc.fsdp and not fsdp:
        logger.info("train.fsdp is ignored with one process (nothing to shard across): training unsharded")
    denom = world * tc.grad_accum_steps
    if tc.global_batch_size % denom:
        raise ConfigError(f"train.global_batch_size ({tc.global_batch_size}) must be divisible by processes x "
                          f"train.grad_accum_steps ({world} x {tc.grad_accum_steps})")
    per_process = tc.global_batch_size // denom
    global_micro = per_process * world
    configure_tf32(tc.tf32)
    if cfg.run.cpu_threads is not None:
        torch.set_num_threads(cfg.run.cpu_threads)
    # Model init from the run seed, the same on every rank (DDP would broadcast rank 0's weights anyway).
    torch.manual_seed(step_seed(tc.seed, 0, -1))

    # ---- data, autoencoder, text encoder ----------------------------------------------------------------------
    ae = load_autoencoder(cfg, device) if cfg.data.source != "latents" else None
    data = build_data(cfg, ae)
    text_encoder = None
    empty: dict[str, torch.Tensor] | None = None
    if cfg.text.encoder is not None:
        if not data.has_text:
            raise ConfigError(f"text.encoder is set but data.source={cfg.data.source!r} has no captions/text tokens")
        from dit.text import load_text_encoder

        text_encoder = load_text_encoder(cfg.text.encoder, device=device, max_length=cfg.text.max_length)
        empty = {k: v.to(device) for k, v in text_encoder.empty_prompt(1).items()}  # (1, L, D), (1, L), (1, D)
    if ae is None and is_main and cfg.sample.grid_size > 0:
        ae = load_autoencoder(cfg, device)  # latent training: only needed to decode sample grids

    # ---- model, EMA, optimizer, schedule ----------------------------------------------------------------------
    model_kwargs = model_kwargs_for(cfg, data, text_encoder.dim if text_encoder is not None else None)
    try:
        raw_model = create_model(cfg.model.name, **model_kwargs)
    except TypeError as e:  # an override the model does not take
        raise ConfigError(f"model.overrides: {e}") from None
    if getattr(raw_model, "learn_sigma", cfg.model.learn_sigma) != cfg.model.learn_sigma:
        raise ConfigError("model.overrides.learn_sigma disagrees with model.learn_sigma: set model.learn_sigma only")
    raw_model.to(device).train()
    ema = EMA(raw_model, tc.ema_decay)  # starts as an exact fp32 copy (DiT: update_ema(ema, model, decay=0))
    diffusion = create_diffusion(timestep_respacing="", **diffusion_kwargs(cfg))
    grid_guidance_interval(cfg)  # a bad sample.guidance_interval fails now, not at the first grid

    # ---- resume: weights and counters (the optimizer follows once the model is sharded) -------------------------
    step, images_seen, epoch, position = 0, 0, 0, 0
    resumed_from = None
    found = checkpointing.resolve_resume(tc.resume, out_dir)
    if found is not None:
        resumed_from, state = found
        if state.get("model_name") != cfg.model.name:
            raise ConfigError(f"checkpoint {str(resumed_from)!r} was trained with model.name="
                              f"{state.get('model_name')!r}, the config asks for {cfg.model.name!r}")
        saved_kwargs = state.get("model_kwargs", {})
        diff = sorted(k for k in set(saved_kwargs) | set(model_kwargs) if saved_kwargs.get(k) != model_kwargs.get(k))
        if diff:
            raise ConfigError(f"checkpoint {str(resumed_from)!r} was trained with different model arguments: "
                              + ", ".join(f"{k}={saved_kwargs.get(k)!r} (config: {model_kwargs.get(k)!r})"
                                          for k in diff))
        raw_model.load_state_dict(state["model"])  # full tensors, before any sharding
        ema.load_state_dict(state["ema"])
        step, images_seen = int(state["step"]), int(state["images_seen"])
        epoch, position = int(state["data_state"]["epoch"]), int(state["data_state"]["position"])
        rng = state.get("rng", {})
        if len(rng.get("torch_cpu", [])) == world:
            # A copy: rows saved as views of one (world, S) tensor (checkpoints before this fix) load as views at an
            # offset, which set_rng_state does not handle (a segfault on ranks > 0).
            torch.set_rng_state(rng["torch_cpu"][rank].clone())
        # the same GEMM algorithms as before the interruption (they round differently; dit.models.cublaslt)
        cublaslt.set_algorithm_choices(state.get("cublaslt_algorithms", {}))
        logger.info("resumed from %s at step %d (%d images seen)", resumed_from, step, images_seen)
    elif tc.resume == "auto":
        logger.info("train.resume=auto: no checkpoint in %s, starting from scratch", checkpointing.checkpoint_dir(out_dir))
    elif checkpointing.list_checkpoints(checkpointing.checkpoint_dir(out_dir)):
        # Starting over would mix two runs' checkpoints (and pruning could delete the new ones): refuse.
        raise ConfigError(f"run.out_dir {str(out_dir)!r} already holds checkpoints: pass --resume auto "
                          f"(train.resume=auto) to continue that run, or choose another run.out_dir")

    sharding: Any = None  # the dit.fsdp module when training sharded (imported only then)
    if fsdp:
        from dit import fsdp as sharding

        # bf16: FSDP's mixed precision (bf16 all-gathers, fp32 gradient reduction, fp32 output; see shard_model).
        sharding.shard_model(raw_model, mp_dtype=torch.bfloat16 if tc.mixed_precision == "bf16" else None)
        # The EMA copy is sharded the same way (fp32, it is never trained) so that its shards line up with the
        # model's and the EMA update stays a local, collective-free operation on each process's shard.
        sharding.shard_model(ema.module)

    # ---- optimizer, schedule (over the shards under FSDP: each process steps its 1/N of the state) -------------
    optimizer = torch.optim.AdamW(raw_model.parameters(), lr=tc.lr, betas=tuple(tc.betas), eps=tc.eps,
                                  weight_decay=tc.weight_decay,
                                  fused=device.type in ("cuda", "cpu") or None)  # fused: sync-free step skipping
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(
        s, warmup_steps=tc.warmup_steps, max_steps=tc.max_steps, schedule=tc.lr_schedule,
        min_ratio=tc.min_lr / tc.lr))
    if found is not None:
        kernel_flags = [{k: grp.get(k) for k in ("fused", "foreach")} for grp in optimizer.param_groups]
        if fsdp:  # the checkpoint holds the full, index-keyed state whichever way it was trained
            sharding.load_optimizer_state_dict(optimizer, state["opt"])
        else:
            optimizer.load_state_dict(state["opt"])
        for grp, flags in zip(optimizer.param_groups, kernel_flags):
            grp.update(flags)  # a checkpoint from a GPU run (fused AdamW) may resume on CPU and vice versa
        scheduler.load_state_dict(state["lr_scheduler"])

    if cfg.model.grad_checkpointing:
        raw_model.set_grad_checkpointing(True)
    if cfg.model.low_precision_residual:
        if not hasattr(raw_model, "set_low_precision_residual"):
            raise ConfigError(f"model.low_precision_residual: {cfg.model.name} has no low-precision residual stream "
                              "option (DiT models only)")
        raw_model.set_low_precision_residual(True)
    channels_last = use_channels_last(cfg, raw_model, device)
    if channels_last:
        if not hasattr(raw_model, "set_channels_last"):
            raise ConfigError(f"model.channels_last: {cfg.model.name} has no channels-last option (UNet models only)")
        raw_model.set_channels_last(True)
    if cfg.model.moment_norm and cfg.model.compile and hasattr(raw_model, "set_moment_norm"):
        # measured under torch.compile only (eager: several ops for one kernel); the Triton kernels need channels-last
        kernels = cfg.model.norm_kernels if cfg.model.norm_kernels is not None else channels_last
        raw_model.set_moment_norm(True, kernels=kernels)
    if tc.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True  # asked for: this process's convolutions pick their algorithm by timing
    if cfg.model.fp8_training != "off":
        _use_float8_training(raw_model, cfg, device, fsdp)
    # Measured (and so used) under torch.compile only. Not with FSDP: the fused path calls the blocks'
    # forward_fused directly, past the per-block hooks that all-gather their weights.
    if cfg.model.fused_training and cfg.model.compile and not fsdp and hasattr(raw_model, "fused_training"):
        raw_model.fused_training = True
        raw_model.set_fused_qkv_backward(cfg.model.fused_qkv_backward)
    # Measured under torch.compile; not with FSDP (as above: the weights are used inside the op).
    if cfg.model.compile and not fsdp and hasattr(raw_model, "set_fused_attention"):
        fused_attention = cfg.model.fused_attention
        if fused_attention is None:  # where the Triton backward runs: without Triton it would be the slow reference
            fused_attention = device.type == "cuda" and has_triton()
        raw_model.set_fused_attention(fused_attention)
    if cfg.model.gemm_backend != "cublas":
        if not hasattr(raw_model, "set_gemm_backend"):
            raise ConfigError(f"model.gemm_backend={cfg.model.gemm_backend}: {cfg.model.name} has no GEMM backend "
                              "option (DiT models only)")
        reason = quack_gemm.unavailable_reason(device)
        if reason is not None:
            raise ConfigError(f"model.gemm_backend={cfg.model.gemm_backend}: {reason}")
        raw_model.set_gemm_backend(cfg.model.gemm_backend)
    if cfg.model.mlp_epilogues and device.type == "cuda" and hasattr(raw_model, "set_mlp_epilogues"):
        if cublaslt.gelu_epilogues_available(device):
            raw_model.set_mlp_epilogues(True)
        elif is_main:
            logger.warning("model.mlp_epilogues: this cuBLASLt has no GELU epilogues; the MLP trains with plain ops")
    # Compiled after sharding, so the compiled module runs FSDP's hooks (all-gather, reshard, reduce-scatter). With
    # one process the whole loss is compiled instead (below), around the plain module.
    compile_blocks = cfg.model.compile and cfg.model.compile_scope == "blocks"
    compile_loss = cfg.model.compile and world == 1 and not compile_blocks
    compile_kw = ({"mode": cfg.model.compile_mode} if cfg.model.compile_mode != "default" else
                  {"options": dict(cfg.model.compile_options)} if cfg.model.compile_options else {})
    if compile_blocks:  # regional compilation; the EMA copy (made above) stays eager for the sample grids
        if not hasattr(raw_model, "compile_blocks"):
            raise ConfigError(f"model.compile_scope=blocks: {cfg.model.name} has no compile_blocks (DiT and UNet do)")
        n = raw_model.compile_blocks(dynamic=False, **compile_kw)
        if is_main:
            logger.info("model.compile_scope=blocks: %d blocks compiled regionally, the rest runs eagerly", n)
    if world > 1 and cfg.model.compile_mode in ("reduce-overhead", "max-autotune") and is_main:
        logger.warning("model.compile_mode=%s uses CUDA graphs, measured here with one process only; with DDP/FSDP "
                       "(%d processes) the collectives run between graphs: compare img/s with compile_mode=default",
                       cfg.model.compile_mode, world)
    network_alone = cfg.model.compile and not compile_loss and not compile_blocks  # several processes
    model: nn.Module = torch.compile(raw_model, **compile_kw) if network_alone else raw_model
    forward: Any  # what the loss calls
    if fsdp:
        # Not passed to prepare(): Accelerate would wrap it in DDP. prepare() would also have added autocast, which
        # bf16 still needs: fp32 tensors made inside the models (timestep features) meet the bf16 weights.
        optimizer = accelerator.prepare(optimizer)
        forward = _autocast(model, accelerator)
    else:
        model, optimizer = accelerator.prepare(model, optimizer)
        forward = model
    inner_opt = getattr(optimizer, "optimizer", optimizer)  # Accelerate's wrapper -> the torch optimizer

    def loss_terms(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, kw: dict) -> dict[str, torch.Tensor]:
        return diffusion.training_losses(forward, x0, t, model_kwargs=kw, noise=noise)  # dict of (N,)

    if compile_loss:
        # One graph for the network and the diffusion terms (q_sample, MSE, VLB), like tools/benchmark.py's `fast`
        # variant; the per-device coefficient tables are created first, outside the traced region.
        diffusion.warm_tables(device)
        loss_terms = torch.compile(loss_terms, dynamic=False, **compile_kw)
    if found is not None and accelerator.scaler is not None and "scaler" in state:
        accelerator.scaler.load_state_dict(state["scaler"])

    # ---- outputs ----------------------------------------------------------------------------------------------
    log_path = out_dir / "train_log.jsonl"
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
        if found is not None:
            _truncate_log(log_path, step)
        elif log_path.exists():
            log_path.unlink()  # a fresh run (no checkpoints here): drop the log of an earlier, unsaved attempt
        if cfg.run.tensorboard:
            accelerator.init_trackers("tb", config=flatten(to_dict(cfg)))
        n_params = sum(p.numel() for p in raw_model.parameters())
        logger.info("model %s: %.2f M parameters, latent %s, %d classes, %d process(es) x %d images x %d accum",
                    cfg.model.name, n_params / 1e6, data.latent_shape, len(data.class_names), world, per_process,
                    tc.grad_accum_steps)
    accelerator.wait_for_everyone()

    # Sampling conditions (fixed for the whole run so grids are comparable).
    n_grid = cfg.sample.grid_size ** 2
    grid_cond: dict = {}
    grid_uncond: dict | None = None
    if text_encoder is not None and empty is not None:
        prompts = _grid_prompts(data, n_grid)
        enc = text_encoder.encode(prompts)
        grid_cond = {"context": enc["tokens"].to(device), "context_mask": enc["mask"].to(device),
                     "pooled": enc["pooled"].to(device)}
        grid_uncond = {"context": empty["tokens"].expand(n_grid, -1, -1), "context_mask":
                       empty["mask"].expand(n_grid, -1), "pooled": empty["pooled"].expand(n_grid, -1)}
    elif "num_classes" in model_kwargs:
        num_classes = int(model_kwargs["num_classes"])
        grid_cond = {"y": torch.arange(n_grid, device=device) % num_classes}
        if cfg.model.class_dropout_prob > 0:
            grid_uncond = {"y": torch.full((n_grid,), num_classes, device=device)}

    def save(step_now: int) -> Path | None:
        cpu_state = torch.get_rng_state()
        all_cpu = accelerator.gather(cpu_state.to(device)[None]).cpu()  # (world, S) uint8
        if fsdp:  # collective gathers of the full tensors (every rank takes part; rank 0 receives them)
            weights = {"model": sharding.gather_model_state_dict(raw_model),
                       "ema": sharding.gather_model_state_dict(ema.module),
                       "opt": sharding.gather_optimizer_state_dict(raw_model, inner_opt)}
        if not is_main:
            return None
        if not fsdp:
            weights = {"model": raw_model.state_dict(), "ema": ema.state_dict(), "opt": optimizer.state_dict()}
        state_out = {
            **weights,
            "lr_scheduler": scheduler.state_dict(), "step": step_now, "images_seen": images_seen,
            "rng": {"torch_cpu": [r.clone() for r in all_cpu],  # one storage each, not views of all_cpu
                    "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else []},
            "data_state": {"epoch": epoch, "position": position, "seed": tc.seed},
            "config": to_dict(cfg), "model_name": cfg.model.name, "model_kwargs": dict(model_kwargs),
            "autoencoder": data.autoencoder_info, "diffusion": diffusion_kwargs(cfg),
            "class_names": list(data.class_names), "text_encoder": cfg.text.encoder, "world_size": world,
            "cublaslt_algorithms": cublaslt.algorithm_choices(),
        }
        if accelerator.scaler is not None:
            state_out["scaler"] = accelerator.scaler.state_dict()
        return checkpointing.save_checkpoint(state_out, out_dir, step_now, keep_last=tc.keep_last,
                                             milestone_every=tc.milestone_every)

    def draw_samples(step_now: int) -> Path | None:
        if n_grid == 0:  # sample.grid_size=0: no grids
            return None
        path = None
        sampler = ema.module
        if fsdp:
            # A sharded module's forward is a collective, so the main process alone cannot run it: gather the EMA
            # weights (all ranks) and sample from a plain copy on the main process; the others wait below.
            full = sharding.gather_model_state_dict(ema.module)
            sampler = _plain_copy(full, cfg.model.name, model_kwargs, device) if is_main and ae is not None else None
        if is_main and ae is not None:
            with accelerator.autocast():
                path = sample_grid(sampler, cfg=cfg, model_kwargs=model_kwargs, latent_shape=data.latent_shape,
                                   ae=ae, device=device, path=out_dir / "samples" / f"step_{step_now:07d}.png",
                                   cond=grid_cond, uncond=grid_uncond)
        accelerator.wait_for_everyone()
        return path

    # ---- the loop -----------------------------------------------------------------------------------------------
    # The loop never waits for the device inside a step, so the host can queue the next steps while the GPU works:
    # per-step statistics stay on the device in `pending` and are read in one transfer per log interval (and before
    # a checkpoint, so the log is complete up to the saved step); a non-finite step is turned into a no-op on the
    # device (the fused AdamW kernel's `found_inf` input; the EMA weight is multiplied by 0; with `norm_in_step`
    # below, a finite loss with non-finite gradients updates the finite elements only). Consequence: an abort
    # after train.max_bad_steps non-finite steps in a row is noticed at the next log interval, after at most
    # train.log_every - 1 further steps, which were no-ops too if they were non-finite.
    stream = micro_batches(data.dataset, seed=tc.seed, epoch=epoch, position=position,
                           global_micro_batch=global_micro, rank=rank, per_process=per_process,
                           num_workers=cfg.data.num_workers, pin_memory=cfg.data.pin_memory and device.type == "cuda")
    bar = tqdm(total=tc.max_steps * tc.global_batch_size, initial=images_seen, unit="img", unit_scale=True,
               disable=not (is_main and cfg.run.progress), dynamic_ncols=True)  # progress in images seen
    log_file = open(log_path, "a") if is_main else None
    fused_skip = bool(inner_opt.defaults.get("fused"))  # the optimizer takes grad_scale / found_inf tensors
    # fp16: the loss scale (Accelerate's GradScaler) is applied by accelerator.backward; with a fused optimizer the
    # trainer unscales in the optimizer's kernel and updates the scale itself (update_loss_scale), on the device.
    scaler = accelerator.scaler if tc.mixed_precision == "fp16" else None
    bad_in_a_row, bad_total, first_loss, last_ckpt, last_grid = 0, 0, None, None, None
    pending: list[tuple[int, torch.Tensor, float, int]] = []  # (step, (5,) device stats, lr, images_seen)
    window: dict[str, list[float]] = {"loss": [], "mse": [], "vb": [], "grad_norm": []}
    t_window, t_flush, t_start, start_step = time.perf_counter(), time.perf_counter(), time.perf_counter(), step
    window_steps = 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    # Looked up once: walking the module tree for them every step costs milliseconds of host time, which the small
    # models' GPU steps cannot hide. The parameters are final here (sharded, if at all, above).
    trainable = [p for p in raw_model.parameters() if p.requires_grad]
    ema_pairs = shard_pairs(ema.module, raw_model)
    # AdamW's update and the EMA in one pass over the weights (dit/optim.py): a CUDA-only Triton kernel; elsewhere,
    # and with train.fused_adamw_ema=false, the fused AdamW step and then a foreach lerp.
    adamw_ema = None
    if fused_skip and not fsdp and tc.fused_adamw_ema:
        adamw_ema = AdamWEMA(inner_opt, list(ema.module.parameters()))
        if is_main and device.type == "cuda":
            logger.info("AdamW + EMA: %s", "one Triton kernel" if adamw_ema.fused else
                        f"separate passes ({adamw_ema.reason})")
        adamw_ema = adamw_ema if adamw_ema.fused else None
    # The blocks' GEMMs read bf16 copies of their weights that the optimizer kernel writes with each update, instead
    # of casting every fp32 weight on every step (model.compute_weights). One process only: DDP would broadcast the
    # copies (buffers) on every step.
    copies_ok = (adamw_ema is not None and world == 1 and tc.mixed_precision in AUTOCAST_DTYPES
                 and getattr(raw_model, "fused_training", False) and hasattr(raw_model, "set_compute_weights")
                 and not cfg.model.grad_checkpointing)  # checkpointed blocks take the plain path, which casts
    if cfg.model.compute_weights and not copies_ok:
        raise ConfigError("model.compute_weights=true needs a DiT with model.fused_training (model.compile=true), one "
                          "process, train.mixed_precision bf16 or fp16, the AdamW + EMA kernel (CUDA, "
                          "train.fused_adamw_ema=true) and no model.grad_checkpointing; unset it to let the trainer "
                          "decide")
    if copies_ok and cfg.model.compute_weights is not False:
        adamw_ema.keep_compute_copies(raw_model.set_compute_weights(AUTOCAST_DTYPES[tc.mixed_precision]))
    ema_buffers = buffer_pairs(ema.module, raw_model)  # after the copies (buffers the EMA does not take)
    # Where nothing needs the gradient norm before the update (no clipping, no fp16 loss scale to check, one process),
    # the optimizer kernel computes it from the gradients it reads anyway: one pass over them fewer (1 ms of
    # DiT-XL/2's step). A non-finite gradient then cannot skip the whole step; its elements keep their values and
    # the step counts as bad (AdamWEMA.launch); a non-finite loss still skips it.
    norm_in_step = adamw_ema is not None and tc.grad_clip is None and scaler is None and world == 1
    # train.update_in_backward: each block's update launched as the backward finishes the block's gradients, on a
    # low-priority stream (dit.optim.UpdateDuringBackward); the config checked the settings, here the rest
    during_backward = None
    if tc.update_in_backward:
        if not norm_in_step:
            raise ConfigError("train.update_in_backward=true needs the AdamW + EMA kernel on one CUDA process (this "
                              f"run: device {device.type}, {world} process(es), kernel "
                              f"{'on' if adamw_ema is not None else 'off'})")
        # every parameter the kernel updates, frozen ones too (the DiT's pos_embed): the buckets must cover them all
        during_backward = UpdateDuringBackward(adamw_ema, update_buckets(raw_model, adamw_ema.params),
                                               max_ctas=tc.update_in_backward_ctas)
        if compile_loss and is_main:
            logger.warning("train.update_in_backward: the compiled loss hands every gradient over at the end of its "
                           "backward, so the update cannot overlap it; set model.compile_scope=blocks")

    # run.profile_steps: the main process profiles steps profile_from + 1 ... profile_from + profile_steps, timed as a
    # log interval of their own (flushed at both ends) so no other step's step_time carries the profiler
    profile_window = (cfg.run.profile_from, cfg.run.profile_from + cfg.run.profile_steps) if (
        cfg.run.profile_steps and is_main) else None

    def flush() -> None:
        """Read the pending steps' statistics (one host sync), write their log rows, apply the abort policy."""
        nonlocal bad_in_a_row, bad_total, first_loss, t_flush
        if not pending:
            return
        values = torch.stack([p[1] for p in pending]).tolist()  # (k, 5): loss, mse, vb, grad_norm, bad
        now = time.perf_counter()
        step_time = (now - t_flush) / len(pending)  # host time per step, averaged: steps are not timed one by one
        t_flush = now
        rows = list(zip(pending, values))
        pending.clear()
        for (step_i, _, lr_i, seen_i), (loss_v, mse_v, vb_v, gnorm_v, bad_v) in rows:
            skipped = bad_v > 0
            if skipped:
                bad_in_a_row += 1
                bad_total += 1
                what = ("non-finite gradient, its non-finite elements left out of the update" if norm_in_step
                        and math.isfinite(loss_v) else "non-finite loss or gradient, update skipped")
                logger.warning("step %d: %s (%d in a row)", step_i, what, bad_in_a_row)
            else:
                bad_in_a_row = 0
                if first_loss is None:
                    first_loss = loss_v
            if is_main:
                row = {"step": step_i, "loss": loss_v, "mse": mse_v, "vb": vb_v, "grad_norm": gnorm_v, "lr": lr_i,
                       "images_seen": seen_i, "skipped": skipped, "step_time": step_time}
                if profile_window is not None and profile_window[0] < step_i <= profile_window[1]:
                    row["profiled"] = True  # its step_time carries the profiler's overhead and trace export
                log_file.write(json.dumps(row) + "\n")
                for k in window:
                    if math.isfinite(row[k]):
                        window[k].append(row[k])
            if bad_in_a_row >= tc.max_bad_steps:
                fixes = "lower train.lr, set train.grad_clip, or use mixed_precision=bf16 instead of fp16"
                if cfg.model.low_precision_residual and tc.mixed_precision == "fp16":
                    fixes = ("set model.low_precision_residual=false (an fp16 residual stream overflows past "
                             f"65,504), {fixes}")
                raise TrainingAborted(f"aborting at step {step_i}: {bad_in_a_row} non-finite steps in a row "
                                      f"(train.max_bad_steps={tc.max_bad_steps}); {fixes}")
        if is_main:
            log_file.flush()

    def clip_and_update(sums: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The gradient norm (clipping by it, unscaling fp16's), then the update unless the loss or the norm is not
        finite: (stats (4,): loss, mse, vb, grad norm; bad () bool)."""
        max_norm = tc.grad_clip if tc.grad_clip is not None else float("inf")
        if fsdp:  # a replicated DTensor -> plain ()
            grad_norm = sharding.full_tensor(accelerator.clip_grad_norm_(model.parameters(), max_norm))
        elif fused_skip:
            loss_scale = None if scaler is None else scaler._scale  # (), made by the backward's scale()
            grad_norm = clip_in_fused_step(trainable, tc.grad_clip, inner_opt, loss_scale)  # ()
        else:  # Accelerate's DTensor-aware wrapper costs ms of host time per step for nothing here
            accelerator.unscale_gradients()  # fp16: clip the true gradients
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, max_norm, foreach=True)  # ()
        stats = torch.cat([sums / tc.grad_accum_steps, grad_norm.detach().float().reshape(1)])  # (4,)
        if world > 1:  # the same skip decision on every rank (a device collective, no host sync)
            stats = accelerator.reduce(stats, reduction="mean")
        # A non-finite loss or gradient norm (under fp16 also a loss-scale overflow: the norm is of the
        # unscaled gradients) skips the update and the EMA's.
        bad = ~(torch.isfinite(stats[0]) & torch.isfinite(stats[3]))  # () bool
        if fused_skip:
            inner_opt.found_inf = bad.float()  # the fused kernel leaves everything untouched
            if adamw_ema is not None:  # the EMA update rides in the same kernel (its weights set before)
                adamw_ema.launch()
            else:  # directly: under fp16 Accelerate's wrapper would run GradScaler.step (a host sync)
                inner_opt.step()
            if scaler is not None:
                update_loss_scale(scaler, bad)
        elif scaler is not None:  # GradScaler.step skips steps with inf grads itself, and updates the scale
            optimizer.step()
        elif not bool(bad):  # no fused AdamW on this device: one host sync per step
            optimizer.step()
        return stats, bad

    def update_with_norm_in_step(sums: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``norm_in_step``: the update first, skipped only for a non-finite loss; the gradient norm from the
        optimizer kernel's pass (AdamWEMA.launch). Returns as ``clip_and_update``. With ``during_backward`` the
        update was launched during the backward (found_inf set before it, in ``micro_step``)."""
        skip = ~torch.isfinite(sums[0])  # () bool
        if during_backward is not None:
            norm = during_backward.finish()
        else:
            inner_opt.found_inf = skip.float()
            norm = adamw_ema.launch(grad_norm=True)  # (); 0 for a skipped update: logged as NaN
        grad_norm = torch.where(skip, torch.full_like(norm, math.nan), norm)
        stats = torch.cat([sums / tc.grad_accum_steps, grad_norm.reshape(1)])  # (4,)
        return stats, ~(torch.isfinite(stats[0]) & torch.isfinite(stats[3]))

    def micro_step(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, kw: dict, sums: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Forward + backward of one micro-batch; after the last one of a step, clipping and the optimizer update.
        Returns (sums (3,): loss, mse, vb summed over the micro-batches so far, stats (4,) or None, bad () or None).
        Everything stays on the device (no host sync), so ``train.cuda_graph`` can capture it whole."""
        stats = bad = None
        # Under FSDP every micro-step's backward reduce-scatters its gradients (no_sync is DDP's; FSDP2 could
        # defer it with set_requires_gradient_sync, at the cost of full unsharded gradients in memory).
        with accelerator.accumulate(model):
            terms = loss_terms(x0, t, noise, kw)
            loss = terms["loss"].mean()
            vb = terms["vb"].mean() if "vb" in terms else torch.zeros((), device=device)
            sums = sums + torch.stack([loss.detach().float(), terms["mse"].mean().detach().float(),
                                       vb.detach().float()])
            # A non-finite loss makes the gradients non-finite (in DDP on every rank, through the all-reduce): it
            # is caught below from the gradient norm and the losses, without a host sync.
            if during_backward is not None:  # the update's kernels, launched during the backward, read these
                inner_opt.found_inf = (~torch.isfinite(sums[0])).float()
                during_backward.arm()
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                stats, bad = (update_with_norm_in_step if norm_in_step else clip_and_update)(sums)
            optimizer.zero_grad(set_to_none=True)
        return sums, stats, bad

    use_graph = use_step_graph(cfg, device, world, adamw_ema is not None)
    if use_graph and tc.cuda_graph is None:
        logger.info("train.cuda_graph: on, the default for a compiled model on one GPU (false turns it off)")
    graph_step = StepGraph(micro_step, warmup=tc.cuda_graph_warmup, high_priority=during_backward is not None
                           ) if use_graph else None

    profiler = None
    try:
        while step < tc.max_steps:
            if profile_window is not None and step == profile_window[0]:
                flush()
                profiler = profiling.start(device)
            sums = torch.zeros(3, device=device)  # loss, mse, vb summed over the micro-batches, on the device
            stats = bad = None
            if adamw_ema is not None:  # read by the kernel on the device (and so by a CUDA graph of the step)
                adamw_ema.set_hyperparameters(1.0 - ema_decay_at(tc.ema_decay, step, tc.ema_warmup))
            for micro in range(tc.grad_accum_steps):
                batch, epoch, position = next(stream)
                s = step_seed(tc.seed, rank, step * tc.grad_accum_steps + micro)
                torch.manual_seed(s)  # global RNG: the model's label dropout, autoencoder posterior sampling
                g = torch.Generator(device=device).manual_seed(s)  # everything the trainer draws itself
                x0, kw = _prepare_batch(batch, data=data, ae=ae, cfg=cfg, text_encoder=text_encoder, empty=empty,
                                        device=device, g=g)
                n = x0.shape[0]
                t = torch.randint(0, diffusion.num_timesteps, (n,), generator=g, device=device)
                noise = torch.randn(x0.shape, generator=g, device=device, dtype=x0.dtype)
                if graph_step is not None:
                    sums, stats, bad = graph_step(x0=x0, t=t, noise=noise, kw=kw, sums=sums)
                else:
                    sums, stats, bad = micro_step(x0, t, noise, kw, sums)
            if adamw_ema is None:
                ema_update_unless(ema, raw_model, ema_decay_at(tc.ema_decay, step, tc.ema_warmup), bad, pairs=ema_pairs)
            else:
                copy_buffers(ema.module, raw_model, ema_buffers)
            scheduler.step()
            step += 1
            window_steps += 1
            images_seen += tc.global_batch_size
            pending.append((step, torch.cat([stats, bad.float().reshape(1)]), scheduler.get_last_lr()[0],
                            images_seen))
            if is_main:
                bar.update(tc.global_batch_size)
            if profiler is not None and step == profile_window[1]:
                logger.info(profiling.finish(profiler, device, (profile_window[0] + 1, step), out_dir))
                profiler = None
                flush()
            log_now = step % tc.log_every == 0 or step == tc.max_steps
            save_now = step % tc.ckpt_every == 0 or step == tc.max_steps or (
                tc.milestone_every > 0 and step % tc.milestone_every == 0)
            if log_now or save_now:
                flush()
            if log_now:
                elapsed = time.perf_counter() - t_window
                img_s = window_steps * tc.global_batch_size / max(elapsed, 1e-9)
                if is_main:
                    scalars = {f"train/{k}": sum(v) / len(v) for k, v in window.items() if v}
                    scalars.update({"train/lr": scheduler.get_last_lr()[0], "train/img_per_s": img_s,
                                    "train/step_time": elapsed / window_steps, "train/images_seen": images_seen})
                    if device.type == "cuda":
                        scalars["train/peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                    accelerator.log(scalars, step=step)
                    bar.set_postfix(loss=f"{scalars.get('train/loss', float('nan')):.4f}", img_s=f"{img_s:.0f}")
                    window = {k: [] for k in window}
                t_window, window_steps = time.perf_counter(), 0
            if save_now:
                last_ckpt = save(step) or last_ckpt
                accelerator.wait_for_everyone()
            if (tc.sample_every > 0 and step % tc.sample_every == 0) or step == tc.max_steps:
                last_grid = draw_samples(step) or last_grid
    finally:
        if profiler is not None:  # the run ended inside the window
            profiler.stop()
        if during_backward is not None:  # the model outlives the run; its gradient hooks do not
            during_backward.remove()
        stream.close()  # stops the DataLoader workers, if any
        bar.close()
        if log_file is not None:
            log_file.close()
    seconds = time.perf_counter() - t_start
    curve = plot_loss_curve(log_path, out_dir / "loss_curve.png") if is_main else None
    if fsdp:  # the digest of the full weights (what a checkpoint holds), the same on every rank; collectives, so
        # before end_training() destroys the process group
        from accelerate.utils import broadcast_object_list

        full = sharding.gather_model_state_dict(raw_model)
        digest = broadcast_object_list([state_digest(full) if is_main else None])[0]
    else:
        digest = weights_digest(raw_model)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    last_loss = _last_losses(log_path) if is_main else None
    summary = {"steps": step, "images_seen": images_seen, "first_loss": first_loss, "last_loss": last_loss,
               "bad_steps": bad_total, "seconds": seconds,
               "img_per_s": (step - start_step) * tc.global_batch_size / max(seconds, 1e-9),
               "checkpoint": str(last_ckpt) if last_ckpt else None, "sample_grid": str(last_grid) if last_grid else None,
               "loss_curve": str(curve) if curve else None, "resumed_from": str(resumed_from) if resumed_from else None,
               "out_dir": str(out_dir), "world_size": world, "rank": rank, "weights_digest": digest, "fsdp": fsdp}
    if device.type == "cuda":
        summary["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30  # this process's GPU
    if is_main:
        logger.info("done: %s", json.dumps(summary))
        checkpointing.atomic_write(out_dir / "summary.json",
                                   lambda f: f.write((json.dumps(summary, indent=1) + "\n").encode()))
    return summary


def weights_digest(model: nn.Module) -> str:
    """sha256 of every state-dict tensor's bytes: equal on all ranks iff the replicas are bit-identical."""
    return state_digest(model.state_dict())


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 of the names and bytes of a state dict's tensors, in order."""
    h = hashlib.sha256()
    for name, v in state.items():
        h.update(name.encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def clip_in_fused_step(params: list[nn.Parameter], max_norm: float | None, optimizer: torch.optim.Optimizer,
                       loss_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Gradient-norm clipping (and fp16 unscaling) folded into the next step of a fused Adam/AdamW ``optimizer``;
    returns the norm of the true (unscaled) gradients ().

    The fused kernel divides every gradient by the optimizer's ``grad_scale`` tensor as it reads it (the hook
    GradScaler uses), so setting it to ``max(1, (norm + 1e-6) / max_norm)`` applies ``clip_grad_norm_``'s factor
    ``min(1, max_norm / (norm + 1e-6))`` without its separate read + write pass over all gradients (2 ms per step on
    DiT-XL/2's 675M parameters, docs/benchmarks.md). ``max_norm=None``: only the norm, no clipping. ``loss_scale``
    (one element): the gradients are ``loss_scale`` times the true ones (fp16's GradScaler); the divisor includes it.
    """
    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None], foreach=True).float()  # ()
    divisor = None if loss_scale is None else loss_scale.float().reshape(())  # ()
    if divisor is not None:
        norm = norm / divisor
    if max_norm is not None:
        clip = ((norm + 1e-6) / max_norm).clamp_min(1.0)  # ()
        divisor = clip if divisor is None else divisor * clip
    if divisor is not None:
        optimizer.grad_scale = divisor  # type: ignore[attr-defined]
    return norm


@torch.no_grad()
def update_loss_scale(scaler: torch.amp.GradScaler, overflow: torch.Tensor) -> None:
    """``GradScaler.update``'s dynamic policy for a step that bypassed ``GradScaler.step`` (a fused optimizer took the
    scale and the overflow flag itself): back the scale off on an overflow (``overflow``: () bool), grow it after
    ``growth_interval`` clean steps in a row. On the scaler's own device tensors, so checkpoints (its state dict)
    see it, with no host sync, so a CUDA graph of the step can hold it."""
    torch._amp_update_scale_(scaler._scale, scaler._growth_tracker, overflow.float().reshape(()),
                             scaler.get_growth_factor(), scaler.get_backoff_factor(), scaler.get_growth_interval())


@torch.no_grad()
def ema_update_unless(ema: EMA, model: nn.Module, decay: float, skip: torch.Tensor | None,
                      pairs: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None) -> None:
    """``ema.update(model, decay)`` unless the 0-d bool device tensor ``skip`` is True, without reading ``skip`` on
    the host: ``ema += w * (p - ema)`` with ``w = (1 - decay) * (1 - skip)`` (the lerp formula, a no-op for w = 0)."""
    if skip is None:
        ema.update(model, decay=decay)
        return
    # Plain tensors (under FSDP: this process's shards, which line up with the EMA's), so the plain 0-d weight `w`
    # multiplies them without DTensor dispatch.
    dst, src = pairs if pairs is not None else shard_pairs(ema.module, model)  # (EMA, model) tensors
    if any(p.dtype != torch.float32 for p in src):
        src = [p.float() for p in src]
    w = (~skip).to(dst[0].device, torch.float32) * (1.0 - decay)  # ()
    # One pass (read both, write the EMA) with the device weight: 3.9 ms on DiT-XL/2's 675M parameters against
    # 8.1 ms for sub + mul + add (docs/benchmarks.md). lerp(e, p, w) = e + w (p - e); w = 0 leaves e untouched.
    torch._foreach_lerp_(dst, src, [w] * len(dst))
    copy_buffers(ema.module, model)


def use_channels_last(cfg: Config, model: nn.Module, device: torch.device) -> bool:
    """``model.channels_last``: as set, or when unset (None) for UNets compiled on CUDA (docs/benchmarks.md, run 13)."""
    if cfg.model.channels_last is not None:
        return cfg.model.channels_last
    return cfg.model.compile and device.type == "cuda" and hasattr(model, "set_channels_last")


def use_step_graph(cfg: Config, device: torch.device, world: int, fused_kernel: bool) -> bool:
    """Whether the trainer captures its step in one CUDA graph: ``train.cuda_graph`` true (an error where it cannot
    apply), false, or None: where it applies to a compiled model (one CUDA process, ``fused_kernel``: the one-pass
    AdamW + EMA kernel runs, and the settings of ``step_graph_missing``, which the config checked for true) and was
    measured: not with ``model.gemm_backend=quack``, whose kernels have not run inside the graph (true still asks)."""
    why = ("a CUDA device" if device.type != "cuda" else "one process" if world > 1 else
           "the one-pass AdamW + EMA kernel (Triton on CUDA, no FSDP)" if not fused_kernel else None)
    if cfg.train.cuda_graph and why is not None:
        raise ConfigError(f"train.cuda_graph=true needs {why}; this run has device {device.type}, {world} process(es)")
    if cfg.train.cuda_graph is None:
        return (why is None and cfg.model.compile and cfg.model.gemm_backend == "cublas"
                and not step_graph_missing(cfg))
    return cfg.train.cuda_graph


def _use_float8_training(model: nn.Module, cfg: Config, device: torch.device, fsdp: bool) -> None:
    """``model.fp8_training``: the DiT blocks' GEMMs in FP8 (``dit.models.fp8``), in place, same parameters."""
    from dit.models.fp8 import convert_to_float8

    key = f"model.fp8_training={cfg.model.fp8_training}"
    if fsdp:
        raise ConfigError(f"{key}: not with train.fsdp=true (FP8 GEMMs on sharded parameters are not built)")
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        raise ConfigError(f"{key}: FP8 GEMMs need a GPU of compute capability 8.9 or newer (Ada, Hopper), this one "
                          f"is {'.'.join(map(str, torch.cuda.get_device_capability(device)))}")
    if convert_to_float8(model, recipe=cfg.model.fp8_training) == 0:
        raise ConfigError(f"{key}: {cfg.model.name} has no DiT block linears to run in FP8 (DiT models only)")


def _autocast(model: nn.Module, accelerator: Any) -> Any:
    """``model`` called under the accelerator's autocast (what ``prepare`` adds to a model it wraps)."""
    def forward(*args: Any, **kwargs: Any) -> torch.Tensor:
        with accelerator.autocast():
            return model(*args, **kwargs)

    return forward


def _plain_copy(state: dict[str, torch.Tensor], name: str, model_kwargs: dict, device: torch.device) -> nn.Module:
    """An unsharded eval-mode model on ``device`` holding the full ``state`` (for sampling under FSDP).

    Built on the meta device (no init compute, no RNG draws) and then filled by a strict load."""
    from dit.models import create_model

    with torch.device("meta"):
        model = create_model(name, **model_kwargs)
    model = model.to_empty(device=device)
    model.load_state_dict(state)
    return model.eval().requires_grad_(False)


def _last_losses(log_path: Path, n: int = 20) -> float | None:
    """Mean loss of the last ``n`` finite rows of the log."""
    if not log_path.exists():
        return None
    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    losses = [r["loss"] for r in rows if r["loss"] is not None and math.isfinite(r["loss"])][-n:]
    return sum(losses) / len(losses) if losses else None


def _grid_prompts(data: DataBundle, n: int) -> list[str]:
    """Prompts for text sample grids: the first dataset captions (image sources) or the class names."""
    if data.kind == "images":
        m = len(data.dataset)
        return [data.dataset[i % m]["caption"] for i in range(n)]
    names = data.class_names or [""]
    return [f"a {names[i % len(names)]}" for i in range(n)]


def _prepare_batch(batch: dict, *, data: DataBundle, ae: Any, cfg: Config, text_encoder: Any,
                   empty: dict | None, device: torch.device, g: torch.Generator) -> tuple[torch.Tensor, dict]:
    """A loader batch -> (x0 (N, C, h, w) latents, model kwargs). Random draws (flip, caption dropout) use ``g``."""
    if data.kind == "images":
        x = batch["image"].to(device, non_blocking=True)  # (N, 3, H, W) in [-1, 1]
        n = x.shape[0]
        if cfg.data.flip:
            flip = torch.rand(n, generator=g, device=device) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        with torch.no_grad():
            x0 = ae.encode(x).float()  # (N, C, h, w)
    else:
        x0 = batch["latent"].to(device, non_blocking=True).float()  # flips were chosen by the dataset
        n = x0.shape[0]
    if text_encoder is None:
        return x0, {"y": batch["label"].to(device, non_blocking=True).long()}
    drop = torch.rand(n, generator=g, device=device) < cfg.text.caption_dropout  # (N,) True = empty prompt
    if data.kind == "images":
        prompts = ["" if d else c for d, c in zip(drop.tolist(), batch["caption"])]
        enc = text_encoder.encode(prompts)
        return x0, {"context": enc["tokens"].to(device).float(), "context_mask": enc["mask"].to(device).bool(),
                    "pooled": enc["pooled"].to(device).float()}
    ctx = batch["context"].to(device).float()  # (N, L, D) pre-extracted tokens
    mask = batch["context_mask"].to(device).bool()  # (N, L)
    pooled = batch["pooled"].to(device).float()  # (N, D)
    ctx = torch.where(drop[:, None, None], empty["tokens"].float(), ctx)
    mask = torch.where(drop[:, None], empty["mask"].bool(), mask)
    pooled = torch.where(drop[:, None], empty["pooled"].float(), pooled)
    return x0, {"context": ctx, "context_mask": mask, "pooled": pooled}
