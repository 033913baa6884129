"""GGUF headers (`peftprompt.gguf_file`) and the checks `LlamaCppBackend.from_files` makes before llama.cpp opens a
file (`peftprompt.selfask.llama_cpp_backend.check_gguf_files`): what is read, and what is refused naming the file."""

import gguf
import numpy as np
import pytest

from peftprompt.errors import InputError, InputFileNotFoundError
from peftprompt.gguf_file import GGUFField, read_gguf_header
from peftprompt.selfask.llama_cpp_backend import check_gguf_files, shared_prefix


def write_gguf(path, tensors: dict, kind: str = "model", **fields):
    """A small GGUF file: `tensors` (name -> array, transformers shape), `general.type` `kind`, string `fields`."""
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_type(kind)
    if kind == "adapter":
        writer.add_string("adapter.type", "lora")
    for key, value in fields.items():
        writer.add_string(key.replace("__", "."), value)
    writer.add_array("tokenizer.ggml.tokens", ["a", "b", "ü"])
    writer.add_array("tokenizer.ggml.token_type", [1, 1, 3])
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


MODEL = {"blk.0.attn_q.weight": np.ones((8, 4), dtype=np.float32),  # [out, in]
         "blk.0.attn_norm.weight": np.ones(4, dtype=np.float32)}


def lora(rows_in: int = 4, rows_out: int = 8, r: int = 2) -> dict:
    return {"blk.0.attn_q.weight.lora_a": np.zeros((r, rows_in), dtype=np.float32),
            "blk.0.attn_q.weight.lora_b": np.zeros((rows_out, r), dtype=np.float16)}


def test_the_header_holds_metadata_and_the_tensor_table(tmp_path):
    header = read_gguf_header(write_gguf(tmp_path / "m.gguf", MODEL, general__name="tiny"))
    assert header.version == 3 and header.data_offset % 32 == 0
    assert header.value("general.architecture") == "llama" and header.value("general.name") == "tiny"
    assert header.value("tokenizer.ggml.tokens") == ["a", "b", "ü"]
    assert header.fields["tokenizer.ggml.token_type"] == GGUFField(gguf.GGUFValueType.ARRAY,
                                                                   gguf.GGUFValueType.INT32, [1, 1, 3])
    assert header.value("missing", "default") == "default"
    assert [(t.name, t.shape, t.type.name, t.nbytes) for t in header.tensors] == [
        ("blk.0.attn_q.weight", (4, 8), "F32", 128), ("blk.0.attn_norm.weight", (4,), "F32", 16)]


@pytest.mark.parametrize(("cut", "says"), [
    (lambda data: b"", "not a GGUF file: 0 bytes"),
    (lambda data: b"PK\x03\x04" + data[4:], "not a GGUF file: it starts with b'PK"),
    (lambda data: data[:4] + (9).to_bytes(4, "little") + data[8:], "GGUF version 9"),
    (lambda data: data[:60], "ends at byte 60, inside its header"),
    (lambda data: data[:-20], "cut short: tensor 'blk.0.attn_norm.weight' ends at byte"),
])
def test_a_damaged_file_is_refused_naming_it(tmp_path, cut, says):
    good = write_gguf(tmp_path / "good.gguf", MODEL).read_bytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(cut(good))
    with pytest.raises(InputError, match=says) as refused:
        read_gguf_header(bad)
    assert str(bad) in str(refused.value)


def test_a_missing_file_is_refused_naming_it(tmp_path):
    with pytest.raises(InputFileNotFoundError, match="missing.gguf does not exist"):
        read_gguf_header(tmp_path / "missing.gguf")


def test_model_and_lora_files_are_checked_before_llama_cpp_opens_them(tmp_path):
    model = write_gguf(tmp_path / "model.gguf", MODEL)
    adapter = write_gguf(tmp_path / "lora.gguf", lora(), kind="adapter")
    assert check_gguf_files(model, adapter).value("general.type") == "model"
    wide = write_gguf(tmp_path / "wide.gguf", lora(rows_in=6), kind="adapter")
    for args, says, named in (((adapter,), "is a GGUF adapter, not a model", adapter),
                              ((model, model), "is not a GGUF LoRA adapter", model),
                              ((model, wide), "'blk.0.attn_q.weight.lora_a' does not fit the model", wide)):
        with pytest.raises(InputError, match=says) as refused:
            check_gguf_files(*args)
        assert str(named) in str(refused.value)


def test_shared_prefix_counts_leading_tokens_in_common():
    assert [shared_prefix(a, b) for a, b in (([1, 2, 3], [1, 2, 4]), ([1, 2], [1, 2, 3]), ([], [1]),
                                             (np.array([5, 6, 7]), [5, 6, 7]), ([1], [2]))] == [2, 2, 0, 3, 0]
