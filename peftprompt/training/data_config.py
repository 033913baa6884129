"""The ``data`` section of a training config: one typed model per kind of recipe, picked by the config itself.

- `SelfAskData` (``recipes/selfask_sft.py``): ``task: causal_lm``;
- `ClassificationData` (``recipes/sst2_classification.py``): ``task: seq_cls`` without ``data.strategy``;
- `NerData` (``recipes/conll03_ner.py``): ``task: token_cls``;
- `ContinualData` (``recipes/continual_classification.py``): ``data.strategy`` is given (with ``task: seq_cls``).

`TrainConfig` turns its ``data`` mapping into the section `data_section` picks and validates it there, once, so
every reader of a config (the recipes, the continual learner, the benchmarks' run matching) gets typed values with
their defaults filled in (``config.data.eval_max_depth``) and a bad value is refused when the config is loaded, with
the key's ``file:line`` and the field path (``data.eval_max_depth``), a did-you-mean for an unknown key
(`peftprompt.training.validation`). A section's `DataSection.config_problem` refuses combinations with the rest of
the config (``data.packing: true`` with prompt tuning, ``strategy: osf`` without method ``osf``).

The names a section checks come from the modules that use them (`peftprompt.recursive.unroll.MODES`,
`peftprompt.retrieval.passages.OPEN_BOOK_SOURCES`), except the continual ones: `peftprompt.continual` imports
`peftprompt.training`, so `STRATEGIES` lives here (`peftprompt.continual` re-exports it) and `CONTINUAL_TASKS`
repeats the task names of `peftprompt.continual.tasks` (a unit test keeps the two equal).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, ClassVar

from pydantic import Field, field_validator, model_validator

from ..errors import InputError
from ..methods import PROMPT_LEARNING_METHODS
from ..recursive.unroll import MODES
from ..retrieval.passages import OPEN_BOOK_SOURCES
from .validation import Bool, ConfigModel, Float, Int, Name, Names, one_of

DEFAULT_SOURCES = ("musique", "probtree_hotpotqa", "probtree_musique", "2wikimultihopqa")
DEFAULT_EVAL_SOURCES = ("probtree_2wiki",)
STRATEGIES = ("sequential", "replay", "adapter_per_task", "osf", "orthogonal_lora", "joint")
"""The continual-learning strategies (`peftprompt.continual.learner` implements them)."""
CONTINUAL_TASKS = ("agnews", "amazon", "yelp", "dbpedia", "sst2")
"""The tasks of the continual benchmark, as `peftprompt.continual.tasks.TASK_NAMES` names them."""

UnrollMode = one_of(MODES)
Packing = one_of((True, False, "auto"))
Knowledge = one_of(("leaves", "all"))
OpenBookSource = one_of(OPEN_BOOK_SOURCES)
Strategy = one_of(STRATEGIES)
ContinualTask = one_of(CONTINUAL_TASKS)
RouterLayers = one_of(("all", "last"))
Share = Annotated[Float, Field(gt=0, lt=1)]


class DataSection(ConfigModel):
    """A ``data`` section: the base of every recipe's, with no keys of its own. Its errors name ``data.<key>``."""

    field_prefix: ClassVar[str] = "data"
    kind: ClassVar[str] = "empty"
    """What the section is for, in messages: ``"self-ask"``, ``"continual"``..."""
    picked_by: ClassVar[str] = ""
    """When `data_section` picks it, in messages."""

    @classmethod
    def known_keys(cls) -> str:
        keys = ", ".join(cls.model_fields) or "none"
        return f" (a {cls.kind} data section, picked by {cls.picked_by}; its keys: {keys})"

    def config_problem(self, config: Any) -> InputError | None:
        """What does not work in `config` (the `TrainConfig` holding this section) with this section, naming the
        field to change; None when nothing. `TrainConfig` raises it when it is built."""
        return None


class SelfAskData(DataSection):
    """``recipes/selfask_sft.py``: the trees and reader episodes trained on, how they become rows, and the self-ask
    scoring of the held-out trees (see the recipe's docstring).

    Attributes:
        sources: Tree sources (`peftprompt.recursive.SOURCES` names or ``.jsonl`` files of trees); ``[]`` with
            `reader_sources` trains a reader-only adapter.
        eval_sources: The held-out trees, scored by loss (and by self-ask with `generate_eval`).
        mode: How trees unroll into episodes (`peftprompt.recursive.unroll.MODES`).
        leaf_episodes: ``recursive`` / ``mix``: also a ``No.`` episode per leaf.
        operator_steps: Keep comparison trees' operator steps (computed, masked); false trains comparing in words.
        mirror_comparisons: Also train on every date comparison asked the other way round ("born first" ->
            "born later", the other answer; `peftprompt.recursive.operator_steps.mirrored_comparison`), so
            ``earlier`` and ``later`` are asked equally often.
        allow_evaluation_only: Let evaluation-only sets (Compositional Celebrities, Bamboogle) be trained on.
        packing: Pack episodes into rows; ``auto``: packed unless the method is prompt learning.
        generate_eval: Held-out questions answered by self-ask at each evaluation (0: none).
        eval_answerers: Who answers those follow-ups, one name per layer, the last repeating.
        eval_knowledge: What the retriever knows: the trees' ``leaves`` or ``all`` nodes.
        eval_max_depth: How deep the model self-asks what the answerers cannot answer.
        reader_sources: Open-book sources of reader episodes (train split).
        reader_passages / reader_max_words: Paragraphs per reader episode, and words kept of each.
        reader_unanswerable: The share of extra reader episodes without their gold paragraphs.
    """

    kind: ClassVar[str] = "self-ask"
    picked_by: ClassVar[str] = "task causal_lm"

    sources: list[Name] = Field(default_factory=lambda: list(DEFAULT_SOURCES))
    eval_sources: list[Name] = Field(default_factory=lambda: list(DEFAULT_EVAL_SOURCES))
    mode: UnrollMode = "recursive"
    leaf_episodes: Bool = True
    operator_steps: Bool = True
    mirror_comparisons: Bool = False
    allow_evaluation_only: Bool = False
    packing: Packing = "auto"
    generate_eval: Int = Field(0, ge=0)
    eval_answerers: Names = Field(default_factory=lambda: ["operators+retriever"], min_length=1)
    eval_knowledge: Knowledge = "leaves"
    eval_max_depth: Int = Field(2, ge=0)
    reader_sources: list[OpenBookSource] = Field(default_factory=list)
    reader_passages: Int = Field(3, ge=1)
    reader_max_words: Int = Field(120, ge=1)
    reader_unanswerable: Float = Field(0.0, ge=0, le=1)

    @model_validator(mode="after")
    def _something_to_train_on(self) -> SelfAskData:
        if not self.sources and not self.reader_sources:
            raise InputError(
                "nothing to train on: data.sources is empty and data.reader_sources is not given; name "
                "tree sources, reader sources (a reader-only adapter), or both",
                field="data.sources",
            )
        return self

    def config_problem(self, config: Any) -> InputError | None:
        if self.packing is True and config.method in PROMPT_LEARNING_METHODS:
            return InputError(
                f"data.packing=true with method {config.method}: its packed episodes would attend to "
                "each other (PEFT drops prompt tuning's and P-tuning's position_ids, prefix tuning's "
                "past_key_values turn off the block-diagonal mask); use data.packing=auto or false",
                field="data.packing",
            )
        return None


class ClassificationData(DataSection):
    """``recipes/sst2_classification.py``.

    Attributes:
        eval_min_words: Keep only the validation rows of at least this many words (0: all).
    """

    kind: ClassVar[str] = "classification"
    picked_by: ClassVar[str] = "task seq_cls without data.strategy"

    eval_min_words: Int = Field(0, ge=0)


class NerData(DataSection):
    """``recipes/conll03_ner.py``: no keys (the CoNLL-2003 splits are fixed; sizes are ``max_*_samples``)."""

    kind: ClassVar[str] = "NER"
    picked_by: ClassVar[str] = "task token_cls"


class ContinualData(DataSection):
    """``recipes/continual_classification.py``: the strategy, the task order and their sizes
    (`peftprompt.continual.ContinualLearner`).

    Attributes:
        strategy: One of `STRATEGIES`.
        tasks: The task order, names of `CONTINUAL_TASKS` (each once).
        train_per_task / test_per_task: Rows sampled from each task's training / test split (``None``: all).
        replay_fraction: ``replay``: the share of each finished task's training rows trained again with each later
            task.
        router_examples: ``adapter_per_task``: training rows per task whose embeddings the routers learn from.
        router_layers: ``adapter_per_task``: what the routers read of each text: ``all`` (the mean-pooled output of
            every layer of the frozen backbone, concatenated) or ``last`` (the sentence embedding alone).
        osf_effective_rank: ``osf``: the frozen share of each weight's singular directions for the first and the
            last task (linear in between).
        orthogonal_weight: ``orthogonal_lora``: the weight of the orthogonality penalty (O-LoRA's lambda_1).
    """

    kind: ClassVar[str] = "continual"
    picked_by: ClassVar[str] = "data.strategy, with task seq_cls"

    strategy: Strategy
    tasks: list[ContinualTask] = Field(min_length=1)
    train_per_task: Int | None = Field(2000, ge=1)
    test_per_task: Int | None = Field(500, ge=1)
    replay_fraction: Float = Field(0.02, ge=0, le=1)
    router_examples: Int = Field(1000, ge=1)
    router_layers: RouterLayers = "all"
    osf_effective_rank: list[Share] = Field(default_factory=lambda: [0.3, 0.7], min_length=2, max_length=2)
    orthogonal_weight: Float = Field(0.5, ge=0)

    @field_validator("tasks")
    @classmethod
    def _each_task_once(cls, tasks: list[str]) -> list[str]:
        twice = sorted({task for task in tasks if tasks.count(task) > 1})
        if twice:
            raise ValueError(
                f"names {', '.join(map(repr, twice))} more than once; list each task once, in training order"
            )
        return tasks

    def config_problem(self, config: Any) -> InputError | None:
        if config.task != "seq_cls":
            return InputError(
                f"continual learning trains sequence classifiers: task must be 'seq_cls', got {config.task!r}",
                field="task",
            )
        if config.resume_from is not None:
            return InputError(
                "a task sequence is not resumed half-way: leave resume_from out (an interrupted run starts over)",
                field="resume_from",
            )
        if self.strategy == "osf" and config.method != "osf":
            return InputError(
                f"strategy 'osf' trains PEFT's OSF adapters: set method: osf (got {config.method!r})", field="method"
            )
        if self.strategy == "orthogonal_lora" and config.method != "lora":
            return InputError(
                f"strategy 'orthogonal_lora' trains LoRA adapters: set method: lora (got {config.method!r})",
                field="method",
            )
        if self.strategy == "adapter_per_task" and config.method == "full":
            return InputError("strategy 'adapter_per_task' needs an adapter method, not 'full'", field="method")
        return None

    def osf_rank(self, position: int) -> float:
        """The frozen share of singular directions for the task at `position` of the sequence."""
        first, last = self.osf_effective_rank
        steps = len(self.tasks) - 1
        return first if steps == 0 else round(first + (last - first) * position / steps, 6)


SECTIONS: dict[str, type[DataSection]] = {
    "causal_lm": SelfAskData,
    "seq_cls": ClassificationData,
    "token_cls": NerData,
}
"""The section of each trainable task's configs (`peftprompt.tasks.TRAINABLE_TASKS`), but continual ones."""


def data_section(task: str, data: Mapping[str, Any]) -> type[DataSection]:
    """The section a config of `task` whose ``data`` mapping is `data` reads: `ContinualData` when it names a
    ``strategy``, else the task's (`SECTIONS`)."""
    return ContinualData if "strategy" in data else SECTIONS[task]
