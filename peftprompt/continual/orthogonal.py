"""O-LoRA's orthogonality penalty: each task's LoRA learns in a subspace orthogonal to the earlier tasks' LoRAs.

O-LoRA (Wang et al., 2023, "Orthogonal Subspace Learning for Language Model Continual Learning") keeps every
finished task's LoRA frozen and adds to the new task's loss ``weight x sum over layers of |A_old @ A_new^T|`` (the
L1 norm of the overlap of the down-projections; the authors' weight is 0.5). Here the finished LoRAs are merged into
the backbone, which gives the same forward pass as keeping them frozen and summed, and only their ``lora_A``
matrices are remembered:

```py
penalty = OrthogonalLoRAPenalty(weight=0.5)
train(config, model, tokenizer, task_1, collator)                  # no earlier task: the penalty is 0
penalty.remember(model)                                            # task 1's A matrices, per layer
model = attach(model.merge_and_unload(), "lora", task="seq_cls")   # a fresh LoRA for task 2
train(config, model, tokenizer, task_2, collator, regulariser=penalty)
```
"""

from __future__ import annotations

from typing import Iterator

import torch

LORA_A = ".lora_A."


def lora_down_projections(model, trainable_only: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """``(layer, weight)`` of every LoRA ``lora_A`` matrix of `model` (shape ``(r, in_features)``), the layer named by
    its path in the backbone (the same before and after a merge, under a DDP wrapper or not)."""
    for name, parameter in model.named_parameters():
        if LORA_A in name and (parameter.requires_grad or not trainable_only):
            layer = name.split(LORA_A)[0].removeprefix("module.")
            yield layer.split("base_model.model.", 1)[-1], parameter


class OrthogonalLoRAPenalty:
    """``weight x sum over layers of |A_earlier @ A_current^T|`` (summed absolute entries), the earlier tasks' ``A``
    stacked per layer by `remember`; a training `regulariser` (``penalty(model)``).

    Args:
        weight: The penalty's weight against the mean task loss (O-LoRA's lambda_1).
    """

    def __init__(self, weight: float = 0.5):
        self.weight = weight
        self.earlier: dict[str, torch.Tensor] = {}

    def remember(self, model) -> None:
        """Stack the trainable ``lora_A`` matrices of `model` (a finished task's) onto the earlier tasks'."""
        for layer, weight in lora_down_projections(model):
            done = weight.detach().float().cpu().clone()
            self.earlier[layer] = done if layer not in self.earlier else torch.cat([self.earlier[layer], done])

    def __call__(self, model) -> torch.Tensor:
        total = None
        for layer, weight in lora_down_projections(model):
            earlier = self.earlier.get(layer)
            if earlier is None:
                continue
            overlap = (earlier.to(weight.device) @ weight.float().T).abs().sum()
            total = overlap if total is None else total + overlap
        if total is None:
            return torch.zeros(())
        return self.weight * total
