"""Embedded backbones: real MiniLM and SmolLM2 from their PyPI packages, heads, cache, quantisation, errors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from peftprompt import attach, backbones, load_backbone

from conftest import make_batch


def test_minilm_heads_sit_on_the_real_pretrained_encoder():
    packaged = load_file(backbones.minilm_path() / "model.safetensors")
    key = next(k for k in packaged if k.endswith("encoder.layer.0.attention.self.query.weight"))
    for task, head, labels in [("seq_cls", "classifier", 3), ("token_cls", "classifier", 9), ("feature", None, None)]:
        model, tokenizer = load_backbone("minilm", task=task, num_labels=labels)
        params = dict(model.named_parameters())
        torch.testing.assert_close(params[next(n for n in params if n.endswith(key.split("bert.")[-1]))], packaged[key])
        if head:
            assert model.classifier.out_features == labels
    assert tokenizer("Hello world")["input_ids"] == [101, 7592, 2088, 102]


def test_smollm2_loads_from_the_cached_checkpoint_without_reading_the_gguf(monkeypatch):
    backbones.smollm2_path()  # built once per machine (`make test` runs `peftprompt fetch` first)

    def no_gguf():
        raise AssertionError("the GGUF file was read although a cached checkpoint exists")

    monkeypatch.setattr(backbones, "smollm2_gguf_path", no_gguf)
    model, tokenizer = load_backbone("smollm2-135m", task="causal_lm")
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied, as trained
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert "Paris" in tokenizer.decode(output[0, inputs["input_ids"].shape[1] :])


@pytest.mark.parametrize("bits", [8, 4])
def test_quantised_minilm_trains_lora_one_step_on_the_cpu(bits):
    model, _ = load_backbone("minilm", task="seq_cls", num_labels=2, **{f"load_in_{bits}bit": True})
    quantised = {type(m).__name__ for m in model.modules()}
    assert ("Linear8bitLt" if bits == 8 else "Linear4bit") in quantised
    assert type(model.classifier).__name__ == "Linear"  # the new head stays in full precision
    model = attach(model, "lora")
    lora_b = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = make_batch("seq_cls")
    loss = model.train()(**batch).loss
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    params = dict(model.named_parameters())
    assert all(not torch.equal(params[n], before) for n, before in lora_b.items())
