"""FSDP2 sharding for the trainer (``train.fsdp``): parameters, gradients and optimizer state split across processes.

Why: with DDP every GPU holds the whole fp32 model, its gradients and two Adam moments (16 bytes per parameter);
FSDP2 (``torch.distributed.fsdp.fully_shard``) keeps 1/N of each on every one of N processes and all-gathers one
block's weights at a time for its forward and backward. The trainer uses PyTorch's API directly (not Accelerate's
FSDP plugin) because it keeps its own EMA and its own checkpoint format.

Contract with ``dit.train``:
- weights are loaded into the plain module *before* :func:`shard_model` (a checkpoint holds full tensors);
- after sharding, parameters are ``DTensor`` shards (``Shard(0)``, torch.chunk sizes) on a 1-D mesh of all
  processes; the EMA module is sharded the same way, so model and EMA local shards line up element for element;
- checkpoints hold the same full, unsharded state dicts as a non-FSDP run (:func:`gather_model_state_dict`,
  :func:`gather_optimizer_state_dict`); the gathers are collectives: every rank calls them, rank 0 gets the result.
"""

from __future__ import annotations

from itertools import chain
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

# Full tensors, on the CPU, on rank 0 only (the other ranks get {}): a checkpoint of the largest models then never
# needs a second full copy in GPU memory, and only the writer pays the host memory.
_FULL_ON_RANK0 = StateDictOptions(full_state_dict=True, cpu_offload=True)


def shard_units(module: nn.Module) -> list[nn.Module]:
    """The submodules sharded as separate FSDP units: each element of every ``nn.ModuleList`` directly under the root
    (DiT: ``blocks``; UNet: ``input_blocks``, ``output_blocks``). A list subclass with its own ``forward`` (the
    UNet's ``middle_block``, a ``CondSequential``) is called as one stage, so it is one unit."""
    units: list[nn.Module] = []
    for child in module.children():
        if isinstance(child, nn.ModuleList):
            units += list(child) if type(child).forward is nn.ModuleList.forward else [child]
    return units


def shard_model(module: nn.Module, *, mp_dtype: torch.dtype | None = None, mesh: Any = None) -> nn.Module:
    """Apply ``fully_shard`` to every :func:`shard_units` unit, then to the root (embedders, final layer); in place.

    A unit's weights are all-gathered just before its forward and freed after it (and again for its backward), so
    peak memory is the shards plus about one block's full weights. ``mp_dtype=torch.bfloat16`` (train.mixed_precision
    =bf16) all-gathers and computes with bf16 copies of the weights (half the traffic and unsharded memory; autocast
    runs the matmuls in bf16 anyway), reduce-scatters gradients in fp32 (a bf16 sum over many ranks loses bits) and
    casts the root's output to fp32 (as Accelerate does for autocast models), while the sharded master weights,
    gradients and optimizer state stay fp32. ``None``: everything fp32. ``mesh``: a 1-D DeviceMesh (default: all
    processes of the default group, on the module's device type). Returns ``module`` (now also an ``FSDPModule``).
    """
    unit_policy = root_policy = MixedPrecisionPolicy()
    if mp_dtype is not None:
        unit_policy = MixedPrecisionPolicy(param_dtype=mp_dtype, reduce_dtype=torch.float32)
        # fp32 output for the root only: a unit's output feeds the next unit or the root's own layers in mp_dtype
        # (an fp32 activation would meet bf16 weights, e.g. in the UNet's final GroupNorm).
        root_policy = MixedPrecisionPolicy(param_dtype=mp_dtype, reduce_dtype=torch.float32,
                                           output_dtype=torch.float32)
    for unit in shard_units(module):
        fully_shard(unit, mesh=mesh, mp_policy=unit_policy)
    fully_shard(module, mesh=mesh, mp_policy=root_policy)
    return module


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a DTensor (collective if it is sharded or partial: call on every rank), or ``t``."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def gather_model_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Full fp32 state dict of a sharded module, with the keys of the unsharded module's ``state_dict()``.

    Collective: call on every rank. Rank 0 gets full CPU tensors, the other ranks ``{}``."""
    return get_model_state_dict(module, options=_FULL_ON_RANK0)


def _param_names(module: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the optimizer's order: position i is id i of ``optimizer.state_dict()``."""
    names = {id(p): n for n, p in module.named_parameters()}
    return [names[id(p)] for p in chain.from_iterable(g["params"] for g in optimizer.param_groups)]


def gather_optimizer_state_dict(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Full optimizer state dict in the format of ``optimizer.state_dict()`` of an unsharded run (state keyed by
    parameter index, full tensors), so a checkpoint resumes with or without FSDP.

    torch's full optimizer state dict keys parameters by name; they are mapped back to indices here. Collective:
    call on every rank. Rank 0 gets CPU tensors, the other ranks ``{}``."""
    osd = get_optimizer_state_dict(module, optimizer, options=_FULL_ON_RANK0)
    if not osd:
        return {}
    index = {n: i for i, n in enumerate(_param_names(module, optimizer))}
    return {"state": {index[n]: v for n, v in osd["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in osd["param_groups"]]}


def load_optimizer_state_dict(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a full, index-keyed optimizer state dict (``optimizer.state_dict()`` of any run, sharded or not) into an
    optimizer over FSDP-sharded parameters.

    Every rank has read the whole checkpoint, so each keeps its own shard of every parameter-shaped tensor
    (``distribute_tensor(..., src_data_rank=None)``: local slicing, no communication, the same torch.chunk split as
    the parameter); step counters and hyperparameters load as they are."""
    params = list(chain.from_iterable(g["params"] for g in optimizer.param_groups))
    sharded = {"state": {i: {k: _shard_like(v, params[int(i)]) for k, v in st.items()}
                         for i, st in state["state"].items()},
               "param_groups": state["param_groups"]}
    optimizer.load_state_dict(sharded)


def _shard_like(value: Any, param: torch.Tensor) -> Any:
    """``value`` as a DTensor sharded like ``param`` when it is a full tensor of the parameter's shape (not a 0-d
    step counter)."""
    if not (isinstance(param, DTensor) and isinstance(value, torch.Tensor) and value.dim() > 0
            and value.shape == param.shape):
        return value
    return distribute_tensor(value.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
