"""Training: `TrainConfig` (YAML + ``key=value`` overrides) and `train()` on Accelerate.

```py
from peftprompt.training import build_model, load_config, train

config = load_config("run.yaml", ["learning_rate=5e-4"])
model, tokenizer = build_model(config)
result = train(config, model, tokenizer, train_dataset, collator, eval_dataset)
```
"""

from .config import TrainConfig, cpu_bf16_flags, load_config, resolve_frozen_dtype, resolve_mixed_precision
from .loop import (
    TrainResult,
    build_model,
    count_loss_items,
    default_compute_metrics,
    distributed_state,
    evaluate_loss,
    latest_checkpoint,
    list_checkpoints,
    make_optimizer,
    prepare_backbone,
    train,
)

__all__ = [
    "TrainConfig",
    "TrainResult",
    "build_model",
    "count_loss_items",
    "cpu_bf16_flags",
    "default_compute_metrics",
    "distributed_state",
    "evaluate_loss",
    "latest_checkpoint",
    "list_checkpoints",
    "load_config",
    "make_optimizer",
    "prepare_backbone",
    "resolve_frozen_dtype",
    "resolve_mixed_precision",
    "train",
]
