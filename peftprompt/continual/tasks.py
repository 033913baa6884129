"""The classification tasks of the continual-learning benchmark, over one shared label space.

Five tasks, read from the shared data folder (`peftprompt.data.data_root`): AG News (news topic), Amazon and Yelp
(review stars), DBpedia (ontology class) from ``cl_benchmark/`` (the 5-task benchmark of MbPA++ / IDBR / O-LoRA,
without Yahoo), and SST-2 (``sst2/``).

Splits (``cl_benchmark/SOURCE.md``):

- ``agnews``, ``amazon``: their own ``<task>_train.json`` and ``<task>_test.json``.
- ``yelp`` has only a train file and ``dbpedia`` only a test file: each is shuffled with a fixed seed
  (`SPLIT_SEED`) and its first `HELD_OUT_SHARE` (20 %) is the test part, the rest the training part.
- ``sst2``: ``train.tsv`` rows of at least `SST2_MIN_WORDS` words (GLUE's training phrases are mostly fragments;
  these are sentence-like) and all of ``test.tsv`` (698 sentences).

Labels: one id per label of `label_space()`, ``"<group>/<label text>"``. Amazon and Yelp share the group ``stars``
and so their five labels, as in the original benchmark; SST-2's ``negative`` / ``positive`` are labels of their own
(binary sentiment is not the five-level scale's "negative"). 4 + 5 + 14 + 2 = 25 labels: every strategy predicts
over all of them, whether or not it knows the task.

```py
>>> task = load_task("agnews", train_size=2000, test_size=500)
>>> task.train[0]             # (text, id in label_space())
>>> [label_space()[i] for i in task.label_ids]
['agnews/World', 'agnews/Sports', 'agnews/Business', 'agnews/Science or Technology']
```
"""

from __future__ import annotations

import functools
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..data import data_root, read_sst2
from ..errors import InputError, InputFileNotFoundError
from ..recursive.tree import question_key

BENCHMARK_DIR = "cl_benchmark"
SPLIT_SEED = 0
"""The seed of the fixed train / test split of ``yelp`` and ``dbpedia`` (never changed by a run's seed)."""
HELD_OUT_SHARE = 0.2
SST2_MIN_WORDS = 10
SST2_LABELS = ("negative", "positive")


@dataclass(frozen=True)
class TaskSource:
    """Where a task's rows come from: its label group and which files hold its train and test rows (``None``: cut
    from the other file)."""

    group: str
    train_file: Optional[str]
    test_file: Optional[str]


TASK_SOURCES: dict[str, TaskSource] = {
    "agnews": TaskSource("agnews", "agnews_train.json", "agnews_test.json"),
    "amazon": TaskSource("stars", "amazon_train.json", "amazon_test.json"),
    "yelp": TaskSource("stars", "yelp_train.json", None),
    "dbpedia": TaskSource("dbpedia", None, "dbpedia_test.json"),
    "sst2": TaskSource("sst2", None, None),  # sst2/train.tsv and sst2/test.tsv
}
TASK_NAMES = tuple(TASK_SOURCES)


@dataclass
class ClassificationTask:
    """One task of a sequence: its rows as ``(text, label id)`` pairs, ids indexing `label_space()`.

    Attributes:
        name: A name of `TASK_NAMES`.
        label_ids: The ids of this task's labels, in the order of its label file.
        train, test: The rows, each ``(text, label id)``.
        test_dropped_as_training: Test rows left out because their normalised text is also a training row's.
    """

    name: str
    label_ids: list[int]
    train: list[tuple[str, int]]
    test: list[tuple[str, int]]
    test_dropped_as_training: int = 0


def _label_file(task: str) -> Path:
    return data_root() / BENCHMARK_DIR / f"{task}_labels.json"


def task_labels(task: str) -> list[str]:
    """The label texts of `task`, in the order of its ``<task>_labels.json`` (SST-2: negative, positive)."""
    _check_name(task)
    if task == "sst2":
        return list(SST2_LABELS)
    path = _label_file(task)
    labels = _read_json(path)
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) and x for x in labels):
        raise InputError("expected a JSON list of label texts", file=path)
    return labels


@functools.cache
def label_space() -> tuple[str, ...]:
    """Every task's labels as ``"<group>/<label>"``, tasks in `TASK_NAMES` order, each group's labels once: the
    classes every model of the benchmark predicts (read once per process)."""
    space: list[str] = []
    for task in TASK_NAMES:
        for label in task_labels(task):
            key = f"{TASK_SOURCES[task].group}/{label}"
            if key not in space:
                space.append(key)
    return tuple(space)


def load_task(name: str, train_size: Optional[int] = None, test_size: Optional[int] = None,
              seed: int = 0) -> ClassificationTask:
    """Read task `name` with its fixed split (module docstring), drop the test rows whose normalised text
    (`question_key`) is also a training row's, then sample `train_size` training and `test_size` test rows (all when
    ``None`` or larger than the split) with `seed`; sampled rows keep their file order.

    Raises:
        `InputError`: an unknown task, or a row without a non-empty ``sentence`` or with a label its label file does
            not list (naming the file, the row and the field).
    """
    _check_name(name)
    group = TASK_SOURCES[name].group
    label_ids = [label_space().index(f"{group}/{label}") for label in task_labels(name)]
    if name == "sst2":
        train = [(text, label_ids[label]) for text, label in read_sst2("train", min_words=SST2_MIN_WORDS)]
        test = [(text, label_ids[label]) for text, label in read_sst2("test")]
    else:
        train, test = _benchmark_split(name, label_ids)
    seen = {question_key(text) for text, _ in train}
    fresh = [row for row in test if question_key(row[0]) not in seen]
    return ClassificationTask(name, label_ids, _sample(train, train_size, f"{seed}/{name}/train"),
                              _sample(fresh, test_size, f"{seed}/{name}/test"), len(test) - len(fresh))


def _benchmark_split(name: str, label_ids: list[int]) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    source = TASK_SOURCES[name]
    ids = dict(zip(task_labels(name), label_ids))
    files = [f for f in (source.train_file, source.test_file) if f is not None]
    rows = {f: _read_rows(data_root() / BENCHMARK_DIR / f, ids) for f in files}
    if source.train_file and source.test_file:
        return rows[source.train_file], rows[source.test_file]
    only = rows[files[0]]
    order = list(range(len(only)))
    random.Random(SPLIT_SEED).shuffle(order)
    held_out = set(order[: round(HELD_OUT_SHARE * len(only))])
    train = [row for i, row in enumerate(only) if i not in held_out]
    test = [row for i, row in enumerate(only) if i in held_out]
    return train, test


def _read_rows(path: Path, ids: dict[str, int]) -> list[tuple[str, int]]:
    data = _read_json(path)
    if not isinstance(data, list):
        raise InputError("expected a JSON list of {\"label\": ..., \"sentence\": ...} rows", file=path)
    rows = []
    for number, row in enumerate(data, start=1):
        where = f"row {number}"
        if not isinstance(row, dict):
            raise InputError(f"{where}: expected an object with 'label' and 'sentence'", file=path)
        text = row.get("sentence")
        if not isinstance(text, str) or not text.strip():
            raise InputError(f"{where}: field 'sentence' must be a non-empty string, got {text!r}", file=path,
                             field="sentence")
        label = row.get("label")
        if label not in ids:
            raise InputError(f"{where}: field 'label' must be one of {sorted(ids)}, got {label!r}", file=path,
                             field="label")
        rows.append((text.strip(), ids[label]))
    return rows


def _read_json(path: Path):
    if not path.is_file():
        raise InputFileNotFoundError(f"{path} does not exist (see {BENCHMARK_DIR}/SOURCE.md)", file=path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise InputError(f"not valid JSON: {err.msg} (column {err.colno})", file=path, line=err.lineno) from err


def _sample(rows: list, size: Optional[int], seed: str) -> list:
    if size is None or size >= len(rows):
        return list(rows)
    kept = sorted(random.Random(seed).sample(range(len(rows)), size))
    return [rows[i] for i in kept]


def _check_name(name: str) -> None:
    if name not in TASK_SOURCES:
        raise InputError(f"unknown task {name!r}; choose from {', '.join(TASK_NAMES)}", field="tasks")
