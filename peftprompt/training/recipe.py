"""What every recipe script shares: read ``--config FILE key=value ...``, ship the trained adapter, and the
command line that launches a recipe.

A recipe is a thin script (``recipes/<name>.py``) that builds its data and calls `train`; this module gives it
the command line and the end of the run (model card and ``results.json``), so all recipes behave the same:

    accelerate launch recipes/sst2_classification.py --config recipes/configs/minilm/sst2_lora.yaml max_steps=50

Scripts that start a recipe themselves (``recipes/demo_selfask.py``, the benchmarks) build that command with
`launch_command`. A recipe script ends with ``run_recipe(main)``: a run that cannot go on (a save that failed, a
SIGTERM) ends every process with the same one line and a non-zero status, not a traceback per process.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from ..atomic import write_file_atomically
from ..errors import InputError, RunError
from .collective import shared_outcome
from .config import TrainConfig, load_config
from .data_config import DataSection
from .model_setup import distributed_state
from .shipping import write_model_card
from .state import TrainResult


def parse_recipe_args(description: str, argv: Sequence[str] | None = None,
                      data: type[DataSection] | None = None) -> TrainConfig:
    """Parse ``--config FILE`` and ``key=value`` overrides; a bad config exits with one line and status 2.

    `data` is the data section the recipe reads (`peftprompt.training.data_config`): a config whose section is
    another (a continual recipe given an SST-2 config) is a bad config too. Also quiets transformers' per-load
    reports (a fresh task head is expected in a recipe).
    """
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML file (recipes/configs/...)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="override config fields, e.g. max_steps=20")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        if data is not None and not isinstance(config.data, data):
            raise InputError(f"this recipe reads a {data.kind} data section (picked by {data.picked_by}), but the "
                             f"config's is a {config.data.kind} one (task {config.task})", file=args.config,
                             field="data")
    except InputError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    return config


def ship(result: TrainResult, metrics: dict, datasets: Sequence[str]) -> Optional[Path]:
    """End a recipe: the main process writes the adapter's model card and ``output_dir/results.json``, then every
    process waits for it and the process group is closed (what ``Accelerator.end_training`` does). Call it on every
    process; returns the card path on the main process, ``None`` on the others.

    Closing the group matters: a launched process that exits with its gloo group still open can abort
    (``terminate called without an active exception``) and fail the whole launch after the adapter was saved.
    """
    state = distributed_state()
    card = shared_outcome(lambda: _write_card_and_results(result, metrics, datasets), main_only=True,
                          what="model card and results of", target=result.config.output_dir)
    state.destroy_process_group()
    return card if state.is_main_process else None


def run_recipe(main: Callable[[], object]) -> None:
    """Run a recipe script's `main` (``if __name__ == "__main__": run_recipe(main)``).

    An error that says the run cannot go on, raised with the same message on every process, ends each process with
    that one line on stderr (``{script}: error: {message}``), no traceback, and a non-zero status: a `RunError`
    (`SaveError`: a checkpoint or adapter that could not be written, status 1; `TrainingInterrupted`: SIGTERM, a
    checkpoint written, status 143) or an `InputError` found once training started (status 2, as for a bad config).
    A process of a process group leaves at once (`os._exit`, its output flushed): destroying the group can hang when
    another process has left first (pytorch/pytorch#75097), and an interpreter that shuts down with gloo's threads
    alive can abort; everything the run writes is closed by then.
    """
    try:
        main()
    except (RunError, InputError) as err:
        status = err.exit_code if isinstance(err, RunError) else 2
        # torchrun ends the other processes with SIGTERM once one has exited: this one is exiting already, with its
        # own status (the launcher still SIGKILLs a process that has not exited 30 s later)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        # one write, starting on a line of its own: processes sharing a terminal or pipe never run two lines together
        sys.stderr.flush()
        os.write(sys.stderr.fileno(), f"\n{Path(sys.argv[0]).name}: error: {err}\n".encode())
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            logging.shutdown()
            sys.stdout.flush()
            os._exit(status)
        sys.exit(status)


def _write_card_and_results(result: TrainResult, metrics: dict, datasets: Sequence[str]) -> Path:
    config = result.config
    parameters = result.parameters
    card = write_model_card(
        result.adapter_dir,
        base_model=config.model,
        method=config.method,
        task=config.task,
        trainable_params=parameters.trainable_params,
        total_params=parameters.total_params,
        adapter_bytes=parameters.adapter_bytes or 0,
        metrics=metrics,
        command=result.command,
        config=config.as_dict(),
        datasets=list(datasets),
    )
    results = {
        "method": config.method,
        "model": config.model,
        "task": config.task,
        **parameters.as_dict(),
        **metrics,
        "global_step": result.global_step,
        "train_seconds": result.train_seconds,
        "step_seconds": result.step_seconds,
        "peak_memory_mb": result.peak_memory_mb,
        "world_size": result.world_size,
        "mixed_precision": result.mixed_precision,
        "command": result.command,
    }
    text = json.dumps(results, indent=2, default=str) + "\n"
    write_file_atomically(Path(config.output_dir) / "results.json", lambda f: f.write(text))
    print(f"adapter: {result.adapter_dir} ({parameters.adapter_bytes:,} bytes); model card: {card}", file=sys.stderr)
    return card


# The accelerate configs `launch_command` uses, in the ``accelerate/`` folder next to the recipe scripts.
SINGLE_GPU_CONFIG = "single_gpu.yaml"
CPU_2PROC_CONFIG = "cpu_2proc.yaml"


def launch_command(
    recipe: str | os.PathLike, config: str | os.PathLike, overrides: Sequence[str] = (), processes: int = 2
) -> tuple[list[str], dict[str, str]]:
    """The command line that runs `recipe` (a ``recipes/*.py`` script) with ``--config`` `config` and the
    ``key=value`` `overrides`, and the environment to run it in (``os.environ`` plus what the launch needs).

    - CUDA available: ``accelerate launch --config_file recipes/accelerate/single_gpu.yaml`` (one GPU process).
    - CPU, ``processes=2``: ``accelerate launch --config_file recipes/accelerate/cpu_2proc.yaml`` with
      ``ACCELERATE_USE_CPU=1`` (the launcher does not pass ``use_cpu`` on: this makes torchrun's two processes
      pick the CPU and gloo) and ``OMP_NUM_THREADS=1`` (one core each; more threads oversubscribe a 2-core host).
    - CPU, ``processes=1``: the recipe in this Python interpreter, one process.

    Every launch runs offline (``HF_HUB_OFFLINE=1``: the backbones are local) with ``TOKENIZERS_PARALLELISM=false``.
    """
    if processes not in (1, 2):
        raise InputError(f"processes must be 1 or 2, got {processes}", field="processes")
    recipe = Path(recipe)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    script = [str(recipe), "--config", str(config), *overrides]
    if torch.cuda.is_available():
        accelerate_config = SINGLE_GPU_CONFIG
    elif processes == 2:
        accelerate_config = CPU_2PROC_CONFIG
        env.update(ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    else:
        return [sys.executable, *script], env
    accelerate = Path(sys.executable).with_name("accelerate")
    config_file = recipe.resolve().parent / "accelerate" / accelerate_config
    return [str(accelerate), "launch", "--config_file", str(config_file), *script], env
