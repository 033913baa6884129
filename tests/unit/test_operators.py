"""Operators: dates and numbers as the data sets write them, the converters' operator steps, and the runner routing
operator follow-ups to the operators (and unparsable ones on to the model)."""

from __future__ import annotations

import re

import pytest

from peftprompt import operators
from peftprompt.operators import OperatorError, apply, format_follow_up, parse_date, parse_follow_up, parse_quantity
from peftprompt.recursive import Node, Unroller, convert, training_trees, validate
from peftprompt.recursive.tree import question_key
from peftprompt.recursive.operator_steps import (
    add_parallel_operator_step,
    compared_names,
    mirrored_comparison,
    mirrored_comparisons,
    operator_step,
    operator_step_stats,
    without_operator_steps,
)
from peftprompt.selfask import AnswererChain, OperatorAnswerer, SelfAskRunner, ToolAnswerer, answerers_from_names
from peftprompt.selfask.evaluate import evaluate_selfask, knowledge_base, operator_use, supported_by_trace

# Date forms from the data sets (2WikiMultiHopQA evidences, ProbTree answers, MuSiQue) and the interval each names.
DATES = [
    ("March 8, 1975", "1975-03-08"),
    ("14 January 1987", "1987-01-14"),
    ("1975", "1975-01-01..1975-12-31"),
    ("c. 1200", "1200-01-01..1200-12-31"),
    ("circa 1550", "1550-01-01..1550-12-31"),
    ("5th century BC", "500 BC-01-01..401 BC-12-31"),
    ("44 BC", "44 BC-01-01..44 BC-12-31"),
    ("the 1980s", "1980-01-01..1989-12-31"),
    ("March 1975", "1975-03-01..1975-03-31"),
    ("1980-11-02", "1980-11-02"),
    ("September 10, 1993.", "1993-09-10"),
    ("AD 79", "0079-01-01..0079-12-31"),
    ("1st century", "0001-01-01..0100-12-31"),
]
NOT_DATES = ["May 14, 2016 and February 10, 2017", "Norway", "May 14", "unknown", "", "summer of 2013",
             "11 April 2011 (Germany, France) 10 February 2012 (UK)", "1975-1980"]
QUANTITIES = [("1,234,567", 1234567.0, ""), ("3.5 million", 3.5e6, ""), ("seven", 7.0, ""), ("6,000 km", 6000.0, "km"),
              ("130 species", 130.0, "species"), ("about 2,000 people", 2000.0, "people"), ("1", 1.0, "")]
NOT_QUANTITIES = ["9–11 inches", "150–250 pounds (68–113 kg)", "Norway", "three solo albums and 2 EPs", "many"]


@pytest.mark.parametrize("text, interval", DATES)
def test_dates_in_the_data_sets_forms(text, interval):
    assert str(parse_date(text)) == interval


@pytest.mark.parametrize("text", NOT_DATES)
def test_what_is_not_one_dated_value_fails_to_parse(text):
    with pytest.raises(OperatorError):
        parse_date(text)


@pytest.mark.parametrize("text, value, unit", QUANTITIES)
def test_quantities(text, value, unit):
    quantity = parse_quantity(text)
    assert (quantity.value, quantity.unit) == (value, unit)


@pytest.mark.parametrize("text", NOT_QUANTITIES)
def test_ranges_and_words_are_not_quantities(text):
    with pytest.raises(OperatorError):
        parse_quantity(text)


def call(question):
    parsed = parse_follow_up(question)
    assert parsed is not None, question
    return apply(parsed)


def test_each_operator_computes_its_answer():
    later = call("Which is later: The More the Merrier (March 8, 1975) or Sleep, My Love (14 January 1987)?")
    assert later.answer == "Sleep, My Love" and later.parsed == ["1975-03-08", "1987-01-14"]
    assert call("Which is earlier: Ajax (5th century BC) or Rome (44 BC)?").answer == "Ajax"
    assert call("Which is larger: Lyon (1,234,567) or Nice (342,669)?").answer == "Lyon"
    assert call("Which is smaller: A (3.5 million) or B (seven)?").answer == "B"
    assert call("Which is larger: Nick Carter (3 albums) or Brady Seals (4 album)?").answer == "Brady Seals"
    assert call("Are these the same: Paul Éluard (French) and Georges Bataille (France)?").answer == "yes"
    assert call("Are these the same: Ode to My Father (South Korea) and Kill or Be Killed (Italian)?").answer == "no"
    assert call("Are both true: Steve Perry (yes) and Leslie West (Yes.)?").answer == "yes"
    assert call("Are both true: Forman College (No) and Purbanchal University (yes)?").answer == "no"


@pytest.mark.parametrize("question, why", [
    ("Which is later: A (1975) or B (March 8, 1975)?", "overlap: neither is later"),
    ("Which is earlier: A (1975) or B (March 8, 1975)?", "overlap: neither is earlier"),
    ("Which is earlier: A (unknown) or B (1990)?", "unknown"),
    ("Which is larger: A (6 km) or B (7 miles)?", "different units"),
    ("Which is earlier: A (Norway) or B (1990)?", "cannot read 'Norway'"),
    ("Are both true: A (yes) and B (maybe)?", "not yes or no"),
    ("Are these the same: Mr. Arkadin (American) and Kick-Ass 2 (film)?", "part of a title"),
    ("Which is earlier: X (1983 film) or Y (1990)?", "part of a title"),
])
def test_values_an_operator_cannot_compare_raise_with_the_reason(question, why):
    with pytest.raises(OperatorError, match=why):
        call(question)


def test_templates_round_trip_names_with_parentheses_and_and_or():
    names, values = ("Days of Wrath (2013 film)", "Ma And Pa Kettle Go To Town"), ("2013", "1950")
    question = format_follow_up("earlier", names, values)
    assert question == "Which is earlier: Days of Wrath (2013 film) (2013) or Ma And Pa Kettle Go To Town (1950)?"
    parsed = parse_follow_up(question)
    assert (parsed.operator, parsed.names, parsed.values) == ("earlier", names, values)
    assert parsed.question == question
    assert parse_follow_up("Which is later, A or B?") is None
    assert parse_follow_up("When did George Stevens die?") is None


@pytest.mark.parametrize("question, kind, operator", [
    ("Who was born first, Francis Morrison or Suzanne Cory?", "date", "earlier"),
    ("Which film has the director who died later, The More The Merrier or Sleep, My Love?", "date", "later"),
    ("Which film has the director who is older, The Married Flapper or The Doolins Of Oklahoma?", "date", "earlier"),
    ("Which film was released more recently, True Bromance or V Trestném Území?", "date", "later"),
    ("Which magazine had more previous names, Watercolor Artist or The General?", "quantity", "larger"),
    ("Are Gachuyeh and Gryaznushka both located in the same country?", "name", "same"),
    ("Are Steve Perry and Leslie West both singers?", "yes/no", "both"),
    ("Who lived longer, Jean Grémillon or Ángel Recasens?", "date", None),
])
def test_the_questions_wording_names_the_operator(question, kind, operator):
    assert operators.operator_for(question, kind) == operator


def test_twowiki_comparisons_end_with_the_operators_own_answer():
    trees = convert("2wikimultihopqa", split="dev")
    deep = next(t for t in trees if t.question.startswith("Which film has the director who died later, The More"))
    step = deep.children[-1]
    assert (step.id, step.question, step.answer, step.answer_source) == (
        "3", "Which is later: The More the Merrier (March 8, 1975) or Sleep, My Love (14 January 1987)?",
        "Sleep, My Love", "tool")
    assert deep.meta["operator"] == "later" and step.meta["operator_step"] == "later"
    stats = operator_step_stats(trees)
    assert stats["added"] == {"earlier": 85, "later": 47, "same": 31}
    assert stats["skipped"] == {"operator same answers '…', gold '…'": 2,  # values that disagree with the gold
                                "compares 4 facts (date of birth, date of death), not two values": 4}  # lifespans
    compared = [t for t in trees if t.meta["type"] in ("comparison", "bridge_comparison")]
    assert len(compared) == 169 and all("operator" in t.meta or "operator_skipped" in t.meta for t in compared)
    assert not any("operator" in t.meta for t in trees if t.meta["type"] in ("compositional", "inference"))


@pytest.mark.parametrize("source, split", [("2wikimultihopqa", "train"), ("2wikimultihopqa", "dev"),
                                           ("probtree_hotpotqa", None), ("probtree_2wiki", None)])
def test_every_operator_step_is_the_operator_applied_and_the_gold_answer(source, split):
    from peftprompt.metrics import exact_match

    steps = 0
    for tree in convert(source, split=split):
        validate(tree)
        for _, node in tree.iter_nodes():
            if "operator_step" in node.meta:
                steps += 1
                assert node is tree.children[-1] and node.answer_source == "tool"
                assert call(node.question).answer == node.answer
                assert exact_match(re.sub(r"\s*\(.*?\)", "", node.answer), [tree.answer, *tree.aliases]) or \
                    exact_match(node.answer, [tree.answer, *tree.aliases])
    assert steps > 25


def test_probtree_parallel_comparison_gets_a_step_from_its_two_follow_ups():
    root = Node(question="Who was born first, Kwok Kin Pong or Edison Chen?", answer="Edison Chen", children=[
        Node(question="When was Kwok Kin Pong born?", answer="30 March 1987", id="1"),
        Node(question="When was Edison Chen born?", answer="7 October 1980", id="2")])
    add_parallel_operator_step(root)
    assert root.children[-1].question == "Which is earlier: Kwok Kin Pong (30 March 1987) or Edison Chen (7 October 1980)?"
    assert root.children[-1].answer == "Edison Chen" and root.meta["operator"] == "earlier"
    assert compared_names("When was The White Planet released?", "When was The Glass Sphinx released?") == (
        "The White Planet", "The Glass Sphinx")
    assert compared_names("What is Ray Wilson's nationality?", "What is Leo's nationality?") == ("Ray Wilson", "Leo")
    # an operator that disagrees with the gold answer adds nothing and says why
    node, reason = operator_step("Who was born first, A or B?", [("A", "1990"), ("B", "1980")], "date", ["A"])
    assert node is None and reason == "operator earlier answers 'B', gold 'A'"


def test_a_date_comparison_mirrored_asks_the_other_way_and_the_operator_answers_again():
    root = Node(question="Who was born first, Kwok Kin Pong or Edison Chen?", answer="Edison Chen", aliases=["Chen"],
                id="q7", children=[Node(question="When was Kwok Kin Pong born?", answer="30 March 1987", id="1"),
                                   Node(question="When was Edison Chen born?", answer="7 October 1980", id="2")])
    add_parallel_operator_step(root)
    mirrored = mirrored_comparison(root)
    validate(mirrored)
    assert (mirrored.question, mirrored.answer, mirrored.aliases, mirrored.id) == (
        "Who was born later, Kwok Kin Pong or Edison Chen?", "Kwok Kin Pong", [], "q7-mirrored")
    step = mirrored.children[-1]
    assert (step.id, step.question, step.answer, step.answer_source, step.meta["operator_answer"]) == (
        "3", "Which is later: Kwok Kin Pong (30 March 1987) or Edison Chen (7 October 1980)?", "Kwok Kin Pong",
        "tool", "Kwok Kin Pong")
    assert mirrored.children[:2] == root.children[:2]  # the facts are the same
    assert mirrored.meta["operator"] == "later" and mirrored.meta["mirrored_from"] == root.question
    assert root.question.endswith("first, Kwok Kin Pong or Edison Chen?") and root.meta["operator"] == "earlier"
    assert mirrored_comparison(mirrored).question == "Who was born earlier, Kwok Kin Pong or Edison Chen?"


@pytest.mark.parametrize("question", [
    "Who was born first, The Last Emperor or Lucy Last?",  # "Last" is a name: one direction word, mirrored
    "Who was born first and died later, A or B?",  # two direction words
    "Which came out before the other, A or B?",  # a word with no mirror
])
def test_only_one_unambiguous_direction_word_outside_the_names_is_mirrored(question):
    names = re.search(r", (.+) or (.+)\?$", question).groups()
    root = Node(question=question, answer=names[0], children=[
        Node(question=f"When was {names[0]} born?", answer="1901", id="1"),
        Node(question=f"When was {names[1]} born?", answer="1950", id="2")])
    result = apply(operators.OperatorCall("earlier", names, ("1901", "1950")))  # the step, whatever the wording
    root.children.append(Node(question=result.call.question, answer=result.answer, answer_source="tool", id="3",
                              meta={"operator_step": "earlier", **result.to_meta()}))
    mirrored = mirrored_comparison(root)
    if "Last" in question:
        assert mirrored.question == "Who was born later, The Last Emperor or Lucy Last?"
        assert mirrored.answer == "Lucy Last"
    else:
        assert mirrored is None


def test_mirrored_training_comparisons_balance_earlier_and_later_and_ask_no_held_out_question():
    trees = convert("2wikimultihopqa")
    mirrored = mirrored_comparisons(trees)
    before = operator_step_stats(trees)["added"]
    after = operator_step_stats(trees + mirrored)["added"]
    assert (before["earlier"], before["later"]) == (70, 17)
    assert after["earlier"] == after["later"] == 87 and len(mirrored) == 87
    assert all(m.answer != m.meta["mirrored_from"] and m.children[-1].answer == m.answer for m in mirrored)
    assert len(training_trees(["2wikimultihopqa"], mirror_comparisons=True)) == len(trees) + len(mirrored)
    held_out = {question_key(t.question) for t in convert("2wikimultihopqa", split="dev")}
    assert not held_out & {question_key(m.question) for m in mirrored}


def test_operator_steps_are_never_facts_and_can_be_taken_out():
    tree = next(t for t in convert("2wikimultihopqa", split="dev") if t.meta.get("operator") == "later")
    facts = dict(knowledge_base([tree]))
    assert tree.children[-1].question not in facts and len(facts) == tree.size() - 2
    plain = without_operator_steps(tree)
    assert len(plain.children) == len(tree.children) - 1 and "operator" not in plain.meta
    assert not any("operator_step" in n.meta for _, n in plain.iter_nodes())
    assert "operator_step" in tree.children[-1].meta  # the original is untouched


def test_operator_step_is_masked_in_training_and_taught_as_a_follow_up():
    tree = next(t for t in convert("2wikimultihopqa", split="dev") if t.meta.get("operator") == "later")
    (episode,) = Unroller(mode="flat")(tree)
    spans = {(s.kind, episode.text[s.start:s.end].strip()): s.weight for s in episode.spans}
    step = tree.children[-1]
    assert spans[("follow_up", f"Follow up: {step.question}\nIntermediate answer:")] == 1.0
    assert spans[("intermediate_answer", step.answer)] == 0.0
    assert spans[("final_answer", f"So the final answer is: {tree.answer}")] == 1.0


DEEP = "Which film has the director who died later, The More The Merrier or Sleep, My Love?"
OPERATOR_FOLLOW_UP = "Which is later: The More the Merrier (March 8, 1975) or Sleep, My Love (14 January 1987)?"
LEAVES = {"When did the director of The More the Merrier die?": "March 8, 1975",
          "When did the director of Sleep, My Love die?": "14 January 1987"}


class ComparingModel:
    """A fake model that asks the two leaf follow-ups, then `last` (the operator follow-up), then repeats the last
    intermediate answer; asked a question directly it answers `direct`."""

    def __init__(self, last, direct="Neither"):
        self.plan, self.direct = [*LEAVES, last], direct

    def __call__(self, prompts, max_new_tokens):
        outs = []
        for prompt in prompts:
            episode = prompt.rsplit("Question: ", 1)[1]
            if prompt.endswith("So the final answer is:"):
                outs.append(f" {self.direct}\n")
                continue
            answers = re.findall(r"Intermediate answer: (.*)\n", episode)
            if len(answers) < len(self.plan):
                decision = "" if answers else "Are follow up questions needed here: Yes.\n"
                outs.append(f"{decision}Follow up: {self.plan[len(answers)]}\nIntermediate answer:")
            else:
                outs.append(f"So the final answer is: {answers[-1]}\n")
        return outs


def test_the_runner_routes_an_operator_follow_up_to_the_operators():
    layers = AnswererChain([OperatorAnswerer(), ToolAnswerer(LEAVES.get)])
    result = SelfAskRunner(generate_fn=ComparingModel(OPERATOR_FOLLOW_UP), answerer=layers).run(DEEP)
    assert result.answer == "Sleep, My Love" and result.well_formed
    first, second, step = result.trace.children
    assert first.meta == {"depth": 1, "answerer": "tool"}
    assert (step.answer, step.answer_source, step.meta["answerer"], step.meta["operator"]) == (
        "Sleep, My Love", "tool", "operators", "later")
    assert step.meta["parsed"] == ["1975-03-08", "1987-01-14"]
    from peftprompt.selfask.show import who_answered

    assert who_answered(step) == "layer 1: operators; later of 1975-03-08, 1987-01-14"
    assert supported_by_trace(result.answer, result.trace)
    assert operator_use(result.trace) == [
        {"question": OPERATOR_FOLLOW_UP, "operator": "later", "parsed": True, "failure": None}]
    # the trace round-trips as training data: the operator step is a masked tool answer
    (episode,) = Unroller(mode="flat")(Node.from_dict(result.trace.to_dict()))
    assert episode.text == result.text
    weights = [(episode.text[s.start:s.end].strip(), s.weight) for s in episode.spans if s.kind == "intermediate_answer"]
    assert weights == [("March 8, 1975", 0.0), ("14 January 1987", 0.0), ("Sleep, My Love", 0.0)]


def test_an_unparsable_operator_follow_up_goes_on_to_the_model_and_is_counted():
    unparsable = "Which is later: The More the Merrier (1975) or Sleep, My Love (March 1975)?"
    layers = AnswererChain([OperatorAnswerer(), ToolAnswerer(LEAVES.get)])
    result = SelfAskRunner(generate_fn=ComparingModel(unparsable, direct="The More the Merrier"), answerer=layers,
                           max_depth=1).run(DEEP)
    step = result.trace.children[-1]
    assert (step.answer, step.answer_source, step.meta["answerer"]) == ("The More the Merrier", "model", "model")
    assert step.meta["unanswered_by"] == "operators+tool" and "overlap" in step.meta["operator_failure"]
    from peftprompt.selfask.show import who_answered

    assert who_answered(step).startswith("layer 1: model; the operators+tool had nothing (operator later: dates")
    (use,) = operator_use(result.trace)
    assert not use["parsed"] and "overlap" in use["failure"]
    summary = evaluate_selfask([Node(question=DEEP, answer="Sleep, My Love")], SelfAskRunner(
        generate_fn=ComparingModel(unparsable, direct="x"), answerer=layers, max_depth=1), sub_question_check=False)
    assert (summary["operator_follow_ups"], summary["operator_parsed"]) == (1, 0)
    assert summary["operator_unparsed"][0]["question"] == unparsable


def test_faithfulness_reads_the_last_operator_answer_else_the_intermediate_answers():
    trace = Node(question="Q?", children=[Node(question="a?", answer="1975", id="1"),
                                          Node(question="b?", answer="B", id="2", meta={"operator_answer": "B"})])
    assert supported_by_trace("B", trace) and not supported_by_trace("1975", trace)
    chain = Node(question="Q?", children=[Node(question="a?", answer="Kabul", id="1")])
    assert supported_by_trace("kabul", chain) and not supported_by_trace("Paris", chain)
    assert not supported_by_trace("Paris", Node(question="Q?"))


def test_answerer_names_chain_with_plus_and_share_one_retriever():
    from peftprompt.errors import InputError

    retriever = ToolAnswerer(lambda q: None)
    retriever.name = "retriever"
    layers = answerers_from_names(["operators+retriever", "retriever"], retriever=retriever)
    assert isinstance(layers[0], AnswererChain) and layers[0].name == "operators+retriever"
    assert layers[0].answerers[1] is retriever and layers[1] is retriever
    assert answerers_from_names(["operators+model"])[0].name == "operators"
    with pytest.raises(InputError, match="'model' only last"):
        answerers_from_names(["model+operators"])
    assert OperatorAnswerer()("When did Stevens die?", 1).source == "none"


def test_ask_refuses_a_chain_ending_in_the_model_without_recursion(capsys):
    from peftprompt.cli import main

    assert main(["ask", "q?", "--answerers", "operators+model", "--no-recurse"]) == 2
    err = capsys.readouterr().err
    assert "--no-recurse turns off" in err and "Traceback" not in err


def test_the_runner_accepts_as_many_follow_ups_as_a_training_episode_asks():
    """A flat bridge comparison asks its four leaves and then its operator step: the runner's default must let the
    fifth through, or the operator is never reached ("too many follow-ups")."""
    import inspect

    default = inspect.signature(SelfAskRunner).parameters["max_follow_ups"].default
    trees = convert("2wikimultihopqa", split="train") + convert("musique", split="train")
    most = max(sum(s.kind == "follow_up" for s in e.spans) for t in trees for e in Unroller(mode="flat")(t))
    assert most == 5 and default >= most


def test_an_operator_step_ends_the_question_unless_the_model_is_asked_to_write_the_answer():
    layers = AnswererChain([OperatorAnswerer(), ToolAnswerer(LEAVES.get)])

    class CuttingModel(ComparingModel):  # copies the operator's answer only up to its comma, as SmolLM2 did
        def __call__(self, prompts, max_new_tokens):
            return [out.replace(": Sleep, My Love\n", ": Sleep\n") for out in super().__call__(prompts, max_new_tokens)]

    ended = SelfAskRunner(generate_fn=CuttingModel(OPERATOR_FOLLOW_UP), answerer=layers).run(DEEP)
    assert (ended.answer, ended.trace.answer_source, ended.well_formed) == ("Sleep, My Love", "derived", True)
    assert ended.text.endswith("Intermediate answer: Sleep, My Love\nSo the final answer is: Sleep, My Love")
    check = Unroller(mode="flat")(Node.from_dict(ended.trace.to_dict()))
    assert check[0].text == ended.text
    written = SelfAskRunner(generate_fn=CuttingModel(OPERATOR_FOLLOW_UP), answerer=layers,
                            operator_ends=False).run(DEEP)
    assert (written.answer, written.trace.answer_source) == ("Sleep", "model")
    assert not supported_by_trace(written.answer, written.trace) and supported_by_trace(ended.answer, ended.trace)


def test_a_follow_up_that_opens_like_a_template_but_leaves_a_value_out_is_counted_and_passed_on():
    malformed = "Which is later: The More the Merrier (March 8, 1975) or Sleep, My Love?"
    assert parse_follow_up(malformed) is None and operators.asked_operator(malformed) == "later"
    answer = OperatorAnswerer()(malformed, 1)
    assert answer.source == "none" and answer.meta["operator_failure"].startswith("not in the form 'Which is later:")
    layers = AnswererChain([OperatorAnswerer(), ToolAnswerer(LEAVES.get)])
    result = SelfAskRunner(generate_fn=ComparingModel(malformed, direct="Sleep, My Love"), answerer=layers,
                           max_depth=1).run(DEEP)
    assert result.trace.children[-1].meta["unanswered_by"] == "operators+tool"
    (use,) = operator_use(result.trace)
    assert (use["operator"], use["parsed"]) == ("later", False) and use["failure"].startswith("not in the form")
