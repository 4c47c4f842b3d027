"""AdamW's update and the weight EMA in one pass over memory.

After every optimizer step the trainer makes two passes over all fp32 parameters: the fused AdamW kernel (reads
param, grad, exp_avg, exp_avg_sq; writes param, exp_avg, exp_avg_sq: 28 bytes per parameter) and the EMA's
``_foreach_lerp_`` (reads param and EMA, writes EMA: 12 bytes). For DiT-XL/2's 675 M parameters that is 27 GB per
step, 15 ms on an H100 beside a 123 ms forward + backward (docs/benchmarks.md, run 6). Updating the EMA from the new
weights while they are still in registers drops the second read of the parameters: 36 bytes per parameter.

:class:`AdamWEMA` does that with one Triton kernel over all tensors (a table of their addresses, so one launch
covers hundreds of tensors of any size), keeping the state in ``torch.optim.AdamW``'s own format: checkpoints,
``load_state_dict`` and the learning-rate scheduler see a plain AdamW. It honours the hooks the fused AdamW reads:
``optimizer.grad_scale`` (gradients are divided by it: gradient clipping without a pass, ``clip_in_fused_step``)
and ``optimizer.found_inf`` (1 skips the update, the EMA update and the step count, without a host sync). Where the
kernel cannot run (CPU, no Triton, FSDP shards, AMSGrad, ...) the same call runs ``optimizer.step()`` and a foreach
lerp: the reference the kernel is tested against.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch

from dit.models.kernels import has_triton

_FIELDS = 9  # table row: param, grad, exp_avg, exp_avg_sq, ema, step addresses, numel, has_grad, compute copy (or 0)


@functools.cache
def _kernel():
    """Triton and the kernel, imported on first use (dit/optim_triton.py needs Triton)."""
    import triton

    from dit import optim_triton

    return triton, optim_triton.dit_adamw_ema


class AdamWEMA:
    """``optimizer.step()`` followed by ``ema = lerp(ema, param, ema_weight)``, as one Triton kernel on CUDA.

    ``optimizer`` is a ``torch.optim.AdamW``; ``ema_params`` (or None: no EMA) lists one fp32 tensor per optimizer
    parameter, in ``param_groups`` order, each the EMA copy of that parameter. Parameters without a gradient are not
    updated (as in torch) but their EMA still moves towards them. ``step(w)`` is ``set_hyperparameters(w)`` (the
    learning rate and EMA weight, uploaded to the device) then ``launch()`` (the kernel, capturable in a CUDA graph).
    ``force_triton=True`` runs the kernel wherever Triton runs it (the CPU interpreter, ``TRITON_INTERPRET=1``, in
    tests).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, ema_params: Sequence[torch.Tensor] | None = None, *,
                 block: int = 2048, num_warps: int = 4, force_triton: bool = False):
        self.optimizer = optimizer
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.ema_params = list(ema_params) if ema_params is not None else None
        if self.ema_params is not None:
            if len(self.ema_params) != len(self.params):
                raise ValueError(f"AdamWEMA: {len(self.ema_params)} EMA tensors for {len(self.params)} parameters")
            for i, (e, p) in enumerate(zip(self.ema_params, self.params)):
                if e.shape != p.shape:
                    raise ValueError(f"AdamWEMA: EMA tensor {i} has shape {tuple(e.shape)}, its parameter "
                                     f"{tuple(p.shape)}")
        self.block, self.num_warps = block, num_warps
        self.reason = self._unsupported(force_triton)  # None: the kernel runs
        # per segment of the update (a group and the indices of some of its parameters, see set_buckets):
        self._blocks: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # (kernel block -> tensor, its index)
        self._tables: dict[tuple, tuple] = {}  # (addresses, device table, aligned)
        self._offsets: dict[tuple, int] | None = None  # first kernel block in the norm partials
        self._dummy_step: torch.Tensor | None = None
        self._hyper: dict[int, torch.Tensor] = {}  # group -> (3,) fp32 device: lr, 1 - lr * weight_decay, EMA weight
        # (group, beta1, beta2) -> (4,) fp64 device: the betas rounded to float32, and their log2
        self._betas: dict[tuple, torch.Tensor] = {}
        self._graph_sources: list[torch.Tensor] = []  # pinned tables a CUDA graph copies from on every replay
        self._copy_pairs: list[tuple[torch.Tensor, torch.Tensor]] = []  # (parameter, its compute-dtype copy)
        self._copies: dict[int, torch.Tensor] = {}  # id(parameter) -> copy
        self.copy_dtype: torch.dtype | None = None
        self._norm_partials: torch.Tensor | None = None  # grad_norm=True: each kernel block's sum of squares
        # The update's buckets (set_buckets): each a list of segments (group, indices of its parameters in the group);
        # by default one bucket of every group's parameters, so launch() is one kernel per group.
        self.buckets: list[list[tuple[int, tuple[int, ...]]]] = [
            [(gi, tuple(range(len(g["params"]))))] for gi, g in enumerate(optimizer.param_groups) if g["params"]]

    def keep_compute_copies(self, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """After every update also write each parameter of ``pairs`` = [(parameter, copy)], rounded, into its copy:
        a contiguous bf16 or fp16 tensor of the parameter's shape (one dtype for all), the weight a layer computes
        with (``DiT.set_compute_weights``) instead of casting its fp32 weight on every step. In the kernel that costs
        the copy's bytes and no extra read; elsewhere a foreach copy after the step. Empty ``pairs``: none."""
        pairs = list(pairs)
        dtypes = {c.dtype for _, c in pairs}
        if len(dtypes) > 1 or not dtypes <= {torch.bfloat16, torch.float16}:
            raise ValueError(f"AdamWEMA.keep_compute_copies: copies must all be bf16 or all fp16, got {dtypes}")
        ids = {id(p) for p in self.params}
        for i, (p, c) in enumerate(pairs):
            if id(p) not in ids:
                raise ValueError(f"AdamWEMA.keep_compute_copies: pair {i} names a tensor the optimizer does not update")
            if c.shape != p.shape or not c.is_contiguous() or c.device != p.device:
                raise ValueError(f"AdamWEMA.keep_compute_copies: copy {i} is {tuple(c.shape)} on {c.device}, "
                                 f"expected a contiguous tensor of shape {tuple(p.shape)} on {p.device}")
        self._copy_pairs = pairs
        self._copies = {id(p): c for p, c in pairs}
        self.copy_dtype = dtypes.pop() if dtypes else None
        self._tables.clear()  # the address tables gain the copies

    @property
    def fused(self) -> bool:
        """Whether :meth:`step` runs the one-pass kernel (else ``optimizer.step()`` + a foreach lerp)."""
        return self.reason is None

    def _unsupported(self, force: bool) -> str | None:
        if not isinstance(self.optimizer, torch.optim.AdamW):
            return f"{type(self.optimizer).__name__} is not torch.optim.AdamW"
        if not has_triton():
            return "Triton is not installed"
        tensors = self.params + (self.ema_params or [])
        if not force and not all(t.is_cuda for t in tensors):
            return "parameters are not on a CUDA device"
        if len({t.device for t in tensors}) > 1:
            return "parameters are on several devices"
        if any(hasattr(t, "to_local") for t in tensors):
            return "parameters are DTensors (FSDP shards)"
        if any(type(t) not in (torch.Tensor, torch.nn.Parameter) for t in tensors):
            return "parameters are tensor subclasses"
        if any(t.dtype != torch.float32 or not t.is_contiguous() for t in tensors):
            return "parameters are not contiguous fp32 tensors"
        for g in self.optimizer.param_groups:
            for k in ("amsgrad", "maximize", "capturable", "differentiable"):
                if g.get(k):
                    return f"{k}=True is not supported"
            if isinstance(g["lr"], torch.Tensor) or any(isinstance(b, torch.Tensor) for b in g["betas"]):
                return "tensor lr/betas are not supported"
        return None

    def step(self, ema_weight: float = 0.0) -> None:
        """One AdamW step, then ``ema += ema_weight * (param - ema)`` (``ema_weight = 1 - decay``), both skipped
        where ``optimizer.found_inf`` is 1. Consumes ``optimizer.grad_scale`` / ``found_inf`` like the fused AdamW."""
        opt = self.optimizer
        found_inf = getattr(opt, "found_inf", None)
        if not self.fused:
            if (found_inf is not None or getattr(opt, "grad_scale", None) is not None) and not opt.defaults.get("fused"):
                raise ValueError("AdamWEMA: optimizer.found_inf / grad_scale are read by torch's fused AdamW only; "
                                 "create the AdamW with fused=True where the one-pass kernel does not run")
            opt.step()
            if self._copy_pairs:
                torch._foreach_copy_([c for _, c in self._copy_pairs], [p.detach() for p, _ in self._copy_pairs])
            if self.ema_params is not None:
                src = [p.detach() for p in self.params]
                w = ema_weight if found_inf is None else (1.0 - found_inf.float()) * ema_weight  # () on the device
                torch._foreach_lerp_(self.ema_params, src, w if isinstance(w, float) else [w] * len(src))
            return
        self.set_hyperparameters(ema_weight)
        self.launch()

    def set_hyperparameters(self, ema_weight: float = 0.0) -> None:
        """Upload each group's learning rate and weight-decay factor and this step's EMA weight to the device, where
        the kernel reads them. With a CUDA graph of the training step, call this before each replay (outside the
        graph) and :meth:`launch` inside it: the graph then follows the LR schedule and the EMA warm-up."""
        if not self.fused:
            raise RuntimeError(f"AdamWEMA.set_hyperparameters: the one-pass kernel does not run here ({self.reason})")
        for gi, group in enumerate(self.optimizer.param_groups):
            if not group["params"]:
                continue
            lr = float(group["lr"])
            values = torch.tensor([lr, 1.0 - lr * group["weight_decay"], float(ema_weight)], dtype=torch.float32)
            device = group["params"][0].device
            if device.type == "cuda":  # a fresh pinned block per call: the caching host allocator keeps it until the
                values = values.pin_memory()  # asynchronous copy has run, so no host sync and no overwrite
            hyper = self._hyper.get(gi)
            if hyper is None:
                self._hyper[gi] = hyper = torch.empty(3, dtype=torch.float32, device=device)
            hyper.copy_(values, non_blocking=True)

    def set_buckets(self, buckets: Sequence[Sequence[torch.Tensor]]) -> None:
        """Split the update into ``buckets`` (lists of parameters; each optimizer parameter in exactly one) that
        :meth:`launch_bucket` runs one at a time, e.g. as soon as the backward has finished a block's gradients
        (:class:`UpdateDuringBackward`). :meth:`launch` runs them all, in order; the results are the same."""
        where = {id(p): (gi, i) for gi, g in enumerate(self.optimizer.param_groups) for i, p in enumerate(g["params"])}
        seen: set[int] = set()
        layout = []
        for b, bucket in enumerate(buckets):
            segments: dict[int, list[int]] = {}
            for p in bucket:
                if id(p) not in where:
                    raise ValueError(f"AdamWEMA.set_buckets: bucket {b} names a tensor the optimizer does not update")
                if id(p) in seen:
                    raise ValueError(f"AdamWEMA.set_buckets: a parameter of bucket {b} is in an earlier bucket too")
                seen.add(id(p))
                gi, i = where[id(p)]
                segments.setdefault(gi, []).append(i)
            layout.append([(gi, tuple(idx)) for gi, idx in sorted(segments.items())])
        if len(seen) != len(where):
            raise ValueError(f"AdamWEMA.set_buckets: the buckets hold {len(seen)} of the optimizer's {len(where)} "
                             "parameters; every parameter must be in one")
        self.buckets = layout
        self._norm_partials = self._offsets = None

    def launch(self, grad_norm: bool = False) -> torch.Tensor | None:
        """The update with the hyperparameters of the last :meth:`set_hyperparameters`: no host sync and no host
        transfer (except the address table, when the gradients moved), so it can be captured in a CUDA graph.

        ``grad_norm=True`` (without ``optimizer.grad_scale``) also returns the global L2 norm of the gradients ()
        from the pass the update makes anyway, instead of a separate read of every gradient before it (1 ms of
        DiT-XL/2's step). The norm is then known only after the update, so it cannot decide a skip: an element whose
        gradient is not finite keeps its weight, moments and EMA (the other elements are updated), and the norm
        comes out non-finite for the caller to count the step as bad. ``optimizer.found_inf`` still skips the
        whole update (the norm is then 0)."""
        for b in range(len(self.buckets)):
            self.launch_bucket(b, grad_norm)
        return self.grad_norm() if grad_norm else None

    def launch_bucket(self, b: int, grad_norm: bool = False, max_ctas: int | None = None) -> None:
        """:meth:`launch` for the parameters of bucket ``b`` only (:meth:`set_buckets`); with ``grad_norm`` its
        blocks' sums of squares go where :meth:`grad_norm` adds them up. ``max_ctas``: at most that many thread
        blocks per launch, each looping over its share of the blocks (the same results), so that an update running
        beside other kernels (:class:`UpdateDuringBackward`) holds a bounded share of the SMs; None: one per block."""
        if not self.fused:
            raise RuntimeError(f"AdamWEMA.launch: the one-pass kernel does not run here ({self.reason})")
        opt = self.optimizer
        if any(gi not in self._hyper for gi, _ in self.buckets[b]):
            raise RuntimeError("AdamWEMA.launch: call set_hyperparameters first")
        found_inf = getattr(opt, "found_inf", None)
        grad_scale = getattr(opt, "grad_scale", None)
        if grad_norm and grad_scale is not None:
            raise ValueError("AdamWEMA.launch(grad_norm=True): the norm of gradients divided by optimizer.grad_scale "
                             "is not supported (clip or unscale with clip_in_fused_step instead)")
        with torch.no_grad():
            for segment in self.buckets[b]:
                partials = None
                if grad_norm:  # this segment's slice of one fp32 per kernel block of every bucket
                    start, blocks = self._partials_slice(segment)
                    partials = self._norm_partials[start:start + blocks]
                self._step_segment(segment, found_inf, grad_scale, partials, max_ctas)
        opt._opt_called = True  # type: ignore[attr-defined]  # LR schedulers check that the optimizer stepped

    def grad_norm(self) -> torch.Tensor:
        """The global L2 norm () of the gradients the last launches with ``grad_norm=True`` read (every bucket)."""
        if self._norm_partials is None:
            raise RuntimeError("AdamWEMA.grad_norm: no launch with grad_norm=True yet")
        return self._norm_partials.sum().sqrt()

    def _partials_slice(self, segment: tuple[int, tuple[int, ...]]) -> tuple[int, int]:
        """(first, count) of ``segment``'s kernel blocks in the norm partials, which are (re)made here, kept across
        steps (a CUDA graph of the step writes the same ones)."""
        if self._offsets is None or self._norm_partials is None:
            self._offsets, start = {}, 0
            for bucket in self.buckets:
                for seg in bucket:
                    self._offsets[seg] = start
                    start += self._segment_blocks(seg)[0].numel()
            self._norm_partials = torch.empty(start, dtype=torch.float32, device=self.params[0].device)
        return self._offsets[segment], self._segment_blocks(segment)[0].numel()

    def _state(self, p: torch.Tensor) -> dict:
        st = self.optimizer.state[p]
        if not st:  # torch's lazy initialisation, in the fused AdamW's form (device step counter)
            st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        elif st["step"].device != p.device:  # a state loaded for the unfused AdamW keeps its counter on the CPU
            st["step"] = st["step"].to(p.device, torch.float32)
        return st

    def _segment_blocks(self, segment: tuple[int, tuple[int, ...]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(the tensor of each kernel block, the block's number within its tensor) of ``segment`` = (group, indices
        of its parameters in the group): (blocks,) each."""
        if segment not in self._blocks:
            triton, _ = _kernel()
            params = [self.optimizer.param_groups[segment[0]]["params"][i] for i in segment[1]]
            counts = torch.tensor([triton.cdiv(p.numel(), self.block) for p in params])
            owner = torch.repeat_interleave(torch.arange(len(params)), counts)
            first = torch.cumsum(counts, 0) - counts
            index = torch.arange(len(owner)) - first[owner]
            device = params[0].device
            self._blocks[segment] = (owner.to(device, torch.int32), index.to(device, torch.int32))
        return self._blocks[segment]

    def _step_segment(self, segment: tuple[int, tuple[int, ...]], found_inf: torch.Tensor | None,
                      grad_scale: torch.Tensor | None, norm_partials: torch.Tensor | None = None,
                      max_ctas: int | None = None) -> None:
        triton, kernel = _kernel()
        gi, indices = segment
        group = self.optimizer.param_groups[gi]
        params = [group["params"][i] for i in indices]
        offset = sum(len(g["params"]) for g in self.optimizer.param_groups[:gi])
        emas = [self.ema_params[offset + i] for i in indices] if self.ema_params is not None else None
        device = params[0].device
        states = [self._state(p) for p in params]
        with_grad = [s["step"] for p, s in zip(params, states) if p.grad is not None]
        if with_grad and found_inf is None:  # none: a bucket whose parameters got no gradient (only its EMA moves)
            torch._foreach_add_(with_grad, 1.0)
        elif with_grad:  # as the fused AdamW: the count moves only on a step that is taken
            torch._foreach_add_(with_grad, [1.0 - found_inf.float()] * len(with_grad))
        if self._dummy_step is None:
            self._dummy_step = torch.ones((), dtype=torch.float32, device=device)
        addresses = []
        for j, (i, p, s) in enumerate(zip(indices, params, states)):
            g = p.grad
            if g is not None and (g.dtype != torch.float32 or not g.is_contiguous() or g.shape != p.shape):
                raise ValueError(f"AdamWEMA: the gradient of parameter {offset + i} is {g.dtype} "
                                 f"{tuple(g.shape)}, expected a contiguous fp32 tensor of the parameter's shape")
            e = emas[j] if emas is not None else p
            c = self._copies.get(id(p))
            addresses += [p.data_ptr(), (g if g is not None else p).data_ptr(), s["exp_avg"].data_ptr(),
                          s["exp_avg_sq"].data_ptr(), e.data_ptr(),
                          (s["step"] if g is not None else self._dummy_step).data_ptr(), p.numel(), int(g is not None),
                          c.data_ptr() if c is not None else 0]
        key = tuple(addresses)
        cached = self._tables.get(segment)
        if cached is None or cached[0] != key:
            # A pinned staging copy: the upload is asynchronous (no host sync), and the caching host allocator keeps
            # the staging block until the copy has run. Gradients usually land at the same addresses every step.
            host = torch.tensor(addresses, dtype=torch.int64)
            if device.type == "cuda":
                host = host.pin_memory()
            aligned = all(a % 16 == 0 for r in range(0, len(key), _FIELDS) for a in key[r:r + 5] + key[r + 8:r + 9]
                          ) and all(p.numel() % 4 == 0 for p in params)
            self._tables[segment] = cached = (key, host.to(device, non_blocking=True), aligned)
            if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                self._graph_sources.append(host)  # every replay copies from it again: it must outlive the graph
        _, table, aligned = cached
        owner, index = self._segment_blocks(segment)
        beta1, beta2 = group["betas"]
        betas = self._betas.get((gi, beta1, beta2))
        if betas is None:  # made once (before any CUDA-graph capture: the graph's warm-up steps run this)
            f32 = torch.tensor([beta1, beta2], dtype=torch.float32).tolist()  # the values the moments use
            self._betas[(gi, beta1, beta2)] = betas = torch.tensor(
                f32 + [math.log2(b) if b > 0 else -math.inf for b in f32], dtype=torch.float64, device=device)
        n_blocks = owner.numel()
        grid = n_blocks if max_ctas is None else min(n_blocks, max_ctas)
        kernel[(grid,)](
            table, owner, index, found_inf if found_inf is not None else table,
            grad_scale if grad_scale is not None else table, self._hyper[gi], betas, group["eps"],
            norm_partials if norm_partials is not None else table, n_blocks,
            HAS_FOUND_INF=found_inf is not None, HAS_GRAD_SCALE=grad_scale is not None, HAS_EMA=emas is not None,
            COPY_DTYPE=None if self.copy_dtype is None else getattr(triton.language, str(self.copy_dtype)[6:]),
            ALIGNED=aligned, GRAD_NORM=norm_partials is not None, FIELDS=_FIELDS, BLOCK=self.block,
            PERSISTENT=grid < n_blocks, num_warps=self.num_warps)


class UpdateDuringBackward:
    """Each bucket's AdamW + EMA update (``AdamWEMA.launch_bucket``) launched as soon as the backward has
    accumulated that bucket's last gradient, on a side stream of the lowest priority, instead of the whole update
    after the whole backward.

    The update runs at the memory bandwidth (DiT-XL/2: 8.5 ms of a 108 ms step); the backward's GEMMs leave SMs idle
    in their last waves and between kernels. The GPU gives the update's thread blocks only the SMs the step's own
    kernels, of higher priority, do not claim (the trainer then captures its whole-step CUDA graph on a high-priority
    stream, ``StepGraph(high_priority=True)``, and a graph keeps each kernel's priority), so the update fills that
    idle time. The update is that of ``AdamWEMA.launch(grad_norm=True)`` after the backward, bit for bit (the same
    kernel on the same gradients); the norm equals it to float rounding (the same partial sums, added in bucket
    order).

    Use: ``arm()`` before the backward (``optimizer.found_inf`` and the hyperparameters already set: the kernels
    read them while the backward runs), ``finish()`` after it, which returns the gradient norm (). Needs every
    gradient of a step from one backward (no gradient accumulation), and a backward that reads a parameter (or a
    copy of it, as the DiT's bf16 ``weight_c``) only in the nodes that produce its gradient: once the last of them
    has run the parameter is free to change. A ``p.detach()`` in the forward would break that; DiT and UNet keep it.

    ``max_ctas`` caps each launch's thread blocks (``AdamWEMA.launch_bucket``). Uncapped, the update's many short
    blocks take every SM the backward leaves free, and the backward's kernels beside it slowed by about 4 ms of
    DiT-XL/2's step (docs/benchmarks.md, run 31); a few persistent blocks spread a block's update over the next
    block's backward instead, with a bounded share of the SMs and memory bandwidth.
    """

    def __init__(self, update: AdamWEMA, buckets: Sequence[Sequence[torch.Tensor]], max_ctas: int | None = None):
        if max_ctas is not None and max_ctas < 1:
            raise ValueError(f"UpdateDuringBackward: max_ctas must be >= 1 or None, got {max_ctas}")
        self.max_ctas = max_ctas
        buckets = [list(b) for b in buckets if len(b)]
        update.set_buckets(buckets)
        self.update = update
        # A frozen parameter (the DiT's fixed pos_embed) is the optimizer's but gets no gradient and takes no hook:
        # its bucket waits only for the others' gradients, or for finish() if it has none
        self._bucket_of = {id(p): b for b, bucket in enumerate(buckets) for p in bucket if p.requires_grad}
        self._sizes = [sum(p.requires_grad for p in bucket) for bucket in buckets]
        self._left: list[int] = []  # per bucket, the gradients still to come this step (empty: not armed)
        self._launched: list[bool] = []
        self._handles = [p.register_post_accumulate_grad_hook(self._accumulated)
                         for bucket in buckets for p in bucket if p.requires_grad]
        device = update.params[0].device
        # Priority 0 is CUDA's lowest (the range is 0 down to a negative number); on the CPU (tests) no stream
        self.stream = torch.cuda.Stream(device, priority=0) if device.type == "cuda" else None

    def arm(self) -> None:
        """Before the backward whose gradients the update takes."""
        self._left = list(self._sizes)
        self._launched = [False] * len(self._sizes)

    def _accumulated(self, p: torch.Tensor) -> None:
        if not self._left:  # a backward outside arm() / finish(): not the trainer's
            return
        b = self._bucket_of[id(p)]
        self._left[b] -= 1
        if self._left[b] == 0:
            self._launch(b)

    def _launch(self, b: int) -> None:
        self._launched[b] = True
        if self.stream is None:
            self.update.launch_bucket(b, grad_norm=True, max_ctas=self.max_ctas)
            return
        self.stream.wait_stream(torch.cuda.current_stream())  # after the kernels that made the gradients
        with torch.cuda.stream(self.stream):
            self.update.launch_bucket(b, grad_norm=True, max_ctas=self.max_ctas)

    def finish(self) -> torch.Tensor:
        """After the backward: the buckets still waiting (parameters that got no gradient) are launched, the current
        stream waits for the update, and the global gradient norm () is returned."""
        if not self._left:
            raise RuntimeError("UpdateDuringBackward.finish: arm() was not called before the backward")
        for b, launched in enumerate(self._launched):
            if not launched:
                self._launch(b)
        self._left = []
        if self.stream is not None:
            torch.cuda.current_stream().wait_stream(self.stream)
        return self.update.grad_norm()

    def remove(self) -> None:
        """Remove the gradient hooks."""
        for h in self._handles:
            h.remove()
        self._handles = []


def update_buckets(model: torch.nn.Module, params: Sequence[torch.Tensor]) -> list[list[torch.Tensor]]:
    """``params`` grouped by where ``model`` uses them, for :class:`UpdateDuringBackward`: one bucket per element
    of each ``nn.ModuleList`` / ``nn.Sequential`` child (a DiT's or UNet's blocks), one per other child module and
    one for the parameters of ``model`` itself; parameters outside ``params`` are left out, empty buckets dropped."""
    wanted = {id(p) for p in params}
    taken: set[int] = set()

    def collect(module: torch.nn.Module) -> list[torch.Tensor]:
        out = [p for p in module.parameters() if id(p) in wanted and id(p) not in taken]
        taken.update(id(p) for p in out)
        return out

    buckets = []
    for child in model.children():
        parts = list(child) if isinstance(child, (torch.nn.ModuleList, torch.nn.Sequential)) else [child]
        buckets += [collect(m) for m in parts]
    buckets.append([p for p in params if id(p) not in taken])
    return [b for b in buckets if b]
