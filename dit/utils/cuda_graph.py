"""A whole training step (forward, backward, clipping, optimizer update) captured in one CUDA graph.

``torch.compile(mode="reduce-overhead")`` graphs the compiled forward and backward separately; between and after
them the host still runs autograd, the gradient-norm and optimizer launches and the Python of the loop, and a small
model's GPU waits for it (DiT-S/2: ~2 ms of a 38 ms step idle, docs/benchmarks.md run 8). One graph of the whole
step leaves the host nothing to do per step but copy the batch in and replay.

Rules for the captured function (checked where cheap, documented otherwise):
- it reads its data only from the tensors it is given (copied into fixed buffers before every replay) and from
  state that stays at fixed addresses (parameters, optimizer state, device scalars such as
  ``AdamWEMA.set_hyperparameters``' learning rate);
- it makes no host sync and no host decision from device values;
- the gradients are None when it is captured (``zero_grad(set_to_none=True)`` before), so the captured backward
  assigns them rather than accumulating;
- random ops use the default CUDA generator: the graph draws from its current seed and offset at every replay, as
  the same kernels would outside the graph, so ``torch.manual_seed`` before a replay works as usual.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten


class StepGraph:
    """Run ``fn(**inputs)`` directly for the first ``warmup`` calls (compilation, lazy optimizer state, library
    workspaces), then capture it in a CUDA graph and replay it on every later call.

    Returns ``fn``'s outputs; from the capture on they are the graph's own tensors, overwritten by the next replay:
    copy what must outlive it. ``inputs`` must keep their structure, shapes and dtypes from call to call.

    ``high_priority``: warm up and capture on a stream above the default priority, so that work ``fn`` puts on a
    stream of the default (lowest) priority, the optimizer update of ``dit.optim.UpdateDuringBackward``, gets only the
    SMs the step's own kernels leave idle; the graph keeps each captured kernel's priority (PyTorch instantiates it
    with ``cudaGraphInstantiateFlagUseNodePriority``).
    """

    def __init__(self, fn: Callable[..., Any], *, warmup: int = 2, high_priority: bool = False):
        if warmup < 1:
            raise ValueError(f"StepGraph: warmup must be >= 1 (lazy state must exist before capture), got {warmup}")
        self.fn, self.warmup, self.high_priority = fn, warmup, high_priority
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self._static: list[Any] = []
        self._spec = None
        self._outputs: Any = None
        self._side: torch.cuda.Stream | None = None

    def __call__(self, **inputs: Any) -> Any:
        self.calls += 1
        leaves, spec = tree_flatten(inputs)
        if self.graph is None and self.calls <= self.warmup:
            # On a side stream, as the capture will be (PyTorch's recipe for whole-network capture).
            main = torch.cuda.current_stream()
            if self._side is None:  # CUDA priorities: 0 (the default) is the lowest, lower numbers are higher
                self._side = torch.cuda.Stream(priority=-1 if self.high_priority else 0)
            self._side.wait_stream(main)
            with torch.cuda.stream(self._side):
                out = self.fn(**inputs)
            main.wait_stream(self._side)
            for t in tree_flatten(out)[0]:  # made on the side stream, used on the main one: not reused before
                if isinstance(t, torch.Tensor):
                    t.record_stream(main)
            return out
        if self.graph is None:
            self._capture(leaves, spec)
        else:
            self._load(leaves, spec)
        self.graph.replay()
        return self._outputs

    def _load(self, leaves: list[Any], spec: Any) -> None:
        if spec != self._spec:
            raise ValueError(f"StepGraph: the inputs changed structure since the capture ({spec} vs {self._spec})")
        for i, (dst, src) in enumerate(zip(self._static, leaves)):
            if isinstance(dst, torch.Tensor):
                if not isinstance(src, torch.Tensor) or src.shape != dst.shape or src.dtype != dst.dtype:
                    got = (f"{src.dtype} {tuple(src.shape)}" if isinstance(src, torch.Tensor) else type(src).__name__)
                    raise ValueError(f"StepGraph: input {i} is {got}, the graph was captured with {dst.dtype} "
                                     f"{tuple(dst.shape)}: a CUDA graph replays fixed shapes")
                dst.copy_(src, non_blocking=True)
            elif src != dst:
                raise ValueError(f"StepGraph: non-tensor input {i} changed since the capture ({src!r} vs {dst!r})")

    def _capture(self, leaves: list[Any], spec: Any) -> None:
        # Fixed input buffers, outside the graph's memory pool (written before every replay).
        self._static = [x.clone() if isinstance(x, torch.Tensor) else x for x in leaves]
        self._spec = spec
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # hand the warm-up steps' cached blocks back: the graph gets its own pool
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, stream=self._side if self.high_priority else None):
            self._outputs = self.fn(**tree_unflatten(self._static, spec))
        # Capturing records the kernels without running them: the replay in __call__ runs this step.
