"""What a method needs from the training loop beyond a gradient step: AdaLoRA's rank allocation.

AdaLoRA moves its rank budget between layers on a schedule of ``total_step`` steps, from importance scores of the
current gradients: ``update_and_allocate(step)`` has to run after every optimiser step, before the gradients are
cleared. `rank_allocation` gives the training engine that call, with the schedule set to the run's length.

```py
>>> allocate = rank_allocation(model, total_steps=300)   # None for every other method
>>> loss.backward(); optimizer.step(); allocate and allocate(step); optimizer.zero_grad()
```
"""

from __future__ import annotations

from typing import Callable, Optional

from peft import PeftModel
from torch import nn


def rank_allocation(model: nn.Module, total_steps: int) -> Optional[Callable[[int], None]]:
    """For a model with an active AdaLoRA adapter: set its ``total_step`` to `total_steps` and return the call to
    make after each optimiser step (with the step number); None for any other model."""
    if not isinstance(model, PeftModel) or model.active_peft_config.peft_type != "ADALORA":
        return None
    config = model.active_peft_config
    if config.tinit >= total_steps - config.tfinal:
        # too short a run for the schedule: train at the initial ranks rather than fail
        return None
    config.total_step = total_steps
    return model.base_model.update_and_allocate
