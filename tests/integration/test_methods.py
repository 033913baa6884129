"""The core adapter methods on every task: what trains, what stays frozen, and save -> reload in a fresh process."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from peftprompt import attach, default_config, save_adapter
from peftprompt.errors import InputError
from peftprompt.method_matrix import tiny_batch, tiny_model
from peftprompt.methods import CORE_METHODS

from conftest import REPO, TASKS, base_model, make_batch

CASES = [(task, method) for task in TASKS for method in CORE_METHODS]  # every method: test_architectures.py
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
@pytest.mark.parametrize("method", [m for m in CORE_METHODS if m != "full"])
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
    tests_dir = str(REPO / "tests")
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


def test_default_targets_come_from_peft_tables_then_ours():
    assert default_config(tiny_model("llama"), "lora").target_modules == {"q_proj", "v_proj"}  # PEFT's table
    assert default_config(tiny_model("distilbert"), "lora").target_modules == {"q_lin", "v_lin"}  # ours
    assert default_config(tiny_model("phi3"), "vera").target_modules == {"qkv_proj"}
    ia3 = default_config(tiny_model("modernbert"), "ia3")
    assert (ia3.target_modules, ia3.feedforward_modules) == ({"Wqkv", "mlp.Wo"}, {"mlp.Wo"})
    # a tuner whose own table lacks the model (AdaLoRA: no mistral) takes LoRA's entry
    assert default_config(tiny_model("mistral"), "adalora").target_modules == {"q_proj", "v_proj"}
    # every linear layer outside the heads, DistilBERT's pre_classifier (part of its new head) included in neither
    targets = default_config(tiny_model("distilbert"), "lora_all_linear").target_modules
    assert "distilbert.transformer.layer.0.attention.q_lin" in targets
    assert not [t for t in targets if "classifier" in t]


def test_sizes_are_fitted_to_the_adapted_layers():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    minilm_wide = BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=384, num_hidden_layers=1,
                                                           num_attention_heads=12, intermediate_size=64))
    # PEFT's defaults (256) do not divide 384
    assert default_config(minilm_wide, "vblora").vector_length == 192
    assert default_config(minilm_wide, "c3a").block_size == 192
    assert default_config(minilm_wide, "fourierft").n_frequency == 1000  # PEFT's, which fits
    tiny = tiny_model("llama")  # 32 -> 16 key/value projections
    assert default_config(tiny, "fourierft").n_frequency == 512 and default_config(tiny, "road").group_size == 16


def test_prompt_learning_takes_the_sizes_the_model_uses():
    # ELECTRA's input embeddings (16) are narrower than its hidden states (32); Falcon caches one key/value head
    assert default_config(tiny_model("electra"), "prompt").token_dim == 16
    prefix = default_config(tiny_model("falcon"), "prefix")
    assert (prefix.num_attention_heads, prefix.token_dim) == (1, 8)


def test_a_method_that_cannot_apply_is_refused_with_the_reason():
    with pytest.raises(InputError, match=r"^method 'prefix' cannot apply to DistilBertForSequenceClassification: "
                                         r"distilbert takes no past_key_values"):
        attach(tiny_model("distilbert"), "prefix")
    with pytest.raises(InputError, match=r"^method 'boft' cannot apply to GPT2LMHeadModel: Target module Conv1D"):
        attach(tiny_model("gpt2"), "boft")
    with pytest.raises(InputError, match=r"^method 'osf' adapted no layer of GPT2LMHeadModel: .* Conv1D layers"):
        attach(tiny_model("gpt2"), "osf")
    with pytest.raises(InputError, match=r"^beft: no default target modules for model type 'phi3'; pass target_mod"):
        attach(tiny_model("phi3"), "beft")


def test_eva_needs_batches_and_stops_when_they_are_too_small():
    with pytest.raises(InputError, match=r"^method 'eva' needs eva_dataloader=\.\.\.: batches of training inputs"):
        attach(tiny_model("llama"), "eva")
    two_tokens = [{"input_ids": torch.tensor([[5, 6]])}]  # PEFT would cycle over it for ever
    with pytest.raises(InputError, match=r"did not converge within 200 batches.* at least r \* rho = 16 unpadded"):
        attach(tiny_model("llama"), "eva", eva_dataloader=two_tokens)


def test_loraplus_and_lora_fa_get_their_optimisers():
    from peftprompt.training.config import TrainConfig
    from peftprompt.training.model_setup import make_optimizer

    model = attach(tiny_model("llama"), "loraplus", loraplus_lr_ratio=4.0)
    optimizer = make_optimizer(TrainConfig(task="causal_lm", method="loraplus", learning_rate=1e-3,
                                           method_args={"loraplus_lr_ratio": 4.0}), model)
    lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    params = dict(model.named_parameters())
    assert {lr_of[id(p)] for n, p in params.items() if ".lora_A." in n} == {1e-3}
    assert {lr_of[id(p)] for n, p in params.items() if ".lora_B." in n} == {4e-3}

    model = attach(tiny_model("llama"), "lora_fa")
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".lora_A." in n)
    optimizer = make_optimizer(TrainConfig(task="causal_lm", method="lora_fa", learning_rate=1e-2), model)
    assert type(optimizer).__name__ == "LoraFAOptimizer"
    batch = tiny_batch("llama")
    before = {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_" in n}
    model(**batch).loss.backward()
    optimizer.step()
    moved = {n for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])}
    assert moved and all(".lora_B." in n for n in moved)


def test_adalora_gets_the_run_length_and_its_rank_allocation():
    from peftprompt.methods.training_hooks import rank_allocation

    model = attach(tiny_model("llama"), "adalora")
    allocate = rank_allocation(model, total_steps=50)
    assert model.peft_config["default"].total_step == 50 and allocate == model.base_model.update_and_allocate
    assert rank_allocation(attach(tiny_model("llama"), "lora"), total_steps=50) is None
