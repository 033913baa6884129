"""Methods that are optimiser recipes on a plain LoRA adapter: LoRA+ and LoRA-FA.

- ``loraplus`` (LoRA+, https://arxiv.org/abs/2402.12354): ``B`` learns ``loraplus_lr_ratio`` (default 16) times
  faster than ``A``; PEFT's ``create_loraplus_optimizer`` builds the parameter groups.
- ``lora_fa`` (LoRA-FA, https://arxiv.org/abs/2308.03303): ``A`` stays frozen at its random initialisation (so
  only ``B`` trains and the activations for ``A``'s gradient are never needed) and ``B``'s gradient is projected
  as the paper derives; PEFT's ``create_lorafa_optimizer`` builds it.

`peftprompt.training.make_optimizer` calls `method_optimizer` when the config's method is one of them, so a
recipe only names the method. Outside the training engine:

```py
>>> model = attach(backbone, "loraplus")
>>> optimizer = method_optimizer(model, "loraplus", lr=2e-4)
```
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from peft import PeftModel
from peft.optimizers import create_loraplus_optimizer, create_lorafa_optimizer

from ..errors import InputError

# method -> arguments of the optimiser recipe (``method_args`` keys that are no field of the LoRA config), defaults
OPTIMIZER_ARGS: dict[str, dict[str, Any]] = {"loraplus": {"loraplus_lr_ratio": 16.0}, "lora_fa": {}}


def freeze_lora_a(model: PeftModel) -> None:
    """Freeze every LoRA ``A`` matrix of `model` (LoRA-FA trains ``B`` only)."""
    for name, parameter in model.named_parameters():
        if ".lora_A." in name:
            parameter.requires_grad_(False)


def method_optimizer(
    model: torch.nn.Module,
    method: str,
    lr: float,
    weight_decay: float = 0.0,
    optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW,
    **method_args: Any,
) -> Optional[torch.optim.Optimizer]:
    """The optimiser that `method` prescribes for `model` (a `PeftModel` with a LoRA adapter), or None when the
    method leaves the optimiser to the caller.

    `method_args` may hold the recipe's own arguments (``loraplus_lr_ratio``); any other key is ignored (it
    belongs to the adapter config). LoRA-FA has its own AdamW variant, so `optimizer_cls` applies to LoRA+ only.
    """
    if method not in OPTIMIZER_ARGS:
        return None
    if not isinstance(model, PeftModel) or model.active_peft_config.peft_type != "LORA":
        raise InputError(f"method {method!r} is an optimiser recipe for a LoRA adapter; the model has none",
                         field="method")
    args = {**OPTIMIZER_ARGS[method], **{k: v for k, v in method_args.items() if k in OPTIMIZER_ARGS[method]}}
    if method == "loraplus":
        return create_loraplus_optimizer(model, optimizer_cls, lr=lr, loraplus_weight_decay=weight_decay, **args)
    config = model.active_peft_config
    return create_lorafa_optimizer(model, r=config.r, lora_alpha=config.lora_alpha, lr=lr, weight_decay=weight_decay)
