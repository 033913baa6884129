"""Unrolling trees into self-ask episodes: exact texts, span weights, modes, templates, and parsing back."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings

from peftprompt.recursive.tree import Node
from peftprompt.recursive.unroll import (
    LEAST_TO_MOST,
    LossPolicy,
    Template,
    Unroller,
    parse_episode,
    tree_from_episodes,
)

from conftest import golden_tree, trees

GOLDEN_EPISODES = {
    "root": (
        "Question: Who was the first president of the association which published JPI?\n"
        "Are follow up questions needed here: Yes.\n"
        "Follow up: What association published JPI?\n"
        "Intermediate answer: American Psychological Association\n"
        "Follow up: Who was the first president of American Psychological Association?\n"
        "Intermediate answer: G. Stanley Hall\n"
        "So the final answer is: G. Stanley Hall"
    ),
    "root/1": (
        "Question: What association published JPI?\n"
        "Are follow up questions needed here: Yes.\n"
        "Follow up: What is JPI?\n"
        "Intermediate answer: Journal of Personality and Individual Differences\n"
        "Follow up: Which association publishes Journal of Personality and Individual Differences?\n"
        "Intermediate answer: American Psychological Association\n"
        "So the final answer is: American Psychological Association"
    ),
    "root/1/1": (
        "Question: What is JPI?\n"
        "Are follow up questions needed here: No.\n"
        "So the final answer is: Journal of Personality and Individual Differences"
    ),
    "root/1/2": (
        "Question: Which association publishes Journal of Personality and Individual Differences?\n"
        "Are follow up questions needed here: No.\n"
        "So the final answer is: American Psychological Association"
    ),
    "root/2": (
        "Question: Who was the first president of American Psychological Association?\n"
        "Are follow up questions needed here: No.\n"
        "So the final answer is: G. Stanley Hall"
    ),
}


def trained_text(episode) -> list[str]:
    return [episode.text[s.start : s.end] for s in episode.spans if s.weight > 0]


def test_recursive_mode_golden_texts():
    episodes = Unroller()(golden_tree())
    assert [e.path for e in episodes] == list(GOLDEN_EPISODES)
    assert {e.path: e.text for e in episodes} == GOLDEN_EPISODES
    assert {(e.tree_id, e.dataset) for e in episodes} == {("jpi", "golden")}


def test_recursive_mode_trains_decisions_follow_ups_and_final_answers_only():
    root = Unroller()(golden_tree())[0]
    assert [(s.kind, s.weight) for s in root.spans] == [
        ("question", 0.0),
        ("decision", 1.0),
        ("follow_up", 1.0),
        ("intermediate_answer", 0.0),
        ("follow_up", 1.0),
        ("intermediate_answer", 0.0),
        ("final_answer", 1.0),
    ]
    assert trained_text(root) == [
        "Are follow up questions needed here: Yes.\n",
        "Follow up: What association published JPI?\nIntermediate answer:",
        "Follow up: Who was the first president of American Psychological Association?\nIntermediate answer:",
        "So the final answer is: G. Stanley Hall",
    ]
    # spans tile the text exactly
    assert root.spans[0].start == 0 and root.spans[-1].end == len(root.text)
    assert all(a.end == b.start for a, b in zip(root.spans, root.spans[1:]))


def test_flat_mode_uses_leaves_and_weights_answers_by_source():
    policy = LossPolicy(intermediate_answer={"gold": 0.5, "model": 0.25})
    (episode,) = Unroller(mode="flat", policy=policy)(golden_tree())
    assert parse_episode(episode.text).follow_ups == (
        ("What is JPI?", "Journal of Personality and Individual Differences"),
        ("Which association publishes Journal of Personality and Individual Differences?", "American Psychological Association"),
        ("Who was the first president of American Psychological Association?", "G. Stanley Hall"),
    )
    answers = [(s.source, s.weight) for s in episode.spans if s.kind == "intermediate_answer"]
    assert answers == [("tool", 0.0), ("model", 0.25), ("gold", 0.5)]


def test_max_depth_folds_subtrees_into_their_answer():
    episodes = Unroller(max_depth=2)(golden_tree())
    assert [e.path for e in episodes] == ["root", "root/1", "root/2"]
    assert episodes[1].text == (
        "Question: What association published JPI?\n"
        "Are follow up questions needed here: No.\n"
        "So the final answer is: American Psychological Association"
    )
    (root_only,) = Unroller(max_depth=1)(golden_tree())
    assert "Follow up" not in root_only.text


def test_final_answer_weight_by_source_and_masked_question():
    policy = LossPolicy(question=0.0, final_answer={"gold": 1.0, "tool": 0.0})
    episodes = {e.path: e for e in Unroller(policy=policy)(golden_tree())}
    assert episodes["root/1/1"].spans[-1].weight == 0.0  # tool answer
    assert episodes["root/2"].spans[-1].weight == 1.0
    assert episodes["root/1"].spans[-1].weight == 0.0  # 'derived' left out of the table counts 0


def test_nodes_without_answers_are_skipped_and_counted():
    tree = golden_tree()
    tree.children[1].answer = None
    unroller = Unroller()
    paths = [e.path for e in unroller(tree)]
    assert paths == ["root/1", "root/1/1", "root/1/2"]
    assert unroller.skipped == {"follow-up without an answer": 1, "node without an answer": 1}


def test_leaf_episodes_can_be_left_out():
    assert [e.path for e in Unroller(leaf_episodes=False)(golden_tree())] == ["root", "root/1"]


def test_least_to_most_template():
    root = Unroller(template=LEAST_TO_MOST)(golden_tree())[0]
    assert root.text.splitlines()[:3] == [
        "Q: Who was the first president of the association which published JPI?",
        "A: To answer this, first solve these subquestions.",
        "Subquestion: What association published JPI?",
    ]
    assert root.text.endswith("The answer is: G. Stanley Hall")
    assert parse_episode(root.text, LEAST_TO_MOST).answer == "G. Stanley Hall"


def test_whitespace_in_questions_is_collapsed_to_one_line():
    tree = Node(question="Where is\n  Paris?", answer="in\tFrance")
    (episode,) = Unroller()(tree)
    assert episode.text == (
        "Question: Where is Paris?\nAre follow up questions needed here: No.\nSo the final answer is: in France"
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"decision": 1.5}, r"LossPolicy.decision must be a weight in \[0, 1\], got 1.5"),
        ({"final_answer": {"gold": -1}}, r"LossPolicy.final_answer\['gold'\] must be a weight in \[0, 1\]"),
        ({"intermediate_answer": {"oracle": 1}}, r"LossPolicy.intermediate_answer: unknown answer_source \['oracle'\]"),
    ],
)
def test_loss_policy_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LossPolicy(**kwargs)


def test_bad_template_and_mode():
    with pytest.raises(ValueError, match=r"template 'x': field 'follow_up' must contain exactly \{question\}"):
        Template("x", "Q: {question}\n", "yes\n", "no\n", "Follow up:", " {answer}\n", "A: {answer}")
    with pytest.raises(ValueError, match="mode must be one of flat, recursive, mix; got 'deep'"):
        Unroller(mode="deep")


def test_parse_errors_name_the_position():
    with pytest.raises(ValueError, match="does not start with the 'self-ask' question line"):
        parse_episode("Q: what?")
    with pytest.raises(ValueError, match="expected the final answer at character"):
        parse_episode("Question: a?\nAre follow up questions needed here: No.\nThe answer: b")


def shape(node: Node) -> tuple:
    return (node.question, node.answer, tuple(shape(c) for c in node.children))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(trees(5))
def test_episodes_parse_back_into_the_same_tree(tree):
    assert tree.depth() <= 5
    episodes = Unroller()(tree)
    assert len(episodes) == tree.size()
    assert shape(tree_from_episodes(episodes)) == shape(tree)
    for episode in episodes:
        assert "".join(episode.text[s.start : s.end] for s in episode.spans) == episode.text


def test_equal_sibling_questions_keep_their_places():
    """Found by hypothesis: two siblings asking the same question, only the second decomposed further."""
    tree = Node(question="q", answer="a", children=[
        Node(id="1", question="same", answer="x"),
        Node(id="2", question="same", answer="y", children=[Node(id="1", question="deeper", answer="y")]),
    ])
    assert shape(tree_from_episodes(Unroller()(tree))) == shape(tree)


def test_mix_mode_adds_the_flat_episode_of_deep_trees_only():
    recursive, flat = Unroller()(golden_tree()), Unroller(mode="flat")(golden_tree())
    mix = Unroller(mode="mix")(golden_tree())
    assert [e.text for e in mix] == [e.text for e in recursive] + [flat[0].text]
    assert mix[-1].path == "flat:root" and [e.path for e in mix[:-1]] == [e.path for e in recursive]
    shallow = Node(question="Q?", answer="a", children=[Node(question="S?", answer="s", id="1")])
    assert [e.text for e in Unroller(mode="mix")(shallow)] == [e.text for e in Unroller()(shallow)]
    assert len(Unroller(mode="mix", max_depth=2)(golden_tree())) == len(Unroller(max_depth=2)(golden_tree()))
