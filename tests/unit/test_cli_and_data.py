"""The `peftprompt` command line and the SST-2 reader's errors."""

from __future__ import annotations

import json

import pytest

from peftprompt import cli
from peftprompt.cli import main
from peftprompt.data import read_sst2
from peftprompt.errors import InputError, InputFileNotFoundError
from peftprompt.training.config import load_config


@pytest.mark.parametrize(
    "argv, message",
    [
        (["info", "--method", "loraa"], "unknown adapter method 'loraa'"),
        (["info", "--method", "poly"], "method 'poly' is refused: Poly routes between LoRA skills by task"),
        (["info", "--model", "/no/such/model", "--method", "lora"], "model path /no/such/model does not exist"),
        (["info", "--model", "nobody/no-such-model", "--method", "lora"], "cannot load backbone 'nobody/no-such-model'"),
        (["info", "--method", "lora", "--task", "seq_cls", "--num-labels", "0"], "num_labels must be >= 1, got 0"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"peftprompt {argv[0]}: error: ")
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_input_error_names_file_line_and_field():
    err = InputError("must be >= 1, got 0", file="run.yaml", line=3, field="max_steps")
    assert str(err) == "run.yaml:3: field 'max_steps': must be >= 1, got 0"
    assert isinstance(err, ValueError) and (err.file, err.line, err.field) == ("run.yaml", 3, "max_steps")
    # what the message already says is not said twice
    assert str(InputError("run.yaml:3: field 'x' is bad", file="run.yaml", line=3, field="x")) == (
        "run.yaml:3: field 'x' is bad")
    missing = InputFileNotFoundError("trees.jsonl does not exist", file="trees.jsonl")
    assert isinstance(missing, FileNotFoundError) and isinstance(missing, InputError)


def test_config_errors_carry_file_line_and_field(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("task: seq_cls\nnum_labels: 2\nmax_steps: 0\n")
    with pytest.raises(InputError, match=r"field 'max_steps' must be >= 1, got 0 \(.*run.yaml:3\)") as info:
        load_config(path)
    assert (info.value.file, info.value.line, info.value.field) == (str(path), 3, "max_steps")
    with pytest.raises(InputError) as info:
        load_config(path, ["max_stpes=3"])
    assert info.value.field == "max_stpes" and "did you mean 'max_steps'" in str(info.value)


def test_bad_cli_argument_is_one_line_naming_the_field(tmp_path, capsys):
    assert main(["data", "show", str(tmp_path / "trees.jsonl"), "--n", "0"]) == 2
    err = capsys.readouterr().err
    assert err == "peftprompt data: error: --n must be >= 1, got 0\n"


def test_bad_tree_file_is_one_line_naming_file_line_and_field(tmp_path, capsys):
    trees = tmp_path / "trees.jsonl"
    trees.write_text('{"question": "a?", "answer": "b"}\n'
                     '{"question": "c?", "answer": "d", "id": "x", "children": [{"answer": "e"}]}\n')
    assert main(["data", "show", str(trees)]) == 2
    err = capsys.readouterr().err
    assert err == (f"peftprompt data: error: {trees}:2: ?/x at root/1: field 'question' is missing (give "
                   "'question' or 'question_template')\n")


def test_unexpected_errors_keep_their_traceback(monkeypatch):
    """Only an `InputError` becomes a one-line exit 2: a plain ValueError from deep inside is a bug and propagates."""

    def broken(args):
        int("not a number")  # a ValueError that is not about the user's input

    monkeypatch.setattr(cli, "_fetch", broken)
    with pytest.raises(ValueError, match="invalid literal for int"):
        main(["fetch"])


def test_sst2_reads_the_real_files():
    test = read_sst2("test")
    assert len(test) == 698
    assert {label for _, label in test} == {0, 1}
    assert read_sst2("train", limit=3) == read_sst2("train")[:3]
    long = read_sst2("dev", limit=50, min_words=10)  # the first 50 validation rows of at least 10 words
    assert len(long) == 50 and min(len(s.split()) for s, _ in long) >= 10
    assert long == [row for row in read_sst2("dev") if len(row[0].split()) >= 10][:50]


@pytest.mark.parametrize(
    "content, message",
    [
        ("sentence\tlabel\ngood film\t1\nbad film\tx\n", r"train.tsv:3: field 'label' must be 0 or 1, got 'x'"),
        ("sentence\tlabel\n\t1\n", r"train.tsv:2: field 'sentence' is empty"),
        ("sentence\tlabel\na\tb\tc\n", r"train.tsv:2: expected 2 fields"),
        ("text\tlabel\na\t1\n", r"train.tsv:1: header must be"),
        ("sentence\tlabel\n", r"train.tsv: no rows after the header"),
    ],
)
def test_sst2_errors_name_file_line_and_field(content, message, tmp_path, monkeypatch):
    (tmp_path / "sst2").mkdir()
    (tmp_path / "sst2" / "train.tsv").write_text(content)
    monkeypatch.setenv("PEFTPROMPT_DATA", str(tmp_path))
    with pytest.raises(ValueError, match=message):
        read_sst2("train")


def test_sst2_unknown_split():
    with pytest.raises(ValueError, match="split must be one of train, dev, test, got 'val'"):
        read_sst2("val")


def test_data_convert_stats_and_show(tmp_path, capsys):
    trees = tmp_path / "trees.jsonl"
    assert main(["data", "convert", "probtree_2wiki", "--limit", "3", "--out", str(trees)]) == 0
    assert capsys.readouterr().out.startswith(f"wrote 3 trees to {trees} (probtree_2wiki, split dev)")
    assert main(["data", "stats", str(trees), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert (stats["trees"], stats["skipped"]) == (3, 0)
    assert main(["data", "show", str(trees), "--n", "1", "--plain"]) == 0
    out = capsys.readouterr().out
    assert "1 trees -> 3 rows" in out  # root episode + one No-episode per leaf, padded
    assert "Question: Who is the father-in-law of Queen Hyojeong?\n[[Are follow up questions needed here: Yes." in out
    assert "[[Are follow up questions needed here: No.\nSo the final answer is: King Heonjong of Joseon<|im_end|>]]" in out


def test_data_show_bad_file_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "a?", "answer": "b"}\n{"question": "trunc\n')
    assert main(["data", "show", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2: invalid JSON" in err and err.count("\n") == 1


def test_sst2_invalid_utf8_names_the_line(tmp_path, monkeypatch):
    (tmp_path / "sst2").mkdir()
    (tmp_path / "sst2" / "train.tsv").write_bytes(b"sentence\tlabel\ngood\t1\nbad \xff\t0\n")
    monkeypatch.setenv("PEFTPROMPT_DATA", str(tmp_path))
    with pytest.raises(ValueError, match=r"train.tsv:3: not valid UTF-8"):
        read_sst2("train")
