"""Attention per packed episode ("sdpa_packed"): the same logits and gradients as transformers' block-diagonal mask
and as each episode run alone; the fallback for padded batches; the switch and its restoring; the trainer's use."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import peftprompt
from peftprompt.recursive import SelfAskCollator
from peftprompt.training import train
from peftprompt.training import trainer as trainer_module
from peftprompt.training.packed_attention import (
    PACKED_ATTENTION,
    packed_attention,
    packed_sdpa_attention_forward,
    packed_sequence_kwargs,
    supports_packed_attention,
)

from conftest import (
    TINY_VOCAB,
    CompactIds,
    llm_config,
    make_batch,
    records,
    small_trees,
    tiny_bert_token_cls,
    tiny_llama,
    trainable,
)

EPISODES = [[5, 7, 3], [6, 8, 2]]  # per row: episode lengths; each row is then padded to 16 (positions from 0)


def packed_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Two packed rows of 16 positions: episodes of `EPISODES` then padding, positions restarting at 0 for each."""
    generator = torch.Generator().manual_seed(seed)
    positions = [sum((list(range(n)) for n in row + [16 - sum(row)]), []) for row in EPISODES]
    input_ids = torch.randint(5, TINY_VOCAB, (2, 16), generator=generator)
    labels = input_ids.clone()
    labels[torch.tensor(positions) == 0] = -100  # no episode learns its first token from the one before
    return {"input_ids": input_ids, "position_ids": torch.tensor(positions), "labels": labels}


def logits_and_grads(model, batch: dict, **kwargs) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad()
    output = model(**batch, use_cache=False, **kwargs)
    output.loss.backward()
    return output.logits.detach(), [p.grad.clone() for p in model.parameters()]


def test_sequence_kwargs_count_boundaries_over_the_flattened_batch():
    kwargs = packed_sequence_kwargs(torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]]))
    assert kwargs["cu_seq_lens_q"].tolist() == [0, 3, 5, 6, 10, 12]
    assert kwargs["cu_seq_lens_q"].dtype == torch.int32 and kwargs["cu_seq_lens_k"] is kwargs["cu_seq_lens_q"]
    assert kwargs["max_length_q"] == kwargs["max_length_k"] == 4
    # a jump that is not +1 also starts a sequence (transformers' rule), a row start always does
    assert packed_sequence_kwargs(torch.tensor([[3, 4, 9, 10]]))["cu_seq_lens_q"].tolist() == [0, 2, 4]


def test_per_episode_attention_equals_the_block_diagonal_mask_and_each_episode_alone():
    model = tiny_llama().train()  # grouped-query attention: 4 heads over 2 key/value heads
    batch = packed_batch()
    masked_logits, masked_grads = logits_and_grads(model, batch)  # "sdpa" with transformers' block-diagonal mask
    with packed_attention(model) as used:
        assert used and model.config._attn_implementation == PACKED_ATTENTION
        logits, grads = logits_and_grads(model, batch, **packed_sequence_kwargs(batch["position_ids"]))
    assert torch.allclose(logits, masked_logits, atol=1e-5)
    assert all(torch.allclose(g, m, atol=1e-5) for g, m in zip(grads, masked_grads))
    # and each episode run alone, at its place in the row
    start = 0
    for length in EPISODES[1]:
        alone = model(input_ids=batch["input_ids"][1:, start:start + length], use_cache=False).logits
        assert torch.allclose(logits[1:, start:start + length], alone, atol=1e-5)
        start += length
    # the mask does matter: attention over the whole row gives other logits after the first episode
    whole_row = model(input_ids=batch["input_ids"], use_cache=False).logits
    assert not torch.allclose(whole_row[:, 5:], logits[:, 5:], atol=1e-3)


def test_without_boundaries_it_is_sdpa_and_generation_is_unchanged():
    model = tiny_llama()
    batch = make_batch("causal_lm")  # padded, with an attention mask
    prompt = batch["input_ids"][:1, :6]
    with torch.no_grad():
        expected = model(**batch).logits
        expected_tokens = model.generate(prompt, max_new_tokens=5, do_sample=False)
        with packed_attention(model):
            assert torch.equal(model(**batch).logits, expected)
            assert torch.equal(model.generate(prompt, max_new_tokens=5, do_sample=False), expected_tokens)


def test_attention_that_is_not_causal_is_left_to_sdpa():
    model = tiny_llama()
    module = model.model.layers[0].self_attn
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, 6, 8, generator=generator) for heads in (4, 2, 2))
    boundaries = packed_sequence_kwargs(torch.tensor([[0, 1, 2, 0, 1, 2]]))
    bidirectional, _ = packed_sdpa_attention_forward(module, q, k, v, None, is_causal=False, **boundaries)
    expected, _ = sdpa_attention_forward(module, q, k, v, None, is_causal=False)
    assert torch.equal(bidirectional, expected)  # the whole row, both ways: boundaries are not applied
    per_episode, _ = packed_sdpa_attention_forward(module, q, k, v, None, **boundaries)
    assert not torch.allclose(per_episode, expected)


def test_boundaries_must_cover_the_batch():
    model = tiny_llama()
    batch = packed_batch()
    wrong = packed_sequence_kwargs(batch["position_ids"][:1])  # boundaries of one row for a batch of two
    with packed_attention(model), pytest.raises(ValueError, match="ends at 16, but the batch holds 2 x 16 positions"):
        model(**batch, use_cache=False, **wrong)


def test_switch_is_restored_and_skips_what_it_cannot_serve():
    model = peftprompt.attach(tiny_llama(), "lora", task="causal_lm", target_modules=["q_proj", "v_proj"])
    with packed_attention(model) as used:
        assert used and model.get_base_model().config._attn_implementation == PACKED_ATTENTION
    assert model.get_base_model().config._attn_implementation == "sdpa"
    with pytest.raises(RuntimeError, match="boom"), packed_attention(model):
        raise RuntimeError("boom")
    assert model.get_base_model().config._attn_implementation == "sdpa"

    eager = tiny_llama()
    eager.set_attn_implementation("eager")
    windowed = MistralForCausalLM(MistralConfig(vocab_size=TINY_VOCAB, hidden_size=32, intermediate_size=64,
                                                num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                                sliding_window=8))
    assert supports_packed_attention(tiny_llama())
    for model in (eager, windowed, tiny_bert_token_cls(5)):
        assert not supports_packed_attention(model)
        with packed_attention(model) as used:
            assert not used


@pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers`")
def test_trainer_trains_the_same_with_attention_per_episode(tmp_path, smollm2_tokenizer, monkeypatch):
    collator = CompactIds(SelfAskCollator(smollm2_tokenizer, max_length=256, packing=True), small_trees())

    def run(name: str) -> tuple[dict, object]:
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=len(collator.ids), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
        model = peftprompt.attach(LlamaForCausalLM(config), "lora", task="causal_lm",
                                  target_modules=["q_proj", "v_proj"])
        result = train(llm_config(tmp_path, name, learning_rate=3e-2, per_device_train_batch_size=2, max_steps=4),
                       model, smollm2_tokenizer, small_trees() * 2, collator)
        assert model.get_base_model().config._attn_implementation == "sdpa"  # restored after training
        return trainable(model), result

    per_episode, result = run("per_episode")
    assert records(result, "start")[0]["attention_per_packed_episode"] is True

    @contextmanager
    def not_switched(model):
        yield False

    monkeypatch.setattr(trainer_module, "packed_attention", not_switched)
    masked, result = run("masked")
    assert records(result, "start")[0]["attention_per_packed_episode"] is False
    assert max((per_episode[k] - masked[k]).abs().max().item() for k in masked) < 1e-5
