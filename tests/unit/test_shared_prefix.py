"""A few-shot prefix held once for a whole generation batch: attending to it gives the logits of encoding every
prompt whole (grouped-query heads, padding after the prefix, rows cached to different depths, a decoding step),
and the transformers backend uses it only where every prompt of a batch starts with the same prefix."""

from __future__ import annotations

import pytest
import torch

from peftprompt.selfask import (
    END_OF_LINE,
    FEW_SHOT_DIRECT,
    FEW_SHOT_SELF_ASK,
    GenerationRequest,
    SelfAskRunner,
    TransformersBackend,
)
from peftprompt.selfask.kv_cache import batched, encode, split
from peftprompt.selfask.shared_prefix import (
    SHARED_PREFIX_ATTENTION,
    shared_prefix_attention,
    shared_prefix_attention_forward,
    supports_shared_prefix,
)

from conftest import tiny_llama

PREFIX = [5, 9, 14, 22, 31, 40]


def whole_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


def run_shared(model, prompts, caches, prefix):
    """The runner's layout: the prefix's columns, each row's padding, its own tokens; feeds what no cache holds."""
    skip, lengths = len(prefix.ids), [len(p) for p in prompts]
    width = max(lengths)
    fed = max(n - (c.reusable(p) if c else skip) for n, c, p in zip(lengths, caches, prompts))
    pads = [width - n for n in lengths]
    input_ids = torch.tensor([p[:skip] + [0] * pad + p[skip:] for p, pad in zip(prompts, pads)])
    mask = torch.tensor([[1] * skip + [0] * pad + [1] * (n - skip) for pad, n in zip(pads, lengths)])
    past = batched([c or prefix for c in caches], lengths, fed, model.config, shared=prefix)
    assert past.get_seq_length() == width - fed  # the prefix counts, though the layers do not hold it
    assert past.layers[0].keys is None or past.layers[0].keys.shape[2] == width - fed - skip
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad(), shared_prefix_attention(model, prefix):
        out = model(input_ids=input_ids[:, -fed:], attention_mask=mask, past_key_values=past,
                    position_ids=positions[:, -fed:], use_cache=True)
    return out, fed, pads, mask, positions


def test_shared_prefix_batch_gives_the_logits_of_whole_prompts_and_decodes_on():
    model = tiny_llama()
    prefix = encode(model, PREFIX)
    prompts = [PREFIX + [50, 51, 52, 53, 54], PREFIX + [60, 61], PREFIX + [70, 71, 72, 73, 74, 75, 76]]
    caches = [encode(model, prompts[0][:9]), None, split(*_shared_cache_of(model, prefix, prompts[2][:8]))[0]]
    out, fed, pads, mask, positions = run_shared(model, prompts, caches, prefix)
    assert fed == 5  # row 2 feeds 5 of its 13 tokens; row 1 its 2 own tokens and 3 of its padding
    for row, ids in enumerate(prompts):
        n = min(fed, len(ids) - len(PREFIX))
        torch.testing.assert_close(out.logits[row, -n:], whole_logits(model, ids)[-n:], atol=1e-5, rtol=1e-5)
    # one decoding step from the same cache, and each row's cache split off: the prompt's tokens, prefix shared
    step = torch.tensor([[90], [91], [92]])
    mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], dim=1)
    with torch.no_grad(), shared_prefix_attention(model, prefix):
        nxt = model(input_ids=step, attention_mask=mask, past_key_values=out.past_key_values,
                    position_ids=positions[:, -1:] + 1, use_cache=True)
    grown = [ids + [90 + row] for row, ids in enumerate(prompts)]
    for row, ids in enumerate(grown):
        torch.testing.assert_close(nxt.logits[row, -1], whole_logits(model, ids)[-1], atol=1e-5, rtol=1e-5)
    rows = split(nxt.past_key_values, pads, grown, [len(ids) for ids in grown], shared=prefix)
    for row, ids in zip(rows, grown):
        assert row.ids == ids and row.prefix is prefix and row.keys[0].shape[1] == len(ids) - len(PREFIX)
        alone = encode(model, ids)
        for layer in range(len(alone.keys)):
            keys, values = row.states(layer, 0, len(ids))
            torch.testing.assert_close(keys, alone.keys[layer], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(values, alone.values[layer], atol=1e-5, rtol=1e-5)


def _shared_cache_of(model, prefix, ids):
    """A one-row shared-prefix run over `ids` (no padding: transformers may pass no mask), for `split`."""
    out, _, pads, _, _ = run_shared(model, [ids], [None], prefix)
    torch.testing.assert_close(out.logits[0, -(len(ids) - len(PREFIX)):],
                               whole_logits(model, ids)[len(PREFIX):], atol=1e-5, rtol=1e-5)
    return out.past_key_values, pads, [ids], [len(ids)], None, prefix


def test_attention_equals_sdpa_over_the_prefix_copied_into_every_row():
    """Direct: grouped-query heads, a boolean mask, an additive mask, and no mask (causal over the own tokens)."""
    model = tiny_llama()
    module = model.model.layers[1].self_attn
    prefix = encode(model, PREFIX)
    torch.manual_seed(0)
    query, key, value = torch.randn(2, 4, 3, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    full_key = torch.cat([prefix.keys[1].expand(2, -1, -1, -1), key], dim=2)
    full_value = torch.cat([prefix.values[1].expand(2, -1, -1, -1), value], dim=2)
    causal = torch.ones(3, 6 + 5, dtype=torch.bool).tril(6 + 5 - 3).expand(2, 1, 3, 11).clone()
    causal[1, :, :, 6:8] = False  # row 1: two padding columns after the prefix
    expected = torch.nn.functional.scaled_dot_product_attention(
        query, full_key.repeat_interleave(2, 1), full_value.repeat_interleave(2, 1), attn_mask=causal
    ).transpose(1, 2)
    additive = torch.zeros(causal.shape).masked_fill(~causal, float("-inf"))
    with shared_prefix_attention(model, prefix):
        for mask in (causal, additive):
            got, _ = shared_prefix_attention_forward(module, query, key, value, mask)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        got, _ = shared_prefix_attention_forward(module, query, key, value, None)
        torch.testing.assert_close(got[0], expected[0], atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="the mask spans 10 keys, but the prefix holds 6 and the cache 5"):
            shared_prefix_attention_forward(module, query, key, value, causal[..., 1:])


def test_outside_the_context_it_is_sdpa_and_the_setting_is_restored():
    model = tiny_llama()
    model.set_attn_implementation("sdpa")
    assert supports_shared_prefix(model)
    query, key = torch.randn(2, 4, 3, 8), torch.randn(2, 2, 3, 8)
    module = model.model.layers[0].self_attn
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    torch.testing.assert_close(shared_prefix_attention_forward(module, query, key, key, None)[0],
                               sdpa_attention_forward(module, query, key, key, None)[0])
    with pytest.raises(RuntimeError, match="boom"), shared_prefix_attention(model, encode(model, PREFIX)):
        assert model.config._attn_implementation == SHARED_PREFIX_ATTENTION
        raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"
    model.set_attn_implementation("eager")
    assert not supports_shared_prefix(model)


def test_runner_shares_the_prefix_per_group_and_answers_the_same(tiny_smollm, monkeypatch):
    """Few-shot self-ask and direct answers in the same steps (a model follow-up at max_depth is answered directly):
    each few-shot prefix's prompts share its cache, and the transcripts equal those of per-row caches."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftprompt.selfask import transformers_backend

    model = AutoModelForCausalLM.from_pretrained(tiny_smollm).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_smollm)
    backend = TransformersBackend(model, tokenizer)
    assert backend.share_prefix

    def requests(*prompts):
        return [GenerationRequest(p, 1, END_OF_LINE, prefix=p[: p.rindex("Question: ")]) for p in prompts]

    prompts = [FEW_SHOT_SELF_ASK + "Question: Who?\n", FEW_SHOT_SELF_ASK + "Question: Where?\n"]
    encoded = tokenizer(prompts)["input_ids"]
    shared = backend._shared_prefix(requests(*prompts), encoded)
    whole = backend.prefix_cache(FEW_SHOT_SELF_ASK)
    # SmolLM2's tokenizer merges the prefix's closing "\n\n" differently before "Question": all but that token
    assert shared.ids == whole.ids[: len(shared.ids)] and len(whole.ids) - 1 <= len(shared.ids)
    assert all(ids[: len(shared.ids)] == shared.ids for ids in encoded)
    mixed = [prompts[0], FEW_SHOT_DIRECT + "Question: Who?\n"]
    assert backend._shared_prefix(requests(*mixed), tokenizer(mixed)["input_ids"]) is None

    entered = []
    real = transformers_backend.shared_prefix_attention

    def counting(model, prefix):
        entered.append(len(prefix.ids))
        return real(model, prefix)

    monkeypatch.setattr(transformers_backend, "shared_prefix_attention", counting)
    questions = ["Who was the father of the author of Dune?", "Where was Rumi born?", "Capital of the country of X?"]
    outcomes = []
    for share in (True, False):
        runner = SelfAskRunner(model, tokenizer, answerer=None, few_shot=FEW_SHOT_SELF_ASK,
                               few_shot_direct=FEW_SHOT_DIRECT, max_new_tokens=12, max_depth=1, batch_size=2)
        runner.backend.share_prefix = share
        entered.clear()
        results = runner.run_batch(questions) + runner.answer_directly(questions)
        outcomes.append([(r.text, r.answer, r.generated_tokens, r.issues) for r in results])
        assert bool(entered) is share
    assert outcomes[0] == outcomes[1]
    without_reuse = SelfAskRunner(model, tokenizer, few_shot=FEW_SHOT_SELF_ASK, reuse_kv_cache=False)
    assert without_reuse.backend.share_prefix is False
