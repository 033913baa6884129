"""Entity-level precision, recall and F1 (CoNLL-2003), the one implementation: the packaged `evaluate` module
(``seqeval.py``) and `peftprompt.metrics.entity_f1` both call `entity_f1` here.

The scores are ``seqeval.metrics``'s. The default ``mode="default"`` is seqeval's conlleval-compatible scoring, the
official CoNLL-2003 measure: an ``I-X`` that follows ``O`` or another type starts a new entity. ``mode="strict"``
uses seqeval's strict IOB2 matching, where such an ``I-X`` starts no entity. Tags are read as IOB2
(``scheme="IOB2"``, what ``peftprompt.data.read_conll03`` returns). The original CoNLL-2003 files are IOB1 (``B-X``
only between two adjacent entities of the same type); pass ``scheme="IOB1"`` for such tags and both sequences are
converted to IOB2 (`iob1_to_iob2`) before scoring. This matters in strict mode, which would otherwise drop every
IOB1 entity that starts with ``I-``; the conlleval mode reads IOB1 and IOB2 alike.

seqeval is imported inside the functions, so importing this file (``peftprompt.data`` does, for `iob1_to_iob2`) is
cheap.
"""

from __future__ import annotations

from typing import Any, Sequence

ENTITY_SCHEMES = ("IOB1", "IOB2")
ENTITY_MODES = ("default", "strict")


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

    Raises:
        `ValueError`: an unknown scheme or mode, shapes that differ, or a tag that is not ``O`` / ``B-X`` / ``I-X``
            (naming the sentence and token).
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
