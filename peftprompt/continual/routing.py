"""Route an input to the adapter of the task it most likely belongs to, when the task is not given.

`CentroidRouter` keeps one centroid per task: the normalised mean sentence embedding (`SentenceEncoder`, the frozen
backbone mean-pooled) of some of the task's training texts; an input goes to the task whose centroid is the most
similar (cosine). Adding a task never changes the earlier centroids, so the router learns continually too.

```py
>>> encoder = SentenceEncoder("minilm")
>>> router = CentroidRouter()
>>> router.add_task("agnews", encoder.encode(agnews_texts))
>>> router.add_task("yelp", encoder.encode(yelp_texts))
>>> router.route(encoder.encode(["Title: Stocks fall\\nText: ..."]))
['agnews']
```
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Union

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file


class CentroidRouter:
    """Nearest-centroid task routing over sentence embeddings.

    Attributes:
        tasks (`list[str]`): The tasks added, in order.
        centroids (`torch.Tensor`): ``(len(tasks), dim)``, each row of norm 1.
    """

    def __init__(self):
        self.tasks: list[str] = []
        self.centroids = torch.empty(0, 0)

    def add_task(self, task: str, embeddings: torch.Tensor) -> None:
        """Add `task` with the centroid of `embeddings` (``(n, dim)``, n >= 1)."""
        if task in self.tasks:
            raise ValueError(f"task {task!r} was already added to the router")
        if embeddings.ndim != 2 or len(embeddings) == 0:
            raise ValueError(f"embeddings of task {task!r} must have shape (n >= 1, dim), got {tuple(embeddings.shape)}")
        if self.tasks and embeddings.shape[1] != self.centroids.shape[1]:
            raise ValueError(f"embeddings of task {task!r} have dimension {embeddings.shape[1]}, the router's are "
                             f"{self.centroids.shape[1]}")
        centroid = torch.nn.functional.normalize(embeddings.float().mean(0), dim=0)
        self.centroids = centroid[None] if not self.tasks else torch.cat([self.centroids, centroid[None]])
        self.tasks.append(task)

    def route(self, embeddings: torch.Tensor) -> list[str]:
        """The task of the most similar centroid for each row of `embeddings` (``(n, dim)``)."""
        if not self.tasks:
            raise ValueError("the router has no task yet: add_task first")
        normalised = torch.nn.functional.normalize(embeddings.float(), dim=-1)
        return [self.tasks[i] for i in (normalised @ self.centroids.T).argmax(-1).tolist()]

    def save(self, path: Union[str, Path]) -> Path:
        """Write the centroids and task names to the safetensors file `path`."""
        save_file({"centroids": self.centroids.contiguous()}, str(path), metadata={"tasks": json.dumps(self.tasks)})
        return Path(path)

    @classmethod
    def load(cls, path: Union[str, Path]) -> "CentroidRouter":
        """A router saved by `save`."""
        with safe_open(str(path), framework="pt") as f:
            tasks = json.loads(f.metadata()["tasks"])
        router = cls()
        router.tasks, router.centroids = tasks, load_file(str(path))["centroids"]
        return router

