"""`model.generate` of a transformers causal LM as a `GenerationBackend` (`peftprompt.selfask.backend`).

Generation is greedy and batched (``batch_size`` prompts a call, left padding). Each row stops where its request's
`StopRule` says, at EOS or after its ``max_new_tokens``, checked by `RowStops` (transformers' `StoppingCriteria`) as
each token comes: a row's new token is decoded in a window of the few tokens before it (`Detokenizer`) and the rule
checked over the text that can still complete one of its strings (`StopWatch`), so a token costs the same however
long the continuation has grown. Rows that stopped leave the batch: a `generate` call ends once a quarter of its rows
have stopped, and the rows still going continue from the same cache, narrowed to them, in a new call.

With ``reuse_kv_cache``, a prompt continues from the KV cache of its previous step (`GenerationRequest.cache`) or of
its few-shot prefix (`GenerationRequest.prefix`, encoded once), whichever holds more of its tokens, so a step feeds
only the tokens its prompt gained (`peftprompt.selfask.kv_cache`); a batch whose prompts all start with the same
prefix holds that prefix's keys and values once (`peftprompt.selfask.shared_prefix`).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Optional, Sequence

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from . import kv_cache
from .backend import Continuation, GenerationBackend, GenerationRequest
from .kv_cache import PromptCache
from .shared_prefix import shared_prefix_attention, supports_shared_prefix
from .stopping import StopRule, StopWatch


class Detokenizer:
    """The text of a row's generated tokens, token by token, as ``tokenizer.decode(ids, skip_special_tokens=True)``
    gives it for all of them: each token is decoded with the tokens since the last complete text before it (so a
    word's leading space and a character split over several tokens come out right), and the text is committed once
    it does not end in an incomplete character (``\\ufffd``)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = self.read = 0  # ids[prefix:read]: the context of the text not yet committed, already committed

    def push(self, token: int) -> tuple[str, bool]:
        """Add `token`; returns the text not yet committed and whether it is now committed."""
        self.ids.append(token)
        before = self.tokenizer.decode(self.ids[self.prefix : self.read], skip_special_tokens=True)
        now = self.tokenizer.decode(self.ids[self.prefix :], skip_special_tokens=True)
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return now[len(before) :], True
        return now[len(before) :], False


class RowStops(StoppingCriteria):
    """transformers' stopping criteria for a batch whose rows each stop on their own `StopRule`, at EOS or after
    their own number of tokens, checked on each new token only (`Detokenizer`, `StopWatch`). A row that has stopped
    is done; once a quarter of the rows in the call are done, every row is (the call ends, and the rows still going
    continue in a new call: `active`, the batch rows in the current call, is narrowed to them).

    Args:
        tokenizer: Decodes the new tokens.
        rules (`Sequence[StopRule]`), limits (`Sequence[int]`): Per row, where it stops and its most new tokens.
        width (`int`): The prompts' columns: tokens after them are generated.
    """

    def __init__(self, tokenizer, rules: Sequence[StopRule], limits: Sequence[int], width: int):
        self.eos = tokenizer.eos_token_id
        self.limits = list(limits)
        self.decoded = [Detokenizer(tokenizer) for _ in rules]
        self.watches: list[StopWatch] = [rule.watch() for rule in rules]
        self.stopped_at: list[Optional[int]] = [None] * len(rules)  # per row, its tokens kept (up to its stop)
        self.active = list(range(len(rules)))
        self.read = width  # the columns already checked

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        new = input_ids[:, self.read :].tolist()
        self.read = input_ids.shape[1]
        done = []
        for row, tokens in zip(self.active, new):
            for token in tokens if self.stopped_at[row] is None else ():
                if self._stops(row, token):
                    self.stopped_at[row] = len(self.decoded[row].ids)
                    break
            done.append(self.stopped_at[row] is not None)
        if 4 * sum(done) >= len(done):  # end the call: the rows still going continue without these
            done = [True] * len(done)
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    def _stops(self, row: int, token: int) -> bool:
        text, committed = self.decoded[row].push(token)
        if len(self.decoded[row].ids) >= self.limits[row] or (self.eos is not None and token == self.eos):
            return True
        watch = self.watches[row]
        return watch.feed(text) if committed else watch.peek(text)


class BanFirstTokens(LogitsProcessor):
    """Bans, per row, tokens as the first one generated (`first_tokens`: row -> token ids) after `width` columns."""

    def __init__(self, first_tokens: dict[int, list[int]], width: int):
        self.first_tokens, self.width = first_tokens, width

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[1] == self.width:
            for row, ids in self.first_tokens.items():
                scores[row, ids] = -float("inf")
        return scores


class TransformersBackend(GenerationBackend):
    """Greedy `model.generate` on batches of requests (see the module docstring).

    Args:
        model, tokenizer: A transformers causal LM (PEFT-wrapped or not) and its tokenizer (given EOS as its pad token
            when it has none).
        batch_size (`int`, defaults to 64): Prompts per `generate` call.
        reuse_kv_cache (`bool`, defaults to `True`): Continue each prompt from its previous step's cache or its
            few-shot prefix's; off, or for a model that cannot (`kv_cache.supports_reuse`, e.g. under prefix
            tuning), every step encodes its whole prompt again.

    Attributes:
        reuse_kv_cache (`bool`): Whether caches are reused.
        share_prefix (`bool`): Whether a batch of prompts with the same few-shot prefix holds its cache once (with
            ``reuse_kv_cache``, for a model that can: `supports_shared_prefix`).
    """

    def __init__(self, model, tokenizer, batch_size: int = 64, reuse_kv_cache: bool = True):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.reuse_kv_cache = reuse_kv_cache and kv_cache.supports_reuse(model)
        self.share_prefix = self.reuse_kv_cache and supports_shared_prefix(model)
        self._prefix_caches: dict[str, PromptCache] = {}
        self._prefix_heads: dict[tuple[int, int], PromptCache] = {}  # their first n tokens, shared by a batch

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Continuation]:
        """`_generate_batches`, where the model can share a few-shot prefix's cache across a batch
        (`_shared_prefix`) on the requests of each prefix (or none) apart, in their order."""
        requests = list(requests)
        if not self.share_prefix:
            return self._generate_batches(requests)
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(request.prefix, []).append(i)
        results: list[Optional[Continuation]] = [None] * len(requests)
        for rows in groups.values():
            for i, out in zip(rows, self._generate_batches([requests[i] for i in rows])):
                results[i] = out
        return results

    def prefix_cache(self, prefix: str) -> Optional[PromptCache]:
        """The KV cache of the few-shot `prefix` (computed once), or `None` for no prefix."""
        if not prefix:
            return None
        if prefix not in self._prefix_caches:
            self._prefix_caches[prefix] = kv_cache.encode(self.model, self.tokenizer(prefix)["input_ids"])
        return self._prefix_caches[prefix]

    def _shared_prefix(self, requests: list[GenerationRequest], encoded: list[list[int]]) -> Optional[PromptCache]:
        """When every request of a batch has the same few-shot prefix and the model can attend to it once for the
        whole batch (`peftprompt.selfask.shared_prefix`): the cache of the prefix's tokens that every prompt's tokens
        start with (its last token may merge with the question's first, e.g. ``\\n\\n``)."""
        prefix = self.prefix_cache(requests[0].prefix) if self.share_prefix else None
        if prefix is None or any(r.prefix != requests[0].prefix for r in requests[1:]):
            return None
        n = min(prefix.reusable(ids) for ids in encoded)  # a prompt's tokens may merge across the prefix's end
        if n in (0, len(prefix.ids)):
            return prefix if n else None
        if (id(prefix), n) not in self._prefix_heads:
            self._prefix_heads[id(prefix), n] = prefix.head(n)
        return self._prefix_heads[id(prefix), n]

    def _generate_batches(self, requests: list[GenerationRequest]) -> list[Continuation]:
        """Greedy `model.generate` on the requests in batches of `batch_size` (left padding, KV cache on); row i
        stops at its rule, at EOS or after its ``max_new_tokens``, and may not start with its banned word (its first
        token, with and without a leading space). With `reuse_kv_cache`, row i continues from its request's cache or
        its prefix's cache, whichever holds more of its tokens, and, when its request keeps its cache, its
        continuation carries the cache of its prompt and kept tokens. A batch whose prompts all start with the same
        few-shot prefix holds that prefix's keys and values once (`_shared_prefix`): its rows are padded after the
        prefix, not before."""
        tokenizer = self.tokenizer
        if tokenizer.pad_token is None:  # as load_backbone does: pad with EOS (left padding, masked)
            tokenizer.pad_token = tokenizer.eos_token
        eos = tokenizer.eos_token_id
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        device = next(self.model.parameters()).device
        results: list[Continuation] = []
        for start in range(0, len(requests), self.batch_size):
            chunk = requests[start : start + self.batch_size]
            encoded = tokenizer([r.prompt for r in chunk])["input_ids"]
            lengths = [len(ids) for ids in encoded]
            width = max(lengths)
            reused: list[Optional[PromptCache]] = [None] * len(chunk)
            fed, shared = width, None
            if self.reuse_kv_cache:
                shared = self._shared_prefix(chunk, encoded)
                for row, (request, ids) in enumerate(zip(chunk, encoded)):
                    options = [c for c in (request.cache, self.prefix_cache(request.prefix)) if c is not None]
                    reused[row] = max(options, key=lambda c: c.reusable(ids), default=None)
                fed = max(n - (c.reusable(ids) if c is not None else 0)
                          for n, c, ids in zip(lengths, reused, encoded))
            skip = kv_cache.prefix_length(shared)
            pads = [width - n for n in lengths]
            input_ids = torch.tensor([ids[:skip] + [pad] * p + ids[skip:] for p, ids in zip(pads, encoded)],
                                     device=device)
            attention_mask = torch.tensor([[1] * skip + [0] * p + [1] * (n - skip) for p, n in zip(pads, lengths)],
                                          device=device)
            limits = [r.max_new_tokens for r in chunk]
            past = (kv_cache.batched(reused, lengths, fed, self.model.config, spare=max(limits), shared=shared)
                    if self.reuse_kv_cache else None)
            first_tokens = {row: sorted({tokenizer(text, add_special_tokens=False)["input_ids"][0]
                                         for text in (" " + r.banned_first_word, r.banned_first_word)})
                            for row, r in enumerate(chunk) if r.banned_first_word}
            keep = [self.reuse_kv_cache and r.keep_cache for r in chunk]
            decoded = self._decode(input_ids, attention_mask, past, chunk, first_tokens, pads, lengths, keep, shared)
            for request, (ids, cache) in zip(chunk, decoded):
                text = tokenizer.decode(ids, skip_special_tokens=True)
                end = request.stop.index(text)
                results.append(Continuation(text if end is None else text[:end], len(ids),
                                            eos is not None and eos in ids, cache))
        return results

    def _decode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, past, requests: list[GenerationRequest],
                first_tokens: dict[int, list[int]], pads: list[int], lengths: list[int], keep: list[bool],
                shared: Optional[PromptCache] = None) -> list[tuple[list[int], Optional[PromptCache]]]:
        """Greedy `model.generate` of one left-padded batch (`pads` and `lengths`: per row, its padding and prompt
        tokens): per row, the generated token ids kept (up to its stop, EOS included) and, where `keep`, the
        `PromptCache` of its prompt and kept tokens. With `shared`, the prefix every row starts with, held once
        (`kv_cache.batched`): each row's padding comes after it, and the model attends to it with
        `shared_prefix_attention`. Finished rows do not ride along (`RowStops`); `first_tokens` bans, per row, first
        tokens (`BanFirstTokens`)."""
        tokenizer = self.tokenizer
        eos = tokenizer.eos_token_id
        width = input_ids.shape[1]
        limits = [r.max_new_tokens for r in requests]
        stops = RowStops(tokenizer, [r.stop for r in requests], limits, width)
        kept: list[list[int]] = [[] for _ in requests]
        row_caches: list[Optional[PromptCache]] = [None] * len(requests)
        processors = LogitsProcessorList([BanFirstTokens(first_tokens, width)] if first_tokens else [])
        sequences, mask = input_ids, attention_mask
        skip = kv_cache.prefix_length(shared)
        with torch.no_grad(), shared_prefix_attention(self.model, shared) if shared is not None else nullcontext():
            while stops.active:
                active = stops.active
                out = self.model.generate(
                    input_ids=sequences, attention_mask=mask, past_key_values=past,
                    max_new_tokens=max(limits[row] for row in active) - (sequences.shape[1] - width),
                    do_sample=False, return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=eos, stopping_criteria=StoppingCriteriaList([stops]), logits_processor=processors,
                )
                finished = [i for i, row in enumerate(active) if stops.stopped_at[row] is not None]
                if not finished:
                    raise RuntimeError("generate ended before any row reached a stop")
                tokens = out.sequences.tolist()
                for i in finished:
                    ids = tokens[i][width : width + stops.stopped_at[active[i]]]
                    kept[active[i]] = ids[: ids.index(eos) + 1] if eos is not None and eos in ids else ids
                cached = [i for i in finished if keep[active[i]]]
                if cached:
                    caches = kv_cache.split(out.past_key_values, [pads[active[i]] for i in cached],
                                            [tokens[i][:skip] + tokens[i][skip + pads[active[i]]:] for i in cached],
                                            [lengths[active[i]] + len(kept[active[i]]) for i in cached],
                                            rows=cached, shared=shared)
                    for i, cache in zip(cached, caches):
                        row_caches[active[i]] = cache
                going = [i for i, row in enumerate(active) if stops.stopped_at[row] is None]
                if going:
                    index = torch.tensor(going, device=out.sequences.device)
                    past = out.past_key_values
                    past.batch_select_indices(index)
                    grown = out.sequences.shape[1] - mask.shape[1]
                    mask = torch.cat([mask, mask.new_ones(mask.shape[0], grown)], dim=1)[index]
                    sequences = out.sequences[index]
                stops.active = [active[i] for i in going]
        return list(zip(kept, row_caches))
