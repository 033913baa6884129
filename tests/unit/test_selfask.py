"""The recursive self-ask runner, on a scripted model (exact transcripts and traces), the real MiniLM retriever,
and one real `model.generate` on a tiny random Llama with SmolLM2's tokenizer."""

from __future__ import annotations

import re

import pytest

from peftprompt.recursive import SELF_ASK, Node, Unroller, parse_episode, validate
from peftprompt.selfask import (
    FEW_SHOT_DIRECT,
    FEW_SHOT_SELF_ASK,
    Answerer,
    SelfAskRunner,
    ToolAnswerer,
)

from conftest import FACTS, FINAL, QUESTION, TWO_STEPS, Scripted, check_trace, tool


def test_two_follow_ups_then_the_final_answer():
    model = Scripted({QUESTION: TWO_STEPS})
    result = SelfAskRunner(generate_fn=model, answerer=tool(FACTS)).run(QUESTION)
    assert result.answer == "Crown Prince Hyomyeong"
    assert result.well_formed and not result.forced and result.issues == []
    assert result.follow_ups == 2
    assert result.text == (
        "Question: Who is the father-in-law of Queen Hyojeong?\n"
        "Are follow up questions needed here: Yes.\n"
        "Follow up: Who is Queen Hyojeong married to?\n"
        "Intermediate answer: King Heonjong of Joseon\n"
        "Follow up: Who is the father of King Heonjong of Joseon?\n"
        "Intermediate answer: Crown Prince Hyomyeong\n"
        "So the final answer is: Crown Prince Hyomyeong"
    )
    assert result.trace.to_dict() == {
        "schema": "decomp-tree/v1",
        "question": QUESTION,
        "answer": "Crown Prince Hyomyeong",
        "answer_source": "model",
        "children": [
            {"id": "1", "question": "Who is Queen Hyojeong married to?", "answer": "King Heonjong of Joseon",
             "answer_source": "tool", "meta": {"depth": 1, "answerer": "tool"}},
            {"id": "2", "question": "Who is the father of King Heonjong of Joseon?",
             "answer": "Crown Prince Hyomyeong", "answer_source": "tool", "meta": {"depth": 1, "answerer": "tool"}},
        ],
    }
    check_trace(result)
    assert parse_episode(result.text).follow_ups[1] == (
        "Who is the father of King Heonjong of Joseon?", "Crown Prince Hyomyeong")
    # The prompts are the transcript so far; three generation steps.
    assert [calls[0] for calls in model.calls] == [
        "Question: Who is the father-in-law of Queen Hyojeong?\n",
        result.text.split("Follow up: Who is the father")[0],
        result.text.split("So the final")[0],
    ]
    assert result.generated_tokens > 0


def test_few_shot_prompts_follow_the_template_and_prefix_every_prompt():
    for block in FEW_SHOT_SELF_ASK.strip().split("\n\n"):
        parse_episode(block, SELF_ASK)
    assert FEW_SHOT_SELF_ASK.count("Question: ") == 4 and FEW_SHOT_SELF_ASK.endswith("So the final answer is: No\n\n")
    assert "Follow up: Who was the founder of craigslist?\nIntermediate answer: Craigslist was founded by Craig " \
           "Newmark.\n" in FEW_SHOT_SELF_ASK
    for block in FEW_SHOT_DIRECT.strip().split("\n\n"):
        assert parse_episode(block).follow_ups == ()
    model = Scripted({QUESTION: TWO_STEPS})
    result = SelfAskRunner(generate_fn=model, answerer=tool(FACTS), few_shot=FEW_SHOT_SELF_ASK).run(QUESTION)
    assert result.well_formed and all(calls[0].startswith(FEW_SHOT_SELF_ASK) for calls in model.calls)
    assert not result.text.startswith(FEW_SHOT_SELF_ASK)


def test_batch_generates_all_running_questions_together():
    other = "What is the capital of France?"
    model = Scripted({QUESTION: TWO_STEPS,
                      other: ["Are follow up questions needed here: No.\nSo the final answer is: Paris"]})
    results = SelfAskRunner(generate_fn=model, answerer=tool(FACTS)).run_batch([QUESTION, other])
    assert [r.answer for r in results] == ["Crown Prince Hyomyeong", "Paris"]
    assert all(r.well_formed for r in results)
    assert [len(calls) for calls in model.calls] == [2, 1, 1]
    assert results[1].trace.to_dict() == {"schema": "decomp-tree/v1", "question": other, "answer": "Paris",
                                          "answer_source": "model"}
    check_trace(results[1])


def test_model_answerer_recurses_to_max_depth():
    root, a, b = "Q root?", "Q a?", "Q b?"
    a1 = "Q a1?"
    model = Scripted(
        {
            root: ["Are follow up questions needed here: Yes.\nFollow up: Q a?\nIntermediate answer:",
                   "Follow up: Q b?\nIntermediate answer:", "So the final answer is: R\n"],
            a: ["Are follow up questions needed here: Yes.\nFollow up: Q a1?\nIntermediate answer:",
                "So the final answer is: A\n"],
            b: ["Are follow up questions needed here: No.\nSo the final answer is: B\n"],
        },
        forced={a1: " A1\nQuestion: more"},  # depth 2 = max_depth: answered directly
    )
    result = SelfAskRunner(generate_fn=model, max_depth=2).run(root)
    assert result.answer == "R" and result.well_formed and result.follow_ups == 2
    assert result.trace.to_dict() == {
        "schema": "decomp-tree/v1", "question": root, "answer": "R", "answer_source": "model",
        "children": [
            {"id": "1", "question": a, "answer": "A", "answer_source": "model", "meta": {"depth": 1, "answerer": "model"},
             "children": [{"id": "1", "question": a1, "answer": "A1", "answer_source": "model",
                           "meta": {"depth": 2, "answerer": "model"}}]},
            {"id": "2", "question": b, "answer": "B", "answer_source": "model", "meta": {"depth": 1, "answerer": "model"}},
        ],
    }
    episodes = check_trace(result)
    assert [e.path for e in episodes] == ["root", "root/1", "root/1/1", "root/2"]
    assert episodes[1].text == ("Question: Q a?\nAre follow up questions needed here: Yes.\nFollow up: Q a1?\n"
                                "Intermediate answer: A1\nSo the final answer is: A")
    # the direct prompt is the No. branch, as leaves are trained
    direct = [p for calls in model.calls for p in calls if p.startswith("Question: Q a1?")]
    assert direct == ["Question: Q a1?\nAre follow up questions needed here: No.\nSo the final answer is:"]
    # tokens of the deeper runs are counted in the root's
    assert result.generated_tokens > sum(len(s.split()) for s in model.scripts[root])

    # max_depth=1: follow-ups of the root are answered directly, no grandchildren
    flat = SelfAskRunner(generate_fn=Scripted(model.scripts, default_forced=" direct\n"), max_depth=1).run(root)
    assert [c.answer for c in flat.trace.children] == ["direct", "direct"]
    assert all(not c.children for c in flat.trace.children)


def test_model_that_never_stops_is_bounded():
    babble = "and so on " * 1000
    model = Scripted({"Q?": [babble]}, default_forced=babble)
    runner = SelfAskRunner(generate_fn=model, answerer=tool({}), max_new_tokens=20, max_total_tokens=50,
                           final_answer_tokens=10)
    result = runner.run("Q?")
    assert result.issues == ["no follow-up or final answer"]
    assert result.forced and not result.well_formed
    assert result.generated_tokens <= 50 and len(model.calls) == 2
    assert result.text.startswith(
        "Question: Q?\nAre follow up questions needed here: No.\nSo the final answer is: and")
    check_trace(result)

    # a model that writes nothing at all: the forced answer is empty too
    silent = SelfAskRunner(generate_fn=Scripted({"Q?": [""]}, default_forced=""), answerer=tool({})).run("Q?")
    assert silent.answer == "" and not silent.well_formed
    assert silent.issues == ["no follow-up or final answer", "no final answer"]
    validate(Node.from_dict(silent.trace.to_dict()))
    assert silent.trace.answer is None and silent.trace.answer_source == "none"


def test_endless_new_follow_ups_stop_at_max_follow_ups_and_the_token_budget():
    yes = "Are follow up questions needed here: Yes.\n"
    model = Scripted(
        {"Q?": [lambda step: yes * (step == 0) + f"Follow up: sub question {step}?\nIntermediate answer:"]})
    result = SelfAskRunner(generate_fn=model, answerer=tool({}), max_follow_ups=3).run("Q?")
    assert result.follow_ups == 3 and result.issues == ["too many follow-ups"]
    assert result.answer == "forced" and result.forced and not result.well_formed
    assert [c.answer_source for c in result.trace.children] == ["tool"] * 3
    validate(Node.from_dict(result.trace.to_dict()))

    wordy = Scripted({"Q?": [lambda step: yes * (step == 0) + f"Follow up: sub question {step} " + "very " * 10
                             + "long?\nIntermediate answer:"]})
    runner = SelfAskRunner(generate_fn=wordy, answerer=tool({}), max_follow_ups=100, max_total_tokens=60,
                           final_answer_tokens=5)
    result = runner.run("Q?")
    assert result.issues == ["token budget exhausted"] and result.answer == "forced"
    assert result.generated_tokens <= 60 and result.follow_ups == 2  # 23 + 18 words, then 14 left: cut short


@pytest.mark.parametrize(
    "second, issue",
    [
        ("Follow up: who is queen hyojeong MARRIED to\nIntermediate answer:", "repeated follow-up"),
        ("Follow up: Who is the father-in-law of Queen Hyojeong?\nIntermediate answer:",
         "follow-up repeats the question"),
        ("Follow up: \nIntermediate answer:", "empty follow-up"),
        ("So the final answer is:\n", "empty final answer"),
        ("\nQuestion: another one?\nFollow up: Who?\nIntermediate answer:", "started another question"),
        ("Follow up: Who?\n\nQuestion: Who?\nFollow up: Who?\nIntermediate answer:", "started another question"),
        ("Some chatter\nSo the final answer is: Paris\n", "text outside the template"),
    ],
)
def test_repeated_or_empty_output_forces_the_final_answer(second, issue):
    model = Scripted({QUESTION: [TWO_STEPS[0], second]}, forced={QUESTION: " King Heonjong's father\nmore"})
    result = SelfAskRunner(generate_fn=model, answerer=tool(FACTS), retry_repeats=False).run(QUESTION)
    assert result.issues == [issue] and result.forced and not result.well_formed
    assert result.answer == "King Heonjong's father" and result.follow_ups == 1
    assert result.text.endswith(
        "Intermediate answer: King Heonjong of Joseon\nSo the final answer is: King Heonjong's father")
    assert len(model.calls) == 3
    check_trace(result)


def test_repeated_question_as_first_follow_up_keeps_the_transcript_in_the_template():
    model = Scripted({QUESTION: ["Are follow up questions needed here: Yes.\nFollow up: " + QUESTION
                                 + "\nIntermediate answer:"]})
    result = SelfAskRunner(generate_fn=model, answerer=tool(FACTS), retry_repeats=False).run(QUESTION)
    assert result.issues == ["follow-up repeats the question"]
    assert result.text == (
        f"Question: {QUESTION}\nAre follow up questions needed here: No.\nSo the final answer is: forced")
    check_trace(result)


def test_callable_is_a_tool_and_custom_answerers_batch():
    class Upper(Answerer):
        def answer_batch(self, questions, depth):
            self.seen = (list(questions), depth)
            from peftprompt.selfask import Answer
            return [Answer(q.upper(), "tool") for q in questions]

    model = Scripted({QUESTION: TWO_STEPS})
    result = SelfAskRunner(generate_fn=model, answerer=lambda q: f"  answer\nto {q}  ").run(QUESTION)
    assert result.trace.children[0].answer == "answer to Who is Queen Hyojeong married to?"
    assert result.trace.children[0].answer_source == "tool"
    upper = Upper()
    SelfAskRunner(generate_fn=Scripted({QUESTION: TWO_STEPS}), answerer=upper).run(QUESTION, depth=1)
    assert upper.seen == (["Who is the father of King Heonjong of Joseon?"], 2)


def test_real_generate_on_a_tiny_llama_terminates_within_budget():
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from peftprompt.backbones import smollm2_path

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config).eval()
    runner = SelfAskRunner(model, tokenizer, answerer=lambda q: "unknown", max_new_tokens=8, max_total_tokens=24,
                           final_answer_tokens=4)
    side = tokenizer.padding_side
    results = runner.run_batch(["Who is the father-in-law of Queen Hyojeong?", "Why?"])
    assert tokenizer.padding_side == side
    for result in results:
        assert 0 < result.generated_tokens <= 24
        validate(Node.from_dict(result.trace.to_dict()))
        assert result.text.startswith(f"Question: {result.question}\n")
    # the direct path (max_depth answers) on the real model
    direct = runner.answer_directly(["Why?"])[0]
    assert direct.generated_tokens <= 8 and direct.follow_ups == 0


def test_real_generate_stops_per_row_at_the_markers():
    """A Llama whose logits spell a fixed text per row: `model.generate` with the runner's stopping criteria stops
    row 0 after the intermediate answer marker and row 1 at the end of the final answer line, with left padding; a
    row that starts another ``Question:`` stops there."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from peftprompt.backbones import smollm2_path

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    targets = [
        "Are follow up questions needed here: Yes.\nFollow up: Who is X?\nIntermediate answer: never seen text",
        "Are follow up questions needed here: No.\nSo the final answer is: Paris\nQuestion: never seen",
        "Are follow up questions needed here: No.\n\nQuestion: What is X?\nFollow up: never seen",
    ]
    target_ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in targets]

    class Spelling(LlamaForCausalLM):
        def generate(self, input_ids=None, past_key_values=None, **kwargs):
            if past_key_values is None:  # a new prompt batch (a call that goes on with fewer rows passes its cache)
                self.width = input_ids.shape[1]
            texts = [tokenizer.decode(ids) for ids in input_ids.tolist()]  # each row spells its question's target
            self.rows = [target_ids[2 if "Next?" in text else "Capital?" in text] for text in texts]
            return super().generate(input_ids=input_ids, past_key_values=past_key_values, **kwargs)

        def forward(self, input_ids=None, attention_mask=None, **kwargs):
            cache = kwargs.get("cache", kwargs.get("past_key_values"))  # named cache from transformers 5.24
            past = 0 if cache is None else cache.get_seq_length()
            self.batch_sizes.append(input_ids.shape[0])
            step = past + input_ids.shape[1] - self.width
            out = super().forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
            logits = torch.full_like(out.logits[:, -1:], -1e4)
            for row, ids in enumerate(self.rows):
                logits[row, 0, ids[step] if step < len(ids) else tokenizer.eos_token_id] = 1e4
            out.logits = logits
            return out

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    # the spelling reads "no cache passed" as a new prompt batch: every step encodes its whole prompt
    spelling = Spelling(config).eval()
    spelling.batch_sizes = []
    runner = SelfAskRunner(spelling, tokenizer, answerer=lambda q: "Y", reuse_kv_cache=False)
    prompts = ["Question: Who is the father-in-law of Queen Hyojeong?\n", "Question: Capital?\n"]
    outs = runner._step(prompts, [60, 60])
    # row 1's final answer line ends first; row 0 goes on alone instead of carrying the finished row
    assert spelling.batch_sizes[0] == 2 and spelling.batch_sizes[-1] == 1
    assert outs[0].text == "Are follow up questions needed here: Yes.\nFollow up: Who is X?\nIntermediate answer:"
    assert outs[1].text == "Are follow up questions needed here: No.\nSo the final answer is: Paris"
    for out, target, ids in zip(outs, targets, target_ids):
        assert not out.eos
        used = len(tokenizer(out.text, add_special_tokens=False)["input_ids"])
        assert used <= out.tokens <= used + 2 < len(ids)  # stopped within a token or two of the marker
    # max_new_tokens per row: row 1 is cut at 5 tokens while row 0 goes on
    out = runner._step(["Question: Next?\n"], [60])[0]
    assert out.text == "Are follow up questions needed here: No.\n\nQuestion:"
    assert len(tokenizer(out.text, add_special_tokens=False)["input_ids"]) <= out.tokens <= 16 < len(target_ids[2])
    outs = runner._step(prompts, [60, 5])
    assert outs[1].tokens == 5 and outs[0].text.endswith("Intermediate answer:")
    # the whole run: row 1 answers Paris; row 0 writes its decision line again after the intermediate answer,
    # which is outside the template, so its answer is forced (one line)
    results = runner.run_batch(prompts[0:1] + ["Capital?"])
    assert results[1].answer == "Paris" and results[1].well_formed
    assert results[0].issues == ["text outside the template"] and results[0].follow_ups == 1


def test_ask_command_missing_model_is_one_line(capsys):
    from peftprompt.cli import main

    assert main(["ask", "q?", "--model", "/no/such/model"]) == 2
    assert "model path /no/such/model does not exist" in capsys.readouterr().err


def test_traces_feed_back_into_the_collator_as_training_data(tmp_path):
    """A run's trace, saved as decomp-tree/v1 JSONL and read back, is a training example: the collator's episode is
    the run's transcript, with the follow-ups and the final answer trained and the retrieved answers masked."""
    from transformers import AutoTokenizer

    from peftprompt.backbones import smollm2_path
    from peftprompt.recursive import SelfAskCollator, read_trees, write_trees

    result = SelfAskRunner(generate_fn=Scripted({QUESTION: TWO_STEPS}), answerer=tool(FACTS)).run(QUESTION)
    assert write_trees(tmp_path / "traces.jsonl", [result.trace]) == 1
    (tree,) = read_trees(tmp_path / "traces.jsonl")
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    collator = SelfAskCollator(tokenizer, max_length=256, unroller=Unroller(mode="flat"))
    batch = collator([tree.to_dict()])
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    text = tokenizer.decode(ids, skip_special_tokens=True)
    assert text.startswith(result.text)
    trained = tokenizer.decode(ids[labels != -100], skip_special_tokens=True)
    assert "Follow up: Who is Queen Hyojeong married to?" in trained
    assert "So the final answer is: Crown Prince Hyomyeong" in trained
    assert "Question:" not in trained and "King Heonjong of Joseon\n" not in trained  # question, tool answers masked


class ChainModel:
    """A fake model for recursion: a question in `plans` asks its follow-ups in order, then answers with its last
    intermediate answer; a question asked directly (the ``No.`` prompt) gets `direct[question]`."""

    def __init__(self, plans, direct):
        self.plans, self.direct, self.prompts = plans, direct, []

    def __call__(self, prompts, max_new_tokens):
        self.prompts += prompts
        outs = []
        for prompt in prompts:
            episode = prompt.rsplit("Question: ", 1)[1]
            question = episode.split("\n", 1)[0]
            if prompt.endswith(FINAL):
                outs.append(f" {self.direct[question]}\n")
                continue
            answers = re.findall(r"Intermediate answer: (.*)\n", episode)
            plan = self.plans[question]
            if len(answers) < len(plan):
                decision = "" if answers else "Are follow up questions needed here: Yes.\n"
                outs.append(f"{decision}Follow up: {plan[len(answers)]}\nIntermediate answer:")
            else:
                outs.append(f"So the final answer is: {answers[-1]}\n")
        return outs


ROOT, INNER = "What year did the director of A die?", "When did the director of A die?"
LEAF_FACTS = {"Who directed A?": "Stevens", "When did Stevens die?": "1975"}


def chain_model():
    return ChainModel({ROOT: [INNER], INNER: ["Who directed A?", "When did Stevens die?"]},
                      direct={INNER: "1900", ROOT: "1950"})


def test_follow_up_needing_one_more_level_is_right_at_max_depth_2_not_1():
    leaf_tool = ToolAnswerer(lambda q: LEAF_FACTS.get(q))  # None: the tool cannot answer
    deep = SelfAskRunner(generate_fn=chain_model(), answerer=leaf_tool, max_depth=2).run(ROOT)
    shallow = SelfAskRunner(generate_fn=chain_model(), answerer=leaf_tool, max_depth=1).run(ROOT)
    assert deep.answer == "1975" and deep.well_formed
    assert shallow.answer == "1900"  # at the limit the model answers the compositional follow-up directly
    (inner,) = deep.trace.children
    assert (inner.question, inner.answer, inner.answer_source, inner.meta) == (
        INNER, "1975", "model", {"depth": 1, "answerer": "model", "unanswered_by": "tool"})
    assert [(c.question, c.answer, c.meta) for c in inner.children] == [
        ("Who directed A?", "Stevens", {"depth": 2, "answerer": "tool"}),
        ("When did Stevens die?", "1975", {"depth": 2, "answerer": "tool"})]
    (direct,) = shallow.trace.children
    assert direct.meta == {"depth": 1, "answerer": "model", "unanswered_by": "tool"} and not direct.children
    assert deep.generated_tokens > shallow.generated_tokens
    check_trace(deep)
    # without recursion the follow-up stays unknown
    flat = SelfAskRunner(generate_fn=chain_model(), answerer=leaf_tool, max_depth=2, recurse=False).run(ROOT)
    assert flat.answer == "unknown" and flat.trace.children[0].answer_source == "none"


def test_max_depth_forces_a_direct_answer_and_layers_have_their_own_answerers():
    model = chain_model()
    direct = SelfAskRunner(generate_fn=model, answerer=ToolAnswerer(LEAF_FACTS.get), max_depth=0).run(ROOT)
    assert direct.answer == "1950" and direct.follow_ups == 0 and not direct.trace.children
    assert model.prompts == [f"Question: {ROOT}\nAre follow up questions needed here: No.\n{FINAL}"]
    # layer 1 answered by the model itself, layer 2 by the tool
    layered = SelfAskRunner(generate_fn=chain_model(), answerer=[None, ToolAnswerer(LEAF_FACTS.get)],
                            max_depth=3).run(ROOT)
    (inner,) = layered.trace.children
    assert layered.answer == "1975" and inner.meta == {"depth": 1, "answerer": "model"}
    assert [c.meta["answerer"] for c in inner.children] == ["tool", "tool"]
    with pytest.raises(ValueError, match="empty list"):
        SelfAskRunner(generate_fn=model, answerer=[])


def test_answerer_from_name():
    from peftprompt.selfask import answerer_from_name

    assert answerer_from_name("model") is None
    tool = answerer_from_name("os.path:basename")
    assert tool("a/b", 1).text == "b" and tool.name == "tool"
    with pytest.raises(ValueError, match="needs facts"):
        answerer_from_name("retriever")
    with pytest.raises(ValueError, match="unknown answerer 'oracle'"):
        answerer_from_name("oracle")


def test_a_follow_up_repeating_the_question_is_asked_again_once_without_its_first_word():
    repeat = f"Are follow up questions needed here: Yes.\nFollow up: {QUESTION}\nIntermediate answer:"
    calls = []

    def model(prompts, limits, banned=None):
        calls.append((list(prompts), banned))
        outs = []
        for prompt, word in zip(prompts, banned or [None] * len(prompts)):
            if word == "Who":  # the retry: the prompt ends with the decision line and "Follow up:"
                outs.append(" Whom did Queen Hyojeong marry?\nIntermediate answer:")
            elif prompt.endswith("Intermediate answer: King Heonjong of Joseon\n"):
                outs.append("So the final answer is: Crown Prince Hyomyeong\n")
            else:
                outs.append(repeat)
        return outs

    facts = {"Whom did Queen Hyojeong marry?": "King Heonjong of Joseon"}
    result = SelfAskRunner(generate_fn=model, answerer=tool(facts)).run(QUESTION)
    assert result.answer == "Crown Prince Hyomyeong" and result.well_formed and result.issues == []
    assert result.corrections == ["follow-up repeats the question"]
    assert calls[1] == ([f"Question: {QUESTION}\nAre follow up questions needed here: Yes.\nFollow up:"], ["Who"])
    assert result.text.startswith(f"Question: {QUESTION}\nAre follow up questions needed here: Yes.\n"
                                  "Follow up: Whom did Queen Hyojeong marry?\nIntermediate answer: King Heonjong")
    check_trace(result)
    # a second repeat is not retried again: the answer is forced

    def stubborn_model(prompts, limits, banned=None):
        return [f" {QUESTION}\nIntermediate answer:" if banned else repeat for _ in prompts]

    stubborn = SelfAskRunner(generate_fn=stubborn_model, answerer=tool(facts)).run(QUESTION)
    assert stubborn.issues == ["follow-up repeats the question"] and stubborn.forced
    assert stubborn.corrections == ["follow-up repeats the question"]


def test_real_generate_bans_the_first_word_of_a_retried_follow_up(tiny_smollm):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = AutoModelForCausalLM.from_pretrained(tiny_smollm).eval(), AutoTokenizer.from_pretrained(tiny_smollm)
    runner = SelfAskRunner(model, tokenizer, answerer=tool({}), max_new_tokens=1)
    prompt = "Question: Who?\nAre follow up questions needed here: Yes.\nFollow up:"
    (free,) = runner._step([prompt], [1])
    (banned,) = runner._step([prompt], [1], [free.text.strip()])
    assert free.text.strip() and banned.text.strip() != free.text.strip()


def test_trace_tree_names_each_layer_and_who_answered():
    from rich.console import Console

    from peftprompt.selfask.show import trace_tree, who_answered

    deep = SelfAskRunner(generate_fn=chain_model(), answerer=ToolAnswerer(LEAF_FACTS.get), max_depth=2).run(ROOT)
    (inner,) = deep.trace.children
    assert who_answered(inner) == "layer 1: model; the tool had nothing"
    assert who_answered(inner.children[0]) == "layer 2: tool"
    assert who_answered(Node(question="q?", answer="a", answer_source="gold")) == "gold"
    console = Console(width=200, record=True)
    console.print(trace_tree(deep.trace))
    text = console.export_text()
    assert "When did the director of A die? -> 1975 (layer 1: model; the tool had nothing)" in text
    assert "Who directed A? -> Stevens (layer 2: tool)" in text


def test_at_most_batch_size_questions_in_flight_and_the_bar_counts_them_as_they_finish(monkeypatch):
    """`run_batch` keeps `batch_size` questions in flight: a finished question makes room for the next one, so the
    first answers are in (and counted by the progress bar) before the last questions start."""
    import peftprompt.selfask.runner as runner_module

    one_step = ["Are follow up questions needed here: No.\nSo the final answer is: A\n"]
    questions = [QUESTION, "Q2?", "Q3?", "Q4?", "Q5?"]
    model = Scripted({QUESTION: TWO_STEPS, **{q: one_step for q in questions[1:]}})
    counted = []

    class Bar:
        def __init__(self, *args, **kwargs):
            self.n = 0

        def update(self, n):
            self.n += n
            counted.append(self.n)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(runner_module, "tqdm", Bar)
    runner = SelfAskRunner(generate_fn=model, answerer=tool(FACTS), batch_size=2, progress="questions")
    results = runner.run_batch(questions)
    assert [r.answer for r in results] == ["Crown Prince Hyomyeong", "A", "A", "A", "A"]
    firsts = [[p.split("\n", 1)[0] for p in call] for call in model.calls]
    assert firsts == [[f"Question: {QUESTION}", "Question: Q2?"], [f"Question: {QUESTION}", "Question: Q3?"],
                      [f"Question: {QUESTION}", "Question: Q4?"], ["Question: Q5?"]]
    assert counted == [1, 2, 3, 4, 5]


def test_deeper_questions_step_with_the_others_while_their_askers_wait():
    """A follow-up the retriever cannot answer is self-asked in the same `generate` calls as the questions still
    running (not in a small batch of its own), its asker skips the steps until the answer is in, and every
    transcript is what the question alone gives."""
    deep, quick = "Q deep?", "Q quick?"
    model = Scripted({
        deep: ["Are follow up questions needed here: Yes.\nFollow up: Q sub?\nIntermediate answer:",
               "So the final answer is: D\n"],
        "Q sub?": ["Are follow up questions needed here: Yes.\nFollow up: Q leaf?\nIntermediate answer:",
                   "So the final answer is: S\n"],
        quick: ["Are follow up questions needed here: Yes.\nFollow up: Q known?\nIntermediate answer:",
                "Follow up: Q known again?\nIntermediate answer:", "Follow up: Q known thrice?\nIntermediate answer:",
                "So the final answer is: K\n"],
    }, forced={"Q leaf?": " L\n"})
    facts = ToolAnswerer({"Q known?": "k1", "Q known again?": "k2", "Q known thrice?": "k3"}.get)  # else None
    runner = SelfAskRunner(generate_fn=model, answerer=facts, max_depth=2)
    both = runner.run_batch([deep, quick])
    firsts = [sorted(p.split("\n", 1)[0] for p in call) for call in model.calls]
    assert firsts == [["Question: Q deep?", "Question: Q quick?"],
                      ["Question: Q quick?", "Question: Q sub?"],  # the deep question waits on its follow-up
                      ["Question: Q leaf?", "Question: Q quick?"],  # ... which waits on its own, answered directly
                      ["Question: Q quick?", "Question: Q sub?"],
                      ["Question: Q deep?"]]  # the quick one finished meanwhile
    assert [r.answer for r in both] == ["D", "K"] and all(r.well_formed for r in both)
    alone = [SelfAskRunner(generate_fn=Scripted(model.scripts, model.forced), answerer=facts).run(q)
             for q in (deep, quick)]
    assert [r.text for r in both] == [r.text for r in alone]
    assert [r.trace.to_dict() for r in both] == [r.trace.to_dict() for r in alone]
    assert [r.generated_tokens for r in both] == [r.generated_tokens for r in alone]
    sub = both[0].trace.children[0]
    assert sub.meta == {"depth": 1, "answerer": "model", "unanswered_by": "tool"}
    assert sub.children[0].meta == {"depth": 2, "answerer": "model", "unanswered_by": "tool"}
