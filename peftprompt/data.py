"""Read the shared data sets (``../shared/data``) with errors that name the file, line and field."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

from datasets import Dataset
from transformers import PreTrainedTokenizerBase

DATA_ENV_VAR = "PEFTPROMPT_DATA"
SST2_SPLITS = ("train", "dev", "test")
SST2_HEADER = ["sentence", "label"]


def data_root() -> Path:
    """The shared data folder: ``$PEFTPROMPT_DATA`` if set, else ``shared/data`` next to the repository."""
    env = os.environ.get(DATA_ENV_VAR)
    root = Path(env).expanduser() if env else Path(__file__).resolve().parents[2] / "shared" / "data"
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {root} does not exist: set ${DATA_ENV_VAR} to the folder holding sst2/")
    return root


def read_sst2(split: str, limit: Optional[int] = None) -> list[tuple[str, int]]:
    """Read ``sst2/{split}.tsv`` (header ``sentence<TAB>label``) as `(sentence, label)` pairs.

    Args:
        split (`str`): ``"train"``, ``"dev"`` or ``"test"``.
        limit (`int`, *optional*): Read only the first `limit` rows.

    Raises:
        `ValueError`: naming the file, line and field of the first malformed row, e.g.
            ``.../train.tsv:17: field 'label' must be 0 or 1, got 'x'``.
    """
    if split not in SST2_SPLITS:
        raise ValueError(f"split must be one of {', '.join(SST2_SPLITS)}, got {split!r}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    path = data_root() / "sst2" / f"{split}.tsv"
    rows: list[tuple[str, int]] = []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if limit is not None and len(rows) >= limit:
                break
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not valid UTF-8 ({err.reason} at byte {err.start})") from err
            fields = line.split("\t")
            if lineno == 1:
                if fields != SST2_HEADER:
                    raise ValueError(f"{path}:1: header must be 'sentence<TAB>label', got {line!r}")
                continue
            if not line:
                continue
            if len(fields) != 2:
                raise ValueError(f"{path}:{lineno}: expected 2 fields (sentence<TAB>label), got {len(fields)}")
            sentence, label = fields[0].strip(), fields[1].strip()
            if not sentence:
                raise ValueError(f"{path}:{lineno}: field 'sentence' is empty")
            if label not in ("0", "1"):
                raise ValueError(f"{path}:{lineno}: field 'label' must be 0 or 1, got {fields[1]!r}")
            rows.append((sentence, int(label)))
    if not rows and limit != 0:
        raise ValueError(f"{path}: no rows after the header")
    return rows


def sst2_dataset(
    tokenizer: PreTrainedTokenizerBase,
    split: str,
    max_length: int = 64,
    limit: Optional[int] = None,
    padding: Union[bool, str] = False,
) -> Dataset:
    """SST-2 `split` tokenised: columns ``input_ids``, ``attention_mask`` (``token_type_ids``) and ``labels``.

    Args:
        tokenizer (`PreTrainedTokenizerBase`): The backbone's tokenizer.
        split (`str`): ``"train"``, ``"dev"`` or ``"test"``.
        max_length (`int`, defaults to 64): Sentences are truncated to this many tokens.
        limit (`int`, *optional*): Use only the first `limit` rows.
        padding (`bool` or `str`, defaults to `False`): Passed to the tokenizer; ``"max_length"`` gives rows of
            exactly `max_length` tokens, `False` leaves padding to the data collator.
    """
    rows = read_sst2(split, limit)
    raw = Dataset.from_dict({"sentence": [s for s, _ in rows], "labels": [label for _, label in rows]})
    return raw.map(
        lambda batch: tokenizer(batch["sentence"], truncation=True, max_length=max_length, padding=padding),
        batched=True,
        remove_columns=["sentence"],
        desc=f"tokenising sst2 {split}",
    )
