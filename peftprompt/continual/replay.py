"""Experience replay: a few examples of every finished task, trained again with each later task.

```py
>>> memory = ReplayMemory(fraction=0.02, seed=0)
>>> memory.add(first_task.train)          # keeps round(0.02 * len) of them
>>> train_rows = memory.mix(second_task.train)   # the new task's rows + everything kept, shuffled
```
"""

from __future__ import annotations

import random
from typing import Generic, Sequence, TypeVar

Example = TypeVar("Example")


class ReplayMemory(Generic[Example]):
    """Keeps `fraction` of each finished task's training examples (a seeded uniform sample without replacement) and
    mixes all of them into each later task's training set.

    Args:
        fraction (`float`): The share of each task's training examples kept, in [0, 1].
        seed (`int`): Seeds the sampling and the shuffle of `mix`.
    """

    def __init__(self, fraction: float, seed: int = 0):
        if not 0 <= fraction <= 1:
            raise ValueError(f"replay fraction must be in [0, 1], got {fraction}")
        self.fraction = fraction
        self.kept: list[Example] = []
        self._random = random.Random(seed)

    def add(self, examples: Sequence[Example]) -> list[Example]:
        """Keep ``round(fraction * len(examples))`` of `examples` (a finished task's); returns those kept."""
        chosen = self._random.sample(range(len(examples)), round(self.fraction * len(examples)))
        kept = [examples[i] for i in sorted(chosen)]
        self.kept.extend(kept)
        return kept

    def mix(self, examples: Sequence[Example]) -> list[Example]:
        """`examples` (the current task's) and every kept example, shuffled together."""
        mixed = [*examples, *self.kept]
        self._random.shuffle(mixed)
        return mixed

    def __len__(self) -> int:
        return len(self.kept)
