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

Evaluation (what ``benchmarks/openbook.py`` measures and ``peftprompt eval selfask --index`` runs): `run_open_book`
answers `OpenBookQuestion`s with one of `OPEN_BOOK_SYSTEMS` and returns one `open_book_record` per question;
`summarise_open_book` gives exact match and token F1 (best over the answer's aliases), faithfulness
(`open_book_faithfulness`), supporting-paragraph recall (the share of a question's supporting passages among all the
passages its run retrieved, `trace_passages`), follow-ups and the well-formed rate; `per_kind` the same per question
type; `evaluate_open_book` times a run (seconds per question) and returns all of it.

```py
>>> questions = read_questions("2wikimultihopqa_context", "dev", limit=20)
>>> evaluate_open_book(questions, "fine_tuned_self_ask", index, tuned, tokenizer, k=3)["summary"]
{"n": 20, "em": ..., "f1": ..., "faithfulness": ..., "support_recall": ..., "follow_ups": ..., "well_formed": ...}
```
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Iterator, Optional, Sequence

from ..metrics import exact_match, token_f1
from ..recursive.tree import Node
from ..recursive.unroll import SELF_ASK, Template, clean_text
from ..retrieval.passages import OpenBookQuestion, Passage
from ..retrieval.reader import reader_prompt
from .answerers import UNKNOWN, Answer, Answerer, answerers_from_names
from .backend import GenerateFn
from .evaluate import supported_by_trace
from .runner import FEW_SHOT_DIRECT, FEW_SHOT_SELF_ASK, SelfAskRunner, normalise_question

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


# Evaluation: the systems of benchmarks/openbook.py and their metrics ----------------------------------------------

OPEN_BOOK_SYSTEMS = ("closed_book", "single_step", "few_shot_self_ask", "fine_tuned_self_ask", "fine_tuned_recursive")
"""What `run_open_book` runs:

- ``closed_book``: the model answers directly (4-shot `FEW_SHOT_DIRECT`, adapters off); no retrieval.
- ``single_step``: the top ``k`` passages of the whole question, read by the (fine-tuned) reader.
- ``few_shot_self_ask``: the model self-asks (4-shot `FEW_SHOT_SELF_ASK`, adapters off); each follow-up's top ``k``
  passages are read by the same model with the 2-shot `few_shot_reader` prefix.
- ``fine_tuned_self_ask``: the fine-tuned model self-asks (0-shot); a follow-up in an operator's template is computed
  (`peftprompt.operators`), every other follow-up's top ``k`` passages are read by the fine-tuned reader (the
  adapter itself, or a second adapter `reader_adapter`); ``max_depth`` 1 (a follow-up the reader cannot answer
  stays ``unknown``).
- ``fine_tuned_recursive``: the same with ``max_depth`` 2: a follow-up the reader cannot answer is self-asked one
  layer deeper.
"""
SELF_ASK_SYSTEMS = ("few_shot_self_ask", "fine_tuned_self_ask", "fine_tuned_recursive")
SYSTEM_ANSWERERS = {"few_shot_self_ask": "retrieval", "fine_tuned_self_ask": "operators+retrieval",
                    "fine_tuned_recursive": "operators+retrieval"}
"""Who answers each self-asking system's follow-ups by default (`peftprompt.selfask.answerers_from_names` names)."""
SYSTEM_DEPTHS = {"few_shot_self_ask": 1, "fine_tuned_self_ask": 1, "fine_tuned_recursive": 2}
"""Each self-asking system's default ``max_depth``."""


def without_adapters(model):
    """A context in which `model` runs without its adapters (a plain model: nothing changes)."""
    return model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext()


def trace_passages(trace: dict) -> list[str]:
    """Every passage id a self-ask trace (a ``decomp-tree/v1`` dict) retrieved, at any depth."""
    ids = list(trace.get("meta", {}).get("passages", []))
    for child in trace.get("children", []):
        ids += trace_passages(child)
    return ids


def open_book_record(question: OpenBookQuestion, answer: str, passages: Sequence[str], follow_ups: int,
                     well_formed: bool, trace: Optional[dict] = None) -> dict[str, Any]:
    """One question's scores: exact match and token F1 against `question.answers` (answer and aliases),
    ``support_recall`` (the share of `question.supporting` among the retrieved `passages`; `None` when the question
    names no supporting passage), the number of distinct passages retrieved, follow-ups, form and the trace."""
    gold = question.answers
    found = set(passages)
    return {"id": question.id, "kind": question.kind, "answer": answer, "em": exact_match(answer, gold),
            "f1": token_f1(answer, gold), "follow_ups": follow_ups, "well_formed": well_formed,
            "support_recall": (sum(p in found for p in question.supporting) / len(question.supporting)
                               if question.supporting else None),
            "passages": len(found), "trace": trace}


def open_book_faithfulness(records: Sequence[dict]) -> Optional[float]:
    """The share of self-ask answers their trace supports (`supported_by_trace`); `None` for systems without
    follow-ups."""
    if not any(r["follow_ups"] for r in records):
        return None
    return sum(bool(r.get("trace")) and supported_by_trace(r["answer"], Node.from_dict(r["trace"]))
               for r in records) / len(records)


def summarise_open_book(records: Sequence[dict]) -> dict[str, Any]:
    """Means over `records` (`open_book_record`): ``n``, ``em``, ``f1``, ``faithfulness``, ``support_recall`` (over
    the questions that name supporting passages; `None` if none does), ``follow_ups`` and ``well_formed``."""
    n = len(records)
    recalls = [r["support_recall"] for r in records if r["support_recall"] is not None]
    return {"n": n, "em": sum(r["em"] for r in records) / n, "f1": sum(r["f1"] for r in records) / n,
            "faithfulness": open_book_faithfulness(records),
            "support_recall": sum(recalls) / len(recalls) if recalls else None,
            "follow_ups": sum(r["follow_ups"] for r in records) / n,
            "well_formed": sum(r["well_formed"] for r in records) / n}


def per_kind(records: Sequence[dict]) -> dict[str, dict]:
    """`summarise_open_book` per question type (``kind``), in sorted order."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        groups[r["kind"]].append(r)
    return {kind: summarise_open_book(rs) for kind, rs in sorted(groups.items())}


def run_open_book(
    system: str,
    questions: Sequence[OpenBookQuestion],
    index,
    model,
    tokenizer,
    k: int = 3,
    reader_adapter: Optional[str] = None,
    max_depth: Optional[int] = None,
    recurse: Optional[bool] = None,
    answerers: Optional[Sequence[str]] = None,
    progress: Optional[str] = None,
) -> list[dict]:
    """Answer `questions` with `system` (one of `OPEN_BOOK_SYSTEMS`); one `open_book_record` per question.

    Args:
        system (`str`): See `OPEN_BOOK_SYSTEMS`.
        questions (`list[OpenBookQuestion]`): The questions, with their gold answers and supporting passage ids.
        index: The `peftprompt.retrieval.index.PassageIndex` the follow-ups (or questions) retrieve from.
        model, tokenizer: The causal LM: the base model for ``closed_book`` and ``few_shot_self_ask`` (a `PeftModel`
            runs with its adapters off), the fine-tuned one for the others.
        k (`int`, defaults to 3): Passages read per question or follow-up.
        reader_adapter (`str`, *optional*): The named adapter of `model` that reads passages in the fine-tuned
            systems (decomposer and reader as two adapters); `None`: the model reads with whatever is active.
        max_depth (`int`, *optional*): The self-asking systems' ``max_depth`` (default `SYSTEM_DEPTHS`).
        recurse (`bool`, *optional*): Whether a follow-up nobody answers is self-asked one layer deeper (default:
            when ``max_depth`` > 1).
        answerers (`list[str]`, *optional*): Who answers the follow-ups, one name per layer (see
            `peftprompt.selfask.answerers_from_names`; ``retrieval`` is the passage reader); default
            `SYSTEM_ANSWERERS`.
        progress (`str`, *optional*): The progress bar's label (default: the system's name).
    """
    if system not in OPEN_BOOK_SYSTEMS:
        raise ValueError(f"unknown open-book system {system!r}; choose one of {', '.join(OPEN_BOOK_SYSTEMS)}")
    questions = list(questions)
    texts = [q.question for q in questions]
    progress = progress or system
    if system == "closed_book":
        runner = SelfAskRunner(model, tokenizer, few_shot_direct=FEW_SHOT_DIRECT, progress=progress)
        with without_adapters(model):
            results = runner.answer_directly(texts)
        return [open_book_record(q, r.answer, [], 0, r.well_formed, r.trace.to_dict())
                for q, r in zip(questions, results)]
    base = system == "few_shot_self_ask"
    context = without_adapters(model) if base else nullcontext()
    with context:
        reader = (ModelReader(model, tokenizer, few_shot=few_shot_reader()) if base
                  else ModelReader(model, tokenizer, adapter=reader_adapter))
        retrieval = RetrievalAnswerer(index, reader, k=k)
        if system == "single_step":
            answers = retrieval.answer_batch(texts)
            return [open_book_record(q, a.text if a.source != "none" else "", a.meta["passages"], 0,
                                     a.source != "none") for q, a in zip(questions, answers)]
        depth = SYSTEM_DEPTHS[system] if max_depth is None else max_depth
        layers = answerers_from_names(list(answerers or [SYSTEM_ANSWERERS[system]]), retrieval=retrieval)
        runner = SelfAskRunner(model, tokenizer, answerer=layers, recurse=depth > 1 if recurse is None else recurse,
                               max_depth=depth, few_shot=FEW_SHOT_SELF_ASK if base else "", progress=progress)
        results = runner.run_batch(texts)
    return [open_book_record(q, r.answer, trace_passages(r.trace.to_dict()), r.follow_ups, r.well_formed,
                             r.trace.to_dict()) for q, r in zip(questions, results)]


def evaluate_open_book(questions: Sequence[OpenBookQuestion], system: str, index, model, tokenizer,
                       **kwargs) -> dict[str, Any]:
    """`run_open_book` timed and summarised: ``system``, ``n``, ``k``, ``ids``, ``seconds`` (wall clock),
    ``seconds_per_question``, ``summary`` (`summarise_open_book`), ``per_kind`` (`per_kind`) and ``records``.
    Keyword arguments go to `run_open_book`.

    Raises:
        ValueError: No questions.
    """
    questions = list(questions)
    if not questions:
        raise ValueError("evaluate_open_book: no questions to evaluate")
    began = time.perf_counter()
    records = run_open_book(system, questions, index, model, tokenizer, **kwargs)
    seconds = time.perf_counter() - began
    return {"system": system, "n": len(records), "k": kwargs.get("k", 3), "ids": [q.id for q in questions],
            "seconds": seconds, "seconds_per_question": seconds / len(records),
            "summary": summarise_open_book(records), "per_kind": per_kind(records), "records": records}


SUPPORTING_TITLES = "supporting_titles"
"""The root ``meta`` key of a ``decomp-tree/v1`` question that names its supporting paragraphs by title."""


def question_kind(tree: Node) -> str:
    """A tree's question type for `per_kind`: ``meta["type"]`` (2WikiMultiHopQA, HotpotQA), MuSiQue's hop count
    (``2hop``...), ``meta["category"]`` or ``meta["kind"]``; else ``"all"``."""
    meta = tree.meta or {}
    if meta.get("type"):
        return str(meta["type"])
    if meta.get("hops"):
        return str(meta["hops"])[:4]
    return str(meta.get("category") or meta.get("kind") or "all")


def questions_from_trees(trees: Sequence[Node], passages: Sequence[Passage] = ()) -> list[OpenBookQuestion]:
    """The root questions of `trees` as `OpenBookQuestion`s (gold answer and aliases; ``kind`` from
    `question_kind`). A root whose ``meta["supporting_titles"]`` names its supporting paragraphs gets as supporting
    passages the ids of the `passages` (an index's) with those titles; a title no passage has stays supporting and
    is never found. Without titles a question has no supporting passages (its recall is `None`).

    Raises:
        ValueError: A root without a gold answer, or titles that are not a list of strings.
    """
    by_title: dict[str, list[str]] = defaultdict(list)
    for passage in passages:
        by_title[passage.title].append(passage.id)
    questions = []
    for number, tree in enumerate(trees, start=1):
        name = tree.id or f"question {number}"
        if not tree.answer:
            raise ValueError(f"tree {name!r} has no gold answer to score against")
        titles = (tree.meta or {}).get(SUPPORTING_TITLES) or []
        if not isinstance(titles, list) or not all(isinstance(t, str) for t in titles):
            raise ValueError(f"tree {name!r}: meta.{SUPPORTING_TITLES} must be a list of paragraph titles")
        supporting = [pid for title in titles for pid in (by_title.get(clean_text(title)) or [f"title:{title}"])]
        questions.append(OpenBookQuestion(
            id=tree.id or str(number), question=tree.question, answer=tree.answer,
            aliases=tuple(a for a in tree.aliases if a), dataset=tree.dataset or "", split=tree.split or "",
            kind=question_kind(tree), passages=(), supporting=tuple(dict.fromkeys(supporting)),
        ))
    return questions


def format_open_book_table(results: dict[str, Any]) -> str:
    """A plain-text table of `evaluate_open_book` results by approach (``results[approach]``): EM, F1, faithful,
    supporting-paragraph recall, follow-ups, well-formed and seconds per question."""
    header = ("approach", "EM", "F1", "faithful", "support recall", "follow-ups", "well-formed", "s / question")
    rows = [header]

    def cell(value: Optional[float], digits: int = 3) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    for approach, r in results.items():
        if not isinstance(r, dict) or "summary" not in r:
            continue
        s = r["summary"]
        rows.append((approach, cell(s["em"]), cell(s["f1"]), cell(s["faithfulness"]), cell(s["support_recall"]),
                     cell(s["follow_ups"], 2), cell(s["well_formed"]), cell(r["seconds_per_question"], 2)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)
