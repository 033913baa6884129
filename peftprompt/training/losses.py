"""Losses of the training engine: summed loss and item count per micro-batch, the same definition at evaluation.

The engine normalises by the number of loss items over the whole accumulation window on all processes (see
`peftprompt.training.trainer`), so each micro-batch returns its summed loss and its item count:

- `count_loss_items`: next-token labels (causal LM; the weight sum with ``loss_weights``), token labels (token
  classification), examples (sequence classification).
- `row_losses`: per-row summed loss and item count, float32 maths (evaluation uses it directly).
- `training_loss`: one micro-batch's (summed loss, items, non-pad input tokens); for a causal LM that supports it
  (`supports_kept_logits`) the logits are computed at the trained positions only.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Optional

import torch

from ..methods.prompt_learning import adds_virtual_tokens, base_forward_parameter
from ..recursive.collator import IGNORE_INDEX
from ..tasks import get_task


def count_loss_items(labels: torch.Tensor, task: str, loss_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """How many items the model's mean loss averages over: next-token labels (causal LM; the weight sum with
    `loss_weights`), token labels (token classification), examples (sequence classification)."""
    labels_kind = get_task(task).labels
    if labels_kind == "next_token":
        mask = labels[:, 1:] != IGNORE_INDEX
        if loss_weights is not None:
            return (loss_weights[:, 1:].to(torch.float64) * mask).sum()
        return mask.sum().to(torch.float64)
    if labels_kind == "token":
        return (labels != IGNORE_INDEX).sum().to(torch.float64)
    return torch.tensor(float(labels.shape[0]), dtype=torch.float64, device=labels.device)


def row_losses(
    logits: torch.Tensor, labels: torch.Tensor, task: str, loss_weights: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row summed loss and item count (float32 maths), the same definition as the training loss."""
    labels_kind = get_task(task).labels
    if labels_kind in ("next_token", "token"):
        if logits.shape[1] > labels.shape[1]:  # prompt learning on a causal LM prepends virtual-token logits
            logits = logits[:, -labels.shape[1] :]
        if labels_kind == "next_token":
            logits, labels = logits[:, :-1], labels[:, 1:]
            loss_weights = loss_weights[:, 1:] if loss_weights is not None else None
        ce = torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]),
            labels.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="none",
        ).view(labels.shape)
        weights = (labels != IGNORE_INDEX).float()
        if loss_weights is not None:
            weights = weights * loss_weights.float()
        return (ce * weights).sum(1), weights.sum(1)
    logits = logits.float()
    if logits.shape[-1] == 1:  # regression head
        loss = (logits.squeeze(-1) - labels.float()) ** 2
    elif labels.dtype.is_floating_point:  # multi-label
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels.float(), reduction="none").mean(-1)
    else:
        loss = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    return loss, torch.ones_like(loss)


def supports_kept_logits(model, task: str) -> bool:
    """Whether `model` can compute causal-LM logits at chosen positions only: its forward takes a tensor
    ``logits_to_keep`` (transformers' ``slice_logits_to_keep``, which reads a boolean ``[batch, length]`` mask:
    Llama, Mistral, Qwen, GPT-2, ... in transformers >= 5), bare or under an adapter that does not prepend virtual
    tokens (not prefix / prompt tuning). Read from the forward's signature; `kept_logits_loss` checks the shape it
    gets back. (A probe forward is no option: one eval-mode forward changes a bitsandbytes 4-bit model, which then
    stopped learning.)"""
    if get_task(task).labels != "next_token":
        return False
    if adds_virtual_tokens(model):
        return False
    parameter = base_forward_parameter(model, "logits_to_keep")
    return parameter is not None and "Tensor" in str(parameter.annotation)


def trained_positions(labels: torch.Tensor) -> torch.Tensor:
    """Boolean ``[batch, length]`` mask of the positions whose logits predict a trained token (``labels[:, t + 1]``
    set): each row keeps its own positions, so packed rows with trained spans in different places cost nothing."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return keep


def kept_logits_loss(model, batch: dict, labels: torch.Tensor, weights: Optional[torch.Tensor]) -> torch.Tensor:
    """The summed loss from logits at the trained positions only: the lm-head matmul and the softmax over the
    vocabulary skip every prompt, padding and packed-in context position. Same loss as the full path."""
    keep = trained_positions(labels)
    logits = model(**batch, logits_to_keep=keep).logits  # [trained positions, vocab], in the order of:
    if logits.dim() != 2 or logits.shape[0] != int(keep.sum()):
        raise RuntimeError(
            f"{type(model).__name__} returned logits of shape {tuple(logits.shape)} for a boolean logits_to_keep mask "
            f"of {int(keep.sum())} positions: its forward does not slice with transformers' slice_logits_to_keep"
        )
    targets = labels[:, 1:][keep[:, :-1]]
    kept_weights = weights[:, 1:][keep[:, :-1]][None] if weights is not None else None
    # `row_losses` without the causal shift (its token-classification branch), on one row of the kept positions
    row_sum, _ = row_losses(logits[None], targets[None], "token_cls", kept_weights)
    return row_sum.sum()


@contextmanager
def input_casts_skipped(layers: list[torch.nn.Module]):
    """Switch off PEFT's input-dtype cast (``cast_input_dtype_enabled``) of `layers` for the duration."""
    for layer in layers:
        layer.cast_input_dtype_enabled = False
    try:
        yield
    finally:
        for layer in layers:
            layer.cast_input_dtype_enabled = True


def training_loss(
    model, batch: dict, task: str, kept_logits: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(summed loss, loss items, non-pad input tokens) of one micro-batch; with `kept_logits` (causal LM) the logits
    are computed at trained positions only (`supports_kept_logits`)."""
    batch = dict(batch)
    weights = batch.pop("loss_weights", None)
    labels = batch.get("labels")
    if labels is None:
        raise ValueError(f"training batches need 'labels' (the collator gave {sorted(batch)})")
    mask = batch.get("attention_mask")
    tokens = mask.sum() if mask is not None else torch.tensor(batch["input_ids"].numel(), device=labels.device)
    if weights is not None and get_task(task).labels != "next_token":
        raise ValueError(f"loss_weights are supported for task causal_lm only, not {task!r}")
    if kept_logits:
        del batch["labels"]
        return kept_logits_loss(model, batch, labels, weights), count_loss_items(labels, task, weights), tokens
    if weights is not None:
        del batch["labels"]
        logits = model(**batch).logits
        row_sum, row_items = row_losses(logits, labels, task, weights)
        return row_sum.sum(), row_items.sum().to(torch.float64), tokens
    outputs = model(**batch)
    items = count_loss_items(labels, task)
    if items.item() == 0:  # the model's mean over nothing is NaN; keep the graph, add nothing
        return outputs.logits.sum() * 0.0, items, tokens
    return outputs.loss * items.to(outputs.loss.dtype), items, tokens
