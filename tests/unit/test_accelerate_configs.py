"""The accelerate configs in recipes/accelerate: each loads with accelerate's own loader, and cpu_2proc really runs
two processes."""

from __future__ import annotations

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType

from conftest import REPO

CONFIGS = REPO / "recipes" / "accelerate"
EXPECTED = {
    # cpu_2proc: MULTI_GPU is deliberate, see the file (MULTI_CPU makes `accelerate launch` start ONE process).
    "cpu_2proc.yaml": (DistributedType.MULTI_GPU, 2, True),
    "single_gpu.yaml": (DistributedType.NO, 1, False),
    "multi_gpu.yaml": (DistributedType.MULTI_GPU, 2, False),
    "fsdp.yaml": (DistributedType.FSDP, 2, False),
    "deepspeed_zero2.yaml": (DistributedType.DEEPSPEED, 2, False),
}


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
