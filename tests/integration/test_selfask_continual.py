"""Self-ask that keeps learning: only verified traces become training trees, the pool and the evaluation-only sets
never reach training, an adapter continues from where it was, and the round loop end to end on a tiny model."""

from __future__ import annotations

import json

import pytest
import torch

from peftprompt.errors import InputError
from peftprompt.recursive import Node, Unroller, convert, read_trees
from peftprompt.recursive.tree import question_key
from peftprompt.selfask import SelfAskRunner, ToolAnswerer
from peftprompt.selfask.continual import replay_sample, split_pool, verified_trees
from peftprompt.training import build_model, load_config

from conftest import FACTS, QUESTION, REPO, TWO_STEPS, Scripted, call_main, script_module


def gold(answer: str, tree_id: str) -> Node:
    return Node(question=QUESTION, answer=answer, aliases=["Hyomyeong"], id=tree_id, dataset="2wikimultihopqa",
                split="train")


def test_only_well_formed_runs_with_the_gold_answer_are_kept():
    runner = SelfAskRunner(generate_fn=Scripted({QUESTION: TWO_STEPS}), answerer=ToolAnswerer(lambda q: FACTS[q]))
    right = runner.run(QUESTION)  # "Crown Prince Hyomyeong", well formed
    ill_formed = runner.run(QUESTION)
    ill_formed.well_formed = False
    trees = [gold("Crown Prince Hyomyeong", "a"), gold("King Sunjo", "b"), gold("crown prince hyomyeong.", "c")]
    kept = verified_trees(trees, [right, right, ill_formed], round_index=2)
    assert [tree.id for tree in kept] == ["a@round2"]
    (tree,) = kept
    assert (tree.dataset, tree.split, tree.meta["round"], tree.meta["from"]) == ("2wikimultihopqa", "train", 2, "a")
    assert [child.answer_source for child in tree.children] == ["tool", "tool"]
    assert Unroller()(tree)[0].text == right.text  # the trace trains as the model wrote it
    with pytest.raises(ValueError, match="2 gold trees for 1 results"):
        verified_trees(trees[:2], [right], round_index=1)


def test_the_pool_is_held_back_seeded_and_never_an_evaluation_set():
    trees = convert("2wikimultihopqa")
    training, pool = split_pool(trees, pool_size=50, seed=0)
    assert len(pool) == 50 and len(training) == len(trees) - 50
    assert not {question_key(t.question) for t in pool} & {question_key(t.question) for t in training}
    assert split_pool(trees, 50, seed=0)[1] == pool and split_pool(trees, 50, seed=1)[1] != pool
    with pytest.raises(InputError, match="compositional_celebrities"):
        split_pool(convert("compositional_celebrities"), pool_size=5)
    assert len(replay_sample(training, 10, seed=0)) == 10 and replay_sample(training[:3], 10) == training[:3]


def test_init_adapter_continues_the_saved_weights(tiny_smollm, tmp_path):
    config = load_config(REPO / "recipes/configs/smollm2/selfask_lora.yaml", [f"model={tiny_smollm}"])
    model, _ = build_model(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.add_(1.0)
    model.save_pretrained(tmp_path / "saved")
    continued, _ = build_model(load_config(None, [f"model={tiny_smollm}", "task=causal_lm",
                                                  f"init_adapter={tmp_path / 'saved'}"]))
    saved = {n: p for n, p in model.named_parameters() if "lora_" in n}
    loaded = {n: p for n, p in continued.named_parameters() if "lora_" in n}
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[n], loaded[n]) for n in saved)
    assert all(p.requires_grad for p in loaded.values())
    with pytest.raises(InputError, match="holds a lora adapter, but method is 'ia3'"):
        build_model(load_config(None, [f"model={tiny_smollm}", "task=causal_lm", "method=ia3",
                                       f"init_adapter={tmp_path / 'saved'}"]))


@pytest.mark.usefixtures("scripts_in_process")
def test_the_round_loop_trains_scores_and_never_trains_on_evaluation_sets(tiny_smollm, tmp_path):
    out = tmp_path / "continual"
    args = ["--output_dir", str(out), "--rounds", "1", "--pool-size", "6", "--questions-per-round", "4", "--n-eval",
            "3", "--processes", "1", f"model={tiny_smollm}", "max_steps=2", "max_train_samples=12", "max_eval_samples=4", "max_length=256",
            "data.generate_eval=0", "mixed_precision=no", "frozen_dtype=float32",
            "data.sources=[musique,2wikimultihopqa]"]
    recipe = script_module(REPO / "recipes/selfask_continual.py")  # its rounds' training runs here too
    call_main(recipe.main, args)
    summary = json.loads((out / "selfask_continual.json").read_text())
    first, second = summary["rounds"]
    assert first["round"] == 0 and first["trained_trees"] == summary["original_trees"]
    assert second["asked"] == 4 and 0 <= second["verified"] <= 4
    for record in summary["rounds"]:
        assert record["held_out"]["n"] == 3 and record["compositional_celebrities"]["n"] == 3
        assert 0 <= record["held_out"]["em"] <= 1
    assert (out / "round-0" / "adapter" / "adapter_model.safetensors").is_file()
    trained = read_trees(out / "round-0" / "train_trees.jsonl")
    evaluation = {question_key(t.question) for t in convert("compositional_celebrities") + convert("bamboogle")}
    pool = split_pool(convert("2wikimultihopqa"), 6, seed=0)[1]
    asked = {question_key(t.question) for tree in trained for _, t in tree.iter_nodes()}
    assert not asked & evaluation and not asked & {question_key(t.question) for t in pool}
    assert {t.dataset for t in trained} <= {"musique", "2wikimultihopqa"}
    before = (out / "round-0" / "eval.json").stat().st_mtime_ns
    call_main(recipe.main, args)
    assert (out / "round-0" / "eval.json").stat().st_mtime_ns == before  # not repeated


def test_a_round_continues_the_adapter_on_verified_trees_read_from_jsonl(tiny_smollm, tmp_path):
    from peftprompt.recursive import write_trees

    runner = SelfAskRunner(generate_fn=Scripted({QUESTION: TWO_STEPS}), answerer=ToolAnswerer(lambda q: FACTS[q]))
    kept = verified_trees([gold("Crown Prince Hyomyeong", "a")], [runner.run(QUESTION)], round_index=1)
    write_trees(tmp_path / "verified.jsonl", kept * 4)
    config = load_config(REPO / "recipes/configs/smollm2/selfask_lora.yaml", [f"model={tiny_smollm}"])
    model, _ = build_model(config)
    model.save_pretrained(tmp_path / "round-0")
    args = ["--config", str(REPO / "recipes/configs/smollm2/selfask_lora.yaml"), f"model={tiny_smollm}",
            f"init_adapter={tmp_path / 'round-0'}", f"data.sources=[{tmp_path / 'verified.jsonl'}]", "max_steps=null",
            "num_epochs=1", "max_eval_samples=2", "max_length=256", "data.generate_eval=0", "mixed_precision=no",
            "frozen_dtype=float32", f"output_dir={tmp_path / 'round-1'}"]
    done = call_main(script_module(REPO / "recipes/selfask_sft.py").main, args)
    assert "4 training trees" in done.stderr
    results = json.loads((tmp_path / "round-1" / "results.json").read_text())
    assert results["global_step"] >= 1 and results["trainable_params"] == sum(
        p.numel() for n, p in model.named_parameters() if "lora_" in n)
