"""The benchmark scripts end to end on tiny random models and a few steps, so they cannot rot (shapes of the output
files checked; the measured numbers themselves live in benchmarks/results/)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import REPO, call_main, script_module

# the training runs and workers the scripts start as plain processes run in the test's process (`scripts_in_process`)
pytestmark = pytest.mark.usefixtures("scripts_in_process")


def run(script: str, *args: str, exit_code: int = 0) -> subprocess.CompletedProcess:
    """``benchmarks/<script> args``, its `main` called in this process (`call_main`)."""
    return call_main(benchmark_module(script.removesuffix(".py")).main, args, exit_code)


@pytest.mark.slow
def test_speed_benchmark_dry_run(tiny_smollm, tmp_path):
    run("speed.py", "--model", str(tiny_smollm), "--steps", "4", "--quant-steps", "3", "--batch-size", "2",
        "--max-length", "256", "--out", str(tmp_path))
    result = json.loads((tmp_path / "speed.json").read_text())
    assert set(result["runs"]) == {"baseline", "trl", "ours", "ours_fp32", "ours_8bit", "ours_4bit"}
    for name, r in result["runs"].items():
        assert r["steps"] == (4 if name in ("baseline", "trl", "ours") else 3)
        assert len(r["losses"]) == r["steps"] and r["seconds_per_step"] > 0 and r["peak_rss_mb"] > 0
    # the same data, seed and initial adapter: the first-step losses agree (the curves then diverge by data order)
    assert result["runs"]["baseline"]["first_loss"] == pytest.approx(result["runs"]["ours"]["first_loss"], abs=1e-3)
    assert result["speedup_trained_tokens_per_s"] > 0 and result["rss_ratio_4bit_vs_fp32"] > 0
    runs = result["runs"]
    # the same episodes on both paths; ours computes fewer positions (packed, balanced rows) than padding does
    assert runs["baseline"]["tokens_per_step"] == runs["ours"]["tokens_per_step"]
    # TRL padding-free trains exactly our tokens, and its packed batch scores as the episodes alone
    assert result["trained_tokens_per_step_equal"] == {"baseline": True, "trl": True}
    assert runs["trl"]["padding_free_check"]["max_abs_diff_token_log_prob"] < 1e-3
    assert runs["ours"]["tokens_per_step"] <= runs["ours"]["positions_per_step"] < runs["baseline"]["positions_per_step"]
    assert 0 < result["weight_bytes_ratio_4bit_vs_fp32"] < 1  # 4-bit linear weights (the tiny embedding dominates)
    assert {"machine", "versions", "git_commit", "command"} <= set(result["environment"])
    assert {"cpu_count", "cpu_model", "cpu_flags", "gpus"} <= set(result["environment"]["machine"])
    assert "| baseline: Trainer" in (tmp_path / "speed.md").read_text()
    assert (tmp_path / "speed.png").stat().st_size > 0


@pytest.mark.slow
def test_selfask_speed_benchmark_dry_run(tiny_smollm, tmp_path):
    """Every setting on a tiny model, against the committed runner as "before" (HEAD: no history needed): the
    same transcripts whatever the scheduling and cache reuse."""
    from transformers import AutoModelForCausalLM

    from peftprompt import attach, save_adapter

    adapter = save_adapter(attach(AutoModelForCausalLM.from_pretrained(tiny_smollm), "lora"), tmp_path / "adapter")
    run("selfask_speed.py", "--model", str(tiny_smollm), "--adapter", str(adapter), "--quick", "--baseline-ref",
        "HEAD", "--out", str(tmp_path / "results"))
    result = json.loads((tmp_path / "results" / "selfask_speed.json").read_text())
    for approach in ("fine_tuned_self_ask", "few_shot_self_ask"):
        runs = result["runs"][approach]
        assert set(runs) == {"before", "no_reuse_64", "reuse_8", "reuse_64", "reuse_64_merged"}
        assert all(r["n"] == 8 and r["questions_per_second"] > 0 for r in runs.values())
        for name in ("no_reuse_64", "reuse_8", "reuse_64", "reuse_64_merged"):
            assert runs[name]["vs_before"] == {"identical": 8, "of": 8, "differing": []}
    tuned = result["runs"]["fine_tuned_self_ask"]
    assert tuned["reuse_64"]["model_class"].startswith("Peft")
    assert tuned["reuse_64_merged"]["model_class"] == "LlamaForCausalLM"  # merged: the plain backbone
    assert result["target"]["identical"] == 8 and result["target"]["speedup"] > 0
    assert "| fine-tuned, zero-shot | before" in (tmp_path / "results" / "selfask_speed.md").read_text()
    assert (tmp_path / "results" / "selfask_speed.png").stat().st_size > 0


@pytest.mark.slow
def test_selfask_benchmark_dry_run(tiny_smollm, tmp_path):
    from transformers import AutoModelForCausalLM

    from peftprompt import attach, save_adapter

    adapter = save_adapter(attach(AutoModelForCausalLM.from_pretrained(tiny_smollm), "lora"), tmp_path / "adapter")
    run("selfask.py", "--model", str(tiny_smollm), "--adapter", str(adapter), "--n", "3", "--n-2wiki", "2",
        "--out", str(tmp_path / "results"))
    result = json.loads((tmp_path / "results" / "selfask.json").read_text())
    assert result["compositional_celebrities"]["n"] == 3 and result["2wikimultihopqa"]["n"] == 2
    for key in ("compositional_celebrities", "2wikimultihopqa"):
        for approach in ("direct", "few_shot_self_ask", "fine_tuned_self_ask"):
            r = result[key][approach]
            assert 0 <= r["em"] <= 1 and 0 <= r["f1"] <= 1 and 0 <= r["well_formed"] <= 1 and r["seconds"] > 0
    assert set(result["target"]) == {"text", "em_gain", "well_formed", "met"}
    assert "training record unknown" in result["training"]["note"]
    md = (tmp_path / "results" / "selfask.md").read_text()
    assert "## Compositional Celebrities, 3 questions" in md and "fine-tuned self-ask (LoRA, 0-shot)" in md
    assert result["answerers"] == "operators+retriever" and "| this run |" in md
    assert (tmp_path / "results" / "selfask.png").stat().st_size > 0
    # a run of the fine-tuned approach alone carries the base rows over, each named with where it ran
    run("selfask.py", "--model", str(tiny_smollm), "--adapter", str(adapter), "--n", "3", "--n-2wiki", "2",
        "--approaches", "fine_tuned_self_ask", "--out", str(tmp_path / "results"))
    again = json.loads((tmp_path / "results" / "selfask.json").read_text())
    for key in ("compositional_celebrities", "2wikimultihopqa"):
        for approach in ("direct", "few_shot_self_ask"):
            assert {k: v for k, v in again[key][approach].items() if k != "carried"} == result[key][approach]
            assert again[key][approach]["carried"]["commit"] == result["environment"]["git_commit"]
        assert "carried" not in again[key]["fine_tuned_self_ask"]
    assert set(again["target"]) == {"text", "em_gain", "well_formed", "met"}
    assert "| carried: " in (tmp_path / "results" / "selfask.md").read_text()
    run("selfask.py", "--model", str(tiny_smollm), "--adapter", str(adapter), "--n", "2", "--n-2wiki", "2",
        "--approaches", "direct", "--out", str(tmp_path / "results"))  # other questions: nothing carried
    third = json.loads((tmp_path / "results" / "selfask.json").read_text())
    assert set(third["compositional_celebrities"]) == {"n", "direct", "asked_in_training"} and "target" not in third
    assert third["compositional_celebrities"]["asked_in_training"] is None  # the stand-in adapter has no record
    assert "Not measured: both self-ask rows are needed." in (tmp_path / "results" / "selfask.md").read_text()


@pytest.mark.slow
def test_recursion_benchmark_dry_run_reuses_runs_and_cells(tiny_smollm, tmp_path):
    from transformers import AutoModelForCausalLM

    from peftprompt import attach, save_adapter
    from peftprompt.training import load_config

    runs = tmp_path / "runs"
    for mode in ("flat", "recursive", "mix"):  # stand-ins for trained runs of the same config: no training starts
        save_adapter(attach(AutoModelForCausalLM.from_pretrained(tiny_smollm), "lora"), runs / mode / "adapter")
        (runs / mode / "results.json").write_text(json.dumps({"global_step": 4, "train_seconds": 1.0}))
        load_config(REPO / "recipes/configs/smollm2/selfask_lora.yaml",
                    [f"data.mode={mode}", "data.generate_eval=0"]).save(runs / mode / "train_config.yaml")
    args = ("--model", str(tiny_smollm), "--runs", str(runs), "--n-cc", "3", "--n-deep", "4", "--depths", "0", "1",
            "2", "--out", str(tmp_path / "results"))
    run("recursion.py", *args)
    result = json.loads((tmp_path / "results" / "recursion.json").read_text())
    assert result["n"] == {"compositional_celebrities": 3, "deep": 4}
    assert set(result["cells"]) == {f"{m}/{k}/{d}" for m in ("flat", "recursive", "mix")
                                    for k in ("compositional_celebrities", "deep") for d in (0, 1, 2)}
    for cell in result["cells"].values():
        assert 0 <= cell["em"] <= 1 and 0 <= cell["well_formed"] <= 1 and cell["max_generated_tokens"] >= 0
        assert sum(v["n"] for v in cell["per_tree_depth"].values()) == cell["n"]
    # max_depth 0 answers directly: no follow-up anywhere
    assert all(result["cells"][f"{m}/deep/0"]["mean_follow_ups"] == 0 for m in ("flat", "recursive", "mix"))
    assert sum(result["held_out"]["kept"].values()) >= 200 and result["held_out"]["dropped_as_training"]["musique"] > 0
    assert {"best_depth", "lines", "recursive_vs_flat", "shipped"} <= set(result["summary"])
    md = (tmp_path / "results" / "recursion.md").read_text()
    assert "## held-out deep questions (n=4" in md and "Hypothesis 'recursive beats flat" in md
    assert (tmp_path / "results" / "recursion.png").stat().st_size > 0
    assert result["answerers"] == ["operators+retriever"]  # the shipped config's data.eval_answerers
    for cell in result["cells"].values():
        assert 0 <= cell["faithfulness"] <= 1 and cell["operator_parsed"] <= cell["operator_follow_ups"]
    deep = result["cells"]["flat/deep/2"]["per_type"]
    assert sum(v["n"] for k, v in deep.items() if k != "all comparisons") == 4
    assert "## Operator coverage" in md and "faithful" in md
    cells = sorted((runs / "cells").iterdir())
    stamps = [c.stat().st_mtime_ns for c in cells]
    # results measured before (here: these) are shown beside the new ones, by question type
    baseline = tmp_path / "baseline.json"
    baseline.write_text(json.dumps(result))
    run("recursion.py", *args, "--baseline", str(baseline), "--compare", "mirrored comparisons",
        "the first run's adapters", "the same adapters")  # everything reused: no cell is evaluated again
    assert [c.stat().st_mtime_ns for c in sorted((runs / "cells").iterdir())] == stamps
    md = (tmp_path / "results" / "recursion.md").read_text()
    assert "## With and without mirrored comparisons" in md and "EM by question type" in md
    assert "Without: the first run's adapters (`baseline.json`" in md and "With: the same adapters, follow-ups" in md


def test_selfask_benchmark_without_an_adapter_says_how_to_train_one(tmp_path):
    done = run("selfask.py", "--adapter", str(tmp_path / "none"), exit_code=2)
    assert "make demo" in done.stderr


@pytest.mark.slow
def test_adapter_methods_dry_run(tiny_bert, tmp_path):
    args = ["--task", "sst2", "--quick", "--steps", "3", "--methods", "lora_r4", "ptuning", "qlora_4bit", "--model",
            str(tiny_bert), "--parallel", "1", "--run-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "results")]
    run("adapter_methods.py", *args)
    result = json.loads((tmp_path / "results" / "sst2.json").read_text())
    rows = result["results"]
    assert [r["method"] for r in rows] == ["lora_r4", "ptuning", "qlora_4bit"]
    assert [r["label"] for r in rows] == ["LoRA r4", "P-tuning", "QLoRA 4-bit (r8)"]
    for r in rows:
        assert r["global_step"] == 3 and r["model"] == str(tiny_bert) and r["learning_rate"] == 1e-3
        assert 0 <= r["accuracy"] <= 1 and 0 <= r["dev_accuracy"] <= 1 and r["peak_memory_mb"] > 0
    # LoRA on query/value of 2 layers (hidden 64) plus the 2-class head: rank 4, and rank 8 for QLoRA
    head = 64 * 2 + 2
    assert rows[0]["trainable_params"] == 2 * 2 * (2 * 4 * 64) + head
    assert rows[2]["trainable_params"] == 2 * 2 * (2 * 8 * 64) + head
    trained = {m: yaml.safe_load((tmp_path / "runs" / f"sst2_{m}_lr0.001" / "train_config.yaml").read_text())
               for m in ("lora_r4", "ptuning", "qlora_4bit")}
    assert trained["lora_r4"]["method_args"] == {"r": 4, "lora_alpha": 8} and not trained["lora_r4"]["load_in_4bit"]
    assert trained["ptuning"]["method"] == "ptuning" and trained["qlora_4bit"]["load_in_4bit"]
    assert all(t["max_eval_samples"] == 200 and t["max_steps"] == 3 for t in trained.values())
    assert result["steps"] == 3 and result["lr_grid"] == [1.0] and result["quick"]
    assert result["variants"]["qlora_4bit"]["overrides"] == ["load_in_4bit=true"]
    assert {"machine", "versions", "git_commit", "command"} <= set(result["environment"])
    md = (tmp_path / "results" / "sst2.md").read_text()
    assert "| LoRA r4 | 2,178 |" in md and "QLoRA 4-bit (r8) = `load_in_4bit=true`" in md
    assert (tmp_path / "results" / "sst2.png").stat().st_size > 0

    # --reuse reads the finished runs instead of repeating them
    finished = tmp_path / "runs" / "sst2_qlora_4bit_lr0.001" / "results.json"
    before = finished.stat().st_mtime_ns
    run("adapter_methods.py", *args, "--reuse")
    assert finished.stat().st_mtime_ns == before
    assert json.loads((tmp_path / "results" / "sst2.json").read_text())["results"] == rows


@pytest.mark.slow
def test_selfask_methods_dry_run(tiny_smollm, tmp_path):
    args = ["--quick", "--steps", "2", "--n", "2", "--methods", "ptuning", "qlora_8bit", "--model", str(tiny_smollm),
            "--processes", "1", "--run-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "results")]
    run("selfask_methods.py", *args)
    result = json.loads((tmp_path / "results" / "selfask_methods.json").read_text())
    rows = result["results"]
    assert [r["method"] for r in rows] == ["ptuning", "qlora_8bit"] and [r["label"] for r in rows] == [
        "P-tuning", "QLoRA 8-bit (r16)"]
    for r in rows:
        assert r["global_step"] == 2 and r["n"] == 2 and r["eval_seconds"] > 0 and r["peak_memory_mb"] > 0
        assert 0 <= r["em"] <= 1 and 0 <= r["f1"] <= 1 and 0 <= r["well_formed"] <= 1 and r["eval_loss"] > 0
    assert rows[0]["trainable_params"] > 0 and rows[1]["adapter_bytes"] > 0
    ptuning = yaml.safe_load((tmp_path / "runs" / "selfask_ptuning" / "train_config.yaml").read_text())
    qlora = yaml.safe_load((tmp_path / "runs" / "selfask_qlora_8bit" / "train_config.yaml").read_text())
    # the config's LoRA arguments are replaced whole (P-tuning gets none), not merged; P-tuning trains unpacked
    assert ptuning["method"] == "ptuning" and ptuning["method_args"] == {} and ptuning["learning_rate"] == 2e-3
    assert ptuning["per_device_train_batch_size"] == 5 and qlora["per_device_train_batch_size"] == 1
    assert qlora["load_in_8bit"] and qlora["method_args"]["r"] == 16
    assert len(qlora["method_args"]["target_modules"]) == 7
    assert ptuning["data"]["generate_eval"] == 0 and ptuning["max_train_samples"] == 200
    assert result["learning_rates"] == {"ptuning": 2e-3, "qlora_8bit": 1e-3} and result["n"] == 2 and result["steps"] == 2
    assert {"machine", "versions", "git_commit", "command"} <= set(result["environment"])
    md = (tmp_path / "results" / "selfask_methods.md").read_text()
    assert "| P-tuning |" in md and "| QLoRA 8-bit (r16) |" in md
    assert (tmp_path / "results" / "selfask_methods.png").stat().st_size > 0

    # --reuse keeps the trained runs and their evaluations
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").glob("*/[rs]e*.json")}
    assert len(stamps) == 4  # results.json and selfask_eval.json of each run
    run("selfask_methods.py", *args, "--reuse")
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert json.loads((tmp_path / "results" / "selfask_methods.json").read_text())["results"] == rows


def runs_module():
    return benchmark_module("_runs")


def test_a_run_is_done_when_its_saved_config_equals_the_requested_one(tmp_path, monkeypatch):
    from peftprompt.training import load_config

    _runs = runs_module()
    config = REPO / "recipes/configs/smollm2/selfask_lora.yaml"
    overrides = ["data.mode=flat", "max_steps=5", "method_args={r: 4}"]
    run = tmp_path / "run"
    requested = _runs.requested_config(config, overrides, run)
    assert _runs.finished_run(run, requested) is None  # nothing there
    saved = load_config(config, [*overrides, "output_dir=elsewhere", "resume_from=latest"]).as_dict()
    (run / "results.json").parent.mkdir()
    (run / "results.json").write_text(json.dumps({"global_step": 5}))
    assert _runs.finished_run(run, requested) is None  # no train_config.yaml: the run did not finish

    def saved_as(config_dict: dict) -> dict:
        (run / "train_config.yaml").write_text(yaml.safe_dump(config_dict))
        return _runs.finished_run(run, requested)

    assert saved_as(saved) == {"global_step": 5}  # where it lives and how it resumed are not compared
    assert saved_as({**saved, "learning_rate": 2e-3}) is None
    assert saved_as({**saved, "max_steps": 6}) is None
    assert saved_as({**saved, "data": {**saved["data"], "mode": "mix"}}) is None
    assert saved_as({**saved, "no_longer_a_field": 1}) is None
    # settings a run predates (a field or data key added since) are not compared; method_args is compared whole
    older = {k: v for k, v in saved.items() if k != "frozen_dtype"}
    assert saved_as({**older, "data": {k: v for k, v in saved["data"].items() if k != "leaf_episodes"}}) is not None
    assert saved_as({**saved, "method_args": {k: v for k, v in saved["method_args"].items() if k != "r"}}) is None

    # run_recipe reads a finished run instead of launching anything
    saved_as(saved)
    monkeypatch.setattr(_runs.subprocess, "run", lambda *a, **k: pytest.fail("a finished run was launched again"))
    assert _runs.run_recipe(config, overrides, run, recipe="selfask_sft.py") == {"global_step": 5}


def test_an_auto_precision_run_matches_a_request_for_the_precision_it_ran_in(tmp_path):
    from peftprompt.training import load_config

    _runs = runs_module()
    config, run = REPO / "recipes/configs/minilm/sst2_lora.yaml", tmp_path / "run"
    run.mkdir()
    (run / "train_config.yaml").write_text(yaml.safe_dump(load_config(config, ["mixed_precision=auto"]).as_dict()))

    def finished(ran_in: str, requested: str):
        (run / "results.json").write_text(json.dumps({"mixed_precision": ran_in}))
        return _runs.finished_run(run, _runs.requested_config(config, [f"mixed_precision={requested}"], run))

    assert finished("no", "no") == {"mixed_precision": "no"}  # auto chose fp32 on its machine: an fp32 run
    assert finished("bf16", "no") is None  # auto chose bf16: not the fp32 run asked for
    assert finished("bf16", "bf16") is not None
    assert finished("bf16", "auto") is not None and finished("no", "auto") is not None  # auto takes either


def test_an_interrupted_run_continues_only_when_it_was_asked_for_the_same_config(tmp_path, monkeypatch):
    _runs = runs_module()
    config, run, launched = REPO / "recipes/configs/minilm/sst2_lora.yaml", tmp_path / "run", []

    def fake_run(command, **_):  # a run that is interrupted after its first checkpoint
        launched.append(command)
        (run / "checkpoints" / "step-2").mkdir(parents=True, exist_ok=True)
        (run / "results.json").write_text("{}")
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(_runs.subprocess, "run", fake_run)
    _runs.run_recipe(config, ["max_steps=5"], run, recipe="sst2_classification.py", resume=True)
    assert "resume_from=latest" not in launched[-1]
    _runs.run_recipe(config, ["max_steps=5"], run, recipe="sst2_classification.py", resume=True)
    assert "resume_from=latest" in launched[-1]  # the same request: it continues
    (run / "checkpoints" / "step-2" / "kept").touch()
    _runs.run_recipe(config, ["max_steps=6"], run, recipe="sst2_classification.py", resume=True)
    assert "resume_from=latest" not in launched[-1]  # another request: an empty directory, a fresh start
    assert not (run / "checkpoints" / "step-2" / "kept").exists()
    assert yaml.safe_load((run / "run_request.yaml").read_text())["max_steps"] == 6


def test_launch_command(monkeypatch):
    import torch

    from peftprompt.training.recipe import launch_command

    recipe, config = REPO / "recipes/selfask_sft.py", REPO / "recipes/configs/smollm2/selfask_lora.yaml"
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv, env = launch_command(recipe, config, ["max_steps=5"], processes=2)
    assert argv == [accelerate, "launch", "--config_file", str(REPO / "recipes/accelerate/cpu_2proc.yaml"),
                    str(recipe), "--config", str(config), "max_steps=5"]
    assert (env["ACCELERATE_USE_CPU"], env["OMP_NUM_THREADS"], env["HF_HUB_OFFLINE"]) == ("1", "1", "1")
    argv, env = launch_command(recipe, config, ["max_steps=5"], processes=1)
    assert argv == [sys.executable, str(recipe), "--config", str(config), "max_steps=5"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    for processes in (1, 2):
        argv, env = launch_command(recipe, config, [], processes=processes)
        assert argv[:4] == [accelerate, "launch", "--config_file", str(REPO / "recipes/accelerate/single_gpu.yaml")]
        assert "ACCELERATE_USE_CPU" not in env


def result_file(path: Path, rows: list[dict], **extra) -> None:
    environment = {"git_commit": "abc123", "command": f"make {path.stem}"}
    path.write_text(json.dumps({"steps": 300, "results": rows, "environment": environment, **extra}))


def method_row(method: str, params: int, metric: str, value: float, **extra) -> dict:
    return {"method": method, "trainable_params": params, "trainable_pct": params / 10, "adapter_bytes": params * 4,
            metric: value, "train_seconds": 60.0, "model": "minilm", **extra}


def test_params_vs_accuracy_pareto_front(tmp_path):
    result_file(tmp_path / "sst2.json", [
        method_row("full", 1000, "accuracy", 0.90, label="full", peak_memory_mb=900.0),
        method_row("lora", 100, "accuracy", 0.85),  # no label: written before labels, "LoRA r8"
        method_row("prefix", 200, "accuracy", 0.70, label="prefix"),  # LoRA has fewer parameters and more accuracy
        method_row("bitfit", 50, "accuracy", 0.80, label="BitFit"),
        method_row("ia3", 50, "accuracy", 0.75, label="IA3"),  # as many parameters as BitFit, less accuracy
        method_row("prompt", 10, "accuracy", 0.60, label="prompt"),
    ])
    result_file(tmp_path / "conll03.json", [  # equal points are both on the front
        method_row("lora", 100, "entity_f1", 0.7, label="LoRA r8"),
        method_row("qlora_4bit", 100, "entity_f1", 0.7, label="QLoRA 4-bit (r8)"),
        method_row("ia3", 80, "entity_f1", 0.5, label="IA3"),
    ])
    result_file(tmp_path / "selfask_methods.json", [
        method_row("lora_r16", 500, "em", 0.6, label="LoRA r16", model="smollm2-135m"),
        method_row("full", 5000, "em", 0.5, label="full", model="smollm2-135m"),
    ])
    run("params_vs_accuracy.py", "--results", str(tmp_path), "--out", str(tmp_path / "out"))
    result = json.loads((tmp_path / "out" / "params_vs_accuracy.json").read_text())
    front = {(r["task"], r["method"]): r["pareto"] for r in result["results"]}
    assert front == {
        ("SST-2", "prompt"): True, ("SST-2", "bitfit"): True, ("SST-2", "ia3"): False, ("SST-2", "lora"): True,
        ("SST-2", "prefix"): False, ("SST-2", "full"): True, ("CoNLL-2003", "ia3"): True,
        ("CoNLL-2003", "lora"): True, ("CoNLL-2003", "qlora_4bit"): True, ("self-ask", "lora_r16"): True,
        ("self-ask", "full"): False,
    }
    assert [r["trainable_params"] for r in result["results"] if r["task"] == "SST-2"] == [10, 50, 50, 100, 200, 1000]
    lora = next(r for r in result["results"] if r["task"] == "SST-2" and r["method"] == "lora")
    assert lora["label"] == "LoRA r8" and lora["metric"] == "accuracy" and lora["value"] == 0.85
    assert lora["peak_memory_mb"] is None and lora["adapter_bytes"] == 400
    assert result["sources"]["conll03"]["command"] == "make conll03" and result["sources"]["sst2"]["steps"] == 300
    assert {"machine", "versions", "git_commit", "command"} <= set(result["environment"])
    md = (tmp_path / "out" / "params_vs_accuracy.md").read_text()
    assert "| SST-2 | 300 steps | MiniLM | LoRA r8 | 100 | 10.000 | 400 B | accuracy | 0.8500 | 60 | - | yes |" in md
    assert "| SST-2 | 300 steps | MiniLM | full | 1,000 | 100.000 | 3.9 KB | accuracy | 0.9000 | 60 | 900 | yes |" in md
    assert "| self-ask | " in md and "SmolLM2-135M | full |" in md and md.count("| yes |") == 8
    assert (tmp_path / "out" / "params_vs_accuracy.png").stat().st_size > 0

    # methods trained to their plateau (convergence.json) are a budget of their own, with a front of their own
    converged = [{**method_row(m, params, "accuracy", 0.0, label=m), "task": "sst2", "test_at_best": value,
                  "step_seconds": 600.0, "learning_rate": 1e-3, "peak_memory_mb": None} for m, params, value in
                 (("full", 1000, 0.91), ("lora", 100, 0.905), ("bitfit", 50, 0.89))]
    (tmp_path / "convergence.json").write_text(json.dumps({
        "chosen": converged, "budgets": {"sst2": {"num_epochs": 3}}, "model": "minilm", "partial": True,
        "environment": {"git_commit": "abc", "command": "convergence.py"}}))
    run("params_vs_accuracy.py", "--results", str(tmp_path), "--out", str(tmp_path / "out"))
    result = json.loads((tmp_path / "out" / "params_vs_accuracy.json").read_text())
    plateau = [r for r in result["results"] if r["budget"].startswith("plateau")]
    assert [(r["method"], r["value"], r["pareto"]) for r in plateau] == [
        ("bitfit", 0.89, True), ("lora", 0.905, True), ("full", 0.91, True)]
    assert plateau[0]["budget"] == "plateau, <= 3 epochs (PARTIAL: 3 of 11 methods)"
    assert [r["pareto"] for r in result["results"] if r["budget"] == "300 steps" and r["task"] == "SST-2"] == [
        True, True, False, True, False, True]  # the 300-step front is unchanged
    md = (tmp_path / "out" / "params_vs_accuracy.md").read_text()
    assert "| SST-2 | plateau, <= 3 epochs (PARTIAL: 3 of 11 methods) | MiniLM | lora |" in md
    assert "convergence.json` (PARTIAL, commit abc, `convergence.py`)" in md


def test_params_vs_accuracy_names_the_command_of_a_missing_input(tmp_path):
    result_file(tmp_path / "sst2.json", [method_row("lora", 100, "accuracy", 0.85)])
    done = run("params_vs_accuracy.py", "--results", str(tmp_path), exit_code=2)
    assert "conll03.json (written by `.venv/bin/python benchmarks/adapter_methods.py --task conll03`)" in done.stderr
    assert "selfask_methods.json (written by `.venv/bin/python benchmarks/selfask_methods.py`)" in done.stderr
    assert "sst2.json" not in done.stderr


def test_run_all_plan(tmp_path):
    (tmp_path / "sst2.json").write_text(json.dumps({"wall_seconds": 600}))
    (tmp_path / "speed.json").write_text(json.dumps({"runs": {"a": {"wall_seconds": 50}, "b": {"wall_seconds": 70}}}))
    out = run("run_all.py", "--plan", "--quick", "--out", str(tmp_path)).stdout.splitlines()
    stages = {line.split()[0]: line for line in out[1:]}
    assert list(stages) == ["methods_overview", "architectures", "collator", "speed", "speed_encoder", "sst2",
                            "conll03", "convergence", "demo_adapter", "selfask", "selfask_speed", "demo_time",
                            "selfask_methods", "method_comparison", "params_vs_accuracy", "recursion", "openbook",
                            "continual", "selfask_continual"]
    assert "~ 10.0 min (recorded in sst2.json)" in stages["sst2"] and "~  2.0 min (recorded in speed.json)" in stages[
        "speed"]
    assert "(guess)" in stages["conll03"] and "--task conll03" in stages["conll03"]
    for name in ("methods_overview", "architectures", "collator", "speed", "sst2", "conll03", "selfask",
                 "selfask_speed", "demo_time", "selfask_methods", "method_comparison", "recursion", "openbook",
                 "continual", "selfask_continual"):
        assert stages[name].endswith(f"--quick --out {tmp_path}") and "--reuse" not in stages[name]
    assert "--adapter" in stages["selfask_speed"]
    assert stages["params_vs_accuracy"].endswith(f"--results {tmp_path} --out {tmp_path}")
    assert "skipped" in stages["demo_adapter"] or "max_steps=5" in stages["demo_adapter"]
    assert out[0].startswith(f"19 stages into {tmp_path}; estimated total ~")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["speed.json", "sst2.json"]  # nothing ran

    out = run("run_all.py", "--plan", "--only", "params_vs_accuracy", "sst2", "--out", str(tmp_path)).stdout
    assert out.startswith("2 stages") and "--lr-grid 0.3 1 3 9 --reuse --out" in out and "--quick" not in out


@pytest.mark.slow
def test_methods_overview_quick_run(tmp_path):
    run("methods_overview.py", "--quick", "--methods", "lora", "bitfit", "--out", str(tmp_path))
    result = json.loads((tmp_path / "methods_overview.json").read_text())
    assert [r["method"] for r in result["results"]] == ["lora", "bitfit"]
    assert result["timed_steps"] == 5 and result["wall_seconds"] > 0 and result["git_commit"]
    for r in result["results"]:
        assert 0 < r["trainable_params"] < r["total_params"] and r["adapter_bytes"] > 0
    assert "| lora |" in (tmp_path / "methods_overview.md").read_text()
    assert (tmp_path / "methods_overview.png").stat().st_size > 0


@pytest.mark.slow
def test_collator_benchmark_quick_run(tiny_smollm, tmp_path):
    run("collator.py", "--quick", "--limit", "20", "--model", str(tiny_smollm), "--out", str(tmp_path))
    result = json.loads((tmp_path / "collator.json").read_text())
    assert result["counts"]["episodes_kept"] > 0 and result["episodes_per_s"] > 0
    assert {"machine", "versions", "git_commit", "command"} <= set(result["environment"])
    assert (tmp_path / "collator.md").stat().st_size > 0 and (tmp_path / "collator.png").stat().st_size > 0


@pytest.mark.slow
def test_openbook_benchmark_dry_run_reuses_indexes_and_cells(tiny_smollm, tiny_bert, tmp_path):
    from transformers import AutoModelForCausalLM

    from peftprompt import attach, save_adapter
    from peftprompt.training import load_config

    runs = tmp_path / "runs"
    trained = {"openbook": "selfask_openbook_lora.yaml", "decomposer": "selfask_lora.yaml", "reader": "reader_lora.yaml"}
    for name, config in trained.items():  # stand-ins for trained runs of the same configs: no training starts
        save_adapter(attach(AutoModelForCausalLM.from_pretrained(tiny_smollm), "lora"), runs / name / "adapter")
        (runs / name / "results.json").write_text(json.dumps({"global_step": 4, "train_seconds": 1.0}))
        overrides = ["data.mode=flat", "data.generate_eval=0"] if name == "decomposer" else ["data.generate_eval=0"]
        load_config(REPO / "recipes/configs/smollm2" / config, overrides).save(runs / name / "train_config.yaml")
    args = ("--model", str(tiny_smollm), "--encoder", str(tiny_bert), "--runs", str(runs), "--decomposer-run",
            str(runs / "decomposer"), "--n", "3", "--datasets", "musique", "2wikimultihopqa", "--out",
            str(tmp_path / "results"))
    run("openbook.py", *args)
    result = json.loads((tmp_path / "results" / "openbook_n3.json").read_text())
    assert result["n"] == {"hotpotqa": 3, "musique": 3, "2wikimultihopqa": 3}  # drawn for every data set
    assert result["partial"] and {key.split("/")[-1] for key in result["missing"]} == {"hotpotqa"}
    # evaluation questions asked in a training tree (ProbTree MuSiQue trees hold MuSiQue dev questions) are dropped
    assert result["dropped"]["musique"] > 0 and result["available"]["musique"] == 135
    systems = {"closed_book", "few_shot_self_ask"} | {f"{s}/{v}" for s in (
        "single_step", "fine_tuned_self_ask", "fine_tuned_recursive", "fine_tuned_fallback") for v in ("one", "two")}
    assert set(result["cells"]) == {f"{s}/{d}" for s in systems for d in ("musique", "2wikimultihopqa")}
    for key, cell in result["cells"].items():
        summary = cell["summary"]
        assert summary["n"] == 3 and 0 <= summary["em"] <= summary["f1"] + 1e-9 <= 1 + 1e-9
        assert sum(kind["n"] for kind in cell["per_kind"].values()) == 3
        system = key.split("/")[0]
        assert cell["answerers"] == ("retrieval" if system == "few_shot_self_ask" else
                                     "operators+retrieval" if system.startswith("fine_tuned") else None)
        assert cell["dtype"] in ("bfloat16", "float32") and cell["cpu"] == result["environment"]["machine"]["cpu_model"]
        if key.startswith("closed_book"):
            assert summary["support_recall"] == 0 and summary["follow_ups"] == 0
        if key.startswith("single_step"):
            assert summary["support_recall"] > 0  # three passages of the question's own index were read
    index = result["indexes"]["musique"]
    assert index["passages"] == 2279 and set(index["recall"]) == {"bm25", "dense", "hybrid"}
    assert index["recall"]["bm25"]["hops"]["n"] > 135
    md = (tmp_path / "results" / "openbook_n3.md").read_text()
    assert "retrieved paragraphs" in md and "MuSiQue-Ans (dev)" in md and "## Passage indexes" in md
    assert (tmp_path / "results" / "openbook_n3.png").stat().st_size > 0
    cells = sorted((runs / "cells_n3").iterdir())
    stamps = [c.stat().st_mtime_ns for c in cells]
    run("openbook.py", *args, "--systems", "closed_book", "--index-speed")  # nothing is evaluated again,
    assert [c.stat().st_mtime_ns for c in sorted((runs / "cells_n3").iterdir())] == stamps
    again = json.loads((tmp_path / "results" / "openbook_n3.json").read_text())  # and every cell is still reported
    assert set(again["cells"]) == set(result["cells"])
    speed = again["index_speed"]  # one index over the three evaluation splits pooled: built, loaded, queried
    assert speed["passages"] > 5000 and speed["load_seconds"] > 0 and speed["queries"] == 200
    md = (tmp_path / "results" / "openbook_n3.md").read_text()
    assert "passages): built in" in md
    assert "Not evaluated: closed_book/hotpotqa, few_shot_self_ask/hotpotqa, fine_tuned_fallback/one/hotpotqa" in md
    (tmp_path / "results" / "openbook_n3.md").unlink()  # --render: the same page again from the JSON alone
    run("openbook.py", "--render", "--n", "3", "--out", str(tmp_path / "results"), "--runs", str(tmp_path / "none"))
    assert (tmp_path / "results" / "openbook_n3.md").read_text() == md and not (tmp_path / "none").exists()


def test_openbook_reuses_cells_of_the_same_settings_and_shows_them_with_and_without_operators(tmp_path):
    """A cell is reused with the same questions, k, dtype and answerers; one of the results written before (a fresh
    clone has no cell files) also in another dtype when this run does not evaluate it, named with its weights and
    CPU. Cells written before operators existed are not reused: the baseline section shows them beside the new."""
    module = benchmark_module("openbook")
    ids = ["q1", "q2"]
    summary = {"n": 2, "em": 0.5, "f1": 0.5, "support_recall": 0.5, "follow_ups": 2.0, "well_formed": 1.0}
    per_kind = {"comparison": {**summary, "em": 0.0}, "compositional": {**summary, "em": 1.0}}
    legacy = {"ids": ids, "k": 3, "dtype": "bfloat16", "seconds": 2.0, "summary": summary, "per_kind": per_kind}
    now = {**legacy, "answerers": "operators+retrieval", "cpu": "Intel(R) Xeon(R) Processor",
           "summary": {**summary, "em": 1.0, "faithfulness": 1.0},
           "per_kind": {"comparison": {**summary, "em": 1.0}, "compositional": {**summary, "em": 1.0}}}
    fp32, ops = (ids, 3, "float32", "operators+retrieval"), (ids, 3, "bfloat16", "operators+retrieval")
    assert module.reusable(now, "fine_tuned_self_ask", ops, any_dtype=False)
    assert not module.reusable(now, "fine_tuned_self_ask", fp32, any_dtype=False)  # asked for in float32: again
    assert module.reusable(now, "fine_tuned_self_ask", fp32, any_dtype=True)  # not asked for: carried, dtype named
    assert not module.reusable(legacy, "fine_tuned_self_ask", ops, any_dtype=True)  # before operators
    assert not module.reusable(now, "fine_tuned_self_ask", (["q1"], 3, "bfloat16", "operators+retrieval"), True)
    assert module.reusable(legacy, "closed_book", (ids, 3, "float32", None), any_dtype=True)  # no follow-ups
    assert module.reusable(legacy, "few_shot_self_ask", (ids, 3, "bfloat16", "retrieval"), any_dtype=False)
    assert not module.reusable(None, "closed_book", (ids, 3, "bfloat16", None), any_dtype=True)
    assert module.short_cpu("Intel(R) Xeon(R) Processor") == "Intel Xeon" and module.short_cpu(None) == "unknown CPU"
    assert module.resolve_dtype("float32") == "float32" and module.resolve_dtype("auto") in ("bfloat16", "float32")

    (tmp_path / "before.json").write_text(json.dumps({"cells": {"fine_tuned_self_ask/two/2wikimultihopqa": legacy,
                                                                "closed_book/2wikimultihopqa": legacy}}))
    baseline = module.baseline_cells(tmp_path / "before.json")
    assert set(baseline["cells"]) == {"fine_tuned_self_ask/two/2wikimultihopqa"}  # fine-tuned self-ask rows only
    cells = {"closed_book/2wikimultihopqa": {**legacy, "cpu": "AMD EPYC 7B13"},
             "fine_tuned_self_ask/two/2wikimultihopqa": now}
    result = {"k": 3, "model": "m", "partial": False, "missing": [], "targets": module.TARGETS,
              "n": {"2wikimultihopqa": 2}, "available": {"2wikimultihopqa": 2}, "dropped": {"2wikimultihopqa": 0},
              "indexes": {}, "index_speed": None, "cells": cells, "baseline": baseline,
              "summary": module.summarise_targets(cells),
              "environment": {"machine": {"cpu_model": "x", "cpu_count": 2}, "git_commit": "c", "command": "o"}}
    summary = result["summary"]
    assert summary["faithfulness"] == {"2wikimultihopqa": 1.0} and summary["met"]["faithfulness"]
    assert summary["met"]["2wikimultihopqa_em"] and not summary["met"]["hotpotqa_comparison_em"]
    module.write_results(result, tmp_path, "page")
    md = (tmp_path / "page.md").read_text()
    assert "| closed-book, direct (base, 4-shot) | base | bfloat16, AMD EPYC | 0.500 / 0.500 / 0.50 / — / 2.0 / 1.00 |" in md
    assert "| fine-tuned self-ask + retrieval | two | bfloat16, Intel Xeon | 1.000 / 0.500 / 0.50 / 1.000 / 2.0 / 1.00 |" in md
    assert "## With and without operators" in md
    assert "| fine-tuned self-ask + retrieval | two | 0.500 -> 1.000 (+0.500) | 0.000 -> 1.000 (+1.000) | — |" in md


def benchmark_module(name: str):
    return script_module(REPO / "benchmarks" / f"{name}.py")


def test_convergence_dry_run_reads_finished_runs_and_picks_the_best_validation_step(tiny_bert, tmp_path):
    args = ["--quick", "--tasks", "sst2", "--methods", "lora", "--model", str(tiny_bert), "--parallel", "1",
            "--run-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "results")]
    run("convergence.py", *args)
    result = json.loads((tmp_path / "results" / "convergence.json").read_text())
    assert not result["partial"] and result["missing"] == []
    # the short-budget sweep's best and second best LoRA rates (sst2.json: 0.003, then 0.001) at the long budget
    assert [r["learning_rate"] for r in result["runs"]] == [0.003, 0.001]
    (chosen,) = result["chosen"]
    assert chosen["short_budget_lr"] == 0.003 and chosen["learning_rate"] in (0.003, 0.001)
    assert chosen["best_dev"] == max(r["best_dev"] for r in result["runs"])
    curve = chosen["curve"]
    assert [e["step"] for e in curve] == [3, 6]  # 48 examples / batch 16 = 3 steps an epoch, 2 epochs, eval every 3
    assert 0 < curve[0]["seconds"] < curve[1]["seconds"]
    best = max(curve, key=lambda e: e["dev"])
    assert (chosen["best_step"], chosen["test_at_best"]) == (best["step"], best["test"])
    assert chosen["reached_step"] <= chosen["best_step"] and chosen["steps"] == 6
    md = (tmp_path / "results" / "convergence.md").read_text()
    assert "## SST-2 accuracy" in md and "| LoRA r8 |" in md and "Other long-budget rates: LoRA r8 at" in md
    assert (tmp_path / "results" / "convergence.png").stat().st_size > 0
    finished = tmp_path / "runs" / "sst2_lora_lr0.003" / "results.json"
    before = finished.stat().st_mtime_ns
    run("convergence.py", *args)  # finished runs are read, not repeated
    assert finished.stat().st_mtime_ns == before
    assert json.loads((tmp_path / "results" / "convergence.json").read_text())["chosen"][0]["curve"] == curve
    # each finished run left a small record (no checkpoints, no train records) that a fresh checkout reads alone
    records = tmp_path / "records"
    shutil.move(tmp_path / "runs" / "records", records)
    assert sorted(p.name for p in records.iterdir()) == ["sst2_lora_lr0.001", "sst2_lora_lr0.003"]
    assert sorted(p.name for p in (records / "sst2_lora_lr0.003").iterdir()) == [
        "machine.json", "metrics.jsonl", "results.json", "train_config.yaml"]
    cpu = json.loads((records / "sst2_lora_lr0.003" / "machine.json").read_text())["cpu_model"]
    precision = {"no": "fp32", "bf16": "bf16 autocast"}[chosen["mixed_precision"]]  # what `auto` chose here
    assert chosen["cpu_model"] == cpu and f"| {precision}, {cpu} |" in md
    assert '"type": "train"' not in (records / "sst2_lora_lr0.003" / "metrics.jsonl").read_text()
    shutil.rmtree(tmp_path / "runs")
    run("convergence.py", *args, "--records", str(records))
    assert not (tmp_path / "runs" / "sst2_lora_lr0.003").exists()  # nothing trained again
    assert json.loads((tmp_path / "results" / "convergence.json").read_text())["chosen"][0]["curve"] == curve
    # --lower-rate trains only the lower of the two rates; the other is read where it ran, and never missing
    run("convergence.py", *args, "--records", str(records), "--lower-rate")
    assert [r["learning_rate"] for r in json.loads((tmp_path / "results" / "convergence.json").read_text())["runs"]] \
        == [0.001, 0.003]
    shutil.rmtree(records / "sst2_lora_lr0.003")
    run("convergence.py", *args, "--records", str(records), "--lower-rate")
    result = json.loads((tmp_path / "results" / "convergence.json").read_text())
    assert [r["learning_rate"] for r in result["runs"]] == [0.001] and not result["partial"]
    assert not (tmp_path / "runs" / "sst2_lora_lr0.003").exists()  # the higher rate is not trained
    md = (tmp_path / "results" / "convergence.md").read_text()
    assert "trained only the lower of the two (`--lower-rate`)" in md


def test_convergence_curve_keeps_one_evaluation_per_step(tmp_path):
    convergence = benchmark_module("convergence")
    lines = [{"type": "start", "total_steps": 9}, {"type": "eval", "step": 3, "epoch": 1.0, "step_seconds": 1.0,
             "accuracy": 0.5, "test_accuracy": 0.4}, {"type": "train", "step": 4, "loss": 0.3},
             {"type": "eval", "step": 6, "epoch": 2.0, "step_seconds": 2.0, "accuracy": 0.7, "test_accuracy": 0.6},
             {"type": "resume", "step": 3},  # killed after the evaluation at 6, before its checkpoint
             {"type": "eval", "step": 6, "epoch": 2.0, "step_seconds": 2.5, "accuracy": 0.8, "test_accuracy": 0.7},
             {"type": "eval", "step": 9, "epoch": 3.0, "step_seconds": 3.5, "accuracy": 0.795, "test_accuracy": 0.9}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines))
    curve = convergence.read_curve(tmp_path, "accuracy")
    assert [(e["step"], e["dev"], e["seconds"]) for e in curve] == [(3, 0.5, 1.0), (6, 0.8, 2.5), (9, 0.795, 3.5)]
    row = convergence.summarise_run("sst2", "lora", 1e-3, {"global_step": 9, "total_steps": 30, "trainable_params": 1,
                                                         "trainable_pct": 0.1, "adapter_bytes": 10}, curve)
    # best validation at step 6 (its test score, not the later higher one); 99 % of 0.8 first reached at step 6
    assert (row["best_step"], row["test_at_best"], row["reached_step"], row["stopped_early"]) == (6, 0.7, 6, True)
    targets = convergence.targets([{**row, "method": "full", "test_at_best": 0.905},
                                   {**row, "method": "lora", "test_at_best": 0.893},
                                   {**row, "method": "bitfit", "test_at_best": 0.886}])
    assert targets["sst2"]["full"]["met"] and not targets["sst2"]["lora"]["met"] and targets["sst2"]["bitfit"]["met"]
    assert targets["sst2"]["lora"]["below_full"] == pytest.approx(0.012)
    # the gap closes when any method is within a point of full: none here, BitFit (1.9 below) is closest
    close = targets["sst2"]["close_to_full"]
    assert not close["met"] and close["within"] == [] and close["closest"]["method"] == "lora"
    targets = convergence.targets([{**row, "method": "full", "test_at_best": 0.905},
                                   {**row, "method": "dora", "test_at_best": 0.899, "trainable_params": 80},
                                   {**row, "method": "loha", "test_at_best": 0.897, "trainable_params": 40},
                                   {**row, "method": "ia3", "test_at_best": 0.85, "trainable_params": 10}])
    close = targets["sst2"]["close_to_full"]
    assert close["met"] and [o["method"] for o in close["within"]] == ["loha", "dora"]  # fewest parameters first
    assert close["closest"]["method"] == "dora" and close["within"][0]["below_full"] == pytest.approx(0.008)
    # 7 of 698 sentences below full misses a 1-point target by a fraction of a sentence: three decimals say so, and
    # the closest method names the one level with it
    full, level = 627 / 698, 620 / 698
    targets = convergence.targets([{**row, "method": "full", "test_at_best": full},
                                   {**row, "method": "lora_all_linear", "test_at_best": level, "trainable_params": 300},
                                   {**row, "method": "pissa", "test_at_best": level, "trainable_params": 70}])
    close = targets["sst2"]["close_to_full"]
    assert not close["met"] and close["closest"]["method"] == "pissa"
    assert [o["method"] for o in close["tied_with_closest"]] == ["lora_all_linear"]
    assert convergence._gap(full - level, 0.01) == "1.003 points below"
    assert convergence._gap(full - level, 0.015) == "1.00 points below"
    assert convergence._gap(-0.0004, 0.01) == "0.04 points above"

    # --methods newcomer: per task, the newer tuner (not a LoRA preset, not OSF) with the best 300-step validation
    results = {"tasks": {"sst2": {"results": [
        {"method": "dora", "dev_accuracy": 0.9, "trainable_params": 5}, {"method": "osf", "dev_accuracy": 0.9,
         "trainable_params": 5}, {"method": "vera", "dev_accuracy": 0.8, "trainable_params": 5},
        {"method": "shira", "dev_accuracy": 0.85, "trainable_params": 9},
        {"method": "loha", "dev_accuracy": 0.85, "trainable_params": 7}]}}}
    (tmp_path / "method_comparison.json").write_text(json.dumps(results))
    assert convergence.best_newcomer("sst2", tmp_path) == "loha"  # ties: the fewer trainable parameters
    assert convergence.best_newcomer("conll03", tmp_path) is None
    refused = run("convergence.py", "--tasks", "conll03", "--methods", "newcomer", "--results", str(tmp_path),
                  "--report-only", "--out", str(tmp_path / "out"), exit_code=1)
    assert "newcomer needs the 300-step results of every tuner: run benchmarks/method_comparison.py" in refused.stderr
    refused = run("convergence.py", "--tasks", "sst2", "--methods", "hra", "--results", str(tmp_path),
                  "--report-only", "--out", str(tmp_path / "out"), exit_code=1)
    assert "no short-budget rates for sst2 hra under" in refused.stderr


def test_speed_encoder_dry_run(tiny_bert, tmp_path):
    shutil.copy(REPO / "benchmarks" / "results" / "speed.json", tmp_path)  # speed.md repeats the encoder ratios
    run("speed_encoder.py", "--quick", "--methods", "lora", "--model", str(tiny_bert), "--threads", "1", "--out",
        str(tmp_path))
    result = json.loads((tmp_path / "speed_encoder.json").read_text())
    assert result["same_batches"]  # in random order both paths padded the same positions at every step
    assert set(result["runs"]) == {f"lora/{o}/{p}" for o in ("random", "grouped") for p in ("trainer", "ours")}
    assert set(result["ratios"]) == {"lora, random", "lora, grouped"} and result["repeats"] == 1
    ratio = result["ratios"]["lora, random"]
    assert ratio["median"] == ratio["each"][0] == pytest.approx(result["runs"]["lora/random/ours"]["examples_per_s"]
                                                                / result["runs"]["lora/random/trainer"]["examples_per_s"])
    grouped, shuffled = result["runs"]["lora/grouped/ours"], result["runs"]["lora/random/ours"]
    assert grouped["positions_per_step"] < shuffled["positions_per_step"]
    assert all(run["examples_per_s"] > 0 and run["losses"] for run in result["runs"].values())
    assert "Ours / Trainer" in (tmp_path / "speed_encoder.md").read_text()
    speed_page = (tmp_path / "speed.md").read_text()
    assert "## Encoders: MiniLM on SST-2" in speed_page and f"- lora, random: **{ratio['median']:.2f}x**" in speed_page


def test_continual_dry_run_scores_every_strategy_and_reuses_finished_runs(tiny_bert, tmp_path):
    args = ["--quick", "--model", str(tiny_bert), "--strategies", "sequential", "adapter_per_task", "joint",
            "--orders", "1", "2", "--threads", "1", "--run-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "out")]
    run("continual.py", *args)
    result = json.loads((tmp_path / "out" / "continual.json").read_text())
    assert not result["partial"] and result["train_per_task"] == 32 and result["test_per_task"] == 16
    assert set(result["per_order"]) == {"sequential", "adapter_per_task", "adapter_per_task_routed_linear",
                                        "adapter_per_task_routed_centroid", "joint"}
    assert sorted(result["per_order"]["sequential"]) == ["1", "2"] and list(result["per_order"]["joint"]) == ["1"]
    order_1 = result["per_order"]["sequential"]["1"]
    assert len(order_1["matrix"]) == 5 and order_1["matrix"][0][1:] == [None] * 4
    mean = result["summary"]["sequential"]["average_accuracy"]
    values = [result["per_order"]["sequential"][k]["average_accuracy"] for k in ("1", "2")]
    assert mean["mean"] == pytest.approx(sum(values) / 2) and (mean["min"], mean["max"]) == (min(values), max(values))
    assert 0 <= result["summary"]["adapter_per_task_routed_linear"]["routing_accuracy"]["mean"] <= 1
    assert result["targets"]["best_without_task_id"] in ("sequential", "adapter_per_task_routed_linear",
                                                         "adapter_per_task_routed_centroid")
    md = (tmp_path / "out" / "continual.md").read_text()
    assert result["router"] == {"examples_per_task": 16, "layers": "all"}
    assert "over the frozen MiniLM's hidden states (every layer's, mean-pooled, concatenated) of 16 training rows" in md
    assert "| LoRA per task, linear router | no |" in md and "| joint multi-task LoRA (upper bound) | no |" in md
    assert (tmp_path / "out" / "continual.png").stat().st_size > 0
    records = tmp_path / "runs" / "records"
    assert sorted(p.name for p in records.iterdir()) == [
        "adapter_per_task_order1", "adapter_per_task_order2", "joint_order1", "sequential_order1", "sequential_order2"]
    shutil.rmtree(tmp_path / "runs" / "sequential_order1")
    run("continual.py", *args)  # finished runs are read from their records, not trained again
    assert not (tmp_path / "runs" / "sequential_order1").exists()
    assert json.loads((tmp_path / "out" / "continual.json").read_text())["per_order"] == result["per_order"]
    # strategies with no finished run: a clear refusal that names the runs, not a half-written report
    refused = run("continual.py", *args[:-2], "--out", str(tmp_path / "none"), "--report-only", "--strategies", "osf",
                  exit_code=1)
    assert not (tmp_path / "none").exists()
    assert "continual: no finished run to report (osf order 1, osf order 2;" in refused.stderr


def test_selfask_continual_dry_run_reports_every_round(tiny_smollm, tmp_path):
    args = ["--quick", "--rounds", "1", "--round-lr", "1e-4", "--replay", "2", "--questions-per-round", "3",
            "--n-eval", "3", "--processes", "1", "--model", str(tiny_smollm),
            "--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "out")]
    run("selfask_continual.py", *args)
    result = json.loads((tmp_path / "out" / "selfask_continual.json").read_text())
    assert [r["round"] for r in result["run"]["rounds"]] == [0, 1] and result["round_0"][0] == "max_steps=150"
    assert (result["run"]["round_lr"], result["run"]["replay"]) == (1e-4, 2.0)  # as the recipe ran them
    assert result["run"]["questions_per_round"] == 3 and result["run"]["rounds"][1]["asked"] == 3
    assert result["run"]["rounds"][0]["compositional_celebrities"]["n"] == 3
    assert result["targets"]["held_out_rises"] is False  # two rounds cannot show a rise over two rounds
    md = (tmp_path / "out" / "selfask_continual.md").read_text()
    assert "| 0 |" in md and "| 1 |" in md and "leaf facts only (retriever)" in md and "gold sub-answers" in md
    assert "Compositional Celebrities: 3 questions" in md
    assert (tmp_path / "out" / "selfask_continual.png").stat().st_size > 0


@pytest.mark.slow
def test_method_comparison_quick_run_keeps_records_that_a_fresh_checkout_reads(tiny_bert, tiny_smollm, tmp_path):
    args = ["--quick", "--tasks", "sst2", "selfask", "--methods", "lora", "--model", str(tiny_bert), "--lm-model",
            str(tiny_smollm), "--parallel", "1", "--processes", "1", "--eval-threads", "1", "--run-dir",
            str(tmp_path / "runs"), "--out", str(tmp_path / "results")]
    run("method_comparison.py", *args)
    result = json.loads((tmp_path / "results" / "method_comparison.json").read_text())
    assert not result["partial"] and result["budgets"]["encoder"]["steps"] == 3
    (row,) = result["tasks"]["sst2"]["results"]
    assert (row["method"], row["label"], row["learning_rate"], row["global_step"]) == ("lora", "LoRA r8", 1e-3, 3)
    assert row["seconds_per_step"] > 0 and row["peak_memory_mb"] > 0 and row["adapter_bytes"] > 0
    assert 0 <= row["forgetting"] < 1 and row["pareto_accuracy"]  # the only method: on the front
    assert row["forgetting_detail"]["texts"] == {"source": "hotpotqa_distractor", "split": "train", "n": 4, "seed": 0,
                                                 "max_length": 128}
    (ask,) = result["tasks"]["selfask"]["results"]
    assert ask["label"] == "LoRA r8" and ask["compositional_celebrities_n"] == ask["deep_n"] == 2
    assert 0 <= ask["deep_em"] <= 1 and ask["eval_loss"] > 0
    asking = result["tasks"]["selfask"]
    assert asking["question_hours"] == pytest.approx((ask["compositional_celebrities_seconds"] + ask["deep_seconds"])
                                                     / 3600) and asking["question_hours"] > 0
    wall = result["tasks"]["sst2"]["train_hours"] + asking["train_hours"] + asking["question_hours"]  # parallel 1
    detail = ask["forgetting_detail"]
    assert detail["measure"] == "causal-LM loss rise" and detail["forgetting"] == pytest.approx(
        detail["trained"] - detail["base"])
    trained = yaml.safe_load((tmp_path / "runs" / "selfask_lora_lr0.001" / "train_config.yaml").read_text())
    assert trained["method_args"]["r"] == 8 and len(trained["method_args"]["target_modules"]) == 7
    assert trained["learning_rate"] == 1e-3 and trained["save_every"] == 20 and trained["max_steps"] == 3
    assert result["questions"]["deep_drawn"]["validation_trees"] == 8  # validation trees left out of the deep set
    md = (tmp_path / "results" / "method_comparison.md").read_text()
    assert "## SST-2 accuracy" in md and "## Self-ask exact match" in md and "| LoRA r8 | 4,226 |" in md
    assert "PARTIAL" not in md and (tmp_path / "results" / "method_comparison.png").stat().st_size > 0
    assert f"Measured wall time: about {wall:.1f} h (SST-2 " in md and "for the question sets of the 1 chosen" in md

    # a fresh checkout has the records only: nothing is trained or evaluated again
    records = tmp_path / "records"
    shutil.move(tmp_path / "runs" / "records", records)
    assert sorted(p.name for p in (records / "selfask_lora_lr0.001").iterdir()) == [
        "forgetting.json", "machine.json", "metrics.jsonl", "results.json", "selfask_eval.json", "train_config.yaml"]
    shutil.rmtree(tmp_path / "runs")
    run("method_comparison.py", *args, "--records", str(records))
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
    again = json.loads((tmp_path / "results" / "method_comparison.json").read_text())
    assert again["tasks"]["sst2"]["results"] == result["tasks"]["sst2"]["results"]
    assert again["tasks"]["selfask"]["results"] == result["tasks"]["selfask"]["results"]

    # a method not run yet is missing, and the report says PARTIAL
    comparison = benchmark_module("method_comparison")
    partial_args = comparison.parse_args(["--quick", "--tasks", "sst2", "--methods", "lora", "bitfit", "--model",
                                          str(tiny_bert), "--report-only", "--records", str(records), "--run-dir",
                                          str(tmp_path / "runs")])
    partial = comparison.compare(partial_args)
    assert partial["partial"] and partial["tasks"]["sst2"]["missing"] == ["sst2_bitfit_lr0.002"]
    assert [r["method"] for r in partial["tasks"]["sst2"]["results"]] == ["lora"]
    comparison.write_results(partial, tmp_path / "partial")
    assert "## SST-2 accuracy (MiniLM, test.tsv) (PARTIAL)" in (tmp_path / "partial" / "method_comparison.md").read_text()


def test_method_comparison_widens_a_grid_whose_best_rate_lies_at_an_edge(monkeypatch, tmp_path):
    comparison = benchmark_module("method_comparison")
    validation = {  # (method, rate): dev accuracy; LoRA keeps improving upwards, full downwards, BitFit peaks inside
        **{("lora", lr): acc for lr, acc in zip([0.001, 0.003, 0.009, 0.027, 0.081], [0.8, 0.82, 0.84, 0.86, 0.88])},
        **{("full", lr): acc for lr, acc in [(1.67e-05, 0.83), (5e-05, 0.85), (0.00015, 0.84), (0.00045, 0.5)]},
        **{("bitfit", lr): acc for lr, acc in [(0.002, 0.80), (0.006, 0.82), (0.018, 0.5)]},
    }
    trained = []

    def recorded(job, forgetting):
        return tmp_path if job.lr in dict(trained).get(job.method, ()) or job.lr in grid[job.method] else None

    def run_jobs(jobs, forgetting, args, parallel):
        for job in jobs:
            trained.append((job.method, [*dict(trained).get(job.method, ()), job.lr]))
        return []

    monkeypatch.setattr(comparison, "recorded", recorded)
    monkeypatch.setattr(comparison, "run_jobs", run_jobs)
    monkeypatch.setattr(comparison, "run_row", lambda job, d, spec=None: {
        "learning_rate": job.lr, "dev_accuracy": validation[job.method, job.lr]})
    args = comparison.parse_args(["--tasks", "sst2", "--run-dir", str(tmp_path), "--records", str(tmp_path)])
    grid = {m: comparison.grid_rates("sst2", m, args) for m in ("lora", "full", "bitfit")}
    assert grid == {"lora": [0.001, 0.003, 0.009], "full": [5e-05, 0.00015, 0.00045], "bitfit": [0.002, 0.006, 0.018]}
    jobs = {m: [comparison.Job("sst2", m, lr, args) for lr in rates] for m, rates in grid.items()}

    assert comparison.widen_grids("sst2", jobs, None, args) == []
    # LoRA's best stays at the top: widened twice (--widen 2), x 3 each; full's bottom rate is widened once, and its
    # best then lies inside
    assert [job.lr for job in jobs["lora"]] == [0.001, 0.003, 0.009, 0.027, 0.081]
    assert [job.lr for job in jobs["full"]] == [5e-05, 0.00015, 0.00045, 1.67e-05]
    assert [job.lr for job in jobs["bitfit"]] == [0.002, 0.006, 0.018]
    assert dict(trained) == {"lora": [0.027, 0.081], "full": [1.67e-05]}
    assert comparison.grid_edge(0.081, [j.lr for j in jobs["lora"]]) == "top"
    assert comparison.grid_edge(1.67e-05, [j.lr for j in jobs["full"]]) == "bottom"
    assert comparison.grid_edge(5e-05, [j.lr for j in jobs["full"]]) is None
    assert comparison.grid_edge(0.006, [j.lr for j in jobs["bitfit"]]) is None

    # --report-only trains nothing: the first rate beyond an edge is added, and missing until it is recorded
    trained.clear()
    report = comparison.parse_args(["--tasks", "sst2", "--run-dir", str(tmp_path), "--records", str(tmp_path),
                                    "--report-only"])
    jobs = {m: [comparison.Job("sst2", m, lr, report) for lr in rates] for m, rates in grid.items()}
    comparison.widen_grids("sst2", jobs, None, report)
    assert trained == [] and [job.lr for job in jobs["lora"]][3:] == [0.027] and len(jobs["bitfit"]) == 3


def test_method_comparison_marks_seconds_per_step_measured_on_another_machine():
    comparison = benchmark_module("method_comparison")
    row = {"label": "LoRA r8", "trainable_params": 1000, "trainable_pct": 0.1, "adapter_bytes": 4096,
           "learning_rate": 0.001, "dev_accuracy": 0.8, "accuracy": 0.81, "seconds_per_step": 0.25,
           "peak_memory_mb": 900.0, "forgetting": 0.1, "step_seconds": 1800.0, "train_seconds": 2160.0}
    sweep = [{**row, "cpu_model": "AMD EPYC"}, {**row, "cpu_model": "AMD EPYC", "learning_rate": 0.003},
             {**row, "cpu_model": "Intel Xeon", "label": "DoRA", "seconds_per_step": 0.125}]
    assert comparison.machines(sweep[:2]) == ("AMD EPYC", "Machine: every run on AMD EPYC.")
    usual, line = comparison.machines(sweep)
    assert usual == "AMD EPYC"
    assert line.startswith("Machines: 2 runs on AMD EPYC (1.0 h of steps), 1 run on Intel Xeon (0.5 h of steps).")
    assert line.endswith("those marked * were measured on Intel Xeon.")

    data = {"results": [sweep[0], sweep[2]], "sweep": sweep, "missing": [], "failed": [], "skipped": [],
            "step_hours": 0.1, "train_hours": 0.2, "question_hours": 0.0}
    result = {"budgets": {"encoder": {"steps": 300, "batch": "16", "grid": "1x", "widen": 2}}, "parallel": 2,
              "estimate_hours": {"sst2": 1.7}}
    lines = comparison.task_lines("sst2", data, result)
    table = [line for line in lines if line.startswith("| ")]
    assert "| 0.250 |" in table[1] and "| 0.125 * |" in table[2]  # header, LoRA (AMD), DoRA (Intel)
    (compute,) = [line for line in lines if line.startswith("Compute: ")]
    assert "(2 at a time: about 0.1 h of wall time;" in compute and "sized for 1.7 h" in compute


def test_forgetting_is_zero_for_an_unchanged_backbone_and_grows_with_a_change(tiny_bert, tiny_smollm):
    import torch

    from peftprompt import attach, load_backbone

    forgetting = benchmark_module("_forgetting")

    texts = forgetting.held_out_texts(3)
    assert len(set(texts)) == 3 and texts == forgetting.held_out_texts(3)  # a seeded sample of distinct paragraphs
    lm, tokenizer = load_backbone(str(tiny_smollm), task="causal_lm")
    base_loss = forgetting.lm_loss(lm.eval(), tokenizer, texts, max_length=32)
    one = tokenizer(texts[:1], truncation=True, max_length=32, return_tensors="pt")
    with torch.no_grad():  # the model's own loss on one text: the same definition
        assert forgetting.lm_loss(lm, tokenizer, texts[:1], max_length=32) == pytest.approx(
            float(lm(**one, labels=one["input_ids"]).loss), abs=1e-5)
    adapted = attach(lm, "lora").eval()  # B = 0: the same function
    assert forgetting.lm_loss(adapted, tokenizer, texts, max_length=32) == pytest.approx(base_loss, abs=1e-5)
    torch.manual_seed(0)  # the change below, whatever ran in this process before
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    assert forgetting.lm_loss(adapted, tokenizer, texts, max_length=32) != pytest.approx(base_loss, abs=1e-3)

    encoder, tokenizer = load_backbone(str(tiny_bert), task="seq_cls", num_labels=2)
    base = forgetting.sentence_embeddings(encoder.eval(), tokenizer, texts, max_length=32)
    assert base.shape == (3, 64) and forgetting.embedding_drift(base, base) == pytest.approx(0, abs=1e-6)
    prompted = attach(encoder, "prompt").eval()  # 20 virtual tokens: left out of the mean, but attended to
    moved = forgetting.sentence_embeddings(prompted, tokenizer, texts, max_length=32)
    assert moved.shape == (3, 64) and 0 < forgetting.embedding_drift(base, moved) <= 2


def test_gguf_lora_comparison_counts_identical_continuations_and_logit_gaps(tmp_path):
    """The comparison of `benchmarks/gguf_lora.py` (its llama.cpp half needs llama-cpp-python, an optional extra)."""
    gguf_lora = benchmark_module("gguf_lora")
    ours = [{"logits": np.array([0.0, 2.0, 1.0]), "greedy": [5, 6, 7]},
            {"logits": np.array([3.0, 0.0, 1.0]), "greedy": [1, 2, 3]}]
    theirs = [{"logits": np.array([0.5, 2.25, 1.0]), "greedy": [5, 6, 7]},
              {"logits": np.array([1.0, 2.5, 1.0]), "greedy": [1, 9, 3]}]
    result = gguf_lora.compare(ours, theirs)
    assert (result["n"], result["identical_greedy"], result["same_next_token"]) == (2, 1, 1)
    assert result["first_differing_token"] == [1]
    assert result["max_abs_logit_diff"] == {"max": 2.5, "median": 1.5, "per_prompt": [0.5, 2.5]}


def test_test_time_reads_pytests_summary_and_reports_against_the_goal():
    """The timed run clones and sets up a fresh checkout (minutes); its parsing and report are checked here."""
    timing = benchmark_module("test_time")
    output = ("........................................................................ [ 99%]\n"
              "=========================== short test summary info ============================\n"
              "SKIPPED [1] tests/integration/test_llama_cpp_backend.py:20: llama_cpp is not installed\n"
              "================= 866 passed, 1 skipped in 533.12s (0:08:53) =================\n")
    assert timing.pytest_summary(output) == {"counts": {"passed": 866, "skipped": 1}, "seconds": 533.12}
    assert timing.PERCENT.search(output.splitlines()[0])[1] == "99"
    with pytest.raises(ValueError, match="no pytest summary line"):
        timing.pytest_summary("make: *** [Makefile:31: test] Error 1\n")
    result = {"target": "test", "commit": "0123456789abcdef", "setup_seconds": 160.2, "test_seconds": 536.0,
              "total_seconds": 696.2, "pytest": timing.pytest_summary(output), "goal": {"seconds": 720, "met": True}}
    env = {"machine": {"cpu_model": "AMD EPYC", "cpu_count": 2}, "git_commit": "abc", "command": "test_time.py"}
    row = "| 160 s | 536 s | **696 s** | 866 passed, 1 skipped in 533 s | at most 720 s in all: met |"
    assert row in timing.markdown(result, env) and "commit `0123456789ab`" in timing.markdown(result, env)


def test_llama_cpp_build_times_the_extras_requirement_by_ninjas_steps():
    """The build itself takes minutes (`make test-llama` builds it); its parsing and report are checked here."""
    build = benchmark_module("llama_cpp_build")
    assert build.extra_requirement() == "llama-cpp-python>=0.3.36,<0.4"  # pyproject.toml's extra `llama`
    step = build.STEP.search("  [37/152] Building C object vendor/llama.cpp/ggml/src/CMakeFiles/ggml.c.o")
    assert (int(step[1]), int(step[2])) == (37, 152)
    created = ("  Created wheel for llama_cpp_python: filename=llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl "
               "size=23754755 sha256=7c5f")
    wheel = build.WHEEL.search(created)
    assert (wheel[1], wheel[2]) == ("llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl", "0.3.36")
    result = {"requirement": "llama-cpp-python>=0.3.36,<0.4", "parallel_level": 2, "version": "0.3.36",
              "wall_seconds": 413.8, "user_seconds": 753.3, "system_seconds": 50.9, "wheel_bytes": 23754755,
              "compiler": "cc (Debian 12.2.0-14) 12.2.0"}
    env = {"machine": {"cpu_model": "AMD EPYC", "cpu_count": 2}, "git_commit": "abc", "command": "llama_cpp_build.py"}
    row = "| 0.3.36 | 6 min 54 s | 753 s | 51 s | 22.7 MiB | cc (Debian 12.2.0-14) 12.2.0 |"
    assert row in build.markdown(result, env)
