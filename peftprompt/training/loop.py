"""The training engine: one `train()` on Accelerate for every recipe (classification, NER, self-ask SFT).

```py
config = load_config("recipes/configs/smollm2/selfask_lora.yaml", sys.argv[1:])
model, tokenizer = build_model(config)                 # load_backbone + prepare_backbone + attach
result = train(config, model, tokenizer, train_trees, SelfAskCollator(tokenizer, packing=True), eval_trees)
```

What Accelerate does here, and what was measured (accelerate 1.15, torch 2.13 CPU, 2 cores):

- ``Accelerator(cpu=not torch.cuda.is_available())``. ``cpu=True`` does NOT force a single process: under a
  launcher that starts several processes (``LOCAL_RANK`` set) it selects ``MULTI_CPU`` with the gloo backend, and
  the world size is 2 for 2 processes. It is ``cpu=False`` that breaks on a CPU-only machine: ``LOCAL_RANK`` is
  set, no accelerator is found, and each process silently becomes a world of 1 (``DistributedType.NO``), training
  the same thing twice. Measured, with a script printing ``num_processes``:

  | launch (2 processes asked for)                                            | cpu=False | cpu=True |
  |---------------------------------------------------------------------------|-----------|----------|
  | ``accelerate launch --multi_gpu --num_processes 2``                        | 2 x ws 1  | ws 2     |
  | same with ``ACCELERATE_USE_CPU=1`` in the environment                      | ws 2      | ws 2     |
  | config ``distributed_type: MULTI_GPU``, ``use_cpu: true``, 2 processes     | 2 x ws 1  | ws 2     |
  | config ``distributed_type: MULTI_CPU``, ``use_cpu: true``, 2 processes     | 1 process | 1 process|
  | ``accelerate launch --cpu --num_processes 2``                              | 1 process | 1 process|

  A ``MULTI_CPU`` config starts ONE process: accelerate's ``simple_launcher`` only fans out through ``mpirun``
  (``mpirun_hostfile``); without it the script runs once, with ``MASTER_ADDR`` set. `train` warns when it sees
  that combination. For 2 CPU processes use a config with ``distributed_type: MULTI_GPU`` and ``use_cpu: true``
  (or ``--multi_gpu --num_processes 2``), and read the world size from the log (``metrics.jsonl``'s ``start``).
- The loss is normalised by the number of loss items (trained tokens for ``causal_lm`` / ``token_cls``, with
  ``loss_weights`` their weight sum; examples for ``seq_cls``) over the whole accumulation window on all
  processes, as `transformers.Trainer` does with ``num_items_in_batch``: each micro-batch back-propagates its
  summed loss and, when gradients sync, they are scaled by ``accumulation steps x world size / items``. So
  gradient accumulation 2 x batch 2 gives the update of batch 4 even when the micro-batches hold different numbers
  of tokens (the mean of per-micro-batch means would not).
- Data order is a function of (seed, epoch) only (``use_seedable_sampler``); checkpoints hold the trainable
  parameters (a save-state hook drops the frozen backbone), optimizer, scheduler and RNG states; resuming skips the
  batches already seen in the current epoch with `Accelerator.skip_first_batches`. 6 steps straight and 3 steps +
  resume to 6 give bit-identical parameters (tests/test_training.py).
- Evaluation splits the evaluation set between processes without padding
  (`Accelerator.split_between_processes`), sums loss and item counts with `Accelerator.reduce` and gathers the
  per-example records with `gather_object`, so nothing is counted twice (the collator may turn one example, a
  tree, into several rows, so padding-based de-duplication would not be safe).
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import re
import resource
import shlex
import shutil
import sys
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import (
    DataLoaderConfiguration,
    broadcast_object_list,
    extract_model_from_parallel,
    gather_object,
    send_to_device,
    set_seed,
)
from peft.utils.other import cast_mixed_precision_params
from safetensors import safe_open
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm
from transformers import get_scheduler

from ..adapters import directory_bytes, save_adapter
from ..atomic import write_dir_atomically
from ..backbones import load_backbone
from ..methods import attach
from ..recursive.collator import IGNORE_INDEX
from ..report import ParameterReport, count_parameters
from .config import TrainConfig, resolve_frozen_dtype, resolve_mixed_precision

logger = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.json"
CHECKPOINTS = "checkpoints"
CHECKPOINT_RE = re.compile(r"^step-(\d+)$")
METRICS_FILE = "metrics.jsonl"
ADAPTER_DIR = "adapter"
CONFIG_FILE = "train_config.yaml"
MODEL_WEIGHTS = "model.safetensors"

ComputeMetrics = Callable[[list, Accelerator], dict]
EvaluateFn = Callable[[Any, Accelerator], dict]


@dataclass
class TrainResult:
    """What a run produced; the model card (`parameters`, `metrics`, `command`, `config`) is built from it."""

    global_step: int
    epoch: float
    metrics: dict  # final evaluation metrics ({} when there was nothing to evaluate)
    best_metric: Optional[float]
    best_step: Optional[int]
    adapter_dir: Path
    log_file: Path
    config: Optional[TrainConfig] = None
    parameters: Optional[ParameterReport] = None  # trainable / total params and the saved adapter's bytes
    command: str = ""  # shlex.join(sys.orig_argv)
    metric_for_best: str = "loss"
    world_size: int = 1
    mixed_precision: str = "no"
    mixed_precision_reason: str = ""
    stopped_early: bool = False
    resumed_from: Optional[str] = None
    train_seconds: float = 0.0
    peak_memory_mb: Optional[float] = None  # the largest over the processes (peak RSS on a CPU, CUDA max allocated)
    eval_history: list = field(default_factory=list)

    def as_dict(self) -> dict:
        out = asdict(self)
        out.update(
            adapter_dir=str(self.adapter_dir),
            log_file=str(self.log_file),
            config=self.config.as_dict() if self.config is not None else None,
            parameters=self.parameters.as_dict() if self.parameters is not None else None,
        )
        return out


# ----------------------------------------------------------------------------------------------------- model setup
def distributed_state() -> PartialState:
    """The process layout, created the way `train` creates it (``cpu=True`` without CUDA; see the module doc).

    Recipes that need the process index before `train` (to print once, or to build data on the main process
    first) should use this rather than a bare ``PartialState()``: on a CPU-only machine that one would make every
    launched process a world of 1.
    """
    return PartialState(cpu=not torch.cuda.is_available())


def prepare_backbone(model, config: TrainConfig):
    """Get a loaded backbone ready for adapter training: k-bit preparation and gradient checkpointing.

    Call it before `attach`. A quantised (8-bit / 4-bit) backbone goes through PEFT's
    ``prepare_model_for_kbit_training``; gradient checkpointing uses the non-reentrant implementation (it works
    with frozen inputs). Prefix tuning refuses gradient checkpointing: `attach` raises the ValueError that says so.
    The KV cache is switched off by `train` itself while it trains (packed rows need that).
    """
    quantised = config.load_in_8bit or config.load_in_4bit or getattr(model, "is_loaded_in_8bit", False) or getattr(
        model, "is_loaded_in_4bit", False
    )
    checkpointing_kwargs = {"use_reentrant": False}
    if quantised:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=config.gradient_checkpointing,
            gradient_checkpointing_kwargs=checkpointing_kwargs,
        )
    elif config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing_kwargs)
    return model


def build_model(config: TrainConfig):
    """`load_backbone` + `prepare_backbone` + `attach` as the config says; returns ``(model, tokenizer)``.

    Seeds the RNGs with ``config.seed`` first, so the new head and adapter weights repeat from run to run. With
    ``frozen_dtype`` bfloat16 / float16 (or ``auto`` under bf16 / fp16 mixed precision; see `resolve_frozen_dtype`)
    the backbone is loaded in that dtype and stays there while the trainable parameters (adapter, new head) are
    float32, as PEFT's ``cast_mixed_precision_params`` leaves them: half the memory of the frozen weights, and no
    float32 -> half cast of every weight at every step under mixed precision.
    """
    set_seed(config.seed)
    frozen_dtype = resolve_frozen_dtype(config)
    model, tokenizer = load_backbone(
        config.model,
        task=config.task,
        num_labels=config.num_labels,
        load_in_8bit=config.load_in_8bit,
        load_in_4bit=config.load_in_4bit,
        dtype=frozen_dtype,
    )
    model = prepare_backbone(model, config)
    model = attach(model, config.method, task=config.task, **config.method_args)
    if frozen_dtype != torch.float32:
        cast_mixed_precision_params(model, frozen_dtype)
    return model, tokenizer


def make_optimizer(config: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW (or bitsandbytes' AdamW8bit) over the trainable parameters only; no weight decay on 1-d tensors
    (biases, norms, BitFit deltas, IA3 vectors)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the model has no trainable parameters: attach an adapter (or method 'full') first")
    decay = [p for _, p in named if p.ndim >= 2]
    no_decay = [p for _, p in named if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [group for group in groups if group["params"]]
    if config.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, lr=config.learning_rate)
    # torch's fused kernel (CPU and CUDA) updates every tensor in one pass instead of a Python loop over them
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for _, p in named)
    return torch.optim.AdamW(groups, lr=config.learning_rate, fused=fused)


# ------------------------------------------------------------------------------------------------------------ losses
def count_loss_items(labels: torch.Tensor, task: str, loss_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """How many items the model's mean loss averages over: next-token labels (causal LM; the weight sum with
    `loss_weights`), token labels (token classification), examples (sequence classification)."""
    if task == "causal_lm":
        mask = labels[:, 1:] != IGNORE_INDEX
        if loss_weights is not None:
            return (loss_weights[:, 1:].to(torch.float64) * mask).sum()
        return mask.sum().to(torch.float64)
    if task == "token_cls":
        return (labels != IGNORE_INDEX).sum().to(torch.float64)
    return torch.tensor(float(labels.shape[0]), dtype=torch.float64, device=labels.device)


def row_losses(
    logits: torch.Tensor, labels: torch.Tensor, task: str, loss_weights: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row summed loss and item count (float32 maths), the same definition as the training loss."""
    if task in ("causal_lm", "token_cls"):
        if logits.shape[1] > labels.shape[1]:  # prompt learning on a causal LM prepends virtual-token logits
            logits = logits[:, -labels.shape[1] :]
        if task == "causal_lm":
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


def trains_only_kept_logits(model, task: str) -> bool:
    """Whether `model` can compute causal-LM logits at chosen positions only: a boolean ``logits_to_keep`` mask.

    True for causal LMs whose forward slices its hidden states with transformers' ``slice_logits_to_keep`` (Llama,
    Mistral, Qwen, GPT-2, ... in transformers >= 5), bare or under a PEFT adapter that does not prepend virtual
    tokens (not prefix / prompt tuning)."""
    if task != "causal_lm":
        return False
    peft_config = getattr(model, "active_peft_config", None)
    if peft_config is not None and peft_config.is_prompt_learning:
        return False
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if "logits_to_keep" not in inspect.signature(base.forward).parameters:
        return False
    try:
        return "slice_logits_to_keep(" in inspect.getsource(type(base).forward)
    except (OSError, TypeError):
        return False


def trained_positions(labels: torch.Tensor) -> torch.Tensor:
    """Boolean ``[batch, length]`` mask of the positions whose logits predict a trained token (``labels[:, t + 1]``
    set): each row keeps its own positions, so packed rows with trained spans in different places cost nothing."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return keep


def _kept_logits_loss(model, batch: dict, labels: torch.Tensor, weights: Optional[torch.Tensor]) -> torch.Tensor:
    """The summed loss from logits at the trained positions only: the lm-head matmul and the softmax over the
    vocabulary skip every prompt, padding and packed-in context position. Same loss as the full path."""
    keep = trained_positions(labels)
    logits = model(**batch, logits_to_keep=keep).logits  # [trained positions, vocab], in the order of:
    targets = labels[:, 1:][keep[:, :-1]]
    kept_weights = weights[:, 1:][keep[:, :-1]][None] if weights is not None else None
    # `row_losses` without the causal shift (its token-classification branch), on one row of the kept positions
    row_sum, _ = row_losses(logits[None], targets[None], "token_cls", kept_weights)
    return row_sum.sum()


@contextmanager
def _input_casts_skipped(layers: list[torch.nn.Module]):
    """Switch off PEFT's input-dtype cast (``cast_input_dtype_enabled``) of `layers` for the duration."""
    for layer in layers:
        layer.cast_input_dtype_enabled = False
    try:
        yield
    finally:
        for layer in layers:
            layer.cast_input_dtype_enabled = True


def _training_loss(
    model, batch: dict, task: str, kept_logits: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(summed loss, loss items, non-pad input tokens) of one micro-batch; with `kept_logits` (causal LM) the logits
    are computed at trained positions only (`trains_only_kept_logits`)."""
    batch = dict(batch)
    weights = batch.pop("loss_weights", None)
    labels = batch.get("labels")
    if labels is None:
        raise ValueError(f"training batches need 'labels' (the collator gave {sorted(batch)})")
    mask = batch.get("attention_mask")
    tokens = mask.sum() if mask is not None else torch.tensor(batch["input_ids"].numel(), device=labels.device)
    if weights is not None and task != "causal_lm":
        raise ValueError(f"loss_weights are supported for task causal_lm only, not {task!r}")
    if kept_logits:
        del batch["labels"]
        return _kept_logits_loss(model, batch, labels, weights), count_loss_items(labels, task, weights), tokens
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


# -------------------------------------------------------------------------------------------------------- evaluation
def _default_records(logits: torch.Tensor, labels: torch.Tensor, task: str) -> list[dict]:
    if task == "seq_cls" and logits.shape[-1] > 1 and not labels.dtype.is_floating_point:
        return [{"prediction": int(p), "label": int(l)} for p, l in zip(logits.argmax(-1).tolist(), labels.tolist())]
    if task == "token_cls":
        predictions = logits.argmax(-1)
        records = []
        for row_pred, row_label in zip(predictions.tolist(), labels.tolist()):
            kept = [(p, l) for p, l in zip(row_pred, row_label) if l != IGNORE_INDEX]
            records.append({"predictions": [p for p, _ in kept], "labels": [l for _, l in kept]})
        return records
    return []


def default_compute_metrics(records: list[dict], accelerator: Accelerator) -> dict:
    """Accuracy for sequence classification, token accuracy for token classification, nothing otherwise."""
    if records and "prediction" in records[0]:
        return {"accuracy": sum(r["prediction"] == r["label"] for r in records) / len(records)}
    if records and "predictions" in records[0]:
        pairs = [(p, l) for r in records for p, l in zip(r["predictions"], r["labels"])]
        return {"token_accuracy": sum(p == l for p, l in pairs) / max(len(pairs), 1)}
    return {}


def evaluate_loss(
    accelerator: Accelerator,
    model,
    eval_dataset,
    data_collator,
    config: TrainConfig,
    compute_metrics: Optional[ComputeMetrics] = None,
) -> dict:
    """Loss (item-weighted mean over the whole set, all processes) and `compute_metrics` over `eval_dataset`.

    Each process evaluates its own contiguous part of the set (no padding, so nothing is counted twice); sums are
    reduced and per-example records gathered in dataset order. `compute_metrics(records, accelerator)` gets, for
    ``seq_cls``, ``{"prediction", "label"}`` per example; for ``token_cls``, ``{"predictions", "labels"}`` per row
    with ignored positions dropped; for ``causal_lm`` nothing (the loss and perplexity are reported).
    """
    device = accelerator.device
    with accelerator.split_between_processes(list(range(len(eval_dataset)))) as mine:
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
        records += _default_records(logits, labels, config.task)
    totals = accelerator.reduce(torch.stack([loss_sum, items]), reduction="sum")
    loss_sum_all, items_all = (float(x) for x in totals.tolist())
    metrics: dict[str, Any] = {"loss": loss_sum_all / items_all if items_all else float("nan"), "items": items_all}
    if config.task == "causal_lm" and items_all:
        metrics["perplexity"] = math.exp(min(metrics["loss"], 50.0))
    records = gather_object(records) if accelerator.num_processes > 1 else records
    metrics.update((compute_metrics or default_compute_metrics)(records, accelerator))
    return metrics


# ------------------------------------------------------------------------------------------------------- checkpoints
def list_checkpoints(output_dir: Path | str) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``output_dir/checkpoints`` as ``(step, path)``, oldest first.

    A checkpoint is complete when its directory has been renamed into place (temporary directories start with a
    dot) and holds ``trainer_state.json``.
    """
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = CHECKPOINT_RE.match(path.name)
        if match and path.is_dir() and (path / TRAINER_STATE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(output_dir: Path | str) -> Optional[Path]:
    """The newest complete checkpoint under ``output_dir/checkpoints``, or None."""
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1][1] if checkpoints else None


def trainable_state_dict(model) -> "OrderedDict[str, torch.Tensor]":
    """The trainable parameters of `model` under their unwrapped names (no DDP ``module.`` prefix)."""
    inner = extract_model_from_parallel(model)
    return OrderedDict((name, p.detach()) for name, p in inner.named_parameters() if p.requires_grad)


def _keep_trainable_weights(models, weights, output_dir) -> None:
    """save_state hook: save only the trainable parameters, under unwrapped names, so a checkpoint is small (the
    frozen backbone is reloaded from its source) and loads whatever the number of processes."""
    for i, model in enumerate(models):
        weights[i] = trainable_state_dict(model)


def _save_checkpoint(accelerator: Accelerator, target: Path, trainer_state: dict) -> None:
    """`Accelerator.save_state` into a temporary directory on every process, renamed to `target` by the main one.

    The main process runs `write_dir_atomically` and broadcasts the temporary directory's name so the other
    processes write their RNG states into the same place; an error before the rename leaves earlier
    checkpoints untouched and no ``step-N`` directory behind.
    """

    def write(tmp: Path) -> None:
        broadcast_object_list([str(tmp)])
        accelerator.save_state(str(tmp))
        (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2))
        accelerator.wait_for_everyone()

    if accelerator.is_main_process:
        write_dir_atomically(target, write)
    else:
        shared = [None]
        broadcast_object_list(shared)
        accelerator.save_state(shared[0])
        accelerator.wait_for_everyone()
    accelerator.wait_for_everyone()


def _prune_checkpoints(output_dir: Path, keep: int) -> None:
    if keep <= 0:
        return
    for _, path in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def _load_trainable_weights(path: Path, model) -> None:
    """Load a checkpoint's trainable parameters into `model`, refusing a checkpoint of another model or method."""
    weights = path / MODEL_WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"checkpoint {path} is incomplete: {MODEL_WEIGHTS} is missing")
    expected = trainable_state_dict(model)
    with safe_open(weights, framework="pt") as f:
        saved = set(f.keys())
        if saved != set(expected):
            missing, extra = sorted(set(expected) - saved), sorted(saved - set(expected))
            raise ValueError(
                f"checkpoint {path} does not match the model's trainable parameters "
                f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected {extra[:3]}"
                f"{'...' if len(extra) > 3 else ''}): was it written with another method or model?"
            )
        with torch.no_grad():
            for name, tensor in expected.items():
                tensor.copy_(f.get_tensor(name))


def _sync_lr_with_schedule(scheduler) -> None:
    """Set the learning rates to this run's schedule at the restored step. The optimizer state brings back the
    rates of the interrupted run, which differ when the schedule changed (a longer ``max_steps`` to continue a
    finished run would otherwise take its first step at the old schedule's final rate of 0)."""
    inner = getattr(scheduler, "scheduler", scheduler)
    if isinstance(inner, torch.optim.lr_scheduler.LambdaLR):
        lrs = [base * fn(inner.last_epoch) for base, fn in zip(inner.base_lrs, inner.lr_lambdas)]
        for group, lr in zip(inner.optimizer.param_groups, lrs):
            group["lr"] = lr
        inner._last_lr = lrs


def _resume_dir(config: TrainConfig, output_dir: Path) -> Optional[Path]:
    if config.resume_from is None:
        existing = list_checkpoints(output_dir)
        if existing:
            raise ValueError(
                f"{output_dir} already holds checkpoints of an earlier run (newest {existing[-1][1].name}): pass "
                "resume_from=latest to continue it, or choose another output_dir"
            )
        return None
    if config.resume_from == "latest":
        return latest_checkpoint(output_dir)
    path = Path(config.resume_from)
    if not (path / TRAINER_STATE).is_file():
        raise FileNotFoundError(
            f"resume_from={config.resume_from!r}: {path} is not a complete checkpoint ({TRAINER_STATE} missing)"
        )
    return path


# --------------------------------------------------------------------------------------------------------- utilities
class _RunLog:
    """Log lines on the main process (through tqdm so the bar stays intact) and JSON records in metrics.jsonl."""

    def __init__(self, accelerator: Accelerator, path: Path, fresh: bool) -> None:
        self.main = accelerator.is_main_process
        self.path = path
        self.progress: Optional[tqdm] = None
        if self.main:
            path.parent.mkdir(parents=True, exist_ok=True)
            if fresh and path.exists():
                path.unlink()

    def info(self, message: str) -> None:
        if not self.main:
            return
        logger.info(message)
        if self.progress is not None:
            self.progress.write(message, file=sys.stdout)
        else:
            print(message, flush=True)

    def record(self, record: dict) -> None:
        if self.main:
            with self.path.open("a") as f:
                f.write(json.dumps(record, default=_json_default) + "\n")
                f.flush()


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: CUDA max allocated on a GPU, else the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def _warn_single_process_launch(accelerator: Accelerator, log: _RunLog) -> None:
    env = os.environ
    if accelerator.num_processes == 1 and "MASTER_ADDR" in env and "WORLD_SIZE" not in env and "LOCAL_RANK" not in env:
        log.info(
            "WARNING: launched with a rendezvous address (MASTER_ADDR) but this run has ONE process: accelerate's "
            "MULTI_CPU config (and --cpu) start a single process unless mpirun is used. For several CPU processes "
            "use a config with 'distributed_type: MULTI_GPU' and 'use_cpu: true', or --multi_gpu --num_processes N."
        )


def _metric(metrics: dict, name: str) -> float:
    for key in (name, name.removeprefix("eval_")):
        if key in metrics:
            return float(metrics[key])
    raise ValueError(f"metric_for_best={name!r} is not among the evaluation metrics {sorted(metrics)}")


# -------------------------------------------------------------------------------------------------------------- train
def train(
    config: TrainConfig,
    model,
    tokenizer,
    train_dataset,
    data_collator,
    eval_dataset=None,
    compute_metrics: Optional[ComputeMetrics] = None,
    evaluate_fn: Optional[EvaluateFn] = None,
    test_dataset=None,
) -> TrainResult:
    """Train `model` (already adapted with `attach`) on `train_dataset`; evaluate, checkpoint, save the adapter.

    Args:
        config: The run's `TrainConfig` (optimisation, schedule, evaluation, checkpoints, ``output_dir``).
        model: A `PeftModel` (or the plain model for method ``full``), e.g. from `build_model`.
        tokenizer: Saved with the adapter (may be None).
        train_dataset: A map-style dataset (list, `datasets.Dataset`, ...) whose items `data_collator` batches.
        data_collator: Turns a list of items into a dict of tensors with ``labels`` (``loss_weights`` optional
            for causal LM), e.g. `SelfAskCollator` or `DataCollatorWithPadding`.
        eval_dataset: Optional; its loss (and `compute_metrics`) is computed at each evaluation.
        compute_metrics: ``(records, accelerator) -> dict`` over the gathered per-example records (see
            `evaluate_loss`); default: accuracy / token accuracy.
        evaluate_fn: ``(model, accelerator) -> dict``: a recipe's own evaluation (e.g. self-ask exact match),
            called on every process with the unwrapped model in eval mode under ``torch.no_grad()``; it splits its
            work itself (``accelerator.split_between_processes``). The main process's dict is used everywhere.
        test_dataset: Optional; scored like `eval_dataset` at each evaluation, its metrics prefixed ``test_``
            (``test_accuracy``, ``test_loss``), and never used to pick the best step or stop early (tune on the
            evaluation set, report the test set).

    Writes under ``config.output_dir``: ``metrics.jsonl`` (records ``start``, ``train``, ``eval``, ``checkpoint``,
    ``resume``, ``final``), ``checkpoints/step-N`` (Accelerate state + ``trainer_state.json``),
    ``adapter/`` (`save_adapter`, with the tokenizer) and ``train_config.yaml``.

    `train` owns Accelerate's global state while it runs (it resets an `AcceleratorState` left with another mixed
    precision) and leaves the process group up for the caller.
    """
    if test_dataset is not None and eval_dataset is None:
        raise ValueError("a test_dataset is scored next to an eval_dataset (which selects the best step): pass both")
    if (config.metric_for_best or "").removeprefix("eval_").startswith("test_"):
        raise ValueError(f"metric_for_best={config.metric_for_best!r}: the test set never selects a step; watch a "
                         "metric of the evaluation set instead")
    started = time.perf_counter()
    output_dir = Path(config.output_dir)
    mixed_precision, mp_reason = resolve_mixed_precision(config.mixed_precision)
    if config.frozen_dtype in ("bfloat16", "float16") and mixed_precision == "no":
        raise ValueError(
            f"frozen_dtype {config.frozen_dtype!r} computes through autocast, but mixed precision is off "
            f"(mixed_precision={config.mixed_precision!r}: {mp_reason}): set mixed_precision bf16 or fp16, or keep "
            "frozen_dtype: float32"
        )
    if AcceleratorState._shared_state and AcceleratorState._shared_state.get("_mixed_precision") != mixed_precision:
        AcceleratorState._reset_state()
    GradientState._reset_state()  # no dataloader of an earlier run (in this process) may linger in it
    accelerator = Accelerator(
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        cpu=not torch.cuda.is_available(),
        step_scheduler_with_optimizer=False,  # one scheduler step per optimiser step, whatever the world size
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=config.seed),
    )
    world_size = accelerator.num_processes
    resume_dir = _resume_dir(config, output_dir)
    log = _RunLog(accelerator, output_dir / METRICS_FILE, fresh=resume_dir is None)
    set_seed(config.seed)

    if not hasattr(train_dataset, "__len__") or len(train_dataset) == 0:
        raise ValueError("train_dataset must be a non-empty map-style dataset (with __len__)")
    model_config = getattr(model, "config", None)
    use_cache = getattr(model_config, "use_cache", None)
    if use_cache is not None:
        model_config.use_cache = False  # packed rows need it off (README), and training never uses the cache
    model.train()
    kept_logits = trains_only_kept_logits(model, config.task)
    optimizer = make_optimizer(config, model)
    train_loader = accelerator.prepare(
        DataLoader(
            train_dataset,
            batch_size=config.per_device_train_batch_size,
            shuffle=True,
            collate_fn=data_collator,
            generator=torch.Generator().manual_seed(config.seed),
        )
    )
    gas = config.gradient_accumulation_steps
    batches_per_epoch = len(train_loader)
    steps_per_epoch = math.ceil(batches_per_epoch / gas)
    total_steps = config.max_steps or math.ceil(config.num_epochs * steps_per_epoch)
    num_epochs = math.ceil(total_steps / steps_per_epoch)
    scheduler = get_scheduler(
        config.lr_scheduler,
        optimizer,
        num_warmup_steps=math.ceil(config.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    accelerator.register_save_state_pre_hook(_keep_trainable_weights)
    trainable = [p for p in model.parameters() if p.requires_grad]
    # Under autocast PEFT's cast of each adapter layer's input to float32 is undone by the matmul's cast back to half
    # precision: training skips both copies (without dropout the matmuls see the same numbers; tested).
    castable = [m for m in model.modules() if getattr(m, "cast_input_dtype_enabled", None) is True]
    castable = castable if mixed_precision != "no" else []
    n_trainable, n_total = count_parameters(accelerator.unwrap_model(model))

    state = {
        "global_step": 0,
        "epoch": 0.0,
        "best_metric": None,
        "best_step": None,
        "evals_without_improvement": 0,
        "last_metrics": {},
        "eval_history": [],
        "world_size": world_size,
        "per_device_train_batch_size": config.per_device_train_batch_size,
        "gradient_accumulation_steps": gas,
        "total_steps": total_steps,
    }
    layout_warning = None
    if resume_dir is not None:
        # accelerate restores optimizer, scheduler, RNG and step; its own model load (strict=False) may not match
        # the unwrapped names under DDP, so the trainable weights are then loaded explicitly and checked.
        accelerator.load_state(str(resume_dir), strict=False)
        _load_trainable_weights(resume_dir, model)
        _sync_lr_with_schedule(scheduler)
        saved = json.loads((resume_dir / TRAINER_STATE).read_text())
        layout = ("world_size", "per_device_train_batch_size", "gradient_accumulation_steps")
        # Same examples per optimiser step (processes x batch x accumulation) = same data order, whatever the layout.
        if math.prod(saved.get(k, 0) for k in layout) != math.prod(state[k] for k in layout):
            layout_warning = (
                f"WARNING: resuming with {dict((k, state[k]) for k in layout)} from a checkpoint written with "
                f"{dict((k, saved.get(k)) for k in layout)}: a different number of examples per step, so the data "
                "order of the interrupted run is not reproduced"
            )
        state.update({k: v for k, v in saved.items() if k not in ("total_steps", *layout)})
    elif config.resume_from == "latest":
        log.info(f"resume_from=latest: no checkpoint under {output_dir / CHECKPOINTS}, starting from scratch")

    metric_name = config.metric_for_best or "loss"
    greater = config.greater_is_better if config.metric_for_best else False
    can_evaluate = eval_dataset is not None or evaluate_fn is not None
    if config.early_stopping_patience and not (eval_dataset is not None or config.metric_for_best):
        raise ValueError(
            "early_stopping_patience needs something to watch: pass an eval_dataset (its loss is watched) or set "
            "metric_for_best to a metric that evaluate_fn returns"
        )
    command = shlex.join(getattr(sys, "orig_argv", sys.argv))
    start_record = {
        "type": "start",
        "world_size": world_size,
        "distributed_type": str(accelerator.distributed_type).split(".")[-1],
        "device": str(accelerator.device),
        "mixed_precision": mixed_precision,
        "mixed_precision_reason": mp_reason,
        "total_steps": total_steps,
        "steps_per_epoch": steps_per_epoch,
        "trainable_params": n_trainable,
        "total_params": n_total,
        "resumed_from": str(resume_dir) if resume_dir else None,
        "global_step": state["global_step"],
        "logits_at_trained_positions_only": kept_logits,
        "command": command,
    }
    log.record(start_record)
    log.info(
        f"world size {world_size} ({start_record['distributed_type']}, {accelerator.device}); mixed precision "
        f"{mixed_precision}: {mp_reason}; {total_steps} optimiser steps ({steps_per_epoch}/epoch, batch "
        f"{config.per_device_train_batch_size} x {gas} accumulation x {world_size} processes); trainable "
        f"{n_trainable:,} / {n_total:,} parameters"
        + ("; logits at trained positions only" if kept_logits else "")
        + (f"; resuming from {resume_dir} at step {state['global_step']}" if resume_dir else "")
    )
    _warn_single_process_launch(accelerator, log)
    if layout_warning:
        log.info(layout_warning)

    def evaluate() -> dict:
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.eval()
        metrics: dict[str, Any] = {}
        with torch.no_grad():
            if eval_dataset is not None:
                metrics.update(
                    evaluate_loss(accelerator, unwrapped, eval_dataset, data_collator, config, compute_metrics)
                )
            if test_dataset is not None:
                test = evaluate_loss(accelerator, unwrapped, test_dataset, data_collator, config, compute_metrics)
                metrics.update((f"test_{k}", v) for k, v in test.items())
            if evaluate_fn is not None:
                if use_cache is not None:
                    model_config.use_cache = use_cache  # generation in evaluate_fn wants the cache as it was
                try:
                    metrics.update(evaluate_fn(unwrapped, accelerator) or {})
                finally:
                    if use_cache is not None:
                        model_config.use_cache = False
        model.train()
        metrics = broadcast_object_list([metrics])[0]
        step = state["global_step"]
        if config.metric_for_best or "loss" in metrics:  # without a metric_for_best, the eval loss if there is one
            value = _metric(metrics, metric_name)
            best = state["best_metric"]
            if best is None or (value > best if greater else value < best):
                state.update(best_metric=value, best_step=step, evals_without_improvement=0)
            else:
                state["evals_without_improvement"] += 1
        record = {"type": "eval", "step": step, "epoch": state["epoch"], **metrics}
        state["last_metrics"] = metrics
        state["eval_history"].append(record)
        log.record(record)
        shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
        best_note = (
            f" (best {metric_name} {state['best_metric']:.4g} at step {state['best_step']})"
            if state["best_metric"] is not None
            else ""
        )
        log.info(f"eval step {step}: {shown}{best_note}")
        return metrics

    def checkpoint() -> None:
        step = state["global_step"]
        _save_checkpoint(accelerator, output_dir / CHECKPOINTS / f"step-{step}", dict(state))
        if accelerator.is_main_process:
            _prune_checkpoints(output_dir, config.keep_checkpoints)
        accelerator.wait_for_everyone()
        log.record({"type": "checkpoint", "step": step, "path": str(output_dir / CHECKPOINTS / f"step-{step}")})

    if resume_dir is not None:
        log.record({"type": "resume", "step": state["global_step"], "from": str(resume_dir)})
    last_eval_step = state["eval_history"][-1]["step"] if state["eval_history"] else None
    last_saved_step = state["global_step"] if resume_dir is not None else None
    stopped_early = bool(
        config.early_stopping_patience and state["evals_without_improvement"] >= config.early_stopping_patience
    )

    progress = tqdm(
        total=total_steps,
        initial=state["global_step"],
        disable=not accelerator.is_main_process,
        desc="train",
        unit="step",
    )
    log.progress = progress
    device = accelerator.device
    window = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, items, tokens since the last log line
    window_started = time.perf_counter()
    paused = 0.0  # seconds of the window spent evaluating and checkpointing (left out of tokens/s)
    accumulated_items = torch.zeros((), dtype=torch.float64, device=device)
    grad_norm = None
    start_epoch = state["global_step"] // steps_per_epoch
    skip_batches = (state["global_step"] % steps_per_epoch) * gas
    done = state["global_step"] >= total_steps or stopped_early
    for epoch in range(start_epoch, num_epochs):
        if done:
            break
        train_loader.set_epoch(epoch)
        loader = accelerator.skip_first_batches(train_loader, skip_batches) if skip_batches else train_loader
        skip_batches = 0
        for batch in loader:
            with accelerator.accumulate(model):
                with _input_casts_skipped(castable):
                    loss_sum, items, tokens = _training_loss(model, batch, config.task, kept_logits)
                accelerator.backward(loss_sum)
                accumulated_items += items
                window += torch.stack([loss_sum.detach().double(), items.double(), tokens.double()])
                if accelerator.sync_gradients:
                    # Each micro-batch back-propagated its summed loss, divided by `gas` by accelerate and averaged
                    # over processes by DDP: rescale to the mean over every item of the window on every process.
                    total_items = accelerator.reduce(accumulated_items.clone(), reduction="sum").item()
                    scale = gas * world_size / max(total_items, 1e-12)
                    for p in trainable:
                        if p.grad is not None:
                            p.grad.mul_(scale)
                    if config.max_grad_norm is not None:
                        grad_norm = accelerator.clip_grad_norm_(trainable, config.max_grad_norm)
                    optimizer.step()
                    if not accelerator.optimizer_step_was_skipped:
                        scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    accumulated_items.zero_()
            if not accelerator.sync_gradients:
                continue
            state["global_step"] += 1
            step = state["global_step"]
            state["epoch"] = step / steps_per_epoch
            progress.update(1)
            if step % config.log_every == 0 or step == total_steps:
                totals = accelerator.reduce(window.clone(), reduction="sum").tolist()
                peak = accelerator.gather(torch.tensor([peak_memory_mb(device)], device=device)).max().item()
                elapsed = time.perf_counter() - window_started - paused
                record = {
                    "type": "train",
                    "step": step,
                    "epoch": round(state["epoch"], 4),
                    "loss": totals[0] / totals[1] if totals[1] else float("nan"),
                    "lr": scheduler.get_last_lr()[0],
                    "grad_norm": float(grad_norm) if grad_norm is not None else None,
                    "tokens_per_s": totals[2] / elapsed if elapsed > 0 else None,
                    "tokens": int(totals[2]),
                    "peak_memory_mb": round(peak, 1),  # the largest over the processes
                    "elapsed_s": round(time.perf_counter() - started, 3),
                }
                log.record(record)
                log.info(
                    f"step {step}/{total_steps} epoch {record['epoch']:.2f} loss {record['loss']:.4f} "
                    f"lr {record['lr']:.3g} tokens/s {record['tokens_per_s'] or 0:.0f} "
                    f"peak mem {record['peak_memory_mb']:.0f} MB"
                )
                window.zero_()
                window_started, paused = time.perf_counter(), 0.0
            pause_started = time.perf_counter()
            evaluated = False
            due = step == total_steps or (
                step % config.eval_every == 0 if config.eval_every else step % steps_per_epoch == 0
            )
            if can_evaluate and due:
                evaluate()
                evaluated, last_eval_step = True, step
                patience = config.early_stopping_patience
                if patience and state["evals_without_improvement"] >= patience:
                    stopped_early = True
                    log.info(
                        f"early stopping at step {step}: {state['evals_without_improvement']} evaluations without "
                        f"improvement of {metric_name}"
                    )
            done = step >= total_steps or stopped_early
            if (config.save_every and step % config.save_every == 0) or (not config.save_every and evaluated) or done:
                checkpoint()
                last_saved_step = step
            paused += time.perf_counter() - pause_started
            if done:
                if hasattr(loader, "end"):
                    loader.end()  # left mid-epoch: unregister it from accelerate's GradientState
                break
    progress.close()
    log.progress = None

    if can_evaluate and last_eval_step != state["global_step"]:
        evaluate()
    if last_saved_step != state["global_step"]:
        checkpoint()

    unwrapped = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    if use_cache is not None:
        model_config.use_cache = use_cache
    adapter_dir = output_dir / ADAPTER_DIR
    if accelerator.is_main_process:
        save_adapter(unwrapped, adapter_dir, tokenizer)
        config.save(output_dir / CONFIG_FILE)
    accelerator.wait_for_everyone()
    parameters = ParameterReport(config.method, n_trainable, n_total, directory_bytes(adapter_dir))
    peak = accelerator.gather(torch.tensor([peak_memory_mb(device)], device=device)).max().item()
    result = TrainResult(
        global_step=state["global_step"],
        epoch=state["epoch"],
        metrics=state["last_metrics"],
        best_metric=state["best_metric"],
        best_step=state["best_step"],
        adapter_dir=adapter_dir,
        log_file=output_dir / METRICS_FILE,
        config=config,
        parameters=parameters,
        command=command,
        metric_for_best=metric_name,
        world_size=world_size,
        mixed_precision=mixed_precision,
        mixed_precision_reason=mp_reason,
        stopped_early=stopped_early,
        resumed_from=str(resume_dir) if resume_dir else None,
        train_seconds=time.perf_counter() - started,
        peak_memory_mb=round(peak, 1),
        eval_history=state["eval_history"],
    )
    log.record(
        {
            "type": "final",
            "step": result.global_step,
            "epoch": result.epoch,
            "metrics": result.metrics,
            "best_metric": result.best_metric,
            "best_step": result.best_step,
            "metric_for_best": metric_name,
            "stopped_early": stopped_early,
            "adapter_dir": str(adapter_dir),
            "adapter_bytes": parameters.adapter_bytes,
            "trainable_params": n_trainable,
            "world_size": world_size,
            "train_seconds": round(result.train_seconds, 3),
            "peak_memory_mb": result.peak_memory_mb,
        }
    )
    log.info(
        f"done: step {result.global_step}, adapter saved to {adapter_dir}"
        + (
            f", best {metric_name} {result.best_metric:.4g} at step {result.best_step}"
            if result.best_metric is not None
            else ""
        )
    )
    return result


__all__ = [
    "TrainResult",
    "build_model",
    "count_loss_items",
    "default_compute_metrics",
    "distributed_state",
    "evaluate_loss",
    "latest_checkpoint",
    "list_checkpoints",
    "make_optimizer",
    "peak_memory_mb",
    "prepare_backbone",
    "row_losses",
    "train",
    "trainable_state_dict",
]
