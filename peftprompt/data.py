"""Read the shared data sets (``../shared/data``) with errors that name the file, line and field."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Optional, Union

from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from .training.metrics import iob1_to_iob2

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


def numbered_lines(path: Path) -> Iterator[tuple[int, str]]:
    """``(line number, line)`` of a UTF-8 text file, line endings stripped; bad UTF-8 names the file and line."""
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                yield lineno, raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not valid UTF-8 ({err.reason} at byte {err.start})") from err


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
    for lineno, line in numbered_lines(path):
        if limit is not None and len(rows) >= limit:
            break
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


# CoNLL-2003 English NER -------------------------------------------------------------------------------------------

CONLL03_SPLITS = ("train", "testa", "testb")
# The 9 NER tags in IOB2, in the order of the Hugging Face `conll2003` data set; label ids index this tuple.
CONLL03_LABELS = ("O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC")
CONLL03_FIELDS = ("token", "pos", "chunk", "ner")
# Columns of `conll03_dataset` that map token predictions back to words; drop them before a data collator
# (`dataset.remove_columns(list(CONLL03_WORD_COLUMNS))`); `transformers.Trainer` drops them itself.
CONLL03_WORD_COLUMNS = ("word_ids", "word_count")


def read_conll03(split: str, limit: Optional[int] = None) -> list[tuple[list[str], list[str]]]:
    """Read ``conll2003/eng.{split}`` as `(words, ner_tags)` sentences, tags in IOB2 (`CONLL03_LABELS`).

    The file has one token per line as ``token POS chunk NER`` (space-separated) and a blank line between sentences;
    ``-DOCSTART-`` lines are skipped. Tags are converted from IOB1 to IOB2 (`peftprompt.training.metrics.iob1_to_iob2`), so the original
    IOB1 release and the IOB2 re-release (the copy in ``../shared/data``, see its SOURCE.md) read the same.

    Args:
        split (`str`): ``"train"`` (14,041 sentences), ``"testa"`` (validation, 3,250) or ``"testb"`` (test, 3,453).
        limit (`int`, *optional*): Read only the first `limit` sentences.

    Raises:
        `ValueError`: naming the file, line and field of the first malformed line, e.g.
            ``.../eng.train:12: field 'ner' must be one of O, B-PER, ..., got 'B-FOO'``.
        `FileNotFoundError`: if the file is missing.
    """
    if split not in CONLL03_SPLITS:
        raise ValueError(f"split must be one of {', '.join(CONLL03_SPLITS)}, got {split!r}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    path = data_root() / "conll2003" / f"eng.{split}"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: CoNLL-2003 is not redistributed, put eng.{split} there")
    sentences: list[tuple[list[str], list[str]]] = []
    words: list[str] = []
    tags: list[str] = []

    def close_sentence() -> None:
        if words:
            sentences.append((list(words), iob1_to_iob2(tags)))
            words.clear()
            tags.clear()

    for lineno, line in numbered_lines(path):
        if limit is not None and len(sentences) >= limit:
            break
        fields = line.split()
        if not fields:
            close_sentence()
            continue
        if fields[0] == "-DOCSTART-":
            close_sentence()
            continue
        if len(fields) != len(CONLL03_FIELDS):
            raise ValueError(
                f"{path}:{lineno}: expected {len(CONLL03_FIELDS)} space-separated fields "
                f"({' '.join(CONLL03_FIELDS)}), got {len(fields)}"
            )
        if fields[3] not in CONLL03_LABELS:
            raise ValueError(
                f"{path}:{lineno}: field 'ner' must be one of {', '.join(CONLL03_LABELS)}, got {fields[3]!r}"
            )
        words.append(fields[0])
        tags.append(fields[3])
    if limit is None or len(sentences) < limit:
        close_sentence()
    if not sentences and limit != 0:
        raise ValueError(f"{path}: no sentences")
    return sentences


def conll03_dataset(
    tokenizer: PreTrainedTokenizerBase,
    split: str,
    max_length: int = 128,
    limit: Optional[int] = None,
    label_all_subtokens: bool = False,
) -> Dataset:
    """CoNLL-2003 `split` tokenised for token classification, labels aligned to sub-tokens.

    Columns: ``input_ids``, ``attention_mask`` (``token_type_ids``), ``labels``, and for mapping predictions back to
    words ``word_ids`` (the word index of each token, -1 for special tokens) and ``word_count`` (words in the
    sentence, before truncation); see `conll03_word_tags`.

    Args:
        tokenizer (`PreTrainedTokenizerBase`): A fast tokenizer (``word_ids()`` is needed).
        split (`str`): ``"train"``, ``"testa"`` or ``"testb"``.
        max_length (`int`, defaults to 128): Sentences are truncated to this many tokens (words cut off get no label;
            `conll03_word_tags` predicts ``O`` for them, so they count as missed entities).
        limit (`int`, *optional*): Use only the first `limit` sentences.
        label_all_subtokens (`bool`, defaults to `False`): By default only the FIRST sub-token of each word carries
            the word's label id (index into `CONLL03_LABELS`); the other sub-tokens and the special tokens get -100.
            With `True` every sub-token is labelled, continuation sub-tokens with ``I-X`` instead of ``B-X``.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"conll03_dataset needs a fast tokenizer (word_ids()), got {type(tokenizer).__name__}")
    rows = read_conll03(split, limit)
    label_id = {label: index for index, label in enumerate(CONLL03_LABELS)}
    # A continuation sub-token of a B-X word is labelled I-X when every sub-token is labelled.
    continuation_id = [label_id["I-" + tag[2:]] if tag.startswith("B-") else i for i, tag in enumerate(CONLL03_LABELS)]
    raw = Dataset.from_dict(
        {"tokens": [words for words, _ in rows], "ner_tags": [[label_id[t] for t in tags] for _, tags in rows]}
    )

    def tokenize(batch: dict) -> dict:
        encoded = tokenizer(batch["tokens"], is_split_into_words=True, truncation=True, max_length=max_length)
        labels, word_ids_column = [], []
        for index, tags in enumerate(batch["ner_tags"]):
            word_ids = encoded.word_ids(index)
            row_labels, previous = [], None
            for word in word_ids:
                if word is None:
                    row_labels.append(-100)
                elif word != previous:
                    row_labels.append(tags[word])
                else:
                    row_labels.append(continuation_id[tags[word]] if label_all_subtokens else -100)
                previous = word
            labels.append(row_labels)
            word_ids_column.append([-1 if word is None else word for word in word_ids])
        encoded["labels"] = labels
        encoded["word_ids"] = word_ids_column
        encoded["word_count"] = [len(words) for words in batch["tokens"]]
        return encoded

    return raw.map(tokenize, batched=True, remove_columns=["tokens", "ner_tags"], desc=f"tokenising conll03 {split}")


def conll03_word_tags(token_predictions, word_ids: list[int], word_count: int) -> list[str]:
    """One predicted tag per word from token-level predictions, for `peftprompt.training.metrics.entity_f1`.

    Args:
        token_predictions: Predicted label ids (indices into `CONLL03_LABELS`) for the tokens of one row, aligned with
            its ``input_ids`` (padding beyond ``len(word_ids)`` is ignored).
        word_ids (`list[int]`): The row's ``word_ids`` column (-1 for special tokens).
        word_count (`int`): The row's ``word_count``; words cut off by truncation are predicted ``O``.

    Each word takes the prediction of its FIRST sub-token.
    """
    tags = ["O"] * word_count
    seen: set[int] = set()
    for position, word in enumerate(word_ids):
        if word < 0 or word in seen:
            continue
        seen.add(word)
        tags[word] = CONLL03_LABELS[int(token_predictions[position])]
    return tags
