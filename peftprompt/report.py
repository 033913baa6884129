"""Trainable-parameter report: how much of a model an adapter trains, and how big it is on disk."""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass
from typing import Optional, Union

from peft import PeftModel
from torch import nn

from .adapters import directory_bytes, save_adapter
from .methods import method_name


@dataclass
class ParameterReport:
    """Trainable and total parameters of a model, and the on-disk size of what `save_adapter` writes.

    `refused` is the reason a method does not apply to the model (then nothing was counted).
    """

    method: str
    trainable_params: int
    total_params: int
    adapter_bytes: Optional[int] = None
    refused: Optional[str] = None

    @property
    def trainable_pct(self) -> float:
        return 100.0 * self.trainable_params / self.total_params if self.total_params else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "trainable_pct": self.trainable_pct}


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """`(trainable, total)` parameter counts; 4-bit weights count as two parameters per stored byte, as in PEFT."""
    if isinstance(model, PeftModel):
        return model.get_nb_trainable_parameters()
    trainable = total = 0
    for parameter in model.parameters():
        numel = parameter.numel()
        if parameter.__class__.__name__ == "Params4bit":
            numel *= 2
        total += numel
        trainable += numel if parameter.requires_grad else 0
    return trainable, total


def parameter_report(
    model: Union[PeftModel, nn.Module], method: Optional[str] = None, measure_size: bool = True
) -> ParameterReport:
    """Count `model`'s parameters and, if `measure_size`, save it to a temporary directory to measure its size.

    `method` defaults to the `peftprompt.METHODS` name of the model's active adapter, as its config tells it
    (``"full"`` for a plain model; ``"lora"`` for the presets that differ from LoRA only in their targets or their
    optimiser).
    """
    if method is None:
        method = method_name(model.active_peft_config) if isinstance(model, PeftModel) else "full"
    trainable, total = count_parameters(model)
    size = None
    if measure_size:
        with tempfile.TemporaryDirectory() as tmp:
            size = directory_bytes(save_adapter(model, tmp))
    return ParameterReport(method, trainable, total, size)


def format_bytes(n: Optional[int]) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def markdown_table(reports: list[ParameterReport]) -> str:
    """A Markdown table of reports: method, trainable, total, %, adapter size (a refused method: the reason)."""
    lines = ["| method | trainable params | total params | trainable % | adapter size |", "|---|---:|---:|---:|---:|"]
    for r in reports:
        if r.refused is not None:
            reason = r.refused.replace("|", "\\|")  # a pipe would end the cell
            lines.append(f"| {r.method} | refused: {reason} | | | |")
            continue
        lines.append(
            f"| {r.method} | {r.trainable_params:,} | {r.total_params:,} | {r.trainable_pct:.4f} | "
            f"{format_bytes(r.adapter_bytes)} |"
        )
    return "\n".join(lines)
