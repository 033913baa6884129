"""Attention over packed rows one episode at a time, instead of the whole row under a block-diagonal mask.

A packed row (`peftprompt.recursive.collator`) holds several episodes, its ``position_ids`` restarting at 0 for
each and no ``attention_mask``. transformers then builds a block-diagonal causal mask, and SDPA computes every
query of the row against every key before masking: ``L**2`` work for a row of length ``L``, where the episodes
need only the sum of their squared lengths (a fifth of it for five episodes). The ``"sdpa_packed"`` attention
implementation, registered with transformers on import, runs SDPA with ``is_causal`` on each episode's slice when
the forward carries the sequence boundaries as transformers' flash-attention keywords (``cu_seq_lens_q`` and
friends, over the flattened batch, as `transformers.DataCollatorWithFlattening` emits them). Without them it is
transformers' ``"sdpa"``, so generation and padded batches are unchanged.

The training engine uses it for causal LMs on ``"sdpa"`` whose batches are packed:

```py
>>> with packed_attention(model) as used:   # model's attention "sdpa" -> "sdpa_packed", restored after
...     loss = model(**batch, **packed_sequence_kwargs(batch["position_ids"])).loss
```
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AttentionMaskInterface

# transformers' own SDPA attention and mask functions, looked up by their registered name
sdpa_attention_forward = AttentionInterface()["sdpa"]
sdpa_mask = AttentionMaskInterface()["sdpa"]

PACKED_ATTENTION = "sdpa_packed"


def packed_sdpa_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    cu_seq_lens_q: Optional[torch.Tensor] = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """A transformers attention function: causal SDPA on each sequence ``cu_seq_lens_q`` delimits in the flattened
    batch (``query`` ``[batch, heads, length, dim]``; returns ``[batch, length, heads, dim]``), else ``"sdpa"`` (no
    boundaries, a KV cache, or attention that is not causal)."""
    causal = kwargs.get("is_causal", getattr(module, "is_causal", True))
    if cu_seq_lens_q is None or query.shape[2] != key.shape[2] or not causal:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    batch, heads, length, dim = query.shape
    if int(cu_seq_lens_q[-1]) != batch * length:
        raise ValueError(f"cu_seq_lens_q ends at {int(cu_seq_lens_q[-1])}, but the batch holds {batch} x {length} "
                         "positions: the boundaries must cover the flattened batch")
    lengths = (cu_seq_lens_q[1:] - cu_seq_lens_q[:-1]).tolist()

    def flat(x: torch.Tensor) -> torch.Tensor:  # [batch, heads, length, dim] -> [1, heads, batch * length, dim]
        return x.transpose(0, 1).reshape(1, x.shape[1], -1, x.shape[-1])

    gqa = query.shape[1] != key.shape[1]
    outputs = [
        F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=gqa)
        for q, k, v in zip(flat(query).split(lengths, 2), flat(key).split(lengths, 2), flat(value).split(lengths, 2))
    ]
    output = torch.cat(outputs, 2).reshape(heads, batch, length, dim).permute(1, 2, 0, 3)
    return output, None


AttentionInterface.register(PACKED_ATTENTION, packed_sdpa_attention_forward)
AttentionMaskInterface.register(PACKED_ATTENTION, sdpa_mask)  # the fallback's mask, as for "sdpa"


def packed_sequence_kwargs(position_ids: torch.Tensor) -> dict:
    """transformers' flash-attention sequence keywords for packed ``position_ids`` ``[batch, length]``: a sequence
    starts at every row start and wherever the position is not the previous one plus 1 (transformers'
    ``find_packed_sequence_indices`` rule), counted over the flattened batch."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] - position_ids[:, :-1] != 1
    flat = starts.flatten()
    cu = torch.cat([flat.nonzero().flatten(), flat.new_tensor([flat.numel()], dtype=torch.long)]).to(torch.int32)
    longest = int((cu[1:] - cu[:-1]).max())
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def supports_packed_attention(model) -> bool:
    """Whether `model` (a bare transformers model) can run ``"sdpa_packed"``: a decoder that generates (not an encoder
    or encoder-decoder) on ``"sdpa"``, whose class takes transformers' attention functions, without a sliding window
    or logit soft-capping (which per-sequence causal SDPA would drop)."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    if not (getattr(model, "is_backend_compatible", lambda: False)() and model.can_generate()):
        return False
    if getattr(config, "is_encoder_decoder", False) or getattr(config, "attn_logit_softcapping", None) is not None:
        return False
    window = getattr(config, "sliding_window", None)
    return not (window and getattr(config, "use_sliding_window", True))


@contextmanager
def packed_attention(model) -> Iterator[bool]:
    """Switch `model`'s attention from ``"sdpa"`` to ``"sdpa_packed"`` for the duration (where
    `supports_packed_attention`); yields whether it did."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not supports_packed_attention(base):
        yield False
        return
    base.set_attn_implementation(PACKED_ATTENTION)
    try:
        yield True
    finally:
        base.set_attn_implementation("sdpa")
