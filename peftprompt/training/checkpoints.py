"""Checkpoints of a run: ``output_dir/checkpoints/step-N``, written atomically, small, and resumable.

A checkpoint is `Accelerator.save_state` (trainable parameters only: a save-state hook drops the frozen backbone,
which is reloaded from its source; optimizer, scheduler and RNG states) plus ``trainer_state.json``
(`TrainerState`). It is written into a temporary directory and renamed into place by the main process, so an
interrupted save leaves the earlier checkpoints untouched and no ``step-N`` behind; a write that fails on any
process (disk full, permission denied) raises the same `SaveError` on every process
(`peftprompt.training.collective`). The last file written is ``manifest.json`` (the size and sha256 of every other
file): ``resume_from=latest`` skips a newest checkpoint that does not match it (truncated or altered after it was
written), naming it, and resumes from the one before. A model sharded with
`peftprompt.training.sharding` (``fully_shard``) has its trainable weights and optimizer state gathered into whole
tensors (``model.safetensors``, ``optimizer_full.bin``) and scattered back on resume.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections import OrderedDict
from pathlib import Path
from typing import Optional

import torch
from accelerate import Accelerator
from accelerate.utils import extract_model_from_parallel
from safetensors import safe_open
from safetensors.torch import save_file

from ..atomic import replace_dir, temporary_dir
from ..errors import InputError, InputFileNotFoundError, SaveError
from .collective import shared_outcome
from .config import TrainConfig
from .sharding import gathered_optimizer_state, gathered_weights, is_sharded, load_optimizer_state, load_weights
from .state import TRAINER_STATE, TrainerState

CHECKPOINTS = "checkpoints"
CHECKPOINT_RE = re.compile(r"^step-(\d+)$")
MODEL_WEIGHTS = "model.safetensors"
GATHERED_OPTIMIZER = "optimizer_full.bin"  # the optimizer state of a sharded model, whole tensors
MANIFEST = "manifest.json"  # written last: the size and sha256 of every other file


def list_checkpoints(output_dir: Path | str) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``output_dir/checkpoints`` as ``(step, path)``, oldest first.

    A checkpoint is complete when its directory has been renamed into place (temporary directories start with a
    dot) and holds ``trainer_state.json``.
    """
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = CHECKPOINT_RE.match(path.name)
        if match and path.is_dir() and (path / TRAINER_STATE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(output_dir: Path | str) -> Optional[Path]:
    """The newest complete checkpoint under ``output_dir/checkpoints``, or None."""
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1][1] if checkpoints else None


def resume_dir(config: TrainConfig, output_dir: Path) -> tuple[Optional[Path], list[str]]:
    """The checkpoint ``config.resume_from`` names, or None for a fresh run, and the damaged checkpoints skipped
    (one line each, naming the checkpoint and the file).

    ``latest``: the newest intact checkpoint (None when there is none yet; an error when every one is damaged). A
    named checkpoint that is incomplete or damaged is refused. A fresh run into a directory that already holds
    checkpoints is refused.
    """
    if config.resume_from is None:
        existing = list_checkpoints(output_dir)
        if existing:
            raise InputError(
                f"{output_dir} already holds checkpoints of an earlier run (newest {existing[-1][1].name}): pass "
                "resume_from=latest to continue it, or choose another output_dir", field="output_dir"
            )
        return None, []
    if config.resume_from == "latest":
        skipped = []
        for _, path in reversed(list_checkpoints(output_dir)):
            problem = checkpoint_problem(path)
            if problem is None:
                return path, skipped
            skipped.append(f"checkpoint {path} is damaged: {problem}")
        if skipped:
            raise InputError(f"no intact checkpoint to resume from: {'; '.join(skipped)}", field="resume_from")
        return None, []
    path = Path(config.resume_from)
    if not (path / TRAINER_STATE).is_file():
        raise InputFileNotFoundError(
            f"{path} is not a complete checkpoint ({TRAINER_STATE} missing)", field="resume_from"
        )
    problem = checkpoint_problem(path)
    if problem is not None:
        raise InputError(f"checkpoint {path} is damaged: {problem}", field="resume_from")
    return path, []


def write_manifest(directory: Path) -> None:
    """Write ``manifest.json`` in a checkpoint directory: the size and sha256 of every file in it."""
    files = {
        str(path.relative_to(directory)): {"bytes": path.stat().st_size, "sha256": _sha256(path)}
        for path in sorted(directory.rglob("*")) if path.is_file() and path.name != MANIFEST
    }
    (directory / MANIFEST).write_text(json.dumps({"format_version": 1, "files": files}, indent=1))


def checkpoint_problem(path: Path) -> Optional[str]:
    """What is wrong with the checkpoint at `path`, in a few words naming the file, or None when it is intact.

    Every file must have the size and sha256 that ``manifest.json`` gives; a checkpoint written before manifests
    existed (none) is taken as it is.
    """
    if not (path / TRAINER_STATE).is_file():
        return f"{TRAINER_STATE} is missing"
    manifest = path / MANIFEST
    if not manifest.is_file():
        return None
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError) as err:
        return f"{manifest} is unreadable ({type(err).__name__}: {err})"
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            return f"{file} is missing"
        size = file.stat().st_size
        if size != expected["bytes"]:
            return f"{file} is truncated ({size:,} of {expected['bytes']:,} bytes)" if size < expected["bytes"] \
                else f"{file} has {size:,} bytes, the manifest says {expected['bytes']:,}"
        if _sha256(file) != expected["sha256"]:
            return f"{file} is corrupt (its sha256 differs from the manifest's)"
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def trainable_state_dict(model) -> "OrderedDict[str, torch.Tensor]":
    """The trainable parameters of `model` under their unwrapped names (no DDP ``module.`` prefix)."""
    inner = extract_model_from_parallel(model)
    return OrderedDict((name, p.detach()) for name, p in inner.named_parameters() if p.requires_grad)


def keep_trainable_weights(models, weights, output_dir) -> None:
    """`Accelerator.register_save_state_pre_hook` hook: save only the trainable parameters, under unwrapped names,
    so a checkpoint is small and loads whatever the number of processes."""
    for i, model in enumerate(models):
        weights[i] = trainable_state_dict(model)


def save_checkpoint(accelerator: Accelerator, target: Path, state: TrainerState, model=None, optimizer=None) -> None:
    """`Accelerator.save_state` into a temporary directory on every process, renamed to `target` by the main one.

    Three steps, each ending with every process knowing every process's outcome (`shared_outcome`): the main
    process makes the temporary directory; every process writes its part into it (its RNG state; the main one the
    weights, optimizer, scheduler and trainer state); the main process writes ``manifest.json`` and renames the
    directory to `target`. A failure at any step, on any process, raises the same `SaveError` on every process,
    after the temporary directory is removed: the earlier checkpoints are untouched. A sharded `model` (and its
    `optimizer`) is gathered first, on every process, and written by the main one.
    """
    gathered = None
    if model is not None and is_sharded(model):
        gathered = gathered_weights(model), gathered_optimizer_state(model, optimizer)
    main = accelerator.is_main_process

    def begin() -> tuple[Path, Optional[Path]]:
        earlier = [path for _, path in list_checkpoints(target.parent.parent) if path != target]
        return temporary_dir(target), (earlier[-1] if earlier else None)

    tmp, previous = shared_outcome(begin, what="checkpoint", target=target, main_only=True)

    def write() -> None:
        accelerator.save_state(str(tmp))
        if main and gathered is not None:
            save_file({name: tensor.contiguous() for name, tensor in gathered[0].items()}, tmp / MODEL_WEIGHTS)
            torch.save(gathered[1], tmp / GATHERED_OPTIMIZER)
        if main:
            state.save(tmp / TRAINER_STATE)

    def commit() -> None:
        write_manifest(tmp)
        replace_dir(tmp, target)

    try:
        shared_outcome(write, what="checkpoint", target=target)
        shared_outcome(commit, what="checkpoint", target=target, main_only=True)
    except SaveError as err:
        kept = f"{previous} is intact" if previous is not None else "there is no earlier checkpoint"
        raise SaveError(f"{err}; {kept}") from err.__cause__
    finally:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)  # gone already after the rename


def prune_checkpoints(output_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (`keep` 0: keep them all)."""
    if keep <= 0:
        return
    for _, path in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def load_trainable_weights(path: Path, model) -> None:
    """Load a checkpoint's trainable parameters into `model` (into its shards when it is sharded), refusing a
    checkpoint of another model or method."""
    weights = path / MODEL_WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"checkpoint {path} is incomplete: {MODEL_WEIGHTS} is missing")
    expected = trainable_state_dict(model)
    with safe_open(weights, framework="pt") as f:
        saved = set(f.keys())
        if saved != set(expected):
            missing, extra = sorted(set(expected) - saved), sorted(saved - set(expected))
            raise ValueError(
                f"checkpoint {path} does not match the model's trainable parameters "
                f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected {extra[:3]}"
                f"{'...' if len(extra) > 3 else ''}): was it written with another method or model?"
            )
        if is_sharded(model):
            load_weights(model, {name: f.get_tensor(name) for name in expected})  # the same order on every process
            return
        with torch.no_grad():
            for name, tensor in expected.items():
                tensor.copy_(f.get_tensor(name))


def load_checkpoint(accelerator: Accelerator, path: Path, model, optimizer, scheduler) -> TrainerState:
    """Restore optimizer, scheduler, RNG states and the trainable weights from the checkpoint at `path`; returns its
    `TrainerState`.

    Accelerate's own model load (``strict=False``) may not match the unwrapped names under DDP, so the trainable
    weights are loaded explicitly and checked. The learning rates are then set to this run's schedule at the
    restored step: the optimizer state brings back the rates of the interrupted run, which differ when the schedule
    changed (a longer ``max_steps`` to continue a finished run would otherwise take its first step at the old
    schedule's final rate of 0).
    """
    accelerator.load_state(str(path), strict=False)
    load_trainable_weights(path, model)
    if is_sharded(model):
        load_optimizer_state(model, optimizer, torch.load(path / GATHERED_OPTIMIZER, weights_only=True))
    inner = getattr(scheduler, "scheduler", scheduler)
    if isinstance(inner, torch.optim.lr_scheduler.LambdaLR):
        for group, base, fn in zip(inner.optimizer.param_groups, inner.base_lrs, inner.lr_lambdas):
            group["lr"] = base * fn(inner.last_epoch)
    return TrainerState.load(path / TRAINER_STATE)
