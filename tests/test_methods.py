"""Every adapter method on every task: what trains, what stays frozen, and save -> reload in a fresh process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TASKS, base_model, make_batch
from peftprompt import METHODS, attach, save_adapter

CASES = [(task, method) for task in TASKS for method in METHODS]
CASE_IDS = [f"{task}-{method}" for task, method in CASES]


def train_one_step(model, batch) -> None:
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(**batch).loss.backward()
    optimizer.step()
    model.eval()


@pytest.mark.parametrize(("task", "method"), CASES, ids=CASE_IDS)
def test_one_step_changes_only_trainable_parameters(task, method):
    model = attach(base_model(task), method, task=task)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable, "the method trains nothing"

    train_one_step(model, make_batch(task))

    params = dict(model.named_parameters())
    changed = {name for name, p in params.items() if not torch.equal(p, before[name])}
    with_gradient = {name for name, p in params.items() if p.grad is not None and p.grad.abs().sum() > 0}
    assert changed <= trainable, f"frozen parameters changed: {sorted(changed - trainable)[:5]}"
    assert with_gradient, "no parameter received a gradient"
    assert with_gradient <= changed, f"parameters with a gradient did not move: {sorted(with_gradient - changed)[:5]}"
    assert all(params[name].grad is None for name in params.keys() - trainable), "a frozen parameter got a gradient"


@pytest.mark.parametrize("task", ["seq_cls", "token_cls"])
@pytest.mark.parametrize("method", [m for m in METHODS if m != "full"])
def test_task_head_is_trained_and_saved(task, method, tmp_path):
    model = attach(base_model(task), method, task=task)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert any("classifier" in name for name in trainable)
    save_adapter(model, tmp_path)
    from safetensors.torch import load_file

    assert any("classifier" in key for key in load_file(tmp_path / "adapter_model.safetensors"))


RELOAD_SCRIPT = r"""
import json, sys
import torch
torch.set_num_threads(1)
sys.path.insert(0, sys.argv[1])
import peftprompt  # registers BitFit: nothing else is set up in this process
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoModelForTokenClassification
from conftest import base_model, make_batch

AUTO = {"seq_cls": AutoModelForSequenceClassification, "token_cls": AutoModelForTokenClassification,
        "causal_lm": AutoModelForCausalLM}
logits = {}
for case in json.loads(open(sys.argv[2]).read()):
    if case["method"] == "full":
        model = AUTO[case["task"]].from_pretrained(case["dir"])
    else:
        # The classification heads come from the adapter, so build those bases with another seed to prove it.
        seed = 0 if case["task"] == "causal_lm" else 1
        # The project's loader: it also aligns prompt-tuned token-classification logits, as attach does.
        model = peftprompt.load_adapter(base_model(case["task"], seed=seed), case["dir"])
    batch = make_batch(case["task"])
    batch.pop("labels")
    with torch.no_grad():
        logits[case["task"] + "-" + case["method"]] = model.eval()(**batch).logits
torch.save(logits, sys.argv[3])
"""


@pytest.fixture(scope="module")
def trained_and_saved(tmp_path_factory):
    """Train every case one step, save it, and record its logits in this process."""
    root = tmp_path_factory.mktemp("adapters")
    manifest, expected = [], {}
    for task, method in CASES:
        model = attach(base_model(task), method, task=task)
        batch = make_batch(task)
        train_one_step(model, batch)
        batch.pop("labels")
        with torch.no_grad():
            expected[f"{task}-{method}"] = model(**batch).logits
        save_adapter(model, root / f"{task}-{method}")
        manifest.append({"task": task, "method": method, "dir": str(root / f"{task}-{method}")})
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root, expected


@pytest.fixture(scope="module")
def reloaded_in_fresh_process(trained_and_saved):
    root, _ = trained_and_saved
    script = root / "reload.py"
    script.write_text(RELOAD_SCRIPT)
    out = root / "reloaded.pt"
    tests_dir = str(Path(__file__).parent)
    result = subprocess.run(
        [sys.executable, str(script), tests_dir, str(root / "manifest.json"), str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out)


@pytest.mark.parametrize(("task", "method"), CASES, ids=CASE_IDS)
def test_save_and_reload_in_fresh_process_gives_identical_logits(task, method, trained_and_saved, reloaded_in_fresh_process):
    _, expected = trained_and_saved
    key = f"{task}-{method}"
    torch.testing.assert_close(reloaded_in_fresh_process[key], expected[key], rtol=0, atol=1e-6)


def test_unknown_method_is_refused_with_the_choices(minilm_seq_cls):
    with pytest.raises(ValueError, match=r"unknown adapter method 'loraa'; choose one of lora, prefix"):
        attach(minilm_seq_cls, "loraa")


def test_target_module_that_matches_nothing_is_refused(minilm_seq_cls):
    with pytest.raises(ValueError, match=r"lora: target_modules=.*q_proj.* matches no module of BertForSequence"):
        attach(minilm_seq_cls, "lora", target_modules=["q_proj"])


def test_unknown_config_field_is_refused(minilm_seq_cls):
    with pytest.raises(ValueError, match=r"LoraConfig \(method 'lora'\) has no field 'rank'"):
        attach(minilm_seq_cls, "lora", rank=4)


def test_overrides_reach_the_peft_config(minilm_seq_cls):
    model = attach(minilm_seq_cls, "lora", r=4, target_modules=["query"])
    config = model.peft_config["default"]
    assert config.r == 4 and config.target_modules == {"query"}
    assert model.get_nb_trainable_parameters()[0] == 6 * (384 * 4 * 2) + 384 * 2 + 2


def test_prefix_tuning_refuses_gradient_checkpointing(llama):
    llama.gradient_checkpointing_enable()
    with pytest.raises(ValueError, match="prefix tuning cannot be combined with gradient checkpointing"):
        attach(llama, "prefix")


def test_prefix_tuning_refuses_gradient_checkpointing_switched_on_later(llama):
    model = attach(llama, "prefix")
    with pytest.raises(ValueError, match="prefix tuning cannot be combined with gradient checkpointing"):
        model.gradient_checkpointing_enable()
