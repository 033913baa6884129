"""Faults injected into training runs, and what the run does: the README's "Faults and what happens" table.

Two real gloo processes under ``accelerate launch`` (a tiny Llama LoRA, `FAULT_SCRIPT`, the fault injected by
monkeypatching inside that launched script: no fault hook lives in the package) for a save that fails on one process,
a worker killed mid-step and SIGTERM; in this process for a truncated newest checkpoint, SIGTERM's checkpoint and
resume, and a corrupt adapter or passage index given to the command line. Reused rather than repeated here: a write
that fails in one process keeps the previous adapter and checkpoint
(tests/test_training.py::test_interrupted_saves_leave_the_previous_adapter_and_checkpoint_intact), damaged index
files are named (tests/test_retrieval_index.py::test_load_names_the_damaged_file), damaged adapters are refused
(tests/test_adapters.py::test_truncated_weights).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from peftprompt.training import list_checkpoints
from peftprompt.training.checkpoints import checkpoint_problem

from conftest import REPO, records, run_here, same_adapters, token_rows

ACCELERATE = Path(sys.executable).with_name("accelerate")
STEPS = 8  # optimiser steps of every run here; save_every 2 unless a test says otherwise
# The run under test, launched on 2 CPU processes. argv: OUT FAULT [resume] [key=value ...]; FAULT is `none` or
# `kind:process:step`:
#   checkpoint_full:P:S  process P's part of checkpoint step-S fails with ENOSPC after writing half a file
#   adapter_full:P:0     process P's final adapter write fails as safetensors fails on a full disk
#   kill:P:S             process P SIGKILLs itself in the forward of step S
#   slow:0:0             each forward sleeps 0.3 s (the test sends SIGTERM to the launcher meanwhile)
# The faulty process writes the time of the fault to OUT.fault first. `resume` continues OUT (resume_from=latest),
# then trains OUT-straight from scratch in the same processes: the same run without a fault, to compare with.
FAULT_SCRIPT = '''
import errno, os, signal, sys, time
import torch
from accelerate import Accelerator, PartialState
from peft import PeftModel
from transformers import LlamaConfig, LlamaForCausalLM
import peftprompt
from peftprompt.recursive import SelfAskCollator
from peftprompt.training import TrainConfig, train
from peftprompt.training.recipe import run_recipe


def tiny_llama():  # conftest.tiny_llama(): the same config and seed
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                        pad_token_id=0)).eval()

class IdTokenizer:
    pad_token_id, eos_token_id, is_fast = 0, 1, True

rows = {rows!r}
out, fault, extra = sys.argv[1], sys.argv[2], sys.argv[3:]
resume = "resume" in extra
overrides = {{k: int(v) for k, v in (item.split("=") for item in extra if "=" in item)}}
kind, process, step = fault.split(":") if fault != "none" else ("none", "-1", "-1")
process, step = int(process), int(step)
state = PartialState(cpu=True)
mine = state.process_index == process


def note_the_time():
    with open(out + ".fault", "w") as f:
        f.write(repr(time.time()))

if kind == "checkpoint_full" and mine:
    save_state = Accelerator.save_state

    def full_disk_save_state(self, output_dir=None, **kwargs):
        if os.path.basename(output_dir).startswith(f".step-{{step}}."):  # the temporary directory of step-S
            partial = os.path.join(output_dir, f"random_states_{{process}}.pkl")
            with open(partial, "wb") as f:
                f.write(b"half a file")
            note_the_time()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), partial)
        return save_state(self, output_dir, **kwargs)

    Accelerator.save_state = full_disk_save_state
if kind == "adapter_full" and mine:
    from safetensors import SafetensorError

    def full_disk_save_pretrained(self, save_directory, **kwargs):
        with open(os.path.join(save_directory, "adapter_model.safetensors"), "wb") as f:
            f.write(b"half a file")
        note_the_time()
        raise SafetensorError('Error while serializing: IoError(Os {{ code: 28, kind: StorageFull, message: '
                              '"No space left on device" }})')  # what safetensors raises on a full disk

    PeftModel.save_pretrained = full_disk_save_pretrained


def run(output_dir, resume_from=None, faulty=True):
    model = peftprompt.attach(tiny_llama(), "lora", task="causal_lm", lora_dropout=0.1)
    forwards = [0]

    def fault_hook(module, args, kwargs):
        if not module.training:
            return
        forwards[0] += 1
        if kind == "kill" and mine and forwards[0] == step:
            note_the_time()
            os.kill(os.getpid(), signal.SIGKILL)
        if kind == "slow":
            time.sleep(0.3)

    if faulty:
        model.register_forward_pre_hook(fault_hook, with_kwargs=True)
    settings = dict(model="tiny-llama", task="causal_lm", learning_rate=1e-2, per_device_train_batch_size=2,
                    max_steps={steps}, save_every=2, log_every=1, mixed_precision="no")
    config = TrainConfig(**{{**settings, **overrides}}, output_dir=output_dir, resume_from=resume_from)
    return train(config, model, None, rows, SelfAskCollator(IdTokenizer(), max_length=64))


def main():
    run(out, "latest" if resume else None)
    if resume:
        run(out + "-straight", faulty=False)
    state.destroy_process_group()


run_recipe(main)
'''


def launch_command(tmp_path: Path, *args: str) -> tuple[list[str], dict]:
    script = tmp_path / "fault_script.py"
    if not script.exists():
        script.write_text(FAULT_SCRIPT.format(rows=token_rows(32), steps=STEPS))
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    command = [str(ACCELERATE), "launch", "--config_file", str(REPO / "recipes/accelerate/cpu_2proc.yaml"),
               str(script), *args]
    return command, env


def launch(tmp_path: Path, out: Path, *args: str, timeout: float = 150) -> tuple[subprocess.CompletedProcess, float]:
    """Run `FAULT_SCRIPT` on 2 CPU processes; returns the finished process and its seconds."""
    command, env = launch_command(tmp_path, str(out), *args)
    started = time.monotonic()
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    return done, time.monotonic() - started


def seconds_since_the_fault(out: Path) -> float:
    return time.time() - float(Path(f"{out}.fault").read_text())


def error_lines(output: str) -> list[str]:
    """The processes' one-line errors (a line may follow the other process's progress bar, which ends in no
    newline while it runs: the two processes share the terminal)."""
    return re.findall(r"fault_script\.py: error: [^\r\n]*", output)


def no_worker_traceback(output: str) -> None:
    """The processes print no traceback: the only one is accelerate launch's own report (``ChildFailedError`` /
    ``SignalException``, with the exit codes), which it prints for any process that exits non-zero."""
    assert "[rank0]:" not in output and "[rank1]:" not in output
    assert "Connection closed by peer" not in output and "broadcast_object_list" not in output
    assert output.count("Traceback (most recent call last)") <= 1
    assert not re.search(r'File "[^"]*(peftprompt|fault_script)', output)


@pytest.mark.slow
@pytest.mark.parametrize("fault, message", [
    ("checkpoint_full:1:4",
     "cannot write checkpoint {out}/checkpoints/step-4: {out}/checkpoints/step-4/random_states_1.pkl: No space left "
     "on device (disk full) [process 1 of 2]; {out}/checkpoints/step-2 is intact"),
    ("adapter_full:0:0",
     "cannot write adapter {out}/adapter: No space left on device (disk full) [process 0 of 2]; the trained weights "
     "are in {out}/checkpoints/step-8: resume_from=latest writes the adapter again"),
])
def test_a_save_that_fails_on_one_process_fails_every_process_with_one_line(tmp_path, fault, message):
    """Disk full on process 1 while it writes its part of checkpoint step-4, or on process 0 while it writes the
    final adapter: both processes exit non-zero within 60 s with the same one line naming the file and the cause,
    no traceback, no temporary directory left; the previous checkpoint is intact and a resume uses it."""
    out = tmp_path / "out"
    done, seconds = launch(tmp_path, out, fault)
    after_fault = seconds_since_the_fault(out)
    print(f"\n{fault}: launch exited {after_fault:.1f} s after the fault, {seconds:.1f} s after it started")
    output = done.stdout + done.stderr
    assert done.returncode != 0 and seconds < 60, output[-3000:]
    assert error_lines(output) == [f"fault_script.py: error: {message.format(out=out)}"] * 2, output[-3000:]
    # The launcher reports the processes that failed: status 1 each, none 0. It may stop the second process while that
    # one exits (then only one report is 1; a fresh-clone run saw this); both printed the line above before exiting.
    assert output.count("exitcode  : 1 ") >= 1 and "exitcode  : 0 " not in output, output[-3000:]
    no_worker_traceback(output)
    saved = [step for step, _ in list_checkpoints(out)]
    assert saved == ([2] if fault.startswith("checkpoint") else [6, 8])  # keep_checkpoints: 2
    assert not [p for p in [*out.iterdir(), *(out / "checkpoints").iterdir()] if p.name.startswith(".")]
    assert not (out / "adapter").exists()
    for _, path in list_checkpoints(out):
        assert checkpoint_problem(path) is None
    resumed = run_here(out, resume_from="latest", max_steps=STEPS, per_device_train_batch_size=2)  # 1 process
    assert resumed.resumed_from == str(out / "checkpoints" / f"step-{saved[-1]}") and resumed.global_step == STEPS
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_a_worker_killed_mid_step_ends_the_run_and_it_resumes_bit_identical(tmp_path):
    """Process 1 is SIGKILLed in the forward of step 3 (after checkpoint step-2): process 0, waiting for it in the
    step's all-reduce, exits at once (gloo: connection closed) or is ended by the launcher; no hang. Resumed on 2
    processes, the run ends with the adapter of the same run without a fault, bit for bit (dropout on)."""
    out = tmp_path / "out"
    done, seconds = launch(tmp_path, out, "kill:1:3")
    after_kill = seconds_since_the_fault(out)
    output = done.stdout + done.stderr
    assert done.returncode != 0 and "exitcode  : -9" in output, output[-3000:]
    assert after_kill < 30, f"the survivor took {after_kill:.1f} s to exit"
    print(f"\nkill: launch exited {after_kill:.1f} s after the kill, {seconds:.1f} s after it started")
    assert [step for step, _ in list_checkpoints(out)] == [2]

    done, _ = launch(tmp_path, out, "none", "resume")
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert [r["step"] for r in records(out, "resume")] == [2]
    assert same_adapters(out, Path(f"{out}-straight"))


@pytest.mark.slow
def test_sigterm_to_the_launcher_checkpoints_on_both_processes_and_exits(tmp_path):
    """SIGTERM to ``accelerate launch`` (what a scheduler's preemption sends): the launcher passes it on, both
    processes finish the step, write one checkpoint together and exit with status 143 and the same one line, all
    within 30 s; the checkpoint is intact and a resume continues from it."""
    out = tmp_path / "out"
    command, env = launch_command(tmp_path, str(out), "slow:0:0", "save_every=100")
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    try:
        deadline = time.monotonic() + 120
        log = out / "metrics.jsonl"
        while not (log.exists() and '"type": "train"' in log.read_text()):  # step 1 is done
            assert process.poll() is None and time.monotonic() < deadline, "the run ended or never started"
            time.sleep(0.05)
        sent = time.monotonic()
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
        seconds = time.monotonic() - sent
    finally:
        process.kill()
    print(f"\nSIGTERM: launch exited {seconds:.1f} s after the signal, status {process.returncode}")
    assert seconds < 30 and process.returncode != 0, output[-3000:]
    lines = error_lines(output)
    assert len(lines) == 2 and lines[0] == lines[1], output[-3000:]
    stopped = re.fullmatch(r"fault_script\.py: error: stopped by SIGTERM after step (\d) of 8: checkpoint (\S+) "
                           r"written; run again with resume_from=latest to continue", lines[0])
    assert stopped, lines[0]
    step = int(stopped.group(1))
    assert 1 <= step < STEPS and stopped.group(2) == str(out / "checkpoints" / f"step-{step}")
    no_worker_traceback(output)
    assert [s for s, _ in list_checkpoints(out)] == [step] and checkpoint_problem(Path(stopped.group(2))) is None
    resumed = run_here(out, resume_from="latest", max_steps=STEPS, per_device_train_batch_size=2)  # 1 process
    assert resumed.resumed_from == stopped.group(2) and resumed.global_step == STEPS
