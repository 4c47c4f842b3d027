"""A linear layer's weight gradient on a second CUDA stream, beside its input gradient.

In a DiT block's backward the input-gradient GEMM ``dx = dy W`` and the weight-gradient GEMM ``dW = dy^T x`` read
the same ``dy`` and do not depend on each other. Run one after the other, each ends with a partly empty last wave of
output tiles: DiT-XL/2's fc1 and fc2 weight gradients are 216 tiles of 128 x 192 on 132 SMs (1.64 waves), the
attention projection's 108 tiles leave 24 SMs idle throughout. Launched on two streams, the second GEMM's tiles
start on the SMs the first one's last wave leaves free. The GEMMs are the same cuBLAS calls with the same operands,
so the gradients are the same values.

The pair runs inside one ``torch.library`` custom op (``linear_grads``; the MLP's pairs in
``cublaslt.mlp_grads``), so ``torch.compile`` calls it as one opaque kernel and cannot reuse an input's memory
while the second stream still reads it: the op joins both streams before it returns. Its outputs are allocated on
the calling stream before the fork. The fork and join are an event record and a wait each, which CUDA graphs
(``train.cuda_graph``, ``reduce-overhead``) capture as edges; GEMMs under ``MIN_MACS`` keep the plain sequence,
where those launches would cost more than a tail.
"""

from __future__ import annotations

import functools

import torch

from . import quack_gemm
from .kernels import weight_grad, weight_grad_into

# Multiply-accumulates (M * N * K of the weight gradient) from which a GEMM pair is forked: DiT-S/2's attention
# projection (65,536 x 384 x 384 = 9.7e9) and every larger block GEMM; the adaLN and embedding GEMMs stay sequential.
MIN_MACS = 1 << 32


@functools.cache
def _side_stream(index: int) -> torch.cuda.Stream:
    return torch.cuda.Stream(device=index)


def fork(device: torch.device) -> tuple[torch.cuda.Stream, torch.cuda.Stream]:
    """(the current stream, a second stream of ``device`` that waits for everything queued on the first so far).
    Work queued on the second must be joined (``main.wait_stream(side)``) before its inputs can be freed."""
    main = torch.cuda.current_stream(device)
    side = _side_stream(device.index if device.index is not None else torch.cuda.current_device())
    side.wait_stream(main)
    return main, side


def worth_overlapping(dy: torch.Tensor, x: torch.Tensor, enable: bool) -> bool:
    """Whether the weight gradient ``dy^T x`` (dy (M, N), x (M, K)) runs on the second stream."""
    return enable and dy.is_cuda and dy.shape[0] * dy.shape[1] * x.shape[1] >= MIN_MACS


@torch.library.custom_op("dit::linear_grads", mutates_args=())
def linear_grads(dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, w_dtype: torch.dtype, backend: str
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """A linear layer's input gradient ``dy @ w`` (M, K) on ``backend``'s GEMM and weight gradient ``dy^T x``
    (N, K) in ``w_dtype`` (``kernels.weight_grad``), the latter on the second stream on CUDA.
    dy: (M, N); x: (M, K); w: (N, K) in dy's dtype."""
    dw = torch.empty(w.shape, dtype=w_dtype, device=dy.device)  # (N, K), on the calling stream
    if not dy.is_cuda:
        weight_grad_into(dy, x, dw)
        return quack_gemm.mm(dy, w, backend), dw
    main, side = fork(dy.device)
    with torch.cuda.stream(side):  # first: its last wave is the one with room to spare
        weight_grad_into(dy, x, dw)
    dx = quack_gemm.mm(dy, w, backend)  # (M, K)
    main.wait_stream(side)
    return dx, dw


@linear_grads.register_fake
def _(dy, x, w, w_dtype, backend):
    return dy.new_empty(dy.shape[0], w.shape[1]), dy.new_empty(w.shape, dtype=w_dtype)


def input_and_weight_grads(dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, w_dtype: torch.dtype, backend: str,
                           overlap: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(``dy @ w``, ``weight_grad(dy, x, w_dtype)``): through ``linear_grads`` where ``worth_overlapping``, else
    the two GEMMs in sequence (which ``torch.compile`` sees as plain matmuls)."""
    if worth_overlapping(dy, x, overlap):
        return linear_grads(dy, x, w, w_dtype, backend)
    return quack_gemm.mm(dy, w, backend), weight_grad(dy, x, w_dtype)
