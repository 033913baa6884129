"""SST-2 sentiment classification on MiniLM with any adapter method.

    accelerate launch recipes/sst2_classification.py --config recipes/configs/minilm/sst2_lora.yaml [key=value ...]

Trains on ``sst2/train.tsv`` and reports accuracy on ``sst2/test.tsv`` (698 labelled GLUE-dev sentences) at each
evaluation and at the end; no model selection on it (the last step's accuracy is the result).
"""

from __future__ import annotations

from transformers import DataCollatorWithPadding

from peftprompt.data import sst2_dataset
from peftprompt.training import build_model, train
from peftprompt.training.recipe import parse_recipe_args, ship


def main(argv=None) -> None:
    config = parse_recipe_args(__doc__, argv)
    model, tokenizer = build_model(config)
    train_set = sst2_dataset(tokenizer, "train", config.max_length, limit=config.max_train_samples)
    test_set = sst2_dataset(tokenizer, "test", config.max_length, limit=config.max_eval_samples)
    result = train(config, model, tokenizer, train_set, DataCollatorWithPadding(tokenizer), test_set)
    ship(result, {"accuracy": result.metrics["accuracy"], "eval_loss": result.metrics["loss"]}, ["sst2"])


if __name__ == "__main__":
    main()
