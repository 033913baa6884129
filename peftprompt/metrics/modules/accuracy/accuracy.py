"""Accuracy as an `evaluate` module, loaded from this file (no Hub access):
``peftprompt.metrics.load_metric("accuracy")`` or ``evaluate.load("<this folder>")``. The score itself is
``compute_score.accuracy``, shared with `peftprompt.metrics.accuracy`.
"""

import datasets
import evaluate

from .compute_score import accuracy

_DESCRIPTION = """
Accuracy: the fraction of predictions equal to their reference, in [0, 1].
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[int]`): Predicted labels.
    references (`list[int]`): Gold labels, as many as `predictions` (at least one).

Returns:
    `dict`: ``{"accuracy": float}``.

Examples:
    >>> metric = peftprompt.metrics.load_metric("accuracy")
    >>> metric.compute(predictions=[1, 0, 1, 1], references=[1, 1, 1, 0])
    {'accuracy': 0.5}
"""

_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    """Accuracy over integer labels."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references) -> dict:
        return {"accuracy": accuracy(predictions, references)}
