"""Recall@k of a `PassageIndex` on multi-hop questions: does the top k hold the supporting passages of each
question (query: the question) and of each gold hop (query: the hop's sub-question)?

```py
>>> questions = read_questions("musique_context", "dev")
>>> report = recall_at_k(PassageIndex.build(pooled_passages(questions)), questions)
>>> report.questions.recall[5], report.hops.all_found[2]
```
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional, Sequence

from ..errors import InputError
from .index import PassageIndex
from .passages import OpenBookQuestion


@dataclass(frozen=True)
class RecallAt:
    """Recall of `n` queries at each k: `recall` (the mean fraction of a query's supporting passages in its top k)
    and `all_found` (the fraction of queries with all of them in the top k)."""

    n: int
    recall: dict[int, float]
    all_found: dict[int, float]


@dataclass(frozen=True)
class RecallReport:
    """`RecallAt` of whole questions and of their gold hops (`None` when no question has hops) in one `mode`."""

    mode: str
    ks: tuple[int, ...]
    questions: RecallAt
    hops: Optional[RecallAt]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self) -> list[str]:
        """One line for the questions and one for the hops: ``recall@k`` and, in brackets, all found at k."""
        out = []
        for name, result in (("questions", self.questions), ("hops", self.hops)):
            if result is None:
                continue
            cells = "  ".join(f"@{k} {result.recall[k]:.3f} ({result.all_found[k]:.3f})" for k in self.ks)
            out.append(f"{name:<9} n={result.n:<5} {self.mode:<6} recall (all found)  {cells}")
        return out


def _recall(index: PassageIndex, queries: list[tuple[str, tuple[str, ...]]], ks: tuple[int, ...],
            mode: str) -> RecallAt:
    hits = index.search_batch([query for query, _ in queries], k=max(ks), mode=mode)
    recall, all_found = {}, {}
    for k in ks:
        found = [len(set(gold) & {hit.passage.id for hit in ranked[:k]}) / len(gold)
                 for (_, gold), ranked in zip(queries, hits)]
        recall[k] = sum(found) / len(found) if found else 0.0
        all_found[k] = sum(f == 1.0 for f in found) / len(found) if found else 0.0
    return RecallAt(len(queries), recall, all_found)


def recall_at_k(
    index: PassageIndex,
    questions: Sequence[OpenBookQuestion],
    ks: Sequence[int] = (1, 2, 5, 10, 20),
    mode: str = "hybrid",
) -> RecallReport:
    """Recall@k of `index` on `questions`: each question's text against its `supporting` passages, and each gold hop's
    sub-question against its own; queries without supporting passages are left out.

    Args:
        index (`PassageIndex`): The index (it should hold the questions' passages).
        questions (`Sequence[OpenBookQuestion]`): E.g. `peftprompt.retrieval.passages.read_questions`.
        ks (`Sequence[int]`, defaults to ``(1, 2, 5, 10, 20)``): The cut-offs.
        mode (`str`, defaults to ``"hybrid"``): The search mode (`PassageIndex.search_batch`).

    Raises:
        InputError: No cut-off, one below 1, or an unknown `mode`.
    """
    ks = tuple(sorted(set(ks)))
    if not ks or ks[0] < 1:
        raise InputError(f"the cut-offs k must be >= 1, got {list(ks)}", field="ks")
    whole = [(q.question, q.supporting) for q in questions if q.supporting]
    hops = [(hop.question, hop.supporting) for q in questions for hop in q.hops if hop.supporting]
    has_hops = any(q.hops for q in questions)
    hop_recall = _recall(index, hops, ks, mode) if has_hops else None
    return RecallReport(mode, ks, _recall(index, whole, ks, mode), hop_recall)
