"""Sharding a model over the processes with torch's `fully_shard` (FSDP2) when Accelerate's FSDP plugin does not
apply.

Accelerate selects FSDP for GPU-type process groups only: under ``accelerate launch`` on CPU processes (gloo) its
FSDP config is ignored and the model is wrapped in DDP. With ``fully_shard: true`` in the run config the trainer
shards the model itself: every transformer block (the model's ``_no_split_modules``) and then the root become FSDP
modules whose parameters are `DTensor` shards, and Accelerate prepares only the data loader and the schedule.
Checkpoints and the final adapter are gathered into whole tensors with `torch.distributed.checkpoint.state_dict`
(a collective: every process calls it) and loaded back the same way, so they are the files a DDP or single-process
run writes and load anywhere.
"""

from __future__ import annotations

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

# Whole tensors, on the main process only (the others get {}), trainable parameters only.
GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
# Whole tensors read on every process and sharded on loading.
SCATTER = StateDictOptions(full_state_dict=True, strict=False)


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether `model` holds `fully_shard` (DTensor) parameters."""
    return any(isinstance(p, DTensor) for p in model.parameters())


def shard_model(model: torch.nn.Module) -> torch.nn.Module:
    """Apply `fully_shard` to every transformer block of `model` (its ``_no_split_modules``), then to `model`."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    block_names = set(getattr(base, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in block_names]
    if not blocks:
        raise ValueError(f"fully_shard: {type(base).__name__} names no transformer blocks (_no_split_modules) to "
                         "shard")
    for block in blocks:
        fully_shard(block)
    fully_shard(model)
    return model


def gathered_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters as whole tensors under their unwrapped names, on the main process ({} elsewhere)."""
    return get_model_state_dict(model, options=GATHER)


def gathered_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer state with whole tensors, keyed by parameter name, on the main process ({} elsewhere)."""
    return get_optimizer_state_dict(model, optimizer, options=GATHER)


def load_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Load whole trainable tensors (read on every process) into the shards of `model`."""
    set_model_state_dict(model, weights, options=SCATTER)


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a `gathered_optimizer_state` (read on every process) into the sharded `optimizer`."""
    set_optimizer_state_dict(model, optimizer, optim_state_dict=state, options=SCATTER)
