"""The benchmark scripts end to end on tiny random models and a few steps, so they cannot rot (shapes of the output
files checked; the measured numbers themselves live in benchmarks/results/)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_speed_benchmark_dry_run(tiny_smollm, tmp_path):
    run("speed.py", "--model", str(tiny_smollm), "--steps", "4", "--quant-steps", "3", "--batch-size", "2",
        "--max-length", "256", "--out", str(tmp_path))
    result = json.loads((tmp_path / "speed.json").read_text())
    assert set(result["runs"]) == {"baseline", "ours", "ours_fp32", "ours_8bit", "ours_4bit"}
    for name, r in result["runs"].items():
        assert r["steps"] == (4 if name in ("baseline", "ours") else 3)
        assert len(r["losses"]) == r["steps"] and r["seconds_per_step"] > 0 and r["peak_rss_mb"] > 0
    # the same data, seed and initial adapter: the first-step losses agree (the curves then diverge by data order)
    assert result["runs"]["baseline"]["first_loss"] == pytest.approx(result["runs"]["ours"]["first_loss"], abs=1e-3)
    assert result["speedup_trained_tokens_per_s"] > 0 and result["rss_ratio_4bit_vs_fp32"] > 0
    assert {"machine", "versions", "git_commit", "command"} <= set(result["environment"])
    assert "| baseline: Trainer" in (tmp_path / "speed.md").read_text()
    assert (tmp_path / "speed.png").stat().st_size > 0


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
    assert (tmp_path / "results" / "selfask.png").stat().st_size > 0


def test_selfask_benchmark_without_an_adapter_says_how_to_train_one(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "benchmarks/selfask.py"), "--adapter", str(tmp_path / "none")],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "make demo" in done.stderr and "Traceback" not in done.stderr
