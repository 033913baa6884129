"""Silence the library messages that are not the user's to act on, each matched by its exact source and text.

Installed once, by ``import peftprompt`` (before PEFT, and so bitsandbytes, is imported). Nothing else is hidden:
every other warning and log record reaches the user as before.

- bitsandbytes, when imported on a CPU with ``avx512_bf16``, tries the optional ``kernels`` package (hub kernels for
  its 4-bit CPU matmul) and logs ``Failed to load CPU gemm_4bit_forward from kernels-community: No module named
  'kernels' ...`` when it is absent. It then uses its own kernel; a run that uses no 4-bit backbone never needs one,
  and the message read as an error at the start of every run.
- transformers deprecates ``PreTrainedModel.is_gradient_checkpointing`` (FutureWarning: "Use
  `is_activation_checkpointing` instead"). PEFT reads the old name whenever it wraps a model (`get_peft_model`,
  `prepare_model_for_kbit_training`); peftprompt's own code reads the new one
  (`peftprompt.methods.prompt_learning.uses_gradient_checkpointing`).
"""

from __future__ import annotations

import logging
import warnings

BITSANDBYTES_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
BITSANDBYTES_KERNELS_MESSAGE = "Failed to load CPU gemm_4bit_forward from kernels-community"
GRADIENT_CHECKPOINTING_WARNING = r"`is_gradient_checkpointing` is deprecated and will be removed"

_installed = False


class DropMessages(logging.Filter):
    """A logger filter that drops the records whose message (before %-formatting) starts with `prefix`."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def install() -> None:
    """Install the filters (idempotent)."""
    global _installed
    if _installed:
        return
    logging.getLogger(BITSANDBYTES_CPU_LOGGER).addFilter(DropMessages(BITSANDBYTES_KERNELS_MESSAGE))
    warnings.filterwarnings(
        "ignore", message=GRADIENT_CHECKPOINTING_WARNING, category=FutureWarning,
        module=r"transformers\.modeling_utils",
    )
    _installed = True
