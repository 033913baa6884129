"""CoNLL-2003 named-entity recognition on MiniLM (token classification) with any adapter method.

    accelerate launch recipes/conll03_ner.py --config recipes/configs/minilm/conll03_lora.yaml [key=value ...]

Trains on ``conll2003/eng.train``; each evaluation scores entity-level F1 (seqeval, conlleval scoring) on the
first ``max_eval_samples`` sentences of ``eng.testa`` (validation: best step, early stopping, learning-rate choice)
and on all of ``eng.testb`` (test, reported, never used to choose). ``results.json`` has ``entity_f1`` (test, at
the last step) and ``dev_entity_f1``. Each word's label sits on its first sub-token, and each word is predicted by
it.
"""

from __future__ import annotations

from transformers import DataCollatorForTokenClassification

from peftprompt.data import CONLL03_LABELS, CONLL03_WORD_COLUMNS, conll03_dataset
from peftprompt.training import build_model, train
from peftprompt.training.metrics import entity_f1
from peftprompt.training.recipe import parse_recipe_args, ship


def entity_metrics(records: list[dict], accelerator) -> dict:
    """Entity F1 over the evaluated sentences, from the first-sub-token predictions `train` gathers per row."""
    predicted = [[CONLL03_LABELS[p] for p in r["predictions"]] for r in records]
    gold = [[CONLL03_LABELS[label] for label in r["labels"]] for r in records]
    scores = entity_f1(predicted, gold)
    return {"entity_f1": scores["f1"], "entity_precision": scores["precision"], "entity_recall": scores["recall"]}


def main(argv=None) -> None:
    config = parse_recipe_args(__doc__, argv)
    if config.num_labels != len(CONLL03_LABELS):
        raise SystemExit(f"conll03_ner: num_labels must be {len(CONLL03_LABELS)} (the CoNLL-2003 tags), got {config.num_labels}")
    model, tokenizer = build_model(config)
    model.config.id2label = dict(enumerate(CONLL03_LABELS))
    model.config.label2id = {label: i for i, label in enumerate(CONLL03_LABELS)}

    def dataset(split: str, limit):
        rows = conll03_dataset(tokenizer, split, config.max_length, limit=limit)
        return rows.remove_columns(list(CONLL03_WORD_COLUMNS))

    train_set = dataset("train", config.max_train_samples)
    dev_set = dataset("testa", config.max_eval_samples)
    test_set = dataset("testb", None)
    collator = DataCollatorForTokenClassification(tokenizer)
    result = train(config, model, tokenizer, train_set, collator, dev_set, compute_metrics=entity_metrics,
                   test_dataset=test_set)
    scores = result.metrics
    metrics = {k: scores[f"test_{k}"] for k in ("entity_f1", "entity_precision", "entity_recall")}
    ship(result, {**metrics, "dev_entity_f1": scores["entity_f1"], "test_loss": scores["test_loss"],
                  "eval_loss": scores["loss"]}, ["conll2003"])


if __name__ == "__main__":
    main()
