"""The task table: every fact about a task (``seq_cls``, ``token_cls``, ``causal_lm``, ``feature``) in one place.

Methods (PEFT task type, heads kept out of the adapter), backbones (auto class, heads kept unquantised), the
training config (valid tasks, ``num_labels``), the CLI (``--task`` choices) and shipping (pipeline tag, loading code,
task of a saved adapter) all read this table; nothing else lists the task names or the head names.

```py
>>> from peftprompt.tasks import TASKS, get_task
>>> get_task("token_cls").peft_task_type
<TaskType.TOKEN_CLS: 'TOKEN_CLS'>
>>> get_task("ner")
peftprompt.errors.InputError: unknown task 'ner'; choose one of seq_cls, token_cls, causal_lm, feature
```
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from peft import TaskType

from .compat import auto_class_names
from .errors import InputError


@dataclass(frozen=True)
class Task:
    """One task a backbone can be loaded for.

    Attributes:
        name: The name used everywhere (configs, CLI, `load_backbone`, `attach`).
        auto_class_name: The transformers auto class that loads a backbone with this task's head.
        model_class_suffix: The end of the model class name that identifies the task (`infer_task`); empty for
            ``feature``, the fallback.
        peft_task_type: The PEFT ``task_type`` of adapters for this task, which selects PEFT's model class.
        pipeline_tag: The Hugging Face pipeline tag of the model card and the merged export.
        head_names: Leaf names of the output layers this task puts on the backbone. They are never adapted and
            stay unquantised in 8-bit / 4-bit backbones.
        classification: The head is a fresh classifier of ``num_labels`` classes: ``num_labels`` is required, and
            the head is trained in full and saved with the adapter (PEFT's ``modules_to_save``).
        labels: What the training labels are: ``"example"`` (one class per sequence), ``"token"`` (one class per
            token, ``-100`` ignored) or ``"next_token"`` (the input ids, shifted by one inside the loss); None where
            the task has no labels (``feature``), which the training engine therefore does not train.
    """

    name: str
    auto_class_name: str
    model_class_suffix: str
    peft_task_type: Optional[TaskType]
    pipeline_tag: str
    head_names: tuple[str, ...]
    classification: bool
    labels: Optional[str]

    @property
    def trainable(self) -> bool:
        """The training engine trains this task (it has labels)."""
        return self.labels is not None

    @property
    def auto_class(self) -> type:
        """The transformers auto class (imported on first use)."""
        import transformers

        return getattr(transformers, self.auto_class_name)

    @property
    def saved_head_names(self) -> tuple[str, ...]:
        """The heads trained in full and saved with the adapter (the classification heads; none otherwise)."""
        return self.head_names if self.classification else ()


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task("seq_cls", "AutoModelForSequenceClassification", "ForSequenceClassification", TaskType.SEQ_CLS,
             "text-classification", ("classifier", "score"), classification=True, labels="example"),
        Task("token_cls", "AutoModelForTokenClassification", "ForTokenClassification", TaskType.TOKEN_CLS,
             "token-classification", ("classifier", "score"), classification=True, labels="token"),
        Task("causal_lm", "AutoModelForCausalLM", "ForCausalLM", TaskType.CAUSAL_LM,
             "text-generation", ("lm_head",), classification=False, labels="next_token"),
        # No head: PEFT's FEATURE_EXTRACTION model class returns the hidden states.
        Task("feature", "AutoModel", "", TaskType.FEATURE_EXTRACTION,
             "feature-extraction", (), classification=False, labels=None),
    )
}
TASK_NAMES: tuple[str, ...] = tuple(TASKS)
TRAINABLE_TASKS: tuple[str, ...] = tuple(name for name, task in TASKS.items() if task.trainable)
CLASSIFICATION_TASKS: tuple[str, ...] = tuple(name for name, task in TASKS.items() if task.classification)


def _union(groups) -> tuple[str, ...]:
    return tuple(dict.fromkeys(name for group in groups for name in group))


# Every task's output layers (never adapted), and those trained in full and saved with an adapter.
HEAD_NAMES: tuple[str, ...] = _union(task.head_names for task in TASKS.values())
SAVED_HEAD_NAMES: tuple[str, ...] = _union(task.saved_head_names for task in TASKS.values())
# Modules a quantised backbone keeps in full precision: the heads, and BERT's pooler, which feeds the seq_cls head.
UNQUANTISED_MODULES: tuple[str, ...] = (*HEAD_NAMES, "pooler")


def get_task(name: str) -> Task:
    """The `Task` called `name`; for anything else a one-line `InputError` (a `ValueError`) listing the valid
    names."""
    try:
        return TASKS[name]
    except (KeyError, TypeError):
        raise InputError(f"unknown task {name!r}; choose one of {', '.join(TASK_NAMES)}", field="task") from None


def task_for_peft_type(task_type) -> Optional[Task]:
    """The `Task` whose PEFT ``task_type`` is `task_type` (a `TaskType` or its string), or None."""
    for task in TASKS.values():
        if task.peft_task_type is not None and task.peft_task_type == task_type:
            return task
    return None


def infer_task(model) -> str:
    """Guess the task from the model class: its name (``...ForSequenceClassification`` -> ``"seq_cls"``, ...), or
    the class its auto class builds for its ``model_type`` (GPT-2's ``GPT2LMHeadModel`` -> ``"causal_lm"``)."""
    class_name = type(model).__name__
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for task in TASKS.values():
        if not task.model_class_suffix:
            continue
        auto_names = auto_class_names(task.auto_class_name)
        if class_name.endswith(task.model_class_suffix) or auto_names.get(model_type) == class_name:
            return task.name
    return next(task.name for task in TASKS.values() if not task.model_class_suffix)


__all__ = [
    "CLASSIFICATION_TASKS",
    "HEAD_NAMES",
    "SAVED_HEAD_NAMES",
    "TASKS",
    "TASK_NAMES",
    "TRAINABLE_TASKS",
    "Task",
    "UNQUANTISED_MODULES",
    "get_task",
    "infer_task",
    "task_for_peft_type",
]
