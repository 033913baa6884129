"""GGUF LoRA export (`peftprompt.gguf_export`): the file llama.cpp reads, its names, shapes, alpha and the rotary
row order of the query and key projections; what cannot be exported is refused with the reason."""

import math

import pytest
import torch

import peftprompt
from peftprompt.errors import InputError
from peftprompt.gguf_export import export_lora_gguf, read_lora_gguf, rotary_permute

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
    for argv, says in ((["--gguf", str(out), "--merge"], "it takes no --merge"),
                       (["--gguf", str(out), "--out", str(tmp_path / "dir")], "one of the two"),
                       ([], "one of the two")):
        assert main(["export", "--adapter", str(adapter), *argv]) != 0
        assert says in capsys.readouterr().err
