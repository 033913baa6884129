"""Evaluation metrics: accuracy, entity-level F1 (CoNLL-2003), and SQuAD exact match / token F1.

How `evaluate` is used: it is not. ``evaluate.load("accuracy" | "seqeval" | "squad")`` fetches the metric script
from the Hub and fails offline ("Couldn't find a module script"), and copying the scripts into the repository to
load them by path would only add a module cache and a dynamic import around the same libraries. The metrics are
computed here with the libraries those scripts wrap, so the numbers are the ones `evaluate` would give:

- `accuracy`: ``sklearn.metrics.accuracy_score`` (what evaluate's ``accuracy`` calls).
- `entity_f1`: ``seqeval.metrics`` (what evaluate's ``seqeval`` calls). The default ``mode="default"`` is seqeval's
  conlleval-compatible scoring, the official CoNLL-2003 measure: an ``I-X`` that follows ``O`` or another type
  starts a new entity. ``mode="strict"`` uses seqeval's strict IOB2 matching, where such an ``I-X`` starts no entity.
  Tags are read as IOB2 (``scheme="IOB2"``, what ``peftprompt.data.read_conll03`` returns). The original CoNLL-2003
  files are IOB1 (``B-X`` only between two adjacent entities of the same type); pass ``scheme="IOB1"`` for such tags
  and both sequences are converted to IOB2 (`iob1_to_iob2`) before scoring. This matters in strict mode, which
  would otherwise drop every IOB1 entity that starts with ``I-``; the conlleval mode reads IOB1 and IOB2 alike.
- `exact_match` / `token_f1`: the SQuAD evaluation script's answer normalisation (lower case, drop punctuation and
  the articles a/an/the, collapse whitespace) and token-overlap F1, best over the answer aliases. As in SQuAD 2.0,
  two answers that normalise to nothing count as a match (F1 1.0) and one empty side as 0.0.

scikit-learn and seqeval are imported lazily, so importing this module is cheap.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Any, Sequence, Union

ENTITY_SCHEMES = ("IOB1", "IOB2")
ENTITY_MODES = ("default", "strict")

_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def accuracy(predictions: Sequence[Any], references: Sequence[Any]) -> float:
    """Fraction of `predictions` equal to `references` (``sklearn.metrics.accuracy_score``), in [0, 1]."""
    if len(predictions) != len(references):
        raise ValueError(f"accuracy: {len(predictions)} predictions for {len(references)} references")
    if len(references) == 0:
        raise ValueError("accuracy: no references to score")
    from sklearn.metrics import accuracy_score

    return float(accuracy_score(list(references), list(predictions)))


def iob1_to_iob2(tags: Sequence[str]) -> list[str]:
    """Convert IOB1 tags to IOB2: an ``I-X`` that starts an entity (after ``O`` or another type) becomes ``B-X``.

    IOB2 input comes back unchanged, so converting is always safe.
    """
    out: list[str] = []
    previous = "O"
    for tag in tags:
        if tag.startswith("I-") and (previous == "O" or previous[2:] != tag[2:]):
            tag = "B-" + tag[2:]
        out.append(tag)
        previous = tag
    return out


def _check_tags(tags: Sequence[str], where: str) -> None:
    for position, tag in enumerate(tags):
        if not isinstance(tag, str) or not (tag == "O" or (tag[:2] in ("B-", "I-") and len(tag) > 2)):
            raise ValueError(f"{where}, token {position}: tag must be 'O', 'B-TYPE' or 'I-TYPE', got {tag!r}")


def _count_entities(sequences: list[list[str]], strict: bool) -> int:
    if strict:
        from seqeval.scheme import IOB2, Entities

        return sum(len(sentence) for sentence in Entities(sequences, IOB2).entities)
    from seqeval.metrics.sequence_labeling import get_entities

    return len(get_entities(sequences))


def entity_f1(
    pred_tags: Sequence[Sequence[str]],
    gold_tags: Sequence[Sequence[str]],
    scheme: str = "IOB2",
    mode: str = "default",
) -> dict:
    """Entity-level precision, recall and F1 of tagged sentences (``seqeval.metrics``), as for CoNLL-2003.

    Args:
        pred_tags (`list[list[str]]`): Predicted tags, one list per sentence (one tag per word).
        gold_tags (`list[list[str]]`): Gold tags, same shape.
        scheme (`str`, defaults to ``"IOB2"``): ``"IOB2"`` or ``"IOB1"``; IOB1 tags are converted to IOB2 first.
        mode (`str`, defaults to ``"default"``): ``"default"`` (conlleval-compatible, the CoNLL-2003 measure) or
            ``"strict"`` (IOB2 entities must start with ``B-``).

    Returns:
        `dict`: ``precision``, ``recall``, ``f1`` (in [0, 1]; 0.0 where undefined), ``gold_entities``,
        ``predicted_entities`` and ``per_type`` (``{"PER": {"precision", "recall", "f1", "gold_entities"}, ...}``).
    """
    if scheme not in ENTITY_SCHEMES:
        raise ValueError(f"scheme must be one of {', '.join(ENTITY_SCHEMES)}, got {scheme!r}")
    if mode not in ENTITY_MODES:
        raise ValueError(f"mode must be one of {', '.join(ENTITY_MODES)}, got {mode!r}")
    if len(pred_tags) != len(gold_tags):
        raise ValueError(f"entity_f1: {len(pred_tags)} predicted sentences for {len(gold_tags)} gold sentences")
    preds: list[list[str]] = []
    golds: list[list[str]] = []
    for index, (pred, gold) in enumerate(zip(pred_tags, gold_tags)):
        if len(pred) != len(gold):
            raise ValueError(f"entity_f1: sentence {index}: {len(pred)} predicted tags for {len(gold)} gold tags")
        _check_tags(pred, f"entity_f1: predicted sentence {index}")
        _check_tags(gold, f"entity_f1: gold sentence {index}")
        preds.append(iob1_to_iob2(pred) if scheme == "IOB1" else list(pred))
        golds.append(iob1_to_iob2(gold) if scheme == "IOB1" else list(gold))

    from seqeval.metrics import classification_report, f1_score, precision_score, recall_score
    from seqeval.scheme import IOB2

    kwargs: dict[str, Any] = {"zero_division": 0}
    if mode == "strict":
        kwargs.update(mode="strict", scheme=IOB2)
    gold_count = _count_entities(golds, strict=mode == "strict")
    pred_count = _count_entities(preds, strict=mode == "strict")
    per_type: dict[str, dict] = {}
    if gold_count or pred_count:
        report = classification_report(golds, preds, output_dict=True, **kwargs)
        for name, row in report.items():
            if name.endswith(" avg"):
                continue
            per_type[name] = {
                "precision": float(row["precision"]),
                "recall": float(row["recall"]),
                "f1": float(row["f1-score"]),
                "gold_entities": int(row["support"]),
            }
    return {
        "precision": float(precision_score(golds, preds, **kwargs)),
        "recall": float(recall_score(golds, preds, **kwargs)),
        "f1": float(f1_score(golds, preds, **kwargs)),
        "gold_entities": gold_count,
        "predicted_entities": pred_count,
        "per_type": per_type,
    }


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
    """Mean `exact_match` and `token_f1` over a set of questions (each with its aliases), in [0, 1]."""
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


__all__ = ["accuracy", "entity_f1", "exact_match", "iob1_to_iob2", "normalize_answer", "qa_scores", "token_f1"]
