"""Adapter methods by name, with task- and architecture-aware defaults: `attach(model, "lora")`.

| name      | PEFT config            | what trains                                                  |
|-----------|------------------------|--------------------------------------------------------------|
| `lora`    | `LoraConfig`           | rank-8 updates of the attention query/value projections      |
| `prefix`  | `PrefixTuningConfig`   | 20 key/value vectors per layer, prepended to attention       |
| `prompt`  | `PromptTuningConfig`   | 20 virtual input embeddings                                  |
| `ptuning` | `PromptEncoderConfig`  | 20 virtual embeddings produced by a small MLP encoder        |
| `ia3`     | `IA3Config`            | scaling vectors on keys, values and feed-forward activations |
| `bitfit`  | `BitFitConfig` (ours)  | a delta for every bias term                                  |
| `osf`     | `OSFConfig`            | the lower half of every linear weight's singular directions  |
| `full`    | none                   | every parameter (the plain model is returned)                |

The task head (`classifier` / `score`) of a classification model is always trained and saved with the adapter.
Prompt tuning and P-tuning on a token classifier return logits aligned with the input tokens (see
`prompt_learning.align_token_classification`); PEFT's own classes are left as they are.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Union

from peft import (
    IA3Config,
    LoraConfig,
    OSFConfig,
    PeftConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    get_peft_model,
)
from peft.config import PromptLearningConfig
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from torch import nn
from transformers import PreTrainedModel

from ..errors import InputError
from ..tasks import HEAD_NAMES, get_task, infer_task
from .bitfit import BitFitConfig
from .prompt_learning import (
    PREFIX_CHECKPOINTING_ERROR,
    align_token_classification,
    refuse_gradient_checkpointing,
    uses_gradient_checkpointing,
)

# Output layers (`peftprompt.tasks.HEAD_NAMES`) are never adapted: they are either trained in full (task heads) or
# tied to the embeddings.


def _bias_free_linear_names(model: nn.Module) -> list[str]:
    """Leaf names of the bias-free `nn.Linear` layers outside the heads (the BitFit targets of a Llama-style model)."""
    return sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and module.bias is None and name.rsplit(".", 1)[-1] not in HEAD_NAMES
        }
    )


def _osf_defaults(model: PreTrainedModel) -> dict[str, Any]:
    # PEFT's fallback ("all-linear") would also wrap a token classifier, which is trained in full instead
    linear = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    return {"target_modules": sorted(linear - set(HEAD_NAMES))}


def _has_bias_terms(model: nn.Module) -> bool:
    return any(
        isinstance(m, (nn.Linear, nn.LayerNorm)) and m.bias is not None and n.rsplit(".", 1)[-1] not in HEAD_NAMES
        for n, m in model.named_modules()
    )


def _bitfit_defaults(model: PreTrainedModel) -> dict[str, Any]:
    # BERT-style models: every existing bias. Llama-style models have none, so their projections get one.
    return {"target_modules": None if _has_bias_terms(model) else _bias_free_linear_names(model)}


# name -> (PEFT config class, default fields given the model). Target modules left out are chosen by PEFT's own
# per-architecture tables (BERT: query/value for LoRA, key/value/output.dense for IA3; Llama: q_proj/v_proj, ...).
METHOD_CONFIGS: dict[str, tuple[type[PeftConfig], Callable[[PreTrainedModel], dict[str, Any]]]] = {
    "lora": (LoraConfig, lambda model: {"r": 8, "lora_alpha": 16, "lora_dropout": 0.1}),
    "prefix": (PrefixTuningConfig, lambda model: {"num_virtual_tokens": 20}),
    "prompt": (PromptTuningConfig, lambda model: {"num_virtual_tokens": 20}),
    "ptuning": (PromptEncoderConfig, lambda model: {"num_virtual_tokens": 20, "encoder_hidden_size": 128}),
    "ia3": (IA3Config, lambda model: {}),
    "bitfit": (BitFitConfig, _bitfit_defaults),
    # PEFT's default: each weight's top half of singular directions frozen (``effective_rank``), the rest trained
    "osf": (OSFConfig, _osf_defaults),
}
METHODS = (*METHOD_CONFIGS, "full")

# One line per method, as the model card and the reports describe it.
METHOD_DESCRIPTIONS: dict[str, str] = {
    "lora": "LoRA (low-rank updates of the attention projections)",
    "prefix": "prefix tuning (trained key/value prefixes in every layer)",
    "prompt": "prompt tuning (trained virtual input-token embeddings)",
    "ptuning": "P-tuning (virtual tokens produced by a small prompt encoder)",
    "ia3": "IA3 (rescaling vectors on keys, values and feed-forward activations)",
    "bitfit": "BitFit (a trained delta on every bias term; registered with PEFT by `import peftprompt`)",
    "osf": "OSF (orthogonal subspace fine-tuning: each weight's top singular directions frozen, the rest trained)",
    "full": "full fine-tuning (every weight)",
}
assert tuple(METHOD_DESCRIPTIONS) == METHODS, "describe every method of METHODS, in its order"
# Prompt-learning methods add virtual tokens or key/value prefixes and change no weight; the other adapters fold
# into the base weights (`merge_and_unload`).
PROMPT_LEARNING_METHODS = tuple(
    name for name, (config_cls, _) in METHOD_CONFIGS.items() if issubclass(config_cls, PromptLearningConfig)
)
MERGEABLE_METHODS = tuple(name for name in METHOD_CONFIGS if name not in PROMPT_LEARNING_METHODS)


def method_name(peft_type: Any) -> str:
    """The `METHODS` name of a PEFT type (``"PROMPT_TUNING"`` -> ``"prompt"``); the lower-cased type if it is not one
    of ours."""
    for name, (config_cls, _) in METHOD_CONFIGS.items():
        if PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type) is config_cls:
            return name
    return str(getattr(peft_type, "value", peft_type)).lower()


# Fragments of PEFT's errors for target modules that match nothing; attach() turns them into one clear message.
TARGET_MISMATCH_HINTS = ("not found in the base model", "specify `target_modules`", "No modules were targeted")


def default_config(model: PreTrainedModel, method: str, task: Optional[str] = None, **overrides: Any) -> PeftConfig:
    """The PEFT config `attach` would use for `method` on `model`, with `overrides` applied."""
    if method not in METHOD_CONFIGS:
        raise InputError(f"unknown adapter method {method!r}; choose one of {', '.join(METHODS)}", field="method")
    task_type = get_task(task or infer_task(model)).peft_task_type
    config_cls, defaults = METHOD_CONFIGS[method]
    fields = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise InputError(f"{config_cls.__name__} (method {method!r}) has no field {', '.join(map(repr, unknown))}",
                         field="method_args")
    task_type = task_type.value if task_type is not None else None
    return config_cls(task_type=task_type, **{**defaults(model), **overrides})


def attach(
    model: PreTrainedModel,
    method: str,
    task: Optional[str] = None,
    adapter_name: str = "default",
    **overrides: Any,
) -> Union[PeftModel, PreTrainedModel]:
    """Attach an adapter of `method` to a frozen `model` and return the `PeftModel` (the plain model for ``"full"``).

    The returned model is in the training or evaluation mode that `model` was in.

    Args:
        model (`PreTrainedModel`): The backbone, e.g. from `load_backbone`.
        method (`str`): One of `METHODS`: ``lora``, ``prefix``, ``prompt``, ``ptuning``, ``ia3``, ``bitfit``,
            ``osf``, ``full``.
        task (`str`, *optional*): A task of `peftprompt.tasks.TASKS` (``seq_cls``, ``token_cls``, ``causal_lm``,
            ``feature``); inferred from the model class when omitted.
        adapter_name (`str`): Name of the adapter inside the `PeftModel`.
        overrides: Fields of the PEFT config to change, e.g. ``r=16`` or ``target_modules=["query"]``.

    Example:
        ```py
        >>> model, tokenizer = load_backbone("minilm", task="seq_cls", num_labels=2)
        >>> model = attach(model, "bitfit")
        >>> model.print_trainable_parameters()
        ```
    """
    if method == "full":
        if overrides:
            raise InputError(f"method 'full' takes no config overrides, got {sorted(overrides)}", field="method_args")
        for parameter in model.parameters():
            parameter.requires_grad = True
        return model
    config = default_config(model, method, task, **overrides)
    was_training = model.training
    if config.peft_type == "PREFIX_TUNING" and uses_gradient_checkpointing(model):
        raise ValueError(PREFIX_CHECKPOINTING_ERROR)
    try:
        peft_model = get_peft_model(model, config, adapter_name=adapter_name)
    except ValueError as err:
        if any(hint in str(err) for hint in TARGET_MISMATCH_HINTS):
            raise InputError(
                f"{method}: target_modules={getattr(config, 'target_modules', None)!r} matches no module of "
                f"{type(model).__name__}; pass target_modules=[...] naming some of its layers "
                f"(linear layers: {', '.join(_linear_leaf_names(model)[:12])})", field="target_modules"
            ) from err
        raise
    if config.peft_type == "PREFIX_TUNING":
        refuse_gradient_checkpointing(peft_model)
    # Prompt / P-tuning token classifiers: logits aligned with the input tokens, for this model only.
    align_token_classification(peft_model)
    # New adapter layers are created in training mode; keep the whole model in the mode the backbone was in.
    return peft_model.train(was_training)


def _linear_leaf_names(model: nn.Module) -> list[str]:
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})


__all__ = [
    "MERGEABLE_METHODS",
    "METHOD_CONFIGS",
    "METHOD_DESCRIPTIONS",
    "METHODS",
    "PROMPT_LEARNING_METHODS",
    "attach",
    "default_config",
    "infer_task",
    "method_name",
]
