"""BitFit as a real PEFT method: registration, what trains, merge, disable, several adapters, save format."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, PeftType, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from safetensors.torch import load_file

from peftprompt import BitFitConfig, BitFitModel, attach, save_adapter
from peftprompt.method_matrix import tiny_batch, tiny_model
from peftprompt.methods.bitfit import BitFitLayer

from conftest import base_model, make_batch, tiny_llama

LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def randomise_deltas(model, seed: int = 0, adapter: str = "default") -> None:
    """Give every bias delta of `adapter` a random value, as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, BitFitLayer) and adapter in module.bitfit_bias:
                delta = module.bitfit_bias[adapter]
                delta.copy_(torch.randn(delta.shape, generator=generator) * 0.1)


def logits(model, task: str) -> torch.Tensor:
    batch = make_batch(task)
    batch.pop("labels")
    with torch.no_grad():
        return model.eval()(**batch).logits


def test_bitfit_is_registered_with_peft():
    assert PeftType.BITFIT in list(PeftType) and PeftType("BITFIT") is PeftType.BITFIT
    assert PEFT_TYPE_TO_CONFIG_MAPPING["BITFIT"] is BitFitConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING["BITFIT"] is BitFitModel
    assert BitFitConfig().peft_type == "BITFIT"


def test_get_peft_model_trains_every_bias_and_the_head(minilm_seq_cls):
    named = dict(minilm_seq_cls.named_parameters())
    bias_elements = sum(p.numel() for n, p in named.items() if n.endswith(".bias") and not n.startswith("classifier"))
    head = sum(p.numel() for n, p in named.items() if n.startswith("classifier"))

    model = get_peft_model(minilm_seq_cls, BitFitConfig(task_type="SEQ_CLS"))

    assert isinstance(model.base_model, BitFitModel)
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == bias_elements + head == 26_882
    layers = [m for m in model.modules() if isinstance(m, BitFitLayer)]
    # 6 layers x (q, k, v, attention out, intermediate, output, 2 LayerNorms) + embeddings LayerNorm + pooler
    assert len(layers) == 6 * 8 + 2
    assert {type(layer.base_layer).__name__ for layer in layers} == {"Linear", "LayerNorm"}


def test_fresh_adapter_leaves_the_output_unchanged(minilm_seq_cls):
    reference = logits(minilm_seq_cls, "seq_cls")
    model = attach(minilm_seq_cls, "bitfit")
    torch.testing.assert_close(logits(model, "seq_cls"), reference, rtol=0, atol=0)


@pytest.mark.parametrize("task", ["seq_cls", "causal_lm"])
def test_disabled_adapter_gives_exactly_the_base_output(task):
    base = base_model(task)
    reference = logits(base, task)
    model = attach(base, "bitfit", task=task)
    randomise_deltas(model)
    assert not torch.allclose(logits(model, task), reference, atol=1e-4)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, task), reference, rtol=0, atol=0)


@pytest.mark.parametrize("task", ["seq_cls", "token_cls", "causal_lm"])
def test_merge_and_unload_matches_the_adapter(task):
    model = attach(base_model(task), "bitfit", task=task)
    randomise_deltas(model)
    expected = logits(model, task)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, BitFitLayer) for m in merged.modules())
    torch.testing.assert_close(logits(merged, task), expected, rtol=0, atol=1e-5)


def test_merge_into_bias_free_llama_projections_creates_and_unmerge_removes_the_bias():
    model = attach(tiny_llama(), "bitfit")
    assert model.peft_config["default"].target_modules == set(LLAMA_PROJECTIONS)
    trainable, _ = model.get_nb_trainable_parameters()
    # per layer, the out_features of q (32), k and v (2 kv heads x 8 = 16 each), o (32), gate and up (64), down (32)
    assert trainable == 2 * (32 + 16 + 16 + 32 + 64 + 64 + 32)
    randomise_deltas(model)
    expected = logits(model, "causal_lm")
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q_proj.base_layer.bias is None
    model.merge_adapter()
    assert q_proj.base_layer.bias is not None
    torch.testing.assert_close(logits(model, "causal_lm"), expected, rtol=0, atol=1e-5)
    model.unmerge_adapter()
    assert q_proj.base_layer.bias is None
    torch.testing.assert_close(logits(model, "causal_lm"), expected, rtol=0, atol=1e-5)


def test_unmerge_restores_the_original_biases(minilm_seq_cls):
    original = {n: p.detach().clone() for n, p in minilm_seq_cls.named_parameters() if n.endswith(".bias")}
    model = attach(minilm_seq_cls, "bitfit")
    randomise_deltas(model)
    model.merge_adapter()
    model.unmerge_adapter()
    restored = {n.replace("base_model.model.", "").replace(".base_layer", ""): p for n, p in model.named_parameters()}
    for name, value in original.items():
        if not name.startswith("classifier"):
            torch.testing.assert_close(restored[name], value, rtol=0, atol=1e-6)


def test_several_named_adapters_switch_save_and_reload(tmp_path):
    model = get_peft_model(base_model("seq_cls"), BitFitConfig(task_type="SEQ_CLS"), adapter_name="first")
    model.add_adapter("second", BitFitConfig(task_type="SEQ_CLS"))
    randomise_deltas(model, seed=1, adapter="first")
    randomise_deltas(model, seed=2, adapter="second")
    model.set_adapter("first")
    first = logits(model, "seq_cls")
    model.set_adapter("second")
    second = logits(model, "seq_cls")
    assert not torch.allclose(first, second, atol=1e-4)

    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(base_model("seq_cls", seed=1), tmp_path / "first", adapter_name="first")
    reloaded.load_adapter(tmp_path / "second", adapter_name="second")
    reloaded.set_adapter("first")
    torch.testing.assert_close(logits(reloaded, "seq_cls"), first, rtol=0, atol=1e-6)
    reloaded.set_adapter("second")
    torch.testing.assert_close(logits(reloaded, "seq_cls"), second, rtol=0, atol=1e-6)


def test_saved_adapter_holds_only_bias_deltas_and_the_head(minilm_seq_cls, tmp_path):
    model = attach(minilm_seq_cls, "bitfit")
    save_adapter(model, tmp_path)
    state = load_file(tmp_path / "adapter_model.safetensors")
    assert all("bitfit_bias" in key or ".classifier." in key for key in state)
    assert sum(t.numel() for t in state.values()) == 26_882
    assert (tmp_path / "adapter_model.safetensors").stat().st_size < 120_000


def test_no_bias_anywhere_asks_for_target_modules(llama):
    with pytest.raises(ValueError, match="BitFit found no nn.Linear, nn.LayerNorm or Conv1D with a bias"):
        get_peft_model(llama, BitFitConfig(task_type="CAUSAL_LM"))


def test_unsupported_layer_type_is_refused(llama):
    with pytest.raises(TypeError, match="BitFit supports nn.Linear, nn.LayerNorm and Conv1D, got LlamaRMSNorm"):
        get_peft_model(llama, BitFitConfig(task_type="CAUSAL_LM", target_modules=["input_layernorm"]))


def test_gpt2_conv1d_biases_get_a_delta_and_merge():
    model = get_peft_model(tiny_model("gpt2"), BitFitConfig(task_type="CAUSAL_LM"))
    adapted = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, BitFitLayer)}
    assert {"c_attn", "c_proj", "c_fc", "ln_1", "ln_2", "ln_f"} <= adapted
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "bitfit_bias" in name:
                parameter.normal_()
        batch = {k: v for k, v in tiny_batch("gpt2").items() if k != "labels"}
        expected = model(**batch).logits
        torch.testing.assert_close(model.merge_and_unload()(**batch).logits, expected, atol=1e-5, rtol=1e-4)
