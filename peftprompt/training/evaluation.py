"""Evaluation inside training: the loss over an evaluation set on every process, and per-example records for
`compute_metrics`.

Each process evaluates its own contiguous part of the set (`Accelerator.split_between_processes`, no padding, so
nothing is counted twice: the collator may turn one example, a tree, into several rows, so padding-based
de-duplication would not be safe); loss sums and item counts are reduced with `Accelerator.reduce`, the records
gathered with `gather_object` in dataset order.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, send_to_device
from torch.utils.data import DataLoader, Subset

from ..metrics import accuracy
from ..recursive.collator import IGNORE_INDEX
from ..tasks import get_task
from .config import TrainConfig
from .losses import row_losses

ComputeMetrics = Callable[[list, Accelerator], dict]


def example_records(logits: torch.Tensor, labels: torch.Tensor, task: str) -> list[dict]:
    """Per-example predictions: ``{"prediction", "label"}`` (sequence classification) or ``{"predictions",
    "labels"}`` with ignored positions dropped (token classification); nothing for other tasks."""
    labels_kind = get_task(task).labels
    if labels_kind == "example" and logits.shape[-1] > 1 and not labels.dtype.is_floating_point:
        return [{"prediction": int(p), "label": int(l)} for p, l in zip(logits.argmax(-1).tolist(), labels.tolist())]
    if labels_kind == "token":
        records = []
        for row_pred, row_label in zip(logits.argmax(-1).tolist(), labels.tolist()):
            kept = [(p, l) for p, l in zip(row_pred, row_label) if l != IGNORE_INDEX]
            records.append({"predictions": [p for p, _ in kept], "labels": [l for _, l in kept]})
        return records
    return []


def default_compute_metrics(records: list[dict], accelerator: Accelerator) -> dict:
    """Accuracy for sequence classification, token accuracy for token classification, nothing otherwise."""
    if records and "prediction" in records[0]:
        return {"accuracy": accuracy([r["prediction"] for r in records], [r["label"] for r in records])}
    if records and "predictions" in records[0]:
        predictions = [p for r in records for p in r["predictions"]]
        labels = [l for r in records for l in r["labels"]]
        return {"token_accuracy": accuracy(predictions, labels) if labels else 0.0}
    return {}


def evaluate_loss(
    accelerator: Accelerator,
    model,
    eval_dataset,
    data_collator,
    config: TrainConfig,
    compute_metrics: Optional[ComputeMetrics] = None,
    split: bool = True,
) -> dict:
    """Loss (item-weighted mean over the whole set, all processes) and `compute_metrics` over `eval_dataset`.

    `compute_metrics(records, accelerator)` gets the gathered `example_records` of every process; for ``causal_lm``
    the loss and perplexity are reported. ``split=False`` (a sharded model, whose every forward needs all
    processes): each process evaluates the whole set in step with the others, and nothing is reduced.
    """
    device = accelerator.device
    indices = list(range(len(eval_dataset)))
    if split:
        with accelerator.split_between_processes(indices) as mine:
            indices = list(mine)
    loader = DataLoader(
        Subset(eval_dataset, indices),
        batch_size=config.per_device_eval_batch_size,
        shuffle=False,
        collate_fn=data_collator,
        generator=torch.Generator(),  # so building the iterator draws nothing from the global RNG
    )
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    items = torch.zeros((), dtype=torch.float64, device=device)
    records: list[dict] = []
    for batch in loader:
        batch = send_to_device(dict(batch), device)
        weights = batch.pop("loss_weights", None)
        labels = batch.pop("labels")
        with accelerator.autocast():
            logits = model(**batch).logits
        row_sum, row_items = row_losses(logits, labels, config.task, weights)
        loss_sum += row_sum.sum().double()
        items += row_items.sum().double()
        records += example_records(logits, labels, config.task)
    totals = torch.stack([loss_sum, items])
    totals = accelerator.reduce(totals, reduction="sum") if split else totals
    loss_sum_all, items_all = (float(x) for x in totals.tolist())
    metrics: dict[str, Any] = {"loss": loss_sum_all / items_all if items_all else float("nan"), "items": items_all}
    if get_task(config.task).labels == "next_token" and items_all:
        metrics["perplexity"] = math.exp(min(metrics["loss"], 50.0))
    records = gather_object(records) if split and accelerator.num_processes > 1 else records
    metrics.update((compute_metrics or default_compute_metrics)(records, accelerator))
    return metrics
