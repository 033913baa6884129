"""CoNLL-2003 named-entity recognition on MiniLM (token classification) with any adapter method.

    accelerate launch recipes/conll03_ner.py --config recipes/configs/minilm/conll03_lora.yaml [key=value ...]

Trains on ``conll2003/eng.train``; each evaluation scores entity-level F1 (seqeval, conlleval scoring) on the
first ``max_eval_samples`` sentences of ``eng.testa`` (validation: best step, early stopping, learning-rate choice)
and on all of ``eng.testb`` (test, reported, never used to choose). ``results.json`` has ``entity_f1`` (test, at
the last step) and ``dev_entity_f1``. Each word's label sits on its first sub-token, and each word is predicted by
it.

Each evaluation is scored by the `evaluate` modules of the config's ``metrics`` (default ``[seqeval]``, the
packaged module): each gets the predicted and gold IOB2 tags (a list of strings per sentence) as ``predictions`` /
``references``. The numbers they return are logged, ``precision`` / ``recall`` / ``f1`` as ``entity_precision`` /
``entity_recall`` / ``entity_f1``, other keys under their own names; seqeval's entity counts and per-type scores are
left out of the log. Add your own module by path, e.g. ``metrics: [seqeval, path/to/my_ner_metric]``.
"""

from __future__ import annotations

from transformers import DataCollatorForTokenClassification

from peftprompt.data import CONLL03_LABELS, conll03_dataset
from peftprompt.metrics import combine_metrics, flat_scores
from peftprompt.training import build_model, train
from peftprompt.training.data_config import NerData
from peftprompt.training.recipe import parse_recipe_args, run_recipe, ship


DEFAULT_METRICS = ["seqeval"]
ENTITY_KEYS = {"precision": "entity_precision", "recall": "entity_recall", "f1": "entity_f1"}
SEQEVAL_DETAILS = ("gold_entities", "predicted_entities", "per_type")  # not logged


def entity_metrics(names: list[str]):
    """`compute_metrics` for `train`: the `evaluate` modules `names`, combined, over the evaluated sentences' tags,
    from the first-sub-token predictions `train` gathers per row."""
    metric = combine_metrics(names)

    def compute(records: list[dict], accelerator) -> dict:
        predicted = [[CONLL03_LABELS[p] for p in r["predictions"]] for r in records]
        gold = [[CONLL03_LABELS[label] for label in r["labels"]] for r in records]
        scores = metric.compute(predictions=predicted, references=gold)
        return flat_scores(scores, rename=ENTITY_KEYS, leave_out=SEQEVAL_DETAILS)

    return compute


def main(argv=None) -> None:
    config = parse_recipe_args(__doc__, argv, data=NerData)
    if config.num_labels != len(CONLL03_LABELS):
        raise SystemExit(f"conll03_ner: num_labels must be {len(CONLL03_LABELS)} (the CoNLL-2003 tags), got {config.num_labels}")
    compute_metrics = entity_metrics(config.metrics or DEFAULT_METRICS)  # before the model: a bad module fails fast
    model, tokenizer = build_model(config)
    model.config.id2label = dict(enumerate(CONLL03_LABELS))
    model.config.label2id = {label: i for i, label in enumerate(CONLL03_LABELS)}

    train_set = conll03_dataset(tokenizer, "train", config.max_length, limit=config.max_train_samples)
    dev_set = conll03_dataset(tokenizer, "testa", config.max_length, limit=config.max_eval_samples)
    test_set = conll03_dataset(tokenizer, "testb", config.max_length)
    collator = DataCollatorForTokenClassification(tokenizer)
    result = train(config, model, tokenizer, train_set, collator, dev_set, compute_metrics=compute_metrics,
                   test_dataset=test_set)
    scores = result.metrics
    metrics = {k: scores[f"test_{k}"] for k in ("entity_f1", "entity_precision", "entity_recall")}
    ship(result, {**metrics, "dev_entity_f1": scores["entity_f1"], "test_loss": scores["test_loss"],
                  "eval_loss": scores["loss"]}, ["conll2003"])


if __name__ == "__main__":
    run_recipe(main)
