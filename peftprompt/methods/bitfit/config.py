"""Configuration of BitFit (bias-only fine-tuning) as a PEFT method."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from peft import PeftConfig

from ...compat import extend_peft_type

BITFIT = extend_peft_type("BITFIT")  # PeftType.BITFIT, the member register_peft_method needs


@dataclass
class BitFitConfig(PeftConfig):
    """
    Configuration of a [`BitFitModel`]: train only the bias terms of a frozen backbone (Ben Zaken et al., 2022,
    https://arxiv.org/abs/2106.10199).

    Each targeted layer gets a per-adapter bias delta, initialised at zero, that is added to the layer's output. The
    base weights and biases stay frozen, several named adapters can live on one model, and `merge_and_unload()` folds
    the delta into the base bias.

    Args:
        target_modules (`Optional[Union[List[str], str]]`):
            The modules that get a bias delta. `None` (the default) means every `nn.Linear`, `nn.LayerNorm` and
            GPT-2 `Conv1D` of the backbone that already has a bias (attention, feed-forward, LayerNorm). A list of names (exact or suffix
            match) or a regex selects modules explicitly; named `nn.Linear` layers without a bias (Llama-style
            projections) then get a delta too, and merging creates their bias.
        exclude_modules (`Optional[Union[List[str], str]]`):
            Modules never to target (names or a regex).
        modules_to_save (`Optional[List[str]]`):
            Modules apart from the bias deltas that are trained and saved in full, such as a new classification head.
    """

    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": "Modules to give a bias delta; None means every nn.Linear / nn.LayerNorm / Conv1D with a bias."
        },
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Modules never to target (names or a regex)."}
    )
    modules_to_save: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Modules trained and saved in full besides the bias deltas, e.g. ['classifier']."},
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = BITFIT
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
