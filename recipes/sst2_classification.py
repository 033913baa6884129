"""SST-2 sentiment classification on MiniLM with any adapter method.

    accelerate launch recipes/sst2_classification.py --config recipes/configs/minilm/sst2_lora.yaml [key=value ...]

Trains on ``sst2/train.tsv``; each evaluation scores the first ``max_eval_samples`` sentences of ``sst2/dev.tsv``
(the validation set: best step, early stopping, learning-rate choice) and all of ``sst2/test.tsv`` (698 labelled
GLUE-dev sentences, reported, never used to choose). ``data.eval_min_words: N`` keeps only the validation rows of
at least N words: ``dev.tsv`` holds GLUE training phrases, mostly fragments, the test set whole sentences (the
``data`` section is `peftprompt.training.data_config.ClassificationData`).
``results.json`` has ``accuracy`` (test, at the last step) and ``dev_accuracy``.

Each evaluation is scored by the `evaluate` modules of the config's ``metrics`` (default ``[accuracy]``, the
packaged module): each gets the predicted and gold labels (ints) as ``predictions`` / ``references``, and the
numbers it returns are logged under their own keys (``test_`` ones for the test set). Add your own module by path,
e.g. ``metrics: [accuracy, path/to/my_f1]``.
"""

from __future__ import annotations

from transformers import DataCollatorWithPadding

from peftprompt.data import sst2_dataset
from peftprompt.metrics import combine_metrics, flat_scores
from peftprompt.training import build_model, train
from peftprompt.training.data_config import ClassificationData
from peftprompt.training.recipe import parse_recipe_args, run_recipe, ship

DEFAULT_METRICS = ["accuracy"]


def label_metrics(names: list[str]):
    """`compute_metrics` for `train`: the `evaluate` modules `names`, combined, over the predicted and gold labels."""
    metric = combine_metrics(names)

    def compute(records: list[dict], accelerator) -> dict:
        predictions = [r["prediction"] for r in records]
        return flat_scores(metric.compute(predictions=predictions, references=[r["label"] for r in records]))

    return compute


def main(argv=None) -> None:
    config = parse_recipe_args(__doc__, argv, data=ClassificationData)
    compute_metrics = label_metrics(config.metrics or DEFAULT_METRICS)  # before the model: a bad module fails fast
    model, tokenizer = build_model(config)
    train_set = sst2_dataset(tokenizer, "train", config.max_length, limit=config.max_train_samples)
    dev_set = sst2_dataset(tokenizer, "dev", config.max_length, limit=config.max_eval_samples,
                           min_words=config.data.eval_min_words)
    test_set = sst2_dataset(tokenizer, "test", config.max_length)
    result = train(config, model, tokenizer, train_set, DataCollatorWithPadding(tokenizer), dev_set,
                   compute_metrics=compute_metrics, test_dataset=test_set)
    metrics = result.metrics
    ship(result, {"accuracy": metrics["test_accuracy"], "dev_accuracy": metrics["accuracy"],
                  "test_loss": metrics["test_loss"], "eval_loss": metrics["loss"]}, ["sst2"])


if __name__ == "__main__":
    run_recipe(main)
