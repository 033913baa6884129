"""Read the shared data sets (``../shared/data``) with errors that name the file, line and field."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Optional, Union

from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from .errors import InputError, InputFileNotFoundError

from .metrics import iob1_to_iob2

DATA_ENV_VAR = "PEFTPROMPT_DATA"
SST2_SPLITS = ("train", "dev", "test")
SST2_HEADER = ["sentence", "label"]


def data_root() -> Path:
    """The shared data folder: ``$PEFTPROMPT_DATA`` if set, else ``shared/data`` next to the repository."""
    env = os.environ.get(DATA_ENV_VAR)
    root = Path(env).expanduser() if env else Path(__file__).resolve().parents[2] / "shared" / "data"
    if not root.is_dir():
        raise InputFileNotFoundError(
            f"data folder {root} does not exist: set ${DATA_ENV_VAR} to the folder holding sst2/", file=root
        )
    return root


def numbered_lines(path: Path) -> Iterator[tuple[int, str]]:
    """``(line number, line)`` of a UTF-8 text file, line endings stripped; bad UTF-8 names the file and line."""
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                yield lineno, raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as err:
                raise InputError(f"not valid UTF-8 ({err.reason} at byte {err.start})", file=path,
                                 line=lineno) from err


def read_sst2(split: str, limit: Optional[int] = None, min_words: int = 0) -> list[tuple[str, int]]:
    """Read ``sst2/{split}.tsv`` (header ``sentence<TAB>label``) as `(sentence, label)` pairs.

    Args:
        split (`str`): ``"train"``, ``"dev"`` or ``"test"``.
        limit (`int`, *optional*): Read only the first `limit` rows (of those kept).
        min_words (`int`, defaults to 0): Keep only rows of at least this many words. ``train`` and ``dev`` hold
            GLUE's training phrases (median 7 words, most of them fragments of a sentence) while ``test`` holds
            whole sentences (median 19): ``min_words=10`` makes a validation set shaped like the test set.

    Raises:
        `InputError`: naming the file, line and field of the first malformed row, e.g.
            ``.../train.tsv:17: field 'label' must be 0 or 1, got 'x'``.
    """
    if split not in SST2_SPLITS:
        raise InputError(f"split must be one of {', '.join(SST2_SPLITS)}, got {split!r}", field="split")
    if limit is not None and limit < 0:
        raise InputError(f"limit must be >= 0, got {limit}", field="limit")
    path = data_root() / "sst2" / f"{split}.tsv"
    rows: list[tuple[str, int]] = []
    for lineno, line in numbered_lines(path):
        if limit is not None and len(rows) >= limit:
            break
        fields = line.split("\t")
        if lineno == 1:
            if fields != SST2_HEADER:
                raise InputError(f"header must be 'sentence<TAB>label', got {line!r}", file=path, line=1)
            continue
        if not line:
            continue
        if len(fields) != 2:
            raise InputError(f"expected 2 fields (sentence<TAB>label), got {len(fields)}", file=path, line=lineno)
        sentence, label = fields[0].strip(), fields[1].strip()
        if not sentence:
            raise InputError("field 'sentence' is empty", file=path, line=lineno, field="sentence")
        if label not in ("0", "1"):
            raise InputError(f"field 'label' must be 0 or 1, got {fields[1]!r}", file=path, line=lineno, field="label")
        if len(sentence.split()) >= min_words:
            rows.append((sentence, int(label)))
    if not rows and limit != 0:
        raise InputError("no rows after the header", file=path)
    return rows


def sst2_dataset(
    tokenizer: PreTrainedTokenizerBase,
    split: str,
    max_length: int = 64,
    limit: Optional[int] = None,
    padding: Union[bool, str] = False,
    min_words: int = 0,
) -> Dataset:
    """SST-2 `split` tokenised: columns ``input_ids``, ``attention_mask`` (``token_type_ids``) and ``labels``.

    Args:
        tokenizer (`PreTrainedTokenizerBase`): The backbone's tokenizer.
        split (`str`): ``"train"``, ``"dev"`` or ``"test"``.
        max_length (`int`, defaults to 64): Sentences are truncated to this many tokens.
        limit (`int`, *optional*): Use only the first `limit` rows.
        padding (`bool` or `str`, defaults to `False`): Passed to the tokenizer; ``"max_length"`` gives rows of
            exactly `max_length` tokens, `False` leaves padding to the data collator.
        min_words (`int`, defaults to 0): Only rows of at least this many words (`read_sst2`).
    """
    return labelled_text_dataset(tokenizer, read_sst2(split, limit, min_words), max_length, padding,
                                 desc=f"tokenising sst2 {split}")


def labelled_text_dataset(
    tokenizer: PreTrainedTokenizerBase,
    rows: list[tuple[str, int]],
    max_length: int,
    padding: Union[bool, str] = False,
    desc: str = "tokenising",
) -> Dataset:
    """``(text, label)`` rows tokenised: columns ``input_ids``, ``attention_mask`` (``token_type_ids``) and
    ``labels``; texts truncated to `max_length` tokens, `padding` passed to the tokenizer."""
    raw = Dataset.from_dict({"sentence": [s for s, _ in rows], "labels": [label for _, label in rows]})
    return raw.map(
        lambda batch: tokenizer(batch["sentence"], truncation=True, max_length=max_length, padding=padding),
        batched=True,
        remove_columns=["sentence"],
        desc=desc,
    )


# CoNLL-2003 English NER -------------------------------------------------------------------------------------------

CONLL03_SPLITS = ("train", "testa", "testb")
# The 9 NER tags in IOB2, in the order of the Hugging Face `conll2003` data set; label ids index this tuple.
CONLL03_LABELS = ("O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC")
# The columns of a line of the file; only the token and its NER tag are kept (the POS and chunk tags are checked
# for presence and dropped).
CONLL03_FIELDS = ("token", "pos", "chunk", "ner")


def read_conll03(split: str, limit: Optional[int] = None) -> list[tuple[list[str], list[str]]]:
    """Read ``conll2003/eng.{split}`` as `(words, ner_tags)` sentences, tags in IOB2 (`CONLL03_LABELS`).

    The file has one token per line as ``token POS chunk NER`` (space-separated) and a blank line between sentences;
    ``-DOCSTART-`` lines are skipped. Tags are converted from IOB1 to IOB2 (`peftprompt.metrics.iob1_to_iob2`), so the original
    IOB1 release and the IOB2 re-release (the copy in ``../shared/data``, see its SOURCE.md) read the same.

    Args:
        split (`str`): ``"train"`` (14,041 sentences), ``"testa"`` (validation, 3,250) or ``"testb"`` (test, 3,453).
        limit (`int`, *optional*): Read only the first `limit` sentences.

    Raises:
        `InputError`: naming the file, line and field of the first malformed line, e.g.
            ``.../eng.train:12: field 'ner' must be one of O, B-PER, ..., got 'B-FOO'``.
        `InputFileNotFoundError` (a `FileNotFoundError`): if the file is missing.
    """
    if split not in CONLL03_SPLITS:
        raise InputError(f"split must be one of {', '.join(CONLL03_SPLITS)}, got {split!r}", field="split")
    if limit is not None and limit < 0:
        raise InputError(f"limit must be >= 0, got {limit}", field="limit")
    path = data_root() / "conll2003" / f"eng.{split}"
    if not path.is_file():
        raise InputFileNotFoundError(
            f"{path} is missing: CoNLL-2003 is not redistributed, put eng.{split} there", file=path
        )
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
            raise InputError(
                f"expected {len(CONLL03_FIELDS)} space-separated fields ({' '.join(CONLL03_FIELDS)}), "
                f"got {len(fields)}", file=path, line=lineno,
            )
        if fields[3] not in CONLL03_LABELS:
            raise InputError(
                f"field 'ner' must be one of {', '.join(CONLL03_LABELS)}, got {fields[3]!r}", file=path, line=lineno,
                field="ner",
            )
        words.append(fields[0])
        tags.append(fields[3])
    if limit is None or len(sentences) < limit:
        close_sentence()
    if not sentences and limit != 0:
        raise InputError("no sentences", file=path)
    return sentences


def conll03_dataset(
    tokenizer: PreTrainedTokenizerBase,
    split: str,
    max_length: int = 128,
    limit: Optional[int] = None,
    label_all_subtokens: bool = False,
) -> Dataset:
    """CoNLL-2003 `split` tokenised for token classification, labels aligned to sub-tokens.

    Columns: ``input_ids``, ``attention_mask`` (``token_type_ids``) and ``labels``. Training and evaluation score
    the labelled sub-tokens only (one per word by default), so no word-level mapping is needed.

    Args:
        tokenizer (`PreTrainedTokenizerBase`): A fast tokenizer (``word_ids()`` is needed).
        split (`str`): ``"train"``, ``"testa"`` or ``"testb"``.
        max_length (`int`, defaults to 128): Sentences are truncated to this many tokens (words cut off get no label
            and are not scored).
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
        labels = []
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
        encoded["labels"] = labels
        return encoded

    return raw.map(tokenize, batched=True, remove_columns=["tokens", "ner_tags"], desc=f"tokenising conll03 {split}")

