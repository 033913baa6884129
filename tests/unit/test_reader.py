"""Reader episodes (`peftprompt.retrieval.reader`): their text, what they train, the examples built from open-book
questions, and the self-ask recipe's reader options."""

from __future__ import annotations

from collections import Counter

import pytest
from transformers import AutoTokenizer

from peftprompt.backbones import smollm2_path
from peftprompt.errors import InputError
from peftprompt.recursive import EpisodeEncoder
from peftprompt.recursive.collator import IGNORE_INDEX
from peftprompt.retrieval.passages import Hop, OpenBookQuestion, Passage, read_questions
from peftprompt.retrieval.reader import ReaderExample, reader_episode, reader_examples, reader_prompt
from peftprompt.training import load_config

from conftest import REPO, script_module

SOURCES = ("2wikimultihopqa_context", "musique_context", "hotpotqa_distractor")
PASSAGES = (
    Passage.make("Le Jour se lève", "Le Jour se lève is a 1939 French film\n directed by Marcel Carné."),
    Passage.make("Marcel Carné", "Marcel Carné was a French film director,\n\n born in Paris."),
    Passage.make("Paris", "Paris is the capital of France."),
)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(smollm2_path())


@pytest.fixture(scope="module")
def train_questions():
    """The first 30 training questions of each open-book source."""
    return {source: read_questions(source, "train", limit=30) for source in SOURCES}


def selfask_sft_module():
    return script_module(REPO / "recipes/selfask_sft.py")


def toy_question(passages: int = 10, split: str = "train", hops: bool = True) -> OpenBookQuestion:
    """A question with `passages` paragraphs: hop 1's gold one is paragraph 0, hop 2's are paragraphs 1 and 2."""
    paragraphs = tuple(Passage.make(f"Title {n}", f"Text of paragraph {n}.") for n in range(passages))
    steps = (Hop("Who directed A?", "Carné", (), (paragraphs[0].id,)),
             Hop("Where was Carné born?", "Paris", (), (paragraphs[1].id, paragraphs[2].id)))
    return OpenBookQuestion(
        id="q", question="Where was the director of A born?", answer="Paris", aliases=(), dataset="toy", split=split,
        kind="compositional", passages=paragraphs, supporting=(paragraphs[0].id, paragraphs[1].id),
        hops=steps if hops else (),
    )


def test_reader_prompt_is_the_fixed_format():
    assert reader_prompt("Where was Marcel Carné born?", PASSAGES) == (
        "Context:\n"
        "[1] Le Jour se lève: Le Jour se lève is a 1939 French film directed by Marcel Carné.\n"
        "[2] Marcel Carné: Marcel Carné was a French film director, born in Paris.\n"
        "[3] Paris: Paris is the capital of France.\n"
        "Question: Where was Marcel Carné born?\n"
        "Are follow up questions needed here: No.\n"
        "So the final answer is:"
    )


def test_reader_episode_is_the_prompt_and_the_answer_with_spans_in_order():
    question = "Where was Marcel Carné born?"
    episode = reader_episode(question, "Paris", PASSAGES, dataset="toy", example_id="q/hop2")
    assert episode.text == reader_prompt(question, PASSAGES) + " " + "Paris"
    assert [(s.kind, s.weight) for s in episode.spans] == [
        ("context", 0.0), ("question", 0.0), ("decision", 0.0), ("final_answer", 1.0)]
    assert episode.spans[0].start == 0 and episode.spans[-1].end == len(episode.text)
    assert all(a.end == b.start for a, b in zip(episode.spans, episode.spans[1:]))
    assert episode.text[episode.spans[-1].start:] == " Paris"
    assert (episode.tree_id, episode.dataset, episode.path) == ("q/hop2", "toy", "reader")


def test_passages_are_cut_at_max_words():
    long = Passage.make("Long", " ".join(f"w{n}" for n in range(10)))
    exact = Passage.make("Exact", "one two\nthree   four")
    prompt = reader_prompt("Q?", [long, exact], max_words=4)
    assert "[1] Long: w0 w1 w2 w3 ...\n" in prompt and "w4" not in prompt
    assert "[2] Exact: one two three four\n" in prompt
    assert "[1] Long: " + " ".join(f"w{n}" for n in range(10)) + "\n" in reader_prompt("Q?", [long])
    with pytest.raises(ValueError, match="max_words"):
        reader_prompt("Q?", [long], max_words=0)


@pytest.mark.parametrize("answer", ["Paris", "1939", "Marcel Carné", "yes", "the 12th of May, 1906"])
def test_only_the_answer_and_eos_are_trained(tokenizer, answer):
    episode = reader_episode("Where was Marcel Carné born?", answer, PASSAGES)
    encoded = EpisodeEncoder(tokenizer).encode(episode)
    trained = [i for i, label in zip(encoded.input_ids, encoded.labels) if label != IGNORE_INDEX]
    assert tokenizer.decode(trained) == f" {answer}{tokenizer.eos_token}"
    # the prompt's tokens are all untrained and the trained ones are one run at the end
    prompt_tokens = len(tokenizer(reader_prompt("Where was Marcel Carné born?", PASSAGES))["input_ids"])
    assert all(label == IGNORE_INDEX for label in encoded.labels[:prompt_tokens])
    assert encoded.labels[len(encoded) - len(trained):] == tuple(trained)


def test_real_reader_episodes_train_only_their_answer(tokenizer, train_questions):
    encoder = EpisodeEncoder(tokenizer)
    for source, questions in train_questions.items():
        for example in reader_examples(questions)[:20]:
            encoded = encoder.encode(example.episode())
            trained = [i for i, label in zip(encoded.input_ids, encoded.labels) if label != IGNORE_INDEX]
            assert tokenizer.decode(trained) == f" {example.answer}{tokenizer.eos_token}", (source, example.id)


def test_every_example_holds_its_gold_passages_and_the_budget(train_questions):
    for source, questions in train_questions.items():
        examples = reader_examples(questions, passages_per_example=3)
        assert len(examples) == sum(len(q.hops) or 1 for q in questions), source
        by_question = {q.id: q for q in questions}
        for example in examples:
            question = by_question[example.id.split("/hop")[0]]
            ids = [p.id for p in example.passages]
            assert len(ids) == len(set(ids)) == min(3, len({p.id for p in question.passages}))
            assert example.gold and set(example.gold) <= set(ids)
            assert set(ids) <= {p.id for p in question.passages}
        # the gold passage is not always first
        assert len({[p.id for p in e.passages].index(e.gold[0]) for e in examples}) == 3, source


def test_hops_take_their_own_gold_and_draw_distractors_from_the_question():
    question = toy_question()
    first, second = reader_examples([question], passages_per_example=3)
    assert (first.id, first.question, first.answer) == ("q/hop1", "Who directed A?", "Carné")
    assert first.gold == (question.passages[0].id,)
    assert second.id == "q/hop2" and set(second.gold) == {question.passages[1].id, question.passages[2].id}
    # more gold passages than the budget: the first gold ones are kept, no distractor
    (_, cut) = reader_examples([question], passages_per_example=1)
    assert cut.gold == (question.passages[1].id,) and [p.id for p in cut.passages] == [question.passages[1].id]
    # a question with fewer paragraphs than the budget gives all of them
    small = reader_examples([toy_question(passages=3)], passages_per_example=5)
    assert all(len(e.passages) == 3 for e in small)
    # distractors come from the other hops' gold passages too
    drawn = Counter(p.id for seed in range(40) for p in reader_examples([question], 3, seed=seed)[0].passages)
    assert drawn[question.passages[1].id] > 0 and drawn[question.passages[2].id] > 0


def test_unanswerable_copies_hold_no_supporting_passage_and_answer_unknown():
    questions = [toy_question()]
    assert len(reader_examples(questions, unanswerable=0.0)) == 2
    examples = reader_examples(questions, passages_per_example=3, unanswerable=1.0)
    assert [e.id for e in examples] == ["q/hop1", "q/hop1/unanswerable", "q/hop2", "q/hop2/unanswerable"]
    supporting = set(questions[0].supporting) | {p.id for p in questions[0].passages[:3]}
    for example in examples[1::2]:
        assert example.answer == "unknown" and example.gold == () and len(example.passages) == 3
        assert not supporting & {p.id for p in example.passages}
    real = [q for q in read_questions("musique_context", "train", limit=30)]
    drawn = reader_examples(real, unanswerable=0.1)
    negatives = [e for e in drawn if e.answer == "unknown"]
    assert 0 < len(negatives) < 0.3 * (len(drawn) - len(negatives))
    with pytest.raises(ValueError, match="unanswerable"):
        reader_examples(questions, unanswerable=1.5)


def test_a_question_without_hops_gives_one_example():
    question = toy_question(hops=False)
    (example,) = reader_examples([question])
    assert isinstance(example, ReaderExample)
    assert (example.id, example.question, example.answer) == ("q", question.question, "Paris")
    assert example.gold == question.supporting and example.dataset == "toy"


def test_examples_are_seeded(train_questions):
    questions = train_questions["musique_context"]
    assert reader_examples(questions, seed=1) == reader_examples(questions, seed=1)
    assert reader_examples(questions, seed=1) != reader_examples(questions, seed=2)
    # an example does not depend on the other questions given
    assert reader_examples(questions[3:4], seed=1) == [e for e in reader_examples(questions, seed=1)
                                                       if e.id.startswith(questions[3].id + "/")]


def test_non_training_splits_are_refused():
    with pytest.raises(InputError, match="training questions only"):
        reader_examples(read_questions("musique_context", "dev", limit=2))
    with pytest.raises(InputError, match="split 'test'"):
        reader_examples([toy_question(), toy_question(split="test")])


def test_reader_options_are_checked_when_the_config_is_loaded():
    config = REPO / "recipes/configs/smollm2/selfask_lora.yaml"
    for overrides, message in (
        (["data.reader_source=[musique_context]"],
         r"override 'data.reader_source=\[musique_context\]': unknown key \(did you mean 'data.reader_sources'\?\)"),
        (["data.sources=[]"], r"nothing to train on: data.sources is empty .*\(override 'data.sources=\[\]'\)"),
        (["data.reader_sources=[musique]"],
         r"field 'data.reader_sources.0' must be one of .*, got 'musique' \(did you mean 'musique_context'\?\)"),
        (["data.reader_sources=musique_context"], r"field 'data.reader_sources' expects a list of names from "),
        (["data.reader_passages=0"], r"field 'data.reader_passages' must be >= 1, got 0"),
        (["data.reader_max_words=many"], r"field 'data.reader_max_words' expects int, got 'many'"),
        (["data.reader_unanswerable=2"], r"field 'data.reader_unanswerable' must be in \[0, 1\], got 2"),
    ):
        with pytest.raises(InputError, match=message):
            load_config(config, overrides)


def test_shipped_reader_configs_validate():
    reader_only = load_config(REPO / "recipes/configs/smollm2/reader_lora.yaml").data
    assert (reader_only.sources, reader_only.reader_sources) == ([], list(SOURCES))
    openbook = load_config(REPO / "recipes/configs/smollm2/selfask_openbook_lora.yaml").data
    shipped = load_config(REPO / "recipes/configs/smollm2/selfask_lora.yaml").data
    assert (openbook.sources, openbook.reader_sources) == (shipped.sources, list(SOURCES))
    assert (openbook.reader_passages, openbook.reader_max_words, openbook.reader_unanswerable) == (3, 120, 0.1)


def test_recipe_shuffles_reader_episodes_in_and_counts_those_too_long(tokenizer):
    module = selfask_sft_module()
    config = load_config(REPO / "recipes/configs/smollm2/selfask_openbook_lora.yaml",
                         ["max_train_samples=12", "max_length=400", "data.reader_unanswerable=0",
                          "data.reader_sources=[musique_context, hotpotqa_distractor]"])
    episodes = module.reader_training_episodes(config)
    assert len(episodes) == 12 and {e.dataset for e in episodes} == {"musique_context", "hotpotqa_distractor"}
    trees = module.convert("probtree_2wiki")[:10]
    dropped = Counter()
    rows = module.episode_rows(trees, tokenizer, config, module.unroller_for(config), False, episodes, dropped)
    lengths = [len(EpisodeEncoder(tokenizer).encode(e)) for e in episodes]
    assert 0 < dropped["episodes"] == sum(n > 400 for n in lengths) < 12
    kinds = ["reader" if tokenizer.decode(row["input_ids"]).startswith("Context:\n[1] ") else "tree" for row in rows]
    assert Counter(kinds) == {"tree": 10 - dropped["trees"], "reader": 12 - dropped["episodes"]}
    assert kinds not in (sorted(kinds), sorted(kinds, reverse=True))  # shuffled together
