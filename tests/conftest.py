"""Shared fixtures: tiny random models built from configs, and the real MiniLM where a real backbone matters."""

from __future__ import annotations

import os

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from transformers import BertConfig, BertForTokenClassification, LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as transformers_logging

import peftprompt
from peftprompt import load_backbone
from peftprompt.tasks import TRAINABLE_TASKS

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)
transformers_logging.set_verbosity_error()

TASKS = TRAINABLE_TASKS  # the method matrix: every task the engine trains
NUM_LABELS = {"seq_cls": 2, "token_cls": 5}
TINY_VOCAB = 128


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer Llama with a 128-token vocabulary, randomly initialised with `seed`."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=TINY_VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


def tiny_bert_token_cls(num_labels: int, seed: int = 0) -> BertForTokenClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=TINY_VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        num_labels=num_labels,
    )
    return BertForTokenClassification(config).eval()


def base_model(task: str, seed: int = 0):
    """The backbone of the method matrix: real MiniLM for the classification tasks, a tiny Llama for causal LM."""
    if task == "causal_lm":
        return tiny_llama(seed)
    torch.manual_seed(seed)
    model, _ = load_backbone("minilm", task=task, num_labels=NUM_LABELS[task])
    return model.eval()


def make_batch(task: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A deterministic batch of 2 sequences of 12 tokens (the second padded by 3), with labels for `task`."""
    generator = torch.Generator().manual_seed(seed)
    vocab = TINY_VOCAB if task == "causal_lm" else 1000
    input_ids = torch.randint(5, vocab, (2, 12), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, -3:] = 0
    if task == "seq_cls":
        labels = torch.tensor([0, 1])
    elif task == "token_cls":
        labels = torch.randint(0, NUM_LABELS[task], (2, 12), generator=generator).masked_fill(attention_mask == 0, -100)
    else:
        labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@pytest.fixture(scope="session")
def tiny_smollm(tmp_path_factory):
    """A saved 2-layer Llama with SmolLM2's vocabulary and tokenizer, randomly initialised (for generation and recipes)."""
    from transformers import AutoTokenizer

    from peftprompt.backbones import smollm2_path

    path = tmp_path_factory.mktemp("tiny_smollm")
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
    """A saved 2-layer BERT encoder (no head: each recipe adds its own) with MiniLM's vocabulary and tokenizer.
    Hidden size 64: bitsandbytes' 4-bit layers on the CPU need input sizes that are multiples of their block (64)."""
    from transformers import AutoTokenizer, BertModel

    from peftprompt.backbones import minilm_path

    path = tmp_path_factory.mktemp("tiny_bert")
    torch.manual_seed(0)
    config = BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    BertModel(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Leave no Accelerate singleton state (e.g. bf16 picked by `auto`, or by TRL's SFTConfig) to later tests."""
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def minilm_seq_cls():
    return base_model("seq_cls")


def pytest_report_header(config):
    return f"peftprompt {peftprompt.__version__}, torch {torch.__version__}, threads {torch.get_num_threads()}"
