"""Evaluation metrics as `evaluate` modules shipped in the package: accuracy, seqeval entity F1 (CoNLL-2003) and
SQuAD exact match / token F1, loaded from their files (no Hub access), and any user module by path.

```py
>>> from peftprompt.metrics import combine_metrics, load_metric
>>> load_metric("accuracy").compute(predictions=[1, 0, 1, 1], references=[1, 1, 1, 0])
{'accuracy': 0.5}
>>> combine_metrics(["accuracy", "path/to/my_metric"])   # evaluate.combine: one compute() for both
```

Each packaged module is a folder under ``peftprompt/metrics/modules/`` holding ``<name>.py`` (the `evaluate.Metric`)
and ``compute_score.py`` (the score, standard library and seqeval only), which ``<name>.py`` imports relatively as
`evaluate`'s loader allows, so ``evaluate.load("<that folder>")`` works too. The functions below are the ones in
``compute_score.py``, shared and not copied: the engine's accuracy, the self-ask evaluation's per-question
`exact_match` / `token_f1` and the CoNLL reader's `iob1_to_iob2` compute what the modules compute.

- ``accuracy``: the fraction of equal pairs (the number ``sklearn.metrics.accuracy_score`` gives).
- ``seqeval``: seqeval's entity precision / recall / F1, conlleval scoring by default (the CoNLL-2003 measure),
  ``mode="strict"`` for strict IOB2 matching, ``scheme="IOB1"`` to convert IOB1 tags first; per-type scores and
  entity counts (see `entity_f1`).
- ``squad``: SQuAD-normalised exact match and token F1, best over each question's aliases, as fractions.

Importing this package is cheap: `evaluate` (which imports transformers' pipelines, several seconds) is imported
only by `load_metric` / `combine_metrics`, and seqeval only when entities are scored.
"""

from __future__ import annotations

import numbers
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Collection, Mapping, Optional, Sequence, Union

from .modules.accuracy.compute_score import accuracy
from .modules.seqeval.compute_score import ENTITY_MODES, ENTITY_SCHEMES, entity_f1, iob1_to_iob2
from .modules.squad.compute_score import exact_match, normalize_answer, qa_scores, token_f1

if TYPE_CHECKING:
    import evaluate

PACKAGED_METRICS = ("accuracy", "seqeval", "squad")
MODULES_DIR = Path(__file__).resolve().parent / "modules"


def metric_script(name_or_path: Union[str, os.PathLike]) -> Path:
    """The ``.py`` file of a packaged metric (by name) or of a user's `evaluate` module (a ``.py`` file, or a folder
    holding ``<folder name>.py``).

    A packaged name wins over a folder of the same name in the working directory: write ``./accuracy`` for that.

    Raises:
        `ValueError`: one line naming `name_or_path`, when it is neither.
    """
    text = os.fspath(name_or_path)
    if text in PACKAGED_METRICS:
        return MODULES_DIR / text / f"{text}.py"
    if not text.strip():
        raise ValueError("metric name or path is empty")
    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix != ".py":
            raise ValueError(f"metric {text!r} is a file but not a .py evaluate module")
        return path.resolve()
    if path.is_dir():
        script = path.resolve() / f"{path.resolve().name}.py"
        if not script.is_file():
            raise ValueError(f"metric folder {text!r} holds no {script.name} (an evaluate module folder holds "
                             "<folder name>.py)")
        return script
    raise ValueError(f"metric {text!r} is neither a packaged metric ({', '.join(PACKAGED_METRICS)}) nor an existing "
                     "evaluate module (a .py file or a folder holding <folder name>.py)")


def load_metric(name_or_path: Union[str, os.PathLike], **load_kwargs: Any) -> "evaluate.EvaluationModule":
    """Load a metric as an `evaluate` module, offline: a packaged one (``accuracy``, ``seqeval``, ``squad``) from its
    file in this package, anything else from the user's own module file or folder.

    Args:
        name_or_path (`str` or `os.PathLike`): A packaged metric's name, or the path of an `evaluate` module (a
            ``.py`` file, or a folder holding ``<folder name>.py``).
        load_kwargs: Passed to `evaluate.load` (``config_name``, ``experiment_id``, the module's own init arguments,
            ...). ``keep_in_memory`` defaults to True: the inputs stay in memory (no cache file, no file lock), so
            several processes can each compute.

    Returns:
        `evaluate.EvaluationModule`: call ``.compute(predictions=..., references=...)``.

    Raises:
        `ValueError`: an unknown name or a missing path (see `metric_script`).
    """
    script = metric_script(name_or_path)
    import evaluate

    load_kwargs.setdefault("keep_in_memory", True)
    return evaluate.load(str(script), **load_kwargs)


def combine_metrics(
    names_or_paths: Sequence[Union[str, os.PathLike]], force_prefix: bool = False
) -> "evaluate.CombinedEvaluations":
    """`load_metric` each of `names_or_paths` and combine them with `evaluate.combine`: one ``compute`` call feeds the
    same predictions and references to every module and merges their results (a key two modules share is prefixed
    with the module's name, every key with `force_prefix`).

    Raises:
        `ValueError`: no metric given, or an unknown name / missing path.
    """
    if isinstance(names_or_paths, (str, os.PathLike)):
        names_or_paths = [names_or_paths]
    if not names_or_paths:
        raise ValueError("combine_metrics: no metric given")
    modules = [load_metric(name) for name in names_or_paths]
    import evaluate

    return evaluate.combine(modules, force_prefix=force_prefix)


def flat_scores(
    results: Mapping[str, Any],
    rename: Optional[Mapping[str, str]] = None,
    leave_out: Collection[str] = (),
) -> dict[str, Union[int, float]]:
    """The numbers of a ``compute`` result, ready for a training log: top-level keys in `leave_out` dropped, the others
    renamed by `rename`, nested mappings flattened with dots (``per_type.PER.f1``); strings, lists and other values
    that are not one number are left out."""
    rename = rename or {}
    flat: dict[str, Union[int, float]] = {}

    def add(key: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for inner, inner_value in value.items():
                add(f"{key}.{inner}", inner_value)
        elif isinstance(value, numbers.Real) and not isinstance(value, bool):
            flat[key] = int(value) if isinstance(value, numbers.Integral) else float(value)

    for key, value in results.items():
        if key not in leave_out:
            add(rename.get(key, key), value)
    return flat


__all__ = [
    "ENTITY_MODES",
    "ENTITY_SCHEMES",
    "MODULES_DIR",
    "PACKAGED_METRICS",
    "accuracy",
    "combine_metrics",
    "entity_f1",
    "exact_match",
    "flat_scores",
    "iob1_to_iob2",
    "load_metric",
    "metric_script",
    "normalize_answer",
    "qa_scores",
    "token_f1",
]
