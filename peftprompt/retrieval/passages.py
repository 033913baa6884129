"""Multi-hop questions with their paragraphs, read in place from the shared data: the passages a question came
with, which of them support it, and its gold hops (sub-question, answer, supporting passages).

Sources (`OPEN_BOOK_SOURCES`, the folder under the data root, with its splits):

- ``hotpotqa_distractor`` (train / dev / test): 10 paragraphs a question, supporting = the titles of
  ``supporting_facts``; no decomposition, so no hops; ``kind`` is ``bridge`` or ``comparison``.
- ``2wikimultihopqa_context`` (train / dev): 10 paragraphs, supporting = the ``supporting_facts`` titles; the hops are
  the leaves of the gold tree built from the ``evidences`` triples (`peftprompt.recursive.sources.twowiki_tree`),
  each with the supporting paragraph about its subject (no hops where the triples make no tree); ``kind`` is ``compositional``, ``comparison``,
  ``bridge_comparison`` or ``inference``.
- ``musique_context`` (train / dev): 20 paragraphs, supporting = ``is_supporting``; the hops are the gold
  ``question_decomposition`` steps (`peftprompt.recursive.sources.musique_tree`, ``#k`` resolved) with their
  ``paragraph_support_idx``; ``kind`` is ``2hop``, ``3hop`` or ``4hop``.

```py
>>> questions = read_questions("hotpotqa_distractor", "test")
>>> corpus = pooled_passages(questions)      # every paragraph of the split once
```
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

from ..errors import InputError
from ..recursive.sources import musique_tree, twowiki_tree
from ..recursive.tree import Node, TreeError, entity_key, question_key, resolve_templates
from ..recursive.unroll import clean_text

OPEN_BOOK_SOURCES: dict[str, dict[str, str]] = {
    "hotpotqa_distractor": {"train": "train.jsonl", "dev": "dev.jsonl", "test": "test.jsonl"},
    "2wikimultihopqa_context": {"train": "train.json", "dev": "dev.json"},
    "musique_context": {"train": "train.json", "dev": "dev.jsonl"},
}
"""The open-book sources: folder under the data root -> ``{split: file}``."""


def passage_id(title: str, text: str) -> str:
    """A stable id of a passage: the same title and text give the same id in every question and split."""
    return "p" + hashlib.sha1(f"{title}\n{text}".encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class Passage:
    """A paragraph: `id` (`passage_id` of title and text), `title` and `text` (whitespace collapsed)."""

    id: str
    title: str
    text: str

    @classmethod
    def make(cls, title: str, text: str) -> "Passage":
        title, text = clean_text(title), clean_text(text)
        return cls(passage_id(title, text), title, text)


@dataclass(frozen=True)
class Hop:
    """One gold step of a question: a self-contained sub-question, its answer (and aliases) and the ids of the
    passages that support it."""

    question: str
    answer: str
    aliases: tuple[str, ...] = ()
    supporting: tuple[str, ...] = ()


@dataclass(frozen=True)
class OpenBookQuestion:
    """A multi-hop question with its own passages.

    Attributes:
        id, question, answer (`str`), aliases (`tuple[str, ...]`): The question and its gold answers.
        dataset, split (`str`): Where it comes from (a key of `OPEN_BOOK_SOURCES` and its split).
        kind (`str`): The question type (``bridge``, ``comparison``, ``compositional``, ``inference``,
            ``bridge_comparison``) or MuSiQue's hop count (``2hop``, ``3hop``, ``4hop``).
        passages (`tuple[Passage, ...]`): The paragraphs it came with (10 or 20; gold and distractors).
        supporting (`tuple[str, ...]`): Ids of its supporting passages.
        hops (`tuple[Hop, ...]`): Its gold sub-questions in order (empty for HotpotQA).
    """

    id: str
    question: str
    answer: str
    aliases: tuple[str, ...]
    dataset: str
    split: str
    kind: str
    passages: tuple[Passage, ...]
    supporting: tuple[str, ...]
    hops: tuple[Hop, ...] = field(default=())

    @property
    def answers(self) -> list[str]:
        return [self.answer, *self.aliases]


def _data_file(source: str, split: Optional[str]) -> tuple[Path, str]:
    from ..data import data_root  # lazy: peftprompt.data imports datasets and transformers

    if source not in OPEN_BOOK_SOURCES:
        raise InputError(f"unknown source {source!r}; choose one of {', '.join(OPEN_BOOK_SOURCES)}", field="source")
    splits = OPEN_BOOK_SOURCES[source]
    split = split or next(iter(splits))
    if split not in splits:
        raise InputError(f"source {source!r} has split(s) {', '.join(splits)}, got {split!r}", field="split")
    return data_root() / source / splits[split], split


def _rows(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in f if line.strip()]
        return json.load(f)


def _by_title(passages: Iterable[Passage], titles: Iterable[str]) -> tuple[str, ...]:
    wanted = {clean_text(t) for t in titles}
    return tuple(dict.fromkeys(p.id for p in passages if p.title in wanted))


def _hotpotqa(row: dict, split: str) -> OpenBookQuestion:
    context = row["context"]
    passages = tuple(Passage.make(title, "".join(sentences))
                     for title, sentences in zip(context["title"], context["sentences"]))
    return OpenBookQuestion(
        id=row["id"], question=clean_text(row["question"]), answer=row["answer"].strip(), aliases=(),
        dataset="hotpotqa_distractor", split=split, kind=row["type"], passages=passages,
        supporting=_by_title(passages, row["supporting_facts"]["title"]),
    )


def _leaves(node: Node) -> list[Node]:
    return [node] if not node.children else [leaf for child in node.children for leaf in _leaves(child)]


def _twowiki_hop_support(leaf: Node, supporting: list[Passage]) -> tuple[str, ...]:
    """The supporting passage about the leaf's subject: the one whose title (without its disambiguation) the
    leaf's question names, else the one that contains the answer, else all supporting passages."""
    text = question_key(leaf.question)
    named = [p for p in supporting if entity_key(p.title) and f" {entity_key(p.title)} " in f" {text} "]
    if named:
        return (max(named, key=lambda p: len(entity_key(p.title))).id,)
    answers = [question_key(a) for a in [leaf.answer or "", *leaf.aliases] if question_key(a)]
    holding = [p for p in supporting if any(a in question_key(p.text) for a in answers)]
    return tuple(p.id for p in (holding or supporting))


def _twowiki(row: dict, split: str) -> OpenBookQuestion:
    passages = tuple(Passage.make(title, " ".join(s.strip() for s in sentences)) for title, sentences in row["context"])
    supporting = _by_title(passages, [title for title, _ in row["supporting_facts"]])
    gold = [p for p in passages if p.id in supporting]
    try:
        tree = resolve_templates(twowiki_tree(row, dataset="2wikimultihopqa", split=split))
        hops = tuple(Hop(leaf.question, leaf.answer or "", tuple(leaf.aliases), _twowiki_hop_support(leaf, gold))
                     for leaf in _leaves(tree) if leaf is not tree)
    except TreeError:  # evidences that make no tree (a comparison missing its second hop): no hops
        hops = ()
    return OpenBookQuestion(
        id=row.get("_id") or row["_1"], question=clean_text(row["question"]), answer=row["answer"].strip(),
        aliases=(), dataset="2wikimultihopqa_context", split=split, kind=row["type"], passages=passages,
        supporting=supporting, hops=hops,
    )


def _musique(row: dict, split: str) -> OpenBookQuestion:
    by_idx = {p["idx"]: Passage.make(p["title"], p["paragraph_text"]) for p in row["paragraphs"]}
    passages = tuple(by_idx.values())
    supporting = tuple(dict.fromkeys(by_idx[p["idx"]].id for p in row["paragraphs"] if p.get("is_supporting")))
    tree = resolve_templates(musique_tree(row, split))
    hops = []
    for step in tree.children:
        idx = step.meta.get("paragraph_support_idx")
        hops.append(Hop(step.question, step.answer or "", tuple(step.aliases),
                        (by_idx[idx].id,) if idx in by_idx else ()))
    return OpenBookQuestion(
        id=tree.id, question=clean_text(tree.question), answer=tree.answer or "", aliases=tuple(tree.aliases),
        dataset="musique_context", split=split, kind=tree.meta["hops"][:4], passages=passages,
        supporting=supporting, hops=tuple(hops),
    )


READERS = {"hotpotqa_distractor": _hotpotqa, "2wikimultihopqa_context": _twowiki, "musique_context": _musique}


def read_questions(source: str, split: Optional[str] = None, limit: Optional[int] = None) -> list[OpenBookQuestion]:
    """The questions of `source` (a key of `OPEN_BOOK_SOURCES`) and `split` (default: its first, ``train``), in
    file order, at most `limit`.

    Raises:
        InputError: An unknown source or split, or a row that cannot be read (naming the file and row).
    """
    path, split = _data_file(source, split)
    questions = []
    for number, row in enumerate(_rows(path), start=1):
        if limit is not None and len(questions) >= limit:
            break
        try:
            questions.append(READERS[source](row, split))
        except (KeyError, TypeError, ValueError, TreeError) as err:
            raise InputError(f"row {number} cannot be read ({err!r})", file=path) from err
    return questions


def pooled_passages(questions: Iterable[OpenBookQuestion]) -> list[Passage]:
    """Every passage of `questions` once (by id), in order of first appearance: the corpus of a split."""
    seen: dict[str, Passage] = {}
    for question in questions:
        for passage in question.passages:
            seen.setdefault(passage.id, passage)
    return list(seen.values())


def as_dict(passage: Passage) -> dict[str, Any]:
    return {"id": passage.id, "title": passage.title, "text": passage.text}
