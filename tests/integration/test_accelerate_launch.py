"""The accelerate configs in recipes/accelerate: each loads with accelerate's own loader, and cpu_2proc really runs
two processes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest

from conftest import REPO

CONFIGS = REPO / "recipes" / "accelerate"
SCRIPT = """
import os

import torch
from accelerate import Accelerator

accelerator = Accelerator()
ranks = accelerator.gather(torch.tensor([accelerator.process_index]))  # a real gloo collective
line = (f"rank={accelerator.process_index} num_processes={accelerator.num_processes} "
        f"type={accelerator.distributed_type.value} gathered={ranks.tolist()}\\n")
os.write(1, line.encode())  # one write: print() writes the newline separately and the two ranks' lines interleave
accelerator.end_training()  # destroys the process group; without it gloo can abort at exit ("terminate called ...")
"""


@pytest.mark.slow
def test_cpu_2proc_runs_two_gloo_processes(tmp_path):
    script = tmp_path / "tmp_script.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(CONFIGS / "cpu_2proc.yaml"), str(script)]
    start = time.monotonic()
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    elapsed = time.monotonic() - start
    assert result.returncode == 0, result.stderr[-3000:]
    lines = re.findall(r"rank=(\d) num_processes=(\d+) type=(\w+) gathered=(\[[^\]]*\])", result.stdout)
    assert sorted(rank for rank, *_ in lines) == ["0", "1"], result.stdout
    assert {(n, kind, gathered) for _, n, kind, gathered in lines} == {("2", "MULTI_CPU", "[0, 1]")}
    assert elapsed < 40, f"two-process launch took {elapsed:.1f} s"
