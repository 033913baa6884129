"""Continual learning: the tasks and their splits, the accuracy-matrix scores, replay, routing, adapters per task, and
every strategy end to end on a tiny BERT."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from peftprompt.continual import (
    STRATEGIES,
    CentroidRouter,
    load_router,
)

from conftest import REPO, call_main, script_module


def recipe_args(strategy: str, tiny_bert: Path, output_dir: Path, *overrides: str) -> list[str]:
    config = REPO / "recipes" / "configs" / "minilm" / f"continual_{strategy}.yaml"
    return ["--config", str(config), f"model={tiny_bert}", "data.tasks=[agnews,yelp]", "data.train_per_task=24",
            "data.test_per_task=8", "data.router_examples=8", "max_length=24", "num_epochs=1",
            "per_device_train_batch_size=8", "mixed_precision=no", f"output_dir={output_dir}", *overrides]


def run_recipe(strategy: str, tiny_bert: Path, output_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    """The recipe in this process (`call_main`): one process, as ``python recipes/continual_classification.py``."""
    recipe = script_module(REPO / "recipes" / "continual_classification.py")
    return call_main(recipe.main, recipe_args(strategy, tiny_bert, output_dir, *overrides))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_trains_the_sequence_and_fills_its_matrix(strategy, tiny_bert, tmp_path):
    run_recipe(strategy, tiny_bert, tmp_path / "run")
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    matrix = results["accuracy_matrix"]
    if strategy == "joint":
        assert len(matrix) == 1 and all(value is not None for value in matrix[0])
        assert results["stages"][0]["train_examples"] == 48 and results["backward_transfer"] is None
    else:
        assert [[value is None for value in row] for row in matrix] == [[False, True], [False, False]]
        assert [stage["task"] for stage in results["stages"]] == ["agnews", "yelp"]
        assert results["stages"][0]["global_step"] == 3  # 24 rows, batch 8, one epoch
        assert results["backward_transfer"] == pytest.approx(matrix[1][0] - matrix[0][0])
    replayed = [stage.get("replayed_examples") for stage in results["stages"]]
    assert replayed == ([None] if strategy == "joint" else [0, 0])  # 2 % of 24 rows rounds to 0
    assert all(0 <= value <= 1 for row in matrix for value in row if value is not None)
    adapters = tmp_path / "run" / "adapters"
    if strategy == "adapter_per_task":
        assert sorted(results["routed"]) == ["centroid", "linear"]
        for routed in results["routed"].values():
            assert routed["routing_accuracy"][0] == [1.0, None]  # one task: every input goes to it
            assert [[value is None for value in row] for row in routed["accuracy_matrix"]] == [[False, True],
                                                                                              [False, False]]
        assert (adapters / "agnews" / "adapter_model.safetensors").is_file()
        assert load_router(adapters / "router-linear.safetensors").tasks == ["agnews", "yelp"]
        assert type(load_router(adapters / "router-centroid.safetensors")) is CentroidRouter
        assert results["stages"][0]["trainable_params"] == results["stages"][1]["trainable_params"]
    elif strategy == "osf":
        assert [stage["effective_rank"] for stage in results["stages"]] == [0.3, 0.7]
        assert (adapters / "model.safetensors").is_file()  # the merged model
    elif strategy == "orthogonal_lora":
        first, second = (stage["orthogonality_penalty"] for stage in results["stages"])
        assert first == {"start": 0.0, "end": 0.0}  # no earlier task
        # the second task's new LoRA starts overlapping the first's (random A); the penalty trains the overlap down
        assert 0 < second["end"] < second["start"]
        assert (adapters / "model.safetensors").is_file()  # the merged model
    else:
        assert (adapters / "adapter_model.safetensors").is_file()
    assert not list((tmp_path / "run" / "stages").glob("*/checkpoints"))


def test_replay_trains_the_stated_share_of_earlier_rows(tiny_bert, tmp_path):
    run_recipe("replay", tiny_bert, tmp_path / "run", "data.replay_fraction=0.25")
    stages = json.loads((tmp_path / "run" / "results.json").read_text())["stages"]
    assert [stage["replayed_examples"] for stage in stages] == [0, 6]
    assert [stage["train_examples"] for stage in stages] == [24, 30]


def test_a_finished_run_is_never_overwritten(tiny_bert, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text("{}")
    # a process of its own: the refusal as a user sees it, one line and no traceback
    command = [sys.executable, str(REPO / "recipes" / "continual_classification.py"),
               *recipe_args("sequential", tiny_bert, run)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "holds a finished continual run" in done.stderr
    assert "Traceback" not in done.stderr and (run / "results.json").read_text() == "{}"


def test_the_recipe_runs_under_accelerate_launch_on_two_processes(tiny_bert, tmp_path):
    accelerate = Path(sys.executable).with_name("accelerate")
    command = [str(accelerate), "launch", "--config_file", str(REPO / "recipes/accelerate/cpu_2proc.yaml"),
               str(REPO / "recipes/continual_classification.py"), "--config",
               str(REPO / "recipes/configs/minilm/continual_adapter_per_task.yaml"), f"model={tiny_bert}",
               "data.tasks=[agnews,sst2]", "data.train_per_task=32", "data.test_per_task=8", "data.router_examples=8",
               "max_length=24", "num_epochs=1", "mixed_precision=no", f"output_dir={tmp_path / 'run'}"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["world_size"] == 2
    assert [stage["global_step"] for stage in results["stages"]] == [1, 1]  # 32 rows = one step of 16 x 2 processes
    assert [[v is None for v in row] for row in results["accuracy_matrix"]] == [[False, True], [False, False]]
