"""The MLP's GELU inside its GEMMs for training: cuBLASLt epilogues that torch does not expose.

A DiT MLP ``fc2(GELU_tanh(fc1(x)))`` trains, under Inductor, as GEMMs plus three memory-bound passes over the 4x-wide
activation (docs/benchmarks.md, runs 8-9): the forward GELU (read h, write g), the GELU backward (read dg and h,
write dh) and fc1's bias gradient (re-read for the column sums). cuBLASLt does the first two in GEMM epilogues:

- forward, ``fc1``: ``CUBLASLT_EPILOGUE_GELU_AUX_BIAS`` adds the bias, applies tanh-GELU and stores both the
  activation g and the pre-activation h (kept for the backward) from the accumulator tile;
- backward, fc2's input-gradient GEMM ``dg = dy @ W2``: ``CUBLASLT_EPILOGUE_DGELU`` multiplies by GELU'(h), so dg
  never reaches memory (fc1's bias gradient stays a separate column sum of dh).

``torch._addmm_activation`` reaches the first epilogue only without the pre-activation (inference,
``layers.linear_gelu_tanh``). Here cuBLASLt is called through ``ctypes``, on the library torch itself loaded, on
torch's current stream (CUDA-graph safe: workspace from the caching allocator, host-side setup only). The two GEMMs
are ``torch.library`` custom ops (opaque to ``torch.compile``); ``fused_mlp`` combines them with plain torch GEMMs
into the MLP's forward and backward. Elsewhere (CPU, or a CUDA build whose cuBLASLt lacks these epilogues) the ops
compute the same formulas with torch, which is also the reference the GPU path is tested against.

On an H100: +5.1% trainer img/s for DiT-S/2, +2.9% for DiT-XL/2 (docs/benchmarks.md, run 11).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import threading

import torch
from torch.utils.flop_counter import register_flop_formula

from . import quack_gemm
from .kernels import _acc  # the reference path's accumulation dtype: fp32, or float64 for float64 inputs
from .kernels import linear_gelu_ref, weight_grad

logger = logging.getLogger(__name__)

# cublasLt.h (CUDA 12/13) enum values.
_COMPUTE_32F = 68  # cublasComputeType_t CUBLAS_COMPUTE_32F
_R_32F, _R_16F, _R_16BF = 0, 2, 14  # cudaDataType_t
_OP_N, _OP_T = 0, 1  # cublasOperation_t
_DESC_TRANSA, _DESC_TRANSB, _DESC_EPILOGUE, _DESC_BIAS_POINTER = 3, 4, 7, 8  # cublasLtMatmulDescAttributes_t
_DESC_AUX_POINTER, _DESC_AUX_LD = 11, 12
_PREF_MAX_WORKSPACE_BYTES = 1  # cublasLtMatmulPreferenceAttributes_t
EPILOGUE_DEFAULT = 1
EPILOGUE_GELU_AUX_BIAS = 164  # GELU(acc + bias) -> D, acc + bias -> aux
EPILOGUE_DGELU = 192  # acc * GELU'(aux) -> D
EPILOGUE_DGELU_BGRAD = 208  # as DGELU, and D's sums over its columns -> bias (measured, not used: run 11)
EPILOGUE_BGRADB = 512  # B's sums over k -> bias (a weight-gradient GEMM's bias gradient; measured, not used)
_USES_BIAS, _USES_AUX = 4 | 16 | 256 | 512, 128  # epilogue bits that read/write the bias pointer, the aux matrix
_WORKSPACE_BYTES = 32 << 20  # what torch gives cuBLAS on Hopper
_CANDIDATES = 16  # algorithms asked of the heuristic (and timed once per shape, _CublasLt.fastest_plan)

_DTYPES = {torch.bfloat16: _R_16BF, torch.float16: _R_16F}


class _HeuristicResult(ctypes.Structure):
    # cublasLtMatmulHeuristicResult_t: algo (cublasLtMatmulAlgo_t, 8 x uint64), workspaceSize, state, wavesCount,
    # reserved[4]
    _fields_ = [("algo", ctypes.c_uint64 * 8), ("workspace_size", ctypes.c_size_t), ("state", ctypes.c_int),
                ("waves_count", ctypes.c_float), ("reserved", ctypes.c_int * 4)]


def _find_cublaslt() -> ctypes.CDLL:
    """The libcublasLt that torch loaded (same instance, same version), else the first one the loader finds."""
    torch.cuda.init()
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "libcublasLt" in line}
    except OSError:
        paths = set()
    for path in sorted(paths):
        try:
            return ctypes.CDLL(path)
        except OSError:
            continue
    for name in ("libcublasLt.so.13", "libcublasLt.so.12", "libcublasLt.so"):
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    raise OSError("libcublasLt not found (torch loaded none, and none is on the library path)")


class _CublasLt:
    """The handful of cuBLASLt entry points the two epilogue GEMMs need, with cached descriptors per shape."""

    def __init__(self):
        lib = _find_cublaslt()
        vp, u64, i64, i32, sz = ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int64, ctypes.c_int, ctypes.c_size_t
        sig = {
            "cublasLtCreate": [ctypes.POINTER(vp)],
            "cublasLtMatmulDescCreate": [ctypes.POINTER(vp), i32, i32],
            "cublasLtMatmulDescSetAttribute": [vp, i32, vp, sz],
            "cublasLtMatrixLayoutCreate": [ctypes.POINTER(vp), i32, u64, u64, i64],
            "cublasLtMatmulPreferenceCreate": [ctypes.POINTER(vp)],
            "cublasLtMatmulPreferenceSetAttribute": [vp, i32, vp, sz],
            "cublasLtMatmulAlgoGetHeuristic": [vp, vp, vp, vp, vp, vp, vp, i32, ctypes.POINTER(_HeuristicResult),
                                               ctypes.POINTER(i32)],
            "cublasLtMatmul": [vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, sz, vp],
        }
        for name, args in sig.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, ctypes.c_int
        self.lib = lib
        self.handles: dict[int, ctypes.c_void_p] = {}
        self.plans: dict[tuple, tuple] = {}
        self.tuned: dict[tuple, tuple] = {}
        self.alpha, self.beta = ctypes.c_float(1.0), ctypes.c_float(0.0)
        # a plan's descriptor gets each call's pointers: one call at a time (autograd's backward has its own thread)
        self.lock = threading.Lock()

    def _check(self, status: int, what: str) -> None:
        if status != 0:
            raise RuntimeError(f"cuBLASLt {what} failed with status {status}")

    def handle(self, device: torch.device) -> ctypes.c_void_p:
        idx = device.index if device.index is not None else torch.cuda.current_device()
        if idx not in self.handles:
            h = ctypes.c_void_p()
            with torch.cuda.device(idx):
                self._check(self.lib.cublasLtCreate(ctypes.byref(h)), "cublasLtCreate")
            self.handles[idx] = h
        return self.handles[idx]

    def _set(self, setter, obj, attr: int, value) -> None:
        self._check(setter(obj, attr, ctypes.byref(value), ctypes.sizeof(value)), f"set attribute {attr}")

    def plan(self, device: torch.device, epilogue: int, dtype: int, m: int, n: int, k: int, trans_a: int,
             trans_b: int, lda: int, ldb: int, algo_index: int = 0) -> tuple:
        """Descriptors and the heuristic's algorithm for the column-major ``D (m, n) = op(A) (m, k) @ op(B) (k, n)``
        with ``epilogue`` (its aux matrix, if any, shaped like D); cached per shape."""
        key = (device.index, epilogue, dtype, m, n, k, trans_a, trans_b, lda, ldb, algo_index)
        if key in self.plans:
            return self.plans[key]
        lib, h = self.lib, self.handle(device)
        desc = ctypes.c_void_p()
        set_desc = lib.cublasLtMatmulDescSetAttribute
        self._check(lib.cublasLtMatmulDescCreate(ctypes.byref(desc), _COMPUTE_32F, _R_32F), "MatmulDescCreate")
        self._set(set_desc, desc, _DESC_TRANSA, ctypes.c_int32(trans_a))
        self._set(set_desc, desc, _DESC_TRANSB, ctypes.c_int32(trans_b))
        self._set(set_desc, desc, _DESC_EPILOGUE, ctypes.c_uint32(epilogue))
        # heuristics look at the pointers' alignment: any 256-byte aligned address stands in for the real ones
        if epilogue & _USES_BIAS:
            self._set(set_desc, desc, _DESC_BIAS_POINTER, ctypes.c_void_p(256))
        if epilogue & _USES_AUX:
            self._set(set_desc, desc, _DESC_AUX_LD, ctypes.c_int64(m))
            self._set(set_desc, desc, _DESC_AUX_POINTER, ctypes.c_void_p(256))
        layouts = []
        a_shape = (k, m) if trans_a == _OP_T else (m, k)
        b_shape = (n, k) if trans_b == _OP_T else (k, n)
        for (rows, cols), ld in ((a_shape, lda), (b_shape, ldb), ((m, n), m)):
            lay = ctypes.c_void_p()
            self._check(lib.cublasLtMatrixLayoutCreate(ctypes.byref(lay), dtype, rows, cols, ld), "LayoutCreate")
            layouts.append(lay)
        pref = ctypes.c_void_p()
        self._check(lib.cublasLtMatmulPreferenceCreate(ctypes.byref(pref)), "PreferenceCreate")
        self._set(lib.cublasLtMatmulPreferenceSetAttribute, pref, _PREF_MAX_WORKSPACE_BYTES,
                  ctypes.c_uint64(_WORKSPACE_BYTES))
        results = (_HeuristicResult * _CANDIDATES)()
        count = ctypes.c_int(0)
        a_lay, b_lay, d_lay = layouts
        self._check(lib.cublasLtMatmulAlgoGetHeuristic(h, desc, a_lay, b_lay, d_lay, d_lay, pref, _CANDIDATES,
                                                       results, ctypes.byref(count)), "AlgoGetHeuristic")
        if count.value <= algo_index:
            raise RuntimeError(f"cuBLASLt has no algorithm {algo_index} for epilogue {epilogue} at m={m} n={n} "
                               f"k={k} (found {count.value})")
        res = results[algo_index]
        plan = (desc, a_lay, b_lay, d_lay, ctypes.byref(res.algo), res.algo, int(res.workspace_size), epilogue,
                count.value, algo_index)
        self.plans[key] = plan
        return plan

    def fastest_plan(self, key: tuple, run) -> tuple:
        """The plan for ``key`` (``plan``'s arguments) whose algorithm ran fastest among the heuristic's candidates,
        timed once per shape (``_time_candidates``) with ``run(plan)`` on the real operands (the heuristic's first
        choice was up to 13% slower than another candidate, docs/benchmarks.md, run 11). A choice restored by
        ``set_algorithm_choices`` (a resumed run) is taken as is. While a CUDA graph is being captured nothing can be
        timed: the first choice then, and tuning waits for an uncaptured call."""
        best = self.tuned.get(key)
        if best is not None:
            return best
        first = self.plan(*key)
        count, name = first[-2], _choice_name(key)
        if name in _CHOICES and _CHOICES[name] < count:
            best = self.plan(*key, algo_index=_CHOICES[name])
        elif torch.cuda.is_current_stream_capturing() or count == 1:
            return first
        else:
            best = self.plan(*key, algo_index=choose_algorithm(_time_candidates(self.runnable_plans(key, run), run)))
            _CHOICES[name] = best[-1]
        self.tuned[key] = best
        return best

    def runnable_plans(self, key: tuple, run) -> list[tuple[int, tuple]]:
        """(candidate index, plan) of each of the heuristic's candidates for ``key`` that ``run(plan)`` runs once
        without error (an algorithm that cannot run these operands is left out)."""
        runnable = []
        for i in range(self.plan(*key)[-2]):
            plan = self.plan(*key, algo_index=i)
            try:
                run(plan)
            except RuntimeError:
                continue
            runnable.append((i, plan))
        return runnable

    def matmul(self, plan: tuple, a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, bias: torch.Tensor | None = None,
               aux: torch.Tensor | None = None) -> None:
        """``D = op(A) @ op(B)`` with the plan's epilogue on torch's current stream; ``bias`` / ``aux`` as it needs."""
        desc, a_lay, b_lay, d_lay, algo_ref, _, ws_size, epilogue = plan[:8]
        lib = self.lib
        ws = torch.empty(max(ws_size, 1), dtype=torch.uint8, device=d.device)
        stream = torch.cuda.current_stream(d.device).cuda_stream
        with self.lock:
            if epilogue & _USES_BIAS:
                self._set(lib.cublasLtMatmulDescSetAttribute, desc, _DESC_BIAS_POINTER,
                          ctypes.c_void_p(bias.data_ptr()))
            if epilogue & _USES_AUX:
                self._set(lib.cublasLtMatmulDescSetAttribute, desc, _DESC_AUX_POINTER, ctypes.c_void_p(aux.data_ptr()))
            self._check(lib.cublasLtMatmul(
                self.handle(d.device), desc, ctypes.byref(self.alpha), a.data_ptr(), a_lay, b.data_ptr(), b_lay,
                ctypes.byref(self.beta), d.data_ptr(), d_lay, d.data_ptr(), d_lay, algo_ref, ws.data_ptr(), ws_size,
                stream), "Matmul")


# Tuned algorithm per GEMM problem (``_choice_name``): candidate index among the heuristic's. Saved with checkpoints
# (``algorithm_choices``): algorithms round differently, so a resumed run must use the ones it started with.
_CHOICES: dict[str, int] = {}


def _choice_name(key: tuple) -> str:
    return ",".join(str(v) for v in key[1:])  # (epilogue, dtype, m, n, k, trans_a, trans_b, lda, ldb); no device


# Timing of the candidates (``_time_candidates``). With one sweep of 3 calls per candidate, DiT-XL/2's fc1 GEMM got
# one of two algorithms 12% apart from one process to the next (0.285 / 0.325 ms, 0.7-1.1 ms per training step;
# docs/benchmarks.md, run 32): a single sweep, run at the first forward, cannot tell them apart reliably (a clock
# still ramping up or a one-off stall lands on whichever candidate runs then). Hence a warm-up, several rounds
# interleaved across the candidates, and each candidate's best round.
_TUNE_WARMUP_MS, _TUNE_ROUNDS, _TUNE_CALLS = 20.0, 5, 3


def _time_candidates(runnable: list[tuple[int, tuple]], run) -> dict[int, list[float]]:
    """Milliseconds of ``_TUNE_CALLS`` calls of ``run(plan)`` per round, for each ``(index, plan)`` of ``runnable``:
    rounds interleaved across the candidates, after about ``_TUNE_WARMUP_MS`` of the first one's calls."""
    times: dict[int, list[float]] = {i: [] for i, _ in runnable}
    if not runnable:
        return times

    def timed(plan) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(_TUNE_CALLS):
            run(plan)
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    first = runnable[0][1]
    warm = max(1, min(200, int(_TUNE_WARMUP_MS / max(timed(first), 1e-3))))  # calls of ~_TUNE_WARMUP_MS in all
    for _ in range(warm):
        timed(first)
    for _ in range(_TUNE_ROUNDS):
        for i, plan in runnable:
            times[i].append(timed(plan))
    return times


def choose_algorithm(times: dict[int, list[float]], margin: float = 0.97) -> int:
    """The candidate index to use from ``times`` (index -> timings of its rounds): the one with the fastest best
    round, if that is under ``margin`` x the heuristic's first choice's (index 0; timing noise should not flip
    choices), else 0. No timings: 0."""
    best = {i: min(ts) for i, ts in times.items() if ts}
    if not best:
        return 0
    i_best = min(best, key=best.__getitem__)
    return i_best if best[i_best] < margin * best.get(0, float("inf")) else 0


def algorithm_choices() -> dict[str, int]:
    """The algorithms chosen so far for the epilogue GEMMs (problem -> candidate index): a checkpoint's entry."""
    return dict(_CHOICES)


def set_algorithm_choices(choices: dict[str, int]) -> None:
    """Restore ``algorithm_choices()`` from a checkpoint, before the first step: the same GEMM problems then run the
    same algorithms without timing (an index this cuBLASLt does not offer is tuned again)."""
    _CHOICES.update({str(k): int(v) for k, v in choices.items()})


@functools.cache
def _cublaslt() -> _CublasLt | None:
    try:
        return _CublasLt()
    except (OSError, AttributeError, RuntimeError) as e:
        logger.warning("cuBLASLt GELU epilogues unavailable (%s): the fused MLP computes with plain torch ops", e)
        return None


def _shapes_ok(*sizes: int) -> bool:
    return all(s % 8 == 0 for s in sizes)  # 16-byte aligned rows in 2-byte types (cuBLASLt's requirement)


def gelu_epilogues_available(device: torch.device | str = "cuda") -> bool:
    """Whether ``gemm_gelu_aux`` / ``gemm_dgelu`` run as cuBLASLt epilogue GEMMs on ``device`` (else torch).

    Probes both epilogues once at a small bf16 shape (a cuBLASLt without them reports no algorithm)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return _probe(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _probe(index: int) -> bool:
    lt = _cublaslt()
    if lt is None:
        return False
    dev = torch.device("cuda", index)
    try:
        lt.plan(dev, EPILOGUE_GELU_AUX_BIAS, _R_16BF, 64, 64, 64, _OP_T, _OP_N, 64, 64)
        lt.plan(dev, EPILOGUE_DGELU, _R_16BF, 64, 64, 64, _OP_N, _OP_N, 64, 64)
    except RuntimeError as e:
        logger.warning("cuBLASLt GELU epilogues unavailable (%s): the fused MLP computes with plain torch ops", e)
        return False
    return True


def _use_cublaslt(*tensors: torch.Tensor) -> bool:
    x = tensors[0]
    return (x.is_cuda and x.dtype in _DTYPES and all(t.dtype == x.dtype and t.is_contiguous() for t in tensors)
            and gelu_epilogues_available(x.device))


@torch.library.custom_op("dit::gemm_gelu_aux", mutates_args=())
def gemm_gelu_aux(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``h = x @ weight^T + bias``, ``g = GELU_tanh(h)``; returns (g, h), both in x's dtype.

    x: (M, K); weight: (N, K); bias: (N,) -> (M, N), (M, N). On CUDA (bf16/fp16, sizes multiples of 8) one cuBLASLt
    GEMM: the bias, the GELU and both stores in its epilogue, from the fp32 accumulator.
    """
    m, k = x.shape
    n = weight.shape[0]
    if _use_cublaslt(x, weight, bias) and _shapes_ok(m, n, k):
        lt = _cublaslt()
        g, h = x.new_empty(m, n), x.new_empty(m, n)
        # row-major (M, N) = column-major (N, M): D = W (N x K, W^T of the stored column-major K x N) @ x^T (K x M)
        key = (x.device, EPILOGUE_GELU_AUX_BIAS, _DTYPES[x.dtype], n, m, k, _OP_T, _OP_N, k, k)
        lt.matmul(lt.fastest_plan(key, lambda p: lt.matmul(p, weight, x, g, bias, h)), weight, x, g, bias, h)
        return g, h
    return linear_gelu_ref(x, weight, bias)


@gemm_gelu_aux.register_fake
def _(x, weight, bias):
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], weight.shape[0])


@torch.library.custom_op("dit::gemm_dgelu", mutates_args=())
def gemm_dgelu(grad: torch.Tensor, weight: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    """The GELU's input gradient through the next linear layer, ``dh = (grad @ weight) * GELU_tanh'(pre)``, in
    grad's dtype.

    grad: (M, K) the next layer's output gradient; weight: (K, N) its weight; pre: (M, N) the saved pre-activation
    -> (M, N). On CUDA one cuBLASLt GEMM with the GELU derivative in its epilogue (``CUBLASLT_EPILOGUE_DGELU``).
    The bias gradient stays outside: cuBLASLt's ``DGELU_BGRAD`` ran its epilogue as a separate global kernel on an
    H100, 3x this GEMM's time (6x the plain GEMM's; docs/benchmarks.md, run 11).
    """
    m, k = grad.shape
    n = weight.shape[1]
    if _use_cublaslt(grad, weight, pre) and _shapes_ok(m, n, k):
        lt = _cublaslt()
        dh = grad.new_empty(m, n)
        # row-major (M, N) = column-major (N, M): D = W (stored column-major N x K) @ grad^T (K x M)
        key = (grad.device, EPILOGUE_DGELU, _DTYPES[grad.dtype], n, m, k, _OP_N, _OP_N, n, k)
        lt.matmul(lt.fastest_plan(key, lambda p: lt.matmul(p, weight, grad, dh, None, pre)), weight, grad, dh, None,
                  pre)
        return dh
    acc = _acc(grad)
    dg = grad.to(acc) @ weight.to(acc)  # (M, N)
    return torch.ops.aten.gelu_backward(dg, pre.to(acc), approximate="tanh").to(grad.dtype)  # (M, N)


@gemm_dgelu.register_fake
def _(grad, weight, pre):
    return grad.new_empty(grad.shape[0], weight.shape[1])


@register_flop_formula(torch.ops.dit.gemm_gelu_aux)
def _gemm_gelu_aux_flops(x_shape, w_shape, *args, **kwargs) -> int:
    return 2 * x_shape[0] * x_shape[1] * w_shape[0]  # (M, K) x (K, N); the epilogue is not counted


@register_flop_formula(torch.ops.dit.gemm_dgelu)
def _gemm_dgelu_flops(g_shape, w_shape, *args, **kwargs) -> int:
    return 2 * g_shape[0] * g_shape[1] * w_shape[1]  # (M, K) x (K, N)


class _FusedMlp(torch.autograd.Function):
    """``fc2(GELU_tanh(fc1(x)))`` with the GELU in fc1's GEMM (forward) and its derivative in fc2's input-gradient
    GEMM (backward); the other four GEMMs are torch's (or QuACK's, ``backend="quack"``: there the backward's GEMM
    also recomputes the GELU for fc2's weight gradient, so the forward keeps only the pre-activation), the weight
    gradients written in the weights' own dtype (``kernels.weight_grad``)."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, w1_c, w2_c, backend: str):
        """x: (M, C) in the compute dtype; w1: (F, C); b1: (F,); w2: (C, F); b2: (C,) or None in any dtype (master
        weights); w1_c, w2_c: the weights in x's dtype, or None to cast them here; backend: the GEMMs'
        (``quack_gemm.BACKENDS``) -> (M, C)."""
        w1c = w1.to(x.dtype) if w1_c is None else w1_c
        w2c = w2.to(x.dtype) if w2_c is None else w2_c
        if backend == "quack":
            g, h = quack_gemm.quack_gemm_gelu_aux(x, w1c, b1.to(x.dtype))  # (M, F) each
            ctx.save_for_backward(x, w1c, w2c, h)  # the backward's GEMM recomputes g from h
        else:
            g, h = gemm_gelu_aux(x, w1c, b1.to(x.dtype))  # (M, F) each
            ctx.save_for_backward(x, w1c, w2c, g, h)
        ctx.dtypes, ctx.backend = (w1.dtype, b1.dtype, w2.dtype, None if b2 is None else b2.dtype), backend
        return quack_gemm.linear(g, w2c, None if b2 is None else b2.to(x.dtype), backend)  # (M, C)

    @staticmethod
    def backward(ctx, dy):
        w1_dtype, b1_dtype, w2_dtype, b2_dtype = ctx.dtypes
        dy = dy.contiguous()  # (M, C)
        if ctx.backend == "quack":
            x, w1, w2, h = ctx.saved_tensors
            dh, g = quack_gemm.quack_gemm_dgelu(dy, w2, h)  # (M, F) each
        else:
            x, w1, w2, g, h = ctx.saved_tensors
            dh = gemm_dgelu(dy, w2, h)  # (M, F)
        dw2 = weight_grad(dy, g, w2_dtype)  # (C, F)
        db2 = None if b2_dtype is None else dy.sum(0, dtype=_acc(dy)).to(b2_dtype)  # (C,)
        db1 = dh.sum(0, dtype=_acc(dh)).to(b1_dtype)  # (F,)
        dw1 = weight_grad(dh, x, w1_dtype)  # (F, C)
        dx = quack_gemm.mm(dh, w1, ctx.backend)  # (M, C)
        return dx, dw1, db1, dw2, db2, None, None, None


def fused_mlp(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor | None,
              w1_c: torch.Tensor | None = None, w2_c: torch.Tensor | None = None,
              backend: str = "cublas") -> torch.Tensor:
    """``fc2(GELU_tanh(fc1(x)))`` with the GELU and its backward in GEMM epilogues (module docstring).

    x: (M, C) in the compute dtype; w1: (F, C); b1: (F,); w2: (C, F); b2: (C,) or None (left to the caller) in
    their own dtype (fp32 master weights: cast here, gradients returned in it); ``w1_c``, ``w2_c``: the weights
    already in x's dtype (copies the optimizer keeps, ``DiT.set_compute_weights``), used instead of casts
    -> (M, C). Differentiable in x and the parameters. ``backend="quack"`` runs the GELU and GELU-derivative GEMMs
    and the forward and input-gradient GEMMs on QuACK's kernels (``dit.models.quack_gemm``), the weight gradients
    still on cuBLAS.
    """
    return _FusedMlp.apply(x, w1, b1, w2, b2, w1_c, w2_c, backend)
