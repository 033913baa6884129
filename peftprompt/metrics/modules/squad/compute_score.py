"""SQuAD exact match and token F1, the one implementation: the packaged `evaluate` module (``squad.py``), the
self-ask evaluation (per question) and `peftprompt.metrics.qa_scores` all call the functions here.

The SQuAD evaluation script's answer normalisation (lower case, drop punctuation and the articles a/an/the,
collapse whitespace) and token-overlap F1, best over the answer aliases. As in SQuAD 2.0, two answers that
normalise to nothing count as a match (F1 1.0) and one empty side as 0.0. Scores are fractions in [0, 1], not the
percentages of the SQuAD script. Standard library only, so importing this file is cheap.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Sequence, Union

_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def normalize_answer(text: str) -> str:
    """SQuAD answer normalisation: lower case, drop punctuation and the articles a/an/the, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _aliases(answers: Union[str, Sequence[str]]) -> list[str]:
    aliases = [answers] if isinstance(answers, str) else list(answers)
    if not aliases:
        raise ValueError("answers must name at least one gold answer")
    return aliases


def exact_match(prediction: str, answers: Union[str, Sequence[str]]) -> float:
    """1.0 if `prediction` equals any of `answers` after SQuAD normalisation, else 0.0."""
    normalized = normalize_answer(prediction)
    return float(any(normalized == normalize_answer(answer) for answer in _aliases(answers)))


def _token_f1(prediction: str, answer: str) -> float:
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(answer).split()
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    common = Counter(pred_tokens) & Counter(gold_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(pred_tokens)
    recall = same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, answers: Union[str, Sequence[str]]) -> float:
    """SQuAD token-overlap F1 between `prediction` and the best-matching of `answers`, in [0, 1]."""
    return max(_token_f1(prediction, answer) for answer in _aliases(answers))


def qa_scores(predictions: Sequence[str], answers: Sequence[Union[str, Sequence[str]]]) -> dict:
    """Mean `exact_match` and `token_f1` over a set of questions (each with its aliases), in [0, 1].

    Returns:
        `dict`: ``{"exact_match": float, "f1": float, "count": int}``.

    Raises:
        `ValueError`: the two lengths differ, there is no question, or a question has no gold answer.
    """
    if len(predictions) != len(answers):
        raise ValueError(f"qa_scores: {len(predictions)} predictions for {len(answers)} questions")
    if not answers:
        raise ValueError("qa_scores: no questions to score")
    n = len(answers)
    return {
        "exact_match": sum(exact_match(p, a) for p, a in zip(predictions, answers)) / n,
        "f1": sum(token_f1(p, a) for p, a in zip(predictions, answers)) / n,
        "count": n,
    }
