"""Reader episodes (`peftprompt.retrieval.reader`): their text, what they train, the examples built from open-book
questions, and the self-ask recipe's reader options."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import REPO


def test_reader_only_recipe_runs(tiny_smollm, tmp_path):
    command = [
        sys.executable, str(REPO / "recipes/selfask_sft.py"), "--config",
        str(REPO / "recipes/configs/smollm2/reader_lora.yaml"), f"model={tiny_smollm}", "max_steps=2",
        "max_train_samples=8", "max_eval_samples=4", "data.generate_eval=0", "mixed_precision=no", "log_every=1",
        f"output_dir={tmp_path}",
    ]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "0 training trees" in done.stderr and "8 reader episodes (0 over max_length dropped)" in done.stderr
    assert (tmp_path / "results.json").exists()
