"""Loading DiT weights from every format users have, safely (no arbitrary unpickling).

Formats:

* official facebookresearch/DiT release files (``DiT-XL-2-256x256.pt``): a flat ``{name: tensor}`` dict;
* official / our training checkpoints: ``{"model": sd, "ema": sd, ...}`` (ours add ``"config"``, ``"model_name"``,
  ``"model_kwargs"``, ``"step"``; the official ones an ``argparse.Namespace`` under ``"args"``, which is allow-listed);
* DDP (``module.``) and ``torch.compile`` (``_orig_mod.``) prefixes;
* ``.safetensors`` files;
* diffusers ``DiTTransformer2DModel`` state dicts and model directories (converted to our names).

``load_model_weights(model, path_or_sd)`` loads strictly and, on a mismatch, says which keys and shapes differ and
which registered model the file looks like.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import pickle
import re
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .dit import DIT_CONFIGS, DiT
from .layers import get_2d_sincos_pos_embed

__all__ = [
    "load_weights_file",
    "extract_state_dict",
    "convert_diffusers_dit",
    "load_dit_from_diffusers",
    "dit_kwargs_from_state_dict",
    "guess_model_name",
    "load_model_weights",
]

_TORCH_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
_STRIP_PREFIXES = ("module.", "_orig_mod.")
_LIST_MAX = 5  # keys listed per category in mismatch errors


def load_weights_file(path: str | Path) -> dict[str, Any]:
    """Read a weights file into a dict: ``.safetensors`` via safetensors, ``.pt/.pth/.ckpt/.bin`` via
    ``torch.load(map_location="cpu", weights_only=True)`` (tensors and plain containers only, never code)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if path.is_dir():
        raise ValueError(
            f"weights path {path} is a directory; pass a file, or use load_dit_from_diffusers() for a diffusers model "
            "directory"
        )
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as e:  # safetensors raises its own error types for truncated / corrupt headers
            raise ValueError(f"could not read safetensors file {path}: {e}") from None
    if suffix not in _TORCH_SUFFIXES:
        raise ValueError(
            f"weights file {path} has an unknown extension {suffix!r}; expected .safetensors or one of "
            f"{', '.join(_TORCH_SUFFIXES)}"
        )
    try:
        # Official DiT training checkpoints store their argparse.Namespace under "args": harmless, so allow it.
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message is long; keep the line naming the offending object ("Unsupported global: ...").
        lines = [ln.strip() for ln in str(e).splitlines() if "Unsupported" in ln or "GLOBAL" in ln]
        first = re.sub(r"\x1b\[[0-9;]*m", "", lines[0]) if lines else type(e).__name__
        raise ValueError(
            f"could not read weights file {path} safely: it holds Python objects other than tensors and plain "
            f"containers ({first}). If you trust the file, load it with torch.load(..., weights_only=False) and pass "
            "the dict instead"
        ) from None
    except Exception as e:  # truncated zip, not a torch file, ...
        raise ValueError(f"could not read weights file {path}: {type(e).__name__}: {e}") from None
    if not isinstance(obj, dict):
        raise ValueError(
            f"weights file {path} holds a {type(obj).__name__}, expected a dict of tensors or a checkpoint dict"
        )
    return obj


def _strip_key(key: str) -> str:
    # DDP wraps the whole model ("module." first); torch.compile wraps any module ("_orig_mod." anywhere).
    changed = True
    while changed:
        changed = False
        for prefix in _STRIP_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key.replace("._orig_mod.", ".")


def _is_flat_tensor_dict(obj: Mapping) -> bool:
    return len(obj) > 0 and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def extract_state_dict(obj: Mapping[str, Any], prefer: str = "ema") -> dict[str, torch.Tensor]:
    """The model state dict inside a loaded checkpoint, with ``module.`` / ``_orig_mod.`` prefixes removed.

    obj: a flat ``{name: tensor}`` dict (official release files, ``.safetensors``) or a training checkpoint with
    ``"ema"`` and/or ``"model"`` entries (``prefer`` picks which when both exist; the other is the fallback), or a
    ``"state_dict"`` / ``"model_state_dict"`` entry.
    """
    if prefer not in ("ema", "model"):
        raise ValueError(f"extract_state_dict: prefer must be 'ema' or 'model', got {prefer!r}")
    if not isinstance(obj, Mapping):
        raise ValueError(f"extract_state_dict: expected a dict (state dict or checkpoint), got {type(obj).__name__}")
    if _is_flat_tensor_dict(obj):
        sd = obj
    else:
        order = [prefer, "model" if prefer == "ema" else "ema", "state_dict", "model_state_dict"]
        found = [k for k in order if isinstance(obj.get(k), Mapping) and len(obj[k]) > 0]
        if not found:
            raise ValueError(
                "extract_state_dict: no state dict found; expected a flat {name: tensor} dict or a checkpoint with one "
                f"of the entries {order}, got keys {sorted(map(str, obj))[:10]}"
            )
        sd = obj[found[0]]
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            continue  # e.g. "_extra_state" bookkeeping
        out[_strip_key(k)] = v
    if not out:
        raise ValueError("extract_state_dict: the selected state dict holds no tensors")
    return out


# --------------------------------------------------------------------------------------------------------------------
# diffusers DiTTransformer2DModel -> ours
# --------------------------------------------------------------------------------------------------------------------

_DIFFUSERS_BLOCK_MAP = {
    "norm1.linear": "adaLN_modulation.1",
    "attn1.to_out.0": "attn.proj",
    "ff.net.0.proj": "mlp.fc1",
    "ff.net.2": "mlp.fc2",
}
_DIFFUSERS_EMB_MAP = {
    "norm1.emb.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "norm1.emb.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "norm1.emb.class_embedder.embedding_table": "y_embedder.embedding_table",
}
_DIFFUSERS_TOP_MAP = {
    "pos_embed.proj": "x_embedder.proj",
    "proj_out_1": "final_layer.adaLN_modulation.1",
    "proj_out_2": "final_layer.linear",
}
_BLOCK_RE = re.compile(r"^transformer_blocks\.(\d+)\.(.+)\.(weight|bias)$")


def _is_diffusers_dit(sd: Mapping[str, Any]) -> bool:
    return any(k.startswith("transformer_blocks.") for k in sd) and "pos_embed.proj.weight" in sd


def convert_diffusers_dit(
    state_dict: Mapping[str, torch.Tensor], input_size: int | None = None
) -> dict[str, torch.Tensor]:
    """diffusers ``DiTTransformer2DModel`` state dict -> our (= official DiT) names.

    q/k/v projections are fused into ``attn.qkv``. diffusers keeps a copy of the timestep/class embedders in every
    block's ``norm1.emb`` (only block 0's is used in its final layer); converted checkpoints have identical copies, so
    block 0's is taken and the others must equal it. ``pos_embed`` is a non-persistent buffer in diffusers: it is
    rebuilt here (fixed sin-cos values) when ``input_size`` (latent side) is given or the buffer is present.
    """
    sd = {_strip_key(k): v for k, v in state_dict.items()}
    if not _is_diffusers_dit(sd):
        raise ValueError(
            "convert_diffusers_dit: not a diffusers DiT state dict (expected keys pos_embed.proj.weight and "
            f"transformer_blocks.*), got e.g. {sorted(sd)[:5]}"
        )
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    emb_copies: dict[str, dict[int, torch.Tensor]] = {}
    unknown: list[str] = []
    for key, v in sd.items():
        if key == "pos_embed.pos_embed":
            out["pos_embed"] = v.float().reshape(1, -1, v.shape[-1])
            continue
        m = _BLOCK_RE.match(key)
        if m is None:
            mod, _, kind = key.rpartition(".")
            if mod in _DIFFUSERS_TOP_MAP:
                out[f"{_DIFFUSERS_TOP_MAP[mod]}.{kind}"] = v
            else:
                unknown.append(key)
            continue
        i, mod, kind = int(m.group(1)), m.group(2), m.group(3)
        if mod in _DIFFUSERS_BLOCK_MAP:
            out[f"blocks.{i}.{_DIFFUSERS_BLOCK_MAP[mod]}.{kind}"] = v
        elif mod in ("attn1.to_q", "attn1.to_k", "attn1.to_v"):
            qkv.setdefault((i, kind), {})[mod[-1]] = v
        elif mod in _DIFFUSERS_EMB_MAP:
            emb_copies.setdefault(f"{_DIFFUSERS_EMB_MAP[mod]}.{kind}", {})[i] = v
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(
            f"convert_diffusers_dit: {len(unknown)} keys have no DiT equivalent (only norm_type='ada_norm_zero' "
            f"class-conditional DiTs convert), e.g. {unknown[:_LIST_MAX]}"
        )
    for (i, kind), parts in sorted(qkv.items()):
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"convert_diffusers_dit: block {i} lacks attn1.to_{{q,k,v}}.{kind} (has {sorted(parts)})")
        out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)  # (3D, ...)
    for name, copies in emb_copies.items():
        first = min(copies)
        ref = copies[first]
        differing = [i for i, v in copies.items() if v.shape != ref.shape or not torch.equal(v, ref)]
        if differing:
            raise ValueError(
                f"convert_diffusers_dit: the per-block copies of {name} differ (blocks {differing[:_LIST_MAX]} vs "
                f"block {first}); a DiT has one shared timestep/class embedder, so this model cannot be converted"
            )
        out[name] = ref
    if "pos_embed" not in out and input_size is not None:
        hidden, _, p, _ = out["x_embedder.proj.weight"].shape
        if input_size % p:
            raise ValueError(f"convert_diffusers_dit: input_size={input_size} is not a multiple of patch size {p}")
        out["pos_embed"] = get_2d_sincos_pos_embed(hidden, input_size // p).float().unsqueeze(0)  # (1, T, D)
    return out


def _diffusers_weights(directory: Path) -> dict[str, torch.Tensor]:
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"):
        if (directory / name).is_file():
            return extract_state_dict(load_weights_file(directory / name))
    for index_name in ("diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.bin.index.json"):
        index = directory / index_name
        if index.is_file():  # sharded checkpoint: {"weight_map": {tensor name: shard file}}
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, AttributeError) as e:
                raise ValueError(f"diffusers index {index} is not valid (expected a 'weight_map'): {e}") from None
            sd: dict[str, torch.Tensor] = {}
            for shard in shards:
                sd.update(extract_state_dict(load_weights_file(directory / shard)))
            return sd
    raise FileNotFoundError(
        f"diffusers model directory {directory} has no diffusion_pytorch_model.safetensors / .bin (or sharded index)"
    )


def load_dit_from_diffusers(path: str | Path) -> tuple[DiT, dict[str, Any]]:
    """Build our ``DiT`` from a diffusers DiT directory (a pipeline dir with ``transformer/``, or the transformer dir
    itself with ``config.json``) and load its weights strictly. Returns ``(model, kwargs)`` with
    ``DiT(**kwargs)`` the architecture; ``timestep_freq_shift=1`` and ``mlp_norm_eps`` reproduce diffusers exactly."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"diffusers model path {path} does not exist")
    directory = path / "transformer" if (path / "transformer" / "config.json").is_file() else path
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{path} is not a diffusers DiT directory: expected {path}/transformer/config.json or {path}/config.json"
        )
    try:
        cfg = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"diffusers config {config_file} is not valid JSON: {e}") from None
    if cfg.get("norm_type", "ada_norm_zero") != "ada_norm_zero":
        raise ValueError(f"{config_file}: norm_type={cfg['norm_type']!r}; only 'ada_norm_zero' DiTs convert")
    if cfg.get("activation_fn", "gelu-approximate") != "gelu-approximate" or cfg.get("norm_elementwise_affine"):
        raise ValueError(f"{config_file}: expected activation_fn='gelu-approximate' and norm_elementwise_affine=false")
    if cfg.get("num_embeds_ada_norm") is None:
        raise ValueError(f"{config_file}: num_embeds_ada_norm (number of classes) is missing")
    heads = int(cfg.get("num_attention_heads", 16))
    hidden = heads * int(cfg.get("attention_head_dim", 72))
    in_ch = int(cfg.get("in_channels", 4))
    out_ch = int(cfg.get("out_channels") or in_ch)
    if out_ch not in (in_ch, 2 * in_ch):
        raise ValueError(f"{config_file}: out_channels={out_ch} must be in_channels ({in_ch}) or twice it")
    sample_size = int(cfg.get("sample_size", 32))
    sd = convert_diffusers_dit(_diffusers_weights(directory), input_size=sample_size)
    fc1 = sd.get("blocks.0.mlp.fc1.weight")
    kwargs: dict[str, Any] = dict(
        input_size=sample_size,
        patch_size=int(cfg.get("patch_size", 2)),
        in_channels=in_ch,
        hidden_size=hidden,
        depth=int(cfg.get("num_layers", 28)),
        num_heads=heads,
        mlp_ratio=(fc1.shape[0] / hidden) if fc1 is not None else 4.0,
        num_classes=int(cfg["num_embeds_ada_norm"]),
        learn_sigma=out_ch == 2 * in_ch,
        timestep_freq_shift=1.0,  # diffusers' CombinedTimestepLabelEmbeddings: Timesteps(downscale_freq_shift=1)
        mlp_norm_eps=float(cfg.get("norm_eps", 1e-5)),  # BasicTransformerBlock.norm3 uses the configured eps
    )
    model = DiT(**kwargs)
    load_model_weights(model, sd)
    return model, kwargs


# --------------------------------------------------------------------------------------------------------------------
# Inferring the architecture from tensor shapes
# --------------------------------------------------------------------------------------------------------------------

_HEADS_BY_WIDTH = {hidden: heads for hidden, _, heads in DIT_CONFIGS.values()}


def dit_kwargs_from_state_dict(sd: Mapping[str, torch.Tensor], num_heads: int | None = None) -> dict[str, Any]:
    """``DiT`` keyword arguments read off the tensor shapes of a (our / official) DiT state dict.

    Infers hidden_size, depth, patch_size, in_channels, learn_sigma, input_size (from ``pos_embed``; omitted when the
    dict has none), num_classes (the label table has one extra null row), mlp_ratio and context_dim (text models).
    ``num_heads`` is not visible in the shapes: it comes from the paper configs by hidden size (head width 64
    otherwise) unless given.
    """
    if _is_diffusers_dit(sd):
        raise ValueError(
            "dit_kwargs_from_state_dict: this is a diffusers DiT state dict; convert it with convert_diffusers_dit()"
        )
    for key in ("x_embedder.proj.weight", "final_layer.linear.weight"):
        if key not in sd:
            raise ValueError(f"not a DiT state dict: no {key!r} (keys look like {sorted(sd)[:5]})")
    hidden, in_ch, p, _ = sd["x_embedder.proj.weight"].shape
    depth = len({int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))})
    out_ch, rem = divmod(sd["final_layer.linear.weight"].shape[0], p * p)
    if rem or out_ch not in (in_ch, 2 * in_ch):
        raise ValueError(f"final_layer.linear has {out_ch * p * p + rem} outputs; expected p*p*C or p*p*2C (C={in_ch})")
    if num_heads is None:
        num_heads = _HEADS_BY_WIDTH.get(hidden, hidden // 64 if hidden % 64 == 0 else None)
        if num_heads is None:
            raise ValueError(f"cannot infer num_heads for hidden_size={hidden}; pass num_heads explicitly")
    kwargs: dict[str, Any] = dict(
        patch_size=p, in_channels=in_ch, hidden_size=hidden, depth=depth, num_heads=num_heads,
        learn_sigma=out_ch == 2 * in_ch,
    )
    if "pos_embed" in sd:
        tokens = sd["pos_embed"].shape[-2]
        side = math.isqrt(tokens)
        if side * side != tokens:
            raise ValueError(f"pos_embed has {tokens} tokens, not a square grid")
        kwargs["input_size"] = side * p
    if "blocks.0.mlp.fc1.weight" in sd:
        kwargs["mlp_ratio"] = sd["blocks.0.mlp.fc1.weight"].shape[0] / hidden
    # Official: a null-class row exists whenever class_dropout_prob > 0 (always, for released models).
    table = sd.get("y_embedder.embedding_table.weight")
    kwargs["num_classes"] = table.shape[0] - 1 if table is not None else 0
    if "context_embedder.0.weight" in sd:
        kwargs["context_dim"] = sd["context_embedder.0.weight"].shape[1]
    return kwargs


def guess_model_name(sd: Mapping[str, torch.Tensor]) -> str | None:
    """The registered name (e.g. ``"DiT-XL/2"``, ``"DiT-S/4-T"``) whose architecture matches ``sd``, else None.

    sd: a state dict, a loaded training checkpoint or a diffusers DiT state dict.
    """
    try:
        sd = extract_state_dict(sd)
        if _is_diffusers_dit(sd):
            sd = convert_diffusers_dit(sd)
        kw = dit_kwargs_from_state_dict(sd, num_heads=1)  # the head count is not needed to match a config
    except ValueError:
        return None
    for size, (hidden, depth, heads) in DIT_CONFIGS.items():
        if (kw["hidden_size"], kw["depth"]) == (hidden, depth) and kw.get("mlp_ratio", 4.0) == 4.0:
            return f"DiT-{size}/{kw['patch_size']}" + ("-T" if "context_dim" in kw else "")
    return None


# --------------------------------------------------------------------------------------------------------------------
# Strict loading with a useful error
# --------------------------------------------------------------------------------------------------------------------


def _fmt(items: list[str]) -> str:
    more = f", ... (+{len(items) - _LIST_MAX} more)" if len(items) > _LIST_MAX else ""
    return ", ".join(items[:_LIST_MAX]) + more


def _dit_defaults() -> dict[str, Any]:
    sig = inspect.signature(DiT.__init__)
    return {k: p.default for k, p in sig.parameters.items() if p.default is not inspect.Parameter.empty}


def _describe(sd: Mapping[str, torch.Tensor]) -> str:
    """'This looks like a DiT-XL/2 checkpoint with input_size=64 (512px with an 8x VAE), ...' or ''."""
    try:
        kw = dit_kwargs_from_state_dict(sd, num_heads=1)  # only the shapes are described
    except ValueError:
        return ""
    name = guess_model_name(sd)
    what = name or f"DiT (hidden_size={kw['hidden_size']}, depth={kw['depth']}, patch_size={kw['patch_size']})"
    parts = []
    if "input_size" in kw:
        parts.append(f"input_size={kw['input_size']} ({kw['input_size'] * 8}px with an 8x VAE)")
    parts += [f"{k}={kw[k]}" for k in ("in_channels", "num_classes", "learn_sigma")]
    if "context_dim" in kw:
        parts.append(f"context_dim={kw['context_dim']}")
    hint = ""
    if name is not None:
        from .registry import model_defaults

        # Only the arguments that differ from what create_model(name) already passes.
        defaults = {**_dit_defaults(), **model_defaults(name)}
        keys = ("input_size", "in_channels", "num_classes", "learn_sigma", "context_dim")
        args = "".join(f", {k}={kw[k]!r}" for k in keys if k in kw and kw[k] != defaults.get(k))
        hint = f"; build it with create_model({name!r}{args})"
    return f" This looks like a {what} checkpoint with {', '.join(parts)}{hint}."


def load_model_weights(
    model: nn.Module, sd_or_path: str | Path | Mapping[str, Any], prefer: str = "ema"
) -> nn.Module:
    """Load weights strictly into ``model`` and return it.

    sd_or_path: a weights file (see ``load_weights_file``), a loaded checkpoint dict or a state dict (see
    ``extract_state_dict``; ``prefer`` picks "ema" or "model"). diffusers DiT state dicts are converted on the fly.
    On any missing / unexpected key or shape mismatch, raises ValueError listing them and naming the model the
    weights look like.
    """
    source = f"weights file {sd_or_path}" if isinstance(sd_or_path, (str, Path)) else "the state dict"
    obj = load_weights_file(sd_or_path) if isinstance(sd_or_path, (str, Path)) else sd_or_path
    sd = extract_state_dict(obj, prefer=prefer)
    if _is_diffusers_dit(sd):
        sd = convert_diffusers_dit(sd, input_size=getattr(model, "input_size", None))
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [
        f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in sd and sd[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        problems = []
        if missing:
            problems.append(f"missing keys ({len(missing)}): {_fmt(missing)}")
        if unexpected:
            problems.append(f"unexpected keys ({len(unexpected)}): {_fmt(unexpected)}")
        if shapes:
            problems.append(f"shape mismatches ({len(shapes)}): {_fmt(shapes)}")
        raise ValueError(
            f"{source} does not fit {type(model).__name__}: {'; '.join(problems)}.{_describe(sd)}"
        )
    model.load_state_dict(sd, strict=True)
    return model
