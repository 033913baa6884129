"""Prompt KV caches kept across self-ask steps.

A self-ask transcript grows by a few tokens between two generation steps (the intermediate answer), and every
prompt may start with the same few-shot prefix. `PromptCache` keeps the keys and values of a prompt's tokens, so
the next `model.generate` call feeds only the tokens after the longest common prefix of the cached tokens and the
new prompt's tokens (the prompt is always tokenised whole, so the model sees exactly the tokens it would see
without the cache).

A batch of prompts with different cache lengths becomes one `transformers.DynamicCache` for a left-padded batch:
with ``W`` the batch width and ``N`` the most tokens any row must feed, every row holds its first ``len - N``
tokens in the cache's ``W - N`` columns, right-aligned (left padding masked, as `generate` masks a padded prompt),
and `generate` continues from it as from any cache (``past_key_values`` with the full ``input_ids``). Rows that
could reuse more recompute a few cached tokens; positions come from the attention mask, so each row's positions are
those its cache was computed with.

Used by `SelfAskRunner` (``reuse_kv_cache``); not for models whose cache is not a plain per-token cache (sliding
window layers) or whose adapter prepends virtual tokens (prefix, prompt, P-tuning).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from ..methods.prompt_learning import adds_virtual_tokens, base_forward_parameter


@dataclass
class PromptCache:
    """The keys and values of the tokens `ids`: per layer, ``[heads, len(ids), head_dim]`` tensors."""

    ids: list[int]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    def reusable(self, ids: Sequence[int]) -> int:
        """How many leading tokens of `ids` this cache holds (their longest common prefix), leaving at least one
        token of `ids` to feed."""
        limit = min(len(self.ids), len(ids) - 1)
        n = 0
        while n < limit and self.ids[n] == ids[n]:
            n += 1
        return n


def supports_reuse(model) -> bool:
    """Whether `model`'s generation can continue from a `PromptCache`: its forward takes ``position_ids`` (which
    `generate` then derives from the attention mask, so a left-padded row keeps its cache's positions), its cache
    is a plain per-token cache (no sliding-window layers) and no adapter prepends virtual tokens."""
    if adds_virtual_tokens(model) or base_forward_parameter(model, "position_ids") is None:
        return False
    try:
        cache = DynamicCache(config=model.config)
    except Exception:  # a config the cache cannot read: do not guess
        return False
    return all(type(layer) is DynamicLayer for layer in cache.layers)


def encode(model, ids: list[int]) -> PromptCache:
    """The `PromptCache` of `ids` (one forward pass, no padding)."""
    device = next(model.parameters()).device
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids], device=device), use_cache=True)
    return split(out.past_key_values, [0], [ids], [len(ids)])[0]


def batched(caches: Sequence[Optional[PromptCache]], lengths: Sequence[int], fed: int, config) -> Optional[DynamicCache]:
    """One cache for a left-padded batch of prompts of token counts `lengths`, of which the last `fed` columns are
    fed to the model: row i's first ``lengths[i] - fed`` cached tokens, right-aligned in the ``max(lengths) - fed``
    cached columns (zeros where the row is padding). `None` when no column is cached. Every row's cache must hold
    at least ``lengths[i] - fed`` tokens of its prompt."""
    columns = max(lengths) - fed
    if columns <= 0:
        return None
    reference = next(c for c in caches if c is not None)
    layers = []
    for layer, (key, value) in enumerate(zip(reference.keys, reference.values)):
        heads, _, dim = key.shape
        keys = key.new_zeros(len(caches), heads, columns, dim)
        values = value.new_zeros(len(caches), heads, columns, value.shape[-1])
        for row, (cache, length) in enumerate(zip(caches, lengths)):
            used = length - fed
            if used > 0:
                keys[row, :, columns - used :] = cache.keys[layer][:, :used]
                values[row, :, columns - used :] = cache.values[layer][:, :used]
        layers.append((keys, values))
    return DynamicCache(ddp_cache_data=layers, config=config)


def split(cache: DynamicCache, pads: Sequence[int], sequences: Sequence[Sequence[int]],
          keep: Sequence[int]) -> list[PromptCache]:
    """Row i of a batched `cache` as a `PromptCache` of its first ``keep[i]`` tokens: ``sequences[i]`` (the row's
    tokens without its ``pads[i]`` left-padding columns), as far as the cache holds them."""
    rows = []
    for row, (pad, tokens, n) in enumerate(zip(pads, sequences, keep)):
        n = min(n, cache.get_seq_length() - pad, len(tokens))
        rows.append(PromptCache(
            ids=list(tokens[:n]),
            keys=[layer.keys[row, :, pad : pad + n].clone() for layer in cache.layers],
            values=[layer.values[row, :, pad : pad + n].clone() for layer in cache.layers],
        ))
    return rows
