"""Continual learning on a sequence of classification tasks: the tasks and their shared labels, the strategies
(sequential fine-tuning, experience replay, an adapter per task with routing, PEFT's OSF, O-LoRA-style orthogonal
LoRA, joint training), and the accuracy-matrix scores.

```py
from peftprompt.continual import ContinualLearner, load_task
from peftprompt.training import load_config

config = load_config("recipes/configs/minilm/continual_replay.yaml", ["data.tasks=[agnews, yelp, dbpedia]"])
options = config.data                                          # a ContinualData: strategy, tasks, their sizes
tasks = [load_task(name, options.train_per_task, options.test_per_task) for name in options.tasks]
result = ContinualLearner(config, tasks).run()
result.accuracy_matrix, result.scores                          # scores: average accuracy, backward transfer, forgetting
```
The recipe ``recipes/continual_classification.py`` runs this under ``accelerate launch``; the ``data`` section of
its configs is `ContinualData` (`peftprompt.training.data_config`).
"""

from ..training.data_config import STRATEGIES, ContinualData
from .learner import ContinualLearner, ContinualResult
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
    "ContinualData",
    "ContinualLearner",
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
