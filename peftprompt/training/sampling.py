"""Length-grouped batches: each batch holds examples of similar length, so dynamic padding pads little.

`EpochLengthGroupedSampler` is transformers' `LengthGroupedSampler` (shuffle, cut into mega-batches of 50 batches,
sort each by length) with the order a function of ``(seed, epoch)`` only, as the engine's shuffled order is, so a
resumed run (which skips the batches of the current epoch already seen) sees the same batches as an uninterrupted
one. The engine uses it with ``group_by_length: true``:

```py
sampler = EpochLengthGroupedSampler(example_lengths(train_set), batch_size=16, seed=0)
sampler.set_epoch(1)  # accelerate's prepared loader calls this at each epoch
```
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Iterator

import torch

from ..compat import LengthGroupedSampler


def example_lengths(dataset) -> list[int]:
    """The number of tokens (``input_ids``) of each example of `dataset` (a `datasets.Dataset` or a sequence of
    dicts). Raises `ValueError` for examples without ``input_ids`` (e.g. self-ask trees: pack those instead)."""
    if "input_ids" in (getattr(dataset, "column_names", None) or ()):
        return [len(ids) for ids in dataset["input_ids"]]
    lengths = []
    for index in range(len(dataset)):
        example = dataset[index]
        if not isinstance(example, Mapping) or "input_ids" not in example:
            raise ValueError(
                f"group_by_length: training example {index} has no input_ids ({type(example).__name__}); only "
                "tokenised examples can be grouped by length (self-ask trees are packed instead: data.packing)"
            )
        lengths.append(len(example["input_ids"]))
    return lengths


class EpochLengthGroupedSampler(LengthGroupedSampler):
    """`LengthGroupedSampler` whose order depends on ``(seed, epoch)`` only (`set_epoch`).

    Args:
        lengths: Each example's length (`example_lengths`).
        batch_size: The batch size the loader cuts the order into (per process).
        seed: The run's seed.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int = 0):
        super().__init__(batch_size, lengths=lengths)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        self.generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return super().__iter__()
