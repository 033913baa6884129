"""Self-ask that keeps learning: verified traces of the current adapter become the next round's training trees.

A round asks the current adapter questions of a training source whose decompositions it never trained on (the
*pool*: only each question, its gold answer and, for the retriever that answers follow-ups, its leaf facts are
read). A run is kept when the verifier passes (`VERIFIER`: well formed, and its final answer an exact match of the
gold answer or an alias); its trace, a ``decomp-tree/v1`` tree in the schema of the training data, is a training
tree from then on (`verified_trees`), mixed with a replay share of the original trees (`replay_sample`).

```py
training, pool = split_pool(convert("2wikimultihopqa"), pool_size=300, seed=0)   # pool: never trained on as gold
results = runner.run_batch([tree.question for tree in pool[:100]])
new_trees = verified_trees(pool[:100], results, round_index=1)
```
"""

from __future__ import annotations

import dataclasses
import random
from typing import Sequence

from ..metrics import exact_match
from ..recursive import Node, TreeError, check_trainable, validate
from .runner import SelfAskResult

VERIFIER = "a well-formed run whose final answer exactly matches the gold answer or an alias (normalised)"


def split_pool(trees: Sequence[Node], pool_size: int, seed: int = 0) -> tuple[list[Node], list[Node]]:
    """``(training, pool)``: `pool_size` trees drawn from `trees` with `seed` (in their drawn order) and the rest (in
    file order). Refuses evaluation-only trees (`check_trainable`): a pool is training data."""
    trees = list(trees)
    check_trainable(trees)
    if not 0 < pool_size < len(trees):
        raise ValueError(f"pool_size must be in [1, {len(trees) - 1}] (the source has {len(trees)} trees), got "
                         f"{pool_size}")
    drawn = random.Random(seed).sample(range(len(trees)), pool_size)
    chosen = set(drawn)
    return [tree for i, tree in enumerate(trees) if i not in chosen], [trees[i] for i in drawn]


def verified_trees(gold: Sequence[Node], results: Sequence[SelfAskResult], round_index: int) -> list[Node]:
    """The traces of `results` that pass `VERIFIER` against the `gold` trees (same order), as training trees.

    Each keeps its trace as the model wrote it (follow-ups, their answers and who answered them) and takes the gold
    tree's ``dataset`` and ``split``; its id is ``<gold id>@round<r>`` and ``meta`` records the round, the gold id
    and the verifier. A trace that is not a valid tree is dropped."""
    if len(gold) != len(results):
        raise ValueError(f"{len(gold)} gold trees for {len(results)} results")
    kept = []
    for tree, result in zip(gold, results):
        if not (result.well_formed and exact_match(result.answer, [tree.answer, *tree.aliases])):
            continue
        trace = dataclasses.replace(
            result.trace, id=f"{tree.id}@round{round_index}", dataset=tree.dataset, split=tree.split,
            meta={"round": round_index, "from": tree.id, "verified": VERIFIER},
        )
        try:
            validate(trace)
        except TreeError:
            continue
        kept.append(trace)
    return kept


def replay_sample(trees: Sequence[Node], n: int, seed: int = 0) -> list[Node]:
    """`n` of `trees` drawn with `seed` (all of them when `n` is at least their number)."""
    trees = list(trees)
    return trees if n >= len(trees) else random.Random(seed).sample(trees, n)
