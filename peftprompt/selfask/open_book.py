"""Open-book self-ask: follow-ups answered from a passage index by a reader (retrieve, then read).

A `RetrievalAnswerer` is an answerer like the others (`peftprompt.selfask.answerers`): give it to `SelfAskRunner`
for any layer. For each follow-up it takes the top-`k` passages of a `peftprompt.retrieval.index.PassageIndex` and
asks a reader, usually the self-ask model itself (`ModelReader`), to answer from them in the reader format of
`peftprompt.retrieval.reader.reader_prompt`. The trace records the passage ids (``meta["passages"]``). An answer
that is empty or ``unknown`` counts as not found (``answer_source="none"``), so with ``recurse`` the model self-asks
that follow-up one layer deeper.

```py
>>> index = PassageIndex.load("idx/")
>>> reader = ModelReader(model, tokenizer)                       # or adapter="reader": a second named adapter
>>> runner = SelfAskRunner(model, tokenizer, answerer=RetrievalAnswerer(index, reader, k=3))
>>> runner.run("Who is the father of the director of Jaws?").trace
```

Asked with the whole question, the same answerer is single-step retrieval (`RetrievalAnswerer.answer_batch` on the
questions themselves).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Optional, Sequence

from ..recursive.unroll import SELF_ASK, Template, clean_text
from ..retrieval.passages import Passage
from ..retrieval.reader import reader_prompt
from .answerers import UNKNOWN, Answer, Answerer
from .runner import GenerateFn, SelfAskRunner, normalise_question

ReaderFn = Callable[[list[str], list[list[Passage]]], list[str]]
"""``(questions, passages per question) -> answers``: what `RetrievalAnswerer` asks to read."""

_READER_EXAMPLES = [
    ("Who was the founder of craigslist?",
     [Passage.make("Jaws (film)", "Jaws is a 1975 American thriller film directed by Steven Spielberg."),
      Passage.make("Craigslist", "Craigslist is an American classified advertisements website. It was founded in "
                   "1995 by Craig Newmark in San Francisco.")],
     "Craig Newmark"),
    ("When was Alan Turing born?",
     [Passage.make("Alan Turing", "Alan Mathison Turing (23 June 1912 - 7 June 1954) was an English mathematician "
                   "and computer scientist."),
      Passage.make("Muhammad Ali", "Muhammad Ali (January 17, 1942 - June 3, 2016) was an American boxer.")],
     "23 June 1912"),
]


def few_shot_reader(template: Template = SELF_ASK) -> str:
    """Two worked reader examples in the reader format, each followed by a blank line: the prefix a model that was
    not trained on reader episodes (the base model) reads with."""
    return "".join(f"{reader_prompt(q, passages, template)} {answer}\n\n" for q, passages, answer in _READER_EXAMPLES)


@contextmanager
def active_adapter(model, name: Optional[str]) -> Iterator[None]:
    """Run the block with the PEFT adapter `name` of `model` active, then switch back; `None` changes nothing."""
    if name is None:
        yield
        return
    previous = model.active_adapter
    model.set_adapter(name)
    try:
        yield
    finally:
        model.set_adapter(previous)


class ModelReader:
    """A causal LM reading passages: the reader prompt of each question and its passages, then a greedy answer
    line (`SelfAskRunner.complete`), prompts batched in order of length.

    Args:
        model, tokenizer: The causal LM (a `PeftModel` when `adapter` is given) and its tokenizer.
        adapter (`str`, *optional*): The named adapter to read with (decomposer and reader as two adapters on one
            backbone); the active one is restored afterwards.
        few_shot (`str`, defaults to ``""``): A prefix for every prompt (`few_shot_reader()` for a base model); its
            KV cache is computed once.
        max_words (`int`, defaults to 120): Words of each passage kept in the prompt.
        max_new_tokens (`int`, defaults to 24): The longest answer.
        batch_size (`int`, defaults to 32): Prompts per `generate` call.
        generate_fn: A scripted generator instead of the model (see `SelfAskRunner`).
    """

    def __init__(self, model=None, tokenizer=None, adapter: Optional[str] = None, few_shot: str = "",
                 max_words: int = 120, max_new_tokens: int = 24, batch_size: int = 32,
                 template: Template = SELF_ASK, generate_fn: Optional[GenerateFn] = None):
        self.runner = SelfAskRunner(model, tokenizer, template=template, max_new_tokens=max_new_tokens,
                                    batch_size=batch_size, few_shot_direct=few_shot, generate_fn=generate_fn)
        self.model, self.adapter, self.few_shot = model, adapter, few_shot
        self.max_words, self.template = max_words, template

    def prompts(self, questions: Sequence[str], passages: Sequence[Sequence[Passage]]) -> list[str]:
        return [self.few_shot + reader_prompt(q, ps, self.template, self.max_words)
                for q, ps in zip(questions, passages)]

    def __call__(self, questions: list[str], passages: list[list[Passage]]) -> list[str]:
        prompts = self.prompts(questions, passages)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # batches of similar length pad less
        with active_adapter(self.model, self.adapter):
            outputs = self.runner.complete([prompts[i] for i in order])
        answers = [""] * len(prompts)
        for i, out in zip(order, outputs):
            answers[i] = out.text
        return answers


class RetrievalAnswerer(Answerer):
    """Answers follow-ups from a passage index: the top `k` passages (`mode`: ``hybrid``, ``bm25`` or ``dense``) of
    each question, read by `reader`. Answers have ``answer_source="tool"`` and ``meta["passages"]`` (the ids, best
    first); an empty or ``unknown`` answer, or no passage at all, is ``answer_source="none"``.

    Args:
        index: A `peftprompt.retrieval.index.PassageIndex` (anything with ``search_batch(queries, k, mode)``).
        reader (`ModelReader` or callable): ``(questions, passages) -> answers``.
        k (`int`, defaults to 3): Passages read per question.
        mode (`str`, defaults to ``"hybrid"``): How the index ranks.
    """

    name = "retrieval"

    def __init__(self, index, reader: ReaderFn, k: int = 3, mode: str = "hybrid"):
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.index, self.reader, self.k, self.mode = index, reader, k, mode

    def answer_batch(self, questions: list[str], depth: int = 0) -> list[Answer]:
        if not questions:
            return []
        hits = self.index.search_batch(list(questions), k=self.k, mode=self.mode)
        found = [[h.passage for h in row] for row in hits]
        rows = [i for i, passages in enumerate(found) if passages]
        texts = dict(zip(rows, self.reader([questions[i] for i in rows], [found[i] for i in rows]))) if rows else {}
        answers = []
        for i, passages in enumerate(found):
            text = clean_text(texts.get(i, ""))
            meta = {"passages": [p.id for p in passages]}
            known = text and normalise_question(text) != UNKNOWN
            answers.append(Answer(text, "tool", meta=meta) if known else Answer(UNKNOWN, "none", meta=meta))
        return answers
