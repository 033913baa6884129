"""Who answers a follow-up question: a tool, a retriever over known facts, or the model itself one level deeper.

An answerer is called as ``answerer(question, depth)`` and returns an `Answer` (text, ``answer_source`` and, for
the model, the trace of the deeper run); ``answer_batch(questions, depth)`` answers several at once (the runner
uses it to batch the follow-ups of a batch of questions). Any plain callable ``(question) -> str`` is a tool:
`as_answerer` wraps it in `ToolAnswerer`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

from ..recursive.tree import Node

if TYPE_CHECKING:  # pragma: no cover
    from .runner import SelfAskRunner

UNKNOWN = "unknown"


@dataclass
class Answer:
    """An answer to a follow-up: its `text`, where it came from (`source`: ``"tool"``, ``"model"`` or ``"none"``)
    and, when a model self-asked it, that run's `trace` (its root; its children become the follow-up's children)."""

    text: str
    source: str = "tool"
    trace: Optional[Node] = None
    generated_tokens: int = 0


class Answerer:
    """Base class: override `__call__` (one question) or `answer_batch` (several)."""

    def __call__(self, question: str, depth: int) -> Answer:
        return self.answer_batch([question], depth)[0]

    def answer_batch(self, questions: list[str], depth: int) -> list[Answer]:
        return [self(question, depth) for question in questions]


class ToolAnswerer(Answerer):
    """Wraps a Python callable ``(question) -> str`` as a tool (``answer_source="tool"``)."""

    def __init__(self, fn: Callable[[str], Any]):
        if not callable(fn):
            raise TypeError(f"a tool must be callable, got {type(fn).__name__}")
        self.fn = fn

    def __call__(self, question: str, depth: int) -> Answer:
        return Answer(str(self.fn(question)), "tool")


class ModelAnswerer(Answerer):
    """Answers a follow-up by running `runner` one level deeper (``depth``); at ``runner.max_depth`` it answers
    directly (the ``No.`` prompt). Its answers have ``answer_source="model"`` and carry the deeper run's trace."""

    def __init__(self, runner: "SelfAskRunner"):
        self.runner = runner

    def answer_batch(self, questions: list[str], depth: int) -> list[Answer]:
        if depth >= self.runner.max_depth:
            results = self.runner.answer_directly(questions)
        else:
            results = self.runner.run_batch(questions, depth=depth)
        return [Answer(r.answer, "model", trace=r.trace, generated_tokens=r.generated_tokens) for r in results]


class RetrieverAnswerer(Answerer):
    """A knowledge base of ``(question, answer)`` facts; a follow-up gets the answer of the most similar known
    question (MiniLM sentence embeddings: mean pooling, L2-normalised, cosine) when the similarity is at least
    `threshold`, else ``"unknown"`` with ``answer_source="none"``.

    Args:
        facts (`list[tuple[str, str]]`): The known questions and their answers.
        threshold (`float`, defaults to 0.8): The least cosine similarity accepted.
        backbone (`str`, defaults to ``"minilm"``): Passed to `peftprompt.backbones.load_backbone`.
        model, tokenizer: An already loaded encoder (skips loading `backbone`).

    Attributes:
        last_scores (`list[float]`): The best similarity of each question of the last call.
    """

    def __init__(
        self,
        facts: list[tuple[str, str]],
        threshold: float = 0.8,
        backbone: str = "minilm",
        model=None,
        tokenizer=None,
        batch_size: int = 32,
    ):
        if model is None or tokenizer is None:
            from ..backbones import load_backbone

            model, tokenizer = load_backbone(backbone, task="feature")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.facts = [(str(q), str(a)) for q, a in facts]
        self.threshold = threshold
        self.batch_size = batch_size
        self.last_scores: list[float] = []
        self.keys = self.embed([q for q, _ in self.facts]) if self.facts else None

    @classmethod
    def from_jsonl(cls, path: Union[str, os.PathLike], **kwargs) -> "RetrieverAnswerer":
        """Read facts from JSONL lines ``{"question": ..., "answer": ...}``; errors name ``file:line``."""
        path = Path(path)
        facts = []
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{lineno}: invalid JSON ({err.msg} at column {err.colno})") from err
                if not isinstance(row, dict):
                    raise ValueError(f"{path}:{lineno}: a fact must be a JSON object, got {type(row).__name__}")
                for key in ("question", "answer"):
                    if not isinstance(row.get(key), str) or not row[key].strip():
                        raise ValueError(f"{path}:{lineno}: field {key!r} must be a non-empty string")
                facts.append((row["question"], row["answer"]))
        return cls(facts, **kwargs)

    def embed(self, texts: list[str]):
        """Mean-pooled, L2-normalised embeddings of `texts`, shape ``(len(texts), hidden)``."""
        import torch

        chunks = []
        with torch.no_grad():
            for start in range(0, len(texts), self.batch_size):
                batch = self.tokenizer(texts[start : start + self.batch_size], padding=True, truncation=True,
                                       max_length=128, return_tensors="pt")
                hidden = self.model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                chunks.append(torch.nn.functional.normalize(pooled, dim=-1))
        return torch.cat(chunks)

    def answer_batch(self, questions: list[str], depth: int = 0) -> list[Answer]:
        if not questions:
            return []
        if self.keys is None:
            self.last_scores = [0.0] * len(questions)
            return [Answer(UNKNOWN, "none") for _ in questions]
        scores = self.embed(list(questions)) @ self.keys.T
        best, index = scores.max(dim=1)
        self.last_scores = best.tolist()
        return [
            Answer(self.facts[i][1], "tool") if s >= self.threshold else Answer(UNKNOWN, "none")
            for s, i in zip(best.tolist(), index.tolist())
        ]


def as_answerer(obj: Any) -> Answerer:
    """`obj` if it is an `Answerer`, else a callable ``(question) -> str`` wrapped as a `ToolAnswerer`."""
    if isinstance(obj, Answerer):
        return obj
    return ToolAnswerer(obj)
