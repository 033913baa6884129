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
those its cache was computed with. Its layers are `GrowingLayer`s, which append a step's keys and values in place
(transformers' `DynamicLayer` concatenates, copying the whole batch's cache at every generated token).

When every row starts with the same few-shot prefix, the batch shares one copy of the prefix's keys and values
(``shared``; `peftprompt.selfask.shared_prefix`): the prefix's ``P`` columns come first, then each row's left
padding and own tokens, and the cache holds only the columns after the prefix. A row's `PromptCache` then holds
its tokens after the prefix, and points at the prefix's cache for the rest (``prefix``).

Used by `SelfAskRunner` (``reuse_kv_cache``); not for models whose cache is not a plain per-token cache (sliding
window layers) or whose adapter prepends virtual tokens (prefix, prompt, P-tuning).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from transformers import DynamicCache, DynamicLayer

from ..methods.prompt_learning import adds_virtual_tokens, base_forward_parameter


@dataclass
class PromptCache:
    """The keys and values of the tokens `ids`: per layer, ``[heads, len(ids), head_dim]`` tensors, or, with a
    `prefix` (the cache of the first ``len(prefix.ids)`` tokens, shared with other prompts), those of the tokens
    after it."""

    ids: list[int]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    prefix: Optional["PromptCache"] = None

    @property
    def start(self) -> int:
        """How many leading tokens `prefix` holds (0 without one)."""
        return len(self.prefix.ids) if self.prefix is not None else 0

    def head(self, n: int) -> "PromptCache":
        """The cache of the first `n` tokens (views of this one's tensors)."""
        if n <= self.start:
            return self.prefix.head(n)
        return PromptCache(self.ids[:n], [k[:, : n - self.start] for k in self.keys],
                           [v[:, : n - self.start] for v in self.values], self.prefix)

    def states(self, layer: int, begin: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values ``[heads, end - begin, head_dim]`` of tokens ``begin:end`` in `layer`."""
        start = self.start
        if begin >= start:
            return self.keys[layer][:, begin - start : end - start], self.values[layer][:, begin - start : end - start]
        head_keys, head_values = self.prefix.states(layer, begin, min(end, start))
        if end <= start:
            return head_keys, head_values
        return (torch.cat([head_keys, self.keys[layer][:, : end - start]], dim=1),
                torch.cat([head_values, self.values[layer][:, : end - start]], dim=1))

    def reusable(self, ids: Sequence[int]) -> int:
        """How many leading tokens of `ids` this cache holds (their longest common prefix), leaving at least one
        token of `ids` to feed."""
        limit = min(len(self.ids), len(ids) - 1)
        n = 0
        while n < limit and self.ids[n] == ids[n]:
            n += 1
        return n


def prefix_length(shared: Optional[PromptCache]) -> int:
    """The tokens of a shared prefix's cache (0 without one): the columns before each row's padding."""
    return len(shared.ids) if shared is not None else 0


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


class GrowingLayer(DynamicLayer):
    """A `DynamicLayer` that appends in place: its ``keys`` and ``values`` are views of buffers with room for
    `spare` more tokens (doubled when full), so an update copies only the new tokens. ``batch_select_indices``
    keeps the chosen rows' buffers; any other change of the tensors (e.g. ``batch_repeat_interleave``) is adopted
    into fresh buffers at the next update.

    Args:
        spare (`int`): Columns to keep free beyond the tokens held (e.g. the tokens a `generate` call may add).
        offset (`int`, defaults to 0): Tokens before the ones held, kept elsewhere (a shared prefix) and counted in
            the sequence length, so masks and positions cover them.
    """

    def __init__(self, spare: int, offset: int = 0):
        super().__init__()
        self.spare, self.offset = spare, offset
        self._keys = self._values = None

    def get_seq_length(self) -> int:
        return self.offset + self._held()

    def _held(self) -> int:
        return super().get_seq_length()  # DynamicLayer's: the tokens held here

    def _holds(self, length: int) -> bool:
        return (self._keys is not None and self.keys.data_ptr() == self._keys.data_ptr()
                and self.keys.shape[:-2] == self._keys.shape[:-2] and length <= self._keys.shape[-2])

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        held, new = self._held(), key_states.shape[-2]
        if not self._holds(held + new):
            room = held + new + max(self.spare, held)
            self._keys = key_states.new_empty(*key_states.shape[:-2], room, key_states.shape[-1])
            self._values = value_states.new_empty(*value_states.shape[:-2], room, value_states.shape[-1])
            if held:
                self._keys[..., :held, :] = self.keys
                self._values[..., :held, :] = self.values
        self._keys[..., held : held + new, :] = key_states
        self._values[..., held : held + new, :] = value_states
        self.keys, self.values = self._keys[..., : held + new, :], self._values[..., : held + new, :]
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep the batch rows `indices`, with their spare room (one copy)."""
        held = self._held()
        if not held or not self._holds(held):
            return super().batch_select_indices(indices)
        self._keys, self._values = self._keys.index_select(0, indices), self._values.index_select(0, indices)
        self.keys, self.values = self._keys[..., :held, :], self._values[..., :held, :]


def batched(caches: Sequence[Optional[PromptCache]], lengths: Sequence[int], fed: int, config,
            spare: int = 0, shared: Optional[PromptCache] = None) -> DynamicCache:
    """One cache for a left-padded batch of prompts of token counts `lengths`, of which the last `fed` columns are
    fed to the model: row i's first ``lengths[i] - fed`` cached tokens, right-aligned in the ``max(lengths) - fed``
    cached columns (zeros where the row is padding); empty when no column is cached. Every row's cache must hold
    at least ``lengths[i] - fed`` tokens of its prompt. Its `GrowingLayer`s keep room for the `fed` tokens and
    `spare` more (the tokens `generate` will add).

    With `shared`, the cache of a prefix all the prompts start with (the first ``P`` columns of every row, before
    its padding): the layers hold only the columns after it, ``max(lengths) - P - fed``, and count ``P`` in their
    length (attend to it with `peftprompt.selfask.shared_prefix`)."""
    skip = prefix_length(shared)
    cache = DynamicCache(config=config)
    cache.layers = [GrowingLayer(spare=fed + spare, offset=skip) for _ in cache.layers]
    columns = max(lengths) - skip - fed
    if columns <= 0:
        return cache
    reference = next(c for c in caches if c is not None)
    for layer, (key, value) in enumerate(zip(reference.keys, reference.values)):
        heads, _, dim = key.shape
        keys = key.new_zeros(len(caches), heads, columns, dim)
        values = value.new_zeros(len(caches), heads, columns, value.shape[-1])
        for row, (prompt_cache, length) in enumerate(zip(caches, lengths)):
            used = length - skip - fed
            if used > 0:
                keys[row, :, columns - used :], values[row, :, columns - used :] = prompt_cache.states(
                    layer, skip, skip + used)
        cache.layers[layer].update(keys, values)
    return cache


def split(cache: DynamicCache, pads: Sequence[int], sequences: Sequence[Sequence[int]],
          keep: Sequence[int], rows: Optional[Sequence[int]] = None,
          shared: Optional[PromptCache] = None) -> list[PromptCache]:
    """Row ``rows[i]`` (default: i) of a batched `cache` as a `PromptCache` of its first ``keep[i]`` tokens:
    ``sequences[i]`` (the row's tokens without its ``pads[i]`` left-padding columns), as far as the cache holds
    them. With `shared` (the prefix the cache's layers do not hold, `batched`), the `PromptCache` holds the tokens
    after it and points at it."""
    skip = prefix_length(shared)
    result = []
    for row, pad, tokens, n in zip(range(len(pads)) if rows is None else rows, pads, sequences, keep):
        n = min(n, cache.get_seq_length() - pad, len(tokens))
        result.append(PromptCache(
            ids=list(tokens[:n]),
            keys=[layer.keys[row, :, pad : pad + n - skip].clone() for layer in cache.layers],
            values=[layer.values[row, :, pad : pad + n - skip].clone() for layer in cache.layers],
            prefix=shared,
        ))
    return result
