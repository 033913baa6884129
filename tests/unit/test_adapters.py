"""Saving adapters atomically, checking broken adapter directories, and the parameter report."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch
from peft import PeftModel

from peftprompt import attach, load_adapter, merged_for_inference, parameter_report, save_adapter
from peftprompt.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, check_adapter_dir, directory_bytes
from peftprompt.atomic import write_dir_atomically
from peftprompt.errors import InputError
from peftprompt.report import format_bytes, markdown_table

from conftest import tiny_bert_token_cls, tiny_llama


@pytest.fixture
def saved_lora(tmp_path):
    model = attach(tiny_llama(), "lora", task="causal_lm")
    return save_adapter(model, tmp_path / "adapter")


def test_save_adapter_writes_safetensors_with_normal_permissions(saved_lora):
    assert sorted(p.name for p in saved_lora.iterdir()) == ["README.md", ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(saved_lora.stat().st_mode) == 0o777 & ~umask
    assert not [p for p in saved_lora.parent.iterdir() if p.name.startswith(".")], "temporary directory left behind"


def test_failed_write_keeps_the_previous_directory(tmp_path):
    target = tmp_path / "out"
    write_dir_atomically(target, lambda tmp: (tmp / "weights").write_text("old"))

    def crash(tmp):
        (tmp / "weights").write_text("half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        write_dir_atomically(target, crash)
    assert (target / "weights").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_overwrite_replaces_the_whole_directory(tmp_path):
    target = tmp_path / "out"
    write_dir_atomically(target, lambda tmp: (tmp / "a").write_text("1"))
    write_dir_atomically(target, lambda tmp: (tmp / "b").write_text("2"))
    assert [p.name for p in target.iterdir()] == ["b"]


def test_check_adapter_dir_accepts_a_good_save(saved_lora):
    assert check_adapter_dir(saved_lora)["peft_type"] == "LORA"
    assert directory_bytes(saved_lora) == (saved_lora / ADAPTER_WEIGHTS).stat().st_size > 0


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter directory .*nowhere does not exist"):
        load_adapter(tiny_llama(), tmp_path / "nowhere")


def test_missing_config(saved_lora):
    (saved_lora / ADAPTER_CONFIG).unlink()
    with pytest.raises(FileNotFoundError, match="adapter_config.json is missing"):
        load_adapter(tiny_llama(), saved_lora)


def test_missing_weights(saved_lora):
    (saved_lora / ADAPTER_WEIGHTS).unlink()
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors is missing"):
        load_adapter(tiny_llama(), saved_lora)


def test_invalid_json_names_file_and_line(saved_lora):
    config = saved_lora / ADAPTER_CONFIG
    config.write_text('{\n  "peft_type": "LORA",\n  "r": 8,,\n}')
    with pytest.raises(ValueError, match=r"adapter_config.json:3: invalid JSON"):
        load_adapter(tiny_llama(), saved_lora)


def test_unknown_peft_type_names_the_field(saved_lora):
    config = saved_lora / ADAPTER_CONFIG
    config.write_text(json.dumps({**json.loads(config.read_text()), "peft_type": "NOPE"}))
    with pytest.raises(ValueError, match="field 'peft_type' is 'NOPE', not a known PEFT method"):
        load_adapter(tiny_llama(), saved_lora)


def test_truncated_weights(saved_lora):
    weights = saved_lora / ADAPTER_WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError, match="adapter_model.safetensors is corrupt or truncated"):
        load_adapter(tiny_llama(), saved_lora)


def test_garbage_weights(saved_lora):
    (saved_lora / ADAPTER_WEIGHTS).write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_adapter(tiny_llama(), saved_lora)


def test_full_method_report_is_every_parameter(llama):
    report = parameter_report(attach(llama, "full", task="causal_lm"), measure_size=False)
    n = sum(p.numel() for p in llama.parameters())
    assert (report.method, report.trainable_params, report.total_params, report.adapter_bytes) == ("full", n, n, None)


def test_markdown_table_and_bytes():
    assert [format_bytes(n) for n in (None, 512, 2048, 3 * 1024**2)] == ["-", "512 B", "2.0 KB", "3.0 MB"]
    from peftprompt.report import ParameterReport

    table = markdown_table([ParameterReport("lora", 1_000, 100_000, 4096)])
    assert table.splitlines()[-1] == "| lora | 1,000 | 100,000 | 1.0000 | 4.0 KB |"


def test_saved_adapter_reloads_to_the_same_logits(saved_lora):
    model = attach(tiny_llama(), "lora", task="causal_lm")
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p)
    save_adapter(model, saved_lora)
    reloaded = load_adapter(tiny_llama(), saved_lora)
    assert not model.training and not reloaded.training
    ids = torch.arange(5, 15)[None]
    torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def randomised(model):
    """`model` with its adapter weights moved off their (often zero) initial values, so merging changes something."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                parameter.add_(0.1 * torch.randn_like(parameter))
    return model


@pytest.mark.parametrize("method", ["lora", "ia3", "bitfit"])
def test_a_merged_adapter_gives_the_same_logits_as_the_adapter(method, tmp_path):
    tuned = randomised(attach(tiny_llama(), method, task="causal_lm"))
    save_adapter(tuned, tmp_path / "adapter")
    ids = torch.randint(1, 128, (2, 12))
    adapter = load_adapter(tiny_llama(), tmp_path / "adapter").eval()
    with torch.no_grad():
        expected = adapter(input_ids=ids).logits
        assert not torch.allclose(expected, tiny_llama()(input_ids=ids).logits, atol=1e-3), "the adapter does nothing"
        merged = merged_for_inference(adapter)
        assert not isinstance(merged, PeftModel) and not merged.training
        assert not any("lora_" in n or "ia3_" in n for n, _ in merged.named_parameters())
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-4)


def test_adapters_that_cannot_merge_come_back_unmerged(tmp_path):
    prompt = merged_for_inference(attach(tiny_llama(), "prompt", task="causal_lm"))
    assert isinstance(prompt, PeftModel) and not prompt.training  # virtual tokens are not weights
    assert isinstance(merged_for_inference(attach(tiny_llama(), "adaption_prompt", task="causal_lm")), PeftModel)
    two = attach(tiny_llama(), "lora", task="causal_lm")
    two.add_adapter("reader", two.peft_config["default"])
    assert isinstance(merged_for_inference(two), PeftModel)  # the runner switches between them
    plain = tiny_llama().train()
    assert merged_for_inference(plain) is plain and not plain.training


def test_a_full_fine_tune_round_trips_like_an_adapter(tmp_path):
    tuned = randomised(attach(tiny_llama(), "full", task="causal_lm"))
    save_adapter(tuned, tmp_path / "full")
    assert check_adapter_dir(tmp_path / "full")["model_type"] == "llama"
    reloaded = load_adapter(tiny_llama(seed=1), tmp_path / "full")  # every weight comes from the checkpoint
    ids = torch.arange(5, 15)[None]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, tuned.eval()(ids).logits, rtol=0, atol=0)
    assert not any(p.requires_grad for p in reloaded.parameters())
    with pytest.raises(InputError, match="is a full checkpoint of a 'llama' model, not of 'bert'"):
        load_adapter(tiny_bert_token_cls(2), tmp_path / "full")
    (tmp_path / "full" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="is not a complete checkpoint: model.safetensors is missing"):
        load_adapter(tiny_llama(), tmp_path / "full")


def test_pissa_is_saved_as_the_plain_lora_it_amounts_to(tmp_path):
    tuned = randomised(attach(tiny_llama(), "pissa", task="causal_lm"))
    save_adapter(tuned, tmp_path / "pissa")
    config = json.loads((tmp_path / "pissa" / ADAPTER_CONFIG).read_text())
    assert (config["r"], config["lora_alpha"], config["init_lora_weights"]) == (16, 32, True)
    reloaded = load_adapter(tiny_llama(), tmp_path / "pissa")  # onto the original weights, which PiSSA had moved
    ids = torch.arange(5, 15)[None]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, tuned.eval()(ids).logits, rtol=0, atol=1e-5)
