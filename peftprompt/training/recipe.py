"""What every recipe script shares: read ``--config FILE key=value ...`` and ship the trained adapter.

A recipe is a thin script (``recipes/<name>.py``) that builds its data and calls `train`; this module gives it
the command line and the end of the run (model card and ``results.json``), so all recipes behave the same:

    accelerate launch recipes/sst2_classification.py --config recipes/configs/minilm/sst2_lora.yaml max_steps=50
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from ..atomic import write_file_atomically
from .config import TrainConfig, load_config
from .loop import TrainResult, distributed_state
from .shipping import write_model_card


def parse_recipe_args(description: str, argv: Optional[Sequence[str]] = None) -> TrainConfig:
    """Parse ``--config FILE`` and ``key=value`` overrides; a bad config exits with one line and status 2.

    Also quiets transformers' per-load reports (a fresh task head is expected in a recipe).
    """
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML file (recipes/configs/...)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="override config fields, e.g. max_steps=20")
    args = parser.parse_args(argv)
    try:
        return load_config(args.config, args.overrides)
    except (ValueError, FileNotFoundError) as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")


def ship(result: TrainResult, metrics: dict, datasets: Sequence[str]) -> Optional[Path]:
    """On the main process: write the adapter's model card and ``output_dir/results.json``; return the card path."""
    if not distributed_state().is_main_process:
        return None
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
        "peak_memory_mb": result.peak_memory_mb,
        "world_size": result.world_size,
        "mixed_precision": result.mixed_precision,
        "command": result.command,
    }
    text = json.dumps(results, indent=2, default=str) + "\n"
    write_file_atomically(Path(config.output_dir) / "results.json", lambda f: f.write(text))
    print(f"adapter: {result.adapter_dir} ({parameters.adapter_bytes:,} bytes); model card: {card}", file=sys.stderr)
    return card
