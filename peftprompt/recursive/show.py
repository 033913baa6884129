"""Render collated batches back as text with the trained tokens highlighted, to see what the model is taught."""

from __future__ import annotations

from typing import Mapping, Optional

import torch
from rich.text import Text
from transformers import PreTrainedTokenizerBase

from .collator import IGNORE_INDEX

TRAINED_STYLE = "bold green"
WEIGHTED_STYLE = "yellow"
CONTEXT_STYLE = "dim"
EPISODE_SEPARATOR = "\n──── next episode (positions restart) ────\n"
LEGEND = Text.assemble(
    ("trained", TRAINED_STYLE), "  ", ("weighted (0 < w < 1)", WEIGHTED_STYLE), "  ", ("no loss", CONTEXT_STYLE)
)


def render_row(
    tokenizer: PreTrainedTokenizerBase,
    input_ids: list[int],
    labels: list[int],
    weights: Optional[list[float]] = None,
    position_ids: Optional[list[int]] = None,
    plain: bool = False,
) -> Text:
    """One batch row as rich `Text`: trained tokens green, weighted ones yellow, the rest dim.

    With `plain`, trained text is wrapped in ``[[...]]`` instead of coloured (for logs and files). Trailing
    padding is left out; in packed rows a rule marks where each episode starts.
    """
    end = len(input_ids)
    if position_ids is not None:  # packed: trailing padding is the last restart made only of untrained pad tokens
        starts = [i for i, p in enumerate(position_ids) if p == 0]
        if len(starts) > 1 and all(label == IGNORE_INDEX for label in labels[starts[-1] :]) and (
            set(input_ids[starts[-1] :]) == {tokenizer.pad_token_id}
        ):
            end = starts[-1]
    elif tokenizer.pad_token_id is not None:
        while end > 0 and input_ids[end - 1] == tokenizer.pad_token_id and labels[end - 1] == IGNORE_INDEX:
            end -= 1
    text, open_plain = Text(), False
    for i in range(end):
        if position_ids is not None and i > 0 and position_ids[i] == 0:
            if open_plain:
                text.append("]]")
                open_plain = False
            text.append(EPISODE_SEPARATOR, style="cyan")
        piece = tokenizer.decode([input_ids[i]])
        trained = labels[i] != IGNORE_INDEX
        weight = weights[i] if weights is not None else float(trained)
        if plain:
            if trained != open_plain:
                text.append("[[" if trained else "]]")
                open_plain = trained
            text.append(piece)
        else:
            style = CONTEXT_STYLE if not trained else (TRAINED_STYLE if weight >= 1.0 else WEIGHTED_STYLE)
            text.append(piece, style=style)
    if open_plain:
        text.append("]]")
    return text


def render_batch(
    batch: Mapping[str, torch.Tensor], tokenizer: PreTrainedTokenizerBase, plain: bool = False
) -> list[Text]:
    """Every row of a `SelfAskCollator` batch rendered with `render_row`."""
    rows = []
    for r in range(batch["input_ids"].shape[0]):
        rows.append(
            render_row(
                tokenizer,
                batch["input_ids"][r].tolist(),
                batch["labels"][r].tolist(),
                batch["loss_weights"][r].tolist() if "loss_weights" in batch else None,
                batch["position_ids"][r].tolist() if "position_ids" in batch else None,
                plain=plain,
            )
        )
    return rows
