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

import errno
import os
import re
import signal
import threading

import pytest
import torch
from safetensors import SafetensorError

import peftprompt
from peftprompt.cli import main as cli_main
from peftprompt.errors import InputError, SaveError, TrainingInterrupted
from peftprompt.retrieval.embed import SentenceEncoder
from peftprompt.training import list_checkpoints
from peftprompt.training.checkpoints import checkpoint_problem, resume_dir
from peftprompt.training.collective import describe_failure, shared_outcome

from conftest import records, run_here, same_adapters, tiny_llama, tiny_run_config


@pytest.mark.parametrize("error, cause", [
    (OSError(errno.ENOSPC, "No space left on device", "/o/checkpoints/.step-4.ab_12xyz/optimizer.bin"),
     "/o/checkpoints/step-4/optimizer.bin: No space left on device (disk full)"),
    (PermissionError(errno.EACCES, "Permission denied", "/o/checkpoints/.step-4.ab_12xyz"),
     "Permission denied"),
    (SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space" })'),
     "No space left on device (disk full)"),
    (OSError(errno.EROFS, "Read-only file system"), "Read-only file system"),
])
def test_a_failed_write_is_one_line_naming_the_file_and_the_cause(error, cause):
    assert describe_failure(error, "checkpoint", "/o/checkpoints/step-4", 1, 2) == (
        f"cannot write checkpoint /o/checkpoints/step-4: {cause} [process 1 of 2]")

    def fail():
        raise error

    with pytest.raises(SaveError, match=re.escape(f"cannot write checkpoint /o/checkpoints/step-4: {cause}")) as info:
        shared_outcome(fail, what="checkpoint", target="/o/checkpoints/step-4")  # one process: no process group
    assert info.value.__cause__ is error and isinstance(info.value, OSError) and info.value.exit_code == 1


def test_sigterm_writes_a_checkpoint_stops_and_resumes_bit_identical(tmp_path):
    """SIGTERM in the middle of step 3 (one process): the step finishes, checkpoint step-3 is written (save_every
    is 2: only SIGTERM writes an odd step), `TrainingInterrupted` (exit status 143) names it; the SIGTERM handler
    is the previous one again; resume_from=latest ends with the uninterrupted run's adapter, bit for bit."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("SIGTERM is handled in the main thread only: sent here it would end the test process")
    before = signal.getsignal(signal.SIGTERM)
    straight = run_here(tmp_path / "straight")
    forwards = []

    def sigterm_in_step_3(module, args):
        if module.training:
            forwards.append(1)
            if len(forwards) == 3:
                os.kill(os.getpid(), signal.SIGTERM)

    out = tmp_path / "run"
    with pytest.raises(TrainingInterrupted, match=re.escape(
            f"stopped by SIGTERM after step 3 of 6: checkpoint {out}/checkpoints/step-3 written; run again with "
            "resume_from=latest to continue")) as info:
        run_here(out, hook=sigterm_in_step_3)
    assert info.value.exit_code == 143
    assert signal.getsignal(signal.SIGTERM) is before
    assert [step for step, _ in list_checkpoints(out)] == [2, 3]
    assert checkpoint_problem(out / "checkpoints" / "step-3") is None
    resumed = run_here(out, resume_from="latest")
    assert resumed.resumed_from == str(out / "checkpoints" / "step-3") and resumed.global_step == 6
    assert same_adapters(out, straight.adapter_dir.parent)
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_truncated_newest_checkpoint_is_refused_by_name_and_resume_falls_back(tmp_path, capsys):
    """The newest checkpoint's weights cut short after it was written: named and refused when asked for by path;
    resume_from=latest names it, skips it and resumes from the one before, to the uninterrupted run's adapter."""
    straight = run_here(tmp_path / "straight")
    out = tmp_path / "run"
    run_here(out)
    newest = out / "checkpoints" / "step-6"
    weights = newest / "model.safetensors"
    size = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[: size // 2])
    problem = f"{weights} is truncated ({size // 2:,} of {size:,} bytes)"
    assert checkpoint_problem(newest) == problem

    with pytest.raises(InputError, match=re.escape(f"checkpoint {newest} is damaged: {problem}")) as info:
        run_here(out, resume_from=str(newest))
    assert info.value.field == "resume_from"
    capsys.readouterr()
    resumed = run_here(out, resume_from="latest")
    assert f"WARNING: checkpoint {newest} is damaged: {problem}; skipped" in capsys.readouterr().out
    assert resumed.resumed_from == str(out / "checkpoints" / "step-4") and resumed.global_step == 6
    assert [r["reason"] for r in records(out, "skipped_checkpoint")] == [f"checkpoint {newest} is damaged: {problem}"]
    assert checkpoint_problem(newest) is None  # written again by the resumed run
    assert same_adapters(out, straight.adapter_dir.parent)

    for _, path in list_checkpoints(out):  # nothing intact left: refused, never a silent fresh start
        (path / "optimizer.bin").write_bytes(b"")
    with pytest.raises(InputError, match="no intact checkpoint to resume from: checkpoint .*step-6 is damaged: .*"
                                         "optimizer.bin is truncated"):
        resume_dir(tiny_run_config(out, resume_from="latest"), out)


class _StubEncoder(SentenceEncoder):
    """2-D unit vectors for a 2-passage index (no model)."""

    def __init__(self):
        self.name = "stub"
        self.encoder_id = {"name": "stub", "name_or_path": "stub", "hidden_size": 2, "vocab_size": 1,
                           "fingerprint": [0.5]}

    def encode(self, texts, batch_size=32, max_length=128, progress=False, bf16=False):
        return torch.nn.functional.normalize(torch.tensor([[1.0, 0.1 * i] for i in range(len(texts))]), dim=1)


@pytest.mark.parametrize("what", ["adapter", "index"])
def test_a_corrupt_adapter_or_index_is_refused_in_one_line_naming_it(what, tmp_path, capsys, monkeypatch):
    """The command line, given a truncated adapter or a passage index with a flipped byte: exit status 2 and one
    line naming the damaged file, no traceback."""
    monkeypatch.chdir(tmp_path)
    if what == "adapter":
        saved = peftprompt.save_adapter(peftprompt.attach(tiny_llama(), "lora", task="causal_lm"), tmp_path / what)
        damaged = saved / "adapter_model.safetensors"
        damaged.write_bytes(damaged.read_bytes()[:-100])
        argv, expected = ["export", "--adapter", str(saved), "--out", "copy"], "is corrupt or truncated"
    else:
        from peftprompt.retrieval.index import PassageIndex
        from peftprompt.retrieval.passages import Passage

        passages = [Passage.make("Alpha", "apollo moon landing"), Passage.make("Beta", "lunar module")]
        PassageIndex.build(passages, _StubEncoder(), progress=False).save(tmp_path / what)
        damaged = tmp_path / what / "embeddings.safetensors"
        data = bytearray(damaged.read_bytes())
        data[-1] ^= 0xFF
        damaged.write_bytes(bytes(data))
        argv, expected = ["index", "search", "--index", str(tmp_path / what), "apollo"], "does not match the sha256"
    capsys.readouterr()
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(damaged) in err and expected in err and "Traceback" not in err, err
