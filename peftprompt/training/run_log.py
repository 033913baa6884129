"""The run's log: lines on the main process (through tqdm, so the progress bar stays intact) and JSON records in
``metrics.jsonl``."""

from __future__ import annotations

import json
import logging
import resource
import sys
from pathlib import Path
from typing import Any, Optional

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


class RunLog:
    """Log lines and records of one run; only the main process writes. `fresh` starts a new ``metrics.jsonl``."""

    def __init__(self, accelerator: Accelerator, path: Path, fresh: bool) -> None:
        self.main = accelerator.is_main_process
        self.path = path
        self.progress: Optional[tqdm] = None
        if self.main:
            path.parent.mkdir(parents=True, exist_ok=True)
            if fresh and path.exists():
                path.unlink()

    def info(self, message: str) -> None:
        if not self.main:
            return
        logger.info(message)
        if self.progress is not None:
            self.progress.write(message, file=sys.stdout)
        else:
            print(message, flush=True)

    def record(self, record: dict) -> None:
        if self.main:
            with self.path.open("a") as f:
                f.write(json.dumps(record, default=_json_default) + "\n")
                f.flush()


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: CUDA max allocated on a GPU, else the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
