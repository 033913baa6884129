"""Prompt KV caches kept across self-ask steps: a batched cache of rows with different cached lengths gives the
logits of encoding every prompt whole, and the runner answers the same with and without reusing caches."""

from __future__ import annotations

import functools

import torch

from peftprompt.selfask import FEW_SHOT_DIRECT, FEW_SHOT_SELF_ASK, SelfAskRunner
from peftprompt.selfask.kv_cache import GrowingLayer, PromptCache, batched, encode, split, supports_reuse

from conftest import tiny_llama


def full_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


def test_prompt_cache_reusable_is_the_common_prefix_leaving_one_token():
    cache = PromptCache(ids=[5, 6, 7, 8], keys=[], values=[])
    assert cache.reusable([5, 6, 9, 8, 1]) == 2
    assert cache.reusable([5, 6, 7, 8, 1]) == 4
    assert cache.reusable([5, 6, 7, 8]) == 3  # one token is always left to feed
    assert cache.reusable([9]) == 0


def test_growing_layer_appends_in_place_and_equals_concatenation():
    """Updates within the spare room write into the same buffer (no copy of the held tokens) and return what
    concatenation returns; past the room it grows; after a crop or a batch selection it appends to the rows kept."""
    torch.manual_seed(0)
    steps = [torch.randn(2, 3, n, 4) for n in (5, 1, 1, 1)]
    layer = GrowingLayer(spare=2)
    pointers = []
    for k in range(len(steps)):
        keys, values = layer.update(steps[k], -steps[k])
        torch.testing.assert_close(keys, torch.cat(steps[: k + 1], dim=-2), rtol=0, atol=0)
        torch.testing.assert_close(values, -keys, rtol=0, atol=0)
        pointers.append(keys.data_ptr())
    assert pointers[0] == pointers[1] == pointers[2]  # room for 5 + 2
    assert pointers[3] != pointers[2] and layer.get_seq_length() == 8  # the 8th token grew the buffers
    layer.crop(-3)
    keys, _ = layer.update(steps[1], -steps[1])
    torch.testing.assert_close(keys, torch.cat([steps[0], steps[1]], dim=-2), rtol=0, atol=0)
    layer.batch_select_indices(torch.tensor([1]))
    keys, _ = layer.update(steps[2][1:], -steps[2][1:])
    torch.testing.assert_close(keys, torch.cat([steps[0][1:], steps[1][1:], steps[2][1:]], dim=-2), rtol=0, atol=0)


def test_batched_cache_gives_the_logits_of_whole_prompts():
    """Three left-padded rows, cached to different depths (one not at all), continue from one batched cache: the
    logits of the fed positions equal those of each prompt encoded whole, and the split caches equal encoding
    the rows' tokens alone."""
    model = tiny_llama()
    prompts = [[3, 17, 29, 41, 52, 60, 71, 80, 90], [4, 18, 30, 42, 53], [7, 9, 11, 13, 15, 19, 23]]
    caches = [encode(model, prompts[0][:6]), None, encode(model, prompts[2][:2])]
    lengths = [len(p) for p in prompts]
    width = max(lengths)
    fed = max(n - (c.reusable(p) if c else 0) for n, c, p in zip(lengths, caches, prompts))
    assert fed == 5  # row 1 feeds all its 5 tokens; row 0 recomputes 1 cached token, row 2 feeds 5 of its 7
    pads = [width - n for n in lengths]
    input_ids = torch.tensor([[0] * p + ids for p, ids in zip(pads, prompts)])
    mask = torch.tensor([[0] * p + [1] * n for p, n in zip(pads, lengths)])
    past = batched(caches, lengths, fed, model.config)
    assert past.get_seq_length() == width - fed
    assert all(isinstance(layer, GrowingLayer) for layer in past.layers)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(input_ids=input_ids[:, -fed:], attention_mask=mask, past_key_values=past,
                    position_ids=positions[:, -fed:], use_cache=True)
    for row, ids in enumerate(prompts):
        whole = full_logits(model, ids)
        n = min(fed, len(ids))
        torch.testing.assert_close(out.logits[row, -n:], whole[-n:], atol=1e-5, rtol=1e-5)
    rows = split(out.past_key_values, pads, prompts, lengths)
    for row, ids in zip(rows, prompts):
        alone = encode(model, ids)
        assert row.ids == ids
        for mine, theirs in zip(row.keys + row.values, alone.keys + alone.values):
            torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)


def test_no_reuse_under_prompt_learning(tiny_smollm):
    from peft import PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_smollm)
    assert supports_reuse(model)
    prompted = get_peft_model(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    assert not supports_reuse(prompted)
    from transformers import AutoTokenizer

    runner = SelfAskRunner(prompted, AutoTokenizer.from_pretrained(tiny_smollm))
    assert not runner.backend.reuse_kv_cache


def test_runner_answers_the_same_with_and_without_reused_caches(tiny_smollm):
    """Few-shot self-ask and direct answers on a tiny random Llama: the same transcripts either way, while reusing
    caches feeds the model far fewer prompt tokens (the few-shot prefix is encoded once)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_smollm).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_smollm)
    fed = []
    forward = model.forward

    @functools.wraps(forward)  # keeps the signature generate reads (position_ids)
    def counting(*args, **kwargs):
        fed.append(kwargs["input_ids"].numel())
        return forward(*args, **kwargs)

    model.forward = counting
    questions = ["Who was the father of the author of Dune?", "Where was Rumi born?", "Capital of the country of X?"]
    outcomes = {}
    for reuse in (False, True):
        fed.clear()
        runner = SelfAskRunner(model, tokenizer, answerer=lambda q: "Paris", few_shot=FEW_SHOT_SELF_ASK,
                               few_shot_direct=FEW_SHOT_DIRECT, max_new_tokens=12, batch_size=2,
                               reuse_kv_cache=reuse)
        assert runner.backend.reuse_kv_cache is reuse
        results = runner.run_batch(questions) + runner.answer_directly(questions)
        outcomes[reuse] = ([(r.text, r.answer, r.generated_tokens, r.issues) for r in results], sum(fed))
    assert outcomes[True][0] == outcomes[False][0]
    assert outcomes[True][1] < outcomes[False][1] / 2
