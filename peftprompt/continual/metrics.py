"""Continual-learning scores of an accuracy matrix.

``matrix[i][j]`` is the accuracy on task ``j``'s test set after training on task ``i`` of the sequence (tasks in
training order); entries not measured are ``None`` (a task not yet trained). A strategy that trains once on every
task (joint training) has one row.

- average accuracy: the mean of the last row;
- backward transfer (Lopez-Paz & Ranzato, 2017): the mean over every task but the last of
  ``matrix[-1][j] - matrix[j][j]`` (negative: accuracy lost after training later tasks);
- forgetting (Chaudhry et al., 2018): the mean over every task but the last of its best accuracy before the last
  task minus its last accuracy, ``max(matrix[l][j] for j <= l < T - 1) - matrix[-1][j]`` (>= 0 when measured).

```py
>>> continual_scores([[0.9, None], [0.7, 0.8]])
{'average_accuracy': 0.75, 'backward_transfer': -0.2, 'forgetting': 0.2}
```
"""

from __future__ import annotations

from typing import Optional, Sequence

Matrix = Sequence[Sequence[Optional[float]]]


def average_accuracy(matrix: Matrix) -> float:
    """The mean accuracy over every task after the last one was trained (the last row)."""
    last = _row(matrix, -1)
    return sum(last) / len(last)


def backward_transfer(matrix: Matrix) -> Optional[float]:
    """How the last task's training changed the earlier tasks' accuracy on average; ``None`` with a single row."""
    if len(matrix) < 2:
        return None
    last = _row(matrix, -1)
    return sum(last[j] - _entry(matrix, j, j) for j in range(len(matrix) - 1)) / (len(matrix) - 1)


def forgetting(matrix: Matrix) -> Optional[float]:
    """The mean drop from each earlier task's best accuracy to its last one; ``None`` with a single row."""
    if len(matrix) < 2:
        return None
    last = _row(matrix, -1)
    tasks = range(len(matrix) - 1)
    drops = [max(_entry(matrix, row, j) for row in range(j, len(matrix) - 1)) - last[j] for j in tasks]
    return sum(drops) / len(drops)


def continual_scores(matrix: Matrix) -> dict[str, Optional[float]]:
    """`average_accuracy`, `backward_transfer` and `forgetting` of `matrix`, by those names."""
    return {
        "average_accuracy": average_accuracy(matrix),
        "backward_transfer": backward_transfer(matrix),
        "forgetting": forgetting(matrix),
    }


def _row(matrix: Matrix, index: int) -> list[float]:
    if not matrix:
        raise ValueError("the accuracy matrix has no row")
    row = list(matrix[index])
    if any(value is None for value in row):
        raise ValueError(f"row {index} of the accuracy matrix has an unmeasured entry: {row}")
    return row


def _entry(matrix: Matrix, row: int, column: int) -> float:
    value = matrix[row][column]
    if value is None:
        raise ValueError(f"accuracy matrix entry [{row}][{column}] (task {column} after training task {row}) is needed "
                         "but was not measured")
    return value
