"""Open-book questions read from the shared data (`peftprompt.retrieval.passages`): passages, supporting ids and
gold hops per source."""

from __future__ import annotations

import pytest

from peftprompt.errors import InputError
from peftprompt.retrieval.passages import Passage, passage_id, pooled_passages, read_questions


def test_passage_ids_are_stable_and_text_is_one_line():
    a = Passage.make(" Jaws ", "Jaws is a film.\n\n Directed   by Spielberg.")
    assert a.text == "Jaws is a film. Directed by Spielberg." and a.title == "Jaws"
    assert a.id == passage_id("Jaws", a.text) == Passage.make("Jaws", a.text).id
    assert a.id != Passage.make("Jaws (film)", a.text).id


def test_hotpotqa_supporting_passages_are_its_supporting_titles():
    questions = read_questions("hotpotqa_distractor", "test")
    assert len(questions) == 372 and {q.kind for q in questions} == {"bridge", "comparison"}
    first = questions[0]
    titles = {p.id: p.title for p in first.passages}
    assert len(first.passages) == 10 and not first.hops
    assert len(first.supporting) == 2 and all(i in titles for i in first.supporting)


def test_twowiki_hops_are_the_gold_tree_leaves_with_the_paragraph_about_their_subject():
    question = read_questions("2wikimultihopqa_context", "train", limit=1)[0]
    titles = {p.id: p.title for p in question.passages}
    assert [(h.question, h.answer, [titles[i] for i in h.supporting]) for h in question.hops] == [
        ("Who is the performer of Get Low?", "Dillon Francis", ["Get Low (Dillon Francis and DJ Snake song)"]),
        ("When was Dillon Francis born?", "October 5, 1987", ["Dillon Francis"]),
    ]
    assert question.kind == "compositional" and question.split == "train"


def test_musique_hops_use_paragraph_support_idx_and_resolve_references():
    question = read_questions("musique_context", "train", limit=1)[0]
    assert question.kind == "2hop" and len(question.passages) == 20 and len(question.supporting) == 2
    first, second = question.hops
    assert second.question == "Who was the first president of American Psychological Association?"  # #1 resolved
    assert set(first.supporting) | set(second.supporting) == set(question.supporting)


def test_pooled_passages_count_each_paragraph_once():
    questions = read_questions("musique_context", "dev")
    pooled = pooled_passages(questions)
    assert len(pooled) == len({p.id for p in pooled}) == 2279 < sum(len(q.passages) for q in questions)


def test_bad_source_or_split_names_the_field():
    with pytest.raises(InputError, match="unknown source 'wiki'"):
        read_questions("wiki")
    with pytest.raises(InputError, match="split"):
        read_questions("musique_context", "test")
