"""Every library internal of `peftprompt.compat`, checked against the installed releases: a failure names the library
and what it changed, so widening a pin in pyproject.toml starts here."""

import pytest
import torch
from peft import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType
from torch import nn
from transformers import AttentionInterface, AttentionMaskInterface, DynamicLayer, LlamaConfig

from peftprompt import BitFitConfig, compat
from peftprompt.methods.bitfit import BitFitLayer, BitFitModel


def test_peft_type_keeps_the_enum_tables_extend_peft_type_writes():
    for table in ("_member_map_", "_value2member_map_", "_member_names_"):
        assert hasattr(PeftType, table), f"peft: PeftType has no {table}; compat.extend_peft_type writes there"
    bitfit = compat.extend_peft_type("BITFIT")  # already added on import: returned, not added twice
    assert bitfit is PeftType.BITFIT is PeftType("BITFIT") is PeftType["BITFIT"]
    assert list(PeftType).count(bitfit) == 1 and PeftType._member_names_.count("BITFIT") == 1
    assert bitfit == "BITFIT" and isinstance(bitfit, str)  # PeftType is a str enum: configs save it as a string
    assert PEFT_TYPE_TO_CONFIG_MAPPING[bitfit] is BitFitConfig and PEFT_TYPE_TO_TUNER_MAPPING[bitfit] is BitFitModel
    assert BitFitConfig.from_peft_type(peft_type="BITFIT").peft_type is bitfit  # how PEFT rebuilds a saved config


def test_tuner_layer_state_and_device_helper():
    base = nn.Linear(4, 3).to(torch.float64)
    layer = BitFitLayer(base, "first")
    assert isinstance(layer, compat.BaseTunerLayer)
    # BaseTunerLayer reads the state its subclasses set in __init__ (as PEFT's own layers do)
    assert layer.active_adapters == ["first"] and layer.disable_adapters is False, (
        "peft: BaseTunerLayer no longer reads _active_adapter / _disable_adapters")
    layer.bitfit_bias["second"] = nn.Parameter(torch.zeros(3))  # float32, as update_layer makes it
    compat.move_adapter_to_base_device(layer, "second")
    assert layer.bitfit_bias["second"].dtype == torch.float64, "peft: _move_adapter_to_device_of_base_layer changed"
    assert compat.check_adapters_to_merge(layer, ["first"]) == ["first"]
    layer.merged_adapters.append("first")
    with pytest.warns(UserWarning, match="already merged"):
        assert compat.check_adapters_to_merge(layer, ["first"]) == []


def test_base_tuner_and_target_matching():
    assert BitFitModel.__mro__[1] is compat.BaseTuner
    config = BitFitConfig(target_modules=["q_proj"])
    assert compat.check_target_module_exists(config, "model.layers.0.self_attn.q_proj")
    assert not compat.check_target_module_exists(config, "model.layers.0.self_attn.k_proj")


def test_adaption_prompt_models_and_auto_class_tables():
    assert "llama" in compat.ADAPTION_PROMPT_MODELS and "bert" not in compat.ADAPTION_PROMPT_MODELS
    assert compat.auto_class_names("AutoModelForCausalLM")["llama"] == "LlamaForCausalLM"
    assert compat.auto_class_names("AutoModelForCausalLM")["gpt2"] == "GPT2LMHeadModel"
    assert compat.auto_class_names("AutoModelForSequenceClassification")["bert"] == "BertForSequenceClassification"
    assert compat.auto_class_names("AutoModelForTokenClassification")["roberta"] == "RobertaForTokenClassification"
    assert compat.auto_class_names("AutoModel")["bert"] == "BertModel"


def test_length_grouped_sampler():
    lengths = [5, 50, 6, 49, 7, 48, 8, 47]
    sampler = compat.LengthGroupedSampler(batch_size=2, lengths=lengths, generator=torch.Generator().manual_seed(0))
    order = list(sampler)
    assert sorted(order) == list(range(8))
    assert lengths[order[0]] == max(lengths)  # transformers puts the longest batch first (out-of-memory early)


def test_drop_pre_quantization_dtype_leaves_a_plain_config():
    config = LlamaConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2)
    config.quantization_config = {"quant_method": "gguf"}
    config._pre_quantization_dtype = torch.float16
    compat.drop_pre_quantization_dtype(config)
    assert config.quantization_config is None and not hasattr(config, "_pre_quantization_dtype")
    assert "_pre_quantization_dtype" not in config.to_json_string()
    compat.drop_pre_quantization_dtype(config)  # twice is fine


def test_the_public_attention_lookups_and_cache_layer_hooks():
    """Not internals any more, but what the packed / shared-prefix attention and `GrowingLayer` build on."""
    query = key = value = torch.randn(1, 2, 3, 4)
    out, _ = AttentionInterface()["sdpa"](nn.Module(), query, key, value, None, dropout=0.0, scaling=0.5,
                                          is_causal=True)
    assert out.shape == (1, 3, 2, 4)  # [batch, tokens, heads, head_dim]
    assert callable(AttentionMaskInterface()["sdpa"])
    layer = DynamicLayer()
    assert layer.is_initialized is False and layer.get_seq_length() == 0
    for hook in ("lazy_initialization", "update", "batch_select_indices"):
        assert callable(getattr(layer, hook, None)), f"transformers: DynamicLayer has no {hook}"
    layer.update(torch.ones(2, 1, 3, 4), torch.ones(2, 1, 3, 4))
    assert layer.is_initialized and layer.get_seq_length() == 3 and layer.keys.shape == (2, 1, 3, 4)
