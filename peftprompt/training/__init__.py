"""Training: `TrainConfig` (YAML + ``key=value`` overrides; its ``data``, the recipe's typed section from
`peftprompt.training.data_config`) and the `Trainer` on Accelerate (`train()` runs it).

```py
from peftprompt.training import build_model, load_config, train

config = load_config("run.yaml", ["learning_rate=5e-4"])
model, tokenizer = build_model(config)
result = train(config, model, tokenizer, train_dataset, collator, eval_dataset)
```
"""

from .config import TrainConfig, cpu_bf16_flags, load_config, resolve_frozen_dtype, resolve_mixed_precision
from .checkpoints import latest_checkpoint, list_checkpoints
from .evaluation import default_compute_metrics, evaluate_loss
from .losses import count_loss_items
from .model_setup import build_model, distributed_state, make_optimizer, prepare_backbone
from .state import TrainerState, TrainResult
from .trainer import Trainer, train

__all__ = [
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "TrainerState",
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
