"""The row order `peftprompt.gguf_export` gives a LoRA's query and key updates is the one of the GGUF that
SmolLM2-135M-Instruct ships in: its dequantised tensors equal our checkpoint's, the query and key projections after
`rotary_permute` (and only then), the others as they are."""

import glob

import gguf
import torch
from gguf.quants import dequantize
from safetensors.torch import load_file
from transformers import AutoConfig

from peftprompt.backbones import smollm2_gguf_path, smollm2_path
from peftprompt.gguf_export import rotary_permute


def test_the_shipped_gguf_permutes_query_and_key_rows_as_the_export_does():
    tensors = {t.name: t for t in gguf.GGUFReader(smollm2_gguf_path()).tensors}
    config = AutoConfig.from_pretrained(smollm2_path())
    checkpoint = load_file(glob.glob(str(smollm2_path() / "*.safetensors"))[0])
    heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads, "v_proj": None}
    for layer in (0, config.num_hidden_layers - 1):
        for projection, name in (("q_proj", "attn_q"), ("k_proj", "attn_k"), ("v_proj", "attn_v")):
            stored = tensors[f"blk.{layer}.{name}.weight"]
            gguf_weight = torch.from_numpy(dequantize(stored.data, stored.tensor_type)).reshape(
                [int(n) for n in reversed(stored.shape)])
            ours = checkpoint[f"model.layers.{layer}.self_attn.{projection}.weight"]
            if heads[projection]:
                assert torch.equal(gguf_weight, rotary_permute(ours, heads[projection]))
                assert not torch.equal(gguf_weight, ours)
            else:
                assert torch.equal(gguf_weight, ours)
