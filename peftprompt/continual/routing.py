"""Route an input to the adapter of the task it most likely belongs to, when the task is not given.

Both routers read embeddings of the frozen backbone (`SentenceEncoder.encode`, in the continual learner with
``layers``: every layer's mean-pooled state, which keeps a text's form as well as its meaning) and learn task by task
(`add_task`), which is all a continual learner can offer them:

- `LinearRouter` keeps the (normalised, float16) embeddings of some of each task's training texts as its memory and
  refits a softmax regression over the tasks whenever one is added;
- `CentroidRouter` keeps one centroid per task (the normalised mean embedding) and picks the most similar one
  (cosine); adding a task never changes the earlier centroids.

One centroid per task cannot follow a task whose texts spread over several topics: DBpedia's entity descriptions
drift to AG News's centroid once that task arrives. The linear router learns where the tasks part.

```py
>>> encoder = SentenceEncoder("minilm")
>>> router = LinearRouter()
>>> router.add_task("agnews", encoder.encode(agnews_texts))
>>> router.add_task("yelp", encoder.encode(yelp_texts))
>>> router.route(encoder.encode(["Title: Stocks fall\\nText: ..."]))
['agnews']
>>> load_router(router.save("router.safetensors")).tasks
['agnews', 'yelp']
```
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Union

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file


class Router:
    """Task routing over sentence embeddings; a subclass learns in `_learn`, scores in `_scores` and keeps what it
    learned in the tensors named by `STATE` (saved by `save`, restored by `load`).

    Attributes:
        tasks (`list[str]`): The tasks added, in order.
    """

    STATE: tuple[str, ...] = ()

    def __init__(self):
        self.tasks: list[str] = []
        self.dim: int = 0

    def add_task(self, task: str, embeddings: torch.Tensor) -> None:
        """Add `task`, learned from `embeddings` (``(n, dim)``, n >= 1) of some of its texts."""
        if task in self.tasks:
            raise ValueError(f"task {task!r} was already added to the router")
        if embeddings.ndim != 2 or len(embeddings) == 0:
            raise ValueError(f"embeddings of task {task!r} must have shape (n >= 1, dim), got "
                             f"{tuple(embeddings.shape)}")
        if self.tasks and embeddings.shape[1] != self.dim:
            raise ValueError(f"embeddings of task {task!r} have dimension {embeddings.shape[1]}, the router's are "
                             f"{self.dim}")
        self.dim = embeddings.shape[1]
        self._learn(torch.nn.functional.normalize(embeddings.float(), dim=-1))
        self.tasks.append(task)

    def route(self, embeddings: torch.Tensor) -> list[str]:
        """The task picked for each row of `embeddings` (``(n, dim)``)."""
        if not self.tasks:
            raise ValueError("the router has no task yet: add_task first")
        scores = self._scores(torch.nn.functional.normalize(embeddings.float(), dim=-1))
        return [self.tasks[i] for i in scores.argmax(-1).tolist()]

    def _learn(self, embeddings: torch.Tensor) -> None:
        raise NotImplementedError

    def _scores(self, embeddings: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def save(self, path: Union[str, Path]) -> Path:
        """Write what the router learned and its task names to the safetensors file `path`."""
        save_file({name: getattr(self, name).contiguous() for name in self.STATE}, str(path),
                  metadata={"tasks": json.dumps(self.tasks), "router": type(self).__name__})
        return Path(path)

    @classmethod
    def load(cls, path: Union[str, Path]) -> "Router":
        """A router of this class saved by `save`."""
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata()
        kind = metadata.get("router", CentroidRouter.__name__)  # files written before the router kinds: centroids
        if kind != cls.__name__:
            raise ValueError(f"{path} holds a {kind}, not a {cls.__name__}: read it with load_router")
        router = cls()
        router.tasks = json.loads(metadata["tasks"])
        for name, tensor in load_file(str(path)).items():
            setattr(router, name, tensor)
        router.dim = getattr(router, router.STATE[0]).shape[-1]
        return router


class CentroidRouter(Router):
    """Nearest-centroid task routing: one normalised mean embedding per task, the most similar (cosine) wins.

    Attributes:
        centroids (`torch.Tensor`): ``(len(tasks), dim)``, each row of norm 1.
    """

    STATE = ("centroids",)

    def __init__(self):
        super().__init__()
        self.centroids = torch.empty(0, 0)

    def _learn(self, embeddings: torch.Tensor) -> None:
        centroid = torch.nn.functional.normalize(embeddings.mean(0), dim=0)[None]
        self.centroids = centroid if not self.tasks else torch.cat([self.centroids, centroid])

    def _scores(self, embeddings: torch.Tensor) -> torch.Tensor:
        return embeddings @ self.centroids.T


class LinearRouter(Router):
    """A softmax regression from embeddings to tasks, refitted on every stored embedding when a task is added
    (L-BFGS from zero weights, L2 `weight_decay`: deterministic, no random state used).

    Args:
        weight_decay: The L2 penalty on the weights.
        max_iter: L-BFGS iterations of each refit.

    Attributes:
        memory (`torch.Tensor`): ``(n, dim)``, float16: every stored embedding, normalised; `owners` ``(n,)``: its
            task index.
        weight (`torch.Tensor`), bias (`torch.Tensor`): ``(len(tasks), dim)`` and ``(len(tasks),)``.
    """

    STATE = ("memory", "owners", "weight", "bias")

    def __init__(self, weight_decay: float = 1e-4, max_iter: int = 200):
        super().__init__()
        self.weight_decay, self.max_iter = weight_decay, max_iter
        self.memory, self.owners = torch.empty(0, 0), torch.empty(0, dtype=torch.long)
        self.weight, self.bias = torch.empty(0, 0), torch.empty(0)

    def _learn(self, embeddings: torch.Tensor) -> None:
        owner = torch.full((len(embeddings),), len(self.tasks), dtype=torch.long)
        embeddings = embeddings.half()  # the memory at half the bytes; the fit reads it in float32
        self.memory = embeddings if not self.tasks else torch.cat([self.memory, embeddings])
        self.owners = owner if not self.tasks else torch.cat([self.owners, owner])
        self._fit(len(self.tasks) + 1)

    def _fit(self, n_tasks: int) -> None:
        memory = self.memory.float()
        weight = torch.zeros(n_tasks, memory.shape[1], requires_grad=True)
        bias = torch.zeros(n_tasks, requires_grad=True)
        if n_tasks > 1:
            optimizer = torch.optim.LBFGS([weight, bias], max_iter=self.max_iter, line_search_fn="strong_wolfe")

            def loss() -> torch.Tensor:
                optimizer.zero_grad()
                value = (torch.nn.functional.cross_entropy(memory @ weight.T + bias, self.owners)
                         + self.weight_decay * weight.pow(2).sum())
                value.backward()
                return value

            with torch.enable_grad():
                optimizer.step(loss)
        self.weight, self.bias = weight.detach(), bias.detach()

    def _scores(self, embeddings: torch.Tensor) -> torch.Tensor:
        return embeddings @ self.weight.T + self.bias


ROUTERS: dict[str, type[Router]] = {"linear": LinearRouter, "centroid": CentroidRouter}


def load_router(path: Union[str, Path]) -> Router:
    """The router saved in `path`, of whichever kind."""
    with safe_open(str(path), framework="pt") as f:
        kind = f.metadata().get("router", CentroidRouter.__name__)
    classes = {cls.__name__: cls for cls in ROUTERS.values()}
    if kind not in classes:
        raise ValueError(f"{path} holds an unknown router {kind!r} (known: {', '.join(classes)})")
    return classes[kind].load(path)
