"""Who answers a follow-up question: a tool, a retriever over known facts, or the model itself one level deeper.

An answerer is called as ``answerer(question, depth)`` and returns an `Answer` (text, ``answer_source`` and, for
the model, the trace of the deeper run); ``answer_batch(questions, depth)`` answers several at once (the runner
uses it to batch the follow-ups of a batch of questions). An answer with ``source="none"`` means "cannot answer":
the runner then lets the model self-ask that follow-up one level deeper. Any plain callable ``(question) -> str``
is a tool (`as_answerer` wraps it in `ToolAnswerer`); the model itself answers through the runner's
`peftprompt.selfask.runner.ModelAnswerer`. `OperatorAnswerer` computes the follow-ups written in an operator's
template (`peftprompt.operators`), and `AnswererChain` tries several answerers in turn on one layer
(``operators+retriever``). `answerer_from_name` builds one from a name (``retriever``, ``operators``,
``module:function``, joined by ``+``), as the command line and recipe configs give them.
"""

from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

from .. import operators
from ..errors import InputError, InputFileNotFoundError
from ..recursive.tree import Node

UNKNOWN = "unknown"


@dataclass
class Answer:
    """An answer to a follow-up: its `text`, where it came from (`source`: ``"tool"``, ``"model"`` or ``"none"``),
    when a model self-asked it, that run's `trace` (its root; its children become the follow-up's children), and
    `meta`: what the trace records about how it was found (e.g. ``{"passages": [...]}``, the retrieved passage ids)."""

    text: str
    source: str = "tool"
    trace: Optional[Node] = None
    generated_tokens: int = 0
    meta: dict = field(default_factory=dict)


class Answerer:
    """Base class: override `__call__` (one question) or `answer_batch` (several). `name` is how traces name it."""

    name = "answerer"

    def __call__(self, question: str, depth: int) -> Answer:
        return self.answer_batch([question], depth)[0]

    def answer_batch(self, questions: list[str], depth: int) -> list[Answer]:
        return [self(question, depth) for question in questions]


class ToolAnswerer(Answerer):
    """Wraps a Python callable ``(question) -> str`` as a tool (``answer_source="tool"``); a tool that returns
    `None` or blank text cannot answer (``answer_source="none"``)."""

    name = "tool"

    def __init__(self, fn: Callable[[str], Any]):
        if not callable(fn):
            raise TypeError(f"a tool must be callable, got {type(fn).__name__}")
        self.fn = fn

    def __call__(self, question: str, depth: int) -> Answer:
        value = self.fn(question)
        text = "" if value is None else str(value).strip()
        return Answer(text, "tool") if text else Answer(UNKNOWN, "none")


class OperatorAnswerer(Answerer):
    """Answers the follow-ups written in an operator's template (`peftprompt.operators.TEMPLATES`: which of two
    dates is earlier or later, which quantity is larger or smaller, whether two values are the same, whether both
    are yes) by computing them: ``answer_source="tool"``, and ``meta`` records the operator, the operands as written
    and as parsed. A follow-up in no template cannot be answered here (``"none"``, nothing recorded); one that opens
    like a template but is not in its form (a value left out), or one in a template whose values cannot be compared (unparsable, unknown, of different kinds, overlapping dates) cannot
    either, and its ``meta`` says so (``operator``, ``operands``, ``operator_failure``): the next answerer gets it,
    and with ``recurse`` the model answers it one layer deeper. It never raises and never guesses."""

    name = "operators"

    def __call__(self, question: str, depth: int = 0) -> Answer:
        call = operators.parse_follow_up(question)
        if call is None:
            asked = operators.asked_operator(question)  # an operator's opening, the rest not in its form
            return Answer(UNKNOWN, "none", meta={} if asked is None else {
                "operator": asked, "operator_failure": f"not in the form {operators.TEMPLATES[asked]!r}"})
        try:
            result = operators.apply(call)
        except operators.OperatorError as err:
            return Answer(UNKNOWN, "none", meta={"operator": call.operator, "operands": [list(p) for p in zip(
                call.names, call.values)], "operator_failure": str(err)})
        return Answer(result.answer, "tool", meta=result.to_meta())


class AnswererChain(Answerer):
    """Several answerers on one layer, tried in order: each follow-up goes to the first that can answer it
    (``answer_source`` other than ``"none"``), and the trace names it (``meta["answerer"]``). A follow-up none of
    them answers is ``"none"``, keeping what each reported (an operator's ``operator_failure``), so the runner's
    ``recurse`` hands it to the model. Its name joins theirs with ``+`` (``"operators+retriever"``)."""

    def __init__(self, answerers: Sequence[Answerer]):
        if not answerers:
            raise ValueError("AnswererChain needs at least one answerer")
        self.answerers = [as_answerer(a) for a in answerers]
        self.name = "+".join(a.name for a in self.answerers)

    def answer_batch(self, questions: list[str], depth: int = 0) -> list[Answer]:
        answers: list[Answer] = [Answer(UNKNOWN, "none") for _ in questions]
        pending = list(range(len(questions)))
        for answerer in self.answerers:
            if not pending:
                break
            for i, answer in zip(pending, answerer.answer_batch([questions[i] for i in pending], depth)):
                meta = {**answers[i].meta, **answer.meta}
                if answer.source != "none":
                    meta["answerer"] = answerer.name
                answers[i] = Answer(answer.text, answer.source, answer.trace, answer.generated_tokens, meta)
            pending = [i for i in pending if answers[i].source == "none"]
        return answers


ANSWER_TYPES = (
    ("date", ("when ", "what year", "in what year", "which year", "in which year", "what date", "on what date")),
    ("person", ("who ", "whom ", "who's ")),
    ("place", ("where ", "which country", "what country", "in which country", "in what country", "what nationality",
               "what is the nationality")),
    ("number", ("how many", "how much", "how old", "how long")),
    ("yes/no", ("is ", "are ", "was ", "were ", "do ", "does ", "did ", "can ", "has ", "have ")),
)


def answer_type(question: str) -> Optional[str]:
    """The kind of answer `question` asks for, read from its first words: ``date``, ``person``, ``place``,
    ``number``, ``yes/no``, or `None` when they do not say (``What ...``, ``Which film ...``)."""
    text = " ".join(question.lower().split()) + " "
    for kind, openings in ANSWER_TYPES:
        if text.startswith(openings):
            return kind
    return None


class RetrieverAnswerer(Answerer):
    """A knowledge base of ``(question, answer)`` facts; a follow-up gets the answer of the most similar known
    question (MiniLM sentence embeddings: mean pooling, L2-normalised, cosine) when the similarity is at least
    `threshold` and the two questions do not ask for different kinds of answer (`answer_type`), else ``"unknown"``
    with ``answer_source="none"``. The type check matters for compositional follow-ups: ``"When did the director of
    Jaws die?"`` is close to the fact ``"Who is the director of Jaws?"`` (cosine 0.88) but must not get a name.

    Args:
        facts (`list[tuple[str, str]]`): The known questions and their answers.
        threshold (`float`, defaults to 0.8): The least cosine similarity accepted.
        check_types (`bool`, defaults to `True`): Refuse a fact whose question asks for another kind of answer.
        backbone (`str`, defaults to ``"minilm"``): Passed to `peftprompt.backbones.load_backbone`.
        model, tokenizer: An already loaded encoder (skips loading `backbone`).

    Attributes:
        last_scores (`list[float]`): The best similarity of each question of the last call.
    """

    name = "retriever"

    def __init__(
        self,
        facts: list[tuple[str, str]],
        threshold: float = 0.8,
        backbone: str = "minilm",
        model=None,
        tokenizer=None,
        batch_size: int = 32,
        check_types: bool = True,
    ):
        from ..retrieval.embed import SentenceEncoder

        self.encoder = SentenceEncoder(backbone, model=model, tokenizer=tokenizer)
        self.model, self.tokenizer = self.encoder.model, self.encoder.tokenizer
        self.facts = [(str(q), str(a)) for q, a in facts]
        self.threshold = threshold
        self.check_types = check_types
        self.batch_size = batch_size
        self.last_scores: list[float] = []
        self.keys = self.embed([q for q, _ in self.facts]) if self.facts else None

    @classmethod
    def from_jsonl(cls, path: Union[str, os.PathLike], **kwargs) -> "RetrieverAnswerer":
        """Read facts from JSONL lines ``{"question": ..., "answer": ...}``; errors name ``file:line``."""
        path = Path(path)
        facts = []
        if not path.is_file():
            raise InputFileNotFoundError(f"facts file {path} does not exist", file=path)
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise InputError(f"invalid JSON ({err.msg} at column {err.colno})", file=path,
                                     line=lineno) from err
                if not isinstance(row, dict):
                    raise InputError(f"a fact must be a JSON object, got {type(row).__name__}", file=path, line=lineno)
                for key in ("question", "answer"):
                    if not isinstance(row.get(key), str) or not row[key].strip():
                        raise InputError(f"field {key!r} must be a non-empty string", file=path, line=lineno,
                                         field=key)
                facts.append((row["question"], row["answer"]))
        return cls(facts, **kwargs)

    def embed(self, texts: list[str]):
        """Mean-pooled, L2-normalised embeddings of `texts` (128 tokens at most), shape ``(len(texts), hidden)``."""
        return self.encoder.encode(texts, batch_size=self.batch_size, max_length=128)

    def answer_batch(self, questions: list[str], depth: int = 0) -> list[Answer]:
        if not questions:
            return []
        if self.keys is None:
            self.last_scores = [0.0] * len(questions)
            return [Answer(UNKNOWN, "none") for _ in questions]
        scores = self.embed(list(questions)) @ self.keys.T
        best, index = scores.max(dim=1)
        self.last_scores = best.tolist()
        answers = []
        for question, score, i in zip(questions, best.tolist(), index.tolist()):
            kinds = (answer_type(question), answer_type(self.facts[i][0])) if self.check_types else (None, None)
            clash = None not in kinds and kinds[0] != kinds[1]
            answers.append(Answer(self.facts[i][1], "tool") if score >= self.threshold and not clash
                           else Answer(UNKNOWN, "none"))
        return answers


def as_answerer(obj: Any) -> Answerer:
    """`obj` if it is an `Answerer`, else a callable ``(question) -> str`` wrapped as a `ToolAnswerer`."""
    if isinstance(obj, Answerer):
        return obj
    return ToolAnswerer(obj)


ANSWERER_NAMES = ("retrieval", "retriever", "operators", "model", "module:function")
"""What `answerer_from_name` understands, alone or joined by ``+`` (tried in that order on one layer)."""


def answerer_from_name(
    name: str, facts: Optional[Sequence[tuple[str, str]]] = None, threshold: float = 0.8, retriever=None,
    retrieval: Optional[Answerer] = None,
) -> Optional[Answerer]:
    """The answerer `name` stands for: ``"retrieval"`` (`retrieval`: passages read by the model, a
    `peftprompt.selfask.open_book.RetrievalAnswerer`), ``"retriever"`` (a `RetrieverAnswerer` over `facts`, or
    `retriever` when given, shared between layers), ``"operators"`` (an `OperatorAnswerer`), ``"model"`` (`None`:
    the runner's own model, one level deeper) or ``"module:function"`` (a tool: that importable callable
    ``(question) -> str``). Names joined by ``+`` are tried in that order on one layer (`AnswererChain`):
    ``"operators+retriever"``; ``"model"`` may only come last there (the model answers what the others could not).

    Raises:
        InputError: An unknown name, a tool that cannot be imported, a retriever without facts, or retrieval without
            a retrieval answerer.
    """
    parts = [part.strip() for part in name.split("+")]
    if len(parts) > 1:
        if "" in parts or "model" in parts[:-1]:
            raise InputError(f"answerer {name!r}: join names with '+', 'model' only last (e.g. operators+retriever)")
        chain = [answerer_from_name(part, facts, threshold, retriever, retrieval) for part in parts if part != "model"]
        return AnswererChain(chain)
    if name == "model":
        return None
    if name == "operators":
        return OperatorAnswerer()
    if name == "retrieval":
        if retrieval is None:
            raise InputError("answerer 'retrieval' needs a passage index (--index DIR)")
        return retrieval
    if name == "retriever":
        if retriever is not None:
            return retriever
        if facts is None:
            raise InputError("answerer 'retriever' needs facts (a knowledge base: --kb FILE or the evaluation trees)")
        return RetrieverAnswerer(list(facts), threshold=threshold)
    module, _, attr = name.partition(":")
    if not module or not attr:
        raise InputError(f"unknown answerer {name!r}; choose retrieval, retriever, operators, model or a tool as "
                         "module:function (join several with '+')")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise InputError(f"answerer {name!r}: cannot import the tool ({err})") from err
    return ToolAnswerer(fn)


def _retriever_in(answerer: Optional[Answerer]) -> Optional[Answerer]:
    parts = answerer.answerers if isinstance(answerer, AnswererChain) else [answerer]
    return next((a for a in parts if isinstance(a, RetrieverAnswerer)), None)


def answerers_from_names(
    names: Sequence[str], facts: Optional[Sequence[tuple[str, str]]] = None, threshold: float = 0.8, retriever=None,
    retrieval: Optional[Answerer] = None,
) -> list[Optional[Answerer]]:
    """One `answerer_from_name` per layer, every ``"retriever"`` (alone or in a ``+`` chain) sharing one
    `RetrieverAnswerer` (`retriever`, or one built over `facts`) and every ``"retrieval"`` layer `retrieval`: the
    ``answerer`` list of `SelfAskRunner`."""
    layers: list[Optional[Answerer]] = []
    for name in names:
        layers.append(answerer_from_name(name, facts, threshold, retriever, retrieval))
        retriever = retriever or _retriever_in(layers[-1])
    return layers
