"""Default target modules per architecture: PEFT's own tables, completed for the architectures they lack.

PEFT picks a method's layers from a table keyed by ``model.config.model_type`` (its tuner's
``target_module_mapping``: ``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`` and its siblings in
`peft.utils.constants`). `default_target_modules` reads that table first and falls back to `EXTRA_TARGET_MODULES`,
the entries PEFT 0.21 lacks (DistilBERT's ``q_lin``/``v_lin``, Phi-3's fused ``qkv_proj``, ModernBERT's ``Wqkv``,
...). PEFT's tables are read, never changed.

```py
>>> default_target_modules(tiny_distilbert, "LORA")
['q_lin', 'v_lin']
```
"""

from __future__ import annotations

import math
import re
from typing import Iterable, Optional, Union

from peft import PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import (
    TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING,
    TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING,
    TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
)
from torch import nn
from transformers import Conv1D

from ..tasks import HEAD_NAMES

# The tables of tuners that do not expose theirs as ``target_module_mapping``.
PEFT_TABLES = {"IA3": TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING}
# What a method's table adapts; every PeftType not named in `TARGET_KINDS` adapts the attention projections
# (PEFT's LoRA table, which most of its tuners copy).
TARGET_KINDS = {"IA3": "ia3", "BEFT": "value", "LN_TUNING": "layer_norm", "OSF": "all_linear"}

# kind -> model_type -> target modules, for the architectures PEFT's tables lack. "all_linear" needs no entry: it is
# every linear layer outside the heads (`linear_module_names`).
EXTRA_TARGET_MODULES: dict[str, dict[str, Union[list[str], str]]] = {
    "attention": {
        "distilbert": ["q_lin", "v_lin"],
        "phi3": ["qkv_proj"],  # query, key and value in one layer
        "modernbert": ["Wqkv"],
    },
    # the attention keys and values and the feed-forward output (`IA3_FEEDFORWARD_MODULES` marks the last)
    "ia3": {
        "distilbert": ["k_lin", "v_lin", "lin2"],
        "electra": ["key", "value", "output.dense"],
        "phi3": ["qkv_proj", "down_proj"],
        "modernbert": ["Wqkv", "mlp.Wo"],
    },
    # the value projection alone (BEFT); architectures that fuse it with the query and key have no default
    "value": {"distilbert": ["v_lin"], "electra": ["value"]},
    "layer_norm": {
        "bert": ["LayerNorm"],
        "roberta": ["LayerNorm"],
        "electra": ["LayerNorm"],
        "deberta-v2": ["LayerNorm"],
        "distilbert": ["sa_layer_norm", "output_layer_norm"],
        # the first layer's attn_norm is an nn.Identity, with nothing to train
        "modernbert": r".*\.(embeddings\.norm|mlp_norm|final_norm)|.*\.layers\.[1-9]\d*\.attn_norm",
        "gpt_neox": ["input_layernorm", "post_attention_layernorm", "final_layer_norm"],
        "opt": ["self_attn_layer_norm", "final_layer_norm"],
        "phi3": ["input_layernorm", "post_attention_layernorm", "norm"],
    },
}
IA3_FEEDFORWARD_MODULES: dict[str, list[str]] = {
    "distilbert": ["lin2"],
    "electra": ["output.dense"],
    "phi3": ["down_proj"],
    "modernbert": ["mlp.Wo"],
}


def default_target_modules(model: nn.Module, peft_type: str) -> Optional[Union[list[str], str]]:
    """The target modules of `peft_type` on `model`: PEFT's table entry for its ``model_type``, else ours, else None.

    For the ``"all_linear"`` kind (OSF) the fallback is every linear layer outside the heads (`linear_module_names`).
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    peft_table = PEFT_TABLES.get(str(peft_type), getattr(PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type),
                                                         "target_module_mapping", None))
    if not peft_table:  # the tuner picks its modules itself (prompt learning, trainable tokens, ShadowPEFT...)
        return None
    if model_type in peft_table:
        return peft_table[model_type]
    kind = TARGET_KINDS.get(str(peft_type), "attention")
    if kind == "all_linear":
        return linear_module_names(model) or None
    if kind == "attention" and model_type in TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING:
        # a tuner with a table of its own (AdaLoRA, VB-LoRA) that lacks the model: LoRA's entry
        return TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING[model_type]
    return EXTRA_TARGET_MODULES[kind].get(model_type)


def default_feedforward_modules(model: nn.Module) -> Optional[list[str]]:
    """IA3's feed-forward modules (scaled on their input, not their output): PEFT's table entry, else ours."""
    model_type = getattr(model.config, "model_type", None)
    if model_type in TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING:
        return TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING[model_type]
    return IA3_FEEDFORWARD_MODULES.get(model_type)


def inside_head(name: str, heads: Iterable[str] = HEAD_NAMES) -> bool:
    """Whether the module called `name` is, or lies inside, an output head.

    A head matches a name part by its end, as PEFT matches ``modules_to_save``: ``"classifier"`` covers DistilBERT's
    ``pre_classifier`` (a fresh layer of its head) and ELECTRA's ``classifier.dense``.
    """
    return any(part.endswith(head) for part in name.split(".") for head in heads)


def linear_module_names(model: nn.Module) -> list[str]:
    """Full names of `model`'s linear layers (`nn.Linear` and GPT-2's `Conv1D`) outside the heads.

    PEFT's ``"all-linear"`` shorthand keeps layers inside a head module (ELECTRA's ``classifier.dense``) and
    DistilBERT's ``pre_classifier``, which it then also trains in full as a head: this list leaves them out.
    """
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D)) and not inside_head(n)]


def linear_leaf_names(model: nn.Module) -> list[str]:
    """Leaf names of `model`'s linear layers, heads included (for error messages)."""
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))})


def matches(name: str, targets: Union[list[str], set[str], str]) -> bool:
    """Whether the module called `name` is targeted: a regex matches the whole name, a list entry its end."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == target or name.endswith("." + target) for target in targets)


def targeted_layers(model: nn.Module, targets: Union[list[str], set[str], str, None]) -> list[nn.Module]:
    """The modules of `model` that `targets` names (empty for None)."""
    if not targets:
        return []
    return [module for name, module in model.named_modules() if name and matches(name, targets)]


def layer_shape(module: nn.Module) -> Optional[tuple[int, int]]:
    """``(in_features, out_features)`` of a linear layer (`nn.Linear` or GPT-2's transposed `Conv1D`), else None."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]
    return None


def target_shapes(model: nn.Module, targets) -> list[tuple[int, int]]:
    """``(in, out)`` of every linear layer that `targets` names."""
    return [shape for shape in map(layer_shape, targeted_layers(model, targets)) if shape is not None]


def common_divisor(shapes: list[tuple[int, int]], at_most: int) -> int:
    """The largest number <= `at_most` that divides every input and output size of `shapes` (1 when none)."""
    g = 0
    for n_in, n_out in shapes:
        g = math.gcd(math.gcd(g, n_in), n_out)
    return max((d for d in range(1, min(g, at_most) + 1) if g % d == 0), default=1)
