"""Tokenise self-ask episodes once, mask the loss by character spans, and pad or pack them into batches.

`EpisodeEncoder` maps an `Episode`'s character spans to tokens through the tokenizer's offset mapping: a token
is trained only if every character it covers is trained (so no loss leaks onto context at a token boundary),
with the smallest weight among them. `SelfAskCollator` is a ``data_collator`` for `transformers.Trainer`, TRL's
`SFTTrainer` (with ``dataset_kwargs={"skip_prepare_dataset": True}``) or a plain `torch.utils.data.DataLoader`.

Packed rows carry ``position_ids`` that restart at 0 for every episode and no ``attention_mask``:
transformers (``masking_utils.find_packed_sequence_indices``) then builds a block-diagonal causal mask, so no
episode attends to another (Llama, Qwen2, Mistral, ... with eager, SDPA or flash attention). The training engine
skips the masked work: it computes attention one episode at a time (`peftprompt.training.packed_attention`).
Prefix tuning passes ``past_key_values`` and disables that detection: use padding with it.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, Literal, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from .tree import Node
from .unroll import Episode, Unroller

IGNORE_INDEX = -100
Overflow = Literal["drop", "error"]


@dataclass(frozen=True)
class EncodedEpisode:
    """An episode as token ids with its labels (`IGNORE_INDEX` where untrained) and per-token loss weights."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    weights: tuple[float, ...]
    tree_id: Optional[str] = None
    path: str = "root"

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def trained_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)

    def as_features(self) -> dict[str, list]:
        return {"input_ids": list(self.input_ids), "labels": list(self.labels), "loss_weights": list(self.weights)}


class EpisodeTooLongError(ValueError):
    """An episode does not fit in `max_length` tokens and `overflow="error"` was asked for."""


class EpisodeEncoder:
    """Tokenise episodes (and whole trees, cached per tree) into `EncodedEpisode`s.

    Args:
        tokenizer (`PreTrainedTokenizerBase`): A fast tokenizer (offset mappings are needed).
        max_length (`int`, *optional*): Longest episode in tokens. A longer one is never cut, since that would
            cut its final answer: it is dropped and counted in `dropped` (`overflow="drop"`) or raises
            `EpisodeTooLongError` (`overflow="error"`).
        unroller (`Unroller`, *optional*): How trees become episodes (default: recursive self-ask).
        add_eos (`bool`, defaults to `True`): End each episode with the EOS token, trained like the final answer.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        max_length: Optional[int] = None,
        unroller: Optional[Unroller] = None,
        add_eos: bool = True,
        overflow: Overflow = "drop",
    ) -> None:
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(f"{type(tokenizer).__name__} is not a fast tokenizer: offset mappings are needed")
        if overflow not in ("drop", "error"):
            raise ValueError(f"overflow must be 'drop' or 'error', got {overflow!r}")
        if max_length is not None and max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.unroller = unroller or Unroller()
        self.eos_token_id = tokenizer.eos_token_id if add_eos else None
        self.overflow = overflow
        self.dropped: Counter[str] = Counter()
        self._cache: dict[str, list[EncodedEpisode]] = {}

    def encode(self, episode: Episode) -> Optional[EncodedEpisode]:
        """Token ids, labels and weights of `episode`; `None` if it is too long and dropped."""
        encoding = self.tokenizer(episode.text, return_offsets_mapping=True, add_special_tokens=True)
        char_weight = np.zeros(len(episode.text) + 1, dtype=np.float32)
        for span in episode.spans:
            char_weight[span.start : span.end] = span.weight
        ids, weights = list(encoding["input_ids"]), []
        for start, end in encoding["offset_mapping"]:
            weights.append(float(char_weight[start:end].min()) if end > start else 0.0)
        if self.eos_token_id is not None and (not ids or ids[-1] != self.eos_token_id):
            ids.append(self.eos_token_id)
            weights.append(episode.spans[-1].weight)
        if self.max_length is not None and len(ids) > self.max_length:
            message = (
                f"episode {episode.dataset}/{episode.tree_id} at {episode.path} has {len(ids)} tokens, "
                f"more than max_length={self.max_length}"
            )
            if self.overflow == "error":
                raise EpisodeTooLongError(message)
            self.dropped["longer than max_length"] += 1
            return None
        labels = [i if w > 0 else IGNORE_INDEX for i, w in zip(ids, weights)]
        return EncodedEpisode(tuple(ids), tuple(labels), tuple(weights), episode.tree_id, episode.path)

    def encode_tree(self, tree: Union[Node, Mapping[str, Any]]) -> list[EncodedEpisode]:
        """Unroll and encode `tree` (a `Node` or its dict), tokenising each distinct tree only once."""
        node = tree if isinstance(tree, Node) else Node.from_dict(without_nulls(tree))
        key = hashlib.sha1(json.dumps(node.to_dict(), sort_keys=True).encode()).hexdigest()
        if key not in self._cache:
            encoded = (self.encode(e) for e in self.unroller(node))
            self._cache[key] = [e for e in encoded if e is not None]
        return self._cache[key]

    def encode_all(self, trees: Iterable[Union[Node, Mapping[str, Any]]]) -> list[EncodedEpisode]:
        return [e for tree in trees for e in self.encode_tree(tree)]


def without_nulls(record: Mapping[str, Any]) -> dict[str, Any]:
    """A tree dict without the `None` fields that a `datasets.Dataset` adds when it stores trees of mixed shapes
    (Arrow gives every row every field of the schema, e.g. ``children=None`` on leaves)."""

    def clean(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {k: clean(v) for k, v in value.items() if v is not None}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    return clean(record)


def pack_episodes(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Group episode indices into as few rows of at most `max_length` tokens as first-fit decreasing finds, balanced
    so that the longest row, which the batch is padded to, is as short as possible.

    With the number of rows fixed by first-fit decreasing, the episodes are dealt longest first to the row holding
    the fewest tokens; that layout is kept when it fits and its longest row is shorter. Returns the rows as lists of
    indices, each row in the original order of its episodes.
    """
    too_long = [n for n in lengths if n > max_length]
    if too_long:
        raise ValueError(f"an episode of {too_long[0]} tokens does not fit in a row of max_length={max_length}")
    longest_first = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    free: list[int] = []
    for index in longest_first:
        for row, space in enumerate(free):
            if lengths[index] <= space:
                rows[row].append(index)
                free[row] -= lengths[index]
                break
        else:
            rows.append([index])
            free.append(max_length - lengths[index])
    balanced: list[list[int]] = [[] for _ in rows]
    loads = [0] * len(rows)
    for index in longest_first:
        lightest = loads.index(min(loads))
        balanced[lightest].append(index)
        loads[lightest] += lengths[index]
    if rows and max(loads) < max_length - min(free):
        rows = balanced
    return [sorted(row) for row in rows]


def concat_rows(rows: Sequence[Mapping[str, Sequence]]) -> dict[str, list]:
    """Concatenate episode rows (``input_ids``, ``labels``, ``loss_weights``) into one packed row whose
    ``position_ids`` restart at 0 for each episode."""
    out: dict[str, list] = {"input_ids": [], "labels": [], "loss_weights": [], "position_ids": []}
    for row in rows:
        for key in ("input_ids", "labels", "loss_weights"):
            out[key] += row[key]
        out["position_ids"] += row.get("position_ids") or range(len(row["input_ids"]))
    return out


def pack_rows(rows: Sequence[Mapping[str, Sequence]], max_length: int) -> list[dict[str, list]]:
    """Pack episode rows (e.g. `EncodedEpisode.as_features()`) into as few rows of `max_length` as possible."""
    groups = pack_episodes([len(row["input_ids"]) for row in rows], max_length)
    return [concat_rows([rows[i] for i in group]) for group in groups]


class SelfAskCollator:
    """Batch self-ask episodes for causal-LM training, padded or packed.

    Each feature may be a tree (a `Node` or its dict: unrolled and tokenised once, then cached), an `Episode`, an
    `EncodedEpisode`, or a dict with ``input_ids`` and ``labels`` (optionally ``loss_weights`` and, for rows
    packed beforehand with `pack_rows`, ``position_ids``).

    Args:
        tokenizer (`PreTrainedTokenizerBase`): Gives the pad token (its EOS when it has none).
        max_length (`int`, defaults to 512): Longest episode, and the row length when packing.
        packing (`bool`, defaults to `False`): Pack the batch's episodes into as few rows of `max_length` as
            possible, with ``position_ids`` restarting per episode and no ``attention_mask``.
        pad_to_multiple_of (`int`, *optional*): Round the batch length up to a multiple of this.
        unroller (`Unroller`, *optional*): How trees become episodes.
        return_loss_weights (`bool` or ``"auto"``): Add ``loss_weights`` (float, 0 where untrained); ``"auto"``
            adds them only when some weight is neither 0 nor 1; the training engine weights each token's loss by
            them (``sum(w * ce) / sum(w)`` over the next-token predictions).

    Example:
        ```py
        >>> collator = SelfAskCollator(tokenizer, max_length=512, packing=True)
        >>> batch = collator([tree.to_dict() for tree in trees[:8]])
        >>> loss = model(**{k: v for k, v in batch.items() if k != "loss_weights"}).loss
        ```
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        max_length: int = 512,
        packing: bool = False,
        pad_to_multiple_of: Optional[int] = None,
        unroller: Optional[Unroller] = None,
        return_loss_weights: Union[bool, Literal["auto"]] = "auto",
        overflow: Overflow = "drop",
    ) -> None:
        self.encoder = EpisodeEncoder(tokenizer, max_length, unroller, overflow=overflow)
        self.max_length = max_length
        self.packing = packing
        self.pad_to_multiple_of = pad_to_multiple_of
        self.return_loss_weights = return_loss_weights
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise ValueError(f"{type(tokenizer).__name__} has neither a pad token nor an EOS token to pad with")
        self.pad_token_id = pad
        self.counts: Counter[str] = Counter()

    @property
    def dropped(self) -> Counter:
        """Episodes left out so far, by reason (too long, or a node without an answer)."""
        return self.encoder.dropped + self.encoder.unroller.skipped

    @property
    def pad_fraction(self) -> float:
        """Share of the positions in all batches so far that held padding."""
        total = self.counts["episode_tokens"] + self.counts["pad_tokens"]
        return self.counts["pad_tokens"] / total if total else 0.0

    def _rows(self, features: Sequence[Any]) -> list[dict[str, list]]:
        rows: list[dict[str, list]] = []
        for feature in features:
            if isinstance(feature, EncodedEpisode):
                rows.append(feature.as_features())
            elif isinstance(feature, Episode):
                encoded = self.encoder.encode(feature)
                rows += [encoded.as_features()] if encoded else []
            elif isinstance(feature, Node) or (isinstance(feature, Mapping) and "question" in feature):
                rows += [e.as_features() for e in self.encoder.encode_tree(feature)]
            elif isinstance(feature, Mapping) and "input_ids" in feature and "labels" in feature:
                row = {k: list(feature[k]) for k in ("input_ids", "labels", "loss_weights", "position_ids") if k in feature}
                row.setdefault("loss_weights", [float(label != IGNORE_INDEX) for label in row["labels"]])
                rows.append(row)
            else:
                raise ValueError(
                    "SelfAskCollator: each feature must be a tree (Node or dict with 'question'), an Episode, an "
                    f"EncodedEpisode or a dict with 'input_ids' and 'labels'; got {type(feature).__name__}"
                    + (f" with keys {sorted(feature)}" if isinstance(feature, Mapping) else "")
                )
        return rows

    def __call__(self, features: Sequence[Any]) -> dict[str, torch.Tensor]:
        rows = self._rows(features)
        if not rows:
            raise ValueError("SelfAskCollator: no episode left in this batch (all dropped; see collator.dropped)")
        packed = self.packing or any("position_ids" in row for row in rows)
        if self.packing:
            rows = pack_rows(rows, self.max_length)
        length = max(len(row["input_ids"]) for row in rows)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        tokens = sum(len(row["input_ids"]) for row in rows)
        self.counts.update(episode_tokens=tokens, pad_tokens=length * len(rows) - tokens, rows=len(rows))
        batch = {
            "input_ids": self._pad([r["input_ids"] for r in rows], length, self.pad_token_id),
            "labels": self._pad([r["labels"] for r in rows], length, IGNORE_INDEX),
        }
        if packed:
            # Padding continues as one more (untrained) sequence whose positions restart at 0.
            positions = [list(r.get("position_ids") or range(len(r["input_ids"]))) for r in rows]
            batch["position_ids"] = torch.tensor([p + list(range(length - len(p))) for p in positions])
        else:
            batch["attention_mask"] = self._pad([[1] * len(r["input_ids"]) for r in rows], length, 0)
        weights = [r["loss_weights"] for r in rows]
        if self.return_loss_weights is True or (
            self.return_loss_weights == "auto" and any(0.0 < w < 1.0 for row in weights for w in row)
        ):
            batch["loss_weights"] = self._pad(weights, length, 0.0, torch.float32)
        return batch

    @staticmethod
    def _pad(rows: Sequence[Sequence], length: int, value, dtype: torch.dtype = torch.long) -> torch.Tensor:
        return torch.tensor([list(r) + [value] * (length - len(r)) for r in rows], dtype=dtype)

