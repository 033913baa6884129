"""A saved LoRA adapter as a GGUF LoRA file, which llama.cpp loads beside its base model's GGUF
(``llama-cli -m base.gguf --lora adapter.gguf``).

```py
>>> from peftprompt.gguf_export import export_lora_gguf
>>> export_lora_gguf("outputs/demo_selfask/adapter", "adapter.gguf")  # or: peftprompt export --adapter A --gguf F
```

The file is laid out as llama.cpp's ``convert_lora_to_gguf.py`` writes one: ``general.type`` ``adapter``,
``adapter.type`` ``lora`` and ``adapter.lora.alpha``, and for every adapted weight ``<name>.weight`` of the base GGUF
(``blk.0.attn_q.weight``, named by the ``gguf`` package's tensor-name map of the architecture) the tensors
``<name>.weight.lora_a`` (PEFT's ``lora_A``, ``[r, in]``) and ``<name>.weight.lora_b`` (``lora_B``, ``[out, r]``).
llama.cpp scales the update by ``alpha / r``, as LoRA does; for rsLoRA (``alpha / sqrt(r)``) the alpha written is
``alpha * sqrt(r)``, so the scale is the same.

A Llama-architecture GGUF stores the rows of the query and key projections permuted for its rotary embedding
(``convert_hf_to_gguf.py``, ``LlamaModel.permute``), so the ``lora_b`` of ``q_proj`` and ``k_proj`` get the same
permutation: ``permute(B) @ A == permute(B @ A)``.

What llama.cpp cannot apply is refused with the reason: methods other than LoRA, DoRA, LoRA biases, per-module ranks
or alphas, extra trained modules (``modules_to_save``), and architectures other than Llama's for now.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Union

import gguf
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, PretrainedConfig

from .adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, check_adapter_dir
from .atomic import write_path_atomically
from .backbones import resolve_backbone
from .errors import InputError

GGUF_ARCHITECTURES = {"llama": gguf.MODEL_ARCH.LLAMA, "mistral": gguf.MODEL_ARCH.LLAMA}
"""transformers ``model_type`` -> the GGUF architecture its checkpoints convert to (and whose layout this writes)."""
ROTARY_PERMUTED = {"q_proj": "num_attention_heads", "k_proj": "num_key_value_heads"}
"""The projections whose output rows a Llama GGUF permutes, and the config field giving their number of heads."""
DTYPES = {"f32": torch.float32, "f16": torch.float16}
PEFT_PREFIX = "base_model.model."


def export_lora_gguf(adapter_dir: Union[str, Path], out: Union[str, Path], *, base_model: Optional[str] = None,
                     dtype: str = "f32") -> Path:
    """Write the LoRA adapter saved in `adapter_dir` as the GGUF LoRA file `out` (atomically) and return its path.

    Args:
        adapter_dir: A saved LoRA adapter (``adapter_config.json`` and ``adapter_model.safetensors``).
        out: The GGUF file to write.
        base_model: The backbone whose config gives the architecture and head counts (default: the adapter's
            ``base_model_name_or_path``; an embedded name, a path or a hub id).
        dtype: ``f32`` or ``f16``, the type of the written tensors.

    Raises:
        InputError: the adapter is not one llama.cpp can apply (the message says why), or `dtype` is unknown.
    """
    adapter_dir = Path(adapter_dir)
    peft_config = check_adapter_dir(adapter_dir)
    if dtype not in DTYPES:
        raise InputError(f"GGUF tensor type must be one of {', '.join(DTYPES)}, got {dtype!r}", field="dtype")
    alpha = lora_alpha(peft_config, adapter_dir / ADAPTER_CONFIG)
    config = AutoConfig.from_pretrained(resolve_backbone(base_model or peft_config["base_model_name_or_path"]))
    arch = GGUF_ARCHITECTURES.get(config.model_type)
    if arch is None:
        raise InputError(
            f"GGUF export covers the Llama architecture (SmolLM2, Llama, Mistral) so far, not {config.model_type}",
            file=adapter_dir / ADAPTER_CONFIG,
        )
    tensors = gguf_tensors(load_file(adapter_dir / ADAPTER_WEIGHTS), config, arch, adapter_dir / ADAPTER_WEIGHTS)

    def write(path: Path) -> None:
        writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[arch])
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        for name, tensor in tensors.items():
            writer.add_tensor(name, tensor.to(DTYPES[dtype]).contiguous().numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    return write_path_atomically(Path(out), write)


def lora_alpha(peft_config: dict, where: Path) -> float:
    """The ``adapter.lora.alpha`` that gives llama.cpp's ``alpha / r`` the scale PEFT applies, after refusing what
    llama.cpp cannot apply (named in the message, with `where`)."""
    peft_type = peft_config.get("peft_type")
    if peft_type != "LORA":
        method = str(peft_type or "full fine-tuning").lower()
        raise InputError(
            f"llama.cpp applies LoRA adapters only, and this one is {method}: merge it into its base "
            "(`peftprompt export --merge`) and convert the merged model with llama.cpp's convert_hf_to_gguf.py",
            file=where,
        )
    refusals = {
        "use_dora": "DoRA's magnitude vectors have no GGUF LoRA form",
        "lora_bias": "LoRA biases have no GGUF LoRA form",
        "rank_pattern": "a GGUF LoRA file has one rank scale for every module (rank_pattern is set)",
        "alpha_pattern": "a GGUF LoRA file has one alpha for every module (alpha_pattern is set)",
        "modules_to_save": "modules trained in full (modules_to_save) have no GGUF LoRA form",
    }
    for key, reason in refusals.items():
        if peft_config.get(key):
            raise InputError(f"cannot export to GGUF: {reason}; merge it instead (`peftprompt export --merge`)",
                             file=where, field=key)
    alpha, rank = float(peft_config["lora_alpha"]), int(peft_config["r"])
    return alpha * math.sqrt(rank) if peft_config.get("use_rslora") else alpha


def gguf_tensors(state: dict[str, torch.Tensor], config: PretrainedConfig, arch: gguf.MODEL_ARCH,
                 where: Path) -> dict[str, torch.Tensor]:
    """PEFT's LoRA weights (``base_model.model.<module>.lora_{A,B}.weight``) under their GGUF names
    (``<gguf name>.weight.lora_{a,b}``), ``lora_b`` of the query and key projections permuted as the base GGUF's
    rows are."""
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    tensors: dict[str, torch.Tensor] = {}
    for key, tensor in sorted(state.items()):
        module, _, part = key.removeprefix(PEFT_PREFIX).rpartition(".lora_")
        if part not in ("A.weight", "B.weight"):
            raise InputError(f"tensor {key!r} is no LoRA matrix of a linear layer; GGUF LoRA holds only those",
                             file=where)
        name = names.get_name(module)
        if name is None:
            raise InputError(f"module {module!r} has no tensor in a {gguf.MODEL_ARCH_NAMES[arch]} GGUF", file=where)
        projection = module.rpartition(".")[2]
        if part == "B.weight" and projection in ROTARY_PERMUTED:
            heads = getattr(config, ROTARY_PERMUTED[projection]) or config.num_attention_heads
            tensor = rotary_permute(tensor, heads)
        tensors[f"{name}.weight.lora_{part[0].lower()}"] = tensor.float()
    return tensors


def rotary_permute(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """The row order a Llama GGUF gives a query or key projection with `heads` heads: each head's two halves
    interleaved (``LlamaModel.permute`` of llama.cpp's ``convert_hf_to_gguf.py``)."""
    return rows.reshape(heads, 2, rows.shape[0] // heads // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def read_lora_gguf(path: Union[str, Path]) -> tuple[dict, dict[str, torch.Tensor]]:
    """The metadata (``general.type``, ``general.architecture``, ``adapter.type``, ``adapter.lora.alpha``) and the
    tensors (in their stored shape, ``[rows, columns]``) of a GGUF LoRA file."""
    reader = gguf.GGUFReader(path)
    fields = {}
    for key in ("general.type", "general.architecture", gguf.Keys.Adapter.TYPE, gguf.Keys.Adapter.LORA_ALPHA):
        field = reader.get_field(key)
        fields[key] = field.contents() if field is not None else None
    tensors = {t.name: torch.from_numpy(t.data.copy()).reshape([int(n) for n in reversed(t.shape)])
               for t in reader.tensors}
    return fields, tensors


__all__ = ["export_lora_gguf", "read_lora_gguf", "rotary_permute"]
