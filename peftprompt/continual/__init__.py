"""Continual learning on a sequence of classification tasks: the tasks and their shared labels, the strategies
(sequential fine-tuning, experience replay, an adapter per task with routing, PEFT's OSF, O-LoRA-style orthogonal
LoRA, joint training), and the accuracy-matrix scores.

```py
from peftprompt.continual import ContinualLearner, ContinualOptions, load_task

options = ContinualOptions(strategy="replay", tasks=["agnews", "yelp", "dbpedia"])
tasks = [load_task(name, options.train_per_task, options.test_per_task) for name in options.tasks]
result = ContinualLearner(config, options, tasks).run()      # config: a TrainConfig (method, rates, output_dir)
result.accuracy_matrix, result.scores                          # scores: average accuracy, backward transfer, forgetting
```
The recipe ``recipes/continual_classification.py`` runs this under ``accelerate launch``.
"""

from .learner import STRATEGIES, ContinualLearner, ContinualOptions, ContinualResult
from .metrics import average_accuracy, backward_transfer, continual_scores, forgetting
from .orthogonal import OrthogonalLoRAPenalty
from .replay import ReplayMemory
from .routing import ROUTERS, CentroidRouter, LinearRouter, Router, load_router
from .tasks import TASK_NAMES, ClassificationTask, label_space, load_task

__all__ = [
    "ROUTERS",
    "STRATEGIES",
    "TASK_NAMES",
    "CentroidRouter",
    "ClassificationTask",
    "ContinualLearner",
    "ContinualOptions",
    "ContinualResult",
    "LinearRouter",
    "OrthogonalLoRAPenalty",
    "ReplayMemory",
    "Router",
    "average_accuracy",
    "backward_transfer",
    "continual_scores",
    "forgetting",
    "label_space",
    "load_router",
    "load_task",
]
