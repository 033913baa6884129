"""The training engine: one `Trainer` on Accelerate for every recipe (classification, NER, self-ask SFT).

```py
config = load_config("recipes/configs/smollm2/selfask_lora.yaml", sys.argv[1:])
model, tokenizer = build_model(config)                 # load_backbone + prepare_backbone + attach
result = Trainer(config, model, tokenizer, train_trees, SelfAskCollator(tokenizer, packing=True), eval_trees).train()
# or, the same: train(config, model, tokenizer, train_trees, collator, eval_trees)
```

`Trainer.train` runs the named phases: `setup` (accelerator, data, optimizer, schedule, resume), `training_step`
per micro-batch, `evaluate` and `save_checkpoint` when due, `finish` (last evaluation and checkpoint, the adapter
saved through the gathering path on every process, the `TrainResult`). The progress lives in a `TrainerState`.
Losses are in `peftprompt.training.losses`, evaluation in `.evaluation`, checkpoints in `.checkpoints`. Packed
rows of a causal LM on SDPA get attention per episode while training (`.packed_attention`).

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
  (``mpirun_hostfile``); without it the script runs once, with ``MASTER_ADDR`` set. The trainer warns when it sees
  that combination. For 2 CPU processes use a config with ``distributed_type: MULTI_GPU`` and ``use_cpu: true``
  (or ``--multi_gpu --num_processes 2``), and read the world size from the log (``metrics.jsonl``'s ``start``).
- The loss is normalised by the number of loss items (trained tokens for ``causal_lm`` / ``token_cls``, with
  ``loss_weights`` their weight sum; examples for ``seq_cls``) over the whole accumulation window on all
  processes, as `transformers.Trainer` does with ``num_items_in_batch``: each micro-batch back-propagates its
  summed loss and, when gradients sync, they are scaled by ``accumulation steps x world size / items`` (without
  accumulation the items are known before the backward, which then scales the loss instead of every gradient). So
  gradient accumulation 2 x batch 2 gives the update of batch 4 even when the micro-batches hold different numbers
  of tokens (the mean of per-micro-batch means would not).
- Data order is a function of (seed, epoch) only (``use_seedable_sampler``, or `EpochLengthGroupedSampler` with
  ``group_by_length``); resuming skips the batches already seen in the current epoch with
  `Accelerator.skip_first_batches`. 6 steps straight and 3 steps + resume to 6 give bit-identical parameters
  (tests/test_training.py).
- Accelerate keeps one process-wide state: a second run in the same process with another mixed precision is
  refused with a clear error (each recipe runs in its own process).
- SIGTERM while training (a scheduler's preemption, ``kill``, torchrun passing on its own SIGTERM) does not end the
  process at once: the step in progress finishes, every process agrees at the step's end (one all-reduce of a flag
  per step), writes a checkpoint and raises `TrainingInterrupted`, which recipes turn into one line and exit status
  143. ``resume_from=latest`` continues the run. A save that fails on any process raises the same `SaveError` on
  every process (`peftprompt.training.collective`); the faults tried and their outcomes are in the README's "Faults
  and what happens".
"""

from __future__ import annotations

import math
import os
import shlex
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, broadcast_object_list, set_seed
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from ..adapters import directory_bytes
from ..errors import SaveError, TrainingInterrupted
from ..methods.training_hooks import rank_allocation
from ..report import ParameterReport, count_parameters
from .checkpoints import (
    CHECKPOINTS,
    keep_trainable_weights,
    load_checkpoint,
    prune_checkpoints,
    resume_dir,
    save_checkpoint,
)
from .collective import shared_outcome
from .config import TrainConfig, resolve_mixed_precision
from .evaluation import ComputeMetrics, evaluate_loss
from .losses import input_casts_skipped, supports_kept_logits, training_loss
from .model_setup import make_optimizer, training_layout_kept
from .packed_attention import packed_attention, packed_sequence_kwargs
from .run_log import METRICS_FILE, RunLog, peak_memory_mb
from .sampling import EpochLengthGroupedSampler, example_lengths
from .sharding import shard_model
from .shipping import save_trained_adapter
from .state import TrainerState, TrainResult

ADAPTER_DIR = "adapter"
CONFIG_FILE = "train_config.yaml"

EvaluateFn = Callable[[Any, Accelerator], dict]
Regulariser = Callable[[Any], torch.Tensor]


class Trainer:
    """Train a model adapted with `attach` on `train_dataset`; evaluate, checkpoint, save the adapter.

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
        regulariser: Optional ``(model) -> scalar tensor`` added to the mean training loss of every update (e.g.
            `peftprompt.continual.OrthogonalLoRAPenalty`); the logged loss is the task loss alone.

    Writes under ``config.output_dir``: ``metrics.jsonl`` (records ``start``, ``train``, ``eval``, ``checkpoint``,
    ``resume``, ``final``), ``checkpoints/step-N`` (`peftprompt.training.checkpoints`), ``adapter/``
    (`save_trained_adapter`, with the tokenizer) and ``train_config.yaml``.
    """

    def __init__(
        self,
        config: TrainConfig,
        model,
        tokenizer,
        train_dataset,
        data_collator,
        eval_dataset=None,
        compute_metrics: Optional[ComputeMetrics] = None,
        evaluate_fn: Optional[EvaluateFn] = None,
        test_dataset=None,
        regulariser: Optional[Regulariser] = None,
    ):
        if test_dataset is not None and eval_dataset is None:
            raise ValueError("a test_dataset is scored next to an eval_dataset (which selects the best step): pass both")
        if (config.metric_for_best or "").removeprefix("eval_").startswith("test_"):
            raise ValueError(f"metric_for_best={config.metric_for_best!r}: the test set never selects a step; watch a "
                             "metric of the evaluation set instead")
        if not hasattr(train_dataset, "__len__") or len(train_dataset) == 0:
            raise ValueError("train_dataset must be a non-empty map-style dataset (with __len__)")
        if config.fully_shard and evaluate_fn is not None:
            raise ValueError("fully_shard: an evaluate_fn splits its own work between processes, which a sharded model "
                             "cannot follow (every process must run each forward); evaluate with eval_dataset only")
        if config.early_stopping_patience and not (eval_dataset is not None or config.metric_for_best):
            raise ValueError(
                "early_stopping_patience needs something to watch: pass an eval_dataset (its loss is watched) or set "
                "metric_for_best to a metric that evaluate_fn returns"
            )
        self.config, self.model, self.tokenizer = config, model, tokenizer
        self.train_dataset, self.data_collator = train_dataset, data_collator
        self.eval_dataset, self.test_dataset = eval_dataset, test_dataset
        self.compute_metrics, self.evaluate_fn = compute_metrics, evaluate_fn
        self.regulariser = regulariser
        self.output_dir = Path(config.output_dir)
        self.metric_name = config.metric_for_best or "loss"
        self.greater_is_better = config.greater_is_better if config.metric_for_best else False
        self.can_evaluate = eval_dataset is not None or evaluate_fn is not None
        self.command = shlex.join(getattr(sys, "orig_argv", sys.argv))
        self.state: Optional[TrainerState] = None
        self.stopped_early = False
        self.stop_signal = 0  # set by SIGTERM while the epochs run (`_stop_signals`)
        self.packed_attention = False  # set by `train`: attention per packed episode (`.packed_attention`)

    # ------------------------------------------------------------------------------------------------------ setup
    def setup(self) -> None:
        """Create the accelerator, data loader, optimizer and schedule, restore a checkpoint, log the start."""
        config = self.config
        self.started = time.perf_counter()
        self.mixed_precision, self.mp_reason = resolve_mixed_precision(config.mixed_precision)
        if config.frozen_dtype in ("bfloat16", "float16") and self.mixed_precision == "no":
            raise ValueError(
                f"frozen_dtype {config.frozen_dtype!r} computes through autocast, but mixed precision is off "
                f"(mixed_precision={config.mixed_precision!r}: {self.mp_reason}): set mixed_precision bf16 or fp16, "
                "or keep frozen_dtype: float32"
            )
        if config.fully_shard and self.mixed_precision != "no":
            raise ValueError(f"fully_shard trains in float32: set mixed_precision no (it is {config.mixed_precision!r}"
                             f" -> {self.mixed_precision})")
        self.accelerator = accelerator = self._accelerator()
        self.resume_dir, skipped = resume_dir(config, self.output_dir)
        self.log = RunLog(accelerator, self.output_dir / METRICS_FILE, fresh=self.resume_dir is None)
        for line in skipped:  # damaged newest checkpoints (truncated, altered), each named
            self.log.info(f"WARNING: {line}; skipped")
            self.log.record({"type": "skipped_checkpoint", "reason": line})
        set_seed(config.seed)

        model = self.model
        self.model_config = getattr(model, "config", None)
        self.use_cache = getattr(self.model_config, "use_cache", None)
        if self.use_cache is not None:
            self.model_config.use_cache = False  # packed rows need it off (README), and training never uses the cache
        model.train()
        with training_layout_kept(model):
            self.kept_logits = supports_kept_logits(model, config.task)
        if config.fully_shard:
            model = shard_model(model)  # before the optimizer: its parameters become DTensor shards
        optimizer = make_optimizer(config, model)
        sampler = (EpochLengthGroupedSampler(example_lengths(self.train_dataset), config.per_device_train_batch_size,
                                             config.seed) if config.group_by_length else None)
        self.train_loader = accelerator.prepare(
            DataLoader(
                self.train_dataset,
                batch_size=config.per_device_train_batch_size,
                shuffle=sampler is None,
                sampler=sampler,
                collate_fn=self.data_collator,
                generator=torch.Generator().manual_seed(config.seed),
            )
        )
        self.steps_per_epoch = math.ceil(len(self.train_loader) / config.gradient_accumulation_steps)
        total_steps = config.max_steps or math.ceil(config.num_epochs * self.steps_per_epoch)
        self.num_epochs = math.ceil(total_steps / self.steps_per_epoch)
        scheduler = get_scheduler(
            config.lr_scheduler,
            optimizer,
            num_warmup_steps=math.ceil(config.warmup_ratio * total_steps),
            num_training_steps=total_steps,
        )
        if config.fully_shard:  # no DDP around a sharded model: Accelerate prepares the schedule only
            self.model, self.optimizer, self.scheduler = model, optimizer, accelerator.prepare(scheduler)
        else:
            self.model, self.optimizer, self.scheduler = accelerator.prepare(model, optimizer, scheduler)
        accelerator.register_save_state_pre_hook(keep_trainable_weights)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        # Under autocast PEFT's cast of each adapter layer's input to float32 is undone by the matmul's cast back to
        # half precision: training skips both copies (without dropout the matmuls see the same numbers; tested).
        castable = [m for m in self.model.modules() if getattr(m, "cast_input_dtype_enabled", None) is True]
        self.castable = castable if self.mixed_precision != "no" else []
        self.n_trainable, self.n_total = count_parameters(accelerator.unwrap_model(self.model))
        self.rank_allocation = rank_allocation(accelerator.unwrap_model(self.model), total_steps)  # AdaLoRA

        self.state = TrainerState(
            total_steps=total_steps,
            world_size=accelerator.num_processes,
            per_device_train_batch_size=config.per_device_train_batch_size,
            gradient_accumulation_steps=config.gradient_accumulation_steps,
        )
        layout_warning = None
        if self.resume_dir is not None:
            saved = load_checkpoint(accelerator, self.resume_dir, self.model, self.optimizer, self.scheduler)
            layout_warning = self.state.resume_from(saved)
            patience = config.early_stopping_patience
            self.stopped_early = bool(patience and self.state.evals_without_improvement >= patience)
        elif config.resume_from == "latest":
            self.log.info(f"resume_from=latest: no checkpoint under {self.output_dir / CHECKPOINTS}, starting from "
                          "scratch")
        self._log_start(layout_warning)

    def _accelerator(self) -> Accelerator:
        try:
            return Accelerator(
                mixed_precision=self.mixed_precision,
                gradient_accumulation_steps=self.config.gradient_accumulation_steps,
                cpu=not torch.cuda.is_available(),
                step_scheduler_with_optimizer=False,  # one scheduler step per optimiser step, whatever the world size
                dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=self.config.seed),
            )
        except ValueError as err:
            if "already been initialized" not in str(err):
                raise
            raise ValueError(
                f"Accelerate was already set up in this process with another mixed precision; a run with "
                f"mixed_precision {self.mixed_precision!r} needs a process of its own (run each recipe in its own "
                "process, e.g. with accelerate launch)"
            ) from err

    def _log_start(self, layout_warning: Optional[str]) -> None:
        accelerator, state, config = self.accelerator, self.state, self.config
        distributed_type = str(accelerator.distributed_type).split(".")[-1]
        self.log.record({
            "type": "start",
            "world_size": state.world_size,
            "distributed_type": distributed_type,
            "device": str(accelerator.device),
            "mixed_precision": self.mixed_precision,
            "mixed_precision_reason": self.mp_reason,
            "total_steps": state.total_steps,
            "steps_per_epoch": self.steps_per_epoch,
            "trainable_params": self.n_trainable,
            "total_params": self.n_total,
            "resumed_from": str(self.resume_dir) if self.resume_dir else None,
            "global_step": state.global_step,
            "logits_at_trained_positions_only": self.kept_logits,
            "attention_per_packed_episode": self.packed_attention,
            "command": self.command,
        })
        self.log.info(
            f"world size {state.world_size} ({distributed_type}, {accelerator.device}); mixed precision "
            f"{self.mixed_precision}: {self.mp_reason}; {state.total_steps} optimiser steps ({self.steps_per_epoch}"
            f"/epoch, batch {config.per_device_train_batch_size} x {config.gradient_accumulation_steps} accumulation "
            f"x {state.world_size} processes); trainable {self.n_trainable:,} / {self.n_total:,} parameters"
            + ("; logits at trained positions only" if self.kept_logits else "")
            + ("; attention per packed episode" if self.packed_attention else "")
            + (f"; resuming from {self.resume_dir} at step {state.global_step}" if self.resume_dir else "")
        )
        env = os.environ
        if state.world_size == 1 and "MASTER_ADDR" in env and "WORLD_SIZE" not in env and "LOCAL_RANK" not in env:
            self.log.info(
                "WARNING: launched with a rendezvous address (MASTER_ADDR) but this run has ONE process: accelerate's "
                "MULTI_CPU config (and --cpu) start a single process unless mpirun is used. For several CPU processes "
                "use a config with 'distributed_type: MULTI_GPU' and 'use_cpu: true', or --multi_gpu --num_processes N."
            )
        if layout_warning:
            self.log.info(layout_warning)
        if self.resume_dir is not None:
            self.log.record({"type": "resume", "step": state.global_step, "from": str(self.resume_dir)})

    # --------------------------------------------------------------------------------------------------- training
    def training_step(self, batch: dict) -> bool:
        """Forward and backward one micro-batch; at the end of an accumulation window, rescale the gradients to the
        mean over every loss item of the window on every process, clip, and step. Returns whether it stepped."""
        accelerator, accumulation = self.accelerator, self.config.gradient_accumulation_steps
        if self.packed_attention and "position_ids" in batch and "attention_mask" not in batch:
            batch = {**batch, **packed_sequence_kwargs(batch["position_ids"])}
        with accelerator.accumulate(self.model):
            with input_casts_skipped(self.castable):
                loss_sum, items, tokens = training_loss(self.model, batch, self.config.task, self.kept_logits)
            self.window += torch.stack([loss_sum.detach().double(), items.double(), tokens.double()])
            if self.regulariser is not None:
                # weighted by the micro-batch's items: after the scaling below it enters each update once
                loss_sum = loss_sum + self.regulariser(self.model) * items
            if accumulation == 1:
                # The window is this micro-batch: its items on every process are known before the backward, so the
                # loss is scaled (DDP then averages over processes) instead of every gradient after it.
                total_items = accelerator.reduce(items.clone(), reduction="sum").item()
                accelerator.backward(loss_sum * (self.state.world_size / max(total_items, 1e-12)))
            else:
                accelerator.backward(loss_sum)
                self.accumulated_items += items
                if not accelerator.sync_gradients:
                    return False
                # Each micro-batch back-propagated its summed loss, divided by the accumulation steps by accelerate
                # and averaged over processes by DDP: rescale to the mean over every item of the window everywhere.
                total_items = accelerator.reduce(self.accumulated_items.clone(), reduction="sum").item()
                scale = accumulation * self.state.world_size / max(total_items, 1e-12)
                for p in self.trainable:
                    if p.grad is not None:
                        p.grad.mul_(scale)
            if self.config.max_grad_norm is not None:
                norm = accelerator.clip_grad_norm_(self.trainable, self.config.max_grad_norm)
                self.grad_norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
            self.optimizer.step()
            if self.rank_allocation is not None:
                self.rank_allocation(self.state.global_step)
            if not accelerator.optimizer_step_was_skipped:
                self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.accumulated_items.zero_()
        return True

    def train(self) -> TrainResult:
        """Run `setup`, the epochs of `training_step` with evaluation and checkpoints when due, and `finish`."""
        # 4-bit weights stay trainable through evaluations; packed rows get attention per episode (see there)
        with training_layout_kept(self.model), packed_attention(self.model) as self.packed_attention:
            if self.state is None:
                self.setup()
            with self._stop_signals():
                self._run_epochs()
            return self.finish()

    def _run_epochs(self) -> None:
        """The epochs from the current step on: `training_step` per micro-batch, `_after_step` per optimiser step."""
        state, accelerator = self.state, self.accelerator
        device = accelerator.device
        self.window = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, items, tokens since last log
        self.window_started, self.paused = time.perf_counter(), 0.0  # paused: evaluating / checkpointing seconds
        self.step_started = self.window_started  # each step's seconds go to state.step_seconds
        self.accumulated_items = torch.zeros((), dtype=torch.float64, device=device)
        self.grad_norm = None
        self.last_eval_step = state.eval_history[-1]["step"] if state.eval_history else None
        self.last_saved_step = state.global_step if self.resume_dir is not None else None
        progress = tqdm(total=state.total_steps, initial=state.global_step, desc="train", unit="step",
                        disable=not accelerator.is_main_process)
        self.log.progress = progress
        gas = self.config.gradient_accumulation_steps
        skip_batches = (state.global_step % self.steps_per_epoch) * gas
        done = state.global_step >= state.total_steps or self.stopped_early
        running = None  # a loader left mid-epoch must be ended (unregistered from accelerate's GradientState)
        try:
            for epoch in range(state.global_step // self.steps_per_epoch, self.num_epochs):
                if done:
                    break
                self.train_loader.set_epoch(epoch)
                loader = (accelerator.skip_first_batches(self.train_loader, skip_batches) if skip_batches
                          else self.train_loader)
                skip_batches = 0
                for batch in loader:
                    running = loader
                    if self.training_step(batch):
                        progress.update(1)
                        done = self._after_step()
                        if done:
                            break
                else:
                    running = None  # exhausted: it ended itself
        finally:
            if running is not None:
                running.end()
            progress.close()
            self.log.progress = None

    def _after_step(self) -> bool:
        """Log, evaluate and checkpoint after an optimiser step, as due; returns whether training is done."""
        state, config = self.state, self.config
        state.step_seconds += time.perf_counter() - self.step_started
        state.global_step += 1
        step = state.global_step
        state.epoch = step / self.steps_per_epoch
        if step % config.log_every == 0 or step == state.total_steps:
            self._log_window()
        pause_started = time.perf_counter()
        evaluated = False
        due = step == state.total_steps or (
            step % config.eval_every == 0 if config.eval_every else step % self.steps_per_epoch == 0
        )
        if self.can_evaluate and due:
            self.evaluate()
            evaluated = True
            patience = config.early_stopping_patience
            if patience and state.evals_without_improvement >= patience:
                self.stopped_early = True
                self.log.info(f"early stopping at step {step}: {state.evals_without_improvement} evaluations without "
                              f"improvement of {self.metric_name}")
        done = step >= state.total_steps or self.stopped_early
        if (config.save_every and step % config.save_every == 0) or (not config.save_every and evaluated) or done:
            self.save_checkpoint()
        if not done:
            self._stop_if_signalled()
        self.paused += time.perf_counter() - pause_started
        self.step_started = time.perf_counter()
        return done

    # ---------------------------------------------------------------------------------------------------- signals
    @contextmanager
    def _stop_signals(self):
        """While the epochs run, SIGTERM only sets `stop_signal`: `_stop_if_signalled` acts on it at the end of the
        step. The previous handler comes back afterwards. (Signal handlers live in the main thread only; elsewhere
        SIGTERM keeps its own handler.)"""
        self.stop_signal = 0
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def remember(signum, frame) -> None:
            self.stop_signal = signum

        previous = signal.signal(signal.SIGTERM, remember)
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, previous)

    def _stop_if_signalled(self) -> None:
        """If any process got SIGTERM: checkpoint this step (unless just done) and raise `TrainingInterrupted` on
        every process. The flag is all-reduced every step, so all processes stop at the same step even when the
        signal reached only some of them."""
        flag = torch.tensor([self.stop_signal], dtype=torch.int64)
        if self.state.world_size > 1:
            flag = flag.to(self.accelerator.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        signum = int(flag.item())
        if not signum:
            return
        step = self.state.global_step
        if self.last_saved_step != step:
            self.save_checkpoint()
        name = signal.Signals(signum).name
        self.log.info(f"{name} received: stopped after step {step} with a checkpoint")
        raise TrainingInterrupted(
            f"stopped by {name} after step {step} of {self.state.total_steps}: checkpoint "
            f"{self.output_dir / CHECKPOINTS / f'step-{step}'} written; run again with resume_from=latest to continue",
            signum,
        )

    def _log_window(self) -> None:
        accelerator, state, device = self.accelerator, self.state, self.accelerator.device
        totals = accelerator.reduce(self.window.clone(), reduction="sum").tolist()
        peak = accelerator.gather(torch.tensor([peak_memory_mb(device)], device=device)).max().item()
        elapsed = time.perf_counter() - self.window_started - self.paused
        record = {
            "type": "train",
            "step": state.global_step,
            "epoch": round(state.epoch, 4),
            "loss": totals[0] / totals[1] if totals[1] else float("nan"),
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": float(self.grad_norm) if self.grad_norm is not None else None,
            "tokens_per_s": totals[2] / elapsed if elapsed > 0 else None,
            "tokens": int(totals[2]),
            "peak_memory_mb": round(peak, 1),  # the largest over the processes
            "elapsed_s": round(time.perf_counter() - self.started, 3),
        }
        self.log.record(record)
        self.log.info(
            f"step {state.global_step}/{state.total_steps} epoch {record['epoch']:.2f} loss {record['loss']:.4f} "
            f"lr {record['lr']:.3g} tokens/s {record['tokens_per_s'] or 0:.0f} "
            f"peak mem {record['peak_memory_mb']:.0f} MB"
        )
        self.window.zero_()
        self.window_started, self.paused = time.perf_counter(), 0.0

    # ------------------------------------------------------------------------------------------------- evaluation
    def evaluate(self) -> dict:
        """Evaluation loss and metrics (and test-set metrics, and `evaluate_fn`'s), recorded in the state and log."""
        accelerator, config, state = self.accelerator, self.config, self.state
        unwrapped = accelerator.unwrap_model(self.model)
        unwrapped.eval()
        metrics: dict[str, Any] = {}
        with torch.no_grad():
            if self.eval_dataset is not None:
                metrics.update(evaluate_loss(accelerator, unwrapped, self.eval_dataset, self.data_collator, config,
                                             self.compute_metrics, split=not config.fully_shard))
            if self.test_dataset is not None:
                test = evaluate_loss(accelerator, unwrapped, self.test_dataset, self.data_collator, config,
                                     self.compute_metrics, split=not config.fully_shard)
                metrics.update((f"test_{k}", v) for k, v in test.items())
            if self.evaluate_fn is not None:
                if self.use_cache is not None:
                    self.model_config.use_cache = self.use_cache  # generation wants the cache as it was
                try:
                    metrics.update(self.evaluate_fn(unwrapped, accelerator) or {})
                finally:
                    if self.use_cache is not None:
                        self.model_config.use_cache = False
        self.model.train()
        metrics = broadcast_object_list([metrics])[0]
        # without a metric_for_best, the eval loss is watched if there is one
        value = self._watched(metrics) if config.metric_for_best or "loss" in metrics else None
        record = state.record_evaluation(metrics, value, self.greater_is_better)
        self.log.record(record)
        shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
        best_note = (f" (best {self.metric_name} {state.best_metric:.4g} at step {state.best_step})"
                     if state.best_metric is not None else "")
        self.log.info(f"eval step {state.global_step}: {shown}{best_note}")
        self.last_eval_step = state.global_step
        return metrics

    def _watched(self, metrics: dict) -> float:
        for key in (self.metric_name, self.metric_name.removeprefix("eval_")):
            if key in metrics:
                return float(metrics[key])
        raise ValueError(f"metric_for_best={self.metric_name!r} is not among the evaluation metrics {sorted(metrics)}")

    # ------------------------------------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> None:
        """Write ``checkpoints/step-N`` (every process takes part) and prune the old ones."""
        step = self.state.global_step
        target = self.output_dir / CHECKPOINTS / f"step-{step}"
        save_checkpoint(self.accelerator, target, self.state, self.model, self.optimizer)
        if self.accelerator.is_main_process:
            prune_checkpoints(self.output_dir, self.config.keep_checkpoints)
        self.accelerator.wait_for_everyone()
        self.log.record({"type": "checkpoint", "step": step, "path": str(target)})
        self.last_saved_step = step

    # ----------------------------------------------------------------------------------------------------- finish
    def finish(self) -> TrainResult:
        """Evaluate and checkpoint the last step if that was not done, save the adapter (gathered from every
        process, so sharded ZeRO-3 / FSDP weights are whole) and the config, and return the `TrainResult`."""
        accelerator, state = self.accelerator, self.state
        if self.can_evaluate and self.last_eval_step != state.global_step:
            self.evaluate()
        if self.last_saved_step != state.global_step:
            self.save_checkpoint()
        if self.use_cache is not None:
            self.model_config.use_cache = self.use_cache
        adapter_dir = self.output_dir / ADAPTER_DIR
        try:
            save_trained_adapter(self.model, accelerator, adapter_dir, self.tokenizer)  # on every process
        except SaveError as err:  # the same on every process: say where the trained weights are
            checkpoint = self.output_dir / CHECKPOINTS / f"step-{state.global_step}"
            raise SaveError(f"{err}; the trained weights are in {checkpoint}: resume_from=latest writes the adapter "
                            "again") from err.__cause__
        shared_outcome(lambda: self.config.save(self.output_dir / CONFIG_FILE), what="run config",
                       target=self.output_dir / CONFIG_FILE, main_only=True)
        accelerator.unwrap_model(self.model, keep_fp32_wrapper=False)  # the caller's model without autocast wrapper
        device = accelerator.device
        peak = accelerator.gather(torch.tensor([peak_memory_mb(device)], device=device)).max().item()
        result = TrainResult.from_state(
            state,
            adapter_dir=adapter_dir,
            log_file=self.output_dir / METRICS_FILE,
            config=self.config,
            parameters=ParameterReport(self.config.method, self.n_trainable, self.n_total,
                                       directory_bytes(adapter_dir)),
            command=self.command,
            metric_for_best=self.metric_name,
            mixed_precision=self.mixed_precision,
            mixed_precision_reason=self.mp_reason,
            stopped_early=self.stopped_early,
            resumed_from=str(self.resume_dir) if self.resume_dir else None,
            train_seconds=time.perf_counter() - self.started,
            peak_memory_mb=round(peak, 1),
        )
        self.log.record(result.final_record())
        self.log.info(
            f"done: step {result.global_step}, adapter saved to {adapter_dir}"
            + (f", best {self.metric_name} {result.best_metric:.4g} at step {result.best_step}"
               if result.best_metric is not None else "")
        )
        return result


def train(config: TrainConfig, model, tokenizer, train_dataset, data_collator, eval_dataset=None,
          compute_metrics: Optional[ComputeMetrics] = None, evaluate_fn: Optional[EvaluateFn] = None,
          test_dataset=None, regulariser: Optional[Regulariser] = None) -> TrainResult:
    """``Trainer(...).train()``: see `Trainer` for the arguments and what a run writes."""
    return Trainer(config, model, tokenizer, train_dataset, data_collator, eval_dataset=eval_dataset,
                   compute_metrics=compute_metrics, evaluate_fn=evaluate_fn, test_dataset=test_dataset,
                   regulariser=regulariser).train()
