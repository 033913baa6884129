"""The accelerate configs in recipes/accelerate: each loads with accelerate's own loader, and cpu_2proc really runs
two processes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType

CONFIGS = Path(__file__).resolve().parents[1] / "recipes" / "accelerate"

EXPECTED = {
    # cpu_2proc: MULTI_GPU is deliberate, see the file (MULTI_CPU makes `accelerate launch` start ONE process).
    "cpu_2proc.yaml": (DistributedType.MULTI_GPU, 2, True),
    "single_gpu.yaml": (DistributedType.NO, 1, False),
    "multi_gpu.yaml": (DistributedType.MULTI_GPU, 2, False),
    "fsdp.yaml": (DistributedType.FSDP, 2, False),
    "deepspeed_zero2.yaml": (DistributedType.DEEPSPEED, 2, False),
}

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


def test_every_config_is_tested():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_loads_with_accelerate(name):
    path = CONFIGS / name
    config = load_config_from_file(str(path))  # accelerate's own loader: refuses unknown keys
    distributed_type, num_processes, use_cpu = EXPECTED[name]
    assert config.distributed_type == distributed_type
    assert config.num_processes == num_processes
    assert config.use_cpu is use_cpu
    assert (config.num_machines, config.machine_rank) == (1, 0)
    first_line = path.read_text().splitlines()[0]
    assert first_line.startswith("# ") and f"accelerate launch --config_file recipes/accelerate/{name} " in first_line
    if use_cpu:
        assert config.mixed_precision == "no"


def test_fsdp_config_is_peft_friendly():
    fsdp = load_config_from_file(str(CONFIGS / "fsdp.yaml")).fsdp_config
    assert fsdp["fsdp_use_orig_params"] is True
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    assert fsdp["fsdp_version"] == 1


def test_deepspeed_config_is_zero2():
    deepspeed = load_config_from_file(str(CONFIGS / "deepspeed_zero2.yaml")).deepspeed_config
    assert deepspeed["zero_stage"] == 2


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
