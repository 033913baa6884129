"""Continual learning on MiniLM: a sequence of classification tasks trained with one strategy, with the accuracy
matrix, backward transfer and forgetting.

    accelerate launch recipes/continual_classification.py --config recipes/configs/minilm/continual_replay.yaml [key=value ...]

The ``data`` section is `peftprompt.training.data_config.ContinualData`. The tasks (``data.tasks``, in training
order) come from ``../shared/data/cl_benchmark`` (AG News, Amazon, Yelp, DBpedia) and SST-2, with their fixed splits
and one 25-label space (`peftprompt.continual.tasks`); ``data.train_per_task`` / ``data.test_per_task`` rows of each
are sampled with the config's seed. ``data.strategy`` is one of ``sequential``, ``replay``
(``data.replay_fraction``), ``adapter_per_task`` (scored with the task given and routed: ``data.router_examples``),
``osf`` (method ``osf``, ``data.osf_effective_rank``), ``orthogonal_lora`` (O-LoRA-style, ``data.orthogonal_weight``)
or ``joint``; see `peftprompt.continual.learner`. Each task is one training run of the config's settings
(``num_epochs``, ``learning_rate``, ...) under ``output_dir/stages/``.

``results.json``: the strategy and tasks, ``accuracy_matrix`` (row i: after task i; ``null`` where not measured),
``average_accuracy``, ``backward_transfer``, ``forgetting``, per-task costs (``stages``: trainable parameters,
adapter bytes, training seconds), and for ``adapter_per_task`` the ``routed`` matrix, scores and routing accuracy.
"""

from __future__ import annotations

import json
from pathlib import Path

from peftprompt.atomic import write_file_atomically
from peftprompt.continual import ContinualData, ContinualLearner, load_task
from peftprompt.errors import InputError
from peftprompt.training import distributed_state
from peftprompt.training.recipe import parse_recipe_args, run_recipe


def main(argv=None) -> None:
    config = parse_recipe_args(__doc__, argv, data=ContinualData)
    options = config.data
    try:
        tasks = [load_task(name, options.train_per_task, options.test_per_task, seed=config.seed)
                 for name in options.tasks]
        learner = ContinualLearner(config, tasks)
        result = learner.run()
    except InputError as err:
        raise SystemExit(f"continual_classification: {err}") from None
    state = distributed_state()
    if state.is_main_process:
        output_dir = Path(config.output_dir)
        stages = result.stages
        results = {
            "method": config.method,
            "model": config.model,
            **result.as_dict(),
            **result.scores,
            "num_epochs": config.num_epochs,
            "learning_rate": config.learning_rate,
            "max_length": config.max_length,
            "train_per_task": options.train_per_task,
            "test_per_task": options.test_per_task,
            "replay_fraction": options.replay_fraction if options.strategy == "replay" else None,
            "router": ({"examples_per_task": options.router_examples, "layers": options.router_layers}
                       if options.strategy == "adapter_per_task" else None),
            "train_seconds": round(sum(stage["train_seconds"] for stage in stages), 2),
            "step_seconds": round(sum(stage["step_seconds"] for stage in stages), 2),
            "eval_seconds": round(sum(stage["eval_seconds"] for stage in stages), 2),
            "peak_memory_mb": max(stage["peak_memory_mb"] or 0 for stage in stages),
            "mixed_precision": stages[0]["mixed_precision"],
            "world_size": stages[0]["world_size"],
        }
        text = json.dumps(results, indent=2) + "\n"
        write_file_atomically(output_dir / "results.json", lambda f: f.write(text))
        learner.config.save(output_dir / "train_config.yaml")
        print(f"average accuracy {result.scores['average_accuracy']:.4f}; results: {output_dir / 'results.json'}")
    state.wait_for_everyone()
    state.destroy_process_group()


if __name__ == "__main__":
    run_recipe(main)
