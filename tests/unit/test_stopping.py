"""Stop rules: where a continuation ends, on the whole text and incrementally (`StopWatch`, and `RowStops` on real
SmolLM2 tokens), the same at every token as decoding everything so far, at a cost per token that does not grow."""

from __future__ import annotations

import random

import torch
from hypothesis import given
from hypothesis import strategies as st
from transformers import AutoTokenizer

from peftprompt.selfask import END_OF_LINE, SelfAskRunner, StopRule
from peftprompt.selfask.transformers_backend import RowStops

from conftest import FINAL

SELF_ASK_STOP = SelfAskRunner(generate_fn=lambda prompts, limits: []).step_stop
RULES = [SELF_ASK_STOP, END_OF_LINE, StopRule(after=("ab", ""), line_after=("b",)),
         StopRule(after=("aXb",), line_after=("X", "aX")), StopRule(), StopRule(line_after=("a\nb",))]
PIECES = ["\n", "a", "b", "X", " ", "Q", FINAL, "\nIntermediate answer:", "\nQuestion:", "Intermediate", "answer:"]


def test_the_self_ask_rule():
    assert SELF_ASK_STOP == StopRule(after=("\nIntermediate answer:", "\nQuestion:"), line_after=(FINAL,))
    assert SELF_ASK_STOP.index("Yes.\nFollow up: Who?\nIntermediate answer: never read") == 41
    assert SELF_ASK_STOP.index(f"{FINAL} Paris") is None  # the line goes on
    assert SELF_ASK_STOP.index(f"{FINAL} Paris\nQuestion: next") == len(FINAL) + 6
    assert SELF_ASK_STOP.index("No.\n\nQuestion: another?") == len("No.\n\nQuestion:")
    # the string that starts first decides: a final answer's line with a marker-like text in it ends at its newline
    assert SELF_ASK_STOP.index(f"{FINAL} Intermediate answer: x\nIntermediate answer:") == len(FINAL) + 23
    assert END_OF_LINE.index(" Paris\nmore") == 6 and END_OF_LINE.index(" Paris") is None


@given(st.sampled_from(RULES), st.lists(st.sampled_from(PIECES).flatmap(
    lambda piece: st.integers(0, len(piece)).map(lambda n: piece[:n])), max_size=10))
def test_watching_pieces_agrees_with_the_whole_text(rule, pieces):
    watch, text = rule.watch(), ""
    for piece in pieces:
        assert watch.peek(piece) == (rule.index(text + piece) is not None)
        text += piece
        assert watch.feed(piece) == (rule.index(text) is not None)
        assert len(watch.tail) <= max([len(mark) - 1 for mark in rule.after + rule.line_after] + [0])
        if watch.stopped:
            break


def first_stop(tokenizer, ids: list[int], rule: StopRule, limit: int) -> int:
    """The tokens a row keeps, by decoding all of them at every token (the check `RowStops` must equal)."""
    for t in range(1, len(ids) + 1):
        if (t >= limit or ids[t - 1] == tokenizer.eos_token_id
                or rule.index(tokenizer.decode(ids[:t], skip_special_tokens=True)) is not None):
            return t
    return len(ids)


def row_stop(tokenizer, ids: list[int], rule: StopRule, limit: int) -> int:
    stops = RowStops(tokenizer, [rule], [limit], width=2)
    for t in range(1, len(ids) + 1):
        stops(torch.tensor([[7, 7] + ids[:t]]), None)
        if stops.stopped_at[0] is not None:
            return stops.stopped_at[0]
    return len(ids)


def test_row_stops_stop_where_decoding_everything_does(tiny_smollm):
    """Random SmolLM2 token sequences built from the markers' tokens, characters split over several tokens (emoji,
    accents), special tokens and any token at all: `RowStops` stops each at the token where the whole decoded text
    first reaches the rule (or the limit, or EOS)."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_smollm)
    pieces = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in
              ["\nIntermediate answer:", f" {FINAL}", "\nQuestion:", "\n", " Zoë", " 🇮🇹", "😀\n", "—“", " x:",
               "Intermediate", " answer:"]]
    pieces += [[token] for token in range(0, 17)] + [[tokenizer.eos_token_id]]
    generator = random.Random(0)
    for _ in range(300):
        ids = []
        while len(ids) < 40:
            ids += generator.choice(pieces) if generator.random() < 0.7 else [generator.randrange(len(tokenizer))]
            if generator.random() < 0.3:  # a multi-byte character cut after any of its tokens
                ids += tokenizer(" 🇮🇹", add_special_tokens=False)["input_ids"][: generator.randrange(1, 4)]
        rule, limit = generator.choice([SELF_ASK_STOP, END_OF_LINE]), generator.randrange(1, 45)
        assert row_stop(tokenizer, ids, rule, limit) == first_stop(tokenizer, ids, rule, limit), (ids, rule, limit)


def test_each_token_costs_the_same_however_long_the_continuation(tiny_smollm):
    """2,000 tokens without a stop: every check decodes two windows of a few tokens (never the whole continuation),
    and the rule is searched in a tail of bounded length."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_smollm)
    windows = []
    decode = tokenizer.decode

    def counting(ids, **kwargs):
        windows.append(len(ids))
        return decode(ids, **kwargs)

    tokenizer.decode = counting
    words = tokenizer(" lorem ipsum Zoë dolor 🇮🇹 sit amet", add_special_tokens=False)["input_ids"]
    stops = RowStops(tokenizer, [SELF_ASK_STOP], [10_000], width=0)
    ids = []
    for t in range(2000):
        ids.append(words[t % len(words)])
        stops(torch.tensor([ids]), None)
    assert stops.stopped_at == [None]
    assert len(windows) == 2 * 2000 and max(windows) <= 6  # a flag emoji takes 4 tokens, with one before it
    assert len(stops.watches[0].tail) < len(FINAL)  # the rule's longest string
