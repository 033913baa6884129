"""Reader episodes: answer one (follow-up) question from a few retrieved paragraphs, in the self-ask wording.

A reader episode is a ``No.`` self-ask episode with a context block in front, so the answer it teaches is the one
the self-ask runner reads after ``So the final answer is:``:

```
Context:                                          context        never trained
[1] {title}: {text}
[2] {title}: {text}
[3] {title}: {text}
Question: {question}                              question       never trained
Are follow up questions needed here: No.          decision       never trained (with the answer cue)
So the final answer is:
 {answer}                                         final_answer   trained (and the EOS the encoder adds)
```

`reader_examples` builds the training examples from open-book questions (`peftprompt.retrieval.passages`): one per
gold hop (2WikiMultiHopQA, MuSiQue) or per question without hops (HotpotQA), its gold passage(s) among distractors
drawn from the question's own other paragraphs.

```py
>>> examples = reader_examples(read_questions("musique_context", "train"))
>>> episode = reader_episode(examples[0].question, examples[0].answer, examples[0].passages)
```
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Optional, Sequence

from ..errors import InputError
from ..recursive.unroll import SELF_ASK, Episode, Span, Template, clean_text
from .passages import OpenBookQuestion, Passage

CONTEXT_HEADER = "Context:\n"
UNANSWERABLE = "unknown"
"""The answer of a reader example whose passages hold no answer (`reader_examples`' ``unanswerable``)."""
READER_PATH = "reader"
"""The `Episode.path` of reader episodes."""


def cut_words(text: str, max_words: int) -> str:
    """`text` with whitespace collapsed and at most `max_words` words, ending in ``" ..."`` when cut."""
    words = clean_text(text).split(" ")
    return " ".join(words) if len(words) <= max_words else " ".join(words[:max_words]) + " ..."


def _answer_cue(template: Template) -> tuple[str, str]:
    """The template's final-answer line split where the prompt ends: ``("So the final answer is:", " {answer}")``."""
    head, tail = template.final_answer.split("{answer}")
    cue = head.rstrip()
    return cue, head[len(cue):] + "{answer}" + tail


def _context(passages: Sequence[Passage], max_words: int) -> str:
    if max_words < 1:
        raise ValueError(f"max_words must be >= 1, got {max_words}")
    lines = [f"[{n}] {clean_text(p.title)}: {cut_words(p.text, max_words)}\n" for n, p in enumerate(passages, start=1)]
    return CONTEXT_HEADER + "".join(lines)


def _prompt_parts(
    question: str, passages: Sequence[Passage], template: Template, max_words: int
) -> list[tuple[str, str]]:
    cue, _ = _answer_cue(template)
    return [
        (_context(passages, max_words), "context"),
        (template.question.format(question=clean_text(question)), "question"),
        (template.no_follow_ups + cue, "decision"),
    ]


def reader_prompt(
    question: str, passages: Sequence[Passage], template: Template = SELF_ASK, max_words: int = 120
) -> str:
    """The reader's prompt: the numbered `passages` (each cut to `max_words` words), `question`, the ``No.``
    decision and the answer cue (``So the final answer is:``, no trailing space)."""
    return "".join(text for text, _ in _prompt_parts(question, passages, template, max_words))


def reader_episode(
    question: str,
    answer: str,
    passages: Sequence[Passage],
    template: Template = SELF_ASK,
    max_words: int = 120,
    dataset: Optional[str] = None,
    example_id: Optional[str] = None,
) -> Episode:
    """`reader_prompt` followed by ``" {answer}"``: spans ``context``, ``question`` and ``decision`` (weight 0, the
    answer cue included) and ``final_answer`` (weight 1), so only the answer is trained.

    The episode's `tree_id` is `example_id` and its `path` is ``"reader"``.
    """
    _, answer_line = _answer_cue(template)
    parts = _prompt_parts(question, passages, template, max_words)
    parts.append((answer_line.format(answer=clean_text(answer)), "final_answer"))
    spans, start = [], 0
    for text, kind in parts:
        spans.append(Span(start, start + len(text), kind, 1.0 if kind == "final_answer" else 0.0))
        start += len(text)
    return Episode("".join(text for text, _ in parts), tuple(spans), example_id, dataset, READER_PATH)


@dataclass(frozen=True)
class ReaderExample:
    """A question to answer from `passages`, of which those in `gold` support the answer.

    Attributes:
        question, answer (`str`): A gold hop's sub-question and answer, or a whole question and its answer.
        passages (`tuple[Passage, ...]`): What the reader sees, in order (gold and distractors shuffled).
        gold (`tuple[str, ...]`): Ids of the gold passages among `passages`.
        dataset (`str`): The open-book source.
        id (`str`): The question's id, with ``/hop{k}`` (1-based) for a hop.
    """

    question: str
    answer: str
    passages: tuple[Passage, ...]
    gold: tuple[str, ...]
    dataset: str
    id: str

    def episode(self, template: Template = SELF_ASK, max_words: int = 120) -> Episode:
        """This example as a `reader_episode`."""
        return reader_episode(self.question, self.answer, self.passages, template, max_words, self.dataset, self.id)


def _example(question: OpenBookQuestion, example_id: str, text: str, answer: str, gold_ids: Sequence[str],
             size: int, seed: int) -> ReaderExample:
    rng = random.Random(f"{seed}:{question.dataset}:{example_id}")
    by_id = {p.id: p for p in question.passages}
    gold = [by_id[i] for i in dict.fromkeys(gold_ids) if i in by_id][:size]
    kept = {p.id for p in gold}
    others = [p for p in by_id.values() if p.id not in kept]
    passages = gold + rng.sample(others, min(size - len(gold), len(others)))
    rng.shuffle(passages)
    return ReaderExample(
        clean_text(text), answer, tuple(passages), tuple(p.id for p in gold), question.dataset, example_id
    )


def _unanswerable(example: ReaderExample, question: OpenBookQuestion, size: int, seed: int) -> Optional[ReaderExample]:
    """`example` with its gold passages swapped for other paragraphs of the question, answered ``unknown``; `None`
    when the question has too few paragraphs that support nothing."""
    rng = random.Random(f"{seed}:{question.dataset}:{example.id}:unanswerable")
    others = [p for p in question.passages if p.id not in question.supporting and p.id not in example.gold]
    if len(others) < size:
        return None
    return ReaderExample(example.question, UNANSWERABLE, tuple(rng.sample(others, size)), (), example.dataset,
                         f"{example.id}/unanswerable")


def reader_examples(
    questions: Sequence[OpenBookQuestion], passages_per_example: int = 3, seed: int = 0, unanswerable: float = 0.0
) -> list[ReaderExample]:
    """One `ReaderExample` per gold hop of each question, or per question for one without hops (HotpotQA, or a
    2WikiMultiHopQA question whose evidences make no tree), with `passages_per_example` passages (all the question
    has, if fewer).

    The gold passages come first (the first `passages_per_example` of them if there are more); the rest are drawn
    from the question's other paragraphs (its distractors, and the gold passages of its other hops); then the
    order is shuffled. Both draws are seeded by `seed` and the example's id, so an example does not depend on
    which other questions are given. Hops (or questions) without an answer or without a gold passage among the
    question's paragraphs give no example.

    With `unanswerable` > 0, that share of the examples (a seeded draw) is followed by a copy whose passages are
    paragraphs that support nothing in the question, answered ``unknown`` (`UNANSWERABLE`): the reader learns to
    say so when retrieval missed, and the self-ask runner then treats the follow-up as not found.

    Raises:
        InputError: A question from a split other than ``train``: reader episodes are for training only.
    """
    if passages_per_example < 1:
        raise ValueError(f"passages_per_example must be >= 1, got {passages_per_example}")
    if not 0.0 <= unanswerable <= 1.0:
        raise ValueError(f"unanswerable must be a share in [0, 1], got {unanswerable}")
    examples = []
    for question in questions:
        if question.split != "train":
            raise InputError(f"reader examples are built from training questions only; {question.dataset} question "
                             f"{question.id} is from split {question.split!r}", field="split")
        held = {p.id for p in question.passages}
        if question.hops:
            targets = [(f"{question.id}/hop{k}", hop.question, hop.answer, hop.supporting)
                       for k, hop in enumerate(question.hops, start=1)]
        else:
            targets = [(question.id, question.question, question.answer, question.supporting)]
        for example_id, text, answer, gold in targets:
            if answer.strip() and held.intersection(gold):
                examples.append(_example(question, example_id, text, answer.strip(), gold, passages_per_example, seed))
                if unanswerable and random.Random(f"{seed}:{example_id}:draw").random() < unanswerable:
                    negative = _unanswerable(examples[-1], question, passages_per_example, seed)
                    examples += [negative] if negative else []
    return examples
