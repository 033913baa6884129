"""Training runs for the benchmarks: one recipe run per directory, reused when it is already done.

`run_recipe` trains ``recipes/<recipe>`` with a config file and ``key=value`` overrides into a run directory, through
`peftprompt.training.recipe.launch_command` (the ``accelerate launch`` line of ``make demo``, or one plain process),
unless that directory already holds the same run. A run is done when its ``results.json`` exists and its saved
config (``train_config.yaml``, written by training), read as a typed `TrainConfig`, equals the requested one
(`same_run`). Every benchmark that trains goes through here, so they share that rule.

A benchmark whose runs span sessions keeps a record of each finished run (`keep_record`: its results, config,
evaluations and the CPU that ran it, a few KB) under ``benchmarks/results/<name>_runs/``; a later session finds it
with `finished_dir` and reads it instead of training again.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import yaml

from _env import cpu_model
from peftprompt import load_adapter, load_backbone
from peftprompt.errors import InputError
from peftprompt.training.config import TrainConfig, load_config
from peftprompt.training.recipe import launch_command

REPO = Path(__file__).resolve().parents[1]
RESULTS_FILE = "results.json"
CONFIG_FILE = "train_config.yaml"  # written by training at the end of a run (`TrainConfig.save`)
REQUEST_FILE = "run_request.yaml"  # written here before a run starts: what an interrupted run was asked to train
METRICS_FILE = "metrics.jsonl"  # written by training: one record per start, evaluation, checkpoint, log line
MACHINE_FILE = "machine.json"  # a record's CPU: its seconds and its `auto` precision depend on it
# Where a run is, not what it is: never compared.
NOT_COMPARED = ("output_dir", "resume_from")
QUICK_TRAINING = ("max_steps=5", "max_train_samples=200", "max_eval_samples=16")
"""The overrides of every benchmark's ``--quick`` training: a check that it runs, not a figure."""


def requested_config(config: Union[str, Path], overrides: Sequence[str], run_dir: Path) -> dict:
    """The config a run of `config` with `overrides` into `run_dir` trains with, as plain data (its
    ``train_config.yaml`` holds the same); bad overrides fail here, before anything runs."""
    return load_config(config, [*overrides, f"output_dir={run_dir}"]).as_dict()


def same_run(saved: Any, requested: Mapping[str, Any]) -> bool:
    """Whether a saved run config (``train_config.yaml``, as read by ``yaml.safe_load``) describes the requested run
    (`requested_config`).

    The saved settings are read through `TrainConfig` over the requested ones, so the typed config decides what they
    mean (``1e-3`` or ``"1e-3"``, one metric or a list of one): the run is the same when that config equals the
    requested one, `NOT_COMPARED` (where the run lives and how it was resumed) left out. A saved key that is no
    longer a field, or a value no longer valid, is another run. A top-level field or a ``data`` key the file does not
    record keeps its requested value: it was added to the config format, or to a recipe's data section, after the
    run was trained, so runs trained before stay reusable. ``method_args`` is compared whole: a key missing there is
    PEFT's default, not an older format.
    """
    if not isinstance(saved, Mapping):
        return False
    merged = {**requested, **{key: value for key, value in saved.items() if key not in NOT_COMPARED}}
    if isinstance(saved.get("data"), Mapping):
        merged["data"] = {**requested["data"], **saved["data"]}
    try:
        return TrainConfig(**merged).as_dict() == dict(requested)
    except InputError:
        return False


def finished_run(run_dir: Path, requested: Mapping[str, Any]) -> Optional[dict]:
    """The ``results.json`` of the run in `run_dir` when it is done and `same_run` as `requested`, else `None`.

    A run saved with ``mixed_precision: auto`` ran in the precision its machine chose (``results.json`` says which):
    it matches a request for ``auto``, or for that precision by name (``no`` matches an ``auto`` run that ran in
    fp32, never one that ran in bf16)."""
    results, saved = run_dir / RESULTS_FILE, run_dir / CONFIG_FILE
    if not (results.is_file() and saved.is_file()):
        return None
    config, result = yaml.safe_load(saved.read_text()), json.loads(results.read_text())
    if (isinstance(config, Mapping) and config.get("mixed_precision") == "auto"
            and requested.get("mixed_precision") != "auto"):
        config = {**config, "mixed_precision": result.get("mixed_precision", "auto")}
    return result if same_run(config, requested) else None


def finished_dir(requested: Mapping[str, Any], *directories: Path) -> Optional[Path]:
    """The first of `directories` (records first, then run directories) holding the finished run `requested`
    (`finished_run`); `None` when none does."""
    return next((d for d in directories if finished_run(d, requested) is not None), None)


def keep_record(run_dir: Path, records: Path, extra: Sequence[str] = ()) -> Path:
    """Copy what a report reads of the finished run in `run_dir` to ``records/<run>`` and return that directory.

    The record holds ``results.json``, ``train_config.yaml``, ``metrics.jsonl`` without its ``train`` records, the
    files named in `extra` that the run directory has (a benchmark's own evaluations), and the CPU that finished
    it (``machine.json``). It is written aside and renamed into place, so an interrupted copy leaves no record.
    """
    target, scratch = records / run_dir.name, records / f".{run_dir.name}.partial"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    for name in (RESULTS_FILE, CONFIG_FILE, *extra):
        if (run_dir / name).is_file():
            shutil.copy2(run_dir / name, scratch / name)
    kept = [line for line in (run_dir / METRICS_FILE).read_text().splitlines() if json.loads(line)["type"] != "train"]
    (scratch / METRICS_FILE).write_text("\n".join(kept) + "\n")
    (scratch / MACHINE_FILE).write_text(json.dumps({"cpu_model": cpu_model()}) + "\n")
    shutil.rmtree(target, ignore_errors=True)
    scratch.rename(target)
    return target


def load_trained(run_dir: Path):
    """The model a finished run trained (its adapter, or its full checkpoint, on the backbone loaded as in training)
    and its tokenizer, in evaluation mode."""
    config = yaml.safe_load((Path(run_dir) / CONFIG_FILE).read_text())
    base, tokenizer = load_backbone(config["model"], task=config["task"], num_labels=config.get("num_labels"),
                                    load_in_8bit=config["load_in_8bit"], load_in_4bit=config["load_in_4bit"])
    return load_adapter(base, Path(run_dir) / "adapter").eval(), tokenizer


def run_recipe(
    config: Union[str, Path],
    overrides: Sequence[str],
    run_dir: Path,
    *,
    recipe: str,
    processes: int = 1,
    reuse: bool = True,
    resume: bool = False,
    log: Optional[Path] = None,
    env: Optional[Mapping[str, str]] = None,
) -> dict:
    """Train ``recipes/<recipe>`` with `config` and `overrides` into `run_dir` and return its ``results.json``.

    Args:
        config: The recipe's YAML config file.
        overrides: ``key=value`` overrides (``output_dir`` is set to `run_dir`).
        run_dir: The run's directory.
        recipe: The recipe script under ``recipes/``, e.g. ``"selfask_sft.py"``.
        processes: 2: ``accelerate launch`` on 2 CPU processes; 1: one plain process (one GPU process under
            ``accelerate launch`` wherever CUDA is available, either way): see `launch_command`.
        reuse: Return the results of a run already done in `run_dir` (`finished_run`) instead of training again.
        resume: Continue an interrupted run of the same config (no ``train_config.yaml`` yet, and the
            ``run_request.yaml`` written when it started equals the request) with ``resume_from=latest``; otherwise,
            and always when `run_dir` holds a run of another config, the run starts from an empty directory.
        log: Write the run's output there (opened after `run_dir` is emptied, so it may lie inside); default: this
            process's output, the command line printed first.
        env: More environment variables for the run (e.g. ``OMP_NUM_THREADS=1`` for runs side by side).

    Raises:
        RuntimeError: the run failed (its exit status and where its output is).
    """
    run_dir = Path(run_dir).resolve()
    requested = requested_config(config, overrides, run_dir)
    if reuse:
        done = finished_run(run_dir, requested)
        if done is not None:
            return done
    request = run_dir / REQUEST_FILE
    continuing = (resume and reuse and not (run_dir / CONFIG_FILE).is_file() and request.is_file()
                  and same_run(yaml.safe_load(request.read_text()), requested))
    if not continuing:
        shutil.rmtree(run_dir, ignore_errors=True)  # training refuses a directory with another run's checkpoints
    run_dir.mkdir(parents=True, exist_ok=True)
    request.write_text(yaml.safe_dump(requested, sort_keys=False))
    command, run_env = launch_command(
        REPO / "recipes" / recipe, config,
        [*overrides, f"output_dir={run_dir}", *(["resume_from=latest"] if continuing else [])], processes,
    )
    run_env.update(env or {})
    if log is None:
        print("$", shlex.join(command), flush=True)
        finished = subprocess.run(command, cwd=REPO, env=run_env)
    else:
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as out:
            finished = subprocess.run(command, cwd=REPO, env=run_env, stdout=out, stderr=out)
    if finished.returncode != 0:
        where = f"see {log}" if log is not None else "its output is above"
        raise RuntimeError(f"training {run_dir.name} failed (exit {finished.returncode}); {where}")
    return json.loads((run_dir / RESULTS_FILE).read_text())
