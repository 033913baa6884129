"""Metrics on small hand-made examples: accuracy, entity F1 (IOB1 / IOB2, conlleval / strict), SQuAD EM and F1."""

from __future__ import annotations

import pytest

from peftprompt.training.metrics import (
    accuracy,
    entity_f1,
    exact_match,
    iob1_to_iob2,
    normalize_answer,
    qa_scores,
    token_f1,
)


def test_accuracy():
    assert accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 0.5
    assert accuracy(["pos", "neg"], ["pos", "neg"]) == 1.0
    with pytest.raises(ValueError, match="3 predictions for 2 references"):
        accuracy([1, 0, 1], [1, 0])
    with pytest.raises(ValueError, match="no references"):
        accuracy([], [])


def test_entity_f1_iob2():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O", "B-MISC", "I-MISC"]]
    pred = [["B-PER", "I-PER", "O", "B-ORG"], ["B-ORG", "O", "B-MISC", "O"]]
    # gold: PER, LOC, ORG, MISC; predicted: PER, ORG (wrong type for the LOC), ORG, MISC (too short) -> 2 of 4 right
    scores = entity_f1(pred, gold)
    assert (scores["precision"], scores["recall"], scores["f1"]) == (0.5, 0.5, 0.5)
    assert (scores["gold_entities"], scores["predicted_entities"]) == (4, 4)
    assert scores["per_type"]["PER"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "gold_entities": 1}
    assert scores["per_type"]["ORG"]["precision"] == 0.5 and scores["per_type"]["ORG"]["recall"] == 1.0
    assert scores["per_type"]["LOC"]["f1"] == 0.0 and scores["per_type"]["MISC"]["f1"] == 0.0
    assert entity_f1(gold, gold)["f1"] == 1.0


def test_iob1_to_iob2():
    assert iob1_to_iob2(["I-PER", "I-PER", "B-PER", "O", "I-LOC", "I-ORG"]) == [
        "B-PER", "I-PER", "B-PER", "O", "B-LOC", "B-ORG"
    ]
    iob2 = ["B-PER", "I-PER", "B-PER", "O", "B-LOC", "I-LOC"]
    assert iob1_to_iob2(iob2) == iob2  # IOB2 passes through unchanged


def test_entity_f1_iob1_scheme_changes_the_strict_score():
    # IOB1: an entity starts with I-; B- only separates two adjacent entities of the same type.
    gold = [["I-PER", "I-PER", "B-PER", "O", "I-LOC"]]  # PER[0:2], PER[2:3], LOC[4:5]
    pred = [["I-PER", "I-PER", "I-PER", "O", "I-LOC"]]  # PER[0:3], LOC[4:5] -> only LOC right
    right = entity_f1(pred, gold, scheme="IOB1", mode="strict")
    assert right["precision"] == 0.5 and right["recall"] == pytest.approx(1 / 3) and right["f1"] == pytest.approx(0.4)
    assert (right["gold_entities"], right["predicted_entities"]) == (3, 2)
    # Read as IOB2, strict matching finds only the B-PER entity in gold and nothing in the prediction.
    wrong = entity_f1(pred, gold, scheme="IOB2", mode="strict")
    assert (wrong["precision"], wrong["recall"], wrong["f1"]) == (0.0, 0.0, 0.0)
    assert (wrong["gold_entities"], wrong["predicted_entities"]) == (1, 0)
    # conlleval (default mode) already reads an I- after O as an entity start: both schemes agree.
    assert entity_f1(pred, gold, scheme="IOB1")["f1"] == pytest.approx(0.4)
    assert entity_f1(pred, gold, scheme="IOB2")["f1"] == pytest.approx(0.4)


def test_entity_f1_ill_formed_iob2_prediction_default_vs_strict():
    gold = [["O", "B-PER", "I-PER"]]
    pred = [["O", "I-PER", "I-PER"]]  # a model's prediction that is not valid IOB2
    assert entity_f1(pred, gold)["f1"] == 1.0  # conlleval: I- after O starts the entity
    assert entity_f1(pred, gold, mode="strict")["f1"] == 0.0


def test_entity_f1_no_entities_anywhere():
    scores = entity_f1([["O", "O"]], [["O", "O"]])
    assert (scores["f1"], scores["gold_entities"], scores["per_type"]) == (0.0, 0, {})


@pytest.mark.parametrize(
    "pred, gold, kwargs, message",
    [
        ([["O"]], [["O"], ["O"]], {}, "1 predicted sentences for 2 gold sentences"),
        ([["O", "O"]], [["O"]], {}, "sentence 0: 2 predicted tags for 1 gold tags"),
        ([["B-PER", "X-PER"]], [["O", "O"]], {}, "predicted sentence 0, token 1: tag must be"),
        ([["O"]], [["O"]], {"scheme": "BIOES"}, "scheme must be one of IOB1, IOB2"),
        ([["O"]], [["O"]], {"mode": "lenient"}, "mode must be one of default, strict"),
    ],
)
def test_entity_f1_errors(pred, gold, kwargs, message):
    with pytest.raises(ValueError, match=message):
        entity_f1(pred, gold, **kwargs)


@pytest.mark.parametrize(
    "text, normalized",
    [
        ("The Eiffel Tower!", "eiffel tower"),
        ("An  Apple, a day.", "apple day"),
        ("The theater", "theater"),  # articles are whole words only
        ("Hyomyeong's", "hyomyeongs"),  # punctuation is dropped, not replaced by a space
        ("  the  ", ""),
    ],
)
def test_normalize_answer(text, normalized):
    assert normalize_answer(text) == normalized


def test_exact_match_with_aliases_and_normalisation():
    assert exact_match("The Eiffel Tower!", ["eiffel tower"]) == 1.0
    assert exact_match("Eiffel", ["Eiffel Tower", "Paris"]) == 0.0
    assert exact_match("paris", ["Eiffel Tower", "Paris."]) == 1.0  # the best alias counts
    assert exact_match("G. Stanley Hall", "g stanley hall") == 1.0  # one answer as a string
    assert exact_match("the", ["a"]) == 1.0  # both normalise to nothing (SQuAD 2.0)
    with pytest.raises(ValueError, match="at least one gold answer"):
        exact_match("x", [])


def test_token_f1_with_aliases():
    assert token_f1("Eiffel", ["Eiffel Tower"]) == pytest.approx(2 / 3)  # P 1, R 1/2
    # "the city of Paris" -> [city, of, paris]; against "Paris": P 1/3, R 1 -> F1 1/2; "Lyon" gives 0
    assert token_f1("the city of Paris", ["Lyon", "Paris"]) == pytest.approx(0.5)
    assert token_f1("paris paris", ["Paris"]) == pytest.approx(2 / 3)  # repeated tokens count once per match
    assert token_f1("London", ["Paris"]) == 0.0
    assert token_f1("", ["Paris"]) == 0.0
    assert token_f1("an", ["the"]) == 1.0


def test_qa_scores():
    scores = qa_scores(["Paris", "the Eiffel", "x"], [["Paris"], ["Eiffel Tower"], "y"])
    assert scores["exact_match"] == pytest.approx(1 / 3)
    assert scores["f1"] == pytest.approx((1 + 2 / 3 + 0) / 3)
    assert scores["count"] == 3
