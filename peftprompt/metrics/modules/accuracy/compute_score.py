"""Accuracy, the one implementation: the packaged `evaluate` module (``accuracy.py``) and
`peftprompt.metrics.accuracy` both call `accuracy` here. Standard library only, so importing it is cheap."""

from __future__ import annotations

from typing import Any, Sequence


def accuracy(predictions: Sequence[Any], references: Sequence[Any]) -> float:
    """Fraction of `predictions` equal to `references`, in [0, 1].

    The same number as ``sklearn.metrics.accuracy_score`` (and the Hub's ``accuracy`` module) for one label per
    example: the count of equal pairs divided by the count of pairs, both exact, so one rounding.

    Raises:
        `ValueError`: the two lengths differ, or there is nothing to score.
    """
    if len(predictions) != len(references):
        raise ValueError(f"accuracy: {len(predictions)} predictions for {len(references)} references")
    if len(references) == 0:
        raise ValueError("accuracy: no references to score")
    return sum(bool(p == r) for p, r in zip(predictions, references)) / len(references)
