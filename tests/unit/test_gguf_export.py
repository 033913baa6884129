"""GGUF export (`peftprompt.gguf_export`): a LoRA file as llama.cpp reads it (names, shapes, alpha and the rotary
row order of the query and key projections) and a whole model as a GGUF model file (hyper-parameters, tensor names
and types, the tokenizer metadata copied from SmolLM2's GGUF); what cannot be exported is refused with the reason."""

import math

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import peftprompt
from peftprompt.backbones import smollm2_gguf_path
from peftprompt.errors import InputError
from peftprompt.gguf_export import export_lora_gguf, export_model_gguf, read_lora_gguf, rotary_permute
from peftprompt.gguf_file import read_gguf_header

from conftest import tiny_llama

LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GGUF_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
              "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


def trained_adapter(tmp_path, method="lora", **method_args):
    """A tiny Llama's adapter with non-zero B matrices, saved, and the directory of its base model's config."""
    base = tiny_llama()
    base.config.save_pretrained(tmp_path / "base")
    model = peftprompt.attach(base, method, task="causal_lm", **method_args)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                parameter.normal_(generator=torch.Generator().manual_seed(len(name)))
    return model, peftprompt.save_adapter(model, tmp_path / "adapter"), tmp_path / "base"


def test_export_writes_what_llama_cpp_reads(tmp_path):
    model, adapter, base = trained_adapter(tmp_path, target_modules=LINEAR, r=4, lora_alpha=8)
    out = export_lora_gguf(adapter, tmp_path / "adapter.gguf", base_model=str(base))
    fields, tensors = read_lora_gguf(out)
    assert fields == {"general.type": "adapter", "general.architecture": "llama", "adapter.type": "lora",
                      "adapter.lora.alpha": 8.0}
    assert set(tensors) == {f"blk.{layer}.{GGUF_NAMES[m]}.weight.lora_{ab}"
                            for layer in (0, 1) for m in LINEAR for ab in "ab"}
    config, state = model.config, model.state_dict()
    for layer in (0, 1):
        for module in LINEAR:
            prefix = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            peft_name = f"base_model.model.model.layers.{layer}.{prefix}.{module}"
            a, b = state[f"{peft_name}.lora_A.default.weight"], state[f"{peft_name}.lora_B.default.weight"]
            gguf_a = tensors[f"blk.{layer}.{GGUF_NAMES[module]}.weight.lora_a"]
            gguf_b = tensors[f"blk.{layer}.{GGUF_NAMES[module]}.weight.lora_b"]
            assert gguf_a.shape == a.shape and gguf_b.shape == b.shape  # [r, in] and [out, r]
            assert torch.equal(gguf_a, a)
            heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}.get(module)
            assert torch.equal(gguf_b, rotary_permute(b, heads) if heads else b)
            # the update llama.cpp adds to the (permuted) base row order is the permuted LoRA update
            if heads:
                torch.testing.assert_close(gguf_b @ gguf_a, rotary_permute(b @ a, heads))
                assert not torch.equal(gguf_b, b)


def test_rotary_permute_interleaves_each_heads_halves():
    rows = torch.arange(8.0).unsqueeze(1)  # 2 heads of 4 rows: halves (0, 1 | 2, 3) and (4, 5 | 6, 7)
    assert rotary_permute(rows, 2).squeeze(1).tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_rslora_alpha_keeps_the_scale_and_f16_halves_the_tensors(tmp_path):
    _, adapter, base = trained_adapter(tmp_path, r=4, lora_alpha=8, use_rslora=True)
    fields, tensors = read_lora_gguf(export_lora_gguf(adapter, tmp_path / "a.gguf", base_model=str(base),
                                                      dtype="f16"))
    assert fields["adapter.lora.alpha"] / 4 == pytest.approx(8 / math.sqrt(4))  # llama.cpp scales by alpha / r
    assert {t.dtype for t in tensors.values()} == {torch.float16}


@pytest.mark.parametrize(("method", "method_args", "says"), [
    ("ia3", {}, "llama.cpp applies LoRA adapters only, and this one is ia3: merge it"),
    ("dora", {}, "DoRA's magnitude vectors have no GGUF LoRA form"),
    ("lora", {"rank_pattern": {"q_proj": 2}}, "one rank scale for every module"),
])
def test_what_llama_cpp_cannot_apply_is_refused_with_the_reason(tmp_path, method, method_args, says):
    _, adapter, base = trained_adapter(tmp_path, method, **method_args)
    (tmp_path / "old.gguf").write_bytes(b"previous export")
    with pytest.raises(InputError, match=says) as refused:
        export_lora_gguf(adapter, tmp_path / "old.gguf", base_model=str(base))
    assert "adapter_config.json" in str(refused.value)
    assert (tmp_path / "old.gguf").read_bytes() == b"previous export"  # nothing half-written


def test_an_unknown_tensor_type_is_refused(tmp_path):
    _, adapter, base = trained_adapter(tmp_path)
    with pytest.raises(InputError, match="must be one of f32, f16, got 'q4'"):
        export_lora_gguf(adapter, tmp_path / "a.gguf", base_model=str(base), dtype="q4")


def test_cli_writes_the_gguf_and_refuses_mixed_options(tmp_path, capsys):
    from peftprompt.cli import main

    _, adapter, base = trained_adapter(tmp_path)
    out = tmp_path / "cli.gguf"
    assert main(["export", "--adapter", str(adapter), "--gguf", str(out), "--base-model", str(base)]) == 0
    assert f"--lora {out}" in capsys.readouterr().out and read_lora_gguf(out)[0]["adapter.type"] == "lora"
    for argv, says in ((["--gguf", str(out), "--task", "causal_lm"], "it takes no --task"),
                       (["--gguf", str(out), "--out", str(tmp_path / "dir")], "one of the two"),
                       (["--out", str(tmp_path / "dir"), "--gguf-dtype", "f16"], "only applies with --gguf"),
                       ([], "one of the two")):
        assert main(["export", "--adapter", str(adapter), *argv]) != 0
        assert says in capsys.readouterr().err


# --- A whole model as a GGUF model file ------------------------------------------------------------------------------

def tensor_data(header, name: str) -> np.ndarray:
    """A tensor of a written GGUF model, read from its offset (f32 or f16), in the transformers shape."""
    info = next(t for t in header.tensors if t.name == name)
    dtype = {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16}[info.type]
    data = np.fromfile(header.path, dtype=dtype, count=math.prod(info.shape), offset=header.data_offset + info.offset)
    return data.reshape(tuple(reversed(info.shape)))


def test_a_model_is_written_as_convert_hf_to_gguf_writes_it(tiny_smollm, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_smollm)
    config = model.config
    header = read_gguf_header(export_model_gguf(tiny_smollm, tmp_path / "model.gguf", dtype="f32"))
    values = {key: field.value for key, field in header.fields.items()}
    assert {key: values[key] for key in ("general.architecture", "general.type", "general.file_type")} == {
        "general.architecture": "llama", "general.type": "model", "general.file_type": 0}
    assert {key.removeprefix("llama."): value for key, value in values.items() if key.startswith("llama.")} == {
        "context_length": 2048, "embedding_length": 32, "block_count": 2, "feed_forward_length": 64,
        "attention.head_count": 4, "attention.head_count_kv": 2, "rope.freq_base": 10000.0,
        "attention.layer_norm_rms_epsilon": pytest.approx(config.rms_norm_eps), "vocab_size": 49152,
        "rope.dimension_count": 8}
    shipped = read_gguf_header(smollm2_gguf_path())
    tokenizer_keys = {key for key in shipped.fields if key.startswith("tokenizer.")}
    assert {"tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.pre", "tokenizer.chat_template",
            "tokenizer.ggml.add_bos_token", "tokenizer.ggml.eos_token_id"} <= tokenizer_keys
    assert {key for key in header.fields if key.startswith("tokenizer.")} == tokenizer_keys
    assert all(header.fields[key] == shipped.fields[key] for key in tokenizer_keys)
    per_layer = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up",
                 "ffn_down")
    assert {t.name for t in header.tensors} == {"token_embd.weight", "output_norm.weight"} | {
        f"blk.{layer}.{name}.weight" for layer in (0, 1) for name in per_layer}  # tied: no output.weight
    state = model.state_dict()
    for layer in (0, 1):
        for projection, name, heads in (("q_proj", "attn_q", 4), ("k_proj", "attn_k", 2), ("v_proj", "attn_v", None)):
            ours = state[f"model.layers.{layer}.self_attn.{projection}.weight"]
            expected = rotary_permute(ours, heads) if heads else ours
            assert np.array_equal(tensor_data(header, f"blk.{layer}.{name}.weight"), expected.numpy())
    assert np.array_equal(tensor_data(header, "token_embd.weight"), state["model.embed_tokens.weight"].numpy())


def test_f16_and_q8_0_models_keep_norms_in_f32(tiny_smollm, tmp_path):
    for dtype, matrices, file_type in (("f16", "F16", 1), ("q8_0", "Q8_0", 7)):
        header = read_gguf_header(export_model_gguf(tiny_smollm, tmp_path / f"{dtype}.gguf", dtype=dtype))
        types = {t.name: t.type.name for t in header.tensors}
        assert header.value("general.file_type") == file_type
        assert {types[name] for name in types if "norm" in name} == {"F32"}
        assert {types[name] for name in types if "norm" not in name} == {matrices}


def test_a_model_without_smollm2s_tokenizer_needs_a_gguf_with_its_tokenizer(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "tiny")  # a 128-token vocabulary
    with pytest.raises(InputError, match=r"tokenizer is not the one of .*SmolLM2.*49152 tokens, the model 128.*"
                                         r"--tokenizer-gguf") as refused:
        export_model_gguf(tmp_path / "tiny", tmp_path / "tiny.gguf")
    assert str(tmp_path / "tiny") in str(refused.value) and not (tmp_path / "tiny.gguf").exists()


def test_a_tokenizer_gguf_without_tokenizer_metadata_is_refused_naming_it(tiny_smollm, tmp_path):
    _, adapter, base = trained_adapter(tmp_path)
    lora = export_lora_gguf(adapter, tmp_path / "lora.gguf", base_model=str(base))
    with pytest.raises(InputError, match="holds no tokenizer metadata .*tokenizer.ggml.model, tokenizer.ggml.tokens "
                                         "missing") as refused:
        export_model_gguf(tiny_smollm, tmp_path / "model.gguf", tokenizer_gguf=lora)
    assert str(lora) in str(refused.value)


def test_a_different_tokenizer_of_the_same_size_is_refused(tiny_smollm, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_smollm)
    tokenizer.convert_ids_to_tokens = lambda ids: ["x"] + [None] * (len(ids) - 1)
    with pytest.raises(InputError, match="token 0 is '<\\|endoftext\\|>', the model's 'x'"):
        export_model_gguf(tiny_smollm, tmp_path / "model.gguf", tokenizer=tokenizer)


def test_a_peft_model_or_an_unknown_type_is_refused(tiny_smollm, tmp_path):
    peft_model = peftprompt.attach(AutoModelForCausalLM.from_pretrained(tiny_smollm), "lora")
    with pytest.raises(InputError, match="no plain transformers model: merge the adapter first"):
        export_model_gguf(peft_model, tmp_path / "model.gguf")
    with pytest.raises(InputError, match="must be one of f32, f16, q8_0, got 'q4_0'"):
        export_model_gguf(tiny_smollm, tmp_path / "model.gguf", dtype="q4_0")


def test_cli_writes_a_base_model_and_a_merged_adapter_as_gguf_models(tiny_smollm, tmp_path, capsys):
    from peftprompt.cli import main

    base = tmp_path / "base.gguf"
    assert main(["export", "--base-model", str(tiny_smollm), "--gguf", str(base)]) == 0
    assert f"llama-cli -m {base}" in capsys.readouterr().out
    assert read_gguf_header(base).value("general.file_type") == 1  # f16 by default
    model = peftprompt.attach(AutoModelForCausalLM.from_pretrained(tiny_smollm), "lora", task="causal_lm",
                              init_lora_weights=False)
    adapter = peftprompt.save_adapter(model, tmp_path / "adapter")
    merged = tmp_path / "merged.gguf"
    assert main(["export", "--adapter", str(adapter), "--merge", "--gguf", str(merged), "--gguf-dtype", "f32",
                 "--base-model", str(tiny_smollm)]) == 0
    assert "merged into its base as a GGUF model" in capsys.readouterr().out
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        update = q.lora_B["default"].weight @ q.lora_A["default"].weight * q.scaling["default"]
        expected = rotary_permute(q.base_layer.weight + update, 4)
    torch.testing.assert_close(torch.from_numpy(tensor_data(read_gguf_header(merged), "blk.0.attn_q.weight")),
                               expected)
    for argv, says in ((["--gguf", str(base)], "give one"),
                       (["--base-model", str(tiny_smollm), "--gguf", str(base), "--merge"], "takes no --merge")):
        assert main(["export", *argv]) != 0
        assert says in capsys.readouterr().err
