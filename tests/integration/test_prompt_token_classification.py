"""Prompt tuning and P-tuning for token classification: logits and labels line up with the input tokens.

The alignment applies to the models `attach` and `load_adapter` build; PEFT's own classes stay as PEFT ships them.
"""

from __future__ import annotations

import subprocess
import sys

import peft
import pytest
import torch
from peft import PeftModel, PeftModelForTokenClassification, get_peft_model
from peft.auto import MODEL_TYPE_TO_PEFT_MODEL_MAPPING

from peftprompt import attach, default_config, load_adapter, save_adapter
from peftprompt.methods.prompt_learning import AlignedPeftModelForTokenClassification

from conftest import base_model, make_batch, tiny_bert_token_cls

NUM_LABELS = 5
# Ten distinct tokens whose label is a fixed function of the token: learnable from the frozen token
# representation, but only if each prediction is read at the token's own position.
TOKENS = torch.arange(10, 20)


def synthetic_ner_batch(generator: torch.Generator, batch_size: int = 16, length: int = 12):
    input_ids = TOKENS[torch.randint(0, len(TOKENS), (batch_size, length), generator=generator)]
    labels = input_ids % NUM_LABELS
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


@pytest.mark.parametrize("method", ["prompt", "ptuning"])
def test_logits_align_with_tokens_and_the_loss_uses_them(method):
    model = attach(base_model("token_cls"), method, task="token_cls")
    assert isinstance(model, AlignedPeftModelForTokenClassification)
    batch = make_batch("token_cls")
    out = model.eval()(**batch)
    assert out.logits.shape == (*batch["input_ids"].shape, NUM_LABELS)
    expected = torch.nn.functional.cross_entropy(out.logits.reshape(-1, NUM_LABELS), batch["labels"].reshape(-1))
    torch.testing.assert_close(out.loss, expected)


@pytest.mark.parametrize("method", ["prompt", "ptuning"])
def test_prompt_tuned_ner_learns_aligned_labels(method):
    torch.manual_seed(0)
    model = attach(tiny_bert_token_cls(NUM_LABELS), method, task="token_cls", num_virtual_tokens=4)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(60):
        loss = model(**synthetic_ner_batch(generator)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    test = synthetic_ner_batch(torch.Generator().manual_seed(123), batch_size=32)
    with torch.no_grad():
        predictions = model.eval()(input_ids=test["input_ids"], attention_mask=test["attention_mask"]).logits.argmax(-1)
    accuracy = (predictions == test["labels"]).float().mean().item()
    assert accuracy > 0.95, f"token accuracy {accuracy:.2f}: predictions are not aligned with the labels"


def test_reloaded_prompt_tuning_token_classifier_is_aligned_too(tmp_path):
    model = attach(base_model("token_cls"), "prompt", task="token_cls").eval()
    batch = make_batch("token_cls")
    batch.pop("labels")
    save_adapter(model, tmp_path)
    reloaded = load_adapter(base_model("token_cls", seed=1), tmp_path).eval()
    assert isinstance(reloaded, AlignedPeftModelForTokenClassification)
    with torch.no_grad():
        expected, logits = model(**batch).logits, reloaded(**batch).logits
    assert logits.shape[1] == batch["input_ids"].shape[1]
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)


def test_importing_peftprompt_leaves_peft_token_classification_alone(tmp_path):
    assert MODEL_TYPE_TO_PEFT_MODEL_MAPPING["TOKEN_CLS"] is peft.PeftModelForTokenClassification
    # Plain PEFT behaves as PEFT does: its class, and logits that include the virtual tokens.
    config = default_config(base_model("token_cls"), "prompt", task="token_cls")
    plain = get_peft_model(base_model("token_cls"), config)
    assert type(plain) is PeftModelForTokenClassification
    batch = make_batch("token_cls")
    batch.pop("labels")
    assert plain.eval()(**batch).logits.shape[1] == batch["input_ids"].shape[1] + 20
    save_adapter(attach(base_model("token_cls"), "prompt", task="token_cls"), tmp_path)
    assert type(PeftModel.from_pretrained(base_model("token_cls"), tmp_path)) is PeftModelForTokenClassification


def test_import_changes_no_peft_mapping_in_a_fresh_process():
    code = (
        "import peft, peft.auto\n"
        "before = dict(peft.auto.MODEL_TYPE_TO_PEFT_MODEL_MAPPING)\n"
        "import peftprompt\n"
        "assert peft.auto.MODEL_TYPE_TO_PEFT_MODEL_MAPPING == before\n"
        "assert peft.auto.MODEL_TYPE_TO_PEFT_MODEL_MAPPING['TOKEN_CLS'] is peft.PeftModelForTokenClassification\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
