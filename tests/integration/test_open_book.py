"""Open-book self-ask (`peftprompt.selfask.open_book`): a retrieval answerer over a real passage index, read by a
scripted reader, inside the self-ask runner; single-step retrieval; an empty index; the reader on a real model."""

from __future__ import annotations

import re

import pytest

from peftprompt.recursive import parse_episode, validate
from peftprompt.retrieval.index import PassageIndex
from peftprompt.retrieval.reader import reader_prompt
from peftprompt.selfask import SelfAskRunner
from peftprompt.selfask.open_book import ModelReader, RetrievalAnswerer, active_adapter, few_shot_reader

from conftest import FILM_PASSAGES

FINAL = "So the final answer is:"
QUESTION = "Where was the director of Jaws born?"
ANSWERS = {"Who directed Jaws?": "Steven Spielberg", "Where was Steven Spielberg born?": "Cincinnati",
           QUESTION: "Cincinnati"}


def decomposer(prompts, max_new_tokens):
    """A scripted self-asking model: asks who directed Jaws, then where THAT answer was born, then answers with the
    last intermediate answer."""
    outs = []
    for prompt in prompts:
        if prompt.endswith(FINAL):
            outs.append(" forced\n")
            continue
        answers = re.findall(r"Intermediate answer: (.*)\n", prompt)
        if not answers:
            outs.append("Are follow up questions needed here: Yes.\nFollow up: Who directed Jaws?\nIntermediate answer:")
        elif len(answers) == 1:
            outs.append(f"Follow up: Where was {answers[0]} born?\nIntermediate answer:")
        else:
            outs.append(f"So the final answer is: {answers[-1]}\n")
    return outs


class ScriptedReader:
    """A reader that knows `ANSWERS` but says one only when it is written in one of the passages it was given."""

    def __init__(self):
        self.prompts: list[str] = []

    def __call__(self, prompts, max_new_tokens):
        outs = []
        for prompt in prompts:
            self.prompts.append(prompt)
            context, _, rest = prompt.rpartition("Question: ")
            question = rest.split("\n")[0]
            answer = ANSWERS.get(question)
            outs.append(f" {answer}\n" if answer and answer in context else " unknown\n")
        return outs


@pytest.fixture(scope="module")
def index():
    return PassageIndex.build(FILM_PASSAGES, progress=False)


def test_a_retrieval_answerer_follows_a_two_hop_chain(index):
    reader = ScriptedReader()
    answerer = RetrievalAnswerer(index, ModelReader(generate_fn=reader), k=2)
    result = SelfAskRunner(generate_fn=decomposer, answerer=answerer, recurse=False).run(QUESTION)
    assert result.answer == "Cincinnati" and result.well_formed and result.follow_ups == 2
    parsed = parse_episode(result.text)
    assert parsed.follow_ups == (("Who directed Jaws?", "Steven Spielberg"),
                                 ("Where was Steven Spielberg born?", "Cincinnati"))
    # each follow-up's trace records the passages it read, best first, and the gold one is among them
    first, second = result.trace.children
    ids = {p.title: p.id for p in FILM_PASSAGES}
    assert first.meta["answerer"] == "retrieval" and first.answer_source == "tool"
    assert ids["Jaws (film)"] in first.meta["passages"] and len(first.meta["passages"]) == 2
    assert ids["Steven Spielberg"] in second.meta["passages"]
    validate(result.trace)
    # the reader saw exactly the reader format over the retrieved passages
    hits = index.search("Who directed Jaws?", k=2)
    assert reader.prompts[0] == reader_prompt("Who directed Jaws?", [h.passage for h in hits])


def test_single_step_retrieval_answers_the_whole_question(index):
    answers = RetrievalAnswerer(index, ModelReader(generate_fn=ScriptedReader()), k=3).answer_batch([QUESTION])
    assert answers[0].meta["passages"][0] in {p.id for p in FILM_PASSAGES}
    assert (answers[0].text, answers[0].source) in {("Cincinnati", "tool"), ("unknown", "none")}


def test_an_unknown_reading_is_not_found_and_the_model_recurses(index):
    class Nothing:
        def __call__(self, questions, passages):
            return ["unknown" for _ in questions]

    answerer = RetrievalAnswerer(index, Nothing(), k=2)
    assert [a.source for a in answerer.answer_batch(["Who directed Jaws?"])] == ["none"]
    result = SelfAskRunner(generate_fn=decomposer, answerer=answerer, recurse=True, max_depth=1).run(QUESTION)
    first = result.trace.children[0]
    assert first.meta["unanswered_by"] == "retrieval" and first.meta["answerer"] == "model"
    assert first.meta["passages"]  # what was retrieved before the model stepped in is still recorded


def test_an_empty_index_ends_well_formed():
    empty = PassageIndex.build([], progress=False)
    reader = ScriptedReader()
    answerer = RetrievalAnswerer(empty, ModelReader(generate_fn=reader), k=3)
    result = SelfAskRunner(generate_fn=decomposer, answerer=answerer, recurse=False, max_follow_ups=2).run(QUESTION)
    assert reader.prompts == []  # nothing to read
    assert [c.answer for c in result.trace.children] == ["unknown", "unknown"]
    assert all(c.meta["passages"] == [] for c in result.trace.children)
    assert result.answer == "unknown" and parse_episode(result.text).answer == "unknown"


def test_model_reader_generates_one_bounded_line_on_a_real_model(tiny_smollm):
    from peftprompt.backbones import load_backbone

    model, tokenizer = load_backbone(str(tiny_smollm), task="causal_lm")
    reader = ModelReader(model, tokenizer, few_shot=few_shot_reader(), max_new_tokens=6)
    answers = reader(["Who directed Jaws?", "Where was Steven Spielberg born?"], [FILM_PASSAGES[:2], FILM_PASSAGES[1:3]])
    assert len(answers) == 2 and all("\n" not in a for a in answers)
    assert all(len(tokenizer(a, add_special_tokens=False)["input_ids"]) <= 6 for a in answers)
    assert few_shot_reader().count("Context:\n") == 2 and few_shot_reader().endswith("\n\n")


def test_active_adapter_switches_and_restores():
    class Model:
        active_adapter = "decomposer"

        def set_adapter(self, name):
            self.active_adapter = name

    model, seen = Model(), []
    with active_adapter(model, "reader"):
        seen.append(model.active_adapter)
    assert seen == ["reader"] and model.active_adapter == "decomposer"
    with pytest.raises(RuntimeError), active_adapter(model, "reader"):
        raise RuntimeError
    assert model.active_adapter == "decomposer"


def test_ask_command_with_an_index_records_passages_in_traces(tiny_smollm, tmp_path, capsys, index):
    """`peftprompt ask --index` end to end on a tiny random Llama with a LoRA decomposer and a second reader adapter:
    every follow-up's trace node names the passages it read."""
    from transformers import AutoModelForCausalLM

    from peftprompt import attach, save_adapter
    from peftprompt.cli import main
    from peftprompt.recursive import read_trees

    index.save(tmp_path / "idx")
    for name in ("decomposer", "reader"):
        save_adapter(attach(AutoModelForCausalLM.from_pretrained(tiny_smollm), "lora"), tmp_path / name)
    out = tmp_path / "traces.jsonl"
    argv = ["ask", QUESTION, "--model", str(tiny_smollm), "--index", str(tmp_path / "idx"), "--k", "2",
            "--adapter", str(tmp_path / "decomposer"), "--reader-adapter", str(tmp_path / "reader"),
            "--max-depth", "1", "--trace-out", str(out)]
    assert main(argv) == 0
    (trace,) = read_trees(out)
    known = {p.id for p in FILM_PASSAGES}
    for child in trace.children:  # a random model may ask no follow-up; any it asks was retrieved for
        assert child.meta["answerer"] in ("retrieval", "model") and set(child.meta["passages"]) <= known
        assert len(child.meta["passages"]) == 2


@pytest.mark.parametrize("argv, message", [
    (["--answerers", "retrieval"], "--answerers retrieval needs --index DIR"),
    (["--index", "/no/such/index"], "passage index /no/such/index does not exist"),
    (["--reader-adapter", "/x"], "--reader-adapter is a second adapter"),
])
def test_ask_command_bad_open_book_arguments_are_one_line(tiny_smollm, tmp_path, capsys, index, argv, message):
    from peftprompt.cli import main

    assert main(["ask", QUESTION, "--model", str(tiny_smollm), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
