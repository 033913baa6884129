"""`TrainerState`: the progress of a run, the one source of ``trainer_state.json``, the log records and
`TrainResult`."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..report import ParameterReport
from .config import TrainConfig

TRAINER_STATE = "trainer_state.json"
# What fixes the data order of a run: examples per optimiser step = processes x batch x accumulation.
LAYOUT = ("world_size", "per_device_train_batch_size", "gradient_accumulation_steps")


@dataclass
class TrainerState:
    """Where a run stands: step, epoch, best metric, patience and evaluation history, and the process layout.

    Saved with every checkpoint as ``trainer_state.json`` and restored on resume (`resume_from`); the ``eval`` log
    records and the final `TrainResult` are read from it.
    """

    total_steps: int = 0
    world_size: int = 1
    per_device_train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    global_step: int = 0
    epoch: float = 0.0
    best_metric: Optional[float] = None
    best_step: Optional[int] = None
    evals_without_improvement: int = 0
    last_metrics: dict = field(default_factory=dict)
    eval_history: list = field(default_factory=list)
    step_seconds: float = 0.0  # spent in optimiser steps (data included; evaluation, checkpoints excluded), all resumes

    @property
    def examples_per_step(self) -> int:
        return math.prod(getattr(self, name) for name in LAYOUT)

    def save(self, path: Path) -> None:
        """Write the state as JSON to `path` (a file inside a checkpoint directory being written)."""
        Path(path).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: Path) -> "TrainerState":
        """Read a ``trainer_state.json``; keys this version does not know are ignored."""
        saved = json.loads(Path(path).read_text())
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in saved.items() if key in names})

    def resume_from(self, saved: "TrainerState") -> Optional[str]:
        """Take the progress of `saved` (step, epoch, best metric, history), keeping this run's layout and
        ``total_steps``. Returns a warning when the examples per step differ (the data order then differs)."""
        for name in ("global_step", "epoch", "best_metric", "best_step", "evals_without_improvement", "step_seconds"):
            setattr(self, name, getattr(saved, name))
        self.last_metrics, self.eval_history = dict(saved.last_metrics), list(saved.eval_history)
        if saved.examples_per_step == self.examples_per_step:
            return None
        return (
            f"WARNING: resuming with {self.layout()} from a checkpoint written with {saved.layout()}: a different "
            "number of examples per step, so the data order of the interrupted run is not reproduced"
        )

    def layout(self) -> dict:
        return {name: getattr(self, name) for name in LAYOUT}

    def record_evaluation(self, metrics: dict, value: Optional[float], greater_is_better: bool) -> dict:
        """Add the evaluation `metrics` of this step (`value`: the watched metric, `None` when nothing is watched)
        to the history, update the best step and patience; returns the ``eval`` log record."""
        if value is not None:
            best = self.best_metric
            if best is None or (value > best if greater_is_better else value < best):
                self.best_metric, self.best_step, self.evals_without_improvement = value, self.global_step, 0
            else:
                self.evals_without_improvement += 1
        record = {"type": "eval", "step": self.global_step, "epoch": self.epoch,
                  "step_seconds": round(self.step_seconds, 3), **metrics}
        self.last_metrics = metrics
        self.eval_history.append(record)
        return record


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
    train_seconds: float = 0.0  # this process's wall clock from setup to the end (evaluations included)
    step_seconds: float = 0.0  # `TrainerState.step_seconds`: optimiser steps only, over every resume
    peak_memory_mb: Optional[float] = None  # the largest over the processes (peak RSS on a CPU, CUDA max allocated)
    eval_history: list = field(default_factory=list)

    @classmethod
    def from_state(cls, state: TrainerState, **fields: Any) -> "TrainResult":
        """The result of a run that ended in `state`; `fields` give the rest (paths, config, timings...)."""
        return cls(global_step=state.global_step, epoch=state.epoch, metrics=state.last_metrics,
                   best_metric=state.best_metric, best_step=state.best_step, world_size=state.world_size,
                   step_seconds=state.step_seconds,
                   eval_history=state.eval_history, **fields)

    def final_record(self) -> dict:
        """The ``final`` record of ``metrics.jsonl``."""
        return {
            "type": "final",
            "step": self.global_step,
            "epoch": self.epoch,
            "metrics": self.metrics,
            "best_metric": self.best_metric,
            "best_step": self.best_step,
            "metric_for_best": self.metric_for_best,
            "stopped_early": self.stopped_early,
            "adapter_dir": str(self.adapter_dir),
            "adapter_bytes": self.parameters.adapter_bytes if self.parameters else None,
            "trainable_params": self.parameters.trainable_params if self.parameters else None,
            "world_size": self.world_size,
            "train_seconds": round(self.train_seconds, 3),
            "step_seconds": round(self.step_seconds, 3),
            "peak_memory_mb": self.peak_memory_mb,
        }

    def as_dict(self) -> dict:
        out = asdict(self)
        out.update(
            adapter_dir=str(self.adapter_dir),
            log_file=str(self.log_file),
            config=self.config.as_dict() if self.config is not None else None,
            parameters=self.parameters.as_dict() if self.parameters is not None else None,
        )
        return out
