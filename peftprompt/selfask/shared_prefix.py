"""Attention to a few-shot prefix that every row of a generation batch shares, held once instead of once per row.

Few-shot self-ask puts the same prefix (`FEW_SHOT_SELF_ASK`: some 400 tokens) before every question. With a plain
KV cache each of the batch's rows holds its own copy of the prefix's keys and values, and every generated token
reads all of them: on a CPU a decoding step of 64 rows spends more time there than in the model's weights. The
``"sdpa_shared_prefix"`` attention implementation, registered with transformers on import, attends each row's
queries to the prefix's keys ``[kv_heads, prefix_length, dim]`` (one matrix product for the whole batch) and to the
row's own cached tokens, with one softmax over both: the same attention as over a per-row copy of the prefix.

The batch's cache (`peftprompt.selfask.kv_cache.batched` with ``shared``) then holds only the tokens after the
prefix, and counts the prefix in its length, so ``generate``'s positions and masks span the whole prompt: the
left padding sits between the prefix and each row's own tokens. Outside `shared_prefix_attention` the
implementation is transformers' ``"sdpa"``.

```py
>>> with shared_prefix_attention(model, prefix_cache):   # "sdpa" -> "sdpa_shared_prefix", restored after
...     out = model.generate(input_ids=ids, attention_mask=mask, past_key_values=batched(..., shared=prefix_cache))
```
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Iterator, Optional

import torch
from transformers import AttentionInterface, AttentionMaskInterface

if TYPE_CHECKING:
    from .kv_cache import PromptCache

# transformers' own SDPA attention and mask functions, looked up by their registered name
sdpa_attention_forward = AttentionInterface()["sdpa"]
sdpa_mask = AttentionMaskInterface()["sdpa"]

SHARED_PREFIX_ATTENTION = "sdpa_shared_prefix"
_PREFIX: ContextVar[Optional["PromptCache"]] = ContextVar("shared_prefix", default=None)


def shared_prefix_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """A transformers attention function (inference only): inside `shared_prefix_attention`, ``query``
    ``[batch, heads, q, dim]`` attends to the shared prefix's keys and values for ``module.layer_idx`` and to
    ``key``/``value`` ``[batch, kv_heads, own, dim]``, each row's tokens after the prefix; ``attention_mask`` (a
    boolean or additive mask over prefix and own columns, or `None`: causal) masks the own columns, the prefix
    being visible to every query. Returns ``[batch, q, heads, dim]``. Elsewhere it is ``"sdpa"``."""
    prefix = _PREFIX.get()
    if prefix is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if dropout:
        raise ValueError("shared-prefix attention is for inference: attention dropout must be 0")
    prefix_keys, prefix_values = prefix.keys[module.layer_idx], prefix.values[module.layer_idx]
    batch, heads, length, dim = query.shape
    kv_heads, prefix_length, _ = prefix_keys.shape
    own = key.shape[2]
    if attention_mask is not None and attention_mask.shape[-1] != prefix_length + own:
        raise ValueError(f"shared-prefix attention: the mask spans {attention_mask.shape[-1]} keys, but the prefix "
                         f"holds {prefix_length} and the cache {own}")
    group = heads // kv_heads  # query head h reads key head h // group, as transformers' repeat_kv
    scale = scaling if scaling is not None else dim**-0.5
    grouped = query.reshape(batch, kv_heads, group * length, dim)
    # the prefix: one product per key head over all the batch's queries
    every_query = grouped.transpose(0, 1).reshape(kv_heads, batch * group * length, dim)
    prefix_scores = torch.matmul(every_query, prefix_keys.transpose(1, 2)).float().mul_(scale)
    prefix_scores = prefix_scores.view(kv_heads, batch, group * length, prefix_length).transpose(0, 1)
    own_scores = torch.matmul(grouped, key.transpose(2, 3)).float().mul_(scale)
    own_scores = own_scores.view(batch, kv_heads, group, length, own)
    if attention_mask is None:  # causal: query i sees the own tokens up to its own position
        visible = torch.ones(length, own, dtype=torch.bool, device=query.device).tril(own - length)
        own_scores.masked_fill_(~visible, float("-inf"))
    else:
        own_mask = attention_mask[..., -own:].unsqueeze(2)  # [batch or 1, 1, 1, q, own]
        if own_mask.dtype == torch.bool:
            own_scores.masked_fill_(~own_mask, float("-inf"))
        else:
            own_scores.add_(own_mask)
    own_scores = own_scores.view(batch, kv_heads, group * length, own)
    top = torch.maximum(prefix_scores.amax(-1, keepdim=True), own_scores.amax(-1, keepdim=True))
    prefix_weights, own_weights = (prefix_scores - top).exp_(), (own_scores - top).exp_()
    total = prefix_weights.sum(-1, keepdim=True) + own_weights.sum(-1, keepdim=True)
    prefix_weights = prefix_weights.to(value.dtype).transpose(0, 1).reshape(kv_heads, -1, prefix_length)
    output = torch.matmul(prefix_weights, prefix_values).view(kv_heads, batch, group * length, dim).transpose(0, 1)
    output = (output + torch.matmul(own_weights.to(value.dtype), value)) / total.to(value.dtype)
    return output.reshape(batch, heads, length, dim).transpose(1, 2).contiguous(), None


AttentionInterface.register(SHARED_PREFIX_ATTENTION, shared_prefix_attention_forward)
AttentionMaskInterface.register(SHARED_PREFIX_ATTENTION, sdpa_mask)  # "sdpa"'s mask, over prefix and own columns


def supports_shared_prefix(model) -> bool:
    """Whether `model` (a transformers model, PEFT-wrapped or not) can run ``"sdpa_shared_prefix"``: it is on
    ``"sdpa"``, its class takes transformers' attention functions, and its attention has no logit soft-capping."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    return (getattr(config, "_attn_implementation", None) == "sdpa"
            and getattr(base, "is_backend_compatible", lambda: False)()
            and getattr(config, "attn_logit_softcapping", None) is None)


@contextmanager
def shared_prefix_attention(model, prefix: "PromptCache") -> Iterator[None]:
    """Run `model` (see `supports_shared_prefix`) with ``"sdpa_shared_prefix"`` attending to `prefix` for the
    duration; its attention goes back to ``"sdpa"`` after."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.set_attn_implementation(SHARED_PREFIX_ATTENTION)
    token = _PREFIX.set(prefix)
    try:
        yield
    finally:
        _PREFIX.reset(token)
        base.set_attn_implementation("sdpa")
