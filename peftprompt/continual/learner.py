"""Train one backbone through a sequence of classification tasks with a continual-learning strategy, and measure the
accuracy matrix after every task.

Strategies (`STRATEGIES` of `peftprompt.training.data_config`, where the config's ``data`` section, a `ContinualData`,
is checked), each trained with the config's adapter ``method`` (LoRA in the recipe configs):

- ``sequential``: one adapter and head trained task after task (the forgetting lower bound).
- ``replay``: as ``sequential``, each later task's training rows mixed with `ContinualData.replay_fraction` of
  every earlier task's (`ReplayMemory`).
- ``adapter_per_task``: a PEFT named adapter (with its own head) per task on one frozen backbone. Scored with the
  task given (each task's test rows through its own adapter) and routed, once per router of `ROUTERS`
  (`LinearRouter`, `CentroidRouter`: over the frozen backbone's mean-pooled hidden states, `router_layers`, of
  `router_examples` training rows per task, each picks the adapter of every input among the tasks trained so far).
- ``osf``: PEFT's orthogonal subspace fine-tuning as its continual-learning example uses it: for each task a fresh
  OSF adapter (method ``osf``) whose frozen share of every weight's singular directions (``effective_rank``) grows
  linearly over the tasks (`ContinualData.osf_effective_rank`, first -> last), trained, then merged into the
  backbone (``merge_and_unload``) before the next task.
- ``orthogonal_lora``: O-LoRA-style (`OrthogonalLoRAPenalty`): a fresh LoRA per task, trained with a penalty on the
  overlap of its ``lora_A`` with the earlier tasks' (weight `ContinualData.orthogonal_weight`), then merged into
  the backbone before the next task (the same forward pass as O-LoRA's frozen, summed adapters).
- ``joint``: one adapter trained once on every task's rows together (the multi-task upper bound; one matrix row).

A single head trains over the labels seen so far (`trained_labels_only`: the logits of tasks still to come are
masked in the loss, as in an expanding class-incremental head; joint training has all labels) and predicts over all
of `label_space()`, told nothing of the task; an adapter of ``adapter_per_task`` trains and predicts among its own
task's labels (given the task, or the task the router picked). After
task ``i`` the accuracy on the test rows of every task trained so far fills row ``i`` of the matrix (later tasks:
``None``).

A run writes under ``config.output_dir``: ``stages/<i>-<task>/`` (each task's training run: ``metrics.jsonl`` and
``adapter/``; its checkpoints are removed once the task is done, as a sequence is not resumed half-way), and
``adapters/`` (``adapter_per_task``: every task's adapter and ``router-<name>.safetensors``; the other strategies: the
final adapter, for ``osf`` and ``orthogonal_lora`` the final merged model). Under several processes every process
evaluates every test row (the same numbers); only the main process writes.
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from transformers import DataCollatorWithPadding

from ..adapters import directory_bytes
from ..atomic import write_dir_atomically
from ..data import labelled_text_dataset
from ..errors import InputError
from ..methods import attach, default_config
from ..retrieval.embed import SentenceEncoder
from ..tasks import HEAD_NAMES
from ..training import TrainConfig, build_model, distributed_state, train
from ..training.data_config import ContinualData
from .metrics import continual_scores
from .orthogonal import OrthogonalLoRAPenalty
from .replay import ReplayMemory
from .routing import ROUTERS, Router
from .tasks import ClassificationTask, label_space

MERGED_PER_TASK = ("osf", "orthogonal_lora")
STAGES_DIR = "stages"
ADAPTERS_DIR = "adapters"
ROUTER_FILE = "router-{name}.safetensors"


@dataclass
class ContinualResult:
    """What a continual run measured (``results.json``): the accuracy matrix and its scores, per-task costs, and for
    ``adapter_per_task`` per router (``routed[<router>]``) the routed matrix, its scores and the routing accuracy."""

    strategy: str
    tasks: list[str]
    accuracy_matrix: list[list[Optional[float]]]
    scores: dict[str, Optional[float]]
    stages: list[dict]
    test_dropped_as_training: dict[str, int]
    routed: Optional[dict] = None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@torch.no_grad()
def predict(model, tokenizer, texts: Sequence[str], max_length: int, batch_size: int,
            labels: Optional[Sequence[int]] = None) -> list[int]:
    """The argmax label id of each text (batches of similar lengths, in eval mode), among `labels` if given."""
    was_training = model.training
    model.eval()
    encodings = tokenizer(list(texts), truncation=True, max_length=max_length)
    order = sorted(range(len(texts)), key=lambda i: len(encodings["input_ids"][i]))
    predictions = [0] * len(texts)
    device = next(model.parameters()).device
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        batch = tokenizer.pad({key: [values[i] for i in rows] for key, values in encodings.items()},
                              return_tensors="pt")
        logits = model(**{key: value.to(device) for key, value in batch.items()}).logits
        if labels is not None:
            logits = logits + label_mask(logits.shape[-1], labels, logits.device)
        for i, label in zip(rows, logits.argmax(-1).tolist()):
            predictions[i] = label
    model.train(was_training)
    return predictions


def label_mask(n_labels: int, labels: Sequence[int], device=None) -> torch.Tensor:
    """Adds to logits: 0 at `labels`, -inf elsewhere."""
    mask = torch.full((n_labels,), float("-inf"), device=device)
    mask[list(labels)] = 0.0
    return mask


@contextmanager
def trained_labels_only(model, labels: Sequence[int]):
    """While training, the logits of every label outside `labels` are -inf (the "labels trick" of class-incremental
    learning): a task's loss neither pushes down the rows of other tasks' labels nor is it lowered by them. Without
    it, a new task's labels start far below the trained ones and, measured here, SST-2 after DBpedia stayed at chance
    (0.514) where a fresh head reached 0.786. Evaluation is left unmasked."""
    head = next(module for name, module in model.named_modules() if name.rsplit(".", 1)[-1] in HEAD_NAMES)
    masks: dict[tuple[int, torch.device], torch.Tensor] = {}  # built once, not at every forward

    def mask(module, inputs, output):
        if not module.training:
            return output
        key = (output.shape[-1], output.device)
        if key not in masks:
            masks[key] = label_mask(key[0], labels, key[1])
        return output + masks[key]

    handle = head.register_forward_hook(mask)
    try:
        yield
    finally:
        handle.remove()


def accuracy(model, tokenizer, rows: Sequence[tuple[str, int]], config: TrainConfig,
             labels: Optional[Sequence[int]] = None) -> float:
    """The share of `rows` whose predicted label id (among `labels` if given) is their label."""
    predictions = predict(model, tokenizer, [text for text, _ in rows], config.max_length,
                          config.per_device_eval_batch_size, labels)
    return share_right(predictions, rows)


def share_right(predictions: Sequence[int], rows: Sequence[tuple[str, int]]) -> float:
    """The share of `rows` whose label is the prediction at the same position."""
    return sum(p == label for p, (_, label) in zip(predictions, rows)) / len(rows)


class ContinualLearner:
    """Runs the strategy of ``config.data`` (a `ContinualData`: checked when the config was built) over `tasks`
    (in order) with the training settings of `config`.

    Args:
        config: The training config of every task's run (``method``, rates, epochs, batch...) and, in ``data``, the
            strategy, the task order and their sizes; ``num_labels`` must be the size of `label_space()` (25).
        tasks: The loaded tasks, in ``config.data.tasks`` order (`load_task`).
    """

    def __init__(self, config: TrainConfig, tasks: Sequence[ClassificationTask]):
        options = config.data
        if not isinstance(options, ContinualData):
            raise InputError(f"continual learning needs a continual data section (data.strategy, data.tasks); this "
                             f"config's is a {options.kind} one", field="data")
        if [task.name for task in tasks] != options.tasks:
            raise ValueError(f"tasks {[task.name for task in tasks]} are not in the order of data.tasks "
                             f"{options.tasks}")
        n_labels = len(label_space())
        if config.num_labels != n_labels:
            raise InputError(f"the continual tasks share {n_labels} labels: set num_labels: {n_labels}, got "
                             f"{config.num_labels}", field="num_labels")
        self.config = config
        self.options, self.tasks = options, list(tasks)
        self.output_dir = Path(config.output_dir)
        self.is_main = distributed_state().is_main_process
        self.tokenizer = None
        self._test_embeddings: dict[str, torch.Tensor] = {}  # routing: each task's test rows, embedded once
        self._penalty = (OrthogonalLoRAPenalty(options.orthogonal_weight) if options.strategy == "orthogonal_lora"
                         else None)

    # ------------------------------------------------------------------------------------------------------- run
    def run(self) -> ContinualResult:
        """Train every task in order (``joint``: all at once), measure the matrix, save the adapters."""
        self._start_over()
        if self.options.strategy == "joint":
            model = self._model_for(0, None)
            model, stage = self._train_stage(model, "joint", 0, [row for task in self.tasks for row in task.train])
            started = time.perf_counter()
            matrix = [[accuracy(model, self.tokenizer, task.test, self.config) for task in self.tasks]]
            stage["eval_seconds"] = round(time.perf_counter() - started, 2)
            self._save_final(model)
            return self._result(matrix, [stage])
        rows_of: dict[str, list] = {}  # given; routed:<router>, routing:<router>
        stages = []
        memory = ReplayMemory(self.options.replay_fraction, seed=self.config.seed)
        routers: dict[str, Router] = {}
        encoder = None
        if self.options.strategy == "adapter_per_task":
            routers, encoder = {name: kind() for name, kind in ROUTERS.items()}, SentenceEncoder(self.config.model)
        model = None
        for position, task in enumerate(self.tasks):
            model = self._model_for(position, model)
            rows = memory.mix(task.train) if self.options.strategy == "replay" else task.train
            model, stage = self._train_stage(model, task.name, position, rows)
            stage["replayed_examples"] = len(rows) - len(task.train)
            if self.options.strategy == "replay":
                memory.add(task.train)
            if self._penalty is not None:
                self._penalty.remember(model)
            started = time.perf_counter()
            seen = self.tasks[: position + 1]
            if routers:
                train_texts = [text for text, _ in task.train[: self.options.router_examples]]
                embeddings = self._router_features(encoder, train_texts)
                for router in routers.values():
                    router.add_task(task.name, embeddings)
                measured = self._evaluate_adapters(model, routers, encoder, seen)
            else:
                measured = {"given": [accuracy(model, self.tokenizer, earlier.test, self.config) for earlier in seen]}
            for key, row in measured.items():
                rows_of.setdefault(key, []).append(row + [None] * (len(self.tasks) - len(seen)))
            stage["eval_seconds"] = round(time.perf_counter() - started, 2)
            stages.append(stage)
        if self.options.strategy in MERGED_PER_TASK:
            model = model.merge_and_unload()
        self._save_final(model, routers)
        routed = {name: {"accuracy_matrix": rows_of[f"routed:{name}"],
                         "scores": continual_scores(rows_of[f"routed:{name}"]),
                         "routing_accuracy": rows_of[f"routing:{name}"],
                         "routing_accuracy_last": sum(rows_of[f"routing:{name}"][-1]) / len(self.tasks)}
                  for name in routers}
        return self._result(rows_of["given"], stages, routed or None)

    def _start_over(self) -> None:
        """Refuse a directory holding a finished run; remove the stages an interrupted one left (not resumable)."""
        if (self.output_dir / "results.json").is_file():
            raise InputError(f"{self.output_dir} holds a finished continual run (results.json): choose another "
                             "output_dir", field="output_dir")
        if self.is_main and (self.output_dir / STAGES_DIR).is_dir():
            print(f"removing the stages of an interrupted run in {self.output_dir / STAGES_DIR} (a sequence starts "
                  "over)", file=sys.stderr)
            shutil.rmtree(self.output_dir / STAGES_DIR)
        distributed_state().wait_for_everyone()

    def _result(self, matrix, stages, routed=None) -> ContinualResult:
        return ContinualResult(self.options.strategy, [task.name for task in self.tasks], matrix,
                               continual_scores(matrix), stages,
                               {task.name: task.test_dropped_as_training for task in self.tasks}, routed)

    # ---------------------------------------------------------------------------------------------------- models
    def _model_for(self, position: int, model):
        """The model that trains the task at `position`: the backbone with the config's adapter first (named after
        the task for ``adapter_per_task``); then the same model (``sequential``, ``replay``), a new named adapter made
        the active and only trainable one (``adapter_per_task``), or a new adapter on the merged backbone (``osf``,
        ``orthogonal_lora``)."""
        strategy, config = self.options.strategy, self.config
        name = self.tasks[position].name if strategy != "joint" else "joint"
        method_args = dict(config.method_args)
        if strategy == "osf":
            method_args["effective_rank"] = self.options.osf_rank(position)
        if model is None:
            model, self.tokenizer = build_model(config.replace(method_args=method_args),
                                                adapter_name=name if strategy == "adapter_per_task" else "default")
            return model
        if strategy == "adapter_per_task":
            model.add_adapter(name, default_config(model.get_base_model(), config.method, "seq_cls", **method_args))
            model.set_adapter(name)
        elif strategy in MERGED_PER_TASK:
            model = attach(model.merge_and_unload(), config.method, task="seq_cls", **method_args)
        return model

    def _train_stage(self, model, name: str, position: int, rows: Sequence[tuple[str, int]]) -> tuple[Any, dict]:
        """Train `model` on `rows` as one run under ``stages/<position>-<name>``; returns the model and the stage's
        record."""
        stage_dir = self.output_dir / STAGES_DIR / f"{position}-{name}"
        config = self.config.replace(output_dir=str(stage_dir), resume_from=None)
        dataset = labelled_text_dataset(self.tokenizer, rows, config.max_length)
        penalty_before = self._penalty_now(model)
        with trained_labels_only(model, self._trained_labels(position)):
            result = train(config, model, self.tokenizer, dataset, DataCollatorWithPadding(self.tokenizer),
                           regulariser=self._penalty)
        if self.is_main:
            shutil.rmtree(stage_dir / "checkpoints", ignore_errors=True)  # a sequence is not resumed half-way
        adapter_dir = result.adapter_dir / name if (result.adapter_dir / name).is_dir() else result.adapter_dir
        stage = {
            "task": name,
            "train_examples": len(rows),
            "global_step": result.global_step,
            "trainable_params": result.parameters.trainable_params,
            "total_params": result.parameters.total_params,
            "adapter_bytes": directory_bytes(adapter_dir),
            "train_seconds": round(result.train_seconds, 2),
            "step_seconds": round(result.step_seconds, 2),
            "peak_memory_mb": result.peak_memory_mb,
            "mixed_precision": result.mixed_precision,
            "world_size": result.world_size,
        }
        if self.options.strategy == "osf":
            stage["effective_rank"] = self.options.osf_rank(position)
        if self._penalty is not None:  # the new adapter's overlap with the earlier tasks', before and after training
            stage["orthogonality_penalty"] = {"start": penalty_before, "end": self._penalty_now(model)}
        return model, stage

    def _penalty_now(self, model) -> Optional[float]:
        if self._penalty is None:
            return None
        with torch.no_grad():
            return float(self._penalty(model))

    def _trained_labels(self, position: int) -> list[int]:
        """The labels a stage's loss ranges over: an adapter of ``adapter_per_task``, its own task's; a single head,
        every label seen so far (an expanding head: the labels of tasks still to come are masked, so they are not
        trained down as negatives before their task arrives); joint training, all of them."""
        if self.options.strategy == "adapter_per_task":
            return self.tasks[position].label_ids
        seen = self.tasks if self.options.strategy == "joint" else self.tasks[: position + 1]
        return sorted({label for task in seen for label in task.label_ids})

    # ------------------------------------------------------------------------------------------------ evaluation
    def _evaluate_adapters(self, model, routers: dict[str, Router], encoder: SentenceEncoder,
                           seen: Sequence[ClassificationTask]) -> dict[str, list[float]]:
        """Per task trained so far: accuracy with its own adapter (``given``), and for each router the accuracy with
        the adapters it picked (``routed:<router>``) and how often it picked the task's own (``routing:<router>``)."""
        measured: dict[str, list[float]] = {"given": []}
        labels_of = {task.name: task.label_ids for task in seen}
        for task in seen:
            texts = [text for text, _ in task.test]
            model.set_adapter(task.name)
            given = predict(model, self.tokenizer, texts, self.config.max_length,
                            self.config.per_device_eval_batch_size, task.label_ids)
            measured["given"].append(share_right(given, task.test))
            if task.name not in self._test_embeddings:
                self._test_embeddings[task.name] = self._router_features(encoder, texts)
            chosen = {name: router.route(self._test_embeddings[task.name]) for name, router in routers.items()}
            # each row is predicted once per adapter, whichever routers picked it; the task's own adapter is done
            by_adapter = {task.name: dict(enumerate(given))}
            for adapter in sorted({a for picks in chosen.values() for a in picks} - {task.name}):
                rows = sorted({i for picks in chosen.values() for i, a in enumerate(picks) if a == adapter})
                model.set_adapter(adapter)
                by_adapter[adapter] = dict(zip(rows, predict(
                    model, self.tokenizer, [texts[i] for i in rows], self.config.max_length,
                    self.config.per_device_eval_batch_size, labels_of[adapter])))
            for name, picks in chosen.items():
                routed = [by_adapter[adapter][i] for i, adapter in enumerate(picks)]
                measured.setdefault(f"routed:{name}", []).append(share_right(routed, task.test))
                measured.setdefault(f"routing:{name}", []).append(sum(a == task.name for a in picks) / len(picks))
        model.set_adapter(seen[-1].name)
        return measured

    def _router_features(self, encoder: SentenceEncoder, texts: Sequence[str]) -> torch.Tensor:
        layers = None
        if self.options.router_layers == "all":
            layers = range(1, encoder.model.config.num_hidden_layers + 1)
        return encoder.encode(texts, max_length=self.config.max_length, layers=layers)

    # ---------------------------------------------------------------------------------------------------- saving
    def _save_final(self, model, routers: Optional[dict[str, Router]] = None) -> None:
        """``adapters/``: the final adapter(s) (and the routers), or for ``osf`` the merged model, atomically."""
        if not self.is_main:
            return

        def write(tmp: Path) -> None:
            model.save_pretrained(tmp, safe_serialization=True)
            self.tokenizer.save_pretrained(tmp)
            for name, router in (routers or {}).items():
                router.save(tmp / ROUTER_FILE.format(name=name))

        write_dir_atomically(self.output_dir / ADAPTERS_DIR, write)
