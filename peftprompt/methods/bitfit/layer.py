"""BitFit layers: a per-adapter bias delta added to the output of a frozen `nn.Linear`, `nn.LayerNorm` or GPT-2's
`Conv1D`."""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from torch import nn
from transformers import Conv1D

from ...compat import BaseTunerLayer, check_adapters_to_merge, move_adapter_to_base_device

SUPPORTED_LAYERS = (nn.Linear, nn.LayerNorm, Conv1D)


def bias_size(layer: nn.Module) -> int:
    """Length of the bias vector of a supported layer (its output's last dimension)."""
    if isinstance(layer, nn.Linear):
        return layer.out_features
    if isinstance(layer, nn.LayerNorm):
        return layer.normalized_shape[-1]
    if isinstance(layer, Conv1D):
        return layer.nf
    raise TypeError(
        f"BitFit supports nn.Linear, nn.LayerNorm and Conv1D, got {type(layer).__name__}; remove it from "
        "target_modules"
    )


class BitFitLayer(nn.Module, BaseTunerLayer):
    """Wraps a frozen layer and adds ``bitfit_bias[adapter]`` to its output.

    The delta starts at zero, so a fresh adapter leaves the model's output unchanged. A layer that has no bias of
    its own (a Llama-style projection) can still be targeted by name: merging then creates the bias, and unmerging
    removes it again.
    """

    adapter_layer_names = ("bitfit_bias",)

    def __init__(self, base_layer: nn.Module, adapter_name: str, **kwargs: Any) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.bitfit_bias = nn.ParameterDict({})
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.out_features = bias_size(self.get_base_layer())
        self.has_base_bias = self.get_base_layer().bias is not None
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, inference_mode=kwargs.get("inference_mode", False))

    def update_layer(self, adapter_name: str, inference_mode: bool = False) -> None:
        self.bitfit_bias[adapter_name] = nn.Parameter(torch.zeros(self.out_features))
        move_adapter_to_base_device(self, adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Add the bias deltas of `adapter_names` (default: the active adapters) to the base layer's bias."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        base_layer = self.get_base_layer()
        for name in adapter_names:
            if name not in self.bitfit_bias:
                continue
            delta = self.bitfit_bias[name].detach()
            if base_layer.bias is None:
                merged = delta.clone()
            else:
                merged = base_layer.bias.data + delta.to(base_layer.bias.dtype)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"NaNs detected in the merged bias: the BitFit adapter {name!r} seems to be broken")
            if base_layer.bias is None:
                base_layer.bias = nn.Parameter(merged, requires_grad=False)
            else:
                base_layer.bias.data = merged
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Subtract every merged bias delta again, restoring the base layer's original bias."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        base_layer = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.bitfit_bias:
                base_layer.bias.data -= self.bitfit_bias[name].detach().to(base_layer.bias.dtype)
        if not self.has_base_bias:
            base_layer.bias = None

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        for name in self.active_adapters:
            if name in self.bitfit_bias:
                result = result + self.bitfit_bias[name].to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "bitfit." + super().__repr__()
