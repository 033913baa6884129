"""The training engine: config loading and validation, mixed-precision choice, and `train()` on tiny models
(loss goes down, logs, adapter reload, gradient accumulation, resume, early stopping, checkpoints, atomic saves,
two real processes under `accelerate launch`)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

import peftprompt
from peftprompt.backbones import smollm2_path
from peftprompt.errors import InputError
from peftprompt.recursive import SelfAskCollator
from peftprompt.training import (
    TrainConfig,
    build_model,
    cpu_bf16_flags,
    latest_checkpoint,
    list_checkpoints,
    load_config,
    model_setup,
    resolve_mixed_precision,
    train,
)
from peftprompt.training import config as config_module
from peftprompt.training import losses as training_losses
from peftprompt.training import trainer as trainer_module
from peftprompt.training.data_config import SelfAskData

from conftest import (
    TINY_VOCAB,
    CompactIds,
    IdTokenizer,
    llama_lora,
    llm_config,
    records,
    small_trees,
    tiny_bert_token_cls,
    tiny_llama,
    token_rows,
    trainable,
    write,
)


def test_yaml_and_overrides_round_trip(tmp_path):
    path = write(
        tmp_path,
        """
        model: smollm2-135m
        task: causal_lm
        method: lora
        method_args: {r: 4, target_modules: [q_proj, v_proj]}
        learning_rate: 1e-4          # PyYAML reads this as a string: accepted for a float field
        warmup_ratio: 0              # an int for a float field
        max_steps: 100
        data: {sources: [musique]}
        """,
    )
    config = load_config(
        path,
        ["method_args.r=16", "data.sources=[probtree_2wiki, probtree_hotpotqa]", "data.packing=false",
         "learning_rate=5e-4", "resume_from=latest", "max_grad_norm="],
    )
    assert config.learning_rate == 5e-4 and isinstance(config.warmup_ratio, float)
    assert config.method_args == {"r": 16, "target_modules": ["q_proj", "v_proj"]}
    assert config.data == SelfAskData(sources=["probtree_2wiki", "probtree_hotpotqa"], packing=False)
    assert config.resume_from == "latest" and config.max_grad_norm is None and config.max_steps == 100
    assert load_config(path).learning_rate == 1e-4
    saved = config.save(tmp_path / "saved.yaml")
    assert load_config(saved) == config
    assert yaml.safe_load(config.to_yaml()) == config.as_dict()


def test_unknown_key_names_file_line_and_closest_key(tmp_path):
    path = write(tmp_path, "task: causal_lm\nmethod: lora\nlearning_rat: 0.001\n")
    with pytest.raises(ValueError) as err:
        load_config(path)
    assert str(err.value) == f"{path}:3: unknown key 'learning_rat' (did you mean 'learning_rate'?)"
    with pytest.raises(ValueError) as err:
        load_config(None, ["task=causal_lm", "learning_rat=1"])
    assert str(err.value) == "override 'learning_rat=1': unknown key (did you mean 'learning_rate'?)"
    with pytest.raises(ValueError, match=r"run.yaml:2: duplicate key 'task' \(first at .*run.yaml:1\)"):
        load_config(write(tmp_path, "task: causal_lm\ntask: seq_cls\n"))


def test_wrong_types_name_field_and_place(tmp_path):
    path = write(tmp_path, "task: causal_lm\nlearning_rate: abc\n")
    with pytest.raises(ValueError) as err:
        load_config(path)
    assert str(err.value) == f"field 'learning_rate' expects float, got 'abc' ({path}:2)"
    with pytest.raises(ValueError) as err:
        load_config(None, ["task=causal_lm", "max_steps=ten"])
    assert str(err.value) == "field 'max_steps' expects int or null, got 'ten' (override 'max_steps=ten')"
    with pytest.raises(ValueError, match=r"field 'load_in_8bit' expects bool, got 3 \(.*run.yaml:2\)"):
        load_config(write(tmp_path, "task: causal_lm\nload_in_8bit: 3\n"))
    with pytest.raises(ValueError, match=r"field 'method_args' expects a mapping, got \[1, 2\]"):
        load_config(None, ["task=causal_lm", "method_args=[1, 2]"])
    with pytest.raises(ValueError, match=r"field 'warmup_ratio' must be in \[0, 1\), got 1.5 \(override"):
        load_config(None, ["task=causal_lm", "warmup_ratio=1.5"])
    with pytest.raises(ValueError, match=r"'learning_rate' is not a mapping"):
        load_config(None, ["task=causal_lm", "learning_rate.x=1"])
    with pytest.raises(ValueError, match="expected key=value"):
        load_config(None, ["learning_rate"])


@pytest.mark.parametrize(
    ("field", "value", "hint"),
    [
        ("method", "lorra", " (did you mean 'lora'?)"),
        ("task", "seq-cls", " (did you mean 'seq_cls'?)"),
        ("mixed_precision", "half", ""),
        ("optimizer", "adam8bit", " (did you mean 'adamw8bit'?)"),
        ("lr_scheduler", "cosin", " (did you mean 'cosine'?)"),
    ],
)
def test_bad_choices(tmp_path, field, value, hint):
    first = "method: lora" if field == "task" else "task: causal_lm"
    path = write(tmp_path, f"{first}\n{field}: {value}\n")
    with pytest.raises(ValueError) as err:
        load_config(path)
    choices = ", ".join(config_module.CHOICES[field])
    assert str(err.value) == f"field {field!r} must be one of {choices}, got {value!r}{hint} ({path}:2)"


@pytest.mark.parametrize("task", ["seq_cls", "token_cls"])
def test_num_labels_required_for_classification(tmp_path, task):
    path = write(tmp_path, f"task: {task}\n")
    with pytest.raises(ValueError, match=rf"num_labels is required for task '{task}'.*\({path}\)"):
        load_config(path)
    assert load_config(path, ["num_labels=3"]).num_labels == 3
    with pytest.raises(ValueError, match="num_labels is required"):
        TrainConfig(task=task)
    assert load_config(None, ["task=causal_lm"]).num_labels is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU rules")
def test_resolve_mixed_precision_on_this_cpu(tmp_path, monkeypatch):
    flags = cpu_bf16_flags()
    mode, reason = resolve_mixed_precision("auto")
    if flags:  # e.g. this project's AMD EPYC has avx512_bf16: bf16 autocast is faster there, not slower
        assert mode == "bf16" and all(f in reason for f in flags)
    else:
        assert (mode, reason) == ("no", config_module.CPU_NO_BF16_REASON)
    assert resolve_mixed_precision("no")[0] == "no"
    with pytest.raises(ValueError, match="'fp16' needs a CUDA GPU"):
        resolve_mixed_precision("fp16")
    # Without the flags (on such a CPU bf16 autocast was measured 18x slower than fp32), auto means no.
    monkeypatch.setattr(config_module, "cpu_bf16_flags", lambda: set())
    assert resolve_mixed_precision("auto") == ("no", config_module.CPU_NO_BF16_REASON)
    assert "18x" in resolve_mixed_precision("bf16")[1]
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f\n")
    assert cpu_bf16_flags(cpuinfo) == set()
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 amx_bf16\n")
    assert cpu_bf16_flags(cpuinfo) == {"avx512_bf16", "amx_bf16"}


@pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers`")
def test_train_selfask_loss_decreases_logs_and_adapter_reloads(tmp_path, smollm2_tokenizer):
    tokenizer = smollm2_tokenizer
    collator = CompactIds(SelfAskCollator(tokenizer, max_length=256, packing=True), small_trees())

    def base():
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=len(collator.ids), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                             pad_token_id=collator.ids[tokenizer.pad_token_id])
        return LlamaForCausalLM(config).eval()

    # The frozen random lm_head of a 32-wide model caps how far the loss can fall: adapt it too.
    model = peftprompt.attach(base(), "lora", task="causal_lm", target_modules=["q_proj", "v_proj", "lm_head"])
    config = llm_config(tmp_path, learning_rate=3e-2, per_device_train_batch_size=2, max_steps=20, log_every=5,
                        eval_every=10, warmup_ratio=0.0)
    result = train(config, model, tokenizer, small_trees() * 2, collator, eval_dataset=small_trees())

    train_records = records(result, "train")
    assert [r["step"] for r in train_records] == [5, 10, 15, 20]
    assert train_records[-1]["loss"] < 0.7 * train_records[0]["loss"]
    for r in train_records:
        assert {"step", "epoch", "loss", "lr", "tokens_per_s", "tokens", "peak_memory_mb"} <= set(r)
        assert r["tokens_per_s"] > 0 and r["peak_memory_mb"] > 0
    evals = records(result, "eval")
    assert [r["step"] for r in evals] == [10, 20] and evals[1]["loss"] < evals[0]["loss"]
    assert result.metrics["loss"] == evals[1]["loss"] and result.best_step == 20
    assert records(result, "start")[0]["world_size"] == 1 and len(records(result, "final")) == 1
    assert result.parameters.trainable_params == sum(p.numel() for p in trainable(model).values())
    assert result.parameters.adapter_bytes > 0 and result.command
    assert model.config.use_cache is True  # off while training (packed rows), restored afterwards
    assert load_config(tmp_path / "run" / "train_config.yaml") == config

    batch = collator(small_trees())
    batch.pop("labels")
    reloaded = peftprompt.load_adapter(base(), result.adapter_dir).eval()
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, reloaded(**batch).logits)


def test_gradient_accumulation_matches_the_larger_batch(tmp_path, monkeypatch):
    """Accumulation 2 x batch 2 = batch 4: the loss is the mean over every trained token of the window.

    The rows hold different numbers of trained tokens, so the mean of the two micro-batch means (what a plain
    ``loss / accumulation_steps`` gives) is a different loss: checked below by counting every micro-batch as one
    item, which turns the normalisation into exactly that.
    """

    big = accumulation_run(tmp_path, "batch4", 4, 1)
    accumulated = accumulation_run(tmp_path, "batch2x2", 2, 2)
    assert largest_difference(big, accumulated) < 1e-6
    monkeypatch.setattr(training_losses, "count_loss_items", lambda labels, task, w=None: torch.tensor(1.0, dtype=torch.float64))
    mean_of_means = accumulation_run(tmp_path, "naive2x2", 2, 2)
    assert largest_difference(big, mean_of_means) > 1e-4


def accumulation_run(tmp_path, name, batch, accumulation, regulariser=None) -> dict:
    model = llama_lora()
    config = llm_config(tmp_path, name, per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
                        max_steps=3)
    train(config, model, None, token_rows(), SelfAskCollator(IdTokenizer(), max_length=64), regulariser=regulariser)
    return trainable(model)


def largest_difference(first: dict, second: dict) -> float:
    return max((first[k] - second[k]).abs().max().item() for k in first)


def test_a_regulariser_enters_each_update_once_whatever_the_accumulation(tmp_path):
    """``mean loss + regulariser(model)`` per update: accumulation 2 x batch 2 = batch 4 with it too (were it added
    per micro-batch, the accumulated run would weigh it twice), and it changes the run."""

    def squared_lora_a(model) -> torch.Tensor:
        return 0.05 * sum((p ** 2).sum() for n, p in model.named_parameters() if "lora_A" in n and p.requires_grad)

    big = accumulation_run(tmp_path, "batch4", 4, 1, squared_lora_a)
    accumulated = accumulation_run(tmp_path, "batch2x2", 2, 2, squared_lora_a)
    assert largest_difference(big, accumulated) < 1e-6
    assert largest_difference(big, accumulation_run(tmp_path, "plain", 4, 1)) > 1e-4


class Crash(Exception):
    pass


@pytest.mark.parametrize("accumulation, grouped", [(1, False), (2, False), (1, True)])
def test_resume_gives_the_same_run(tmp_path, monkeypatch, accumulation, grouped):
    """6 steps straight == 3 steps, a crash, and resume_from=latest to 6 (bit for bit, dropout on, mid-epoch), in
    shuffled or length-grouped order; the training seconds add up over the resume."""

    def run(name, resume_from=None):
        model = llama_lora(dropout=0.1)
        config = llm_config(tmp_path, name, per_device_train_batch_size=4 // accumulation,
                            gradient_accumulation_steps=accumulation, eval_every=3, resume_from=resume_from,
                            group_by_length=grouped)
        result = train(config, model, None, token_rows(), SelfAskCollator(IdTokenizer(), max_length=64),
                       eval_dataset=token_rows(5, seed=1))
        return result, trainable(model)

    straight, straight_params = run("straight")

    def crash_after_saving(*args):
        raise Crash("killed right after the first checkpoint")

    with monkeypatch.context() as patch:
        patch.setattr(trainer_module, "prune_checkpoints", crash_after_saving)
        with pytest.raises(Crash):
            run("resumed")
    assert [step for step, _ in list_checkpoints(tmp_path / "resumed")] == [3]
    resumed, resumed_params = run("resumed", resume_from="latest")

    assert resumed.resumed_from.endswith("step-3") and resumed.global_step == 6
    assert all(torch.equal(straight_params[k], resumed_params[k]) for k in straight_params)
    assert resumed.metrics == straight.metrics and resumed.best_metric == straight.best_metric
    assert [r["loss"] for r in records(resumed, "train")] == [r["loss"] for r in records(straight, "train")]
    assert [r["step"] for r in records(resumed, "resume")] == [3]
    first, last = (r["step_seconds"] for r in records(resumed, "eval"))  # steps 3 and 6, across the resume
    assert 0 < first < last == pytest.approx(resumed.step_seconds, abs=1e-3)
    with pytest.raises(InputError, match="already holds checkpoints of an earlier run") as refused:
        run("resumed")  # a fresh start must not mix with an earlier run's checkpoints
    assert refused.value.field == "output_dir"
    with pytest.raises(InputError, match="field 'resume_from': .* is not a complete checkpoint"):
        run("elsewhere", resume_from=str(tmp_path))


def test_early_stopping_and_token_classification_metrics(tmp_path):
    torch.manual_seed(0)
    model = peftprompt.attach(tiny_bert_token_cls(3), "lora", task="token_cls", target_modules=["query", "value"])
    generator = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(5, TINY_VOCAB, (10,), generator=generator).tolist(),
             "labels": torch.randint(0, 3, (10,), generator=generator).tolist()} for _ in range(12)]
    seen = []

    def compute_metrics(records_, accelerator):
        seen.append(len(records_))
        return {"constant": 1.0}  # never improves after the first evaluation

    config = TrainConfig(task="token_cls", num_labels=3, model="tiny-bert", per_device_train_batch_size=4,
                         max_steps=50, eval_every=1, metric_for_best="constant", early_stopping_patience=2,
                         keep_checkpoints=1, mixed_precision="no", output_dir=str(tmp_path / "run"))
    result = train(config, model, None, rows, SelfAskCollator(IdTokenizer(), max_length=32), eval_dataset=rows[:5],
                   compute_metrics=compute_metrics)
    assert result.stopped_early and result.global_step == 3
    assert (result.best_metric, result.best_step) == (1.0, 1)
    assert seen == [5, 5, 5]  # one record per evaluation row, none counted twice
    assert [step for step, _ in list_checkpoints(tmp_path / "run")] == [3]
    default = train(TrainConfig(**{**config.as_dict(), "output_dir": str(tmp_path / "default"), "max_steps": 1,
                                   "metric_for_best": None}),
                    model, None, rows, SelfAskCollator(IdTokenizer(), max_length=32), eval_dataset=rows[:5])
    assert 0 <= default.metrics["token_accuracy"] <= 1 and default.metrics["items"] == 50


def test_test_dataset_is_reported_but_never_selects(tmp_path):
    """A test set is scored at each evaluation (``test_`` metrics) while the evaluation set alone picks the best step;
    watching a test metric, or a test set without an evaluation set, is refused."""
    torch.manual_seed(0)
    model = peftprompt.attach(tiny_bert_token_cls(3), "lora", task="token_cls", target_modules=["query", "value"])
    generator = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(5, TINY_VOCAB, (10,), generator=generator).tolist(),
             "labels": torch.randint(0, 3, (10,), generator=generator).tolist()} for _ in range(12)]
    collator = SelfAskCollator(IdTokenizer(), max_length=32)
    config = TrainConfig(task="token_cls", num_labels=3, model="tiny-bert", per_device_train_batch_size=4,
                         max_steps=2, eval_every=1, mixed_precision="no", output_dir=str(tmp_path / "run"))
    result = train(config, model, None, rows, collator, eval_dataset=rows[:5], test_dataset=rows[5:8])
    assert result.metrics["items"] == 50 and result.metrics["test_items"] == 30
    assert 0 <= result.metrics["test_token_accuracy"] <= 1 and result.metrics["test_loss"] > 0
    assert result.best_metric == min(e["loss"] for e in result.eval_history)  # the eval loss, not the test loss
    with pytest.raises(ValueError, match="test set never selects"):
        train(TrainConfig(**{**config.as_dict(), "metric_for_best": "test_token_accuracy", "output_dir": str(tmp_path)
                             + "/a"}), model, None, rows, collator, eval_dataset=rows[:5], test_dataset=rows[5:8])
    with pytest.raises(ValueError, match="pass both"):
        train(TrainConfig(**{**config.as_dict(), "output_dir": str(tmp_path / "b")}), model, None, rows, collator,
              test_dataset=rows[5:8])


def test_keep_checkpoints_and_sequence_classification(tmp_path, monkeypatch, capsys):
    torch.manual_seed(0)
    bert = BertForSequenceClassification(BertConfig(vocab_size=TINY_VOCAB, hidden_size=32, intermediate_size=64,
                                                    num_hidden_layers=2, num_attention_heads=4, num_labels=2))
    model = peftprompt.attach(bert, "bitfit", task="seq_cls")
    generator = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(5, TINY_VOCAB, (6,), generator=generator), "labels": torch.tensor(i % 2)}
            for i in range(8)]

    def collate(features):
        return {"input_ids": torch.stack([f["input_ids"] for f in features]),
                "attention_mask": torch.ones(len(features), 6, dtype=torch.long),
                "labels": torch.stack([f["labels"] for f in features])}

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")  # as accelerate's single-process launcher leaves it
    config = TrainConfig(task="seq_cls", num_labels=2, model="tiny-bert", per_device_train_batch_size=4, max_steps=5,
                         save_every=1, keep_checkpoints=2, mixed_precision="no", output_dir=str(tmp_path / "run"))
    result = train(config, model, None, rows, collate, eval_dataset=rows)
    assert [step for step, _ in list_checkpoints(tmp_path / "run")] == [4, 5]
    assert latest_checkpoint(tmp_path / "run").name == "step-5"
    assert not [p for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.startswith(".")]
    state = json.loads((latest_checkpoint(tmp_path / "run") / "trainer_state.json").read_text())
    assert state["global_step"] == 5 and state["best_step"] in (2, 4, 5)
    # eval_every=0: at each epoch end (2 steps per epoch) and at the end
    assert [r["step"] for r in records(result, "eval")] == [2, 4, 5]
    assert 0 <= result.metrics["accuracy"] <= 1 and result.metrics["items"] == 8
    assert "ONE process" in capsys.readouterr().out


class FailingTokenizer:
    def save_pretrained(self, path):
        (Path(path) / "tokenizer.json").write_text("{")  # half-written
        raise OSError("disk full")


def test_interrupted_saves_leave_the_previous_adapter_and_checkpoint_intact(tmp_path, monkeypatch):
    out = tmp_path / "run"
    first = train(llm_config(tmp_path, max_steps=2), llama_lora(), None, token_rows(), SelfAskCollator(IdTokenizer()))
    saved = load_file(first.adapter_dir / "adapter_model.safetensors")

    # The adapter writer fails half-way (after the weights, at the tokenizer): the old adapter stays in place.
    with pytest.raises(OSError, match="disk full"):
        train(llm_config(tmp_path, max_steps=4, resume_from="latest"), llama_lora(), FailingTokenizer(), token_rows(),
              SelfAskCollator(IdTokenizer()))
    assert all(torch.equal(v, saved[k]) for k, v in load_file(first.adapter_dir / "adapter_model.safetensors").items())
    peftprompt.load_adapter(tiny_llama(), first.adapter_dir)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]

    # save_state fails half-way: no step-6 directory, step-4 is still the latest complete checkpoint.
    def failing_save_state(self, output_dir=None, **kwargs):
        (Path(output_dir) / "model.safetensors").write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(trainer_module.Accelerator, "save_state", failing_save_state)
    with pytest.raises(OSError, match="disk full"):
        train(llm_config(tmp_path, max_steps=6, resume_from="latest"), llama_lora(), None, token_rows(),
              SelfAskCollator(IdTokenizer()))
    assert [step for step, _ in list_checkpoints(out)] == [2, 4]
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
    monkeypatch.undo()
    resumed = train(llm_config(tmp_path, max_steps=6, resume_from="latest"), llama_lora(), None, token_rows(),
                    SelfAskCollator(IdTokenizer()))
    assert resumed.resumed_from.endswith("step-4") and resumed.global_step == 6


def test_4bit_weights_keep_their_training_layout_through_evaluations(tmp_path):
    """bitsandbytes repacks a 4-bit layer's weight for its CPU inference kernel at the first eval-mode, no-grad
    forward (on CPUs with avx512_bf16), after which the model stops learning: the trainer switches that off while it
    trains (each evaluation, and the kept-logits probe, would trigger it) and switches it back afterwards."""
    base = tmp_path / "tiny-llama"
    tiny_llama().save_pretrained(base)
    AutoTokenizer.from_pretrained(smollm2_path()).save_pretrained(base)
    config = llm_config(tmp_path, model=str(base), load_in_4bit=True, max_steps=6, eval_every=1,
                        learning_rate=1e-2)
    model, tokenizer = build_model(config)
    layers = [m for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    assert layers
    for layer in layers:
        layer.support_avx512bf16_for_cpu = True  # as on a CPU with avx512_bf16, whatever this one has
    seen = []
    result = train(config, model, tokenizer, token_rows(8), SelfAskCollator(IdTokenizer()),
                   eval_dataset=token_rows(4, seed=1),
                   evaluate_fn=lambda m, a: seen.append([l.support_avx512bf16_for_cpu for l in layers]) or {})
    assert seen and not any(any(flags) for flags in seen)  # off during every evaluation
    assert all(layer.support_avx512bf16_for_cpu for layer in layers)  # and back on afterwards
    assert not any(getattr(l.weight.quant_state, "packing_format_for_cpu", False) for l in layers)
    losses = [r["loss"] for r in records(result, "eval")]
    assert losses[-1] < losses[0]


def test_auto_mixed_precision_trains(tmp_path):
    """``auto`` as resolved on this machine (bf16 on a CPU with avx512_bf16 / amx_bf16), after runs in fp32 in
    the same process (train() resets Accelerate's state when the precision changes)."""
    mode, _ = resolve_mixed_precision("auto")
    result = train(llm_config(tmp_path, mixed_precision="auto", max_steps=3, eval_every=3), llama_lora(), None,
                   token_rows(), SelfAskCollator(IdTokenizer()), eval_dataset=token_rows(4, seed=1))
    assert records(result, "start")[0]["mixed_precision"] == mode == result.mixed_precision
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records(result, "train"))
    assert 0 < result.metrics["loss"] < 10


def test_prepare_backbone_kbit_checkpointing_and_prefix_refusal(tmp_path):
    base = tmp_path / "tiny-llama"
    tiny_llama().save_pretrained(base)
    AutoTokenizer.from_pretrained(smollm2_path()).save_pretrained(base)
    config = llm_config(tmp_path, model=str(base), load_in_8bit=True, gradient_checkpointing=True,
                        optimizer="adamw8bit", max_steps=2)
    model, tokenizer = build_model(config)
    assert model.base_model.model.is_gradient_checkpointing
    result = train(config, model, tokenizer, token_rows(8), SelfAskCollator(IdTokenizer()))
    assert result.global_step == 2 and (result.adapter_dir / "adapter_model.safetensors").is_file()
    with pytest.raises(ValueError, match="prefix tuning cannot be combined with gradient checkpointing"):
        build_model(llm_config(tmp_path, model=str(base), method="prefix", gradient_checkpointing=True))


def test_unquoted_yaml_no_means_no(tmp_path):
    config = load_config(write(tmp_path, "task: causal_lm\nmixed_precision: no\n"), ["mixed_precision=no"])
    assert config.mixed_precision == "no"


@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("weighted", [False, True])
def test_logits_at_trained_positions_only_give_the_same_loss_and_gradients(method, weighted):
    """The kept-logits path (lm head and softmax at trained positions only) equals the full-logits path."""
    from peftprompt import attach

    model = attach(tiny_llama(seed=3), method)
    assert training_losses.supports_kept_logits(model, "causal_lm")
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(5, TINY_VOCAB, (3, 16), generator=generator)
    labels = torch.full_like(input_ids, -100)
    labels[0, 4:9] = input_ids[0, 4:9]  # trained spans differ per row, as in packed self-ask rows
    labels[1, 10:16] = input_ids[1, 10:16]
    labels[2, 2:4] = input_ids[2, 2:4]
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
    if weighted:
        batch["loss_weights"] = torch.rand(input_ids.shape, generator=generator) + 0.5
    keep = training_losses.trained_positions(labels)  # each row its own positions: the one before each trained label
    assert [row.nonzero().squeeze(1).tolist() for row in keep] == [[3, 4, 5, 6, 7], [9, 10, 11, 12, 13, 14], [1, 2]]
    head_rows = []
    head = model.get_base_model().get_output_embeddings() if method != "full" else model.get_output_embeddings()
    head.register_forward_hook(lambda module, args, output: head_rows.append(args[0].shape[:-1].numel()))

    results = []
    for kept in (False, True):
        model.zero_grad()
        loss, items, tokens = training_losses.training_loss(model, batch, "causal_lm", kept_logits=kept)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), items, tokens, grads))
    (full_loss, full_items, full_tokens, full_grads), (kept_loss, kept_items, kept_tokens, kept_grads) = results
    expected_items = batch["loss_weights"][labels != -100].sum() if weighted else torch.tensor(13.0)
    # items count the trained next-token targets: labels[:, 1:] set (the label at position 0 is never predicted)
    assert float(full_items) == pytest.approx(float(kept_items)) == pytest.approx(float(expected_items), rel=1e-5)
    assert int(full_tokens) == int(kept_tokens) == 48
    assert head_rows == [48, 13]  # the lm head ran at every position, then at the 13 trained positions only
    torch.testing.assert_close(kept_loss, full_loss, rtol=1e-5, atol=1e-5)
    assert full_grads.keys() == kept_grads.keys() and full_grads
    for name in full_grads:
        torch.testing.assert_close(kept_grads[name], full_grads[name], rtol=1e-5, atol=1e-5, msg=name)


def test_prompt_learning_and_classification_keep_the_full_logits():
    from peftprompt import attach

    assert not training_losses.supports_kept_logits(attach(tiny_llama(), "prompt"), "causal_lm")
    assert not training_losses.supports_kept_logits(tiny_llama(), "seq_cls")


@pytest.mark.parametrize("method", ["lora", "bitfit", "ia3", "prompt"])
def test_half_precision_frozen_backbone_keeps_trainable_weights_in_float32(method, tiny_smollm, tmp_path):
    """frozen_dtype bfloat16: the backbone is loaded and kept in bf16, adapters are float32 and train under bf16
    autocast (the kept-logits path included); the saved adapter is float32."""
    config = llm_config(tmp_path, model=str(tiny_smollm), method=method, frozen_dtype="bfloat16",
                        mixed_precision="bf16", max_steps=2)
    model, tokenizer = model_setup.build_model(config)
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    trained = {p.dtype for p in model.parameters() if p.requires_grad}
    assert frozen == {torch.bfloat16} and trained == {torch.float32}
    before = trainable(model)
    result = train(config, model, tokenizer, token_rows(), SelfAskCollator(IdTokenizer(), max_length=32))
    losses = [json.loads(line)["loss"] for line in result.log_file.read_text().splitlines() if '"train"' in line]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    assert any(not torch.equal(before[n], p) for n, p in trainable(model).items())
    saved = load_file(result.adapter_dir / "adapter_model.safetensors")
    assert saved and {t.dtype for t in saved.values()} == {torch.float32}


def test_half_precision_frozen_backbone_is_refused_where_it_cannot_work(tmp_path):
    with pytest.raises(ValueError, match="method 'full' trains every weight"):
        llm_config(tmp_path, method="full", frozen_dtype="bfloat16")
    with pytest.raises(ValueError, match="for unquantised backbones"):
        llm_config(tmp_path, frozen_dtype="float16", load_in_4bit=True)
    with pytest.raises(ValueError, match="must be one of float32, bfloat16, float16"):
        llm_config(tmp_path, frozen_dtype="bf16")
    with pytest.raises(ValueError, match="mixed precision is off"):
        train(llm_config(tmp_path, frozen_dtype="bfloat16", mixed_precision="no"), llama_lora(), None, token_rows(),
              SelfAskCollator(IdTokenizer()))


def test_skipping_adapter_input_casts_under_autocast_changes_no_number():
    """PEFT casts each LoRA layer's input to float32, which bf16 autocast casts straight back: skipping both is
    exact (bf16 -> fp32 -> bf16 is lossless), and the layers cast again afterwards."""
    model = llama_lora(seed=2)
    layers = [m for m in model.modules() if getattr(m, "cast_input_dtype_enabled", None) is True]
    assert len(layers) == 4  # q_proj and v_proj of 2 layers
    input_ids = torch.randint(5, TINY_VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    losses = []
    for skip in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16), training_losses.input_casts_skipped(layers if skip else []):
            assert all(m.cast_input_dtype_enabled is not skip for m in layers)
            losses.append(model(input_ids=input_ids, labels=input_ids).loss)
    assert all(m.cast_input_dtype_enabled is True for m in layers)
    assert torch.equal(losses[0], losses[1])


def test_frozen_dtype_auto_follows_the_mixed_precision(tmp_path, monkeypatch):
    resolve = config_module.resolve_frozen_dtype
    assert resolve(llm_config(tmp_path, frozen_dtype="auto", mixed_precision="bf16")) == torch.bfloat16
    assert resolve(llm_config(tmp_path, frozen_dtype="auto", mixed_precision="no")) == torch.float32
    # every weight trains, or the backbone is quantised: float32 whatever the mixed precision
    assert resolve(llm_config(tmp_path, frozen_dtype="auto", mixed_precision="bf16", method="full")) == torch.float32
    assert resolve(llm_config(tmp_path, frozen_dtype="auto", mixed_precision="bf16", load_in_8bit=True)) == torch.float32
    monkeypatch.setattr(config_module, "cpu_bf16_flags", lambda *_: set())  # a CPU without native bf16: auto -> no
    assert resolve(llm_config(tmp_path, frozen_dtype="auto", mixed_precision="auto")) == torch.float32
    assert resolve(llm_config(tmp_path, frozen_dtype="float16", mixed_precision="no")) == torch.float16


def test_length_grouped_order_depends_on_seed_and_epoch_only():
    from peftprompt.training.sampling import EpochLengthGroupedSampler, example_lengths

    rows = token_rows(400, seed=3)
    lengths = example_lengths(rows)
    assert lengths == [len(r["input_ids"]) for r in rows]
    sampler = EpochLengthGroupedSampler(lengths, batch_size=4, seed=0)
    first = list(sampler)
    assert sorted(first) == list(range(400)) and list(sampler) == first  # a permutation, repeated within an epoch
    sampler.set_epoch(1)
    assert list(sampler) != first
    sampler.set_epoch(0)
    assert list(EpochLengthGroupedSampler(lengths, batch_size=4, seed=0)) == first == list(sampler)
    assert list(EpochLengthGroupedSampler(lengths, batch_size=4, seed=1)) != first

    def padded(order):  # positions a batch of 4 pads to, summed over the epoch
        return sum(4 * max(lengths[i] for i in order[j:j + 4]) for j in range(0, len(order), 4))

    shuffled = torch.randperm(400, generator=torch.Generator().manual_seed(0)).tolist()
    assert padded(first) < padded(shuffled) and padded(first) <= sum(lengths) * 1.05
    with pytest.raises(ValueError, match="training example 0 has no input_ids .*packed instead"):
        example_lengths([small_trees()[0]])
