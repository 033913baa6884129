"""Golden transcripts: what the self-ask runner wrote, character for character, before it was split into the protocol
(`peftprompt.selfask.runner`) and a generation backend (`peftprompt.selfask.transformers_backend`), recorded in
``selfask_golden.json`` and compared case by case.

Cases: the scripted models of the runner's unit tests (malformed output, retries, recursion, operators, in-flight
scheduling, token counting with a tokenizer, `complete`); a tiny random Llama with SmolLM2's tokenizer, greedy, with
and without KV-cache reuse, several questions in flight, ``max_depth`` 0, 1 and 2, with and without a few-shot prefix
(its cache shared by the batch); and the same network made to spell a script (`Spelling`), so that real `generate`
calls stop at every marker, at EOS, at the token budget, after non-ASCII text, on a banned first word.

To record again (only when a change of transcripts is intended and explained):
``SELFASK_GOLDEN_RECORD=1 pytest tests/unit/test_selfask_golden.py``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM, LogitsProcessor, LogitsProcessorList

from peftprompt.recursive import LEAST_TO_MOST
from peftprompt.selfask import (
    FEW_SHOT_DIRECT,
    FEW_SHOT_SELF_ASK,
    AnswererChain,
    Continuation,
    OperatorAnswerer,
    SelfAskRunner,
    ToolAnswerer,
)

from conftest import FACTS, FINAL, QUESTION, TWO_STEPS, Scripted, tool

GOLDEN = Path(__file__).with_name("selfask_golden.json")
RECORD = os.environ.get("SELFASK_GOLDEN_RECORD") == "1"


def record(result) -> dict:
    return {"question": result.question, "answer": result.answer, "well_formed": result.well_formed,
            "follow_ups": result.follow_ups, "generated_tokens": result.generated_tokens, "issues": result.issues,
            "text": result.text, "trace": result.trace.to_dict(), "forced": result.forced,
            "corrections": result.corrections}


def shorten(prompt: str) -> str:
    """A prompt as recorded: a few-shot prefix named, not spelled out."""
    for name, prefix in (("<few-shot self-ask>", FEW_SHOT_SELF_ASK), ("<few-shot direct>", FEW_SHOT_DIRECT)):
        if prompt.startswith(prefix):
            return name + prompt[len(prefix):]
    return prompt


def continuation(out: Continuation) -> dict:
    return {"text": out.text, "tokens": out.tokens, "eos": out.eos}


# --- scripted models -------------------------------------------------------------------------------------------------

class Recording(Scripted):
    """`Scripted`, recording the prompts and the banned words of every call (it accepts them, and ignores them)."""

    def __call__(self, prompts, max_new_tokens, banned=None):
        outs = super().__call__(prompts, max_new_tokens)
        self.calls[-1] = [shorten(p) for p in prompts] + ([f"banned: {banned}"] if banned else [])
        return outs


class Chain:
    """A question in `plans` asks its follow-ups in order, then answers with its last intermediate answer; asked
    directly, it answers `direct[question]`."""

    def __init__(self, plans, direct):
        self.plans, self.direct, self.calls = plans, direct, []

    def __call__(self, prompts, max_new_tokens):
        self.calls.append(list(prompts))
        outs = []
        for prompt in prompts:
            episode = prompt.rsplit("Question: ", 1)[1]
            question = episode.split("\n", 1)[0]
            if prompt.endswith(FINAL):
                outs.append(f" {self.direct.get(question, 'dunno')}\n")
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
DEEP = "Which film came out later, The More the Merrier or Sleep, My Love?"
LATER = "Which is later: The More the Merrier (March 8, 1975) or Sleep, My Love (14 January 1987)?"


def chain():
    return Chain({ROOT: [INNER], INNER: ["Who directed A?", "When did Stevens die?"],
                  DEEP: ["When did The More the Merrier come out?", "When did Sleep, My Love come out?", LATER]},
                 direct={INNER: "1900", ROOT: "1950"})


def scripted_run(model, questions, **kwargs) -> dict:
    runner = SelfAskRunner(generate_fn=model, **kwargs)
    return {"results": [record(r) for r in runner.run_batch(questions)], "calls": model.calls}


YES = "Are follow up questions needed here: Yes.\n"
NO = "Are follow up questions needed here: No.\n"
MALFORMED = {
    "repeated": "Follow up: who is queen hyojeong MARRIED to\nIntermediate answer:",
    "repeats_question": f"Follow up: {QUESTION}\nIntermediate answer:",
    "empty_follow_up": "Follow up: \nIntermediate answer:",
    "empty_final": "So the final answer is:\n",
    "another_question": "\nQuestion: another one?\nFollow up: Who?\nIntermediate answer:",
    "another_question_later": "Follow up: Who?\n\nQuestion: Who?\nFollow up: Who?\nIntermediate answer:",
    "outside_template": "Some chatter\nSo the final answer is: Paris\n",
}


def case_malformed(second):
    def run():
        model = Recording({QUESTION: [TWO_STEPS[0], second]}, forced={QUESTION: " King Heonjong's father\nmore"})
        return scripted_run(model, [QUESTION], answerer=tool(FACTS), retry_repeats=False)
    return run


def case_model_recursion(depth):
    def run():
        model = Recording(
            {"Q root?": [f"{YES}Follow up: Q a?\nIntermediate answer:", "Follow up: Q b?\nIntermediate answer:",
                         "So the final answer is: R\n"],
             "Q a?": [f"{YES}Follow up: Q a1?\nIntermediate answer:", "So the final answer is: A\n"],
             "Q b?": [f"{NO}So the final answer is: B\n"],
             "Q a1?": [f"{NO}So the final answer is: A1 deeper\n"]},
            forced={"Q a1?": " A1\nQuestion: more"}, default_forced=" direct\n")
        return scripted_run(model, ["Q root?"], max_depth=depth)
    return run


def case_operator(ends):
    def run():
        leaves = {"When did The More the Merrier come out?": "March 8, 1975",
                  "When did Sleep, My Love come out?": "14 January 1987", **LEAF_FACTS}
        layer = AnswererChain([OperatorAnswerer(), ToolAnswerer(leaves.get)])
        return scripted_run(chain(), [DEEP, ROOT], answerer=layer, operator_ends=ends)
    return run


def case_retry():
    repeat = f"{YES}Follow up: {QUESTION}\nIntermediate answer:"
    calls = []

    def model(prompts, limits, banned=None):
        calls.append([list(prompts), banned])
        outs = []
        for prompt, word in zip(prompts, banned or [None] * len(prompts)):
            if word == "Who":
                outs.append(" Whom did Queen Hyojeong marry?\nIntermediate answer:")
            elif prompt.endswith("Intermediate answer: King Heonjong of Joseon\n"):
                outs.append("So the final answer is: Crown Prince Hyomyeong\n")
            else:
                outs.append(repeat)
        return outs

    def stubborn(prompts, limits, banned=None):
        calls.append([list(prompts), banned])
        return [f" {QUESTION}\nIntermediate answer:" if banned else repeat for _ in prompts]

    facts = tool({"Whom did Queen Hyojeong marry?": "King Heonjong of Joseon"})
    results = [SelfAskRunner(generate_fn=fn, answerer=facts).run(QUESTION) for fn in (model, stubborn)]
    return {"results": [record(r) for r in results], "calls": calls}


def case_continuations():
    """A generator that returns `Continuation`s (tokens and EOS its own), some running past their stop."""
    def model(prompts, limits):
        outs = []
        for prompt in prompts:
            if prompt.endswith(FINAL):
                outs.append(Continuation(" Paris\nQuestion: more", tokens=7, eos=False))
            elif "Intermediate answer: Paris" in prompt:
                outs.append(Continuation("So the final answer is: Paris", tokens=9, eos=True))
            else:
                outs.append(Continuation(f"{YES}Follow up: Capital of France?\nIntermediate answer: x y z",
                                         tokens=99, eos=False))
        return outs

    runner = SelfAskRunner(generate_fn=model, answerer=tool({"Capital of France?": "Paris"}), max_new_tokens=40)
    return {"results": [record(r) for r in runner.run_batch(["Capital?"])]
            + [record(r) for r in runner.answer_directly(["Capital?"])],
            "complete": [continuation(c) for c in runner.complete([f"Question: Capital?\n{FINAL}"])]}


def case_least_to_most():
    def model(prompts, limits):
        return ["A: To answer this, first solve these subquestions.\nSubquestion: Who?\nAnswer: never"
                if "Answer: Ada" not in p else "The answer is: Ada\nQ: next" for p in prompts]

    runner = SelfAskRunner(generate_fn=model, answerer=tool({"Who?": "Ada"}), template=LEAST_TO_MOST)
    return {"results": [record(r) for r in runner.run_batch(["Who wrote it?"])]}


SCRIPTED = {
    "two_follow_ups": lambda: scripted_run(Recording({QUESTION: TWO_STEPS}), [QUESTION], answerer=tool(FACTS)),
    "few_shot": lambda: scripted_run(Recording({QUESTION: TWO_STEPS}), [QUESTION], answerer=tool(FACTS),
                                     few_shot=FEW_SHOT_SELF_ASK, few_shot_direct=FEW_SHOT_DIRECT),
    "batch_of_two": lambda: scripted_run(
        Recording({QUESTION: TWO_STEPS,
                   "What is the capital of France?": [
                       "Are follow up questions needed here: No.\nSo the final answer is: Paris"]}),
        [QUESTION, "What is the capital of France?"], answerer=tool(FACTS)),
    **{f"model_recursion_depth_{depth}": case_model_recursion(depth) for depth in (0, 1, 2, 3)},
    "never_stops": lambda: scripted_run(Recording({"Q?": ["and so on " * 1000]}, default_forced="and so on " * 1000),
                                        ["Q?"], answerer=tool({}), max_new_tokens=20, max_total_tokens=50,
                                        final_answer_tokens=10),
    "silent": lambda: scripted_run(Recording({"Q?": [""]}, default_forced=""), ["Q?"], answerer=tool({})),
    "too_many_follow_ups": lambda: scripted_run(
        Recording({"Q?": [lambda step: YES * (step == 0) + f"Follow up: sub question {step}?\nIntermediate answer:"]}),
        ["Q?"], answerer=tool({}), max_follow_ups=3),
    "token_budget": lambda: scripted_run(
        Recording({"Q?": [lambda step: YES * (step == 0) + f"Follow up: sub question {step} " + "very " * 10
                          + "long?\nIntermediate answer:"]}),
        ["Q?"], answerer=tool({}), max_follow_ups=100, max_total_tokens=60, final_answer_tokens=5),
    **{f"malformed_{name}": case_malformed(second) for name, second in MALFORMED.items()},
    "repeat_as_first_follow_up": lambda: scripted_run(
        Recording({QUESTION: [f"{YES}Follow up: {QUESTION}\nIntermediate answer:"]}), [QUESTION],
        answerer=tool(FACTS), retry_repeats=False),
    "retry_with_a_banned_word": case_retry,
    "callable_tool": lambda: scripted_run(Recording({QUESTION: TWO_STEPS}), [QUESTION],
                                          answerer=lambda q: f"  answer\nto {q}  "),
    "chain_depth_2": lambda: scripted_run(chain(), [ROOT], answerer=ToolAnswerer(LEAF_FACTS.get), max_depth=2),
    "chain_depth_1": lambda: scripted_run(chain(), [ROOT], answerer=ToolAnswerer(LEAF_FACTS.get), max_depth=1),
    "chain_depth_0": lambda: scripted_run(chain(), [ROOT], answerer=ToolAnswerer(LEAF_FACTS.get), max_depth=0),
    "chain_no_recursion": lambda: scripted_run(chain(), [ROOT], answerer=ToolAnswerer(LEAF_FACTS.get), max_depth=2,
                                               recurse=False),
    "chain_layers": lambda: scripted_run(chain(), [ROOT], answerer=[None, ToolAnswerer(LEAF_FACTS.get)],
                                         max_depth=3),
    **{f"operator_ends_{ends}": case_operator(ends) for ends in (True, False)},
    "in_flight": lambda: scripted_run(
        Recording({QUESTION: TWO_STEPS, **{q: ["Are follow up questions needed here: No.\nSo the final answer is: A\n"]
                                           for q in ("Q2?", "Q3?", "Q4?", "Q5?")}}),
        [QUESTION, "Q2?", "Q3?", "Q4?", "Q5?"], answerer=tool(FACTS), batch_size=2),
    "deeper_questions_in_flight": lambda: scripted_run(
        Recording({
            "Q deep?": [f"{YES}Follow up: Q sub?\nIntermediate answer:", "So the final answer is: D\n"],
            "Q sub?": [f"{YES}Follow up: Q leaf?\nIntermediate answer:", "So the final answer is: S\n"],
            "Q quick?": [f"{YES}Follow up: Q known?\nIntermediate answer:",
                         "Follow up: Q known again?\nIntermediate answer:",
                         "Follow up: Q known thrice?\nIntermediate answer:", "So the final answer is: K\n"]},
            forced={"Q leaf?": " L\n"}),
        ["Q deep?", "Q quick?"], answerer=ToolAnswerer({"Q known?": "k1", "Q known again?": "k2",
                                                       "Q known thrice?": "k3"}.get), max_depth=2, batch_size=3),
    "continuations": case_continuations,
    "least_to_most": case_least_to_most,
}


@pytest.fixture(scope="module")
def golden():
    if RECORD:
        recorded: dict = {}
        yield recorded
        GOLDEN.write_text(json.dumps(recorded, indent=1, ensure_ascii=False, sort_keys=True) + "\n")
    else:
        yield json.loads(GOLDEN.read_text())


def check(golden, name: str, outcome) -> None:
    outcome = json.loads(json.dumps(outcome))  # as stored: tuples become lists
    if RECORD:
        golden[name] = outcome
        return
    assert name in golden, f"no golden record for {name}: record with SELFASK_GOLDEN_RECORD=1"
    expected = golden[name]
    if outcome != expected:
        got, want = (json.dumps(o, indent=1, ensure_ascii=False, sort_keys=True).splitlines()
                     for o in (outcome, expected))
        line = next((k for k, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
        pytest.fail(f"{name} differs from its golden record at line {line + 1}:\n"
                    f"  golden: {want[line] if line < len(want) else '<end>'}\n"
                    f"  now:    {got[line] if line < len(got) else '<end>'}", pytrace=False)


@pytest.mark.parametrize("name", sorted(SCRIPTED))
def test_scripted_transcripts_are_the_golden_ones(golden, name):
    check(golden, name, SCRIPTED[name]())


def test_tokens_counted_with_a_tokenizer_are_the_golden_ones(golden, tiny_smollm):
    tokenizer = AutoTokenizer.from_pretrained(tiny_smollm)
    model = Recording({QUESTION: TWO_STEPS}, forced={"Q?": " Zoë Saldaña 🇮🇹\nmore"})
    runner = SelfAskRunner(tokenizer=tokenizer, generate_fn=model, answerer=tool(FACTS), max_depth=1)
    results = runner.run_batch([QUESTION]) + runner.answer_directly(["Q?"])
    check(golden, "tokenizer_counts", {"results": [record(r) for r in results], "calls": model.calls,
                                       "complete": [continuation(c) for c in
                                                    runner.complete([f"Question: Q?\n{FINAL}"])]})


# --- a tiny random Llama with SmolLM2's tokenizer --------------------------------------------------------------------

QUESTIONS = ["Who was the father of the author of Dune?", "Where was Rumi born?", "Capital of the country of X?",
             "Which is older, the Eiffel Tower or the Statue of Liberty?", QUESTION]


@pytest.fixture(scope="module")
def tiny(tiny_smollm):
    """`tiny_smollm` with its matrices drawn again with a larger spread (seeded), so that what it writes depends on
    every token it reads (at its own initialisation it writes one token over and over)."""
    model = LlamaForCausalLM.from_pretrained(tiny_smollm).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0, 0.3, generator=generator)
    return model, AutoTokenizer.from_pretrained(tiny_smollm)


CONFIGS = [(reuse, depth, few_shot) for reuse in (False, True) for depth in (0, 1, 2) for few_shot in (False, True)]


def config_name(reuse: bool, depth: int, few_shot: bool) -> str:
    return f"{'reuse' if reuse else 'no_reuse'}-depth_{depth}-{'few_shot' if few_shot else 'zero_shot'}"


def run_config(model, tokenizer, reuse, depth, few_shot, answerer=None, questions=QUESTIONS, **kwargs) -> dict:
    runner = SelfAskRunner(model, tokenizer, answerer=answerer, max_depth=depth, reuse_kv_cache=reuse,
                           few_shot=FEW_SHOT_SELF_ASK if few_shot else "",
                           few_shot_direct=FEW_SHOT_DIRECT if few_shot else "", **kwargs)
    results = runner.run_batch(questions) + runner.answer_directly(questions[:2])
    prompts = [(FEW_SHOT_DIRECT if few_shot else "") + f"Question: {q}\n{FINAL}" for q in questions[:3]]
    return {"results": [record(r) for r in results],
            "complete": [continuation(c) for c in runner.complete(prompts, max_new_tokens=6)]}


@pytest.mark.parametrize("reuse, depth, few_shot", CONFIGS, ids=[config_name(*c) for c in CONFIGS])
def test_random_llama_transcripts_are_the_golden_ones(golden, tiny, reuse, depth, few_shot):
    model, tokenizer = tiny
    check(golden, f"random-{config_name(reuse, depth, few_shot)}",
          run_config(model, tokenizer, reuse, depth, few_shot, max_new_tokens=10, max_total_tokens=40,
                     final_answer_tokens=6, batch_size=2))


# --- the same network, spelling a script -----------------------------------------------------------------------------

# question: (its follow-ups, each a list of wordings tried in turn when a word is banned; its final answer)
PLANS = {
    QUESTION: ([["Who is Queen Hyojeong married to?"], ["Who is the father of King Heonjong of Joseon?"]],
               " Crown Prince Hyomyeong\n\nQuestion: next example"),
    "Where was the composer of Tosca born?": ([["Who composed Tosca?"], ["Where was Giacomo Puccini born?"]],
                                              " Lucca, Tuscany 🇮🇹"),
    "Who composed Tosca?": ([["When was Tosca written?"]], " Giacomo Puccini\n"),
    "When was Tosca written?": ([], " 1900 (Zoë Saldaña: Question: none)\nmore"),
    "Who wrote the song?": ([["Who wrote the song?", "To whom is the song credited?"]], " Ada Lovelace\n"),
    "Why is the sky blue?": (None, ""),  # babbles past every budget
    "What is the capital of France?": ([], " Paris\n"),
    "Which river flows through Vienna?": ([["\nQuestion: Is it the Danube?"]], " the Danube\n"),
    "Who painted the Mona Lisa?": ([["Who painted it?"]], " Leonardo da Vinci — “Mona Lisa” ✓"),
}
FORCED = {"Who composed Tosca?": " Puccini (asked directly)\n", "Why is the sky blue?": " Rayleigh scattering\n",
          "Which river flows through Vienna?": " Donau, Österreich\n"}
SPELLING_FACTS = {"Who is Queen Hyojeong married to?": "King Heonjong of Joseon",
                  "Who is the father of King Heonjong of Joseon?": "Crown Prince Hyomyeong",
                  "Where was Giacomo Puccini born?": "Lucca", "To whom is the song credited?": "Ada Lovelace",
                  "Who painted it?": "Leonardo 🎨"}


def next_texts(episode: str) -> list[str]:
    """What the script writes in the step that `episode` (from its ``Question: `` line to its last intermediate
    answer) is at: the step's text, in the wordings to try in turn, then the forced answer's."""
    question = episode.split("\n", 1)[0].removeprefix("Question: ")
    follow_ups, final = PLANS.get(question, ([], ""))
    answered = len(re.findall(r"\nIntermediate answer:[^\n]*\n", episode))
    forced = [NO + FINAL + FORCED.get(question, " no idea\n"), FINAL + FORCED.get(question, " no idea\n")]
    if follow_ups is None:
        asked = ["lorem ipsum dolor sit amet " * 20]
    elif answered < len(follow_ups):
        decision = "" if answered else "Are follow up questions needed here: Yes.\n"
        asked = [f"{decision}Follow up: {q}\nIntermediate answer: junk" for q in follow_ups[answered]]
    else:
        asked = [("" if answered else NO) + FINAL + final]
    return asked + forced


class SpellScript(LogitsProcessor):
    """Puts all the weight of each row's next token on the script's next token (EOS when the script has nothing
    more to write): a row starts spelling the first of `next_texts` that goes on from what its episode holds and
    whose next token is not banned, and spells its tokens to the end."""

    def __init__(self, tokenizer, spelled: dict):
        self.tokenizer, self.spelled = tokenizer, spelled

    def __call__(self, input_ids, scores):
        eos = self.tokenizer.eos_token_id
        for row, ids in enumerate(input_ids.tolist()):
            key = tuple(t for t in ids if t != eos)
            rest = self.spelled.get(key)
            if rest is None or (rest and scores[row, rest[0]] == -float("inf")):
                text = self.tokenizer.decode(list(key), skip_special_tokens=True)
                episode = text[text.rfind("Question: "):]
                answered = list(re.finditer(r"\nIntermediate answer:[^\n]*\n", episode))
                start = answered[-1].end() if answered else episode.find("\n") + 1
                episode, written = episode[:start], episode[start:]
                rest = []
                for option in next_texts(episode):
                    if option.startswith(written) and len(option) > len(written):
                        tokens = self.tokenizer(option[len(written):], add_special_tokens=False)["input_ids"]
                        if scores[row, tokens[0]] > -float("inf"):
                            rest = tokens
                            break
            token = rest[0] if rest else eos
            self.spelled[key + (token,)] = rest[1:]
            scores[row] = -float("inf")
            scores[row, token] = 0
        return scores


class Spelling(LlamaForCausalLM):
    """The tiny Llama (its forward passes, caches and attention untouched) with `SpellScript` last among the
    logits processors of every `generate` call."""

    def generate(self, *args, logits_processor=None, **kwargs):
        spell = SpellScript(self.spelling_tokenizer, self.spelled)
        processors = LogitsProcessorList([*(logits_processor or []), spell])
        return super().generate(*args, logits_processor=processors, **kwargs)


@pytest.fixture(scope="module")
def spelling_model(tiny_smollm):
    model = Spelling.from_pretrained(tiny_smollm).eval()
    model.spelling_tokenizer = AutoTokenizer.from_pretrained(tiny_smollm)
    return model


@pytest.fixture
def spelling(spelling_model):
    spelling_model.spelled = {}  # what each row has left to spell, by its tokens so far: one script per test
    return spelling_model, spelling_model.spelling_tokenizer


@pytest.mark.parametrize("reuse, depth, few_shot", CONFIGS, ids=[config_name(*c) for c in CONFIGS])
def test_spelled_transcripts_are_the_golden_ones(golden, spelling, reuse, depth, few_shot):
    model, tokenizer = spelling
    outcome = run_config(model, tokenizer, reuse, depth, few_shot, answerer=ToolAnswerer(SPELLING_FACTS.get),
                         questions=list(PLANS), max_new_tokens=40, max_total_tokens=160, final_answer_tokens=12,
                         batch_size=3)
    check(golden, f"spelled-{config_name(reuse, depth, few_shot)}", outcome)
