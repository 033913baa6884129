"""The decomp-tree/v1 model: round trips, #k resolution, every refusal with its dataset/id/path, JSONL files."""

from __future__ import annotations

import copy
import json
import re

import pytest

from peftprompt.recursive import (
    SCHEMA,
    Node,
    SkipReport,
    TreeError,
    check_trainable,
    read_trees,
    read_trees_report,
    resolve_templates,
    tree_stats,
    validate,
    write_trees,
)

JPI = {  # a worked example: the second child gives only its template
    "schema": SCHEMA,
    "id": "ex1",
    "dataset": "toy",
    "split": "train",
    "question": "Who was the first president of the association which published JPI?",
    "answer": "G. Stanley Hall",
    "aliases": ["Stanley Hall"],
    "answer_source": "gold",
    "children": [
        {"id": "1", "question": "What association published JPI?", "answer": "American Psychological Association",
         "answer_source": "gold", "children": []},
        {"id": "2", "question_template": "Who was the first president of #1?", "answer": "G. Stanley Hall",
         "answer_source": "gold", "children": []},
    ],
}


def jpi() -> Node:
    return resolve_templates(Node.from_dict(copy.deepcopy(JPI)))


def toy(*children: Node, tree_id: str = "ex1") -> Node:
    return Node(question="Root question?", answer="r", children=list(children), id=tree_id, dataset="toy",
                split="train")


def chain(depth: int) -> Node:
    """A tree `depth` levels deep: each node has one child with id "1"."""
    node = Node(question=f"level {depth}?", answer="a", id="1")
    for level in range(depth - 1, 0, -1):
        node = Node(question=f"level {level}?", answer="a", id="1", children=[node])
    node.id, node.dataset = "deep", "toy"
    return node


def test_from_dict_resolves_the_design_example():
    tree = jpi()
    assert tree.children[1].question == "Who was the first president of American Psychological Association?"
    assert tree.children[1].question_template == "Who was the first president of #1?"
    assert (tree.id, tree.dataset, tree.split, tree.aliases) == ("ex1", "toy", "train", ["Stanley Hall"])
    assert tree.depth() == 2 and tree.size() == 3 and not tree.is_leaf and tree.children[0].is_leaf
    assert [path for path, _ in tree.iter_nodes()] == ["root", "root/1", "root/2"]
    validate(tree)


def test_to_dict_round_trip_and_omitted_fields():
    tree = jpi()
    tree.children[0].meta = {"operator": "select"}
    d = tree.to_dict()
    assert d["schema"] == SCHEMA
    assert list(d) == ["schema", "id", "dataset", "split", "question", "answer", "aliases", "answer_source",
                       "children"]
    assert d["children"][0] == {"id": "1", "question": "What association published JPI?",
                                "answer": "American Psychological Association", "answer_source": "gold",
                                "meta": {"operator": "select"}}
    assert "schema" not in d["children"][1] and "aliases" not in d["children"][1]
    again = Node.from_dict(json.loads(json.dumps(d)))
    assert again == tree
    assert again.to_dict() == d


def test_jsonl_round_trip(tmp_path):
    trees = [jpi(), toy(Node(question="Leaf?", answer="x", id="1"), tree_id="ex2")]
    path = tmp_path / "sub" / "trees.jsonl"
    assert write_trees(path, iter(trees)) == 2
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2 and json.loads(lines[1])["id"] == "ex2"
    assert read_trees(path) == trees
    assert [p.name for p in path.parent.iterdir()] == ["trees.jsonl"]  # no temporary file left behind


def test_resolution_by_position_several_refs_and_two_digit_refs():
    children = [Node(question=f"q{i}?", answer=f"a{i}") for i in range(1, 13)]  # no ids: #k is the position
    children.append(Node(question="", question_template="Compare #2, #1 and #12 (not #1 + '2').", answer="z"))
    tree = resolve_templates(toy(*children))
    assert tree.children[-1].question == "Compare a2, a1 and a12 (not a1 + '2')."
    assert [path for path, _ in tree.iter_nodes()][-1] == "root/13"
    validate(tree)


def test_nested_resolution_uses_siblings_at_each_level():
    inner = Node(question="Inner?", answer="X", id="2", children=[
        Node(question="Deep one?", answer="deep", id="1"),
        Node(question="", question_template="What about #1?", answer="y", id="2"),
    ])
    tree = resolve_templates(toy(Node(question="First?", answer="top", id="1"), inner))
    assert tree.children[1].children[1].question == "What about deep?"
    assert tree.depth() == 3 and tree.size() == 5


def test_reference_to_an_answer_that_does_not_exist_stays_open():
    tree = resolve_templates(toy(
        Node(question="Who can arrest?", answer=None, answer_source="none", id="1"),
        Node(question="", question_template="Are the members also #1?", answer=None, answer_source="none", id="2"),
    ))
    assert tree.children[1].question == "Are the members also #1?"
    validate(tree)


def _two(second: dict, first: dict | None = None) -> dict:
    first = first or {"id": "1", "question": "First?", "answer": "A"}
    return {"id": "ex1", "dataset": "toy", "question": "Root?", "answer": "r", "children": [first, second]}


@pytest.mark.parametrize(
    "d, path, reason, words",
    [
        (_two({"id": "2", "question_template": "Then #2?", "answer": "b"}), "root/2", "self reference", "itself"),
        (_two({"id": "2", "question_template": "Then #5?", "answer": "b"}), "root/2", "dangling reference",
         "dangling"),
        (_two({"id": "2", "question": "Then?", "answer": "b"},
              {"id": "1", "question_template": "First #2?", "answer": "A"}), "root/1", "forward reference",
         "forward"),
        (_two({"id": "2", "question_template": "Then #1?", "answer": "b"},
              {"id": "1", "question": "First?", "answer_source": "gold"}), "root/2", "unanswered reference",
         "no answer"),
        (_two({"id": "2", "question": "  \n", "answer": "b"}), "root/2", "empty question", "empty"),
        (_two({"id": "1", "question": "Again?", "answer": "b"}), "root", "duplicate id", "'1'"),
        (_two({"id": "2", "question": "Then?", "answer": "b", "answer_source": "oracle"}), "root/2",
         "unknown answer_source", "'oracle'"),
        (_two({"id": "2", "question": "Then?", "answr": "b"}), "root/2", "unknown field", "'answr'"),
        (_two({"id": "2", "question": "Then?", "answer": 7}), "root/2", "wrong type", "'answer'"),
        (_two({"id": "2", "question": "Then?", "children": [{"question": "x", "aliases": [1]}]}), "root/2/1",
         "wrong type", "'aliases'"),
    ],
)
def test_invalid_trees_name_dataset_id_and_path(d, path, reason, words):
    with pytest.raises(TreeError) as info:
        validate(resolve_templates(Node.from_dict(d)))
    err = info.value
    assert str(err).startswith(f"toy/ex1 at {path}: ")
    assert words in str(err)
    assert (err.dataset, err.tree_id, err.path, err.reason) == ("toy", "ex1", path, reason)


def test_depth_over_max_depth_is_refused_at_the_deepest_node():
    validate(chain(3), max_depth=3)
    with pytest.raises(TreeError, match=r"^toy/deep at root/1/1/1: depth 4 exceeds max_depth 3$"):
        validate(chain(4), max_depth=3)


def test_cycle_and_shared_node_are_refused():
    tree = toy(Node(question="First?", answer="A", id="1"))
    tree.children[0].children.append(tree)
    with pytest.raises(TreeError, match=r"^toy/ex1 at root/1/ex1: node reached twice") as info:
        validate(tree)
    assert info.value.reason == "cycle"
    shared = Node(question="Shared?", answer="s", id="1")
    with pytest.raises(TreeError, match="reached twice"):
        validate(toy(Node(question="a?", answer="a", id="1", children=[shared]),
                     Node(question="b?", answer="b", id="2", children=[shared])))


def test_unresolved_template_is_refused_by_validate():
    tree = toy(Node(question="First?", answer="A", id="1"),
               Node(question="Then #1?", question_template="Then #1?", answer="b", id="2"))
    with pytest.raises(TreeError, match=r"^toy/ex1 at root/2: question 'Then #1\?' is not its resolved template"):
        validate(tree)
    validate(resolve_templates(tree))
    assert tree.children[1].question == "Then A?"


def test_schema_and_non_object_are_refused():
    with pytest.raises(TreeError, match=r"^toy/ex1 at root: unsupported schema 'decomp-tree/v9'"):
        Node.from_dict({**JPI, "schema": "decomp-tree/v9"})
    with pytest.raises(TreeError, match="must be a JSON object"):
        Node.from_dict(["not", "a", "tree"])
    with pytest.raises(TreeError, match=r"^toy/ex1 at root/1: field 'question' is missing"):
        Node.from_dict(_two({"id": "2", "question": "x"}, {"id": "1", "answer": "A"}))


def _write_lines(path, rows):
    path.write_text("".join(row + "\n" for row in rows), encoding="utf-8")


def _bad_file(tmp_path):
    good = json.dumps(JPI)
    forward = json.dumps({**_two({"id": "2", "question": "Then?", "answer": "b"},
                                 {"id": "1", "question_template": "First #2?", "answer": "A"}), "id": "ex3"})
    path = tmp_path / "trees.jsonl"
    _write_lines(path, [good, "", good[: len(good) // 2], forward, json.dumps({**JPI, "id": "ex4"})])
    return path


def test_truncated_line_reports_file_and_line(tmp_path):
    path = _bad_file(tmp_path)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}:3: invalid JSON \(") as info:
        read_trees(path)
    assert not isinstance(info.value, TreeError)
    _write_lines(path, [json.dumps(JPI), json.dumps(JPI).replace("of #1?", "of #2?")])
    prefix = re.escape(str(path))
    with pytest.raises(TreeError, match=rf"^{prefix}:2: toy/ex1 at root/2: #2 refers to the node itself"):
        read_trees(path)


def test_skip_invalid_counts_reasons(tmp_path):
    path = _bad_file(tmp_path)
    trees, report = read_trees_report(path)
    assert [t.id for t in trees] == ["ex1", "ex4"]
    assert isinstance(report, SkipReport)
    assert report.skipped == 2
    assert report.reasons == {"invalid JSON": 1, "forward reference": 1}
    assert report.messages[0].startswith(f"{path}:3: invalid JSON")
    assert report.messages[1].startswith(f"{path}:4: toy/ex3 at root/1: ")
    assert str(report) == "skipped 2 (invalid JSON 1, forward reference 1)"
    assert [t.id for t in read_trees(path, skip_invalid=True)] == ["ex1", "ex4"]
    assert read_trees_report(tmp_path / "trees.jsonl", max_depth=1)[1].reasons == {
        "invalid JSON": 1, "forward reference": 1, "too deep": 2}


def test_write_trees_is_atomic_and_refuses_invalid_trees(tmp_path):
    path = tmp_path / "trees.jsonl"
    write_trees(path, [jpi()])
    before = path.read_bytes()
    broken = toy(Node(question=" ", answer="a", id="1"), tree_id="bad")
    with pytest.raises(TreeError, match="toy/bad at root/1: question is empty"):
        write_trees(path, [jpi(), broken])
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trees.jsonl"]


def test_tree_stats_on_a_hand_made_set():
    deep = chain(3)
    leaf = Node(question="Alone?", answer="yes", answer_source="model", id="solo", dataset="other")
    no_answers = toy(Node(question="a", answer=None, answer_source="none", id="1"),
                     Node(question="b", answer=None, answer_source="none", id="2"),
                     Node(question="c", answer="t", answer_source="tool", id="3"), tree_id="ex5")
    stats = tree_stats([jpi(), deep, leaf, no_answers])
    assert stats == {
        "trees": 4,
        "nodes": 3 + 3 + 1 + 4,
        "leaves": 2 + 1 + 1 + 3,
        "depth_histogram": {1: 1, 2: 2, 3: 1},
        "children_histogram": {1: 2, 2: 1, 3: 1},
        "answer_sources": {"gold": 7, "none": 2, "model": 1, "tool": 1},
        "datasets": {"toy": 3, "other": 1},
    }


def test_check_trainable_refuses_evaluation_only_sets():
    cc = [Node(question=f"q{i}?", answer="a", id=f"cc{i}", dataset="compositional_celebrities") for i in range(3)]
    flagged = Node(question="q?", answer="a", id="f", dataset="mine", meta={"evaluation_only": True})
    check_trainable([jpi()])
    with pytest.raises(ValueError, match=r"compositional_celebrities \(3 trees\)") as info:
        check_trainable([jpi(), *cc, flagged])
    assert "mine (1 tree)" in str(info.value)
    check_trainable(iter(cc), allow_evaluation_only=True)
