"""CoNLL-2003: the reader on the real files, IOB2 tags, sub-token label alignment with MiniLM, file:line errors."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from peftprompt.backbones import minilm_path
from peftprompt.data import CONLL03_LABELS, conll03_dataset, read_conll03
from peftprompt.metrics import iob1_to_iob2

# Sentence 106 of eng.testb: words that WordPiece splits into 3 and 4 sub-tokens.
SPLIT_SENTENCE = (["Saqlain", "Mushtaq", "b", "Harris", "2"], ["B-PER", "I-PER", "O", "B-PER", "O"])


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(minilm_path())


def test_labels_are_the_nine_iob2_tags():
    assert CONLL03_LABELS == ("O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC")


@pytest.mark.parametrize("split, sentences, tokens", [("train", 14_041, 203_621), ("testa", 3_250, 51_362),
                                                      ("testb", 3_453, 46_435)])
def test_sentence_counts_on_the_real_files(split, sentences, tokens):
    rows = read_conll03(split)
    assert len(rows) == sentences  # the counts of SOURCE.md and of HF conll2003
    assert sum(len(words) for words, _ in rows) == tokens
    assert all(len(words) == len(tags) > 0 for words, tags in rows)
    assert {tag for _, tags in rows for tag in tags} == set(CONLL03_LABELS)
    # The shared copy is already IOB2: no entity starts with I-, so the IOB1 -> IOB2 conversion changes nothing.
    assert all(iob1_to_iob2(tags) == tags for _, tags in rows)


def test_limit_and_first_sentence():
    rows = read_conll03("train", limit=2)
    assert rows == read_conll03("train")[:2]
    assert rows[0] == (
        ["EU", "rejects", "German", "call", "to", "boycott", "British", "lamb", "."],
        ["B-ORG", "O", "B-MISC", "O", "O", "O", "B-MISC", "O", "O"],
    )
    assert read_conll03("testb", limit=107)[106] == SPLIT_SENTENCE


def test_labels_go_to_the_first_sub_token(tokenizer):
    ds = conll03_dataset(tokenizer, "testb", limit=107)
    row = ds[106]
    tokens = tokenizer.convert_ids_to_tokens(row["input_ids"])
    assert tokens == ["[CLS]", "sa", "##q", "##lain", "mu", "##sh", "##ta", "##q", "b", "harris", "2", "[SEP]"]
    ids = {label: i for i, label in enumerate(CONLL03_LABELS)}
    b_per, i_per, o = ids["B-PER"], ids["I-PER"], ids["O"]
    assert row["labels"] == [-100, b_per, -100, -100, i_per, -100, -100, -100, o, b_per, o, -100]
    assert set(ds.column_names) <= {"input_ids", "attention_mask", "token_type_ids", "labels"}
    # each word's tag, read back from its labelled (first) sub-token
    assert [CONLL03_LABELS[label] for label in row["labels"] if label != -100] == SPLIT_SENTENCE[1]


def test_label_all_subtokens(tokenizer):
    row = conll03_dataset(tokenizer, "testb", limit=107, label_all_subtokens=True)[106]
    ids = {label: i for i, label in enumerate(CONLL03_LABELS)}
    b_per, i_per, o = ids["B-PER"], ids["I-PER"], ids["O"]
    # Continuation sub-tokens of a B-PER word are I-PER.
    assert row["labels"] == [-100, b_per, i_per, i_per, i_per, i_per, i_per, i_per, o, b_per, o, -100]


def test_truncated_words_get_no_label(tokenizer):
    row = conll03_dataset(tokenizer, "testb", max_length=6, limit=107)[106]
    ids = {label: i for i, label in enumerate(CONLL03_LABELS)}
    # [CLS] sa ##q ##lain mu [SEP]: the words cut off ("b", "Harris", "2") are not labelled, so not scored
    assert row["labels"] == [-100, ids["B-PER"], -100, -100, ids["I-PER"], -100]


@pytest.mark.parametrize(
    "content, message",
    [
        ("EU NNP B-NP B-ORG\nrejects VBZ B-VP B-FOO\n",
         r"eng.train:2: field 'ner' must be one of O, B-PER, .*got 'B-FOO'"),
        ("EU NNP B-NP B-ORG\n\nrejects VBZ O\n",
         r"eng.train:3: expected 4 space-separated fields \(token pos chunk ner\), got 3"),
        ("-DOCSTART- -X- -X- O\n\n\n", r"eng.train: no sentences"),
        ("EU NNP B-NP B-ORG\n\xff bad\n", r"eng.train:2: not valid UTF-8"),
    ],
)
def test_errors_name_file_line_and_field(content, message, tmp_path, monkeypatch):
    (tmp_path / "conll2003").mkdir()
    data = content.encode("latin-1") if "\xff" in content else content.encode()
    (tmp_path / "conll2003" / "eng.train").write_bytes(data)
    monkeypatch.setenv("PEFTPROMPT_DATA", str(tmp_path))
    with pytest.raises(ValueError, match=message):
        read_conll03("train")


def test_docstart_and_iob1_input(tmp_path, monkeypatch):
    # The original (IOB1) release, with -DOCSTART- lines: read as IOB2.
    (tmp_path / "conll2003").mkdir()
    (tmp_path / "conll2003" / "eng.testa").write_text(
        "-DOCSTART- -X- -X- O\n\nPeter NNP I-NP I-PER\nBlackburn NNP I-NP I-PER\n\n"
        "Smith NNP I-NP I-PER\nJones NNP I-NP B-PER\nin IN I-PP O\nParis NNP I-NP I-LOC\n"
    )
    monkeypatch.setenv("PEFTPROMPT_DATA", str(tmp_path))
    assert read_conll03("testa") == [
        (["Peter", "Blackburn"], ["B-PER", "I-PER"]),
        (["Smith", "Jones", "in", "Paris"], ["B-PER", "B-PER", "O", "B-LOC"]),
    ]


def test_missing_file_and_unknown_split(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTPROMPT_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="eng.testb is missing"):
        read_conll03("testb")
    with pytest.raises(ValueError, match="split must be one of train, testa, testb, got 'test'"):
        read_conll03("test")
