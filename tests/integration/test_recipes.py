"""Each recipe end to end under `accelerate launch` with 2 CPU processes, on tiny random models and a few steps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer, BertForSequenceClassification

from peftprompt import load_adapter
from peftprompt.backbones import smollm2_path
from peftprompt.errors import InputError
from peftprompt.recursive import Unroller, convert
from peftprompt.training import load_config

from conftest import REPO, script_module

ACCELERATE = Path(sys.executable).with_name("accelerate")


def launch(recipe: str, config: str, overrides: list[str], output_dir: Path) -> list[dict]:
    """Run a recipe with the 2-process CPU accelerate config; return its metrics.jsonl records."""
    command = [
        str(ACCELERATE), "launch", "--config_file", str(REPO / "recipes/accelerate/cpu_2proc.yaml"),
        str(REPO / "recipes" / recipe), "--config", str(REPO / config), *overrides,
        f"output_dir={output_dir}", "mixed_precision=no", "log_every=1",
    ]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def check_run(records: list[dict], output_dir: Path, metric: str) -> dict:
    """2 processes, 4 logged steps, results.json, a model card naming `metric`, a non-empty adapter."""
    start = next(r for r in records if r["type"] == "start")
    assert start["world_size"] == 2
    assert [r["step"] for r in records if r["type"] == "train"] == [1, 2, 3, 4]
    results = json.loads((output_dir / "results.json").read_text())
    assert results["world_size"] == 2 and results["global_step"] == 4
    assert results["trainable_params"] > 0 and results["adapter_bytes"] > 0
    card = (output_dir / "adapter" / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: peft" in card and metric in card
    assert (output_dir / "adapter" / "adapter_model.safetensors").stat().st_size > 0
    return results


def test_sst2_recipe(tiny_bert, tmp_path):
    out = tmp_path / "sst2"
    records = launch(
        "sst2_classification.py", "recipes/configs/minilm/sst2_bitfit.yaml",
        [f"model={tiny_bert}", "max_steps=4", "eval_every=2", "max_train_samples=64", "max_eval_samples=48",
         "per_device_train_batch_size=4"], out,
    )
    results = check_run(records, out, "accuracy")
    evals = [r for r in records if r["type"] == "eval"]
    assert [r["step"] for r in evals] == [2, 4]
    # dev.tsv (48 rows) is the evaluation set, test.tsv (all 698 rows) is reported next to it
    assert evals[-1]["items"] == 48 and evals[-1]["test_items"] == 698
    assert results["accuracy"] == evals[-1]["test_accuracy"] and results["dev_accuracy"] == evals[-1]["accuracy"]
    assert 0.0 <= results["accuracy"] <= 1.0
    base = BertForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    model = load_adapter(base, out / "adapter")
    assert model.peft_config["default"].peft_type == "BITFIT"


def test_sst2_recipe_data_options():
    config = REPO / "recipes/configs/minilm/sst2_lora.yaml"
    assert load_config(config).data.eval_min_words == 0
    assert load_config(config, ["data.eval_min_words=10"]).data.eval_min_words == 10
    with pytest.raises(InputError, match=r"^override 'data.eval_min_word=10': unknown key \(did you mean "
                                         r"'data.eval_min_words'\?\)$"):
        load_config(config, ["data.eval_min_word=10"])
    with pytest.raises(InputError, match=r"^field 'data.eval_min_words' must be >= 0, got -1 \(override"):
        load_config(config, ["data.eval_min_words=-1"])


def test_conll03_recipe(tiny_bert, tmp_path):
    out = tmp_path / "conll"
    records = launch(
        "conll03_ner.py", "recipes/configs/minilm/conll03_lora.yaml",
        [f"model={tiny_bert}", "max_steps=4", "max_train_samples=32", "max_eval_samples=40",
         "per_device_train_batch_size=4"], out,
    )
    results = check_run(records, out, "entity_f1")
    final = [r for r in records if r["type"] == "eval"][-1]
    assert {"entity_f1", "entity_precision", "entity_recall", "loss", "test_entity_f1", "test_loss"} <= set(final)
    assert results["entity_f1"] == final["test_entity_f1"] and results["dev_entity_f1"] == final["entity_f1"]
    assert 0.0 <= results["entity_f1"] <= 1.0


def test_selfask_recipe(tiny_smollm, tmp_path):
    out = tmp_path / "selfask"
    records = launch(
        "selfask_sft.py", "recipes/configs/smollm2/selfask_lora.yaml",
        [f"model={tiny_smollm}", "max_steps=4", "max_train_samples=40", "max_eval_samples=8",
         "per_device_train_batch_size=1", "gradient_accumulation_steps=1", "max_length=256",
         "data.generate_eval=2"], out,
    )
    results = check_run(records, out, "eval_loss")
    assert results["eval_loss"] > 0
    assert 0.0 <= results["selfask_em"] <= 1.0 and 0.0 <= results["selfask_well_formed"] <= 1.0


def selfask_sft_module():
    """recipes/selfask_sft.py imported as a module."""
    return script_module(REPO / "recipes/selfask_sft.py")


@pytest.mark.parametrize("method, packing, packed", [
    ("lora", "auto", True), ("bitfit", "auto", True), ("prompt", "auto", False), ("ptuning", "auto", False),
    ("prefix", "auto", False), ("lora", "false", False), ("prefix", "false", False),
])
def test_selfask_packing_choice(method, packing, packed):
    config = load_config(REPO / "recipes/configs/smollm2/selfask_lora.yaml",
                         [f"method={method}", "method_args={}", f"data.packing={packing}"])
    assert selfask_sft_module().uses_packing(config) is packed


@pytest.mark.parametrize("method, packing, message", [
    ("prefix", "true", "data.packing=true with method prefix"),
    ("lora", "sometimes", "field 'data.packing' must be one of true, false, auto, got 'sometimes'"),
])
def test_selfask_packing_refusals(method, packing, message):
    with pytest.raises(InputError, match=message):
        load_config(REPO / "recipes/configs/smollm2/selfask_lora.yaml",
                    [f"method={method}", "method_args={}", f"data.packing={packing}"])


def test_selfask_unpacked_rows_are_single_episodes():
    module, tokenizer = selfask_sft_module(), AutoTokenizer.from_pretrained(smollm2_path())
    config = load_config(REPO / "recipes/configs/smollm2/selfask_lora.yaml", ["max_length=512"])
    trees = convert("probtree_2wiki")[:30]
    unroller = Unroller(mode="flat")
    padded = module.episode_rows(trees, tokenizer, config, unroller, packing=False)
    packed = module.episode_rows(trees, tokenizer, config, unroller, packing=True)
    assert len(padded) == 30 and all("position_ids" not in row for row in padded)
    assert len(packed) < len(padded) and all(len(row["input_ids"]) <= 512 for row in packed)
    # the same tokens either way, and a packed row restarts its positions at every episode
    assert sorted(t for row in padded for t in row["input_ids"]) == sorted(t for row in packed for t in row["input_ids"])
    assert sum(row["position_ids"].count(0) for row in packed) == 30


def test_selfask_recipe_refuses_evaluation_only_sources(tiny_smollm, tmp_path):
    command = [
        sys.executable, str(REPO / "recipes/selfask_sft.py"), "--config",
        str(REPO / "recipes/configs/smollm2/selfask_lora.yaml"), f"model={tiny_smollm}",
        "data.sources=[compositional_celebrities]", f"output_dir={tmp_path}",
    ]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode != 0
    assert "compositional_celebrities" in done.stderr and "evaluation" in done.stderr


def test_recipe_config_error_is_one_line(tmp_path):
    command = [sys.executable, str(REPO / "recipes/sst2_classification.py"), "--config",
               str(REPO / "recipes/configs/minilm/sst2_lora.yaml"), "learning_rat=1e-3"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "unknown key" in done.stderr and "learning_rate" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("mode, leaf_episodes, expected", [
    ("flat", "false", 2), ("recursive", "false", 2 + 1), ("mix", "false", 2 + 1 + 1),  # inner nodes only
    ("flat", "true", 2), ("recursive", "true", 5 + 3), ("mix", "true", 5 + 1 + 3),  # and a No. episode per leaf
])
def test_selfask_modes_parse_and_give_their_episode_counts(mode, leaf_episodes, expected, tmp_path):
    from peftprompt.recursive import Node, read_trees, write_trees

    deep = Node(question="Which film's director died later, A or B?", answer="B", id="d", dataset="toy", children=[
        Node(question="When did the director of A die?", answer="1975", id="1", children=[
            Node(question="Who directed A?", answer="Stevens", id="1"),
            Node(question="When did Stevens die?", answer="1975", id="2")]),
        Node(question="When did Sirk die?", answer="1987", id="2")])
    shallow = Node(question="Where was the director of C born?", answer="Paris", id="s", dataset="toy", children=[
        Node(question="Who directed C?", answer="Carné", id="1"), Node(question="Where was Carné born?",
                                                                        answer="Paris", id="2")])
    write_trees(tmp_path / "trees.jsonl", [deep, shallow])
    trees = read_trees(tmp_path / "trees.jsonl")
    module, tokenizer = selfask_sft_module(), AutoTokenizer.from_pretrained(smollm2_path())
    config = load_config(REPO / "recipes/configs/smollm2/selfask_lora.yaml",
                         [f"data.mode={mode}", f"data.leaf_episodes={leaf_episodes}"])
    rows = module.episode_rows(trees, tokenizer, config, module.unroller_for(config), packing=False)
    assert len(rows) == expected
    # recursive and mix teach the compositional follow-up as a question of its own
    starts = {tokenizer.decode(row["input_ids"]).split("\n")[0] for row in rows}
    assert ("Question: When did the director of A die?" in starts) == (mode != "flat")


def test_selfask_bad_mode_and_generation_settings_are_refused():
    for overrides, message in ((["data.mode=deep"], "field 'data.mode' must be one of flat, recursive, mix"),
                               (["data.eval_knowledge=some"], "field 'data.eval_knowledge' must be one of leaves"),
                               (["data.leaf_episodes=maybe"], "field 'data.leaf_episodes' expects bool, got 'maybe'"),
                               (["data.eval_max_depth=-1"], "field 'data.eval_max_depth' must be >= 0, got -1")):
        with pytest.raises(InputError, match=message):
            load_config(REPO / "recipes/configs/smollm2/selfask_lora.yaml", overrides)


def test_demo_schedule_overrides_the_shipped_config_and_yields_to_the_user():
    """`make demo` trains the shipped self-ask config on its shorter schedule; its overrides are valid keys, come
    after the config and before the user's own (which win)."""
    demo = script_module(REPO / "recipes/demo_selfask.py")
    shipped = load_config(demo.CONFIG)
    config = load_config(demo.CONFIG, demo.DEMO_SCHEDULE)
    assert (shipped.max_steps, shipped.method_args["lora_dropout"]) == (200, 0.1)
    assert (config.max_steps, config.learning_rate, config.method_args["lora_dropout"]) == (100, 2e-3, 0.0)
    assert (config.data.generate_eval, config.max_eval_samples) == (0, 40) and shipped.learning_rate == 1e-3
    assert config.method_args["r"] == shipped.method_args["r"] and config.data.mode == shipped.data.mode
    command, _ = demo.train_command(Path("out"), ["max_steps=20"])
    assert command[-len(demo.DEMO_SCHEDULE) - 1:] == [*demo.DEMO_SCHEDULE, "max_steps=20"]
