"""The converters on the real files of ../shared/data: counts, skipped rows, and one example each, field by field."""

from __future__ import annotations

import json
from functools import lru_cache

import pytest

from peftprompt.cli import main
from peftprompt.recursive import SOURCES, Node, check_trainable, convert, read_trees, tree_stats, validate
from peftprompt.recursive.sources import convert_report, musique_step_question, probtree_answer_source

# source -> (trees, skipped reasons, split). The skipped rows are defects of the source files themselves: Break
# steps that cite themselves ("#1" in step 1) or are empty, ProbTree HotpotQA nodes that cite themselves.
EXPECTED = {
    "musique": (100, {}, "train"),
    "2wikimultihopqa": (498, {"bad source row": 2}, "train"),  # 2 bridge comparisons without their second hop
    "probtree_2wiki": (477, {}, "dev"),
    "probtree_hotpotqa": (457, {"self reference": 2}, "dev"),
    "probtree_musique": (384, {}, "dev"),
    "strategyqa": (1831, {}, "train"),
    "break": (7327, {"self reference": 2, "empty question": 1}, "dev"),
    "break_high_level": (2871, {"self reference": 1}, "dev"),
    "compositional_celebrities": (8188, {"no gold answer": 5}, "test"),  # 5 currency symbols are ""
    "bamboogle": (100, {}, "test"),
}


@lru_cache(maxsize=None)
def converted(source: str):
    return convert_report(source)


def by_id(source: str) -> dict[str, Node]:
    return {tree.id: tree for tree in converted(source)[0]}


def test_registry_lists_every_source():
    assert set(SOURCES) == set(EXPECTED)


@pytest.mark.parametrize("source", list(EXPECTED))
def test_counts_skips_and_root_fields(source):
    trees, report = converted(source)
    count, reasons, split = EXPECTED[source]
    assert len(trees) == count
    assert report.skipped == sum(reasons.values()) and dict(report.reasons) == reasons
    assert {(t.dataset, t.split) for t in trees} == {(source, split)}
    assert len({t.id for t in trees}) == count  # stable ids are unique
    for tree in trees[:: max(1, count // 200)]:  # a sample: every tree was validated by the converter already
        validate(tree)
        assert all(child.id == str(k) for k, child in enumerate(tree.children, start=1))


def test_musique_two_hop_example():
    tree = by_id("musique")["2hop__150763_14904"]
    assert tree.question == ("Who was the first president of the association which published Journal of "
                             "Psychotherapy Integration?")
    assert (tree.answer, tree.aliases, tree.answer_source) == ("G. Stanley Hall", ["Stanley Hall"], "gold")
    first, second = tree.children
    assert (first.question, first.answer) == ("What company published Journal of Psychotherapy Integration?",
                                              "American Psychological Association")
    assert second.question_template == "Who was the first president of #1?"
    assert second.question == "Who was the first president of American Psychological Association?"
    assert (second.answer, second.answer_source, second.meta["raw_question"]) == (
        "G. Stanley Hall", "gold", "Who was the first president of #1 ?")


def test_musique_graph_shape_and_relation_steps():
    tree = by_id("musique")["3hop2__130734_798404_834843"]
    assert [c.question for c in tree.children] == [
        "What state is KAGH-FM located?",
        "In which administrative territorial entity is McRae located?",
        "What is the country of Midway (near Pleasant Plains), White County, Arkansas?",
    ]
    assert tree.children[2].question_template == "What is the country of Midway (near Pleasant Plains), #2, #1?"
    assert [c.answer for c in tree.children] == ["Arkansas", "White County", "U.S."]
    assert tree.answer == "U.S." and "United States" in tree.aliases
    four = by_id("musique")["4hop3__566317_578030_464129_41384"]
    assert four.children[3].question == (
        "Based on population alone, what is Jacksonville's ranking in the United States?")
    hops = {t.meta["hops"] for t in converted("musique")[0]}
    assert hops == {"2hop", "3hop1", "3hop2", "4hop1", "4hop3"}
    assert tree_stats(converted("musique")[0])["answer_sources"] == {"gold": 337}


@pytest.mark.parametrize("raw, template", [
    ("#1 >> country", "What is the country of #1?"),
    ("Hello Love >> performer", "Who is the performer of Hello Love?"),
    ("#1 >> place of birth", "Where was #1 born?"),
    ("McRae >> located in the administrative territorial entity",
     "In which administrative territorial entity is McRae located?"),
    ("Humboldt Peak (#1 ) >> part of", "What is Humboldt Peak (#1) part of?"),
    ("#2 >> child", "Who is the child of #2?"),
    ("Siege of Cassel >> location", "What is the location of Siege of Cassel?"),
    ("how many publix stores are in #3", "How many publix stores are in #3?"),
    ("Who is #3 's mother?", "Who is #3's mother?"),
])
def test_musique_step_rewrite_rules(raw, template):
    assert musique_step_question(raw) == template


def test_probtree_musique_example_and_answer_sources():
    tree = converted("probtree_musique")[0][0]
    assert tree.question == "What does the acronym of the organization Danish Football Union is part of stand for?"
    assert (tree.answer, tree.answer_source) == ("International Federation of Association Football", "gold")
    assert (tree.meta["model_answer"], tree.meta["model_answer_source"]) == (
        "Union of European Football Associations", "model")
    first, second = tree.children
    assert (first.question, first.answer, first.answer_source) == (
        "Which organization is the Danish Football Union part of?",
        "Union of European Football Associations (UEFA).", "model")  # open book said "Unknown"
    assert second.question_template == "What does the acronym of #1 stand for?"
    assert second.question == "What does the acronym of Union of European Football Associations (UEFA). stand for?"
    assert (second.answer, second.answer_source) == ("Union of European Football Associations", "tool")
    stats = tree_stats(converted("probtree_musique")[0])
    assert stats["answer_sources"] == {"tool": 609, "model": 402, "gold": 384, "derived": 41}
    assert stats["depth_histogram"] == {2: 310, 3: 71, 4: 3}


def test_probtree_hotpotqa_angle_references_and_gold_roots():
    tree = converted("probtree_hotpotqa")[0][0]
    assert tree.question == ("What is the nationality of the foreign born victim of Singapore's caning punishment "
                             "before Oliver Fricker experienced the same?")
    assert (tree.answer, tree.answer_source, tree.meta["model_answer_source"]) == ("American", "gold", "derived")
    first, second = tree.children
    assert (first.answer, first.answer_source) == ("Michael P. Fay", "tool")
    assert second.question_template == "What is the nationality of #1?"  # "<1>" in the source
    assert (second.question, second.answer, second.answer_source) == (
        "What is the nationality of Michael P. Fay?", "American", "model")
    stats = tree_stats(converted("probtree_hotpotqa")[0])
    # every root matched a gold answer; 31 of the tool answers are operator steps
    assert stats["answer_sources"] == {"tool": 730, "gold": 457, "model": 210}


def test_probtree_2wiki_example():
    tree = converted("probtree_2wiki")[0][0]
    assert (tree.question, tree.answer, tree.answer_source) == (
        "Who is the father-in-law of Queen Hyojeong?", "Crown Prince Hyomyeong", "gold")
    assert [(c.question, c.answer, c.answer_source) for c in tree.children] == [
        ("Who is Queen Hyojeong married to?", "King Heonjong of Joseon", "tool"),
        ("Who is the father of King Heonjong of Joseon?", "Crown Prince Hyomyeong (posthumously named Ikjong).",
         "tool"),
    ]
    assert tree_stats(converted("probtree_2wiki")[0])["answer_sources"] == {
        "tool": 1102, "gold": 477, "model": 213, "derived": 145}  # 89 of the tool answers are operator steps


def test_probtree_answer_source_rule():
    node = {"answer": ["x", -0.1], "cb_answer": ["x", -0.3], "ob_answer": ["x", -0.1], "child_answer": ["y", -0.2]}
    assert probtree_answer_source(node) == "tool"  # exact match (text and log-prob) wins
    node["answer"] = ["x", -0.05]
    assert probtree_answer_source(node) == "tool"  # text only: open book before closed book
    node["child_answer"] = ["x", -0.2]
    assert probtree_answer_source(node) == "derived"
    assert probtree_answer_source({"answer": ["z", -1.0], "cb_answer": ["z", -1.0], "ob_answer": ["u", -1]}) == "model"


def test_strategyqa_example():
    tree = by_id("strategyqa")["4668264df84fb7c25b39"]
    assert (tree.question, tree.answer, tree.answer_source) == (
        "Could the members of The Police perform lawful arrests?", "no", "gold")
    assert [(c.question, c.answer, c.answer_source) for c in tree.children] == [
        ("Who can perform lawful arrests?", None, "none"),
        ("Are members of The Police also #1?", None, "none"),  # no answer to put in: the reference stays
    ]
    assert tree.meta["term"] == "The Police"
    assert {t.answer for t in converted("strategyqa")[0]} == {"yes", "no"}


def test_break_examples_keep_operators():
    tree = by_id("break")["ATIS_dev_0"]
    assert (tree.question, tree.answer, tree.answer_source) == (
        "what flights are available tomorrow from denver to philadelphia", None, "none")
    assert [(c.question, c.meta["operator"]) for c in tree.children] == [
        ("flights", "select"), ("#1 from denver", "filter"), ("#2 to philadelphia", "filter"),
        ("#3 if available", "filter")]
    high = by_id("break_high_level")["CWQ_dev_WebQTest-1011_c0be4f76a5397ba6d0d06f53905e504b"]
    assert [(c.question, c.meta["operator"]) for c in high.children] == [
        ("Tibetan speaking countries", "select"), ("#1 that have a population of less than 993885000", "filter")]
    assert tree_stats(converted("break")[0])["nodes"] == 43289


def test_compositional_celebrities_example_and_evaluation_only():
    trees = converted("compositional_celebrities")[0]
    tree = trees[0]
    assert (tree.question, tree.answer, tree.answer_source) == (
        "What is the capital of the birthplace of Rumi?", "Kabul", "gold")
    assert [(c.question, c.answer) for c in tree.children] == [
        ("What is the birthplace (country only) of Rumi?", "Afghanistan"),
        ("What is the capital of Afghanistan?", "Kabul")]
    assert tree.children[1].question_template == "What is the capital of #1?"
    assert tree.meta == {"evaluation_only": True, "category": "birthplace_capital", "person": "Rumi", "person_id": 0}
    assert sum("#1" in t.children[1].question_template for t in trees) == 8188 - 93  # "Czechia" vs "Czech Republic", ...
    with pytest.raises(ValueError, match=r"compositional_celebrities \(8188 trees\)"):
        check_trainable(trees)
    latitude = next(t for t in trees if t.meta["category"] == "birthplace_rounded_lat")
    assert (latitude.question, latitude.answer, latitude.children[1].answer) == (
        "What is the (rounded down) latitude of the birthplace of Rumi?", "33", "33")  # numbers in the JSON


def test_bamboogle_single_nodes_with_bridge_answers():
    trees = converted("bamboogle")[0]
    assert all(t.is_leaf and t.meta["evaluation_only"] for t in trees)
    assert sum("bridge_answer" in t.meta for t in trees) == 100
    tree = trees[0]
    assert (tree.question, tree.answer, tree.meta["bridge_answer"]) == (
        "Who was president of the United States in the year that Citibank was founded?", "james madison", "1812")
    washington = [t for t in trees if t.aliases]
    assert [(t.answer, t.aliases) for t in washington] == [("Mildred Warner", ["Mildred Gale"])]
    oppenheimer = [t for t in trees if "become Death" in t.question]
    assert [t.question for t in oppenheimer] == [
        'When was the person who said "Now, I am become Death, the destroyer of worlds." born?']
    with pytest.raises(ValueError, match=r"bamboogle \(100 trees\)"):
        check_trainable(trees)


def test_convert_split_limit_and_errors():
    first = convert("strategyqa", split="train", limit=3)
    assert [t.id for t in first] == [t.id for t in converted("strategyqa")[0][:3]]
    assert convert("bamboogle", limit=0) == []
    with pytest.raises(ValueError, match="unknown source 'nope'"):
        convert("nope")
    with pytest.raises(ValueError, match=r"source 'musique' has split\(s\) train, dev, got 'test'"):
        convert("musique", split="test")


def test_cli_data_convert_and_stats(tmp_path, capsys):
    out = tmp_path / "trees.jsonl"
    assert main(["data", "convert", "musique", "--limit", "4", "--out", str(out)]) == 0
    assert capsys.readouterr().out.startswith(f"wrote 4 trees to {out} (musique, split train); skipped 0")
    assert [t.id for t in read_trees(out)] == [t.id for t in converted("musique")[0][:4]]
    assert main(["data", "stats", str(out), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert (stats["trees"], stats["answer_sources"], stats["skipped"]) == (4, {"gold": sum(
        t.size() for t in converted("musique")[0][:4])}, 0)
    assert main(["data", "stats", str(tmp_path / "missing.jsonl")]) == 2
    assert "No such file" in capsys.readouterr().err


def test_twowiki_bridge_comparison_nests_two_levels():
    trees, report = convert_report("2wikimultihopqa", split="dev")
    assert len(trees) == 375 and dict(report.reasons) == {"bad source row": 3}
    tree = next(t for t in trees if t.question.startswith("Which film has the director who died later, The More"))
    assert tree.depth() == 3 and tree.meta["type"] == "bridge_comparison" and tree.answer == "Sleep, My Love"
    assert [(path, node.question, node.answer) for path, node in tree.iter_nodes()][1:] == [
        ("root/1", "When did the director of The More the Merrier die?", "March 8, 1975"),
        ("root/1/1", "Who is the director of The More the Merrier?", "George Stevens"),
        ("root/1/2", "When did George Stevens die?", "March 8, 1975"),
        ("root/2", "When did the director of Sleep, My Love die?", "14 January 1987"),
        ("root/2/1", "Who is the director of Sleep, My Love?", "Douglas Sirk"),
        ("root/2/2", "When did Douglas Sirk die?", "14 January 1987"),
        ("root/3", "Which is later: The More the Merrier (March 8, 1975) or Sleep, My Love (14 January 1987)?",
         "Sleep, My Love"),
    ]
    assert tree.children[0].children[1].question_template == "When did #1 die?"
    # a disambiguated second-hop subject ("George King (film director)") still finds its first hop
    king = next(t for t in trees if t.question.startswith("Which film has the director died earlier, Varakatnam"))
    assert [c.question for c in king.children][:2] == ["When did the director of Varakatnam die?",
                                                      "When did the director of To Be a Lady die?"]


def test_twowiki_chains_comparisons_and_aliases():
    trees = {t.question: t for t in convert("2wikimultihopqa", split="dev")}
    chain = trees["Who is Magnus Julius De La Gardie's paternal grandmother?"]
    assert [(c.question_template, c.question, c.answer) for c in chain.children] == [
        ("Who is the father of Magnus Julius De la Gardie?", "Who is the father of Magnus Julius De la Gardie?",
         "Axel Julius De la Gardie"),
        ("Who is the mother of #1?", "Who is the mother of Axel Julius De la Gardie?", "Ebba Brahe")]
    comparison = trees["Which film was released more recently, Brudebuketten or Clownery?"]
    assert [(c.question, c.answer) for c in comparison.children] == [
        ("When was Brudebuketten released?", "1953"), ("When was Clownery released?", "1989"),
        ("Which is later: Brudebuketten (1953) or Clownery (1989)?", "Clownery")]
    two = trees["Do both films Goodbye Again (1961 Film) and The Mystery Of Pine Creek Camp have the directors that "
                "share the same nationality?"]
    assert (two.children[0].answer, two.children[0].aliases) == ("American", ["Russian"])


def test_musique_dev_split_has_three_and_four_hop_questions():
    trees = convert("musique", split="dev")
    assert len(trees) == 135 and {t.split for t in trees} == {"dev"}
    hops = [t.meta["hops"] for t in trees]
    assert sum(h.startswith(("3hop", "4hop")) for h in hops) == 36
    assert all(len(t.children) == int(t.meta["hops"][0]) for t in trees)


def test_drop_overlap_compares_normalised_questions_at_every_node():
    from peftprompt.recursive.sources import drop_overlap

    train = [Node(question="Who is A?", answer="a", children=[Node(question="Where is B ?", answer="b", id="1")])]
    evaluation = [Node(question="where is b?", answer="b"), Node(question="Who is C?", answer="c")]
    kept, dropped = drop_overlap(evaluation, train)
    assert [t.question for t in kept] == ["Who is C?"] and [t.question for t in dropped] == ["where is b?"]
