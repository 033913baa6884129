"""Self-ask evaluation: exact metrics on hand-made trees with a scripted model, the knowledge base, the side-by-side
comparison, and `peftprompt eval selfask` on a tiny random Llama."""

from __future__ import annotations

import json

import pytest

from peftprompt.recursive import Node
from peftprompt.selfask import FEW_SHOT_DIRECT, FEW_SHOT_SELF_ASK, SelfAskRunner, ToolAnswerer
from peftprompt.selfask.evaluate import (
    compare_approaches,
    evaluate_selfask,
    format_table,
    knowledge_base,
    sample_trees,
)

from conftest import Scripted


def tree(question, answer, subs, aliases=()):
    return Node(question=question, answer=answer, aliases=list(aliases), children=[
        Node(question=q, answer=a, id=str(k)) for k, (q, a) in enumerate(subs, start=1)])


TREES = [
    tree("Where is the capital of France?", "Paris",
         [("What is France?", "a country"), ("What is the capital of France?", "Paris")]),
    tree("Which city is the capital of Japan?", "Tokyo",
         [("What is Japan?", "a country"), ("What is the capital of Japan?", "Tokyo")], aliases=["Tokio"]),
    tree("What is the largest animal?", "Blue Whale",
         [("What is an animal?", "a living being"), ("Which animal is largest?", "blue whale")]),
]
YES = "Are follow up questions needed here: Yes.\n"
SCRIPTS = {
    # right: two follow-ups, then the final answer
    "Where is the capital of France?": [
        YES + "Follow up: What is France?\nIntermediate answer:",
        "Follow up: What is the capital of France?\nIntermediate answer:",
        "So the final answer is: Paris\n",
    ],
    # sub-questions answered right (directly) but the final answer is wrong: the compositionality gap
    "Which city is the capital of Japan?": [
        YES + "Follow up: What is Japan?\nIntermediate answer:",
        "So the final answer is: Osaka\n",
    ],
    # malformed: starts another question, the answer is forced (partly right: F1 2/3)
    "What is the largest animal?": ["Question: something else\nSo the final answer is: nothing\n"],
}
FORCED = {  # direct answers (roots for the direct approach; the gold sub-questions for the check)
    "What is France?": " A country.\n",
    "What is the capital of France?": " Paris\n",
    "What is Japan?": " a country\n",
    "What is the capital of Japan?": " Tokyo\n",
    "What is an animal?": " a living being\n",
    "Which animal is largest?": " the elephant\n",  # the one wrong sub-answer: tree 3 is out of the gap
    "What is the largest animal?": " Whale\n",
    "Where is the capital of France?": " Paris\n",
    "Which city is the capital of Japan?": " Tokio\n",
}
FACTS = {"What is France?": "a country", "What is the capital of France?": "Paris", "What is Japan?": "a country"}


def runner(model, **kwargs):
    return SelfAskRunner(generate_fn=model, answerer=ToolAnswerer(lambda q: FACTS.get(q, "unknown")), **kwargs)


def test_self_ask_metrics_are_exact():
    result = evaluate_selfask(TREES, runner(Scripted(SCRIPTS, FORCED)), "self_ask", return_records=True)
    assert result["n"] == 3
    assert result["em"] == pytest.approx(1 / 3)
    assert result["f1"] == pytest.approx((1 + 0 + 2 / 3) / 3)
    assert result["well_formed"] == pytest.approx(2 / 3)
    assert result["mean_follow_ups"] == pytest.approx((2 + 1 + 0) / 3)
    assert result["sub_questions_correct"] == pytest.approx(5 / 6)
    assert result["gap_support"] == 2
    assert result["compositionality_gap"] == pytest.approx(1 / 2)
    assert result["issues"] == {"text outside the template": 1}
    assert result["mean_generated_tokens"] > 0
    assert [e["answer"] for e in result["examples"]] == ["Paris", "Osaka", "Whale"]
    assert [e["correct"] for e in result["examples"]] == [True, False, False]
    assert result["examples"][1]["gold"] == ["Tokyo", "Tokio"]
    assert result["examples"][0]["trace"]["children"][1]["answer"] == "Paris"
    records = result["records"]
    assert [r["sub_questions_all_correct"] for r in records] == [True, True, False]
    assert records[2]["sub_questions"][1] == {"question": "Which animal is largest?", "gold": ["blue whale"],
                                              "answer": "the elephant", "correct": False}
    json.dumps(result)  # JSON-ready
    for key in ("em", "f1", "well_formed", "compositionality_gap", "sub_questions_correct"):
        assert 0 <= result[key] <= 1


def test_direct_metrics_and_no_sub_question_check():
    result = evaluate_selfask(TREES, runner(Scripted(SCRIPTS, FORCED)), "direct")
    assert result["em"] == pytest.approx(2 / 3)  # "Tokio" is an alias
    assert result["f1"] == pytest.approx((1 + 1 + 2 / 3) / 3)
    assert result["well_formed"] == 1.0 and result["mean_follow_ups"] == 0.0
    assert result["compositionality_gap"] == 0.0 and result["gap_support"] == 2
    assert result["issues"] == {}
    assert "records" not in result

    model = Scripted(SCRIPTS, FORCED)
    result = evaluate_selfask(TREES, runner(model), "direct", sub_question_check=False)
    assert result["compositionality_gap"] is None and result["sub_questions_correct"] is None
    assert len(model.calls) == 1  # only the roots were asked


def test_gap_is_none_without_fully_right_sub_questions():
    forced = {**FORCED, "What is France?": " Spain\n", "What is Japan?": " Spain\n"}
    result = evaluate_selfask(TREES, runner(Scripted(SCRIPTS, forced)), "self_ask")
    assert result["compositionality_gap"] is None and result["gap_support"] == 0
    assert result["sub_questions_correct"] == pytest.approx(3 / 6)


def test_evaluate_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown approach"):
        evaluate_selfask(TREES, runner(Scripted(SCRIPTS, FORCED)), "cot")
    with pytest.raises(ValueError, match="no gold answer"):
        evaluate_selfask([Node(question="q?", answer=None, answer_source="none")], runner(Scripted({})))


def test_knowledge_base_deduplicates_and_leaves_out_roots():
    trees = [
        Node(question="Root one?", answer="r1", children=[
            Node(question="Who is A?", answer="a", id="1", children=[
                Node(question="Where is B?", answer="b", answer_source="derived", id="1")]),
            Node(question="Unknown step?", answer=None, answer_source="none", id="2"),
        ]),
        Node(question="Root two?", answer="r2", children=[
            Node(question="who is a", answer="other", id="1", answer_source="tool"),  # same question: dropped
            Node(question="Root one?", answer="r1", id="2", answer_source="model"),
        ]),
    ]
    assert knowledge_base(trees) == [("Who is A?", "a"), ("Where is B?", "b"), ("Root one?", "r1")]
    assert knowledge_base(trees[:1]) == [("Who is A?", "a"), ("Where is B?", "b")]
    assert ("Where is the capital of France?", "Paris") not in knowledge_base(TREES)
    assert len(knowledge_base(TREES)) == 6


def test_compare_approaches_side_by_side():
    model = Scripted(SCRIPTS, FORCED)
    tool = ToolAnswerer(lambda q: FACTS.get(q, "unknown"))
    results = compare_approaches(TREES, answerer=tool, runner_kwargs={"generate_fn": model})
    assert set(results) == {"n", "direct", "few_shot_self_ask"} and results["n"] == 3
    assert results["direct"]["em"] == pytest.approx(2 / 3)
    assert results["few_shot_self_ask"]["em"] == pytest.approx(1 / 3)
    assert results["few_shot_self_ask"]["compositionality_gap"] == pytest.approx(1 / 2)
    prompts = [p for call in model.calls for p in call]
    # calls: the sub-questions and the roots answered directly (4-shot direct), then self-ask steps (4-shot)
    assert all(p.startswith(FEW_SHOT_DIRECT) for call in model.calls[:2] for p in call)
    assert all(p.startswith(FEW_SHOT_SELF_ASK) for call in model.calls[2:] for p in call)
    # the sub-questions are asked once for both base-model approaches
    assert sum("Question: Which animal is largest?" in p for p in prompts) == 1

    tuned = Scripted(SCRIPTS, FORCED)
    results = compare_approaches(TREES, answerer=tool, runner_kwargs={"generate_fn": model},
                                 adapter_runner_kwargs={"generate_fn": tuned}, approaches=["fine_tuned_self_ask"])
    assert set(results) == {"n", "fine_tuned_self_ask"}
    assert results["fine_tuned_self_ask"]["em"] == pytest.approx(1 / 3)
    assert all(p.startswith("Question: ") for call in tuned.calls for p in call)  # zero-shot
    table = format_table(results).splitlines()
    assert table[0].split()[:3] == ["approach", "EM", "F1"] and table[1].startswith("fine_tuned_self_ask  0.333")

    with pytest.raises(ValueError, match="needs an adapter"):
        compare_approaches(TREES, answerer=tool, runner_kwargs={"generate_fn": model},
                           approaches=["fine_tuned_self_ask"])
    with pytest.raises(ValueError, match="unknown approach"):
        compare_approaches(TREES, answerer=tool, runner_kwargs={"generate_fn": model}, approaches=["cot"])


def test_sample_trees_is_seeded_spread_and_in_file_order():
    trees = [Node(question=f"q{i}?", answer=str(i)) for i in range(100)]
    first = sample_trees(trees, 10, seed=0)
    assert first == sample_trees(trees, 10, seed=0) and first != sample_trees(trees, 10, seed=1)
    indices = [int(t.answer) for t in first]
    assert indices == sorted(indices) and len(set(indices)) == 10 and max(indices) >= 50
    assert sample_trees(trees, 3) == trees[:3]
    assert sample_trees(trees, 500, seed=0) == trees and sample_trees(trees, None) == trees


@pytest.mark.parametrize("argv, message", [
    (["eval", "selfask", "--source", "no_such_source", "--n", "2"], "unknown source 'no_such_source'"),
    (["eval", "selfask", "--approaches", "fine_tuned_self_ask", "--n", "2"], "needs --adapter"),
    (["eval", "selfask", "--approaches", "cot"], "unknown approach 'cot'"),
    (["eval", "selfask", "--n", "0"], "--n must be >= 1"),
])
def test_eval_command_errors_are_one_line(argv, message, capsys):
    from peftprompt.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("peftprompt eval: error:")


def test_leaf_only_knowledge_base_holds_no_inner_node_answer():
    trees = [
        Node(question="Which film's director died later, A or B?", answer="B", children=[
            Node(question="When did the director of A die?", answer="1975", id="1", children=[
                Node(question="Who directed A?", answer="Stevens", id="1"),
                Node(question="When did Stevens die?", answer="1975", id="2")]),
            Node(question="When did the director of B die?", answer="1987", id="2", children=[
                Node(question="Who directed B?", answer="Sirk", id="1"),
                Node(question="When did Sirk die?", answer="1987", id="2")])]),
        # a leaf here asks what is an inner node above: never a fact of the leaf-only base
        Node(question="Other?", answer="x", children=[
            Node(question="when did the director of A die", answer="1975", id="1")]),
    ]
    leaves = knowledge_base(trees, leaves_only=True)
    assert leaves == [("Who directed A?", "Stevens"), ("When did Stevens die?", "1975"), ("Who directed B?", "Sirk"),
                      ("When did Sirk die?", "1987")]
    inner = {node.question.lower().rstrip("?") for t in trees for _, node in t.iter_nodes() if node.children}
    assert not inner & {q.lower().rstrip("?") for q, _ in leaves}
    assert ("When did the director of A die?", "1975") in knowledge_base(trees)  # the full base has it


@pytest.mark.parametrize("argv, message", [
    (["--answerers", "retriever", "--no-kb"], "contradicts --no-kb"),
    (["--answerers", "nosuchmodule:fn"], "cannot import the tool"),
    (["--answerers", "oracle"], "unknown answerer 'oracle'"),
])
def test_eval_command_answerer_errors_are_one_line(argv, message, capsys):
    from peftprompt.cli import main

    assert main(["eval", "selfask", "--n", "1", "--approaches", "direct", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
