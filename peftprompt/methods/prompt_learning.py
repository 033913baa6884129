"""Fixes for PEFT's prompt-learning methods (prompt tuning, P-tuning, prefix tuning).

- Token classification: prompt tuning and P-tuning prepend ``num_virtual_tokens`` embeddings, so the logits are
  longer than the token labels. `PeftModelForTokenClassification` passes the labels on unchanged and the loss fails
  (or, worse, is computed on misaligned positions). `AlignedPeftModelForTokenClassification` drops the virtual-token
  positions from the logits before the loss, so predictions line up with the input tokens.
  `align_token_classification` gives that class to one model: `peftprompt.attach` and `peftprompt.load_adapter`
  call it on the models they build. PEFT's own mapping is left alone, so plain `peft.get_peft_model` and
  `PeftModel.from_pretrained` behave exactly as PEFT does.
- Prefix tuning feeds its prefix through ``past_key_values``, which gradient checkpointing does not support:
  `refuse_gradient_checkpointing` turns that combination into a clear error instead of a crash deep in the model.
- Sizes: PEFT reads them from the model config's ``hidden_size``, which is neither the width of ELECTRA's input
  embeddings (smaller than its hidden size) nor, for Falcon, the shape of the key/value cache.
  `prompt_learning_sizes` gives the sizes the model actually uses.
"""

from __future__ import annotations

import inspect
from types import MethodType
from typing import Optional

import torch
from peft import PeftModel, PeftModelForTokenClassification
from peft.utils import PeftType
from torch import nn
from transformers.modeling_outputs import TokenClassifierOutput

PREFIX_CHECKPOINTING_ERROR = (
    "prefix tuning cannot be combined with gradient checkpointing (the prefix is passed as past_key_values, "
    "which checkpointed layers do not support): disable gradient checkpointing or choose another method"
)


class AlignedPeftModelForTokenClassification(PeftModelForTokenClassification):
    """`PeftModelForTokenClassification` whose prompt-tuning / P-tuning logits align with the input tokens.

    The logits of the virtual tokens are removed, so ``logits.shape[1] == input_ids.shape[1]`` and the token
    labels are used as they are (``-100`` ignored).
    """

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None, return_dict=None, **kwargs):
        peft_config = self.active_peft_config
        if not peft_config.is_prompt_learning or peft_config.peft_type == PeftType.PREFIX_TUNING:
            return super().forward(
                input_ids=input_ids,
                attention_mask=attention_mask,
                inputs_embeds=inputs_embeds,
                labels=labels,
                return_dict=return_dict,
                **kwargs,
            )
        outputs = super().forward(
            input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, return_dict=True, **kwargs
        )
        logits = outputs.logits[:, peft_config.num_virtual_tokens :]
        loss = None
        if labels is not None:
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), labels.to(logits.device).reshape(-1), ignore_index=-100
            )
        return TokenClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


def align_token_classification(model: PeftModel) -> PeftModel:
    """Make `model`, if it is PEFT's `PeftModelForTokenClassification`, an `AlignedPeftModelForTokenClassification`.

    Only this instance changes class (the subclass adds no state, only `forward`); other models, and what
    `get_peft_model` / `PeftModel.from_pretrained` build, are untouched. Any other model is returned unchanged.
    """
    if type(model) is PeftModelForTokenClassification:
        model.__class__ = AlignedPeftModelForTokenClassification
    return model


def cache_key_value_heads(config) -> int:
    """The number of key/value heads a model's KV cache holds per layer."""
    if config.model_type == "falcon":
        # Falcon's new architecture caches every head; the old one one head (multi-query) or num_kv_heads
        if config.new_decoder_architecture:
            return config.num_attention_heads
        return 1 if config.multi_query else config.num_kv_heads
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def prompt_learning_sizes(model: nn.Module, peft_type: str) -> dict[str, int]:
    """``num_layers``, ``num_attention_heads`` and ``token_dim`` of a prompt-learning config for `model`.

    Key/value prefixes (prefix tuning, Cartridges) take the KV cache's shape: its heads and their total width.
    Virtual input tokens (prompt tuning, P-tuning) take the width of the input embeddings.
    """
    config = model.config.get_text_config()
    sizes = {"num_layers": config.num_hidden_layers, "num_attention_heads": config.num_attention_heads}
    if peft_type in (PeftType.PREFIX_TUNING, PeftType.CARTRIDGE):
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        heads = cache_key_value_heads(config)
        return {**sizes, "num_attention_heads": heads, "token_dim": head_dim * heads}
    return {**sizes, "token_dim": model.get_input_embeddings().embedding_dim}


def uses_gradient_checkpointing(model: nn.Module) -> bool:
    """Whether gradient (activation) checkpointing is switched on for a transformers model."""
    flag = "is_activation_checkpointing" if hasattr(model, "is_activation_checkpointing") else "is_gradient_checkpointing"
    return bool(getattr(model, flag, False))


def refuse_gradient_checkpointing(model: PeftModel) -> None:
    """Raise a clear `ValueError` now, and whenever gradient checkpointing is switched on later, for a prefix-tuned
    `model`."""
    if uses_gradient_checkpointing(model.get_base_model()):
        raise ValueError(PREFIX_CHECKPOINTING_ERROR)

    def gradient_checkpointing_enable(self, *args, **kwargs):
        raise ValueError(PREFIX_CHECKPOINTING_ERROR)

    model.gradient_checkpointing_enable = MethodType(gradient_checkpointing_enable, model)


def adds_virtual_tokens(model) -> bool:
    """Whether `model`'s active adapter is a prompt-learning one (prefix, prompt or P-tuning), which prepends
    virtual tokens or key/value prefixes at run time."""
    peft_config = getattr(model, "active_peft_config", None)
    return peft_config is not None and peft_config.is_prompt_learning


def base_forward_parameter(model, name: str) -> Optional[inspect.Parameter]:
    """The parameter `name` of the forward of `model`'s base model (the model itself when it has no adapter), or
    `None` when that forward does not take it."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inspect.signature(base.forward).parameters.get(name)

