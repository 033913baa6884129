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
"""

from __future__ import annotations

import inspect
from types import MethodType
from typing import Optional

import torch
from torch import nn
from peft.peft_model import PeftModel, PeftModelForTokenClassification
from peft.utils import PeftType
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

